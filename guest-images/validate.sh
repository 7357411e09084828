#!/usr/bin/env bash
# Smoke-test the images built by build-images.sh with QEMU in TCG (no host KVM needed):
#   1. guest image, ddvmm.action=poweroff     -> DDVMM-GUEST-INIT-OK, QEMU exits
#   2. guest image + pvpanic, action=panic    -> kernel panic, pvpanic makes QEMU exit
#   3. test host (EPYC, SVM) + appended /cmd.sh -> DDVMM-TESTHOST-READY kvm=yes, rc=3
#   4. client image + appended /script.sh, virtio-blk disk and virtio-net NIC:
#      fio randwrite+crc32c verify on /dev/vda, iperf3 over loopback -> rc=0
# Usage: bash guest-images/validate.sh        (logs in guest-images/out/validate/)
#
# It also shows how a harness adds a command to the test host: an *uncompressed* newc
# cpio holding /cmd.sh, concatenated after testhost-base.cpio.gz.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/out
logs=$out/validate
mkdir -p "$logs"
command -v qemu-system-x86_64 >/dev/null || { echo "validate: missing tool: qemu-system-x86_64" >&2; exit 1; }
for f in vmlinuz guest-initramfs.cpio.gz client-initramfs.cpio.gz testhost-base.cpio.gz; do
    [[ -s $out/$f ]] || { echo "validate: missing $out/$f (run build-images.sh)" >&2; exit 1; }
done

fail=0
# boot NAME TIMEOUT EXPECTED-REGEX... -- QEMU-ARGS...
boot() {
    local name=$1 tmo=$2 start end re
    shift 2
    local -a want=()
    while [[ $1 != -- ]]; do want+=("$1"); shift; done
    shift
    start=$(date +%s.%N)
    timeout "$tmo" qemu-system-x86_64 -nographic -no-reboot -nic none "$@" \
        </dev/null >"$logs/$name.log" 2>&1 || true
    end=$(date +%s.%N)
    for re in "${want[@]}"; do
        if ! grep -qE "$re" "$logs/$name.log"; then
            echo "validate: $name: FAIL, no '$re' (log: $logs/$name.log)"
            fail=1
            return
        fi
    done
    printf 'validate: %s: ok (%.1f s)\n' "$name" "$(echo "$end - $start" | bc)"
}

boot guest-poweroff 120 '^DDVMM-GUEST-INIT-OK cpus=1' '^DDVMM-GUEST-ACTION poweroff' 'reboot: Power down' -- \
    -accel tcg -M pc -cpu max -m 512 \
    -kernel "$out/vmlinuz" -initrd "$out/guest-initramfs.cpio.gz" \
    -append "console=ttyS0 ddvmm.action=poweroff"

boot guest-panic 120 '^DDVMM-GUEST-ACTION panic' 'Kernel panic - not syncing: sysrq triggered crash' -- \
    -accel tcg -M pc -cpu max -m 512 -device pvpanic \
    -kernel "$out/vmlinuz" -initrd "$out/guest-initramfs.cpio.gz" \
    -append "console=ttyS0 ddvmm.action=panic"

# Test host with an appended /cmd.sh.
cmd_dir=$(mktemp -d)
trap 'rm -rf "$cmd_dir"' EXIT
printf '%s\n' 'echo "DDVMM=$DDVMM IMAGES=$IMAGES"' 'ls -l /dev/kvm $IMAGES' \
    'grep -c ^processor /proc/cpuinfo' 'dmesg | grep -iE "kvm|svm|smpboot|ACPI: .*CPU"' 'exit 3' > "$cmd_dir/cmd.sh"
(cd "$cmd_dir" && echo cmd.sh | cpio -o -H newc --owner=0:0 --quiet) > "$cmd_dir/cmd.cpio"
cat "$out/testhost-base.cpio.gz" "$cmd_dir/cmd.cpio" > "$logs/testhost-initrd.img"
boot testhost 300 '^DDVMM-TESTHOST-READY kvm=yes' '^DDVMM-TESTHOST-EXIT rc=3' -- \
    -accel tcg,thread=multi -smp 2 -cpu EPYC -m 3072 \
    -kernel "$out/vmlinuz" -initrd "$logs/testhost-initrd.img" \
    -append "console=ttyS0 panic=-1 quiet"

# Client image with an appended /script.sh (same scheme as /cmd.sh above).
printf '%s\n' \
    'fio --name=t --filename=/dev/vda --rw=randwrite --bs=4k --size=8M --direct=1 --verify=crc32c --ioengine=psync || exit 1' \
    'ip link show eth0 || exit 2' \
    'iperf3 --version && iperf3 -s -D -1 && sleep 1 && iperf3 -c 127.0.0.1 -t 1 || exit 3' > "$cmd_dir/script.sh"
(cd "$cmd_dir" && echo script.sh | cpio -o -H newc --owner=0:0 --quiet) > "$cmd_dir/script.cpio"
cat "$out/client-initramfs.cpio.gz" "$cmd_dir/script.cpio" > "$logs/client-initrd.img"
rm -f "$logs/client-disk.img"
truncate -s 64M "$logs/client-disk.img"
boot client 300 ' err= 0:' 'iperf Done' '^DDVMM-GUEST-SCRIPT-EXIT rc=0' 'reboot: Power down' -- \
    -accel tcg -M pc -cpu max -m 1024 \
    -drive file="$logs/client-disk.img",if=virtio,format=raw \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -kernel "$out/vmlinuz" -initrd "$logs/client-initrd.img" \
    -append "console=ttyS0 ddvmm.action=run-script"

exit "$fail"
