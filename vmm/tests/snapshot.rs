//! Snapshot and restore at the KVM layer: a hand-assembled real-mode guest counts in memory; a
//! snapshot is taken while it counts; a machine restored from it continues the count from
//! there (it does not start over), while the snapshot's files stay untouched. Damaged or
//! mismatched snapshots are refused with a one-line error before any vCPU runs.

use std::path::Path;
use std::time::{Duration, Instant};

use ddvmm::exit::GuestExit;
use ddvmm::machine::{BootSource, ConsoleOutput, Machine, MachineConfig, SnapshotMode};
use ddvmm::snapshot::{Identity, Snapshot, MEMORY_FILE, STATE_FILE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LOAD: u16 = 0x1000;
const COUNTER: u64 = 0x5000;
const STARTS: u64 = 0x5004;
const STOP: u64 = 0x5008;
const MEM: u64 = 2 << 20;

/// Prints 'S', counts its starts at 0x5004, adds 1 to the dword at 0x5000 until the byte at
/// 0x5008 is set, then prints 'E' and powers off.
fn counter_program() -> Vec<u8> {
    [
        &[0xba, 0xf8, 0x03, 0xb0, b'S', 0xee][..], // mov dx, 0x3f8; mov al, 'S'; out dx, al
        &[0xff, 0x06, 0x04, 0x50],                 // inc word [0x5004]
        &[0x66, 0x83, 0x06, 0x00, 0x50, 0x01],     // loop: add dword [0x5000], 1
        &[0x80, 0x3e, 0x08, 0x50, 0x00],           // cmp byte [0x5008], 0
        &[0x74, 0xf3],                             // je loop
        &[0xba, 0xf8, 0x03, 0xb0, b'E', 0xee],     // mov al, 'E'; out dx, al
        &[0xba, 0x00, 0x06, 0xb0, 0x34, 0xee],     // ACPI S5 power-off
        &[0xeb, 0xfe],
    ]
    .concat()
}

fn config(console: &Path, snapshot: SnapshotMode, mem: u64) -> MachineConfig {
    let boot = BootSource::RealMode {
        image: counter_program(),
        load_addr: LOAD,
    };
    let console = ConsoleOutput::File {
        path: console.to_path_buf(),
        limit: u64::MAX,
        append: false,
    };
    MachineConfig {
        snapshot,
        ..MachineConfig::new(boot, mem, 1, console)
    }
}

fn read_u32(mem: &GuestMemoryMmap, at: u64) -> u32 {
    mem.read_obj(GuestAddress(at)).expect("guest memory")
}

/// Waits (bounded: this catches hangs, it does not time anything) until `what` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `machine` on a thread; once the counter passes `past`, calls `then`, then sets the
/// stop flag and returns the exit.
fn run_counting(mut machine: Machine, past: u32, then: impl FnOnce()) -> GuestExit {
    let mem = machine.ram().memory().clone();
    let t = std::thread::spawn(move || machine.run().expect("run"));
    wait_for("the guest to count", || read_u32(&mem, COUNTER) > past);
    then();
    mem.write_obj(1u8, GuestAddress(STOP)).expect("stop flag");
    t.join().expect("machine thread")
}

fn host_identity() -> Identity {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    Identity::of_host(&kvm).expect("identity")
}

/// Takes a snapshot of the counting guest into `dir/snap`; returns the counter it holds.
fn take_snapshot(dir: &Path) -> (std::path::PathBuf, u32) {
    let snap = dir.join("snap");
    let cfg = config(
        &dir.join("template.log"),
        SnapshotMode::TemplateTo(snap.clone()),
        MEM,
    );
    let machine = Machine::build(&cfg).expect("build template");
    let trigger = machine.snapshot_trigger();
    let id = host_identity();
    let exit = run_counting(machine, 1000, || {
        trigger();
        wait_for("the snapshot", || Snapshot::open(&snap, &id).is_ok());
    });
    assert_eq!(exit, GuestExit::PowerOff);
    let s = Snapshot::open(&snap, &id).expect("snapshot");
    let counted = u32::from_le_bytes(
        ddvmm_read_at(&s.memory, COUNTER, 4)
            .try_into()
            .expect("4 bytes"),
    );
    (snap, counted)
}

fn ddvmm_read_at(f: &std::fs::File, at: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut b, at).expect("read");
    b
}

#[test]
fn a_restored_guest_continues_counting_where_the_snapshot_was_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (snap, at_snapshot) = take_snapshot(dir.path());
    assert!(
        at_snapshot > 1000,
        "snapshot taken mid-count: {at_snapshot}"
    );

    for round in 0..2 {
        let console = dir.path().join(format!("restored{round}.log"));
        let cfg = config(&console, SnapshotMode::Restore(snap.clone()), MEM);
        let machine = Machine::build(&cfg).expect("restore");
        let mem = machine.ram().memory().clone();
        assert_eq!(read_u32(&mem, COUNTER), at_snapshot, "RAM as snapshotted");
        let exit = run_counting(machine, at_snapshot + 1000, || {});
        assert_eq!(exit, GuestExit::PowerOff);
        assert_eq!(
            read_u32(&mem, STARTS) & 0xffff,
            1,
            "the restored guest did not restart"
        );
        assert!(read_u32(&mem, COUNTER) > at_snapshot + 1000);
        // The restored guest's serial output: only what came after the snapshot.
        assert_eq!(std::fs::read(&console).expect("console"), b"E");
        // Copy-on-write: the snapshot's memory file still holds the snapshot's count, so the
        // second round starts from it again.
        let f = std::fs::File::open(snap.join(MEMORY_FILE)).expect("memory file");
        assert_eq!(ddvmm_read_at(&f, COUNTER, 4), at_snapshot.to_le_bytes());
    }
}

#[test]
fn damaged_or_foreign_snapshots_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (snap, _) = take_snapshot(dir.path());
    let console = dir.path().join("refused.log");
    let build_err = |mem: u64| {
        let cfg = config(&console, SnapshotMode::Restore(snap.clone()), mem);
        match Machine::build(&cfg) {
            Ok(_) => panic!("a bad snapshot was accepted"),
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            }
        }
    };

    // Another memory size: refused before anything is mapped.
    let e = build_err(MEM * 2);
    assert!(e.contains("memory size"), "{e}");

    // A flipped byte in the state.
    let state_path = snap.join(STATE_FILE);
    let good = std::fs::read(&state_path).expect("state");
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(&state_path, &bad).expect("write");
    let e = build_err(MEM);
    assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");

    // Cut short (as if the writer died).
    std::fs::write(&state_path, &good[..good.len() - 10]).expect("write");
    let e = build_err(MEM);
    assert!(e.contains("corrupt"), "{e}");

    // Another version's snapshot (the header names the format).
    let text = String::from_utf8_lossy(&good).replacen("ddvmm-snapshot 1 ", "ddvmm-snapshot 9 ", 1);
    std::fs::write(&state_path, text.as_bytes()).expect("write");
    let e = build_err(MEM);
    assert!(e.contains("snapshot format"), "{e}");

    // The state intact but the memory file from elsewhere (its trailer does not match).
    std::fs::write(&state_path, &good).expect("write");
    let mem_path = snap.join(MEMORY_FILE);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mem_path)
        .expect("memory file");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 8], MEM + 8).expect("write");
    let e = build_err(MEM);
    assert!(e.contains("trailer"), "{e}");
}

#[test]
fn a_vm_with_a_passed_through_function_cannot_be_snapshotted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(
        &dir.path().join("console.log"),
        SnapshotMode::TemplateTo(dir.path().join("snap")),
        MEM,
    );
    cfg.passthrough = vec!["0000:01:00.0".parse().expect("address")];
    let e = Machine::build(&cfg).err().expect("refused").to_string();
    assert!(
        e.contains("cannot snapshot this VM") && e.contains("passed-through"),
        "{e}"
    );
    // Nothing was created.
    assert!(!dir.path().join("snap").exists());
}
