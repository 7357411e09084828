#!/usr/bin/env bash
# Build the kernel and initramfs images used by ddvmm's tests.
#
#   bash guest-images/build-images.sh          (from the repo root; `make images`)
#
# Inputs : guest-images/packages.lock (pinned Debian packages), init/*.sh, lib/*.sh
#          KERNEL_PKG=linux-image-... KERNEL_VERSION=... override the pinned kernel.
# Outputs: guest-images/out/
#   vmlinuz                   Debian's stock cloud kernel (bzImage, unmodified)
#   kernel-release            e.g. 6.1.0-50-cloud-amd64
#   guest-initramfs.cpio.gz   busybox + pvpanic-mmio + init/guest-init.sh
#   client-initramfs.cpio.gz  the guest image + virtio_pci/blk/net + fio, iperf3 and their
#                             shared libraries (all from Debian packages, lib/sharedlibs.sh)
#   testhost-base.cpio.gz     busybox + kvm/kvm-amd/tun/bridge/vfio-pci + init/testhost-init.sh
#                             + /images/{vmlinuz,guest-initramfs.cpio.gz,client-initramfs.cpio.gz}
#   versions.txt              exact packages, versions and sha256s used
#   client-packages.txt       "package version how sha256" of every .deb in the client image
#   busybox                   the static busybox of every image (host-side applets in direct mode)
#   debs/                     downloaded .debs (cache, sha256-checked)
# A second run with the same inputs does nothing (stamp keyed by a hash of the inputs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/out
lock=$here/packages.lock
# shellcheck source=lib/modules.sh
source "$here/lib/modules.sh"
# shellcheck source=lib/sharedlibs.sh
source "$here/lib/sharedlibs.sh"

die() { echo "build-images: $*" >&2; exit 1; }
say() { echo "build-images: $*"; }

# Modules per image (names as in modinfo; dependencies are resolved from modules.dep).
GUEST_MODULES=(pvpanic-mmio)
# nvme: the test host's disks and passthrough controllers (built into the cloud flavour, a
# module in the generic one; built-in modules are skipped).
TESTHOST_MODULES=(irqbypass kvm kvm-amd tun bridge veth vfio vfio_iommu_type1 vfio-pci nvme)
CLIENT_MODULES=(pvpanic-mmio virtio_pci virtio_blk virtio_net)
# Driver VMs: the devices they own (virtio stand-ins) and uio_pci_generic for the channel's
# interrupt. The agent binary is added by `make driver-image` after the cargo build.
DRIVER_MODULES=(pvpanic-mmio virtio_pci virtio_blk virtio_net uio_pci_generic tun bridge nvme)
# Binaries of the client image: package:path (package versions pinned in packages.lock).
CLIENT_BINARIES=(fio:/usr/bin/fio iperf3:/usr/bin/iperf3)

# ---- tools -----------------------------------------------------------------------
for tool in apt-get apt-cache dpkg-deb cpio gzip xz sha256sum grep find sort readelf realpath; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done

# ---- pinned packages -------------------------------------------------------------
[[ -f $lock ]] || die "missing pin file: $lock"
lock_kernel_pkg='' lock_kernel_ver='' busybox_ver=''
while IFS= read -r line; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [[ -n $line ]] || continue
    [[ $line == *=* ]] || die "bad line in packages.lock: $line"
    name=${line%%=*} ver=${line#*=}
    case $name in
        linux-image-*)  lock_kernel_pkg=$name lock_kernel_ver=$ver ;;
        busybox-static) busybox_ver=$ver ;;
        # Client binaries and library pins for lib/sharedlibs.sh.
        *) DEBPKG_PINS[$name]=$ver ;;
    esac
done < "$lock"
[[ -n $lock_kernel_pkg ]] || die "packages.lock has no linux-image-* line"
[[ -n $busybox_ver ]] || die "packages.lock has no busybox-static line"
for spec in "${CLIENT_BINARIES[@]}"; do
    [[ -n ${DEBPKG_PINS[${spec%%:*}]:-} ]] || die "packages.lock has no ${spec%%:*} line"
done
kernel_pkg=${KERNEL_PKG:-$lock_kernel_pkg}
kernel_ver=${KERNEL_VERSION:-}
if [[ -z $kernel_ver && $kernel_pkg == "$lock_kernel_pkg" ]]; then
    kernel_ver=$lock_kernel_ver
fi
busybox_pkg=busybox-static

# ---- up to date? -----------------------------------------------------------------
stamp_key=$(
    {
        cat "$lock" "$here/build-images.sh" "$here/lib/modules.sh" "$here/lib/sharedlibs.sh" \
            "$here/init/guest-init.sh" "$here/init/testhost-init.sh"
        echo "KERNEL_PKG=$kernel_pkg KERNEL_VERSION=$kernel_ver"
    } | sha256sum | cut -d' ' -f1
)
outputs=(vmlinuz kernel-release guest-initramfs.cpio.gz client-initramfs.cpio.gz
         driver-base.cpio.gz testhost-base.cpio.gz versions.txt client-packages.txt busybox)
# A machine-wide cache of built images keyed by the same inputs, shared by every checkout on
# this machine (a fresh machine still builds them). DDVMM_IMAGE_CACHE=none turns it off.
cache_root=${DDVMM_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ddvmm/images}
cache=$cache_root/$stamp_key
# current DIR: DIR holds every output, built from these inputs, with the library packages
# this machine would choose now (unpinned ones follow the machine: installed version, else
# the suite's newest).
current() {
    local dir=$1 f chosen
    for f in "${outputs[@]}" .stamp; do [[ -s $dir/$f ]] || return 1; done
    [[ $(cat "$dir/.stamp") == "$stamp_key" ]] || return 1
    mapfile -t client_pkgs < <(cut -d' ' -f1 "$dir/client-packages.txt")
    chosen=$(debpkg_choose_version "${client_pkgs[@]}" | cut -d' ' -f1,2 | LC_ALL=C sort)
    if [[ $chosen != "$(cut -d' ' -f1,2 "$dir/client-packages.txt")" ]]; then
        say "library packages for the client image changed, rebuilding"
        return 1
    fi
}
if current "$out"; then
    say "up to date ($kernel_pkg=$kernel_ver, out/ unchanged)"
    exit 0
fi
if [[ $cache_root != none ]] && current "$cache"; then
    mkdir -p "$out"
    rm -f "$out/.stamp"
    for f in "${outputs[@]}" .stamp; do
        cp "$cache/$f" "$out/$f.tmp" && mv "$out/$f.tmp" "$out/$f" || die "cannot copy $f from the image cache $cache"
    done
    say "from the machine's image cache $cache ($kernel_pkg=$kernel_ver)"
    exit 0
fi
rm -f "$out/.stamp"
mkdir -p "$out/debs"

# ---- download --------------------------------------------------------------------
apt_updated=no
apt_update() {
    [[ $apt_updated == no ]] || return 1
    apt_updated=yes
    say "running apt-get update"
    apt-get update -qq >"$out/apt-update.log" 2>&1 || die "apt-get update failed (see $out/apt-update.log)"
}
# Fresh machine: no package lists at all.
compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt_update

# apt_field PKG VERSION FIELD: FIELD of the first `apt-cache show PKG=VERSION` record.
apt_field() {
    local spec=$1${2:+=$2}
    { apt-cache show "$spec" 2>/dev/null || true; } | awk -v f="$3:" '$1 == f { print $2; exit }'
}

# fetch PKG VERSION: download into out/debs (once), verify sha256; sets $fetched to
# the .deb path (no command substitution, so die/apt_update act on this shell).
fetch() {
    local pkg=$1 ver=$2 sha deb tmp got
    sha=$(apt_field "$pkg" "$ver" SHA256)
    if [[ -z $sha ]] && apt_update; then sha=$(apt_field "$pkg" "$ver" SHA256); fi
    [[ -n $sha ]] || die "cannot download $pkg=$ver (unknown to apt-cache)"
    deb=$out/debs/${pkg}_${ver//:/%3a}_amd64.deb
    if [[ -f $deb ]] && [[ $(sha256sum < "$deb" | cut -d' ' -f1) == "$sha" ]]; then
        fetched=$deb; return 0
    fi
    tmp=$(mktemp -d "$out/debs/.dl.XXXXXX")
    # -o APT::Sandbox::User=root: avoid the _apt "unsandboxed" warning when run as root.
    if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver") \
            >"$out/debs/download.log" 2>&1; then
        rm -rf "$tmp"
        die "cannot download $pkg=$ver (see $out/debs/download.log)"
    fi
    got=$(sha256sum "$tmp"/*.deb | cut -d' ' -f1)
    [[ $got == "$sha" ]] || { rm -rf "$tmp"; die "sha256 mismatch for $pkg=$ver: got $got, apt says $sha"; }
    mv "$tmp"/*.deb "$deb"
    rm -rf "$tmp"
    fetched=$deb
}

if [[ -z $kernel_ver ]]; then
    # KERNEL_PKG given without KERNEL_VERSION: take apt's first listed version.
    kernel_ver=$(apt_field "$kernel_pkg" '' Version)
    if [[ -z $kernel_ver ]] && apt_update; then kernel_ver=$(apt_field "$kernel_pkg" '' Version); fi
    [[ -n $kernel_ver ]] || die "cannot download $kernel_pkg (unknown to apt-cache)"
fi
fetch "$kernel_pkg" "$kernel_ver"; kernel_deb=$fetched
fetch "$busybox_pkg" "$busybox_ver"; busybox_deb=$fetched
kernel_sha=$(sha256sum < "$kernel_deb" | cut -d' ' -f1)
busybox_sha=$(sha256sum < "$busybox_deb" | cut -d' ' -f1)
say "packages: $kernel_pkg=$kernel_ver $busybox_pkg=$busybox_ver (sha256 ok)"

# ---- extract ---------------------------------------------------------------------
rm -rf "$out/kernel-root" "$out/busybox-root"
dpkg-deb -x "$kernel_deb" "$out/kernel-root"
dpkg-deb -x "$busybox_deb" "$out/busybox-root"
shopt -s nullglob
# Modules under lib/modules (bookworm) or usr/lib/modules (merged-/usr packages: trixie).
releases=("$out"/kernel-root/lib/modules/*/ "$out"/kernel-root/usr/lib/modules/*/)
vmlinuzes=("$out"/kernel-root/boot/vmlinuz-*)
shopt -u nullglob
(( ${#releases[@]} == 1 )) ||
    die "$kernel_pkg: expected one lib/modules/<release> or usr/lib/modules/<release>, found ${#releases[@]} (not a Debian linux-image package?)"
(( ${#vmlinuzes[@]} == 1 )) || die "$kernel_pkg: expected one boot/vmlinuz-*, found ${#vmlinuzes[@]}"
moddir=${releases[0]%/}
release=${moddir##*/}
cp "${vmlinuzes[0]}" "$out/vmlinuz"
# The static busybox, also for host-side scripts of direct-mode tests (httpd, wget).
install -m 0755 "$out/busybox-root/bin/busybox" "$out/busybox"
echo "$release" > "$out/kernel-release"
modules_ensure_dep "$moddir"
say "kernel: out/vmlinuz ($release), $(grep -c . "$moddir/modules.dep") modules"

# ---- initramfs trees -------------------------------------------------------------
# make_base_tree DIR INIT: busybox with applet symlinks, empty FHS dirs, /init.
make_base_tree() {
    local tree=$1 init=$2 link
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,var/tmp}
    # Real directories (not symlinks) so the harness' appended cpio with a glibc
    # binary and its libraries (/lib64/ld-linux-x86-64.so.2, /lib/x86_64-linux-gnu/...)
    # unpacks over them without conflicts.
    mkdir -p "$tree"/{lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu}
    chmod 1777 "$tree/tmp" "$tree/var/tmp"
    install -m 0755 "$out/busybox-root/bin/busybox" "$tree/bin/busybox"
    # Applet symlinks, created at build time from busybox's own list (the binary is
    # static amd64, so it runs on the build host).
    while IFS= read -r link; do
        case $link in */*) ;; *) continue ;; esac     # skips "linuxrc"
        [[ -e $tree/$link ]] || ln -s /bin/busybox "$tree/$link"
    done < <("$tree/bin/busybox" --list-full)
    install -m 0755 "$init" "$tree/init"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$tree/etc/passwd"
    printf 'root:x:0:\n' > "$tree/etc/group"
}

# newc cpio entry (header + name, padded), for entries that cannot be files on disk.
newc_entry() {  # NAME MODE RDEVMAJOR RDEVMINOR
    local name=$1 mode=$2 namesize=$(( ${#1} + 1 )) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    (( pad == 0 )) || head -c "$pad" /dev/zero
}

# pack_tree DIR OUTPUT.cpio.gz: gzip'd newc archive, root-owned, /dev/console included
# (the kernel opens /dev/console before running /init; without it /init has no stdout).
pack_tree() {
    local tree=$1 dest=$2
    # Fixed mtimes (with gzip -n and cpio --reproducible): same inputs, same bytes.
    find "$tree" -exec touch -h -d @0 {} +
    {
        newc_entry dev $(( 8#040755 )) 0 0
        newc_entry dev/console $(( 8#020600 )) 5 1
        newc_entry 'TRAILER!!!' 0 0 0
        (cd "$tree" && find . -mindepth 1 | LC_ALL=C sort |
            cpio -o -H newc --owner=0:0 --reproducible --quiet)
    } | gzip -9n > "$dest.tmp"
    # Pad with zeros to a multiple of 512 bytes. The kernel accepts concatenated
    # archives, but an *uncompressed* cpio appended after a compressed one is only
    # recognised at a 4-byte-aligned offset ("Initramfs unpacking failed: invalid
    # magic at start of compressed archive" otherwise). It skips zero padding, and
    # gzip/zcat ignore trailing zeros silently.
    local size
    size=$(stat -c %s "$dest.tmp")
    head -c $(( (512 - size % 512) % 512 )) /dev/zero >> "$dest.tmp"
    mv "$dest.tmp" "$dest"
}

# Guest image. pvpanic-mmio (QEMU's ISA/ACPI "QEMU0001" pvpanic device) pulls in the
# pvpanic core module (CONFIG_PVPANIC=y is only the menu; pvpanic.ko is =m with it).
guest_tree=$out/tree-guest
make_base_tree "$guest_tree" "$here/init/guest-init.sh"
modules_install "$moddir" "$guest_tree" "${GUEST_MODULES[@]}"
pack_tree "$guest_tree" "$out/guest-initramfs.cpio.gz"
say "guest: out/guest-initramfs.cpio.gz ($(du -k "$out/guest-initramfs.cpio.gz" | cut -f1) KiB; modules: $(tr '\n' ' ' < "$guest_tree/etc/modules.order" | sed 's|/lib/modules/[^ ]*/||g; s/\.ko//g; s/ $//'))"

# Client image: the guest image plus virtio drivers, fio and iperf3 for the I/O
# end-to-end tests and benchmarks. Same /init (ddvmm.action=run-script runs /script.sh).
client_tree=$out/tree-client
make_base_tree "$client_tree" "$here/init/guest-init.sh"
modules_install "$moddir" "$client_tree" "${CLIENT_MODULES[@]}"
SHAREDLIBS_WORK=$out/pkg-roots
sharedlibs_install "$client_tree" "${CLIENT_BINARIES[@]}"
printf '%s\n' "$SHAREDLIBS_PKGS" > "$out/client-packages.txt"
# getaddrinfo("localhost") for iperf3 -c localhost; no DNS in the guest.
printf '127.0.0.1 localhost\n::1 localhost\n' > "$client_tree/etc/hosts"
printf 'hosts: files\n' > "$client_tree/etc/nsswitch.conf"
pack_tree "$client_tree" "$out/client-initramfs.cpio.gz"
say "client: out/client-initramfs.cpio.gz ($(du -k "$out/client-initramfs.cpio.gz" | cut -f1) KiB; $(grep -c . "$out/client-packages.txt") packages; modules: $(tr '\n' ' ' < "$client_tree/etc/modules.order" | sed 's|/lib/modules/[^ ]*/||g; s/\.ko//g; s/ $//'))"

# Driver-VM base image: guest /init (ddvmm.action=agent runs /usr/bin/ddvmm-agent), the
# modules of the devices a driver VM owns and uio_pci_generic. `make driver-image` appends
# the agent (built by cargo) as a second archive: out/driver-initramfs.cpio.gz.
driver_tree=$out/tree-driver
make_base_tree "$driver_tree" "$here/init/guest-init.sh"
modules_install "$moddir" "$driver_tree" "${DRIVER_MODULES[@]}"
pack_tree "$driver_tree" "$out/driver-base.cpio.gz"
say "driver: out/driver-base.cpio.gz ($(du -k "$out/driver-base.cpio.gz" | cut -f1) KiB; modules: $(tr '\n' ' ' < "$driver_tree/etc/modules.order" | sed 's|/lib/modules/[^ ]*/||g; s/\.ko//g; s/ $//'))"

# Test host image: KVM modules plus the guest images to boot inside it.
th_tree=$out/tree-testhost
make_base_tree "$th_tree" "$here/init/testhost-init.sh"
modules_install "$moddir" "$th_tree" "${TESTHOST_MODULES[@]}"
mkdir -p "$th_tree/images"
cp "$out/vmlinuz" "$th_tree/images/vmlinuz"
cp "$out/guest-initramfs.cpio.gz" "$th_tree/images/guest-initramfs.cpio.gz"
cp "$out/client-initramfs.cpio.gz" "$th_tree/images/client-initramfs.cpio.gz"
pack_tree "$th_tree" "$out/testhost-base.cpio.gz"
say "testhost: out/testhost-base.cpio.gz ($(du -k "$out/testhost-base.cpio.gz" | cut -f1) KiB; modules: $(tr '\n' ' ' < "$th_tree/etc/modules.order" | sed 's|/lib/modules/[^ ]*/||g; s/\.ko//g; s/ $//'))"

# ---- record ----------------------------------------------------------------------
sha() { sha256sum < "$1" | cut -d' ' -f1; }
cat > "$out/versions.txt" <<EOF
# Generated by guest-images/build-images.sh; shell-sourceable.
kernel_pkg=$kernel_pkg
kernel_version=$kernel_ver
kernel_deb_sha256=$kernel_sha
kernel_release=$release
busybox_pkg=$busybox_pkg
busybox_version=$busybox_ver
busybox_deb_sha256=$busybox_sha
vmlinuz_sha256=$(sha "$out/vmlinuz")
guest_initramfs_sha256=$(sha "$out/guest-initramfs.cpio.gz")
client_initramfs_sha256=$(sha "$out/client-initramfs.cpio.gz")
# package=version of every .deb in the client image (how chosen: client-packages.txt)
client_packages="$(awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2 }' "$out/client-packages.txt")"
testhost_base_sha256=$(sha "$out/testhost-base.cpio.gz")
EOF
echo "$stamp_key" > "$out/.stamp"
# Into the cache: a complete entry appears at once (rename) and is never replaced (its key is
# a hash of the inputs); a failure here only costs the next checkout a build.
if [[ $cache_root != none && ! -e $cache ]] && mkdir -p "$cache.tmp.$$" 2>/dev/null; then
    ok=yes
    for f in "${outputs[@]}" .stamp; do cp "$out/$f" "$cache.tmp.$$/$f" || ok=no; done
    [[ $ok == yes ]] && mv -T "$cache.tmp.$$" "$cache" 2>/dev/null || true
    rm -rf "$cache.tmp.$$"
fi
say "done: out/versions.txt"
