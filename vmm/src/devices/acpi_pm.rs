//! ACPI hardware-reduced sleep control and status registers (two byte-wide I/O ports).
//! Writing `SLP_EN` with sleep type 5 (the DSDT's `_S5`) powers the VM off.

use super::bus::BusDevice;
use crate::arch::x86_64::acpi::S5_SLEEP_TYPE;
use crate::exit::{ExitNotifier, GuestExit};

/// `SLP_EN` in the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;

/// Sleep control (offset 0) and sleep status (offset 1).
pub struct AcpiSleep {
    exits: ExitNotifier,
}

impl AcpiSleep {
    /// Registers reporting power-off to `exits`.
    pub fn new(exits: ExitNotifier) -> Self {
        AcpiSleep { exits }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Never "woken": WAK_STS stays clear.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != 0 || value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            tracing::info!("ACPI S5: guest powered off");
            self.exits.notify(GuestExit::PowerOff);
        } else {
            tracing::warn!(
                sleep_type,
                "unsupported ACPI sleep state requested; ignored"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn s5_powers_off() {
        let (tx, rx) = channel();
        let mut dev = AcpiSleep::new(ExitNotifier::new(tx));
        dev.write(0, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        dev.write(1, &[0x34]);
        dev.write(0, &[SLEEP_ENABLE | (3 << SLEEP_TYPE_SHIFT)]);
        assert!(rx.try_recv().is_err());
        dev.write(0, &[SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT)]);
        assert_eq!(
            rx.try_recv(),
            Ok(crate::exit::MachineEvent::Exit(GuestExit::PowerOff))
        );
    }
}
