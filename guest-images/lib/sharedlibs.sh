# shellcheck shell=bash
# Shared-library closure of Debian-packaged ELF binaries, for build-images.sh
# (source this file; needs bash 4+, readelf from binutils).
#
# Nothing from the build host is copied and no dynamic loader is run: the DT_NEEDED,
# RUNPATH and PT_INTERP entries are read with `readelf`, and every library comes out of
# a downloaded, sha256-checked Debian package.
#
#   debpkg_choose_version PKG...
#       Print "PKG VERSION HOW" per package (HOW: pinned | installed | suite), from one
#       batched `apt-cache policy`: the pin in $DEBPKG_PINS[PKG] if any, else the version
#       installed on this machine if apt can still download it, else the newest version
#       apt can download from the image suite $DEBPKG_SUITE (its -updates, -security and
#       -backports included), never from another suite the apt configuration also lists:
#       a library from a newer release would need a newer glibc than the image ships.
#       Packages unknown to apt (virtual, missing) or absent from the suite print nothing.
#
#   sharedlibs_install TREE PKG:/PATH...
#       Copy /PATH out of package PKG into TREE (same path), plus the interpreter and
#       the full DT_NEEDED closure. A soname is looked up in the packages already
#       extracted, then in the Depends/Pre-Depends of the package that holds the
#       object that needs it (dpkg-shlibdeps writes exactly those), in the object's
#       RUNPATH and in the loader's default directories. Libraries are installed
#       as regular files at <dir>/<soname>; a second path to the same file becomes a
#       symlink. Sets SHAREDLIBS_PKGS ("PKG VERSION HOW SHA256" lines, sorted).
#
# Callbacks from the caller: fetch PKG VERSION (sets $fetched to the checked .deb),
# die MESSAGE. Extracted packages are cached under $SHAREDLIBS_WORK/<pkg>.

declare -A DEBPKG_PINS=()
# The Debian suite unpinned libraries come from (default: this machine's release).
DEBPKG_SUITE=${DEBPKG_SUITE:-$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)}

# "dist=codename ..." of every source apt knows (sources may say `stable` where the suite is
# `bookworm`), from `apt-cache policy`'s release lines; computed once.
_sl_dists() {
    if [[ -z ${_SL_DISTS+x} ]]; then
        _SL_DISTS=$({ LC_ALL=C apt-cache policy 2>/dev/null || true; } | awk '
            /^ *-?[0-9]+ [a-z]+:\/\// { d = $3; sub(/\/.*/, "", d); next }
            /^ +release / && d != "" {
                n = split($2, kv, ","); for (i = 1; i <= n; i++) if (kv[i] ~ /^n=/) {
                    c = kv[i]; sub(/^n=/, "", c); printf "%s=%s ", d, c }
                d = "" }')
    fi
    printf '%s' "$_SL_DISTS"
}

debpkg_choose_version() {
    (( $# )) || return 0
    local p pins=''
    for p in "${!DEBPKG_PINS[@]}"; do pins+="$p=${DEBPKG_PINS[$p]} "; done
    local dists
    dists=$(_sl_dists)
    { LC_ALL=C apt-cache policy "$@" 2>/dev/null || true; } |
        _SL_PINS=$pins _SL_SUITE=$DEBPKG_SUITE _SL_DISTS=$dists awk '
        BEGIN { n = split(ENVIRON["_SL_PINS"], a, " "); for (i = 1; i <= n; i++) if (a[i] != "") {
                    k = a[i]; sub(/=.*/, "", k); v = a[i]; sub(/^[^=]*=/, "", v); pin[k] = v }
                suite = ENVIRON["_SL_SUITE"]
                n = split(ENVIRON["_SL_DISTS"], a, " "); for (i = 1; i <= n; i++) if (a[i] != "") {
                    k = a[i]; sub(/=.*/, "", k); v = a[i]; sub(/^[^=]*=/, "", v); codename[k] = v } }
        function flush() {
            if (pkg == "") return
            if (pkg in pin)                                  print pkg, pin[pkg], "pinned"
            else if (inst != "(none)" && (inst in dl))       print pkg, inst, "installed"
            else if (best != "")                             print pkg, best, "suite"
            else if (suite == "" && cand != "(none)" && cand != "") print pkg, cand, "candidate"
            pkg = ""; delete dl
        }
        /^[^ ]/            { flush(); pkg = $1; sub(/:.*/, "", pkg); inst = ""; cand = ""; best = ""; next }
        /^  Installed:/    { inst = $2; next }
        /^  Candidate:/    { cand = $2; next }
        /^ (\*\*\*|   ) [^ ]+ -?[0-9]+$/ { ver = $(NF - 1); next }
        /^        -?[0-9]+ / {
            if ($2 != "/var/lib/dpkg/status") {
                dl[ver] = 1
                # Versions are listed newest first: the first one from the suite wins.
                s = $3; sub(/\/.*/, "", s); if (s in codename) s = codename[s]
                if (best == "" && suite != "" && (s == suite || index(s, suite "-") == 1)) best = ver
            }
            next
        }
        END { flush() }'
}

# _sl_root PKG: make sure PKG is extracted (version from debpkg_choose_version);
# returns 1 if apt does not know it (virtual package).
_sl_root() {
    local pkg=$1 line ver how
    [[ -n ${_sl_ver[$pkg]:-} ]] && return 0
    line=$(debpkg_choose_version "$pkg")
    [[ -n $line ]] || return 1
    read -r _ ver how <<< "$line"
    fetch "$pkg" "$ver"
    rm -rf "${SHAREDLIBS_WORK:?}/$pkg"
    dpkg-deb -x "$fetched" "$SHAREDLIBS_WORK/$pkg"
    _sl_ver[$pkg]=$ver
    _sl_how[$pkg]=$how
    _sl_sha[$pkg]=$(sha256sum < "$fetched" | cut -d' ' -f1)
    _sl_deps[$pkg]=$(dpkg-deb -f "$fetched" Pre-Depends Depends | sed 's/^[A-Za-z-]*: *//' |
        tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/[[:space:]]//g' | grep . || true)
    _sl_order+=("$pkg")
}

# _sl_real ROOT REL: REL with symlinks resolved inside ROOT (absolute links stay in
# ROOT); prints the resolved path relative to ROOT, fails if it does not exist.
_sl_real() {
    local root=$1 rel=${2#/} i target
    for (( i = 0; i < 40; i++ )); do
        if [[ -L $root/$rel ]]; then
            target=$(readlink "$root/$rel")
            [[ $target == /* ]] || target=$(dirname "/$rel")/$target
            rel=$(realpath -ms "/$target"); rel=${rel#/}
        elif [[ -f $root/$rel ]]; then
            printf '%s\n' "$rel"; return 0
        else
            return 1
        fi
    done
    return 1
}

# _sl_find PKG CANDIDATE-PATH...: first candidate present in PKG's tree -> _sl_hit
_sl_find() {
    local pkg=$1 c real
    shift
    for c in "$@"; do
        real=$(_sl_real "$SHAREDLIBS_WORK/$pkg" "$c") || continue
        _sl_hit=("$pkg" "${c#/}" "$real")
        return 0
    done
    return 1
}

# _sl_place PKG REL REAL: install PKG's file REAL into the tree as REL, then scan it.
_sl_place() {
    local pkg=$1 rel=$2 real=$3 key=$1:$3
    [[ -e $_sl_tree/$rel || -L $_sl_tree/$rel ]] && return 0
    mkdir -p "$_sl_tree/$(dirname "$rel")"
    if [[ -n ${_sl_placed[$key]:-} ]]; then
        ln -s "/${_sl_placed[$key]}" "$_sl_tree/$rel"
        return 0
    fi
    install -m "$([[ -x $SHAREDLIBS_WORK/$pkg/$real ]] && echo 0755 || echo 0644)" \
        "$SHAREDLIBS_WORK/$pkg/$real" "$_sl_tree/$rel"
    _sl_placed[$key]=$rel
    _sl_used[$pkg]=1
    _sl_scan "$pkg" "$rel"
}

# _sl_need PKG REL WHAT CANDIDATE-PATH...: resolve WHAT (needed by PKG's REL).
_sl_need() {
    local pkg=$1 rel=$2 what=$3 p dep
    shift 3
    local -a deps=()
    # Already extracted packages first, the needing object's own package first of all.
    for p in "$pkg" "${_sl_order[@]}"; do
        _sl_find "$p" "$@" && { _sl_place "$p" "${_sl_hit[1]}" "${_sl_hit[2]}"; return 0; }
    done
    # Then the package's dependencies, library-looking names first.
    mapfile -t deps < <(printf '%s\n' ${_sl_deps[$pkg]} | grep lib || true)
    mapfile -t -O "${#deps[@]}" deps < <(printf '%s\n' ${_sl_deps[$pkg]} | grep -v -e lib -e '^$' || true)
    for dep in "${deps[@]}"; do
        [[ -n ${_sl_ver[$dep]:-} ]] && continue
        _sl_root "$dep" || continue
        _sl_find "$dep" "$@" && { _sl_place "$dep" "${_sl_hit[1]}" "${_sl_hit[2]}"; return 0; }
    done
    die "no package provides $what (needed by /$rel from $pkg; searched its dependencies)"
}

# _sl_scan PKG REL: resolve the interpreter and DT_NEEDED of tree file REL.
_sl_scan() {
    local pkg=$1 rel=$2 f=$_sl_tree/$2 dyn interp soname rp d origin
    local -a dirs=()
    [[ $(head -c 4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] || return 0
    interp=$(readelf -lW "$f" 2>/dev/null |
        sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p')
    [[ -z $interp ]] || _sl_need "$pkg" "$rel" "$interp" "$interp"
    dyn=$(readelf -dW "$f" 2>/dev/null) || die "readelf failed on /$rel from $pkg"
    origin=$(dirname "/$rel")
    rp=$(sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p' <<< "$dyn" | head -n1)
    for d in ${rp//:/ }; do dirs+=("${d//\$ORIGIN/$origin}"); done
    # glibc's built-in search path on Debian (there is no ld.so.cache in the image).
    dirs+=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib /usr/lib)
    while IFS= read -r soname; do
        [[ -n $soname && -z ${_sl_soname[$soname]:-} ]] || continue
        _sl_soname[$soname]=1
        _sl_need "$pkg" "$rel" "$soname" "${dirs[@]/%//$soname}"
    done < <(sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' <<< "$dyn")
}

sharedlibs_install() {
    _sl_tree=$1
    shift
    declare -gA _sl_ver=() _sl_how=() _sl_sha=() _sl_deps=() _sl_placed=() _sl_used=() _sl_soname=()
    declare -ga _sl_order=() _sl_hit=()
    local spec pkg path p
    mkdir -p "$SHAREDLIBS_WORK"
    for spec in "$@"; do
        pkg=${spec%%:*} path=${spec#*:}
        _sl_root "$pkg" || die "unknown package $pkg"
        _sl_find "$pkg" "$path" || die "$pkg has no $path"
        # A requested binary wins over a busybox applet of the same path (e2fsprogs' mke2fs
        # over busybox's); any other file already there is a conflict.
        if [[ -L $_sl_tree/${path#/} && $(readlink "$_sl_tree/${path#/}") == */busybox ]]; then
            rm -f "$_sl_tree/${path#/}"
        elif [[ -e $_sl_tree/${path#/} || -L $_sl_tree/${path#/} ]]; then
            die "$pkg:$path: the image already has a file at $path"
        fi
        _sl_place "$pkg" "${path#/}" "${_sl_hit[2]}"
    done
    SHAREDLIBS_PKGS=$(for p in "${!_sl_used[@]}"; do
        printf '%s %s %s %s\n' "$p" "${_sl_ver[$p]}" "${_sl_how[$p]}" "${_sl_sha[$p]}"; done | LC_ALL=C sort)
}
