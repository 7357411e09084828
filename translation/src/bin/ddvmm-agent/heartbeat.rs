//! When a served channel's heartbeat is written.
//!
//! The daemon reads the heartbeat counter in the ring header to tell a live agent from a hung
//! one. A channel with work (requests served since the last beat, or in flight now) is beaten
//! every `busy` period; an idle one every `idle` period (each wake costs its VM about ten
//! exits). A request after a quiet spell finds the beat overdue and is answered with one at
//! once: the daemon, which starts its clock when it sees a request on the ring, hears from a
//! live agent promptly. A notification the agent missed would cost its request up to the idle
//! period and the daemon would take the agent for hung: each one is counted (`wakeups`). The
//! one cause found (a standby VMM's irqfd taking the kicks meant for the running VM, when the
//! idle period was 1 s for that reason) is gone: irqfds are registered only when a VM runs.

use std::time::{Duration, Instant};

/// The two periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Between beats while the channel has work.
    pub busy: Duration,
    /// Between beats while it has none.
    pub idle: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            busy: Duration::from_millis(500),
            idle: Duration::from_secs(30),
        }
    }
}

impl Policy {
    /// A server's clock, starting now (as if it had just beaten).
    pub fn start(&self) -> Heartbeat {
        self.start_at(Instant::now())
    }

    fn start_at(&self, now: Instant) -> Heartbeat {
        Heartbeat {
            policy: *self,
            last: now,
            served: false,
        }
    }
}

/// One server's heartbeat clock.
#[derive(Debug)]
pub struct Heartbeat {
    policy: Policy,
    last: Instant,
    served: bool,
}

impl Heartbeat {
    /// Something was served (or taken up) since the last beat.
    pub fn served(&mut self) {
        self.served = true;
    }

    fn period(&self, working: bool) -> Duration {
        if self.served || working {
            self.policy.busy
        } else {
            self.policy.idle
        }
    }

    /// Whether a beat is due (`working`: requests are in flight now).
    pub fn due(&self, working: bool) -> bool {
        self.due_at(Instant::now(), working)
    }

    fn due_at(&self, now: Instant, working: bool) -> bool {
        now.saturating_duration_since(self.last) >= self.period(working)
    }

    /// A beat was written.
    pub fn beaten(&mut self) {
        self.beaten_at(Instant::now());
    }

    fn beaten_at(&mut self, now: Instant) {
        self.last = now;
        self.served = false;
    }

    /// Milliseconds until the next beat is due, as a `poll` timeout (at least 1).
    pub fn timeout_ms(&self, working: bool) -> i32 {
        self.timeout_at(Instant::now(), working)
    }

    fn timeout_at(&self, now: Instant, working: bool) -> i32 {
        let left = self
            .period(working)
            .saturating_sub(now.saturating_duration_since(self.last));
        i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        busy: Duration::from_millis(500),
        idle: Duration::from_secs(30),
    };

    #[test]
    fn idle_channel_beats_at_the_idle_period() {
        let t0 = Instant::now();
        let mut b = P.start_at(t0);
        assert!(!b.due_at(t0 + Duration::from_secs(29), false));
        assert_eq!(b.timeout_at(t0 + Duration::from_secs(29), false), 1000);
        assert!(b.due_at(t0 + Duration::from_secs(30), false));
        b.beaten_at(t0 + Duration::from_secs(30));
        assert_eq!(b.timeout_at(t0 + Duration::from_secs(30), false), 30_000);
    }

    #[test]
    fn work_makes_the_beat_due_at_the_busy_period() {
        let t0 = Instant::now();
        let mut b = P.start_at(t0);
        // In flight, nothing served yet.
        assert!(b.due_at(t0 + Duration::from_millis(500), true));
        assert_eq!(b.timeout_at(t0 + Duration::from_millis(100), true), 400);
        // A request after a quiet spell: the beat is overdue at once.
        b.served();
        assert!(b.due_at(t0 + Duration::from_secs(20), false));
        b.beaten_at(t0 + Duration::from_secs(20));
        // Beating clears what was served; idle again.
        assert!(!b.due_at(t0 + Duration::from_secs(21), false));
        assert!(b.due_at(t0 + Duration::from_secs(21), true));
    }

    #[test]
    fn an_overdue_beat_is_a_minimal_timeout() {
        let t0 = Instant::now();
        let b = P.start_at(t0);
        assert_eq!(b.timeout_at(t0 + Duration::from_secs(99), false), 1);
    }
}
