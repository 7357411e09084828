# Idle cost (`make bench-idle`): what an idle driver VM costs its host, against a client VM of
# the same kernel, in one run. First the baseline: the client guest (bench/guest-idle.sh) with
# its disk attached directly (`ddvmm run`); then a driver VM serving that client through the
# daemon. Both clients read their disk once and idle. After 10 s of settling, over IDLE_SECS
# (default 30): each VM's CPU share of one core (its VMM process, every thread), KVM's exits (and
# of them those that reached the VMM process), halts and injected interrupts per second. The counts carry over to hardware; the CPU share
# is the emulated CPU's (an exit costs far more here). AGENT_OPTS: agent options.
K=$IMAGES/vmlinuz
DISK=/tmp/pool.img
S=${IDLE_SECS:-30}
dd if=/dev/zero of=$DISK bs=1M count=64 2>/dev/null
CMD="console=ttyS0 quiet ddvmm.action=run-script"
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
: > results.txt

# sample: "<vm> <cpu-ticks> <exits> <halts> <irqs> <exits to the VMM>" for every VM running.
sample() {
    kvm_vms | while read -r pid vm d; do
        echo "$vm $(awk '{ print $14 + $15 }' /proc/$pid/stat) $(cat $d/exits) $(cat $d/halt_exits) $(cat $d/irq_injections) $(vmm_exits $pid)"
    done
}
# measure: settles, samples IDLE_SECS apart; per VM "IDLE <vm> <cpu %> <exits/s> <halts/s>
# <irqs/s> <exits to the VMM/s>" (also in results.txt).
measure() {
    sleep 10
    sample > s0; sleep $S; sample > s1
    awk -v s=$S -v hz=$HZ '
    NR == FNR { t[$1] = $2; e[$1] = $3; h[$1] = $4; i[$1] = $5; u[$1] = $6; next }
    $1 in t { printf "IDLE %s %.2f %.1f %.1f %.1f %.1f\n", $1, ($2 - t[$1]) * 100 / hz / s, ($3 - e[$1]) / s, ($4 - h[$1]) / s, ($5 - i[$1]) / s, ($6 - u[$1]) / s }
    ' s0 s1 | tee -a results.txt
}
wait_for() { # FILE PATTERN
    n=0
    until grep -q "$2" "$1" 2>/dev/null; do
        sleep 1; n=$((n + 1))
        if [ $n -gt 600 ] || grep -q IDLE-FAILED "$1" 2>/dev/null; then
            echo "no '$2' in $1"; tail -20 "$1"; exit 1
        fi
    done
}

echo "=== direct: the client guest, its disk attached to its own VMM"
$DDVMM run --kernel $K --initrd $WORK/guest.img --mem 256M --cpus 1 --disk $DISK \
    --stats-fd 9 --cmdline "$CMD" 9<>vmm.stats > direct.out 2>&1 &
VMM=$!
wait_for direct.out IDLE-READY
measure
kill $VMM; wait $VMM 2>/dev/null

echo "=== through a driver VM"
cat > system.toml <<CFG
[[driver]]
name = "storage"
kernel = "$K"
initrd = "$WORK/driver.img"
memory = "256M"
cpus = 1
disks = ["$DISK"]
cmdline = "console=ttyS0 quiet ddvmm.action=agent $AGENT_OPTS"

[[client]]
name = "client"
kernel = "$K"
initrd = "$WORK/guest.img"
memory = "256M"
cpus = 1
cmdline = "$CMD"
[[client.disk]]
driver = "storage"
size = "64M"
CFG
$DDVMM --log-level info daemon --config system.toml > daemon.log 2>&1 &
DAEMON=$!
wait_for system.d/client.console IDLE-READY
measure
$DDVMM ctl --socket system.sock shutdown > /dev/null
wait $DAEMON

awk -v s=$S '
$1 == "IDLE" { cpu[$2] = $3; ex[$2] = $4; ha[$2] = $5; ir[$2] = $6; us[$2] = $7 }
END {
    printf "\nidle cost per VM (1 vCPU, 256 MiB each; one %d s sample after 10 s of rest)\n", s
    printf "%-46s %8s %9s %9s %9s %9s\n", "VM", "CPU %", "exits/s", "to-vmm/s", "halts/s", "irqs/s"
    n = split("direct client storage", vm, " ")
    split("client, its disk direct|client, disk through the driver VM|driver VM", role, "|")
    for (k = 1; k <= n; k++) if (vm[k] in cpu)
        printf "%-46s %8.2f %9.1f %9.1f %9.1f %9.1f\n", vm[k] " (" role[k] ")", cpu[vm[k]], ex[vm[k]], us[vm[k]], ha[vm[k]], ir[vm[k]]
    printf "\ndriver VM: %.2f %% of a core at rest (goal <= 0.1)", cpu["storage"]
    if (cpu["direct"] > 0) printf "; CPU / direct client %.2f", cpu["storage"] / cpu["direct"]
    if (ex["direct"] > 0) printf "; exits / direct client %.2f", ex["storage"] / ex["direct"]
    printf "\n"
}' results.txt
