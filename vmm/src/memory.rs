//! Guest RAM: one memfd, mapped into the guest-physical address space around the 32-bit MMIO
//! hole. Backing RAM with a memfd (rather than anonymous memory) lets later components hand the
//! same pages to another process over a Unix socket.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create memfd for guest RAM")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size guest RAM memfd to {size} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Duplicating the memfd failed.
    #[error("cannot duplicate guest RAM memfd")]
    Dup(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Size is zero or not page aligned.
    /// The snapshot's memory file cannot be mapped.
    #[error("cannot map guest RAM from the snapshot")]
    MapSnapshot(#[source] std::io::Error),
    #[error("guest RAM size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
}

/// One contiguous piece of guest RAM: where it sits in the guest and where in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Offset into the backing memfd.
    pub file_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Splits `size` bytes of RAM around the 32-bit MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        file_offset: 0,
        len: low,
    }];
    if size > low {
        ranges.push(RamRange {
            guest_addr: MMIO_HOLE_END,
            file_offset: low,
            len: size - low,
        });
    }
    ranges
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    memfd: Option<File>,
    ranges: Vec<RamRange>,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of memfd-backed guest RAM, laid out by [`ram_ranges`].
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let memfd = create_memfd(c"ddvmm-guest-ram")?;
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let file = memfd.try_clone().map_err(MemoryError::Dup)?;
            regions.push((
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(FileOffset::new(file, r.file_offset)),
            ));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory,
            memfd: Some(memfd),
            ranges,
            size,
        })
    }

    /// Guest RAM mapped copy-on-write (`MAP_PRIVATE`) from a snapshot's memory file, laid out
    /// as the memfd of [`Self::new`]: the file is never written, pages are read on first touch.
    pub fn from_snapshot(file: &File, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let file = file.try_clone().map_err(MemoryError::Dup)?;
            let region = MmapRegionBuilder::new(r.len as usize)
                .with_file_offset(FileOffset::new(file, r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::MapSnapshot(std::io::Error::other(e)))?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                    .ok_or_else(|| MemoryError::MapSnapshot(std::io::Error::other("region")))?,
            );
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::MapSnapshot(std::io::Error::other(e)))?;
        Ok(GuestRam {
            memory,
            memfd: None,
            ranges,
            size,
        })
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd that backs all of guest RAM (`None` for RAM mapped from a snapshot).
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// The guest-physical ranges of RAM.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of RAM below the 32-bit hole.
    pub fn low_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }
}

/// Creates a close-on-exec memfd with the given debug name.
pub fn create_memfd(name: &CStr) -> Result<File, MemoryError> {
    // Sealing allowed: the daemon seals channel memory against resizing.
    // SAFETY: `name` is a valid NUL-terminated string; the call has no memory side effects.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                guest_addr: 0,
                file_offset: 0,
                len: 256 << 20
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, 1 << 32);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }

    #[test]
    fn memory_is_backed_by_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(2 << 20).expect("ram");
        ram.memory()
            .write_slice(b"ddvmm", GuestAddress(0x1234))
            .expect("write");
        let mut buf = [0u8; 5];
        ram.memfd()
            .expect("memfd")
            .read_exact_at(&mut buf, 0x1234)
            .expect("read");
        assert_eq!(&buf, b"ddvmm");
    }

    #[test]
    fn rejects_unaligned_size() {
        assert!(matches!(GuestRam::new(4097), Err(MemoryError::BadSize(_))));
        assert!(matches!(GuestRam::new(0), Err(MemoryError::BadSize(_))));
    }
}
