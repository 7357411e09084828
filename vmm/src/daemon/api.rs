//! The daemon's API: a line protocol on a Unix socket. Each request is one JSON object on one
//! line; each response is one JSON object on one line.
//!
//! | request                              | response                                   |
//! |--------------------------------------|--------------------------------------------|
//! | `{"op":"list"}`                      | `{"ok":true,"vms":[{name,role,state,...}]}`|
//! | `{"op":"stats"}`                     | `{"ok":true,"stats":{<vm>:{devices,channels}}}` |
//! | `{"op":"start","vm":"NAME"}`         | `{"ok":true}`                              |
//! | `{"op":"stop","vm":"NAME"}`          | `{"ok":true}` once the VM is gone          |
//! | `{"op":"shutdown"}`                  | `{"ok":true}`, then the daemon stops all   |
//! | `{"op":"inject","vm":"DRV","fault":"panic"}` | `{"ok":true}` once injected (kinds: `panic`, `hang`, `kill`, `triple-fault`, `corrupt`, `reset`) |
//! | `{"op":"campaign","vm":"DRV","faults":N,"kinds":[..],"min_interval_ms":A,"max_interval_ms":B,"seed":S}` | `{"ok":true,"events":[..]}` when all N faults are recovered (all fields but `vm`, `faults` optional) |
//! | `{"op":"events"}`                    | `{"ok":true,"events":[..],"cold_boots_ms":[..]}`: every fault (detection, latency, outage, boot, replays) and the driver VMs' cold boot times |
//! | `{"op":"metrics"}`                   | `{"ok":true,"text":"<Prometheus text>"}`   |
//!
//! Errors: `{"ok":false,"error":"..."}` (unknown operation, bad JSON, unknown VM, ...); the
//! connection stays usable and the daemon stays up. Lines longer than 64 KiB are refused.

use std::sync::Arc;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::supervisor::Supervisor;
use crate::control::FaultKind;

/// Longest request line.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    vm: Option<String>,
    fault: Option<String>,
    faults: Option<u32>,
    kinds: Option<Vec<String>>,
    min_interval_ms: Option<u64>,
    max_interval_ms: Option<u64>,
    seed: Option<u64>,
}

fn fault_kind(s: &str) -> Result<FaultKind, String> {
    FaultKind::parse(s).ok_or_else(|| {
        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown fault '{s}' (expected one of {})", names.join(", "))
    })
}

/// Answers one request line.
pub async fn handle_line(
    sup: &Arc<Supervisor>,
    shutdown: &Notify,
    line: &str,
) -> serde_json::Value {
    let fail = |e: String| serde_json::json!({ "ok": false, "error": e });
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return fail(format!("bad request: {e}")),
    };
    let need_vm = || {
        req.vm
            .clone()
            .ok_or_else(|| format!("'{}' needs \"vm\"", req.op))
    };
    match req.op.as_str() {
        "list" => serde_json::json!({ "ok": true, "vms": sup.list() }),
        "stats" => serde_json::json!({ "ok": true, "stats": sup.stats() }),
        "start" => match need_vm() {
            Ok(vm) => match sup.start_vm(&vm).await {
                Ok(()) => serde_json::json!({ "ok": true }),
                Err(e) => fail(error_chain(&e)),
            },
            Err(e) => fail(e),
        },
        "stop" => match need_vm() {
            Ok(vm) => match sup.stop(&vm).await {
                Ok(()) => serde_json::json!({ "ok": true }),
                Err(e) => fail(error_chain(&e)),
            },
            Err(e) => fail(e),
        },
        "shutdown" => {
            shutdown.notify_one();
            serde_json::json!({ "ok": true })
        }
        "inject" => {
            let args = need_vm().and_then(|vm| {
                let f = req.fault.as_deref().ok_or("'inject' needs \"fault\"")?;
                Ok((vm, fault_kind(f)?))
            });
            match args {
                Ok((vm, kind)) => match sup.inject(&vm, kind).await {
                    Ok(()) => serde_json::json!({ "ok": true }),
                    Err(e) => fail(error_chain(&e)),
                },
                Err(e) => fail(e),
            }
        }
        "campaign" => {
            let args = need_vm().and_then(|vm| {
                let n = req.faults.ok_or("'campaign' needs \"faults\"")?;
                let kinds = req
                    .kinds
                    .iter()
                    .flatten()
                    .map(|k| fault_kind(k))
                    .collect::<Result<Vec<_>, _>>()?;
                let lo = req.min_interval_ms.unwrap_or(0);
                let hi = req.max_interval_ms.unwrap_or(lo.max(2000));
                if lo > hi {
                    return Err("min_interval_ms exceeds max_interval_ms".to_string());
                }
                if hi > MAX_INTERVAL_MS {
                    return Err(format!("max_interval_ms must be at most {MAX_INTERVAL_MS}"));
                }
                Ok((vm, n, kinds, (lo, hi)))
            });
            match args {
                Ok((vm, n, kinds, interval)) => {
                    let seed = req.seed.unwrap_or(0x5eed);
                    match sup.campaign(&vm, n, &kinds, interval, seed).await {
                        Ok(events) => serde_json::json!({ "ok": true, "events": events }),
                        Err(e) => fail(error_chain(&e)),
                    }
                }
                Err(e) => fail(e),
            }
        }
        "events" => serde_json::json!({
            "ok": true,
            "events": sup.events(),
            "cold_boots_ms": sup.cold_boots_ms(),
        }),
        "metrics" => serde_json::json!({ "ok": true, "text": sup.metrics_text() }),
        other => fail(format!(
            "unknown op '{other}' (expected list, stats, start, stop, shutdown, inject, \
             campaign, events, metrics)"
        )),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, sup: Arc<Supervisor>, shutdown: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Err(refusal) = check_peer(&stream) {
                    tracing::warn!(%refusal, "API connection refused");
                    tokio::spawn(refuse(stream, refusal));
                    continue;
                }
                let (sup, shutdown) = (sup.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &sup, &shutdown).await {
                        tracing::debug!(error = %e, "API connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "API accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Admits a connection only from the daemon's own uid or root (the socket's mode, 0600, says
/// the same; this holds even if the mode is loosened).
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("permission denied: cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let uid = cred.uid();
    if uid == me || uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {uid} may not use this daemon (only uid {me} and root)"
        ))
    }
}

/// Answers a refused connection with its error line, then lets the peer finish sending (up to
/// 64 KiB or one second) so the line is read, not lost to a reset.
async fn refuse(mut stream: UnixStream, refusal: String) {
    let line = serde_json::json!({ "ok": false, "error": refusal }).to_string();
    let second = std::time::Duration::from_secs(1);
    let _ = tokio::time::timeout(second, stream.write_all(format!("{line}\n").as_bytes())).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(second, drain).await;
}

/// Longest pause between two campaign faults (an hour).
const MAX_INTERVAL_MS: u64 = 3_600_000;

async fn connection(
    stream: UnixStream,
    sup: &Arc<Supervisor>,
    shutdown: &Notify,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let reply = if buf.len() > MAX_LINE {
            // Resynchronise at the next newline, discarding in bounded pieces.
            if !buf.ends_with('\n') {
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    let n = (&mut lines)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut rest)
                        .await?;
                    if n == 0 || rest.ends_with(b"\n") {
                        break;
                    }
                }
            }
            serde_json::json!({ "ok": false, "error": "request line too long" })
        } else {
            handle_line(sup, shutdown, buf.trim()).await
        };
        let mut out = reply.to_string();
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
}
