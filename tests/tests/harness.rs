//! The harness's own promises, tested against a real test host: a run that hangs while its
//! test host is alive is *our* hang: it fails at once (one attempt, no retry) with the test
//! host's diagnostics, instead of being retried as an emulator fault.

use std::time::{Duration, Instant};

use ddvmm_tests::{client_initrd_with_script, HarnessError, TestHost};

#[test]
fn a_hung_daemon_fails_at_once_with_diagnostics_and_is_not_retried() {
    // A daemon with nothing to run, frozen with SIGSTOP (a deadlock stand-in), and a script
    // that waits for it forever without printing. Beside it a VM whose guest burns its CPU in
    // its kernel (reading /dev/urandom), as a livelocked guest would: the diagnostics sample
    // where its vCPU runs and name the kernel function.
    let spin = client_initrd_with_script("echo SPINNING; cat /dev/urandom > /dev/null")
        .expect("guest image");
    let host = TestHost::new("harness-hang")
        .expect("test host")
        .quiet_limit(Duration::from_secs(45))
        .file("spin.img", spin, 0o644);
    let script = r#"
echo "" > $WORK/empty.toml
$DDVMM daemon --config $WORK/empty.toml > $WORK/daemon.log 2>&1 &
DAEMON=$!
$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd spin.img --mem 256M --cpus 1 \
  --console $WORK/spin.console --cmdline "console=ttyS0 quiet ddvmm.action=run-script" \
  > $WORK/spin.log 2>&1 &
n=0; until grep -q SPINNING $WORK/spin.console 2>/dev/null; do
    sleep 1; n=$((n + 1)); [ $n -lt 300 ] || break
done
kill -STOP $DAEMON
echo "DAEMON-FROZEN $DAEMON"
while :; do sleep 60; done
"#;
    let start = Instant::now();
    let result = host.run(script, Duration::from_secs(1200));
    let took = start.elapsed();
    let Err(HarnessError::Hung { output, .. }) = result else {
        panic!("expected a hang, got {result:?}");
    };
    assert!(output.contains("DAEMON-FROZEN"), "{output}");
    // The diagnostics came from the live test host: the frozen daemon is listed, stopped.
    assert!(output.contains("=== harness diagnostics"), "{output}");
    assert!(output.contains("DDVMM-DIAG-END"), "{output}");
    // The daemon's own entry: its threads (the lines after its `--- pid` line, up to the
    // next process) are stopped.
    let (_, after) = output
        .split_once("--- pid ")
        .filter(|(_, rest)| {
            rest.lines()
                .next()
                .is_some_and(|l| l.contains("daemon --config"))
        })
        .unwrap_or_else(|| panic!("daemon not first in the diagnostics' processes:\n{output}"));
    let tasks: Vec<&str> = after
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("--- "))
        .filter(|l| l.starts_with("task "))
        .collect();
    assert!(!tasks.is_empty(), "no threads of the daemon:\n{output}");
    assert!(
        tasks.iter().all(|t| t.contains(" state T ")),
        "the stopped daemon's threads show state T: {tasks:?}"
    );
    // The spinning guest's vCPU was sampled, and its kernel addresses named.
    let samples: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("vCPU sample spin.log rip 0x"))
        .collect();
    assert!(!samples.is_empty(), "no vCPU samples:\n{output}");
    assert!(
        samples
            .iter()
            .any(|l| l.contains(": kernel ") && l.contains("+0x")),
        "no sample named in the kernel: {samples:?}\n{output}"
    );
    // One attempt: a hang is never retried (the whole run well under two quiet limits plus
    // boot and diagnostics).
    assert!(took < Duration::from_secs(600), "took {took:?}");
    let runs = ddvmm_tests::records::read_records(&ddvmm_tests::records::runs_file());
    let mine = runs
        .iter()
        .rev()
        .find(|r| r["host"] == "harness-hang")
        .expect("run recorded");
    assert_eq!(mine["attempts"], 1, "{mine}");
    assert_eq!(mine["result"], "hung (ours)", "{mine}");
}

/// A client VM that dies before printing what the test waits for is reported at once
/// (`CLIENT-DOWN`, with diagnostics and a non-zero script status), not waited on until the
/// no-progress limit.
#[test]
fn a_client_that_dies_is_reported_at_once() {
    use ddvmm_tests::system::{backing_file, System};
    let disk = backing_file("harness-client-down.img", 8);
    // The client panics its own kernel (pvpanic: its VMM exits) instead of finishing.
    let clients = [(
        "alpha",
        "echo DYING; echo c > /proc/sysrq-trigger; echo NEVER".to_string(),
    )];
    let system = System {
        name: "harness-client-down",
        disk: &disk,
        driver_cmdline: "console=ttyS0 quiet ddvmm.action=agent",
        clients: &clients,
        slice_mib: 8,
        extra_config: "",
        passthrough: false,
        network: false,
        net_driver: false,
    };
    let (host, prelude) = system.host_and_prelude();
    let script = format!("{prelude}\nwait_done alpha\necho AFTER-WAIT\n");
    let start = Instant::now();
    let out = host
        .run(&script, Duration::from_secs(1200))
        .expect("test host run");
    let log = out.output.replace('\r', "");
    assert_eq!(out.status, 95, "{log}");
    assert!(log.contains("CLIENT-DOWN alpha"), "{log}");
    assert!(log.contains("=== harness diagnostics"), "{log}");
    assert!(!log.contains("AFTER-WAIT"), "{log}");
    assert!(
        start.elapsed() < Duration::from_secs(600),
        "{:?}",
        start.elapsed()
    );
}
