//! The part of the i8042 keyboard controller a guest uses to reset the machine: the status
//! register reads "ready", and command 0xFE (pulse the reset line) ends the VM with a reboot.
//! No keyboard or mouse is attached.

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// Command byte that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port relative to the data port (0x64 - 0x60).
pub const COMMAND_OFFSET: u64 = 4;

/// i8042 at ports 0x60..=0x64 (register it as one 5-port range; 0x61 is KVM's).
pub struct I8042 {
    exits: ExitNotifier,
}

impl I8042 {
    /// A controller that reports resets to `exits`.
    pub fn new(exits: ExitNotifier) -> Self {
        I8042 { exits }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty. Data: nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("i8042 reset requested by guest");
            self.exits.notify(GuestExit::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn reset_command_reboots() {
        let (tx, rx) = channel();
        let mut dev = I8042::new(ExitNotifier::new(tx));
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(
            rx.try_recv(),
            Ok(crate::exit::MachineEvent::Exit(GuestExit::Reboot))
        );
    }
}
