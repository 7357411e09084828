//! A VFIO container with one group: the IOMMU domain the device's DMA goes through. Guest RAM
//! is mapped at IOVA = guest-physical address, so the guest's driver programs the device with
//! the addresses it knows and the IOMMU confines the device to that VM's RAM.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use vfio_bindings::bindings::vfio::{
    vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_TYPE1v2_IOMMU,
    VFIO_API_VERSION, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_VIABLE,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

use super::host::HostDevice;
use super::ioctls::*;
use super::{ioctl_result, VfioError};

/// One mapped range of guest RAM.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    iova: u64,
    size: u64,
}

/// The container, its group, and the DMA mappings made through it. Dropping it unmaps and
/// closes both, which also makes the kernel reset the device (vfio-pci does on last close).
pub struct Container {
    // Group before container: the group detaches from the container when it closes.
    group: File,
    container: File,
    mappings: Vec<Mapping>,
}

fn open_rw(path: &str) -> Result<File, std::io::Error> {
    OpenOptions::new().read(true).write(true).open(path)
}

impl Container {
    /// Opens the device's group into a new type-1 IOMMU container.
    pub fn open(dev: &HostDevice) -> Result<Self, VfioError> {
        let container = open_rw("/dev/vfio/vfio").map_err(|source| VfioError::Open {
            path: PathBuf::from("/dev/vfio/vfio"),
            source,
        })?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a number.
        let version = unsafe { ioctl(&container, VFIO_GET_API_VERSION()) };
        if version != VFIO_API_VERSION as i32 {
            return Err(VfioError::Unsupported("unknown VFIO API version"));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer by value and returns a number.
        let has_v2 = unsafe {
            ioctl_with_val(
                &container,
                VFIO_CHECK_EXTENSION(),
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        };
        if has_v2 != 1 {
            return Err(VfioError::Unsupported("no type-1 v2 IOMMU"));
        }

        let path = PathBuf::from(format!("/dev/vfio/{}", dev.group));
        let group = open_rw(&path.to_string_lossy()).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                VfioError::GroupBusy {
                    group: dev.group,
                    path: path.clone(),
                }
            } else {
                VfioError::Open {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `status`, which we own.
        let ret = unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) };
        ioctl_result("VFIO_GROUP_GET_STATUS", ret)?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable {
                group: dev.group,
                address: dev.address,
                others: "the kernel reports the group not viable".to_string(),
            });
        }
        let container_fd: i32 = container.as_raw_fd();
        // SAFETY: the argument is a pointer to an int holding an open container fd.
        let ret = unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &container_fd) };
        ioctl_result("VFIO_GROUP_SET_CONTAINER", ret)?;
        // SAFETY: VFIO_SET_IOMMU takes an integer by value.
        let ret = unsafe {
            ioctl_with_val(
                &container,
                VFIO_SET_IOMMU(),
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        };
        ioctl_result("VFIO_SET_IOMMU", ret)?;
        Ok(Container {
            group,
            container,
            mappings: Vec::new(),
        })
    }

    /// The group file (for KVM's VFIO device).
    pub fn group_file(&self) -> &File {
        &self.group
    }

    /// The device file of `dev` (its name in the group is its PCI address).
    pub fn device_file(&self, dev: &HostDevice) -> Result<File, VfioError> {
        let name = CString::new(dev.address.to_string())
            .map_err(|_| VfioError::BadAddress(dev.address.to_string()))?;
        // SAFETY: the argument is a NUL-terminated string that lives across the call.
        let fd = unsafe { ioctl_with_ptr(&self.group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        let fd = ioctl_result("VFIO_GROUP_GET_DEVICE_FD", fd)?;
        // SAFETY: on success the ioctl returned a new file descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Maps `size` bytes of this process's memory at `host` for device DMA at `iova`.
    ///
    /// # Safety
    ///
    /// `host..host + size` must stay mapped (and not be remapped) for as long as this container
    /// lives: the IOMMU pins those pages and the device may read or write them at any time.
    pub unsafe fn map_dma(&mut self, iova: u64, host: u64, size: u64) -> Result<(), VfioError> {
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: host,
            iova,
            size,
        };
        // SAFETY: `map` is a valid argument structure; the memory it names is the caller's
        // responsibility (see the function's contract).
        let ret = unsafe { ioctl_with_ref(&self.container, VFIO_IOMMU_MAP_DMA(), &map) };
        ioctl_result("VFIO_IOMMU_MAP_DMA", ret)?;
        self.mappings.push(Mapping { iova, size });
        Ok(())
    }

    fn unmap_all(&mut self) {
        for m in self.mappings.drain(..) {
            let unmap = vfio_iommu_type1_dma_unmap {
                argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
                flags: 0,
                iova: m.iova,
                size: m.size,
                data: Default::default(),
            };
            // SAFETY: `unmap` is a valid argument structure of `argsz` bytes.
            let ret = unsafe { ioctl_with_ref(&self.container, VFIO_IOMMU_UNMAP_DMA(), &unmap) };
            if ret < 0 {
                tracing::warn!(
                    iova = format_args!("{:#x}", m.iova),
                    error = %std::io::Error::last_os_error(),
                    "VFIO_IOMMU_UNMAP_DMA failed"
                );
            }
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.unmap_all();
    }
}
