# Runs inside a benchmark guest (client image, ddvmm.action=run-script) for `make bench-io`,
# `make bench-driver` and `make bench-passthrough`: fio on the guest's disk (/dev/nvme0n1 when
# an NVMe controller is passed through, else /dev/vda), RUNS times, one line per run and metric:
#   RESULT <metric> <value>
# Around each job (for the host's work-per-request counts, bench/lib.sh work_watch):
#   JOB-BEGIN <job>   then a second idle
#   JOB-END <job> <requests completed> <guest context switches> <guest interrupts>
RUNS=${RUNS:-3}
DEV=$(ls /dev/nvme0n1 /dev/vda 2>/dev/null | head -1)
echo "BENCH-DEVICE $DEV"
requests() { awk '{ print $1 + $5 }' /sys/block/${DEV#/dev/}/stat; }
guest_counts() { awk '/^ctxt/ { c = $2 } /^intr/ { i = $2 } END { print c, i }' /proc/stat; }
job() { # name rw bs iodepth
    echo "JOB-BEGIN $1"; sleep 1
    r0=$(requests); g0=$(guest_counts)
    fio --name="$1" --filename="$DEV" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
        --iodepth="$4" --size=192M --runtime=4 --ramp_time=1 --time_based --minimal \
        > /tmp/fio.out 2>&1 || { echo "FIO-FAILED $1"; cat /tmp/fio.out; return; }
    r1=$(requests); g1=$(guest_counts)
    echo "JOB-END $1 $((r1 - r0)) $(echo $g0 $g1 | awk '{ print $3 - $1, $4 - $2 }')"
    sleep 1
    # Terse v3: field 8 = read IOPS, 7 = read KiB/s, 49 = write IOPS, 48 = write KiB/s.
    awk -F';' -v n="$1" '{ printf "RESULT %s-iops %d\nRESULT %s-kibs %d\n", n, $8 + $49, n, $7 + $48 }' /tmp/fio.out
}
i=1
while [ $i -le $RUNS ]; do
    job randread-4k-qd1 randread 4k 1
    job randread-4k-qd32 randread 4k 32
    job randwrite-4k-qd1 randwrite 4k 1
    job randwrite-4k-qd32 randwrite 4k 32
    job read-128k-seq read 128k 8
    job write-128k-seq write 128k 8
    i=$((i + 1))
done
