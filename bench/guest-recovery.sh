# Recovery benchmark client: loops fio (mixed random read/write, fsync every 16 writes,
# crc32c verify) until the host writes a stop sentinel at MiB 60 of its disk; then reports.
round=0; fails=0
while :; do
    round=$((round + 1))
    fio --name=mix --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
        --rw=randrw --bs=4k --offset=1M --size=16M --fsync=16 --verify=crc32c \
        --verify_fatal=1 --randseed=$round --eta=never --output=/tmp/fio.txt
    rc=$?
    if [ $rc != 0 ] || ! grep -q "err= 0" /tmp/fio.txt; then
        fails=$((fails + 1)); echo "FIO-FAILED round $round rc $rc"; cat /tmp/fio.txt
    fi
    echo "ROUND $round rc=$rc"
    dd if=/dev/vda bs=4096 skip=15360 count=1 iflag=direct 2>/dev/null | grep -q DDVMM-STOP && break
done
echo "CLIENT-RESULT rounds=$round fio_failures=$fails"
