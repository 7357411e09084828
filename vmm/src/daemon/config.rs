//! The system configuration (TOML): driver VMs, client VMs and which driver VM serves each
//! client disk. Everything is validated before any VM starts; errors name the offending key.
//!
//! ```toml
//! [api]
//! socket = "/run/ddvmm.sock"        # optional; default: <config>.sock next to the file
//!
//! [[driver]]
//! name = "storage"
//! kernel = "guest-images/out/vmlinuz"
//! initrd = "guest-images/out/driver-initramfs.cpio.gz"
//! memory = "256M"                   # optional, default 256M
//! cpus = 1                          # optional, default 1
//! disks = ["/var/lib/ddvmm/pool.img"]  # devices it owns: /dev/vda, /dev/vdb, ... inside
//! passthrough = ["0000:01:00.0"]    # host PCI functions it owns (VFIO; bound to vfio-pci)
//! disk_limits = { iops = 200 }      # optional: each emulated disk as a slower device
//!                                   #   (requests and bytes per second: iops, bandwidth)
//! taps = ["ddtap0"]                 # host TAPs of its emulated NICs: eth0, eth1, ... inside
//! spare_channels = 2                # optional: channel slots beyond its configured clients',
//!                                   #   for clients added at runtime (0-16, default 2)
//! cmdline = "..."                   # optional, default "console=ttyS0 quiet ddvmm.action=agent"
//! console = "storage.log"           # optional, default <state dir>/<name>.console
//! console_limit = "16M"             # optional: the console file stops growing here
//! limits = { memory = "512M", cpus = 2.0, pids = 128 }
//!                                   # optional cgroup limits of its VMM process; defaults:
//!                                   #   guest memory + 256M (driver VMs: twice their
//!                                   #   guest memory + 256M, for the template they write),
//!                                   #   cpus + 1, 128 threads
//!
//! [[client]]
//! name = "web"
//! kernel = "guest-images/out/vmlinuz"
//! initrd = "guest-images/out/client-initramfs.cpio.gz"
//! memory = "512M"
//! cpus = 2
//!
//! [[client.disk]]
//! driver = "storage"                # a [[driver]] name
//! device = "/dev/vda"               # the driver VM's device (default /dev/vda, or
//!                                   #   /dev/nvme0n1 for a driver with passthrough only)
//! offset = "0M"                     # window start on that device
//! size = "64M"                      # window size; the client sees a disk of this size
//! read_only = false
//! weight = 100                      # optional: its share of the device against the driver VM's
//!                                   #   other channels on it when they contend (1-10000)
//! iops = 1000                       # optional limits, enforced by the client's own VMM:
//! bandwidth = "50M"                 #   requests and bytes per second (token buckets, 100 ms
//!                                   #   of burst)
//!
//! [[client.net]]                    # a NIC: a port on the driver VM's bridge
//! driver = "storage"                # a [[driver]] name (it must own a NIC)
//! mac = "52:54:00:12:34:56"         # the client's address; frames from any other are dropped
//! uplink = "eth0"                   # optional: the driver VM's interface bridged with it
//!
//! [recovery]                        # optional; every key has a default (shown)
//! enabled = true                    # restart driver VMs that fault
//! heartbeat_timeout_ms = 5000       # no agent heartbeat this long after a request shows
//!                                   #   on its ring: hang (a busy agent beats five times
//!                                   #   per timeout)
//! idle_heartbeat_ms = 30000         # an idle agent beats this often; a channel without
//!                                   #   requests is hung after this plus the timeout (the
//!                                   #   agent's wake also finds a request whose notification
//!                                   #   was lost: see the agent's "missed notifications")
//! progress_timeout_ms = 15000       # requests outstanding, none completed for this long: hang
//! boot_timeout_ms = 300000          # a (re)started driver VM's agent must be ready by then
//!                                   # (doubled after each missed boot of a recovery, up to 8x)
//! backoff_initial_ms = 100          # a driver VM that served since its last restart restarts
//! backoff_max_ms = 10000            #   at once; one that faults again before serving waits
//!                                   #   this, doubled per further such fault, capped
//! max_restarts = 10                 # more restarts than this within
//! restart_window_s = 300            #   this window: quarantine the driver VM (crashes
//!                                   #   charged to one channel count for that channel)
//! poison_after = 3                  # a request in flight at this many crashes in a row fails alone
//! restart_on_corrupt = true         # garbage completions count as a fault (a broken ring
//!                                   #   index always does: that ring cannot go on)
//! restore_from_template = true      # restart a driver VM from a snapshot of itself, made
//!                                   #   at its first boot once its agents are ready (not for
//!                                   #   driver VMs with passed-through functions: they boot)
//! template_max_restores = 1000      # after this many restores, or
//! template_max_age_s = 21600        #   this age, the next restart boots and makes it anew
//! standby = true                    # keep the template restored ahead of time in a waiting
//!                                   #   VMM process: a restart resumes it (no process start)
//! ```
//!
//! `[api] metrics_listen = "9464"` (optional) also serves the Prometheus metrics over HTTP on
//! that port of 127.0.0.1 (or an explicit address; one that is not loopback also needs
//! `metrics_public = true`).
//!
//! `[jail] uid_base = 200000` (optional, the default): every VMM process runs as its own
//! uid and gid, `uid_base` + the VM's index in the file (drivers first).
//!
//! Relative paths are relative to the configuration file's directory.
//!
//! VMs can be added at runtime (`ddvmm ctl add FILE`, `PUT /v1/vms`): `[[driver]]` and
//! `[[client]]` tables as above, checked together with the running configuration as one file
//! ([`SystemConfig::with_added`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::cgroup::Limits;
use crate::devices::virtio::ring::RateLimit;
use crate::units::parse_size;
use crate::vfio::PciAddress;
use ddvmm_translation::channel::{DEFAULT_WEIGHT, MAX_WEIGHT};

/// Largest `cpus` accepted here (the VMM checks KVM's own limit at start).
const MAX_CPUS: u32 = 254;
/// Smallest guest memory that can boot the stock kernel with an initramfs.
const MIN_MEMORY: u64 = 64 << 20;

/// A configuration error, naming the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/missing/mistyped key.
    #[error("{path}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// What the parser said (it names the key and line).
        message: String,
    },
    /// A semantic error at `key`.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `client[1].disk[0].driver`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    driver: Vec<VmTable>,
    #[serde(default)]
    client: Vec<VmTable>,
    #[serde(default)]
    recovery: RecoveryConfig,
    #[serde(default)]
    jail: RawJail,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    metrics_listen: Option<String>,
    #[serde(default)]
    metrics_public: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJail {
    uid_base: Option<u32>,
}

/// Channel slots a driver VM has beyond its configured clients' by default.
pub const DEFAULT_SPARE_CHANNELS: u32 = 2;
/// Most spare channel slots of one driver VM (each is a PCI function).
const MAX_SPARE_CHANNELS: u32 = 16;

/// Default first uid/gid of the VMM processes.
pub const DEFAULT_UID_BASE: u32 = 200_000;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<String>,
    cpus: Option<f64>,
    pids: Option<u32>,
}

/// How the daemon detects driver VM faults and restarts them (`[recovery]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Restart faulted driver VMs at all.
    pub enabled: bool,
    /// How long after a request shows on a channel's ring its agent must have beaten.
    pub heartbeat_timeout_ms: u64,
    /// How often an idle agent beats (a channel with no new request is hung once its beat is
    /// older than this plus `heartbeat_timeout_ms`).
    pub idle_heartbeat_ms: u64,
    /// Time with requests outstanding and none completed that counts as a hang.
    pub progress_timeout_ms: u64,
    /// Time a started driver VM has to get its agents ready (a recovery doubles it after each
    /// boot of its own that missed it, up to eight times).
    pub boot_timeout_ms: u64,
    /// Delay before the restart of a driver VM that faulted again before it served (one that
    /// served since its last restart is restarted at once), doubled for each further one.
    pub backoff_initial_ms: u64,
    /// Longest delay before a restart.
    pub backoff_max_ms: u64,
    /// Restarts allowed within the window before quarantine.
    pub max_restarts: u32,
    /// The window.
    pub restart_window_s: u64,
    /// Consecutive crashes after which an in-flight request is poison (0: never).
    pub poison_after: u32,
    /// Treat garbage completions as a fault.
    pub restart_on_corrupt: bool,
    /// Restart driver VMs by restoring a snapshot of a clean, ready instance of themselves
    /// (made at their first boot) instead of booting them (driver VMs with passed-through
    /// functions always boot).
    pub restore_from_template: bool,
    /// Restores from one template before it is made anew (by a cold boot).
    pub template_max_restores: u32,
    /// Age (seconds) after which a template is made anew.
    pub template_max_age_s: u64,
    /// Keep each template restored ahead of time in a standby VMM (built, confined, no vCPU
    /// started) that a restart resumes.
    pub standby: bool,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            heartbeat_timeout_ms: 5000,
            idle_heartbeat_ms: 30_000,
            progress_timeout_ms: 15000,
            boot_timeout_ms: 300_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 10_000,
            max_restarts: 10,
            restart_window_s: 300,
            poison_after: 3,
            restart_on_corrupt: true,
            restore_from_template: true,
            template_max_restores: 1000,
            template_max_age_s: 6 * 3600,
            standby: true,
        }
    }
}

impl RecoveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("idle_heartbeat_ms", self.idle_heartbeat_ms),
            ("progress_timeout_ms", self.progress_timeout_ms),
            ("boot_timeout_ms", self.boot_timeout_ms),
            ("restart_window_s", self.restart_window_s),
            ("max_restarts", u64::from(self.max_restarts)),
            (
                "template_max_restores",
                u64::from(self.template_max_restores),
            ),
            ("template_max_age_s", self.template_max_age_s),
        ] {
            if v == 0 {
                return Err(invalid(format!("recovery.{key}"), "must be at least 1"));
            }
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(invalid(
                "recovery.backoff_initial_ms",
                "must not exceed recovery.backoff_max_ms",
            ));
        }
        Ok(())
    }
}

/// One `[[driver]]` or `[[client]]` table as written (checked only as part of a whole
/// configuration: [`SystemConfig::with_added`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmTable {
    name: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<String>,
    cpus: Option<u32>,
    console: Option<PathBuf>,
    console_limit: Option<String>,
    limits: Option<RawLimits>,
    #[serde(default)]
    disks: Vec<PathBuf>,
    disk_limits: Option<RawRates>,
    #[serde(default)]
    passthrough: Vec<String>,
    #[serde(default)]
    taps: Vec<String>,
    #[serde(default)]
    disk: Vec<RawClientDisk>,
    #[serde(default)]
    net: Vec<RawClientNet>,
    spare_channels: Option<u32>,
}

impl VmTable {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.kernel);
        self.initrd.iter_mut().for_each(abs);
        self.console.iter_mut().for_each(abs);
        self.disks.iter_mut().for_each(abs);
    }
}

/// VMs to add to a running system: `[[driver]]` and `[[client]]` tables as in the
/// configuration file (the API takes them as JSON, `ddvmm ctl add` from a TOML file).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NewVms {
    /// Driver VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub driver: Vec<VmTable>,
    /// Client VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client: Vec<VmTable>,
}

/// Requests and bytes per second.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawRates {
    iops: Option<u64>,
    bandwidth: Option<String>,
}

/// Checked limits: requests and bytes per second.
fn rates(key: &str, iops: Option<u64>, bandwidth: Option<&str>) -> Result<RateLimit, ConfigError> {
    if iops == Some(0) {
        return Err(invalid(
            format!("{key}.iops"),
            "must not be zero (omit it: no limit)",
        ));
    }
    let bandwidth = bandwidth
        .map(|v| parse_size(v).map_err(|e| invalid(format!("{key}.bandwidth"), e.to_string())))
        .transpose()?;
    if bandwidth.is_some_and(|b| b < 4096) {
        return Err(invalid(
            format!("{key}.bandwidth"),
            "must be at least 4K per second (omit it: no limit)",
        ));
    }
    Ok(RateLimit {
        ops_per_s: iops,
        bytes_per_s: bandwidth,
    })
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawClientNet {
    driver: String,
    mac: String,
    uplink: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawClientDisk {
    driver: String,
    device: Option<String>,
    offset: Option<String>,
    size: String,
    #[serde(default)]
    read_only: bool,
    weight: Option<u32>,
    iops: Option<u64>,
    bandwidth: Option<String>,
}

/// Whether a VM is a driver VM or a client VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns devices, runs the agent.
    Driver,
    /// Uses disks served by driver VMs.
    Client,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Unique name.
    pub name: String,
    /// Driver or client.
    pub role: Role,
    /// bzImage.
    pub kernel: PathBuf,
    /// initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Console log (None: the daemon picks one).
    pub console: Option<PathBuf>,
    /// The console file's cap in bytes.
    pub console_limit: u64,
    /// The cgroup limits of its VMM process.
    pub limits: Limits,
    /// Driver VMs: backing files of the devices they own, in guest order (/dev/vda, ...).
    pub disks: Vec<PathBuf>,
    /// Requests and bytes per second each of `disks` may do (a slower device), if limited.
    pub disk_limits: RateLimit,
    /// Driver VMs: host PCI functions they own through VFIO (an NVMe controller shows up as
    /// /dev/nvme0n1, ...).
    pub passthrough: Vec<PciAddress>,
    /// Driver VMs: host TAP devices of their emulated NICs (eth0, eth1, ... inside).
    pub taps: Vec<String>,
    /// Client VMs: disks served by driver VMs.
    pub client_disks: Vec<ClientDisk>,
    /// Client VMs: NICs served by driver VMs.
    pub client_nets: Vec<ClientNet>,
    /// Driver VMs: channel slots beyond its configured clients', for clients added at runtime.
    pub spare_channels: u32,
}

/// Heartbeats per heartbeat timeout a driver VM's agent is asked for.
const BEATS_PER_TIMEOUT: u64 = 5;

impl VmConfig {
    /// The kernel command line the VM boots with. A driver VM's agent is also told its
    /// heartbeat periods, unless the configured line sets them: while a channel has work, a
    /// fifth of `recovery`'s heartbeat timeout; while it has none, `recovery`'s idle period
    /// (an idle agent wakes only to beat: each wake costs its VM about ten exits).
    pub fn boot_cmdline(&self, recovery: &RecoveryConfig) -> String {
        if self.role != Role::Driver {
            return self.cmdline.clone();
        }
        let busy = (recovery.heartbeat_timeout_ms / BEATS_PER_TIMEOUT).clamp(100, 60_000);
        let mut line = self.cmdline.clone();
        for (key, ms) in [
            ("ddvmm.agent.heartbeat_ms=", busy),
            ("ddvmm.agent.idle_heartbeat_ms=", recovery.idle_heartbeat_ms),
        ] {
            if !line.contains(key) {
                line = format!("{line} {key}{ms}");
            }
        }
        line
    }
}

/// A client NIC: a port on a driver VM's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNet {
    /// Serving driver VM.
    pub driver: String,
    /// The client's MAC address (its frames must carry it as their source).
    pub mac: [u8; 6],
    /// The driver VM's interface the port is bridged with.
    pub uplink: String,
}

/// A client disk: a window of a driver VM's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDisk {
    /// Serving driver VM.
    pub driver: String,
    /// Device path inside the driver VM.
    pub device: String,
    /// First byte of the window.
    pub offset: u64,
    /// Bytes in the window.
    pub size: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Share of the device against the driver VM's other channels (1..=10000).
    pub weight: u32,
    /// Requests and bytes per second the client may use.
    pub limit: RateLimit,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// API socket path.
    pub socket: PathBuf,
    /// Driver VMs, in file order.
    pub drivers: Vec<VmConfig>,
    /// Client VMs, in file order.
    pub clients: Vec<VmConfig>,
    /// Fault detection and restart policy.
    pub recovery: RecoveryConfig,
    /// Also serve metrics over HTTP here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The first VMM uid/gid.
    pub uid_base: u32,
    /// What it was made from, to check runtime changes as a whole.
    raw: RawConfig,
    /// Relative paths are relative to this.
    base: PathBuf,
}

impl SystemConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let default_socket = path.with_extension("sock");
        Self::parse(&text, base, default_socket).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path, default_socket: PathBuf) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Self::from_raw(raw, base, default_socket)
    }

    /// This configuration with `new` added (relative paths taken from this one's directory),
    /// checked as a whole exactly as a file is: the VMs that would be added, or the first
    /// error. Keys name the new VM's place in the file order (`client[3].disk[0].driver`).
    pub fn with_added(&self, new: &NewVms) -> Result<Self, ConfigError> {
        let mut raw = self.raw.clone();
        raw.driver.extend(new.driver.iter().cloned());
        raw.client.extend(new.client.iter().cloned());
        Self::from_raw(raw, &self.base, self.socket.clone())
    }

    /// This configuration without VM `name`, and without the client disks and NICs it served
    /// (`None`: no such VM). Nothing in it needs checking again.
    pub fn without(&self, name: &str) -> Option<Self> {
        let mut c = self.clone();
        let before = c.drivers.len() + c.clients.len();
        c.drivers.retain(|v| v.name != name);
        c.clients.retain(|v| v.name != name);
        if c.drivers.len() + c.clients.len() == before {
            return None;
        }
        for v in &mut c.clients {
            v.client_disks.retain(|d| d.driver != name);
            v.client_nets.retain(|n| n.driver != name);
        }
        c.raw.driver.retain(|v| v.name != name);
        c.raw.client.retain(|v| v.name != name);
        for v in &mut c.raw.client {
            v.disk.retain(|d| d.driver != name);
            v.net.retain(|n| n.driver != name);
        }
        Some(c)
    }

    fn from_raw(raw: RawConfig, base: &Path, default_socket: PathBuf) -> Result<Self, ConfigError> {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut names = BTreeSet::new();
        let mut drivers = Vec::new();
        for (i, d) in raw.driver.iter().enumerate() {
            let key = format!("driver[{i}]");
            if !d.disk.is_empty() {
                return Err(invalid(format!("{key}.disk"), "driver VMs own devices with `disks = [...]`; `[[...disk]]` tables are for clients"));
            }
            if !d.net.is_empty() {
                return Err(invalid(
                    format!("{key}.net"),
                    "driver VMs own NICs with `taps = [...]`; `[[...net]]` tables are for clients",
                ));
            }
            let mut vm = vm_common(d, &key, Role::Driver, &abs, &mut names)?;
            vm.spare_channels = d.spare_channels.unwrap_or(DEFAULT_SPARE_CHANNELS);
            if vm.spare_channels > MAX_SPARE_CHANNELS {
                return Err(invalid(
                    format!("{key}.spare_channels"),
                    format!("{} is more than {MAX_SPARE_CHANNELS}", vm.spare_channels),
                ));
            }
            for (j, t) in d.taps.iter().enumerate() {
                if !valid_ifname(t) {
                    return Err(invalid(
                        format!("{key}.taps[{j}]"),
                        format!(
                            "'{t}' is not an interface name (1-15 bytes, no '/', ':' or spaces)"
                        ),
                    ));
                }
                if vm.taps.contains(t) || drivers.iter().any(|o: &VmConfig| o.taps.contains(t)) {
                    return Err(invalid(
                        format!("{key}.taps[{j}]"),
                        format!("TAP '{t}' is used twice"),
                    ));
                }
                vm.taps.push(t.clone());
            }
            for (j, a) in d.passthrough.iter().enumerate() {
                let addr = a
                    .parse::<PciAddress>()
                    .map_err(|e| invalid(format!("{key}.passthrough[{j}]"), e.to_string()))?;
                if vm.passthrough.contains(&addr) {
                    return Err(invalid(
                        format!("{key}.passthrough[{j}]"),
                        format!("{addr} is listed twice"),
                    ));
                }
                vm.passthrough.push(addr);
            }
            if let Some(other) = drivers
                .iter()
                .find(|o: &&VmConfig| o.passthrough.iter().any(|a| vm.passthrough.contains(a)))
            {
                return Err(invalid(
                    format!("{key}.passthrough"),
                    format!(
                        "a PCI function is already given to driver VM '{}'",
                        other.name
                    ),
                ));
            }
            drivers.push(vm);
        }
        let mut clients = Vec::new();
        for (i, c) in raw.client.iter().enumerate() {
            let key = format!("client[{i}]");
            if !c.disks.is_empty() {
                return Err(invalid(
                    format!("{key}.disks"),
                    "client disks are `[[client.disk]]` tables served by a driver VM",
                ));
            }
            if !c.passthrough.is_empty() {
                return Err(invalid(
                    format!("{key}.passthrough"),
                    "only driver VMs own host PCI functions",
                ));
            }
            if !c.taps.is_empty() {
                return Err(invalid(
                    format!("{key}.taps"),
                    "client NICs are `[[client.net]]` tables served by a driver VM",
                ));
            }
            if c.spare_channels.is_some() {
                return Err(invalid(
                    format!("{key}.spare_channels"),
                    "only driver VMs have channel slots",
                ));
            }
            if c.disk_limits.is_some() {
                return Err(invalid(
                    format!("{key}.disk_limits"),
                    "a client disk's limits are `iops` and `bandwidth` in its `[[client.disk]]`",
                ));
            }
            let mut vm = vm_common(c, &key, Role::Client, &abs, &mut names)?;
            for (j, d) in c.disk.iter().enumerate() {
                let key = format!("{key}.disk[{j}]");
                vm.client_disks.push(client_disk(d, &key, &drivers)?);
            }
            for (j, n) in c.net.iter().enumerate() {
                let key = format!("{key}.net[{j}]");
                let net = client_net(n, &key, &drivers)?;
                let taken = clients
                    .iter()
                    .chain(std::iter::once(&vm))
                    .flat_map(|o: &VmConfig| o.client_nets.iter())
                    .any(|o| o.mac == net.mac);
                if taken {
                    return Err(invalid(
                        format!("{key}.mac"),
                        format!("{} is given to two client NICs", n.mac),
                    ));
                }
                vm.client_nets.push(net);
            }
            clients.push(vm);
        }
        check_overlaps(&clients)?;
        raw.recovery.validate()?;
        let metrics_listen = raw
            .api
            .metrics_listen
            .as_deref()
            .map(|m| metrics_address(m, raw.api.metrics_public))
            .transpose()?;
        let uid_base = raw.jail.uid_base.unwrap_or(DEFAULT_UID_BASE);
        let count = (drivers.len() + clients.len()) as u64;
        if uid_base < 1000 || u64::from(uid_base) + count >= u64::from(u32::MAX) {
            return Err(invalid(
                "jail.uid_base",
                format!("{uid_base} leaves no room: the VMs need uids {uid_base}.. (at least 1000, below 2^32 - 1)"),
            ));
        }
        Ok(SystemConfig {
            socket: raw.api.socket.clone().map_or(default_socket, |p| abs(&p)),
            drivers,
            clients,
            recovery: raw.recovery.clone(),
            metrics_listen,
            uid_base,
            raw,
            base: base.to_path_buf(),
        })
    }

    /// VM `index`'s uid and gid (index in [`Self::vms`] order).
    pub fn vm_ids(&self, index: usize) -> u32 {
        self.uid_base + index as u32
    }

    /// All VMs, drivers first.
    pub fn vms(&self) -> impl Iterator<Item = &VmConfig> {
        self.drivers.iter().chain(self.clients.iter())
    }
}

fn vm_common(
    raw: &VmTable,
    key: &str,
    role: Role,
    abs: &dyn Fn(&Path) -> PathBuf,
    names: &mut BTreeSet<String>,
) -> Result<VmConfig, ConfigError> {
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 32
        && raw
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(invalid(
            format!("{key}.name"),
            format!("'{}' must be 1-32 letters, digits, '-' or '_'", raw.name),
        ));
    }
    if !names.insert(raw.name.clone()) {
        return Err(invalid(
            format!("{key}.name"),
            format!("duplicate VM name '{}'", raw.name),
        ));
    }
    let existing = |what: &str, p: &Path| -> Result<PathBuf, ConfigError> {
        use std::os::unix::fs::FileTypeExt;
        let p = abs(p);
        let ok =
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() || m.file_type().is_block_device());
        if ok {
            Ok(p)
        } else {
            Err(invalid(
                format!("{key}.{what}"),
                format!("no such file: {}", p.display()),
            ))
        }
    };
    let kernel = existing("kernel", &raw.kernel)?;
    let initrd = raw
        .initrd
        .as_deref()
        .map(|p| existing("initrd", p))
        .transpose()?;
    let memory = match &raw.memory {
        Some(m) => parse_size(m).map_err(|e| invalid(format!("{key}.memory"), e.to_string()))?,
        None => 256 << 20,
    };
    if memory < MIN_MEMORY {
        return Err(invalid(
            format!("{key}.memory"),
            format!(
                "{memory} bytes is less than the {} MiB minimum",
                MIN_MEMORY >> 20
            ),
        ));
    }
    let cpus = raw.cpus.unwrap_or(1);
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(invalid(
            format!("{key}.cpus"),
            format!("{cpus} is not in 1..={MAX_CPUS}"),
        ));
    }
    let mut disks = Vec::new();
    for (j, d) in raw.disks.iter().enumerate() {
        disks.push(existing(&format!("disks[{j}]"), d)?);
    }
    let disk_limits = match &raw.disk_limits {
        Some(r) => rates(
            &format!("{key}.disk_limits"),
            r.iops,
            r.bandwidth.as_deref(),
        )?,
        None => RateLimit::default(),
    };
    let console_limit = match &raw.console_limit {
        Some(m) => {
            parse_size(m).map_err(|e| invalid(format!("{key}.console_limit"), e.to_string()))?
        }
        None => DEFAULT_CONSOLE_LIMIT,
    };
    // A driver VM's VMM also writes its template (up to its guest's memory), charged to it
    // where the state directory is a tmpfs.
    let template = if role == Role::Driver { memory } else { 0 };
    let limits = vm_limits(raw.limits.as_ref(), key, memory, template, cpus)?;
    let cmdline = raw.cmdline.clone().unwrap_or_else(|| match role {
        Role::Driver => "console=ttyS0 quiet ddvmm.action=agent".into(),
        Role::Client => "console=ttyS0".into(),
    });
    Ok(VmConfig {
        name: raw.name.clone(),
        role,
        kernel,
        initrd,
        cmdline,
        memory,
        cpus,
        console: raw.console.as_deref().map(abs),
        console_limit,
        limits,
        disks,
        disk_limits,
        passthrough: Vec::new(),
        taps: Vec::new(),
        client_disks: Vec::new(),
        client_nets: Vec::new(),
        spare_channels: 0,
    })
}

/// Default cap of a console file.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;
/// What a VMM process may use beyond its guest's memory by default.
const DEFAULT_MEMORY_OVERHEAD: u64 = 256 << 20;
/// Default thread limit of a VMM process.
const DEFAULT_PIDS: u32 = 128;

fn vm_limits(
    raw: Option<&RawLimits>,
    key: &str,
    memory: u64,
    template: u64,
    cpus: u32,
) -> Result<Limits, ConfigError> {
    let raw_default = RawLimits::default();
    let raw = raw.unwrap_or(&raw_default);
    let mem = match &raw.memory {
        Some(m) => {
            parse_size(m).map_err(|e| invalid(format!("{key}.limits.memory"), e.to_string()))?
        }
        None => memory + template + DEFAULT_MEMORY_OVERHEAD,
    };
    if mem < memory + (16 << 20) {
        return Err(invalid(
            format!("{key}.limits.memory"),
            format!("{mem} bytes cannot hold the guest's {memory} bytes and the VMM"),
        ));
    }
    let cpu_limit = raw.cpus.unwrap_or(f64::from(cpus) + 1.0);
    if !(0.01..=1024.0).contains(&cpu_limit) {
        return Err(invalid(
            format!("{key}.limits.cpus"),
            format!("{cpu_limit} is not in 0.01..=1024"),
        ));
    }
    let pids = raw.pids.unwrap_or(DEFAULT_PIDS);
    if !(16..=65536).contains(&pids) {
        return Err(invalid(
            format!("{key}.limits.pids"),
            format!("{pids} is not in 16..=65536"),
        ));
    }
    Ok(Limits {
        memory: mem,
        cpus: cpu_limit,
        pids,
    })
}

/// `PORT` (on 127.0.0.1) or `ADDRESS:PORT`; an address off loopback only when `public`.
fn metrics_address(text: &str, public: bool) -> Result<std::net::SocketAddr, ConfigError> {
    let addr = match text.parse::<u16>() {
        Ok(port) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => text.parse().map_err(|_| {
            invalid(
                "api.metrics_listen",
                format!("'{text}' is neither a port nor an address:port"),
            )
        })?,
    };
    if !addr.ip().is_loopback() && !public {
        return Err(invalid(
            "api.metrics_listen",
            format!("{addr} is not a loopback address (set api.metrics_public = true to serve metrics beyond this host)"),
        ));
    }
    Ok(addr)
}

/// A Linux network interface name.
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn client_net(
    raw: &RawClientNet,
    key: &str,
    drivers: &[VmConfig],
) -> Result<ClientNet, ConfigError> {
    let Some(driver) = drivers.iter().find(|d| d.name == raw.driver) else {
        return Err(invalid(
            format!("{key}.driver"),
            format!("unknown driver VM '{}'", raw.driver),
        ));
    };
    if driver.taps.is_empty() && driver.passthrough.is_empty() {
        return Err(invalid(
            format!("{key}.driver"),
            format!(
                "driver VM '{}' owns no NIC (give it `taps = [...]` or a passed-through NIC)",
                driver.name
            ),
        ));
    }
    let mac = crate::devices::virtio::net::parse_mac(&raw.mac).ok_or_else(|| {
        invalid(
            format!("{key}.mac"),
            format!("'{}' is not a MAC address (aa:bb:cc:dd:ee:ff)", raw.mac),
        )
    })?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(invalid(
            format!("{key}.mac"),
            format!("{} is not a unicast address", raw.mac),
        ));
    }
    let uplink = raw.uplink.clone().unwrap_or_else(|| "eth0".into());
    if !valid_ifname(&uplink) {
        return Err(invalid(
            format!("{key}.uplink"),
            format!("'{uplink}' is not an interface name"),
        ));
    }
    Ok(ClientNet {
        driver: driver.name.clone(),
        mac,
        uplink,
    })
}

/// `/dev/vda` -> 0, `/dev/vdb` -> 1, ...: which of a driver VM's `disks` a device path is.
pub fn virtio_disk_index(device: &str) -> Option<usize> {
    let letter = device.strip_prefix("/dev/vd")?;
    let mut c = letter.chars();
    match (c.next(), c.next()) {
        (Some(l @ 'a'..='z'), None) => Some(l as usize - 'a' as usize),
        _ => None,
    }
}

fn client_disk(
    raw: &RawClientDisk,
    key: &str,
    drivers: &[VmConfig],
) -> Result<ClientDisk, ConfigError> {
    let Some(driver) = drivers.iter().find(|d| d.name == raw.driver) else {
        return Err(invalid(
            format!("{key}.driver"),
            format!("unknown driver VM '{}'", raw.driver),
        ));
    };
    // Default: the driver VM's first device (a passed-through NVMe controller's namespace if
    // it owns no emulated disk).
    let device = raw.device.clone().unwrap_or_else(|| {
        if driver.disks.is_empty() && !driver.passthrough.is_empty() {
            "/dev/nvme0n1".into()
        } else {
            "/dev/vda".into()
        }
    });
    if !device.starts_with("/dev/") || device.len() >= 64 {
        return Err(invalid(
            format!("{key}.device"),
            format!("'{device}' is not a /dev path"),
        ));
    }
    let size_of =
        |k: &str, v: &str| parse_size(v).map_err(|e| invalid(format!("{key}.{k}"), e.to_string()));
    let offset = raw
        .offset
        .as_deref()
        .map_or(Ok(0), |v| size_of("offset", v))?;
    let size = size_of("size", &raw.size)?;
    for (k, v) in [("offset", offset), ("size", size)] {
        if v % 512 != 0 {
            return Err(invalid(
                format!("{key}.{k}"),
                format!("{v} is not a multiple of 512 bytes"),
            ));
        }
    }
    if size == 0 {
        return Err(invalid(format!("{key}.size"), "must not be zero"));
    }
    let Some(end) = offset.checked_add(size) else {
        return Err(invalid(format!("{key}.size"), "offset + size overflows"));
    };
    // Emulated devices: the window must fit the backing file.
    if let Some(idx) = virtio_disk_index(&device) {
        let Some(path) = driver.disks.get(idx) else {
            return Err(invalid(
                format!("{key}.device"),
                format!(
                    "driver VM '{}' owns {} disk(s); {device} is not one",
                    driver.name,
                    driver.disks.len()
                ),
            ));
        };
        // Seeking to the end sizes regular files and block devices alike.
        let len = std::fs::File::open(path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .unwrap_or(0);
        if end > len {
            return Err(invalid(
                format!("{key}.size"),
                format!(
                    "window {offset}+{size} exceeds {} ({len} bytes)",
                    path.display()
                ),
            ));
        }
    }
    let weight = raw.weight.unwrap_or(DEFAULT_WEIGHT);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err(invalid(
            format!("{key}.weight"),
            format!("{weight} is outside 1..={MAX_WEIGHT}"),
        ));
    }
    let limit = rates(key, raw.iops, raw.bandwidth.as_deref())?;
    Ok(ClientDisk {
        driver: raw.driver.clone(),
        device,
        offset,
        size,
        read_only: raw.read_only,
        weight,
        limit,
    })
}

/// Client windows on the same driver device must not overlap: one client's data must never
/// land in another's slice.
fn check_overlaps(clients: &[VmConfig]) -> Result<(), ConfigError> {
    /// Windows claimed so far on one device: (start, end, key).
    type Claims = Vec<(u64, u64, String)>;
    let mut by_device: BTreeMap<(&str, &str), Claims> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        for (j, d) in c.client_disks.iter().enumerate() {
            let key = format!("client[{i}].disk[{j}]");
            let list = by_device.entry((&d.driver, &d.device)).or_default();
            for (start, end, other) in list.iter() {
                if d.offset < *end && *start < d.offset + d.size {
                    return Err(invalid(
                        key,
                        format!("window overlaps {other} on {}:{}", d.driver, d.device),
                    ));
                }
            }
            list.push((d.offset, d.offset + d.size, key));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory with a kernel, an initrd and a 64 MiB pool, and a `[[driver]]` table
    /// (`drv`, owning the pool) to build configurations on.
    pub(crate) fn setup() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("vmlinuz"), b"k").expect("k");
        std::fs::write(dir.path().join("initrd"), b"i").expect("i");
        let f = std::fs::File::create(dir.path().join("pool.img")).expect("img");
        f.set_len(64 << 20).expect("len");
        let base = r#"
[[driver]]
name = "drv"
kernel = "vmlinuz"
initrd = "initrd"
disks = ["pool.img"]
"#;
        (dir, base.to_string())
    }

    pub(crate) fn parse(dir: &tempfile::TempDir, text: &str) -> Result<SystemConfig, ConfigError> {
        SystemConfig::parse(text, dir.path(), dir.path().join("s.sock"))
    }

    fn client(name: &str, extra: &str) -> String {
        format!("[[client]]\nname = \"{name}\"\nkernel = \"vmlinuz\"\nmemory = \"512M\"\n{extra}\n")
    }

    fn disk(driver: &str, offset: &str, size: &str) -> String {
        format!(
            "[[client.disk]]\ndriver = \"{driver}\"\noffset = \"{offset}\"\nsize = \"{size}\"\n"
        )
    }

    #[test]
    fn valid_system() {
        let (dir, base) = setup();
        let text = format!(
            "{base}{}{}{}",
            client("a", &disk("drv", "0", "32M")),
            client("b", ""),
            disk("drv", "32M", "32M")
        );
        let c = parse(&dir, &text).expect("valid");
        assert_eq!(c.drivers.len(), 1);
        assert_eq!(c.clients[1].client_disks[0].offset, 32 << 20);
        assert_eq!(c.clients[0].memory, 512 << 20);
        assert_eq!(
            c.drivers[0].cmdline,
            "console=ttyS0 quiet ddvmm.action=agent"
        );
        assert_eq!(c.socket, dir.path().join("s.sock"));
    }

    #[test]
    fn driver_vms_beat_five_times_per_heartbeat_timeout_and_at_the_idle_period_without_work() {
        let (dir, base) = setup();
        let text = format!("{base}{}", client("a", &disk("drv", "0", "32M")));
        let c = parse(&dir, &text).expect("valid");
        let r = &c.recovery;
        assert_eq!(r.heartbeat_timeout_ms, 5000);
        assert_eq!(r.idle_heartbeat_ms, 30_000);
        assert_eq!(
            c.drivers[0].boot_cmdline(r),
            "console=ttyS0 quiet ddvmm.action=agent ddvmm.agent.heartbeat_ms=1000 \
             ddvmm.agent.idle_heartbeat_ms=30000"
        );
        assert_eq!(c.clients[0].boot_cmdline(r), c.clients[0].cmdline);
        let mut set = c.drivers[0].clone();
        set.cmdline =
            "ddvmm.action=agent ddvmm.agent.heartbeat_ms=300 ddvmm.agent.idle_heartbeat_ms=9"
                .into();
        assert_eq!(set.boot_cmdline(r), set.cmdline);
        let fast = RecoveryConfig {
            heartbeat_timeout_ms: 100,
            idle_heartbeat_ms: 2000,
            ..r.clone()
        };
        assert!(c.drivers[0]
            .boot_cmdline(&fast)
            .ends_with("heartbeat_ms=100 ddvmm.agent.idle_heartbeat_ms=2000"));
        let zero = format!("{text}\n[recovery]\nidle_heartbeat_ms = 0\n");
        let e = parse(&dir, &zero).expect_err("zero idle period");
        assert!(e.to_string().contains("idle_heartbeat_ms"), "{e}");
    }

    #[test]
    fn disk_shares_and_limits() {
        let (dir, base) = setup();
        let with = |extra: &str| {
            let d = format!("{}{extra}\n", disk("drv", "0", "32M"));
            parse(&dir, &format!("{base}{}", client("a", &d)))
        };
        let c = with("").expect("defaults");
        let d = &c.clients[0].client_disks[0];
        assert_eq!((d.weight, d.limit), (100, RateLimit::default()));
        let c = with("weight = 300\niops = 1000\nbandwidth = \"50M\"").expect("valid");
        let d = &c.clients[0].client_disks[0];
        let limit = RateLimit {
            ops_per_s: Some(1000),
            bytes_per_s: Some(50 << 20),
        };
        assert_eq!((d.weight, d.limit), (300, limit));
        for (extra, needle) in [
            (
                "weight = 0",
                "client[0].disk[0].weight: 0 is outside 1..=10000",
            ),
            ("weight = 10001", "client[0].disk[0].weight"),
            ("iops = 0", "client[0].disk[0].iops: must not be zero"),
            (
                "bandwidth = \"1K\"",
                "client[0].disk[0].bandwidth: must be at least 4K",
            ),
            ("bandwidth = \"fast\"", "client[0].disk[0].bandwidth"),
        ] {
            let e = with(extra).expect_err(extra).to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn passthrough_drivers() {
        let (dir, _) = setup();
        let drv = |name: &str, pt: &str| {
            format!("[[driver]]\nname = \"{name}\"\nkernel = \"vmlinuz\"\npassthrough = [{pt}]\n")
        };
        let text = format!(
            "{}{}",
            drv("nv", r#""0000:01:00.0", "02:00.1""#),
            client("a", &disk("nv", "0", "32M"))
        );
        let c = parse(&dir, &text).expect("valid");
        assert_eq!(
            c.drivers[0]
                .passthrough
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            ["0000:01:00.0", "0000:02:00.1"]
        );
        // A driver that owns only passed-through NVMe serves its namespace by default.
        assert_eq!(c.clients[0].client_disks[0].device, "/dev/nvme0n1");
        let e = err(&dir, &drv("nv", r#""01:00""#));
        assert!(
            e.contains("driver[0].passthrough[0]") && e.contains("invalid PCI address"),
            "{e}"
        );
        let e = err(&dir, &drv("nv", r#""01:00.0", "0000:01:00.0""#));
        assert!(e.contains("listed twice"), "{e}");
        let e = err(
            &dir,
            &format!("{}{}", drv("a", r#""01:00.0""#), drv("b", r#""01:00.0""#)),
        );
        assert!(
            e.contains("driver[1].passthrough") && e.contains("already given to driver VM 'a'"),
            "{e}"
        );
        let e = err(
            &dir,
            &format!(
                "{}{}",
                drv("a", ""),
                client("c", r#"passthrough = ["01:00.0"]"#)
            ),
        );
        assert!(
            e.contains("client[0].passthrough") && e.contains("only driver VMs"),
            "{e}"
        );
    }

    #[test]
    fn client_nics() {
        let (dir, _) = setup();
        let drv = |name: &str, taps: &str| {
            format!("[[driver]]\nname = \"{name}\"\nkernel = \"vmlinuz\"\ntaps = [{taps}]\n")
        };
        let net = |driver: &str, mac: &str| {
            format!("[[client.net]]\ndriver = \"{driver}\"\nmac = \"{mac}\"\n")
        };
        let text = format!(
            "{}{}{}",
            drv("n", r#""ddtap0""#),
            client("a", &net("n", "52:54:00:00:00:01")),
            client("b", &net("n", "52:54:00:00:00:02"))
        );
        let c = parse(&dir, &text).expect("valid");
        assert_eq!(c.drivers[0].taps, ["ddtap0"]);
        assert_eq!(
            c.clients[1].client_nets,
            [ClientNet {
                driver: "n".into(),
                mac: [0x52, 0x54, 0, 0, 0, 2],
                uplink: "eth0".into(),
            }]
        );
        let cases = [
            (
                format!(
                    "{}{}",
                    drv("n", ""),
                    client("a", &net("n", "52:54:00:00:00:01"))
                ),
                "client[0].net[0].driver: driver VM 'n' owns no NIC",
            ),
            (
                format!(
                    "{}{}",
                    drv("n", r#""t0""#),
                    client("a", &net("x", "52:54:00:00:00:01"))
                ),
                "client[0].net[0].driver: unknown driver VM 'x'",
            ),
            (
                format!(
                    "{}{}",
                    drv("n", r#""t0""#),
                    client("a", &net("n", "52:54:00:00:01"))
                ),
                "client[0].net[0].mac: '52:54:00:00:01' is not a MAC address",
            ),
            (
                format!(
                    "{}{}",
                    drv("n", r#""t0""#),
                    client("a", &net("n", "01:00:5e:00:00:01"))
                ),
                "client[0].net[0].mac: 01:00:5e:00:00:01 is not a unicast address",
            ),
            (
                format!(
                    "{}{}{}",
                    drv("n", r#""t0""#),
                    client("a", &net("n", "52:54:00:00:00:01")),
                    client("b", &net("n", "52:54:00:00:00:01"))
                ),
                "client[1].net[0].mac: 52:54:00:00:00:01 is given to two client NICs",
            ),
            (
                format!("{}{}", drv("n", r#""t0""#), drv("m", r#""t0""#)),
                "driver[1].taps[0]: TAP 't0' is used twice",
            ),
            (
                drv("n", r#""a/b""#),
                "driver[0].taps[0]: 'a/b' is not an interface name",
            ),
            (
                format!("{}{}", drv("n", r#""t0""#), client("a", r#"taps = ["t1"]"#)),
                "client[0].taps: client NICs are `[[client.net]]` tables",
            ),
        ];
        for (text, want) in cases {
            let e = err(&dir, &text);
            assert!(e.contains(want), "{e}\nwanted: {want}");
        }
    }

    #[test]
    fn vms_added_and_removed_are_checked_as_a_file_is() {
        let (dir, base) = setup();
        let text = format!("{base}{}{}", client("a", ""), disk("drv", "0M", "16M"));
        let cfg = parse(&dir, &text).expect("config");
        assert_eq!(cfg.drivers[0].spare_channels, DEFAULT_SPARE_CHANNELS);
        let new = |toml_text: &str| -> NewVms { toml::from_str(toml_text).expect("tables") };
        let b = format!("{}{}", client("b", ""), disk("drv", "16M", "16M"));
        let added = cfg.with_added(&new(&b)).expect("b fits");
        assert_eq!(added.clients.len(), 2);
        assert_eq!(added.clients[1].client_disks[0].offset, 16 << 20);
        // Relative paths are the configuration's.
        assert_eq!(added.clients[1].kernel, dir.path().join("vmlinuz"));
        for (tables, expected) in [
            (
                format!("{}{}", client("b", ""), disk("drv", "8M", "16M")),
                "client[1].disk[0]: window overlaps client[0].disk[0] on drv:/dev/vda",
            ),
            (
                format!("{}{}", client("a", ""), disk("drv", "32M", "8M")),
                "client[1].name: duplicate VM name 'a'",
            ),
            (
                format!("{}{}", client("b", ""), disk("nope", "32M", "8M")),
                "client[1].disk[0].driver: unknown driver VM 'nope'",
            ),
            (
                client("b", "spare_channels = 1"),
                "client[1].spare_channels: only driver VMs have channel slots",
            ),
        ] {
            let e = cfg
                .with_added(&new(&tables))
                .expect_err(expected)
                .to_string();
            assert_eq!(e, expected);
        }
        let d2 = "[[driver]]\nname = \"d2\"\nkernel = \"vmlinuz\"\nspare_channels = 17\n";
        let e = cfg.with_added(&new(d2)).expect_err("too many").to_string();
        assert_eq!(e, "driver[1].spare_channels: 17 is more than 16");
        assert!(toml::from_str::<NewVms>("[[vm]]\nname = \"x\"\n").is_err());
        // Removing the driver VM takes its clients' disks with it; the rest is unchanged.
        let gone = added.without("drv").expect("known");
        assert!(gone.drivers.is_empty());
        assert!(gone.clients.iter().all(|c| c.client_disks.is_empty()));
        assert!(added.without("nobody").is_none());
        let b_gone = added.without("b").expect("known");
        assert_eq!(b_gone.clients.len(), 1);
        // What was removed can be added again.
        b_gone.with_added(&new(&b)).expect("b again");
    }

    fn err(dir: &tempfile::TempDir, text: &str) -> String {
        parse(dir, text).expect_err("must fail").to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let (dir, base) = setup();
        let e = err(
            &dir,
            &format!("{base}{}", client("a", &disk("nope", "0", "1M"))),
        );
        assert!(
            e.contains("client[0].disk[0].driver") && e.contains("unknown driver VM 'nope'"),
            "{e}"
        );
        let e = err(&dir, &format!("{base}{}", client("drv", "")));
        assert!(
            e.contains("client[0].name") && e.contains("duplicate"),
            "{e}"
        );
        let e = err(&dir, &format!("{base}{}", client("a", "bogus = 1")));
        assert!(e.contains("bogus"), "{e}");
        let e = err(
            &dir,
            &format!("{base}{}", client("a", &disk("drv", "60M", "8M"))),
        );
        assert!(
            e.contains("client[0].disk[0].size") && e.contains("exceeds"),
            "{e}"
        );
        let e = err(
            &dir,
            &format!(
                "{base}{}{}",
                client("a", &disk("drv", "0", "8M")),
                client("b", &disk("drv", "4M", "8M"))
            ),
        );
        assert!(
            e.contains("client[1].disk[0]") && e.contains("overlaps client[0].disk[0]"),
            "{e}"
        );
        let e = err(&dir, &format!("{base}{}", client("a", "cpus = 0")));
        assert!(e.contains("client[0].cpus"), "{e}");
        let e = err(
            &dir,
            &format!("{base}{}", client("a", "").replace("512M", "1M")),
        );
        assert!(e.contains("client[0].memory"), "{e}");
        let e = err(
            &dir,
            &format!("{base}{}", client("a", "initrd = \"missing\"")),
        );
        assert!(
            e.contains("client[0].initrd") && e.contains("no such file"),
            "{e}"
        );
        let e = err(
            &dir,
            &format!("{base}{}", client("a", &disk("drv", "0", "12X"))),
        );
        assert!(e.contains("client[0].disk[0].size"), "{e}");
        let e = err(&dir, "[[driver]\nname=");
        assert!(!e.is_empty());
        let e = err(&dir, &format!("{base}[recovery]\nmax_restarts = 0\n"));
        assert!(e.contains("recovery.max_restarts"), "{e}");
        let e = err(
            &dir,
            &format!("{base}[recovery]\nbackoff_initial_ms = 9\nbackoff_max_ms = 1\n"),
        );
        assert!(e.contains("recovery.backoff_initial_ms"), "{e}");
        let e = err(&dir, &format!("{base}[recovery]\nrestart_after = 1\n"));
        assert!(e.contains("restart_after"), "{e}");
        let e = err(
            &dir,
            &format!("[api]\nmetrics_listen = \"nowhere\"\n{base}"),
        );
        assert!(e.contains("metrics_listen") || e.contains("address"), "{e}");
        let e = err(
            &dir,
            &format!("[api]\nmetrics_listen = \"0.0.0.0:9464\"\n{base}"),
        );
        assert!(e.contains("not a loopback address"), "{e}");
        let c = parse(&dir, &format!("[api]\nmetrics_listen = \"9464\"\n{base}")).unwrap();
        assert_eq!(c.metrics_listen, Some(([127, 0, 0, 1], 9464).into()));
        let c = parse(
            &dir,
            &format!("[api]\nmetrics_listen = \"0.0.0.0:9464\"\nmetrics_public = true\n{base}"),
        )
        .unwrap();
        assert!(c.metrics_listen.is_some());
        let e = err(&dir, &format!("[jail]\nuid_base = 0\n{base}"));
        assert!(e.contains("jail.uid_base"), "{e}");
        let e = err(&dir, &format!("[jail]\nuid_base = 4294967295\n{base}"));
        assert!(e.contains("jail.uid_base"), "{e}");
    }

    #[test]
    fn virtio_disk_names() {
        assert_eq!(virtio_disk_index("/dev/vda"), Some(0));
        assert_eq!(virtio_disk_index("/dev/vdc"), Some(2));
        assert_eq!(virtio_disk_index("/dev/nvme0n1"), None);
        assert_eq!(virtio_disk_index("/dev/vdaa"), None);
    }
}
