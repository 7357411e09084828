//! Guest RAM: one memfd, mapped into the guest-physical address space around the 32-bit MMIO
//! hole. Backing RAM with a memfd (rather than anonymous memory) lets later components hand the
//! same pages to another process over a Unix socket.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

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
    /// The snapshot's memory file cannot be mapped.
    #[error("cannot map guest RAM from the snapshot")]
    MapSnapshot(#[source] std::io::Error),
    /// Size is zero or not page aligned.
    #[error("guest RAM size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// Faulting in guest RAM from the snapshot failed.
    #[error("cannot fault in guest RAM from the snapshot")]
    Prefault(#[source] std::io::Error),
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
    /// The snapshot memory file RAM is mapped from (copy-on-write), if it is.
    snapshot: Option<File>,
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
            snapshot: None,
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
            snapshot: Some(file.try_clone().map_err(MemoryError::Dup)?),
            ranges,
            size,
        })
    }

    /// For RAM mapped from a snapshot: faults in, writable (each page copied from the file
    /// now), every page the snapshot holds data in, `piece` bytes at a time, until done or
    /// `stop` says so between pieces; the contents do not change. A standby VMM does this while
    /// it waits, so that its guest, once resumed, does not take a host page fault and a copy
    /// for each page it touches first. Returns the bytes faulted in.
    pub fn prefault(&self, piece: u64, mut stop: impl FnMut() -> bool) -> Result<u64, MemoryError> {
        let Some(file) = &self.snapshot else {
            return Ok(0);
        };
        let extents = crate::snapshot::memory::data_extents(file, self.size)
            .map_err(MemoryError::Prefault)?;
        let mut done = 0u64;
        for (offset, len) in extents {
            for r in &self.ranges {
                let start = offset.max(r.file_offset);
                let end = (offset + len).min(r.file_offset + r.len);
                let mut at = start;
                while at < end {
                    if stop() {
                        return Ok(done);
                    }
                    let n = (end - at).min(piece.max(4096));
                    let guest = GuestAddress(r.guest_addr + (at - r.file_offset));
                    let host = self
                        .memory
                        .get_host_address(guest)
                        .map_err(|e| MemoryError::Prefault(std::io::Error::other(e)))?;
                    // SAFETY: `host..host + n` lies inside the mapping of this RAM range
                    // (`at..at + n` is inside the range's part of the file, and the range is
                    // mapped whole), which `self.memory` keeps mapped. MADV_POPULATE_WRITE
                    // only faults the pages in; it does not change their contents.
                    let rc = unsafe {
                        libc::madvise(host.cast(), n as usize, libc::MADV_POPULATE_WRITE)
                    };
                    if rc != 0 {
                        return Err(MemoryError::Prefault(std::io::Error::last_os_error()));
                    }
                    done += n;
                    at += n;
                }
            }
        }
        Ok(done)
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
    fn prefault_touches_the_snapshot_data_and_changes_nothing() {
        use std::os::unix::fs::FileExt;
        let file = tempfile::tempfile().expect("tmp");
        let size = 16u64 << 20;
        file.set_len(size).expect("len");
        // Data in two places, the rest holes.
        file.write_all_at(&[0x5a; 8192], 1 << 20).expect("w");
        file.write_all_at(&[0xa5; 4096], 9 << 20).expect("w");
        let ram = GuestRam::from_snapshot(&file, size).expect("map");
        let done = ram.prefault(4096, || false).expect("prefault");
        // At least the pages written (a filesystem may allocate in larger blocks).
        assert!((12288..=size).contains(&done), "{done}");
        let mut b = [0u8; 8192];
        ram.memory()
            .read_slice(&mut b, GuestAddress(1 << 20))
            .expect("r");
        assert_eq!(b, [0x5a; 8192]);
        ram.memory()
            .read_slice(&mut b[..4096], GuestAddress(9 << 20))
            .expect("r");
        assert_eq!(b[..4096], [0xa5; 4096]);
        // Private: the guest's writes never reach the file.
        ram.memory()
            .write_slice(&[1; 4096], GuestAddress(9 << 20))
            .expect("w");
        let mut f = [0u8; 4096];
        file.read_exact_at(&mut f, 9 << 20).expect("r");
        assert_eq!(f, [0xa5; 4096]);
        // A stop request ends it before the first piece; RAM of a fresh VM has nothing to do.
        assert_eq!(ram.prefault(4096, || true).expect("stopped"), 0);
        let fresh = GuestRam::new(4 << 20).expect("ram");
        assert_eq!(fresh.prefault(4096, || false).expect("fresh"), 0);
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
