//! The one core of every ring frontend: a virtio device model whose backend is a ring to a
//! driver VM ([`ddvmm_translation::ring`]).
//!
//! A frontend is a [`RingDevice`] (what is specific to block or network: parsing guest chains,
//! encoding ring requests, finishing completions) driven by one [`worker`] thread per device
//! that lives as long as the device, not as long as the guest's queues. The worker owns the
//! ring, the in-flight [`Journal`] and the device, so nothing is shared behind a lock:
//!
//! - **Draining never depends on the guest.** A guest that resets its device (or sends a chain
//!   broken enough to need a reset) loses its queues and the guest side of its requests; the
//!   requests already on the ring stay there until the driver VM answers them, and the worker
//!   keeps consuming completions, so the `outstanding` gauge the daemon watches stays true.
//! - **A broken ring is a state, never a spin.** An agent index that breaks the ring's
//!   invariants makes the ring corrupt until the next generation
//!   ([`ddvmm_translation::ring::ClientRing::corruption`]); the worker reports it (the
//!   `corrupt` gauge: the daemon restarts the driver VM), stops listening to that driver VM's
//!   doorbell and keeps every request journaled for replay. Each loop round does bounded work.
//! - **Commands are served even while the ring is busy**: replay, release, quarantine from the
//!   daemon, activate and reset from the transport all go through one queue the worker reads
//!   between rounds ([`control`]).
//!
//! Events are typed ([`worker::Token`]); errors are typed ([`GuestError`], [`CommandError`]).

pub mod control;
pub mod rate_limit;
#[doc(hidden)]
pub mod stepper;
#[cfg(test)]
pub mod testing;
mod worker;

use crate::sandbox::seccomp::ThreadKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ddvmm_translation::journal::Journal;
use ddvmm_translation::ring::{
    ClientRing, Completed, RawRegion, Request as RingRequest, RingError, RingParams,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory,
};
use vmm_sys_util::eventfd::EventFd;

pub use control::{CommandError, RingCommand, RingCommands, RingHandle, RingOutcome};
pub use rate_limit::RateLimit;

use super::{next_chain, publish_used, ActivateError, ActiveQueue, DeviceFailure};
use crate::devices::channel::ChannelFds;
use control::Command;

/// How long the transport waits for the worker to take or drop the guest's queues.
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors setting up a frontend's ring.
#[derive(Debug, thiserror::Error)]
pub enum RingSetupError {
    /// The channel memory cannot be mapped.
    #[error("cannot map channel memory")]
    Map(#[source] std::io::Error),
    /// The ring does not fit or cannot be created.
    #[error("cannot create the ring")]
    Ring(#[source] RingError),
    /// The worker's eventfds or epoll cannot be created.
    #[error("cannot set up the ring worker")]
    Worker(#[source] std::io::Error),
}

/// A guest queue problem that needs a driver reset (the device reports `NEEDS_RESET`; the
/// ring keeps being served).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The virtqueue itself is broken (addresses, indices).
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
    /// A chain too broken to answer.
    #[error("malformed chain {head}: {reason}")]
    Malformed {
        /// The chain's head.
        head: u16,
        /// What is wrong.
        reason: String,
    },
    /// The used ring cannot be written.
    #[error("used ring: {0}")]
    Used(String),
}

/// Why a journaled request fails without a driver VM's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// On the ring at too many consecutive driver VM crashes.
    Poison,
    /// The channel or its driver VM is given up.
    Quarantine,
    /// The ring refused it (it breaks the protocol's rules).
    Refused,
}

/// The guest's side while the device is active: its memory, queues, and the used entries of
/// the current round (published together, with one interrupt per queue at most).
pub struct Guest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, in the device's order.
    pub queues: Vec<ActiveQueue>,
    failure: Arc<dyn DeviceFailure>,
    used: Vec<Vec<(u16, u32)>>,
}

impl Guest {
    /// The guest's side of an activation.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Self {
        let used = queues.iter().map(|_| Vec::new()).collect();
        Guest {
            mem,
            queues,
            failure,
            used,
        }
    }

    /// Returns chain `head` of queue `queue` to the guest with `written` bytes, at the end of
    /// the round.
    pub fn finish(&mut self, queue: usize, head: u16, written: u32) {
        if let Some(u) = self.used.get_mut(queue) {
            u.push((head, written));
        }
    }

    /// Pops at most `limit` chains (and at most one queue's worth) from queue `q`, handing
    /// each to `take` with the guest memory. `take` returns `Some(written)` to give the chain
    /// back at once (answered without a driver VM), `None` if it keeps it. The first error
    /// stops the pass and is returned (the device then needs a reset).
    pub fn pop_chains<F>(&mut self, q: usize, limit: usize, mut take: F) -> Result<(), GuestError>
    where
        F: FnMut(
            &GuestMemoryMmap,
            DescriptorChain<&GuestMemoryMmap>,
        ) -> Result<Option<u32>, GuestError>,
    {
        let Some(aq) = self.queues.get_mut(q) else {
            return Ok(());
        };
        let (queue, mem) = (&mut aq.queue, &self.mem);
        let mut done = Vec::new();
        let mut result = Ok(());
        for _ in 0..limit.min(usize::from(queue.size())) {
            let chain = match next_chain(queue, mem).map_err(GuestError::Queue) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let head = chain.head_index();
            match take(mem, chain) {
                Ok(Some(written)) => done.push((head, written)),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Some(u) = self.used.get_mut(q) {
            u.extend(done);
        }
        result
    }

    fn publish(&mut self) -> Result<(), GuestError> {
        for (q, used) in self.queues.iter_mut().zip(self.used.iter_mut()) {
            if used.is_empty() {
                continue;
            }
            publish_used(&mut q.queue, &self.mem, used.drain(..), &q.interrupt)
                .map_err(GuestError::Used)?;
        }
        Ok(())
    }
}

/// What a device model over a ring provides to the core.
pub trait RingDevice: Send + 'static {
    /// A journaled guest request (what is needed to finish it to the guest).
    type Item: Send + 'static;
    /// How many virtqueues the device has.
    const QUEUES: usize;

    /// Takes new guest requests: answers those that need no driver VM, fails ring-bound ones
    /// at once while `quarantined`, and pushes the rest into `journal` while it has room. Must
    /// do bounded work (at most one pass over the queues).
    fn accept(
        &mut self,
        guest: &mut Guest,
        journal: &mut Journal<Self::Item>,
        quarantined: bool,
    ) -> Result<(), GuestError>;

    /// The ring request for `item` (its `id` is set by the core) and the data it carries
    /// ([`Payload`]). Called at every (re)submission, so write data is taken again from where
    /// the device keeps it (the item, or guest memory), never from a slot. `None`: the request
    /// cannot be sent (it fails alone).
    fn encode<'a>(&mut self, item: &'a Self::Item) -> Option<(RingRequest, Payload<'a>)>;

    /// The driver VM completed `item` (validated by the ring): finish it to the guest.
    fn complete(&mut self, guest: &mut Guest, ring: &RingView<'_>, item: Self::Item, c: &Completed);

    /// `item` fails without the driver VM's answer.
    fn fail(&mut self, guest: &mut Guest, item: Self::Item, why: Failure);

    /// Payload bytes `item` moves (what a bandwidth limit counts).
    fn payload_bytes(&self, _item: &Self::Item) -> u64 {
        0
    }

    /// Requests the device keeps standing on the ring (network receive buffers): the request
    /// (its id set by the core) and how many.
    fn standing(&self) -> Option<(RingRequest, usize)> {
        None
    }

    /// A standing request completed (its slot is held until this returns).
    fn standing_done(&mut self, _guest: Option<&mut Guest>, _ring: &RingView<'_>, _c: &Completed) {}

    /// Work that needs only the guest (delivering held frames into receive buffers).
    fn service_guest(&mut self, _guest: &mut Guest) -> Result<(), GuestError> {
        Ok(())
    }

    /// The guest's queues are gone (reset): drop guest-side state.
    fn guest_gone(&mut self) {}
}

/// What a request carries onto the ring.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Nothing (reads, flushes, receive buffers).
    None,
    /// Bytes the device keeps (a frame, read once from the guest when it was accepted).
    Bytes(&'a [u8]),
    /// Guest memory, copied straight into the request's slot: the (address, length, -)
    /// pieces of a block request, in order, `len` bytes in all.
    Guest(&'a [(GuestAddress, u32, bool)]),
}

/// A ring and the channel memory under it, as device models finish requests: data moves
/// between a slot and guest memory in one copy, with no buffer between.
pub struct RingView<'a> {
    /// The ring.
    pub ring: &'a ClientRing<RawRegion>,
    memory: &'a MmapRegion,
}

impl<'a> RingView<'a> {
    /// The ring `ring`, whose region is `memory` (from offset 0).
    pub fn new(ring: &'a ClientRing<RawRegion>, memory: &'a MmapRegion) -> Self {
        RingView { ring, memory }
    }

    /// Copies the first bytes of held slot `slot` into the guest memory `pieces` (in order,
    /// all of each). False if the slot is not held, the pieces do not fit in it, or guest
    /// memory is not there.
    pub fn copy_to_guest(
        &self,
        slot: u32,
        mem: &GuestMemoryMmap,
        pieces: &[(GuestAddress, u32, bool)],
    ) -> bool {
        let total = pieces.iter().map(|&(_, n, _)| n as usize).sum();
        match self.ring.held_range(slot, 0, total) {
            Ok(at) => copy_pieces(self.memory, at, mem, pieces, Direction::ToGuest),
            Err(_) => false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToGuest,
    FromGuest,
}

/// Copies between the guest memory `pieces` (in order, all of each; a piece may span guest
/// memory regions) and the channel memory from `at` on, one volatile copy per region piece.
/// False if either side is not there.
fn copy_pieces(
    memory: &MmapRegion,
    mut at: usize,
    mem: &GuestMemoryMmap,
    pieces: &[(GuestAddress, u32, bool)],
    dir: Direction,
) -> bool {
    for &(addr, n, _) in pieces {
        for piece in mem.get_slices(addr, n as usize) {
            let Ok(guest) = piece else { return false };
            let Ok(slot) = memory.get_slice(at, guest.len()) else {
                return false;
            };
            match dir {
                Direction::ToGuest => slot.copy_to_volatile_slice(guest),
                Direction::FromGuest => guest.copy_to_volatile_slice(slot),
            }
            at += guest.len();
        }
    }
    true
}

/// Which kind of device a ring serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingKind {
    /// A virtio-blk disk.
    Disk,
    /// A virtio-net NIC.
    Nic,
}

pub use crate::stats_page::RingProgress;

/// A device's counters as `name value` pairs.
pub trait RingCounters: Send + Sync {
    /// The counters now.
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
    /// The progress counters the daemon's watcher reads.
    fn progress(&self) -> RingProgress;
}

/// What the rest of the VMM sees of a ring device: its kind, its counters (for the stats
/// page) and its control (for the daemon's replay, release and quarantine).
#[derive(Clone)]
pub struct RingPort {
    /// Disk or NIC.
    pub kind: RingKind,
    /// Counters.
    pub counters: Arc<dyn RingCounters>,
    /// Commands.
    pub control: Arc<dyn RingCommands>,
}

/// Counters every ring frontend keeps, readable while it runs. The daemon's watcher reads
/// their [`RingProgress`].
#[derive(Debug, Default)]
pub struct RingStats {
    /// Journaled requests submitted on the ring (replays included).
    pub submitted: AtomicU64,
    /// Journaled requests the driver VM completed (any status): progress.
    pub completed: AtomicU64,
    /// Completions rejected by validation (bogus ids, statuses, lengths, generations, indices).
    pub bogus_completions: AtomicU64,
    /// Notifications sent to the driver VM (its irqfd).
    pub kicks: AtomicU64,
    /// Doorbells received from the driver VM.
    pub doorbells: AtomicU64,
    /// Requests sent again on a new generation after a driver VM restart.
    pub replayed: AtomicU64,
    /// Standing requests (receive buffers) posted again on a new generation.
    pub reposted: AtomicU64,
    /// Requests failed as poison (on the ring at too many consecutive crashes).
    pub poisoned: AtomicU64,
    /// Requests failed because the channel or its driver VM is quarantined.
    pub quarantine_failed: AtomicU64,
    /// Requests the ring refused (they failed alone).
    pub refused: AtomicU64,
    /// Times the worker stopped sending because of the channel's rate limit (one per wait).
    pub throttled: AtomicU64,
    /// Journaled requests on the ring awaiting completion (a gauge).
    pub outstanding: AtomicU64,
    /// Journaled requests not yet on the ring (a gauge).
    pub waiting: AtomicU64,
    /// Requests that one more crash would make poison (a gauge).
    pub suspects: AtomicU64,
    /// 1 while the driver VM has broken the ring (until the next generation), else 0.
    pub corrupt: AtomicU64,
    /// 1 while the daemon holds this frontend (nothing sent), else 0.
    pub held: AtomicU64,
    /// Ring generations started after the first (driver VM restarts seen).
    pub generations: AtomicU64,
    /// Wall clock (ms since the epoch) of the first completion on the current generation, 0
    /// until there is one: when this client saw service again after a restart (the daemon
    /// measures outages with it).
    pub first_completion_ms: AtomicU64,
}

/// Wall clock in ms since the epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RingStats {
    /// The progress counters the daemon's watcher reads.
    pub fn progress(&self) -> RingProgress {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RingProgress {
            outstanding: g(&self.outstanding),
            waiting: g(&self.waiting),
            completed: g(&self.completed),
            bogus_completions: g(&self.bogus_completions),
            corrupt: g(&self.corrupt) != 0,
            suspects: g(&self.suspects),
            first_completion_ms: g(&self.first_completion_ms),
        }
    }

    /// `name value` pairs of the counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("submitted", g(&self.submitted)),
            ("throttled", g(&self.throttled)),
            ("completed", g(&self.completed)),
            ("bogus_completions", g(&self.bogus_completions)),
            ("kicks", g(&self.kicks)),
            ("doorbells", g(&self.doorbells)),
            ("replayed", g(&self.replayed)),
            ("reposted", g(&self.reposted)),
            ("poisoned", g(&self.poisoned)),
            ("quarantine_failed", g(&self.quarantine_failed)),
            ("refused", g(&self.refused)),
            ("outstanding", g(&self.outstanding)),
            ("waiting", g(&self.waiting)),
            ("suspects", g(&self.suspects)),
            ("corrupt", g(&self.corrupt)),
            ("held", g(&self.held)),
            ("generations", g(&self.generations)),
            ("first_completion_ms", g(&self.first_completion_ms)),
        ]
    }
}

/// Maps the channel memory of `fds` and creates a client ring with `params` in it at
/// `generation`. The ring points into the returned mapping: keep the mapping alive for as long
/// as the ring (the worker owns both, the ring dropped first).
pub fn map_client_ring(
    fds: &ChannelFds,
    params: RingParams,
    generation: u64,
) -> Result<(ClientRing<RawRegion>, Arc<MmapRegion>), RingSetupError> {
    let size = fds.memory_size().map_err(RingSetupError::Map)?;
    let len = usize::try_from(size)
        .map_err(|_| RingSetupError::Map(std::io::Error::other("too large")))?;
    let file = fds.memory.try_clone().map_err(RingSetupError::Map)?;
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len)
        .map_err(|e| RingSetupError::Map(std::io::Error::other(e)))?;
    let map = Arc::new(map);
    // SAFETY: the mapping is `len` bytes, readable and writable, and the caller keeps it (the
    // returned `Arc`) alive for as long as the ring, as documented above. In this process the
    // bytes are accessed only through the ring's atomics and volatile copies (the ring's, and
    // `RingView`'s of slot ranges the ring hands out), never through references.
    let region = unsafe { RawRegion::new(map.as_ptr(), len) }.map_err(RingSetupError::Ring)?;
    let ring = ClientRing::create_at(region, params, generation).map_err(RingSetupError::Ring)?;
    Ok((ring, map))
}

/// How a frontend's ring and journal are made.
pub struct Setup<'a> {
    /// The channel (memory and eventfds) the ring lives in.
    pub fds: &'a ChannelFds,
    /// Ring sizes.
    pub params: RingParams,
    /// The first ring generation (non-zero).
    pub generation: u64,
    /// Journal capacity: requests accepted from the guest and not yet completed, at most.
    pub capacity: usize,
    /// Where the core's counters go.
    pub stats: Arc<RingStats>,
    /// Requests and bytes per second the channel may use.
    pub limit: RateLimit,
}

/// A running frontend: its worker thread and the handle that commands it.
pub struct RingFrontend {
    handle: Arc<RingHandle>,
    /// Queues the device has.
    queues: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RingFrontend {
    /// Creates the ring as `setup` says and starts the worker thread `name` serving `device`
    /// over it.
    pub fn spawn<D: RingDevice>(
        name: &str,
        device: D,
        setup: Setup<'_>,
    ) -> Result<Self, RingSetupError> {
        let (worker, handle) = build(device, setup)?;
        let thread =
            crate::sandbox::seccomp::spawn(ThreadKind::RingWorker, name, move || worker.run())
                .map_err(RingSetupError::Worker)?;
        Ok(RingFrontend {
            handle: Arc::new(handle),
            queues: D::QUEUES,
            thread: Some(thread),
        })
    }

    /// The daemon's handle (replay, release, quarantine).
    pub fn control(&self) -> Arc<dyn RingCommands> {
        self.handle.clone()
    }

    /// Hands the guest's queues to the worker (the transport's activate).
    pub fn activate(
        &self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queues {
            return Err(ActivateError::QueueCount {
                expected: self.queues,
                got: queues.len(),
            });
        }
        let guest = Guest::new(mem, queues, failure);
        self.handle
            .call(Command::Activate(guest), TRANSPORT_TIMEOUT)
            .map(|_| ())
            .map_err(|e| ActivateError::Setup(e.to_string()))
    }

    /// Takes the guest's queues back (the transport's reset); returns once the worker no
    /// longer touches them.
    pub fn reset(&self) {
        if let Err(e) = self.handle.call(Command::Reset, TRANSPORT_TIMEOUT) {
            tracing::error!(error = %e, "ring frontend reset");
        }
    }
}

impl Drop for RingFrontend {
    fn drop(&mut self) {
        let _ = self.handle.call(Command::Stop, TRANSPORT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a ring frontend worker panicked");
            }
        }
    }
}

/// Creates the ring in the channel memory of `fds` and the worker that serves `device` over
/// it, with the handle that commands the worker.
fn build<D: RingDevice>(
    device: D,
    setup: Setup<'_>,
) -> Result<(worker::Worker<D>, RingHandle), RingSetupError> {
    let Setup {
        fds,
        params,
        generation,
        capacity,
        stats,
        limit,
    } = setup;
    let (ring, map) = map_client_ring(fds, params, generation)?;
    let wake =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(RingSetupError::Worker)?;
    let (tx, rx) = mpsc::channel();
    let worker = worker::Worker::new(worker::Parts {
        device,
        ring,
        map,
        journal: Journal::new(capacity),
        kick: fds.kick.clone(),
        doorbell: fds.doorbell.clone(),
        stats,
        commands: rx,
        wake: wake.try_clone().map_err(RingSetupError::Worker)?,
        limit,
    })
    .map_err(RingSetupError::Worker)?;
    Ok((worker, RingHandle::new(tx, wake)))
}

/// The raw fd of an eventfd, for epoll.
fn raw(fd: &EventFd) -> i32 {
    fd.as_raw_fd()
}
