//! virtio-blk requests (virtio 1.x, 5.2.6): parsing a descriptor chain into a request, and
//! executing it against a [`Disk`]. Everything here treats the chain as hostile: directions,
//! lengths and addresses are checked, and a request that cannot be trusted fails with a status
//! instead of touching anything.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::devices::virtio::ring::rate_limit::{RateLimit, RateLimiter};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Request header size.
pub const HEADER_SIZE: u32 = 16;
/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard sectors.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes to sectors.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Size of one discard/write-zeroes segment.
pub const SEGMENT_SIZE: u64 = 16;
/// Most segments accepted per discard/write-zeroes request.
pub const MAX_SEGMENTS: u32 = 32;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the device id string.
pub const ID_BYTES: usize = 20;
/// Largest bounce buffer used per copy.
const CHUNK: usize = 1 << 20;

/// Why a chain is not a request we can even answer (no status byte to write).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain has no descriptors.
    #[error("empty descriptor chain")]
    Empty,
    /// The first descriptor is not a readable header of at least 16 bytes.
    #[error("bad request header descriptor (len {len}, write-only {write_only})")]
    BadHeader {
        /// Its length.
        len: u32,
        /// Whether it was device-writable.
        write_only: bool,
    },
    /// The header cannot be read from guest memory.
    #[error("request header at {0:#x} is outside guest memory")]
    HeaderOutOfRange(u64),
    /// The last descriptor is not a writable status byte.
    #[error("no writable status descriptor at the end of the chain")]
    NoStatus,
    /// The status byte is outside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfRange(u64),
    /// More descriptors than the device's advertised `seg_max` allows.
    #[error("more than {0} descriptors in one chain")]
    TooLong(usize),
}

/// The descriptors of `chain`, refusing more than `max` (the device's `seg_max` plus header and
/// status): a guest cannot make the device hold more than that per request.
pub fn take_chain(
    chain: impl Iterator<Item = Descriptor>,
    max: usize,
) -> Result<Vec<Descriptor>, ChainError> {
    let descs: Vec<Descriptor> = chain.take(max.saturating_add(1)).collect();
    if descs.len() > max {
        return Err(ChainError::TooLong(max));
    }
    Ok(descs)
}

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate ranges (data buffers hold segments).
    Discard,
    /// Zero ranges (data buffers hold segments).
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data buffers: (guest address, length, device-writable).
    pub data: Vec<(GuestAddress, u32, bool)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Parses the descriptors of one chain.
    pub fn parse(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Self, ChainError> {
        let (first, rest) = descs.split_first().ok_or(ChainError::Empty)?;
        if first.is_write_only() || first.len() < HEADER_SIZE {
            return Err(ChainError::BadHeader {
                len: first.len(),
                write_only: first.is_write_only(),
            });
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        mem.read_slice(&mut header, first.addr())
            .map_err(|_| ChainError::HeaderOutOfRange(first.addr().0))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let (last, middle) = rest.split_last().ok_or(ChainError::NoStatus)?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(ChainError::NoStatus);
        }
        // The status is the last byte of the last descriptor; anything before it is data.
        let status = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or(ChainError::StatusOutOfRange(last.addr().0))?;
        if !mem.check_range(status, 1) {
            return Err(ChainError::StatusOutOfRange(status.0));
        }
        let mut data: Vec<(GuestAddress, u32, bool)> = middle
            .iter()
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        if last.len() > 1 {
            data.push((last.addr(), last.len() - 1, true));
        }
        let kind = match kind {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        };
        Ok(Request {
            kind,
            sector,
            data,
            status,
        })
    }

    /// Total length of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, len, _)| u64::from(*len)).sum()
    }
}

/// A backing file or block device.
pub struct Disk {
    file: File,
    read_only: bool,
    size: u64,
    id: [u8; ID_BYTES],
    /// Requests and bytes per second, if limited (the I/O threads wait for their turn).
    limiter: Option<std::sync::Mutex<RateLimiter>>,
    /// The device is stopping: requests still queued go at once (a reset or a stop never
    /// waits for the limit).
    draining: std::sync::atomic::AtomicBool,
}

impl Disk {
    /// Wraps an open file of `size` bytes.
    pub fn new(file: File, size: u64, read_only: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk {
            file,
            read_only,
            size,
            id: id_bytes,
            limiter: None,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same disk, limited to `limit` (a slower device: requests wait, none fail).
    pub fn with_limit(mut self, limit: RateLimit) -> Self {
        self.limiter =
            RateLimiter::new(limit, std::time::Instant::now()).map(std::sync::Mutex::new);
        self
    }

    /// Waits until the limit allows `request` (at once if unlimited or draining).
    pub fn throttle(&self, request: &Request) {
        use std::sync::atomic::Ordering;
        /// Longest sleep between looks at the draining flag.
        const SLICE: std::time::Duration = std::time::Duration::from_millis(20);
        let Some(limiter) = &self.limiter else { return };
        let bytes = request.data_len();
        while !self.draining.load(Ordering::Acquire) {
            let taken = limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(std::time::Instant::now(), bytes);
            match taken {
                Ok(()) => return,
                Err(wait) => std::thread::sleep(wait.min(SLICE)),
            }
        }
    }

    /// Marks the device stopping (queued requests skip the limit) or running again.
    pub fn set_draining(&self, on: bool) {
        self.draining
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Frees `len` bytes at `offset` (reads return zeroes afterwards). `keep_allocated` zeroes
    /// in place instead of unmapping. Falls back to writing zeroes where the file system cannot
    /// punch holes.
    pub fn deallocate(&self, offset: u64, len: u64, keep_allocated: bool) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mode = if keep_allocated {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only takes integers and a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            return Ok(());
        }
        // Block devices and some file systems lack these modes: write zeroes instead.
        let zeroes = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes completed writes durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Result of executing a request: the status byte and how many bytes were written into
/// device-writable buffers (for the used ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// virtio-blk status.
    pub status: u8,
    /// Bytes written to the driver's buffers, status byte included.
    pub written: u32,
}

fn io_status(result: Result<u32, u8>) -> Completion {
    match result {
        Ok(written) => Completion {
            status: VIRTIO_BLK_S_OK,
            written: written.saturating_add(1),
        },
        Err(status) => Completion { status, written: 1 },
    }
}

/// Executes `req` and writes its status byte. Returns what to put in the used ring.
pub fn execute(req: &Request, mem: &GuestMemoryMmap, disk: &Disk) -> Completion {
    let completion = io_status(run(req, mem, disk));
    if mem.write_obj(completion.status, req.status).is_err() {
        // Checked in parse; memory does not shrink, so this cannot happen.
        tracing::error!("status byte vanished from guest memory");
    }
    completion
}

fn check_extent(req: &Request, disk: &Disk) -> Result<u64, u8> {
    let offset = req
        .sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(VIRTIO_BLK_S_IOERR)?;
    let end = offset
        .checked_add(req.data_len())
        .ok_or(VIRTIO_BLK_S_IOERR)?;
    if end > disk.size {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok(offset)
}

fn run(req: &Request, mem: &GuestMemoryMmap, disk: &Disk) -> Result<u32, u8> {
    match req.kind {
        RequestKind::In => {
            if req.data.iter().any(|(_, _, w)| !w) {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let mut offset = check_extent(req, disk)?;
            for (addr, len, _) in &req.data {
                transfer(&disk.file, mem, *addr, *len, offset, Direction::ToGuest)?;
                offset += u64::from(*len);
            }
            u32::try_from(req.data_len()).map_err(|_| VIRTIO_BLK_S_IOERR)
        }
        RequestKind::Out => {
            if disk.read_only {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            if req.data.iter().any(|(_, _, w)| *w) {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let mut offset = check_extent(req, disk)?;
            for (addr, len, _) in &req.data {
                transfer(&disk.file, mem, *addr, *len, offset, Direction::FromGuest)?;
                offset += u64::from(*len);
            }
            Ok(0)
        }
        RequestKind::Flush => {
            if disk.read_only {
                return Ok(0);
            }
            disk.flush().map_err(|_| VIRTIO_BLK_S_IOERR)?;
            Ok(0)
        }
        RequestKind::GetId => {
            let Some((addr, len, true)) = req.data.first().copied() else {
                return Err(VIRTIO_BLK_S_IOERR);
            };
            let n = (len as usize).min(ID_BYTES);
            mem.write_slice(&disk.id[..n], addr)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            Ok(n as u32)
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if disk.read_only {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            for (sector, count, unmap) in segments(req, mem)? {
                let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
                let len = u64::from(count) * SECTOR_SIZE;
                if offset.checked_add(len).is_none_or(|end| end > disk.size) {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let zero = req.kind == RequestKind::WriteZeroes;
                disk.deallocate(offset, len, zero && !unmap)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            }
            Ok(0)
        }
        RequestKind::Unsupported(_) => Err(VIRTIO_BLK_S_UNSUPP),
    }
}

/// Reads the (sector, sectors, unmap flag) segments of a discard/write-zeroes request from its
/// device-readable buffers. At most [`MAX_SEGMENTS`]; flags other than unmap are rejected.
fn segments(req: &Request, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u32, bool)>, u8> {
    if req.data.iter().any(|(_, _, w)| *w) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let total = req.data_len();
    if total == 0 || total % SEGMENT_SIZE != 0 || total / SEGMENT_SIZE > u64::from(MAX_SEGMENTS) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let mut raw = Vec::with_capacity(total as usize);
    for (addr, len, _) in &req.data {
        let mut buf = vec![0u8; *len as usize];
        mem.read_slice(&mut buf, *addr)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        raw.extend_from_slice(&buf);
    }
    raw.chunks_exact(SEGMENT_SIZE as usize)
        .map(|c| {
            let sector = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let count = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
            let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
            if flags & !1 != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            Ok((sector, count, flags & 1 != 0))
        })
        .collect()
}

/// Which way [`transfer`] moves data.
#[derive(Clone, Copy)]
enum Direction {
    /// Disk to guest memory (a read request).
    ToGuest,
    /// Guest memory to disk (a write request).
    FromGuest,
}

/// Moves `len` bytes between guest memory at `addr` and `file` at `offset` with positioned
/// reads or writes straight into or out of guest memory (no bounce buffer): one system call
/// per guest memory region the buffer spans, repeated while the kernel transfers less.
fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    mut offset: u64,
    dir: Direction,
) -> Result<(), u8> {
    for slice in mem.get_slices(addr, len as usize) {
        let slice = slice.map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let guard = slice.ptr_guard_mut();
        let (base, n) = (guard.as_ptr(), guard.len());
        let mut done = 0usize;
        while done < n {
            let at = offset
                .checked_add(done as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or(VIRTIO_BLK_S_IOERR)?;
            let (fd, left) = (file.as_raw_fd(), n - done);
            // SAFETY: `base..base + n` is mapped guest memory (`get_slices` checked that the
            // range lies inside a region), kept mapped while `mem` and `guard` live; the call
            // reads or writes at most `left` bytes from `base + done`, inside that range. No
            // Rust reference to guest memory exists (it is only accessed through volatile
            // slices), so the kernel touching it while the guest does is not a data race in
            // this process's Rust code.
            let r = unsafe {
                let p = base.add(done).cast::<libc::c_void>();
                match dir {
                    Direction::ToGuest => libc::pread(fd, p, left, at),
                    Direction::FromGuest => libc::pwrite(fd, p, left, at),
                }
            };
            match usize::try_from(r) {
                Ok(0) => return Err(VIRTIO_BLK_S_IOERR),
                Ok(k) => done += k.min(left),
                Err(_)
                    if std::io::Error::last_os_error().kind()
                        == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(VIRTIO_BLK_S_IOERR),
            }
        }
        offset = offset.checked_add(n as u64).ok_or(VIRTIO_BLK_S_IOERR)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as D;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    fn disk(size: u64, ro: bool) -> (tempfile::NamedTempFile, Disk) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(size).expect("len");
        let file = f.reopen().expect("reopen");
        (f, Disk::new(file, size, ro, "ddvmm-test-disk"))
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    /// Header at 0x1000, one data descriptor, status at 0x3000: parse and execute.
    fn run(m: &GuestMemoryMmap, d: &Disk, kind: u32, sector: u64, data: D) -> Completion {
        header(m, 0x1000, kind, sector);
        let chain = [
            D::new(0x1000, 16, NEXT, 1),
            data,
            D::new(0x3000, 1, WRITE, 0),
        ];
        execute(&Request::parse(&chain, m).expect("parse"), m, d)
    }

    /// A discard or write-zeroes request for one segment of `sectors` at `sector`.
    fn run_segment(
        m: &GuestMemoryMmap,
        d: &Disk,
        kind: u32,
        sector: u64,
        sectors: u32,
    ) -> Completion {
        header(m, 0x1000, kind, 0);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        m.write_slice(&seg, GuestAddress(0x2000)).expect("seg");
        let chain = [
            D::new(0x1000, 16, NEXT, 1),
            D::new(0x2000, 16, NEXT, 2),
            D::new(0x3000, 1, WRITE, 0),
        ];
        execute(&Request::parse(&chain, m).expect("parse"), m, d)
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).expect("status")
    }

    #[test]
    fn buffers_spanning_two_memory_regions_go_straight_to_and_from_the_disk() {
        // Two adjacent regions (as RAM is split around the PCI hole): a 64 KiB buffer that
        // starts 4 KiB before the boundary is moved in two pieces, nothing lost or shifted.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x20000),
        ])
        .expect("mem");
        let (t, d) = disk(1 << 20, false);
        let pattern: Vec<u8> = (0..0x10000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0xf000)).expect("data");
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_OUT,
            8,
            D::new(0xf000, 0x10000, NEXT, 2),
        );
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
        let mut on_disk = vec![0u8; 0x10000];
        t.as_file()
            .read_exact_at(&mut on_disk, 8 * 512)
            .expect("read back");
        assert!(on_disk == pattern, "the disk holds another pattern");
        m.write_slice(&vec![0u8; 0x10000], GuestAddress(0xf000))
            .expect("clear");
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            8,
            D::new(0xf000, 0x10000, WRITE | NEXT, 2),
        );
        assert_eq!(c.written, 0x10001);
        let mut back = vec![0u8; 0x10000];
        m.read_slice(&mut back, GuestAddress(0xf000)).expect("read");
        assert!(back == pattern, "guest memory holds another pattern");
        // Reading past the end of the backing file (a disk that shrank) fails the request.
        t.as_file().set_len(4096).expect("shrink");
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            8,
            D::new(0xf000, 0x1000, WRITE | NEXT, 2),
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn write_then_read_round_trip() {
        let m = mem();
        let (_t, d) = disk(1 << 20, false);
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 2);
        m.write_slice(&[0xab; 1024], GuestAddress(0x2000))
            .expect("data");
        let chain = [
            D::new(0x1000, 16, NEXT, 1),
            D::new(0x2000, 1024, NEXT, 2),
            D::new(0x3000, 1, WRITE, 0),
        ];
        let req = Request::parse(&chain, &m).expect("parse");
        assert_eq!(req.kind, RequestKind::Out);
        let c = execute(&req, &m, &d);
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 1
            }
        );
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            2,
            D::new(0x4000, 1024, WRITE | NEXT, 2),
        );
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 1025
            }
        );
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(0x4000)).expect("read");
        assert_eq!(back, [0xab; 1024]);
        let mut raw = [0u8; 1024];
        d.file.read_exact_at(&mut raw, 1024).expect("file");
        assert_eq!(raw, [0xab; 1024]);
    }

    #[test]
    fn hostile_chains_are_rejected_without_side_effects() {
        let m = mem();
        assert_eq!(Request::parse(&[], &m), Err(ChainError::Empty));
        // Header too short, or device-writable.
        assert!(matches!(
            Request::parse(
                &[D::new(0x1000, 8, NEXT, 1), D::new(0x3000, 1, WRITE, 0)],
                &m
            ),
            Err(ChainError::BadHeader { .. })
        ));
        assert!(matches!(
            Request::parse(
                &[D::new(0x1000, 16, WRITE, 1), D::new(0x3000, 1, WRITE, 0)],
                &m
            ),
            Err(ChainError::BadHeader { .. })
        ));
        // Header outside memory.
        assert_eq!(
            Request::parse(
                &[D::new(0xfff_0000, 16, NEXT, 1), D::new(0x3000, 1, WRITE, 0)],
                &m
            ),
            Err(ChainError::HeaderOutOfRange(0xfff_0000))
        );
        // No status descriptor, read-only status, status outside memory.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            Request::parse(&[D::new(0x1000, 16, 0, 0)], &m),
            Err(ChainError::NoStatus)
        );
        assert_eq!(
            Request::parse(&[D::new(0x1000, 16, NEXT, 1), D::new(0x3000, 1, 0, 0)], &m),
            Err(ChainError::NoStatus)
        );
        assert!(matches!(
            Request::parse(
                &[D::new(0x1000, 16, NEXT, 1), D::new(u64::MAX, 1, WRITE, 0)],
                &m
            ),
            Err(ChainError::StatusOutOfRange(_))
        ));
    }

    #[test]
    fn bad_requests_fail_with_status() {
        let m = mem();
        let (_t, d) = disk(8192, false);
        // Read past the end of the disk.
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            16,
            D::new(0x2000, 512, WRITE | NEXT, 2),
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&m, 0x3000), VIRTIO_BLK_S_IOERR);
        // Sector number that overflows.
        let read_buf = D::new(0x2000, 512, WRITE | NEXT, 2);
        let c = run(&m, &d, VIRTIO_BLK_T_IN, u64::MAX, read_buf);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        // A read into a device-readable buffer (wrong direction).
        let c = run(&m, &d, VIRTIO_BLK_T_IN, 0, D::new(0x2000, 512, NEXT, 2));
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        // A data buffer outside guest memory.
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            0,
            D::new(0xffff_0000, 512, WRITE | NEXT, 2),
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        // Unknown request type.
        let c = run(&m, &d, 99, 0, read_buf);
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP);
    }

    /// A guest kernel never sends a write to a disk that advertises VIRTIO_BLK_F_RO, so this
    /// is where a write request reaches the device: refused with IOERR, for every request
    /// kind that modifies the disk, and the backing file (opened writable here, so only the
    /// device's check stands in the way) keeps its bytes.
    #[test]
    fn read_only_disk_refuses_writes() {
        let m = mem();
        let (t, d) = disk(64 * 1024, true);
        t.as_file()
            .write_all_at(&[0x5a; 64 * 1024], 0)
            .expect("fill");
        m.write_slice(&[0x77; 512], GuestAddress(0x2000))
            .expect("data");
        let c = run(&m, &d, VIRTIO_BLK_T_OUT, 3, D::new(0x2000, 512, NEXT, 2));
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let c = run_segment(&m, &d, kind, 8, 8);
            assert_eq!(c.status, VIRTIO_BLK_S_IOERR, "kind {kind}");
        }
        let mut back = vec![0u8; 64 * 1024];
        t.as_file().read_exact_at(&mut back, 0).expect("read");
        assert!(
            back.iter().all(|b| *b == 0x5a),
            "the read-only disk changed"
        );
        // Reads still work, and return the disk's bytes.
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_IN,
            3,
            D::new(0x4000, 512, WRITE | NEXT, 2),
        );
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
        let mut read = [0u8; 512];
        m.read_slice(&mut read, GuestAddress(0x4000)).expect("read");
        assert_eq!(read, [0x5a; 512]);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let (_t, d) = disk(64 * 1024, false);
        d.file.write_all_at(&[0xee; 64 * 1024], 0).expect("fill");
        for (kind, sector) in [
            (VIRTIO_BLK_T_DISCARD, 8u64),
            (VIRTIO_BLK_T_WRITE_ZEROES, 32),
        ] {
            let c = run_segment(&m, &d, kind, sector, 8);
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            let mut back = [0xffu8; 4096];
            d.file.read_exact_at(&mut back, sector * 512).expect("read");
            assert!(back.iter().all(|b| *b == 0));
        }
        let mut untouched = [0u8; 512];
        d.file.read_exact_at(&mut untouched, 0).expect("read");
        assert_eq!(untouched, [0xee; 512]);
        // Past the end, bad flags, and a partial segment are refused.
        for (sector, flags, len) in [(200u64, 0u32, 16u32), (0, 2, 16), (0, 0, 12)] {
            header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&8u32.to_le_bytes());
            seg[12..].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&seg, GuestAddress(0x2000)).expect("seg");
            let chain = [
                D::new(0x1000, 16, NEXT, 1),
                D::new(0x2000, len, NEXT, 2),
                D::new(0x3000, 1, WRITE, 0),
            ];
            let c = execute(&Request::parse(&chain, &m).expect("parse"), &m, &d);
            assert_ne!(c.status, VIRTIO_BLK_S_OK);
        }
    }

    #[test]
    fn get_id_and_flush() {
        let m = mem();
        let (_t, d) = disk(8192, false);
        let c = run(
            &m,
            &d,
            VIRTIO_BLK_T_GET_ID,
            0,
            D::new(0x2000, 20, WRITE | NEXT, 2),
        );
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 21
            }
        );
        let mut id = [0u8; 15];
        m.read_slice(&mut id, GuestAddress(0x2000)).expect("id");
        assert_eq!(&id, b"ddvmm-test-disk");
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [D::new(0x1000, 16, NEXT, 1), D::new(0x3000, 1, WRITE, 0)];
        let c = execute(&Request::parse(&flush, &m).expect("parse"), &m, &d);
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
    }
}
