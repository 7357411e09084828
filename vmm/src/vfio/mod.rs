//! VFIO: giving a VM a real PCI function of the host.
//!
//! - [`host`] checks the function in sysfs (exists, IOMMU, group, bound to `vfio-pci`).
//! - [`container`] opens the group into a type-1 IOMMU container and maps guest RAM for DMA.
//! - [`device`] is the function's VFIO file: regions (config space, BARs), interrupts, reset.
//!
//! The PCI device model the guest sees is `devices::vfio_pci`.

pub mod container;
pub mod device;
pub mod host;

use std::path::PathBuf;

use thiserror::Error;

pub use host::PciAddress;

/// The ioctls (all `_IO(';', 100 + n)`; arguments are described by `vfio-bindings`).
mod ioctls {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    use vmm_sys_util::ioctl_io_nr;

    const T: u32 = VFIO_TYPE as u32;
    ioctl_io_nr!(VFIO_GET_API_VERSION, T, VFIO_BASE);
    ioctl_io_nr!(VFIO_CHECK_EXTENSION, T, VFIO_BASE + 1);
    ioctl_io_nr!(VFIO_SET_IOMMU, T, VFIO_BASE + 2);
    ioctl_io_nr!(VFIO_GROUP_GET_STATUS, T, VFIO_BASE + 3);
    ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, T, VFIO_BASE + 4);
    ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, T, VFIO_BASE + 6);
    ioctl_io_nr!(VFIO_DEVICE_GET_INFO, T, VFIO_BASE + 7);
    ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, T, VFIO_BASE + 8);
    ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, T, VFIO_BASE + 9);
    ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, T, VFIO_BASE + 10);
    ioctl_io_nr!(VFIO_DEVICE_RESET, T, VFIO_BASE + 11);
    ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, T, VFIO_BASE + 13);
    ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, T, VFIO_BASE + 14);
}

/// Errors giving a PCI function to a VM.
#[derive(Debug, Error)]
pub enum VfioError {
    /// Not a PCI address.
    #[error("invalid PCI address {0:?} (expected DDDD:BB:DD.F, hex)")]
    BadAddress(String),
    /// No such function.
    #[error("PCI device {0} not found on this host")]
    NoSuchDevice(PciAddress),
    /// The function has no IOMMU group: no IOMMU, or it is disabled.
    #[error(
        "no IOMMU for PCI device {0}: it has no IOMMU group (boot the host with the IOMMU on, \
         e.g. intel_iommu=on or amd_iommu=on)"
    )]
    NoIommu(PciAddress),
    /// Bound to a host driver.
    #[error(
        "PCI device {address} is bound to {driver}, not vfio-pci \
         (unbind it and bind it to vfio-pci first)"
    )]
    NotBound {
        /// The function.
        address: PciAddress,
        /// Its driver ("no driver" if none).
        driver: String,
    },
    /// Other members of the group are in use.
    #[error("IOMMU group {group} of {address} also holds devices in use by the host: {others}")]
    GroupNotViable {
        /// Group number.
        group: u32,
        /// The function asked for.
        address: PciAddress,
        /// The others, with their drivers.
        others: String,
    },
    /// The group is open elsewhere (another VMM).
    #[error("IOMMU group {group} ({path}) is already in use by another process")]
    GroupBusy {
        /// Group number.
        group: u32,
        /// Its device node.
        path: PathBuf,
    },
    /// A VFIO device node could not be opened.
    #[error("cannot open {path} (is the vfio-pci module loaded?)")]
    Open {
        /// The node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's VFIO lacks what we need.
    #[error("host VFIO unsupported: {0}")]
    Unsupported(&'static str),
    /// A VFIO ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing a device region failed.
    #[error("{op} of {len} bytes at {offset:#x} in VFIO region {region} failed")]
    Region {
        /// "read" or "write".
        op: &'static str,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Length.
        len: usize,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// mmap of a BAR failed.
    #[error("cannot map BAR {bar} of the device")]
    Mmap {
        /// BAR.
        bar: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn ioctl_result(what: &'static str, ret: i32) -> Result<i32, VfioError> {
    if ret < 0 {
        Err(VfioError::Ioctl {
            what,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}
