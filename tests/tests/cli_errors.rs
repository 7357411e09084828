//! Bad input to `ddvmm run` gets one line naming the problem and exit status 1 (2 for usage
//! errors), never a panic. These need no guest, so they run directly on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use ddvmm_tests::{ddvmm_binary, image};

struct Outcome {
    status: i32,
    stderr: String,
}

fn ddvmm(args: &[&str]) -> Outcome {
    let out = Command::new(ddvmm_binary().expect("ddvmm binary"))
        .args(args)
        .output()
        .expect("run ddvmm");
    Outcome {
        status: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a one-line error containing `needle` and exit status 1.
fn assert_error(o: &Outcome, needle: &str) {
    assert_eq!(o.status, 1, "stderr: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {}", o.stderr);
    assert!(lines[0].starts_with("ddvmm: error: "), "{}", o.stderr);
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {}",
        o.stderr
    );
}

fn kernel() -> PathBuf {
    image("vmlinuz").expect("guest kernel")
}

fn initrd() -> PathBuf {
    image("guest-initramfs.cpio.gz").expect("guest initrd")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn missing_kernel() {
    let o = ddvmm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_error(
        &o,
        "cannot read kernel image /nonexistent/vmlinuz: No such file or directory",
    );
}

#[test]
fn missing_initrd() {
    let k = kernel();
    let o = ddvmm(&["run", "--kernel", s(&k), "--initrd", "/nonexistent/initrd"]);
    assert_error(&o, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn not_a_bzimage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 64 * 1024]).expect("write");
    let o = ddvmm(&["run", "--kernel", s(&junk)]);
    assert_error(&o, "not a bzImage: no 'HdrS' Linux boot header");
    // An ELF binary is not a bzImage either.
    let o = ddvmm(&["run", "--kernel", "/bin/sh"]);
    assert_error(&o, "not a bzImage");
    // Nor is an empty file.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    let o = ddvmm(&["run", "--kernel", s(&empty)]);
    assert_error(&o, "not a bzImage: file is only 0 bytes");
}

#[test]
fn kernel_too_old_for_64bit_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("old-vmlinuz");
    let mut img = std::fs::read(kernel()).expect("read kernel");
    // Rewrite the boot protocol version (offset 0x206) to 2.04, as a 2.6.14-era kernel has.
    img[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
    std::fs::write(&old, img).expect("write");
    let o = ddvmm(&["run", "--kernel", s(&old)]);
    assert_error(
        &o,
        "boot protocol 2.04, too old: the 64-bit entry needs >= 2.12",
    );
}

#[test]
fn memory_too_small() {
    let (k, i) = (kernel(), initrd());
    let o = ddvmm(&["run", "--kernel", s(&k), "--initrd", s(&i), "--mem", "24M"]);
    assert_error(&o, "memory too small: 24 MiB given");
}

#[test]
fn malformed_sizes_and_counts() {
    let k = kernel();
    let o = ddvmm(&["run", "--kernel", s(&k), "--mem", "12X"]);
    assert_error(&o, "invalid size '12X'");
    let o = ddvmm(&["run", "--kernel", s(&k), "--cpus", "0"]);
    assert_error(&o, "at least one vCPU");
}

#[test]
fn more_vcpus_than_kvm_allows() {
    let k = kernel();
    let o = ddvmm(&["run", "--kernel", s(&k), "--cpus", "100000"]);
    assert_error(&o, "100000 vCPUs requested, at most");
    assert_error(&o, "KVM allows");
}

#[test]
fn kvm_device_missing_or_wrong() {
    let k = kernel();
    let o = ddvmm(&["run", "--kernel", s(&k), "--kvm-device", "/nonexistent/kvm"]);
    assert_error(
        &o,
        "cannot open /nonexistent/kvm: No such file or directory",
    );
    let o = ddvmm(&["run", "--kernel", s(&k), "--kvm-device", "/dev/null"]);
    assert_error(&o, "/dev/null is not a usable KVM device");
}

#[test]
fn kvm_device_without_permission() {
    // A private KVM device node (char 10:232) that only root may open, used by an unprivileged
    // user: the same situation as a user outside the `kvm` group.
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("kvm");
    let made = Command::new("mknod")
        .args(["-m", "0600", s(&node), "c", "10", "232"])
        .status()
        .expect("run mknod");
    assert!(
        made.success(),
        "mknod needs root (tests run as root here and in CI)"
    );
    // Let the unprivileged user reach the node and the files.
    let _ = Command::new("chmod").args(["0755", s(dir.path())]).status();
    let k = kernel();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ddvmm_binary().expect("binary"))
        .args(["run", "--kernel", s(&k), "--kvm-device", s(&node)])
        .output()
        .expect("run setpriv");
    let o = Outcome {
        status: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_error(&o, "Permission denied");
}

#[test]
fn usage_errors_exit_2() {
    let o = ddvmm(&["run", "--no-such-flag"]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    let o = ddvmm(&["run"]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--kernel"), "{}", o.stderr);
}

#[test]
fn passthrough_errors_name_the_problem() {
    let k = kernel();
    let o = ddvmm(&["run", "--kernel", s(&k), "--vfio", "00:04"]);
    assert_error(&o, "--vfio 00:04: invalid PCI address \"00:04\"");
    let o = ddvmm(&["run", "--kernel", s(&k), "--vfio", "0000:7f:1f.7"]);
    assert_error(
        &o,
        "passthrough of 0000:7f:1f.7: PCI device 0000:7f:1f.7 not found on this host",
    );
    // A host without an IOMMU (these machines): a function that exists has no IOMMU group.
    let groups = std::fs::read_dir("/sys/kernel/iommu_groups").map_or(0, |d| d.count());
    let function = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    match function {
        Some(f) if groups == 0 => {
            let o = ddvmm(&["run", "--kernel", s(&k), "--vfio", &f]);
            assert_error(
                &o,
                &format!("no IOMMU for PCI device {f}: it has no IOMMU group"),
            );
        }
        _ => eprintln!("this host has an IOMMU or no PCI bus: no-IOMMU case not checked here"),
    }
}

#[test]
fn ring_nic_and_channel_specs_name_the_problem() {
    let k = kernel();
    let o = ddvmm(&[
        "run",
        "--kernel",
        s(&k),
        "--ring-net",
        "mem=3,kick=4,doorbell=5,mac=52:54:00:zz:00:01",
    ]);
    assert_error(
        &o,
        "--ring-net mem=3,kick=4,doorbell=5,mac=52:54:00:zz:00:01: bad mac=",
    );
    let o = ddvmm(&["run", "--kernel", s(&k), "--ring-net", "mem=3,kick=4"]);
    assert_error(&o, "missing mac=");
    let o = ddvmm(&[
        "run",
        "--kernel",
        s(&k),
        "--channel",
        "mem=3,kick=4,doorbell=5,backend=eth0,mac=1:2",
    ]);
    assert_error(&o, "bad mac=1:2");
}

#[test]
fn restore_from_a_missing_snapshot() {
    let o = ddvmm(&[
        "run",
        "--kernel",
        s(&kernel()),
        "--restore",
        "/nonexistent/snapshot",
    ]);
    assert_error(
        &o,
        "snapshot /nonexistent/snapshot/state: cannot open: No such file or directory",
    );
}

#[test]
fn restore_from_a_damaged_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("state"),
        b"ddvmm-snapshot 1 00000000 3\n{}\n",
    )
    .expect("w");
    let o = ddvmm(&["run", "--kernel", s(&kernel()), "--restore", s(dir.path())]);
    assert_error(&o, "is corrupt: checksum");
}

#[test]
fn snapshot_and_restore_together_are_a_usage_error() {
    let o = ddvmm(&[
        "run",
        "--kernel",
        s(&kernel()),
        "--snapshot-to",
        "/tmp/a",
        "--restore",
        "/tmp/b",
    ]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
}

#[test]
fn a_standby_needs_a_snapshot_and_a_control_connection() {
    let o = ddvmm(&["run", "--kernel", s(&kernel()), "--standby"]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--restore"), "{}", o.stderr);
    let o = ddvmm(&[
        "run",
        "--kernel",
        s(&kernel()),
        "--restore",
        "/tmp/b",
        "--standby",
    ]);
    assert_eq!(o.status, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--control-fd"), "{}", o.stderr);
}

#[test]
fn bad_disk_options_are_named() {
    let k = kernel();
    for (spec, needle) in [
        (
            "/tmp/d.img,iops=0",
            "--disk /tmp/d.img,iops=0: 'iops=0' needs a positive number",
        ),
        ("/tmp/d.img,bps=x", "'bps=x' needs a positive number"),
        (
            "/tmp/d.img,fast",
            "unknown option 'fast' (expected ro, rw, iops=N or bps=N)",
        ),
        (",ro", "empty path"),
    ] {
        let o = ddvmm(&["run", "--kernel", s(&k), "--disk", spec]);
        assert_error(&o, needle);
    }
}
