# Runs inside each demo client VM: a stock Debian kernel that sees a plain virtio disk and a
# plain virtio NIC (it knows nothing of driver VMs). Every round: 2 MiB of fresh random data
# written to the disk, flushed, read back and compared; a 256 KiB download from the peer's web
# server. Stops when the host writes DDVMM-STOP into the last 4 KiB of its disk.
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^ddvmm.demo.$1=//p"; }
NAME=$(arg name); IP=$(arg ip); PEER=$(arg peer)
ip addr add $IP/24 dev eth0
ip link set eth0 up
STOP_BLOCK=$(( $(blockdev --getsize64 /dev/vda) / 4096 - 1 ))
echo "DEMO $NAME: disk /dev/vda $(( $(blockdev --getsize64 /dev/vda) >> 20 )) MiB, eth0 $IP"
round=0; errors=0
while :; do
    round=$((round + 1))
    dd if=/dev/urandom of=/tmp/out bs=1M count=2 2>/dev/null
    if dd if=/tmp/out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null \
        && dd if=/dev/vda of=/tmp/in bs=1M count=2 iflag=direct 2>/dev/null \
        && cmp -s /tmp/out /tmp/in; then disk="2 MiB written, read back, equal"
    else disk="ERROR"; errors=$((errors + 1)); fi
    # (busybox wget's own -T crashes in 1.35; its read timeout is 900 s.)
    if wget -q -O /tmp/blob http://$PEER:8080/blob && [ "$(wc -c < /tmp/blob)" = 262144 ]; then
        net="256 KiB downloaded"
    else net="ERROR"; errors=$((errors + 1)); fi
    echo "DEMO $NAME round $round: disk: $disk; network: $net"
    dd if=/dev/vda bs=4096 skip=$STOP_BLOCK count=1 iflag=direct 2>/dev/null | grep -q DDVMM-STOP && break
    sleep 1
done
echo "DEMO-RESULT $NAME rounds=$round errors=$errors"
