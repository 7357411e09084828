# Device benchmark: fio (4 KiB random read/write at QD1 and QD32, 128 KiB sequential) and an
# iperf3 TCP stream in the same stock guest, on ddvmm and on QEMU (-M microvm with PCIe,
# virtio-blk-pci and virtio-net-pci on a TAP), same kernel, image, backing file and TAP setup,
# in one run. Prints medians and ddvmm/QEMU ratios. Absolute numbers come from an emulated
# CPU here: read the ratios.
K=$IMAGES/vmlinuz
DISK=/tmp/bench.img
dd if=/dev/zero of=$DISK bs=1M count=256 2>/dev/null
CMD="console=ttyS0 ddvmm.action=run-script"
iperf3 -s > /dev/null 2>&1 &

# Waits for process $1 to end (busybox `wait` can return early when other jobs signal).
wait_for() {
    while kill -0 $1 2>/dev/null; do wait $1; done
}

# Waits for TAP $1, gives it the host address.
tap_up() {
    i=0
    while [ ! -e /sys/class/net/$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    ip addr add 10.77.0.1/24 dev $1
    ip link set $1 up
}

echo "=== ddvmm ==="
$DDVMM run --kernel $K --initrd $WORK/guest.img --mem 512M --cpus 2 --disk $DISK \
    --net tap=dtap0,mac=52:54:00:aa:bb:01 --cmdline "$CMD" > ddvmm.out 2>&1 &
pid=$!
tap_up dtap0
wait_for $pid
grep RESULT ddvmm.out | sed 's/^/ddvmm /' > results.txt
grep -q RESULT ddvmm.out || { echo "ddvmm run produced no results:"; tail -30 ddvmm.out; }
grep -a -E -A8 "FIO-FAILED|IPERF-FAILED|SCRIPT-EXIT" ddvmm.out

echo "=== qemu ==="
qemu-system-x86_64 -M microvm,pcie=on,acpi=on,memory-backend=mem -enable-kvm -cpu host \
    -smp 2 -m 512M -object memory-backend-memfd,id=mem,size=512M -nodefaults -no-user-config \
    -display none -serial stdio -no-reboot -kernel $K -initrd $WORK/guest.img -append "$CMD" \
    -drive file=$DISK,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0 \
    -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01,romfile= > qemu.out 2>&1 &
pid=$!
tap_up qtap0
wait_for $pid
grep RESULT qemu.out | sed 's/^/qemu /' >> results.txt
grep -q RESULT qemu.out || { echo "qemu run produced no results:"; tail -30 qemu.out; }
grep -a -E -A8 "FIO-FAILED|IPERF-FAILED|SCRIPT-EXIT" qemu.out

ratio_table results.txt ddvmm qemu
