# shellcheck shell=bash
# Kernel module helpers for build-images.sh (source this file; needs bash 4+).
#
#   modules_ensure_dep  MODDIR
#       Make sure MODDIR/modules.dep exists. Debian's linux-image packages do not
#       ship it (depmod runs in postinst), so if it is missing it is generated
#       from each module's own .modinfo `depends=` field (written by modpost from
#       the same symbol resolution depmod uses). Generated lines list direct
#       dependencies only; depmod's lists are transitive. The resolver below
#       recurses, so it accepts both.
#
#   modules_install  MODDIR TREE NAME...
#       Resolve NAMEs (e.g. kvm-amd, pvpanic-mmio; `-` and `_` are equivalent)
#       to their full dependency closure using MODDIR/modules.dep, copy the .ko
#       files into TREE at the same path (/lib/modules/<release>/...),
#       decompressing .ko.xz/.ko.zst/.ko.gz (busybox insmod wants plain .ko),
#       and write TREE/etc/modules.order: absolute in-tree paths, one per line,
#       dependencies first. Built-in modules (modules.builtin) are skipped
#       silently; unknown names are an error.
#
# MODDIR is <extracted kernel package>/lib/modules/<release>.

# Module name as the kernel sees it: basename without .ko*, '-' -> '_'.
_mod_norm() {
    local n=${1##*/}
    n=${n%%.ko*}
    printf '%s\n' "${n//-/_}"
}

# Print a module file's contents uncompressed on stdout.
_mod_cat() {
    case $1 in
        *.ko.xz)  xz -dc -- "$1" ;;
        *.ko.zst) zstd -qdc -- "$1" ;;
        *.ko.gz)  gzip -dc -- "$1" ;;
        *)        cat -- "$1" ;;
    esac
}

modules_ensure_dep() {
    local moddir=$1 rel name deps dep out line
    [[ -s $moddir/modules.dep ]] && return 0
    [[ -s $moddir/modules.order || -d $moddir/kernel ]] ||
        { echo "build-images: no modules in $moddir" >&2; return 1; }
    # name -> relative path of every shipped module
    local -A path=()
    while IFS= read -r rel; do
        path[$(_mod_norm "$rel")]=$rel
    done < <(cd "$moddir" && find kernel -name '*.ko*' -type f | LC_ALL=C sort)
    # rel -> "depends=" value. .modinfo is a list of NUL-terminated key=value
    # strings. One grep over all plain .ko files; compressed ones one by one.
    local -A depends=()
    while IFS= read -r line; do
        rel=${line%%:depends=*}
        [[ -n ${depends[$rel]+x} ]] || depends[$rel]=${line#*:depends=}
    done < <(cd "$moddir" && grep -raoP --include='*.ko' '(?<=\x00)depends=[\w,-]*' kernel || true)
    for rel in "${path[@]}"; do
        [[ $rel == *.ko ]] && continue
        line=$(_mod_cat "$moddir/$rel" | grep -aoP '(?<=\x00)depends=[\w,-]*' | head -n1 || true)
        depends[$rel]=${line#depends=}
    done
    out=$moddir/modules.dep.tmp
    : > "$out"
    for name in "${!path[@]}"; do
        rel=${path[$name]}
        deps=${depends[$rel]:-}
        line="$rel:"
        for dep in ${deps//,/ }; do
            dep=${dep//-/_}
            [[ -n ${path[$dep]:-} ]] ||
                { echo "build-images: $rel depends on unknown module $dep" >&2; return 1; }
            line+=" ${path[$dep]}"
        done
        printf '%s\n' "$line" >> "$out"
    done
    LC_ALL=C sort -o "$out" "$out"
    mv "$out" "$moddir/modules.dep"
}

modules_install() {
    local moddir=$1 tree=$2
    shift 2
    local release=${moddir%/}
    release=${release##*/}
    local -A dep_of=() path=() builtin=() seen=()
    local -a order=()
    local rel deps name line

    # Index modules.dep: "rel/path.ko[.xz]: dep1 dep2 ..."
    while IFS= read -r line; do
        rel=${line%%:*}
        deps=${line#*:}
        name=$(_mod_norm "$rel")
        path[$name]=$rel
        dep_of[$name]=$deps
    done < "$moddir/modules.dep"
    if [[ -f $moddir/modules.builtin ]]; then
        while IFS= read -r rel; do
            builtin[$(_mod_norm "$rel")]=1
        done < "$moddir/modules.builtin"
    fi

    # Depth-first, dependencies before dependents, each module once.
    _mod_visit() {
        local n d
        n=$(_mod_norm "$1")
        [[ -n ${seen[$n]:-} ]] && return 0
        if [[ -z ${path[$n]:-} ]]; then
            [[ -n ${builtin[$n]:-} ]] && { seen[$n]=1; return 0; }
            echo "build-images: unknown kernel module: $1 (not in modules.dep of $release)" >&2
            return 1
        fi
        seen[$n]=1
        for d in ${dep_of[$n]}; do
            _mod_visit "$d" || return 1
        done
        order+=("${path[$n]}")
    }
    for name in "$@"; do
        _mod_visit "$name" || return 1
    done

    mkdir -p "$tree/etc"
    : > "$tree/etc/modules.order"
    for rel in "${order[@]}"; do
        local dst=lib/modules/$release/${rel%.ko*}.ko
        mkdir -p "$tree/${dst%/*}"
        _mod_cat "$moddir/$rel" > "$tree/$dst"
        printf '/%s\n' "$dst" >> "$tree/etc/modules.order"
    done
}
