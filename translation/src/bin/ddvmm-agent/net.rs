//! Serving one network channel: the client's port on the driver VM's own Linux bridge.
//!
//! Once per driver VM the agent creates the bridge [`BRIDGE`] and enslaves the uplink the
//! channel names (the NIC this driver VM owns, with its stock driver). Per channel it creates
//! a TAP (`ddtapN`, with a 12-byte virtio-net header so offload requests pass through) and
//! makes it a bridge port. Frames the client sends (`net-tx`) are written to the TAP after
//! their source MAC is checked against the one the driver VM's VMM published (defence in
//! depth: the client VMM already drops spoofed frames); frames the bridge forwards to the TAP
//! fill the receive buffers the client posted (`net-rx`). The TAP carries no receive
//! offloads, so the kernel hands over finished frames of at most the MTU.
//!
//! When the channel is let go (see `slot`), the TAP's descriptor is closed, which removes the
//! (non-persistent) TAP and its bridge port; the bridge and the uplink stay for other channels.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddvmm_translation::channel::regs;
use ddvmm_translation::ring::{features, AgentRing, Completion, Opcode, RawRegion, Status};

use crate::backend::FAULT_POLL;
use crate::fault::Injected;
use crate::slot::{Assignment, Slot, Stop};

/// The bridge every client port and the uplink join.
pub const BRIDGE: &str = "ddbr0";
/// virtio_net_hdr_v1.
const VNET_HDR_LEN: usize = 12;
/// Ethernet header.
const ETH_HLEN: usize = 14;
/// Largest frame read from or written to the TAP: header + 64 KiB segment + Ethernet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// How long the uplink may take to appear (its driver probes asynchronously).
const UPLINK_TIMEOUT: Duration = Duration::from_secs(120);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Serializes bridge setup between channel threads.
static BRIDGE_SETUP: Mutex<bool> = Mutex::new(false);

/// `struct ifreq`: a name and 24 bytes of union (index, flags, ...).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(format!("bad interface name '{name}'"));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    fn with_short(mut self, v: i16) -> Self {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn with_int(mut self, v: i32) -> Self {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
}

/// `ioctl(fd, req, arg)` on a pointer argument, as a `Result`.
fn ioctl_ptr<T>(
    fd: &impl AsRawFd,
    req: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` points to a live, properly sized value of the type the request expects
    // (an `ifreq`, a NUL-terminated name or an int), valid for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A socket to carry interface ioctls.
fn ctl_socket() -> Result<File, String> {
    // SAFETY: socket takes integers only; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn ifindex(sock: &File, name: &str) -> Result<i32, String> {
    let mut r = IfReq::new(name)?;
    ioctl_ptr(
        sock,
        libc::SIOCGIFINDEX as _,
        &mut r,
        &format!("index of {name}"),
    )?;
    Ok(i32::from_ne_bytes([
        r.data[0], r.data[1], r.data[2], r.data[3],
    ]))
}

fn set_up(sock: &File, name: &str) -> Result<(), String> {
    let mut r = IfReq::new(name)?;
    ioctl_ptr(
        sock,
        libc::SIOCGIFFLAGS as _,
        &mut r,
        &format!("flags of {name}"),
    )?;
    let mut r = IfReq::new(name)?.with_short(r.short() | libc::IFF_UP as i16);
    ioctl_ptr(
        sock,
        libc::SIOCSIFFLAGS as _,
        &mut r,
        &format!("bring up {name}"),
    )
}

fn add_port(sock: &File, port: &str) -> Result<(), String> {
    let mut r = IfReq::new(BRIDGE)?.with_int(ifindex(sock, port)?);
    match ioctl_ptr(
        sock,
        SIOCBRADDIF,
        &mut r,
        &format!("add {port} to {BRIDGE}"),
    ) {
        // Already a port (a second channel on the same uplink).
        Err(e) if e.contains("Device or resource busy") => Ok(()),
        other => other,
    }
}

/// Creates the bridge with `uplink` as a port, once per driver VM.
fn ensure_bridge(uplink: &str) -> Result<(), String> {
    let mut done = BRIDGE_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    let sock = ctl_socket()?;
    let deadline = Instant::now() + UPLINK_TIMEOUT;
    while !std::path::Path::new("/sys/class/net").join(uplink).exists() {
        if Instant::now() > deadline {
            return Err(format!("uplink {uplink} did not appear"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !*done {
        let mut name = [0u8; libc::IFNAMSIZ];
        name[..BRIDGE.len()].copy_from_slice(BRIDGE.as_bytes());
        match ioctl_ptr(&sock, SIOCBRADDBR, &mut name, &format!("create {BRIDGE}")) {
            Err(e) if !e.contains("File exists") => return Err(e),
            _ => {}
        }
        set_up(&sock, BRIDGE)?;
        *done = true;
    }
    add_port(&sock, uplink)?;
    set_up(&sock, uplink)
}

/// Creates TAP `name` (virtio-net header, no receive offloads, non-blocking) as a bridge port.
fn open_port(name: &str) -> Result<File, String> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut r = IfReq::new(name)?.with_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    ioctl_ptr(&tun, TUNSETIFF, &mut r, &format!("create TAP {name}"))?;
    let mut hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
    ioctl_ptr(&tun, TUNSETVNETHDRSZ, &mut hdr, "TUNSETVNETHDRSZ")?;
    // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 (no offloads) is always valid.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
        return Err(format!(
            "TUNSETOFFLOAD: {}",
            std::io::Error::last_os_error()
        ));
    }
    let sock = ctl_socket()?;
    add_port(&sock, name)?;
    set_up(&sock, name)?;
    Ok(tun)
}

/// A network channel's assignment: `backend` names the uplink, `mac` the client's address.
type Port = Assignment;

/// Per-port counters, reported in the console once a minute.
#[derive(Default)]
struct Counters {
    tx: u64,
    rx: u64,
    spoofed: u64,
    bad: u64,
    tap_errors: u64,
    filtered: u64,
}

/// Serves the network channel assigned to `slot` until it is let go (`Ok`) or an
/// unrecoverable error.
pub fn serve(slot: &mut Slot) -> Result<(), String> {
    let port = slot.assignment.clone();
    let mem = slot.map_memory()?;
    ensure_bridge(&port.backend)?;
    let tap_name = format!("ddtap{}", port.index);
    let mut tap = open_port(&tap_name)?;
    println!(
        "ddvmm-agent: channel {} at {}: port {tap_name} on {BRIDGE} (uplink {}), mac {}",
        port.index,
        slot.address,
        port.backend,
        port.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let mut counters = Counters::default();
    let mut buf = vec![0u8; MAX_FRAME];
    slot.pass_gate();
    while let Some(mut ring) = slot.attach(&mem, features::NET)? {
        ring.set_ready().map_err(|e| e.to_string())?;
        crate::console::say(format!(
            "ddvmm-agent: channel {} ready, generation {}",
            port.index,
            ring.generation()
        ));
        let stop = serve_generation(&mut ring, &port, &mut tap, slot, &mut buf, &mut counters);
        if stop == Stop::Detach {
            break;
        }
    }
    // Let go: closing the TAP's only descriptor removes it; then the memory is unmapped.
    drop(tap);
    drop(mem);
    Ok(())
}

/// Serves one ring generation, until the client starts another or the channel is taken back.
fn serve_generation(
    ring: &mut AgentRing<RawRegion>,
    port: &Port,
    tap: &mut File,
    slot: &mut Slot,
    buf: &mut [u8],
    counters: &mut Counters,
) -> Stop {
    // Receive buffers the client lent us: (request id, slot, capacity).
    let mut posted: VecDeque<(u64, u32, usize)> = VecDeque::new();
    let mut beat = slot.heartbeat.start();
    let mut fault_check = Instant::now();
    let mut wakeups = crate::wakeups::Wakeups::new(port.index, "tap");
    loop {
        let mut progress = false;
        let mut published = false;
        // Receive buffers held are bounded by a ring's worth.
        let cap = ring.layout().ring_entries as usize;
        let mut requests = false;
        while posted.len() < cap {
            let Some(req) = ring.pop_request() else {
                break;
            };
            requests = true;
            let r = match req {
                Ok(r) => r,
                Err(e) => {
                    if !ring.is_current() {
                        return Stop::Generation;
                    }
                    eprintln!("ddvmm-agent: request ring: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            let status = match (r.op, r.slot) {
                (Opcode::NetRx, Some(slot)) => {
                    posted.push_back((r.id, slot, r.len as usize));
                    continue;
                }
                (Opcode::NetTx, Some(slot)) => {
                    transmit(ring, tap, port, slot, r.len, buf, counters)
                }
                _ => Status::Unsupported,
            };
            published |= complete(ring, r.id, status, 0);
        }
        wakeups.looked(requests, &slot.irq);
        progress |= requests;
        // Frames for the client while it has buffers posted.
        while let Some(&(id, slot, capacity)) = posted.front() {
            let n = match tap.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    counters.tap_errors += 1;
                    eprintln!("ddvmm-agent: {BRIDGE} port read: {e}");
                    break;
                }
            };
            progress = true;
            if n < VNET_HDR_LEN + ETH_HLEN || n > capacity {
                counters.bad += 1;
                continue;
            }
            // Unicast frames for another address (flooded by the bridge) stay here.
            let dst = &buf[VNET_HDR_LEN..VNET_HDR_LEN + 6];
            if dst[0] & 1 == 0 && dst != port.mac {
                counters.filtered += 1;
                continue;
            }
            posted.pop_front();
            let status = match ring.write_slot(slot, 0, &buf[..n]) {
                Ok(()) => {
                    counters.rx += 1;
                    Status::Ok
                }
                Err(_) => Status::IoErr,
            };
            published |= complete(ring, id, status, n as u32);
        }
        if published && ring.needs_notify_client() {
            slot.regs.write32(regs::DOORBELL, 1);
        }
        // Not on every interrupt (a register read is an exit to the VMM), as in `backend`.
        if fault_check.elapsed() >= FAULT_POLL {
            fault_check = Instant::now();
            match slot.take_fault(ring) {
                Injected::Detach => return Stop::Detach,
                Injected::BrokenRing => return heartbeat_only(ring, slot),
                Injected::Nothing | Injected::Garbage => {}
            }
        }
        if progress {
            beat.served();
        }
        // Posted receive buffers are not work: they wait for frames that may never come.
        if beat.due(false) {
            let _ = ring.heartbeat();
            beat.beaten();
            if !ring.is_current() {
                return Stop::Generation;
            }
        }
        let c = &counters;
        wakeups.report_if_due(|| {
            format!(
                "tx {} rx {} spoofed {} bad {} filtered {} tap-errors {}; ",
                c.tx, c.rx, c.spoofed, c.bad, c.filtered, c.tap_errors
            )
        });
        if progress {
            continue;
        }
        // Sleep: unmask the interrupt, arm the event index, re-check, then wait for the
        // client's kick or (while buffers are posted) a frame on the TAP.
        wakeups.enable(&mut slot.irq);
        if ring.enable_notify() {
            continue;
        }
        let tap_fd = (!posted.is_empty()).then(|| tap.as_raw_fd());
        wakeups.woke(slot.irq.wait(tap_fd, beat.timeout_ms(false)));
    }
}

/// A broken ring: nothing more is published on it (a completion would store a sane index
/// again), only the heartbeat, until the client starts a new generation or the channel is
/// taken back.
fn heartbeat_only(ring: &mut AgentRing<RawRegion>, slot: &mut Slot) -> Stop {
    let mut beat = slot.heartbeat.start();
    while ring.is_current() {
        std::thread::sleep(FAULT_POLL);
        if slot.take_fault(ring) == Injected::Detach {
            return Stop::Detach;
        }
        // Awake every poll anyway: beaten as a busy channel.
        if beat.due(true) {
            let _ = ring.heartbeat();
            beat.beaten();
        }
    }
    Stop::Generation
}

/// Hands one client frame to the bridge: checked length and source MAC, then the TAP.
fn transmit(
    ring: &AgentRing<RawRegion>,
    tap: &mut File,
    port: &Port,
    slot: u32,
    len: u32,
    buf: &mut [u8],
    counters: &mut Counters,
) -> Status {
    let len = len as usize;
    if !(VNET_HDR_LEN + ETH_HLEN..=buf.len()).contains(&len)
        || ring.read_slot(slot, 0, &mut buf[..len]).is_err()
    {
        counters.bad += 1;
        return Status::IoErr;
    }
    if buf[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12] != port.mac {
        counters.spoofed += 1;
        return Status::IoErr;
    }
    // A TAP takes a frame whole or not at all.
    match tap.write(&buf[..len]) {
        Ok(n) if n == len => {
            counters.tx += 1;
            Status::Ok
        }
        other => {
            // A header the kernel refuses (bad offload request) or a full queue: dropped.
            counters.tap_errors += 1;
            if counters.tap_errors.is_power_of_two() {
                eprintln!("ddvmm-agent: {BRIDGE} port write: {other:?}");
            }
            Status::IoErr
        }
    }
}

/// Publishes one completion; whether it went out.
fn complete(ring: &mut AgentRing<RawRegion>, id: u64, status: Status, len: u32) -> bool {
    let len = if status == Status::Ok { len } else { 0 };
    match ring.complete(Completion { id, status, len }) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("ddvmm-agent: completion ring: {e}");
            false
        }
    }
}
