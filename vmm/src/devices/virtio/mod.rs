//! Virtio devices (virtio 1.x, split virtqueues) and their modern virtio-pci transport.
//!
//! A device model implements [`VirtioDevice`]; [`pci::VirtioPciDevice`] wraps it as a PCI
//! function (capabilities, common configuration, notification, MSI-X). When the driver sets
//! `DRIVER_OK` the transport hands the device its queues, each with the eventfd that KVM signals
//! on a queue notification (an ioeventfd on the notify register) and an [`Interrupt`] that raises
//! the queue's MSI-X vector through an irqfd. The VMM's vCPU threads are not on the data path.

pub mod block;
pub mod net;
pub mod pci;
pub mod ring;

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::pci::msix::Msix;

/// Feature bit: virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Errors starting a device.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// A worker thread could not be started.
    #[error("cannot start device worker")]
    Spawn(#[source] std::io::Error),
    /// Wrong number of queues.
    #[error("device needs {expected} queues, driver enabled {got}")]
    QueueCount {
        /// Expected.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// Setting up the worker failed.
    #[error("cannot set up device worker: {0}")]
    Setup(String),
}

/// Copies the bytes of a device configuration space `cfg` at `offset` into `data`; bytes
/// beyond the end (or an absurd offset) read as zero.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// How a device raises its queue (or configuration) interrupt.
#[derive(Clone)]
pub struct Interrupt {
    msix: Arc<Msix>,
    vector: u16,
}

impl Interrupt {
    /// Raises MSI-X `vector` of `msix` (0xffff, virtio's NO_VECTOR, raises nothing).
    pub fn new(msix: Arc<Msix>, vector: u16) -> Self {
        Interrupt { msix, vector }
    }

    /// Raises the interrupt.
    pub fn trigger(&self) {
        self.msix.trigger(self.vector);
    }
}

/// A queue handed to a device on activation.
pub struct ActiveQueue {
    /// The virtqueue (addresses, size, event-idx setting).
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: EventFd,
    /// Raises this queue's interrupt.
    pub interrupt: Interrupt,
}

/// Reports a device error that needs a driver reset (sets `NEEDS_RESET`, raises the
/// configuration interrupt).
pub trait DeviceFailure: Send + Sync {
    /// Marks the device broken, with a reason for the log.
    fn needs_reset(&self, reason: &str);
}

/// A virtio device model behind some transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (1 net, 2 block, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers (the transport adds nothing).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features` and the enabled queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError>;
    /// Stops the device (driver reset); in-flight work is finished or dropped before return.
    fn reset(&mut self);
}

/// A device's queue thread and the eventfd that tells it to stop.
pub struct QueueWorker {
    stop: EventFd,
    thread: std::thread::JoinHandle<()>,
}

impl QueueWorker {
    /// Starts thread `name` (of seccomp kind `kind`) running `body`, which must return once its
    /// stop eventfd (the argument) becomes readable.
    pub fn spawn(
        kind: crate::sandbox::seccomp::ThreadKind,
        name: &str,
        body: impl FnOnce(EventFd) + Send + 'static,
    ) -> Result<Self, ActivateError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Spawn)?;
        let stop_worker = stop.try_clone().map_err(ActivateError::Spawn)?;
        let thread = crate::sandbox::seccomp::spawn(kind, name, move || body(stop_worker))
            .map_err(ActivateError::Spawn)?;
        Ok(QueueWorker { stop, thread })
    }

    /// Signals the thread to stop and waits for it.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        if self.thread.join().is_err() {
            tracing::error!("a virtio queue thread panicked");
        }
    }
}

/// The one queue of a single-queue device.
pub fn single_queue(mut queues: Vec<ActiveQueue>) -> Result<ActiveQueue, ActivateError> {
    if queues.len() != 1 {
        return Err(ActivateError::QueueCount {
            expected: 1,
            got: queues.len(),
        });
    }
    Ok(queues.remove(0))
}

/// The next available chain of `queue`, with the guest's notifications suppressed while
/// chains are there and re-enabled once the queue is empty (virtio's race-free order: a chain
/// published while enabling is returned, not missed). A queue whose indices are broken is an
/// error (the device then needs a reset), never an endless stream of nothing.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    for _ in 0..2 {
        queue.disable_notification(mem)?;
        if let Some(chain) = queue.iter(mem)?.next() {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem)? {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Adds `(head, bytes written)` pairs to the used ring, then interrupts the driver if virtio's
/// notification suppression says it wants to hear about them. Returns how many were added.
pub fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    done: impl IntoIterator<Item = (u16, u32)>,
    interrupt: &Interrupt,
) -> Result<usize, String> {
    let mut n = 0;
    for (head, written) in done {
        queue
            .add_used(mem, head, written)
            .map_err(|e| format!("used ring: {e:?}"))?;
        n += 1;
    }
    if n > 0
        && queue
            .needs_notification(mem)
            .map_err(|e| format!("used ring: {e:?}"))?
    {
        interrupt.trigger();
    }
    Ok(n)
}
