//! `testhost`: runs a shell script where this machine can run Linux guests under KVM (directly,
//! or inside the emulated test host), with `$DDVMM` and `$IMAGES` set. Exits with the script's
//! status. Used by `make demo` and `make bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ddvmm_tests::TestHost;

#[derive(Parser, Debug)]
#[command(about = "Run a script on the KVM test host")]
struct Args {
    /// Stream output as it arrives instead of printing it at the end.
    #[arg(long)]
    echo: bool,
    /// Kill the run after this many seconds (a hang guard, not a measurement).
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Test-host memory in MiB (emulated mode).
    #[arg(long, default_value_t = 3072)]
    memory_mib: u32,
    /// A program of this machine to put on the script's PATH, as NAME=PATH (repeatable).
    #[arg(long = "program", value_name = "NAME=PATH")]
    programs: Vec<String>,
    /// A file of this machine to copy to the same path in the emulated test host (repeatable).
    #[arg(long = "host-file", value_name = "PATH")]
    host_files: Vec<PathBuf>,
    /// A script for the benchmark guest: appended to the client image as `/script.sh` and
    /// made available to the host script as `$WORK/guest.img`. Repeatable: the scripts run
    /// one after the other.
    #[arg(long = "guest-script", value_name = "PATH")]
    guest_scripts: Vec<PathBuf>,
    /// Also provide the driver-VM image (`make driver-image`) as `$WORK/driver.img`.
    #[arg(long)]
    driver_image: bool,
    /// A file of this machine to give the script as an NVMe controller bound to vfio-pci in
    /// the emulated test host, `$PT0`, `$PT1`, ... (repeatable).
    #[arg(long = "passthrough-disk", value_name = "PATH")]
    passthrough_disks: Vec<PathBuf>,
    /// A file of this machine to give the script as a block device, `$DISK0`, `$DISK1`, ...
    /// (an NVMe namespace in the emulated test host; repeatable).
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    /// A shell file to put before the script (functions it shares with other scripts;
    /// repeatable).
    #[arg(long = "lib", value_name = "PATH")]
    libs: Vec<PathBuf>,
    /// A variable for the script, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The script to run.
    script: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut exports = String::new();
    for e in &args.env {
        match e.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                exports.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
            }
            _ => {
                eprintln!("testhost: --env wants NAME=VALUE, got {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut script = exports;
    for path in args.libs.iter().chain([&args.script]) {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                script.push_str(&s);
                script.push('\n');
            }
            Err(e) => {
                eprintln!("testhost: cannot read {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    let name = args
        .script
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "script".into());
    let mut host = match TestHost::new(&name) {
        Ok(h) => h.echo(args.echo).memory_mib(args.memory_mib),
        Err(e) => {
            eprintln!("testhost: {e}");
            return ExitCode::from(1);
        }
    };
    for p in &args.programs {
        let Some((name, path)) = p.split_once('=') else {
            eprintln!("testhost: --program wants NAME=PATH, got {p}");
            return ExitCode::from(2);
        };
        host = host.program(name, path);
    }
    for f in &args.host_files {
        host = host.host_file(f.clone());
    }
    for d in &args.passthrough_disks {
        host = host.passthrough_disk(d.clone());
    }
    for d in &args.disks {
        host = host.disk(d.clone());
    }
    if !args.guest_scripts.is_empty() {
        let mut script = String::new();
        for path in &args.guest_scripts {
            match std::fs::read_to_string(path) {
                Ok(s) => {
                    script.push_str(&s);
                    script.push('\n');
                }
                Err(e) => {
                    eprintln!("testhost: guest script {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
        }
        match ddvmm_tests::client_initrd_with_script(&script) {
            Ok(img) => host = host.file("guest.img", img, 0o644),
            Err(e) => {
                eprintln!("testhost: guest image: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if args.driver_image {
        match ddvmm_tests::driver_initrd() {
            Ok(img) => host = host.file("driver.img", img, 0o644),
            Err(e) => {
                eprintln!("testhost: {e}");
                return ExitCode::from(1);
            }
        }
    }
    eprintln!(
        "testhost: running {} ({:?} host)",
        args.script.display(),
        host.kind()
    );
    match host.run(&script, Duration::from_secs(args.timeout)) {
        Ok(out) => {
            if !args.echo {
                print!("{}", out.output);
            }
            ExitCode::from(u8::try_from(out.status).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("testhost: {e}");
            ExitCode::from(1)
        }
    }
}
