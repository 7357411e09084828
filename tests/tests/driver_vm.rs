//! End-to-end driver VMs: the daemon starts a driver VM that owns a disk (its virtio-blk
//! stand-in, backed by a file on *this* machine) and client VMs whose virtio-blk disks are
//! windows of that disk, served by the translation agent over channel rings. Stock kernels
//! everywhere; fio in the clients verifies every block; this test then reads the backing
//! file and checks that each client's data is where it belongs and nowhere else.

use std::path::Path;
use std::time::Duration;

use ddvmm_tests::system::{
    assert_clean_ending, assert_no_faults, backing_file, console, System, MIB,
};
use ddvmm_tests::{ScriptOutput, TestHost};

const TIMEOUT: Duration = Duration::from_secs(2400);
/// Each client's window of the driver VM's disk.
const SLICE_MIB: u64 = 32;

/// The client workload: a 1 MiB marker at the start of its disk (so the host can find it),
/// then fio with crc32c verification: random writes at QD16, sequential 128 KiB writes, a
/// mixed random read/write phase with periodic fsync; all verified.
fn client_script(tag: &str) -> String {
    format!(
        r#"
yes "{tag}" | head -c 1048576 > /tmp/marker
dd if=/tmp/marker of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null
echo "MARKER-RC $?"
fio --name=rand --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randwrite --bs=4k --offset=1M --size=8M --verify=crc32c --verify_fatal=1 \
    --eta=never --output=/tmp/fio1.txt
echo "FIO-RC-1 $?"
fio --name=seq --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=4 \
    --rw=write --bs=128k --offset=9M --size=8M --verify=crc32c --verify_fatal=1 \
    --eta=never --output=/tmp/fio2.txt
echo "FIO-RC-2 $?"
fio --name=mixed --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randrw --bs=16k --offset=17M --size=8M --fsync=16 --verify=crc32c \
    --verify_fatal=1 --eta=never --output=/tmp/fio3.txt
echo "FIO-RC-3 $?"
cat /tmp/fio1.txt /tmp/fio2.txt /tmp/fio3.txt | grep -E "err=|verify|crc32c"
cmp -n 1048576 /tmp/marker /dev/vda && echo "MARKER-READBACK ok"
"#
    )
}

/// How the run ends.
struct Ending<'a> {
    /// Start this client again through the API once it is done, and wait for it again.
    restart: Option<&'a str>,
    /// Stop the daemon with SIGTERM instead of the API's `shutdown`.
    sigterm: bool,
    /// The driver VM owns the disk as a passed-through NVMe controller.
    passthrough: bool,
}

/// Runs the daemon with one driver VM (cmdline `driver_cmdline`) and the given clients, waits
/// for every client to finish its script, then ends the system.
fn run_system(
    name: &str,
    disk: &Path,
    driver_cmdline: &str,
    extra_config: &str,
    clients: &[(&str, String)],
    ending: Ending,
) -> ScriptOutput {
    let system = System {
        name,
        disk,
        driver_cmdline,
        clients,
        slice_mib: SLICE_MIB,
        extra_config,
        passthrough: ending.passthrough,
        network: false,
        net_driver: false,
    };
    let (host, prelude) = system.host_and_prelude();
    let names: Vec<&str> = clients.iter().map(|(c, _)| *c).collect();
    let script = format!(
        r#"{prelude}
wait_done {clients}
for c in {restart}; do
    # A second run of the same client VM: a new ring generation the agent must pick up.
    sleep 2
    mv $WORK/system.d/$c.console $WORK/system.d/$c.console.1
    echo "=== restart $c"; $CTL start $c
    wait_done $c
done
{ending}"#,
        clients = names.join(" "),
        restart = ending.restart.unwrap_or(""),
        ending = system.ending(ending.sigterm),
    );
    let out = host.run(&script, TIMEOUT).expect("test host run");
    assert_eq!(out.status, 0, "{}", out.output);
    assert_clean_ending(&out.output);
    assert_no_faults(&out.output);
    out
}

fn assert_fio_clean(out: &str, client: &str) {
    let c = console(out, client);
    for key in [
        "MARKER-RC 0",
        "FIO-RC-1 0",
        "FIO-RC-2 0",
        "FIO-RC-3 0",
        "MARKER-READBACK ok",
    ] {
        assert!(
            c.contains(key),
            "{client}: no '{key}' in its console:\n{out}"
        );
    }
    assert_eq!(c.matches("err= 0").count(), 3, "{client}:\n{out}");
    assert!(
        !c.contains("verify failed") && !c.contains("verify: bad"),
        "{client}:\n{out}"
    );
}

/// Where `needle` occurs in `hay` (as 1 MiB-granular offsets).
fn mib_regions_containing(hay: &[u8], needle: &[u8]) -> Vec<u64> {
    let mut regions = Vec::new();
    for (i, chunk) in hay.chunks(MIB as usize).enumerate() {
        if chunk.windows(needle.len()).any(|w| w == needle) {
            regions.push(i as u64);
        }
    }
    regions
}

#[test]
fn driver_vm_serves_two_clients_their_own_slices() {
    two_clients_own_slices("driver-two-clients", false);
}

/// The same with the driver VM owning real (emulated-hardware) NVMe through VFIO: Linux's own
/// nvme driver in the driver VM, the agent serving /dev/nvme0n1.
#[test]
fn driver_vm_with_passed_through_nvme_serves_two_clients() {
    two_clients_own_slices("driver-passthrough", true);
}

fn two_clients_own_slices(name: &str, passthrough: bool) {
    if passthrough && !TestHost::new(name).expect("host").has_passthrough_devices() {
        return;
    }
    let disk = backing_file(&format!("{name}.img"), 2 * SLICE_MIB);
    let out = run_system(
        name,
        &disk,
        "console=ttyS0 quiet ddvmm.action=agent",
        "",
        &[
            ("alpha", client_script("client-alpha")),
            ("beta", client_script("client-beta")),
        ],
        Ending {
            restart: None,
            sigterm: false,
            passthrough,
        },
    );
    let log = &out.output.replace('\r', "");
    assert_fio_clean(log, "alpha");
    assert_fio_clean(log, "beta");
    assert!(log.contains("\"bogus_completions\": 0"), "{log}");

    // The backing file: each marker exactly at its slice's first MiB, never elsewhere.
    let pool = std::fs::read(&disk).expect("read pool");
    let alpha_marker: Vec<u8> = b"client-alpha\n".repeat(80_660)[..MIB as usize].to_vec();
    let beta_marker: Vec<u8> = b"client-beta\n".repeat(87_382)[..MIB as usize].to_vec();
    assert!(
        pool[..MIB as usize] == alpha_marker[..],
        "alpha's marker not at 0"
    );
    let b0 = (SLICE_MIB * MIB) as usize;
    assert!(
        pool[b0..b0 + MIB as usize] == beta_marker[..],
        "beta's marker not at {SLICE_MIB} MiB"
    );
    assert_eq!(mib_regions_containing(&pool, b"client-alpha"), vec![0]);
    assert_eq!(
        mib_regions_containing(&pool, b"client-beta"),
        vec![SLICE_MIB]
    );
    // fio wrote (verified) data into both slices beyond the markers.
    for slice in 0..2u64 {
        let at = (slice * SLICE_MIB + 1) * MIB;
        let written = pool[at as usize..(at + 8 * MIB) as usize]
            .iter()
            .any(|b| *b != 0);
        assert!(written, "slice {slice}: fio data missing");
    }
}

#[test]
fn garbage_completions_are_counted_not_trusted() {
    let disk = backing_file("driver-garbage.img", SLICE_MIB);
    let out = run_system(
        "driver-garbage",
        &disk,
        "console=ttyS0 quiet ddvmm.action=agent ddvmm.agent=garbage",
        // Garbage here is the test mode itself, not a fault to recover from.
        "\n[recovery]\nrestart_on_corrupt = false\n",
        &[("gamma", client_script("client-gamma"))],
        Ending {
            restart: Some("gamma"),
            sigterm: true,
            passthrough: false,
        },
    );
    let log = &out.output.replace('\r', "");
    // The client's data is intact and verified despite a bogus completion before every
    // real one; the client VMM counted them and kept running.
    assert_fio_clean(log, "gamma");
    let bogus: u64 = log
        .split("\"bogus_completions\": ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bogus_completions counter in:\n{log}"));
    assert!(
        bogus > 100,
        "only {bogus} bogus completions counted:\n{log}"
    );
    assert!(log.contains("invalid completions; dropped"), "{log}");
    // The client ran twice (the API restarted it; the agent followed the new ring generation),
    // and its second console is the one checked above.
    assert!(log.contains("=== restart gamma"), "{log}");
    assert!(log.contains("\"starts\": 2"), "{log}");
    assert!(log.contains("=== SIGTERM"), "{log}");
}
