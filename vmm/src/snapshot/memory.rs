//! Guest RAM in a snapshot: written sparse from the RAM memfd, checked by its trailer, mapped
//! back copy-on-write by [`crate::memory::GuestRam::from_snapshot`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::TRAILER_MAGIC;

/// Page size of the sparse copy and of the trailer.
pub const PAGE: u64 = 4096;
/// Bytes read per `pread`.
const CHUNK: u64 = 1 << 20;

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no data at or after `offset`.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a descriptor we own changes only its file offset, which nothing else
    // in this process uses (all other accesses are positioned reads and writes).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// The `(offset, length)` ranges of the first `size` bytes of `file` that hold data (holes,
/// which read as zeros, left out), from `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if hole <= data {
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Copies the `size` bytes of guest RAM in `ram` (a memfd) to `out`, writing only pages that
/// are not all zero (the rest stay holes), then the trailer after them. Returns the bytes of
/// RAM written.
pub fn dump(ram: &File, size: u64, out: &File, id: u64) -> std::io::Result<u64> {
    out.set_len(0)?;
    out.set_len(size + PAGE)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    // Only the memfd's allocated ranges can hold anything but zeros.
    for (data, len) in data_extents(ram, size)? {
        let mut at = data;
        while at < data + len {
            let n = (data + len - at).min(CHUNK) as usize;
            ram.read_exact_at(&mut buf[..n], at)?;
            written += write_nonzero_runs(&buf[..n], at, out)?;
            at += n as u64;
        }
    }
    let mut trailer = TRAILER_MAGIC.to_vec();
    trailer.extend_from_slice(&id.to_le_bytes());
    out.write_all_at(&trailer, size)?;
    Ok(written)
}

/// Writes the runs of non-zero pages of `chunk` (which sits at `base` in the file).
fn write_nonzero_runs(chunk: &[u8], base: u64, out: &File) -> std::io::Result<u64> {
    let page = PAGE as usize;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let pages = chunk.len().div_ceil(page);
    for i in 0..=pages {
        let nonzero = i < pages
            && chunk[i * page..((i + 1) * page).min(chunk.len())]
                .iter()
                .any(|b| *b != 0);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i * page),
            (false, Some(start)) => {
                let end = (i * page).min(chunk.len());
                out.write_all_at(&chunk[start..end], base + start as u64)?;
                written += (end - start) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Checks that `memory` holds `size` bytes of RAM and the trailer with `id`.
pub fn check_trailer(memory: &File, size: u64, id: u64) -> Result<(), String> {
    let len = memory
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if len != size + PAGE {
        return Err(format!(
            "{len} bytes, expected {} ({size} of RAM and a trailer page)",
            size + PAGE
        ));
    }
    let trailer = super::read_at(memory, size, 16).map_err(|e| format!("trailer: {e}"))?;
    if &trailer[..8] != TRAILER_MAGIC || trailer[8..16] != id.to_le_bytes() {
        return Err("its trailer does not match the state file (from another snapshot?)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_is_sparse_and_exact() {
        let ram = tempfile::tempfile().expect("ram");
        let size = 64 * PAGE;
        ram.set_len(size).expect("size");
        ram.write_all_at(b"first", 5).expect("w");
        ram.write_all_at(&[7u8; 4096], 10 * PAGE).expect("w");
        ram.write_all_at(&[9u8; 3], 63 * PAGE + 4093).expect("w");
        let out = tempfile::tempfile().expect("out");
        let written = dump(&ram, size, &out, 42).expect("dump");
        assert_eq!(written, 3 * PAGE);
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        ram.read_exact_at(&mut a, 0).expect("r");
        out.read_exact_at(&mut b, 0).expect("r");
        assert!(a == b, "RAM and its copy differ");
        check_trailer(&out, size, 42).expect("trailer");
        assert!(check_trailer(&out, size, 43).is_err());
        assert!(check_trailer(&out, size - PAGE, 42).is_err());
    }
}
