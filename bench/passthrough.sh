# Passthrough benchmark: the same guest and fio jobs (bench/guest-blk.sh) on
#   vfio    - the test host's NVMe controller passed through (the guest's own nvme driver), and
#   virtio  - ddvmm's emulated virtio-blk over the same controller's namespace (the test host's
#             nvme driver owns it again; same backing file outside),
# alternating, ROUNDS rounds each, in one run. Prints medians and vfio/virtio ratios. Absolute
# numbers come from an emulated CPU and an emulated IOMMU here: read the ratios.
K=$IMAGES/vmlinuz
CMD="console=ttyS0 quiet ddvmm.action=run-script"
ROUNDS=${ROUNDS:-2}
D=/sys/bus/pci/devices/$PT0
: > results.txt

to_nvme() {
    echo > $D/driver_override
    echo $PT0 > $D/driver/unbind
    echo $PT0 > /sys/bus/pci/drivers_probe
    i=0
    until ls $D/nvme/nvme*/nvme*n1 >/dev/null 2>&1 || [ $i -ge 300 ]; do sleep 1; i=$((i + 1)); done
    NS=/dev/$(basename $(ls -d $D/nvme/nvme*/nvme*n1 | head -1))
    until [ -b $NS ] || [ $i -ge 300 ]; do sleep 1; i=$((i + 1)); done
}
to_vfio() {
    echo vfio-pci > $D/driver_override
    echo $PT0 > $D/driver/unbind
    echo $PT0 > /sys/bus/pci/drivers_probe
}
guest() { # label, ddvmm device arguments...
    label=$1; shift
    echo "=== $label"
    $DDVMM run --kernel $K --initrd $WORK/guest.img --mem 512M --cpus 2 "$@" \
        --cmdline "$CMD" 2>&1 | tee $label.out | grep -a -E "RESULT|BENCH-DEVICE|FIO-FAILED|error"
    tr -d '\r' < $label.out | grep -a '^RESULT' | sed "s/^/$label /" >> results.txt
}

r=1
while [ $r -le $ROUNDS ]; do
    guest vfio --vfio $PT0
    to_nvme
    echo "test host namespace: $NS ($(basename $(readlink $D/driver)))"
    guest virtio --disk $NS
    to_vfio
    r=$((r + 1))
done

ratio_table results.txt vfio virtio
