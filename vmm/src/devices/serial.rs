//! The 8250/16550 UART at COM1 (vm-superio's model), its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::kvm::coalesced::CoalescedPort;

/// Raises the UART's IRQ line by writing the eventfd registered as its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Bytes the UART's receive FIFO holds.
const FIFO_SIZE: usize = 64;

/// Interrupt Enable Register bit: transmit holding register empty.
const IER_THRI: u8 = 0x02;
/// Interrupt Enable Register (or, with DLAB set, the divisor's high byte).
const IER: u8 = 1;
/// Transmit holding register.
const THR: u8 = 0;

/// COM1, writing guest output to `W` (stdout or a log file).
///
/// While the guest polls the transmitter (its THR-empty interrupt off, as the kernel's console
/// does), writes to THR can be coalesced by KVM ([`CoalescedPort`]): they reach the UART in
/// batches, and the output is flushed once per batch. With the interrupt on they come one
/// exit each, so that each raises the interrupt the guest's driver waits for.
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, W>,
    coalesce: Option<CoalescedPort>,
}

/// The UART's registers and receive FIFO as saved in a snapshot (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSerial {
    divisor: [u8; 2],
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
            coalesce: None,
        }
    }

    /// Lets KVM coalesce THR writes through `port` whenever the guest polls the transmitter.
    pub fn coalesce_transmit(&mut self, port: CoalescedPort) {
        self.coalesce = Some(port);
        self.sync_coalescing();
    }

    /// Coalesces THR writes exactly while the THR-empty interrupt is off. If KVM refuses to
    /// start, the UART goes on without (one exit per byte); a refusal to stop is tried again
    /// at the next IER write (meanwhile the interrupt the guest waits for comes at its next
    /// port access, which replays the queue).
    fn sync_coalescing(&mut self) {
        let Some(port) = &self.coalesce else { return };
        let polled = self.uart.state().interrupt_enable & IER_THRI == 0;
        if let Err(e) = port.set_enabled(polled) {
            tracing::warn!(error = %e, polled, "console: coalescing transmit writes");
            if polled {
                self.coalesce = None;
            }
        }
    }

    /// Writes out buffered output (nothing to do, and no system call, when there is none).
    fn flush_output(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// Feeds bytes typed by the user to the guest. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// The UART's state.
    pub fn save(&self) -> SavedSerial {
        let s = self.uart.state();
        SavedSerial {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Replaces the UART's state (same interrupt line and output; `placeholder` stands in
    /// for the output during the swap).
    pub fn restore(&mut self, saved: &SavedSerial, placeholder: W) -> Result<(), String> {
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "{} bytes in the receive FIFO",
                saved.in_buffer.len()
            ));
        }
        let state = SerialState {
            baud_divisor_low: saved.divisor[0],
            baud_divisor_high: saved.divisor[1],
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let irq = || {
            self.uart
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial irq: {e}"))
        };
        let (a, b) = (irq()?, irq()?);
        let old = std::mem::replace(&mut self.uart, Serial::new(IrqTrigger(a), placeholder));
        self.uart = Serial::from_state(&state, IrqTrigger(b), NoEvents, old.into_writer())
            .map_err(|e| format!("serial state: {e:?}"))?;
        self.sync_coalescing();
        Ok(())
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.flush_output();
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
        let coalescing = self.coalesce.as_ref().is_some_and(|c| c.enabled());
        if off != THR {
            self.flush_output();
        }
        if let Err(e) = self.uart.write(off, *value) {
            tracing::warn!(error = ?e, "serial write failed");
        }
        match off {
            // Keep the console current even if the guest dies right after; a coalesced batch
            // is flushed when it ends.
            THR if !coalescing => self.flush_output(),
            IER => self.sync_coalescing(),
            _ => {}
        }
    }

    fn flush(&mut self) {
        self.flush_output();
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

    #[test]
    fn state_survives_a_restore() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq.try_clone().expect("clone"), Vec::new());
        s.write(1, &[0x02]);
        s.write(7, &[0x5a]);
        s.enqueue_input(b"ab");
        let saved = s.save();
        let mut r = SerialConsole::new(irq, Vec::new());
        r.restore(&saved, Vec::new()).expect("restore");
        assert_eq!(r.save(), saved);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
