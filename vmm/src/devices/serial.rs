//! The 8250/16550 UART at COM1 (vm-superio's model), its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's IRQ line by writing the eventfd registered as its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// COM1, writing guest output to `W` (stdout or a log file).
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Feeds bytes typed by the user to the guest. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(off) if off < 8 && data.len() == 1 => self.uart.read(off),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if off >= 8 {
            return;
        }
        if let Err(e) = self.uart.write(off, *value) {
            tracing::warn!(error = ?e, "serial write failed");
        }
        if off == 0 {
            // Keep the console current even if the guest dies right after.
            let _ = self.uart.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_bytes_and_raises_irq() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq.try_clone().expect("clone"), Vec::new());
        // Enable the THR-empty interrupt, then send.
        s.write(1, &[0x02]);
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(s.uart.writer().as_slice(), b"hi");
        assert!(irq.read().expect("irq raised") >= 1);
        // Hostile accesses are ignored without panicking.
        s.write(100, &[1]);
        s.write(0, &[]);
        s.write(0, &[1, 2]);
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide[0], 0xff);
    }
}
