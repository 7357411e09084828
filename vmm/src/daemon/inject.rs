//! Fault injection: one fault into a driver VM (through its VMM's control socket, or a
//! SIGKILL from here), campaigns of many at random intervals, and API starts that wait for
//! service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::Role;
use super::fault_log::FaultEvent;
use super::supervisor::{Supervisor, SupervisorError, VmState};
use crate::control::{ControlRequest, FaultKind};

impl Supervisor {
    /// Injects `kind` into driver VM `name`.
    pub async fn inject(&self, name: &str, kind: FaultKind) -> Result<(), SupervisorError> {
        {
            let mut g = self.lock();
            let vm = g
                .vms
                .get_mut(name)
                .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
            if vm.cfg.role != Role::Driver {
                return Err(SupervisorError::NotDriver(name.to_string()));
            }
            if vm.recovering {
                return Err(SupervisorError::Busy(name.to_string(), "recovering"));
            }
            if vm.state == VmState::Quarantined {
                return Err(SupervisorError::Busy(name.to_string(), "quarantined"));
            }
            if vm.state != VmState::Running {
                return Err(SupervisorError::NotRunning(name.to_string()));
            }
            vm.injected = Some((kind, Instant::now()));
        };
        *self
            .book()
            .injected
            .entry((name.to_string(), kind))
            .or_default() += 1;
        tracing::warn!(vm = name, fault = kind.name(), "injecting fault");
        if kind == FaultKind::Kill {
            return self
                .signal(name, libc::SIGKILL)
                .map(|_| ())
                .ok_or_else(|| SupervisorError::NotRunning(name.to_string()));
        }
        let r = self
            .control(
                name,
                &ControlRequest::Inject { fault: kind },
                Duration::from_secs(10),
            )
            .await;
        if r.is_err() {
            if let Some(vm) = self.lock().vms.get_mut(name) {
                vm.injected = None;
            }
        }
        r.map(|_| ())
    }

    /// Starts VM `name`; a driver VM that ran before (or was quarantined) first has its
    /// clients start a new generation, so the new agent never inherits the old one's state.
    pub async fn start_vm(self: &Arc<Self>, name: &str) -> Result<(), SupervisorError> {
        let rerun_driver = {
            let g = self.lock();
            let vm = g
                .vms
                .get(name)
                .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
            if vm.recovering {
                return Err(SupervisorError::Busy(name.to_string(), "recovering"));
            }
            vm.cfg.role == Role::Driver && vm.starts > 0 && vm.state != VmState::Running
        };
        if rerun_driver {
            // A start by hand: the clients send at once (no suspects to isolate).
            self.replay_clients(name, false).await;
            if let Some(vm) = self.lock().vms.get_mut(name) {
                if vm.state == VmState::Quarantined {
                    vm.state = VmState::Exited;
                }
            }
            self.book().policy.forget(name);
        }
        self.start(name)
    }

    /// Waits until driver `name` runs with its agents ready and no recovery under way.
    async fn wait_serving(&self, name: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (running, recovering, quarantined) = {
                let g = self.lock();
                let vm = g
                    .vms
                    .get(name)
                    .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
                (
                    vm.state == VmState::Running,
                    vm.recovering,
                    vm.state == VmState::Quarantined,
                )
            };
            if quarantined {
                return Err(SupervisorError::Busy(name.to_string(), "quarantined"));
            }
            if running && !recovering && self.agents_ready(name) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SupervisorError::Timeout(format!(
                    "driver VM '{name}' not serving after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn recoveries(&self, name: &str) -> u64 {
        let b = self.book();
        b.events.iter().filter(|e| e.driver == name).count() as u64
    }

    /// Injects `count` faults of `kinds` (every kind once per round, shuffled) into `name`,
    /// each after the previous recovery plus a random pause in `interval_ms`; returns the
    /// events of the campaign.
    pub async fn campaign(
        &self,
        name: &str,
        count: u32,
        kinds: &[FaultKind],
        interval_ms: (u64, u64),
        seed: u64,
    ) -> Result<Vec<FaultEvent>, SupervisorError> {
        let kinds: Vec<FaultKind> = if kinds.is_empty() {
            FaultKind::ALL.to_vec()
        } else {
            kinds.to_vec()
        };
        let mut rng = XorShift(seed | 1);
        let per_fault = Duration::from_millis(
            self.recovery
                .boot_timeout_ms
                .saturating_add(self.recovery.heartbeat_timeout_ms)
                .saturating_add(self.recovery.idle_heartbeat_ms)
                .saturating_add(self.recovery.progress_timeout_ms)
                .saturating_add(self.recovery.backoff_max_ms),
        ) * 2;
        let first_event = self.book().events.len();
        let mut round = Vec::new();
        for i in 0..count {
            if round.is_empty() {
                round = rng.shuffled(&kinds);
            }
            let kind = round.pop().unwrap_or(FaultKind::Kill);
            self.wait_serving(name, per_fault).await?;
            let (lo, hi) = interval_ms;
            let span = hi.saturating_sub(lo).saturating_add(1);
            let pause = lo.saturating_add(rng.next() % span);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let before = self.recoveries(name);
            tracing::info!(
                vm = name,
                n = i + 1,
                of = count,
                fault = kind.name(),
                "campaign"
            );
            self.inject(name, kind).await?;
            let deadline = Instant::now() + per_fault;
            while self.recoveries(name) == before {
                if Instant::now() > deadline {
                    return Err(SupervisorError::Timeout(format!(
                        "fault {} ({}) was not detected within {per_fault:?}",
                        i + 1,
                        kind.name()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.wait_serving(name, per_fault).await?;
        let b = self.book();
        Ok(b.events.iter().skip(first_event).cloned().collect())
    }
}

/// A small deterministic generator for campaign timing (not for anything secret).
struct XorShift(u64);

impl XorShift {
    /// A Fisher-Yates permutation of `items`.
    fn shuffled<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        let mut v = items.to_vec();
        for j in (1..v.len()).rev() {
            v.swap(j, (self.next() % (j as u64 + 1)) as usize);
        }
        v
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaign_order_covers_every_kind_each_round() {
        let mut rng = XorShift(7);
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let round = rng.shuffled(&FaultKind::ALL);
            let mut sorted = round.clone();
            sorted.sort();
            assert_eq!(sorted, FaultKind::ALL.to_vec(), "every kind exactly once");
            orders.insert(round);
        }
        assert!(orders.len() > 10, "rounds are not all in the same order");
    }
}
