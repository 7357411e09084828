//! How a driver VM fault was detected: the classification of a VMM process's exit status and
//! the names of the watcher's own detections (used in events and metrics).

use std::os::unix::process::ExitStatusExt;

use serde::{Deserialize, Serialize};

/// How a driver VM fault was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detection {
    /// Exit status 4: the guest kernel panicked and said so through pvpanic.
    Pvpanic,
    /// Exit status 5: a vCPU crashed (triple fault / KVM shutdown, internal error).
    VcpuCrash,
    /// Exit status 3: the guest reset itself (i8042 reset line, KVM reset event).
    Reset,
    /// Exit status 0: the guest powered off.
    Poweroff,
    /// The VMM process was killed by a signal.
    ProcessKilled,
    /// The VMM made a system call its seccomp filter forbids (killed by `SIGSYS`).
    Seccomp,
    /// Any other exit of the VMM process.
    VmmError,
    /// The agent's heartbeat stopped.
    Heartbeat,
    /// Requests outstanding and none completed within the progress timeout.
    NoProgress,
    /// A client counted garbage completions.
    CorruptCompletions,
    /// A client's ring was broken by an agent index (the ring stopped until a new generation).
    CorruptRing,
    /// The agents were not ready within the boot timeout.
    BootTimeout,
}

impl Detection {
    /// Classifies a VMM process exit.
    pub fn from_exit(s: std::process::ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(0), _) => Detection::Poweroff,
            (Some(3), _) => Detection::Reset,
            (Some(4), _) => Detection::Pvpanic,
            (Some(5), _) => Detection::VcpuCrash,
            (None, Some(libc::SIGSYS)) => Detection::Seccomp,
            (None, Some(_)) => Detection::ProcessKilled,
            _ => Detection::VmmError,
        }
    }

    /// Label used in events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Detection::Pvpanic => "pvpanic",
            Detection::VcpuCrash => "vcpu-crash",
            Detection::Reset => "reset",
            Detection::Poweroff => "poweroff",
            Detection::ProcessKilled => "process-killed",
            Detection::Seccomp => "seccomp",
            Detection::VmmError => "vmm-error",
            Detection::Heartbeat => "heartbeat",
            Detection::NoProgress => "no-progress",
            Detection::CorruptCompletions => "corrupt-completions",
            Detection::CorruptRing => "corrupt-ring",
            Detection::BootTimeout => "boot-timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_map_to_detections() {
        use std::process::ExitStatus;
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert_eq!(Detection::from_exit(code(4)), Detection::Pvpanic);
        assert_eq!(Detection::from_exit(code(5)), Detection::VcpuCrash);
        assert_eq!(Detection::from_exit(code(3)), Detection::Reset);
        assert_eq!(Detection::from_exit(code(0)), Detection::Poweroff);
        assert_eq!(Detection::from_exit(code(1)), Detection::VmmError);
        assert_eq!(
            Detection::from_exit(ExitStatus::from_raw(9)),
            Detection::ProcessKilled
        );
        assert_eq!(
            Detection::from_exit(ExitStatus::from_raw(libc::SIGSYS)),
            Detection::Seccomp
        );
    }
}
