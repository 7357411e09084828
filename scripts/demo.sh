# The demo: boot Debian's stock cloud kernel in ddvmm with 2 vCPUs, a virtio disk and a virtio
# NIC on a TAP, and show its console. Runs wherever the harness puts it: directly on a host
# with hardware KVM, otherwise inside the emulated test host. $DDVMM is the ddvmm binary,
# $IMAGES the built guest images, $WORK/guest.img the client image with scripts/demo-guest.sh.
dd if=/dev/zero of=/tmp/demo-disk.img bs=1M count=64 2>/dev/null
echo "=== ddvmm: 2 vCPUs, 512 MiB, virtio-blk on /tmp/demo-disk.img, virtio-net on TAP ddtap0 ==="
$DDVMM run --kernel "$IMAGES/vmlinuz" --initrd "$WORK/guest.img" --mem 512M --cpus 2 \
    --disk /tmp/demo-disk.img --net tap=ddtap0 \
    --cmdline "console=ttyS0 ddvmm.action=run-script" &
vmm=$!
i=0
while [ ! -e /sys/class/net/ddtap0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
ip addr add 10.77.0.1/24 dev ddtap0
wait $vmm
rc=$?
echo "=== ddvmm exited with status $rc (0 = guest powered off) ==="
echo "=== host: first bytes of the disk image the guest wrote ==="
head -c 80 /tmp/demo-disk.img; echo
exit $rc
