# Recovery benchmark: one driver VM serving one client VM that loops fio with crc32c verify.
# Two arms, one daemon each, in one run:
#   boot     the control: restore_from_template = false. The driver VM's cold boot time (API
#            stop + start, COLD_BOOTS times), then FAULTS_PER_KIND injected faults of each kind,
#            every restart a cold boot.
#   restore  the default: every restart restores the template the first boot made.
#            FAULTS_PER_KIND faults of each kind, then SOAK_FAULTS mixed faults (0 by default;
#            `make soak-recovery` sets 1000).
# Prints per arm and kind the detection latency and the outage (fault to the first completion
# after the restart) as median / p95 / max, the restart time (new driver VM start to agents
# ready) and outage / cold boot; the template writes; the clients' fio verify results.
# Absolute times come from an emulated CPU here: read the ratios.
FAULTS_PER_KIND=${FAULTS_PER_KIND:-5}
SOAK_FAULTS=${SOAK_FAULTS:-0}
COLD_BOOTS=${COLD_BOOTS:-5}
KINDS=${KINDS:-"panic hang kill triple-fault corrupt reset"}
ARMS=${ARMS:-"boot restore"}
# The control arm's kinds (each of its faults costs a cold boot).
BOOT_KINDS=${BOOT_KINDS:-$KINDS}
K=$IMAGES/vmlinuz
DISK=/tmp/pool.img

campaign() {
    label=$1; shift
    $CTL campaign storage "$@" > c-$label.json 2>&1 &
    cpid=$!; seen=""; quiet=0
    while kill -0 $cpid 2>/dev/null; do
        sleep 5; quiet=$((quiet + 5))
        n=$($CTL events | tr -d ' \n' | grep -o '"detected_by"' | wc -l)
        if [ "$n" != "$seen" ]; then echo "faults so far: $n"; seen=$n; quiet=0; fi
        [ $quiet -ge 60 ] && echo "faults so far: $n (waiting)" && quiet=0
    done
    wait $cpid || { echo "campaign $label failed:"; cat c-$label.json; }
}

cold_boots() {
    i=0
    while [ $i -lt $COLD_BOOTS ]; do
        i=$((i + 1))
        before=$($CTL events | tr -d ' \n' | sed 's/.*"cold_boots_ms":\[\([^]]*\)\].*/\1/' | tr ',' '\n' | grep -c .)
        $CTL stop storage > /dev/null; $CTL start storage > /dev/null
        while :; do
            sleep 1
            n=$($CTL events | tr -d ' \n' | sed 's/.*"cold_boots_ms":\[\([^]]*\)\].*/\1/' | tr ',' '\n' | grep -c .)
            [ "$n" -gt "$before" ] && break
        done
        echo "cold boot $i done"
    done
}

# run_arm ARM RESTORE: one daemon, one client, the faults; leaves events-ARM.json.
run_arm() {
    arm=$1
    rm -rf system.d system.sock
    dd if=/dev/zero of=$DISK bs=1M count=64 2>/dev/null
    cat > system.toml <<CFG
[[driver]]
name = "storage"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
disks = ["$DISK"]

[[client]]
name = "bench"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "384M"
cmdline = "console=ttyS0 quiet ddvmm.action=run-script"
[[client.disk]]
driver = "storage"
size = "64M"

[recovery]
boot_timeout_ms = 90000
heartbeat_timeout_ms = 8000
progress_timeout_ms = 60000
backoff_initial_ms = 100
backoff_max_ms = 2000
max_restarts = 100000
restart_window_s = 60
restore_from_template = $2
CFG
    $DDVMM --log-level info daemon --config system.toml > daemon-$arm.log 2>&1 &
    DAEMON=$!
    CTL="$DDVMM ctl --socket system.sock"
    until grep -q "ROUND 1 " system.d/bench.console 2>/dev/null; do
        sleep 5; kill -0 $DAEMON 2>/dev/null || { echo "daemon died"; cat daemon-$arm.log; exit 1; }
    done
    echo "=== arm $arm: client running"
    [ "$arm" = boot ] && cold_boots
    kinds=$KINDS; [ "$arm" = boot ] && kinds=$BOOT_KINDS
    for k in $kinds; do
        echo "=== $arm: $FAULTS_PER_KIND x $k"
        campaign $arm-$k --faults $FAULTS_PER_KIND --kinds $k --min-interval-ms 500 --max-interval-ms 3000
    done
    if [ "$arm" = restore ] && [ "$SOAK_FAULTS" -gt 0 ]; then
        echo "=== soak: $SOAK_FAULTS mixed faults"
        fds0=$(ls /proc/$DAEMON/fd | wc -l); rss0=$(grep VmRSS /proc/$DAEMON/status | tr -s ' ' | cut -d' ' -f2)
        campaign soak --faults $SOAK_FAULTS --min-interval-ms 0 --max-interval-ms 3000 --seed ${SOAK_SEED:-11}
        fds1=$(ls /proc/$DAEMON/fd | wc -l); rss1=$(grep VmRSS /proc/$DAEMON/status | tr -s ' ' | cut -d' ' -f2)
        echo "SOAK-DAEMON fds $fds0 -> $fds1, rss_kib $rss0 -> $rss1"
    fi
    printf 'DDVMM-STOP' | dd of=$DISK bs=1 seek=$((60 * 1048576)) conv=notrunc 2>/dev/null
    sync
    until grep -q DDVMM-GUEST-SCRIPT-EXIT system.d/bench.console 2>/dev/null; do
        sleep 5; kill -0 $DAEMON 2>/dev/null || break
    done
    tr -d '\r' < system.d/bench.console | grep -E "CLIENT-RESULT|FIO-FAILED" | sed "s/^/$arm: /"
    if [ "$arm" = restore ] && [ "$SOAK_FAULTS" -gt 0 ]; then
        ev=$($CTL events | tr -d ' \n' | sed 's/},{/}\n{/g')
        fio_failures=$(tr -d '\r' < system.d/bench.console | grep -c FIO-FAILED)
        echo "SOAK-RESULT faults=$(echo "$ev" | grep -c '"detected_by"') restores=$(echo "$ev" | grep -c '"restart":"restore"') standby=$(echo "$ev" | grep -c '"standby":true') fallbacks=$(echo "$ev" | grep -c '"fallback"') quarantined=$(echo "$ev" | grep -c '"outcome":"quarantined"') fio_failures=$fio_failures"
    fi
    grep -h "snapshot template written" system.d/storage.log 2>/dev/null \
        | sed -n 's/.*ram_bytes_written=\([0-9]*\).*ms=\([0-9]*\).*/\1 \2/p' \
        | awk -v arm=$arm '{ n++; b += $1; t += $2 } END { if (n) printf "%s: %d template writes, %.0f MiB of RAM, %.0f ms each (mean)\n", arm, n, b / n / 1048576, t / n }'
    $CTL events | tr -d ' \n' > events-$arm.json
    $CTL metrics | grep -E "^ddvmm_(driver_faults|driver_restarts|requests_replayed|poison|quarantines|ring_disk_errors)" | sed "s/^/$arm: /"
    if [ -n "$TIMELINE" ]; then
        echo "--- the driver VM's console, last 40 lines"
        tr -d '\r' < system.d/storage.console | tail -n 40
        dmesg | grep -i -E "oom|killed process" | tail -n 5
        find /sys/fs/cgroup -path "*ddvmm-*" -name memory.events | while read -r f; do
            echo "$f: $(tr '\n' ' ' < $f) peak=$(cat ${f%events}peak 2>/dev/null) max=$(cat ${f%events}max)"
        done
        sed 's/},{/}\n{/g' events-$arm.json | grep -v '"restart":"restore"' | head -n 5
    fi
    $CTL shutdown > /dev/null
    wait $DAEMON
}

for arm in $ARMS; do
    case $arm in boot) run_arm boot false ;; restore) run_arm restore true ;; esac
    [ -n "$TIMELINE" ] && grep -a -E "injecting fault|VM process ended|driver VM fault|VM started|driver VM recovered|released|agents ready|standby" daemon-$arm.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c12-150
    [ -n "$TIMELINE" ] && grep -a -h -E "restored from snapshot|restored VM running|VM set up|parked|standby|passed the gate" system.d/storage.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c12-150
done
[ -f events-boot.json ] || echo '{}' > events-boot.json
[ -f events-restore.json ] || echo '{}' > events-restore.json

# One line per event: arm kind detect_ms outage_ms boot_ms restart; and the cold boots.
sed 's/"cold_boots_ms":\[\([^]]*\)\]/\n&\n/' events-boot.json | grep '^"cold_boots_ms"' \
    | sed 's/.*\[\(.*\)\]/\1/' | tr ',' '\n' | grep . | sed 's/^/cold /' > samples.txt
for arm in boot restore; do
    sed 's/},{/}\n{/g' events-$arm.json | grep '"injected":"' | while read -r e; do
        kind=$(echo "$e" | sed 's/.*"injected":"\([a-z-]*\)".*/\1/')
        field() { echo "$e" | sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
        how=$(echo "$e" | sed -n 's/.*"restart":"\([a-z]*\)".*/\1/p')
        sb=$(echo "$e" | sed -n 's/.*"standby":\([a-z]*\).*/\1/p')
        f() { v=$(field $1); echo "${v:--}"; }
        echo "$arm/$kind $(f detect_ms) $(f outage_ms) $(f boot_ms) $how $(f kill_ms) $(f replay_ms) $(f backoff_ms) $(f start_ms) $(f release_ms) $(f serve_ms) ${sb:--}"
    done
done >> samples.txt
echo "restarts by arm and kind of restart:"
awk '$1 != "cold" { split($1, a, "/"); c[a[1] " " $5]++ } END { for (k in c) print "  " k ": " c[k] }' samples.txt

awk '
function sort(a, c,    i, j, x) { for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x } }
function pct(a, c, p,    r) { if (!c) return 0; r = int(c * p + 0.999999); if (r < 1) r = 1; return a[r] }
$1 == "cold" { cb[++ncb] = $2; next }
NF >= 3 && $3 != "-" {
    k = $1; if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
    n[k]++; d[k, n[k]] = $2; o[k, n[k]] = $3; b[k, n[k]] = $4
    split(k, ap, "/"); all[ap[1], ++na[ap[1]]] = $3
}
END {
    sort(cb, ncb); cold = pct(cb, ncb, 0.5)
    printf "\ndriver VM cold boot (start to agent ready), median of %d: %.0f ms\n\n", ncb, cold
    printf "%-21s %4s %9s %9s %10s %10s %10s %10s %8s\n", "arm/fault", "n", "detect50", "detect95", "outage50", "outage95", "outageMax", "restart50", "out/cold"
    for (i = 1; i <= nk; i++) {
        k = order[i]; c = n[k]
        for (j = 1; j <= c; j++) { dd[j] = d[k, j]; oo[j] = o[k, j]; bb[j] = b[k, j] }
        sort(dd, c); sort(oo, c); sort(bb, c)
        printf "%-21s %4d %9.0f %9.0f %10.0f %10.0f %10.0f %10.0f %8.2f\n", k, c, pct(dd, c, 0.5), pct(dd, c, 0.95), pct(oo, c, 0.5), pct(oo, c, 0.95), oo[c], pct(bb, c, 0.5), (cold > 0 ? pct(oo, c, 0.5) / cold : 0)
        delete dd; delete oo; delete bb
    }
    for (a = 0; a < 2; a++) {
        arm = a ? "restore" : "boot"; c = na[arm]
        for (j = 1; j <= c; j++) t[j] = all[arm, j]
        sort(t, c)
        printf "%-21s %4d %9s %9s %10.0f %10.0f %10.0f %10s %8.2f\n", arm "/all", c, "", "", pct(t, c, 0.5), pct(t, c, 0.95), t[c], "", (cold > 0 ? pct(t, c, 0.5) / cold : 0)
        delete t
    }
    printf "\n(ms; detect = injection to detection; outage = fault to the first completion after the\n restart; restart = new driver VM start to agents ready)\n"
}' samples.txt

# The timeline of the recovered rounds, step by step (medians), to check what a restart would
# cost where an exit is ~1 us instead of the emulator's much more.
awk '
function med(k, f,    c, i, j, x, t) { c = 0; for (i = 1; i <= n[k]; i++) if (v[k, f, i] != "-") t[++c] = v[k, f, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (t[j] < t[i]) { x = t[i]; t[i] = t[j]; t[j] = x }
    return c ? ((c % 2) ? t[(c + 1) / 2] : (t[c / 2] + t[c / 2 + 1]) / 2) : -1 }
$1 != "cold" && $3 != "-" {
    k = $1; if (!(k in seen)) { seen[k] = 1; order[++nk] = k }; n[k]++
    v[k, 1, n[k]] = $2; v[k, 2, n[k]] = $6; v[k, 3, n[k]] = $7; v[k, 4, n[k]] = $8; v[k, 5, n[k]] = $9
    v[k, 6, n[k]] = $4; v[k, 7, n[k]] = $10; v[k, 8, n[k]] = $11; v[k, 9, n[k]] = $3
    if ($12 == "true") sb[k]++
}
END {
    printf "\nrecovery timeline, median per step (ms): detect -> kill -> replay -> backoff -> start ->\n"
    printf "agents ready -> release -> first completion; standby = restarts that resumed a standby VMM\n"
    printf "%-21s %7s %7s %7s %7s %7s %7s %7s %7s %8s %8s\n", "arm/fault", "detect", "kill", "replay", "backoff", "start", "ready", "release", "serve", "outage", "standby"
    for (i = 1; i <= nk; i++) { k = order[i]
        printf "%-21s", k; for (f = 1; f <= 9; f++) { m = med(k, f); if (m < 0) printf " %7s", "-"; else printf " %7.0f", m }
        printf " %5d/%-2d\n", sb[k], n[k] }
}' samples.txt
