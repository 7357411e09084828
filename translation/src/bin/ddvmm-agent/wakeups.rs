//! Why a channel's serving thread woke up, for the block and the net server alike: the
//! client's interrupt, the server's other descriptor (the I/O threads' completions, or the
//! TAP), or the poll timeout. A timeout wake that finds requests on the ring is a *missed
//! notification* (the client kicked, no interrupt came): counted, and the first few printed
//! with the interrupt's state, since with a long idle heartbeat each one costs a request the
//! whole idle period.

use std::time::{Duration, Instant};

use crate::pci::{UioIrq, Woken};

/// Missed notifications printed one by one (the rest are only counted).
const PRINTED: u64 = 5;
/// How often the counts are printed (on a wakeup).
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Wakeups of one channel's serving thread, by cause.
pub struct Wakeups {
    /// The channel's index, for the console.
    index: u32,
    /// What the other descriptor is ("io", "tap").
    other_name: &'static str,
    irq: u64,
    other: u64,
    timeout: u64,
    /// Timeout wakes that found requests.
    missed: u64,
    /// The last wake was a timeout.
    after_timeout: bool,
    irq_error: u64,
    enable_errors: u64,
    last_error: String,
    last_report: Instant,
}

impl Wakeups {
    pub fn new(index: u32, other_name: &'static str) -> Self {
        Wakeups {
            index,
            other_name,
            irq: 0,
            other: 0,
            timeout: 0,
            missed: 0,
            after_timeout: false,
            irq_error: 0,
            enable_errors: 0,
            last_error: String::new(),
            last_report: Instant::now(),
        }
    }

    /// Records what ended a wait.
    pub fn woke(&mut self, w: Woken) {
        self.irq += u64::from(w.irq);
        self.irq_error += u64::from(w.irq_error);
        self.other += u64::from(w.other);
        if !(w.irq || w.irq_error || w.other) {
            self.timeout += 1;
            self.after_timeout = true;
        }
    }

    /// Unmasks the interrupt before a sleep; a failure is counted and costs a millisecond.
    pub fn enable(&mut self, irq: &mut UioIrq) {
        if let Err(e) = irq.enable() {
            self.enable_errors += 1;
            self.last_error = e;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// After the first look at the ring since a wake: `found` requests there.
    pub fn looked(&mut self, found: bool, irq: &UioIrq) {
        if std::mem::take(&mut self.after_timeout) && found {
            self.missed += 1;
            if self.missed <= PRINTED {
                crate::console::say(format!(
                    "ddvmm-agent: channel {}: requests found after a timeout wake (a missed \
                     notification; {})",
                    self.index,
                    irq.describe()
                ));
            }
        }
    }

    /// The counts, with `extra` (the server's own), once every [`REPORT_EVERY`].
    pub fn report_if_due(&mut self, extra: impl FnOnce() -> String) {
        if self.last_report.elapsed() < REPORT_EVERY {
            return;
        }
        let intx = std::fs::read_to_string("/proc/interrupts")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("uio"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "ddvmm-agent: channel {}: {}wakeups irq {} {} {} timeout {} (missed notifications \
             {}) irq-error {}; enable errors {} ({}); {intx}",
            self.index,
            extra(),
            self.irq,
            self.other_name,
            self.other,
            self.timeout,
            self.missed,
            self.irq_error,
            self.enable_errors,
            self.last_error
        );
        self.last_report = Instant::now();
    }
}
