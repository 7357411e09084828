//! VFIO passthrough end to end, in the emulated test host (which has an emulated Intel IOMMU
//! and an NVMe controller whose namespace is a file on *this* machine):
//! - a stock guest given the controller finds it with its built-in `nvme` driver, writes a
//!   pattern and runs `fio --verify=crc32c` with no error; the pattern is in the file here;
//! - a VM killed with SIGKILL in the middle of heavy I/O leaves the device usable: the next VM
//!   gets a reset function, its fio verify passes, and the earlier pattern is intact;
//! - bad host-side inputs (absent function, function bound to a host driver, group already
//!   held by another VMM) fail with a message naming the problem.

use std::time::Duration;

use ddvmm_tests::system::backing_file;
use ddvmm_tests::{client_initrd_with_script, sha256_of_prefix, TestHost};

const TIMEOUT: Duration = Duration::from_secs(1500);
const PATTERN_MIB: u64 = 8;

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

/// fio verify on the passed-through namespace, away from the pattern at its start.
const FIO_VERIFY: &str = "fio --name=pt --filename=$DEV --direct=1 --ioengine=libaio \
--rw=randrw --bs=4k --iodepth=16 --offset=32m --size=64m --io_size=24m --verify=crc32c \
--verify_fatal=1 --randseed=$RANDOM --output-format=terse --terse-version=3 > /tmp/fio.out; \
rc=$?; echo \"FIO-RC $rc\"; echo \"FIO-ERRORS $(cut -d';' -f5 /tmp/fio.out)\"";

fn guest_script(body: &str) -> String {
    format!(
        r#"set -e
DEV=$(ls /dev/nvme*n1 | head -1)
echo "GUEST-NVME $DEV $(cat /sys/class/nvme/nvme0/model 2>/dev/null | tr -d ' ')"
{body}
"#
    )
}

#[test]
fn passed_through_nvme_runs_fio_verify_and_survives_sigkill() {
    if !TestHost::new("passthrough")
        .expect("host")
        .has_passthrough_devices()
    {
        return;
    }
    let disk = backing_file("passthrough.img", 128);
    let small = backing_file("passthrough-hostdisk.img", 8);
    let write = guest_script(&format!(
        r#"dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} 2>/dev/null
echo "GUEST-SHA256 $(sha256sum /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null
set +e
{FIO_VERIFY}
"#
    ));
    // Heavy random writes until killed, after the pattern.
    let heavy = guest_script(
        "echo HEAVY-IO-START\n\
         fio --name=heavy --filename=$DEV --direct=1 --ioengine=libaio --rw=randwrite \
         --bs=64k --iodepth=32 --offset=32m --size=64m --time_based --runtime=600 \
         --output=/dev/null",
    );
    let verify = guest_script(&format!(
        r#"echo "GUEST-READBACK $(head -c {} $DEV | sha256sum | cut -d' ' -f1)"
set +e
{FIO_VERIFY}
"#,
        PATTERN_MIB << 20
    ));
    let host = TestHost::new("passthrough")
        .expect("test host")
        .passthrough_disk(&disk)
        .disk(&small)
        .file(
            "write.img",
            client_initrd_with_script(&write).expect("image"),
            0o644,
        )
        .file(
            "heavy.img",
            client_initrd_with_script(&heavy).expect("image"),
            0o644,
        )
        .file(
            "verify.img",
            client_initrd_with_script(&verify).expect("image"),
            0o644,
        );
    let script = r#"
run() { img=$1; shift; $DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd $img \
  --mem 512M --cpus 1 --vfio $PT0 --cmdline "console=ttyS0 ddvmm.action=run-script" "$@"; }
echo "PT0-DRIVER $(basename $(readlink /sys/bus/pci/devices/$PT0/driver))"

# Bad inputs, each one line on stderr and exit status 1.
bad() { label=$1; shift; $DDVMM run --kernel $IMAGES/vmlinuz "$@" 2>/tmp/err; rc=$?; echo "BAD-$label rc=$rc $(cat /tmp/err)"; }
bad ABSENT --vfio 0000:00:1e.0
HOSTNVME=$(basename $(readlink -f /sys/block/nvme0n1/device/device))
bad BOUND --vfio $HOSTNVME

echo "=== write + verify"
run write.img
echo "VMM1-RC=$?"

echo "=== heavy I/O, then SIGKILL"
$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd heavy.img --mem 512M --cpus 1 \
  --vfio $PT0 --cmdline "console=ttyS0 ddvmm.action=run-script" --console /tmp/heavy.log \
  2>/tmp/heavy.err &
pid=$!
i=0
while ! grep -q HEAVY-IO-START /tmp/heavy.log 2>/dev/null && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done
sleep 10
bad BUSY --vfio $PT0
kill -9 $pid
wait $pid
echo "VMM2-RC=$?"
grep -a -m1 GUEST-NVME /tmp/heavy.log

echo "=== after the kill: verify"
run verify.img
echo "VMM3-RC=$?"
"#;
    let out = host.run(script, TIMEOUT).expect("test host run");
    let o = &out.output;
    assert_eq!(out.status, 0, "{o}");
    assert_eq!(field(o, "PT0-DRIVER"), "vfio-pci", "{o}");

    // Bad inputs.
    assert!(
        o.contains("BAD-ABSENT rc=1 ddvmm: error: passthrough of 0000:00:1e.0: PCI device 0000:00:1e.0 not found on this host"),
        "{o}"
    );
    let bound = field(o, "BAD-BOUND");
    assert!(
        bound.starts_with("rc=1 ddvmm: error: passthrough of ")
            && bound.contains("is bound to nvme, not vfio-pci"),
        "{o}"
    );
    let busy = field(o, "BAD-BUSY");
    assert!(
        busy.starts_with("rc=1 ddvmm: error: passthrough of 0000:00:10.0: IOMMU group")
            && busy.contains("is already in use by another process"),
        "{o}"
    );

    // Run 1: the stock nvme driver found the controller; fio verify clean; pattern on disk.
    assert!(o.contains("VMM1-RC=0"), "{o}");
    assert!(o.contains("GUEST-NVME /dev/nvme0n1"), "{o}");
    let runs: Vec<&str> = o.split("=== ").collect();
    let run1 = runs.iter().find(|r| r.starts_with("write")).expect("run 1");
    assert_eq!(field(run1, "FIO-RC"), "0", "{o}");
    assert_eq!(field(run1, "FIO-ERRORS"), "0", "{o}");
    let sum = field(run1, "GUEST-SHA256").to_string();
    assert_eq!(sum.len(), 64);

    // Run 2 was killed mid-I/O; run 3 got a reset, working device.
    let run2 = runs.iter().find(|r| r.starts_with("heavy")).expect("run 2");
    assert!(run2.contains("VMM2-RC=137"), "{o}");
    assert!(run2.contains("GUEST-NVME /dev/nvme0n1"), "{o}");
    let run3 = runs
        .iter()
        .find(|r| r.starts_with("after the kill"))
        .expect("run 3");
    assert!(run3.contains("VMM3-RC=0"), "{o}");
    assert_eq!(field(run3, "FIO-RC"), "0", "{o}");
    assert_eq!(field(run3, "FIO-ERRORS"), "0", "{o}");
    assert_eq!(field(run3, "GUEST-READBACK"), sum, "pattern lost: {o}");
    assert!(run3.contains("function reset"), "{o}");

    // The pattern the guest wrote is in the backing file on this machine.
    assert_eq!(sha256_of_prefix(&disk, PATTERN_MIB << 20), sum);
}
