//! Transparent recovery end to end: the daemon detects driver VM faults of every kind, boots
//! a fresh driver VM and has the clients replay their outstanding requests, while the clients
//! run fio with crc32c verification and never see an error. Then poison-request isolation and
//! quarantine. Stock kernels, real files; the host checks the backing file afterwards.

use std::time::Duration;

use ddvmm_tests::system::{
    assert_clean_ending, assert_clean_ending_allowing, assert_no_faults, backing_file, client_ip,
    client_net_up, console, field, looping_client, metric, metric_sum, metrics_section,
    recovery_system, section, sha256_hex, System, FINAL_MIB, MIB, PEER_IP, SLICE_MIB,
};

const TIMEOUT: Duration = Duration::from_secs(3600);

/// Shell: run a campaign in the background, printing the event count as it grows (so the run
/// is never silent), then `CAMPAIGN-RC <label> <rc>` and the campaign's events on one line.
const CAMPAIGN_FN: &str = r#"
campaign() {
    label=$1; shift
    $CTL campaign ${DRV:-storage} "$@" > $WORK/c-$label.json 2>&1 &
    cpid=$!; seen=""; quiet=0
    while kill -0 $cpid 2>/dev/null; do
        sleep 5; quiet=$((quiet + 5))
        n=$($CTL events | grep -o '"detected_by"' | wc -l)
        if [ "$n" != "$seen" ]; then echo "faults so far: $n"; seen=$n; quiet=0; fi
        [ $quiet -ge 60 ] && echo "faults so far: $n (waiting)" && quiet=0
    done
    wait $cpid; echo "CAMPAIGN-RC $label $?"
    echo "EVENTS $label $(tr -d ' \n' < $WORK/c-$label.json)"
}
"#;

/// The mixed campaign after one fault of each kind: (faults, longest interval between them).
/// `make test` injects three faults back to back (each as soon as the previous recovery
/// completed, so replayed requests are in flight again); `make test-long` sets
/// `DDVMM_MIXED_FAULTS=14` for the long campaign, with random intervals up to 4 s.
fn mixed_campaign() -> (usize, u64) {
    match std::env::var("DDVMM_MIXED_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => (n, 4000),
        None => (3, 0),
    }
}

/// Every injectable fault kind and the detection path it must be caught on.
const FAULT_PATHS: [(&str, &str); 8] = [
    ("panic", "pvpanic"),
    ("hang", "heartbeat"),
    ("kill", "process-killed"),
    ("triple-fault", "vcpu-crash"),
    ("corrupt", "corrupt-completions"),
    ("reset", "reset"),
    ("bad-index", "corrupt-ring"),
    ("seccomp", "seccomp"),
];

/// Shell: the CPU time (clock ticks) of every client ring-disk worker thread on the host.
const RING_TICKS_FN: &str = r#"
ring_ticks() {
    t=0
    for s in /proc/[0-9]*/task/*/stat; do
        [ "$(cat ${s%stat}comm 2>/dev/null)" = ring-blk ] || continue
        set -- $(cut -d' ' -f14,15 $s 2>/dev/null)
        t=$((t + ${1:-0} + ${2:-0}))
    done
    echo $t
}
"#;

/// The events of campaign `label` (its `EVENTS <label>` line, written by `campaign`): the
/// line itself (for messages) and its parsed list. The campaign must have ended cleanly.
fn campaign_events<'a>(log: &'a str, label: &str) -> (&'a str, Vec<serde_json::Value>) {
    assert!(
        log.contains(&format!("CAMPAIGN-RC {label} 0")),
        "campaign {label} failed:\n{log}"
    );
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix(&format!("EVENTS {label} ")))
        .unwrap_or_else(|| panic!("no events of {label}:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("events JSON");
    let list = v["events"].as_array().cloned().expect("events");
    (line, list)
}

#[test]
fn every_fault_kind_is_detected_and_recovered_without_client_errors() {
    let disk = backing_file("recovery-pool.img", 2 * SLICE_MIB);
    let clients = [
        ("alpha", looping_client("client-alpha")),
        ("beta", looping_client("client-beta")),
    ];
    let system = recovery_system("recovery-campaign", &disk, &clients, false);
    let (host, prelude) = system.host_and_prelude();
    // Triple faults are injected on purpose: the driver VMM's log reports a crashed guest.
    let host = host.expect_guest_crash();
    let kinds = FAULT_PATHS;
    let names: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
    let (mixed, max_interval_ms) = mixed_campaign();
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}{RING_TICKS_FN}
wait_console alpha "ROUND 1 "
wait_console beta "ROUND 1 "
for k in {names}; do
    echo "=== fault $k"
    c0=$(ring_ticks); t0=$(date +%s)
    campaign $k --faults 1 --kinds $k --min-interval-ms 500 --max-interval-ms 2000
    echo "RING-CPU $k $(( $(ring_ticks) - c0 )) $(( $(date +%s) - t0 ))"
done
echo "=== mixed campaign"
campaign mixed --faults {mixed} --min-interval-ms 0 --max-interval-ms {max_interval_ms} --seed 7
stop_clients 0 1
wait_done alpha beta
echo "=== events"; $CTL events | tr -d ' \n'; echo
echo "=== metrics"; $CTL metrics
{ending}"#,
        names = names.join(" "),
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);

    // Each kind alone: injected, detected on its own path, restarted.
    for (kind, path) in kinds {
        let (events, list) = campaign_events(log, kind);
        // Exactly one event: the injected fault, on its own path. A fault nobody injected
        // (a restarted driver VM failing on its own) is a failure, printed here.
        assert_eq!(
            list.len(),
            1,
            "{kind}: faults beyond the injected one: {events}"
        );
        let e = &list[0];
        assert_eq!(e["injected"], kind, "{events}");
        assert_eq!(
            e["detected_by"], path,
            "{kind} detected on the wrong path: {events}"
        );
        assert_eq!(e["outcome"], "restarted", "{events}");
        // From the template made at the first boot, never a boot: the standby VMM made
        // ahead of time (the driver VM served before each injection).
        assert_eq!(e["restart"], "restore", "{kind}: {events}");
        assert_eq!(e["standby"], true, "{kind}: {events}");
        assert!(e["fallback"].is_null(), "{kind}: {events}");
        assert!(e["outage_ms"].as_f64().is_some_and(|o| o > 0.0), "{events}");
        // Evidence from one channel names it.
        if path.starts_with("corrupt") {
            let ch = e["channel"].as_str().unwrap_or_default();
            assert!(
                ch == "alpha/0" || ch == "beta/0",
                "{kind}: no channel: {events}"
            );
        }
    }
    // A broken ring index costs the client's ring worker no more CPU than any other fault: it
    // is a state the daemon restarts on, not a loop (ticks are 1/100 s).
    for (kind, _) in kinds {
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RING-CPU {kind} ")))
            .unwrap_or_else(|| panic!("no RING-CPU line for {kind}\n{log}"));
        let v: Vec<f64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
        assert_eq!(v.len(), 2, "{line}");
        let (cpu_s, wall_s) = (v[0] / 100.0, v[1].max(1.0));
        println!("ring workers during {kind}: {cpu_s:.2} s CPU over {wall_s} s");
        assert!(
            cpu_s <= 0.2 * wall_s,
            "{kind}: ring workers used {cpu_s} s of CPU in {wall_s} s"
        );
    }
    let (mixed_events, list) = campaign_events(log, "mixed");
    assert!(
        list.iter().all(|e| !e["injected"].is_null()),
        "a fault nobody injected: {mixed_events}"
    );
    assert!(
        list.iter().all(|e| e["restart"] == "restore"),
        "a restart that was not a restore: {mixed_events}"
    );

    // Counters match the faults exactly: each injected fault detected once and restarted,
    // nothing else, no quarantine.
    let injected = (kinds.len() + mixed) as f64;
    let m = metrics_section(log);
    let sum = |prefix: &str| metric_sum(m, prefix);
    assert_eq!(sum("ddvmm_injected_faults_total{"), injected, "{m}");
    let faults = sum("ddvmm_driver_faults_total{");
    assert_eq!(
        faults, injected,
        "faults detected != faults injected: {m}\n{log}"
    );
    assert_eq!(
        metric(m, "ddvmm_driver_restarts_total{driver=\"storage\"}"),
        Some(faults),
        "every fault restarted the driver VM: {m}"
    );
    assert_eq!(sum("ddvmm_quarantines_total"), 0.0, "{m}");
    // The driver VM's VMM counts the exits that reached it: the INTx acknowledgements of the
    // clients' notifications are configuration-space port I/O.
    assert!(
        sum("ddvmm_vmm_exits_total{vm=\"storage\",kind=\"pio\"}") > 0.0,
        "{m}"
    );
    // Replays the daemon counted are the replays the clients did.
    let replayed = metric(m, "ddvmm_requests_replayed_total{driver=\"storage\"}").unwrap_or(0.0);
    assert_eq!(replayed, sum("ddvmm_ring_disk_replayed_total{"), "{m}");
    assert!(
        replayed > 0.0,
        "no request was ever in flight at a fault?\n{m}"
    );
    assert_eq!(sum("ddvmm_ring_disk_errors_total{"), 0.0, "{m}");
    assert_eq!(sum("ddvmm_ring_disk_poisoned_total{"), 0.0, "{m}");
    assert_eq!(
        metric(m, "ddvmm_outage_seconds_count{driver=\"storage\"}"),
        Some(injected),
        "{m}"
    );

    // The clients: every fio round verified, markers and final patterns in the backing file.
    let pool = std::fs::read(&disk).expect("read pool");
    for (i, (client, _)) in clients.iter().enumerate() {
        let c = console(log, client);
        assert!(
            c.contains("MARKER-RC 0") && c.contains("FINAL-RC 0"),
            "{client}:\n{log}"
        );
        let rounds = field(c, "ROUNDS ");
        assert!(rounds.ends_with("FAILS 0"), "{client}: {rounds}\n{log}");
        let n: u32 = rounds
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n >= 2, "{client}: only {n} fio rounds");
        let base = i as u64 * SLICE_MIB * MIB;
        let marker = format!("client-{client}\n").repeat(MIB as usize)[..MIB as usize].to_string();
        assert!(
            pool[base as usize..(base + MIB) as usize] == *marker.as_bytes(),
            "{client}: marker not at its window start"
        );
        let at = (base + FINAL_MIB * MIB) as usize;
        assert_eq!(
            sha256_hex(&pool[at..at + 2 * MIB as usize]),
            field(c, "FINAL-SHA "),
            "{client}: final pattern not in the backing file"
        );
    }
}

/// Two clients share the driver VM; alpha's read of one sector panics the driver VM's kernel
/// every time. The daemon holds every channel after a crash and releases the channels holding
/// suspects one at a time: the third crash happens with alpha's suspect alone on the ring, is
/// charged to alpha's channel, and that read fails alone. Beta's fio verify, in flight around
/// every crash, never sees an error, and the restarts charged to alpha do not count against the
/// driver VM's restart cap.
#[test]
fn poison_request_fails_alone_and_restart_cap_quarantines() {
    let disk = backing_file("recovery-poison.img", 2 * SLICE_MIB);
    // Sector 40960 = MiB 20 of the window: the agent panics its kernel on any request there.
    // fio makes one pass (~2,000 requests and their verify reads, in flight around the crashes
    // 3 s in): it prints nothing until done, and three passes (~9,000 requests at ~40 IOPS)
    // kept alpha's console silent past the harness's 300 s no-progress watch on a loaded host.
    let alpha = r#"
fio --name=bg --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=4 \
    --rw=randrw --bs=4k --offset=1M --size=8M --verify=crc32c --verify_fatal=1 \
    --eta=never --output=/tmp/fio.txt &
FIO=$!
sleep 3
dd if=/dev/vda of=/dev/null bs=4096 skip=5120 count=1 iflag=direct
echo "POISON-RC $?"
wait $FIO; echo "FIO-RC $?"; grep -E "err=" /tmp/fio.txt
echo "PHASE-1-DONE"
n=0; state=""
while :; do
    if dd if=/dev/vda of=/tmp/probe bs=4096 skip=7680 count=1 iflag=direct 2>/dev/null; then s=ok; else s=err; fi
    if [ "$s" != "$state" ]; then n=$((n + 1)); echo "PROBE $n $s"; state=$s; fi
    grep -q DDVMM-STOP /tmp/probe 2>/dev/null && break
    sleep 2
done
echo "PROBE-END"
"#;
    let clients = [
        ("alpha", alpha.to_string()),
        ("beta", looping_client("client-beta")),
    ];
    let system = System {
        name: "recovery-poison",
        disk: &disk,
        driver_cmdline: "console=ttyS0 quiet ddvmm.action=agent ddvmm.agent.poison=40960",
        clients: &clients,
        slice_mib: SLICE_MIB,
        extra_config: r#"
[recovery]
heartbeat_timeout_ms = 8000
progress_timeout_ms = 60000
backoff_initial_ms = 100
backoff_max_ms = 1000
max_restarts = 4
restart_window_s = 3600
poison_after = 3
"#,
        passthrough: false,
        network: false,
        net_driver: false,
    };
    let (host, prelude) = system.host_and_prelude();
    let host = host.expect_guest_crash();
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}
wait_console beta "ROUND 1 "
wait_console alpha PHASE-1-DONE
echo "=== poison events"; $CTL events | tr -d ' \n'; echo
stop_clients 1
wait_done beta
# The poison's three crashes were charged to alpha's channel: four restarts of the driver VM
# are still allowed, the fifth fault exceeds the cap.
campaign kill4 --faults 4 --kinds kill --max-interval-ms 500
sleep 5
$CTL inject storage kill
for i in $(seq 1 60); do $CTL list | tr -d ' \n' | grep -q '"state":"quarantined"' && break; sleep 2; done
wait_console alpha "PROBE 2 err"
echo "=== quarantined list"; $CTL list | tr -d ' \n'; echo
echo "=== restart after quarantine"; $CTL start storage
wait_console alpha "PROBE 3 ok"
stop_clients 0
wait_done alpha
echo "=== events"; $CTL events | tr -d ' \n'; echo
echo "=== metrics"; $CTL metrics
{ending}"#,
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    // The errors the test causes, all alpha's: the poison read (sector 40960) fails alone, and
    // the probes (sector 61440) fail while the driver VM is quarantined. Nothing else.
    assert_clean_ending_allowing(
        log,
        &[
            "I/O error, dev vda, sector 40960 op 0x0:(READ)",
            "I/O error, dev vda, sector 61440 op 0x0:(READ)",
        ],
    );
    assert!(
        !section(log, "kernel beta")
            .unwrap_or_default()
            .contains("I/O error"),
        "beta saw an I/O error:\n{log}"
    );
    let c = console(log, "alpha");
    // The poison read failed alone; fio, in flight around the same crashes, verified clean.
    assert!(c.contains("POISON-RC 1"), "{log}");
    assert!(c.contains("FIO-RC 0") && c.contains("err= 0"), "{log}");
    assert!(
        c.contains("PROBE 1 ok") && c.contains("PROBE 2 err") && c.contains("PROBE 3 ok"),
        "{log}"
    );
    assert!(c.contains("PROBE-END"), "{log}");
    let beta = field(console(log, "beta"), "ROUNDS ");
    assert!(beta.ends_with("FAILS 0"), "beta: {beta}\n{log}");
    let poison_events = section(log, "poison events")
        .and_then(|s| s.lines().next())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(poison_events).expect("events JSON");
    let events = v["events"].as_array().expect("events");
    assert!(
        events.iter().all(|e| e["detected_by"] == "pvpanic"),
        "{poison_events}"
    );
    let poisoned: Vec<u64> = events
        .iter()
        .filter_map(|e| e["poisoned"].as_u64())
        .collect();
    assert_eq!(
        poisoned,
        [0, 0, 1],
        "three kernel panics, then the request failed alone: {poison_events}\n{log}"
    );
    assert_eq!(
        events[2]["channel"], "alpha/0",
        "the third crash, with alpha's suspect alone on the ring, is alpha's: {poison_events}"
    );
    let list = section(log, "quarantined list")
        .and_then(|s| s.lines().next())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(list).expect("list JSON");
    let state = |name: &str| {
        v["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|vm| vm["name"] == name))
            .map(|vm| vm["state"].clone())
    };
    assert_eq!(state("storage"), Some("quarantined".into()), "{list}");
    assert_eq!(state("alpha"), Some("running".into()), "{list}");
    let m = metrics_section(log);
    assert_eq!(
        metric(m, "ddvmm_poison_requests_total{driver=\"storage\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(m, "ddvmm_quarantines_total{driver=\"storage\"}"),
        Some(1.0),
        "{m}"
    );
    // The faults detected are exactly the ones caused: three kernel panics on the poison
    // request, then five kills (four restarts, and the fault that quarantines).
    assert_eq!(
        metric(
            m,
            "ddvmm_driver_faults_total{driver=\"storage\",detected_by=\"pvpanic\"}"
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric_sum(m, "ddvmm_driver_faults_total{"),
        8.0,
        "faults beyond those caused: {m}"
    );
    assert_eq!(
        metric(m, "ddvmm_ring_disk_poisoned_total{vm=\"alpha\",disk=\"0\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(m, "ddvmm_ring_disk_errors_total{vm=\"beta\",disk=\"0\"}").unwrap_or(0.0),
        0.0,
        "{m}"
    );
}

/// A client guest resets its disk's PCI function (`/sys/bus/pci/devices/*/reset`, a D3hot to
/// D0 transition) while 32 of its reads are in flight through the shared driver VM. The
/// requests already on the ring are still drained (the ring worker does not depend on the
/// guest's queues), so the daemon sees no stall: no driver VM restart, and the other client's
/// fio verify runs clean throughout.
/// Restarts from the driver VM's template: each restore reseeds the guest's RNG with fresh
/// entropy from its VMM (the agent prints a fingerprint of the RNG's output after the reseed,
/// so restores of one template that did not reseed would print the same one); a template
/// damaged on disk is refused, the driver VM boots instead (the event says why) and that boot
/// makes a new template the next fault restores. The client's fio verifies throughout.
#[test]
fn restores_reseed_the_rng_and_a_damaged_template_makes_a_boot() {
    let disk = backing_file("recovery-template.img", SLICE_MIB);
    let clients = [("alpha", looping_client("client-alpha"))];
    let system = recovery_system("recovery-template", &disk, &clients, false);
    let (host, prelude) = system.host_and_prelude();
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}
fp() {{
    echo "FINGERPRINT $1 $(tr -d '\r' < $WORK/system.d/storage.console | sed -n 's/.*RNG reseeded.*fingerprint \([0-9a-f]*\).*/\1/p' | tail -n 1)"
}}
kill1() {{ campaign $1 --faults 1 --kinds kill --min-interval-ms 300 --max-interval-ms 600; }}
wait_console alpha "ROUND 1 "
fp boot
kill1 r1; fp restore1
kill1 r2; fp restore2
# Damage the template: one byte in the middle of its state becomes 0xff (never in JSON).
T=$WORK/system.d/templates/storage/state
n=$(wc -c < $T); printf '\377' | dd of=$T bs=1 seek=$((n / 2)) conv=notrunc 2>/dev/null
kill1 r3; fp boot2
kill1 r4; fp restore3
stop_clients 0
wait_done alpha
{ending}"#,
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);
    let c = console(log, "alpha");
    assert!(field(c, "ROUNDS ").ends_with("FAILS 0"), "{log}");

    let event = |label: &str| {
        let (line, list) = campaign_events(log, label);
        assert_eq!(list.len(), 1, "{label}: {line}");
        assert_eq!(list[0]["outcome"], "restarted", "{label}: {line}");
        (line.to_string(), list[0].clone())
    };
    for label in ["r1", "r2", "r4"] {
        let (line, e) = event(label);
        assert_eq!(e["restart"], "restore", "{label}: {line}");
        // A standby made ahead of time, with entropy of its own (the fingerprints below).
        assert_eq!(e["standby"], true, "{label}: {line}");
        assert!(e["fallback"].is_null(), "{label}: {line}");
    }
    let (line, e) = event("r3");
    assert_eq!(
        e["restart"], "boot",
        "the damaged template was restored: {line}"
    );
    assert_eq!(e["standby"], false, "{line}");
    // (The campaign's output lost its spaces on the way: `tr -d ' \n'`.)
    let why = e["fallback"].as_str().unwrap_or_default();
    assert!(
        why.contains("templaterefused") && why.contains("corrupt:checksum"),
        "r3's fallback: {line}"
    );

    let fingerprints: Vec<&str> = ["boot", "restore1", "restore2", "boot2", "restore3"]
        .iter()
        .map(|l| field(log, &format!("FINGERPRINT {l} ")))
        .collect();
    for (i, f) in fingerprints.iter().enumerate() {
        assert_eq!(
            f.len(),
            16,
            "fingerprint {i} missing: {fingerprints:?}\n{log}"
        );
        assert!(
            !fingerprints[..i].contains(f),
            "two driver VMs share RNG state: {fingerprints:?}"
        );
    }
}

#[test]
fn a_guest_resetting_its_disk_mid_io_restarts_nothing() {
    let disk = backing_file("recovery-guest-reset.img", 2 * SLICE_MIB);
    let alpha = r#"
echo 0 > /proc/sys/kernel/hung_task_timeout_secs
fio --name=a --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 --rw=randread \
    --bs=4k --offset=1M --size=8M --time_based --runtime=3600 --eta=never \
    --output=/tmp/fio.txt &
sleep 8
BDF=$(basename $(dirname $(readlink -f /sys/block/vda/device)))
echo "RESETTING $BDF"
echo 1 > /sys/bus/pci/devices/$BDF/reset
echo "RESET-RC $?"
sleep 3600
"#;
    let clients = [
        ("alpha", alpha.to_string()),
        ("beta", looping_client("client-beta")),
    ];
    let system = System {
        name: "recovery-guest-reset",
        disk: &disk,
        driver_cmdline: "console=ttyS0 quiet ddvmm.action=agent",
        clients: &clients,
        slice_mib: SLICE_MIB,
        // A stall would be caught within 10 s; the test watches for 25 s after the reset.
        extra_config: r#"
[recovery]
heartbeat_timeout_ms = 8000
progress_timeout_ms = 10000
"#,
        passthrough: false,
        network: false,
        net_driver: false,
    };
    let (host, prelude) = system.host_and_prelude();
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}
wait_console beta "ROUND 1 "
wait_console alpha "RESET-RC"
sleep 25
echo "=== alpha after reset"; $CTL stats | tr -d ' \n'; echo
stop_clients 1
wait_done beta
$CTL stop alpha
{ending}"#,
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_no_faults(log);
    let c = console(log, "alpha");
    assert!(c.contains("RESET-RC 0"), "the guest reset its disk:\n{log}");
    let beta = field(console(log, "beta"), "ROUNDS ");
    assert!(beta.ends_with("FAILS 0"), "beta: {beta}\n{log}");
    assert!(
        !section(log, "kernel beta")
            .unwrap_or_default()
            .contains("I/O error"),
        "{log}"
    );
    // Alpha's ring was drained after the reset: nothing outstanding, nothing corrupt.
    let stats = section(log, "alpha after reset")
        .and_then(|s| s.lines().next())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(stats).expect("stats JSON");
    let ring = &v["alpha"]["devices"]["ring_disks"][0];
    assert_eq!(ring["outstanding"], 0, "{stats}");
    assert_eq!(ring["corrupt"], 0, "{stats}");
    // Requests were on the ring at the reset: the driver VM completed them (drained), the
    // reset guest never saw them.
    let n = |k: &str| ring[k].as_u64().unwrap_or(0);
    assert!(
        n("completed") > n("guest_completed"),
        "no request was in flight at the reset: {stats}"
    );
}

/// The driver VM owns a passed-through NVMe controller (VFIO): a driver VM killed, panicked or
/// triple-faulted in the middle of I/O leaves a device that was in flight; the next driver VM
/// gets it reset (the kernel resets it when the dead VMM's files close, and the new VMM resets
/// it again before its guest runs) and the client's replayed requests complete with fio's
/// verification clean.
#[test]
fn driver_vm_with_passed_through_nvme_recovers_from_faults() {
    let probe = ddvmm_tests::TestHost::new("recovery-passthrough").expect("host");
    if !probe.has_passthrough_devices() {
        return;
    }
    let disk = backing_file("recovery-passthrough.img", SLICE_MIB);
    // The host cannot write a stop sentinel into a disk it has given away: the client loops
    // fio rounds until it is stopped through the API.
    let clients = [("alpha", looping_client("client-alpha"))];
    let system = recovery_system("recovery-passthrough", &disk, &clients, true);
    let (host, prelude) = system.host_and_prelude();
    let host = host.expect_guest_crash();
    let kinds: Vec<(&str, &str)> = FAULT_PATHS
        .into_iter()
        .filter(|(k, _)| ["kill", "panic", "triple-fault"].contains(k))
        .collect();
    let names: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}
wait_console alpha "ROUND 1 "
campaign pt --faults 3 --kinds {kinds} --min-interval-ms 1000 --max-interval-ms 3000
# One whole fio round after the last recovery, then stop the client.
n=$(grep -c "^ROUND" $WORK/system.d/alpha.console)
wait_console alpha "ROUND $((n + 1)) "
echo "=== stop alpha"; $CTL stop alpha
echo "=== metrics"; $CTL metrics
{ending}"#,
        kinds = names.join(","),
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);
    let (events, list) = campaign_events(log, "pt");
    assert_eq!(
        list.len(),
        kinds.len(),
        "faults detected != injected: {events}"
    );
    for (kind, path) in kinds {
        let e = list
            .iter()
            .find(|e| e["injected"] == kind)
            .unwrap_or_else(|| panic!("{kind} not injected: {events}"));
        assert_eq!(e["detected_by"], path, "{kind}: {events}");
    }
    assert!(list.iter().all(|e| e["outcome"] == "restarted"), "{events}");

    let c = console(log, "alpha");
    assert!(c.contains("MARKER-RC 0"), "{log}");
    assert!(!c.contains("FIO-FAILED"), "{log}");
    let ok_rounds = c
        .lines()
        .filter(|l| l.starts_with("ROUND ") && l.ends_with("rc=0"))
        .count();
    assert!(ok_rounds >= 2, "{ok_rounds} clean fio rounds:\n{log}");
    let m = metrics_section(log);
    assert_eq!(metric_sum(m, "ddvmm_ring_disk_errors_total{"), 0.0, "{m}");
    assert_eq!(metric_sum(m, "ddvmm_injected_faults_total{"), 3.0, "{m}");
    // The last driver VM got the function reset before its guest ran.
    let vmm_log = section(log, "vmm log storage").expect("driver VMM log");
    assert!(vmm_log.contains("function reset"), "{vmm_log}");
    // The marker the client wrote went through the driver VM's nvme driver into this file.
    let pool = std::fs::read(&disk).expect("read pool");
    let marker = "client-alpha\n".repeat(MIB as usize)[..MIB as usize].to_string();
    assert!(pool[..MIB as usize] == *marker.as_bytes(), "marker missing");
}

/// The fault kinds of the network campaign (garbage completions take the same recovery path
/// as a crash once detected, and are covered by the block campaign).
const NET_FAULTS: [&str; 5] = ["panic", "hang", "kill", "triple-fault", "reset"];

/// A paced stream as a CGI program for busybox `httpd`: 64 KiB of fresh random data a second,
/// each chunk also appended to `SENT`, until `STOP_CMD` succeeds; then `DONE` is created, and
/// `DONE.failed` before it if a write to the connection failed (the stream ends there). One
/// HTTP response, so one TCP connection for the whole stream. (No shell variables: the
/// host's copy is written through an unquoted here-document.)
fn paced_cgi(sent: &str, done: &str, stop_cmd: &str) -> String {
    format!(
        r#"#!/bin/sh
printf 'Content-Type: application/octet-stream\r\n\r\n'
: > {sent}
until {stop_cmd}; do
    head -c 65536 /dev/urandom > {sent}.chunk
    cat {sent}.chunk >> {sent}
    cat {sent}.chunk || {{ touch {done}.failed; break; }}
    sleep 1
done
touch {done}
"#
    )
}

/// Shell: `0` if the stream that created `DONE` wrote everything, else `1`.
fn stream_rc(done: &str) -> String {
    format!("$([ -e {done}.failed ] && echo 1 || echo 0)")
}

/// A client that keeps one long, paced TCP connection with the peer until the host ends it
/// (after the campaign), and reports how it ended: with `download`, an HTTP download from
/// the peer (the client prints what it received); without, an upload: the peer downloads
/// from an HTTP server in the client, which prints what it sent. Either way the host
/// compares the checksums of both ends.
fn streaming_client(i: usize, download: bool) -> String {
    let transfer = if download {
        format!(
            // (busybox wget's read timeout is 900 s by default; its -T crashes in 1.35.)
            r#"wget -q -O /tmp/rx.bin http://{PEER_IP}:8080/cgi-bin/stream
echo "TRANSFER-RC $?"
echo "RX-SHA $(sha256sum /tmp/rx.bin | cut -d' ' -f1) $(wc -c < /tmp/rx.bin)""#
        )
    } else {
        let cgi = paced_cgi(
            "/tmp/sent.bin",
            "/tmp/cgi-done",
            &format!("wget -q -O /dev/null http://{PEER_IP}:8080/stop 2>/dev/null"),
        );
        format!(
            r#"mkdir -p /tmp/www/cgi-bin
cat > /tmp/www/cgi-bin/stream <<'CGI'
{cgi}CGI
chmod +x /tmp/www/cgi-bin/stream
httpd -p 8081 -h /tmp/www
echo "UPLOAD-SERVING"
while [ ! -e /tmp/cgi-done ]; do sleep 1; done
echo "TRANSFER-RC {rc}"
echo "TX-SHA $(sha256sum /tmp/sent.bin | cut -d' ' -f1) $(wc -c < /tmp/sent.bin)""#,
            rc = stream_rc("/tmp/cgi-done"),
        )
    };
    format!(
        r#"{net_up}
ping -c 2 -W 10 {PEER_IP} > /dev/null 2>&1; echo "PING rc=$?"
c0=$(cat /sys/class/net/eth0/carrier_changes)
echo "STREAMING"
# Progress in the console (the harness takes a long silence for a hang).
(while sleep 10; do echo "PROGRESS $(cat /sys/class/net/eth0/statistics/rx_bytes) $(cat /sys/class/net/eth0/statistics/tx_bytes)"; done) &
# The disk (served by the other driver VM) in use all along: 1 MiB written, read back and
# compared, every second, until the transfer ends.
(r=0; e=0; while [ ! -e /tmp/disk-stop ]; do
    r=$((r + 1)); head -c 1048576 /dev/urandom > /tmp/d.out
    dd if=/tmp/d.out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null \
        && dd if=/dev/vda of=/tmp/d.in bs=1M count=1 iflag=direct 2>/dev/null \
        && cmp -s /tmp/d.out /tmp/d.in || e=$((e + 1))
    sleep 1
done; echo "DISK-LOOP rounds=$r errors=$e") &
DISK_LOOP=$!
{transfer}
touch /tmp/disk-stop; wait $DISK_LOOP
echo "CARRIER-CHANGES $c0 $(cat /sys/class/net/eth0/carrier_changes)"
"#,
        net_up = client_net_up(i),
    )
}

#[test]
fn tcp_streams_survive_driver_vm_faults_of_every_kind() {
    let disk = backing_file("recovery-net.img", 2 * SLICE_MIB);
    let clients = [
        ("alpha", streaming_client(0, false)),
        ("beta", streaming_client(1, true)),
    ];
    let mut system = recovery_system("recovery-net", &disk, &clients, false);
    system.network = true;
    system.net_driver = true;
    let (host, prelude) = system.host_and_prelude();
    let host = host.expect_guest_crash().busybox_applets(&["wget"]);
    let kinds = NET_FAULTS;
    let down_cgi = paced_cgi(
        "$WORK/sent-down.bin",
        "$WORK/down-done",
        "[ -e $WORK/www/stop ]",
    );
    let script = format!(
        r#"{prelude}{CAMPAIGN_FN}
# The peer: an HTTP server whose CGI streams to beta until the host creates www/stop (which
# also tells alpha's CGI to end its stream), and a download of alpha's stream.
mkdir -p $WORK/www/cgi-bin
# (Unquoted: $WORK expands now; the CGI has no other expansions.)
cat > $WORK/www/cgi-bin/stream <<CGI
{down_cgi}CGI
chmod +x $WORK/www/cgi-bin/stream
$PEER httpd -p 8080 -h $WORK/www
wait_console alpha UPLOAD-SERVING
$PEER wget -q -O $WORK/up.bin http://{alpha_ip}:8081/cgi-bin/stream &
UP=$!
wait_console beta STREAMING
sleep 10
DRV=netdrv campaign net --faults {n} --kinds {kinds} --min-interval-ms 10000 --max-interval-ms 15000
# Both driver VMs at once: each recovers on its own, the clients' disks and streams go on.
n0=$($CTL events | tr -d ' \n' | grep -o '"outcome":"restarted"' | wc -l)
$CTL inject storage kill & I1=$!
$CTL inject netdrv panic & I2=$!
wait $I1; echo "INJECT-STORAGE-RC $?"; wait $I2; echo "INJECT-NETDRV-RC $?"
i=0; until [ $($CTL events | tr -d ' \n' | grep -o '"outcome":"restarted"' | wc -l) -ge $((n0 + 2)) ]; do
    sleep 1; i=$((i + 1)); [ $i -lt 300 ] || {{ echo "DOUBLE-FAULT-NOT-RECOVERED"; break; }}
done
echo "=== double fault events"; $CTL events | tr -d ' \n'; echo
echo "STREAMS-FINISHED-AT-CAMPAIGN-END $(grep -l TRANSFER-RC $WORK/system.d/alpha.console $WORK/system.d/beta.console | wc -l)"
# Both streams must carry on after the last recovery: 256 KiB more each way, then stop.
up0=$(wc -c < $WORK/up.bin); down0=$(wc -c < $WORK/sent-down.bin); i=0
until [ $(( $(wc -c < $WORK/up.bin) - up0 )) -ge 262144 ] && [ $(( $(wc -c < $WORK/sent-down.bin) - down0 )) -ge 262144 ]; do
    sleep 1; i=$((i + 1)); [ $((i % 30)) = 0 ] && echo "streams after the campaign: $i s"
    [ $i -lt 300 ] || {{ echo "STREAMS-STALLED-AFTER-CAMPAIGN"; break; }}
done
touch $WORK/www/stop
wait $UP; echo "UP-RC $?"
echo "UP-SHA $(sha256sum $WORK/up.bin | cut -d' ' -f1) $(wc -c < $WORK/up.bin)"
wait_done alpha beta
while [ ! -e $WORK/down-done ]; do sleep 1; done
echo "DOWN-RC {down_rc}"
echo "DOWN-SHA $(sha256sum $WORK/sent-down.bin | cut -d' ' -f1) $(wc -c < $WORK/sent-down.bin)"
echo "=== metrics"; $CTL metrics
{ending}"#,
        n = kinds.len(),
        kinds = kinds.join(","),
        alpha_ip = client_ip(0),
        down_rc = stream_rc("$WORK/down-done"),
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);
    // Every kind was injected, detected on its path and restarted while both streams ran.
    let (events, list) = campaign_events(log, "net");
    assert!(
        list.len() == kinds.len() && list.iter().all(|e| !e["injected"].is_null()),
        "faults detected != injected: {events}"
    );
    for (kind, path) in FAULT_PATHS.iter().filter(|(k, _)| kinds.contains(k)) {
        assert!(
            list.iter()
                .any(|e| e["injected"] == *kind && e["detected_by"] == *path),
            "{kind} not detected by {path}: {events}"
        );
    }
    assert!(list.iter().all(|e| e["outcome"] == "restarted"), "{events}");
    // The driver VM owns an emulated NIC and restarts from its template like any other.
    assert!(list.iter().all(|e| e["restart"] == "restore"), "{events}");
    // Network outages (fault to the first completed frame), printed for the closing note.
    let mut outages: Vec<f64> = list
        .iter()
        .filter_map(|e| e["outage_ms"].as_f64())
        .collect();
    outages.sort_by(f64::total_cmp);
    println!("network outages (ms, sorted): {outages:?}");
    assert!(
        log.contains("STREAMS-FINISHED-AT-CAMPAIGN-END 0"),
        "a stream ended before the last fault was recovered:\n{log}"
    );
    assert!(!log.contains("STREAMS-STALLED-AFTER-CAMPAIGN"), "{log}");
    // The two driver VMs faulted at once and both recovered, each from its own template.
    assert!(log.contains("INJECT-STORAGE-RC 0"), "{log}");
    assert!(log.contains("INJECT-NETDRV-RC 0"), "{log}");
    assert!(!log.contains("DOUBLE-FAULT-NOT-RECOVERED"), "{log}");
    let double: serde_json::Value = serde_json::from_str(
        section(log, "double fault events")
            .and_then(|s| s.lines().next())
            .unwrap_or_default(),
    )
    .expect("double fault events");
    let double = double["events"].as_array().cloned().unwrap_or_default();
    for (driver, kind) in [("storage", "kill"), ("netdrv", "panic")] {
        assert!(
            double.iter().any(|e| e["driver"] == driver
                && e["injected"] == kind
                && e["outcome"] == "restarted"),
            "{driver}: {double:?}"
        );
    }
    for name in ["alpha", "beta"] {
        let c = console(log, name);
        // One TCP connection each, never reset, and the link never went down.
        assert!(c.contains("TRANSFER-RC 0"), "{name}:\n{c}");
        // The disk on the other driver VM: in use throughout, never an error.
        let disk = field(c, "DISK-LOOP ");
        assert!(disk.ends_with(" errors=0"), "{name}'s disk loop: {disk}");
        let rounds: u32 = disk
            .trim_start_matches("rounds=")
            .split(' ')
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        assert!(rounds > 10, "{name}'s disk loop: {disk}");
        let changes = field(c, "CARRIER-CHANGES ");
        let (before, after) = changes.split_once(' ').expect("two counts");
        assert_eq!(before, after, "{name}'s link changed state:\n{c}");
    }
    // Both streams arrived whole and intact: what one end sent is what the other received
    // (checksum and size), and they ran across the whole campaign.
    assert!(log.contains("UP-RC 0"), "{log}");
    assert!(log.contains("DOWN-RC 0"), "{log}");
    assert_eq!(
        field(console(log, "beta"), "RX-SHA "),
        field(log, "DOWN-SHA "),
        "download: {log}"
    );
    assert_eq!(
        field(console(log, "alpha"), "TX-SHA "),
        field(log, "UP-SHA "),
        "upload: {log}"
    );
    for key in ["DOWN-SHA ", "UP-SHA "] {
        let bytes: u64 = field(log, key)
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(bytes >= 2 << 20, "{key}{bytes} bytes only:\n{log}");
    }
    let m = metrics_section(log);
    let sum = |k: &str| metric_sum(m, &format!("ddvmm_ring_net_{k}_total{{"));
    // Receive buffers were posted again after every restart; frames in flight were re-sent.
    assert!(sum("reposted") > 0.0, "{m}");
    assert!(sum("generations") >= 2.0 * kinds.len() as f64, "{m}");
    assert_eq!(sum("tx_dropped_spoofed"), 0.0, "{m}");
    assert_eq!(sum("tx_dropped_failed"), 0.0, "{m}");
}
