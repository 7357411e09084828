//! Fuzzes the real ring frontends (virtio-blk and virtio-net over a ring) with a hostile agent
//! and a hostile guest at once.
//!
//! The frontend is the production worker ([`Stepper`]: the same device, journal, ring and
//! command handling, one loop turn per step, no thread). The input is a list of operations:
//! the agent stores any 32-bit value at any offset of the header and rings, writes slot
//! bytes, or serves requests honestly (to reach deep states); the guest writes any bytes over
//! its queues, descriptors and buffers and publishes avail entries; the daemon replays,
//! releases and quarantines; the guest activates and resets. After each step: no panic, the
//! step returned (bounded work: a hang is a libFuzzer timeout), and the gauges stay within the
//! ring's and the journal's bounds. Every channel-memory access goes through the ring's
//! bounds-checked region, so an out-of-slot access would be a refused access, never memory
//! outside the mapping.
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use ddvmm::devices::channel::ChannelFds;
use ddvmm::devices::pci::msix::Msix;
use ddvmm::devices::virtio::block::ring_frontend::BlockRing;
use ddvmm::devices::virtio::net::ring_frontend::NetRing;
use ddvmm::devices::virtio::ring::stepper::Stepper;
use ddvmm::devices::virtio::ring::{RateLimit, RingCommand, RingDevice, RingStats, Setup};
use ddvmm::devices::virtio::{ActiveQueue, DeviceFailure, Interrupt};
use ddvmm::memory::create_memfd;
use ddvmm_translation::ring::{
    features, AgentRing, Completion, RawRegion, RingParams, SharedRegion, Status, Store,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory: queues at 0 and 0x4000 (16 entries each), buffers anywhere in 256 KiB.
const GUEST: usize = 256 << 10;
const QSIZE: u16 = 16;
const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

struct NoFailure;
impl DeviceFailure for NoFailure {
    fn needs_reset(&self, _reason: &str) {}
}

/// A channel (memfd + eventfds) and the harness's own mapping of it, made once per kind.
struct Channel {
    fds: ChannelFds,
    map: MmapRegion,
    len: usize,
}

fn channel(params: RingParams) -> Channel {
    let size = params.layout().expect("layout").total as u64;
    let memory = create_memfd(c"fuzz-ring").expect("memfd");
    let len = size.next_power_of_two();
    memory.set_len(len).expect("size");
    let efd = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let fds = ChannelFds {
        memory: Arc::new(memory),
        kick: efd(),
        doorbell: efd(),
    };
    let file = fds.memory.try_clone().expect("dup");
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len as usize).expect("map");
    Channel {
        fds,
        map,
        len: len as usize,
    }
}

fn region(c: &Channel) -> RawRegion {
    // SAFETY: the mapping lives in a static for the whole process and is only accessed
    // through atomics of the ring regions (here and in the frontend's own mapping).
    unsafe { RawRegion::new(c.map.as_ptr(), c.len) }.expect("region")
}

static BLOCK: OnceLock<Channel> = OnceLock::new();
static NET: OnceLock<Channel> = OnceLock::new();
static GUEST_MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();

/// The devices' own ring sizes, with fewer entries and slots (the slot size, which the devices'
/// checks depend on, is kept): small enough to fill, and cheap to set up per run.
fn small(p: RingParams) -> RingParams {
    RingParams {
        ring_entries: 8,
        slot_count: 4,
        ..p
    }
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
}

fn queues(mem: &GuestMemoryMmap, n: usize) -> Vec<ActiveQueue> {
    (0..n)
        .map(|i| {
            let mock = MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x4000), QSIZE);
            ActiveQueue {
                queue: mock.create_queue::<Queue>().expect("queue"),
                notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                interrupt: Interrupt::new(Msix::detached(2), 0),
            }
        })
        .collect()
}

fn run<D: RingDevice>(
    c: &Channel,
    device: D,
    stats: Arc<RingStats>,
    params: RingParams,
    capacity: usize,
    nqueues: usize,
    mut input: Input<'_>,
) {
    let layout = params.layout().expect("layout");
    let setup = Setup {
        fds: &c.fds,
        params,
        generation: 1,
        capacity,
        stats: stats.clone(),
        // Unlimited: a limit makes sending depend on the wall clock (unit-tested elsewhere).
        limit: RateLimit::default(),
    };
    let Ok(mut fe) = Stepper::new(device, setup) else {
        return;
    };
    // One guest memory for the process; its queue area starts zeroed in every run.
    let mem = GUEST_MEMORY
        .get_or_init(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST)]).expect("guest memory")
        })
        .clone();
    let _ = mem.write_slice(&[0u8; 0x8000], GuestAddress(0));
    fe.activate(mem.clone(), queues(&mem, nqueues), Arc::new(NoFailure));
    let r = region(c);
    let check = |stats: &RingStats| {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        assert!(g(&stats.outstanding) <= u64::from(layout.ring_entries));
        assert!(g(&stats.outstanding) + g(&stats.waiting) <= capacity as u64);
        assert!(g(&stats.suspects) <= capacity as u64);
        assert!(g(&stats.corrupt) <= 1);
    };
    let mut ops = 0;
    while let Some(op) = input.u8() {
        ops += 1;
        if ops > 64 {
            break;
        }
        match op % 12 {
            // Agent: any value at any 4-byte offset of the header and both rings.
            0 => {
                let (Some(off), Some(v)) = (input.u16(), input.u32()) else {
                    break;
                };
                let at = (usize::from(off) * 4) % layout.slots;
                let _ = r.store_u32(at, v, Store::Release);
            }
            // Agent: bytes into a slot.
            1 => {
                let (Some(slot), Some(len), Some(b)) = (input.u8(), input.u8(), input.u8()) else {
                    break;
                };
                if let Ok(at) =
                    layout.slot_range(u32::from(slot) % layout.slot_count, 0, len.into())
                {
                    let _ = r.write_bytes(at, &vec![b; usize::from(len)]);
                }
            }
            // Guest: 8 bytes anywhere in its first 32 KiB (queues, descriptors, headers).
            2 => {
                let Some(off) = input.u16() else { break };
                let mut b = [0u8; 8];
                for x in &mut b {
                    *x = input.u8().unwrap_or(0);
                }
                let _ = mem.write_slice(&b, GuestAddress(u64::from(off % 0x8000)));
            }
            3 => {
                fe.step();
            }
            4 => {
                let b = input.u8().unwrap_or(0);
                let _ = fe.command(RingCommand::Replay {
                    poison_after: u32::from(b % 5),
                    hold: b & 8 != 0,
                });
            }
            5 => {
                let _ = fe.command(RingCommand::Release);
            }
            6 => {
                let _ = fe.command(RingCommand::Quarantine);
            }
            7 => fe.reset(),
            8 => fe.activate(mem.clone(), queues(&mem, nqueues), Arc::new(NoFailure)),
            // Guest: publish avail entries (heads chosen by the input) on a queue.
            9 => {
                let (Some(q), Some(head)) = (input.u8(), input.u8()) else {
                    break;
                };
                let base = u64::from(q) % nqueues as u64 * 0x4000;
                let avail = base + u64::from(QSIZE) * 16;
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
                let slot = avail + 4 + u64::from(idx % QSIZE) * 2;
                let _ = mem.write_obj(u16::from(head) % QSIZE, GuestAddress(slot));
                let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
            }
            // An honest agent serves up to n requests (reaches completions and replays).
            10 => {
                let n = input.u8().unwrap_or(1) % 8;
                if let Ok(mut agent) = AgentRing::attach(region(c), features::ALL) {
                    for _ in 0..n {
                        let Some(Ok(req)) = agent.pop_request() else {
                            break;
                        };
                        let _ = agent.set_ready();
                        let _ = agent.complete(Completion {
                            id: req.id,
                            status: Status::Ok,
                            len: req.len,
                        });
                    }
                }
            }
            // Guest: a descriptor (addr, len, flags, next) written into a queue's table.
            _ => {
                let (Some(q), Some(i), Some(addr), Some(len), Some(f)) =
                    (input.u8(), input.u8(), input.u32(), input.u32(), input.u8())
                else {
                    break;
                };
                let base = u64::from(q) % nqueues as u64 * 0x4000;
                let at = base + u64::from(i % QSIZE as u8) * 16;
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&u64::from(addr % (GUEST as u32 + 0x1000)).to_le_bytes());
                d[8..12].copy_from_slice(&(len % 0x5_0000).to_le_bytes());
                d[12..14].copy_from_slice(&u16::from(f & 7).to_le_bytes());
                d[14..16].copy_from_slice(&u16::from(f >> 4).to_le_bytes());
                let _ = mem.write_slice(&d, GuestAddress(at));
            }
        }
        check(&stats);
    }
    fe.step();
    check(&stats);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(kind) = input.u8() else { return };
    if kind & 1 == 0 {
        let (params, cap) = BlockRing::sizes();
        let c = BLOCK.get_or_init(|| channel(small(params)));
        let (dev, stats) = BlockRing::new(2048, false, "fuzz");
        run(c, dev, stats.ring.clone(), small(params), cap, 1, input);
    } else {
        let (params, cap) = NetRing::sizes();
        let c = NET.get_or_init(|| channel(small(params)));
        let (dev, stats) = NetRing::new(MAC);
        run(c, dev, stats.ring.clone(), small(params), cap, 2, input);
    }
});
