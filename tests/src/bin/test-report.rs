//! `test-report`: the end of `make test`. Prints every test's time (nextest's JUnit report)
//! with the test-host attempts the harness recorded, then every retry with its cause and
//! evidence, retries by cause, and emulator wedges per test-host hour.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ddvmm_tests::records::{read_records, retries_file, runs_file, CAUSE_WEDGE};
use ddvmm_tests::repo_root;
use serde_json::Value;

/// One `<testcase>` of a JUnit report.
struct Case {
    name: String,
    binary: String,
    seconds: f64,
    failed: bool,
    /// For a failed test: the lines that say why (panic messages and what follows them).
    why: Vec<String>,
}

/// XML text back to plain text (the five entities nextest escapes).
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Why a test failed, in at most `MAX_WHY_LINES` lines: the harness's alarm lines (a run that
/// went silent, a client down, a retry, a hung task...), then each `panicked at` line of its
/// output with the lines after it (the assertion's message), or the output's last lines if
/// nothing panicked; the emulator's start-up warnings left out. Printed at the very end of the
/// report, where a truncated CI log still shows it.
fn failure_lines(body: &str) -> Vec<String> {
    const MAX_WHY_LINES: usize = 40;
    const AFTER_PANIC: usize = 12;
    // Tags become line breaks (their attributes are not output), then entities are undone.
    let mut plain = String::with_capacity(body.len());
    let mut in_tag = false;
    for ch in body.chars() {
        match (in_tag, ch) {
            (false, '<') => in_tag = true,
            (true, '>') => {
                in_tag = false;
                plain.push('\n');
            }
            (false, c) => plain.push(c),
            (true, _) => {}
        }
    }
    let text = unescape(&plain);
    // The emulator's start-up warnings and the test host's harmless KVM notices say nothing.
    const NOISE: [&str; 2] = ["qemu-system-x86_64: warning", "Unhandled WRMSR"];
    // Lines the harness and the scripts print when a run goes wrong, wherever they are.
    const MARKERS: [&str; 8] = [
        "NO-PROGRESS",
        "CLIENT-DOWN",
        "CLIENT-TIMEOUT",
        "DAEMON-DIED",
        "FIO-FAILED",
        "testhost RETRY",
        "blocked for more than",
        "I/O error",
    ];
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !NOISE.iter().any(|n| l.contains(n)))
        .collect();
    let mut why: Vec<String> = lines
        .iter()
        .filter(|l| MARKERS.iter().any(|m| l.contains(m)))
        .take(8)
        .map(|l| l.to_string())
        .collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("panicked at") {
            why.extend(
                lines[i..(i + AFTER_PANIC).min(lines.len())]
                    .iter()
                    .map(|l| l.to_string()),
            );
        }
    }
    if !lines.iter().any(|l| l.contains("panicked at")) {
        why.extend(
            lines[lines.len().saturating_sub(AFTER_PANIC)..]
                .iter()
                .map(|l| l.to_string()),
        );
    }
    why.truncate(MAX_WHY_LINES);
    why.iter().map(|l| l.chars().take(300).collect()).collect()
}

/// The value of `attr="..."` in a tag's text.
fn attr(tag: &str, attr: &str) -> Option<String> {
    let at = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
    let end = tag[at..].find('"')?;
    Some(
        tag[at..at + end]
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// The test cases of a JUnit XML report (only what nextest writes: one `<testcase>` per
/// test, a `<failure>` or `<error>` child when it failed).
fn junit_cases(xml: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<testcase ") {
        rest = &rest[at..];
        let tag_end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..tag_end];
        let body_end = if tag.ends_with('/') {
            tag_end
        } else {
            rest.find("</testcase>").unwrap_or(rest.len())
        };
        let body = &rest[..body_end];
        let failed = body.contains("<failure") || body.contains("<error");
        cases.push(Case {
            name: attr(tag, "name").unwrap_or_default(),
            binary: attr(tag, "classname").unwrap_or_default(),
            seconds: attr(tag, "time")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0),
            failed,
            why: if failed {
                failure_lines(body)
            } else {
                Vec::new()
            },
        });
        rest = &rest[tag_end.max(1)..];
    }
    cases
}

/// How many records have each value of `key` (missing: `?`).
fn count_by<'a>(records: &'a [Value], key: &str) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        *counts.entry(r[key].as_str().unwrap_or("?")).or_default() += 1;
    }
    counts
}

/// `count label, count label, ...` (or `label: count, ...` with `label_first`).
fn join_counts(counts: &BTreeMap<&str, usize>, label_first: bool) -> String {
    counts
        .iter()
        .map(|(k, n)| {
            if label_first {
                format!("{k}: {n}")
            } else {
                format!("{n} {k}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let junit: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/nextest/default/junit.xml"));
    let runs = read_records(&runs_file());
    let retries = read_records(&retries_file());
    let mut cases = junit_cases(&std::fs::read_to_string(&junit).unwrap_or_default());
    cases.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));

    // Attempts per test (a test may run several test hosts).
    let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
    for r in &runs {
        let test = r["test"].as_str().unwrap_or("?").to_string();
        *attempts.entry(test).or_default() += r["attempts"].as_u64().unwrap_or(1);
    }
    println!("\n=== test timings (longest first; attempts = test-host runs, retries included)");
    println!("{:>9}  {:>8}  {:<6}  test", "seconds", "attempts", "result");
    // Fast tests that ran no test host and passed are counted, not listed.
    let listed = |c: &Case| c.seconds >= 5.0 || attempts.contains_key(&c.name) || c.failed;
    for c in cases.iter().filter(|c| listed(c)) {
        let n = attempts
            .get(&c.name)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>9.1}  {:>8}  {:<6}  {} {}",
            c.seconds,
            n,
            if c.failed { "FAIL" } else { "pass" },
            c.binary,
            c.name
        );
    }
    let fast = cases.iter().filter(|c| !listed(c)).count();
    let total: f64 = cases.iter().map(|c| c.seconds).sum();
    println!(
        "{:>9}  {fast} more tests under 5 s each; {} tests, {total:.0} s of test time in all",
        "",
        cases.len(),
    );
    if cases.is_empty() {
        println!("(no JUnit report at {})", junit.display());
    }

    let modes = count_by(&runs, "mode");
    let host_seconds: f64 = runs.iter().filter_map(|r| r["seconds"].as_f64()).sum();
    println!(
        "\n=== test hosts: {} runs ({}), {:.2} test-host hours",
        runs.len(),
        join_counts(&modes, false),
        host_seconds / 3600.0
    );
    let by_cause = count_by(&retries, "cause");
    if retries.is_empty() {
        println!("=== retries: none");
    } else {
        println!(
            "=== retries: {} ({})",
            retries.len(),
            join_counts(&by_cause, true)
        );
        for r in &retries {
            println!(
                "  {} [{}] attempt {}: {}; evidence: {}; log: {}",
                r["test"].as_str().unwrap_or("?"),
                r["host"].as_str().unwrap_or("?"),
                r["attempt"],
                r["cause"].as_str().unwrap_or("?"),
                r["evidence"].as_str().unwrap_or("?"),
                r["log"].as_str().unwrap_or("?"),
            );
        }
    }
    let wedges = by_cause.get(CAUSE_WEDGE).copied().unwrap_or(0);
    if host_seconds > 0.0 {
        println!(
            "=== emulator wedges: {wedges} in {:.2} test-host hours ({:.2} per hour)",
            host_seconds / 3600.0,
            wedges as f64 / (host_seconds / 3600.0)
        );
    }
    let failed: Vec<&Case> = cases.iter().filter(|c| c.failed).collect();
    if !failed.is_empty() {
        println!("=== failed: {}", failed.len());
        for c in &failed {
            println!("  {} {}", c.binary, c.name);
        }
        for c in failed {
            println!("=== why {} {}:", c.binary, c.name);
            for l in &c.why {
                println!("  | {l}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nextest_junit() {
        let xml = r#"<?xml version="1.0"?><testsuites><testsuite name="ddvmm-tests::boot">
<testcase name="a" classname="ddvmm-tests::boot" timestamp="x" time="13.25"></testcase>
<testcase name="b&amp;c" classname="ddvmm-tests::boot" time="2.5"><failure type="x">boom</failure><system-out>..</system-out></testcase>
<testcase name="d" classname="ddvmm::kvm" time="0.01"/>
</testsuite></testsuites>"#;
        let c = junit_cases(xml);
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].name.as_str(), c[0].seconds, c[0].failed),
            ("a", 13.25, false)
        );
        assert_eq!((c[1].name.as_str(), c[1].failed), ("b&c", true));
        assert_eq!(c[1].why, vec!["boom", ".."]);
        assert_eq!((c[2].binary.as_str(), c[2].failed), ("ddvmm::kvm", false));
    }

    #[test]
    fn failure_lines_start_at_the_panic() {
        let body = "<system-out>boot\nok\nthread 'x' panicked at a.rs:1:2:\nboom &lt;here&gt;\n</system-out>";
        assert_eq!(
            failure_lines(body),
            vec!["thread 'x' panicked at a.rs:1:2:", "boom <here>"]
        );
    }

    #[test]
    fn failure_lines_keep_markers_and_drop_noise() {
        let body = "<system-out>qemu-system-x86_64: warning: x\nNO-PROGRESS alpha: stuck\nthread 't' panicked at a.rs:1:2:\nqemu-system-x86_64: warning: y\nboom\n</system-out>";
        assert_eq!(
            failure_lines(body),
            vec![
                "NO-PROGRESS alpha: stuck",
                "thread 't' panicked at a.rs:1:2:",
                "boom"
            ]
        );
    }

    #[test]
    fn counts_records_by_key() {
        let records: Vec<Value> = ["a", "b", "a"]
            .iter()
            .map(|c| serde_json::json!({ "cause": c }))
            .chain([serde_json::json!({})])
            .collect();
        let counts = count_by(&records, "cause");
        assert_eq!(join_counts(&counts, true), "?: 1, a: 2, b: 1");
        assert_eq!(join_counts(&counts, false), "1 ?, 2 a, 1 b");
    }
}
