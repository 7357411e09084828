//! One cgroup v2 per VM, under a group of the daemon's own: memory, CPU and pids limits.
//!
//! The daemon finds its cgroup (`/proc/self/cgroup`), moves itself into a `daemon` leaf when
//! that cgroup is not the root (a cgroup that hands controllers to children may hold no
//! process), and creates `ddvmm-<pid>/<vm>` beside it. A VMM joins its cgroup between fork and
//! exec (it writes `0` to `cgroup.procs`), so everything it ever does is charged there. Without a
//! writable cgroup v2 hierarchy (no `cgroup2` mount, no delegation) the daemon says so once and
//! runs VMs without these limits; the rest of the jail does not depend on it.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where the unified hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The controllers the daemon uses.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Cgroup errors.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy to use.
    #[error("no cgroup v2 hierarchy at {CGROUP_ROOT}")]
    Unavailable,
    /// A cgroup file or directory operation failed.
    #[error("cgroup {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory: u64,
    /// `cpu.max`, in CPUs (1.5 = one and a half).
    pub cpus: f64,
    /// `pids.max` (threads count).
    pub pids: u32,
}

/// The daemon's group of VM cgroups.
#[derive(Debug)]
pub struct Cgroups {
    group: PathBuf,
    enabled: Vec<&'static str>,
}

impl Cgroups {
    /// Sets up `ddvmm-<pid>` next to the daemon's own cgroup.
    pub fn setup() -> Result<Self, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.controllers").exists() {
            return Err(CgroupError::Unavailable);
        }
        let own = own_cgroup().ok_or(CgroupError::Unavailable)?;
        let parent = root.join(own.trim_start_matches('/'));
        if own != "/" {
            // The daemon leaves its cgroup for a leaf, so the cgroup can hand out controllers.
            let leaf = parent.join("daemon");
            mkdir(&leaf)?;
            write(&leaf.join("cgroup.procs"), "0")?;
        }
        let available =
            std::fs::read_to_string(parent.join("cgroup.controllers")).map_err(io(&parent))?;
        let enabled: Vec<&'static str> = CONTROLLERS
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .collect();
        let plus = |dir: &Path| -> Result<(), CgroupError> {
            let list: Vec<String> = enabled.iter().map(|c| format!("+{c}")).collect();
            write(&dir.join("cgroup.subtree_control"), &list.join(" "))
        };
        plus(&parent)?;
        remove_stale(&parent);
        let group = parent.join(format!("ddvmm-{}", std::process::id()));
        mkdir(&group)?;
        plus(&group)?;
        Ok(Cgroups { group, enabled })
    }

    /// Creates (or reuses) VM `name`'s cgroup with `limits`; returns its `cgroup.procs`.
    pub fn vm(&self, name: &str, limits: &Limits) -> Result<CString, CgroupError> {
        let dir = self.group.join(name);
        mkdir(&dir)?;
        if self.enabled.contains(&"memory") {
            write(&dir.join("memory.max"), &limits.memory.to_string())?;
        }
        if self.enabled.contains(&"cpu") {
            let period = 100_000u64;
            let quota = ((limits.cpus * period as f64) as u64).max(1000);
            let quota = format!("{quota} {period}");
            write(&dir.join("cpu.max"), &quota)?;
        }
        if self.enabled.contains(&"pids") {
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
        }
        let procs = dir.join("cgroup.procs");
        crate::sandbox::jail::c_path(&procs).ok_or_else(|| CgroupError::Io {
            path: procs.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })
    }

    /// Removes VM `name`'s cgroup (its process must have ended).
    pub fn remove_vm(&self, name: &str) {
        let dir = self.group.join(name);
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "removing a VM cgroup");
            }
        }
    }

    /// Removes every VM cgroup and the group (their processes must have ended).
    pub fn remove(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.group) {
            for e in dir.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.group);
    }

    /// The group directory.
    pub fn group(&self) -> &Path {
        &self.group
    }
}

/// Removes the groups of daemons that are gone (`ddvmm-<pid>` with no such process; a
/// daemon killed with SIGKILL cannot remove its own). Only empty cgroups can be removed, so a
/// group that still holds a process stays.
fn remove_stale(parent: &Path) {
    let Ok(dir) = std::fs::read_dir(parent) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("ddvmm-")) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let stale = Cgroups {
            group: e.path(),
            enabled: Vec::new(),
        };
        stale.remove();
    }
}

/// This process's cgroup v2 path ("/" for the root).
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io(dir)(e)),
        _ => Ok(()),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

/// Joins the cgroup whose `cgroup.procs` is `procs`: for `pre_exec` (only open, write and
/// close, all async-signal-safe; no allocation).
pub fn join(procs: &CString) -> std::io::Result<()> {
    // SAFETY: `procs` is a valid C string; the descriptor is closed before returning.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to the descriptor opened above.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(fd) };
    if n != 1 {
        return Err(err);
    }
    Ok(())
}
