# Block path benchmark: the same client guest and fio jobs (bench/guest-blk.sh) on
#   direct  - ddvmm's own virtio-blk over the backing file, and
#   driver  - a virtio-blk disk served by a driver VM (stock kernel, translation agent,
#             O_DIRECT on its virtio-blk over the same backing file), through the daemon,
# in one run. Prints medians, driver/direct ratios, and the driver VM's resident memory and
# idle CPU use. Absolute numbers come from an emulated CPU here: read the ratios.
K=$IMAGES/vmlinuz
DISK=/tmp/pool.img
dd if=/dev/zero of=$DISK bs=1M count=256 2>/dev/null
CMD="console=ttyS0 quiet ddvmm.action=run-script"

echo "=== direct ==="
# Results are shown as they come (the emulated host's harness treats long silence as a hang).
: > direct.out
work_watch direct.out direct &
# (A stats page, as the daemon gives its VMMs: the exits that reached the VMM are counted there.)
$DDVMM run --kernel $K --initrd $WORK/guest.img --mem 512M --cpus 2 --disk $DISK \
    --stats-fd 9 --cmdline "$CMD" 9<>vmm.stats 2>&1 | tee direct.out | grep -a RESULT
touch work.stop; wait
tr -d '\r' < direct.out | grep -a RESULT | sed 's/^/direct /' > results.txt
grep -q RESULT direct.out || { echo "direct run produced no results:"; tail -30 direct.out; }

echo "=== through the driver VM ==="
cat > system.toml <<CFG
[[driver]]
name = "storage"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
cpus = 1
disks = ["$DISK"]

[[client]]
name = "bench"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "512M"
cpus = 2
cmdline = "$CMD"
[[client.disk]]
driver = "storage"
size = "256M"
CFG
$DDVMM --log-level info daemon --config system.toml > daemon.log 2>&1 &
DAEMON=$!
until [ -f system.d/bench.console ] || ! kill -0 $DAEMON 2>/dev/null; do sleep 0.2; done
work_watch system.d/bench.console driver &
WATCH=$!
CTL="$DDVMM ctl --socket system.sock"
shown=0
until grep -q DDVMM-GUEST-SCRIPT-EXIT system.d/bench.console 2>/dev/null; do
    sleep 5
    n=$(grep -a -c RESULT system.d/bench.console 2>/dev/null)
    if [ "${n:-0}" -gt $shown ]; then
        grep -a RESULT system.d/bench.console | tail -n $((n - shown)); shown=$n
    fi
    kill -0 $DAEMON 2>/dev/null || { echo "daemon died"; cat daemon.log; break; }
done
touch work.stop; wait $WATCH
tr -d '\r' < system.d/bench.console | grep RESULT | sed 's/^/driver /' >> results.txt
grep -q RESULT system.d/bench.console || { echo "driver run produced no results:"; tail -30 system.d/bench.console; }

# The driver VM now idles (its client is gone): resident memory and CPU over 20 s.
$CTL list > list.json
dpid=$(awk '/"name": "storage"/ { f = 1 } f && /"pid"/ { gsub(/[^0-9]/, "", $2); print $2; exit }' list.json)
# The daemon's child is the jail's reaper; the VMM is its child (PID 1 of the jail).
vmm=$(cat /proc/$dpid/task/$dpid/children 2>/dev/null | awk '{ print $1 }')
[ -n "$vmm" ] && dpid=$vmm
rss_kib=$(awk '/^VmRSS/ { print $2 }' /proc/$dpid/status)
ticks() { awk '{ print $14 + $15 }' /proc/$dpid/stat; }
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
t0=$(ticks); sleep 20; t1=$(ticks)
$CTL stats | grep -E '"(submitted|completed|errors|bogus_completions)"'
$CTL shutdown > /dev/null
wait $DAEMON

ratio_table results.txt driver direct
work_table work.txt "request (the client's block-layer completions)"
awk -v rss="$rss_kib" -v ticks="$((t1 - t0))" -v hz="$hz" 'BEGIN {
    printf "\ndriver VM (256 MiB guest, 1 vCPU): resident %d KiB; idle CPU %.2f%% of one core (20 s)\n", rss, ticks * 100 / hz / 20
}'
