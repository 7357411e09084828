//! What the harness did, for the end-of-suite report: one JSON line per test-host run
//! (`runs.jsonl`: test, host name, mode, seconds, attempts, result) and one per retry
//! (`retries.jsonl`: cause, evidence, kept log). Both live in `target/testhost-logs/` and are
//! appended to by every test process (nextest runs each test in its own process), one
//! `write` of a whole line at a time on an `O_APPEND` file, so concurrent writers never
//! interleave within a line. `make test` clears them first and prints them last
//! (`test-report`).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::HostKind;

/// The retry cause of an evidenced emulator wedge.
pub const CAUSE_WEDGE: &str = "emulator wedged";

/// The retry cause of a crash of the test host's own kernel.
pub const CAUSE_HOST_CRASH: &str = "test-host kernel crashed";

/// Prints a line on this process's real stderr, past the test capture (`std::io::stderr()`
/// writes to fd 2 directly; only the print macros are captured): retries and skips are never
/// invisible.
pub fn say(line: &str) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

/// The folder of logs and records.
pub fn logs_dir() -> PathBuf {
    crate::repo_root().join("target/testhost-logs")
}

/// The file of per-run records.
pub fn runs_file() -> PathBuf {
    logs_dir().join("runs.jsonl")
}

/// The file of per-retry records.
pub fn retries_file() -> PathBuf {
    logs_dir().join("retries.jsonl")
}

/// The name of the running test: libtest and nextest name the test's thread after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("(not a test)")
        .to_string()
}

fn append(path: PathBuf, record: &Value) {
    let _ = std::fs::create_dir_all(logs_dir());
    let mut line = record.to_string();
    line.push('\n');
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path);
    if let Ok(mut f) = file {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Records a finished test-host run (all its attempts).
pub fn record_run(host: &str, kind: HostKind, elapsed: Duration, attempts: u32, result: &str) {
    append(
        runs_file(),
        &json!({
            "test": current_test(),
            "host": host,
            "mode": match kind { HostKind::Direct => "direct", HostKind::Emulated => "emulated" },
            "seconds": elapsed.as_secs_f64(),
            "attempts": attempts,
            "result": result,
        }),
    );
}

/// A retry: why, on what evidence, and where the failed attempt's output is kept.
pub struct Retry<'a> {
    /// Test-host name.
    pub host: &'a str,
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// The cause (a short, fixed label).
    pub cause: &'a str,
    /// The evidence that the failure was the emulator's, not ours.
    pub evidence: &'a str,
    /// The kept output of the failed attempt.
    pub log: &'a std::path::Path,
    /// How long the failed attempt ran.
    pub elapsed: Duration,
}

/// Records a retry and prints it past the test capture ([`say`]).
pub fn record_retry(r: &Retry<'_>) {
    append(
        retries_file(),
        &json!({
            "test": current_test(),
            "host": r.host,
            "attempt": r.attempt,
            "cause": r.cause,
            "evidence": r.evidence,
            "log": r.log.display().to_string(),
            "seconds": r.elapsed.as_secs_f64(),
        }),
    );
    say(&format!(
        "testhost RETRY: {} ({}) attempt {} after {:.0} s: {}; evidence: {}; kept log: {}",
        r.host,
        current_test(),
        r.attempt,
        r.elapsed.as_secs_f64(),
        r.cause,
        r.evidence,
        r.log.display()
    ));
}

/// Reads a JSON-lines file (missing file: no records; unparsable lines are skipped).
pub fn read_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
