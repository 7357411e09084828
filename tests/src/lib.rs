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
    /// Nothing was printed for too long: the run is hung.
    #[error("no output for {quiet:?}; output so far:\n{output}")]
    Stalled {
        /// How long it was silent.
        quiet: Duration,
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

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
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
}

/// What `ddvmm` prints when a guest triple-faults or KVM reports an internal error.
const GUEST_CRASH_MARK: &str = "guest crashed on vCPU";

/// A run that prints nothing for this long is hung. Guests here print continuously while
/// booting, and scripts that run long silent jobs print progress.
const QUIET_LIMIT: Duration = Duration::from_secs(300);

/// Runs of one script in the emulated test host before an emulator failure is reported.
pub const EMULATED_ATTEMPTS: u32 = 4;

/// Serializes emulated runs inside one test process: two TCG machines on a 2-core box only
/// slow each other down.
static EMULATOR: Mutex<()> = Mutex::new(());

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
    /// In emulated mode a run whose *test host* fails is retried, up to [`EMULATED_ATTEMPTS`]
    /// runs in all: one that stalls completely (no output for [`QUIET_LIMIT`]) or whose
    /// test-host kernel dies before the script's exit marker. Both come from the emulator's
    /// nested SVM, not from the code under test: the test host's own KVM takes a page fault
    /// inside `__svm_vcpu_run` (right after `VMRUN`) and recurses into its stack guard
    /// ("stack guard page was hit" / "corrupted stack end detected inside scheduler"), more
    /// often the more VMs run at once (seen in about a third of three-VM runs). The stall, as
    /// recorded by [`emulator_snapshot`] (kept with the failed output): the test host's only CPU
    /// sits in its idle loop, halted with interrupts enabled, its QEMU thread asleep, and
    /// nothing wakes it, not even an NMI sent through the monitor (tried every 75 s, no effect;
    /// QEMU 10.0 from bookworm-backports stalls the same way). A guest or VMM failure cannot
    /// cause either: the test host's `/init` always prints the marker.
    /// Likewise a run in which a guest *crashed* (triple fault, reported by `ddvmm`) unless the
    /// test expects one ([`Self::expect_guest_crash`]): once in CI a stock guest triple-faulted
    /// under fio in the emulator, in a test that passes in every other run. Each failed output
    /// is kept in `target/testhost-logs/<name>.failed-host[-N].log` and reported on stderr, so a
    /// persistent problem still fails the test.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<ScriptOutput, HarnessError> {
        if self.host == HostKind::Direct {
            return self.run_direct(script, timeout);
        }
        let mut attempt = 1;
        loop {
            let result = self.run_emulated(script, timeout);
            let why = match &result {
                Err(HarnessError::Stalled { quiet, output }) => {
                    Some((format!("stalled (no output for {quiet:?})"), output.clone()))
                }
                Err(HarnessError::NoExitMarker { output, .. }) => Some((
                    "died before reporting (test-host kernel crash)".to_string(),
                    output.clone(),
                )),
                Ok(out) if !self.expect_guest_crash && out.output.contains(GUEST_CRASH_MARK) => {
                    Some((
                        "ran a guest that crashed unexpectedly".to_string(),
                        out.output.clone(),
                    ))
                }
                _ => None,
            };
            let Some((why, output)) = why.filter(|_| attempt < EMULATED_ATTEMPTS) else {
                return result;
            };
            let suffix = if attempt == 1 {
                String::new()
            } else {
                format!("-{attempt}")
            };
            let kept = self
                .log_path()
                .with_extension(format!("failed-host{suffix}.log"));
            let _ = std::fs::write(&kept, output);
            eprintln!(
                "testhost: {}: the emulated host {why}; retrying ({}/{EMULATED_ATTEMPTS}), see {}",
                self.name,
                attempt + 1,
                kept.display()
            );
            attempt += 1;
        }
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
        let mut cmd = Command::new("sh");
        cmd.env("PATH", path)
            .arg("-c")
            .arg(format!("exec 2>&1\n{script}"))
            .current_dir(&work)
            .env("DDVMM", ddvmm_binary()?)
            .env("IMAGES", images_dir())
            .env("WORK", &work);
        for (i, d) in self.disks.iter().enumerate() {
            cmd.env(format!("DISK{i}"), d);
        }
        let (output, status) = run_with_timeout(cmd, timeout, &self.log_path(), self.echo, None)?;
        let _ = std::fs::remove_dir_all(&work);
        Ok(ScriptOutput {
            output,
            status: status.unwrap_or(-1),
            host: HostKind::Direct,
        })
    }

    fn log_path(&self) -> PathBuf {
        repo_root()
            .join("target/testhost-logs")
            .join(format!("{}.log", self.name))
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
        archive.file(
            "cmd.sh",
            format!(
                "export WORK=/work\n{}{}{}mkdir -p /work\ncd /work\nexec 2>&1\n{script}\n",
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

        let dir = repo_root().join("target/testhost-logs");
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::Io(format!("mkdir {}", dir.display()), e))?;
        let initrd_path = dir.join(format!("{}.initrd", self.name));
        std::fs::write(&initrd_path, &initrd)
            .map_err(|e| HarnessError::Io(format!("write {}", initrd_path.display()), e))?;

        let mut cmd = Command::new("qemu-system-x86_64");
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
        if self.passthrough.is_empty() {
            cmd.args(["-append", "console=ttyS0 panic=-1 quiet"]);
        } else {
            // The IOMMU before any other PCI device.
            cmd.args(["-device", "intel-iommu"]).args([
                "-append",
                "console=ttyS0 panic=-1 quiet intel_iommu=on iommu=pt",
            ]);
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
        let _guard = EMULATOR.lock().unwrap_or_else(|p| p.into_inner());
        let monitor = dir.join(format!("{}.monitor", self.name));
        let _ = std::fs::remove_file(&monitor);
        cmd.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        let result = run_with_timeout(cmd, timeout, &self.log_path(), self.echo, Some(&monitor));
        let _ = std::fs::remove_file(&monitor);
        let (output, qemu_status) = result?;
        let _ = std::fs::remove_file(&initrd_path);
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
    let mut initrd = read(&image("client-initramfs.cpio.gz")?)?;
    // An appended uncompressed archive must start 4-byte aligned.
    initrd.resize(initrd.len().next_multiple_of(512), 0);
    let mut a = cpio::Archive::new();
    a.file("script.sh", script.as_bytes(), 0o755);
    initrd.extend_from_slice(&a.finish());
    Ok(initrd)
}

/// The driver-VM image (agent, uio_pci_generic, virtio drivers), built by `make driver-image`.
pub fn driver_initrd() -> Result<Vec<u8>, HarnessError> {
    read(&image("driver-initramfs.cpio.gz")?)
}

fn read(path: &Path) -> Result<Vec<u8>, HarnessError> {
    std::fs::read(path).map_err(|e| HarnessError::Io(format!("read {}", path.display()), e))
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

/// Runs `cmd`, capturing stdout+stderr, killing it after `timeout`. Also writes the output to
/// `log` for post-mortem reading.
fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    log: &Path,
    echo: bool,
    monitor: Option<&Path>,
) -> Result<(String, Option<i32>), HarnessError> {
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError::Io(format!("spawn {:?}", cmd.get_program()), e))?;
    let buf = Arc::new(Mutex::new(Vec::new()));
    let last_output = Arc::new(Mutex::new(Instant::now()));
    // The log is written as output arrives, so a hung run can be watched from outside.
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
                buf.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]);
                *last_output.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                if let Some(f) = live_log.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    use std::io::Write;
                    let _ = f.write_all(&chunk[..n]);
                }
            }
        }));
    }
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                let output = text(&buf);
                return Err(HarnessError::Timeout { timeout, output });
            }
            Ok(None) => {
                let quiet = last_output
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed();
                if quiet > QUIET_LIMIT {
                    // What the emulator was doing, for the kept log of the failed host.
                    let snapshot = monitor
                        .map(|m| emulator_snapshot(child.id(), m))
                        .unwrap_or_default();
                    let _ = child.kill();
                    let _ = child.wait();
                    for r in readers {
                        let _ = r.join();
                    }
                    return Err(HarnessError::Stalled {
                        quiet,
                        output: text(&buf) + &snapshot,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(HarnessError::Io("wait for child".into(), e)),
        }
    };
    for r in readers {
        let _ = r.join();
    }
    Ok((text(&buf), status))
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
    fn this_machine_is_classified() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        if pvm {
            assert!(!kvm_runs_unmodified_guests(&cpuinfo, true, pvm));
        }
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
