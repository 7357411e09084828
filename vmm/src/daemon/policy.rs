//! The restart policy, as a pure type: how long to wait before a restart (none for a driver VM
//! that served since its last restart; an exponential backoff for one that keeps faulting before
//! it serves), how many restarts a driver VM gets within a window before it is quarantined, and
//! the same count per channel for crashes charged to one channel's poison request. No clock of
//! its own: every decision takes `now`, so it is unit-tested exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::config::RecoveryConfig;

/// A channel as (client, ring disk index).
pub type ChannelId = (String, usize);

/// The numbers the policy applies (from `[recovery]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Restarts (or charged crashes) allowed within the window.
    pub max_restarts: u32,
    /// The window.
    pub window: Duration,
    /// Delay before the second restart of a series.
    pub backoff_initial_ms: u64,
    /// Longest delay.
    pub backoff_max_ms: u64,
}

impl From<&RecoveryConfig> for PolicyLimits {
    fn from(c: &RecoveryConfig) -> Self {
        PolicyLimits {
            max_restarts: c.max_restarts,
            window: Duration::from_secs(c.restart_window_s),
            backoff_initial_ms: c.backoff_initial_ms,
            backoff_max_ms: c.backoff_max_ms,
        }
    }
}

/// What the policy remembers: restarts per driver VM and charged crashes per channel within
/// the window, and the channels quarantined on their own.
#[derive(Debug, Default)]
pub struct RestartPolicy {
    restarts: BTreeMap<String, VecDeque<Instant>>,
    /// Restarts since the driver VM last served (what the backoff grows with).
    unserved: BTreeMap<String, usize>,
    strikes: BTreeMap<ChannelId, VecDeque<Instant>>,
    quarantined: BTreeSet<ChannelId>,
}

/// The delay before the `n`th restart since the driver VM last served: none for the first (a
/// driver VM that was serving is replaced at once), then `initial` doubled per further one,
/// capped.
pub fn backoff(n: usize, initial_ms: u64, max_ms: u64) -> Duration {
    let ms = match n {
        0 | 1 => 0,
        n => initial_ms
            .saturating_mul(1u64 << (n - 2).min(20))
            .min(max_ms),
    };
    Duration::from_millis(ms)
}

/// Drops the times older than `window` before `now` from the front of `times` (oldest first).
fn forget_before(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) > window)
    {
        times.pop_front();
    }
}

impl RestartPolicy {
    /// Counts a restart of `driver` at `now`: the backoff to wait, or `None` if the driver VM
    /// has had its `max_restarts` within the window (quarantine it).
    pub fn restart(&mut self, driver: &str, now: Instant, l: &PolicyLimits) -> Option<Duration> {
        let times = self.restarts.entry(driver.to_string()).or_default();
        forget_before(times, now, l.window);
        if times.len() >= l.max_restarts as usize {
            return None;
        }
        times.push_back(now);
        let n = self.unserved.entry(driver.to_string()).or_default();
        *n += 1;
        Some(backoff(*n, l.backoff_initial_ms, l.backoff_max_ms))
    }

    /// `driver` serves again after a restart: its next restart is immediate.
    pub fn served(&mut self, driver: &str) {
        self.unserved.remove(driver);
    }

    /// A channel's request turned out poison after `crashes` crashes: they are the channel's,
    /// not the driver VM's. Takes them off the driver VM's count, adds them to the channel's,
    /// and says whether the channel reached the cap (quarantine it alone).
    pub fn charge_channel(
        &mut self,
        driver: &str,
        channel: &ChannelId,
        crashes: u32,
        now: Instant,
        l: &PolicyLimits,
    ) -> bool {
        if let Some(times) = self.restarts.get_mut(driver) {
            for _ in 1..crashes {
                times.pop_back();
            }
        }
        let strikes = self.strikes.entry(channel.clone()).or_default();
        forget_before(strikes, now, l.window);
        for _ in 0..crashes {
            strikes.push_back(now);
        }
        strikes.len() >= l.max_restarts as usize
    }

    /// Forgets `driver`'s restarts (an API start after a quarantine).
    pub fn forget(&mut self, driver: &str) {
        self.restarts.remove(driver);
        self.unserved.remove(driver);
    }

    /// Records a channel quarantined on its own.
    pub fn quarantine_channel(&mut self, channel: ChannelId) {
        self.quarantined.insert(channel);
    }

    /// The channels quarantined on their own.
    pub fn quarantined(&self) -> &BTreeSet<ChannelId> {
        &self.quarantined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PolicyLimits {
        PolicyLimits {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
        }
    }

    #[test]
    fn the_first_restart_is_immediate_then_backoff_doubles_to_its_cap() {
        let ms = |n| backoff(n, 100, 1000).as_millis();
        assert_eq!(
            (ms(1), ms(2), ms(3), ms(4), ms(5), ms(40)),
            (0, 100, 200, 400, 800, 1000)
        );
        assert_eq!(
            backoff(64, u64::MAX, u64::MAX).as_millis(),
            u128::from(u64::MAX)
        );
    }

    #[test]
    fn the_cap_quarantines_within_the_window_and_the_window_forgets() {
        let (l, t0) = (limits(), Instant::now());
        let mut p = RestartPolicy::default();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(p.restart("d", at(0), &l), Some(Duration::ZERO));
        assert_eq!(p.restart("d", at(1), &l), Some(Duration::from_millis(100)));
        assert_eq!(p.restart("d", at(2), &l), Some(Duration::from_millis(200)));
        assert_eq!(p.restart("d", at(3), &l), None, "fourth within 60 s");
        assert_eq!(p.restart("other", at(3), &l), Some(Duration::ZERO));
        // 61 s after the first, it has left the window: room for one more, still backing off
        // (it has not served since).
        assert_eq!(p.restart("d", at(61), &l), Some(Duration::from_millis(400)));
        p.forget("d");
        assert_eq!(p.restart("d", at(62), &l), Some(Duration::ZERO));
    }

    #[test]
    fn a_driver_vm_that_served_is_restarted_at_once() {
        let (l, t0) = (limits(), Instant::now());
        let mut p = RestartPolicy::default();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(p.restart("d", at(0), &l), Some(Duration::ZERO));
        assert_eq!(p.restart("d", at(1), &l), Some(Duration::from_millis(100)));
        p.served("d");
        assert_eq!(p.restart("d", at(2), &l), Some(Duration::ZERO));
        // The cap still counts every restart in the window.
        assert_eq!(p.restart("d", at(3), &l), None);
    }

    #[test]
    fn poison_crashes_move_from_the_driver_to_the_channel() {
        let (l, t0) = (limits(), Instant::now());
        let mut p = RestartPolicy::default();
        for s in 0..3 {
            assert!(p.restart("d", t0 + Duration::from_secs(s), &l).is_some());
        }
        let ch = ("alpha".to_string(), 0);
        // Three crashes were the channel's: two come off the driver (the third restart is
        // the one under way), and the channel reaches its cap.
        assert!(p.charge_channel("d", &ch, 3, t0 + Duration::from_secs(3), &l));
        assert!(p.restart("d", t0 + Duration::from_secs(4), &l).is_some());
        assert!(!p.charge_channel("d", &("beta".into(), 0), 1, t0, &l));
        p.quarantine_channel(ch.clone());
        assert!(p.quarantined().contains(&ch));
    }
}
