# Runs inside the demo guest: show the virtio disk and NIC working.
echo "--- guest: block devices ---"
cat /proc/partitions
echo "hello from the guest, $(date)" > /tmp/msg
dd if=/tmp/msg of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
echo "--- guest: wrote to /dev/vda, reading it back ---"
dd if=/dev/vda bs=512 count=1 2>/dev/null | head -1
echo "--- guest: network ---"
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
ip addr show eth0
ping -c 3 10.77.0.1
