//! The client frontend: a virtio-blk device whose backend is a ring to a driver VM.
//!
//! The guest sees an ordinary virtio-blk disk. Each request is parsed from its descriptor chain
//! (the same parser as the file-backed disk), checked against the disk's size, and turned into
//! one ring request ([`ddvmm_translation::ring`]): write data is copied from guest memory into
//! the request's data slot, read data is copied from the slot into guest memory once the
//! driver VM completes it. The driver VM never sees guest memory.
//!
//! **Journal.** Every request stays in [`Inflight`] — its descriptor head, parsed buffers and
//! status address — from the moment it is popped until a *valid* completion arrives; only then
//! is the status written and the head returned to the guest. Nothing else completes it. The
//! ring itself validates completions (generation, outstanding id, known status, length within
//! the request); what fails validation is counted in [`RingDiskStats`] and dropped, and a read
//! completion reporting fewer bytes than asked becomes an I/O error rather than exposing stale
//! bytes. A request the ring has no room for waits in a backlog, in order.
//!
//! Requests go out with `size_max`/`seg_max` advertised so that a stock driver never builds
//! one larger than a data slot; a guest that does anyway gets an I/O error for that request.
//! Discard and write-zeroes are not offered (the ring carries them, the agent does not yet).
//!
//! **Recovery.** When the driver VM dies, the daemon replaces it and tells this frontend
//! through [`RingControl`]: [`RingCommand::Replay`] starts a new ring generation and re-submits
//! every journaled request in its original order (write data copied again from guest memory;
//! the dead driver VM's slots are never trusted or reused before the new generation). Nothing is
//! completed to the guest in between: the guest sees a pause. A request that was in flight at
//! `poison_after` consecutive crashes fails alone with an I/O error; once a request has been in
//! flight at `poison_after - 1` crashes it is *isolated* (sent alone, nothing else in flight), so
//! the next crash can only be its own and innocent neighbours are never blamed.
//! [`RingCommand::Quarantine`] (the driver VM is given up) fails what is outstanding and every
//! new request with an I/O error until the next replay.
//!
//! Threads: one queue thread waits (epoll) on the queue's notify eventfd, on the channel's
//! doorbell (the driver VM's ioeventfd), on the control eventfd and on a stop eventfd. While the
//! guest has not activated the device, control commands are applied by the caller's thread.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddvmm_translation::ring::{
    ClientRing, ClientStats, Opcode, RawRegion, Request as RingRequest, RingError, RingParams,
    Status,
};
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap, MmapRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::request::{
    Request, RequestKind, ID_BYTES, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use super::{features, pop_requests, read_config, DEVICE_TYPE, QUEUE_SIZE};
use crate::devices::virtio::ring_control::{
    map_client_ring, IdleRing, RingCommand, RingCommands, RingControl, RingOutcome, RingSetupError,
};
use crate::devices::virtio::{
    publish_used, single_queue, ActivateError, ActiveQueue, DeviceFailure, Interrupt, QueueWorker,
    VirtioDevice,
};
use crate::machine::ChannelFds;

/// Largest data segment a guest may put in one descriptor.
const SIZE_MAX: u32 = 64 << 10;
/// Ring sizes used by a client: 128 requests in flight, 128 slots of 256 KiB (32 MiB + 12 KiB).
pub const RING_PARAMS: RingParams = RingParams {
    ring_entries: 128,
    slot_count: 128,
    slot_size: 256 << 10,
    features: ddvmm_translation::ring::features::ALL,
};

/// Errors setting up a ring disk.
#[derive(Debug, Error)]
pub enum RingDiskError {
    /// The ring cannot be set up.
    #[error(transparent)]
    Setup(#[from] RingSetupError),
    /// A control eventfd cannot be created.
    #[error("cannot create the control eventfd")]
    Control(#[source] std::io::Error),
    /// Zero sectors.
    #[error("a ring disk needs a non-zero size")]
    Empty,
}

/// Counters of one ring disk, readable while it runs.
#[derive(Debug, Default)]
pub struct RingDiskStats {
    /// Requests submitted on the ring.
    pub submitted: AtomicU64,
    /// Requests completed to the guest (any status).
    pub completed: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub written_bytes: AtomicU64,
    /// Completions rejected by validation (bogus ids, statuses, lengths, generations, indices).
    pub bogus_completions: AtomicU64,
    /// Notifications sent to the driver VM (its irqfd).
    pub kicks: AtomicU64,
    /// Doorbells received from the driver VM.
    pub doorbells: AtomicU64,
    /// Requests submitted again on a new generation after a driver VM restart.
    pub replayed: AtomicU64,
    /// Requests failed as poison (in flight at too many consecutive crashes).
    pub poisoned: AtomicU64,
    /// Requests failed because the driver VM is quarantined.
    pub quarantine_failed: AtomicU64,
    /// Requests on the ring awaiting completion (a gauge).
    pub outstanding: AtomicU64,
    /// Ring generations started after the first (driver VM restarts seen).
    pub generations: AtomicU64,
}

impl RingDiskStats {
    /// `name value` lines for the counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("submitted", g(&self.submitted)),
            ("completed", g(&self.completed)),
            ("errors", g(&self.errors)),
            ("read_bytes", g(&self.read_bytes)),
            ("written_bytes", g(&self.written_bytes)),
            ("bogus_completions", g(&self.bogus_completions)),
            ("kicks", g(&self.kicks)),
            ("doorbells", g(&self.doorbells)),
            ("replayed", g(&self.replayed)),
            ("poisoned", g(&self.poisoned)),
            ("quarantine_failed", g(&self.quarantine_failed)),
            ("outstanding", g(&self.outstanding)),
            ("generations", g(&self.generations)),
        ]
    }
}

/// A request between pop and completion: what is needed to finish it to the guest.
struct Inflight {
    head: u16,
    request: Request,
    /// Driver VM crashes this request was in flight at, in a row.
    crashes: u32,
}

impl IdleRing for Frontend {
    fn apply_idle(&mut self, cmd: RingCommand) -> Result<RingOutcome, String> {
        match cmd {
            RingCommand::Replay { poison_after } => {
                let stats = self.stats.clone();
                self.renew(poison_after, &stats)?;
                self.journal.clear();
            }
            RingCommand::Quarantine => self.quarantined = true,
        }
        Ok(RingOutcome::default())
    }
}

/// Ring-side state that survives guest device resets.
struct Frontend {
    // Declared before `_map`: the ring's raw region points into the mapping.
    ring: ClientRing<RawRegion>,
    _map: Arc<MmapRegion>,
    /// Outstanding requests by ring id. `None`: the guest reset the device since; the
    /// completion only frees the slot.
    journal: HashMap<u64, Option<Inflight>>,
    next_id: u64,
    seen_bogus: u64,
    /// The driver VM is given up: new requests fail at once.
    quarantined: bool,
    /// A suspect request sent alone: nothing else goes out until it completes.
    isolating: Option<u64>,
    /// From the last replay command.
    poison_after: u32,
    stats: Arc<RingDiskStats>,
}

impl Frontend {
    /// A new ring generation (the old driver VM is gone for good): returns the requests that
    /// were outstanding on the old one, in submission order.
    fn renew(
        &mut self,
        poison_after: u32,
        stats: &RingDiskStats,
    ) -> Result<Vec<RingRequest>, String> {
        let old = self.ring.new_generation().map_err(|e| e.to_string())?;
        stats.generations.fetch_add(1, Ordering::Relaxed);
        self.quarantined = false;
        self.isolating = None;
        self.poison_after = poison_after;
        Ok(old)
    }

    /// Crash count from which a request is sent alone.
    fn isolate_at(&self) -> u32 {
        match self.poison_after {
            0 | 1 => u32::MAX,
            k => k - 1,
        }
    }
}

/// The virtio-blk device model over a ring.
pub struct RingBlock {
    fds: ChannelFds,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    state: Arc<Mutex<Option<Frontend>>>,
    stats: Arc<RingDiskStats>,
    worker: Option<QueueWorker>,
    control: Arc<RingControl<Frontend>>,
}

impl RingBlock {
    /// Maps the channel memory and creates the ring in it at `generation`.
    pub fn new(
        fds: ChannelFds,
        sectors: u64,
        read_only: bool,
        id: &str,
        generation: u64,
    ) -> Result<Self, RingDiskError> {
        if sectors == 0 {
            return Err(RingDiskError::Empty);
        }
        let (ring, map) = map_client_ring(&fds, RING_PARAMS, generation)?;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let stats = Arc::new(RingDiskStats::default());
        let state = Arc::new(Mutex::new(Some(Frontend {
            ring,
            _map: map,
            journal: HashMap::new(),
            next_id: 1,
            seen_bogus: 0,
            quarantined: false,
            isolating: None,
            poison_after: 0,
            stats: stats.clone(),
        })));
        let control = RingControl::new(state.clone()).map_err(RingDiskError::Control)?;
        Ok(RingBlock {
            fds,
            sectors,
            read_only,
            id: id_bytes,
            control: Arc::new(control),
            state,
            stats,
            worker: None,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RingDiskStats> {
        self.stats.clone()
    }

    /// The control handle (replay after a driver VM restart, quarantine).
    pub fn control(&self) -> Arc<dyn RingCommands> {
        self.control.clone()
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
        let seg_max = RING_PARAMS.slot_size / SIZE_MAX;
        read_config(self.sectors, seg_max, Some(SIZE_MAX), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        let q = single_queue(queues)?;
        self.reset();
        let ctx = QueueContext {
            mem,
            kick: self.fds.kick.clone(),
            doorbell: self.fds.doorbell.clone(),
            sectors: self.sectors,
            read_only: self.read_only,
            id: self.id,
            stats: self.stats.clone(),
        };
        let state = self.state.clone();
        let control = self.control.clone();
        self.worker = Some(QueueWorker::spawn("ring-blk", move |stop| {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let Some(fe) = guard.as_mut() else { return };
            if let Err(e) = run_queue(fe, q, &ctx, &control, &stop, failure.as_ref()) {
                failure.needs_reset(&e);
            }
            // Whatever is still outstanding belongs to this activation's queue.
            for slot in fe.journal.values_mut() {
                *slot = None;
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for RingBlock {
    fn drop(&mut self) {
        self.reset();
    }
}

struct QueueContext {
    mem: GuestMemoryMmap,
    kick: Arc<EventFd>,
    doorbell: Arc<EventFd>,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    stats: Arc<RingDiskStats>,
}

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_DOORBELL: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_CONTROL: u64 = 3;

/// A request ready for the ring, waiting for room.
struct Outgoing {
    ring: RingRequest,
    data: Option<Vec<u8>>,
    inflight: Inflight,
}

/// What to do with a parsed guest request.
enum Plan {
    /// Answer now with this status and this many bytes written into guest buffers.
    Local(u8, u32),
    /// Send it to the driver VM.
    Ring(RingRequest, Option<Vec<u8>>),
}

fn run_queue(
    fe: &mut Frontend,
    active: ActiveQueue,
    ctx: &QueueContext,
    control: &RingControl<Frontend>,
    stop: &EventFd,
    failure: &dyn DeviceFailure,
) -> Result<(), String> {
    let ActiveQueue {
        mut queue,
        notify,
        interrupt,
    } = active;
    let epoll = Epoll::new().map_err(|e| e.to_string())?;
    for (fd, token) in [
        (notify.as_raw_fd(), TOKEN_NOTIFY),
        (ctx.doorbell.as_raw_fd(), TOKEN_DOORBELL),
        (stop.as_raw_fd(), TOKEN_STOP),
        (control.wake_fd().as_raw_fd(), TOKEN_CONTROL),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| e.to_string())?;
    }
    let mut backlog: VecDeque<Outgoing> = VecDeque::new();
    let mut events = vec![EpollEvent::default(); 5];
    loop {
        // Commands from the daemon first: a replay must precede anything new.
        for (cmd, tx) in control.take() {
            let mut used = Vec::new();
            let outcome = apply_active(fe, cmd, &mut backlog, ctx, &mut used);
            publish_used(&mut queue, &ctx.mem, used, &interrupt)?;
            let _ = tx.send(outcome);
        }
        // New guest requests: answer the trivial ones, queue the rest in order.
        let mut local = Vec::new();
        let quarantined = fe.quarantined;
        pop_requests(&mut queue, &ctx.mem, failure, &mut |head, request| {
            match plan(&request, ctx) {
                Plan::Local(status, written) => {
                    finish(&ctx.mem, &request, status, ctx);
                    local.push((head, written));
                }
                Plan::Ring(..) if quarantined => {
                    finish(&ctx.mem, &request, VIRTIO_BLK_S_IOERR, ctx);
                    ctx.stats.quarantine_failed.fetch_add(1, Ordering::Relaxed);
                    local.push((head, 1));
                }
                Plan::Ring(ring, data) => backlog.push_back(Outgoing {
                    ring,
                    data,
                    inflight: Inflight {
                        head,
                        request,
                        crashes: 0,
                    },
                }),
            }
            Ok(())
        })?;
        publish_used(&mut queue, &ctx.mem, local, &interrupt)?;
        submit_backlog(fe, &mut backlog, &mut queue, ctx, &interrupt)?;
        // Completions until the ring is drained with the notification armed.
        loop {
            let done = take_completions(fe, ctx);
            publish_used(&mut queue, &ctx.mem, done, &interrupt)?;
            submit_backlog(fe, &mut backlog, &mut queue, ctx, &interrupt)?;
            if !fe.ring.enable_notify() {
                break;
            }
        }
        ctx.stats
            .outstanding
            .store(fe.journal.len() as u64, Ordering::Relaxed);
        // With requests outstanding, look again now and then even without a doorbell: a lost
        // or withheld notification then costs a delay, never a hang of this thread.
        let timeout = if fe.journal.is_empty() { -1 } else { 1000 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_NOTIFY => {
                    let _ = notify.read();
                }
                TOKEN_DOORBELL => {
                    let _ = ctx.doorbell.read();
                    ctx.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                }
                TOKEN_CONTROL => {
                    let _ = control.wake_fd().read();
                }
                _ => return Ok(()),
            }
        }
    }
}

/// Applies a daemon command while the queue runs; heads to publish go to `used`.
fn apply_active(
    fe: &mut Frontend,
    cmd: RingCommand,
    backlog: &mut VecDeque<Outgoing>,
    ctx: &QueueContext,
    used: &mut Vec<(u16, u32)>,
) -> Result<RingOutcome, String> {
    let mut outcome = RingOutcome::default();
    let fail = |inflight: Inflight, used: &mut Vec<(u16, u32)>| {
        finish(&ctx.mem, &inflight.request, VIRTIO_BLK_S_IOERR, ctx);
        used.push((inflight.head, 1));
    };
    match cmd {
        RingCommand::Replay { poison_after } => {
            let old = fe.renew(poison_after, &ctx.stats)?;
            let mut replay = Vec::new();
            for r in old {
                // `None`: the guest reset the queue since; nothing to replay.
                let Some(mut inflight) = fe.journal.remove(&r.id).flatten() else {
                    continue;
                };
                inflight.crashes += 1;
                if poison_after > 0 && inflight.crashes >= poison_after {
                    tracing::error!(
                        sector = inflight.request.sector,
                        crashes = inflight.crashes,
                        "poison request: failed alone"
                    );
                    outcome.poisoned += 1;
                    fail(inflight, used);
                    continue;
                }
                // Write data again from guest memory: the old slot is not trusted.
                match plan(&inflight.request, ctx) {
                    Plan::Ring(ring, data) => replay.push(Outgoing {
                        ring,
                        data,
                        inflight,
                    }),
                    Plan::Local(status, written) => {
                        finish(&ctx.mem, &inflight.request, status, ctx);
                        used.push((inflight.head, written));
                    }
                }
            }
            fe.journal.clear();
            outcome.replayed = replay.len() as u64;
            for out in replay.into_iter().rev() {
                backlog.push_front(out);
            }
            ctx.stats
                .replayed
                .fetch_add(outcome.replayed, Ordering::Relaxed);
            ctx.stats
                .poisoned
                .fetch_add(outcome.poisoned, Ordering::Relaxed);
        }
        RingCommand::Quarantine => {
            fe.quarantined = true;
            // The ring keeps these ids until the next generation; a late completion of one
            // only frees its slot.
            for entry in fe.journal.values_mut() {
                if let Some(inflight) = entry.take() {
                    outcome.failed += 1;
                    fail(inflight, used);
                }
            }
            for out in backlog.drain(..) {
                outcome.failed += 1;
                fail(out.inflight, used);
            }
            ctx.stats
                .quarantine_failed
                .fetch_add(outcome.failed, Ordering::Relaxed);
        }
    }
    Ok(outcome)
}

/// Decides how to serve `req`: checks directions, the disk's bounds and the slot size.
fn plan(req: &Request, ctx: &QueueContext) -> Plan {
    let ioerr = Plan::Local(VIRTIO_BLK_S_IOERR, 1);
    let len = req.data_len();
    let in_bounds = req
        .sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|off| off.checked_add(len))
        .is_some_and(|end| end <= ctx.sectors.saturating_mul(SECTOR_SIZE));
    let ring = |op, len: u64| RingRequest {
        id: 0,
        op,
        flags: 0,
        sector: req.sector,
        len: len as u32,
    };
    match req.kind {
        RequestKind::In | RequestKind::Out => {
            let write = req.kind == RequestKind::Out;
            if (write && ctx.read_only)
                || req.data.iter().any(|(_, _, w)| *w == write)
                || !in_bounds
                || len > u64::from(RING_PARAMS.slot_size)
                || len % SECTOR_SIZE != 0
            {
                return ioerr;
            }
            if !write {
                return Plan::Ring(ring(Opcode::Read, len), None);
            }
            let mut data = vec![0u8; len as usize];
            let mut at = 0usize;
            for (addr, n, _) in &req.data {
                let n = *n as usize;
                if ctx.mem.read_slice(&mut data[at..at + n], *addr).is_err() {
                    return ioerr;
                }
                at += n;
            }
            Plan::Ring(ring(Opcode::Write, len), Some(data))
        }
        RequestKind::Flush if ctx.read_only => Plan::Local(VIRTIO_BLK_S_OK, 1),
        RequestKind::Flush => Plan::Ring(ring(Opcode::Flush, 0), None),
        RequestKind::GetId => {
            let Some((addr, len, true)) = req.data.first().copied() else {
                return ioerr;
            };
            let n = (len as usize).min(ID_BYTES);
            if ctx.mem.write_slice(&ctx.id[..n], addr).is_err() {
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
fn finish(mem: &GuestMemoryMmap, req: &Request, status: u8, ctx: &QueueContext) {
    if mem.write_obj(status, req.status).is_err() {
        tracing::error!("status byte vanished from guest memory");
    }
    ctx.stats.completed.fetch_add(1, Ordering::Relaxed);
    if status != VIRTIO_BLK_S_OK {
        ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Moves backlog requests onto the ring while there is room, then notifies the agent if it
/// asked. Requests the ring refuses for a reason other than room fail alone.
fn submit_backlog(
    fe: &mut Frontend,
    backlog: &mut VecDeque<Outgoing>,
    queue: &mut Queue,
    ctx: &QueueContext,
    interrupt: &Interrupt,
) -> Result<(), String> {
    let mut failed = Vec::new();
    let mut sent = false;
    let isolate_at = fe.isolate_at();
    while let Some(mut out) = backlog.pop_front() {
        // A suspect goes alone: after everything before it, with nothing after it.
        let suspect = out.inflight.crashes >= isolate_at;
        if fe.isolating.is_some() || (suspect && !fe.journal.is_empty()) {
            backlog.push_front(out);
            break;
        }
        out.ring.id = fe.next_id;
        match fe.ring.submit(out.ring, out.data.as_deref()) {
            Ok(_) => {
                if suspect {
                    fe.isolating = Some(out.ring.id);
                }
                fe.next_id += 1;
                sent = true;
                ctx.stats.submitted.fetch_add(1, Ordering::Relaxed);
                if out.ring.op == Opcode::Write {
                    let n = u64::from(out.ring.len);
                    ctx.stats.written_bytes.fetch_add(n, Ordering::Relaxed);
                }
                fe.journal.insert(out.ring.id, Some(out.inflight));
            }
            Err(RingError::RingFull | RingError::NoFreeSlot) => {
                backlog.push_front(out);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ring refused a request");
                finish(&ctx.mem, &out.inflight.request, VIRTIO_BLK_S_IOERR, ctx);
                failed.push((out.inflight.head, 1));
            }
        }
    }
    if sent && fe.ring.needs_notify_agent() {
        let _ = ctx.kick.write(1);
        ctx.stats.kicks.fetch_add(1, Ordering::Relaxed);
    }
    publish_used(queue, &ctx.mem, failed, interrupt)?;
    Ok(())
}

/// Takes validated completions off the ring, copies read data into guest memory, writes
/// statuses, and returns the heads to publish.
fn take_completions(fe: &mut Frontend, ctx: &QueueContext) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    for c in fe.ring.poll_completions() {
        if fe.isolating == Some(c.req.id) {
            fe.isolating = None;
        }
        let entry = fe.journal.remove(&c.req.id).flatten();
        let mut status = match c.status {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        };
        let mut written = 1;
        if let Some(inflight) = &entry {
            if c.req.op == Opcode::Read && status == VIRTIO_BLK_S_OK {
                match copy_read_data(&fe.ring, &c, &inflight.request, ctx) {
                    Some(n) => written = n + 1,
                    None => status = VIRTIO_BLK_S_IOERR,
                }
            }
        }
        if let Some(slot) = c.slot {
            let _ = fe.ring.release_slot(slot);
        }
        if let Some(inflight) = entry {
            finish(&ctx.mem, &inflight.request, status, ctx);
            out.push((inflight.head, written));
        }
    }
    let stats: ClientStats = fe.ring.stats();
    let bogus = stats.bogus();
    if bogus != fe.seen_bogus {
        tracing::warn!(
            new = bogus - fe.seen_bogus,
            stale_generation = stats.stale_generation,
            unknown_id = stats.unknown_id,
            bad_status = stats.bad_status,
            bad_length = stats.bad_length,
            bad_index = stats.bad_index,
            "driver VM published invalid completions; dropped"
        );
        fe.seen_bogus = bogus;
        ctx.stats.bogus_completions.store(bogus, Ordering::Relaxed);
    }
    out
}

/// Copies a completed read from its slot into the guest's buffers. `None` if the driver VM
/// delivered fewer bytes than asked or the copy failed.
fn copy_read_data(
    fe: &ClientRing<RawRegion>,
    c: &ddvmm_translation::ring::Completed,
    req: &Request,
    ctx: &QueueContext,
) -> Option<u32> {
    let slot = c.slot?;
    if c.len != c.req.len {
        return None;
    }
    let mut buf = Vec::new();
    let mut at = 0usize;
    for (addr, n, _) in &req.data {
        buf.resize(*n as usize, 0);
        fe.read_slot(slot, at, &mut buf).ok()?;
        ctx.mem.write_slice(&buf, *addr).ok()?;
        at += *n as usize;
    }
    ctx.stats
        .read_bytes
        .fetch_add(u64::from(c.len), Ordering::Relaxed);
    Some(c.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::msix::Msix;
    use crate::memory::create_memfd;
    use ddvmm_translation::ring::{AgentRing, Completion, RawCompletion};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::FileOffset;
    use vm_memory::{Address, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const SECTORS: u64 = 2048;

    #[derive(Default)]
    struct Failures(std::sync::atomic::AtomicUsize);

    impl DeviceFailure for Failures {
        fn needs_reset(&self, _reason: &str) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn fds() -> ChannelFds {
        let size = RING_PARAMS.layout().expect("layout").total as u64;
        let memory = create_memfd(c"test-ring").expect("memfd");
        memory.set_len(size.next_power_of_two()).expect("size");
        let efd = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        ChannelFds {
            memory: Arc::new(memory),
            kick: efd(),
            doorbell: efd(),
        }
    }

    /// An honest agent over the same memfd, in a thread, with a bogus completion before each
    /// real one. Reads return the byte `sector as u8`; writes are checked to hold 0x5A bytes.
    fn agent(fds: &ChannelFds, stop: Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<u64> {
        let len = fds.memory_size().expect("size") as usize;
        let file = fds.memory.try_clone().expect("dup");
        let doorbell = fds.doorbell.clone();
        std::thread::spawn(move || {
            let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len).expect("map");
            let mut ring = loop {
                // SAFETY: the mapping lives until the end of this thread, after the ring; this
                // thread accesses it only through the ring.
                let r = unsafe { RawRegion::new(map.as_ptr(), len) }.expect("region");
                if let Ok(a) = AgentRing::attach(r, ddvmm_translation::ring::features::ALL) {
                    break a;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            ring.set_ready().expect("ready");
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
                doorbell.write(1).expect("doorbell");
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
        let len = fds.memory_size().expect("size") as usize;
        let file = fds.memory.try_clone().expect("dup");
        let doorbell = fds.doorbell.clone();
        std::thread::spawn(move || {
            let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len).expect("map");
            let start = Instant::now();
            let mut ring = loop {
                // SAFETY: the mapping outlives the ring (same thread); accessed only through it.
                let r = unsafe { RawRegion::new(map.as_ptr(), len) }.expect("region");
                match AgentRing::attach(r, ddvmm_translation::ring::features::ALL) {
                    Ok(a) if a.generation() == generation => break a,
                    _ => {}
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no ring {generation}"
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            ring.set_ready().expect("ready");
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
                doorbell.write(1).expect("doorbell");
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
        let mut dev = RingBlock::new(fds.clone(), SECTORS, false, "t", 1).expect("ring disk");
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
    fn guest_reset_during_an_outage_drops_its_requests_and_renews_the_ring() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        let fds = fds();
        // The agent dies on the first request: all six stay outstanding.
        let (mut dev, control) = running_reads(&m, &mock, &fds, &[8, 16, 24, 32, 40, 48]);
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
                RingCommand::Replay { poison_after: 3 },
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
        assert_eq!(dev.stats().completed.load(Ordering::SeqCst), 0);
        assert_eq!(dev.stats().generations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn replays_after_driver_crashes_and_isolates_the_poison_request() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&m, 64);
        const POISON: u64 = 64;
        // Six 4 KiB reads; the third is the poison.
        let sectors = [8u64, 16, POISON, 24, 32, 40];
        let fds = fds();
        let (mut dev, control) = running_reads(&m, &mock, &fds, &sectors);
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
                    RingCommand::Replay { poison_after: 3 },
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
        assert_eq!(s.poisoned.load(Ordering::SeqCst), 1);
        assert_eq!(s.generations.load(Ordering::SeqCst), 3);
        assert_eq!(s.errors.load(Ordering::SeqCst), 1);
        assert_eq!(s.completed.load(Ordering::SeqCst), 6);
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
        let mut dev = RingBlock::new(fds.clone(), SECTORS, false, "t", 1).expect("ring disk");
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
        assert_eq!(s.submitted.load(Ordering::SeqCst), 3);
        assert_eq!(s.completed.load(Ordering::SeqCst), 6);
        assert_eq!(s.errors.load(Ordering::SeqCst), 3);
        assert_eq!(s.bogus_completions.load(Ordering::SeqCst), 9);
        assert_eq!(failures.0.load(Ordering::SeqCst), 0);
    }
}
