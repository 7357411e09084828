//! The channel's gate (see `ddvmm_translation::channel`): park, wait for the VMM to open it,
//! then reseed the kernel's RNG with the entropy the VMM published.

use std::os::fd::AsRawFd;
use std::sync::Once;
use std::time::{Duration, Instant};

use ddvmm_translation::channel::{regs, ENTROPY_LEN};

use crate::pci::BarMapping;

/// How often a parked agent reads the gate (an exit to the VMM each time; a gate is shut only
/// while the VMM writes a snapshot).
const POLL: Duration = Duration::from_millis(2);

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

static SEED: Once = Once::new();

/// Announces this channel parked, waits for the gate, then (once per agent) reseeds the RNG.
pub fn pass(regs_map: &BarMapping, index: u32) {
    let parked = Instant::now();
    regs_map.write32(regs::GATE, 1);
    let mut waited = 0u32;
    while regs_map.read32(regs::GATE) != 1 {
        if waited == 0 {
            crate::console::say(format!("ddvmm-agent: channel {index} parked at the gate"));
        }
        waited = waited.saturating_add(1);
        std::thread::sleep(POLL);
    }
    // By this guest's clock, which a restore sets back to the snapshot's instant (taken right
    // after the park): the time the restored guest took to get here.
    crate::console::say(format!(
        "ddvmm-agent: channel {index} passed the gate {} us after parking ({waited} polls)",
        parked.elapsed().as_micros()
    ));
    let mut entropy = [0u8; ENTROPY_LEN];
    for (i, chunk) in entropy.chunks_mut(4).enumerate() {
        let v = regs_map.read32(regs::ENTROPY + 4 * i as u64).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    SEED.call_once(|| match reseed(&entropy) {
        Ok(()) => crate::console::say(format!(
            "ddvmm-agent: RNG reseeded from the VMM; fingerprint {}",
            fingerprint()
        )),
        Err(e) => crate::console::say(format!("ddvmm-agent: cannot reseed the RNG: {e}")),
    });
}

/// Adds `entropy` to the input pool (credited) and forces the CRNG to reseed from it.
fn reseed(entropy: &[u8; ENTROPY_LEN]) -> std::io::Result<()> {
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + ENTROPY_LEN);
    info.extend_from_slice(&((ENTROPY_LEN * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(ENTROPY_LEN as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a complete `rand_pool_info` with `buf_size` bytes of payload, valid
    // for the whole call; the kernel only reads it.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Eight bytes of the kernel's RNG output after the reseed, in hex: two driver VMs restored
/// from one template print different ones only if their RNGs differ.
fn fingerprint() -> String {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a writable buffer of 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return "unavailable".into();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
