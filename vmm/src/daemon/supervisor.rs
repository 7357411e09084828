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
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ddvmm_translation::ring::HeaderView;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use vmm_sys_util::eventfd::EventFd;

use super::cgroup::{self, Cgroups};
use super::config::{RecoveryConfig, Role, SystemConfig, VmConfig};
use super::detection::Detection;
use super::fault_log::FaultBook;
use super::standby::Standby;
use crate::control::{ControlClient, ControlError, ControlReply, ControlRequest, FaultKind};
use crate::devices::virtio::block::ring_frontend::RING_PARAMS;
use crate::devices::virtio::net::ring_frontend::NET_RING_PARAMS;
use crate::devices::virtio::ring::RateLimit;
use crate::memory::create_memfd;
use crate::stats_page;
use ddvmm_translation::channel::DEFAULT_WEIGHT;
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

/// One channel: a client disk served by a driver VM.
pub(super) struct Channel {
    pub(super) driver: String,
    pub(super) client: String,
    /// Index among the driver VM's channels (its channel device order).
    driver_index: usize,
    /// Index among the client's ring disks.
    pub(super) client_index: usize,
    /// Block: the device in the driver VM. Net: the driver VM's uplink interface.
    backend: String,
    start_sector: u64,
    sectors: u64,
    read_only: bool,
    /// `Some`: a network port for the client NIC with this MAC (no window).
    mac: Option<[u8; 6]>,
    /// Block: the share of the device against the driver VM's other channels.
    weight: u32,
    /// Block: the requests and bytes per second the client may use.
    limit: RateLimit,
    pub(super) memory: File,
    kick: EventFd,
    doorbell: EventFd,
    /// Client starts so far: the ring generation's high half (see `ClientRing::create_at`).
    client_starts: u64,
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
    order: Vec<String>,
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
        let any_vm = cfg.vms().next().is_some();
        let cgroups = match any_vm.then(Cgroups::setup).transpose() {
            Ok(None) => None,
            Ok(Some(c)) => {
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
        let (disk_mem, net_mem) = (mem_size(RING_PARAMS)?, mem_size(NET_RING_PARAMS)?);
        let mut channels = Vec::new();
        let mut per_driver: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &cfg.clients {
            // Ring devices in the client's control order: disks, then NICs.
            let disks = c.client_disks.iter().map(|d| {
                let port = (d.driver.as_str(), d.device.clone(), None);
                let share = (d.weight, d.limit);
                (
                    port,
                    d.offset / 512,
                    d.size / 512,
                    d.read_only,
                    disk_mem,
                    share,
                )
            });
            let nets = c.client_nets.iter().map(|n| {
                let port = (n.driver.as_str(), n.uplink.clone(), Some(n.mac));
                (
                    port,
                    0,
                    0,
                    false,
                    net_mem,
                    (DEFAULT_WEIGHT, RateLimit::default()),
                )
            });
            for (j, ((driver, backend, mac), start_sector, sectors, read_only, size, share)) in
                disks.chain(nets).enumerate()
            {
                let label = format!("{}-ring{j}", c.name);
                let cname = CString::new(format!("ddvmm-chan-{label}")).unwrap_or_default();
                let memory = create_memfd(&cname)
                    .map_err(|e| io_ctx(format!("{label} memfd"))(std::io::Error::other(e)))?;
                memory
                    .set_len(size)
                    .map_err(io_ctx(format!("{label} size")))?;
                seal_size(&memory).map_err(io_ctx(format!("{label} seals")))?;
                let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
                let kick = efd().map_err(io_ctx(format!("{label} eventfd")))?;
                let doorbell = efd().map_err(io_ctx(format!("{label} eventfd")))?;
                let idx = per_driver.entry(driver).or_default();
                channels.push(Channel {
                    driver: driver.to_string(),
                    client: c.name.clone(),
                    driver_index: *idx,
                    client_index: j,
                    backend,
                    start_sector,
                    sectors,
                    read_only,
                    mac,
                    weight: share.0,
                    limit: share.1,
                    memory,
                    kick,
                    doorbell,
                    client_starts: 0,
                });
                *idx += 1;
            }
        }
        let mut vms = BTreeMap::new();
        let mut order = Vec::new();
        for (index, v) in cfg.vms().enumerate() {
            let stats = create_memfd(c"ddvmm-stats")
                .map_err(|e| io_ctx("stats page")(std::io::Error::other(e)))?;
            stats
                .set_len(stats_page::PAGE_SIZE)
                .map_err(io_ctx("stats page"))?;
            seal_size(&stats).map_err(io_ctx("stats page seals"))?;
            let jail_root = state_dir.join("jail").join(&v.name);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&jail_root)
                .map_err(|source| SupervisorError::Spawn {
                    name: v.name.clone(),
                    source,
                })?;
            let cgroup = match &cgroups {
                Some(c) => Some(
                    c.vm(&v.name, &v.limits)
                        .map_err(|e| SupervisorError::Spawn {
                            name: v.name.clone(),
                            source: std::io::Error::other(e),
                        })?,
                ),
                None => None,
            };
            order.push(v.name.clone());
            let has_channels = channels.iter().any(|c| c.driver == v.name);
            let template = (v.role == Role::Driver
                && has_channels
                && v.passthrough.is_empty()
                && cfg.recovery.restore_from_template)
                .then(|| Template {
                    dir: state_dir.join("templates").join(&v.name),
                    restores: 0,
                    made: None,
                });
            vms.insert(
                v.name.clone(),
                Vm {
                    template,
                    ids: cfg.vm_ids(index),
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
                },
            );
        }
        Ok(Arc::new(Supervisor {
            exe,
            state_dir,
            cgroups,
            inner: Mutex::new(Inner {
                vms,
                channels,
                order,
            }),
            recovery: cfg.recovery.clone(),
            book: Mutex::new(FaultBook::default()),
        }))
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
                .map(channel_stats)
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
            .arg(&vm.cfg.cmdline)
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
        let fd_spec = |c: &Channel| {
            format!(
                "mem={},kick={},doorbell={}",
                c.memory.as_raw_fd(),
                c.kick.as_raw_fd(),
                c.doorbell.as_raw_fd()
            )
        };
        // Creation order: a driver's channels by index, a client's disks in configuration order.
        let mine: Vec<&mut Channel> = inner
            .channels
            .iter_mut()
            .filter(|c| match vm.cfg.role {
                Role::Driver => c.driver == name,
                Role::Client => c.client == name,
            })
            .collect();
        for c in mine {
            fds.extend([
                c.memory.as_raw_fd(),
                c.kick.as_raw_fd(),
                c.doorbell.as_raw_fd(),
            ]);
            let ro = if c.read_only { ",ro" } else { "" };
            let generation = |c: &mut Channel| {
                c.client_starts += 1;
                (c.client_starts << 32) | 1
            };
            match (vm.cfg.role, c.mac) {
                (Role::Driver, None) => cmd.arg("--channel").arg(format!(
                    "{},backend={},start={},sectors={},weight={}{ro}",
                    fd_spec(c),
                    c.backend,
                    c.start_sector,
                    c.sectors,
                    c.weight
                )),
                (Role::Driver, Some(mac)) => cmd.arg("--channel").arg(format!(
                    "{},backend={},mac={}",
                    fd_spec(c),
                    c.backend,
                    format_mac(&mac)
                )),
                (Role::Client, None) => {
                    let generation = generation(c);
                    cmd.arg("--ring-disk").arg(format!(
                        "{},sectors={},generation={generation},id={}-{}{ro}{}",
                        fd_spec(c),
                        c.sectors,
                        c.driver,
                        c.driver_index,
                        c.limit.options()
                    ))
                }
                (Role::Client, Some(mac)) => {
                    let generation = generation(c);
                    cmd.arg("--ring-net").arg(format!(
                        "{},mac={},generation={generation}",
                        fd_spec(c),
                        format_mac(&mac)
                    ))
                }
            };
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

/// Seals memfd `f` against shrinking and growing: a process it is handed to (a VMM that maps
/// it) can never be made to fault on a truncated mapping.
fn seal_size(f: &File) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS only changes the seals of the memfd we own.
    let rc = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One read of a channel's ring header, through the ring crate's view of it.
pub(super) fn ring_header(c: &Channel) -> Option<HeaderView> {
    let mut b = [0u8; HeaderView::LEN];
    c.memory.read_exact_at(&mut b, 0).ok()?;
    HeaderView::parse(&b)
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

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn channel_stats(c: &Channel) -> serde_json::Value {
    let h = ring_header(c);
    serde_json::json!({
        "driver": c.driver,
        "client": c.client,
        "backend": c.backend,
        "start_sector": c.start_sector,
        "sectors": c.sectors,
        "mac": c.mac.as_ref().map(format_mac),
        "weight": c.weight,
        "iops_limit": c.limit.ops_per_s,
        "bandwidth_limit": c.limit.bytes_per_s,
        "generation": h.map(|h| h.generation),
        "agent_ready": h.map(|h| h.agent_serves_current()),
        "heartbeat": h.map(|h| h.heartbeat),
        "requests": h.map(|h| h.req_prod),
        "completions": h.map(|h| h.cmp_prod),
    })
}
