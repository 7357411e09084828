# The demo: boot Debian's stock cloud kernel in ddvmm with 2 vCPUs and show its console.
# Runs wherever the harness puts it: directly on a host with hardware KVM, otherwise inside
# the emulated test host. $DDVMM is the ddvmm binary, $IMAGES the built guest images.
echo "=== ddvmm: booting $IMAGES/vmlinuz with 2 vCPUs, 256 MiB ==="
$DDVMM run --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/guest-initramfs.cpio.gz" \
    --mem 256M --cpus 2 --cmdline "console=ttyS0 ddvmm.action=poweroff"
rc=$?
echo "=== ddvmm exited with status $rc (0 = guest powered off) ==="
exit $rc
