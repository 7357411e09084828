# Boot-time benchmark: ddvmm vs QEMU (-M microvm, KVM) booting the same stock kernel and
# initramfs on the same (test) host, interleaved, RUNS times each. Reports the median time from
# starting the VMM to the guest's /init marker, the ratio ddvmm/QEMU, and each VMM's resident
# memory beyond guest RAM (guest RAM is a memfd for both, so it is counted separately).
# Absolute times inside the emulated test host are ~25x slower than hardware: read the ratio.
RUNS=${RUNS:-5}
K=$IMAGES/vmlinuz
I=$IMAGES/guest-initramfs.cpio.gz
C="console=ttyS0 ddvmm.action=poweroff"
M=DDVMM-GUEST-INIT-OK
: > samples.txt
i=1
while [ $i -le $RUNS ]; do
    boot-timer --label ddvmm --marker $M -- \
        $DDVMM run --kernel $K --initrd $I --mem 256M --cpus 1 --cmdline "$C" >> samples.txt
    boot-timer --label qemu-microvm --marker $M -- \
        qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 256M \
        -object memory-backend-memfd,id=mem,size=256M -nodefaults -no-user-config \
        -display none -serial stdio -kernel $K -initrd $I -append "$C" >> samples.txt
    i=$((i + 1))
done
cat samples.txt
awk '
$1 == "SAMPLE" { n[$2]++; t[$2, n[$2]] = $3; own[$2] = $4 }
function median(label,    k, j, tmp, cnt, x) {
    cnt = n[label]
    for (k = 1; k <= cnt; k++) tmp[k] = t[label, k]
    for (k = 1; k <= cnt; k++) for (j = k + 1; j <= cnt; j++)
        if (tmp[j] < tmp[k]) { x = tmp[k]; tmp[k] = tmp[j]; tmp[j] = x }
    if (cnt % 2) return tmp[(cnt + 1) / 2]
    return (tmp[cnt / 2] + tmp[cnt / 2 + 1]) / 2
}
END {
    if (!n["ddvmm"] || !n["qemu-microvm"]) { print "bench: missing samples"; exit 1 }
    d = median("ddvmm"); q = median("qemu-microvm")
    printf "\n%-14s %6s %16s %22s\n", "vmm", "runs", "median ms to /init", "VMM RSS beyond RAM KiB"
    printf "%-14s %6d %16d %22d\n", "ddvmm", n["ddvmm"], d, own["ddvmm"]
    printf "%-14s %6d %16d %22d\n", "qemu-microvm", n["qemu-microvm"], q, own["qemu-microvm"]
    printf "ratio ddvmm/qemu: boot time %.2f, VMM memory %.2f\n", d / q, own["ddvmm"] / own["qemu-microvm"]
}' samples.txt
