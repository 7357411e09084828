//! Protocol tests: both sides on a heap region.

use std::sync::Arc;

use super::*;

const SLOT: u32 = 4096;

fn params(entries: u32, slots: u32) -> RingParams {
    RingParams {
        ring_entries: entries,
        slot_count: slots,
        slot_size: SLOT,
        features: features::ALL,
    }
}

fn pair(entries: u32, slots: u32) -> (ClientRing<Arc<HeapRegion>>, AgentRing<Arc<HeapRegion>>) {
    let p = params(entries, slots);
    let region = Arc::new(HeapRegion::new(p.layout().unwrap().total));
    let client = ClientRing::create(region.clone(), p).unwrap();
    let agent = AgentRing::attach(region, features::ALL).unwrap();
    (client, agent)
}

fn req(id: u64, op: Opcode, sector: u64, len: u32) -> Request {
    Request {
        id,
        op,
        flags: 0,
        sector,
        len,
    }
}

fn pattern(id: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (id as usize).wrapping_mul(31).wrapping_add(i * 7) as u8)
        .collect()
}

/// A trivial agent: serves everything pending against an in-memory disk. Returns how many.
fn serve(agent: &mut AgentRing<Arc<HeapRegion>>, disk: &mut [u8]) -> usize {
    let mut n = 0;
    while let Some(r) = agent.pop_request() {
        let e = r.unwrap();
        let at = (e.sector * SECTOR_SIZE) as usize;
        let len = e.len as usize;
        let status = match e.op {
            Opcode::Read => {
                agent
                    .write_slot(e.slot.unwrap(), 0, &disk[at..at + len])
                    .unwrap();
                Status::Ok
            }
            Opcode::Write => {
                agent
                    .read_slot(e.slot.unwrap(), 0, &mut disk[at..at + len])
                    .unwrap();
                Status::Ok
            }
            Opcode::GetId => {
                agent.write_slot(e.slot.unwrap(), 0, b"test-disk").unwrap();
                Status::Ok
            }
            Opcode::Flush => Status::Ok,
            Opcode::Discard | Opcode::WriteZeroes | Opcode::NetTx | Opcode::NetRx => {
                Status::Unsupported
            }
        };
        let done = if e.op == Opcode::GetId { 9 } else { e.len };
        agent
            .complete(Completion {
                id: e.id,
                status,
                len: done,
            })
            .unwrap();
        n += 1;
    }
    n
}

/// Writes a raw completion at the agent's next position and publishes it, bypassing
/// `AgentRing` (which cannot produce garbage).
fn inject(region: &HeapRegion, layout: &Layout, c: RawCompletion) {
    let prod = region.load_u32(offsets::CMP_PROD, Load::Acquire).unwrap();
    c.store(region, layout.cmp_entry(prod)).unwrap();
    region
        .store_u32(offsets::CMP_PROD, prod.wrapping_add(1), Store::Release)
        .unwrap();
}

#[test]
fn round_trip_with_data() {
    let (mut client, mut agent) = pair(8, 4);
    assert!(!client.agent_status().unwrap().ready);
    agent.set_ready().unwrap();
    agent.heartbeat().unwrap();
    let st = client.agent_status().unwrap();
    assert!(st.ready);
    assert_eq!(st.heartbeat, 1);
    assert_eq!(st.features, features::ALL);

    let mut disk = vec![0u8; 64 * 1024];
    let data = pattern(7, 3000);
    let ws = client
        .submit(req(1, Opcode::Write, 8, 3000), Some(&data))
        .unwrap();
    assert!(ws.is_some());
    client.submit(req(2, Opcode::Flush, 0, 0), None).unwrap();
    assert_eq!(serve(&mut agent, &mut disk), 2);
    assert_eq!(&disk[4096..7096], &data[..]);
    let done = client.poll_completions();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].req.id, done[0].status, done[0].len),
        (1, Status::Ok, 3000)
    );
    assert_eq!((done[1].req.id, done[1].slot), (2, None));
    client.release_slot(done[0].slot.unwrap()).unwrap();

    client.submit(req(3, Opcode::Read, 8, 3000), None).unwrap();
    client.submit(req(4, Opcode::GetId, 0, 20), None).unwrap();
    serve(&mut agent, &mut disk);
    let done = client.poll_completions();
    assert_eq!(done.len(), 2);
    let mut back = vec![0u8; done[0].len as usize];
    client
        .read_slot(done[0].slot.unwrap(), 0, &mut back)
        .unwrap();
    assert_eq!(back, data);
    let mut id = [0u8; 9];
    client.read_slot(done[1].slot.unwrap(), 0, &mut id).unwrap();
    assert_eq!(&id, b"test-disk");
    for c in &done {
        client.release_slot(c.slot.unwrap()).unwrap();
    }
    assert_eq!(client.free_slots(), 4);
    assert_eq!(client.outstanding_len(), 0);
    assert_eq!(client.stats().bogus(), 0);
    assert_eq!(client.stats().completed, 4);
}

#[test]
fn data_written_in_place_goes_through_and_a_failed_fill_publishes_nothing() {
    let (mut client, mut agent) = pair(8, 2);
    let region = client.region().clone();
    let data = pattern(5, 2048);
    // The fill is handed the slot's offset and writes the data there itself.
    let slot = client
        .submit_with(req(1, Opcode::Write, 0, 2048), |at| {
            region.write_bytes(at, &data).is_ok()
        })
        .unwrap();
    assert!(slot.is_some());
    let mut disk = vec![0u8; 8192];
    assert_eq!(serve(&mut agent, &mut disk), 1);
    assert_eq!(&disk[..2048], &data[..]);
    // A fill that fails: an error, its slot back in the pool, no entry for the agent.
    let free = client.free_slots();
    assert_eq!(
        client.submit_with(req(2, Opcode::Write, 0, 512), |_| false),
        Err(RingError::FillFailed(2))
    );
    assert_eq!(client.free_slots(), free);
    assert_eq!(serve(&mut agent, &mut disk), 0);
    assert_eq!(client.outstanding_len(), 1);
    // Only requests that carry data are filled.
    assert!(client
        .submit_with(req(3, Opcode::Read, 0, 512), |_| true)
        .is_err());
    // A completed read's slot is handed out for a copy out of it only while held.
    client.submit(req(4, Opcode::Read, 0, 2048), None).unwrap();
    serve(&mut agent, &mut disk);
    let done = client.poll_completions();
    let read = done.iter().find(|c| c.req.id == 4).unwrap();
    let s = read.slot.unwrap();
    let at = client.held_range(s, 0, 2048).unwrap();
    let mut back = vec![0u8; 2048];
    region.read_bytes(at, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(client.held_range(s, 1, SLOT as usize).is_err());
    client.release_slot(s).unwrap();
    assert_eq!(client.held_range(s, 0, 1), Err(RingError::SlotNotHeld(s)));
}

#[test]
fn client_api_misuse_is_an_error() {
    let (mut client, _agent) = pair(4, 2);
    let w = req(1, Opcode::Write, 0, 10);
    assert!(client.submit(w, None).is_err());
    assert!(client.submit(w, Some(&[0; 9])).is_err());
    assert!(client
        .submit(req(1, Opcode::Read, 0, 10), Some(&[0; 10]))
        .is_err());
    assert!(client
        .submit(req(1, Opcode::Read, 0, SLOT + 1), None)
        .is_err());
    assert!(client.submit(req(1, Opcode::Flush, 0, 1), None).is_err());
    let fua_read = Request {
        flags: flags::FUA,
        ..req(1, Opcode::Read, 0, 1)
    };
    assert!(client.submit(fua_read, None).is_err());
    client.submit(req(1, Opcode::Read, 0, 10), None).unwrap();
    assert_eq!(
        client.submit(req(1, Opcode::Read, 0, 10), None),
        Err(RingError::DuplicateId(1))
    );
    client.submit(req(2, Opcode::Read, 0, 10), None).unwrap();
    assert_eq!(
        client.submit(req(3, Opcode::Read, 0, 10), None),
        Err(RingError::NoFreeSlot)
    );
    client.submit(req(3, Opcode::Flush, 0, 0), None).unwrap();
    client
        .submit(req(4, Opcode::Discard, 0, 1 << 30), None)
        .unwrap();
    assert_eq!(
        client.submit(req(5, Opcode::Flush, 0, 0), None),
        Err(RingError::RingFull)
    );
    // Slots not yet completed (or free) cannot be read or released.
    assert_eq!(
        client.read_slot(0, 0, &mut [0; 4]),
        Err(RingError::SlotNotHeld(0))
    );
    assert_eq!(client.release_slot(0), Err(RingError::SlotNotHeld(0)));
    assert_eq!(client.release_slot(99), Err(RingError::SlotNotHeld(99)));
}

#[test]
fn wrap_around_many_requests() {
    let (mut client, _first) = pair(8, 4);
    client.force_indices(u32::MAX - 5000);
    let mut agent = AgentRing::attach(client.region().clone(), features::ALL).unwrap();
    let mut disk = vec![0u8; 1 << 20];
    let mut id = 0u64;
    for round in 0..3000u64 {
        let batch = 1 + (round % 4);
        for _ in 0..batch {
            let len = 1 + (id as usize * 13) % SLOT as usize;
            let sector = (id % 200) * 8;
            client
                .submit(
                    req(id, Opcode::Write, sector, len as u32),
                    Some(&pattern(id, len)),
                )
                .unwrap();
            id += 1;
        }
        serve(&mut agent, &mut disk);
        let mut seen = 0;
        for c in client.poll_completions() {
            let len = c.req.len as usize;
            let at = (c.req.sector * SECTOR_SIZE) as usize;
            assert_eq!(&disk[at..at + len], &pattern(c.req.id, len)[..]);
            client.release_slot(c.slot.unwrap()).unwrap();
            seen += 1;
        }
        assert_eq!(seen, batch);
    }
    assert!(id > 7000);
    let prod = client
        .region()
        .load_u32(offsets::REQ_PROD, Load::Relaxed)
        .unwrap();
    assert!(prod < 5000, "index wrapped past u32::MAX");
    assert_eq!(client.stats().bogus(), 0);
    assert_eq!(client.outstanding_len(), 0);
}

#[test]
fn notification_suppression() {
    let (mut client, mut agent) = pair(8, 8);
    // Freshly attached agent is armed: the first request notifies, the next ones do not
    // until the agent re-arms.
    client.submit(req(1, Opcode::Flush, 0, 0), None).unwrap();
    assert!(client.needs_notify_agent());
    client.submit(req(2, Opcode::Flush, 0, 0), None).unwrap();
    assert!(!client.needs_notify_agent());
    assert!(!client.needs_notify_agent(), "nothing new published");
    // Agent re-arms while requests are pending: told to keep polling.
    assert!(agent.enable_notify());
    assert!(agent.pop_request().is_some());
    assert!(agent.pop_request().is_some());
    assert!(agent.pop_request().is_none());
    assert!(!agent.enable_notify(), "ring empty: safe to sleep");
    client.submit(req(3, Opcode::Flush, 0, 0), None).unwrap();
    client.submit(req(4, Opcode::Flush, 0, 0), None).unwrap();
    assert!(
        client.needs_notify_agent(),
        "a batch passing the event notifies once"
    );
    client.submit(req(5, Opcode::Flush, 0, 0), None).unwrap();
    assert!(!client.needs_notify_agent());

    // Completion side: client not armed yet (cmp_event = 0 at creation, i.e. armed at 0).
    agent
        .complete(Completion {
            id: 1,
            status: Status::Ok,
            len: 0,
        })
        .unwrap();
    assert!(agent.needs_notify_client());
    agent
        .complete(Completion {
            id: 2,
            status: Status::Ok,
            len: 0,
        })
        .unwrap();
    assert!(
        !agent.needs_notify_client(),
        "client is polling, not re-armed"
    );
    assert!(client.enable_notify(), "completions pending");
    assert_eq!(client.poll_completions().len(), 2);
    assert!(!client.enable_notify());
    agent
        .complete(Completion {
            id: 3,
            status: Status::Ok,
            len: 0,
        })
        .unwrap();
    assert!(agent.needs_notify_client());
}

#[test]
fn generation_change_discards_late_completions_and_replays_in_order() {
    let (mut client, mut old) = pair(16, 8);
    old.set_ready().unwrap();
    let data = pattern(3, 100);
    let reqs = [
        req(10, Opcode::Read, 0, 512),
        req(11, Opcode::Flush, 0, 0),
        req(12, Opcode::Write, 8, 100),
        req(13, Opcode::Read, 16, 512),
    ];
    for r in reqs {
        client
            .submit(r, (r.op == Opcode::Write).then_some(&data[..]))
            .unwrap();
    }
    // The old agent takes two and completes one before dying.
    let a = old.pop_request().unwrap().unwrap();
    let b = old.pop_request().unwrap().unwrap();
    old.complete(Completion {
        id: a.id,
        status: Status::Ok,
        len: 512,
    })
    .unwrap();
    let done = client.poll_completions();
    assert_eq!(done.len(), 1);
    client.release_slot(done[0].slot.unwrap()).unwrap();

    let replay = client.new_generation().unwrap();
    assert_eq!(client.generation(), 2);
    assert_eq!(
        replay,
        reqs[1..].to_vec(),
        "outstanding, in submission order"
    );
    assert_eq!(client.outstanding_len(), 0);
    assert_eq!(client.free_slots(), 8, "replayed requests' slots freed");
    assert!(!client.agent_status().unwrap().ready);
    assert!(!old.is_current());

    // A late completion from the old agent (it was not quite dead) is discarded.
    old.complete(Completion {
        id: b.id,
        status: Status::Ok,
        len: 0,
    })
    .unwrap();
    assert!(client.poll_completions().is_empty());
    assert_eq!(client.stats().stale_generation, 1);

    // The new agent adopts the indices; the caller replays.
    let mut new = AgentRing::attach(client.region().clone(), features::ALL).unwrap();
    assert_eq!(new.generation(), 2);
    new.set_ready().unwrap();
    assert!(client.agent_status().unwrap().ready);
    for r in &replay {
        client
            .submit(*r, (r.op == Opcode::Write).then_some(&data[..]))
            .unwrap();
    }
    let mut disk = vec![0u8; 64 * 1024];
    assert_eq!(serve(&mut new, &mut disk), 3);
    let done = client.poll_completions();
    let ids: Vec<u64> = done.iter().map(|c| c.req.id).collect();
    assert_eq!(ids, vec![11, 12, 13]);
    assert_eq!(&disk[4096..4196], &data[..]);
    assert_eq!(client.stats().bogus(), 1);
}

#[test]
fn bogus_completions_are_counted_and_ignored() {
    let (mut client, mut agent) = pair(16, 4);
    let region = client.region().clone();
    let layout = *client.layout();
    client.submit(req(1, Opcode::Read, 0, 1024), None).unwrap();
    client.submit(req(2, Opcode::Flush, 0, 0), None).unwrap();
    let gen = client.generation();
    let raw = |id, generation, status, len| RawCompletion {
        id,
        generation,
        status,
        len,
    };

    agent
        .complete(Completion {
            id: 99,
            status: Status::Ok,
            len: 0,
        })
        .unwrap();
    inject(&region, &layout, raw(1, gen + 7, 0, 10));
    inject(&region, &layout, raw(1, 0, 0, 10));
    inject(&region, &layout, raw(1, gen, 3, 10));
    inject(&region, &layout, raw(1, gen, u32::MAX, 10));
    inject(&region, &layout, raw(1, gen, 0, 1025));
    inject(&region, &layout, raw(1, gen, 0, u32::MAX));
    inject(&region, &layout, raw(2, gen, 1, 0));
    inject(&region, &layout, raw(2, gen, 0, 0)); // duplicate
    let done = client.poll_completions();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].req.id, done[0].status), (2, Status::IoErr));
    let s = client.stats();
    assert_eq!(
        (
            s.unknown_id,
            s.stale_generation,
            s.bad_status,
            s.bad_length,
            s.bad_index
        ),
        (2, 2, 2, 2, 0)
    );
    assert_eq!(
        client.outstanding().map(|r| r.id).collect::<Vec<_>>(),
        vec![1]
    );
    // Its slot is still in flight: not readable.
    assert!(client.read_slot(0, 0, &mut [0; 8]).is_err());

    // A producer index far ahead: nothing consumed, and the ring is corrupt for good (this
    // generation): an index put back does not revive it, nothing reports "pending".
    let cons = region.load_u32(offsets::CMP_CONS, Load::Relaxed).unwrap();
    region
        .store_u32(offsets::CMP_PROD, cons.wrapping_add(17), Store::Release)
        .unwrap();
    assert!(client.poll_completions().is_empty());
    assert_eq!(client.corruption(), Some(Corruption::CompletionProducer));
    region
        .store_u32(offsets::CMP_PROD, cons, Store::Release)
        .unwrap();
    inject(&region, &layout, raw(1, gen, 0, 1024));
    assert!(client.poll_completions().is_empty());
    assert!(
        !client.enable_notify(),
        "a corrupt ring has nothing pending"
    );
    assert_eq!(
        client.submit(req(9, Opcode::Flush, 0, 0), None),
        Err(RingError::IndexCorrupt)
    );
    assert_eq!(client.stats().bad_index, 1);
    assert_eq!(
        client.outstanding_len(),
        1,
        "the request stays, to be replayed"
    );

    // A new generation (a new agent) serves the replayed request.
    let replay = client.new_generation().unwrap();
    assert_eq!(client.corruption(), None);
    assert_eq!(replay.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
    client.submit(replay[0], None).unwrap();
    let mut agent = AgentRing::attach(region.clone(), features::ALL).unwrap();
    let r = agent.pop_request().unwrap().unwrap();
    agent.write_slot(r.slot.unwrap(), 0, &[7; 1024]).unwrap();
    agent
        .complete(Completion {
            id: 1,
            status: Status::Ok,
            len: 1024,
        })
        .unwrap();
    let done = client.poll_completions();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].len, 1024);
    let mut buf = vec![0u8; 1024];
    client
        .read_slot(done[0].slot.unwrap(), 0, &mut buf)
        .unwrap();
    assert_eq!(buf, [7; 1024]);
    assert!(client
        .read_slot(done[0].slot.unwrap(), 1, &mut vec![0; SLOT as usize])
        .is_err());
}

#[test]
fn an_index_behind_is_as_corrupt_as_one_ahead() {
    let (mut client, _agent) = pair(8, 8);
    let region = client.region().clone();
    region
        .store_u32(offsets::CMP_PROD, u32::MAX, Store::Release)
        .unwrap();
    assert!(!client.enable_notify());
    assert_eq!(client.corruption(), Some(Corruption::CompletionProducer));
    assert!(client.poll_completions().is_empty());
}

#[test]
fn client_survives_hostile_request_consumer_index() {
    let (mut client, _agent) = pair(8, 8);
    let region = client.region().clone();
    region
        .store_u32(offsets::REQ_CONS, 1000, Store::Release)
        .unwrap();
    assert_eq!(
        client.submit(req(1, Opcode::Flush, 0, 0), None),
        Err(RingError::IndexCorrupt)
    );
    assert_eq!(client.corruption(), Some(Corruption::RequestConsumer));
    region
        .store_u32(offsets::REQ_EVENT, 12345, Store::Release)
        .unwrap();
    let _ = client.needs_notify_agent();
    // Sticky: the index put back does not make the ring usable again in this generation.
    region
        .store_u32(offsets::REQ_CONS, 0, Store::Release)
        .unwrap();
    assert_eq!(
        client.submit(req(1, Opcode::Flush, 0, 0), None),
        Err(RingError::IndexCorrupt)
    );
    client.new_generation().unwrap();
    client.submit(req(1, Opcode::Flush, 0, 0), None).unwrap();
}

#[test]
fn agent_validates_requests() {
    let (client, mut agent) = pair(8, 4);
    let region = client.region().clone();
    let layout = *client.layout();
    let put = |index: u32, r: RawRequest| {
        r.store(&*region, layout.req_entry(index)).unwrap();
        region
            .store_u32(offsets::REQ_PROD, index + 1, Store::Release)
            .unwrap();
    };
    let ok = RawRequest {
        id: 5,
        opcode: 0,
        flags: 0,
        sector: 1,
        len: 512,
        slot: 3,
    };
    let cases: [(RawRequest, Option<&str>); 9] = [
        (ok, None),
        (
            RawRequest {
                opcode: 0x102,
                ..ok
            },
            Some("unknown opcode"),
        ),
        (
            RawRequest {
                opcode: u32::MAX,
                ..ok
            },
            Some("unknown opcode"),
        ),
        (RawRequest { slot: 4, ..ok }, Some("slot out of range")),
        (
            RawRequest {
                slot: NO_SLOT,
                ..ok
            },
            Some("slot out of range"),
        ),
        (
            RawRequest {
                len: SLOT + 1,
                ..ok
            },
            Some("length exceeds slot"),
        ),
        (
            RawRequest {
                flags: flags::FUA,
                ..ok
            },
            Some("flags not allowed"),
        ),
        (
            RawRequest {
                opcode: 2,
                slot: 0,
                len: 0,
                ..ok
            },
            Some("slot given to a dataless request"),
        ),
        (
            RawRequest {
                opcode: 2,
                slot: NO_SLOT,
                len: 1,
                ..ok
            },
            Some("flush with a length"),
        ),
    ];
    for (i, (r, want)) in cases.into_iter().enumerate() {
        put(i as u32, r);
        let got = agent.pop_request().unwrap();
        match want {
            None => assert_eq!(got.unwrap().slot, Some(3)),
            Some(reason) => assert_eq!(got, Err(RingError::InvalidRequest { id: 5, reason })),
        }
        assert!(agent.pop_request().is_none());
    }
    // The producer index jumps: error, nothing consumed, no out-of-place read.
    region
        .store_u32(offsets::REQ_PROD, 100, Store::Release)
        .unwrap();
    assert_eq!(agent.pop_request(), Some(Err(RingError::IndexCorrupt)));
    region
        .store_u32(offsets::REQ_PROD, 3, Store::Release)
        .unwrap();
    assert_eq!(agent.pop_request(), Some(Err(RingError::IndexCorrupt)));
    // Slot access bounds.
    assert!(agent.write_slot(3, SLOT as usize - 1, &[1, 2]).is_err());
    assert!(agent.write_slot(4, 0, &[1]).is_err());
    assert!(agent.read_slot(0, usize::MAX, &mut [0]).is_err());
    // Completion ring full / consumer index corrupt.
    for i in 0..8 {
        agent
            .complete(Completion {
                id: i,
                status: Status::Ok,
                len: 0,
            })
            .unwrap();
    }
    let c = Completion {
        id: 9,
        status: Status::Ok,
        len: 0,
    };
    assert_eq!(agent.complete(c), Err(RingError::RingFull));
    region
        .store_u32(offsets::CMP_CONS, 4000, Store::Release)
        .unwrap();
    assert_eq!(agent.complete(c), Err(RingError::IndexCorrupt));
}

#[test]
fn attach_rejects_hostile_headers() {
    let p = params(8, 4);
    let layout = p.layout().unwrap();
    let fresh = || {
        let region = Arc::new(HeapRegion::new(layout.total));
        ClientRing::create(region.clone(), p).unwrap();
        region
    };
    assert!(AgentRing::attach(fresh(), 0).is_ok());
    let u32_cases: &[(usize, u32, &str)] = &[
        (
            offsets::VERSION_MAJOR,
            2,
            "unsupported protocol version 2.0",
        ),
        (
            offsets::VERSION_MAJOR,
            0,
            "unsupported protocol version 0.0",
        ),
        (
            offsets::RING_ENTRIES,
            0,
            "bad layout: ring entries not a power of two in range",
        ),
        (
            offsets::RING_ENTRIES,
            6,
            "bad layout: ring entries not a power of two in range",
        ),
        (
            offsets::RING_ENTRIES,
            1 << 31,
            "bad layout: ring entries not a power of two in range",
        ),
        (
            offsets::SLOT_COUNT,
            1 << 31,
            "bad layout: slot count not a power of two in range",
        ),
        (
            offsets::SLOT_SIZE,
            100,
            "bad layout: slot size not a multiple of 4 KiB in range",
        ),
        (
            offsets::SLOT_SIZE,
            !0xFFF,
            "bad layout: slot size not a multiple of 4 KiB in range",
        ),
        (
            offsets::RING_ENTRIES,
            256,
            "bad layout: stated offsets disagree with the sizes",
        ),
        (offsets::REQ_PROD, 9, "peer ring index corrupt"),
        (offsets::CMP_PROD, u32::MAX, "peer ring index corrupt"),
    ];
    for &(off, v, msg) in u32_cases {
        let r = fresh();
        r.store_u32(off, v, Store::Relaxed).unwrap();
        let err = AgentRing::attach(r, 0).unwrap_err();
        assert_eq!(err.to_string(), msg, "field {off:#x} = {v:#x}");
    }
    // Sizes that are self-consistent but larger than the region.
    let r = fresh();
    let big = Layout::new(8, 8, SLOT).unwrap();
    r.store_u32(offsets::SLOT_COUNT, 8, Store::Relaxed).unwrap();
    r.store_u64(offsets::REGION_SIZE, big.total as u64, Store::Relaxed)
        .unwrap();
    assert!(matches!(
        AgentRing::attach(r, 0),
        Err(RingError::RegionTooSmall { .. })
    ));
    let r = fresh();
    r.store_u64(offsets::SLOTS_OFFSET, 0, Store::Relaxed)
        .unwrap();
    assert!(matches!(
        AgentRing::attach(r, 0),
        Err(RingError::BadLayout(_))
    ));
    let r = fresh();
    r.store_u64(offsets::GENERATION, 0, Store::Relaxed).unwrap();
    assert!(matches!(
        AgentRing::attach(r, 0),
        Err(RingError::BadLayout(_))
    ));
    let r = fresh();
    r.write_bytes(offsets::MAGIC, b"DDVMRINH").unwrap();
    assert_eq!(AgentRing::attach(r, 0).unwrap_err(), RingError::BadMagic);
    // Empty, tiny and all-ones regions.
    assert!(AgentRing::attach(HeapRegion::new(0), 0).is_err());
    assert!(AgentRing::attach(HeapRegion::new(100), 0).is_err());
    let ones = HeapRegion::new(layout.total);
    ones.write_bytes(0, &vec![0xFF; layout.total]).unwrap();
    ones.write_bytes(0, &MAGIC).unwrap();
    ones.store_u32(offsets::VERSION_MAJOR, 1, Store::Relaxed)
        .unwrap();
    assert!(AgentRing::attach(ones, 0).is_err());
    // Random headers with valid magic and version never panic.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..2000 {
        let r = fresh();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x as usize % 0x280) & !7;
            if off >= 0x10 {
                r.store_u64(off, x.rotate_left(17) >> (x % 64), Store::Relaxed)
                    .unwrap();
            }
        }
        if let Ok(mut a) = AgentRing::attach(r, features::ALL) {
            for _ in 0..20 {
                let _ = a.pop_request();
            }
        }
    }
}

#[test]
fn features_are_negotiated() {
    let p = RingParams {
        features: features::FUA | features::DISCARD,
        ..params(4, 4)
    };
    let region = Arc::new(HeapRegion::new(p.layout().unwrap().total));
    let client = ClientRing::create(region.clone(), p).unwrap();
    let agent = AgentRing::attach(region.clone(), features::FUA | features::GET_ID).unwrap();
    assert_eq!(agent.features(), features::FUA);
    agent.set_ready().unwrap();
    assert_eq!(client.agent_status().unwrap().features, features::FUA);
    region
        .store_u64(offsets::AGENT_FEATURES, u64::MAX, Store::Relaxed)
        .unwrap();
    assert_eq!(
        client.agent_status().unwrap().features,
        p.features,
        "masked with offer"
    );
}

#[test]
fn create_rejects_small_region_and_bad_params() {
    let p = params(8, 4);
    let small = HeapRegion::new(p.layout().unwrap().total - 1);
    assert!(matches!(
        ClientRing::create(small, p),
        Err(RingError::RegionTooSmall { .. })
    ));
    let bad = RingParams {
        slot_size: 1000,
        ..p
    };
    assert!(ClientRing::create(HeapRegion::new(1 << 20), bad).is_err());
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn two_threads_100k_requests() {
    const N: u64 = 100_000;
    let (mut client, mut agent) = pair(64, 32);
    let agent_thread = std::thread::spawn(move || {
        let mut served = 0u64;
        let mut buf = vec![0u8; SLOT as usize];
        while served < N {
            let Some(r) = agent.pop_request() else {
                if agent.enable_notify() {
                    continue;
                }
                std::thread::yield_now();
                continue;
            };
            let e = r.unwrap();
            let len = e.len as usize;
            let slot = e.slot.unwrap();
            // Write: the agent checksums the data; it answers by putting the checksum into the
            // slot as "read data", so both directions carry payload.
            agent.read_slot(slot, 0, &mut buf[..len]).unwrap();
            agent
                .write_slot(slot, 0, &checksum(&buf[..len]).to_le_bytes())
                .unwrap();
            agent
                .complete(Completion {
                    id: e.id,
                    status: Status::Ok,
                    len: e.len,
                })
                .unwrap();
            let _ = agent.needs_notify_client();
            served += 1;
        }
        agent
    });
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut next_check = 0u64;
    while completed < N {
        while submitted < N && client.free_slots() > 0 {
            let len = 8 + (submitted as usize * 97) % (SLOT as usize - 8);
            let data = pattern(submitted, len);
            client
                .submit(req(submitted, Opcode::Write, 0, len as u32), Some(&data))
                .unwrap();
            submitted += 1;
        }
        let _ = client.needs_notify_agent();
        let done = client.poll_completions();
        if done.is_empty() {
            std::thread::yield_now();
        }
        for c in done {
            let slot = c.slot.unwrap();
            let mut sum = [0u8; 8];
            client.read_slot(slot, 0, &mut sum).unwrap();
            let want = checksum(&pattern(c.req.id, c.req.len as usize));
            assert_eq!(u64::from_le_bytes(sum), want, "request {}", c.req.id);
            assert_eq!(c.len, c.req.len);
            // With one agent thread serving in order, completions arrive in order.
            assert_eq!(c.req.id, next_check);
            next_check += 1;
            client.release_slot(slot).unwrap();
            completed += 1;
        }
    }
    agent_thread.join().unwrap();
    assert_eq!(client.stats().completed, N);
    assert_eq!(client.stats().bogus(), 0);
}

#[test]
fn network_frames_cross_both_ways_and_are_replayed() {
    let (mut client, mut agent) = pair(8, 4);
    agent.set_ready().unwrap();
    let frame = pattern(3, 1514);
    client
        .submit(req(1, Opcode::NetTx, 0, 1514), Some(&frame))
        .unwrap();
    client.submit(req(2, Opcode::NetRx, 0, SLOT), None).unwrap();
    // A transmit must carry its frame; a receive buffer must not.
    assert!(client.submit(req(3, Opcode::NetTx, 0, 60), None).is_err());
    assert!(client
        .submit(req(3, Opcode::NetRx, 0, SLOT), Some(&frame[..60]))
        .is_err());
    assert!(client
        .submit(req(3, Opcode::NetRx, 0, SLOT + 1), None)
        .is_err());

    let tx = agent.pop_request().unwrap().unwrap();
    assert_eq!((tx.op, tx.len), (Opcode::NetTx, 1514));
    let mut got = vec![0u8; 1514];
    agent.read_slot(tx.slot.unwrap(), 0, &mut got).unwrap();
    assert_eq!(got, frame);
    let rx = agent.pop_request().unwrap().unwrap();
    assert_eq!(rx.op, Opcode::NetRx);
    let incoming = pattern(9, 98);
    agent.write_slot(rx.slot.unwrap(), 0, &incoming).unwrap();
    let gen = agent.generation();
    // A receive completion longer than the buffer is rejected, then the real one counts.
    agent
        .publish_unchecked(RawCompletion {
            id: 2,
            generation: gen,
            status: 0,
            len: SLOT + 1,
        })
        .unwrap();
    for (id, len) in [(1, 0), (2, 98)] {
        agent
            .complete(Completion {
                id,
                status: Status::Ok,
                len,
            })
            .unwrap();
    }
    let done = client.poll_completions();
    assert_eq!(client.stats().bad_length, 1);
    assert_eq!(done.len(), 2);
    let rx_done = done.iter().find(|c| c.req.op == Opcode::NetRx).unwrap();
    let mut back = vec![0u8; rx_done.len as usize];
    client
        .read_slot(rx_done.slot.unwrap(), 0, &mut back)
        .unwrap();
    assert_eq!(back, incoming);

    // Outstanding frames and buffers come back for replay, in order, on a new generation.
    client
        .submit(req(4, Opcode::NetTx, 0, 60), Some(&frame[..60]))
        .unwrap_or_else(|e| panic!("{e}"));
    client.submit(req(5, Opcode::NetRx, 0, SLOT), None).ok();
    let replay = client.new_generation().unwrap();
    let ops: Vec<_> = replay.iter().map(|r| (r.id, r.op)).collect();
    assert_eq!(ops, [(4, Opcode::NetTx), (5, Opcode::NetRx)]);
}

#[test]
fn header_view_follows_the_agent() {
    let p = params(8, 8);
    let region = Arc::new(HeapRegion::new(p.layout().unwrap().total));
    let view = || {
        let mut b = vec![0u8; HeaderView::LEN];
        region.read_bytes(0, &mut b).unwrap();
        HeaderView::parse(&b).unwrap()
    };
    assert_eq!(view(), HeaderView::default());
    assert!(!view().agent_serves_current());
    let mut client = ClientRing::create(region.clone(), p).unwrap();
    let created = view();
    assert_ne!(created.generation, 0);
    assert!(!created.agent_serves_current());
    let mut agent = AgentRing::attach(region.clone(), features::ALL).unwrap();
    assert!(!view().agent_serves_current());
    agent.set_ready().unwrap();
    agent.heartbeat().unwrap();
    let v = view();
    assert!(v.agent_serves_current());
    assert_eq!(v.agent_generation, v.generation);
    assert!(v.heartbeat > created.heartbeat);
    client.submit(req(1, Opcode::Read, 0, 512), None).unwrap();
    assert_eq!(view().req_prod, 1);
    assert_eq!(view().cmp_prod, 0);
    // A new generation the agent has not attached to yet.
    client.new_generation().unwrap();
    assert!(!view().agent_serves_current());
    // Short input is refused, not read past.
    assert_eq!(HeaderView::parse(&[0u8; HeaderView::LEN - 1]), None);
}
