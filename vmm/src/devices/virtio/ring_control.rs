//! The daemon's commands to a ring frontend (block or network) after its driver VM failed,
//! and how they reach the frontend's queue thread.
//!
//! A command is queued and the queue thread is woken through an eventfd; the thread applies
//! it between two rounds of its loop (so a replay precedes anything new) and answers on a
//! channel. While the guest has no queue running, nobody holds the frontend's state and the
//! caller's thread applies the command itself ([`IdleRing`]).

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use ddvmm_translation::ring::{ClientRing, RawRegion, RingError, RingParams};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::ChannelFds;

/// Errors setting up a frontend's ring.
#[derive(Debug, thiserror::Error)]
pub enum RingSetupError {
    /// The channel memory cannot be mapped.
    #[error("cannot map channel memory")]
    Map(#[source] std::io::Error),
    /// The ring does not fit or cannot be created.
    #[error("cannot create the ring")]
    Ring(#[source] RingError),
}

/// Maps the channel memory of `fds` and creates a client ring with `params` in it at
/// `generation`. The ring points into the returned mapping: keep the mapping alive (declared
/// after the ring in the owning struct) for as long as the ring.
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
    // bytes are accessed only through the ring's atomics.
    let region = unsafe { RawRegion::new(map.as_ptr(), len) }.map_err(RingSetupError::Ring)?;
    let ring = ClientRing::create_at(region, params, generation).map_err(RingSetupError::Ring)?;
    Ok((ring, map))
}

/// What the daemon asks of a ring frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingCommand {
    /// The driver VM was replaced (the old one is gone for good): start a new generation and
    /// replay. A request in flight at `poison_after` consecutive crashes fails alone (0: never).
    Replay {
        /// Crashes after which a request is poison.
        poison_after: u32,
    },
    /// The driver VM is given up: fail what is outstanding and every new request until the
    /// next replay.
    Quarantine,
}

/// What a command did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingOutcome {
    /// Requests re-submitted.
    pub replayed: u64,
    /// Requests failed as poison.
    pub poisoned: u64,
    /// Requests failed by a quarantine.
    pub failed: u64,
}

/// A frontend's ring state while no queue thread runs.
pub trait IdleRing: Send {
    /// Applies `cmd` with no guest queue active: every journaled request belongs to a queue
    /// that was reset, so there is nothing to replay or fail, only the ring to renew.
    fn apply_idle(&mut self, cmd: RingCommand) -> Result<RingOutcome, String>;
}

/// The daemon's view of any ring frontend.
pub trait RingCommands: Send + Sync {
    /// Applies `cmd` and returns what it did; waits at most `timeout`.
    fn request(&self, cmd: RingCommand, timeout: Duration) -> Result<RingOutcome, String>;
}

type Pending = (RingCommand, mpsc::Sender<Result<RingOutcome, String>>);

/// The command queue of one frontend whose ring-side state is an `F`.
pub struct RingControl<F> {
    state: Arc<Mutex<Option<F>>>,
    pending: Mutex<VecDeque<Pending>>,
    /// Wakes the queue thread.
    wake: EventFd,
}

impl<F: IdleRing> RingControl<F> {
    /// A queue for the frontend state `state` (held by the queue thread while it runs).
    pub fn new(state: Arc<Mutex<Option<F>>>) -> std::io::Result<Self> {
        Ok(RingControl {
            state,
            pending: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// The eventfd the queue thread waits on for commands.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Commands waiting, oldest first, each with the channel its answer goes to.
    pub fn take(&self) -> Vec<Pending> {
        self.lock_pending().drain(..).collect()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<F: IdleRing> RingCommands for RingControl<F> {
    fn request(&self, cmd: RingCommand, timeout: Duration) -> Result<RingOutcome, String> {
        let (tx, rx) = mpsc::channel();
        self.lock_pending().push_back((cmd, tx));
        let _ = self.wake.write(1);
        let deadline = Instant::now() + timeout;
        loop {
            // The queue thread holds the state while the device is active; if nobody does, the
            // guest has no queue running and the command is applied right here.
            let idle = match self.state.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut g) = idle {
                if let Some(fe) = g.as_mut() {
                    for (cmd, tx) in self.take() {
                        let _ = tx.send(fe.apply_idle(cmd));
                    }
                }
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err("the ring device did not answer in time".into()),
            }
        }
    }
}
