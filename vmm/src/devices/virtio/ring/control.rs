//! The daemon's commands to a ring frontend after its driver VM failed, their answers and
//! errors, and the handle through which they (and the transport's activate/reset) reach the
//! frontend's worker thread.
//!
//! A command is queued on a channel and the worker is woken through an eventfd; the worker
//! applies it between two rounds of its loop (each round does bounded work, so a command is
//! never starved by a busy or broken ring) and answers on a channel of its own.

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use ddvmm_translation::ring::RingError;
use vmm_sys_util::eventfd::EventFd;

use super::Guest;

/// What the daemon asks of a ring frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingCommand {
    /// The driver VM was replaced (the old one is gone for good): start a new generation and
    /// replay. A request on the ring at `poison_after` consecutive crashes fails alone (0:
    /// never). With `hold`, nothing goes on the new ring until [`RingCommand::Release`]: the
    /// daemon releases the channels of one driver VM in turn when some hold suspects.
    Replay {
        /// Crashes after which a request is poison.
        poison_after: u32,
        /// Send nothing until released.
        hold: bool,
    },
    /// Lets a held frontend send again.
    Release,
    /// The channel (or its driver VM) is given up: fail what is outstanding and every new
    /// request until the next replay.
    Quarantine,
}

/// What a command did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingOutcome {
    /// Requests to be sent again on the new generation.
    pub replayed: u64,
    /// Requests failed as poison.
    pub poisoned: u64,
    /// Requests failed by a quarantine.
    pub failed: u64,
    /// Requests now suspects: one more crash while on the ring makes them poison.
    pub suspects: u64,
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The worker thread is gone (the device was dropped, or the thread died).
    #[error("the ring frontend's worker is gone")]
    Gone,
    /// No answer in time.
    #[error("the ring frontend did not answer within {0:?}")]
    Timeout(Duration),
    /// The ring could not start a new generation.
    #[error("cannot start a new ring generation")]
    Renew(#[source] RingError),
}

/// The daemon's view of any ring frontend.
pub trait RingCommands: Send + Sync {
    /// Applies `cmd` and returns what it did; waits at most `timeout`.
    fn request(&self, cmd: RingCommand, timeout: Duration) -> Result<RingOutcome, CommandError>;
}

/// Everything the worker is asked to do, by the daemon or by the virtio transport.
pub(super) enum Command {
    /// The guest started the device: serve these queues.
    Activate(Guest),
    /// The guest reset the device: forget its queues and requests.
    Reset,
    /// A daemon command.
    Ring(RingCommand),
    /// The device is being dropped: end the thread.
    Stop,
}

pub(super) type Reply = Result<RingOutcome, CommandError>;

/// The sending side of a worker's command queue.
pub struct RingHandle {
    commands: Mutex<mpsc::Sender<(Command, mpsc::Sender<Reply>)>>,
    wake: EventFd,
}

impl RingHandle {
    pub(super) fn new(
        commands: mpsc::Sender<(Command, mpsc::Sender<Reply>)>,
        wake: EventFd,
    ) -> Self {
        RingHandle {
            commands: Mutex::new(commands),
            wake,
        }
    }

    /// Queues `cmd`, wakes the worker and waits at most `timeout` for its answer.
    pub(super) fn call(&self, cmd: Command, timeout: Duration) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((cmd, tx))
            .map_err(|_| CommandError::Gone)?;
        let _ = self.wake.write(1);
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(CommandError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CommandError::Gone),
        }
    }
}

impl RingCommands for RingHandle {
    fn request(&self, cmd: RingCommand, timeout: Duration) -> Result<RingOutcome, CommandError> {
        self.call(Command::Ring(cmd), timeout)
    }
}
