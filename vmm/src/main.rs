//! `ddvmm`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ddvmm::control::FaultKind;

use ddvmm::devices::channel::ChannelInfo;
use ddvmm::devices::virtio::net::parse_mac;
use ddvmm::devices::virtio::ring::{RateLimit, RingKind, RingPort};
use ddvmm::exit::GuestExit;
use ddvmm::handoff::Adopter;
use ddvmm::machine::{
    BootSource, ChannelConfig, ChannelFds, ConsoleOutput, DiskConfig, Machine, MachineConfig,
    NetConfig, RingDiskConfig, RingNetConfig, SnapshotMode,
};
use ddvmm::sandbox::jail::{self, JailConfig};
use ddvmm::sandbox::limits::LogLimiter;
use ddvmm::sandbox::seccomp::{self, SeccompMode, ThreadKind};
use ddvmm::stats_page::StatsWriter;
use ddvmm::units::parse_size;

/// Driver-domain VMM: boots unmodified Linux kernels under KVM.
#[derive(Parser, Debug)]
#[command(name = "ddvmm", version, about)]
struct Cli {
    /// Log filter (tracing syntax, e.g. "info" or "ddvmm=debug"); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot one VM and run it until the guest powers off, reboots, panics or crashes.
    ///
    /// Exit status: 0 powered off, 1 VMM error, 2 usage error, 3 rebooted, 4 kernel panic,
    /// 5 crash (triple fault, KVM internal error).
    Run(Box<RunArgs>),
    /// Start and supervise the driver and client VMs of a system configuration (TOML), and
    /// serve the API on its Unix socket until SIGTERM, SIGINT or `ctl shutdown`.
    Daemon {
        /// System configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a running daemon.
    Ctl {
        /// The daemon's API socket (the config's `api.socket`; default <config>.sock).
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// VMs and their states.
    List,
    /// Per-VM device and channel counters.
    Stats,
    /// Start a stopped VM.
    Start {
        /// VM name.
        vm: String,
    },
    /// Stop a running VM (SIGTERM, SIGKILL after 10 s).
    Stop {
        /// VM name.
        vm: String,
    },
    /// Stop every VM (clients first) and end the daemon.
    Shutdown,
    /// Inject a fault into a driver VM: panic, hang, kill, triple-fault, corrupt, reset,
    /// bad-index, seccomp.
    Inject {
        /// Driver VM name.
        vm: String,
        /// Fault kind.
        #[arg(value_parser = parse_fault)]
        fault: FaultKind,
    },
    /// Inject many faults of mixed kinds at random intervals; waits for every recovery.
    Campaign {
        /// Driver VM name.
        vm: String,
        /// Number of faults.
        #[arg(long, default_value_t = 20)]
        faults: u32,
        /// Kinds to use (comma-separated; default: all).
        #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
        kinds: Vec<FaultKind>,
        /// Shortest pause after a recovery before the next fault.
        #[arg(long, default_value_t = 0)]
        min_interval_ms: u64,
        /// Longest pause.
        #[arg(long, default_value_t = 2000)]
        max_interval_ms: u64,
        /// Seed of the kind order and pauses.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Every fault the daemon saw: detection path, latency, outage, replays.
    Events,
    /// The daemon's counters in the Prometheus text format.
    Metrics,
    /// Add VMs to the running system and start them: a TOML file of `[[driver]]` and
    /// `[[client]]` tables as in the configuration file (relative paths are relative to the
    /// file's directory); checked with the running configuration as a whole.
    Add {
        /// The TOML file.
        file: PathBuf,
    },
    /// Stop a VM and remove it; its channel slots go back to their driver VMs.
    Remove {
        /// VM name.
        vm: String,
        /// Also remove a driver VM that serves clients (their disks and NICs on it fail).
        #[arg(long)]
        force: bool,
    },
}

fn parse_fault(s: &str) -> Result<FaultKind, String> {
    FaultKind::parse(s).ok_or_else(|| {
        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown fault '{s}' (expected one of {})", names.join(", "))
    })
}

/// Sends one typed request; prints the reply (JSON, or the metrics text); `Ok(false)` after
/// printing the daemon's refusal.
fn ctl(socket: &std::path::Path, op: CtlOp) -> anyhow::Result<bool> {
    use ddvmm::daemon::api::model::{CampaignRequest, FaultRequest, Reply, Request};
    let req = match op {
        CtlOp::List => Request::List,
        CtlOp::Stats => Request::Stats,
        CtlOp::Start { vm } => Request::Start { vm },
        CtlOp::Stop { vm } => Request::Stop { vm },
        CtlOp::Shutdown => Request::Shutdown,
        CtlOp::Inject { vm, fault } => Request::Inject {
            vm,
            fault: FaultRequest { kind: fault },
        },
        CtlOp::Campaign {
            vm,
            faults,
            kinds,
            min_interval_ms,
            max_interval_ms,
            seed,
        } => Request::Campaign {
            vm,
            campaign: CampaignRequest {
                faults,
                kinds,
                min_interval_ms,
                max_interval_ms: Some(max_interval_ms),
                seed: Some(seed),
            },
        },
        CtlOp::Events => Request::Events,
        CtlOp::Metrics => Request::Metrics,
        CtlOp::Add { file } => Request::Add {
            vms: new_vms(&file)?,
        },
        CtlOp::Remove { vm, force } => Request::Remove {
            vm,
            remove: ddvmm::daemon::api::model::RemoveRequest { force },
        },
    };
    let reply = match ddvmm::daemon::client::call(socket, &req) {
        Ok(r) => r,
        Err(ddvmm::daemon::client::ClientError::Api(e)) => {
            eprintln!("error: {e}");
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    match reply {
        Reply::Vms(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Reply::Stats(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Reply::Events(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Reply::Campaign(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Reply::Metrics(text) => print!("{text}"),
        Reply::Done => {}
    }
    Ok(true)
}

/// The VMs of `ctl add`'s file, with paths made absolute from the file's directory.
fn new_vms(file: &std::path::Path) -> anyhow::Result<ddvmm::daemon::config::NewVms> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut vms: ddvmm::daemon::config::NewVms = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            file.display(),
            e.to_string().trim().replace('\n', " ")
        )
    })?;
    let base = std::fs::canonicalize(file.parent().unwrap_or(std::path::Path::new(".")))
        .with_context(|| format!("cannot resolve the directory of {}", file.display()))?;
    for v in vms.driver.iter_mut().chain(vms.client.iter_mut()) {
        v.resolve_paths(&base);
    }
    Ok(vms)
}

fn daemon(config: &std::path::Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(ddvmm::daemon::run(config))?;
    Ok(())
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Linux bzImage to boot.
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest memory: a number with K, M or G suffix (bare numbers are MiB).
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Serial console destination: "stdout" or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// A virtio-blk disk: PATH[,ro][,iops=N][,bps=N] (repeatable; iops and bps limit
    /// requests and bytes per second).
    #[arg(long = "disk", value_name = "PATH[,ro][,iops=N][,bps=N]")]
    disks: Vec<String>,
    /// A virtio-net NIC on a TAP device: tap=NAME[,mac=52:54:00:xx:xx:xx] (repeatable).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// A channel device (driver VM), with descriptors inherited from the daemon: a block
    /// window mem=FD,kick=FD,doorbell=FD,backend=/dev/vdX,start=SECTOR,sectors=N[,ro]
    /// [,weight=W] (its share of the device, 1-10000, default 100) or a
    /// network port mem=FD,kick=FD,doorbell=FD,backend=UPLINK,mac=MAC (repeatable).
    #[arg(long = "channel", value_name = "SPEC")]
    channels: Vec<String>,
    /// A virtio-blk disk served by a driver VM over a ring (client VM), with descriptors
    /// inherited from the daemon: mem=FD,kick=FD,doorbell=FD,sectors=N[,ro][,id=NAME]
    /// [,generation=G][,iops=N][,bps=BYTES] (repeatable; iops and bps limit requests and
    /// bytes per second).
    #[arg(long = "ring-disk", value_name = "SPEC")]
    ring_disks: Vec<String>,
    /// A virtio-net NIC served by a driver VM over a ring (client VM), with descriptors
    /// inherited from the daemon: mem=FD,kick=FD,doorbell=FD,mac=MAC[,generation=G]
    /// (repeatable).
    #[arg(long = "ring-net", value_name = "SPEC")]
    ring_nets: Vec<String>,
    /// A host PCI function to pass through with VFIO, by address DDDD:BB:DD.F; it must be
    /// bound to vfio-pci, in a viable IOMMU group (repeatable).
    #[arg(long = "vfio", value_name = "PCI-ADDRESS")]
    vfio: Vec<String>,
    /// A stats page (memfd inherited from the daemon) to publish device counters into.
    #[arg(long, value_name = "FD")]
    stats_fd: Option<i32>,
    /// The daemon's control socket (inherited): replay, quarantine, fault injection.
    #[arg(long, value_name = "FD")]
    control_fd: Option<i32>,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Cap of a console file (K, M or G suffix; bare numbers are MiB): output beyond it is
    /// dropped after one notice.
    #[arg(long, default_value = "16M")]
    console_limit: String,
    /// System call filters per thread: a call off the list kills the VMM (enforce), is only
    /// logged by the kernel (log), or nothing is filtered (off).
    #[arg(long, value_enum, default_value = "enforce")]
    seccomp: SeccompMode,
    /// Jail the VMM (root only): own mount, PID, IPC, UTS and network namespaces, this empty
    /// directory as its read-only root, --uid/--gid, no capabilities. The daemon always does.
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
    jail_root: Option<PathBuf>,
    /// The jailed VMM's uid (non-zero).
    #[arg(long, requires = "jail_root")]
    uid: Option<u32>,
    /// The jailed VMM's gid (non-zero).
    #[arg(long, requires = "jail_root")]
    gid: Option<u32>,
    /// Write a snapshot of this VM into DIR: for a driver VM, once every channel's agent is
    /// ready and parked at its gate (the gates open after it: the template it is restored
    /// from); for any other VM, when the process gets SIGUSR1. One snapshot per run.
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    snapshot_to: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of booting (same devices, memory and vCPUs as
    /// when it was taken; the kernel is not read). A snapshot from another ddvmm version,
    /// another CPU or a damaged file is refused.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// With --restore: a standby. Build the VM (process, jail, KVM, memory, devices) and wait,
    /// confined, with no vCPU started and no state loaded, until the control connection says
    /// `resume`; then load the snapshot and run. The console file is appended to, not
    /// truncated (it still belongs to the VM this one replaces). The daemon keeps one per
    /// driver VM so that a restart costs no process start.
    #[arg(long, requires_all = ["restore", "control_fd"])]
    standby: bool,
}

/// Log lines a VMM may write: bursts of 200, then 20 a second, 16 MiB in all (a guest can
/// provoke warnings at will).
const VMM_LOG_RATE: f64 = 20.0;
const VMM_LOG_BURST: u32 = 200;
const VMM_LOG_TOTAL: u64 = 16 << 20;

fn init_logging(level: &str, limited: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if limited {
        fmt.with_writer(LogLimiter::new(VMM_LOG_RATE, VMM_LOG_BURST, VMM_LOG_TOTAL))
            .init();
    } else {
        fmt.with_writer(std::io::stderr).init();
    }
}

fn run(args: RunArgs) -> anyhow::Result<GuestExit> {
    let started = std::time::Instant::now();
    let mem_size = parse_size(&args.mem).with_context(|| format!("--mem {}", args.mem))?;
    let console_limit = parse_size(&args.console_limit)
        .with_context(|| format!("--console-limit {}", args.console_limit))?;
    let console = match args.console.as_str() {
        "stdout" => ConsoleOutput::Stdout,
        path => ConsoleOutput::File {
            path: PathBuf::from(path),
            limit: console_limit,
            append: args.standby,
        },
    };
    let jail = match (args.jail_root, args.uid, args.gid) {
        (Some(root), Some(uid), Some(gid)) => Some(JailConfig { root, uid, gid }),
        _ => None,
    };
    // glibc's malloc asks for the CPU count (by reading /sys, a call no filter allows) when a
    // process's ninth thread needs an arena, unless the arena count is fixed up front.
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 8) };
    seccomp::enable(args.seccomp).context("seccomp")?;
    if let Some(j) = &jail {
        // From here on this is the VMM, PID 1 of its own namespace (the caller's process
        // stays behind as the reaper).
        jail::enter(j)?;
    }
    let disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nets = args
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(n, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut adopter = Adopter::new();
    let channels = args
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| parse_channel(c, i as u32, &mut adopter))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let channels_empty = channels.is_empty();
    let ring_disks = args
        .ring_disks
        .iter()
        .enumerate()
        .map(|(i, c)| parse_ring_disk(c, i, &mut adopter))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ring_nets = args
        .ring_nets
        .iter()
        .map(|c| parse_ring_net(c, &mut adopter))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let passthrough = args
        .vfio
        .iter()
        .map(|a| a.parse().with_context(|| format!("--vfio {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = MachineConfig {
        passthrough,
        disks,
        ring_disks,
        nets,
        ring_nets,
        channels,
        boot: BootSource::Linux {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        mem_size,
        vcpus: args.cpus,
        console,
        kvm_device: args.kvm_device,
        snapshot: match (args.snapshot_to, args.restore) {
            (Some(dir), _) => {
                if channels_empty {
                    ddvmm::machine::snapshot_on_sigusr1()?;
                }
                SnapshotMode::TemplateTo(dir)
            }
            (None, Some(dir)) => SnapshotMode::Restore(dir),
            (None, None) => SnapshotMode::None,
        },
    };
    let stats = args
        .stats_fd
        .map(|fd| {
            let file = std::fs::File::from(adopter.adopt(fd).context("--stats-fd")?);
            StatsWriter::new(file).context("--stats-fd")
        })
        .transpose()?;
    let control = args
        .control_fd
        .map(|fd| {
            adopter
                .adopt(fd)
                .map(std::os::unix::net::UnixStream::from)
                .context("--control-fd")
        })
        .transpose()?;
    let mut machine = Machine::build(&cfg)?;
    // A standby shares its VM's stats page with the process it would replace: it publishes
    // only once resumed, or the page would flip between the two.
    let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(!args.standby));
    if let Some(writer) = stats {
        spawn_stats_publisher(
            writer,
            machine.ring_ports().to_vec(),
            machine.vmm_exits(),
            publishing.clone(),
        );
    }
    let (resume_tx, resume_rx) = std::sync::mpsc::sync_channel(1);
    if let Some(stream) = control {
        let targets = ddvmm::control::ControlTargets {
            rings: machine
                .ring_ports()
                .iter()
                .map(|p| p.control.clone())
                .collect(),
            faults: machine.fault_injector(),
            resume: args.standby.then_some(resume_tx),
        };
        ddvmm::control::spawn_server(stream, targets).context("starting the control thread")?;
    }
    // Opened now: the jail has no /proc.
    let status = std::fs::File::open("/proc/self/status").ok();
    if let Some(j) = &jail {
        jail::lock_down(j)?;
    }
    seccomp::confine(ThreadKind::Main)?;
    let setup_ms = started.elapsed().as_secs_f64() * 1e3;
    if args.standby {
        tracing::info!(setup_ms, "standby: VM set up");
        if !wait_as_standby(&machine, &resume_rx) {
            tracing::info!("standby: dismissed (control connection closed)");
            return Ok(GuestExit::PowerOff);
        }
        publishing.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!("standby: resumed");
    } else {
        tracing::info!(setup_ms, "VM set up, vCPUs starting");
    }
    let exit = machine.run()?;
    log_vmm_memory(status.as_ref());
    Ok(exit)
}

/// A standby's wait: faults in the template's pages (stopped at once by a resume), then waits
/// for the control thread's resume. False if the control connection closed instead (the
/// sender lives in the control thread).
fn wait_as_standby(machine: &Machine, resume_rx: &std::sync::mpsc::Receiver<()>) -> bool {
    let mut resumed = None;
    let mut asked = || {
        resumed = match resume_rx.try_recv() {
            Ok(()) => Some(true),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(false),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
        };
        resumed.is_some()
    };
    let t = std::time::Instant::now();
    match machine.prefault_ram(&mut asked) {
        Ok(bytes) => tracing::info!(
            mib = bytes >> 20,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "standby: guest memory faulted in"
        ),
        Err(e) => tracing::warn!(error = %e, "standby: guest memory not faulted in"),
    }
    resumed.unwrap_or_else(|| {
        tracing::info!("standby: waiting for resume");
        resume_rx.recv().is_ok()
    })
}

/// Parses `PATH` or `PATH,ro`.
/// Parses `PATH[,ro|,rw][,iops=N][,bps=N]` (options after the path, in any order).
fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let mut parts: Vec<&str> = spec.split(',').collect();
    let (mut read_only, mut limit) = (false, RateLimit::default());
    while parts.len() > 1 {
        let opt = parts[parts.len() - 1];
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ if limit
                .set_option(key, value)
                .map_err(|e| anyhow::anyhow!("--disk {spec}: {e}"))? => {}
            _ if opt.contains('/') || opt.contains('.') => break,
            _ => anyhow::bail!(
                "--disk {spec}: unknown option '{opt}' (expected ro, rw, iops=N or bps=N)"
            ),
        }
        parts.pop();
    }
    let path = parts.join(",");
    if path.is_empty() {
        anyhow::bail!("--disk {spec}: empty path");
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
        limit,
    })
}

/// Parses `tap=NAME[,mac=MAC]`; the default MAC is 52:54:00:12:34:(56 + index).
fn parse_net(spec: &str, index: usize) -> anyhow::Result<NetConfig> {
    let mut tap = None;
    let mut mac = [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ];
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) => {
                mac = parse_mac(m)
                    .ok_or_else(|| anyhow::anyhow!("--net {spec}: invalid MAC address '{m}'"))?
            }
            _ => anyhow::bail!("--net {spec}: expected tap=NAME[,mac=MAC], got '{part}'"),
        }
    }
    let tap = tap.ok_or_else(|| anyhow::anyhow!("--net {spec}: missing tap=NAME"))?;
    Ok(NetConfig { tap, mac })
}

/// `key=value` options of a `--channel`/`--ring-disk` spec; bare words are flags.
struct SpecOptions<'a> {
    arg: &'static str,
    spec: &'a str,
    values: std::collections::BTreeMap<&'a str, &'a str>,
    flags: Vec<&'a str>,
}

impl<'a> SpecOptions<'a> {
    fn parse(
        arg: &'static str,
        spec: &'a str,
        keys: &[&str],
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut o = SpecOptions {
            arg,
            spec,
            values: Default::default(),
            flags: Vec::new(),
        };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some((k, v)) if keys.contains(&k) => {
                    if o.values.insert(k, v).is_some() {
                        anyhow::bail!("{arg} {spec}: '{k}' given twice");
                    }
                }
                None if flags.contains(&part) => o.flags.push(part),
                _ => anyhow::bail!(
                    "{arg} {spec}: unknown option '{part}' (expected {} or {})",
                    keys.join("=, ") + "=",
                    flags.join(", ")
                ),
            }
        }
        Ok(o)
    }

    fn str(&self, key: &str) -> anyhow::Result<&'a str> {
        self.values
            .get(key)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("{} {}: missing {key}=", self.arg, self.spec))
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> anyhow::Result<T> {
        let v = self.str(key)?;
        v.parse()
            .map_err(|_| anyhow::anyhow!("{} {}: {key}={v} is not a number", self.arg, self.spec))
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }

    fn fds(&self, adopter: &mut Adopter) -> anyhow::Result<ChannelFds> {
        let mut take = |key: &str| -> anyhow::Result<std::os::fd::OwnedFd> {
            let n = self.num(key)?;
            adopter
                .adopt(n)
                .with_context(|| format!("{} {}: {key}", self.arg, self.spec))
        };
        let memory = std::fs::File::from(take("mem")?);
        let kick = take("kick")?;
        let doorbell = take("doorbell")?;
        Ok(ChannelFds {
            memory: memory.into(),
            kick: std::sync::Arc::new(eventfd_from(kick)),
            doorbell: std::sync::Arc::new(eventfd_from(doorbell)),
        })
    }
}

fn eventfd_from(fd: std::os::fd::OwnedFd) -> vmm_sys_util::eventfd::EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `fd` is an owned, open descriptor whose ownership moves into the EventFd. If it
    // is not actually an eventfd, reads and writes on it fail with an error, nothing worse.
    unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(fd.into_raw_fd()) }
}

fn parse_channel(spec: &str, index: u32, adopter: &mut Adopter) -> anyhow::Result<ChannelConfig> {
    // The descriptors here, the description in one parser shared with the control socket's
    // runtime assignments.
    let (fds, description): (Vec<&str>, Vec<&str>) = spec.split(',').partition(|p| {
        ["mem=", "kick=", "doorbell="]
            .iter()
            .any(|k| p.starts_with(k))
    });
    let fds = fds.join(",");
    let o = SpecOptions::parse("--channel", &fds, &["mem", "kick", "doorbell"], &[])?;
    let info = ChannelInfo::parse(index, &description.join(","))
        .with_context(|| format!("--channel {spec}"))?;
    Ok(ChannelConfig {
        info,
        fds: o.fds(adopter)?,
    })
}

fn parse_ring_disk(
    spec: &str,
    index: usize,
    adopter: &mut Adopter,
) -> anyhow::Result<RingDiskConfig> {
    let o = SpecOptions::parse(
        "--ring-disk",
        spec,
        &[
            "mem",
            "kick",
            "doorbell",
            "sectors",
            "id",
            "generation",
            "iops",
            "bps",
        ],
        &["ro"],
    )?;
    let mut limit = RateLimit::default();
    for key in ["iops", "bps"] {
        if let Some(v) = o.values.get(key) {
            limit
                .set_option(key, v)
                .map_err(|e| anyhow::anyhow!("--ring-disk {spec}: {e}"))?;
        }
    }
    Ok(RingDiskConfig {
        limit,
        generation: if o.values.contains_key("generation") {
            o.num("generation")?
        } else {
            1
        },
        sectors: o.num("sectors")?,
        read_only: o.flag("ro"),
        id: o
            .values
            .get("id")
            .map_or_else(|| format!("ddvmm-ring{index}"), |s| s.to_string()),
        fds: o.fds(adopter)?,
    })
}

fn parse_ring_net(spec: &str, adopter: &mut Adopter) -> anyhow::Result<RingNetConfig> {
    let o = SpecOptions::parse(
        "--ring-net",
        spec,
        &["mem", "kick", "doorbell", "mac", "generation"],
        &[],
    )?;
    let mac = o.str("mac")?;
    Ok(RingNetConfig {
        mac: parse_mac(mac).ok_or_else(|| anyhow::anyhow!("--ring-net {spec}: bad mac={mac}"))?,
        generation: if o.values.contains_key("generation") {
            o.num("generation")?
        } else {
            1
        },
        fds: o.fds(adopter)?,
    })
}

/// Publishes the ring devices' counters and the exits that reached this process to the stats
/// page ten times a second (the daemon's watcher reads it as often), while `publishing`.
fn spawn_stats_publisher(
    mut writer: StatsWriter,
    ports: Vec<RingPort>,
    vmm_exits: std::sync::Arc<ddvmm::vcpu::VmmExits>,
    publishing: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let object = |pairs: Vec<(&'static str, u64)>| {
        serde_json::Value::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect(),
        )
    };
    let publish = move || loop {
        if !publishing.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let of = |kind| {
            ports
                .iter()
                .filter(|p| p.kind == kind)
                .map(|p| object(p.counters.snapshot()))
                .collect::<Vec<_>>()
        };
        let (disks, nets) = (of(RingKind::Disk), of(RingKind::Nic));
        // `rings`: every ring device in control order (disks, then NICs), for the daemon's
        // watcher, which needs only the progress counters both kinds have.
        let rings: Vec<_> = [RingKind::Disk, RingKind::Nic]
            .into_iter()
            .flat_map(|kind| ports.iter().filter(move |p| p.kind == kind))
            .map(|p| p.counters.progress())
            .collect();
        let exits = object(vmm_exits.snapshot().to_vec());
        let json = serde_json::json!({
            "ring_disks": disks,
            "ring_nets": nets,
            "rings": rings,
            "vmm_exits": exits,
        })
        .to_string();
        if let Err(e) = writer.publish(&json) {
            tracing::warn!(error = %e, "stats page");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if let Err(e) = seccomp::spawn(ThreadKind::Stats, "stats", publish) {
        tracing::warn!(error = %e, "cannot start the stats publisher");
    }
}

/// Logs the VMM's resident memory split into guest RAM (memfd, counted as shared memory) and
/// the VMM's own (anonymous and file-backed).
fn log_vmm_memory(file: Option<&std::fs::File>) {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let Some(n) = file.and_then(|f| f.read_at(&mut buf, 0).ok()) else {
        return;
    };
    let status = String::from_utf8_lossy(&buf[..n]);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    tracing::info!(
        vmm_rss_kib = field("RssAnon:") + field("RssFile:"),
        guest_rss_kib = field("RssShmem:"),
        "resident memory"
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, matches!(cli.command, Command::Run(_)));
    match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(exit) => {
                eprintln!("ddvmm: {exit}");
                ExitCode::from(exit.status_code() as u8)
            }
            Err(e) => {
                eprintln!("ddvmm: error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Daemon { config } => match daemon(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ddvmm: error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Ctl { socket, op } => match ctl(&socket, op) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("ddvmm: error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
