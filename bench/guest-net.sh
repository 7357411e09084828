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
i=1
while [ $i -le $RUNS ]; do
    ping -c 200 -i 0.02 $PEER > /tmp/ping.out 2>&1
    sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' /tmp/ping.out | sort -n > /tmp/rtt
    awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "PING-FAILED"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p = int(NR * 0.99 + 0.999); if (p > NR) p = NR
        printf "RESULT ping-median-us %.0f\nRESULT ping-p99-us %.0f\n", m * 1000, v[p] * 1000
    }' /tmp/rtt
    for dir in tx rx; do
        flag=""; [ $dir = rx ] && flag="-R"
        iperf3 -c $PEER $flag -t 6 -O 2 -f m > /tmp/ip.out 2>&1
        grep -q receiver /tmp/ip.out || { echo "IPERF-FAILED"; cat /tmp/ip.out; }
        awk -v d=$dir '/receiver/ { print "RESULT tcp-" d "-mbits", $7 }' /tmp/ip.out
    done
    i=$((i + 1))
done
