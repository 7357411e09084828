//! Why a guest stopped, and how the `ddvmm run` process reports it.
//!
//! | guest event                                   | exit status |
//! |-----------------------------------------------|-------------|
//! | clean power-off (ACPI S5)                     | 0           |
//! | VMM error (bad input, KVM failure)            | 1           |
//! | command-line usage error                      | 2           |
//! | reboot (i8042 reset, KVM reset event)         | 3           |
//! | kernel panic (pvpanic)                        | 4           |
//! | crash (triple fault, KVM internal error, ...) | 5           |

use std::fmt;
use std::sync::mpsc::Sender;

/// The reason a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reboot,
    /// The guest kernel panicked and said so through pvpanic.
    Panic,
    /// A vCPU hit a state it cannot continue from.
    Crash {
        /// The vCPU that crashed.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
}

impl GuestExit {
    /// The process exit status `ddvmm run` uses for this exit.
    pub fn status_code(&self) -> i32 {
        match self {
            GuestExit::PowerOff => 0,
            GuestExit::Reboot => 3,
            GuestExit::Panic => 4,
            GuestExit::Crash { .. } => 5,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::PowerOff => write!(f, "guest powered off"),
            GuestExit::Reboot => write!(f, "guest rebooted"),
            GuestExit::Panic => write!(f, "guest kernel panicked"),
            GuestExit::Crash { vcpu, reason } => {
                write!(f, "guest crashed on vCPU {vcpu}: {reason}")
            }
        }
    }
}

/// What the machine's main loop waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineEvent {
    /// The guest stopped.
    Exit(GuestExit),
    /// A channel's agent parked at its gate (channel index).
    Parked(u32),
    /// Take a snapshot now (into the machine's snapshot target).
    Snapshot,
}

/// Where devices and vCPUs report that the guest stopped (the first report wins), and where
/// other machine events arrive.
#[derive(Clone)]
pub struct ExitNotifier(Sender<MachineEvent>);

impl ExitNotifier {
    /// Wraps a channel sender.
    pub fn new(tx: Sender<MachineEvent>) -> Self {
        ExitNotifier(tx)
    }

    /// Reports an exit. A closed channel means the VM is already stopping; ignore it.
    pub fn notify(&self, exit: GuestExit) {
        self.event(MachineEvent::Exit(exit));
    }

    /// Reports any event.
    pub fn event(&self, event: MachineEvent) {
        let _ = self.0.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_status_codes() {
        let codes = [
            GuestExit::PowerOff.status_code(),
            GuestExit::Reboot.status_code(),
            GuestExit::Panic.status_code(),
            GuestExit::Crash {
                vcpu: 0,
                reason: String::new(),
            }
            .status_code(),
        ];
        for (i, a) in codes.iter().enumerate() {
            for b in &codes[i + 1..] {
                assert_ne!(a, b);
            }
            assert_ne!(*a, 1);
            assert_ne!(*a, 2);
        }
    }
}
