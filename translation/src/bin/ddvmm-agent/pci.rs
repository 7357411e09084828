//! Finding channel devices in sysfs, binding them to `uio_pci_generic`, mapping their BARs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use ddvmm_translation::channel::{DEVICE, VENDOR};

const NEW_ID: &str = "/sys/bus/pci/drivers/uio_pci_generic/new_id";
const DEVICES: &str = "/sys/bus/pci/devices";

/// A channel function found in sysfs and bound to `uio_pci_generic`.
#[derive(Debug, Clone)]
pub struct ChannelDevice {
    /// PCI address, e.g. `0000:00:03.0`.
    pub address: String,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
    /// `/dev/uioN`.
    pub uio: PathBuf,
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn uio_of(dev: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dev.join("uio")).ok()?;
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("uio"))
        .map(|n| PathBuf::from("/dev").join(n))
}

/// Binds channel devices to `uio_pci_generic` and returns them once each has its `/dev/uioN`
/// (waiting up to `wait` for udev-less device nodes to appear).
pub fn find_channels(wait: Duration) -> Result<Vec<ChannelDevice>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(DEVICES)
        .map_err(|e| format!("{DEVICES}: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            read_trimmed(&p.join("vendor")) == format!("{VENDOR:#06x}")
                && read_trimmed(&p.join("device")) == format!("{DEVICE:#06x}")
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    if paths.iter().any(|p| uio_of(p).is_none()) {
        // EEXIST when the id is already registered: fine.
        let id = format!("{VENDOR:04x} {DEVICE:04x}");
        if let Err(e) = OpenOptions::new()
            .write(true)
            .open(NEW_ID)
            .and_then(|mut f| f.write_all(id.as_bytes()))
        {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("{NEW_ID} (is uio_pci_generic loaded?): {e}"));
            }
        }
    }
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    for p in paths {
        let address = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        loop {
            if let Some(uio) = uio_of(&p).filter(|u| u.exists()) {
                out.push(ChannelDevice {
                    address: address.clone(),
                    sysfs: p.clone(),
                    uio,
                });
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{address}: no /dev/uioN after {wait:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(out)
}

/// A shared mapping of a sysfs `resourceN` file, unmapped on drop.
pub struct BarMapping {
    base: NonNull<u8>,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is plain shared memory / device registers; every access through it is a
// volatile or atomic access of the caller's choosing, so moving it between threads is sound.
unsafe impl Send for BarMapping {}

impl BarMapping {
    /// Maps `len` bytes of `resource` (or its whole size if `len` is 0) read-write.
    pub fn map(resource: &Path, len: usize) -> Result<Self, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(resource)
            .map_err(|e| format!("{}: {e}", resource.display()))?;
        let size = file
            .metadata()
            .map_err(|e| format!("{}: {e}", resource.display()))?
            .len() as usize;
        let len = if len == 0 { size } else { len };
        if len == 0 || len > size {
            return Err(format!(
                "{}: want {len} bytes, BAR has {size}",
                resource.display()
            ));
        }
        // SAFETY: a fresh shared mapping of a file we keep open; the kernel picks the address,
        // so no existing memory is affected. Failure is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {}: {}",
                resource.display(),
                std::io::Error::last_os_error()
            ));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or("mmap returned null")?;
        Ok(BarMapping {
            base,
            len,
            _file: file,
        })
    }

    /// Base address (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Volatile 32-bit register read at `offset` (must be in range and aligned).
    pub fn read32(&self, offset: u64) -> u32 {
        let offset = offset as usize;
        assert!(offset % 4 == 0 && offset + 4 <= self.len, "register offset");
        // SAFETY: in bounds and aligned (asserted); the mapping lives as long as `self`.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    /// Volatile 32-bit register write.
    pub fn write32(&self, offset: u64, value: u32) {
        let offset = offset as usize;
        assert!(offset % 4 == 0 && offset + 4 <= self.len, "register offset");
        // SAFETY: in bounds and aligned (asserted); the mapping lives as long as `self`.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(offset).cast::<u32>(), value) }
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no references into it remain
        // (accessors only hand out values).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// The interrupt of a `uio_pci_generic` device.
///
/// The stock driver masks INTx in its interrupt handler (the command register's
/// INTx-disable bit) and has no `irqcontrol`: userspace unmasks by clearing that bit through
/// the function's sysfs `config` file, as the kernel's UIO howto shows.
pub struct UioIrq {
    file: File,
    config: File,
    /// The command register's high byte with INTx enabled (read once at open).
    command_high: u8,
    /// An interrupt was handled (so masked by the driver) since the last unmask.
    masked: bool,
    /// The function's interrupt number (sysfs `irq`), for reports.
    irq: Option<u32>,
}

/// Byte of the command register holding INTx-disable (bit 10 = bit 2 of byte 5).
const COMMAND_HIGH: u64 = 0x05;
const INTX_DISABLE_HIGH: u8 = 0x04;

impl UioIrq {
    /// Opens `/dev/uioN` and the function's sysfs `config`.
    pub fn open(path: &Path, sysfs: &Path) -> Result<Self, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg = sysfs.join("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg)
            .map_err(|e| format!("{}: {e}", cfg.display()))?;
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 1];
        config
            .read_exact_at(&mut b, COMMAND_HIGH)
            .map_err(|e| format!("read PCI command: {e}"))?;
        Ok(UioIrq {
            file,
            config,
            command_high: b[0] & !INTX_DISABLE_HIGH,
            // Unmask once at start, whatever state the device was left in.
            masked: true,
            irq: std::fs::read_to_string(sysfs.join("irq"))
                .ok()
                .and_then(|t| t.trim().parse().ok()),
        })
    }

    /// Unmasks the interrupt if the driver's handler masked it since the last call: one
    /// configuration write per handled interrupt, nothing otherwise (each access to the
    /// configuration space exits to the driver VM's VMM).
    pub fn enable(&mut self) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        if self.masked {
            self.config
                .write_all_at(&[self.command_high], COMMAND_HIGH)
                .map_err(|e| format!("write PCI command: {e}"))?;
            self.masked = false;
        }
        Ok(())
    }

    /// For a report: whether this side believes INTx masked, and whether the device's
    /// command register has it disabled (a configuration read: an exit, so not on a fast path).
    pub fn describe(&self) -> String {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 1];
        let device = match self.config.read_exact_at(&mut b, COMMAND_HIGH) {
            Ok(()) => format!("{}", b[0] & INTX_DISABLE_HIGH != 0),
            Err(e) => format!("unknown ({e})"),
        };
        // What the kernel saw of the line: interrupts taken, and of them those no handler
        // claimed.
        let kernel = self.irq.map_or_else(
            || "irq unknown".to_string(),
            |n| {
                let spurious = std::fs::read_to_string(format!("/proc/irq/{n}/spurious"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                format!("irq {n}: {spurious}")
            },
        );
        format!(
            "masked here {}, INTx disabled in the device {device}; {kernel}",
            self.masked
        )
    }

    /// Consumes the interrupt count (call when readable): the handler has masked INTx.
    pub fn ack(&mut self) {
        let mut b = [0u8; 4];
        let _ = self.file.read(&mut b);
        self.masked = true;
    }

    /// Waits up to `timeout_ms` for the interrupt or for `other` to become readable (`None`:
    /// the interrupt alone), acknowledging the interrupt if it came.
    pub fn wait(&mut self, other: Option<i32>, timeout_ms: i32) -> Woken {
        let mut fds = [
            libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call
        // (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        let woken = Woken {
            irq: n > 0 && fds[0].revents & libc::POLLIN != 0,
            irq_error: n > 0 && fds[0].revents & !libc::POLLIN != 0,
            other: n > 0 && fds[1].revents & libc::POLLIN != 0,
        };
        if woken.irq {
            self.ack();
        }
        woken
    }
}

/// What ended a [`UioIrq::wait`] (all false: the timeout).
#[derive(Debug, Clone, Copy)]
pub struct Woken {
    /// The interrupt (acknowledged).
    pub irq: bool,
    /// The interrupt descriptor reported an error.
    pub irq_error: bool,
    /// The other descriptor is readable.
    pub other: bool,
}
