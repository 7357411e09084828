# Client of `make bench-idle` (bench/idle.sh): reads its disk once, so its channel is attached
# and has served a request, then idles until it is shut down.
if dd if=/dev/vda of=/dev/null bs=4096 count=1 2>/dev/null; then echo IDLE-READY; else echo IDLE-FAILED; fi
while :; do sleep 3600; done
