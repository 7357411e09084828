# The demo (`make demo`): what ddvmm is for, in a couple of minutes. One *driver VM* runs an
# unmodified Linux kernel that owns the disk and the network card and drives them with Linux's
# own drivers; two *client VMs* (alice, bob) see ordinary virtio devices, served by the driver
# VM through shared-memory rings. Mid-way the driver VM's kernel is made to panic: the daemon
# restores it from a snapshot and replays the clients' in-flight requests, and the clients see
# a pause, never an error. Runs directly on a host with hardware KVM, otherwise inside the
# emulated test host (about 25 times slower). $DDVMM is the ddvmm binary, $IMAGES the guest
# images, $WORK/guest.img the client image (scripts/demo-guest.sh), $WORK/driver.img the
# driver VM's image (stock kernel modules + the translation agent).
K=$IMAGES/vmlinuz
DISK=/tmp/demo-pool.img
dd if=/dev/zero of=$DISK bs=1M count=64 2>/dev/null
# The host network: a TAP the driver VM's NIC sits on, bridged with a peer (a web server).
host_network 10.0.0.1
mkdir -p /tmp/www && head -c 262144 /dev/urandom > /tmp/www/blob
$PEER httpd -p 8080 -h /tmp/www

client() { # NAME INDEX
    cat <<CFG

[[client]]
name = "$1"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "256M"
cmdline = "console=ttyS0 quiet ddvmm.action=run-script ddvmm.demo.name=$1 ddvmm.demo.ip=10.0.0.$(($2 + 2)) ddvmm.demo.peer=10.0.0.1"
[[client.disk]]
driver = "storage"
offset = "$(($2 * 16))M"
size = "16M"
[[client.net]]
driver = "storage"
mac = "52:54:00:de:00:0$(($2 + 1))"
CFG
}
{
    cat <<CFG
# One driver VM owning the disk (/dev/vda inside) and the NIC (eth0 inside).
[[driver]]
name = "storage"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
disks = ["$DISK"]
taps = ["ddtap0"]
CFG
    client alice 0
    client bob 1
} > system.toml
echo "=== the system (system.toml)"
grep -v '^#' system.toml | grep -E '^\[|^name|^disks|^taps|^offset|^size|^mac'
echo
echo "=== starting the daemon: the driver VM boots first, then the clients"
$DDVMM --log-level warn daemon --config system.toml > daemon.log 2>&1 &
DAEMON=$!
CTL="$DDVMM ctl --socket system.sock"

shown_alice=0; shown_bob=0
# Prints the clients' new DEMO lines; returns once each has printed $1 rounds in all.
follow() {
    while :; do
        for c in alice bob; do
            eval shown=\$shown_$c
            [ -f system.d/$c.console ] || continue
            lines=$(tr -d '\r' < system.d/$c.console | grep "^DEMO")
            n=$(printf '%s\n' "$lines" | grep -c "^DEMO")
            if [ "$n" -gt "$shown" ]; then
                printf '%s\n' "$lines" | tail -n $((n - shown)) | sed 's/^DEMO/  /'
                eval shown_$c=$n
            fi
        done
        a=$(grep -c "^DEMO alice round" system.d/alice.console 2>/dev/null)
        b=$(grep -c "^DEMO bob round" system.d/bob.console 2>/dev/null)
        [ "${a:-0}" -ge "$1" ] && [ "${b:-0}" -ge "$1" ] && return
        kill -0 $DAEMON 2>/dev/null || { echo "the daemon died:"; tail -20 daemon.log; exit 1; }
        sleep 1
    done
}
follow 3
echo
echo "=== $(date +%T) injecting a kernel panic into the driver VM (ddvmm ctl inject storage panic)"
$CTL inject storage panic
follow 7
echo
echo "=== stopping the clients"
for i in 0 1; do
    printf 'DDVMM-STOP' | dd of=$DISK bs=1 seek=$(( (i * 16 + 16) * 1048576 - 4096 )) conv=notrunc 2>/dev/null
done
until grep -q DEMO-RESULT system.d/alice.console && grep -q DEMO-RESULT system.d/bob.console; do
    sleep 1; follow 0 > /dev/null
done
tr -d '\r' < system.d/alice.console | grep DEMO-RESULT | sed 's/^DEMO-RESULT/  result:/'
tr -d '\r' < system.d/bob.console | grep DEMO-RESULT | sed 's/^DEMO-RESULT/  result:/'
echo
echo "=== what the daemon saw (ddvmm ctl events)"
$CTL events | tr -d ' \n' | sed 's/},{"driver"/}\n{"driver"/g' | grep -o '{"driver".*' | while read -r e; do
    field() { printf '%s' "$e" | grep -o "\"$1\":[^,}]*" | head -1 | cut -d: -f2 | tr -d '"'; }
    ms() { field $1 | awk '$1 == "null" || $1 == "" { printf "n/a"; next } { printf "%.0f", $1 }'; }
    echo "  fault in driver VM $(field driver): injected $(field injected), detected by $(field detected_by) in $(ms detect_ms) ms"
    how="booted"; [ "$(field restart)" = restore ] && how="restored from its snapshot"
    [ "$(field standby)" = true ] && how="$how (restored ahead of time, resumed)"
    echo "  $(field outcome): $how; the clients' outage: $(ms outage_ms) ms; requests replayed: $(field replayed)"
done
echo "  the driver VM's cold boot, for comparison: $($CTL events | tr -d ' \n' | grep -o '"cold_boots_ms":\[[^]]*' | cut -d[ -f2 | awk -F, '{ printf "%.0f", $1 }') ms"
echo
echo "=== per-client counters (ddvmm ctl stats)"
$CTL stats > stats.json
for c in alice bob; do
    s=$(tr -d ' \n' < stats.json | grep -o "\"$c\":{.*")
    get() { v=$(printf '%s' "$s" | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2); echo "${v:-0}"; }
    echo "  $c: disk: $(get guest_completed) requests, $(( $(get written_bytes) >> 20 )) MiB written," \
        "$(( $(get read_bytes) >> 20 )) MiB read, $(get replayed) replayed after the fault, $(get errors) errors;" \
        "network: $(get tx_frames) frames sent, $(get rx_frames) received"
done
echo
$CTL shutdown
wait $DAEMON
echo "=== done (daemon exit status $?)"
