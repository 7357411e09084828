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
//!
//! Errors: `{"ok":false,"error":"..."}` (unknown operation, bad JSON, unknown VM, ...); the
//! connection stays usable and the daemon stays up. Lines longer than 64 KiB are refused.

use std::sync::Arc;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::supervisor::Supervisor;

/// Longest request line.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    vm: Option<String>,
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
            Ok(vm) => match sup.start(&vm) {
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
        other => fail(format!(
            "unknown op '{other}' (expected list, stats, start, stop, shutdown)"
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
            // Resynchronise at the next newline.
            let mut rest = String::new();
            if !buf.ends_with('\n') {
                lines.read_line(&mut rest).await?;
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
