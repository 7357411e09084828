//! `ddvmm`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ddvmm::devices::virtio::net::parse_mac;
use ddvmm::exit::GuestExit;
use ddvmm::machine::{BootSource, ConsoleOutput, DiskConfig, Machine, MachineConfig, NetConfig};
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
    Run(RunArgs),
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
    /// A virtio-blk disk: PATH or PATH,ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// A virtio-net NIC on a TAP device: tap=NAME[,mac=52:54:00:xx:xx:xx] (repeatable).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<GuestExit> {
    let mem_size = parse_size(&args.mem).with_context(|| format!("--mem {}", args.mem))?;
    let console = match args.console.as_str() {
        "stdout" => ConsoleOutput::Stdout,
        path => ConsoleOutput::File(PathBuf::from(path)),
    };
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
    let cfg = MachineConfig {
        disks,
        nets,
        boot: BootSource::Linux {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        mem_size,
        vcpus: args.cpus,
        console,
        kvm_device: args.kvm_device,
    };
    let mut machine = Machine::build(&cfg)?;
    let exit = machine.run()?;
    log_vmm_memory();
    Ok(exit)
}

/// Parses `PATH` or `PATH,ro`.
fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, opt)) => {
            anyhow::bail!("--disk {spec}: unknown option '{opt}' (expected ro or rw)")
        }
        None => (spec, false),
    };
    if path.is_empty() {
        anyhow::bail!("--disk {spec}: empty path");
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
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

/// Logs the VMM's resident memory split into guest RAM (memfd, counted as shared memory) and
/// the VMM's own (anonymous and file-backed).
fn log_vmm_memory() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
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
    init_logging(&cli.log_level);
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(exit) => {
                eprintln!("ddvmm: {exit}");
                ExitCode::from(exit.status_code() as u8)
            }
            Err(e) => {
                eprintln!("ddvmm: error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
