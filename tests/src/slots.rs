//! A machine-wide cap on emulated test hosts running at once: one slot per core (each test
//! host is one emulated CPU, one busy host thread), held as an exclusive `flock` on
//! `slots/N`. Whatever runs the tests (nextest's processes, libtest's threads, a second
//! `cargo test`), no more test hosts run than the machine has cores; the lock goes away with
//! the process, so a killed test never leaks its slot. `DDVMM_TESTHOST_SLOTS` overrides.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// A held slot; released on drop (the file is closed).
pub struct Slot {
    _file: File,
}

/// How many test hosts may run at once.
pub fn count() -> usize {
    std::env::var("DDVMM_TESTHOST_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=16).contains(n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Waits for a free slot under `dir`. Without a usable lock file (an unwritable `target/`)
/// the run goes ahead unlimited rather than not at all.
pub fn acquire(dir: &Path) -> Option<Slot> {
    std::fs::create_dir_all(dir).ok()?;
    let n = count();
    loop {
        for i in 0..n {
            let Ok(file) = File::create(dir.join(i.to_string())) else {
                return None;
            };
            // SAFETY: flock on a file descriptor this function owns (`file` is open for the
            // whole call); LOCK_NB makes it return at once. No memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Some(Slot { _file: file });
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
