//! Requests through the channel's `FAULT` register (see `ddvmm_translation::channel::fault`):
//! fault injection, and the take-back that shares the register. The slot (`slot`) reads the
//! register; this module says what each code means and does what concerns a ring.

use std::time::Duration;

use ddvmm_translation::channel::fault;
use ddvmm_translation::ring::{AgentRing, RawCompletion, RawRegion};

/// What a `FAULT` code asks of the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Request {
    /// Nothing.
    #[default]
    None,
    /// Panic the driver VM's kernel (whole VM: done at once, ring or not).
    Panic,
    /// Reboot the driver VM's kernel (whole VM).
    Reset,
    /// Stop serving and stop the heartbeat, forever (whole VM, as far as the client sees).
    Hang,
    /// Publish garbage completions (needs a ring).
    Corrupt,
    /// Store a completion producer index a ring ahead (needs a ring).
    BadIndex,
    /// Let go of the channel: the VMM takes it back.
    Detach,
    /// A code this agent does not know.
    Unknown(u32),
}

impl Request {
    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            fault::NONE => Request::None,
            fault::PANIC => Request::Panic,
            fault::RESET => Request::Reset,
            fault::HANG => Request::Hang,
            fault::CORRUPT => Request::Corrupt,
            fault::BAD_INDEX => Request::BadIndex,
            fault::DETACH => Request::Detach,
            other => Request::Unknown(other),
        }
    }

    /// Whether it acts on the channel's ring (so waits for one to be attached).
    pub(crate) fn needs_ring(self) -> bool {
        matches!(self, Request::Corrupt | Request::BadIndex)
    }

    /// Does what concerns the whole driver VM (a panic, a reset, a hang: this never returns
    /// then); anything else is left to the caller.
    pub(crate) fn act_on_vm(self) {
        match self {
            Request::Panic => sysrq(b'c', "panic"),
            Request::Reset => sysrq(b'b', "reset"),
            Request::Hang => {
                println!("ddvmm-agent: fault injection: hang (no more service, no heartbeat)");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Request::Unknown(code) => eprintln!("ddvmm-agent: unknown fault request {code}"),
            _ => {}
        }
    }
}

/// What a request taken while serving a ring left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    /// Nothing visible (no request, or the kernel is going down).
    Nothing,
    /// Garbage completions published.
    Garbage,
    /// The ring is broken: publish nothing more on it (a later completion would store a sane
    /// index again and hide the fault).
    BrokenRing,
    /// The channel is taken back: stop serving it.
    Detach,
}

impl Injected {
    /// Whether something was published the client should hear of (ring the doorbell).
    pub(crate) fn published(self) -> bool {
        matches!(self, Injected::Garbage | Injected::BrokenRing)
    }
}

/// Does to `ring` what `request` asks (whole-VM requests were done when it was taken).
pub(crate) fn on_ring(request: Request, ring: &mut AgentRing<RawRegion>) -> Injected {
    match request {
        Request::Corrupt => {
            println!("ddvmm-agent: fault injection: garbage completions");
            for id in 0..16u64 {
                publish_garbage(ring, id.wrapping_mul(0x9E37_79B9), 4096);
            }
            Injected::Garbage
        }
        Request::BadIndex => {
            println!("ddvmm-agent: fault injection: completion producer index a ring ahead");
            if let Err(e) = ring.corrupt_completion_index() {
                eprintln!("ddvmm-agent: bad-index: {e}");
            }
            Injected::BrokenRing
        }
        Request::Detach => Injected::Detach,
        _ => Injected::Nothing,
    }
}

/// Test mode: one bogus completion the client must reject (rotating through the kinds).
pub(crate) fn publish_garbage(ring: &mut AgentRing<RawRegion>, id: u64, len: u32) {
    let kind = id % 4;
    let raw = RawCompletion {
        id: match kind {
            0 => u64::MAX - id,
            _ => id,
        },
        generation: match kind {
            3 => ring.generation().wrapping_add(7),
            _ => ring.generation(),
        },
        status: if kind == 1 { 0xdead } else { 0 },
        len: if kind == 2 {
            len.saturating_add(4096) | 1
        } else {
            len
        },
    };
    let _ = ring.publish_unchecked(raw);
}

/// Makes the kernel act at once through `/proc/sysrq-trigger` (`c` panic, `b` reboot).
pub(crate) fn sysrq(key: u8, why: &str) {
    println!(
        "ddvmm-agent: fault injection: {why} (sysrq {})",
        key as char
    );
    if let Err(e) = std::fs::write("/proc/sysrq-trigger", [key]) {
        eprintln!("ddvmm-agent: sysrq-trigger: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_requests() {
        let all = [
            (fault::NONE, Request::None),
            (fault::PANIC, Request::Panic),
            (fault::HANG, Request::Hang),
            (fault::CORRUPT, Request::Corrupt),
            (fault::RESET, Request::Reset),
            (fault::BAD_INDEX, Request::BadIndex),
            (fault::DETACH, Request::Detach),
            (77, Request::Unknown(77)),
        ];
        for (code, request) in all {
            assert_eq!(Request::from_code(code), request);
            assert_eq!(
                request.needs_ring(),
                matches!(code, fault::CORRUPT | fault::BAD_INDEX)
            );
        }
        assert!(Injected::Garbage.published() && Injected::BrokenRing.published());
        assert!(!Injected::Detach.published() && !Injected::Nothing.published());
    }
}
