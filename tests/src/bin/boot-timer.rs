//! `boot-timer`: runs a VMM command once, measures the time from spawning it to the first
//! console line containing a marker (the guest's `/init` banner), samples the VMM's resident
//! memory at that moment, and prints one machine-readable line:
//!
//! `SAMPLE <label> <ms-to-marker> <VMM-own RSS KiB> <guest-RAM RSS KiB>`
//!
//! Guest RAM must be a memfd (ddvmm's own; QEMU with `memory-backend-memfd`): memfd mappings
//! are counted as guest RAM, all other resident memory as the VMM's own footprint. The process is killed if it has not exited 60 s
//! after the marker.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Time a VM boot to a console marker")]
struct Args {
    /// Label printed with the sample.
    #[arg(long)]
    label: String,
    /// Console text that marks the end of the boot.
    #[arg(long)]
    marker: String,
    /// Give up after this many seconds without the marker.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

/// (VMM's own resident KiB, guest RAM resident KiB): from `smaps`, guest RAM is every mapping
/// of a memfd (`/memfd:...`); everything else resident is the VMM's own.
fn rss_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut own, mut guest) = (0, 0);
    let mut in_memfd = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_memfd = line.contains("/memfd:");
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if in_memfd {
                guest += kib;
            } else {
                own += kib;
            }
        }
    }
    (own, guest)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let start = Instant::now();
    let mut child = match Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("boot-timer: cannot run {}: {e}", args.command[0]);
            return ExitCode::from(1);
        }
    };
    let pid = child.id();
    let Some(stdout) = child.stdout.take() else {
        eprintln!("boot-timer: no stdout pipe");
        return ExitCode::from(1);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = args.marker.clone();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if !found && String::from_utf8_lossy(&line).contains(&marker) {
                found = true;
                let _ = tx.send((start.elapsed(), rss_kib(pid)));
            }
        }
    });
    let result = rx.recv_timeout(Duration::from_secs(args.timeout));
    // Let the guest finish (power off); kill it if it does not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok((elapsed, (own, shmem))) => {
            println!(
                "SAMPLE {} {} {} {}",
                args.label,
                elapsed.as_millis(),
                own,
                shmem
            );
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("boot-timer: {}: marker not seen", args.label);
            ExitCode::from(1)
        }
    }
}
