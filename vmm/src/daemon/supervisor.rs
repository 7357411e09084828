//! The supervisor: one VMM process per VM, started, watched and stopped by the daemon.
//!
//! The daemon owns every channel's resources (memfd, kick and doorbell eventfds) so that they
//! outlive any one VMM process, and hands them to the two processes of the channel by
//! inheritance ([`crate::handoff`]). Each child is a `ddvmm run` of this very binary, with
//! `PR_SET_PDEATHSIG` so a daemon that dies takes its VMs with it (no orphans), and a control
//! socket ([`crate::control`]) the daemon uses to replay, quarantine and inject faults. A
//! child's exit only changes that VM's state, except that a driver VM's unexpected exit is a
//! fault handled by [`super::recovery`]: the daemon stays up.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use super::cgroup::{self, Cgroups};
pub use super::channels::format_mac;
use super::channels::{seal_size, Channel, Port, Slot, Spare};
use super::config::{RecoveryConfig, Role, SystemConfig, VmConfig};
use super::detection::Detection;
use super::fault_log::FaultBook;
use super::standby::Standby;
use crate::control::{ControlClient, ControlError, ControlReply, ControlRequest, FaultKind};
use crate::devices::virtio::block::ring_frontend::RING_PARAMS;
use crate::devices::virtio::net::ring_frontend::NET_RING_PARAMS;
use crate::memory::create_memfd;
use crate::stats_page;
use ddvmm_translation::ring::RingParams;

/// How long a VM gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors of supervisor operations (API-visible).
#[derive(Debug, Error)]
pub enum SupervisorError {
    /// No VM of that name.
    #[error("no VM named '{0}'")]
    UnknownVm(String),
    /// Start of a running VM.
    #[error("VM '{0}' is already running")]
    AlreadyRunning(String),
    /// Stop of a VM that is not running.
    #[error("VM '{0}' is not running")]
    NotRunning(String),
    /// Setting up channel resources failed.
    #[error("channel {what}")]
    Channel {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The operation needs a driver VM.
    #[error("VM '{0}' is not a driver VM")]
    NotDriver(String),
    /// The driver VM is being recovered or is quarantined.
    #[error("driver VM '{0}' is {1}")]
    Busy(String, &'static str),
    /// The VMM process refused or failed a control request.
    #[error("VM '{name}' control")]
    Control {
        /// VM.
        name: String,
        /// Cause.
        #[source]
        source: ControlError,
    },
    /// A wait ran out.
    #[error("{0}")]
    Timeout(String),
    /// The VMs to add do not fit the running system's configuration.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// A client to add needs a channel slot its driver VM does not have free.
    #[error("driver VM '{0}' has no free channel slot (give it more with spare_channels)")]
    NoSlot(String),
    /// A driver VM to remove still serves clients.
    #[error("driver VM '{0}' still serves {1} (remove them first, or force)")]
    InUse(String, String),
    /// The VMM process could not be started.
    #[error("cannot start VM '{name}'")]
    Spawn {
        /// VM.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A VM's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Not started (or stopped through the API).
    Stopped,
    /// Its VMM process runs.
    Running,
    /// Its VMM process ended on its own.
    Exited,
    /// A driver VM given up after too many restarts (its clients' I/O fails).
    Quarantined,
}

/// A driver VM's clean template: a snapshot made at a boot once its agents were ready and
/// parked, before they served anything (see [`crate::snapshot`]).
pub(super) struct Template {
    /// Its directory (outside the VM's jail).
    pub(super) dir: PathBuf,
    /// Restores from it so far.
    pub(super) restores: u32,
    /// When the boot that writes it started (`None`: no template, or it is not to be used).
    pub(super) made: Option<Instant>,
}

/// A VMM process just spawned, not yet a VM's running process.
pub(super) struct Spawned {
    pub(super) child: tokio::process::Child,
    pub(super) control: ControlClient,
}

/// How a VM's process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Boot {
    /// Boot the kernel.
    Cold,
    /// Boot the kernel and write the VM's template once its agents are parked.
    MakeTemplate,
    /// Restore the VM's template.
    Restore,
}

pub(super) struct Vm {
    pub(super) cfg: VmConfig,
    /// The template of a driver VM that restarts by restoring one.
    pub(super) template: Option<Template>,
    /// Its VMM's uid and gid.
    ids: u32,
    /// Its jail's root (an empty directory of the daemon's).
    jail_root: PathBuf,
    /// Its cgroup's `cgroup.procs`, when the host gives the daemon cgroups.
    cgroup: Option<CString>,
    pub(super) state: VmState,
    pub(super) pid: Option<u32>,
    pub(super) starts: u64,
    pub(super) last_exit: Option<String>,
    /// How the last process ended, as a fault detection.
    pub(super) last_detection: Option<Detection>,
    since: SystemTime,
    /// When the current process started.
    pub(super) started_at: Instant,
    pub(super) stats: File,
    /// Changes when the running process exits.
    pub(super) exited: Option<watch::Receiver<bool>>,
    /// Signals for the running process, sent by the task that owns (and alone reaps) it.
    signals: Option<tokio::sync::mpsc::UnboundedSender<libc::c_int>>,
    /// The running process's control connection.
    pub(super) control: Option<Arc<tokio::sync::Mutex<ControlClient>>>,
    /// A recovery of this driver VM is under way.
    pub(super) recovering: bool,
    /// The running process was started by a recovery (its boot is timed there, not as cold).
    pub(super) started_by_recovery: bool,
    /// The last injected fault not yet detected, and when.
    pub(super) injected: Option<(FaultKind, Instant)>,
    /// Its template restored ahead of time, waiting to be resumed.
    pub(super) standby: Option<Standby>,
    /// The template (when it was made) and process start the last standby was spawned for:
    /// one attempt per pair.
    pub(super) standby_for: Option<(Instant, u64)>,
    /// Being removed: it must not start again.
    pub(super) removing: bool,
}

impl Vm {
    /// Its jail's root directory.
    pub(super) fn jail_root(&self) -> &Path {
        &self.jail_root
    }
}

/// What `list` reports per VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Driver or client.
    pub role: Role,
    /// State.
    pub state: VmState,
    /// Process id while running: the jail's reaper, which ends as the VMM ends.
    pub pid: Option<u32>,
    /// The VMM's own process id (host view; PID 1 of its namespace), once it runs.
    pub vmm_pid: Option<u32>,
    /// Times started.
    pub starts: u64,
    /// How the last process ended.
    pub last_exit: Option<String>,
    /// Seconds in the current state.
    pub seconds_in_state: u64,
}

/// The supervisor's shared state.
pub struct Supervisor {
    exe: PathBuf,
    state_dir: PathBuf,
    /// The VMs' cgroups (none when the host has no usable cgroup v2).
    cgroups: Option<Cgroups>,
    inner: Mutex<Inner>,
    pub(super) recovery: RecoveryConfig,
    pub(super) book: Mutex<FaultBook>,
}

pub(super) struct Inner {
    pub(super) vms: BTreeMap<String, Vm>,
    pub(super) channels: Vec<Channel>,
    /// Slots that serve nobody.
    pub(super) spare: Vec<Spare>,
    pub(super) order: Vec<String>,
    /// The configuration the VMs were made from, with runtime changes.
    pub(super) config: SystemConfig,
    /// VMs made so far (each VMM gets uid `uid_base` + this at its making).
    made: usize,
    /// Bytes of channel memory per slot.
    slot_size: u64,
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Channel { what, source }
}

impl Supervisor {
    /// Creates channel resources, jail directories and cgroups for `cfg`; starts nothing.
    /// `state_dir` (the daemon's, mode 0700) receives logs and the jail directories.
    pub fn new(
        cfg: &SystemConfig,
        exe: PathBuf,
        state_dir: PathBuf,
    ) -> Result<Arc<Self>, SupervisorError> {
        // Also with no VM yet: VMs can be added at runtime.
        let cgroups = match Cgroups::setup() {
            Ok(c) => {
                tracing::info!(group = %c.group().display(), "VM cgroups");
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "VMs run without cgroup limits (memory, CPU, pids)");
                None
            }
        };
        let mem_size = |params: RingParams| -> Result<u64, SupervisorError> {
            let total = params
                .layout()
                .map_err(|e| io_ctx("layout")(std::io::Error::other(e)))?
                .total as u64;
            Ok(total.next_power_of_two())
        };
        // One size for every slot: any slot can serve a disk or a NIC.
        let slot_size = mem_size(RING_PARAMS)?.max(mem_size(NET_RING_PARAMS)?);
        let sup = Arc::new(Supervisor {
            exe,
            state_dir,
            cgroups,
            inner: Mutex::new(Inner {
                vms: BTreeMap::new(),
                channels: Vec::new(),
                spare: Vec::new(),
                order: Vec::new(),
                config: cfg.clone(),
                made: 0,
                slot_size,
            }),
            recovery: cfg.recovery.clone(),
            book: Mutex::new(FaultBook::default()),
        });
        {
            let mut g = sup.lock();
            for v in cfg.vms() {
                sup.provision(&mut g, v, cfg)?;
            }
        }
        Ok(sup)
    }

    /// Makes what VM `v` of configuration `cfg` needs, and records it (stopped): a driver VM's
    /// slots (one per client port `cfg` gives it, plus its spares), a client's channels (on
    /// its driver VMs' free slots, lowest first: all or none), a stats page, a jail directory
    /// and a cgroup.
    pub(super) fn provision(
        &self,
        inner: &mut Inner,
        v: &VmConfig,
        cfg: &SystemConfig,
    ) -> Result<(), SupervisorError> {
        let ports = Port::of_client(v);
        for (driver, _) in &ports {
            let needed = ports.iter().filter(|(d, _)| d == driver).count();
            let free = inner.spare.iter().filter(|s| s.driver == *driver).count();
            if free < needed {
                return Err(SupervisorError::NoSlot(driver.clone()));
            }
        }
        let stats = create_memfd(c"ddvmm-stats")
            .map_err(|e| io_ctx("stats page")(std::io::Error::other(e)))?;
        stats
            .set_len(stats_page::PAGE_SIZE)
            .map_err(io_ctx("stats page"))?;
        seal_size(&stats).map_err(io_ctx("stats page seals"))?;
        let jail_root = self.state_dir.join("jail").join(&v.name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&jail_root)
            .map_err(|source| SupervisorError::Spawn {
                name: v.name.clone(),
                source,
            })?;
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.vm(&v.name, &v.limits)
                    .map_err(|e| SupervisorError::Spawn {
                        name: v.name.clone(),
                        source: std::io::Error::other(e),
                    })?,
            ),
            None => None,
        };
        if v.role == Role::Driver {
            let served = cfg
                .clients
                .iter()
                .flat_map(Port::of_client)
                .filter(|(d, _)| *d == v.name)
                .count();
            let count = served + v.spare_channels as usize;
            for index in 0..count {
                let slot = Slot::new(&v.name, index, inner.slot_size)
                    .map_err(io_ctx(format!("{}-{index}", v.name)))?;
                inner.spare.push(Spare {
                    driver: v.name.clone(),
                    slot,
                });
            }
        }
        for (client_index, (driver, port)) in ports.into_iter().enumerate() {
            let at = inner
                .spare
                .iter()
                .enumerate()
                .filter(|(_, s)| s.driver == driver)
                .min_by_key(|(_, s)| s.slot.index)
                .map(|(i, _)| i)
                .ok_or_else(|| SupervisorError::NoSlot(driver.clone()))?;
            let Spare { driver, slot } = inner.spare.swap_remove(at);
            inner.channels.push(Channel {
                driver,
                client: v.name.clone(),
                client_index,
                slot,
                port,
            });
        }
        let has_slots = inner.spare.iter().any(|s| s.driver == v.name)
            || inner.channels.iter().any(|c| c.driver == v.name);
        let template = (v.role == Role::Driver
            && has_slots
            && v.passthrough.is_empty()
            && self.recovery.restore_from_template)
            .then(|| Template {
                dir: self.state_dir.join("templates").join(&v.name),
                restores: 0,
                made: None,
            });
        let ids = cfg.uid_base + inner.made as u32;
        inner.made += 1;
        inner.order.push(v.name.clone());
        inner.vms.insert(
            v.name.clone(),
            Vm {
                template,
                ids,
                jail_root,
                cgroup,
                cfg: v.clone(),
                state: VmState::Stopped,
                pid: None,
                starts: 0,
                last_exit: None,
                last_detection: None,
                since: SystemTime::now(),
                started_at: Instant::now(),
                stats,
                exited: None,
                signals: None,
                control: None,
                recovering: false,
                started_by_recovery: false,
                injected: None,
                standby: None,
                standby_for: None,
                removing: false,
            },
        );
        Ok(())
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VM names with a role, in configuration order.
    pub fn names(&self, role: Role) -> Vec<String> {
        let g = self.lock();
        g.order
            .iter()
            .filter(|n| g.vms.get(*n).is_some_and(|v| v.cfg.role == role))
            .cloned()
            .collect()
    }

    /// State of every VM.
    pub fn list(&self) -> Vec<VmInfo> {
        let g = self.lock();
        g.order
            .iter()
            .filter_map(|n| g.vms.get(n))
            .map(|v| VmInfo {
                name: v.cfg.name.clone(),
                role: v.cfg.role,
                state: v.state.clone(),
                pid: v.pid,
                vmm_pid: v.pid.and_then(crate::sandbox::jail::vmm_pid),
                starts: v.starts,
                last_exit: v.last_exit.clone(),
                seconds_in_state: v.since.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            })
            .collect()
    }

    /// Per-VM device counters: what each VMM published, and each channel's ring header.
    pub fn stats(&self) -> serde_json::Value {
        let g = self.lock();
        let mut out = serde_json::Map::new();
        for name in &g.order {
            let Some(v) = g.vms.get(name) else { continue };
            let devices = stats_page::read(&v.stats).unwrap_or(serde_json::Value::Null);
            let channels: Vec<serde_json::Value> = g
                .channels
                .iter()
                .filter(|c| c.client == *name || c.driver == *name)
                .map(Channel::stats)
                .collect();
            out.insert(
                name.clone(),
                serde_json::json!({ "devices": devices, "channels": channels }),
            );
        }
        serde_json::Value::Object(out)
    }

    /// Starts VM `name`'s VMM process, booting it (a driver VM with a template makes it anew).
    pub fn start(self: &Arc<Self>, name: &str) -> Result<(), SupervisorError> {
        let boot = match self.lock().vms.get(name).map(|v| v.template.is_some()) {
            Some(true) => Boot::MakeTemplate,
            _ => Boot::Cold,
        };
        self.start_as(name, boot)
    }

    /// How a driver VM restarts: a restore of its template if it has a usable one, else a
    /// boot (that makes a template where it can), with the reason it is not a restore.
    pub(super) fn restart_boot(&self, name: &str) -> (Boot, Option<String>) {
        // The policy under the lock; the template's files are read without it.
        let checked = {
            let g = self.lock();
            let Some(t) = g.vms.get(name).and_then(|v| v.template.as_ref()) else {
                return (Boot::Cold, None);
            };
            match t.made {
                None => Err("no template".to_string()),
                Some(_) if t.restores >= self.recovery.template_max_restores => {
                    Err(format!("template renewed after {} restores", t.restores))
                }
                Some(at) if at.elapsed().as_secs() >= self.recovery.template_max_age_s => Err(
                    format!("template renewed after {} s", at.elapsed().as_secs()),
                ),
                Some(_) => Ok(t.dir.clone()),
            }
        };
        let why = checked.and_then(|dir| {
            crate::snapshot::Snapshot::read(&dir)
                .map(drop)
                .map_err(|e| format!("template refused: {e}"))
        });
        let mut g = self.lock();
        let Some(t) = g.vms.get_mut(name).and_then(|v| v.template.as_mut()) else {
            return (Boot::Cold, None);
        };
        match why {
            Ok(()) => {
                t.restores += 1;
                (Boot::Restore, None)
            }
            Err(why) => {
                t.made = None;
                (Boot::MakeTemplate, Some(why))
            }
        }
    }

    /// Marks `name`'s template unusable (a restore from it failed): the next restart boots.
    pub(super) fn drop_template(&self, name: &str) {
        if let Some(t) = self
            .lock()
            .vms
            .get_mut(name)
            .and_then(|v| v.template.as_mut())
        {
            t.made = None;
        }
    }

    /// Starts VM `name`'s VMM process the way `boot` says.
    pub(super) fn start_as(
        self: &Arc<Self>,
        name: &str,
        boot: Boot,
    ) -> Result<(), SupervisorError> {
        let mut g = self.lock();
        let inner = &mut *g;
        match inner.vms.get(name) {
            None => return Err(SupervisorError::UnknownVm(name.to_string())),
            Some(vm) if vm.state == VmState::Running => {
                return Err(SupervisorError::AlreadyRunning(name.to_string()))
            }
            Some(vm) if vm.removing => {
                return Err(SupervisorError::Busy(name.to_string(), "being removed"))
            }
            Some(_) => {}
        }
        let spawned = self.spawn_vmm(inner, name, &boot, false)?;
        if let Some(vm) = inner.vms.get_mut(name) {
            self.adopt(vm, name, spawned, &boot);
        }
        Ok(())
    }

    /// Spawns a VMM process for VM `name` (`standby`: a restore that waits for `resume`).
    pub(super) fn spawn_vmm(
        &self,
        inner: &mut Inner,
        name: &str,
        boot: &Boot,
        standby: bool,
    ) -> Result<Spawned, SupervisorError> {
        let vm = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
        let (control_here, control_child) =
            std::os::unix::net::UnixStream::pair().map_err(io_ctx(format!("{name} control")))?;
        let mut cmd = std::process::Command::new(&self.exe);
        let mut fds = vec![vm.stats.as_raw_fd(), control_child.as_raw_fd()];
        let console = vm
            .cfg
            .console
            .clone()
            .unwrap_or_else(|| self.state_dir.join(format!("{name}.console")));
        cmd.arg("--log-level")
            .arg("info")
            .arg("run")
            .arg("--kernel")
            .arg(&vm.cfg.kernel)
            .arg("--cmdline")
            .arg(vm.cfg.boot_cmdline(&self.recovery))
            .arg("--mem")
            .arg(format!("{}K", vm.cfg.memory >> 10))
            .arg("--cpus")
            .arg(vm.cfg.cpus.to_string())
            .arg("--console")
            .arg(&console)
            .arg("--console-limit")
            .arg(format!("{}K", vm.cfg.console_limit.div_ceil(1024)))
            .arg("--jail-root")
            .arg(&vm.jail_root)
            .arg("--uid")
            .arg(vm.ids.to_string())
            .arg("--gid")
            .arg(vm.ids.to_string())
            .arg("--stats-fd")
            .arg(vm.stats.as_raw_fd().to_string())
            .arg("--control-fd")
            .arg(control_child.as_raw_fd().to_string());
        if let Some(initrd) = &vm.cfg.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        match (boot, vm.template.as_mut()) {
            (Boot::MakeTemplate, Some(t)) => {
                cmd.arg("--snapshot-to").arg(&t.dir);
                t.made = Some(Instant::now());
                t.restores = 0;
            }
            (Boot::Restore, Some(t)) => {
                cmd.arg("--restore").arg(&t.dir);
                if standby {
                    cmd.arg("--standby");
                }
            }
            _ => {}
        }
        for d in &vm.cfg.disks {
            let mut spec = d.clone().into_os_string();
            spec.push(vm.cfg.disk_limits.options());
            cmd.arg("--disk").arg(spec);
        }
        for a in &vm.cfg.passthrough {
            cmd.arg("--vfio").arg(a.to_string());
        }
        for t in &vm.cfg.taps {
            cmd.arg("--net").arg(format!("tap={t}"));
        }
        match vm.cfg.role {
            // Every slot, by index: the device layout never changes (snapshots rely on it).
            Role::Driver => {
                let mut slots: Vec<(usize, String)> = Vec::new();
                for c in inner.channels.iter().filter(|c| c.driver == name) {
                    fds.extend(c.slot.fds());
                    let spec = format!("{},{}", c.slot.fd_spec(), c.port.device_spec());
                    slots.push((c.slot.index, spec));
                }
                for s in inner.spare.iter().filter(|s| s.driver == name) {
                    fds.extend(s.slot.fds());
                    slots.push((s.slot.index, format!("{},vacant", s.slot.fd_spec())));
                }
                slots.sort();
                for (_, spec) in slots {
                    cmd.arg("--channel").arg(spec);
                }
            }
            // Ring disks, then ring NICs, each in configuration order; the process's ring
            // device indices are what control requests name.
            Role::Client => {
                let mut mine: Vec<&mut Channel> = inner
                    .channels
                    .iter_mut()
                    .filter(|c| c.client == name)
                    .collect();
                mine.sort_by_key(|c| (c.port.mac.is_some(), c.client_index));
                for (index, c) in mine.into_iter().enumerate() {
                    c.client_index = index;
                    fds.extend(c.slot.fds());
                    let (arg, spec) = c.client_arg();
                    cmd.arg(arg).arg(spec);
                }
            }
        }
        let log_path = self.state_dir.join(format!("{name}.log"));
        let log = open_log(&log_path).map_err(|source| SupervisorError::Spawn {
            name: name.to_string(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| SupervisorError::Spawn {
            name: name.to_string(),
            source,
        })?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        crate::handoff::inherit(&mut cmd, fds);
        let daemon_pid = std::process::id() as libc::pid_t;
        let cgroup = vm.cgroup.clone();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid, open, write, close); it does not allocate (the cgroup
        // path was made before the fork).
        unsafe {
            cmd.pre_exec(move || {
                // The VM dies with the daemon (no orphans). If the daemon died before the
                // prctl, the parent is no longer the daemon: give up instead of running on.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != daemon_pid {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(procs) = &cgroup {
                    cgroup::join(procs)?;
                }
                Ok(())
            });
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SupervisorError::Spawn {
                name: name.to_string(),
                source,
            })?;
        drop(control_child);
        let control = ControlClient::new(control_here).map_err(|e| SupervisorError::Control {
            name: name.to_string(),
            source: e,
        })?;
        tracing::info!(vm = name, pid = child.id(), ?boot, standby, log = %log_path.display(), "VMM process spawned");
        Ok(Spawned { child, control })
    }

    /// Makes `spawned` VM `name`'s running process: state, control, and the task that reaps
    /// it and reports an unexpected exit.
    pub(super) fn adopt(self: &Arc<Self>, vm: &mut Vm, name: &str, spawned: Spawned, boot: &Boot) {
        let Spawned { mut child, control } = spawned;
        let pid = child.id();
        let (tx, rx) = watch::channel(false);
        let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<libc::c_int>();
        vm.signals = Some(sig_tx);
        vm.state = VmState::Running;
        vm.pid = pid;
        vm.starts += 1;
        vm.since = SystemTime::now();
        vm.started_at = Instant::now();
        vm.started_by_recovery = false;
        vm.exited = Some(rx);
        vm.control = Some(Arc::new(tokio::sync::Mutex::new(control)));
        tracing::info!(vm = name, pid, ?boot, "VM started");
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s,
                    Some(sig) = sig_rx.recv() => {
                        if let Some(pid) = child.id() {
                            send_signal_to_vm(pid, sig);
                        }
                    }
                }
            };
            let (how, detection) = match status {
                Ok(s) => (describe_exit(s), Detection::from_exit(s)),
                Err(e) => (format!("wait failed: {e}"), Detection::VmmError),
            };
            let unexpected_driver_exit = {
                let mut g = me.lock();
                match g.vms.get_mut(&name) {
                    Some(vm) => {
                        let unexpected = vm.state == VmState::Running;
                        if unexpected {
                            vm.state = VmState::Exited;
                        }
                        vm.pid = None;
                        vm.signals = None;
                        vm.control = None;
                        vm.since = SystemTime::now();
                        vm.last_exit = Some(how.clone());
                        vm.last_detection = Some(detection);
                        unexpected && vm.cfg.role == Role::Driver
                    }
                    None => false,
                }
            };
            tracing::warn!(vm = %name, exit = %how, "VM process ended");
            let _ = tx.send(true);
            if unexpected_driver_exit {
                me.fault_detected(&name, detection);
            }
        });
    }

    /// Stops VM `name`: SIGTERM, then SIGKILL after a grace period; returns once it is gone.
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        self.dismiss_standby(name);
        let mut exited = {
            let mut g = self.lock();
            let vm = g
                .vms
                .get_mut(name)
                .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
            if vm.state != VmState::Running {
                return Err(SupervisorError::NotRunning(name.to_string()));
            }
            vm.state = VmState::Stopped;
            Self::send_signal(vm, libc::SIGTERM)
                .ok_or_else(|| SupervisorError::NotRunning(name.to_string()))?
        };
        let gone = tokio::time::timeout(STOP_GRACE, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !gone {
            tracing::warn!(vm = name, "no exit after SIGTERM; SIGKILL");
            self.signal(name, libc::SIGKILL);
            let _ = exited.wait_for(|e| *e).await;
        }
        tracing::info!(vm = name, "VM stopped");
        Ok(())
    }

    /// Sends `sig` to `vm`'s process through the task that owns it; returns the exit watch.
    fn send_signal(vm: &Vm, sig: libc::c_int) -> Option<watch::Receiver<bool>> {
        vm.signals.as_ref()?.send(sig).ok()?;
        vm.exited.clone()
    }

    /// Sends `sig` to VM `name`'s process if it runs; returns its exit watch.
    pub(super) fn signal(&self, name: &str, sig: libc::c_int) -> Option<watch::Receiver<bool>> {
        Self::send_signal(self.lock().vms.get(name)?, sig)
    }

    /// SIGKILLs VM `name`'s process (if it runs) and waits until it is reaped. The VM's state
    /// becomes `Exited`.
    pub(super) async fn kill_and_wait(&self, name: &str) {
        if let Some(mut exited) = self.signal(name, libc::SIGKILL) {
            let _ = exited.wait_for(|e| *e).await;
        }
    }

    /// Sends `req` to VM `name`'s VMM process.
    pub(super) async fn control(
        &self,
        name: &str,
        req: &ControlRequest,
        timeout: Duration,
    ) -> Result<ControlReply, SupervisorError> {
        let conn = {
            let g = self.lock();
            let vm = g
                .vms
                .get(name)
                .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
            vm.control
                .clone()
                .ok_or_else(|| SupervisorError::NotRunning(name.to_string()))?
        };
        let mut c = conn.lock().await;
        c.call(req, timeout)
            .await
            .map_err(|source| SupervisorError::Control {
                name: name.to_string(),
                source,
            })
    }

    /// Starts drivers, then clients.
    pub fn start_all(self: &Arc<Self>) -> Result<(), SupervisorError> {
        for role in [Role::Driver, Role::Client] {
            for name in self.names(role) {
                self.start(&name)?;
            }
        }
        Ok(())
    }

    /// Stops clients first, then driver VMs.
    pub async fn stop_all(&self) {
        for role in [Role::Client, Role::Driver] {
            for name in self.names(role) {
                match self.stop(&name).await {
                    Ok(()) | Err(SupervisorError::NotRunning(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "stop"),
                }
            }
        }
    }

    /// Where logs go.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The VMs' cgroups, if the host gives the daemon any.
    pub(super) fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Removes the VMs' cgroups (after every VM has stopped).
    pub fn remove_cgroups(&self) {
        if let Some(c) = &self.cgroups {
            c.remove();
        }
    }
}

/// Sends `sig` to the VM whose jail reaper is `reaper`: `SIGKILL` straight to the VMM (the only
/// signal that reaches the init of a PID namespace from outside without a handler), so the
/// reaper, and then this daemon, see the VMM's own end; anything else to the reaper, which
/// turns a stop request into a `SIGKILL` of the VMM.
pub(super) fn send_signal_to_vm(reaper: u32, sig: libc::c_int) {
    if sig == libc::SIGKILL && kill_vmm_of(reaper) {
        return;
    }
    // SAFETY: kill only sends a signal. The caller owns the reaper and is the only one that
    // reaps it, and passes its pid only until then, so `reaper` still names our child.
    unsafe { libc::kill(reaper as libc::pid_t, sig) };
}

/// SIGKILLs the VMM under `reaper` through a pidfd; false if it has not been forked yet or is
/// gone. The pidfd pins the process: if it is still the reaper's child after the pidfd was
/// opened, the signal reaches that process, never a reused pid.
fn kill_vmm_of(reaper: u32) -> bool {
    use std::os::fd::FromRawFd;
    let Some(vmm) = crate::sandbox::jail::vmm_pid(reaper) else {
        return false;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, vmm as libc::pid_t, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if crate::sandbox::jail::vmm_pid(reaper) != Some(vmm) {
        return false;
    }
    // SAFETY: pidfd_send_signal sends a signal through a descriptor we own; no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

/// Largest a VM's log file grows before it is rotated at the VM's next start (each VMM process
/// also caps what it writes: `ddvmm run`'s log limiter).
const LOG_ROTATE_BYTES: u64 = 64 << 20;

/// Opens VM log `path` for appending (never through a symlink), first moving a log past
/// [`LOG_ROTATE_BYTES`] to `<path>.1`.
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() > LOG_ROTATE_BYTES) {
        std::fs::rename(path, path.with_extension("log.1"))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(0), _) => "exit 0 (guest powered off)".into(),
        (Some(3), _) => "exit 3 (guest rebooted)".into(),
        (Some(4), _) => "exit 4 (guest kernel panic)".into(),
        (Some(5), _) => "exit 5 (guest crashed)".into(),
        (Some(c), _) => format!("exit {c} (VMM error)"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}
