//! End-to-end virtio-blk: a stock guest writes through Linux's own virtio-blk driver to a disk
//! whose backing file lives on *this* machine (in emulated mode it reaches the test host as an
//! NVMe namespace), and the test checks the bytes in that file.

use std::path::Path;
use std::time::Duration;

use ddvmm_tests::system::backing_file;
use ddvmm_tests::{
    assert_no_kernel_errors, client_initrd_with_script, sha256_of_prefix, ScriptOutput, TestHost,
};

const TIMEOUT: Duration = Duration::from_secs(900);
/// Bytes the guest writes.
const PATTERN_MIB: u64 = 16;

fn guest_initrd(script: &str) -> Vec<u8> {
    client_initrd_with_script(script).expect("client image with script")
}

/// Boots the client image with `disk_arg` as its virtio disk and runs `guest_script` in it.
fn run_guest(name: &str, disk: &Path, disk_opts: &str, guest_script: &str) -> ScriptOutput {
    let host = TestHost::new(name).expect("test host").disk(disk).file(
        "guest.img",
        guest_initrd(guest_script),
        0o644,
    );
    let script = format!(
        r#"$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd guest.img --mem 512M \
  --cpus 2 --disk "$DISK0{disk_opts}" --cmdline "console=ttyS0 ddvmm.action=run-script"
echo "VMM-RC=$?"
"#
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        out.output.contains("VMM-RC=0"),
        "VMM did not power off cleanly:\n{}",
        out.output
    );
    assert_no_kernel_errors(&out.output);
    out
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn guest_writes_reach_the_backing_file_and_read_back() {
    let disk = backing_file("blk-pattern.img", 64);
    // A marked range the guest will discard: it must read back as zeroes afterwards.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open");
        f.write_all_at(&vec![0xab; 1 << 20], 32 << 20)
            .expect("mark");
    }
    let write = format!(
        r#"set -e
dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} 2>/dev/null
echo "GUEST-SHA256 $(sha256sum /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/vda bs=1M oflag=direct conv=fsync 2>&1 | tail -1
sync
echo "GUEST-RO $(cat /sys/block/vda/ro)"
blkdiscard -o $((32 << 20)) -l $((1 << 20)) /dev/vda
echo "DISCARD-RC $?"
"#
    );
    let out = run_guest("blk-write", &disk, "", &write);
    assert_eq!(field(&out.output, "DISCARD-RC"), "0", "{}", out.output);
    {
        use std::os::unix::fs::FileExt;
        let mut back = vec![0xffu8; 1 << 20];
        let f = std::fs::File::open(&disk).expect("open");
        f.read_exact_at(&mut back, 32 << 20).expect("read");
        assert!(
            back.iter().all(|b| *b == 0),
            "discarded range still holds data"
        );
    }
    assert!(
        out.output.contains("DDVMM-GUEST-SCRIPT-EXIT rc=0"),
        "{}",
        out.output
    );
    assert_eq!(field(&out.output, "GUEST-RO"), "0");
    let guest_sum = field(&out.output, "GUEST-SHA256").to_string();
    assert_eq!(guest_sum.len(), 64);
    // The bytes are in the backing file on this machine.
    assert_eq!(sha256_of_prefix(&disk, PATTERN_MIB << 20), guest_sum);

    // A second boot reads them back through the driver.
    let read = format!(
        r#"set -e
echo "GUEST-READBACK $(dd if=/dev/vda bs=1M count={PATTERN_MIB} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#
    );
    let out = run_guest("blk-readback", &disk, "", &read);
    assert_eq!(
        field(&out.output, "GUEST-READBACK"),
        guest_sum,
        "{}",
        out.output
    );
}

/// The guest sees a read-only disk (its kernel then refuses writes itself; the device's own
/// refusal of a write request is tested at the device, `read_only_disk_refuses_writes` in
/// `vmm/src/devices/virtio/block/request.rs`), and the backing file keeps its bytes.
#[test]
fn read_only_disk_is_read_only_in_the_guest() {
    let disk = backing_file("blk-ro.img", 16);
    std::fs::write(&disk, vec![0x5au8; 16 << 20]).expect("fill");
    let before = sha256_of_prefix(&disk, 16 << 20);
    let script = r#"
echo "GUEST-RO $(cat /sys/block/vda/ro)"
if dd if=/dev/zero of=/dev/vda bs=4096 count=16 oflag=direct 2>/dev/null; then
    echo "GUEST-WRITE ok"
else
    echo "GUEST-WRITE refused"
fi
echo "GUEST-FIRST $(dd if=/dev/vda bs=1 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')"
"#;
    let out = run_guest("blk-ro", &disk, ",ro", script);
    assert_eq!(field(&out.output, "GUEST-RO"), "1", "{}", out.output);
    assert_eq!(
        field(&out.output, "GUEST-WRITE"),
        "refused",
        "{}",
        out.output
    );
    assert_eq!(field(&out.output, "GUEST-FIRST"), "5a", "{}", out.output);
    assert_eq!(sha256_of_prefix(&disk, 16 << 20), before);
}

#[test]
fn fio_verify_passes_with_many_requests_in_flight() {
    let disk = backing_file("blk-fio.img", 64);
    // Random 4 KiB writes at queue depth 32 through libaio, then fio reads everything back
    // and checks each block's crc32c; then a mixed random read/write phase with verification.
    let script = r#"
fio --name=randwrite --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \
    --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --eta=never \
    --output=/tmp/fio1.txt
echo "FIO-RC-1 $?"
fio --name=mixed --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randrw --bs=16k --size=16M --offset=32M --verify=crc32c --verify_fatal=1 \
    --eta=never --output=/tmp/fio2.txt
echo "FIO-RC-2 $?"
cat /tmp/fio1.txt /tmp/fio2.txt
"#;
    let out = run_guest("blk-fio", &disk, "", script);
    let log = &out.output;
    assert_eq!(field(log, "FIO-RC-1"), "0", "{log}");
    assert_eq!(field(log, "FIO-RC-2"), "0", "{log}");
    // fio's summary: no errors in either job, and no verify failures.
    assert_eq!(log.matches("err= 0").count(), 2, "{log}");
    assert!(!log.contains("verify: bad"), "{log}");
    assert!(!log.contains("crc32c: verify failed"), "{log}");
}

/// A guest's FLUSH reaches the backing device: the test host counts the flush commands its
/// NVMe disk (the backing file here) completes (`/sys/block/*/stat`, field 16). The guest's
/// direct 1 MiB write causes none; its fsync of `/dev/vda` (a virtio FLUSH request,
/// `fdatasync` in the VMM) causes at least one. With FLUSH a no-op in the VMM the second
/// count stays at zero and the test fails. (Counting written sectors instead does not work:
/// the test host's kernel writes a block device's dirty pages back at once.)
#[test]
fn guest_flush_reaches_the_backing_device() {
    let disk = backing_file("blk-flush.img", 16);
    let gate = backing_file("blk-flush-gate.img", 1);
    let guest = r#"
head -c 1048576 /dev/urandom > /tmp/p
dd if=/tmp/p of=/dev/vda bs=1M count=1 oflag=direct 2>/dev/null
echo "WRITTEN $?"
# Wait for the host's go (it reads the disk's flush count first): a sentinel it writes to
# the second disk.
i=0
until dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | grep -q DDVMM-GO || [ $i -ge 600 ]; do
    sleep 1; i=$((i + 1))
done
dd if=/dev/null of=/dev/vda count=0 conv=fsync,notrunc 2>/dev/null
echo "FLUSHED $?"
echo "GUEST-SHA $(sha256sum /tmp/p | cut -d' ' -f1)"
"#;
    let script = r#"
dev=${DISK0##*/}
flushes() { awk '{ print $16 }' /sys/block/$dev/stat; }
$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd guest.img --mem 512M \
  --disk "$DISK0" --disk "$DISK1" --console $WORK/guest.console \
  --cmdline "console=ttyS0 ddvmm.action=run-script" &
vmm=$!
wait_for() {
    i=0
    until grep -q "$1" $WORK/guest.console 2>/dev/null; do
        sleep 1; i=$((i + 1))
        [ $((i % 60)) = 0 ] && echo "waiting for $1 ($i s)"
        [ $i -lt 900 ] || { echo "NO-$1"; return 1; }
    done
}
f0=$(flushes)
wait_for WRITTEN
f1=$(flushes)
printf 'DDVMM-GO' | dd of=$DISK1 bs=4096 conv=sync oflag=direct 2>/dev/null
wait_for FLUSHED
f2=$(flushes)
wait $vmm
echo "VMM-RC=$?"
tr -d '\r' < $WORK/guest.console | grep -E "WRITTEN|FLUSHED|GUEST-SHA"
echo "DISK-FLUSHES before $((f1 - f0)) after $((f2 - f1))"
"#;
    let host = TestHost::new("blk-flush")
        .expect("test host")
        .disk(&disk)
        .disk(&gate)
        .file("guest.img", guest_initrd(guest), 0o644);
    if !host.emulated_only("needs the flush count of the test host's own NVMe disk") {
        return;
    }
    let out = host.run(script, TIMEOUT).expect("test host run");
    let log = &out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{log}");
    assert!(log.contains("VMM-RC=0"), "{log}");
    assert_no_kernel_errors(log);
    assert_eq!(field(log, "WRITTEN"), "0", "{log}");
    assert_eq!(field(log, "FLUSHED"), "0", "{log}");
    let flushes = field(log, "DISK-FLUSHES");
    let counts: Vec<u64> = flushes
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [before, after] = counts[..] else {
        panic!("bad counts: {flushes}\n{log}");
    };
    assert_eq!(
        before, 0,
        "the disk saw flushes before the guest asked for one: the test cannot tell\n{log}"
    );
    assert!(
        after >= 1,
        "the guest's flush never reached the backing disk\n{log}"
    );
    // And the bytes are the guest's.
    assert_eq!(
        sha256_of_prefix(&disk, 1 << 20),
        field(log, "GUEST-SHA"),
        "{log}"
    );
}
