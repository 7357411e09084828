//! The test-host harness: runs a shell script where `/dev/kvm` can run unmodified Linux guests.
//!
//! - **Direct**: this machine's KVM has hardware virtualization (a `vmx`/`svm` CPU flag and no
//!   `kvm_pvm`): the script runs here with `sh`.
//! - **Emulated**: otherwise the script runs inside the *test host*, a QEMU/TCG-emulated AMD
//!   machine booting Debian's stock kernel with `kvm-amd` loaded (nested SVM), so `/dev/kvm`
//!   inside runs real guests. The harness appends a cpio archive with the `ddvmm` binary (and the
//!   shared libraries it links), extra files and `/cmd.sh` to the prebuilt
//!   `guest-images/out/testhost-base.cpio.gz`, boots it, and reads the console back.
//!
//! Either way the script sees `$DDVMM` (the binary) and `$IMAGES` (the guest images) and its
//! combined output and exit status come back in a [`ScriptOutput`]. `DDVMM_TEST_HOST=direct` or
//! `=emulated` forces a mode.

pub mod cpio;
pub mod records;
pub mod slots;
pub mod system;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where scripts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// On this machine.
    Direct,
    /// Inside the QEMU-emulated test host.
    Emulated,
}

/// Harness failures (as opposed to the script's own exit status).
#[derive(Debug, Error)]
pub enum HarnessError {
    /// A required file is missing.
    #[error("{what} not found at {path} ({hint})")]
    Missing {
        /// What.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// I/O error.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// The run exceeded its timeout.
    #[error("timed out after {timeout:?}; output so far:\n{output}")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// What was printed.
        output: String,
    },
    /// The emulator wedged: the test host's own heartbeat stopped (the only failure that is
    /// retried; see [`TestHost::run`]).
    #[error("the emulated test host wedged: {evidence}; output so far:\n{output}")]
    Wedged {
        /// Why we know it was the emulator.
        evidence: String,
        /// What was printed (with the emulator's state appended).
        output: String,
    },
    /// Nothing was printed for too long while the test host itself was alive (its heartbeat
    /// went on): our hang. The output ends with the test host's diagnostics.
    #[error("no output for {quiet:?} while the test host was alive (our hang); output and diagnostics:\n{output}")]
    Hung {
        /// How long it was silent.
        quiet: Duration,
        /// What was printed, then the diagnostics.
        output: String,
    },
    /// The test host stopped scheduling (no heartbeat) while a vCPU of the emulator still ran:
    /// a test-host kernel lockup, not the known emulator wedge. Not retried.
    #[error("the test host stopped scheduling with a vCPU running: {evidence}; output:\n{output}")]
    TestHostStuck {
        /// What was seen.
        evidence: String,
        /// What was printed (with the emulator's state appended).
        output: String,
    },
    /// A guest crashed (triple fault or KVM internal error, reported by `ddvmm`) in a test that
    /// did not inject one.
    #[error("a guest crashed and the test did not expect it; output:\n{output}")]
    UnexpectedGuestCrash {
        /// What was printed.
        output: String,
    },
    /// The test host did not report the script's exit status.
    #[error("test host ended without an exit marker (qemu status {status:?}); output:\n{output}")]
    NoExitMarker {
        /// QEMU's exit status.
        status: Option<i32>,
        /// What was printed.
        output: String,
    },
    /// Passthrough devices exist only in the emulated test host.
    #[error("passthrough devices need the emulated test host (DDVMM_TEST_HOST=emulated)")]
    PassthroughNeedsEmulatedHost,
    /// A bad DDVMM_TEST_HOST value.
    #[error("DDVMM_TEST_HOST must be 'direct' or 'emulated', not '{0}'")]
    BadOverride(String),
}

/// The script's combined stdout/stderr and exit status.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    /// Everything printed (in emulated mode: the test host's console, which includes it).
    pub output: String,
    /// The script's exit status.
    pub status: i32,
    /// Where it ran.
    pub host: HostKind,
}

/// Whether a machine's KVM can run unmodified Linux guests: hardware virtualization flags in
/// `cpuinfo`, and not the `kvm_pvm` software module.
pub fn kvm_runs_unmodified_guests(
    cpuinfo: &str,
    kvm_dev_exists: bool,
    kvm_pvm_loaded: bool,
) -> bool {
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    kvm_dev_exists && hw_virt && !kvm_pvm_loaded
}

/// Chooses where scripts run, honouring `DDVMM_TEST_HOST`.
pub fn select_host() -> Result<HostKind, HarnessError> {
    match std::env::var("DDVMM_TEST_HOST").ok().as_deref() {
        Some("direct") => return Ok(HostKind::Direct),
        Some("emulated") => return Ok(HostKind::Emulated),
        Some("") | None => {}
        Some(other) => return Err(HarnessError::BadOverride(other.to_string())),
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let direct = kvm_runs_unmodified_guests(
        &cpuinfo,
        Path::new("/dev/kvm").exists(),
        Path::new("/sys/module/kvm_pvm").exists(),
    );
    Ok(if direct {
        HostKind::Direct
    } else {
        HostKind::Emulated
    })
}

/// The repository root, found at run time: the nearest ancestor holding this workspace of
/// `CARGO_MANIFEST_DIR` as cargo and nextest set it for the test process (this crate's
/// folder), else of the running executable (`target/release/...`), else of the current
/// folder. Never the path compiled in:
/// a checkout that was copied or moved must test its own images and binaries.
pub fn repo_root() -> PathBuf {
    fn is_root(p: &Path) -> bool {
        p.join("tests/src/lib.rs").is_file() && p.join("guest-images").is_dir()
    }
    let starts = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        std::env::current_exe().ok(),
        std::env::current_dir().ok(),
    ];
    starts
        .into_iter()
        .flatten()
        .find_map(|start| {
            start
                .ancestors()
                .find(|a| is_root(a))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `ddvmm` binary under test: `$DDVMM_BIN`, or the release build.
pub fn ddvmm_binary() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("DDVMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/ddvmm"));
    exists(
        path,
        "ddvmm binary",
        "run `cargo build --release` or `make test`",
    )
}

/// The folder with built guest images.
pub fn images_dir() -> PathBuf {
    repo_root().join("guest-images/out")
}

/// A file from the images folder, checked to exist.
pub fn image(name: &str) -> Result<PathBuf, HarnessError> {
    exists(images_dir().join(name), "guest image", "run `make images`")
}

fn exists(path: PathBuf, what: &'static str, hint: &'static str) -> Result<PathBuf, HarnessError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::Missing { what, path, hint })
    }
}

/// A script to run on the test host, with optional extra files.
pub struct TestHost {
    host: HostKind,
    files: Vec<(String, Vec<u8>, u32)>,
    host_files: Vec<(String, PathBuf)>,
    programs: Vec<(String, PathBuf)>,
    disks: Vec<PathBuf>,
    passthrough: Vec<PathBuf>,
    memory_mib: u32,
    cpus: u32,
    name: String,
    echo: bool,
    expect_guest_crash: bool,
    quiet_limit: Duration,
}

/// What `ddvmm` prints when a guest triple-faults or KVM reports an internal error.
const GUEST_CRASH_MARK: &str = "guest crashed on vCPU";

/// A run that prints nothing for this long while its test host is alive is hung (ours).
/// Scripts print progress at least every minute (the system prelude's `wait_console` does).
const QUIET_LIMIT: Duration = Duration::from_secs(300);

/// The test host prints a heartbeat on its second serial port every [`HEARTBEAT_PERIOD_S`]
/// seconds from a plain shell loop: as long as its kernel schedules anything, it ticks.
const HEARTBEAT_PERIOD_S: u32 = 2;

/// No heartbeat for this long: the emulator wedged (the test host's CPU no longer runs).
/// Measured heartbeat gaps under load are seconds; this is generous.
const WEDGE_LIMIT: Duration = Duration::from_secs(90);

/// The first heartbeat must come within this long of QEMU's start (boot and unpacking a
/// large initramfs included).
const FIRST_HEARTBEAT_LIMIT: Duration = Duration::from_secs(240);

/// How long the test host may take to print its diagnostics once asked.
const DIAG_LIMIT: Duration = Duration::from_secs(90);

/// What the diagnostics script prints last.
const DIAG_END: &str = "DDVMM-DIAG-END";

/// Runs of one script in the emulated test host; only an evidenced emulator wedge (or a
/// test-host kernel crash) is retried.
pub const EMULATED_ATTEMPTS: u32 = 3;

/// Diagnostics of a hung run (test host alive, our code stuck), printed by the test host on
/// request: every process, the kernel stacks of the VMM processes' threads, the daemon's
/// stats and the tails of every console and log under `$WORK`. Every step is bounded.
const DIAG_SCRIPT: &str = r#"W=${WORK:-/work}
echo; echo "=== harness diagnostics (the test host is alive; the run went silent)"
echo "uptime $(cat /proc/uptime) load $(cat /proc/loadavg)"
grep -E "^(MemTotal|MemFree|MemAvailable|Cached|Shmem|AnonPages):" /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo
ps -o pid,ppid,stat,time,args 2>/dev/null || ps
# The VMs' cgroups: memory against its limit (shared memory cannot be reclaimed without swap),
# how often the limit was hit, CPU throttling.
for f in $(find /sys/fs/cgroup -maxdepth 4 -path '*ddvmm-*' -name memory.current 2>/dev/null); do
    g=${f%/memory.current}
    echo "cgroup ${g##*/}: current $(cat $g/memory.current) max $(cat $g/memory.max) $(grep -E '^(anon|file|shmem) ' $g/memory.stat | tr '\n' ' ')events $(tr '\n' ' ' < $g/memory.events) cpu $(grep -E '^(usage_usec|nr_throttled|throttled_usec) ' $g/cpu.stat 2>/dev/null | tr '\n' ' ')"
done
# Where busy guests run: each VMM whose boot vCPU is runnable logs that vCPU's registers on
# SIGUSR2 ("vCPU state on request"), five times; the last three of each are named with this
# test host's own symbols (/proc/kallsyms: the same stock kernel; each kernel's KASLR offset
# follows from its system-call entry, MSR_LSTAR, logged with the sample).
busy=""
for t in /proc/[0-9]*/task/*; do
    [ "$(cat $t/comm 2>/dev/null)" = vcpu0 ] || continue
    [ "$(cut -d')' -f2 $t/stat 2>/dev/null | cut -d' ' -f2)" = R ] || continue
    p=${t#/proc/}; p=${p%%/*}
    # This run's VMMs only, where other runs share the machine (direct mode).
    [ "$W" = /work ] || tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q -- "$W" || continue
    busy="$busy $p"
done
echo "busy vCPUs (sampled) in VMM processes:${busy:- none}"
if [ -n "$busy" ]; then
for i in 1 2 3 4 5; do for p in $busy; do kill -USR2 $p 2>/dev/null; done; sleep 1; done
for f in $W/system.d/*.log $W/*.log; do
    [ -f "$f" ] || continue
    tr -d '\033' < "$f" | sed 's/\[[0-9;]*m//g' | grep "vCPU state on request" | tail -n 3 \
        | sed -n "s|.*rip=\(0x[0-9a-f]*\).*lstar=\(0x[0-9a-f]*\).*|${f##*/} \1 \2|p"
done > /tmp/vcpu-samples
E=$(grep -m1 ' entry_SYSCALL_64$' /proc/kallsyms | cut -d' ' -f1)
X=$(grep -m1 ' _etext$' /proc/kallsyms | cut -d' ' -f1)
[ -n "$E" ] && [ -n "$X" ] && grep '^ffffffff[0-9a-f]* [tT] ' /proc/kallsyms | awk -v S="$(tr '\n' ';' < /tmp/vcpu-samples)" -v E="$E" -v X="$X" '
function h(s,   i, v) {
    s = tolower(s); sub(/^0x/, "", s); if (length(s) > 8) s = substr(s, length(s) - 7)
    v = 0; for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
    return v
}
# Eight hex digits (busybox awk prints %x of a value past 2^31 wrong).
function hx(v,   i, d, s) {
    s = ""; for (i = 0; i < 8; i++) { d = v % 16; s = substr("0123456789abcdef", d + 1, 1) s; v = (v - d) / 16 }
    return s
}
BEGIN {
    n = split(S, L, ";"); m = 0; e = h(E)
    for (i = 1; i <= n; i++) {
        if (split(L[i], f, " ") < 3) continue
        m++; who[m] = f[1]; rip[m] = f[2]
        kernel[m] = (substr(f[2], 1, 6) == "0xffff")
        t[m] = (h(f[2]) - h(f[3]) + e) % 4294967296; if (t[m] < 0) t[m] += 4294967296
        # Fixed-width lowercase hex compares as text exactly as the numbers do.
        T[m] = "ffffffff" hx(t[m]); B[m] = ""
    }
}
{
    for (k = 1; k <= m; k++) if (kernel[k] && $1 "" <= T[k] && $1 "" > B[k]) { B[k] = $1 ""; name[k] = $3 }
}
END {
    for (k = 1; k <= m; k++) {
        if (!kernel[k]) where = "user space"
        else if (T[k] > X) where = "kernel, past the core text (a module: not named)"
        else if (B[k] == "") where = "kernel, no symbol"
        else where = sprintf("kernel %s+0x%x", name[k], t[k] - h(B[k]))
        print "vCPU sample " who[k] " rip " rip[k] ": " where
    }
}'
fi
for d in /proc/[0-9]*; do
    p=${d#/proc/}; cmd=$(tr '\0' ' ' 2>/dev/null < $d/cmdline | head -c 300)
    case "$cmd" in *diag.sh*) continue ;; *ddvmm*) ;; *) continue ;; esac
    # This run's processes only, where other runs share the machine (direct mode).
    [ "$W" = /work ] || case "$cmd" in *"$W"*) ;; *) continue ;; esac
    echo "--- pid $p: $cmd"
    for t in /proc/$p/task/*; do
        echo "task ${t##*/} $(cat $t/comm 2>/dev/null) state $(cut -d')' -f2 $t/stat 2>/dev/null | cut -d' ' -f2) cpu-ticks $(cut -d')' -f2 $t/stat 2>/dev/null | cut -d' ' -f13,14) wchan $(cat $t/wchan 2>/dev/null)"
        head -n 12 $t/stack 2>/dev/null | sed 's/^/    /'
    done
done
[ -S $W/system.sock ] && { echo "--- daemon stats"; timeout 10 $DDVMM ctl --socket $W/system.sock stats 2>&1 | tr -d ' \n' | head -c 16000; echo; }
for f in $W/system.d/*.console $W/*.console; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 25 "$f" | tr -d '\r'; }
done
for f in $W/system.d/*.log $W/*.log; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 40 "$f"; }
done
echo "--- dmesg"; dmesg 2>/dev/null | tail -n 30
echo "DDVMM-DIAG-END"
"#;

/// The test host's side of the heartbeat channel (its second serial port): a tick every
/// [`HEARTBEAT_PERIOD_S`] seconds, and `diag` requests answered on the console.
fn heartbeat_lines() -> String {
    format!(
        "stty -F /dev/ttyS1 -echo 2>/dev/null\n\
         ( (while :; do echo \"DDVMM-HB $(cut -d' ' -f1 /proc/uptime)\"; sleep {HEARTBEAT_PERIOD_S}; done > /dev/ttyS1) & )\n\
         ( (while read -r req; do case \"$req\" in diag*) sh /work/.diag.sh > /dev/console 2>&1 ;; esac; done < /dev/ttyS1) & )\n"
    )
}

impl TestHost {
    /// A test host chosen by [`select_host`]; `name` labels its console log.
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        Ok(TestHost {
            host: select_host()?,
            files: Vec::new(),
            host_files: Vec::new(),
            programs: Vec::new(),
            disks: Vec::new(),
            passthrough: Vec::new(),
            memory_mib: 3072,
            // One CPU: with two, QEMU 7.2's TCG nested SVM lets a host interrupt (often a
            // cross-CPU kick) land between #VMEXIT and the host's VMLOAD, with the guest's GS
            // base still live; the test host's kernel then page-faults recursively and dies
            // ("stack guard page was hit", common_interrupt at __svm_vcpu_run). Measured:
            // 6 of 6 two-CPU runs of the 20-fault recovery test died that way, the first
            // one-CPU run completed. DDVMM_TESTHOST_CPUS overrides.
            cpus: std::env::var("DDVMM_TESTHOST_CPUS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=8).contains(n))
                .unwrap_or(1),
            name: name.to_string(),
            echo: false,
            expect_guest_crash: false,
            quiet_limit: QUIET_LIMIT,
        })
    }

    /// Where this host runs scripts.
    pub fn kind(&self) -> HostKind {
        self.host
    }

    /// Adds a file for the script, visible at `$WORK/<name>` (emulated: `/work/<name>`).
    pub fn file(mut self, name: &str, contents: Vec<u8>, mode: u32) -> Self {
        self.files.push((name.to_string(), contents, mode));
        self
    }

    /// The script makes a guest crash on purpose: do not treat a crash as an emulator fault.
    pub fn expect_guest_crash(mut self) -> Self {
        self.expect_guest_crash = true;
        self
    }

    /// A run silent for this long while its host is alive is hung (default [`QUIET_LIMIT`]).
    pub fn quiet_limit(mut self, limit: Duration) -> Self {
        self.quiet_limit = limit;
        self
    }

    /// Also copy output to this process's stdout as it arrives (for demos and benchmarks).
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Makes a program of this machine available to the script as `name` on its `PATH`
    /// (emulated mode: copied in with the shared libraries it links).
    pub fn program(mut self, name: &str, host_path: impl Into<PathBuf>) -> Self {
        self.programs.push((name.to_string(), host_path.into()));
        self
    }

    /// Makes busybox applets the script runs on the host side (`httpd`, `wget`) available
    /// in direct mode too, from the images' own busybox (the emulated test host's userland
    /// is that busybox already).
    pub fn busybox_applets(mut self, names: &[&str]) -> Self {
        if self.host == HostKind::Direct {
            let busybox = images_dir().join("busybox");
            for name in names {
                self = self.program(name, busybox.clone());
            }
        }
        self
    }

    /// Whether this host can give a test passthrough devices. Where it cannot (direct mode:
    /// this machine's own PCI devices are not the harness's to give away), prints why, past
    /// the test capture, records the test as skipped, and returns `false`: the test returns.
    pub fn has_passthrough_devices(&self) -> bool {
        self.emulated_only("passthrough devices exist only in the emulated test host")
    }

    /// `true` in the emulated test host; in direct mode prints `why` the test cannot run
    /// here (past the test capture), records it as skipped and returns `false`.
    pub fn emulated_only(&self, why: &str) -> bool {
        if self.host == HostKind::Emulated {
            return true;
        }
        records::say(&format!(
            "testhost SKIP: {} ({}): {why} (DDVMM_TEST_HOST=emulated)",
            self.name,
            records::current_test()
        ));
        records::record_run(
            &self.name,
            self.host,
            Duration::ZERO,
            0,
            &format!("skipped: {why}"),
        );
        false
    }

    /// Copies a file of this machine to the same absolute path inside the emulated test host
    /// (data files a program needs, such as firmware). Direct mode: already there.
    pub fn host_file(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.host_files
            .push((path.to_string_lossy().into_owned(), path));
        self
    }

    /// Makes a file of this machine available to the script as a block device: `$DISK0`,
    /// `$DISK1`, ... Emulated mode attaches it to the test host as an NVMe namespace (the
    /// stock kernel has the `nvme` driver built in), so whatever a guest writes through it lands
    /// in this very file; direct mode passes the path.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disks.push(path.into());
        self
    }

    /// Makes a file of this machine available to the script as a PCI function to pass through:
    /// an NVMe controller of the test host, at a fixed address given to the script as `$PT0`,
    /// `$PT1`, ... (`0000:00:10.0`, ...), already bound to `vfio-pci`, behind an emulated
    /// Intel IOMMU (the test host boots with `intel_iommu=on iommu=pt`, so its own devices stay
    /// untranslated). What a guest writes through it lands in this very file. Emulated mode
    /// only.
    pub fn passthrough_disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.passthrough.push(path.into());
        self
    }

    /// Test-host memory (emulated mode), MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Runs `script` and returns its output and exit status. `timeout` catches hangs only.
    ///
    /// Emulated mode retries a run only when there is evidence that the *emulator* failed,
    /// never on silence alone and never on a crash of a guest:
    /// - **wedge**: the test host's heartbeat (a shell loop printing on its second serial
    ///   port every [`HEARTBEAT_PERIOD_S`] s) stopped for [`WEDGE_LIMIT`] *and* QEMU's monitor
    ///   shows every vCPU halted. Seen with QEMU 7.2 and 10.0 TCG: the test host's only CPU
    ///   halted with interrupts enabled and nothing wakes it (an NMI through the monitor does
    ///   not either); [`emulator_snapshot`] is kept with the failed output as the record. A
    ///   stopped heartbeat with a vCPU still running is [`HarnessError::TestHostStuck`]: a
    ///   test-host kernel lockup, which our use of its KVM could cause, so never retried.
    /// - **test-host kernel crash**: QEMU ended without the exit marker and the test host's
    ///   console ends in a kernel crash (the nested-SVM "stack guard page was hit" in
    ///   `__svm_vcpu_run`, seen with two test-host CPUs).
    ///
    /// Everything else fails at once: a silent run whose test host still ticks is *our* hang
    /// ([`HarnessError::Hung`], with the test host's diagnostics), a timeout is ours, and a
    /// guest crash the test did not ask for ([`Self::expect_guest_crash`]) is a failure, even
    /// in an attempt that would otherwise have been retried. Every
    /// retry is printed on stderr past the test capture, kept in
    /// `target/testhost-logs/<name>.attempt-N.log` and recorded for the suite's report
    /// ([`records`]), up to [`EMULATED_ATTEMPTS`] runs in all.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<ScriptOutput, HarnessError> {
        // A machine-wide slot for the whole run, retries included; time counts from there.
        let _slot = (self.host == HostKind::Emulated)
            .then(|| slots::acquire(&records::logs_dir().join("slots")))
            .flatten();
        let started = Instant::now();
        let mut attempt = 1;
        let result = loop {
            let attempt_start = Instant::now();
            let result = if self.host == HostKind::Direct {
                self.run_direct(script, timeout)
            } else {
                self.run_emulated(script, timeout)
            };
            let retry = match &result {
                Err(HarnessError::Wedged { evidence, output }) => {
                    Some((records::CAUSE_WEDGE, evidence.clone(), output))
                }
                Err(HarnessError::NoExitMarker { output, .. }) => {
                    test_host_kernel_crash(output).map(|e| (records::CAUSE_HOST_CRASH, e, output))
                }
                _ => None,
            };
            // A guest crash in a failed attempt is still a crash: never retried away.
            let crashed = |o: &String| !self.expect_guest_crash && o.contains(GUEST_CRASH_MARK);
            if let Some((_, _, output)) = retry.as_ref().filter(|(_, _, o)| crashed(o)) {
                break Err(HarnessError::UnexpectedGuestCrash {
                    output: output.to_string(),
                });
            }
            let Some((cause, evidence, output)) = retry.filter(|_| attempt < EMULATED_ATTEMPTS)
            else {
                break result;
            };
            let kept = self
                .log_path()
                .with_extension(format!("attempt-{attempt}.log"));
            let _ = std::fs::write(&kept, output);
            records::record_retry(&records::Retry {
                host: &self.name,
                attempt,
                cause,
                evidence: &evidence,
                log: &kept,
                elapsed: attempt_start.elapsed(),
            });
            attempt += 1;
        };
        let result = match result {
            Ok(out) if !self.expect_guest_crash && out.output.contains(GUEST_CRASH_MARK) => {
                Err(HarnessError::UnexpectedGuestCrash { output: out.output })
            }
            other => other,
        };
        let label = match &result {
            Ok(out) => format!("script rc {}", out.status),
            Err(HarnessError::Wedged { .. }) => records::CAUSE_WEDGE.into(),
            Err(HarnessError::Hung { .. }) => "hung (ours)".into(),
            Err(HarnessError::TestHostStuck { .. }) => "test host stuck".into(),
            Err(HarnessError::Timeout { .. }) => "timeout (ours)".into(),
            Err(HarnessError::NoExitMarker { .. }) => "test host died".into(),
            Err(HarnessError::UnexpectedGuestCrash { .. }) => "unexpected guest crash".into(),
            Err(e) => format!("harness error: {e}"),
        };
        records::record_run(&self.name, self.host, started.elapsed(), attempt, &label);
        result
    }

    fn run_direct(&self, script: &str, timeout: Duration) -> Result<ScriptOutput, HarnessError> {
        if !self.passthrough.is_empty() {
            return Err(HarnessError::PassthroughNeedsEmulatedHost);
        }
        let work =
            std::env::temp_dir().join(format!("ddvmm-test-{}-{}", self.name, std::process::id()));
        std::fs::create_dir_all(&work)
            .map_err(|e| HarnessError::Io(format!("mkdir {}", work.display()), e))?;
        for (name, contents, mode) in &self.files {
            let p = work.join(name);
            std::fs::write(&p, contents)
                .map_err(|e| HarnessError::Io(format!("write {}", p.display()), e))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode));
        }
        let bin = work.join("bin");
        std::fs::create_dir_all(&bin)
            .map_err(|e| HarnessError::Io(format!("mkdir {}", bin.display()), e))?;
        for (name, path) in &self.programs {
            let link = bin.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(path, &link)
                .map_err(|e| HarnessError::Io(format!("link {}", link.display()), e))?;
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let diag = work.join(".diag.sh");
        std::fs::write(&diag, DIAG_SCRIPT)
            .map_err(|e| HarnessError::Io(format!("write {}", diag.display()), e))?;
        // Its own network, mount and PID namespaces where `unshare` can make them: parallel
        // tests do not see each other's TAPs, bridges, `ip netns` names or VMM processes,
        // and killing the run (timeout) takes every process it started with it.
        let isolate = can_unshare();
        let mut cmd = if isolate {
            let mut c = Command::new("/usr/bin/unshare");
            c.args(["--net", "--mount", "--pid", "--fork", "--kill-child", "sh"]);
            c
        } else {
            Command::new("sh")
        };
        let netns = if isolate {
            "mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns && ip link set lo up\n"
        } else {
            ""
        };
        cmd.env("PATH", path)
            .arg("-c")
            .arg(format!("exec 2>&1\n{netns}{script}"))
            .current_dir(&work)
            .env("DDVMM", ddvmm_binary()?)
            .env("IMAGES", images_dir())
            .env("WORK", &work);
        for (i, d) in self.disks.iter().enumerate() {
            cmd.env(format!("DISK{i}"), d);
        }
        let watch = Watch::Direct {
            diag: &diag,
            work: &work,
        };
        let result = self.watched(cmd, timeout, &watch);
        // Failed or not: the output is in the log; the work folder (images) goes.
        let _ = std::fs::remove_dir_all(&work);
        let (output, status) = result?;
        Ok(ScriptOutput {
            output,
            status: status.unwrap_or(-1),
            host: HostKind::Direct,
        })
    }

    /// Runs `cmd` under this host's limits, logging to its log file.
    fn watched(
        &self,
        cmd: Command,
        timeout: Duration,
        watch: &Watch<'_>,
    ) -> Result<(String, Option<i32>), HarnessError> {
        run_with_timeout(
            cmd,
            timeout,
            self.quiet_limit,
            &self.log_path(),
            self.echo,
            watch,
        )
    }

    fn log_path(&self) -> PathBuf {
        records::logs_dir().join(format!("{}.log", self.name))
    }

    fn run_emulated(&self, script: &str, timeout: Duration) -> Result<ScriptOutput, HarnessError> {
        let kernel = image("vmlinuz")?;
        let base = image("testhost-base.cpio.gz")?;
        let binary = ddvmm_binary()?;

        let mut archive = cpio::Archive::new();
        let bin = std::fs::read(&binary)
            .map_err(|e| HarnessError::Io(format!("read {}", binary.display()), e))?;
        archive.file("bin/ddvmm", &bin, 0o755);
        let mut libs = BTreeSet::new();
        libs.extend(shared_libraries(&binary)?);
        for (name, path) in &self.programs {
            // Under /usr/bin so programs that find data relative to themselves
            // (QEMU: ../share/qemu) see the same layout as on this machine.
            archive.file(&format!("usr/bin/{name}"), &read(path)?, 0o755);
            libs.extend(shared_libraries(path)?);
        }
        for lib in libs {
            let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
            archive.file(&rel, &read(&lib)?, 0o755);
        }
        for (guest, host) in &self.host_files {
            archive.file(guest, &read(host)?, 0o644);
        }
        for (name, contents, mode) in &self.files {
            archive.file(&format!("work/{name}"), contents, *mode);
        }
        archive.file("work/.diag.sh", DIAG_SCRIPT.as_bytes(), 0o755);
        archive.file(
            "cmd.sh",
            format!(
                "export WORK=/work\n{}{}{}{}mkdir -p /work\ncd /work\nexec 2>&1\n{script}\n",
                heartbeat_lines(),
                // busybox sh runs its own applets before anything on PATH: a program copied
                // in under the name of an applet (`ip`) is reached through a function.
                self.programs
                    .iter()
                    .filter(|(n, _)| is_shell_name(n))
                    .map(|(n, _)| format!("{n}() {{ /usr/bin/{n} \"$@\"; }}\n"))
                    .collect::<String>(),
                (0..self.disks.len())
                    .map(|i| format!("export DISK{i}=/dev/nvme{i}n1\n"))
                    .collect::<String>(),
                (0..self.passthrough.len())
                    .map(|i| {
                        let a = passthrough_address(i);
                        format!("export PT{i}={a}\n{}", bind_vfio(&a))
                    })
                    .collect::<String>()
            )
            .as_bytes(),
            0o755,
        );
        let mut initrd = std::fs::read(&base)
            .map_err(|e| HarnessError::Io(format!("read {}", base.display()), e))?;
        // An appended uncompressed archive must start 4-byte aligned.
        initrd.resize(initrd.len().next_multiple_of(512), 0);
        initrd.extend_from_slice(&archive.finish());

        let dir = records::logs_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::Io(format!("mkdir {}", dir.display()), e))?;
        // Every file of a run is named after the test host: two runs of one name at once would
        // take each other's heartbeat socket and monitor (and read a healthy run as wedged).
        let lock_path = dir.join(format!("{}.lock", self.name));
        let lock = std::fs::File::create(&lock_path)
            .map_err(|e| HarnessError::Io(format!("create {}", lock_path.display()), e))?;
        // SAFETY: flock on a descriptor `lock` owns (held until `lock` drops at the end of the
        // run); no memory is involved.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(HarnessError::Io(
                format!(
                    "test host '{}' is already running here (its lock {} is held): runs of one name must not overlap",
                    self.name,
                    lock_path.display()
                ),
                std::io::Error::last_os_error(),
            ));
        }
        let initrd_path = dir.join(format!("{}.initrd", self.name));
        std::fs::write(&initrd_path, &initrd)
            .map_err(|e| HarnessError::Io(format!("write {}", initrd_path.display()), e))?;

        // DDVMM_QEMU: another QEMU for the test host (e.g. an unpacked newer build; it finds
        // its firmware relative to itself).
        let qemu = std::env::var_os("DDVMM_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC", "-M", "q35"])
            .args([
                "-smp",
                &self.cpus.to_string(),
                "-m",
                &self.memory_mib.to_string(),
            ])
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .args(["-nic", "none"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd_path);
        // The test host's own NVMe disks: the kernel's default 30 s I/O timeout is shorter
        // than an emulated command can take under load (seen: aborted commands, EIO passed to
        // a client's fio); 255 s is the largest value the parameter takes.
        let cmdline = "console=ttyS0 panic=-1 quiet nvme_core.io_timeout=255";
        if self.passthrough.is_empty() {
            cmd.arg("-append").arg(cmdline);
        } else {
            // The IOMMU before any other PCI device.
            cmd.args(["-device", "intel-iommu"])
                .arg("-append")
                .arg(format!("{cmdline} intel_iommu=on iommu=pt"));
        }
        for (i, d) in self.passthrough.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!("file={},if=none,id=pt{i},format=raw", d.display()))
                .arg("-device")
                .arg(format!(
                    "nvme,drive=pt{i},serial=ddvmm-pt{i},addr={:x}.0",
                    passthrough_slot(i)
                ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=disk{i},format=raw",
                    d.display()
                ))
                .arg("-device")
                .arg(format!("nvme,drive=disk{i},serial=ddvmm-disk{i}"));
        }
        let monitor = dir.join(format!("{}.monitor", self.name));
        let heartbeat = dir.join(format!("{}.heartbeat", self.name));
        let _ = std::fs::remove_file(&monitor);
        let _ = std::fs::remove_file(&heartbeat);
        cmd.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            // ttyS1: the heartbeat channel.
            .arg("-chardev")
            .arg(format!(
                "socket,id=hb,path={},server=on,wait=off",
                heartbeat.display()
            ))
            .args(["-serial", "chardev:hb"]);
        let watch = Watch::Emulated {
            heartbeat: &heartbeat,
            monitor: &monitor,
        };
        let result = self.watched(cmd, timeout, &watch);
        let _ = std::fs::remove_file(&monitor);
        let _ = std::fs::remove_file(&heartbeat);
        let _ = std::fs::remove_file(&initrd_path);
        let (output, qemu_status) = result?;
        match parse_exit_marker(&output) {
            Some(status) => Ok(ScriptOutput {
                output,
                status,
                host: HostKind::Emulated,
            }),
            None => Err(HarnessError::NoExitMarker {
                status: qemu_status,
                output,
            }),
        }
    }
}

/// Whether `unshare` can give a direct-mode run its own network, mount and PID namespaces here
/// (it exists and is allowed to); probed once.
fn can_unshare() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        Command::new("/usr/bin/unshare")
            .args([
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Slot of the `index`th passthrough device in the emulated test host (from 0x10, above those
/// QEMU assigns to the other devices, so they also enumerate last).
fn passthrough_slot(index: usize) -> usize {
    0x10 + index
}

/// Its PCI address there.
fn passthrough_address(index: usize) -> String {
    format!("0000:00:{:02x}.0", passthrough_slot(index))
}

/// Shell lines that hand the function at `addr` to vfio-pci (it starts bound to the test
/// host's own `nvme` driver).
fn bind_vfio(addr: &str) -> String {
    format!(
        "d=/sys/bus/pci/devices/{addr}\n\
         echo vfio-pci > $d/driver_override\n\
         [ -e $d/driver ] && echo {addr} > $d/driver/unbind\n\
         echo {addr} > /sys/bus/pci/drivers_probe\n"
    )
}

/// sha256 (hex) of the first `bytes` bytes of the file at `path` on this machine.
pub fn sha256_of_prefix(path: &Path, bytes: u64) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} '{}' | sha256sum | cut -d' ' -f1",
            path.display()
        ))
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The client guest image (fio, iperf3, virtio drivers) with `/script.sh` appended as an extra
/// cpio archive; boot it with `ddvmm.action=run-script`.
pub fn client_initrd_with_script(script: &str) -> Result<Vec<u8>, HarnessError> {
    client_initrd_with(script, &[])
}

/// [`client_initrd_with_script`] plus programs of this machine at `/usr/bin/<name>` (they
/// must need no library the client image lacks: it has glibc and libgcc from the same
/// Debian release as this machine).
pub fn client_initrd_with(
    script: &str,
    programs: &[(&str, &Path)],
) -> Result<Vec<u8>, HarnessError> {
    let mut initrd = read(&image("client-initramfs.cpio.gz")?)?;
    // An appended uncompressed archive must start 4-byte aligned.
    initrd.resize(initrd.len().next_multiple_of(512), 0);
    let mut a = cpio::Archive::new();
    a.file("script.sh", script.as_bytes(), 0o755);
    for (name, path) in programs {
        a.file(&format!("usr/bin/{name}"), &read(path)?, 0o755);
    }
    initrd.extend_from_slice(&a.finish());
    Ok(initrd)
}

/// The frame counter (`tests/src/bin/sniff.rs`), built with the workspace.
pub fn sniff_binary() -> Result<PathBuf, HarnessError> {
    exists(
        repo_root().join("target/release/sniff"),
        "sniff binary",
        "run `cargo build --release --workspace --all-targets` or `make test`",
    )
}

/// The driver-VM image (agent, uio_pci_generic, virtio drivers), built by `make driver-image`.
pub fn driver_initrd() -> Result<Vec<u8>, HarnessError> {
    read(&image("driver-initramfs.cpio.gz")?)
}

fn read(path: &Path) -> Result<Vec<u8>, HarnessError> {
    std::fs::read(path).map_err(|e| HarnessError::Io(format!("read {}", path.display()), e))
}

/// Substrings of guest kernel console lines that mean the guest saw an error: an I/O error
/// on a disk, an oops or BUG, a hung task, a lockup or RCU stall. A test whose guest prints
/// one fails, unless the test caused it on purpose.
pub const KERNEL_ERROR_SIGNS: [&str; 12] = [
    "I/O error",
    "critical medium error",
    "Buffer I/O",
    "Oops",
    "BUG:",
    "Call Trace",
    "blocked for more than",
    "hung_task",
    "Kernel panic",
    "general protection fault",
    "soft lockup",
    "rcu_sched detected stall",
];

/// Kernel warnings that the emulated test host causes in every nested guest, whatever the
/// VMM: QEMU's TCG does not intercept a nested guest's `XSETBV` for the test host's KVM, so
/// KVM never updates CPUID leaf 0xD's EBX to the guest's XCR0 and the guest's FPU init warns
/// (measured: the same warning with QEMU/KVM inside the test host booting the same kernel).
/// A warning block (`cut here` .. `end trace`) containing one of these is not an error.
pub const EMULATOR_KERNEL_WARNINGS: [&str; 1] = ["XSAVE consistency problem"];

/// The lines of `output` with a [`KERNEL_ERROR_SIGNS`] sign in them, except inside a
/// warning block caused by the emulator ([`EMULATOR_KERNEL_WARNINGS`]).
pub fn kernel_error_lines(output: &str) -> Vec<&str> {
    let mut errors = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let mut in_block = false;
    let is_error = |l: &str| KERNEL_ERROR_SIGNS.iter().any(|s| l.contains(s));
    for line in output.lines() {
        if line.contains("------------[ cut here ]------------") {
            in_block = true;
            block.clear();
            continue;
        }
        if in_block {
            block.push(line);
            if line.contains("---[ end trace") || block.len() > 200 {
                in_block = false;
                let emulator = block
                    .iter()
                    .any(|l| EMULATOR_KERNEL_WARNINGS.iter().any(|w| l.contains(w)));
                if !emulator {
                    errors.extend(block.iter().copied().filter(|l| is_error(l)));
                }
            }
            continue;
        }
        if is_error(line) {
            errors.push(line);
        }
    }
    if in_block {
        errors.extend(block.iter().copied().filter(|l| is_error(l)));
    }
    errors
}

/// Fails the test if a guest kernel printed an error line ([`KERNEL_ERROR_SIGNS`]).
pub fn assert_no_kernel_errors(output: &str) {
    let errors = kernel_error_lines(output);
    assert!(
        errors.is_empty(),
        "guest kernel error lines:\n{}\n\n{output}",
        errors.join("\n")
    );
}

/// Extracts `N` from the test host's `DDVMM-TESTHOST-EXIT rc=N` line.
pub fn parse_exit_marker(output: &str) -> Option<i32> {
    const MARKER: &str = "DDVMM-TESTHOST-EXIT rc=";
    let at = output.rfind(MARKER)? + MARKER.len();
    let digits: String = output[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// Shared libraries `binary` loads, from `ldd` (absolute paths, symlinks resolved by reading).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| HarnessError::Io("run ldd".into(), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// How a run is watched besides its output.
enum Watch<'a> {
    /// On this machine: diagnostics come from running the diagnostics script here.
    Direct {
        /// The script.
        diag: &'a Path,
        /// The run's `$WORK`.
        work: &'a Path,
    },
    /// In the emulated test host: its heartbeat socket (ttyS1) and QEMU's monitor.
    Emulated {
        /// The heartbeat channel (QEMU listens, we connect).
        heartbeat: &'a Path,
        /// The human monitor.
        monitor: &'a Path,
    },
}

/// The heartbeat channel's state, shared with the thread that reads it.
#[derive(Default)]
struct Heartbeat {
    /// When the first tick arrived.
    first: Option<Instant>,
    /// When the last tick arrived, and the test host's uptime it carried.
    last: Option<(Instant, String)>,
    /// The write half, for diagnostics requests (also: the channel is connected).
    writer: Option<std::os::unix::net::UnixStream>,
}

/// Connects to the test host's heartbeat socket (retrying while QEMU starts) and records
/// every tick until the socket closes.
fn watch_heartbeat(path: PathBuf, state: Arc<Mutex<Heartbeat>>) {
    use std::io::BufRead as _;
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return,
        }
    };
    lock(&state).writer = stream.try_clone().ok();
    let mut reader = std::io::BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(uptime) = text.trim().strip_prefix("DDVMM-HB ") {
            let mut st = lock(&state);
            let now = Instant::now();
            st.first.get_or_insert(now);
            st.last = Some((now, uptime.to_string()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `cmd`, capturing stdout+stderr, killing it after `timeout`. Also writes the output to
/// `log` as it arrives (a hung run can be watched from outside). Tells the emulator's wedge
/// (heartbeat stopped, vCPUs halted: [`HarnessError::Wedged`]) from our hang (silent for
/// `quiet_limit` with a live test host: [`HarnessError::Hung`], diagnostics appended).
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    quiet_limit: Duration,
    log: &Path,
    echo: bool,
    watch: &Watch<'_>,
) -> Result<(String, Option<i32>), HarnessError> {
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // A direct-mode script in its own process group, so that everything it started can be
    // killed with it (QEMU, the emulated mode's child, starts no processes; it stays in ours
    // and dies with a Ctrl-C of the suite).
    let direct = matches!(watch, Watch::Direct { .. });
    if direct {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError::Io(format!("spawn {:?}", cmd.get_program()), e))?;
    let buf = Arc::new(Mutex::new(Vec::new()));
    let last_output = Arc::new(Mutex::new(Instant::now()));
    let live_log = Arc::new(Mutex::new(std::fs::File::create(log).ok()));
    let mut readers = Vec::new();
    for mut stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let buf = buf.clone();
        let live_log = live_log.clone();
        let last_output = last_output.clone();
        readers.push(std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stream.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                if echo {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&chunk[..n]);
                    let _ = out.flush();
                }
                lock(&buf).extend_from_slice(&chunk[..n]);
                *lock(&last_output) = Instant::now();
                if let Some(f) = lock(&live_log).as_mut() {
                    use std::io::Write;
                    let _ = f.write_all(&chunk[..n]);
                }
            }
        }));
    }
    let heartbeat = Arc::new(Mutex::new(Heartbeat::default()));
    if let Watch::Emulated {
        heartbeat: path, ..
    } = watch
    {
        let (path, state) = (path.to_path_buf(), heartbeat.clone());
        std::thread::spawn(move || watch_heartbeat(path, state));
    }
    let start = Instant::now();
    // Ends the run: kills the child, joins the readers, returns everything printed.
    let finish = |child: &mut std::process::Child, readers: Vec<std::thread::JoinHandle<()>>| {
        // The whole process group: children that kept the output pipes open would otherwise
        // keep the readers (and this call) waiting.
        if let (true, Ok(pgid)) = (direct, i32::try_from(child.id())) {
            // SAFETY: kill(2) with a negative pid signals the process group the child leads
            // (direct mode spawns it with process_group(0)); no memory is passed.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
        for r in readers {
            let _ = r.join();
        }
        text(&buf)
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) => {}
            Err(e) => return Err(HarnessError::Io("wait for child".into(), e)),
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut quiet = lock(&last_output).elapsed();
        // The heartbeat's state, if the channel is up (emulated mode, connected). Without it
        // there is no evidence of a wedge, and silence is judged like any other.
        let beat = {
            let hb = lock(&heartbeat);
            hb.writer.as_ref().map(|_| (hb.first, hb.last.clone()))
        };
        // Silence counts as ours only while the test host is seen alive: from its first tick
        // on (not during its boot), and only if its last tick is recent.
        let mut host_alive = true;
        if let (Some((first, last)), Watch::Emulated { monitor, .. }) = (beat, watch) {
            let recent = Duration::from_secs(u64::from(HEARTBEAT_PERIOD_S) * 3 + 4);
            host_alive = last.as_ref().is_some_and(|(at, _)| at.elapsed() < recent);
            if let Some(first) = first {
                quiet = quiet.min(first.elapsed());
            }
            let (silent, last_uptime, limit) = match &last {
                Some((at, uptime)) => (at.elapsed(), uptime.as_str(), WEDGE_LIMIT),
                None => (start.elapsed(), "none yet", FIRST_HEARTBEAT_LIMIT),
            };
            if silent > limit {
                let snapshot = emulator_snapshot(child.id(), monitor);
                let evidence = format!(
                    "no test-host heartbeat for {} s (last at test-host uptime {last_uptime} s); \
                     output silent for {} s; {}",
                    silent.as_secs(),
                    quiet.as_secs(),
                    snapshot_summary(&snapshot)
                );
                let output = finish(&mut child, readers) + &snapshot;
                // The known wedge: the test host's CPUs halted for good. A CPU that still
                // runs while nothing is scheduled (a test-host kernel lockup, which our VMM's
                // use of KVM could cause) is not retried.
                return Err(if all_vcpus_halted(&snapshot) {
                    HarnessError::Wedged { evidence, output }
                } else {
                    HarnessError::TestHostStuck { evidence, output }
                });
            }
        }
        let timed_out = start.elapsed() > timeout;
        if timed_out || (host_alive && quiet > quiet_limit) {
            // Ours: the test host (or this machine) is alive. Diagnostics, then fail.
            let diag = diagnostics(watch, &heartbeat, &buf);
            let output = finish(&mut child, readers) + &diag;
            return Err(if timed_out {
                HarnessError::Timeout { timeout, output }
            } else {
                HarnessError::Hung { quiet, output }
            });
        }
    };
    for r in readers {
        let _ = r.join();
    }
    Ok((text(&buf), status))
}

/// Diagnostics of a live run: the test host prints them on its console when asked on the
/// heartbeat channel (we wait for them up to [`DIAG_LIMIT`]); direct mode runs the script here.
fn diagnostics(watch: &Watch<'_>, heartbeat: &Mutex<Heartbeat>, buf: &Mutex<Vec<u8>>) -> String {
    match watch {
        Watch::Direct { diag, work } => Command::new("timeout")
            .arg("60")
            .arg("sh")
            .arg(diag)
            .env("WORK", work)
            .env("DDVMM", ddvmm_binary().unwrap_or_default())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("diagnostics: {e}")),
        Watch::Emulated { .. } => {
            let asked = lock(heartbeat).writer.as_mut().map(|w| {
                use std::io::Write as _;
                w.write_all(b"diag\n")
            });
            if !matches!(asked, Some(Ok(()))) {
                return "\n=== harness: could not ask the test host for diagnostics\n".into();
            }
            let from = lock(buf).len();
            let start = Instant::now();
            while start.elapsed() < DIAG_LIMIT {
                if String::from_utf8_lossy(&lock(buf)[from..]).contains(DIAG_END) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // Already in the output (the console); nothing to append.
            String::new()
        }
    }
}

/// Whether every vCPU register dump in an emulator snapshot shows the CPU halted (`HLT=1`).
fn all_vcpus_halted(snapshot: &str) -> bool {
    snapshot.contains("HLT=1") && !snapshot.contains("HLT=0")
}

/// The evidence lines of an emulator snapshot: QEMU's vCPU states.
fn snapshot_summary(snapshot: &str) -> String {
    let cpus: Vec<&str> = snapshot
        .lines()
        .filter(|l| l.contains("CPU #"))
        .map(str::trim)
        .collect();
    let halted = if all_vcpus_halted(snapshot) {
        "every vCPU halted (HLT=1)"
    } else {
        "a vCPU not halted"
    };
    if cpus.is_empty() {
        format!("monitor gave no vCPU list; {halted}")
    } else {
        format!("QEMU: {}; {halted}", cpus.join(" | "))
    }
}

/// The lines showing that the test host's own kernel crashed, if its console ends with them.
fn test_host_kernel_crash(output: &str) -> Option<String> {
    const SIGNS: [&str; 4] = [
        "Kernel panic - not syncing",
        "stack guard page was hit",
        "corrupted stack end detected",
        "BUG: kernel NULL pointer",
    ];
    let lines: Vec<&str> = output.lines().collect();
    let tail = &lines[lines.len().saturating_sub(80)..];
    // The test host's own kernel lines start with its timestamp; guest lines echoed by a
    // script carry a prefix ("alpha (12 s): ...") and do not count.
    let found: Vec<&str> = tail
        .iter()
        .map(|l| l.trim_start_matches('\r'))
        .filter(|l| l.starts_with('['))
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(|l| l.trim())
        .collect();
    (!found.is_empty()).then(|| format!("test-host console: {}", found.join(" | ")))
}

/// The emulator's vCPU states (from its monitor) and its threads' CPU times, twice 5 s apart:
/// tells a guest that is spinning from one that is halted from an emulator that is stuck.
fn emulator_snapshot(pid: u32, monitor: &Path) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n=== harness: emulator snapshot at stall\n");
    for round in 0..2 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(5));
        }
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            // Fields after the command's closing parenthesis: state is 3rd, utime 14th, stime 15th.
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "thread {:?} {} state {} utime {} stime {}",
                t.file_name(),
                comm.trim(),
                rest.first().unwrap_or(&"?"),
                rest.get(11).unwrap_or(&"?"),
                rest.get(12).unwrap_or(&"?")
            );
        }
        match monitor_command(monitor, "info cpus\ninfo registers -a") {
            Ok(reply) => out.push_str(&reply),
            Err(e) => {
                let _ = writeln!(out, "monitor {}: {e}", monitor.display());
            }
        }
    }
    out
}

/// Sends `command` lines to the emulator's human monitor and returns what it printed within
/// a few seconds.
fn monitor_command(monitor: &Path, command: &str) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(monitor)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Whether `name` can name a shell function.
fn is_shell_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn text(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse msr vmx sse2\n";
    const AMD_SVM: &str = "processor\t: 0\nflags\t\t: fpu svm lm\n";
    const NO_VIRT: &str = "processor\t: 0\nflags\t\t: fpu vme de pse msr sse2 hypervisor\n";

    #[test]
    fn selection_logic() {
        assert!(kvm_runs_unmodified_guests(INTEL_VMX, true, false));
        assert!(kvm_runs_unmodified_guests(AMD_SVM, true, false));
        // kvm_pvm provides /dev/kvm without hardware virtualization.
        assert!(!kvm_runs_unmodified_guests(NO_VIRT, true, true));
        assert!(!kvm_runs_unmodified_guests(INTEL_VMX, true, true));
        assert!(!kvm_runs_unmodified_guests(NO_VIRT, true, false));
        assert!(!kvm_runs_unmodified_guests(AMD_SVM, false, false));
        // "vmx" inside another flag name does not count.
        assert!(!kvm_runs_unmodified_guests(
            "flags\t: vmxfoo\n",
            true,
            false
        ));
    }

    #[test]
    fn only_a_test_host_kernel_crash_at_the_end_counts_as_one() {
        let crashed = "boot\nrunning\n[  99.1] BUG: stack guard page was hit at 0000\n[  99.2] Kernel panic - not syncing: Fatal exception\n";
        let e = test_host_kernel_crash(crashed).expect("crash found");
        assert!(
            e.contains("stack guard page") && e.contains("Kernel panic"),
            "{e}"
        );
        // A guest's panic far back in the output, then a long run: not the test host's.
        let old = format!(
            "guest: Kernel panic - not syncing: test\n{}",
            "progress\n".repeat(200)
        );
        assert_eq!(test_host_kernel_crash(&old), None);
        assert_eq!(test_host_kernel_crash("all fine\n"), None);
    }

    #[test]
    fn kernel_errors_except_the_emulators_xsave_warning() {
        let boot = "[ 1.3] ------------[ cut here ]------------\n\
                    [ 1.3] XSAVE consistency problem: size 832 != kernel_size 576\n\
                    [ 1.3] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606\n\
                    [ 1.3] Call Trace:\n[ 1.3]  <TASK>\n[ 1.3] ---[ end trace 0 ]---\n\
                    [ 2.0] virtio_blk virtio1: [vda] 32768 512-byte logical blocks\n";
        assert!(kernel_error_lines(boot).is_empty());
        let other = boot.replace("XSAVE consistency problem", "refcount_t: underflow");
        assert_eq!(kernel_error_lines(&other), vec!["[ 1.3] Call Trace:"]);
        let io = format!("{boot}[ 9.1] I/O error, dev vda, sector 8 op 0x1:(WRITE)\n");
        assert_eq!(kernel_error_lines(&io).len(), 1);
    }

    #[test]
    fn wedge_evidence_names_the_vcpu_state() {
        let snap = "thread x\n* CPU #0: thread_id=123 (halted)\nRAX=0\n";
        assert_eq!(
            snapshot_summary(snap),
            "QEMU: * CPU #0: thread_id=123 (halted); a vCPU not halted"
        );
        let halted = "* CPU #0: thread_id=1\nEIP=0 CPL=0 II=0 A20=1 SMM=0 HLT=1\n";
        assert!(all_vcpus_halted(halted));
        assert!(!all_vcpus_halted(&format!(
            "{halted}CPL=0 II=0 A20=1 SMM=0 HLT=0\n"
        )));
        assert!(!all_vcpus_halted("nothing"));
        assert_eq!(
            snapshot_summary("nothing"),
            "monitor gave no vCPU list; a vCPU not halted"
        );
    }

    #[test]
    fn repo_root_is_this_checkout() {
        let root = repo_root();
        assert!(
            root.join("tests/src/lib.rs").is_file(),
            "{}",
            root.display()
        );
        assert!(root.join("Makefile").is_file(), "{}", root.display());
    }

    #[test]
    fn exit_marker() {
        assert_eq!(
            parse_exit_marker("x\r\nDDVMM-TESTHOST-EXIT rc=3\r\n"),
            Some(3)
        );
        assert_eq!(parse_exit_marker("DDVMM-TESTHOST-EXIT rc=0"), Some(0));
        assert_eq!(parse_exit_marker("DDVMM-TESTHOST-EXIT rc=\n"), None);
        assert_eq!(parse_exit_marker("nothing"), None);
    }
}
