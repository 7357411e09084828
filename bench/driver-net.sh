# Network path benchmark: the same client guest (bench/guest-net.sh: ping latency, iperf3 TCP
# both ways) against the same peer on the same host network, in one run, through
#   direct  - ddvmm's own virtio-net on the host TAP, and
#   driver  - a virtio-net NIC served by a driver VM (stock kernel, its own bridge and
#             virtio-net driver on the same TAP), through the daemon.
# The peer sits behind a veth pair in network namespace `peer`. Prints medians and
# driver/direct ratios; absolute numbers come from an emulated CPU here: read the ratios.
K=$IMAGES/vmlinuz
CMD="console=ttyS0 quiet ddvmm.action=run-script"
MAC=52:54:00:dd:00:01
IP=ip
host_network 10.0.0.1
$PEER iperf3 -s -D
: > results.txt
ROUNDS=${ROUNDS:-2}

direct() {
    echo "=== direct (round $1) ==="
    : > direct.out
    work_watch direct.out direct &
    $DDVMM run --kernel $K --initrd $WORK/guest.img --mem 512M --cpus 2 \
        --net tap=ddtap0,mac=$MAC --stats-fd 9 --cmdline "$CMD" 9<>vmm.stats 2>&1 \
        | tee direct.out | grep -a RESULT
    touch work.stop; wait
    tr -d '\r' < direct.out | grep -a RESULT | sed 's/^/direct /' >> results.txt
    grep -q RESULT direct.out || { echo "direct run produced no results:"; tail -30 direct.out; }
    $IP -n peer neigh flush dev veth1
}

driver() {
    echo "=== through the driver VM (round $1) ==="
    cat > system.toml <<CFG
[[driver]]
name = "netdrv"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
cpus = 1
taps = ["ddtap0"]

[[client]]
name = "bench"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "512M"
cpus = 2
cmdline = "$CMD"
[[client.net]]
driver = "netdrv"
mac = "$MAC"
CFG
    rm -rf system.d
    $DDVMM --log-level info daemon --config system.toml > daemon.log 2>&1 &
    DAEMON=$!
    CTL="$DDVMM ctl --socket system.sock"
    until [ -f system.d/bench.console ] || ! kill -0 $DAEMON 2>/dev/null; do sleep 0.2; done
    work_watch system.d/bench.console driver &
    WATCH=$!
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
    $CTL metrics | grep -E 'ddvmm_ring_net_(tx_frames|rx_frames|kicks|doorbells|tx_dropped|rx_dropped)'
    $CTL shutdown > /dev/null
    wait $DAEMON
    $IP -n peer neigh flush dev veth1
}

# Alternating rounds, so slow drifts of the emulator hit both paths alike.
r=1
while [ $r -le $ROUNDS ]; do
    direct $r
    driver $r
    r=$((r + 1))
done
ratio_table results.txt driver direct
work_table work.txt "frame (the client's eth0 frames sent and received)"
