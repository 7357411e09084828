//! Errors building or running a machine.

use std::path::PathBuf;

use thiserror::Error;

use super::MAX_VCPUS_ACPI;
use crate::arch::x86_64::{acpi, loader, msrs, regs};
use crate::devices::bus::BusError;
use crate::devices::channel::ChannelError;
use crate::devices::pci::msix::MsixError;
use crate::devices::vfio_pci::VfioPciError;
use crate::devices::virtio::block::ring_frontend::RingDiskError;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::net::ring_frontend::RingNetError;
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::pci::TransportError;
use crate::kvm::KvmError;
use crate::memory::MemoryError;

/// Errors building or running a machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// Taking or restoring a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A file could not be read.
    #[error("cannot read {what} {path}")]
    ReadFile {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not bootable.
    #[error("kernel image {path}")]
    Kernel {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: loader::LoaderError,
    },
    /// Loading failed for a reason not tied to the kernel file.
    #[error(transparent)]
    Loader(loader::LoaderError),
    /// No vCPUs asked for.
    #[error("at least one vCPU is needed")]
    NoVcpus,
    /// More vCPUs than KVM or our ACPI tables allow.
    #[error(
        "{requested} vCPUs requested, at most {max} possible here \
         (KVM allows {kvm_max}, 8-bit APIC ids allow {MAX_VCPUS_ACPI})"
    )]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Effective limit.
        max: u32,
        /// KVM's own limit on this host.
        kvm_max: u32,
    },
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI table construction failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MSR setup failed.
    #[error(transparent)]
    Msrs(#[from] msrs::MsrError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An ioctl or system call failed.
    #[error("{0} failed")]
    Sys(&'static str, #[source] std::io::Error),
    /// The console log could not be opened.
    #[error("cannot open console log {path}")]
    Console {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// [`Machine::run`] was called twice.
    #[error("this machine has already run")]
    AlreadyRan,
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A TAP device could not be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A virtio-pci device could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Interrupt routing could not be set up.
    #[error(transparent)]
    Msix(#[from] MsixError),
    /// No room for another PCI device.
    #[error("no free PCI slot or MMIO space for {0}")]
    PciFull(String),
    /// A channel device could not be set up.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A ring disk could not be set up.
    #[error(transparent)]
    RingDisk(#[from] RingDiskError),
    /// A ring NIC could not be set up.
    #[error(transparent)]
    RingNet(#[from] RingNetError),
    /// A host PCI function could not be passed through.
    #[error(transparent)]
    Passthrough(#[from] VfioPciError),
    /// All vCPU threads ended without reporting why.
    #[error("all vCPU threads ended without a guest exit")]
    VcpusVanished,
}
