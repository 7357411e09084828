//! A TAP device: the host end of a guest NIC. Frames carry a 12-byte virtio-net header
//! (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12), the same layout a VERSION_1 virtio-net driver uses,
//! so headers pass between the guest and the kernel unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TAP offload: the guest accepts partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TAP offload: the guest accepts TCPv4 segments (TSO).
pub const TUN_F_TSO4: u32 = 0x02;
/// TAP offload: the guest accepts TCPv6 segments.
pub const TUN_F_TSO6: u32 = 0x04;
/// Size of the virtio-net header on the TAP (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;

/// Errors setting up a TAP device.
#[derive(Debug, Error)]
pub enum TapError {
    /// Interface name empty or too long.
    #[error("invalid TAP name '{0}' (1 to 15 bytes)")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("{what} on TAP {name} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Interface.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// An open TAP queue.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) TAP `name` and brings its link up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let ioctl_err = |what| TapError::Ioctl {
            what,
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        };
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is a properly sized, initialised
        // ifreq that lives across the call, and the fd is a tun device we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // No offloads until the guest negotiates some: complete, checksummed, MTU-sized frames.
        tap.set_offload(0)?;
        tap.set_up().map_err(|source| TapError::Ioctl {
            what: "SIOCSIFFLAGS",
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
    }

    /// Tells the kernel which offloads the guest can take on received frames (`TUN_F_*`):
    /// partial checksums and TSO segments then pass through the vnet header unchanged.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is accessed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(TapError::Ioctl {
                what: "TUNSETOFFLOAD",
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_up(&self) -> std::io::Result<()> {
        // SAFETY: creating a socket has no memory effects; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns; OwnedFd closes it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq::new(&self.name, 0);
        // SAFETY: SIOCGIFFLAGS fills the flags of a valid, live ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads a valid, live ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
