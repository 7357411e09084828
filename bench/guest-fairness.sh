# Fairness benchmark client (bench/fairness.sh): waits for commands the host writes into the
# last 4 KiB of its disk ("CMD <seq> <job> <rw> <bs> <iodepth> <seconds>", or "QUIT"), runs
# each with fio on the rest of the disk and prints
#   RESULT <client> <job> <iops> <p50 usec> <p99 usec>
#   DONE <seq>
DEV=/dev/vda
NAME=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^ddvmm.bench.name=//p')
BLOCKS=$(( $(blockdev --getsize64 $DEV) / 4096 ))
CTL_BLOCK=$((BLOCKS - 1))
SIZE=$(( CTL_BLOCK * 4096 ))
echo "FAIR-CLIENT $NAME up, disk $BLOCKS blocks"
seen=""
while :; do
    line=$(dd if=$DEV bs=4096 skip=$CTL_BLOCK count=1 iflag=direct 2>/dev/null | tr -d '\0' | head -1)
    set -- $line
    [ "$1" = QUIT ] && break
    if [ "$1" = CMD ] && [ "$2" != "$seen" ]; then
        seen=$2
        fio --name="$3" --filename=$DEV --direct=1 --ioengine=libaio --rw="$4" --bs="$5" \
            --iodepth="$6" --size=$SIZE --runtime="$7" --time_based --percentile_list=50:99 \
            --minimal > /tmp/fio.out 2>&1 || { echo "FIO-FAILED $3"; cat /tmp/fio.out; }
        # Terse v3: field 8 read IOPS, 49 write IOPS; completion-latency percentiles are
        # "P%=usec" fields.
        awk -F';' -v c="$NAME" -v j="$3" '{
            for (i = 18; i <= NF; i++) {
                if ($i ~ /^50\.000000%=/ && !p50) p50 = substr($i, 12)
                if ($i ~ /^99\.000000%=/ && !p99) p99 = substr($i, 12)
            }
            printf "RESULT %s %s %d %d %d\n", c, j, $8 + $49, p50, p99
        }' /tmp/fio.out
        echo "DONE $seen"
    fi
    sleep 1
done
echo "FAIR-CLIENT $NAME quits"
