//! Guest RAM: one memfd, mapped into the guest-physical address space around the 32-bit MMIO
//! hole. Backing RAM with a memfd (rather than anonymous memory) lets later components hand the
//! same pages to another process over a Unix socket.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

pub mod aligned;

use aligned::{Mapping, RegionMapping, HUGE};

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
    // Field order matters for drop: our references to the regions go before the mappings.
    memory: GuestMemoryMmap,
    /// The mappings of RAM mapped from a snapshot, one per range (empty for a memfd).
    mappings: Vec<RegionMapping>,
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
            mappings: Vec::new(),
            memfd: Some(memfd),
            snapshot: None,
            ranges,
            size,
        })
    }

    /// Guest RAM mapped copy-on-write (`MAP_PRIVATE`) from a snapshot's memory file, laid out
    /// as the memfd of [`Self::new`]: the file is never written, pages are read on first touch.
    /// Each range is mapped at a 2 MiB-aligned address (see [`Self::prefault`]).
    pub fn from_snapshot(file: &File, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        let mut mappings = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let mapping = Mapping::file_private(file, r.file_offset, r.len as usize)
                .map_err(MemoryError::MapSnapshot)?;
            // SAFETY: `mapping` is a live read-write private mapping of exactly `r.len` bytes;
            // the `RegionMapping` below keeps it mapped for as long as the region exists.
            let builder = unsafe {
                MmapRegionBuilder::new(r.len as usize).with_raw_mmap_pointer(mapping.addr())
            };
            let region = builder
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::MapSnapshot(std::io::Error::other(e)))?;
            let region = Arc::new(
                GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                    .ok_or_else(|| MemoryError::MapSnapshot(std::io::Error::other("region")))?,
            );
            mappings.push(RegionMapping::new(region.clone(), mapping));
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| MemoryError::MapSnapshot(std::io::Error::other(e)))?;
        Ok(GuestRam {
            memory,
            mappings,
            memfd: None,
            snapshot: Some(file.try_clone().map_err(MemoryError::Dup)?),
            ranges,
            size,
        })
    }

    /// For RAM mapped from a snapshot, before the guest runs and before anything writes to
    /// it: replaces the 2 MiB pieces that hold snapshot data with anonymous memory holding
    /// the same bytes, backed by huge pages where the host allows, a run of consecutive pieces
    /// (at most [`PREFAULT_RUN`]) at a time, until done or `stop` says so between runs. A
    /// standby VMM does this while it waits: its guest, once resumed, then takes no host page
    /// fault and no copy per page it touches, and KVM maps each piece with one 2 MiB entry
    /// instead of one fault per 4 KiB page (about 1,200 nested page faults before a restored
    /// driver VM served again; 44 after, measured). Returns the bytes replaced; on an error,
    /// what was not replaced stays mapped from the file.
    pub fn prefault(&self, mut stop: impl FnMut() -> bool) -> Result<u64, MemoryError> {
        let Some(file) = &self.snapshot else {
            return Ok(0);
        };
        let extents = crate::snapshot::memory::data_extents(file, self.size)
            .map_err(MemoryError::Prefault)?;
        let mut done = 0u64;
        for (r, m) in self.ranges.iter().zip(&self.mappings) {
            for (at, len) in runs(&pieces_with_data(r, &extents), r.len, PREFAULT_RUN) {
                if stop() {
                    return Ok(done);
                }
                m.mapping()
                    .replace_with_anonymous(file, r.file_offset + at, at as usize, len as usize)
                    .map_err(MemoryError::Prefault)?;
                done += len;
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

/// The most [`GuestRam::prefault`] replaces in one step: each step is one mapping of the
/// process's (a 64 GiB guest full of data: 8,192, well under the kernel's default limit of
/// 65,530), and a resume waits for the step under way.
const PREFAULT_RUN: u64 = 8 << 20;

/// `pieces` (2 MiB-aligned offsets, in order) joined into runs of consecutive pieces, each at
/// most `max` bytes and none past `end`: `(offset, length)`.
fn runs(pieces: &[u64], end: u64, max: u64) -> Vec<(u64, u64)> {
    let huge = HUGE as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pieces {
        let len = (end - p).min(huge);
        match out.last_mut() {
            Some((at, n)) if *at + *n == p && *n + len <= max => *n += len,
            _ => out.push((p, len)),
        }
    }
    out
}

/// The offsets (within `r`, 2 MiB-aligned) of the 2 MiB pieces of `r` that hold any of the
/// file's data `extents` (offset, length in the file), in order, each once.
fn pieces_with_data(r: &RamRange, extents: &[(u64, u64)]) -> Vec<u64> {
    let huge = HUGE as u64;
    let mut out: Vec<u64> = Vec::new();
    for &(offset, len) in extents {
        let start = offset.max(r.file_offset);
        let end = offset.saturating_add(len).min(r.file_offset + r.len);
        if start >= end {
            continue;
        }
        let mut p = (start - r.file_offset) / huge * huge;
        while p < end - r.file_offset {
            if out.last() != Some(&p) {
                out.push(p);
            }
            p += huge;
        }
    }
    out
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
    use vm_memory::{Bytes, GuestMemoryBackend};

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
        let done = ram.prefault(|| false).expect("prefault");
        // The two 2 MiB pieces that hold data, now anonymous memory at 2 MiB-aligned
        // addresses (a filesystem may allocate in larger blocks: then more pieces).
        assert!((4 << 20..=size).contains(&done), "{done}");
        let host = ram
            .memory()
            .get_host_address(GuestAddress(0))
            .expect("host");
        assert_eq!(host as usize % HUGE, 0);
        let mut b = [0u8; 8192];
        ram.memory()
            .read_slice(&mut b, GuestAddress(1 << 20))
            .expect("r");
        assert_eq!(b, [0x5a; 8192]);
        ram.memory()
            .read_slice(&mut b[..4096], GuestAddress(9 << 20))
            .expect("r");
        assert_eq!(b[..4096], [0xa5; 4096]);
        // Anonymous now: a change to the file no longer shows (a private mapping's pages
        // that were never written would show it).
        file.write_all_at(&[0x77; 4096], 1 << 20).expect("w");
        ram.memory()
            .read_slice(&mut b[..4096], GuestAddress(1 << 20))
            .expect("r");
        assert_eq!(b[..4096], [0x5a; 4096]);
        file.write_all_at(&[0x5a; 4096], 1 << 20).expect("w");
        // Private: the guest's writes never reach the file.
        ram.memory()
            .write_slice(&[1; 4096], GuestAddress(9 << 20))
            .expect("w");
        let mut f = [0u8; 4096];
        file.read_exact_at(&mut f, 9 << 20).expect("r");
        assert_eq!(f, [0xa5; 4096]);
        // A stop request ends it before the first piece; RAM of a fresh VM has nothing to do.
        let again = GuestRam::from_snapshot(&file, size).expect("map");
        assert_eq!(again.prefault(|| true).expect("stopped"), 0);
        let fresh = GuestRam::new(4 << 20).expect("ram");
        assert_eq!(fresh.prefault(|| false).expect("fresh"), 0);
    }

    #[test]
    fn runs_join_consecutive_pieces_up_to_a_bound() {
        let m = 1u64 << 20;
        let pieces = [0, 2 * m, 4 * m, 8 * m, 10 * m, 12 * m, 14 * m, 16 * m];
        assert_eq!(
            runs(&pieces, 17 * m, 6 * m),
            vec![(0, 6 * m), (8 * m, 6 * m), (14 * m, 3 * m)]
        );
        assert!(runs(&[], 4 * m, 8 * m).is_empty());
    }

    #[test]
    fn pieces_cover_each_data_extent_once() {
        let mib = 1u64 << 20;
        let r = RamRange {
            guest_addr: 0,
            file_offset: 0,
            len: 9 * mib,
        };
        // Two extents in piece 0, one across pieces 1 and 2, one past the range's end.
        let ext = [
            (4096, 4096),
            (mib, 4096),
            (3 * mib, 2 * mib),
            (20 * mib, mib),
        ];
        assert_eq!(pieces_with_data(&r, &ext), vec![0, 2 * mib, 4 * mib]);
        // A range further into the file: offsets are relative to it; the last piece is short.
        let hi = RamRange {
            guest_addr: 1 << 32,
            file_offset: 8 * mib,
            len: 3 * mib,
        };
        assert!(pieces_with_data(&hi, &ext).is_empty());
        assert_eq!(pieces_with_data(&hi, &[(10 * mib + 1, 1)]), vec![2 * mib]);
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
