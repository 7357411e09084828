//! Snapshot and restore of a whole VM: the vCPUs ([`vcpu`]), KVM's interrupt controllers, PIT
//! and clock ([`vm`]), every device's state, and guest RAM ([`memory`]).
//!
//! A snapshot is a directory with two files:
//!
//! - `state`: one header line `ddvmm-snapshot <format> <crc32> <length>` and then `length`
//!   bytes of JSON ([`SnapshotState`]) whose CRC-32 is `crc32`. It names the ddvmm version, the
//!   CPU it was taken on and the machine's shape; a restore refuses a snapshot whose header,
//!   checksum, version, CPU or shape does not match, with a one-line error, before any vCPU runs.
//! - `memory`: guest RAM in the layout of the RAM memfd (see [`crate::memory::ram_ranges`]),
//!   sparse (pages that were never written stay holes), followed by one page whose first 16
//!   bytes are a trailer: `DDVMMMEM` and the snapshot's random id, which `state` also holds.
//!   A restore maps it copy-on-write (`MAP_PRIVATE`): every restore of one snapshot starts from
//!   the same clean image and costs only the pages the guest touches.
//!
//! The files are created (and the old ones emptied) before the VMM is confined
//! ([`SnapshotTarget::create`]) and written later through the open descriptors, so a confined
//! VMM needs no `open`. `state` is written last: a snapshot cut short is refused, not resumed.

pub mod memory;
pub mod vcpu;
pub mod vm;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use vcpu::VcpuState;
pub use vm::VmState;

/// Version of the snapshot format (the files and [`SnapshotState`]).
pub const FORMAT: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
const HEADER_WORD: &str = "ddvmm-snapshot";
/// Largest state file accepted (vCPU state is ~10 KiB per vCPU).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// Bytes of the page after guest RAM in the memory file that carry the trailer.
pub const TRAILER_MAGIC: &[u8; 8] = b"DDVMMMEM";
/// The size of the XSAVE area `kvm_xsave` can carry (KVM's legacy 4 KiB).
const KVM_XSAVE_BYTES: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

/// Errors taking or restoring a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file or directory operation failed.
    #[error("snapshot {path}: cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A KVM list could not be built.
    #[error("cannot build a KVM list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// The files are not an intact snapshot.
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot was taken elsewhere or of another machine.
    #[error("snapshot {path} does not fit: {what} is {snapshot} in the snapshot, {here} here")]
    Mismatch {
        /// The snapshot directory.
        path: PathBuf,
        /// What differs.
        what: &'static str,
        /// Its value in the snapshot.
        snapshot: String,
        /// Its value here.
        here: String,
    },
    /// The state cannot be encoded.
    #[error("cannot encode the snapshot state")]
    Encode(#[source] serde_json::Error),
    /// A device cannot save or restore its state.
    #[error("device {device}: {reason}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
    /// This machine cannot be snapshotted.
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// The host's XSAVE area does not fit `KVM_GET_XSAVE`.
    #[error("the host's XSAVE area is {0} bytes (AMX?); snapshots handle at most 4096")]
    XsaveTooLarge(usize),
    /// The vCPUs did not pause.
    #[error("the vCPUs did not pause within {0} ms")]
    PauseTimeout(u64),
}

impl SnapshotError {
    /// A device error.
    pub fn device(device: impl Into<String>, reason: impl Into<String>) -> Self {
        SnapshotError::Device {
            device: device.into(),
            reason: reason.into(),
        }
    }
}

/// Where and on what a snapshot was taken: a restore needs all of it to match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// [`FORMAT`].
    pub format: u32,
    /// The ddvmm version that took it.
    pub ddvmm: String,
    /// CPUID vendor string of the host as KVM reports it.
    pub cpu_vendor: String,
    /// CPUID leaf 1 EAX (family, model, stepping).
    pub cpu_signature: u32,
}

impl Identity {
    /// This ddvmm on this host.
    pub fn of_host(kvm: &Kvm) -> Result<Self, SnapshotError> {
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| SnapshotError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied();
        let vendor = leaf(0)
            .map(|e| {
                let mut b = Vec::with_capacity(12);
                for r in [e.ebx, e.edx, e.ecx] {
                    b.extend_from_slice(&r.to_le_bytes());
                }
                String::from_utf8_lossy(&b).into_owned()
            })
            .unwrap_or_default();
        Ok(Identity {
            format: FORMAT,
            ddvmm: env!("CARGO_PKG_VERSION").to_string(),
            cpu_vendor: vendor,
            cpu_signature: leaf(1).map(|e| e.eax).unwrap_or(0),
        })
    }
}

/// Refuses hosts whose XSAVE area is larger than `kvm_xsave` (which [`VcpuState`] relies on
/// for `KVM_SET_XSAVE` to be sound).
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), SnapshotError> {
    let size = kvm.check_extension_int(Cap::Xsave2);
    match usize::try_from(size) {
        Ok(s) if s > KVM_XSAVE_BYTES => Err(SnapshotError::XsaveTooLarge(s)),
        _ => Ok(()),
    }
}

/// The parts of a machine a restore must rebuild identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// Every device, in the order the machine builds them.
    pub devices: Vec<String>,
}

/// Everything in `state`.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Taken by whom, on what.
    pub identity: Identity,
    /// Of what.
    pub shape: Shape,
    /// Random id, also in the memory file's trailer.
    pub memory_id: u64,
    /// KVM's VM-wide state.
    pub vm: VmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The devices' states, keyed by the machine.
    pub devices: serde_json::Value,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A snapshot directory opened for writing before the VMM is confined.
pub struct SnapshotTarget {
    dir: PathBuf,
    state: File,
    memory: File,
}

impl SnapshotTarget {
    /// Creates `dir` (mode 0700) if needed and opens both files, emptied.
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the directory", dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(io("create", &path))
        };
        // State first: from here until the snapshot is complete, the directory holds none.
        let state = open(STATE_FILE)?;
        let memory = open(MEMORY_FILE)?;
        Ok(SnapshotTarget {
            dir: dir.to_path_buf(),
            state,
            memory,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes guest RAM from `ram` (the RAM memfd, `size` bytes) and then the state.
    /// Returns the bytes of RAM written (pages that are not all zero).
    pub fn write(
        &self,
        ram: &File,
        size: u64,
        state: &mut SnapshotState,
    ) -> Result<u64, SnapshotError> {
        let mem_path = self.dir.join(MEMORY_FILE);
        let state_path = self.dir.join(STATE_FILE);
        self.state.set_len(0).map_err(io("truncate", &state_path))?;
        let written = memory::dump(ram, size, &self.memory, state.memory_id)
            .map_err(io("write", &mem_path))?;
        state.shape.mem_size = size;
        let json = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
        let header = format!(
            "{HEADER_WORD} {FORMAT} {:08x} {}\n",
            crc32fast::hash(&json),
            json.len()
        );
        let mut f = &self.state;
        f.write_all(header.as_bytes())
            .and_then(|()| f.write_all(&json))
            .map_err(io("write", &state_path))?;
        Ok(written)
    }
}

/// A snapshot read back and checked, ready to restore.
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// The state.
    pub state: SnapshotState,
    /// The memory file (to map copy-on-write).
    pub memory: File,
}

impl Snapshot {
    /// Reads and checks the snapshot in `dir` against this host: header, checksum, format,
    /// ddvmm version, CPU, and the memory file's size and trailer.
    pub fn open(dir: &Path, host: &Identity) -> Result<Self, SnapshotError> {
        let s = Self::read(dir)?;
        let mismatch = |what, snapshot: String, here: String| SnapshotError::Mismatch {
            path: dir.to_path_buf(),
            what,
            snapshot,
            here,
        };
        let id = &s.state.identity;
        if id.ddvmm != host.ddvmm {
            return Err(mismatch(
                "the ddvmm version",
                id.ddvmm.clone(),
                host.ddvmm.clone(),
            ));
        }
        if (&id.cpu_vendor, id.cpu_signature) != (&host.cpu_vendor, host.cpu_signature) {
            return Err(mismatch(
                "the CPU",
                format!("{} {:#x}", id.cpu_vendor, id.cpu_signature),
                format!("{} {:#x}", host.cpu_vendor, host.cpu_signature),
            ));
        }
        Ok(s)
    }

    /// Reads the snapshot in `dir` and checks that it is intact (header, checksum, format,
    /// the memory file's size and trailer), not where it may run.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        let corrupt = |reason: String| SnapshotError::Corrupt {
            path: state_path.clone(),
            reason,
        };
        let file = File::open(&state_path).map_err(io("open", &state_path))?;
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io("read", &state_path))?;
        let nl = bytes
            .iter()
            .take(128)
            .position(|b| *b == b'\n')
            .ok_or_else(|| corrupt("no header line (empty or cut short?)".into()))?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("bad header".into()))?;
        let words: Vec<&str> = header.split(' ').collect();
        let [word, format, crc, len] = words[..] else {
            return Err(corrupt(format!("bad header '{header}'")));
        };
        if word != HEADER_WORD {
            return Err(corrupt(format!("bad header '{header}'")));
        }
        if format != FORMAT.to_string() {
            return Err(SnapshotError::Mismatch {
                path: dir.to_path_buf(),
                what: "the snapshot format",
                snapshot: format.to_string(),
                here: FORMAT.to_string(),
            });
        }
        let crc = u32::from_str_radix(crc, 16).map_err(|_| corrupt("bad checksum field".into()))?;
        let len: usize = len
            .parse()
            .map_err(|_| corrupt("bad length field".into()))?;
        let json = &bytes[nl + 1..];
        if json.len() != len {
            return Err(corrupt(format!(
                "{} bytes of state, the header says {len}",
                json.len()
            )));
        }
        let actual = crc32fast::hash(json);
        if actual != crc {
            return Err(corrupt(format!(
                "checksum {actual:08x}, the header says {crc:08x}"
            )));
        }
        let state: SnapshotState =
            serde_json::from_slice(json).map_err(|e| corrupt(format!("state: {e}")))?;
        if state.vcpus.len() != state.shape.vcpus as usize {
            return Err(corrupt("vCPU count differs from the shape".into()));
        }
        let mem_path = dir.join(MEMORY_FILE);
        let memory = File::open(&mem_path).map_err(io("open", &mem_path))?;
        memory::check_trailer(&memory, state.shape.mem_size, state.memory_id).map_err(
            |reason| SnapshotError::Corrupt {
                path: mem_path.clone(),
                reason,
            },
        )?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            state,
            memory,
        })
    }

    /// Refuses the snapshot unless the machine being built has its shape.
    pub fn check_shape(&self, here: &Shape) -> Result<(), SnapshotError> {
        self.check_size(here.vcpus, here.mem_size)?;
        self.check_field(
            "the device list",
            &self.state.shape.devices.join(", "),
            &here.devices.join(", "),
        )
    }

    /// Refuses the snapshot unless it has `vcpus` vCPUs and `mem_size` bytes of RAM (checked
    /// before its memory file is mapped; [`Self::check_shape`] checks the devices too).
    pub fn check_size(&self, vcpus: u32, mem_size: u64) -> Result<(), SnapshotError> {
        let s = &self.state.shape;
        self.check_field("the vCPU count", &s.vcpus.to_string(), &vcpus.to_string())?;
        self.check_field(
            "the memory size",
            &s.mem_size.to_string(),
            &mem_size.to_string(),
        )
    }

    fn check_field(
        &self,
        what: &'static str,
        snapshot: &str,
        here: &str,
    ) -> Result<(), SnapshotError> {
        if snapshot == here {
            return Ok(());
        }
        Err(SnapshotError::Mismatch {
            path: self.dir.clone(),
            what,
            snapshot: snapshot.to_string(),
            here: here.to_string(),
        })
    }
}

/// A random 64-bit id (for the memory trailer).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b)
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom`; a failure leaves what was filled and
/// logs, it never blocks for long: the host's pool is initialised long before a VMM runs).
pub fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes owned by us.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "getrandom failed");
            return;
        }
        done += n as usize;
    }
}

/// Reads `len` bytes at `offset` of `file` (test helper and trailer checks).
pub(crate) fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}
