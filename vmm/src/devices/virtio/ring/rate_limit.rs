//! Per-channel limits on requests and bytes per second: two token buckets the ring worker
//! consults before it puts a request on the ring. The client's own VMM enforces them, so a
//! client cannot exceed its limits whatever it sends, and requests over the limit wait in
//! the journal (the guest sees a slower disk, never an error).
//!
//! A bucket holds [`BURST`] worth of its rate and refills continuously. A request larger
//! than a full bucket goes once the bucket is full and leaves it in debt, so large requests
//! are never starved and the long-run rate still holds. A limited worker sleeps until
//! [`BATCH`] worth of tokens are back (or the waiting request fits), so a saturating client
//! costs about 1 / [`BATCH`] wakeups per second, not one per request.

use std::time::{Duration, Instant};

/// Time of the rate a full bucket holds.
pub const BURST: Duration = Duration::from_millis(100);
/// Tokens a limited worker waits for before it tries again.
pub const BATCH: Duration = Duration::from_millis(10);

/// What a channel may do per second (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second.
    pub ops_per_s: Option<u64>,
    /// Payload bytes per second.
    pub bytes_per_s: Option<u64>,
}

impl RateLimit {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.ops_per_s.is_some() || self.bytes_per_s.is_some()
    }

    /// The limit as the options of `--disk` and `--ring-disk`: `,iops=N,bps=N` (each only if
    /// set; empty when unlimited). [`Self::set_option`] reads them back.
    pub fn options(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.ops_per_s {
            s.push_str(&format!(",iops={n}"));
        }
        if let Some(n) = self.bytes_per_s {
            s.push_str(&format!(",bps={n}"));
        }
        s
    }

    /// Sets the limit `key` (`iops` or `bps`) from an option's `value`; `Ok(false)` if `key`
    /// is not a limit.
    pub fn set_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let slot = match key {
            "iops" => &mut self.ops_per_s,
            "bps" => &mut self.bytes_per_s,
            _ => return Ok(false),
        };
        match value.parse::<u64>() {
            Ok(n) if n > 0 => *slot = Some(n),
            _ => return Err(format!("'{key}={value}' needs a positive number")),
        }
        Ok(true)
    }
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let capacity = (rate * BURST.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + self.rate * elapsed.as_secs_f64()).min(self.capacity);
    }

    /// Tokens needed before a request of `cost` may go (at most a full bucket).
    fn need(&self, cost: f64) -> f64 {
        cost.min(self.capacity)
    }

    /// How long until `cost` may go and a batch has accumulated; zero if it may go now.
    fn wait(&self, cost: f64) -> Duration {
        let need = self.need(cost);
        if self.tokens >= need {
            return Duration::ZERO;
        }
        let target = need.max((self.rate * BATCH.as_secs_f64()).min(self.capacity));
        Duration::from_secs_f64((target - self.tokens) / self.rate)
    }
}

/// The buckets of one channel.
#[derive(Debug)]
pub struct RateLimiter {
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl RateLimiter {
    /// Full buckets for `limit`; `None` if nothing is limited.
    pub fn new(limit: RateLimit, now: Instant) -> Option<Self> {
        limit.is_limited().then(|| RateLimiter {
            ops: limit.ops_per_s.map(Bucket::new),
            bytes: limit.bytes_per_s.map(Bucket::new),
            last: now,
        })
    }

    /// Whether a request of `bytes` may go now (`Err`: how long until it may); takes nothing.
    pub fn check(&mut self, now: Instant, bytes: u64) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now.max(self.last);
        let mut wait = Duration::ZERO;
        for (bucket, cost) in [
            (self.ops.as_mut(), 1.0),
            (self.bytes.as_mut(), bytes as f64),
        ] {
            if let Some(b) = bucket {
                b.refill(elapsed);
                wait = wait.max(b.wait(cost));
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Charges a request of `bytes` that went (after [`Self::check`] allowed it).
    pub fn commit(&mut self, bytes: u64) {
        if let Some(b) = self.ops.as_mut() {
            b.tokens -= 1.0;
        }
        if let Some(b) = self.bytes.as_mut() {
            b.tokens -= bytes as f64;
        }
    }

    /// [`Self::check`], then [`Self::commit`] if the request may go.
    pub fn take(&mut self, now: Instant, bytes: u64) -> Result<(), Duration> {
        self.check(now, bytes)?;
        self.commit(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests sent by a saturating sender that retries exactly when told, over `span`.
    fn saturate(limit: RateLimit, bytes: u64, span: Duration) -> (u64, u64) {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(limit, t0).expect("limited");
        let (mut now, mut sent, mut wakeups) = (t0, 0u64, 0u64);
        while now < t0 + span {
            match r.take(now, bytes) {
                Ok(()) => sent += 1,
                Err(w) => {
                    assert!(!w.is_zero());
                    now += w;
                    wakeups += 1;
                }
            }
        }
        (sent, wakeups)
    }

    #[test]
    fn iops_limit_holds_with_one_burst() {
        let limit = RateLimit {
            ops_per_s: Some(1000),
            bytes_per_s: None,
        };
        let (sent, wakeups) = saturate(limit, 4096, Duration::from_secs(10));
        // 10 s at 1000/s plus the initial 100 ms burst.
        assert!((10_000..=10_101).contains(&sent), "{sent}");
        // About one wakeup per 10 ms batch, not one per request.
        assert!((900..=1100).contains(&wakeups), "{wakeups}");
    }

    #[test]
    fn bandwidth_limit_holds_and_big_requests_go_into_debt() {
        let limit = RateLimit {
            ops_per_s: None,
            bytes_per_s: Some(1 << 20),
        };
        // 4 MiB requests are larger than the bucket (100 ms = 0.1 MiB): they still go, about
        // one every 4 s.
        let (sent, _) = saturate(limit, 4 << 20, Duration::from_secs(40));
        assert!((10..=11).contains(&sent), "{sent}");
        let (sent, _) = saturate(limit, 4096, Duration::from_secs(10));
        let expect = 10 * 256 + 25;
        assert!(sent.abs_diff(expect) <= 2, "{sent}");
    }

    #[test]
    fn both_limits_apply_and_the_stricter_wins() {
        let limit = RateLimit {
            ops_per_s: Some(100),
            bytes_per_s: Some(1 << 20),
        };
        // 64 KiB requests: bandwidth allows 16/s, ops 100/s.
        let (sent, _) = saturate(limit, 64 << 10, Duration::from_secs(10));
        assert!((160..=162).contains(&sent), "{sent}");
        assert!(RateLimiter::new(RateLimit::default(), Instant::now()).is_none());
    }

    #[test]
    fn options_round_trip() {
        let limit = RateLimit {
            ops_per_s: Some(1000),
            bytes_per_s: Some(1 << 20),
        };
        assert_eq!(limit.options(), ",iops=1000,bps=1048576");
        assert_eq!(RateLimit::default().options(), "");
        let mut back = RateLimit::default();
        for opt in limit.options().split(',').skip(1) {
            let (k, v) = opt.split_once('=').expect("key=value");
            assert_eq!(back.set_option(k, v), Ok(true));
        }
        assert_eq!(back, limit);
        assert_eq!(back.set_option("ro", ""), Ok(false));
        assert!(back.set_option("iops", "0").is_err());
        assert!(back.set_option("bps", "x").is_err());
    }

    #[test]
    fn an_idle_channel_banks_no_more_than_a_burst() {
        let t0 = Instant::now();
        let limit = RateLimit {
            ops_per_s: Some(1000),
            bytes_per_s: None,
        };
        let mut r = RateLimiter::new(limit, t0).expect("limited");
        let later = t0 + Duration::from_secs(3600);
        let burst = (0..1000).take_while(|_| r.take(later, 0).is_ok()).count();
        assert_eq!(burst, 100);
        // A clock that goes backwards refills nothing and breaks nothing.
        assert!(r.take(t0, 0).is_err());
    }
}
