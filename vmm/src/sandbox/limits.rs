//! Bounds on what a guest can make a VMM write: the console file stops growing at a cap, and
//! log lines (many are a guest's doing: a bad descriptor, a device reset) are rate-limited and
//! capped in total, so no guest can fill the host's disk.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// A writer that passes through the first `limit` bytes, then one notice, then nothing.
pub struct CappedWriter<W: Write> {
    inner: W,
    left: u64,
    limit: u64,
    noticed: bool,
}

impl<W: Write> CappedWriter<W> {
    /// Caps `inner` at `limit` bytes.
    pub fn new(inner: W, limit: u64) -> Self {
        CappedWriter {
            inner,
            left: limit,
            limit,
            noticed: false,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            if !self.noticed {
                self.noticed = true;
                let notice = format!(
                    "\n[ddvmm: console output stopped at its limit of {} bytes]\n",
                    self.limit
                );
                // The notice is best effort and not counted: it is written once.
                let _ = self.inner.write_all(notice.as_bytes());
                let _ = self.inner.flush();
            }
            // Swallow: the guest's UART must not stall or error because the file is full.
            return Ok(buf.len());
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let written = self.inner.write(&buf[..n])?;
        self.left -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Token bucket state of the log limiter.
struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
    bytes_left: u64,
}

/// A `tracing` writer for stderr that lets through at most `burst` lines at once and `rate`
/// lines per second after that, and `total` bytes in all; dropped lines are counted and
/// reported with the next line that passes.
pub struct LogLimiter {
    bucket: Mutex<Bucket>,
    rate: f64,
    burst: f64,
}

impl LogLimiter {
    /// A limiter of `rate` lines/s, bursts of `burst`, `total` bytes.
    pub fn new(rate: f64, burst: u32, total: u64) -> Self {
        LogLimiter {
            bucket: Mutex::new(Bucket {
                tokens: f64::from(burst),
                last: Instant::now(),
                dropped: 0,
                bytes_left: total,
            }),
            rate,
            burst: f64::from(burst),
        }
    }

    /// Takes a token for one line: `Some(lines dropped before it)` if it may be written.
    fn admit(&self) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        if b.tokens < 1.0 || b.bytes_left == 0 {
            b.dropped += 1;
            return None;
        }
        b.tokens -= 1.0;
        Some(std::mem::take(&mut b.dropped))
    }

    /// Charges `n` bytes; false once the total is spent.
    fn charge(&self, n: usize) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.bytes_left == 0 {
            return false;
        }
        b.bytes_left = b.bytes_left.saturating_sub(n as u64);
        true
    }
}

/// One log line's writer (see [`LogLimiter`]).
pub struct LimitedLine<'a> {
    limiter: &'a LogLimiter,
    admitted: Option<u64>,
}

impl Write for LimitedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(dropped) = self.admitted else {
            return Ok(buf.len());
        };
        let mut err = std::io::stderr().lock();
        if dropped > 0 {
            let note = format!("ddvmm: {dropped} log lines dropped (rate limit)\n");
            if self.limiter.charge(note.len()) {
                let _ = err.write_all(note.as_bytes());
            }
            self.admitted = Some(0);
        }
        if self.limiter.charge(buf.len()) {
            err.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLimiter {
    type Writer = LimitedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LimitedLine {
            limiter: self,
            admitted: self.admit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_stops_at_its_cap_with_one_notice() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        assert_eq!(w.write(b"0123456").unwrap(), 7);
        // Partial write at the edge, then everything is swallowed.
        assert_eq!(w.write(b"789abc").unwrap(), 3);
        for _ in 0..1000 {
            assert_eq!(w.write(b"flood").unwrap(), 5);
        }
        let out = String::from_utf8(w.inner).unwrap();
        assert!(out.starts_with("0123456789\n[ddvmm: console output stopped"));
        assert_eq!(out.matches("stopped").count(), 1);
        assert!(out.len() < 100);
    }

    #[test]
    fn log_limiter_admits_a_burst_then_counts_drops() {
        let l = LogLimiter::new(0.0, 3, 1 << 20);
        let admitted: Vec<_> = (0..10).map(|_| l.admit()).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        assert_eq!(l.bucket.lock().unwrap().dropped, 7);
    }

    #[test]
    fn log_limiter_stops_at_its_byte_total() {
        let l = LogLimiter::new(1e9, 1000, 100);
        assert!(l.charge(60));
        assert!(l.charge(60));
        assert!(!l.charge(1));
        assert!(l.admit().is_none());
    }
}
