# Runs inside the network benchmark's client guest (bench/driver-net.sh), RUNS times:
# ping latency to the peer (200 echoes, 20 ms apart) and iperf3 TCP streams both ways.
#   RESULT ping-median-us <v>   RESULT ping-p99-us <v>
#   RESULT tcp-tx-mbits <v>     RESULT tcp-rx-mbits <v>
RUNS=3
PEER=10.0.0.1
ip addr add 10.0.0.2/24 dev eth0
ip link set eth0 up
n=0
until ping -c 1 -W 2 $PEER > /dev/null 2>&1 || [ $n -ge 60 ]; do n=$((n + 1)); done
# Around each measurement (for the host's work-per-frame counts, bench/lib.sh work_watch):
#   JOB-BEGIN <job>   then a second idle
#   JOB-END <job> <frames sent + received> <guest context switches> <guest interrupts>
frames() { cat /sys/class/net/eth0/statistics/tx_packets /sys/class/net/eth0/statistics/rx_packets | awk '{ s += $1 } END { print s }'; }
guest_counts() { awk '/^ctxt/ { c = $2 } /^intr/ { i = $2 } END { print c, i }' /proc/stat; }
begin() { echo "JOB-BEGIN $1"; sleep 1; f0=$(frames); g0=$(guest_counts); }
end() { echo "JOB-END $1 $(($(frames) - f0)) $(echo $g0 $(guest_counts) | awk '{ print $3 - $1, $4 - $2 }')"; sleep 1; }
i=1
while [ $i -le $RUNS ]; do
    begin ping
    ping -c 200 -i 0.02 $PEER > /tmp/ping.out 2>&1
    end ping
    sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' /tmp/ping.out | sort -n > /tmp/rtt
    awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "PING-FAILED"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p = int(NR * 0.99 + 0.999); if (p > NR) p = NR
        printf "RESULT ping-median-us %.0f\nRESULT ping-p99-us %.0f\n", m * 1000, v[p] * 1000
    }' /tmp/rtt
    for dir in tx rx; do
        flag=""; [ $dir = rx ] && flag="-R"
        begin tcp-$dir
        iperf3 -c $PEER $flag -t 6 -O 2 -f m > /tmp/ip.out 2>&1
        end tcp-$dir
        grep -q receiver /tmp/ip.out || { echo "IPERF-FAILED"; cat /tmp/ip.out; }
        awk -v d=$dir '/receiver/ { print "RESULT tcp-" d "-mbits", $7 }' /tmp/ip.out
    done
    i=$((i + 1))
done
