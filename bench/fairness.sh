# Fairness benchmark (`make bench-fairness`): one driver VM serving four clients from one
# backing device, 4 KiB random reads with fio (bench/guest-fairness.sh), in two arms:
#   fair - the agent shares the device by weight (SFQ, ddvmm.agent.depth=2, the default);
#   fifo - the same system with ddvmm.agent.fair=off (first come, first served).
# Per arm: the victim (QD1) alone, then beside the aggressor (QD64): the victim's p50/p99
# latency and their ratio to alone; two saturating clients (QD32) of weights 200 and 100:
# their IOPS ratio; and (fair arm) a client limited to LIMIT_IOPS at QD32: its IOPS (the
# emulated test host's driver path does only a few hundred IOPS: the default limit, 100, is
# below that; on hardware use 1000). FAIR_SECS seconds per phase (default 15); the victim's
# two phases run FAIR_REPEATS times per arm (default 1; the table shows medians, and the p99
# ratio is the median of each repeat's ratio). AGENT_OPTS: more agent options for every arm
# (e.g. ddvmm.agent.grace_ms=N).
K=$IMAGES/vmlinuz
DISK=/tmp/pool.img
T=${FAIR_SECS:-15}
R=${FAIR_REPEATS:-1}
LIMIT=${LIMIT_IOPS:-100}
# DEVICE_IOPS: the driver VM's disk as a slower device (so that the device, not the emulated
# CPU, is the bottleneck, as a real disk under a QD64 load is).
DEVICE_LIMIT=""
[ -n "$DEVICE_IOPS" ] && DEVICE_LIMIT="disk_limits = { iops = $DEVICE_IOPS }"
MIB=1048576
: > results.txt

# cmd CLIENT SEQ JOB RW BS IODEPTH SECONDS: the command in the client's control block.
offset_of() { case $1 in victim) echo 0;; aggressor) echo 64;; heavy) echo 128;; limited) echo 192;; esac; }
cmd() {
    at=$(( ($(offset_of $1) + 64) * MIB - 4096 ))
    { printf 'CMD %s %s %s %s %s %s\n' "$2" "$3" "$4" "$5" "$6" "$7"; head -c 4000 /dev/zero; } \
        | head -c 4096 | dd of=$DISK bs=4096 seek=$((at / 4096)) conv=notrunc 2>/dev/null
}
quit() {
    at=$(( ($(offset_of $1) + 64) * MIB - 4096 ))
    { printf 'QUIT\n'; head -c 4000 /dev/zero; } | head -c 4096 \
        | dd of=$DISK bs=4096 seek=$((at / 4096)) conv=notrunc 2>/dev/null
}
wait_done() { # CLIENT SEQ
    n=0
    until tr -d '\r' < system.d/$1.console 2>/dev/null | grep -q -x "DONE $2"; do
        sleep 2; n=$((n + 2))
        [ $((n % 60)) = 0 ] && echo "  waiting for $1 ($2), ${n}s"
        if grep -q "FAIR-CLIENT $1 quits\|FIO-FAILED" system.d/$1.console || [ $n -gt $((10 * T + 600)) ]; then
            echo "client $1 never finished command $2"; tail -20 system.d/$1.console; exit 1
        fi
        kill -0 $DAEMON 2>/dev/null || { echo "daemon died"; tail -20 daemon.log; exit 1; }
    done
    tr -d '\r' < system.d/$1.console | grep "^RESULT $1 " | tail -1 | sed "s/^RESULT/RESULT $ARM/" \
        | tee -a results.txt
}

# CPU ticks (user + system) of every VM's VMM process, one "NAME TICKS" line each.
vm_ticks() {
    $DDVMM ctl --socket system.sock list | tr -d ' \n' | sed 's/},{/}\n{/g' | while read -r vm; do
        name=$(printf '%s' "$vm" | grep -o '"name":"[^"]*"' | cut -d'"' -f4)
        pid=$(printf '%s' "$vm" | grep -o '"vmm_pid":[0-9]*' | cut -d: -f2)
        [ -n "$pid" ] || continue
        t=0
        for f in /proc/$pid/task/*/stat; do
            t=$((t + $(awk '{ print $14 + $15 }' $f 2>/dev/null || echo 0)))
        done
        echo "$name $t"
    done
}
# cpu_share BEFORE-FILE AFTER-FILE SECONDS: each VM's share of one CPU over the interval.
cpu_share() {
    hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
    awk -v s=$3 -v hz=$hz 'NR == FNR { a[$1] = $2; next } { printf " %s %.0f%%", $1, ($2 - a[$1]) * 100 / hz / s }' $1 $2
    echo
}

run_arm() { # ARM AGENT-OPTIONS
    ARM=$1
    echo "=== arm $ARM ($2)"
    rm -rf system.d system.sock
    dd if=/dev/zero of=$DISK bs=1M count=256 2>/dev/null   # no command left from an arm before
    cat > system.toml <<CFG
[[driver]]
name = "storage"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
disks = ["$DISK"]
$DEVICE_LIMIT
cmdline = "console=ttyS0 quiet ddvmm.action=agent $2 $AGENT_OPTS"

[recovery]
boot_timeout_ms = 300000
heartbeat_timeout_ms = 60000
progress_timeout_ms = 120000
CFG
    for c in victim aggressor heavy limited; do
        weight=100; limit=""
        [ $c = heavy ] && weight=200
        [ $c = limited ] && limit="iops = $LIMIT"
        cat >> system.toml <<CFG

[[client]]
name = "$c"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "256M"
cmdline = "console=ttyS0 quiet ddvmm.action=run-script ddvmm.bench.name=$c"
[[client.disk]]
driver = "storage"
offset = "$(offset_of $c)M"
size = "64M"
weight = $weight
$limit
CFG
    done
    $DDVMM --log-level info daemon --config system.toml > daemon.log 2>&1 &
    DAEMON=$!
    for c in victim aggressor heavy limited; do
        until grep -q "FAIR-CLIENT $c up" system.d/$c.console 2>/dev/null; do
            sleep 2; kill -0 $DAEMON 2>/dev/null || { echo "daemon died"; tail -20 daemon.log; exit 1; }
        done
    done
    echo "clients up"
    # The victim alone, then beside the aggressor; commands of repeat r are numbered 10r+.
    r=1
    while [ $r -le $R ]; do
        s=$((10 * r))
        cmd victim $s alone randread 4k 1 $T; wait_done victim $s
        cmd aggressor $((s + 1)) aggressor randread 4k 64 $((T + 10)); sleep 5
        vm_ticks > ticks0; t0=$(date +%s)
        cmd victim $((s + 2)) contended randread 4k 1 $T; wait_done victim $((s + 2))
        vm_ticks > ticks1; echo "CPU while the victim ran beside the aggressor:$(cpu_share ticks0 ticks1 $(($(date +%s) - t0)))"
        wait_done aggressor $((s + 1))
        r=$((r + 1))
    done
    cmd heavy 4 weight200 randread 4k 32 $T; cmd aggressor 5 weight100 randread 4k 32 $T
    wait_done heavy 4; wait_done aggressor 5
    if [ $ARM = fair ] && [ -z "$DEVICE_IOPS" ]; then cmd limited 6 limited randread 4k 32 $T; wait_done limited 6; fi
    $DDVMM ctl --socket system.sock stats | tr -d ' \n' | grep -o '"throttled":[0-9]*' | sort | uniq -c
    for c in victim aggressor heavy limited; do quit $c; done
    sleep 3
    $DDVMM ctl --socket system.sock shutdown > /dev/null
    wait $DAEMON
}

# Arms: fair (depth 2, the default), fair1 (depth 1), fifo (no scheduler).
for arm in ${FAIR_ARMS:-fair fifo}; do
    case $arm in
        fair) run_arm fair "" ;;
        fair1) run_arm fair1 "ddvmm.agent.depth=1" ;;
        fifo) run_arm fifo "ddvmm.agent.fair=off" ;;
        *) echo "unknown arm $arm"; exit 1 ;;
    esac
done

# RESULT <arm> <client> <job> <iops> <p50> <p99>, in order (a victim's alone result, then its
# contended one, per repeat).
awk -v T=$T -v R=$R -v L=$LIMIT -v DEV="${DEVICE_IOPS:+ limited to $DEVICE_IOPS IOPS}" '
function median(a, n,    i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function keep(arm, job, i, x, y,    k) {
    k = arm SUBSEP job
    cnt[k]++; I[k, cnt[k]] = i; P[k, cnt[k]] = x; Q[k, cnt[k]] = y
}
$1 == "RESULT" {
    keep($2, $4, $5, $6, $7)
    if ($4 == "alone") { a50[$2] = $6; a99[$2] = $7 }
    if ($4 == "contended" && a99[$2] > 0 && a50[$2] > 0) {
        nr[$2]++; r99[$2, nr[$2]] = $7 / a99[$2]; r50[$2, nr[$2]] = $6 / a50[$2]
    }
}
END {
    for (k in cnt) {
        m = cnt[k]
        for (i = 1; i <= m; i++) { t1[i] = I[k, i]; t2[i] = P[k, i]; t3[i] = Q[k, i] }
        iops[k] = median(t1, m); p50[k] = median(t2, m); p99[k] = median(t3, m)
    }
    printf "\nfairness: one driver VM, four clients on one device%s, 4 KiB randread, %d s per phase, victim phases %d times (medians)\n", DEV, T, R
    printf "%-5s %-28s %10s %10s %10s\n", "arm", "phase", "IOPS", "p50 us", "p99 us"
    n = split("alone contended aggressor weight200 weight100 limited", jobs, " ")
    na = split("fair fair1 fifo", arms, " ")
    for (a = 1; a <= na; a++) for (j = 1; j <= n; j++) {
        k = arms[a] SUBSEP jobs[j]
        if (k in iops) printf "%-5s %-28s %10d %10d %10d\n", arms[a], jobs[j], iops[k], p50[k], p99[k]
    }
    printf "\n%-5s %-44s %8s\n", "arm", "metric", "value"
    for (a = 1; a <= na; a++) {
        r = arms[a]
        if (nr[r] > 0) {
            each = ""
            for (i = 1; i <= nr[r]; i++) { t1[i] = r99[r, i]; t2[i] = r50[r, i]; each = each sprintf(" %.2f", r99[r, i]) }
            m = nr[r]
            printf "%-5s %-44s %8.2f  (goal <= 2; each repeat:%s)\n", r, "victim p99 beside aggressor / alone", median(t1, m), each
            printf "%-5s %-44s %8.2f\n", r, "victim p50 beside aggressor / alone", median(t2, m)
        }
        if (iops[r, "weight100"] > 0) printf "%-5s %-44s %8.2f  (goal 2 +- 10%%)\n", r, "IOPS weight 200 / weight 100", iops[r, "weight200"] / iops[r, "weight100"]
    }
    if (("fair" SUBSEP "limited") in iops) printf "%-5s %-44s %8d  (limit %d: %+.1f%%)\n", "fair", "IOPS of the client limited to " L, iops["fair", "limited"], L, (iops["fair", "limited"] - L) * 100 / L
}' results.txt
