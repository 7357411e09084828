//! A frontend driven one turn at a time from the caller's thread: the same worker, device,
//! journal and ring as a running frontend, without the thread and epoll wait. For the fuzz
//! target (`fuzz/fuzz_targets/ring_frontends.rs`), which plays a hostile agent and a hostile
//! guest against it; not for production use.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::control::Command;
use super::worker::Worker;
use super::{build, CommandError, Guest, RingHandle};
use super::{RingCommand, RingDevice, RingOutcome, RingSetupError, Setup};
use crate::devices::virtio::{ActiveQueue, DeviceFailure};

/// A frontend without its thread.
pub struct Stepper<D: RingDevice> {
    worker: Worker<D>,
    // Kept so the worker's command queue stays connected.
    _handle: RingHandle,
}

impl<D: RingDevice> Stepper<D> {
    /// As [`super::RingFrontend::spawn`], without the thread.
    pub fn new(device: D, setup: Setup<'_>) -> Result<Self, RingSetupError> {
        let (worker, handle) = build(device, setup)?;
        Ok(Stepper {
            worker,
            _handle: handle,
        })
    }

    /// Applies a daemon command.
    pub fn command(&mut self, cmd: RingCommand) -> Result<RingOutcome, CommandError> {
        self.worker.apply(Command::Ring(cmd))
    }

    /// The guest activates the device.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) {
        let guest = Guest::new(mem, queues, failure);
        let _ = self.worker.apply(Command::Activate(guest));
    }

    /// The guest resets the device.
    pub fn reset(&mut self) {
        let _ = self.worker.apply(Command::Reset);
    }

    /// One turn of the loop (what one wakeup does); returns whether work is left.
    pub fn step(&mut self) -> bool {
        let busy = self.worker.turn();
        self.worker.update_gauges();
        busy
    }
}
