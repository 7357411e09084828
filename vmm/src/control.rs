//! The control connection between the daemon and one VMM process it started.
//!
//! A Unix stream socket pair: the daemon keeps one end, the VMM inherits the other
//! (`ddvmm run --control-fd N`). The daemon sends one JSON [`ControlRequest`] per line and reads
//! one [`ControlReply`] line back. Commands: replay a ring disk after its driver VM was
//! replaced, quarantine it, or inject a fault into this VM. The VMM serves the socket on its
//! own thread; a daemon that goes away closes the socket and the thread ends.

use crate::sandbox::seccomp::ThreadKind;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::devices::channel::{ChannelInfo, ChannelSlot, DETACH_TIMEOUT};
use crate::devices::virtio::ring::{RingCommand, RingCommands};
use crate::machine::FaultInjector;
use ddvmm_translation::channel::fault;

/// Longest request line accepted.
pub const MAX_LINE: usize = 4096;
/// How long a ring disk may take to apply a command.
const RING_TIMEOUT: Duration = Duration::from_secs(30);

/// Faults the daemon can inject into a driver VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Kernel panic inside the guest (`sysrq c` by the agent).
    Panic,
    /// The agent stops serving and stops its heartbeat.
    Hang,
    /// SIGKILL of the VM's VMM process (done by the daemon itself).
    Kill,
    /// The guest CPU triple-faults (empty IDT plus an NMI, from the VMM).
    TripleFault,
    /// Garbage in the completion ring (published by the agent).
    Corrupt,
    /// Immediate reboot of the guest kernel (`sysrq b`), ending in the i8042 reset line.
    Reset,
    /// The agent stores a completion producer index more than a ring ahead (a broken ring).
    BadIndex,
    /// The VMM's control thread opens a network socket, which its seccomp filter forbids: the
    /// VMM dies of `SIGSYS` (a compromised VMM caught by its filter).
    Seccomp,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Panic,
        FaultKind::Hang,
        FaultKind::Kill,
        FaultKind::TripleFault,
        FaultKind::Corrupt,
        FaultKind::Reset,
        FaultKind::BadIndex,
        FaultKind::Seccomp,
    ];

    /// The name used in the API, the CLI and metrics.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Panic => "panic",
            FaultKind::Hang => "hang",
            FaultKind::Kill => "kill",
            FaultKind::TripleFault => "triple-fault",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Reset => "reset",
            FaultKind::BadIndex => "bad-index",
            FaultKind::Seccomp => "seccomp",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One command to a VMM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Ring disk `disk` (configuration order): the driver VM was replaced; new generation and
    /// replay, poison after `poison_after` crashes (0: never).
    Replay {
        /// Ring disk index.
        disk: usize,
        /// See [`RingCommand::Replay`].
        poison_after: u32,
        /// Send nothing until a [`ControlRequest::Release`].
        #[serde(default)]
        hold: bool,
    },
    /// Ring disk `disk`: send again after a held replay.
    Release {
        /// Ring disk index.
        disk: usize,
    },
    /// Ring disk `disk`: its driver VM is given up.
    Quarantine {
        /// Ring disk index.
        disk: usize,
    },
    /// Make this VM fail.
    Inject {
        /// How.
        fault: FaultKind,
    },
    /// A standby VMM (`ddvmm run --standby`): load the snapshot and start the vCPUs.
    Resume,
    /// Channel slot `slot` of this driver VM now serves a client: `channel` describes it as
    /// a `--channel` spec does, without descriptors (the slot's are wired already).
    Assign {
        /// Slot index.
        slot: u32,
        /// `backend=...,start=...,sectors=...[,ro][,weight=W]` or `backend=...,mac=...`.
        channel: String,
    },
    /// Channel slot `slot` serves nobody any more: its registers read vacant and its agent is
    /// asked to let go (the reply says whether it confirmed).
    Vacate {
        /// Slot index.
        slot: u32,
    },
}

/// The answer to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Whether the command was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests replayed.
    #[serde(default)]
    pub replayed: u64,
    /// Requests failed as poison.
    #[serde(default)]
    pub poisoned: u64,
    /// Requests failed by a quarantine.
    #[serde(default)]
    pub failed: u64,
    /// Requests that one more crash would make poison.
    #[serde(default)]
    pub suspects: u64,
}

impl ControlReply {
    fn error(e: impl Into<String>) -> Self {
        ControlReply {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// Errors of the control connection (daemon side).
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket failed or closed.
    #[error("control connection")]
    Io(#[source] std::io::Error),
    /// The VMM did not answer in time.
    #[error("control request timed out")]
    Timeout,
    /// The answer is not a reply.
    #[error("bad control reply")]
    BadReply(#[source] serde_json::Error),
    /// The VMM refused or failed.
    #[error("VMM refused: {0}")]
    Refused(String),
}

/// What a VMM process can be asked to act on.
pub struct ControlTargets {
    /// Ring disks, in configuration order.
    pub rings: Vec<Arc<dyn RingCommands>>,
    /// Fault injection handles.
    pub faults: Arc<FaultInjector>,
    /// A standby's main thread, waiting for [`ControlRequest::Resume`] (`None`: not a
    /// standby).
    pub resume: Option<std::sync::mpsc::SyncSender<()>>,
}

impl ControlTargets {
    /// Carries out one request.
    pub fn handle(&self, req: &ControlRequest) -> ControlReply {
        let ring = |disk: usize| {
            self.rings
                .get(disk)
                .ok_or_else(|| format!("no ring disk {disk}"))
        };
        let cmd = match *req {
            ControlRequest::Replay {
                disk,
                poison_after,
                hold,
            } => (disk, RingCommand::Replay { poison_after, hold }),
            ControlRequest::Release { disk } => (disk, RingCommand::Release),
            ControlRequest::Quarantine { disk } => (disk, RingCommand::Quarantine),
            ControlRequest::Inject { fault } => return self.inject(fault),
            ControlRequest::Resume => return self.resume(),
            ControlRequest::Assign { slot, ref channel } => return self.assign(slot, channel),
            ControlRequest::Vacate { slot } => return self.vacate(slot),
        };
        let outcome =
            ring(cmd.0).and_then(|r| r.request(cmd.1, RING_TIMEOUT).map_err(|e| e.to_string()));
        match outcome {
            Ok(o) => ControlReply {
                ok: true,
                error: None,
                replayed: o.replayed,
                poisoned: o.poisoned,
                failed: o.failed,
                suspects: o.suspects,
            },
            Err(e) => ControlReply::error(e),
        }
    }

    fn slot(&self, slot: u32) -> Result<&Arc<ChannelSlot>, ControlReply> {
        self.faults
            .channels
            .iter()
            .find(|c| c.index() == slot)
            .ok_or_else(|| ControlReply::error(format!("no channel slot {slot}")))
    }

    fn assign(&self, slot: u32, channel: &str) -> ControlReply {
        let s = match self.slot(slot) {
            Ok(s) => s,
            Err(r) => return r,
        };
        match ChannelInfo::parse(slot, channel).and_then(|info| s.assign(&info)) {
            Ok(()) => {
                tracing::info!(slot, channel, "channel slot assigned");
                ControlReply {
                    ok: true,
                    ..Default::default()
                }
            }
            Err(e) => ControlReply::error(e.to_string()),
        }
    }

    fn vacate(&self, slot: u32) -> ControlReply {
        let s = match self.slot(slot) {
            Ok(s) => s,
            Err(r) => return r,
        };
        if s.vacate(DETACH_TIMEOUT) {
            tracing::info!(slot, "channel slot vacated");
            ControlReply {
                ok: true,
                ..Default::default()
            }
        } else {
            tracing::warn!(slot, "channel slot vacated; the agent did not confirm");
            ControlReply::error(format!(
                "slot {slot} is vacant but its agent did not let go within {DETACH_TIMEOUT:?}"
            ))
        }
    }

    fn resume(&self) -> ControlReply {
        let Some(tx) = &self.resume else {
            return ControlReply::error("this VMM is not a standby");
        };
        match tx.try_send(()) {
            // Full: resumed already (the main thread took the first one or will).
            Ok(()) | Err(std::sync::mpsc::TrySendError::Full(())) => ControlReply {
                ok: true,
                ..Default::default()
            },
            Err(std::sync::mpsc::TrySendError::Disconnected(())) => {
                ControlReply::error("the VMM is ending")
            }
        }
    }

    fn inject(&self, kind: FaultKind) -> ControlReply {
        let code = match kind {
            FaultKind::Panic => fault::PANIC,
            FaultKind::Hang => fault::HANG,
            FaultKind::Corrupt => fault::CORRUPT,
            FaultKind::Reset => fault::RESET,
            FaultKind::BadIndex => fault::BAD_INDEX,
            FaultKind::TripleFault => {
                tracing::warn!("fault injection: triple fault");
                return if self.faults.vcpu.triple_fault(Duration::from_secs(5)) {
                    ControlReply {
                        ok: true,
                        ..Default::default()
                    }
                } else {
                    ControlReply::error("the boot vCPU did not take the request")
                };
            }
            FaultKind::Kill => return ControlReply::error("kill is done by the daemon"),
            FaultKind::Seccomp => {
                if crate::sandbox::seccomp::mode() != crate::sandbox::seccomp::SeccompMode::Enforce
                {
                    return ControlReply::error("this VMM does not enforce its seccomp filters");
                }
                // The reply goes out first; `serve` then makes the forbidden call.
                return ControlReply {
                    ok: true,
                    ..Default::default()
                };
            }
        };
        tracing::warn!(fault = kind.name(), "fault injection: request to the agent");
        if self.faults.request_agent_fault(code) {
            ControlReply {
                ok: true,
                ..Default::default()
            }
        } else {
            ControlReply::error("this VM has no channel (no agent to fail)")
        }
    }
}

/// Serves `stream` on a new thread until the daemon closes it.
pub fn spawn_server(stream: UnixStream, targets: ControlTargets) -> std::io::Result<()> {
    crate::sandbox::seccomp::spawn(ThreadKind::Control, "control", move || {
        if let Err(e) = serve(stream, &targets) {
            tracing::warn!(error = %e, "control connection ended");
        }
    })
    .map(|_| ())
}

fn serve(stream: UnixStream, targets: &ControlTargets) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let mut violate = false;
        let reply = if n > MAX_LINE {
            // Resynchronise on the next newline, discarding in bounded pieces.
            let mut rest = Vec::new();
            while !line.ends_with('\n') {
                rest.clear();
                let n = (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut rest)?;
                if n == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            ControlReply::error("request line too long")
        } else {
            match serde_json::from_str::<ControlRequest>(line.trim_end()) {
                Ok(req) => {
                    let reply = targets.handle(&req);
                    violate = reply.ok
                        && req
                            == (ControlRequest::Inject {
                                fault: FaultKind::Seccomp,
                            });
                    reply
                }
                Err(e) => ControlReply::error(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
        out.push('\n');
        writer.write_all(out.as_bytes())?;
        if violate {
            tracing::warn!("fault injection: a network socket, which the filter forbids");
            // SAFETY: socket(2) creates a descriptor (closed at once) or, as intended here,
            // traps in the seccomp filter and the process dies.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }
    }
}

/// The daemon's end of one VMM's control connection.
pub struct ControlClient {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    /// Wraps the daemon's end of the socket pair.
    pub fn new(stream: UnixStream) -> Result<Self, ControlError> {
        stream.set_nonblocking(true).map_err(ControlError::Io)?;
        let s = tokio::net::UnixStream::from_std(stream).map_err(ControlError::Io)?;
        let (r, w) = s.into_split();
        Ok(ControlClient {
            reader: tokio::io::BufReader::new(r),
            writer: w,
        })
    }

    /// Sends `req` and waits up to `timeout` for the reply; a refusal is an error.
    pub async fn call(
        &mut self,
        req: &ControlRequest,
        timeout: Duration,
    ) -> Result<ControlReply, ControlError> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut line = serde_json::to_string(req).map_err(ControlError::BadReply)?;
        line.push('\n');
        let exchange = async {
            self.writer
                .write_all(line.as_bytes())
                .await
                .map_err(ControlError::Io)?;
            let mut back = String::new();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut back)
                .await
                .map_err(ControlError::Io)?;
            if n == 0 {
                return Err(ControlError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if n > MAX_LINE {
                return Err(ControlError::Io(std::io::Error::other(
                    "control reply line too long",
                )));
            }
            serde_json::from_str::<ControlReply>(back.trim_end()).map_err(ControlError::BadReply)
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ControlError::Timeout)??;
        if reply.ok {
            Ok(reply)
        } else {
            Err(ControlError::Refused(
                reply.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_hostile_lines_are_refused() {
        let r = ControlRequest::Replay {
            disk: 1,
            poison_after: 3,
            hold: true,
        };
        let s = serde_json::to_string(&r).expect("json");
        assert_eq!(
            s,
            r#"{"op":"replay","disk":1,"poison_after":3,"hold":true}"#
        );
        assert_eq!(
            serde_json::from_str::<ControlRequest>(&s).expect("parse"),
            r
        );
        let i: ControlRequest =
            serde_json::from_str(r#"{"op":"inject","fault":"triple-fault"}"#).expect("inject");
        assert_eq!(
            i,
            ControlRequest::Inject {
                fault: FaultKind::TripleFault
            }
        );
        for bad in [
            r#"{"op":"inject","fault":"meteor"}"#,
            r#"{"op":"replay","disk":-1,"poison_after":3}"#,
            r#"{"op":"replay","disk":0,"poison_after":3,"x":1}"#,
            r#"{"op":"reboot"}"#,
        ] {
            assert!(
                serde_json::from_str::<ControlRequest>(bad).is_err(),
                "{bad}"
            );
        }
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
    }

    #[test]
    fn server_answers_every_line_and_survives_garbage() {
        let (a, b) = UnixStream::pair().expect("pair");
        let targets = ControlTargets {
            rings: Vec::new(),
            faults: Arc::new(FaultInjector::default()),
            resume: None,
        };
        spawn_server(b, targets).expect("server");
        let mut w = a.try_clone().expect("clone");
        let mut r = BufReader::new(a);
        let mut ask = |line: &str| {
            w.write_all(line.as_bytes()).expect("write");
            let mut back = String::new();
            r.read_line(&mut back).expect("read");
            serde_json::from_str::<ControlReply>(&back).expect("reply")
        };
        let rep = ask("not json\n");
        assert!(
            !rep.ok
                && rep
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("bad request"))
        );
        let rep = ask(&format!("{}\n", "x".repeat(MAX_LINE + 10)));
        assert_eq!(rep.error.as_deref(), Some("request line too long"));
        let rep = ask("{\"op\":\"quarantine\",\"disk\":7}\n");
        assert_eq!(rep.error.as_deref(), Some("no ring disk 7"));
        let rep = ask("{\"op\":\"inject\",\"fault\":\"panic\"}\n");
        assert!(!rep.ok, "no channel, nothing to fail");
        let rep = ask("{\"op\":\"inject\",\"fault\":\"kill\"}\n");
        assert!(!rep.ok);
        let rep = ask("{\"op\":\"resume\"}\n");
        assert_eq!(rep.error.as_deref(), Some("this VMM is not a standby"));
    }

    #[test]
    fn a_standby_resumes_once_and_a_closed_connection_dismisses_it() {
        let resumed = |conversation: &[&str]| {
            let (a, b) = UnixStream::pair().expect("pair");
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let targets = ControlTargets {
                rings: Vec::new(),
                faults: Arc::new(FaultInjector::default()),
                resume: Some(tx),
            };
            spawn_server(b, targets).expect("server");
            let mut w = a.try_clone().expect("clone");
            let mut r = BufReader::new(a);
            for line in conversation {
                w.write_all(line.as_bytes()).expect("write");
                let mut back = String::new();
                r.read_line(&mut back).expect("read");
                let rep: ControlReply = serde_json::from_str(&back).expect("reply");
                assert!(rep.ok, "{line}: {rep:?}");
            }
            drop((w, r));
            // The first resume is taken; then the server ends with the connection.
            let first = rx.recv().is_ok();
            let second = rx.recv().is_ok();
            (first, second)
        };
        let resume = "{\"op\":\"resume\"}\n";
        assert_eq!(resumed(&[resume, resume]), (true, false));
        assert_eq!(resumed(&[]), (false, false));
    }
}
