//! Serving one block channel: ring in, `O_DIRECT` I/O on the backend device, ring out.
//!
//! [`serve`] opens the backend device and starts the I/O threads, passes the slot's gate (if
//! the slot has not yet), then serves one ring generation after another until the channel is
//! let go (see `slot`): then it waits for its in-flight requests, ends the I/O threads, leaves
//! the backend's fair share and closes the device before it returns.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvmm_translation::channel::regs;
use ddvmm_translation::ring::{
    features, flags, AgentRing, Completion, Opcode, RawRegion, RequestEntry, RingError, Status,
    SECTOR_SIZE,
};

use crate::fault::{publish_garbage, sysrq, Injected};
use crate::slot::{Assignment, Slot, Stop};
use crate::Options;

/// What this agent implements.
const SUPPORTED: u64 = features::FUA | features::GET_ID;
/// How often a busy agent reads the fault request register (one exit each). An idle agent
/// reads it when it wakes: the VMM interrupts it with every request.
pub(crate) const FAULT_POLL: Duration = Duration::from_millis(20);
/// Device id string returned for get-id.
const AGENT_ID: &[u8] = b"ddvmm-agent";

/// The window of the backend device this channel may touch: its assignment, from BAR 0.
type Window = Assignment;

/// A page-aligned buffer for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: an exclusively owned heap allocation.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(4096), 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        Some(AlignedBuf {
            ptr: std::ptr::NonNull::new(p)?,
            len,
        })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes were allocated (and zeroed) in `new`; `&self` borrows them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len.max(4096), 4096) {
            // SAFETY: allocated in `new` with this very layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Work for an I/O thread.
struct Job {
    id: u64,
    op: Opcode,
    fua: bool,
    offset: u64,
    buf: Option<AlignedBuf>,
}

/// A finished job.
struct Done {
    id: u64,
    status: Status,
    len: u32,
    slot: Option<u32>,
    buf: Option<AlignedBuf>,
}

/// Serves the block channel assigned to `slot` until it is let go (`Ok`) or an unrecoverable
/// error.
pub fn serve(slot: &mut Slot, opts: &Options) -> Result<(), String> {
    let w = slot.assignment.clone();
    let mem = slot.map_memory()?;
    let disk = open_backend(&w)?;
    println!(
        "ddvmm-agent: channel {} at {}: {} sectors {}+{}{}, weight {}",
        w.index,
        slot.address,
        w.backend,
        w.start,
        w.sectors,
        if w.read_only { " (read-only)" } else { "" },
        w.weight
    );
    let share = opts.fair.then(|| Share {
        fair: crate::fair::for_backend(&w.backend, opts.share),
        channel: w.index,
        weight: w.weight,
    });

    let disk = Arc::new(disk);
    let (job_tx, job_rx) = channel::<(Job, Option<u32>)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = channel::<Done>();
    let wake = EventFd::new()?;
    let mut pool = Vec::with_capacity(opts.threads);
    for _ in 0..opts.threads {
        let (rx, tx, disk, wake) = (job_rx.clone(), done_tx.clone(), disk.clone(), wake.clone());
        let share = share.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-io".into())
            .spawn(move || io_thread(&rx, &tx, &disk, &wake, share.as_ref()));
        match spawned {
            Ok(t) => pool.push(t),
            Err(e) => {
                drop(job_tx);
                end_pool(pool);
                return Err(e.to_string());
            }
        }
    }

    slot.pass_gate();
    while let Some(ring) = slot.attach(&mem, SUPPORTED)? {
        ring.set_ready().map_err(|e| e.to_string())?;
        crate::console::say(format!(
            "ddvmm-agent: channel {} ready, generation {}",
            w.index,
            ring.generation()
        ));
        let mut server = Server {
            ring,
            window: &w,
            jobs: &job_tx,
            garbage: opts.garbage,
            poison: opts.poison,
            in_flight: 0,
            broken: false,
            unpublished: VecDeque::new(),
            garbage_for: None,
            published: false,
            wakeups: crate::wakeups::Wakeups::new(w.index, "io"),
            slot: &mut *slot,
        };
        let stop = server.run(&done_rx, &wake);
        // Wait for our in-flight jobs to drain (their results belong to this generation and
        // this client), then attach again or let go.
        while server.in_flight > 0 {
            if done_rx.recv().is_err() {
                break;
            }
            server.in_flight -= 1;
        }
        if stop == Stop::Detach {
            break;
        }
    }
    // Let go (the ring is gone with the server): the I/O threads end once the job queue is
    // closed; the channel leaves the device's fair share; the device's last descriptor is
    // closed and the memory unmapped.
    drop(job_tx);
    end_pool(pool);
    if let Some(s) = share {
        s.fair.release(s.channel);
    }
    drop(disk);
    drop(mem);
    Ok(())
}

/// Waits for the I/O threads to end (their job queue closed).
fn end_pool(pool: Vec<JoinHandle<()>>) {
    for t in pool {
        if t.join().is_err() {
            eprintln!("ddvmm-agent: an I/O thread panicked");
        }
    }
}

/// How long the backend device may take to appear: the kernel probes devices asynchronously
/// (an NVMe controller's namespaces show up after its admin queue is up), and the agent can
/// start before that.
const BACKEND_APPEAR_TIMEOUT: Duration = Duration::from_secs(120);

fn open_backend(w: &Window) -> Result<File, String> {
    let deadline = Instant::now() + BACKEND_APPEAR_TIMEOUT;
    let file = loop {
        match OpenOptions::new()
            .read(true)
            .write(!w.read_only)
            .custom_flags(libc::O_DIRECT)
            .open(&w.backend)
        {
            Ok(f) => break f,
            Err(e)
                if (e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENXIO))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("{}: {e}", w.backend)),
        }
    };
    let size = {
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        f.seek(SeekFrom::End(0))
            .map_err(|e| format!("{}: {e}", w.backend))?
    };
    let end = w
        .start
        .checked_add(w.sectors)
        .and_then(|s| s.checked_mul(SECTOR_SIZE));
    if end.is_none_or(|e| e > size) {
        return Err(format!(
            "{}: window {}+{} sectors exceeds its {} bytes",
            w.backend, w.start, w.sectors, size
        ));
    }
    Ok(file)
}

struct Server<'a> {
    ring: AgentRing<RawRegion>,
    window: &'a Window,
    jobs: &'a Sender<(Job, Option<u32>)>,
    garbage: bool,
    /// Test mode: a request touching this window sector panics the kernel.
    poison: Option<u64>,
    in_flight: usize,
    /// Completions waiting for room in the completion ring (only garbage can fill it).
    unpublished: VecDeque<Completion>,
    /// The completion the last bogus entry was published for.
    garbage_for: Option<u64>,
    /// Completions published since the last doorbell decision.
    published: bool,
    /// Fault injection broke the ring: nothing more is published on it.
    broken: bool,
    wakeups: crate::wakeups::Wakeups,
    /// The channel's registers and interrupt.
    slot: &'a mut Slot,
}

impl Server<'_> {
    /// Serves until the client starts a new generation or the channel is taken back.
    fn run(&mut self, done: &Receiver<Done>, wake: &EventFd) -> Stop {
        let mut beat = self.slot.heartbeat.start();
        let mut fault_check = Instant::now();
        // Jobs (and their buffers) in flight, and answers waiting for room, are bounded by a
        // ring's worth: a client that publishes more waits in its own ring.
        let cap = self.ring.layout().ring_entries as usize;
        loop {
            let mut progress = false;
            while self.in_flight < cap && self.unpublished.len() < cap {
                let Some(req) = self.ring.pop_request() else {
                    break;
                };
                progress = true;
                match req {
                    Ok(r) => self.dispatch(r),
                    Err(RingError::InvalidRequest { id, reason }) => {
                        eprintln!("ddvmm-agent: invalid request {id}: {reason}");
                        self.answer(id, Status::IoErr, 0);
                    }
                    Err(e) => {
                        // A corrupt producer index: a client that re-created the ring (new
                        // generation: attach again) or a broken one (wait for it).
                        if !self.ring.is_current() {
                            return Stop::Generation;
                        }
                        eprintln!("ddvmm-agent: request ring: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
            self.wakeups.looked(progress, &self.slot.irq);
            let mut completed = false;
            while let Ok(d) = done.try_recv() {
                self.in_flight -= 1;
                self.finish(d);
                completed = true;
            }
            self.publish_pending();
            // Completions published this round (also those answered without I/O).
            if std::mem::take(&mut self.published) && self.ring.needs_notify_client() {
                self.slot.regs.write32(regs::DOORBELL, 1);
            }
            // Not on every interrupt (a register read is an exit to the VMM): a request the VMM
            // follows with an interrupt finds an agent that slept, so the poll is due.
            if fault_check.elapsed() >= FAULT_POLL {
                // `take_fault` has rung the doorbell for anything it published.
                match self.slot.take_fault(&mut self.ring) {
                    Injected::Detach => return Stop::Detach,
                    Injected::BrokenRing => self.broken = true,
                    Injected::Nothing | Injected::Garbage => {}
                }
                fault_check = Instant::now();
            }
            if progress || completed {
                beat.served();
            }
            if beat.due(self.in_flight > 0) {
                let _ = self.ring.heartbeat();
                beat.beaten();
                if !self.ring.is_current() {
                    return Stop::Generation;
                }
            }
            if progress || completed {
                continue;
            }
            // Sleep: unmask the interrupt, arm the event index, re-check, then wait.
            self.wakeups.enable(&mut self.slot.irq);
            if self.ring.enable_notify() {
                continue;
            }
            // Completions still waiting for room: look again soon (the client drains the ring
            // on our doorbell or its own re-poll).
            let wait = if self.unpublished.is_empty() {
                beat.timeout_ms(self.in_flight > 0)
            } else {
                5
            };
            let woken = self.slot.irq.wait(Some(wake.fd()), wait);
            if woken.other {
                wake.drain();
            }
            self.wakeups.woke(woken);
            self.wakeups.report_if_due(String::new);
        }
    }

    /// Queues a completion and publishes what fits. A completion is never dropped: an honest
    /// agent always finds room, but garbage mode can fill the ring, and then the real answers
    /// wait here until the client has consumed some.
    fn answer(&mut self, id: u64, status: Status, len: u32) {
        self.unpublished.push_back(Completion { id, status, len });
        self.publish_pending();
    }

    fn publish_pending(&mut self) {
        if self.broken {
            return;
        }
        while let Some(c) = self.unpublished.front().copied() {
            // One bogus entry per real one, not one per attempt (or garbage could take every
            // slot the client frees).
            if self.garbage && self.garbage_for != Some(c.id) {
                self.publish_garbage(c.id, c.len);
                self.garbage_for = Some(c.id);
            }
            match self.ring.complete(c) {
                Ok(()) => {
                    self.unpublished.pop_front();
                    self.published = true;
                }
                Err(RingError::RingFull) => {
                    self.published = true;
                    break;
                }
                Err(e) => {
                    eprintln!("ddvmm-agent: completion ring: {e}");
                    self.unpublished.pop_front();
                }
            }
        }
    }

    /// Test mode: one bogus completion the client must reject.
    fn publish_garbage(&mut self, id: u64, len: u32) {
        publish_garbage(&mut self.ring, id, len);
    }

    fn dispatch(&mut self, r: RequestEntry) {
        let w = self.window;
        let bytes = u64::from(r.len);
        let in_window = r
            .sector
            .checked_add(bytes.div_ceil(SECTOR_SIZE))
            .is_some_and(|end| end <= w.sectors);
        let offset = (w.start + r.sector.min(w.sectors)) * SECTOR_SIZE;
        let job = |op, fua, buf| Job {
            id: r.id,
            op,
            fua,
            offset,
            buf,
        };
        if let (Some(p), Opcode::Read | Opcode::Write) = (self.poison, r.op) {
            if (r.sector..r.sector.saturating_add(bytes / SECTOR_SIZE)).contains(&p) {
                sysrq(b'c', "poison request");
            }
        }
        match r.op {
            Opcode::Read | Opcode::Write => {
                if !in_window || bytes % SECTOR_SIZE != 0 || (r.op == Opcode::Write && w.read_only)
                {
                    return self.answer(r.id, Status::IoErr, 0);
                }
                let Some(mut buf) = AlignedBuf::new(r.len as usize) else {
                    return self.answer(r.id, Status::IoErr, 0);
                };
                if r.op == Opcode::Write {
                    let slot = r.slot.unwrap_or(u32::MAX);
                    if self.ring.read_slot(slot, 0, buf.as_mut_slice()).is_err() {
                        return self.answer(r.id, Status::IoErr, 0);
                    }
                }
                let fua = r.flags & flags::FUA != 0;
                self.send(job(r.op, fua, Some(buf)), r.slot);
            }
            Opcode::Flush if w.read_only => self.answer(r.id, Status::Ok, 0),
            Opcode::Flush => self.send(job(Opcode::Flush, false, None), None),
            Opcode::GetId => {
                let n = AGENT_ID.len().min(r.len as usize);
                let slot = r.slot.unwrap_or(u32::MAX);
                match self.ring.write_slot(slot, 0, &AGENT_ID[..n]) {
                    Ok(()) => self.answer(r.id, Status::Ok, n as u32),
                    Err(_) => self.answer(r.id, Status::IoErr, 0),
                }
            }
            Opcode::Discard | Opcode::WriteZeroes | Opcode::NetTx | Opcode::NetRx => {
                self.answer(r.id, Status::Unsupported, 0)
            }
        }
    }

    fn send(&mut self, job: Job, slot: Option<u32>) {
        let id = job.id;
        if self.jobs.send((job, slot)).is_ok() {
            self.in_flight += 1;
        } else {
            self.answer(id, Status::IoErr, 0);
        }
    }

    fn finish(&mut self, d: Done) {
        let mut status = d.status;
        if let (Status::Ok, Some(buf), Some(slot)) = (status, &d.buf, d.slot) {
            // Read data goes into the slot before the completion is published.
            if d.len > 0 && self.ring.write_slot(slot, 0, buf.as_slice()).is_err() {
                status = Status::IoErr;
            }
        }
        let len = if status == Status::Ok { d.len } else { 0 };
        self.answer(d.id, status, len);
    }
}

/// A channel's place in its backend device's fair share.
#[derive(Clone)]
struct Share {
    fair: Arc<crate::fair::Fair>,
    channel: u32,
    weight: u32,
}

fn io_thread(
    jobs: &Mutex<Receiver<(Job, Option<u32>)>>,
    done: &Sender<Done>,
    disk: &File,
    wake: &EventFd,
    share: Option<&Share>,
) {
    loop {
        let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((mut job, slot)) = next else { return };
        let grant = share.map(|s| {
            let bytes = job.buf.as_ref().map_or(0, |b| b.len as u64);
            s.fair.begin(s.channel, crate::fair::cost(bytes, s.weight))
        });
        let (status, len) = run(&mut job, disk);
        drop(grant);
        let d = Done {
            id: job.id,
            status,
            len,
            slot,
            buf: if job.op == Opcode::Read {
                job.buf
            } else {
                None
            },
        };
        if done.send(d).is_err() {
            return;
        }
        wake.notify();
    }
}

fn run(job: &mut Job, disk: &File) -> (Status, u32) {
    let result = match (job.op, job.buf.as_mut()) {
        (Opcode::Read, Some(buf)) => disk
            .read_exact_at(buf.as_mut_slice(), job.offset)
            .map(|()| buf.len as u32),
        (Opcode::Write, Some(buf)) => disk
            .write_all_at(buf.as_slice(), job.offset)
            .and_then(|()| if job.fua { disk.sync_data() } else { Ok(()) })
            .map(|()| 0),
        (Opcode::Flush, _) => disk.sync_data().map(|()| 0),
        _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match result {
        Ok(n) => (Status::Ok, n),
        Err(e) => {
            eprintln!("ddvmm-agent: {:?} at {}: {e}", job.op, job.offset);
            (Status::IoErr, 0)
        }
    }
}

/// A non-blocking eventfd the I/O threads use to wake the ring thread.
#[derive(Clone)]
struct EventFd(Arc<File>);

impl EventFd {
    fn new() -> Result<Self, String> {
        // SAFETY: eventfd takes integers only; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(EventFd(Arc::new(unsafe { File::from_raw_fd(fd) })))
    }

    fn notify(&self) {
        use std::io::Write;
        let _ = (&*self.0).write(&1u64.to_ne_bytes());
    }

    fn drain(&self) {
        use std::io::Read;
        let mut b = [0u8; 8];
        let _ = (&*self.0).read(&mut b);
    }

    fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}
