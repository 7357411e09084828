//! A three-instruction "BIOS" at the x86 reset vector (F000:FFF0).
//!
//! With hardware-reduced ACPI (our FADT) Linux picks `reboot=efi` by default; without EFI it
//! falls back to `machine_real_restart()`, which drops to real mode and jumps to the BIOS reset
//! vector, exactly as on a PC. There is no BIOS here, so the vector holds a stub that pulses the
//! reset line through the i8042 (`out 0x64, 0xfe`), which the VMM reports as a reboot. Kernels
//! booted with `reboot=kbd` or `reboot=acpi` reach the same i8042 write directly.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::ports;
use crate::devices::i8042::CMD_RESET_CPU;

/// Physical address of the reset vector.
pub const RESET_VECTOR: u64 = 0xffff0;

/// `mov al, 0xfe; out 0x64, al; hlt; jmp <hlt>`.
pub fn reset_stub() -> [u8; 7] {
    [
        0xb0,
        CMD_RESET_CPU,
        0xe6,
        ports::I8042_COMMAND as u8,
        0xf4,
        0xeb,
        0xfd,
    ]
}

/// Writes the stub at the reset vector.
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_slice(&reset_stub(), GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_fits_the_vector() {
        // 16 bytes from F000:FFF0 to the end of the first megabyte.
        assert!(RESET_VECTOR + reset_stub().len() as u64 <= 0x10_0000);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_reset_vector(&mem).expect("write");
        let b: u8 = mem.read_obj(GuestAddress(RESET_VECTOR + 1)).expect("read");
        assert_eq!(b, 0xfe);
    }
}
