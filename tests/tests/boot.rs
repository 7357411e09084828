//! End-to-end: our VMM boots Debian's stock cloud kernel to the initramfs `/init` (inside the
//! emulated test host where this machine's KVM cannot run Linux), and reports how it ended.

use std::time::Duration;

use ddvmm_tests::{client_initrd_with_script, ScriptOutput, TestHost};

/// Catches hangs only: a test-host boot plus a nested guest boot takes ~15 s here, but CI
/// machines are noisy and the emulator is ~25x slower than hardware.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Boots the guest image with `action` and prints the VMM's exit status as `VMM-RC=<n>`. The
/// guest console goes to the VMM's stdout, so a hang still shows how far the guest got.
fn boot(name: &str, cpus: u32, action: &str) -> ScriptOutput {
    let script = format!(
        r#"$DDVMM --log-level info run --kernel $IMAGES/vmlinuz \
  --initrd $IMAGES/guest-initramfs.cpio.gz --mem 256M --cpus {cpus} \
  --cmdline "console=ttyS0 earlyprintk=serial,ttyS0 ddvmm.action={action}"
echo "VMM-RC=$?"
"#
    );
    let host = TestHost::new(name).expect("test host");
    let out = host.run(&script, TIMEOUT).expect("test host run");
    assert_eq!(out.status, 0, "script failed:\n{}", out.output);
    out
}

fn vmm_rc(out: &ScriptOutput) -> i32 {
    let line = out
        .output
        .lines()
        .find_map(|l| l.trim().strip_prefix("VMM-RC="))
        .unwrap_or_else(|| panic!("no VMM-RC line in:\n{}", out.output));
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad VMM-RC {line:?}"))
}

fn assert_boots_to_init(cpus: u32) {
    let out = boot(&format!("boot-{cpus}cpu"), cpus, "poweroff");
    let log = &out.output;
    assert_eq!(vmm_rc(&out), 0, "expected a clean power-off:\n{log}");
    assert!(
        log.contains(&format!("DDVMM-GUEST-INIT-OK cpus={cpus}")),
        "{log}"
    );
    assert!(log.contains("ddvmm: guest powered off"), "{log}");
    // The e820 map the kernel saw: low RAM up to the EBDA, the BIOS area reserved, RAM at 1 MiB.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
        "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    ] {
        assert!(log.contains(line), "missing e820 line {line:?} in:\n{log}");
    }
    let smp = if cpus == 1 {
        "smp: Brought up 1 node, 1 CPU".to_string()
    } else {
        format!("smp: Brought up 1 node, {cpus} CPUs")
    };
    assert!(log.contains(&smp), "missing {smp:?} in:\n{log}");
    // The kernel's console output came through KVM's coalesced ring (its transmit writes
    // never exit to the VMM one by one; the status read before each byte does), and in order:
    // the lines above are intact. So did the PCI configuration addresses of the bus scan.
    let (com1, pci_address) = coalesced_counts(log);
    assert!(
        com1 > 10_000 && pci_address > 50,
        "coalesced: COM1 {com1}, PCI address {pci_address}"
    );
    // Power-off went through ACPI, not a crash or reset, and the kernel saw no error.
    assert!(!log.contains("Kernel panic"), "{log}");
    ddvmm_tests::assert_no_kernel_errors(log);
}

/// `s` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The VMM's counts of port writes KVM coalesced: console bytes, PCI configuration addresses.
fn coalesced_counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("port writes coalesced by KVM"))
        .unwrap_or_else(|| panic!("no coalescing count in:\n{log}"));
    let field = |name: &str| {
        let plain = strip_ansi(line);
        plain
            .split_whitespace()
            .find_map(|w| {
                w.strip_prefix(&format!("{name}="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("com1"), field("pci_address"))
}

#[test]
fn boots_stock_kernel_with_one_vcpu() {
    assert_boots_to_init(1);
}

#[test]
fn boots_stock_kernel_with_two_vcpus() {
    assert_boots_to_init(2);
}

#[test]
fn guest_panic_is_reported_as_panic() {
    let out = boot("panic", 1, "panic");
    assert_eq!(vmm_rc(&out), 4, "{}", out.output);
    assert!(out.output.contains("Kernel panic"), "{}", out.output);
    assert!(
        out.output.contains("ddvmm: guest kernel panicked"),
        "{}",
        out.output
    );
}

#[test]
fn guest_reboot_is_reported_as_reboot() {
    let out = boot("reboot", 1, "reboot");
    assert_eq!(vmm_rc(&out), 3, "{}", out.output);
    assert!(
        out.output.contains("DDVMM-GUEST-ACTION reboot"),
        "{}",
        out.output
    );
    assert!(
        out.output.contains("ddvmm: guest rebooted"),
        "{}",
        out.output
    );
}

/// A guest that floods its serial console does not grow the console file past its cap: the
/// file ends with one notice, and the guest, never stalled, runs on to a clean power-off.
#[test]
fn a_console_flood_stops_at_the_cap() {
    const CAP: u64 = 16 * 1024;
    let guest = ddvmm_tests::client_initrd_with_script(
        "head -c 262144 /dev/zero | tr '\\0' 'F' > /dev/ttyS0\necho FLOOD-DONE > /dev/kmsg\n",
    )
    .expect("guest image");
    let host = TestHost::new("console-flood")
        .expect("test host")
        .file("guest.img", guest, 0o644);
    let script = format!(
        r#"$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd guest.img --mem 256M \
  --console $WORK/flood.console --console-limit {}K \
  --cmdline "console=ttyS0 quiet ddvmm.action=run-script"
echo "VMM-RC=$?"
echo "CONSOLE-BYTES=$(stat -c %s $WORK/flood.console)"
echo "F-BYTES=$(tr -cd F < $WORK/flood.console | wc -c)"
tail -c 200 $WORK/flood.console
"#,
        CAP / 1024
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    let log = &out.output;
    assert_eq!(out.status, 0, "{log}");
    assert_eq!(vmm_rc(&out), 0, "the guest did not power off:\n{log}");
    let number = |key: &str| -> u64 {
        log.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{log}"))
    };
    let bytes = number("CONSOLE-BYTES=");
    assert!(
        (CAP..=CAP + 100).contains(&bytes),
        "console file is {bytes} bytes, cap {CAP}:\n{log}"
    );
    // The flood reached the cap (the guest wrote far more than it).
    assert!(number("F-BYTES=") > CAP / 2, "{log}");
    assert!(
        log.contains("console output stopped at its limit of 16384 bytes"),
        "{log}"
    );
}

/// The signals a running `ddvmm run` takes: `SIGUSR1` writes its snapshot to `--snapshot-to`,
/// `SIGUSR2` makes its boot vCPU log where the guest runs (with `MSR_LSTAR`, so that the address
/// can be named); the guest runs on after both.
#[test]
fn sigusr1_snapshots_and_sigusr2_logs_the_vcpu_of_a_running_vm() {
    let guest =
        client_initrd_with_script("i=0; while :; do i=$((i + 1)); echo TICK $i; sleep 2; done")
            .expect("guest image");
    let script = r#"$DDVMM --log-level info run --kernel $IMAGES/vmlinuz --initrd guest.img \
  --mem 256M --cpus 1 --snapshot-to $WORK/snap --console $WORK/vm.console \
  --cmdline "console=ttyS0 quiet ddvmm.action=run-script" > $WORK/vm.log 2>&1 &
VMM=$!
ticks() { grep -c "^TICK" $WORK/vm.console 2>/dev/null || echo 0; }
until_seen() {
    n=0; until grep -q "$2" $1 2>/dev/null; do
        sleep 1; n=$((n + 1)); [ $n -lt 300 ] || { echo "NOT-SEEN $2"; break; }
    done
}
until_seen $WORK/vm.console TICK
kill -USR1 $VMM
until_seen $WORK/vm.log "snapshot template"
kill -USR2 $VMM
until_seen $WORK/vm.log "vCPU state on request"
T=$(ticks)
n=0; while [ $(ticks) -le $T ]; do sleep 1; n=$((n + 1)); [ $n -lt 120 ] || { echo "STOPPED"; break; }; done
kill -0 $VMM && echo "VMM-ALIVE"
kill -KILL $VMM
ls $WORK/snap | sed 's/^/SNAP-FILE /'
grep -a "snapshot template\|vCPU state on request" $WORK/vm.log | sed 's/^/LOG /'
"#;
    let host = TestHost::new("boot-signals")
        .expect("test host")
        .file("guest.img", guest, 0o644);
    let out = host.run(script, TIMEOUT).expect("test host run");
    let log = &out.output;
    assert_eq!(out.status, 0, "{log}");
    assert!(
        !log.contains("NOT-SEEN") && !log.contains("STOPPED"),
        "{log}"
    );
    assert!(log.contains("VMM-ALIVE"), "{log}");
    assert!(log.contains("snapshot template written"), "{log}");
    assert!(
        log.contains("SNAP-FILE state") && log.contains("SNAP-FILE memory"),
        "{log}"
    );
    let dump = log
        .lines()
        .find(|l| l.starts_with("LOG ") && l.contains("vCPU state on request"))
        .unwrap_or_else(|| panic!("no register dump:\n{log}"));
    assert!(
        dump.contains("rip=0x") && dump.contains("lstar=0xffff"),
        "{dump}"
    );
}
