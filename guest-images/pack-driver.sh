#!/usr/bin/env bash
# Builds out/driver-initramfs.cpio.gz: the driver-VM base image (from build-images.sh) with
# the translation agent appended as a second archive at /usr/bin/ddvmm-agent.
# Usage: pack-driver.sh PATH/TO/ddvmm-agent
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
agent=${1:?usage: pack-driver.sh AGENT_BINARY}
die() { echo "pack-driver: $*" >&2; exit 1; }
[[ -s $out/driver-base.cpio.gz ]] || die "missing $out/driver-base.cpio.gz (run make images)"
[[ -x $agent ]] || die "missing agent binary $agent (run make agent)"
command -v cpio >/dev/null || die "missing tool: cpio"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/usr/bin"
cp "$agent" "$stage/usr/bin/ddvmm-agent"
strip "$stage/usr/bin/ddvmm-agent" 2>/dev/null || true
find "$stage" -exec touch -h -d @0 {} +
{
    cat "$out/driver-base.cpio.gz"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --reproducible --quiet) | gzip -9n
} > "$out/driver-initramfs.cpio.gz.tmp"
mv "$out/driver-initramfs.cpio.gz.tmp" "$out/driver-initramfs.cpio.gz"
echo "pack-driver: out/driver-initramfs.cpio.gz ($(du -k "$out/driver-initramfs.cpio.gz" | cut -f1) KiB)"
