//! Mappings placed at 2 MiB-aligned addresses, so that KVM can map guest RAM with 2 MiB pages
//! wherever the host backs it with a transparent huge page (KVM needs the host address and the
//! guest address to agree modulo 2 MiB).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::null_mut;
use std::sync::Arc;

use vm_memory::GuestRegionMmap;

/// A huge page.
pub const HUGE: usize = 2 << 20;

/// A mapping this process made and unmaps on drop. Holds the address as an integer: the
/// memory is only reached through the `vm-memory` region built over it.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// The start address.
    pub fn addr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// `len` bytes of address space at a 2 MiB-aligned address, reserved (no access, no
    /// memory) until something is mapped over it.
    fn reserve(len: usize) -> std::io::Result<Mapping> {
        let span = len
            .checked_add(HUGE)
            .ok_or_else(|| std::io::Error::other("mapping size overflows"))?;
        // SAFETY: a new anonymous mapping at an address the kernel chooses; it overlaps
        // nothing this process uses.
        let base = unsafe {
            libc::mmap(
                null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE);
        let head = start - base;
        let tail = span - head - len;
        // SAFETY: both pieces lie inside the reservation just made, outside `start..start +
        // len`; nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        Ok(Mapping { addr: start, len })
    }

    /// `len` bytes of `file` from `offset`, private (copy-on-write), at a 2 MiB-aligned
    /// address.
    pub fn file_private(file: &File, offset: u64, len: usize) -> std::io::Result<Mapping> {
        let m = Mapping::reserve(len)?;
        m.map_file_at(0, len, file, offset)?;
        Ok(m)
    }

    /// Maps `len` bytes of `file` from `offset`, private, read-write, over `at..at + len` of
    /// this mapping (whatever was there is replaced).
    fn map_file_at(&self, at: usize, len: usize, file: &File, offset: u64) -> std::io::Result<()> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other("range outside the mapping"));
        }
        let offset =
            libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("offset too large"))?;
        // SAFETY: MAP_FIXED over `at..at + len` of the mapping this object owns (checked
        // above), and nothing else; the region built over it sees the file's pages there.
        let p = unsafe {
            libc::mmap(
                (self.addr + at) as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Anonymous read-write memory at a 2 MiB-aligned address, asking for huge pages.
    pub fn anonymous(len: usize) -> std::io::Result<Mapping> {
        let m = Mapping::reserve(len)?;
        // SAFETY: MAP_FIXED over the reservation `m` owns (and nothing else), replacing it.
        let p = unsafe {
            libc::mmap(
                m.addr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Advice only (the host may have huge pages off): failure changes nothing.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(m.addr().cast(), len, libc::MADV_HUGEPAGE) };
        Ok(m)
    }

    /// For a private mapping of `file` (as [`Self::file_private`] makes; `self.addr() + at`
    /// shows the file at `offset`): replaces `len` bytes at `at` with anonymous memory (huge
    /// pages where the host allows) holding the same bytes, read from the file now. One step
    /// for a reader of `self`: it sees the old pages or the new ones. If the final move fails
    /// the piece is mapped from the file again, as before; if even that fails, the process
    /// aborts rather than leave a hole in guest RAM.
    pub fn replace_with_anonymous(
        &self,
        file: &File,
        offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other("piece outside the mapping"));
        }
        let piece = Mapping::anonymous(len)?;
        let mut done = 0usize;
        while done < len {
            let off = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| std::io::Error::other("offset too large"))?;
            // SAFETY: `piece.addr + done .. piece.addr + len` is inside `piece`'s read-write
            // mapping, which nothing else refers to.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    (piece.addr + done) as *mut libc::c_void,
                    len - done,
                    off,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                // Past the end of the file: the rest stays zero.
                0 => break,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        let dest = self.addr + at;
        // SAFETY: moves `piece`'s pages to `dest .. dest + len`, inside `self`'s mapping
        // (checked above); MREMAP_FIXED replaces what was there. On success the kernel has
        // unmapped `piece`'s range, so `piece` must not unmap it again.
        let p = unsafe {
            libc::mremap(
                piece.addr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dest,
            )
        };
        if p != libc::MAP_FAILED {
            std::mem::forget(piece);
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // The kernel may have unmapped the destination before failing: map the file there
        // again (its pages were never written: the guest has not run).
        if let Err(again) = self.map_file_at(at, len, file, offset) {
            tracing::error!(error = %e, again = %again, "guest RAM: a piece is unmapped and cannot be mapped again");
            std::process::abort();
        }
        Err(e)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by this object and is unmapped once, here; the regions
        // built over it are dropped first (their owners order their fields so).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A `vm-memory` region built over a [`Mapping`] (which the region does not own), and the
/// mapping. Guest memory is cloned freely (devices, threads, tests keep clones), so the
/// mapping is unmapped only if nothing but this object refers to the region any more when it
/// drops (its owner drops its own reference first); otherwise it stays mapped, for the rest
/// of the process, rather than be pulled from under a clone.
pub struct RegionMapping {
    region: Arc<GuestRegionMmap>,
    mapping: Option<Mapping>,
}

impl RegionMapping {
    /// `region`, built over `mapping`.
    pub fn new(region: Arc<GuestRegionMmap>, mapping: Mapping) -> Self {
        RegionMapping {
            region,
            mapping: Some(mapping),
        }
    }

    /// The mapping.
    pub fn mapping(&self) -> &Mapping {
        // Only `drop` takes it.
        self.mapping.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        let Some(mapping) = self.mapping.take() else {
            return;
        };
        // A count of one is this object's reference alone: nothing else can clone it now.
        if Arc::strong_count(&self.region) > 1 {
            tracing::debug!(
                bytes = mapping.len,
                "guest memory still referenced: left mapped"
            );
            std::mem::forget(mapping);
        }
    }
}
