# Cost of confinement: the same guest on ddvmm with its seccomp filters off ("open") and with
# the filters on and the VMM jailed (namespaces, empty root, uid 1000, no capabilities: what
# the daemon always does), in one run, alternating. Boot: time to the guest's /init marker
# (ROUNDS boots each). I/O: bench/guest-blk.sh's fio jobs on ddvmm's virtio-blk over the same
# backing file (one guest per mode and round). Prints medians and jailed/open ratios, and the
# test host's speculative-execution mitigation for seccomp tasks (SSBD, STIBP: the kernel turns
# them on for filtered tasks by default).
ROUNDS=${ROUNDS:-3}
K=$IMAGES/vmlinuz
DISK=/tmp/pool.img
dd if=/dev/zero of=$DISK bs=1M count=256 2>/dev/null
mkdir -p /tmp/jail
MODES="open jailed"
opts() {
    case $1 in
    open) echo "--seccomp off" ;;
    jailed) echo "--jail-root /tmp/jail --uid 1000 --gid 1000" ;;
    esac
}
: > results.txt
r=1
while [ $r -le $ROUNDS ]; do
    for m in $MODES; do
        boot-timer --label $m --marker DDVMM-GUEST-INIT-OK -- \
            $DDVMM run $(opts $m) --kernel $K --initrd $IMAGES/guest-initramfs.cpio.gz \
            --mem 256M --cmdline "console=ttyS0 ddvmm.action=poweroff" > boot.out
        awk '$1 == "SAMPLE" { print $2, "RESULT boot-ms", $3 }' boot.out | tee -a results.txt
        $DDVMM run $(opts $m) --kernel $K --initrd $WORK/guest.img --mem 512M --cpus 2 \
            --disk $DISK --cmdline "console=ttyS0 quiet ddvmm.action=run-script" 2>&1 \
            | tr -d '\r' | grep -a RESULT | sed "s/^/$m /" | tee -a results.txt
    done
    r=$((r + 1))
done
ratio_table results.txt jailed open
echo
dmesg | grep -a -i "speculative store bypass\|spectre v2" | sed 's/^\[[^]]*\] //' | sort -u
