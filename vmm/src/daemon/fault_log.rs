//! What the daemon reports about faults: the event log, the counters, and their Prometheus
//! rendering.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use super::detection::Detection;
use super::policy::RestartPolicy;
use super::supervisor::{Supervisor, VmState};
use crate::control::FaultKind;
use crate::stats_page;

/// Events kept for the API.
pub(super) const MAX_EVENTS: usize = 20_000;

/// One detected fault and what came of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultEvent {
    /// Driver VM.
    pub driver: String,
    /// The injected fault this detection is attributed to, if any.
    pub injected: Option<FaultKind>,
    /// How it was detected.
    pub detected_by: Detection,
    /// The channel (`client/disk`) the evidence came from, when it came from one: a stall,
    /// a broken ring, garbage completions, or a crash while that channel's suspect request
    /// was alone on the ring.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Wall clock of the detection (ms since the epoch).
    pub detected_at_ms: u64,
    /// Injection to detection.
    pub detect_ms: Option<f64>,
    /// Fault to first completion after the restart (set on the round that recovered).
    pub outage_ms: Option<f64>,
    /// Start of the new driver VM to its agents being ready (set on the round that recovered).
    pub boot_ms: Option<f64>,
    /// The round's timeline, step by step (ms; set on the round that recovered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<RecoverySteps>,
    /// Requests the clients replayed.
    pub replayed: u64,
    /// Requests failed as poison.
    pub poisoned: u64,
    /// How the new driver VM started: `restore` (from its template) or `boot`.
    pub restart: Cow<'static, str>,
    /// The restore was a standby VMM resumed (made ahead of time), not a process started.
    pub standby: bool,
    /// Why it booted where a restore was expected (no template, template refused or renewed,
    /// or the restore failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// `restarted`, `quarantined`, `restart-failed` or `restore-failed`.
    pub outcome: Cow<'static, str>,
}

/// Where a recovered round's time went, in order (ms). With the detection (`detect_ms`) and
/// the agents' start (`boot_ms`, between `start_ms` and `release_ms`) they add up to the
/// outage, up to the daemon's polling.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RecoverySteps {
    /// SIGKILL of what was left of the driver VM, until its VMM was reaped.
    pub kill_ms: f64,
    /// Every client told to start a new generation and hold its replay.
    pub replay_ms: f64,
    /// The restart policy's wait.
    pub backoff_ms: f64,
    /// Choosing the restart (checking the template) and starting it: a process spawned, or a
    /// standby resumed.
    pub start_ms: f64,
    /// Agents ready to the clients' replays released.
    pub release_ms: f64,
    /// Release to the last client's first completion (by the clients' clocks).
    pub serve_ms: Option<f64>,
}

/// Running sum, count and maximum of a duration in seconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Sum.
    pub sum: f64,
    /// Count.
    pub count: u64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    pub(super) fn add(&mut self, v: f64) {
        self.sum += v;
        self.count += 1;
        self.max = self.max.max(v);
    }
}

/// Counters and the event log of all recoveries.
#[derive(Debug, Default)]
pub struct FaultBook {
    /// Most recent events, oldest first.
    pub events: VecDeque<FaultEvent>,
    /// Faults by (driver, detection).
    pub faults: BTreeMap<(String, Detection), u64>,
    /// Injected faults by (driver, kind).
    pub injected: BTreeMap<(String, FaultKind), u64>,
    /// Restarts by driver.
    pub restarts: BTreeMap<String, u64>,
    /// Replayed requests by driver.
    pub replayed: BTreeMap<String, u64>,
    /// Poison requests by driver.
    pub poisoned: BTreeMap<String, u64>,
    /// Quarantines by driver.
    pub quarantines: BTreeMap<String, u64>,
    /// Outage by driver (seconds).
    pub outage: BTreeMap<String, Summary>,
    /// Detection latency by injected kind (seconds).
    pub detection: BTreeMap<FaultKind, Summary>,
    /// The restart policy's memory (restarts and channel strikes in the window).
    pub policy: RestartPolicy,
    /// Boots not caused by a recovery (start to agents ready), milliseconds, most recent last.
    pub cold_boots_ms: VecDeque<f64>,
}

impl Supervisor {
    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, FaultBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to the event log (the oldest go past [`MAX_EVENTS`]).
    pub(super) fn log_event(&self, e: FaultEvent) {
        let mut b = self.book();
        if b.events.len() >= MAX_EVENTS {
            b.events.pop_front();
        }
        b.events.push_back(e);
    }
    /// The event log.
    pub fn events(&self) -> Vec<FaultEvent> {
        self.book().events.iter().cloned().collect()
    }

    /// Cold boot times (start to agents ready) of driver VMs, milliseconds.
    pub fn cold_boots_ms(&self) -> Vec<f64> {
        self.book().cold_boots_ms.iter().copied().collect()
    }

    /// Everything the daemon counts, in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut m = super::metrics::Metrics::default();
        {
            let b = self.book();
            for ((d, det), n) in &b.faults {
                m.counter(
                    "ddvmm_driver_faults_total",
                    "Driver VM faults by detection path",
                    &[("driver", d), ("detected_by", det.name())],
                    *n as f64,
                );
            }
            for ((d, k), n) in &b.injected {
                m.counter(
                    "ddvmm_injected_faults_total",
                    "Faults injected through the API",
                    &[("driver", d), ("kind", k.name())],
                    *n as f64,
                );
            }
            for (metric, help, map) in [
                (
                    "ddvmm_driver_restarts_total",
                    "Driver VM restarts",
                    &b.restarts,
                ),
                (
                    "ddvmm_requests_replayed_total",
                    "Client requests replayed after a restart",
                    &b.replayed,
                ),
                (
                    "ddvmm_poison_requests_total",
                    "Requests failed as poison",
                    &b.poisoned,
                ),
                (
                    "ddvmm_quarantines_total",
                    "Driver VMs quarantined",
                    &b.quarantines,
                ),
            ] {
                for (d, n) in map {
                    m.counter(metric, help, &[("driver", d)], *n as f64);
                }
            }
            for (d, s) in &b.outage {
                m.summary(
                    "ddvmm_outage_seconds",
                    "Fault to first completion after the restart",
                    &[("driver", d)],
                    s,
                );
            }
            for (k, s) in &b.detection {
                m.summary(
                    "ddvmm_detection_seconds",
                    "Injected fault to detection",
                    &[("kind", k.name())],
                    s,
                );
            }
        }
        let (vms, pages) = {
            let g = self.lock();
            let vms: Vec<(String, bool, u64)> = g
                .vms
                .values()
                .map(|v| (v.cfg.name.clone(), v.state == VmState::Running, v.starts))
                .collect();
            let pages: Vec<(String, serde_json::Value)> = g
                .vms
                .values()
                .filter_map(|v| Some((v.cfg.name.clone(), stats_page::read(&v.stats)?)))
                .collect();
            (vms, pages)
        };
        for (name, up, starts) in vms {
            m.gauge(
                "ddvmm_vm_up",
                "VMM process running",
                &[("vm", &name)],
                f64::from(u8::from(up)),
            );
            m.counter(
                "ddvmm_vm_starts_total",
                "VMM process starts",
                &[("vm", &name)],
                starts as f64,
            );
        }
        for (name, page) in pages {
            if let Some(exits) = page["vmm_exits"].as_object() {
                for (kind, v) in exits {
                    let known = crate::vcpu::VmmExits::KINDS.contains(&kind.as_str());
                    let (Some(v), true) = (v.as_u64(), known) else {
                        continue;
                    };
                    m.counter(
                        "ddvmm_vmm_exits_total",
                        "vCPU exits that reached the VMM process (not handled in KVM)",
                        &[("vm", name.as_str()), ("kind", kind.as_str())],
                        v as f64,
                    );
                }
            }
            for (key, prefix, label, help) in [
                (
                    "ring_disks",
                    "ddvmm_ring_disk",
                    "disk",
                    "Client ring disk counter",
                ),
                (
                    "ring_nets",
                    "ddvmm_ring_net",
                    "nic",
                    "Client ring NIC counter",
                ),
            ] {
                let Some(list) = page[key].as_array() else {
                    continue;
                };
                for (i, d) in list.iter().enumerate() {
                    let Some(obj) = d.as_object() else { continue };
                    let index = i.to_string();
                    for (k, v) in obj {
                        let Some(v) = v.as_u64() else { continue };
                        let valid = k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                        if !valid {
                            continue;
                        }
                        let labels = [("vm", name.as_str()), (label, index.as_str())];
                        if let Some(help) = RING_GAUGES
                            .iter()
                            .find_map(|(g, help)| (g == k).then_some(*help))
                        {
                            m.gauge(&format!("{prefix}_{k}"), help, &labels, v as f64);
                        } else {
                            m.counter(&format!("{prefix}_{k}_total"), help, &labels, v as f64);
                        }
                    }
                }
            }
        }
        m.render()
    }
}

/// The ring counters that are gauges (the others are counters), with their help lines.
const RING_GAUGES: [(&str, &str); 5] = [
    ("outstanding", "Requests on the ring"),
    ("waiting", "Requests journaled, not yet on the ring"),
    ("suspects", "Requests one more crash makes poison"),
    ("corrupt", "1 while the driver VM has broken the ring"),
    ("held", "1 while the daemon holds the channel"),
];
