//! virtio-net backed by a TAP device.
//!
//! One thread per device waits (epoll) on the TAP, the RX and TX queue notifications and a stop
//! event. Frames move between the TAP and guest memory in one copy, the kernel's: TX: each
//! chain's readable buffers are written to the TAP with one `writev`. RX: the next chain is
//! taken and the TAP read into its writable buffers with one `readv` (a chain too small for
//! the largest frame, from a guest without large receive offloads, gets the frame through a
//! buffer, if it fits); while the guest has posted no RX buffers the TAP is not polled, so
//! nothing spins and frames wait in the TAP. The link is always up and the MAC comes from the
//! configuration. Checksum and TSO offloads are negotiated with the driver and mirrored on the
//! TAP (`TUNSETOFFLOAD`), so large segments cross the rings whole.

pub mod ring_frontend;
pub mod tap;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::{
    next_chain, ActivateError, ActiveQueue, DeviceFailure, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::sandbox::seccomp::ThreadKind;

/// Virtio device type of a network device.
pub const DEVICE_TYPE: u32 = 1;
/// Queue size of RX and TX.
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
const VIRTIO_NET_F_MTU: u32 = 3;
const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_STATUS: u32 = 16;
const LINK_UP: u16 = 1;
const MTU: u16 = 1500;
/// Largest frame on either side: header + 64 KiB (room for any future offload).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// A virtio-net device over a TAP.
pub struct Net {
    mac: [u8; 6],
    tap: Option<Tap>,
    worker: Option<(EventFd, JoinHandle<Option<Tap>>)>,
}

impl Net {
    /// A NIC with `mac` whose host end is `tap`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            mac,
            tap: Some(tap),
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            // Offloads: the vnet header carries checksum/segmentation state straight between
            // the driver and the TAP, which does the work (or hands it on) in the host kernel.
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_net_config(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        self.reset();
        let tap = self
            .tap
            .take()
            .ok_or_else(|| ActivateError::Setup("TAP lost by a failed worker".into()))?;
        // Offloads the driver accepted on RX become the TAP's offloads.
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= TUN_F_TSO6;
            }
        }
        if let Err(e) = tap.set_offload(offload) {
            self.tap = Some(tap);
            return Err(ActivateError::Setup(e.to_string()));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Spawn)?;
        let stop_worker = stop.try_clone().map_err(ActivateError::Spawn)?;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        let thread =
            crate::sandbox::seccomp::spawn(ThreadKind::NetQueue, "virtio-net", move || {
                let mut worker = NetWorker {
                    mem,
                    tap,
                    rx,
                    tx,
                    starved: false,
                    buf: vec![0u8; MAX_FRAME],
                    io: GuestIo::default(),
                };
                if let Err(e) = worker.run(&stop_worker) {
                    failure.needs_reset(&e);
                }
                Some(worker.tap)
            })
            .map_err(ActivateError::Spawn)?;
        self.worker = Some((stop, thread));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((stop, thread)) = self.worker.take() {
            let _ = stop.write(1);
            match thread.join() {
                Ok(tap) => self.tap = tap,
                Err(_) => tracing::error!("virtio-net thread panicked"),
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

const TOKEN_TAP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_STOP: u64 = 3;

struct NetWorker {
    mem: GuestMemoryMmap,
    tap: Tap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    /// The guest has no RX buffer posted: the TAP is not polled until it posts one.
    starved: bool,
    /// Frames for RX chains too small for any frame (the guest did not take large receive
    /// offloads): read here first, then copied.
    buf: Vec<u8>,
    io: GuestIo,
}

fn qerr(e: virtio_queue::Error) -> String {
    format!("virtqueue: {e:?}")
}

/// Where virtio 1.x's `num_buffers` sits in the header; 1 without mergeable RX buffers.
const NUM_BUFFERS_AT: usize = 10;

impl NetWorker {
    fn run(&mut self, stop: &EventFd) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| e.to_string())?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| e.to_string())
        };
        add(self.tap.as_raw_fd(), TOKEN_TAP)?;
        add(self.rx.notify.as_raw_fd(), TOKEN_RX)?;
        add(self.tx.notify.as_raw_fd(), TOKEN_TX)?;
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        let mut tap_polled = true;
        let mut events = vec![EpollEvent::default(); 8];
        self.process_tx()?;
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_TAP => self.process_rx()?,
                    TOKEN_RX => {
                        let _ = self.rx.notify.read();
                        self.starved = false;
                        self.process_rx()?;
                    }
                    TOKEN_TX => {
                        let _ = self.tx.notify.read();
                        self.process_tx()?;
                    }
                    _ => return Ok(()),
                }
            }
            // Poll the TAP only while a frame could be delivered.
            let want = !self.starved;
            if want != tap_polled {
                let op = if want {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                epoll
                    .ctl(
                        op,
                        self.tap.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, TOKEN_TAP),
                    )
                    .map_err(|e| e.to_string())?;
                tap_polled = want;
            }
        }
    }

    /// Moves frames from the TAP into RX buffers until either runs out: a chain is taken
    /// first, then the TAP read straight into it (or, for a chain too small for the largest
    /// frame, into `buf` and copied if it fits); a chain that finds no frame is put back.
    fn process_rx(&mut self) -> Result<(), String> {
        let mut delivered = false;
        loop {
            let queue = &mut self.rx.queue;
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                // No buffer: frames wait in the TAP until the driver posts some.
                if queue.enable_notification(&self.mem).map_err(qerr)? {
                    continue;
                }
                self.starved = true;
                break;
            };
            let head = chain.head_index();
            let received = match rx_pieces(chain, &mut self.io.pieces) {
                Ok(capacity) if capacity >= MAX_FRAME as u64 => {
                    self.io.transfer(self.tap.as_raw_fd(), &self.mem, false)
                }
                Ok(capacity) => self.tap.read_frame(&mut self.buf).map(|len| {
                    if (len as u64) <= capacity {
                        copy_to_pieces(&self.mem, &self.io.pieces, &self.buf[..len])
                    } else {
                        tracing::debug!(len, capacity, "RX chain too small; frame dropped");
                        0
                    }
                }),
                Err(e) => {
                    tracing::debug!(reason = e, "unusable RX chain returned empty");
                    Ok(0)
                }
            };
            let written = match received {
                Ok(n) => n,
                // A chain outside guest memory (or one the TAP refuses): given back empty,
                // the frame stays in the TAP for the next chain.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    tracing::debug!(error = %e, "unusable RX chain returned empty");
                    0
                }
                Err(e) => {
                    // No frame for this chain (or a TAP error): it goes back to the queue.
                    self.rx.queue.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "TAP read failed");
                    }
                    break;
                }
            };
            // virtio 1.x: num_buffers is 1 without mergeable RX buffers.
            if written >= VNET_HDR_LEN
                && !write_at(
                    &self.mem,
                    &self.io.pieces,
                    NUM_BUFFERS_AT,
                    &1u16.to_le_bytes(),
                )
            {
                tracing::debug!("RX header outside guest memory");
            }
            let written = u32::try_from(written).unwrap_or(0);
            self.rx
                .queue
                .add_used(&self.mem, head, written)
                .map_err(qerr)?;
            delivered = true;
        }
        if delivered && self.rx.queue.needs_notification(&self.mem).map_err(qerr)? {
            self.rx.interrupt.trigger();
        }
        Ok(())
    }

    /// Sends every frame the driver queued for transmission, each written to the TAP straight
    /// from guest memory.
    fn process_tx(&mut self) -> Result<(), String> {
        let mut sent = false;
        while let Some(chain) = next_chain(&mut self.tx.queue, &self.mem).map_err(qerr)? {
            let head = chain.head_index();
            match tx_pieces(chain, MAX_FRAME, &mut self.io.pieces) {
                Ok(_) => {
                    if let Err(e) = self.io.transfer(self.tap.as_raw_fd(), &self.mem, true) {
                        tracing::debug!(error = %e, "TAP write failed; frame dropped");
                    }
                }
                Err(e) => tracing::warn!(head, reason = e, "bad TX chain dropped"),
            }
            self.tx.queue.add_used(&self.mem, head, 0).map_err(qerr)?;
            sent = true;
        }
        if sent && self.tx.queue.needs_notification(&self.mem).map_err(qerr)? {
            self.tx.interrupt.trigger();
        }
        Ok(())
    }
}

/// Copies `frame` into guest memory `pieces` (in order; they hold at least `frame`).
/// Returns the bytes written, 0 if a piece is outside guest memory (the frame is dropped).
fn copy_to_pieces(mem: &GuestMemoryMmap, pieces: &[(GuestAddress, usize)], frame: &[u8]) -> usize {
    let mut off = 0usize;
    for &(addr, n) in pieces {
        if off == frame.len() {
            break;
        }
        let n = n.min(frame.len() - off);
        if mem.write_slice(&frame[off..off + n], addr).is_err() {
            tracing::debug!("RX buffer outside guest memory; frame dropped");
            return 0;
        }
        off += n;
    }
    off
}

/// Writes `bytes` at byte `at` of the frame laid out over guest memory `pieces`.
fn write_at(
    mem: &GuestMemoryMmap,
    pieces: &[(GuestAddress, usize)],
    mut at: usize,
    bytes: &[u8],
) -> bool {
    let mut done = 0usize;
    for &(addr, n) in pieces {
        if at >= n {
            at -= n;
            continue;
        }
        let k = (n - at).min(bytes.len() - done);
        let Some(to) = addr.checked_add(at as u64) else {
            return false;
        };
        if mem.write_slice(&bytes[done..done + k], to).is_err() {
            return false;
        }
        done += k;
        at = 0;
        if done == bytes.len() {
            return true;
        }
    }
    done == bytes.len()
}

/// Walks a TX chain, checked: every descriptor driver-to-device, the total at least the
/// virtio-net header and at most `max` bytes; each descriptor's (address, length, offset in
/// the frame) goes to `piece`, whose error ends the walk. Returns the total.
fn walk_tx<I>(
    chain: I,
    max: usize,
    mut piece: impl FnMut(GuestAddress, usize, usize) -> Result<(), &'static str>,
) -> Result<usize, &'static str>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err("device-writable descriptor in a TX chain");
        }
        let n = d.len() as usize;
        let end = len.checked_add(n).ok_or("TX chain too long")?;
        if end > max {
            return Err("TX frame larger than the maximum");
        }
        piece(d.addr(), n, len)?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err("TX frame shorter than the virtio-net header");
    }
    Ok(len)
}

/// The pieces of a TX chain into `out` ([`walk_tx`]'s checks).
fn tx_pieces<I>(
    chain: I,
    max: usize,
    out: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, &'static str>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    out.clear();
    walk_tx(chain, max, |addr, n, _| {
        out.push((addr, n));
        Ok(())
    })
}

/// The pieces of an RX chain into `out`, checked: every descriptor device-writable. Returns
/// the chain's capacity.
fn rx_pieces<I>(chain: I, out: &mut Vec<(GuestAddress, usize)>) -> Result<u64, &'static str>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    out.clear();
    let mut capacity = 0u64;
    for d in chain {
        if !d.is_write_only() {
            return Err("driver-to-device descriptor in an RX chain");
        }
        capacity += u64::from(d.len());
        out.push((d.addr(), d.len() as usize));
    }
    Ok(capacity)
}

/// Copies a TX chain's buffers into `buf`. Every descriptor must be driver-to-device, inside
/// guest memory, and the total must fit a frame and hold at least the header.
pub fn gather<I>(mem: &GuestMemoryMmap, chain: I, buf: &mut [u8]) -> Result<usize, &'static str>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let max = buf.len();
    walk_tx(chain, max, |addr, n, at| {
        mem.read_slice(&mut buf[at..at + n], addr)
            .map_err(|_| "TX buffer outside guest memory")
    })
}

/// Copies `frame` into an RX chain's device-writable buffers. Returns the bytes written (0 if
/// the chain is unusable: readable descriptors, memory outside the guest, or too small, in
/// which case the frame is dropped).
pub fn scatter<I>(mem: &GuestMemoryMmap, chain: I, frame: &[u8]) -> u32
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut pieces = Vec::new();
    match rx_pieces(chain, &mut pieces) {
        Ok(capacity) if capacity >= frame.len() as u64 => {}
        _ => {
            tracing::debug!("unusable RX chain; frame dropped");
            return 0;
        }
    }
    copy_to_pieces(mem, &pieces, frame) as u32
}

/// Scratch for one `readv`/`writev` between the TAP and guest memory: the pieces' `iovec`s
/// and the guards that keep each piece mapped while the kernel uses it.
#[derive(Default)]
struct GuestIo {
    pieces: Vec<(GuestAddress, usize)>,
    iov: Vec<libc::iovec>,
    guards: Vec<PtrGuardMut>,
}

impl GuestIo {
    /// `readv` (`write` false: into `pieces`) or `writev` (from them) of one frame on `fd`,
    /// straight between the TAP and guest memory. `InvalidInput` if a piece is not all guest
    /// memory.
    fn transfer(
        &mut self,
        fd: RawFd,
        mem: &GuestMemoryMmap,
        write: bool,
    ) -> std::io::Result<usize> {
        self.iov.clear();
        self.guards.clear();
        for &(addr, n) in &self.pieces {
            for piece in mem.get_slices(addr, n) {
                let slice =
                    piece.map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
                let guard = slice.ptr_guard_mut();
                self.iov.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: guard.len(),
                });
                self.guards.push(guard);
            }
        }
        let count = libc::c_int::try_from(self.iov.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let n = if write {
            // SAFETY: every iovec describes a piece of `mem`'s mappings (from `get_slices`,
            // bounds-checked), borrowed for this call and kept mapped by `guards`; `writev`
            // only reads them. A guest vCPU writing them meanwhile changes only the bytes sent.
            unsafe { libc::writev(fd, self.iov.as_ptr(), count) }
        } else {
            // SAFETY: as above; `readv` writes at most each iovec's length into guest memory,
            // which the guest offered as device-writable buffers.
            unsafe { libc::readv(fd, self.iov.as_ptr(), count) }
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// Reads the virtio-net configuration space of a NIC with `mac`: mac[6] @0, status @6 (link
/// always up: a TAP or a driver VM restart is never shown to the guest), max_virtqueue_pairs
/// @8, mtu @10.
pub fn read_net_config(mac: &[u8; 6], offset: u64, data: &mut [u8]) {
    let mut cfg = [0u8; 12];
    cfg[..6].copy_from_slice(mac);
    cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
    cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
    cfg[10..12].copy_from_slice(&MTU.to_le_bytes());
    super::read_config_bytes(&cfg, offset, data);
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as D;
    use vm_memory::GuestAddress;

    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    #[test]
    fn gather_checks_direction_bounds_and_size() {
        let m = mem();
        m.write_slice(&[7u8; 100], GuestAddress(0x1000)).expect("w");
        let mut buf = vec![0u8; MAX_FRAME];
        let ok = [D::new(0x1000, 12, 0, 0), D::new(0x1000, 60, 0, 0)];
        assert_eq!(gather(&m, ok.into_iter(), &mut buf), Ok(72));
        let writable = [D::new(0x1000, 64, WRITE, 0)];
        assert!(gather(&m, writable.into_iter(), &mut buf).is_err());
        let outside = [D::new(0xfff_f000, 64, 0, 0)];
        assert!(gather(&m, outside.into_iter(), &mut buf).is_err());
        let short = [D::new(0x1000, 4, 0, 0)];
        assert!(gather(&m, short.into_iter(), &mut buf).is_err());
        let huge = [
            D::new(0x1000, u32::MAX, 0, 0),
            D::new(0x1000, u32::MAX, 0, 0),
        ];
        assert!(gather(&m, huge.into_iter(), &mut buf).is_err());
    }

    #[test]
    fn scatter_fills_writable_buffers_or_drops() {
        let m = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        let ok = [D::new(0x2000, 50, WRITE, 0), D::new(0x3000, 100, WRITE, 0)];
        assert_eq!(scatter(&m, ok.into_iter(), &frame), 100);
        let mut back = [0u8; 50];
        m.read_slice(&mut back, GuestAddress(0x3000)).expect("r");
        assert_eq!(back[0], 50);
        let small = [D::new(0x2000, 10, WRITE, 0)];
        assert_eq!(scatter(&m, small.into_iter(), &frame), 0);
        let readable = [D::new(0x2000, 200, 0, 0)];
        assert_eq!(scatter(&m, readable.into_iter(), &frame), 0);
        let outside = [D::new(0xffff_0000, 200, WRITE, 0)];
        assert_eq!(scatter(&m, outside.into_iter(), &frame), 0);
    }

    #[test]
    fn frames_move_between_a_descriptor_chain_and_a_file_in_one_call() {
        let m = mem();
        let frame: Vec<u8> = (0..200u8).collect();
        m.write_slice(&frame[..80], GuestAddress(0x1000))
            .expect("w");
        m.write_slice(&frame[80..], GuestAddress(0x5000))
            .expect("w");
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: pipe() just returned both descriptors; nothing else owns them. Owned, they
        // are closed however the test ends.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (rd, wr) = (rd.as_raw_fd(), wr.as_raw_fd());
        let mut io = GuestIo::default();
        // TX: two readable descriptors, one writev.
        let tx = [D::new(0x1000, 80, 0, 0), D::new(0x5000, 120, 0, 0)];
        assert_eq!(
            tx_pieces(tx.into_iter(), MAX_FRAME, &mut io.pieces),
            Ok(200)
        );
        assert_eq!(io.transfer(wr, &m, true).expect("writev"), 200);
        // RX: the same bytes read into three writable descriptors, one readv.
        let rx = [
            D::new(0x8000, 10, WRITE, 0),
            D::new(0x9000, 100, WRITE, 0),
            D::new(0xa000, 4096, WRITE, 0),
        ];
        assert_eq!(rx_pieces(rx.into_iter(), &mut io.pieces), Ok(4206));
        assert_eq!(io.transfer(rd, &m, false).expect("readv"), 200);
        assert!(write_at(&m, &io.pieces, NUM_BUFFERS_AT, &[0xee, 0xff]));
        let mut back = vec![0u8; 200];
        m.read_slice(&mut back[..10], GuestAddress(0x8000))
            .expect("r");
        m.read_slice(&mut back[10..110], GuestAddress(0x9000))
            .expect("r");
        m.read_slice(&mut back[110..], GuestAddress(0xa000))
            .expect("r");
        let mut want = frame.clone();
        want[10..12].copy_from_slice(&[0xee, 0xff]);
        assert_eq!(
            back, want,
            "the header's num_buffers written across the first piece"
        );
        // Pieces outside guest memory are refused before any I/O.
        io.pieces = vec![(GuestAddress(0xfff_f000), 64)];
        let e = io.transfer(wr, &m, true).expect_err("outside");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        // Chains of the wrong direction are refused.
        let writable = [D::new(0x1000, 64, WRITE, 0)];
        assert!(tx_pieces(writable.into_iter(), MAX_FRAME, &mut io.pieces).is_err());
        let readable = [D::new(0x1000, 64, 0, 0)];
        assert!(rx_pieces(readable.into_iter(), &mut io.pieces).is_err());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
        assert_eq!(parse_mac("5:54:00:12:34:56"), None);
    }
}
