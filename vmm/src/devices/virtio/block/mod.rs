//! virtio-blk backed by a host file or block device.
//!
//! Threads: one queue thread per device waits (epoll) on the queue's notify eventfd and on
//! completions; it pops descriptor chains, parses them ([`request`]) and hands the requests to a
//! small pool of I/O threads, so several requests are in flight at once. Completions come back
//! to the queue thread, which alone touches the used ring, then raises the queue's MSI-X vector
//! only when virtio's notification suppression (event idx) says the driver wants it.
//! Flush is `fdatasync` on the backing file: durable on the host.

pub mod request;
pub mod ring_frontend;

use crate::sandbox::seccomp::{self, ThreadKind};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::request::{execute, take_chain, Completion, Disk, Request, SECTOR_SIZE};
use super::{
    next_chain, publish_used, single_queue, ActivateError, ActiveQueue, DeviceFailure, Interrupt,
    QueueWorker, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Virtio device type of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// I/O threads per device.
pub const IO_THREADS: usize = 4;
const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Largest number of data segments per request we advertise.
const SEG_MAX: u32 = 126;

/// Errors opening a disk.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open disk {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Its size cannot be determined or is not a whole number of sectors.
    #[error("disk {path}: size {size} is not a non-zero multiple of 512 bytes")]
    BadSize {
        /// Path.
        path: PathBuf,
        /// Size found.
        size: u64,
    },
}

/// The feature bits of a virtio-blk device: discard and write-zeroes only where the backend
/// has them and the disk is writable; a size limit per segment where the backend needs one.
pub(crate) fn features(read_only: bool, discard: bool, size_max: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH);
    if size_max {
        f |= 1 << VIRTIO_BLK_F_SIZE_MAX;
    }
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else if discard {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// The virtio-blk configuration space: capacity (u64) @0, size_max @8, seg_max @12,
/// geometry @16, blk_size @20, topology @24, writeback @32, num_queues @34,
/// max_discard_sectors @36, max_discard_seg @40, discard_sector_alignment @44,
/// max_write_zeroes_sectors @48, max_write_zeroes_seg @52, write_zeroes_may_unmap @56.
pub(crate) fn read_config(
    sectors: u64,
    seg_max: u32,
    size_max: Option<u32>,
    offset: u64,
    data: &mut [u8],
) {
    let mut cfg = [0u8; 60];
    cfg[0..8].copy_from_slice(&sectors.to_le_bytes());
    cfg[8..12].copy_from_slice(&size_max.unwrap_or(0).to_le_bytes());
    cfg[12..16].copy_from_slice(&seg_max.to_le_bytes());
    cfg[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    cfg[34..36].copy_from_slice(&1u16.to_le_bytes());
    let max_sectors = u32::MAX / SECTOR_SIZE as u32;
    cfg[36..40].copy_from_slice(&max_sectors.to_le_bytes());
    cfg[40..44].copy_from_slice(&request::MAX_SEGMENTS.to_le_bytes());
    cfg[44..48].copy_from_slice(&8u32.to_le_bytes());
    cfg[48..52].copy_from_slice(&max_sectors.to_le_bytes());
    cfg[52..56].copy_from_slice(&request::MAX_SEGMENTS.to_le_bytes());
    cfg[56] = 1;
    super::read_config_bytes(&cfg, offset, data);
}

/// Opens `path` (read-only if asked) and returns the disk and its size in bytes.
pub fn open_disk(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let size = disk_size(&file).map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(BlockError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    let id = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Disk::new(file, size, read_only, &id))
}

/// Size of a regular file or block device (seek to the end works for both).
fn disk_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// The virtio-blk device model.
pub struct Block {
    disk: Arc<Disk>,
    worker: Option<QueueWorker>,
}

impl Block {
    /// A block device over `disk`.
    pub fn new(disk: Disk) -> Self {
        Block {
            disk: Arc::new(disk),
            worker: None,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features(self.disk.read_only(), true, false)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(self.disk.sectors(), SEG_MAX, None, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        let q = single_queue(queues)?;
        self.reset();
        self.disk.set_draining(false);
        let disk = self.disk.clone();
        self.worker = Some(QueueWorker::spawn(
            ThreadKind::BlockQueue,
            "virtio-blk",
            move |stop| {
                if let Err(e) = run_queue(q, mem, disk, stop, failure.as_ref()) {
                    failure.needs_reset(&e);
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_DONE: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// A request on its way to an I/O thread.
struct Job {
    head: u16,
    request: Request,
}

/// The queue thread: returns an error message if the device must be reset.
fn run_queue(
    active: ActiveQueue,
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
    stop: EventFd,
    failure: &dyn DeviceFailure,
) -> Result<(), String> {
    let ActiveQueue {
        mut queue,
        notify,
        interrupt,
    } = active;
    let done_fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let epoll = Epoll::new().map_err(|e| e.to_string())?;
    for (fd, token) in [
        (&notify, TOKEN_NOTIFY),
        (&done_fd, TOKEN_DONE),
        (&stop, TOKEN_STOP),
    ] {
        use std::os::fd::AsRawFd;
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| e.to_string())?;
    }

    let (job_tx, job_rx) = channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = channel::<(u16, Completion)>();
    let mut pool = Vec::new();
    for i in 0..IO_THREADS {
        let rx = job_rx.clone();
        let tx = done_tx.clone();
        let mem = mem.clone();
        let disk = disk.clone();
        let done = done_fd.try_clone().map_err(|e| e.to_string())?;
        pool.push(
            seccomp::spawn(
                ThreadKind::BlockIo,
                format!("virtio-blk-io{i}"),
                move || io_thread(rx, tx, done, mem, disk),
            )
            .map_err(|e| e.to_string())?,
        );
    }
    drop(done_tx);

    let mut in_flight = 0usize;
    let result = (|| {
        let mut events = vec![EpollEvent::default(); 4];
        // Work that arrived before activation.
        in_flight += submit(&mut queue, &mem, &job_tx, failure)?;
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_NOTIFY => {
                        let _ = notify.read();
                        in_flight += submit(&mut queue, &mem, &job_tx, failure)?;
                    }
                    TOKEN_DONE => {
                        let _ = done_fd.read();
                        in_flight -= complete(&mut queue, &mem, &done_rx, &interrupt)?;
                    }
                    _ => return Ok(()),
                }
            }
        }
    })();

    // Stop: let in-flight requests finish (without waiting for a rate limit) and publish
    // them, then end the pool.
    disk.set_draining(true);
    drop(job_tx);
    while in_flight > 0 {
        match done_rx.recv() {
            Ok((head, c)) => {
                in_flight -= 1;
                let _ = queue.add_used(&mem, head, c.written);
            }
            Err(_) => break,
        }
    }
    for t in pool {
        let _ = t.join();
    }
    result
}

/// Pops every available chain, parses it and queues it for the I/O threads. Returns how many
/// were queued. Chains too broken to carry a status byte make the device need a reset.
fn submit(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    jobs: &Sender<Job>,
    failure: &dyn DeviceFailure,
) -> Result<usize, String> {
    pop_requests(queue, mem, failure, &mut |head, request| {
        jobs.send(Job { head, request })
            .map_err(|_| "I/O threads gone".to_string())
    })
}

/// Pops every available chain, parses it and hands it to `take`, with notifications
/// suppressed meanwhile. Returns how many were taken. A chain too broken to carry a status
/// byte makes the device need a reset (reported to `failure` and returned as the error).
fn pop_requests(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    failure: &dyn DeviceFailure,
    take: &mut dyn FnMut(u16, Request) -> Result<(), String>,
) -> Result<usize, String> {
    let mut taken = 0;
    while let Some(chain) = next_chain(queue, mem).map_err(|e| format!("virtqueue: {e:?}"))? {
        let head = chain.head_index();
        match take_chain(chain, SEG_MAX as usize + 2).and_then(|d| Request::parse(&d, mem)) {
            Ok(request) => {
                take(head, request)?;
                taken += 1;
            }
            Err(e) => {
                failure.needs_reset(&format!("malformed request chain {head}: {e}"));
                return Err(format!("malformed request chain {head}: {e}"));
            }
        }
    }
    Ok(taken)
}

/// Publishes finished requests in the used ring and interrupts the driver if it asked to be.
fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    done: &Receiver<(u16, Completion)>,
    interrupt: &Interrupt,
) -> Result<usize, String> {
    publish_used(
        queue,
        mem,
        done.try_iter().map(|(head, c)| (head, c.written)),
        interrupt,
    )
}

fn io_thread(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<(u16, Completion)>,
    done_fd: EventFd,
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        disk.throttle(&job.request);
        let completion = execute(&job.request, &mem, &disk);
        if done.send((job.head, completion)).is_err() {
            return;
        }
        let _ = done_fd.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::request::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    #[derive(Default)]
    struct Failures(AtomicUsize);

    impl DeviceFailure for Failures {
        fn needs_reset(&self, _reason: &str) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    fn disk() -> (tempfile::NamedTempFile, Arc<Disk>) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(1 << 20).expect("len");
        let file = f.reopen().expect("reopen");
        (f, Arc::new(Disk::new(file, 1 << 20, false, "t")))
    }

    /// Pops everything through `submit` and executes the jobs inline.
    fn run_submit(
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        failures: &Failures,
    ) -> Vec<Completion> {
        let (tx, rx) = channel();
        let _ = submit(queue, mem, &tx, failures);
        let (_f, d) = disk();
        rx.try_iter()
            .map(|job| execute(&job.request, mem, &d))
            .collect()
    }

    #[test]
    fn looping_chain_terminates_and_fails_the_request() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        // d0 -> d1 -> d0 -> ... : a loop the driver should never build.
        let descs = [
            RawDescriptor::from(D::new(0x10_0000, 16, NEXT, 1)),
            RawDescriptor::from(D::new(0x20_0000, 1, NEXT | WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).expect("chain");
        let mut q: Queue = mock.create_queue().expect("queue");
        let failures = Failures::default();
        let start = Instant::now();
        let done = run_submit(&m, &mut q, &failures);
        assert!(start.elapsed() < Duration::from_secs(5));
        // Bounded by the queue size; the mixed-direction data makes it an I/O error.
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, VIRTIO_BLK_S_IOERR);
        assert_eq!(failures.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn chain_outside_memory_needs_reset() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(D::new(0xffff_0000, 16, NEXT, 1)),
            RawDescriptor::from(D::new(0x20_0000, 1, WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).expect("chain");
        let mut q: Queue = mock.create_queue().expect("queue");
        let failures = Failures::default();
        let done = run_submit(&m, &mut q, &failures);
        assert!(done.is_empty());
        assert_eq!(failures.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn descriptor_index_out_of_table_is_not_followed() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        // `next` points past the 16-entry table: the chain ends there (no status descriptor).
        let descs = [RawDescriptor::from(D::new(0x10_0000, 16, NEXT, 300))];
        mock.add_desc_chains(&descs, 0).expect("chain");
        let mut q: Queue = mock.create_queue().expect("queue");
        let failures = Failures::default();
        let done = run_submit(&m, &mut q, &failures);
        assert!(done.is_empty());
        assert_eq!(failures.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn worker_serves_a_write_end_to_end() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 1);
        m.write_slice(&[0x77; 512], GuestAddress(0x18_0000))
            .expect("data");
        let descs = [
            RawDescriptor::from(D::new(0x10_0000, 16, NEXT, 1)),
            RawDescriptor::from(D::new(0x18_0000, 512, NEXT, 2)),
            RawDescriptor::from(D::new(0x20_0000, 1, WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).expect("chain");
        let q: Queue = mock.create_queue().expect("queue");
        let (f, d) = disk();
        let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let router_less = crate::devices::pci::msix::Msix::detached(1);
        use vm_memory::Address;
        let active = ActiveQueue {
            queue: q,
            notify: notify.try_clone().expect("clone"),
            interrupt: Interrupt::new(router_less, 0),
        };
        let failures = Arc::new(Failures::default());
        let (m2, stop2, failures2) = (
            m.clone(),
            stop.try_clone().expect("clone"),
            failures.clone(),
        );
        let t = std::thread::spawn(move || run_queue(active, m2, d, stop2, failures2.as_ref()));
        notify.write(1).expect("notify");
        let used_idx = mock.used_addr().unchecked_add(2);
        let start = Instant::now();
        while m.read_obj::<u16>(used_idx).expect("used") == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "request never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.write(1).expect("stop");
        assert_eq!(t.join().expect("join"), Ok(()));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x20_0000)).expect("status"),
            VIRTIO_BLK_S_OK
        );
        let mut back = [0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(f.as_file(), &mut back, 512).expect("file");
        assert_eq!(back, [0x77; 512]);
        assert_eq!(failures.0.load(Ordering::SeqCst), 0);
    }
}
