//! `ddvmm-agent`: the translation agent inside a driver VM (static binary, stock kernel).
//!
//! 1. Binds every ddvmm channel device (PCI `1b36:11dd`) to the stock `uio_pci_generic`
//!    driver (through its sysfs `new_id`), which gives userspace the device's INTx interrupt.
//! 2. Per channel device, a thread for the agent's life (`slot`): maps BAR 0 (registers:
//!    doorbell, backend device, sector window) through sysfs `resource0` and opens the
//!    interrupt. A channel assigned at boot: maps BAR 2 (the ring memory) through `resource2`,
//!    opens the backend block device with `O_DIRECT`, passes the gate, attaches to the ring and
//!    announces readiness. A vacant slot passes the gate, then waits for the VMM to assign it
//!    a channel, and serves that one the same way.
//! 3. Serves requests with a pool of I/O threads (many in flight); data is copied between the
//!    ring's slots and page-aligned buffers (`O_DIRECT` cannot target a BAR mapping). Flush
//!    and FUA writes are `fdatasync` on the backend. Every request is bounds-checked against
//!    the window the *driver VM's VMM* published in BAR 0, never against client-written data.
//! 4. Sleeps on the interrupt only after arming the ring's event index; bumps a heartbeat in
//!    the ring header (often while the channel has work, rarely while it is idle: `heartbeat`);
//!    rings the doorbell when the client asked to be notified.
//!
//! Network channels (kind 2) are served by `net`: a TAP per client on the driver VM's own
//! Linux bridge with the NIC it owns.
//!
//! The VMM can take a channel back (`DETACH`, see `slot`): the agent stops serving it, closes
//! its backend device or TAP, ends its I/O threads, unmaps its memory, confirms through the
//! `DETACHED` register and waits, vacant, for the slot's next channel.
//!
//! Kernel command line: `ddvmm.agent=garbage` publishes a bogus completion before every real
//! one (a test of the client's validation); `ddvmm.agent.threads=N` sets the pool size;
//! `ddvmm.agent.poison=SECTOR` panics the kernel on any read or write touching that sector of a
//! channel's window (a poison request, for the recovery tests); `ddvmm.agent.depth=N` (default
//! 2) bounds the requests on a backend device at once while its channels contend,
//! `ddvmm.agent.grace_ms=N` (default 1000) is how long a channel counts as contending after its
//! last request, and `ddvmm.agent.fair=off` serves them first come, first served instead (see
//! `fair`). `ddvmm.agent.heartbeat_ms=N` (default 500) is how often a served channel's heartbeat
//! is written while it has work, `ddvmm.agent.idle_heartbeat_ms=N` (default 30000) while it
//! has none (the daemon's hang detection reads it; an idle agent wakes only for it).
//!
//! Fault injection: the daemon can ask (through the channel's `FAULT` register, which the VMM
//! follows with an interrupt; a busy agent also reads it every 20 ms) for a kernel panic, a
//! reboot, a hang or garbage completions (`fault`).

mod backend;
mod console;
mod fair;
mod fault;
mod gate;
mod heartbeat;
mod net;
mod pci;
mod slot;
mod wakeups;

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let opts = Options::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let devices = match pci::find_channels(Duration::from_secs(30)) {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => {
            eprintln!("ddvmm-agent: no channel devices found");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("ddvmm-agent: {e}");
            return ExitCode::from(1);
        }
    };
    let mut threads = Vec::new();
    for dev in devices {
        let opts = opts.clone();
        let name = format!("channel-{}", dev.address);
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || slot::run(&dev, &opts))
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("ddvmm-agent: cannot start a channel thread: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("ddvmm-agent: {e}");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    ExitCode::from(u8::from(failed))
}

/// Agent settings from the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Publish a bogus completion before each real one.
    pub garbage: bool,
    /// I/O threads per channel.
    pub threads: usize,
    /// Panic the kernel on a request touching this sector (window-relative).
    pub poison: Option<u64>,
    /// Share each backend device among its channels by weight (SFQ), or not.
    pub fair: bool,
    /// How a backend device is shared while its channels contend.
    pub share: crate::fair::Policy,
    /// How often each served channel's heartbeat is written.
    pub heartbeat: crate::heartbeat::Policy,
}

impl Options {
    fn from_cmdline(cmdline: &str) -> Self {
        let mut o = Options {
            garbage: false,
            threads: 8,
            poison: None,
            fair: true,
            share: crate::fair::Policy::default(),
            heartbeat: crate::heartbeat::Policy::default(),
        };
        for arg in cmdline.split_whitespace() {
            match arg.split_once('=') {
                Some(("ddvmm.agent", "garbage")) => o.garbage = true,
                Some(("ddvmm.agent.poison", n)) => o.poison = n.parse().ok(),
                Some(("ddvmm.agent.fair", "off")) => o.fair = false,
                Some(("ddvmm.agent.depth", n)) => {
                    if let Ok(n) = n.parse::<usize>() {
                        o.share.depth = n.clamp(1, 64);
                    }
                }
                Some(("ddvmm.agent.grace_ms", n)) => {
                    if let Ok(n) = n.parse::<u64>() {
                        o.share.grace = Duration::from_millis(n.clamp(1, 10_000));
                    }
                }
                Some(("ddvmm.agent.heartbeat_ms", n)) => {
                    if let Ok(n) = n.parse::<u64>() {
                        o.heartbeat.busy = Duration::from_millis(n.clamp(10, 60_000));
                    }
                }
                Some(("ddvmm.agent.idle_heartbeat_ms", n)) => {
                    if let Ok(n) = n.parse::<u64>() {
                        o.heartbeat.idle = Duration::from_millis(n.clamp(10, 3_600_000));
                    }
                }
                Some(("ddvmm.agent.threads", n)) => {
                    if let Ok(n) = n.parse::<usize>() {
                        o.threads = n.clamp(1, 64);
                    }
                }
                _ => {}
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_cmdline() {
        let o = Options::from_cmdline("console=ttyS0 ddvmm.agent=garbage ddvmm.agent.threads=99");
        assert!(o.garbage);
        assert_eq!(o.threads, 64);
        assert_eq!(o.poison, None);
        assert!(o.fair);
        assert_eq!(o.share, crate::fair::Policy::default());
        let o = Options::from_cmdline(
            "ddvmm.agent.fair=off ddvmm.agent.depth=0 ddvmm.agent.grace_ms=250 \
             ddvmm.agent.heartbeat_ms=2000 ddvmm.agent.idle_heartbeat_ms=90000",
        );
        assert_eq!(o.heartbeat.busy, Duration::from_millis(2000));
        assert_eq!(o.heartbeat.idle, Duration::from_secs(90));
        assert!(!o.fair);
        assert_eq!(o.share.depth, 1);
        assert_eq!(o.share.grace, Duration::from_millis(250));
        assert_eq!(
            Options::from_cmdline("ddvmm.agent.poison=4096").poison,
            Some(4096)
        );
        let o = Options::from_cmdline("ddvmm.agent.threads=x");
        assert!(!o.garbage);
        assert_eq!(o.threads, 8);
    }
}
