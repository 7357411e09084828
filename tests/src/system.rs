//! Daemon-level end-to-end runs: the daemon in the test host with one driver VM (`storage`)
//! owning a file-backed disk of *this* machine (emulated virtio-blk, or an NVMe controller
//! passed through with VFIO), and client VMs whose disks are windows of it.
//! A test supplies the clients' scripts and the host-side steps; this module writes the
//! configuration, starts the daemon, and provides shell helpers and a common ending (stats,
//! shutdown, orphan check, consoles and logs).

use std::path::{Path, PathBuf};

use crate::{client_initrd_with_script, driver_initrd, repo_root, TestHost};

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
}

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
        let mut config = format!(
            r#"
[[driver]]
name = "storage"
kernel = "$IMAGES/vmlinuz"
initrd = "$WORK/driver.img"
memory = "256M"
{owned}
cmdline = "{}"
"#,
            self.driver_cmdline
        );
        for (i, (client, script)) in self.clients.iter().enumerate() {
            host = host.file(
                &format!("{client}.img"),
                client_initrd_with_script(script).expect("client image"),
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
        }
        config.push_str(self.extra_config);
        let prelude = format!(
            r#"
cat > $WORK/system.toml <<EOF
{config}
EOF
$DDVMM --log-level info daemon --config $WORK/system.toml > $WORK/daemon.log 2>&1 &
DAEMON=$!
CTL="$DDVMM ctl --socket $WORK/system.sock"
# Progress lines only when a console changes: a guest that freezes (seen rarely under the
# emulator's nested SVM) makes the run silent, which the harness detects and retries.
waited=0
wait_console() {{
    c=$1; pattern=$2; last=""; quiet=0
    while ! grep -q "$pattern" $WORK/system.d/$c.console 2>/dev/null; do
        sleep 5; waited=$((waited + 5)); quiet=$((quiet + 5))
        now=$(tail -c 160 $WORK/system.d/$c.console 2>/dev/null | tr -d '\r' | tail -n 1)
        if [ "$now" != "$last" ]; then echo "$c ($waited s): $now"; last=$now; quiet=0; fi
        if [ $quiet = 120 ]; then
            # Once, for the record (the harness then sees silence and retries).
            echo "=== no progress from $c for 120 s"
            $CTL stats | grep -E '"(requests|completions|heartbeat|submitted|completed|agent_ready|outstanding)"' | tr -d ' \n'; echo
            tail -n 5 $WORK/system.d/storage.console
        fi
        kill -0 $DAEMON 2>/dev/null || {{ echo "DAEMON-DIED"; return; }}
        [ $waited -lt 3000 ] || {{ echo "CLIENT-TIMEOUT $c"; return; }}
    done
}}
wait_done() {{
    for c in "$@"; do wait_console $c DDVMM-GUEST-SCRIPT-EXIT; done
}}
"#
        );
        (host, prelude)
    }

    /// The common ending: list, stats, shutdown (SIGTERM if `sigterm`), daemon exit status,
    /// orphan check, client consoles (`=== console NAME`), agent lines, daemon and VMM logs.
    pub fn ending(&self, sigterm: bool) -> String {
        let names: Vec<&str> = self.clients.iter().map(|(c, _)| *c).collect();
        format!(
            r#"
sleep 2
echo "=== list"; $CTL list
echo "=== stats"; $CTL stats
if [ {sigterm} = true ]; then echo "=== SIGTERM"; kill -TERM $DAEMON; else echo "=== shutdown"; $CTL shutdown; fi
wait $DAEMON
echo "DAEMON-RC=$?"
for p in /proc/[0-9]*; do
    tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q -- "run --kernel" && echo "ORPHAN ${{p#/proc/}}"
done
for c in {clients}; do echo "=== console $c"; tr -d '\r' < $WORK/system.d/$c.console | grep -v '^\[' ; done
echo "=== driver console"; tr -d '\r' < $WORK/system.d/storage.console | grep -E "ddvmm-agent|DDVMM|uio|Kernel panic|sysrq" | tail -n 60
echo "=== daemon log"; tail -n 200 $WORK/daemon.log
for c in storage {clients}; do echo "=== vmm log $c"; tail -n 20 $WORK/system.d/$c.log; done
"#,
            clients = names.join(" "),
        )
    }
}

/// Checks what every system run must show: the daemon ended cleanly, none died, no VMM
/// process outlived it.
pub fn assert_clean_ending(out: &str) {
    assert!(out.contains("DAEMON-RC=0"), "{out}");
    assert!(!out.contains("DAEMON-DIED"), "{out}");
    assert!(!out.contains("CLIENT-TIMEOUT"), "{out}");
    assert!(!out.contains("ORPHAN"), "VMM processes left behind:\n{out}");
}

/// The section of the output after `=== console <client>` up to the next `===`.
pub fn console<'a>(out: &'a str, client: &str) -> &'a str {
    let start = out
        .find(&format!("=== console {client}\n"))
        .unwrap_or_else(|| panic!("no console of {client} in:\n{out}"));
    let rest = &out[start + 12..];
    &rest[..rest.find("\n===").unwrap_or(rest.len())]
}
