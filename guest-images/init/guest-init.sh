#!/bin/sh
# /init of the ddvmm *guest* and *client* initramfs images (busybox sh, PID 1).
#
# Mounts the basics, loads /etc/modules.order, prints
#   DDVMM-GUEST-INIT-OK cpus=<online CPUs>
# then does what the kernel command line asks with ddvmm.action=:
#   poweroff (default) | reboot | panic | shell | run-script | agent
# and prints DDVMM-GUEST-ACTION <action> right before doing it. run-script runs
# `sh /script.sh` (appended by a test harness as an extra cpio archive; in /tmp, with
# HOME=TMPDIR=/tmp), prints DDVMM-GUEST-SCRIPT-EXIT rc=<exit code> (127 when there is
# no /script.sh), syncs and powers off. agent (driver VMs) runs the translation agent
# /usr/bin/ddvmm-agent and powers off if it ever exits (DDVMM-AGENT-EXIT rc=<code>).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null   # may already be mounted

# Modules, dependencies first (written by build-images.sh).
if [ -f /etc/modules.order ]; then
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "$ko" || echo "guest-init: insmod $ko failed"
    done < /etc/modules.order
fi
ip link set lo up 2>/dev/null

# Count online CPUs from a list such as "0", "0-3" or "0,2-5".
count_cpus() {
    n=0
    for part in $(tr ',' ' ' < /sys/devices/system/cpu/online); do
        case $part in
            *-*) n=$((n + ${part#*-} - ${part%-*} + 1)) ;;
            *)   n=$((n + 1)) ;;
        esac
    done
    echo "$n"
}
# Start on a fresh line: with "quiet" the console may still hold firmware output.
echo
echo "DDVMM-GUEST-INIT-OK cpus=$(count_cpus)"

action=poweroff
for arg in $(cat /proc/cmdline); do
    case $arg in
        ddvmm.action=*) action=${arg#ddvmm.action=} ;;
    esac
done

echo "DDVMM-GUEST-ACTION $action"
case $action in
    reboot)
        reboot -f ;;
    panic)
        echo 1 > /proc/sys/kernel/sysrq
        echo c > /proc/sysrq-trigger ;;
    shell)
        # cttyhack gives the shell a controlling tty (job control, ^C).
        exec setsid cttyhack sh ;;
    poweroff)
        poweroff -f ;;
    run-script)
        rc=127
        if [ -f /script.sh ]; then
            export HOME=/tmp TMPDIR=/tmp
            cd /tmp
            sh /script.sh
            rc=$?
            cd /
        fi
        echo "DDVMM-GUEST-SCRIPT-EXIT rc=$rc"
        sync
        poweroff -f ;;
    agent)
        /usr/bin/ddvmm-agent
        echo "DDVMM-AGENT-EXIT rc=$?"
        poweroff -f ;;
    *)
        echo "guest-init: unknown ddvmm.action=$action, powering off"
        poweroff -f ;;
esac
# Never let PID 1 exit (that would panic the kernel).
sleep 5
echo o > /proc/sysrq-trigger
while :; do sleep 3600; done
