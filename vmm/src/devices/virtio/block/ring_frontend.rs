//! The client frontend: a virtio-blk device whose backend is a ring to a driver VM.
//!
//! The guest sees an ordinary virtio-blk disk. Each request is parsed from its descriptor chain
//! (the same parser as the file-backed disk, at most `seg_max` data descriptors), checked
//! against the disk's size, and turned into one ring request ([`ddvmm_translation::ring`]):
//! write data is copied from guest memory into the request's data slot, read data is copied
//! from the slot into guest memory once the driver VM completes it. The driver VM never sees
//! guest memory.
//!
//! This file holds only what is specific to a disk ([`BlockRing`], a [`RingDevice`]): parsing,
//! planning, statuses. The journal, replay, poison isolation, quarantine, the worker loop and
//! its control path are the shared core in [`crate::devices::virtio::ring`]. A read completion
//! reporting fewer bytes than asked becomes an I/O error rather than exposing stale bytes.
//!
//! Requests go out with `size_max`/`seg_max` advertised so that a stock driver never builds
//! one larger than a data slot; a guest that does anyway gets an I/O error for that request.
//! Discard and write-zeroes are not offered (the ring carries them, the agent does not yet).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ddvmm_translation::journal::Journal;
use ddvmm_translation::ring::{Completed, Opcode, Request as RingRequest, RingParams, Status};
use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::request::{
    take_chain, Request, RequestKind, ID_BYTES, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use super::{features, read_config, DEVICE_TYPE, QUEUE_SIZE};
use crate::devices::channel::ChannelFds;
use crate::devices::virtio::ring::{
    Failure, Guest, GuestError, Payload, RateLimit, RingCommands, RingCounters, RingDevice,
    RingFrontend, RingKind, RingPort, RingProgress, RingSetupError, RingStats, RingView, Setup,
};
use crate::devices::virtio::{ActivateError, ActiveQueue, DeviceFailure, VirtioDevice};

/// Largest data segment a guest may put in one descriptor.
const SIZE_MAX: u32 = 64 << 10;
/// Ring sizes used by a client: 128 requests in flight, 128 slots of 256 KiB (32 MiB + 12 KiB).
pub const RING_PARAMS: RingParams = RingParams {
    ring_entries: 128,
    slot_count: 128,
    slot_size: 256 << 10,
    features: ddvmm_translation::ring::features::ALL,
};
/// Data descriptors per request (`seg_max`): a slot's worth of `SIZE_MAX` segments.
const SEG_MAX: u32 = RING_PARAMS.slot_size / SIZE_MAX;
/// Requests journaled at most: the guest queue's worth (the rest waits in the guest's queue).
const JOURNAL_CAPACITY: usize = QUEUE_SIZE as usize;

/// Errors setting up a ring disk.
#[derive(Debug, Error)]
pub enum RingDiskError {
    /// The ring cannot be set up.
    #[error(transparent)]
    Setup(#[from] RingSetupError),
    /// Zero sectors.
    #[error("a ring disk needs a non-zero size")]
    Empty,
}

/// Counters of one ring disk, readable while it runs: the core's and the disk's own.
#[derive(Debug, Default)]
pub struct RingDiskStats {
    /// The core's counters (ring, journal, replay).
    pub ring: Arc<RingStats>,
    /// Requests completed to the guest (any status, answered locally or by the driver VM).
    pub guest_completed: AtomicU64,
    /// Requests completed to the guest with an error status.
    pub errors: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub written_bytes: AtomicU64,
}

impl RingCounters for RingDiskStats {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut v = self.ring.snapshot();
        v.extend([
            ("guest_completed", g(&self.guest_completed)),
            ("errors", g(&self.errors)),
            ("read_bytes", g(&self.read_bytes)),
            ("written_bytes", g(&self.written_bytes)),
        ]);
        v
    }

    fn progress(&self) -> RingProgress {
        self.ring.progress()
    }
}

/// A journaled disk request: what is needed to finish it to the guest.
pub struct BlockItem {
    head: u16,
    request: Request,
}

/// What is specific to a disk over a ring.
pub struct BlockRing {
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    stats: Arc<RingDiskStats>,
}

/// What to do with a parsed guest request.
enum Plan {
    /// Answer now with this status and this many bytes written into guest buffers.
    Local(u8, u32),
    /// Send it to the driver VM.
    Ring,
}

impl BlockRing {
    /// Decides how to serve `req`: checks directions, the disk's bounds and the slot size, and
    /// answers get-id and unsupported requests itself.
    fn plan(&self, mem: &GuestMemoryMmap, req: &Request) -> Plan {
        let ioerr = Plan::Local(VIRTIO_BLK_S_IOERR, 1);
        let len = req.data_len();
        let in_bounds = req
            .sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|off| off.checked_add(len))
            .is_some_and(|end| end <= self.sectors.saturating_mul(SECTOR_SIZE));
        match req.kind {
            RequestKind::In | RequestKind::Out => {
                let write = req.kind == RequestKind::Out;
                if (write && self.read_only)
                    || req.data.iter().any(|(_, _, w)| *w == write)
                    || !in_bounds
                    || len > u64::from(RING_PARAMS.slot_size)
                    || len % SECTOR_SIZE != 0
                {
                    return ioerr;
                }
                Plan::Ring
            }
            RequestKind::Flush if self.read_only => Plan::Local(VIRTIO_BLK_S_OK, 1),
            RequestKind::Flush => Plan::Ring,
            RequestKind::GetId => {
                let Some((addr, len, true)) = req.data.first().copied() else {
                    return ioerr;
                };
                let n = (len as usize).min(ID_BYTES);
                if mem.write_slice(&self.id[..n], addr).is_err() {
                    return ioerr;
                }
                Plan::Local(VIRTIO_BLK_S_OK, n as u32 + 1)
            }
            RequestKind::Discard | RequestKind::WriteZeroes | RequestKind::Unsupported(_) => {
                Plan::Local(VIRTIO_BLK_S_UNSUPP, 1)
            }
        }
    }

    /// Writes the status byte and counts the completion.
    fn write_status(&self, mem: &GuestMemoryMmap, item: &BlockItem, status: u8) {
        if mem.write_obj(status, item.request.status).is_err() {
            tracing::error!("status byte vanished from guest memory");
        }
        self.stats.guest_completed.fetch_add(1, Ordering::Relaxed);
        if status != VIRTIO_BLK_S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the status byte, counts the completion and returns the chain to the guest.
    fn finish(&self, guest: &mut Guest, item: &BlockItem, status: u8, written: u32) {
        self.write_status(&guest.mem, item, status);
        guest.finish(0, item.head, written);
    }

    /// Copies a completed read from its slot into the guest's buffers. `None` if the driver VM
    /// delivered fewer bytes than asked or the copy failed.
    fn copy_read_data(
        &self,
        mem: &GuestMemoryMmap,
        ring: &RingView<'_>,
        c: &Completed,
        req: &Request,
    ) -> Option<u32> {
        let slot = c.slot?;
        if c.len != c.req.len || !ring.copy_to_guest(slot, mem, &req.data) {
            return None;
        }
        self.stats
            .read_bytes
            .fetch_add(u64::from(c.len), Ordering::Relaxed);
        Some(c.len)
    }
}

impl RingDevice for BlockRing {
    type Item = BlockItem;
    const QUEUES: usize = 1;

    fn accept(
        &mut self,
        guest: &mut Guest,
        journal: &mut Journal<BlockItem>,
        quarantined: bool,
    ) -> Result<(), GuestError> {
        let room = journal.room();
        guest.pop_chains(0, room, |mem, chain| {
            let head = chain.head_index();
            let request = take_chain(chain, SEG_MAX as usize + 2)
                .and_then(|d| Request::parse(&d, mem))
                .map_err(|e| GuestError::Malformed {
                    head,
                    reason: e.to_string(),
                })?;
            let item = BlockItem { head, request };
            let (status, written) = match self.plan(mem, &item.request) {
                Plan::Local(status, written) => (status, written),
                Plan::Ring if quarantined => {
                    self.stats
                        .ring
                        .quarantine_failed
                        .fetch_add(1, Ordering::Relaxed);
                    (VIRTIO_BLK_S_IOERR, 1)
                }
                Plan::Ring => match journal.push(item) {
                    Ok(()) => return Ok(None),
                    Err(item) => {
                        self.write_status(mem, &item, VIRTIO_BLK_S_IOERR);
                        return Ok(Some(1));
                    }
                },
            };
            self.write_status(mem, &item, status);
            Ok(Some(written))
        })
    }

    fn payload_bytes(&self, item: &BlockItem) -> u64 {
        item.request.data_len()
    }

    fn encode<'a>(&mut self, item: &'a BlockItem) -> Option<(RingRequest, Payload<'a>)> {
        let req = &item.request;
        let len = req.data_len();
        let (op, payload) = match req.kind {
            RequestKind::In => (Opcode::Read, Payload::None),
            // Copied from guest memory straight into the slot at every (re)submission: a
            // slot is never trusted.
            RequestKind::Out => (Opcode::Write, Payload::Guest(&req.data)),
            RequestKind::Flush => (Opcode::Flush, Payload::None),
            _ => return None,
        };
        if op == Opcode::Write {
            self.stats.written_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let request = RingRequest {
            id: 0,
            op,
            flags: 0,
            sector: req.sector,
            len: if op == Opcode::Flush {
                0
            } else {
                u32::try_from(len).ok()?
            },
        };
        Some((request, payload))
    }

    fn complete(&mut self, guest: &mut Guest, ring: &RingView<'_>, item: BlockItem, c: &Completed) {
        let mut status = match c.status {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        };
        let mut written = 1;
        if c.req.op == Opcode::Read && status == VIRTIO_BLK_S_OK {
            match self.copy_read_data(&guest.mem, ring, c, &item.request) {
                Some(n) => written = n + 1,
                None => status = VIRTIO_BLK_S_IOERR,
            }
        }
        self.finish(guest, &item, status, written);
    }

    fn fail(&mut self, guest: &mut Guest, item: BlockItem, why: Failure) {
        if why == Failure::Poison {
            tracing::error!(sector = item.request.sector, "poison request failed alone");
        }
        self.finish(guest, &item, VIRTIO_BLK_S_IOERR, 1);
    }
}

impl BlockRing {
    /// A disk of `sectors` with the guest-visible `id`, and its counters.
    pub fn new(sectors: u64, read_only: bool, id: &str) -> (Self, Arc<RingDiskStats>) {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let stats = Arc::new(RingDiskStats::default());
        let dev = BlockRing {
            sectors,
            read_only,
            id: id_bytes,
            stats: stats.clone(),
        };
        (dev, stats)
    }

    /// The ring sizes and journal capacity a disk uses (for
    /// [`Stepper`](crate::devices::virtio::ring::stepper::Stepper)).
    #[doc(hidden)]
    pub fn sizes() -> (RingParams, usize) {
        (RING_PARAMS, JOURNAL_CAPACITY)
    }
}

/// The virtio-blk device model over a ring.
pub struct RingBlock {
    sectors: u64,
    read_only: bool,
    stats: Arc<RingDiskStats>,
    frontend: RingFrontend,
}

impl RingBlock {
    /// Maps the channel memory, creates the ring in it at `generation` and starts the worker.
    pub fn new(
        fds: ChannelFds,
        sectors: u64,
        read_only: bool,
        id: &str,
        generation: u64,
        limit: RateLimit,
    ) -> Result<Self, RingDiskError> {
        if sectors == 0 {
            return Err(RingDiskError::Empty);
        }
        let (device, stats) = BlockRing::new(sectors, read_only, id);
        let setup = Setup {
            fds: &fds,
            params: RING_PARAMS,
            generation,
            capacity: JOURNAL_CAPACITY,
            stats: stats.ring.clone(),
            limit,
        };
        let frontend = RingFrontend::spawn("ring-blk", device, setup)?;
        Ok(RingBlock {
            sectors,
            read_only,
            stats,
            frontend,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RingDiskStats> {
        self.stats.clone()
    }

    /// The control handle (replay after a driver VM restart, release, quarantine).
    pub fn control(&self) -> Arc<dyn RingCommands> {
        self.frontend.control()
    }

    /// Its kind, counters and control for the rest of the VMM.
    pub fn port(&self) -> RingPort {
        RingPort {
            kind: RingKind::Disk,
            counters: self.stats.clone(),
            control: self.frontend.control(),
        }
    }
}

impl VirtioDevice for RingBlock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features(self.read_only, false, true)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(self.sectors, SEG_MAX, Some(SIZE_MAX), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        self.frontend.activate(mem, queues, failure)
    }

    fn reset(&mut self) {
        self.frontend.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::msix::Msix;
    use crate::devices::virtio::ring::testing::{channel_fds, wait_for, Failures, ScriptedAgent};
    use crate::devices::virtio::ring::{RingCommand, RingOutcome};
    use crate::devices::virtio::Interrupt;
    use ddvmm_translation::ring::{Completion, RawCompletion};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const SECTORS: u64 = 2048;

    fn fds() -> ChannelFds {
        channel_fds(RING_PARAMS)
    }

    /// An honest agent over the same memfd, in a thread, with a bogus completion before each
    /// real one. Reads return the byte `sector as u8`; writes are checked to hold 0x5A bytes.
    fn agent(fds: &ChannelFds, stop: Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<u64> {
        let fds = fds.clone();
        std::thread::spawn(move || {
            let mut agent = ScriptedAgent::attach(&fds, 1);
            let ring = &mut agent.ring;
            let mut bad_writes = 0;
            while !stop.load(Ordering::SeqCst) {
                let Some(Ok(r)) = ring.pop_request() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let mut buf = vec![0u8; r.len as usize];
                match r.op {
                    Opcode::Read => {
                        buf.fill(r.sector as u8);
                        ring.write_slot(r.slot.expect("slot"), 0, &buf)
                            .expect("slot");
                    }
                    Opcode::Write => {
                        ring.read_slot(r.slot.expect("slot"), 0, &mut buf)
                            .expect("slot");
                        bad_writes += u64::from(buf.iter().any(|b| *b != 0x5A));
                    }
                    _ => {}
                }
                let gen = ring.generation();
                for bogus in [
                    RawCompletion {
                        id: r.id,
                        generation: gen,
                        status: 77,
                        len: r.len,
                    },
                    RawCompletion {
                        id: r.id,
                        generation: gen,
                        status: 0,
                        len: r.len + 1,
                    },
                    RawCompletion {
                        id: r.id + 1000,
                        generation: gen,
                        status: 0,
                        len: 0,
                    },
                ] {
                    ring.publish_unchecked(bogus).expect("bogus");
                }
                ring.complete(Completion {
                    id: r.id,
                    status: Status::Ok,
                    len: r.len,
                })
                .expect("complete");
                let _ = ring.needs_notify_client();
                fds.doorbell.write(1).expect("doorbell");
            }
            bad_writes
        })
    }

    /// The six status bytes the tests' chains point at (consecutive from `at`).
    fn statuses(m: &GuestMemoryMmap, at: u64) -> [u8; 6] {
        let mut s = [0u8; 6];
        m.read_slice(&mut s, GuestAddress(at)).expect("status");
        s
    }

    /// An agent that serves in order until it meets a request for `poison`, where it "dies":
    /// returns without completing anything further (like a crashed driver VM).
    fn dying_agent(
        fds: &ChannelFds,
        poison: u64,
        generation: u64,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> JoinHandle<bool> {
        let fds = fds.clone();
        std::thread::spawn(move || {
            let mut agent = ScriptedAgent::attach(&fds, generation);
            let ring = &mut agent.ring;
            let start = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "agent never stopped"
                );
                let Some(Ok(r)) = ring.pop_request() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                if r.sector == poison {
                    return true;
                }
                if r.op == Opcode::Read {
                    let buf = vec![r.sector as u8; r.len as usize];
                    ring.write_slot(r.slot.expect("slot"), 0, &buf)
                        .expect("slot");
                }
                ring.complete(Completion {
                    id: r.id,
                    status: Status::Ok,
                    len: r.len,
                })
                .expect("complete");
                fds.doorbell.write(1).expect("doorbell");
            }
            false
        })
    }

    /// A ring disk whose queue holds six 4 KiB reads of `sectors` (header at 0x1000 + i·0x100,
    /// data at 0x10_0000 + i·0x1000, status at 0x2000 + i, pre-set to 0xEE), activated and
    /// notified.
    fn running_reads(
        m: &GuestMemoryMmap,
        mock: &MockSplitQueue<GuestMemoryMmap>,
        fds: &ChannelFds,
        sectors: &[u64; 6],
        limit: RateLimit,
    ) -> (RingBlock, Arc<dyn RingCommands>) {
        let mut descs = Vec::new();
        for (i, sector) in sectors.iter().enumerate() {
            let i = i as u64;
            let mut h = [0u8; 16];
            h[8..].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(0x1000 + i * 0x100))
                .expect("header");
            let next = (i * 3) as u16;
            descs.push(RawDescriptor::from(D::new(
                0x1000 + i * 0x100,
                16,
                NEXT,
                next + 1,
            )));
            descs.push(RawDescriptor::from(D::new(
                0x10_0000 + i * 0x1000,
                4096,
                NEXT | WRITE,
                next + 2,
            )));
            descs.push(RawDescriptor::from(D::new(0x2000 + i, 1, WRITE, 0)));
        }
        mock.build_multiple_desc_chains(&descs).expect("chains");
        m.write_slice(&[0xEE; 6], GuestAddress(0x2000))
            .expect("status");
        let q: Queue = mock.create_queue().expect("queue");
        let mut dev =
            RingBlock::new(fds.clone(), SECTORS, false, "t", 1, limit).expect("ring disk");
        let control = dev.control();
        let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let active = ActiveQueue {
            queue: q,
            notify: notify.try_clone().expect("clone"),
            interrupt: Interrupt::new(Msix::detached(1), 0),
        };
        dev.activate(m.clone(), 0, vec![active], Arc::new(Failures::default()))
            .expect("activate");
        notify.write(1).expect("notify");
        (dev, control)
    }

    #[test]
    fn a_rate_limited_disk_delays_requests_and_loses_none() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let fds = fds();
        // 20 requests per second: a burst of 2, then one per 50 ms.
        let limit = RateLimit {
            ops_per_s: Some(20),
            bytes_per_s: None,
        };
        let start = Instant::now();
        let (dev, _control) = running_reads(&m, &mock, &fds, &[8, 16, 24, 32, 40, 48], limit);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent = dying_agent(&fds, u64::MAX, 1, stop.clone());
        while dev.stats().guest_completed.load(Ordering::SeqCst) < 6 {
            assert!(start.elapsed() < Duration::from_secs(20), "requests lost");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Four requests over the burst, 50 ms apart at least.
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(statuses(&m, 0x2000), [0; 6]);
        assert!(dev.stats().ring.throttled.load(Ordering::SeqCst) >= 1);
        stop.store(true, Ordering::SeqCst);
        assert!(!agent.join().expect("agent"));
    }

    #[test]
    fn guest_reset_during_an_outage_drops_its_requests_and_renews_the_ring() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let fds = fds();
        // The agent dies on the first request: all six stay outstanding.
        let (mut dev, control) = running_reads(
            &m,
            &mock,
            &fds,
            &[8, 16, 24, 32, 40, 48],
            RateLimit::default(),
        );
        let agent = dying_agent(
            &fds,
            8,
            1,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        assert!(agent.join().expect("agent"), "agent saw the request");
        // The guest resets the device while the driver VM is down, then the daemon replays:
        // nothing of the reset queue is replayed or completed, the ring moves on.
        dev.reset();
        let o = control
            .request(
                RingCommand::Replay {
                    poison_after: 3,
                    hold: false,
                },
                Duration::from_secs(10),
            )
            .expect("replay");
        assert_eq!(o, RingOutcome::default());
        assert_eq!(statuses(&m, 0x2000), [0xEE; 6], "no status written");
        assert_eq!(
            m.read_obj::<u16>(mock.used_addr().unchecked_add(2))
                .expect("used"),
            0
        );
        // A new agent attaches to generation 2 and finds an empty ring.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let next = dying_agent(&fds, u64::MAX, 2, stop.clone());
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        assert!(
            !next.join().expect("agent"),
            "nothing to serve, nothing to die on"
        );
        assert_eq!(dev.stats().guest_completed.load(Ordering::SeqCst), 0);
        assert_eq!(dev.stats().ring.outstanding.load(Ordering::SeqCst), 0);
        assert_eq!(dev.stats().ring.generations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn replays_after_driver_crashes_and_isolates_the_poison_request() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        const POISON: u64 = 64;
        // Six 4 KiB reads; the third is the poison.
        let sectors = [8u64, 16, POISON, 24, 32, 40];
        let fds = fds();
        let (mut dev, control) = running_reads(&m, &mock, &fds, &sectors, RateLimit::default());
        let used_idx = mock.used_addr().unchecked_add(2);
        let mut generation = 1;
        let mut crashes = 0;
        let used = || m.read_obj::<u16>(used_idx).expect("used");
        loop {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let agent = dying_agent(&fds, POISON, generation, stop.clone());
            let start = Instant::now();
            while !agent.is_finished() && used() < 6 {
                assert!(start.elapsed() < Duration::from_secs(20), "requests lost");
                std::thread::sleep(Duration::from_millis(2));
            }
            stop.store(true, Ordering::SeqCst);
            if !agent.join().expect("agent") {
                break;
            }
            crashes += 1;
            assert!(crashes <= 3, "the poison request was not isolated");
            // Nothing completed to the guest after the first two, before the replay.
            assert_eq!(
                used(),
                2,
                "only the two requests before the poison completed"
            );
            let o = control
                .request(
                    RingCommand::Replay {
                        poison_after: 3,
                        hold: false,
                    },
                    Duration::from_secs(10),
                )
                .expect("replay");
            assert_eq!(o.poisoned, u64::from(crashes == 3));
            generation += 1;
            if crashes == 3 {
                // The poison failed alone; the three behind it come back isolated, one at a
                // time: they were held back, never on the ring that crashed the third time.
                assert_eq!(o.replayed, 0);
            }
        }
        assert_eq!(crashes, 3);
        assert_eq!(used(), 6);
        dev.reset();
        assert_eq!(
            statuses(&m, 0x2000),
            [
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK
            ]
        );
        // Each head was returned exactly once.
        let mut heads: Vec<u32> = (0..6u64)
            .map(|i| {
                m.read_obj::<u32>(mock.used_addr().unchecked_add(4 + i * 8))
                    .expect("used elem")
            })
            .collect();
        heads.sort();
        assert_eq!(heads, [0, 3, 6, 9, 12, 15]);
        for (i, sector) in sectors.iter().enumerate() {
            if *sector == POISON {
                continue;
            }
            let mut b = [0u8; 4096];
            m.read_slice(&mut b, GuestAddress(0x10_0000 + i as u64 * 0x1000))
                .expect("data");
            assert!(b.iter().all(|x| *x == *sector as u8), "read {i} data");
        }
        let s = dev.stats();
        assert_eq!(s.ring.poisoned.load(Ordering::SeqCst), 1);
        assert_eq!(s.ring.generations.load(Ordering::SeqCst), 3);
        assert_eq!(s.errors.load(Ordering::SeqCst), 1);
        assert_eq!(s.guest_completed.load(Ordering::SeqCst), 6);
        assert_eq!(s.ring.completed.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn serves_requests_through_an_agent_and_rejects_what_it_must() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let header = |at: u64, kind: u32, sector: u64| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(at)).expect("header");
        };
        // 0: read 8 KiB at sector 8 (two buffers); 1: write 4 KiB of 0x5A at sector 16;
        // 2: read past the end; 3: read larger than a slot; 4: write into a device-writable
        // buffer (wrong direction); 5: flush.
        header(0x1000, 0, 8);
        header(0x1100, 1, 16);
        m.write_slice(&[0x5A; 4096], GuestAddress(0x40_0000))
            .expect("data");
        header(0x1200, 0, SECTORS - 1);
        header(0x1300, 0, 0);
        header(0x1400, 1, 0);
        header(0x1500, 4, 0);
        let st = |i: u64| 0x2000 + i;
        let descs = [
            RawDescriptor::from(D::new(0x1000, 16, NEXT, 1)),
            RawDescriptor::from(D::new(0x10_0000, 4096, NEXT | WRITE, 2)),
            RawDescriptor::from(D::new(0x10_1000, 4096, NEXT | WRITE, 3)),
            RawDescriptor::from(D::new(st(0), 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1100, 16, NEXT, 5)),
            RawDescriptor::from(D::new(0x40_0000, 4096, NEXT, 6)),
            RawDescriptor::from(D::new(st(1), 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1200, 16, NEXT, 8)),
            RawDescriptor::from(D::new(0x20_0000, 1024, NEXT | WRITE, 9)),
            RawDescriptor::from(D::new(st(2), 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1300, 16, NEXT, 11)),
            RawDescriptor::from(D::new(0x30_0000, 512 << 10, NEXT | WRITE, 12)),
            RawDescriptor::from(D::new(st(3), 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1400, 16, NEXT, 14)),
            RawDescriptor::from(D::new(0x20_0000, 512, NEXT | WRITE, 15)),
            RawDescriptor::from(D::new(st(4), 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1500, 16, NEXT, 17)),
            RawDescriptor::from(D::new(st(5), 1, WRITE, 0)),
        ];
        mock.build_multiple_desc_chains(&descs).expect("chains");
        m.write_slice(&[0xEE; 6], GuestAddress(st(0)))
            .expect("status");
        let q: Queue = mock.create_queue().expect("queue");

        let fds = fds();
        let mut dev = RingBlock::new(fds.clone(), SECTORS, false, "t", 1, RateLimit::default())
            .expect("ring disk");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent = agent(&fds, stop.clone());
        let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let active = ActiveQueue {
            queue: q,
            notify: notify.try_clone().expect("clone"),
            interrupt: Interrupt::new(Msix::detached(1), 0),
        };
        let failures = Arc::new(Failures::default());
        dev.activate(m.clone(), 0, vec![active], failures.clone())
            .expect("activate");
        notify.write(1).expect("notify");
        let used_idx = mock.used_addr().unchecked_add(2);
        let start = Instant::now();
        while m.read_obj::<u16>(used_idx).expect("used") < 6 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "requests never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        dev.reset();
        stop.store(true, Ordering::SeqCst);
        assert_eq!(
            agent.join().expect("agent"),
            0,
            "write data reached the agent intact"
        );
        assert_eq!(
            statuses(&m, st(0)),
            [
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_OK
            ]
        );
        let mut back = vec![0u8; 8192];
        m.read_slice(&mut back, GuestAddress(0x10_0000))
            .expect("read data");
        assert!(
            back.iter().all(|b| *b == 8),
            "read data in both guest buffers"
        );
        let s = dev.stats();
        assert_eq!(s.ring.submitted.load(Ordering::SeqCst), 3);
        assert_eq!(s.guest_completed.load(Ordering::SeqCst), 6);
        assert_eq!(s.errors.load(Ordering::SeqCst), 3);
        assert_eq!(s.ring.bogus_completions.load(Ordering::SeqCst), 9);
        assert_eq!(failures.0.load(Ordering::SeqCst), 0);
    }
    #[test]
    fn a_broken_completion_index_is_a_state_not_a_spin_and_nothing_fails() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let fds = fds();
        let (dev, control) = running_reads(
            &m,
            &mock,
            &fds,
            &[8, 16, 24, 32, 40, 48],
            RateLimit::default(),
        );
        let mut agent = ScriptedAgent::attach(&fds, 1);
        let reqs = agent.take(6);
        // One honest answer, then a producer index a ring ahead.
        agent.answer(&reqs[0], Status::Ok, Some(8));
        let used = || {
            m.read_obj::<u16>(mock.used_addr().unchecked_add(2))
                .expect("used")
        };
        wait_for("the honest completion", || used() == 1);
        agent.ring.corrupt_completion_index().expect("corrupt");
        agent.ring_doorbell();
        let s = dev.stats();
        wait_for("the corrupt state", || {
            s.ring.corrupt.load(Ordering::SeqCst) == 1
        });
        // The worker no longer listens to this driver VM: doorbells are not even counted.
        let rung = s.ring.doorbells.load(Ordering::SeqCst);
        for _ in 0..1000 {
            agent.ring_doorbell();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.ring.doorbells.load(Ordering::SeqCst), rung);
        assert_eq!(
            s.ring.outstanding.load(Ordering::SeqCst),
            5,
            "kept for replay"
        );
        assert_eq!(s.errors.load(Ordering::SeqCst), 0);
        // The daemon's replay is served at once, and a new driver VM serves the five.
        let o = control
            .request(
                RingCommand::Replay {
                    poison_after: 3,
                    hold: false,
                },
                Duration::from_secs(2),
            )
            .expect("replay");
        assert_eq!(o.replayed, 5);
        assert_eq!(s.ring.corrupt.load(Ordering::SeqCst), 0);
        let mut next = ScriptedAgent::attach(&fds, 2);
        for r in next.take(5) {
            next.answer(&r, Status::Ok, Some(r.sector as u8));
        }
        wait_for("all six", || used() == 6);
        assert_eq!(statuses(&m, 0x2000), [VIRTIO_BLK_S_OK; 6]);
        for (i, sector) in [8u8, 16, 24, 32, 40, 48].iter().enumerate() {
            let mut b = [0u8; 4096];
            m.read_slice(&mut b, GuestAddress(0x10_0000 + i as u64 * 0x1000))
                .expect("data");
            assert!(b.iter().all(|x| x == sector), "read {i}");
        }
        drop(dev);
    }

    #[test]
    fn a_guest_reset_with_requests_on_the_ring_keeps_the_ring_drained() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let fds = fds();
        let (mut dev, _control) = running_reads(
            &m,
            &mock,
            &fds,
            &[8, 16, 24, 32, 40, 48],
            RateLimit::default(),
        );
        let mut agent = ScriptedAgent::attach(&fds, 1);
        let reqs = agent.take(6);
        let s = dev.stats();
        wait_for("six on the ring", || {
            s.ring.outstanding.load(Ordering::SeqCst) == 6
        });
        // The guest resets its device with all six in flight; the driver VM answers later.
        dev.reset();
        for r in &reqs {
            agent.answer(r, Status::Ok, Some(1));
        }
        // Still drained: the gauge the daemon's watchdog reads goes back to zero.
        wait_for("the ring drained", || {
            s.ring.outstanding.load(Ordering::SeqCst) == 0
        });
        assert_eq!(s.ring.completed.load(Ordering::SeqCst), 6);
        // Nothing reached the reset guest: no status, no used entry, no data.
        assert_eq!(statuses(&m, 0x2000), [0xEE; 6]);
        assert_eq!(
            m.read_obj::<u16>(mock.used_addr().unchecked_add(2))
                .expect("used"),
            0
        );
        assert_eq!(s.guest_completed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_chain_beyond_seg_max_needs_a_reset_and_the_ring_goes_on() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        // Chain 0: a 4 KiB read. Chain 1: a read split into seg_max + 1 data descriptors.
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&8u64.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x1000)).expect("header");
        let mut descs = vec![
            RawDescriptor::from(D::new(0x1000, 16, NEXT, 1)),
            RawDescriptor::from(D::new(0x10_0000, 4096, NEXT | WRITE, 2)),
            RawDescriptor::from(D::new(0x2000, 1, WRITE, 0)),
            RawDescriptor::from(D::new(0x1000, 16, NEXT, 4)),
        ];
        let n = SEG_MAX as u16 + 1;
        for i in 0..n {
            descs.push(RawDescriptor::from(D::new(
                0x20_0000 + u64::from(i) * 512,
                512,
                NEXT | WRITE,
                5 + i,
            )));
        }
        descs.push(RawDescriptor::from(D::new(0x2001, 1, WRITE, 0)));
        mock.build_multiple_desc_chains(&descs).expect("chains");
        // The guest offers the long chain only once the first request is on the ring.
        mock.avail().idx().store(1);
        m.write_slice(&[0xEE; 2], GuestAddress(0x2000))
            .expect("status");
        let q: Queue = mock.create_queue().expect("queue");
        let fds = fds();
        let mut dev = RingBlock::new(fds.clone(), SECTORS, false, "t", 1, RateLimit::default())
            .expect("ring disk");
        let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let failures = Arc::new(Failures::default());
        let active = ActiveQueue {
            queue: q,
            notify: notify.try_clone().expect("clone"),
            interrupt: Interrupt::new(Msix::detached(1), 0),
        };
        dev.activate(m.clone(), 0, vec![active], failures.clone())
            .expect("activate");
        notify.write(1).expect("notify");
        let mut agent = ScriptedAgent::attach(&fds, 1);
        let reqs = agent.take(1);
        mock.avail().idx().store(2);
        notify.write(1).expect("notify");
        wait_for("the device reported broken", || {
            failures.0.load(Ordering::SeqCst) == 1
        });
        // The first request, already on the ring, is still drained.
        agent.answer(&reqs[0], Status::Ok, Some(3));
        let s = dev.stats();
        wait_for("the ring drained", || {
            s.ring.outstanding.load(Ordering::SeqCst) == 0
        });
        assert_eq!(s.ring.submitted.load(Ordering::SeqCst), 1);
        dev.reset();
    }
}
