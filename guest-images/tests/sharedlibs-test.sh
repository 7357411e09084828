#!/usr/bin/env bash
# Tests of lib/sharedlibs.sh that need no network: the version choice from `apt-cache policy`
# (stubbed with recorded output) and a requested binary against a busybox applet at its path
# (a .deb built here). Prints "sharedlibs-test: ok" or the first failure; exit status 0/1.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "sharedlibs-test: FAIL: $*"; exit 1; }
die() { echo "DIE: $*"; exit 1; }
# shellcheck source=../lib/sharedlibs.sh
source "$here/lib/sharedlibs.sh"

# ---- version choice: an apt configuration listing bookworm and trixie ----------------------
apt-cache() {
    cat <<'POLICY'
libnew1:
  Installed: (none)
  Candidate: 2.0-1
  Version table:
     2.0-1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
     1.5-2 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1.5-1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
libinst1:
  Installed: 1.0-1
  Candidate: 3.0-1
  Version table:
     3.0-1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
 *** 1.0-1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
libtrixieonly1:
  Installed: (none)
  Candidate: 9.0-1
  Version table:
     9.0-1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
libstable1:
  Installed: (none)
  Candidate: 7.0-1
  Version table:
     7.0-1 500
        500 http://deb.debian.org/debian testing/main amd64 Packages
     6.0-1 500
        500 http://deb.debian.org/debian stable/main amd64 Packages
libpinned1:
  Installed: (none)
  Candidate: 4.0-1
  Version table:
     4.0-1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
POLICY
}
DEBPKG_SUITE=bookworm
DEBPKG_PINS=([libpinned1]=3.9-1)
# Sources that name the suite `stable` (apt's release lines map it to its codename).
_SL_DISTS="stable=bookworm testing=trixie"
got=$(debpkg_choose_version libnew1 libinst1 libtrixieonly1 libstable1 libpinned1)
want='libnew1 1.5-2 suite
libinst1 1.0-1 installed
libstable1 6.0-1 suite
libpinned1 3.9-1 pinned'
[[ $got == "$want" ]] || fail "version choice: got
$got
want
$want"
unset -f apt-cache

# ---- a requested binary replaces a busybox applet; any other file is a conflict ------------
pkgroot=$work/pkg
mkdir -p "$pkgroot/DEBIAN" "$pkgroot/sbin"
printf 'Package: fakefs\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: t\n' \
    > "$pkgroot/DEBIAN/control"
printf '#!/bin/sh\necho real mke2fs\n' > "$pkgroot/sbin/mke2fs"
chmod 755 "$pkgroot/sbin/mke2fs"
dpkg-deb -b -Zgzip "$pkgroot" "$work/fakefs.deb" >/dev/null
debpkg_choose_version() { echo "fakefs 1.0 pinned"; }
fetch() { fetched=$work/fakefs.deb; }
SHAREDLIBS_WORK=$work/roots
tree=$work/tree
mkdir -p "$tree/sbin" "$tree/bin"
ln -s /bin/busybox "$tree/sbin/mke2fs"
sharedlibs_install "$tree" fakefs:/sbin/mke2fs
[[ -f $tree/sbin/mke2fs && ! -L $tree/sbin/mke2fs ]] || fail "the busybox applet link stayed"
grep -q "real mke2fs" "$tree/sbin/mke2fs" || fail "not the package's mke2fs"
rm -f "$tree/sbin/mke2fs"
echo "something else" > "$tree/sbin/mke2fs"
out=$( (sharedlibs_install "$tree" fakefs:/sbin/mke2fs) 2>&1 || true)
[[ $out == *"DIE: fakefs:/sbin/mke2fs: the image already has a file at /sbin/mke2fs"* ]] ||
    fail "a conflicting file was not refused by name: $out"
echo "sharedlibs-test: ok"
