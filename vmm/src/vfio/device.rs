//! A VFIO device file: its regions (BARs and configuration space at fixed file offsets), its
//! interrupt indexes, and reset.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_region_info, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr};

use super::ioctls::*;
use super::{ioctl_result, VfioError};

/// Region index of the configuration space.
pub const CONFIG_REGION: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

/// Where one region sits in the device file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    /// Size in bytes (0: the region does not exist, e.g. an unimplemented BAR).
    pub size: u64,
    /// Offset of the region in the device file.
    pub offset: u64,
    /// Whether the region may be mapped with mmap.
    pub mmap: bool,
}

/// An open VFIO PCI device.
pub struct VfioDevice {
    file: File,
    regions: Vec<Region>,
    msix_count: u32,
    can_reset: bool,
}

impl VfioDevice {
    /// Queries a device file the group handed out.
    pub fn new(file: File) -> Result<Self, VfioError> {
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `info`, which we own.
        let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO(), &mut info) };
        ioctl_result("VFIO_DEVICE_GET_INFO", ret)?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioError::Unsupported("not a PCI device"));
        }
        if info.num_regions <= CONFIG_REGION {
            return Err(VfioError::Unsupported("device has no configuration region"));
        }
        let mut regions = Vec::new();
        for index in 0..=CONFIG_REGION {
            let mut r = vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: as above; the kernel fills at most `argsz` bytes of `r`.
            let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_REGION_INFO(), &mut r) };
            ioctl_result("VFIO_DEVICE_GET_REGION_INFO", ret)?;
            regions.push(Region {
                size: r.size,
                offset: r.offset,
                mmap: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            });
        }
        let mut irq = vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            ..Default::default()
        };
        let msix_count = if info.num_irqs > VFIO_PCI_MSIX_IRQ_INDEX {
            // SAFETY: as above.
            let ret = unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_IRQ_INFO(), &mut irq) };
            ioctl_result("VFIO_DEVICE_GET_IRQ_INFO", ret)?;
            irq.count
        } else {
            0
        };
        Ok(VfioDevice {
            file,
            regions,
            msix_count,
            can_reset: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
        })
    }

    /// Region `index` (BAR 0..=5, ROM 6, config 7).
    pub fn region(&self, index: u32) -> Region {
        self.regions
            .get(index as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Number of MSI-X vectors the host allows.
    pub fn msix_count(&self) -> u32 {
        self.msix_count
    }

    /// Resets the function (FLR or whatever the kernel found). False if it offers no reset.
    pub fn reset(&self) -> Result<bool, VfioError> {
        if !self.can_reset {
            return Ok(false);
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&self.file, VFIO_DEVICE_RESET()) };
        ioctl_result("VFIO_DEVICE_RESET", ret)?;
        Ok(true)
    }

    /// Reads `data.len()` bytes at `offset` of region `index`. Accesses past the region's end
    /// are refused (error), never passed on.
    pub fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError> {
        let len = data.len();
        self.access("read", index, offset, len, |at| self.file.read_at(data, at))
    }

    /// Writes `data` at `offset` of region `index` (bounds-checked like [`Self::read`]).
    pub fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        self.access("write", index, offset, data.len(), |at| {
            self.file.write_at(data, at)
        })
    }

    /// One bounds-checked, whole (never partial) access of `len` bytes at `offset` of region
    /// `index`; `io` does it at a file offset.
    fn access(
        &self,
        op: &'static str,
        index: u32,
        offset: u64,
        len: usize,
        io: impl FnOnce(u64) -> std::io::Result<usize>,
    ) -> Result<(), VfioError> {
        let r = self.region(index);
        let err = |source| VfioError::Region {
            op,
            region: index,
            offset,
            len,
            source,
        };
        if offset.saturating_add(len as u64) > r.size {
            return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        match io(r.offset + offset) {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))),
            Err(e) => Err(err(e)),
        }
    }

    /// Maps `len` bytes at `offset` of BAR `index` into this process (shared, read-write).
    pub fn mmap(&self, index: u32, offset: u64, len: u64) -> Result<BarMapping, VfioError> {
        let r = self.region(index);
        let err = |source| VfioError::Mmap { bar: index, source };
        if !r.mmap || offset.saturating_add(len) > r.size || len == 0 {
            return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let size = usize::try_from(len)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let file_offset = libc::off_t::try_from(r.offset + offset)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address), of a device
        // file we keep open; nothing else refers to the returned range until we hand it out.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(BarMapping {
            ptr: ptr as usize,
            len: size,
        })
    }

    /// Connects MSI-X vectors `0..fds.len()` to `fds` (enabling MSI-X on the device), or
    /// disables MSI-X when `fds` is empty.
    pub fn set_msix(&self, fds: &[&EventFd]) -> Result<(), VfioError> {
        let header = std::mem::size_of::<vfio_irq_set>();
        let payload = fds.len() * std::mem::size_of::<i32>();
        // u32 storage keeps the header aligned; the eventfds follow it as i32s.
        let mut buf = vec![0u32; (header + payload).div_ceil(4)];
        let set = vfio_irq_set {
            argsz: (header + payload) as u32,
            flags: if fds.is_empty() {
                VFIO_IRQ_SET_DATA_NONE
            } else {
                VFIO_IRQ_SET_DATA_EVENTFD
            } | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: fds.len() as u32,
            data: Default::default(),
        };
        // SAFETY: `buf` holds at least `header` bytes and is 4-byte aligned, as
        // `vfio_irq_set` (all u32 fields) requires.
        unsafe { std::ptr::write(buf.as_mut_ptr().cast::<vfio_irq_set>(), set) };
        for (i, fd) in fds.iter().enumerate() {
            buf[header / 4 + i] = fd.as_raw_fd() as u32;
        }
        // SAFETY: the argument is `argsz` bytes of valid vfio_irq_set plus eventfds.
        let ret = unsafe { ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        ioctl_result("VFIO_DEVICE_SET_IRQS (MSI-X)", ret)?;
        Ok(())
    }
}

/// A BAR range mapped into this process; unmapped on drop.
pub struct BarMapping {
    ptr: usize,
    len: usize,
}

impl BarMapping {
    /// Host address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    /// Length.
    pub fn len(&self) -> u64 {
        self.len as u64
    }
    /// Whether empty (never: mappings have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: the range came from our own mmap and is unmapped exactly once, here; a KVM
        // slot that pointed at it was deleted first (`kvm::slots::MemorySlots` drops it so).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
