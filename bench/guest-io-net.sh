# Runs inside the benchmark guest after bench/guest-blk.sh (the fio jobs; `make bench-io`
# passes both): an iperf3 TCP stream to the host end of the TAP, RUNS times, one line per run:
#   RESULT tcp-mbits <value>
RUNS=3
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
i=1
while [ $i -le $RUNS ]; do
    iperf3 -c 10.77.0.1 -t 4 -O 1 -f m > /tmp/ip.out 2>&1
    grep -q sender /tmp/ip.out || { echo "IPERF-FAILED"; cat /tmp/ip.out; }
    awk '/sender/ { print "RESULT tcp-mbits", $7 }' /tmp/ip.out
    i=$((i + 1))
done
