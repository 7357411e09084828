# Shared by the benchmark scripts (prepended by `testhost --lib bench/lib.sh`).

# ratio_table RESULTS A B: RESULTS holds lines "<path> RESULT <metric> <value>" for paths A and
# B (several runs each); prints, per metric in first-seen order, the median of A, of B and A/B.
ratio_table() {
    awk -v a="$2" -v b="$3" '
{ path = $1; m = $3; n[path, m]++; v[path, m, n[path, m]] = $4; if (!(m in seen)) { seen[m] = 1; order[++k] = m } }
function median(path, m,    c, i, j, t, x) {
    c = n[path, m]; if (!c) return 0
    for (i = 1; i <= c; i++) t[i] = v[path, m, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (t[j] < t[i]) { x = t[i]; t[i] = t[j]; t[j] = x }
    return (c % 2) ? t[(c + 1) / 2] : (t[c / 2] + t[c / 2 + 1]) / 2
}
END {
    printf "\n%-28s %12s %12s %8s\n", "metric (median of runs)", a, b, "ratio"
    for (i = 1; i <= k; i++) {
        m = order[i]; x = median(a, m); y = median(b, m)
        printf "%-28s %12.1f %12.1f %8s\n", m, x, y, (y > 0 ? sprintf("%.2f", x / y) : "n/a")
    }
}' "$1"
}

# --- Work per request: what carries over to hardware (an exit costs ~1 us there, far more on
# the emulated CPU here, so these counts matter more than the emulated timings).

# kvm_vms: "<pid> <vm> <debugfs dir>" for every VMM process running a KVM guest (a standby,
# which runs none yet, is left out). <vm> is the VM's console file name without `.console`
# ("direct" for a VMM whose console is its standard output).
kvm_vms() {
    [ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
    for d in /sys/kernel/debug/kvm/*-*; do
        [ -r "$d/exits" ] || continue
        pid=${d##*/}; pid=${pid%%-*}
        tr '\0' '\n' < /proc/$pid/cmdline 2>/dev/null | grep -q -x -- --standby && continue
        vm=$(tr '\0' '\n' < /proc/$pid/cmdline 2>/dev/null | awk 'p { print; exit } $0 == "--console" { p = 1 }')
        vm=${vm##*/}; vm=${vm%.console}
        case $vm in ""|stdout) vm=direct ;; esac
        echo "$pid $vm $d"
    done
}

# stats_page FILE: the JSON a VMM published in its stats page (vmm/src/stats_page.rs: seq,
# len, JSON; read again while a write was under way), or nothing.
stats_page() {
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        s0=$(od -An -tu8 -N8 "$1" 2>/dev/null | tr -d ' ')
        len=$(od -An -tu8 -j8 -N8 "$1" 2>/dev/null | tr -d ' ')
        json=$(tail -c +17 "$1" 2>/dev/null | head -c "${len:-0}")
        s1=$(od -An -tu8 -N8 "$1" 2>/dev/null | tr -d ' ')
        if [ -n "$s0" ] && [ "$s0" = "$s1" ] && [ $((s0 % 2)) = 0 ]; then echo "$json"; return; fi
        sleep 0.01
    done
}

# vmm_exits PID: the exits of that VMM's vCPUs that reached its userspace, from the stats page
# it publishes (the daemon's memfd, or the file a bench hands `ddvmm run --stats-fd`); -1
# when it publishes none.
vmm_exits() {
    for f in /proc/$1/fd/*; do
        case $(readlink $f 2>/dev/null) in *ddvmm-stats*|*vmm.stats*) ;; *) continue ;; esac
        stats_page $f | grep -o '"vmm_exits":{[^}]*}' | grep -o '[0-9][0-9]*' | awk '{ s += $1 } END { print (NR ? s : -1) }'
        return
    done
    echo -1
}

# kvm_work: one line per VM of kvm_vms:
#   <vm> <exits> <to-vmm> <pio+mmio> <halts> <npf> <host-irqs> <irqs> <vmm-switches>
# from KVM's own statistics of the VM (debugfs, summed over its vCPUs), the VMM's count of
# the exits that reached it, and the context switches of the VMM's threads.
kvm_work() {
    kvm_vms | while read -r pid vm d; do
        cs=$(cat /proc/$pid/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }')
        # Exits, of them those that reached the VMM's userspace and port I/O and MMIO (KVM's
        # io_exits count every port exit, also those KVM handles itself: ioeventfds, coalesced
        # writes), halts, nested page faults and host interrupts; interrupts injected; the VMM
        # threads' switches.
        echo "$vm $(cat $d/exits) $(vmm_exits $pid) $(($(cat $d/io_exits) + $(cat $d/mmio_exits))) $(cat $d/halt_exits) $(cat $d/pf_taken) $(cat $d/irq_exits) $(cat $d/irq_injections) $cs"
    done
}

# work_watch CONSOLE PATH (in the background, until a file work.stop appears): at each
# "JOB-BEGIN <job>" and "JOB-END <job> <requests> <guest-switches> <guest-interrupts>" line the
# guest script prints on CONSOLE (it idles a second after each, so a snapshot taken within this
# 0.1 s poll holds the job's work only, plus under a second of idling), appends kvm_work to
# work.txt as "<path> <job> BEGIN|END <vm> <counters>", and the guest's counts as
# "<path> <job> GUEST <requests> <guest-switches> <guest-interrupts>".
work_watch() {
    seen=0
    until [ -f work.stop ]; do
        sleep 0.1
        n=$(grep -a -c -E '^JOB-(BEGIN|END) ' "$1" 2>/dev/null)
        [ "${n:-0}" -gt "$seen" ] || continue
        kvm_work > work.snap
        grep -a -E '^JOB-(BEGIN|END) ' "$1" | tr -d '\r' | tail -n $((n - seen)) | while read -r tag job rest; do
            sed "s/^/$2 $job ${tag#JOB-} /" work.snap >> work.txt
            [ "$tag" = JOB-END ] && echo "$2 $job GUEST $rest" >> work.txt
        done
        seen=$n
    done
    rm -f work.stop
}

# work_table WORK UNIT: per path, job and VM, the medians over runs of each counter of
# kvm_work per request (exits; of them to the VMM's userspace, port I/O and MMIO, halts,
# nested page faults, host interrupts; interrupts injected; VMM thread switches), the sum over
# the path's VMs, and the client guest's own context switches and interrupts per request.
work_table() {
    awk -v unit="$2" '
BEGIN { nc = split("exits to-vmm pio+mmio halt npf host-irq irqs vmm-cs", hdr, " ") }
$3 == "BEGIN" { v = ""; for (i = 5; i <= NF; i++) v = v " " $i; b[$1, $2, $4] = v; vms[$1, $2, $4] = 1
    if (!(($1, $2) in seenj)) { seenj[$1, $2] = 1; jobs[++nj] = $1 SUBSEP $2 } next }
$3 == "END"   { if (($1, $2, $4) in b) { split(b[$1, $2, $4], x, " "); v = ""
    # A counter that could not be read at either end (-1) is left out of that run.
    for (i = 5; i <= NF; i++) v = v " " (($i < 0 || x[i - 4] < 0) ? "NA" : $i - x[i - 4])
    pend[$1, $2, $4] = v } next }
$3 == "GUEST" {
    r = $4; if (r <= 0) next
    for (k in pend) { split(k, p, SUBSEP); if (p[1] != $1 || p[2] != $2) continue
        n = split(pend[k], d, " "); cnt[k]++
        for (i = 1; i <= nc; i++) if (d[i] != "NA") { c = ++ci[k, i]; val[k, i, c] = (i <= n) ? d[i] / r : 0 }
        delete pend[k] }
    kg = $1 SUBSEP $2; cg = ++gcnt[kg]; gv[kg, 1, cg] = $5 / r; gv[kg, 2, cg] = $6 / r
}
function med(arr, k, i, c,    t, a, j, x) {
    for (a = 1; a <= c; a++) t[a] = arr[k, i, a]
    for (a = 1; a <= c; a++) for (j = a + 1; j <= c; j++) if (t[j] < t[a]) { x = t[a]; t[a] = t[j]; t[j] = x }
    return (c % 2) ? t[(c + 1) / 2] : (t[c / 2] + t[c / 2 + 1]) / 2
}
END {
    printf "\nwork per %s (median of runs; KVM statistics per VM: exits, of them those that reached the\n", unit
    printf "VMM process (its own count), port I/O and MMIO, halts, nested page faults, host interrupts;\n"
    printf "interrupts injected; the VMM threads\x27 context switches; the client guest\x27s own switches\n"
    printf "and interrupts)\n"
    printf "%-7s %-18s %-8s", "path", "job", "vm"
    for (i = 1; i <= nc; i++) printf " %8s", hdr[i]
    printf " %9s %9s\n", "guest-cs", "guest-irq"
    for (j = 1; j <= nj; j++) {
        split(jobs[j], pj, SUBSEP); for (i = 1; i <= nc; i++) sum[i] = 0; n = 0
        for (k in vms) { split(k, p, SUBSEP); if (p[1] != pj[1] || p[2] != pj[2] || !cnt[k]) continue
            printf "%-7s %-18s %-8s", pj[1], pj[2], p[3]
            for (i = 1; i <= nc; i++) { m = ci[k, i] ? med(val, k, i, ci[k, i]) : 0; sum[i] += m; printf " %8.2f", m }
            printf "\n"; n++ }
        kg = pj[1] SUBSEP pj[2]
        if (n) { printf "%-7s %-18s %-8s", pj[1], pj[2], "(all)"
            for (i = 1; i <= nc; i++) printf " %8.2f", sum[i]
            printf " %9.2f %9.2f\n", med(gv, kg, 1, gcnt[kg]), med(gv, kg, 2, gcnt[kg]) }
    }
}' "$1"
}

# host_network PEER_IP: the host side of a driver VM's NIC, for the network benches, the demo
# and the tests: a persistent TAP `ddtap0` (it outlives each driver VMM process, so a restarted
# driver VM finds its link where it was) on bridge `hbr0` with one end of a veth pair whose
# other end is in network namespace `peer` at PEER_IP. Sets $PEER (run a command as the peer).
host_network() {
    ip tuntap add dev ddtap0 mode tap vnet_hdr
    ip link add hbr0 type bridge
    ip link set ddtap0 master hbr0
    ip link add veth0 type veth peer name veth1
    ip link set veth0 master hbr0
    ip netns add peer
    ip link set veth1 netns peer
    ip -n peer addr add $1/24 dev veth1
    ip -n peer link set veth1 up
    ip -n peer link set lo up
    for l in veth0 hbr0 ddtap0; do ip link set $l up; done
    PEER="ip netns exec peer"
}
