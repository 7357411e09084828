//! Runtime management end to end: clients added to and removed from a running system through
//! `ddvmm ctl` (the API), on the driver VM's spare channel slots, while two configured
//! clients run fio with crc32c verification; a slot taken back and given to another client;
//! a driver VM fault with a runtime client on it. Stock kernels, real files: the host checks
//! the added client's data in the backing file, and that a removed client leaves no process,
//! descriptor, channel, cgroup or jail directory behind.

use std::time::Duration;

use ddvmm_tests::client_initrd_with_script;
use ddvmm_tests::system::{
    assert_clean_ending, backing_file, console, field, looping_client, recovery_system,
    rounds_until_stopped, section, sha256_hex, FINAL_MIB, MIB, SLICE_MIB,
};

const TIMEOUT: Duration = Duration::from_secs(3600);

/// Where the added client `gamma` writes its pattern: MiB 12 of its window, 4 MiB (outside
/// what `delta`, the next client on that window, touches).
const GAMMA_MIB: u64 = 12;

/// `gamma`: writes a random pattern at MiB [`GAMMA_MIB`] of its disk, reads it back and
/// compares, and prints its checksum.
fn gamma_script() -> String {
    format!(
        r#"
head -c {len} /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=64k seek={seek} oflag=direct conv=fsync 2>/dev/null
echo "WRITE-RC $?"
dd if=/dev/vda of=/tmp/back bs=64k skip={seek} count={count} iflag=direct 2>/dev/null
cmp /tmp/pattern /tmp/back && echo "READBACK-OK"
echo "GAMMA-SHA $(sha256sum /tmp/pattern | cut -d' ' -f1)"
echo "GAMMA-SIZE $(cat /sys/block/vda/size)"
"#,
        len = 4 * MIB,
        seek = GAMMA_MIB * 16,
        count = 4 * 16,
    )
}

/// `delta`: rounds of a fresh random MiB written (direct, fsync) at a rotating place of MiB
/// 1-8 of its disk, read back and compared ([`rounds_until_stopped`]).
fn delta_script() -> String {
    rounds_until_stopped(
        "",
        r#"at=$(( (round % 8 + 1) * 16 ))
head -c 1048576 /dev/urandom > /tmp/w
rc=0
dd if=/tmp/w of=/dev/vda bs=64k seek=$at oflag=direct conv=fsync 2>/dev/null || rc=1
dd if=/dev/vda of=/tmp/r bs=64k skip=$at count=16 iflag=direct 2>/dev/null || rc=2
cmp -s /tmp/w /tmp/r || rc=3
[ $rc = 0 ] || { fails=$((fails + 1)); echo "FAILED round $round rc $rc"; }
sleep 1"#,
    )
}

/// A `[[client]]` table for `ctl add`: client `name` on `storage`'s `/dev/vda` at window
/// `slice` (of [`SLICE_MIB`]).
fn client_table(name: &str, slice: u64) -> String {
    format!(
        r#"[[client]]
name = "{name}"
kernel = "$IMAGES/vmlinuz"
initrd = "$WORK/{name}.img"
memory = "384M"
cmdline = "console=ttyS0 quiet ddvmm.action=run-script"
[[client.disk]]
driver = "storage"
device = "/dev/vda"
offset = "{}M"
size = "{SLICE_MIB}M"
"#,
        slice * SLICE_MIB
    )
}

#[test]
fn clients_are_added_and_removed_at_runtime_while_others_verify() {
    let disk = backing_file("runtime.img", 4 * SLICE_MIB);
    let clients = [
        ("alpha", looping_client("client-alpha")),
        ("beta", looping_client("client-beta")),
    ];
    let system = recovery_system("runtime-add-remove", &disk, &clients, false);
    let (host, prelude) = system.host_and_prelude();
    let host = host
        .file(
            "gamma.img",
            client_initrd_with_script(&gamma_script()).expect("gamma image"),
            0o644,
        )
        .file(
            "delta.img",
            client_initrd_with_script(&delta_script()).expect("delta image"),
            0o644,
        );
    let (gamma, delta) = (client_table("gamma", 2), client_table("delta", 2));
    let script = format!(
        r#"{prelude}
# Descriptors of the daemon and of the driver VM's VMM, when no API call is under way.
fds() {{ ls /proc/$1/fd 2>/dev/null | wc -l; }}
# What the descriptors are, counted by kind (a socket or pipe without its inode number, since
# a standby restored anew holds new ones of the same kinds).
fd_list() {{ for f in /proc/$1/fd/*; do readlink $f; done | sed 's/:\[[0-9]*\]$//' | sort | uniq -c; }}
# Standby VMMs the daemon has spawned so far.
standbys() {{ grep "VMM process spawned" $WORK/daemon.log | grep -c "standby[^ ]*=[^ ]*true"; }}
wait_standbys() {{
    n=0; while [ $(standbys) -lt $1 ]; do sleep 1; n=$((n + 1)); [ $n -lt 120 ] || {{ echo "NO-STANDBY $1"; break; }}; done
}}
vmm_of() {{ $CTL list | tr -d ' \n' | sed 's/}},{{/}}\n{{/g' | grep "\"name\":\"$1\"" | sed -n 's/.*"vmm_pid":\([0-9][0-9]*\).*/\1/p'; }}
procs_of() {{
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null < $p/cmdline | grep -q -- "$WORK/system.d/$1.console" && echo "${{p#/proc/}}"
    done
}}
wait_console alpha "ROUND 1 "
wait_console beta "ROUND 1 "
DRIVER_VMM=$(vmm_of storage)
wait_standbys 1
echo "BEFORE daemon=$(fds $DAEMON) driver=$(fds $DRIVER_VMM)"
fd_list $DAEMON > $WORK/fds-before.txt

echo "=== refused"
cat > $WORK/bad-overlap.toml <<EOF
{bad_overlap}EOF
$CTL add $WORK/bad-overlap.toml 2>&1; echo "RC $?"
cat > $WORK/bad-driver.toml <<EOF
{bad_driver}EOF
$CTL add $WORK/bad-driver.toml 2>&1; echo "RC $?"
cat > $WORK/bad-name.toml <<EOF
{bad_name}EOF
$CTL add $WORK/bad-name.toml 2>&1; echo "RC $?"
$CTL remove storage 2>&1; echo "RC $?"
$CTL remove nobody 2>&1; echo "RC $?"
echo "=== end refused"

cat > $WORK/gamma.toml <<EOF
{gamma}EOF
$CTL add $WORK/gamma.toml > $WORK/add.json; echo "ADD-RC $?"
echo "ADDED $(tr -d ' \n' < $WORK/add.json)"
wait_done gamma
echo "=== gamma stats"; $CTL stats | tr -d ' \n'; echo
GAMMA_PIDS=$(procs_of gamma)
SPAWNED=$(standbys)
$CTL remove gamma 2>&1; echo "REMOVE-RC $?"
# Gamma had the first spare slot (alpha and beta have 0 and 1).
wait_console storage "channel 2 detached"
grep -a "detached\|vacant" $WORK/system.d/storage.console | tr -d '\r' | tail -n 4 | sed 's/^/AGENT /'
echo "LET-GO $(grep -c 'agent let go of the channel' $WORK/system.d/storage.log)"
grep "taking a channel slot back" $WORK/daemon.log | sed 's/^/UNCONFIRMED /'
# The driver VM's standby, built with gamma on the slot, is replaced by one with the slot vacant.
wait_standbys $((SPAWNED + 1))
sleep 1
echo "AFTER daemon=$(fds $DAEMON) driver=$(fds $DRIVER_VMM)"
fd_list $DAEMON > $WORK/fds-after.txt
# The daemon holds the descriptors it held before the add: as many of every kind.
grep -v -x -F -f $WORK/fds-before.txt $WORK/fds-after.txt | sed 's/^/FD-NEW /'
grep -v -x -F -f $WORK/fds-after.txt $WORK/fds-before.txt | sed 's/^/FD-GONE /'
for p in $GAMMA_PIDS $(procs_of gamma); do [ -d /proc/$p ] && echo "LEFT-PROCESS $p"; done
$CTL list | grep -q '"gamma"' && echo "LEFT-IN-LIST"
$CTL stats | tr -d ' \n' | grep -q '"client":"gamma"' && echo "LEFT-CHANNEL"
[ -e $WORK/system.d/jail/gamma ] && echo "LEFT-JAIL"
find /sys/fs/cgroup -name gamma -type d 2>/dev/null | sed 's/^/LEFT-CGROUP /'
echo "=== console gamma"; tr -d '\r' < $WORK/system.d/gamma.console | grep -v '^\['
echo "=== kernel gamma"; tr -d '\r' < $WORK/system.d/gamma.console | grep '^\[' | tail -n 200

# The same slot, to another client; then a driver VM fault with it on the slot.
cat > $WORK/delta.toml <<EOF
{delta}EOF
$CTL add $WORK/delta.toml > /dev/null; echo "ADD-DELTA-RC $?"
wait_console delta "ROUND 1 "
$CTL inject storage panic 2>&1; echo "FAULT-RC $?"
n=0
while ! $CTL events | tr -d ' \n' | grep -q '"outcome":"restarted"'; do
    sleep 2; n=$((n + 2)); [ $n -lt 900 ] || {{ echo "NO-RECOVERY"; break; }}
done
echo "=== events"; $CTL events | tr -d ' \n'; echo
rounds() {{ tr -d '\r' < $WORK/system.d/delta.console | grep -c "^ROUND"; }}
R=$(rounds); n=0
while [ $(rounds) -le $R ]; do
    sleep 2; n=$((n + 2)); [ $n -lt 900 ] || {{ echo "NO-ROUND-AFTER-RECOVERY"; sh $WORK/.diag.sh; break; }}
done
stop_clients 0 1 2
wait_done alpha beta delta
echo "=== console delta"; tr -d '\r' < $WORK/system.d/delta.console | grep -v '^\['
echo "=== kernel delta"; tr -d '\r' < $WORK/system.d/delta.console | grep '^\[' | tail -n 200
$CTL remove delta; echo "REMOVE-DELTA-RC $?"
{ending}"#,
        bad_overlap = client_table("gamma", 1),
        bad_driver =
            client_table("gamma", 2).replace("driver = \"storage\"", "driver = \"nosuch\""),
        bad_name = client_table("alpha", 2),
        ending = system.ending(false),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert_clean_ending(log);

    // Refusals: the configuration's own one-line errors, exit 1, nothing started.
    let refused = section(log, "refused").unwrap_or_default();
    for expected in [
        "window overlaps client[1].disk[0] on storage:/dev/vda",
        "client[2].disk[0].driver: unknown driver VM 'nosuch'",
        "duplicate VM name 'alpha'",
        "driver VM 'storage' still serves alpha, beta",
        "no VM named 'nobody'",
    ] {
        assert!(refused.contains(expected), "'{expected}':\n{refused}");
    }
    assert_eq!(refused.matches("RC 1").count(), 5, "{refused}");

    // Gamma: added, served on a spare slot, its data where its window is.
    assert!(log.contains("ADD-RC 0"), "{log}");
    let added = field(log, "ADDED ");
    assert!(added.contains("\"name\":\"gamma\""), "{added}");
    let g = console(log, "gamma");
    assert!(
        g.contains("WRITE-RC 0") && g.contains("READBACK-OK"),
        "{log}"
    );
    assert_eq!(field(g, "GAMMA-SIZE "), (SLICE_MIB * MIB / 512).to_string());
    let data = std::fs::read(&disk).expect("backing file");
    let at = ((2 * SLICE_MIB + GAMMA_MIB) * MIB) as usize;
    assert_eq!(
        sha256_hex(&data[at..at + (4 * MIB) as usize]),
        field(g, "GAMMA-SHA "),
        "gamma's pattern is in its window of the backing file"
    );
    let stats = section(log, "gamma stats").unwrap_or_default();
    assert!(stats.contains("\"client\":\"gamma\""), "{stats}");

    // Removal: nothing left behind.
    assert!(log.contains("REMOVE-RC 0"), "{log}");
    let count = |line: &str, who: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(who))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {who} in '{line}'"))
    };
    let (before, after) = (field(log, "BEFORE "), field(log, "AFTER "));
    assert_eq!(
        count(before, "driver="),
        count(after, "driver="),
        "the driver VMM's descriptors (its slots are wired for its life):\n{log}"
    );
    assert!(
        count(after, "daemon=") <= count(before, "daemon="),
        "the daemon's descriptors:\n{log}"
    );
    for left in [
        "FD-NEW",
        "NO-STANDBY",
        "LEFT-PROCESS",
        "LEFT-IN-LIST",
        "LEFT-CHANNEL",
        "LEFT-JAIL",
        "LEFT-CGROUP",
    ] {
        assert!(!log.contains(left), "{left}:\n{log}");
    }
    assert!(
        log.lines()
            .any(|l| l.starts_with("AGENT ") && l.contains("detached")),
        "the agent let go of gamma's slot:\n{log}"
    );
    assert_eq!(
        field(log, "LET-GO "),
        "1",
        "the VMM saw the agent let go:\n{log}"
    );
    assert!(!log.contains("UNCONFIRMED"), "{log}");

    // Delta on the same slot, through a driver VM fault: the restart restores the template made
    // at the first boot (gamma's removal does not cost a boot), and every client's
    // verification clean.
    assert!(
        log.contains("ADD-DELTA-RC 0") && log.contains("FAULT-RC 0"),
        "{log}"
    );
    assert!(
        !log.contains("NO-RECOVERY") && !log.contains("NO-ROUND-AFTER"),
        "{log}"
    );
    let events = section(log, "events").unwrap_or_default();
    assert!(events.contains("\"outcome\":\"restarted\""), "{events}");
    assert!(
        events.contains("\"restart\":\"restore\""),
        "the template serves delta on gamma's old slot:\n{events}"
    );
    for (i, c) in ["alpha", "beta", "delta"].into_iter().enumerate() {
        let rounds = field(console(log, c), "ROUNDS ");
        assert!(rounds.ends_with("FAILS 0"), "{c}: {rounds}\n{log}");
        let sha = field(console(log, c), "FINAL-SHA ");
        let at = ((i as u64 * SLICE_MIB + FINAL_MIB) * MIB) as usize;
        assert_eq!(sha256_hex(&data[at..at + (2 * MIB) as usize]), sha, "{c}");
    }
    assert!(log.contains("REMOVE-DELTA-RC 0"), "{log}");
}
