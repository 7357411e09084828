//! Daemon-level end-to-end runs: the daemon in the test host with one driver VM (`storage`)
//! owning a file-backed disk of *this* machine (emulated virtio-blk, or an NVMe controller
//! passed through with VFIO), and client VMs whose disks are windows of it.
//! A test supplies the clients' scripts and the host-side steps; this module writes the
//! configuration, starts the daemon, and provides shell helpers and a common ending (stats,
//! shutdown, orphan check, consoles and logs).

use std::path::{Path, PathBuf};

use crate::{client_initrd_with, driver_initrd, repo_root, TestHost};

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// A zero-filled backing file of `mib` MiB under `target/test-disks`.
pub fn backing_file(name: &str, mib: u64) -> PathBuf {
    let dir = repo_root().join("target/test-disks");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create disk");
    f.set_len(mib * MIB).expect("size disk");
    path
}

/// Each client's window in the recovery and runtime tests.
pub const SLICE_MIB: u64 = 32;
/// Each client's control block (the host writes a stop sentinel there): MiB 30 of its window.
pub const CONTROL_MIB: u64 = 30;
/// Where each client writes its final pattern: MiB 24 of its window, 2 MiB.
pub const FINAL_MIB: u64 = 24;

/// A client that loops fio (mixed random read/write, fsync every 16 writes, crc32c verify)
/// until the host's stop sentinel shows up in its control block, then writes a final random
/// pattern and prints its checksum ([`rounds_until_stopped`]).
pub fn looping_client(tag: &str) -> String {
    let setup = format!(
        r#"yes "{tag}" | head -c 1048576 > /tmp/marker
dd if=/tmp/marker of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
echo "MARKER-RC $?""#
    );
    let round = r#"fio --name=mix --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randrw --bs=4k --offset=1M --size=8M --fsync=16 --verify=crc32c \
    --verify_fatal=1 --randseed=$round --eta=never --output=/tmp/fio.txt
rc=$?
if [ $rc != 0 ] || ! grep -q "err= 0" /tmp/fio.txt; then
    fails=$((fails + 1)); echo "FIO-FAILED round $round rc $rc"; cat /tmp/fio.txt
fi"#;
    rounds_until_stopped(&setup, round)
}

/// Guest shell, in the background: a disk that completes nothing for 120 s while the script
/// runs says so once on the console (`IO-STALL`), with what the guest's block layer holds and
/// the blocked tasks, so a hang tells whether the guest still waits for a request the device
/// answered (a lost interrupt or kick) or has none in flight (stuck above the disk).
const STALL_WATCH: &str = r#"(last=""; same=0; while sleep 10; do
    now=$(awk '{print $1, $5}' /sys/block/vda/stat)
    if [ "$now" = "$last" ]; then same=$((same + 10)); else same=0; last=$now; fi
    [ $same -ge 120 ] || continue
    echo "IO-STALL vda: no completion for $same s; stat $(cat /sys/block/vda/stat | tr -s ' ') inflight $(cat /sys/block/vda/inflight | tr -s ' ')"
    mount -t debugfs none /sys/kernel/debug 2>/dev/null
    for f in /sys/kernel/debug/block/vda/hctx*/busy /sys/kernel/debug/block/vda/hctx*/dispatch /sys/kernel/debug/block/vda/hctx*/state; do
        [ -r "$f" ] && echo "IO-STALL $f: $(head -c 600 $f | tr '\n' ' ')"
    done
    (ps -o pid,stat,time,args 2>/dev/null || ps) | head -n 30 | sed 's/^/IO-STALL ps /'
    echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger; dmesg | tail -n 80 | sed 's/^/IO-STALL /'
    break
done) &"#;

/// A client script: `setup`, then rounds of `round` (shell that sees `$round`, sets `$rc` and
/// counts failures in `$fails`; each prints `ROUND n rc=..`) until the host's stop sentinel
/// shows up in the control block at MiB [`CONTROL_MIB`] of its disk (`stop_clients`), then a
/// random final pattern at MiB [`FINAL_MIB`], its checksum (`FINAL-SHA`) and `ROUNDS n FAILS f`.
pub fn rounds_until_stopped(setup: &str, round: &str) -> String {
    format!(
        r#"
{STALL_WATCH}
{setup}
round=0; fails=0
while :; do
    round=$((round + 1))
{round}
    echo "ROUND $round rc=$rc"
    dd if=/dev/vda bs=4096 skip={control} count=1 iflag=direct 2>/dev/null | grep -q DDVMM-STOP && break
done
head -c 2097152 /dev/urandom > /tmp/final
dd if=/tmp/final of=/dev/vda bs=64k seek={final} oflag=direct conv=fsync 2>/dev/null
echo "FINAL-RC $?"
echo "FINAL-SHA $(sha256sum /tmp/final | cut -d' ' -f1)"
echo "ROUNDS $round FAILS $fails"
"#,
        control = CONTROL_MIB * 256,
        final = FINAL_MIB * 16,
    )
}

/// SHA-256 of `data`, in hex (with the host's `sha256sum`).
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The field after `key` in a client's console.
pub fn field<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no '{key}' in console:\n{console}"))
}

// A driver VM whose boot freezes (the emulator's nested SVM does that, rarely) is a fault like
// any other: detected after boot_timeout_ms and restarted.
pub const RECOVERY: &str = r#"
[recovery]
boot_timeout_ms = 90000
heartbeat_timeout_ms = 8000
progress_timeout_ms = 60000
backoff_initial_ms = 100
backoff_max_ms = 2000
max_restarts = 1000
restart_window_s = 3600
"#;

/// The recovery test system: one driver VM serving `clients`, recovery configured for the
/// emulator ([`RECOVERY`]).
pub fn recovery_system<'a>(
    name: &'a str,
    disk: &'a std::path::Path,
    clients: &'a [(&'a str, String)],
    passthrough: bool,
) -> System<'a> {
    System {
        name,
        disk,
        driver_cmdline: "console=ttyS0 quiet ddvmm.action=agent",
        clients,
        slice_mib: SLICE_MIB,
        extra_config: RECOVERY,
        passthrough,
        network: false,
        net_driver: false,
    }
}

/// A system to run.
pub struct System<'a> {
    /// Test host name (logs).
    pub name: &'a str,
    /// The driver VM's disk (a file here, `$DISK0` in the test host).
    pub disk: &'a Path,
    /// The driver VM's kernel command line.
    pub driver_cmdline: &'a str,
    /// (client name, guest script); client `i` gets the window at `i * slice_mib` MiB.
    pub clients: &'a [(&'a str, String)],
    /// Window size per client.
    pub slice_mib: u64,
    /// Extra TOML (e.g. a `[recovery]` table).
    pub extra_config: &'a str,
    /// The driver VM owns the disk as a passed-through NVMe controller (VFIO, `/dev/nvme0n1`
    /// inside) instead of its emulated virtio-blk stand-in (`/dev/vda`).
    pub passthrough: bool,
    /// The driver VM also owns a NIC (emulated virtio-net on the persistent host TAP
    /// `ddtap0`) and every client gets a NIC on its bridge ([`client_mac`]). The host side:
    /// `ddtap0` and a veth end on bridge `hbr0`, the veth's other end in network namespace
    /// `peer` at [`PEER_IP`]; `iperf3` and iproute2's `ip` are in the test host.
    pub network: bool,
    /// With [`Self::network`]: the NIC belongs to a second driver VM, `netdrv` (a driver VM
    /// per device class), and the clients' NICs are its ports; `storage` owns only the disk.
    pub net_driver: bool,
}

/// The host-side peer's address (in network namespace `peer`).
pub const PEER_IP: &str = "10.0.0.1";

/// Client `i`'s address on the driver VM's bridge.
pub fn client_ip(i: usize) -> String {
    format!("10.0.0.{}", i + 2)
}

/// Client `i`'s MAC address.
pub fn client_mac(i: usize) -> String {
    format!("52:54:00:dd:00:{:02x}", i + 1)
}

/// Client-script lines that configure `eth0` with client `i`'s address.
pub fn client_net_up(i: usize) -> String {
    format!(
        "ip addr add {}/24 dev eth0\nip link set eth0 up\n",
        client_ip(i)
    )
}

/// The host side of [`System::network`]: `host_network` of `bench/lib.sh` (a persistent TAP
/// on a bridge with a peer behind a veth pair in network namespace `peer`; sets `$PEER`).
const HOST_NETWORK: &str = include_str!("../../bench/lib.sh");

impl System<'_> {
    /// The test host with every image, and the script prelude: configuration written, daemon
    /// started (`$DAEMON`), `$CTL` for the API, `wait_done CLIENT...` (waits for the clients'
    /// scripts to end, printing console changes) and `wait_console CLIENT PATTERN` (waits for a
    /// line in a console).
    pub fn host_and_prelude(&self) -> (TestHost, String) {
        let host = TestHost::new(self.name).expect("test host");
        let (mut host, owned, device) = if self.passthrough {
            (
                host.passthrough_disk(self.disk),
                r#"passthrough = ["$PT0"]"#,
                "/dev/nvme0n1",
            )
        } else {
            (host.disk(self.disk), r#"disks = ["$DISK0"]"#, "/dev/vda")
        };
        host = host.file(
            "driver.img",
            driver_initrd().expect("driver image (make driver-image)"),
            0o644,
        );
        let taps = if self.network {
            host = host
                .program("ip", which("ip"))
                .program("iperf3", which("iperf3"))
                .busybox_applets(&["httpd"]);
            r#"taps = ["ddtap0"]"#
        } else {
            ""
        };
        let (storage_taps, net_driver) = if self.network && self.net_driver {
            ("", "netdrv")
        } else {
            (taps, "storage")
        };
        let driver = |name: &str, devices: &str| {
            format!(
                r#"
[[driver]]
name = "{name}"
kernel = "$IMAGES/vmlinuz"
initrd = "$WORK/driver.img"
memory = "256M"
{devices}
cmdline = "{}"
"#,
                self.driver_cmdline
            )
        };
        let mut config = driver("storage", &format!("{owned}\n{storage_taps}"));
        if net_driver != "storage" {
            config.push_str(&driver(net_driver, taps));
        }
        for (i, (client, script)) in self.clients.iter().enumerate() {
            // Network clients carry the frame counter (`sniff`), to see what reaches them.
            let sniff = self
                .network
                .then(|| crate::sniff_binary().expect("sniff binary"));
            let programs: Vec<(&str, &Path)> =
                sniff.iter().map(|p| ("sniff", p.as_path())).collect();
            host = host.file(
                &format!("{client}.img"),
                client_initrd_with(script, &programs).expect("client image"),
                0o644,
            );
            config.push_str(&format!(
                r#"
[[client]]
name = "{client}"
kernel = "$IMAGES/vmlinuz"
initrd = "$WORK/{client}.img"
memory = "384M"
cmdline = "console=ttyS0 quiet ddvmm.action=run-script"
[[client.disk]]
driver = "storage"
device = "{device}"
offset = "{}M"
size = "{}M"
"#,
                i as u64 * self.slice_mib,
                self.slice_mib
            ));
            if self.network {
                config.push_str(&format!(
                    "[[client.net]]\ndriver = \"{net_driver}\"\nmac = \"{}\"\n",
                    client_mac(i)
                ));
            }
        }
        config.push_str(self.extra_config);
        let network = if self.network {
            format!("{HOST_NETWORK}\nhost_network {PEER_IP}\n")
        } else {
            String::new()
        };
        const NO_PROGRESS_S: u32 = 300;
        let prelude = format!(
            r#"{network}
cat > $WORK/system.toml <<EOF
{config}
EOF
$DDVMM --log-level info daemon --config $WORK/system.toml > $WORK/daemon.log 2>&1 &
DAEMON=$!
CTL="$DDVMM ctl --socket $WORK/system.sock"
# Polls once a second; prints when a console changes and every minute when it does not. A
# console unchanged for {NO_PROGRESS_S} s is a hang of ours (the harness tells an emulator wedge
# apart by the test host's heartbeat): the run ends at once with diagnostics.
waited=0
wait_console() {{
    c=$1; pattern=$2; last=""; same=0
    while ! grep -q "$pattern" $WORK/system.d/$c.console 2>/dev/null; do
        sleep 1; waited=$((waited + 1)); same=$((same + 1))
        now=$(tail -c 160 $WORK/system.d/$c.console 2>/dev/null | tr -d '\r' | tail -n 1)
        if [ "$now" != "$last" ]; then echo "$c ($waited s): $now"; last=$now; same=0
        elif [ $((same % 60)) = 0 ]; then echo "$c ($waited s): unchanged for $same s, waiting for '$pattern'"; fi
        if [ $same -ge {NO_PROGRESS_S} ]; then
            echo "NO-PROGRESS $c: console unchanged for $same s, waiting for '$pattern'"
            sh $WORK/.diag.sh; exit 98
        fi
        kill -0 $DAEMON 2>/dev/null || {{ echo "DAEMON-DIED"; sh $WORK/.diag.sh; exit 97; }}
        # A client whose VMM ended before printing the pattern never will (a crashed guest).
        if [ $((waited % 5)) = 0 ]; then
            vm=$($CTL list 2>/dev/null | tr -d ' \n' | sed 's/}},{{/}}\n{{/g' | grep "\"name\":\"$c\"")
            case "$vm" in *'"state":"exited"'*)
                grep -q "$pattern" $WORK/system.d/$c.console 2>/dev/null && break
                echo "CLIENT-DOWN $c before '$pattern': $vm"; sh $WORK/.diag.sh; exit 95 ;;
            esac
        fi
        [ $waited -lt 3000 ] || {{ echo "CLIENT-TIMEOUT $c"; sh $WORK/.diag.sh; exit 96; }}
    done
}}
wait_done() {{
    for c in "$@"; do wait_console $c DDVMM-GUEST-SCRIPT-EXIT; done
}}
# Writes the stop sentinel into the control block of clients (by index) of [`looping_client`].
stop_clients() {{
    for i in "$@"; do
        printf 'DDVMM-STOP' | dd of=$DISK0 bs=1 seek=$(( (i * {slice} + {CONTROL_MIB}) * 1048576 )) conv=notrunc 2>/dev/null
    done
    sync
}}
"#,
            slice = self.slice_mib,
        );
        (host, prelude)
    }

    /// The common ending: list, stats, shutdown (SIGTERM if `sigterm`), daemon exit status,
    /// orphan check, client consoles (`=== console NAME`), agent lines, daemon and VMM logs.
    pub fn ending(&self, sigterm: bool) -> String {
        let names: Vec<&str> = self.clients.iter().map(|(c, _)| *c).collect();
        format!(
            r#"
echo "=== list"; $CTL list
echo "=== stats"; $CTL stats
echo "=== final events"; $CTL events | tr -d ' \n'; echo
echo "=== final metrics"; $CTL metrics | grep -E "^ddvmm_(vm_starts|driver_faults|driver_restarts)_total"
{CONFINEMENT_REPORT}if [ {sigterm} = true ]; then echo "=== SIGTERM"; kill -TERM $DAEMON; else echo "=== shutdown"; $CTL shutdown; fi
wait $DAEMON
echo "DAEMON-RC=$?"
# Only this run's VMMs (their command lines name files under its $WORK).
for p in /proc/[0-9]*; do
    tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -- "run --kernel" | grep -q -- "$WORK/" && echo "ORPHAN ${{p#/proc/}}"
done
# The clients' kernel lines: an error among them fails the test (assert_clean_ending).
for c in {clients}; do echo "=== kernel $c"; tr -d '\r' < $WORK/system.d/$c.console | grep '^\[' | tail -n 400; done
for c in {clients}; do echo "=== console $c"; tr -d '\r' < $WORK/system.d/$c.console | grep -v '^\[' ; done
# The driver VMs (the daemon has stopped: every VM that is not a client): their consoles, and
# their VMMs' snapshot, gate and warning lines.
for f in $WORK/system.d/*.console; do
    d=$(basename $f .console)
    case " {clients} " in *" $d "*) continue;; esac
    echo "=== driver console $d"; tr -d '\r' < $f | grep -E "ddvmm-agent|DDVMM|uio|Kernel panic|sysrq" | tail -n 60
    echo "=== vmm events $d"; grep -a -E "WARN|ERROR|snapshot|gate|paus|resum" $WORK/system.d/$d.log | tail -n 60
done
echo "=== daemon log"; tail -n 200 $WORK/daemon.log
for c in $(ls $WORK/system.d/*.log | sed 's|.*/||; s|\.log$||'); do echo "=== vmm log $c"; tail -n 20 $WORK/system.d/$c.log; done
echo "=== vmm kills"; grep -h "killed by signal\|seccomp:" $WORK/system.d/*.log | sort | uniq -c
dmesg | grep -a -i "segfault\|traps:" | tail -n 10
"#,
            clients = names.join(" "),
        )
    }
}

/// Shell (needs `$CTL`, `$DAEMON`, `$WORK`): how every running VMM is confined, as seen from
/// outside: each thread's ids, capabilities and seccomp state, its namespaces against the
/// daemon's, what its root holds, its cgroup and limits; the API socket's and state
/// directory's modes. Checked by [`assert_confined`].
const CONFINEMENT_REPORT: &str = r#"echo "=== confinement"
$CTL list | tr -d ' \n' | sed 's/},{/}\n{/g' | while read -r line; do
    name=$(echo "$line" | sed -n 's/.*"name":"\([^"]*\)".*/\1/p')
    vmm=$(echo "$line" | sed -n 's/.*"vmm_pid":\([0-9][0-9]*\).*/\1/p')
    [ -n "$vmm" ] || continue
    # A client that powers off meanwhile is left out: its lines count only if it still runs
    # once they are all read.
    {
        echo "vm $name $vmm"
        for t in /proc/$vmm/task/*; do
            echo "task $name $(tr -d ' ' < $t/comm) $(grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs):' $t/status | tr -s '\t\n' '  ')"
        done
        for ns in pid mnt net ipc; do echo "ns $name $ns $(readlink /proc/$vmm/ns/$ns) $(readlink /proc/$DAEMON/ns/$ns)"; done
        echo "root $name $(ls -A /proc/$vmm/root/ | wc -l)"
        cg=$(sed -n 's/^0:://p' /proc/$vmm/cgroup)
        echo "cgroup $name $cg $(cat /sys/fs/cgroup$cg/memory.max 2>/dev/null) $(cat /sys/fs/cgroup$cg/pids.max 2>/dev/null)"
    } > $WORK/.confinement 2>&1
    [ -d /proc/$vmm/task ] && cat $WORK/.confinement
done
echo "modes $(stat -c %a $WORK/system.sock) $(stat -c %a $WORK/system.d)"
"#;

/// Checks the confinement report of a system run: every running VMM (at least one) has, in
/// every thread, a non-zero uid and gid, no capabilities (effective, permitted, bounding),
/// seccomp filter mode and `NO_NEW_PRIVS`; its own PID, mount, network and IPC namespaces; an
/// empty root; its own cgroup with a memory and a pids limit; the API socket is 0600 and the
/// state directory 0700.
pub fn assert_confined(out: &str) {
    let out = &out.replace('\r', "");
    let report =
        section(out, "confinement").unwrap_or_else(|| panic!("no confinement report:\n{out}"));
    let vms: Vec<&str> = report
        .lines()
        .filter_map(|l| l.strip_prefix("vm "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!vms.is_empty(), "no running VMM in the report:\n{report}");
    for vm in &vms {
        let lines = |kind: &str| -> Vec<Vec<&str>> {
            report
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|w| w.len() > 1 && w[0] == kind && w[1] == *vm)
                .collect()
        };
        let tasks = lines("task");
        assert!(tasks.len() >= 3, "{vm}: too few threads:\n{report}");
        for t in &tasks {
            let field = |name: &str| -> Vec<&str> {
                let at = t
                    .iter()
                    .position(|w| *w == name)
                    .unwrap_or_else(|| panic!("{vm}: no {name} in {t:?}"));
                t[at + 1..]
                    .iter()
                    .take_while(|w| !w.ends_with(':'))
                    .copied()
                    .collect()
            };
            for ids in ["Uid:", "Gid:"] {
                let v = field(ids);
                assert!(
                    v.len() == 4 && v.iter().all(|x| *x != "0" && *x == v[0]),
                    "{vm} thread {}: {ids} {v:?}\n{report}",
                    t[2]
                );
            }
            for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
                assert_eq!(
                    field(caps),
                    ["0000000000000000"],
                    "{vm} thread {}: {caps}\n{report}",
                    t[2]
                );
            }
            assert_eq!(field("Seccomp:"), ["2"], "{vm} thread {}\n{report}", t[2]);
            assert_eq!(
                field("NoNewPrivs:"),
                ["1"],
                "{vm} thread {}\n{report}",
                t[2]
            );
        }
        let ns = lines("ns");
        assert_eq!(ns.len(), 4, "{vm}:\n{report}");
        for n in &ns {
            assert!(
                n.len() == 5 && n[3].starts_with(n[2]) && n[3] != n[4],
                "{vm}: shares the daemon's {} namespace:\n{report}",
                n[2]
            );
        }
        assert_eq!(
            lines("root")[0].get(2),
            Some(&"0"),
            "{vm}: its root is not empty:\n{report}"
        );
        let cg = &lines("cgroup")[0];
        assert!(
            cg.len() == 5 && cg[2].contains("/ddvmm-") && cg[2].ends_with(&format!("/{vm}")),
            "{vm}: not in its own cgroup:\n{report}"
        );
        assert!(
            cg[3].parse::<u64>().is_ok() && cg[4].parse::<u64>().is_ok(),
            "{vm}: no memory or pids limit:\n{report}"
        );
    }
    assert!(
        report.contains("modes 600 700"),
        "socket/state modes:\n{report}"
    );
}

/// The path of program `name` on this machine (`PATH`, then the sbin directories).
fn which(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{name} not found (apt-get install iproute2 iperf3)"))
}

/// `name value` of a metric line `name{labels} value`.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of every metric line starting with `prefix` (all label sets of one metric).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `=== metrics` section of a run's output.
pub fn metrics_section(out: &str) -> &str {
    section(out, "metrics").expect("metrics section")
}

/// Every `=== HEADER` line of a run's output at the start of a line, with the text after it
/// up to the next `===` line: (header, body).
pub fn sections(out: &str) -> impl Iterator<Item = (&str, &str)> {
    out.match_indices("=== ")
        .filter(|(i, _)| *i == 0 || out.as_bytes()[i - 1] == b'\n')
        .filter_map(|(i, _)| {
            let rest = &out[i + 4..];
            let (header, body) = rest.split_once('\n')?;
            let end = if body.starts_with("===") {
                0
            } else {
                body.find("\n===").unwrap_or(body.len())
            };
            Some((header, &body[..end]))
        })
}

/// The body of the first section headed exactly `=== header` ([`sections`]).
pub fn section<'a>(out: &'a str, header: &str) -> Option<&'a str> {
    sections(out)
        .find(|(h, _)| *h == header)
        .map(|(_, body)| body)
}

/// Checks what every system run must show: the daemon ended cleanly, none died, no VMM
/// process outlived it, no client's kernel printed an error line.
pub fn assert_clean_ending(out: &str) {
    assert_clean_ending_allowing(out, &[]);
}

/// [`assert_clean_ending`] for a test that makes clients see errors on purpose: a client
/// kernel error line is allowed only if it contains one of `expected`.
pub fn assert_clean_ending_allowing(out: &str, expected: &[&str]) {
    assert!(out.contains("DAEMON-RC=0"), "{out}");
    assert!(!out.contains("DAEMON-DIED"), "{out}");
    assert!(!out.contains("CLIENT-TIMEOUT"), "{out}");
    assert!(!out.contains("NO-PROGRESS"), "{out}");
    assert!(!out.contains("CLIENT-DOWN"), "{out}");
    assert!(!out.contains("ORPHAN"), "VMM processes left behind:\n{out}");
    assert_confined(out);
    let errors: Vec<&str> = sections(out)
        .filter(|(header, _)| header.starts_with("kernel "))
        .flat_map(|(_, body)| crate::kernel_error_lines(body))
        .filter(|l| !expected.iter().any(|e| l.contains(e)))
        .collect();
    assert!(
        errors.is_empty(),
        "client kernels reported errors:\n{}\n\n{out}",
        errors.join("\n")
    );
}

/// Checks that a system that is not about recovery never faulted: no fault event, no fault
/// or restart counted, and the driver VM started exactly once.
pub fn assert_no_faults(out: &str) {
    let out = &out.replace('\r', "");
    let events = section(out, "final events")
        .and_then(|s| s.lines().next())
        .unwrap_or_else(|| panic!("no final events in:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(events).expect("events JSON");
    let list = v["events"].as_array().cloned().unwrap_or_default();
    assert!(
        list.is_empty(),
        "unexpected driver VM faults: {events}\n{out}"
    );
    let m = section(out, "final metrics").unwrap_or_else(|| panic!("no final metrics in:\n{out}"));
    assert_eq!(metric_sum(m, "ddvmm_driver_faults_total"), 0.0, "{m}");
    assert_eq!(metric_sum(m, "ddvmm_driver_restarts_total"), 0.0, "{m}");
    assert_eq!(
        metric(m, "ddvmm_vm_starts_total{vm=\"storage\"}"),
        Some(1.0),
        "the driver VM started more than once: {m}"
    );
}

/// The section of the output after `=== console <client>` up to the next `===`.
pub fn console<'a>(out: &'a str, client: &str) -> &'a str {
    section(out, &format!("console {client}"))
        .unwrap_or_else(|| panic!("no console of {client} in:\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_end_at_the_next_header() {
        let out = "boot\n=== kernel alpha\n=== kernel beta\n[ 1.0] I/O error\n=== console alpha\n\
                   a=== not a header\nDONE\n=== metrics\nm 1\n";
        let all: Vec<(&str, &str)> = sections(out).collect();
        assert_eq!(
            all,
            [
                ("kernel alpha", ""),
                ("kernel beta", "[ 1.0] I/O error"),
                ("console alpha", "a=== not a header\nDONE"),
                ("metrics", "m 1\n"),
            ]
        );
        assert_eq!(console(out, "alpha"), "a=== not a header\nDONE");
        assert_eq!(section(out, "console"), None);
        assert_eq!(metrics_section(out), "m 1\n");
    }
}
