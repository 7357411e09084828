//! Fuzzes the shared-memory ring with a hostile peer.
//!
//! Mode 0 (client side): a ring is created with requests of every kind outstanding and some of
//! them completed by an honest agent; the input is a list of 32-bit writes over the header and the completion ring, each followed by
//! `poll_completions`, slot reads and releases; then a generation change and replay.
//! Mode 1 (agent side): the same over the header and the request ring, with `AgentRing::attach`
//! and `pop_request` interleaved. Mode 2: the input is the whole region, then attach and pop.
//! Nothing may panic, and whatever the client accepts must be consistent.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use ddvmm_translation::ring::{
    features, AgentRing, ClientRing, Completion, HeapRegion, Opcode, Request, RingParams,
    SharedRegion, Status, Store,
};
use libfuzzer_sys::fuzz_target;

const PARAMS: RingParams = RingParams {
    ring_entries: 8,
    slot_count: 4,
    slot_size: 4096,
    features: features::ALL,
};

type Region = Arc<HeapRegion>;

fn setup() -> (Region, ClientRing<Region>, HashSet<u64>) {
    let layout = PARAMS.layout().expect("layout");
    let region = Arc::new(HeapRegion::new(layout.total));
    let mut client = ClientRing::create(region.clone(), PARAMS).expect("create");
    let mut ids = HashSet::new();
    let reqs = [
        (Opcode::Read, 4096),
        (Opcode::Write, 100),
        (Opcode::Flush, 0),
        (Opcode::GetId, 20),
        (Opcode::Discard, 1 << 20),
        (Opcode::Read, 1),
        (Opcode::WriteZeroes, 512),
    ];
    for (id, (op, len)) in reqs.into_iter().enumerate() {
        let data = (op == Opcode::Write).then(|| vec![0xA5; len as usize]);
        let req = Request {
            id: id as u64,
            op,
            flags: 0,
            sector: id as u64,
            len,
        };
        client.submit(req, data.as_deref()).expect("submit");
        ids.insert(id as u64);
    }
    (region, client, ids)
}

/// Decodes 6-byte records into (offset, value): the offset's low bit picks the header's first
/// 0x280 bytes or `area` (a ring), the rest of it the 4-aligned offset inside.
fn records(data: &[u8], area: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
    data.chunks_exact(6).map(move |r| {
        let raw = usize::from(u16::from_le_bytes([r[0], r[1]]));
        let off = if raw & 1 == 0 {
            (raw >> 1) % 0x280
        } else {
            area + (raw >> 1) % (8 * 32)
        };
        (off & !3, u32::from_le_bytes([r[2], r[3], r[4], r[5]]))
    })
}

fn poll(client: &mut ClientRing<Region>, outstanding: &mut HashSet<u64>, probe: u32) {
    for c in client.poll_completions() {
        assert!(
            outstanding.remove(&c.req.id),
            "completed an id that was not outstanding"
        );
        assert!(c.len <= c.req.len);
        if let Some(slot) = c.slot {
            let mut buf = vec![0u8; c.len as usize];
            client
                .read_slot(slot, 0, &mut buf)
                .expect("read within a held slot");
            let mut probe_buf = vec![0u8; (probe % 8192) as usize];
            let _ = client.read_slot(probe % 8, (probe >> 8) as usize % 8192, &mut probe_buf);
            client.release_slot(slot).expect("release a held slot");
        }
    }
    assert_eq!(client.outstanding_len(), outstanding.len());
}

fn client_mode(data: &[u8]) {
    let Some((&honest, data)) = data.split_first() else {
        return;
    };
    let (region, mut client, mut outstanding) = setup();
    let cmp_ring = client.layout().cmp_ring;
    // An honest agent completes some requests first, so that the writes below corrupt real
    // completions (and some stay valid).
    if let Ok(mut agent) = AgentRing::attach(region.clone(), features::ALL) {
        for i in 0..honest % 8 {
            if let Some(Ok(e)) = agent.pop_request() {
                let len = if i % 2 == 0 { e.len } else { e.len / 2 };
                let _ = agent.complete(Completion {
                    id: e.id,
                    status: Status::Ok,
                    len,
                });
            }
        }
    }
    for (off, v) in records(data, cmp_ring) {
        let _ = region.store_u32(off, v, Store::Release);
        poll(&mut client, &mut outstanding, v);
        let _ = client.needs_notify_agent();
        let _ = client.enable_notify();
        let _ = client.agent_status();
    }
    // Generation change: everything still outstanding comes back, in order, and replays.
    let replay = client.new_generation().expect("new generation");
    assert_eq!(replay.len(), outstanding.len());
    assert!(
        replay.windows(2).all(|w| w[0].id < w[1].id),
        "submission order"
    );
    for r in replay {
        let data = (r.op == Opcode::Write).then(|| vec![0x5A; r.len as usize]);
        client.submit(r, data.as_deref()).expect("replay");
    }
    let _ = client.poll_completions();
}

fn serve(agent: &mut AgentRing<Region>, budget: usize) {
    let mut buf = vec![0u8; 4096];
    for _ in 0..budget {
        let e = match agent.pop_request() {
            None => return,
            Some(Err(_)) => continue,
            Some(Ok(e)) => e,
        };
        if let Some(slot) = e.slot {
            let len = e.len as usize;
            agent
                .read_slot(slot, 0, &mut buf[..len])
                .expect("validated request fits its slot");
            agent
                .write_slot(slot, 0, &buf[..len])
                .expect("validated request fits its slot");
        }
        let _ = agent.complete(Completion {
            id: e.id,
            status: Status::Ok,
            len: e.len,
        });
        let _ = agent.needs_notify_client();
    }
    let _ = agent.enable_notify();
    let _ = agent.heartbeat();
}

fn agent_mode(data: &[u8]) {
    let (region, client, _) = setup();
    let req_ring = client.layout().req_ring;
    let mut agent = None;
    for (off, v) in records(data, req_ring) {
        let _ = region.store_u32(off, v, Store::Release);
        match &mut agent {
            None if v & 1 == 1 => agent = AgentRing::attach(region.clone(), features::ALL).ok(),
            None => {}
            Some(a) => serve(a, 4),
        }
    }
    if let Ok(mut a) = AgentRing::attach(region, features::ALL) {
        let _ = a.set_ready();
        serve(&mut a, 64);
    }
}

fn raw_mode(data: &[u8]) {
    let region = Arc::new(HeapRegion::new(0x8000));
    let _ = region.write_bytes(0, &data[..data.len().min(0x8000)]);
    if let Ok(mut a) = AgentRing::attach(region, features::ALL) {
        let _ = a.set_ready();
        serve(&mut a, 64);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => client_mode(rest),
        1 => agent_mode(rest),
        _ => raw_mode(rest),
    }
});
