//! pvpanic (QEMU's ISA variant, ACPI id `QEMU0001`): the guest kernel writes here when it panics.
//! Linux drives it with the stock `pvpanic-mmio` driver, bound through our DSDT.

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// Event bit: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest is loading a crash kernel.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port.
pub struct PvPanic {
    exits: ExitNotifier,
}

impl PvPanic {
    /// A pvpanic device reporting to `exits`.
    pub fn new(exits: ExitNotifier) -> Self {
        PvPanic { exits }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Reading returns the events we support.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = data.first().copied().unwrap_or(0);
        if value & PVPANIC_PANICKED != 0 {
            tracing::error!("guest kernel panic reported through pvpanic");
            self.exits.notify(GuestExit::Panic);
        } else if value & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!("guest is loading a crash kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn panic_event() {
        let (tx, rx) = channel();
        let mut dev = PvPanic::new(ExitNotifier::new(tx));
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], 3);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[]);
        assert!(rx.try_recv().is_err());
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(
            rx.try_recv(),
            Ok(crate::exit::MachineEvent::Exit(GuestExit::Panic))
        );
    }
}
