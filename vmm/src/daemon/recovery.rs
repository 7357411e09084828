//! Driver VM fault watching and recovery: restart (a restore of the driver VM's template, or a
//! boot) with replay.
//!
//! **Detection** (classified in [`super::detection`]): an unexpected exit of the driver VM's
//! VMM process (pvpanic kernel panic, vCPU crash such as a triple fault, guest reset, SIGKILL,
//! seccomp, VMM error), and — from a watcher task per driver VM that reads the channel memory
//! and the clients' stats pages ten times a second — a stale agent heartbeat, requests
//! outstanding with none completing, garbage completions counted by a client, a broken ring,
//! or an agent that is not ready within the boot timeout. All timeouts come from `[recovery]`.
//!
//! **Recovery** of one driver VM, one at a time: SIGKILL what is left of it (a hung VM must not
//! write channel memory again), apply the policy ([`super::policy`]: at once for a driver VM
//! that served since its last restart, else after an exponential backoff; too many restarts in
//! the window: quarantine — the clients fail
//! their outstanding and new requests), tell every running client (all at once) to start a new
//! ring generation and replay its outstanding requests (the clients hold them until then:
//! never completed, never failed, except a poison request), then start the driver VM again:
//! by restoring its template (a snapshot of it ready and parked, made at its first boot; see
//! [`crate::snapshot`]), or by a boot where it has none (passthrough), the template is
//! refused (damaged, renewed after `template_max_restores` or `template_max_age_s`), or the
//! restore failed (the next round boots at once; the event says why). Then wait for its
//! agents and the first completion after the restart. A fault during that wait starts the
//! next round of the same recovery; the outage runs from the (injected or detected) fault to
//! the first completion after the restart, by the clients' own clocks.
//!
//! **Attribution per channel.** Replays are *held*: nothing goes on a new ring until released.
//! Once the new driver VM's agents are ready, the channels that hold suspects (requests one
//! crash away from poison) are released one at a time, each until its suspects are resolved,
//! then all the others. A crash during a channel's turn happened with that channel's suspect
//! alone on the ring of a driver VM that served nothing else: it is charged to the channel
//! (the event names it, and it does not count against the driver VM's restart window), and
//! when a channel's request turns out poison the crashes it caused are moved from the driver
//! VM's window to the channel's. A channel that reaches `max_restarts` of its own is quarantined
//! alone; the driver VM goes on serving the others. Stalls, broken rings and garbage are
//! reported with the channel they were seen on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::Role;
use super::detection::Detection;
use super::fault_log::{FaultEvent, RecoverySteps, MAX_EVENTS};
use super::policy::PolicyLimits;
use super::supervisor::{Boot, Supervisor, SupervisorError, VmState};
use crate::control::{ControlRequest, FaultKind};
use crate::stats_page::{self, RingProgress, WatchedPage};

/// Watcher period.
const WATCH_PERIOD: Duration = Duration::from_millis(100);
/// How long a client may take to start a new generation.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often a recovery doubles the boot deadline after boots that missed it (90 s: up to 720 s).
const BOOT_DEADLINE_DOUBLINGS: u32 = 3;

/// The time a recovery's boot gets after `missed` boots of the same recovery missed their
/// deadline: `boot_timeout_ms`, doubled per miss, [`BOOT_DEADLINE_DOUBLINGS`] times at most.
fn boot_allowance(boot_timeout_ms: u64, missed: u32) -> Duration {
    Duration::from_millis(boot_timeout_ms.saturating_mul(1 << missed.min(BOOT_DEADLINE_DOUBLINGS)))
}

/// What the watcher remembers about one channel between looks.
#[derive(Default)]
struct ChannelWatch {
    not_ready_since: Option<Instant>,
    heartbeat: Option<(u64, Instant)>,
    /// The request producer index when the heartbeat last changed.
    req_prod_at_beat: u32,
    /// When a request was first seen on the ring after the last beat.
    request_since: Option<Instant>,
    completed: Option<(u64, Instant)>,
    bogus: Option<u64>,
}

impl ChannelWatch {
    /// Takes one look at a served channel's heartbeat `hb` and request producer index
    /// `req_prod`: whether the agent is late. An agent beats promptly once it has work, and
    /// while it has none at its idle period, so a request seen on the ring since the last beat
    /// must be followed by a beat within `busy` of being seen; without one the beat may be
    /// `idle` old.
    fn beat_is_late(
        &mut self,
        hb: u64,
        req_prod: u32,
        now: Instant,
        busy: Duration,
        idle: Duration,
    ) -> bool {
        let beat_at = match self.heartbeat {
            Some((v, t)) if v == hb => t,
            _ => {
                self.heartbeat = Some((hb, now));
                self.req_prod_at_beat = req_prod;
                self.request_since = None;
                now
            }
        };
        if self.request_since.is_none() && req_prod != self.req_prod_at_beat {
            self.request_since = Some(now);
        }
        match self.request_since {
            Some(r) => now.duration_since(r) > busy,
            None => now.duration_since(beat_at) > idle,
        }
    }
}

/// What one recovery round starts from.
struct Round {
    detection: Detection,
    injected: Option<FaultKind>,
    detect_ms: Option<f64>,
    /// The channel the evidence came from.
    channel: Option<(String, usize)>,
    /// The fault is that channel's (its suspect request was alone on the ring).
    attributed: bool,
    /// The previous round's restore failed: boot at once, not counted as a fault again.
    after_failed_restore: Option<String>,
}

impl Round {
    /// A round started by a detection during recovery (not injected).
    fn detected(detection: Detection, channel: Option<(String, usize)>, attributed: bool) -> Self {
        Round {
            detection,
            injected: None,
            detect_ms: None,
            channel,
            attributed,
            after_failed_restore: None,
        }
    }
}

/// When a restarted driver VM served again (from the start of the wait).
struct Service {
    /// Its agents were ready.
    ready: Duration,
    /// Every held channel was released.
    released: Duration,
    /// The same, by the wall clock (ms since the epoch).
    released_ms: u64,
    /// The last waiting client's first completion, by its clock (None: no client waited).
    served_ms: Option<u64>,
}

/// What the clients did on a replay.
#[derive(Default)]
pub(super) struct Replayed {
    replayed: u64,
    /// Poisoned requests by channel.
    poisoned: Vec<((String, usize), u64)>,
    /// Channels holding suspects, in channel order.
    suspects: Vec<(String, usize)>,
}

/// One channel of a driver VM as the daemon sees it.
struct ChannelView {
    /// Position in the supervisor's channel list.
    index: usize,
    client: String,
    disk: usize,
    /// The agent serves the ring's current generation.
    ready: bool,
    heartbeat: u64,
    /// The ring's request producer index.
    req_prod: u32,
}

/// A running client's ring device counters, from one read of its stats page.
/// Whether client `client` no longer runs (a `None` from [`client_disk`] for a running client
/// only means its page could not be read this time: it was being written).
fn client_gone(sup: &Supervisor, client: &str) -> bool {
    sup.lock()
        .vms
        .get(client)
        .is_none_or(|v| v.state != VmState::Running)
}

fn client_disk(sup: &Supervisor, client: &str, disk: usize) -> Option<RingProgress> {
    let page: WatchedPage = {
        let g = sup.lock();
        let vm = g.vms.get(client)?;
        if vm.state != VmState::Running {
            return None;
        }
        stats_page::read_as(&vm.stats)?
    };
    page.rings.get(disk).copied()
}

impl Supervisor {
    /// Starts the watcher of every driver VM.
    pub fn spawn_watchers(self: &Arc<Self>) {
        for name in self.names(Role::Driver) {
            self.spawn_watcher(name);
        }
    }

    /// Watches driver VM `name` until it is removed.
    pub(super) fn spawn_watcher(self: &Arc<Self>, name: String) {
        let me = self.clone();
        tokio::spawn(async move { me.watch(name).await });
    }

    /// Entry point for every detection: starts a recovery unless one is under way or the
    /// VM is not supposed to run.
    pub(super) fn fault_detected(self: &Arc<Self>, name: &str, detection: Detection) {
        self.fault_detected_on(name, detection, None);
    }

    /// As [`fault_detected`](Self::fault_detected), with the channel the evidence came from.
    fn fault_detected_on(
        self: &Arc<Self>,
        name: &str,
        detection: Detection,
        channel: Option<(String, usize)>,
    ) {
        if !self.recovery.enabled {
            tracing::error!(
                vm = name,
                detected_by = detection.name(),
                "driver VM fault (recovery disabled)"
            );
            return;
        }
        let injected = {
            let mut g = self.lock();
            let Some(vm) = g.vms.get_mut(name) else {
                return;
            };
            if vm.recovering || vm.state == VmState::Stopped || vm.state == VmState::Quarantined {
                return;
            }
            vm.recovering = true;
            vm.injected.take()
        };
        let detected = Instant::now();
        let detect_ms = injected.map(|(_, t)| (detected - t).as_secs_f64() * 1e3);
        tracing::warn!(
            vm = name,
            detected_by = detection.name(),
            channel = channel.as_ref().map(|(c, d)| format!("{c}/{d}")),
            injected = injected.map(|(k, _)| k.name()),
            detect_ms,
            "driver VM fault"
        );
        if let Some((kind, t)) = injected {
            self.book()
                .detection
                .entry(kind)
                .or_default()
                .add((detected - t).as_secs_f64());
        }
        let me = self.clone();
        let name = name.to_string();
        let fault_at = injected.map_or(detected, |(_, t)| t);
        tokio::spawn(async move {
            let first = Round {
                detection,
                injected: injected.map(|(k, _)| k),
                detect_ms,
                channel,
                attributed: false,
                after_failed_restore: None,
            };
            me.recover(&name, first, fault_at).await;
            if let Some(vm) = me.lock().vms.get_mut(&name) {
                vm.recovering = false;
            }
        });
    }

    /// Counts a restart of `name` against its policy window; `None` if the cap is reached.
    fn restart_allowed(&self, name: &str) -> Option<Duration> {
        let limits = PolicyLimits::from(&self.recovery);
        self.book().policy.restart(name, Instant::now(), &limits)
    }

    /// A channel's request turned out poison: the crashes it was on the ring at are that
    /// channel's, not the driver VM's. Takes them off the driver VM's restart window, adds
    /// them to the channel's, and returns whether the channel reached the cap.
    fn charge_channel(&self, driver: &str, channel: &(String, usize), crashes: u32) -> bool {
        let limits = PolicyLimits::from(&self.recovery);
        self.book()
            .policy
            .charge_channel(driver, channel, crashes, Instant::now(), &limits)
    }

    /// One recovery, in rounds until a driver VM serves again or the VM is quarantined.
    async fn recover(self: &Arc<Self>, name: &str, mut round: Round, fault_at: Instant) {
        // Boots of this recovery that missed their deadline in a row: each next boot gets
        // twice the time (up to 8x). A boot that progresses slowly (a host short of CPU) is
        // otherwise killed at the same point every time and never finishes.
        let mut missed_boots = 0u32;
        loop {
            let mut steps = RecoverySteps::default();
            let mut lap = Instant::now();
            let mut step = move || {
                let ms = lap.elapsed().as_secs_f64() * 1e3;
                lap = Instant::now();
                ms
            };
            self.kill_and_wait(name).await;
            steps.kill_ms = step();
            let mut event = FaultEvent {
                driver: name.to_string(),
                injected: round.injected,
                detected_by: round.detection,
                channel: round.channel.as_ref().map(|(c, d)| format!("{c}/{d}")),
                detected_at_ms: now_ms(),
                detect_ms: round.detect_ms,
                outage_ms: None,
                boot_ms: None,
                steps: None,
                replayed: 0,
                poisoned: 0,
                restart: "boot".into(),
                standby: false,
                fallback: round.after_failed_restore.clone(),
                outcome: "restarted".into(),
            };
            if round.after_failed_restore.is_none() {
                *self
                    .book()
                    .faults
                    .entry((name.to_string(), round.detection))
                    .or_default() += 1;
            }
            // A crash while one channel's suspect was alone on the ring is that channel's; a
            // failed restore is retried as a boot at once.
            let backoff = if round.after_failed_restore.is_some() {
                Some(Duration::ZERO)
            } else if round.attributed {
                Some(Duration::from_millis(self.recovery.backoff_initial_ms))
            } else {
                self.restart_allowed(name)
            };
            let Some(backoff) = backoff else {
                self.quarantine(name).await;
                event.outcome = "quarantined".into();
                self.log_event(event);
                return;
            };
            step();
            let replay = self.replay_clients(name, true).await;
            steps.replay_ms = step();
            event.replayed = replay.replayed;
            event.poisoned = replay.poisoned.iter().map(|p| p.1).sum();
            for (channel, _) in &replay.poisoned {
                if self.charge_channel(name, channel, self.recovery.poison_after) {
                    self.quarantine_channel(name, channel).await;
                }
            }
            {
                let mut b = self.book();
                *b.restarts.entry(name.to_string()).or_default() += 1;
                *b.replayed.entry(name.to_string()).or_default() += event.replayed;
                *b.poisoned.entry(name.to_string()).or_default() += event.poisoned;
            }
            tokio::time::sleep(backoff).await;
            steps.backoff_ms = step();
            if round.after_failed_restore.is_some() {
                self.drop_template(name);
            }
            let (boot, fallback) = self.restart_boot(name);
            let restoring = boot == Boot::Restore;
            if restoring {
                event.restart = "restore".into();
            }
            if event.fallback.is_none() {
                event.fallback = fallback;
            }
            let started = self.restart_as(name, boot).await.map(|standby| {
                event.standby = standby;
            });
            steps.start_ms = step();
            if started.is_ok() {
                if let Some(vm) = self.lock().vms.get_mut(name) {
                    vm.started_by_recovery = true;
                }
            }
            if let Err(e) = started {
                tracing::error!(vm = name, error = %e, "restart failed");
                event.outcome = "restart-failed".into();
                self.log_event(event);
                round = Round::detected(Detection::VmmError, None, false);
                continue;
            }
            let allowance = boot_allowance(self.recovery.boot_timeout_ms, missed_boots);
            match self.await_service(name, replay.suspects, allowance).await {
                Ok(Service {
                    ready: boot,
                    released,
                    released_ms,
                    served_ms,
                }) => {
                    self.book().policy.served(name);
                    // From the clients' own clocks when they had requests waiting (the last
                    // of them to be served again), else from when the daemon saw service.
                    let fault_ms = now_ms().saturating_sub(fault_at.elapsed().as_millis() as u64);
                    let outage = match served_ms {
                        Some(t) if t >= fault_ms => (t - fault_ms) as f64 / 1e3,
                        _ => fault_at.elapsed().as_secs_f64(),
                    };
                    event.outage_ms = Some(outage * 1e3);
                    event.boot_ms = Some(boot.as_secs_f64() * 1e3);
                    steps.release_ms = released.saturating_sub(boot).as_secs_f64() * 1e3;
                    steps.serve_ms = served_ms.map(|t| t.saturating_sub(released_ms) as f64);
                    event.steps = Some(steps);
                    self.book()
                        .outage
                        .entry(name.to_string())
                        .or_default()
                        .add(outage);
                    tracing::warn!(
                        vm = name,
                        outage_ms = outage * 1e3,
                        replayed = event.replayed,
                        poisoned = event.poisoned,
                        "driver VM recovered"
                    );
                    self.log_event(event);
                    return;
                }
                Err((Detection::VmmError, _)) if restoring => {
                    // The restored VMM gave up (its log says why): boot instead.
                    let why = self
                        .lock()
                        .vms
                        .get(name)
                        .and_then(|v| v.last_exit.clone())
                        .unwrap_or_default();
                    let why = format!("restore failed ({why}), see {name}.log");
                    tracing::error!(vm = name, reason = %why, "restore failed; booting instead");
                    event.outcome = "restore-failed".into();
                    self.log_event(event);
                    let mut next = Round::detected(Detection::VmmError, None, false);
                    next.after_failed_restore = Some(why);
                    round = next;
                }
                Err((next, isolating)) => {
                    self.log_event(event);
                    if next == Detection::BootTimeout {
                        missed_boots += 1;
                        tracing::warn!(
                            vm = name,
                            missed_boots,
                            next_deadline_ms =
                                boot_allowance(self.recovery.boot_timeout_ms, missed_boots)
                                    .as_millis() as u64,
                            "boot deadline missed; the next boot gets longer"
                        );
                    } else {
                        missed_boots = 0;
                    }
                    tracing::warn!(
                        vm = name,
                        detected_by = next.name(),
                        isolating = isolating.as_ref().map(|(c, d)| format!("{c}/{d}")),
                        "fault during recovery"
                    );
                    let attributed = isolating.is_some();
                    round = Round::detected(next, isolating, attributed);
                }
            }
        }
    }

    /// Tells every running client of `driver` to start a new generation and replay; with
    /// `hold`, nothing is sent until [`await_service`](Self::await_service) releases it.
    pub(super) async fn replay_clients(self: &Arc<Self>, driver: &str, hold: bool) -> Replayed {
        let mut out = Replayed::default();
        // All clients at once; the answers in channel order.
        let mut asked = tokio::task::JoinSet::new();
        for (i, (client, disk)) in self.client_disks_of(driver).into_iter().enumerate() {
            let req = ControlRequest::Replay {
                disk,
                poison_after: self.recovery.poison_after,
                hold,
            };
            let me = self.clone();
            asked.spawn(async move {
                let r = me.control(&client, &req, REPLAY_TIMEOUT).await;
                (i, client, disk, r)
            });
        }
        let mut answers = Vec::new();
        while let Some(a) = asked.join_next().await {
            match a {
                Ok(a) => answers.push(a),
                Err(e) => tracing::error!(error = %e, "replay task"),
            }
        }
        answers.sort_by_key(|a| a.0);
        for (_, client, disk, answer) in answers {
            match answer {
                Ok(r) => {
                    out.replayed += r.replayed;
                    if r.poisoned > 0 {
                        out.poisoned.push(((client.clone(), disk), r.poisoned));
                    }
                    if r.suspects > 0 {
                        out.suspects.push((client, disk));
                    }
                }
                Err(SupervisorError::NotRunning(_)) => {}
                Err(e) => tracing::error!(client, disk, error = %e, "replay"),
            }
        }
        out
    }

    /// (client, ring disk index) of every channel `driver` serves, except channels given up
    /// on their own.
    fn client_disks_of(&self, driver: &str) -> Vec<(String, usize)> {
        let quarantined = self.book().policy.quarantined().clone();
        self.lock()
            .channels
            .iter()
            .filter(|c| c.driver == driver)
            .map(|c| (c.client.clone(), c.client_index))
            .filter(|ch| !quarantined.contains(ch))
            .collect()
    }

    /// Gives up on one channel of `driver` (its requests crashed the driver VM too often):
    /// the client fails that channel's requests; the driver VM goes on serving the others.
    async fn quarantine_channel(&self, driver: &str, channel: &(String, usize)) {
        let (client, disk) = channel;
        tracing::error!(
            vm = driver,
            channel = format!("{client}/{disk}"),
            "a channel's requests crashed the driver VM too often: channel quarantined"
        );
        self.book().policy.quarantine_channel(channel.clone());
        let req = ControlRequest::Quarantine { disk: *disk };
        match self.control(client, &req, REPLAY_TIMEOUT).await {
            Ok(_) | Err(SupervisorError::NotRunning(_)) => {}
            Err(e) => tracing::error!(client, disk, error = %e, "channel quarantine"),
        }
    }

    /// Gives up on `driver`: its clients fail outstanding and new requests.
    async fn quarantine(&self, driver: &str) {
        tracing::error!(vm = driver, "too many restarts: driver VM quarantined");
        if let Some(vm) = self.lock().vms.get_mut(driver) {
            vm.state = VmState::Quarantined;
        }
        *self
            .book()
            .quarantines
            .entry(driver.to_string())
            .or_default() += 1;
        for (client, disk) in self.client_disks_of(driver) {
            match self
                .control(
                    &client,
                    &ControlRequest::Quarantine { disk },
                    REPLAY_TIMEOUT,
                )
                .await
            {
                Ok(_) | Err(SupervisorError::NotRunning(_)) => {}
                Err(e) => tracing::error!(client, disk, error = %e, "quarantine"),
            }
        }
    }

    /// Waits until every channel of the freshly started `driver` has its agent ready on the
    /// current generation, releases the held channels (those with `suspects` one at a time,
    /// each until its suspects are resolved, then all the others) and waits until, where a
    /// client had requests to replay, one of them has completed. A fault meanwhile is returned
    /// as the next round's detection, with the channel whose suspect was alone on the ring.
    async fn await_service(
        self: &Arc<Self>,
        driver: &str,
        mut suspects: Vec<(String, usize)>,
        allowance: Duration,
    ) -> Result<Service, (Detection, Option<(String, usize)>)> {
        let started = Instant::now();
        let deadline = started + allowance;
        let mut boot = None;
        let mut baseline: BTreeMap<(String, usize), Option<u64>> = BTreeMap::new();
        for (client, disk) in self.client_disks_of(driver) {
            let before = client_disk(self, &client, disk)
                .filter(|c| c.outstanding + c.waiting > 0)
                .map(|c| c.completed);
            baseline.insert((client, disk), before);
        }
        suspects.reverse();
        let mut isolating: Option<(String, usize)> = None;
        let mut released_all = None;
        loop {
            {
                let g = self.lock();
                let vm = g.vms.get(driver).ok_or((Detection::VmmError, None))?;
                if vm.state != VmState::Running {
                    let d = vm.last_detection.unwrap_or(Detection::VmmError);
                    return Err((d, isolating));
                }
            }
            let ready = self.agents_ready(driver);
            if ready && boot.is_none() {
                boot = Some(started.elapsed());
                tracing::info!(
                    vm = driver,
                    ms = started.elapsed().as_millis() as u64,
                    "agents ready"
                );
            }
            if ready && released_all.is_none() {
                // The isolated channel is done once it has no suspect left (completed, or
                // its client went away).
                if let Some((client, disk)) = &isolating {
                    let done = match client_disk(self, client, *disk) {
                        Some(c) => c.suspects == 0,
                        None => client_gone(self, client),
                    };
                    if done {
                        tracing::info!(vm = driver, client, disk, "isolated channel resolved");
                        isolating = None;
                    }
                }
                if isolating.is_none() {
                    match suspects.pop() {
                        Some(ch) => {
                            self.release(&ch).await;
                            isolating = Some(ch);
                        }
                        None => {
                            let mut releases = tokio::task::JoinSet::new();
                            for ch in baseline.keys() {
                                let (me, ch) = (self.clone(), ch.clone());
                                releases.spawn(async move { me.release(&ch).await });
                            }
                            while releases.join_next().await.is_some() {}
                            released_all = Some((started.elapsed(), now_ms()));
                            tracing::info!(vm = driver, "channels released");
                        }
                    }
                }
            }
            let mut served_ms: Option<u64> = None;
            let served = released_all.is_some()
                && baseline
                    .iter()
                    .all(|((client, disk), before)| match before {
                        None => true,
                        Some(b) => match client_disk(self, client, *disk) {
                            None => client_gone(self, client),
                            Some(c) if c.completed > *b => {
                                if c.first_completion_ms > 0 {
                                    served_ms = served_ms.max(Some(c.first_completion_ms));
                                }
                                true
                            }
                            Some(_) => false,
                        },
                    });
            if let (Some(ready), Some((released, released_ms)), true) = (boot, released_all, served)
            {
                return Ok(Service {
                    ready,
                    released,
                    released_ms,
                    served_ms,
                });
            }
            if Instant::now() > deadline {
                return Err((Detection::BootTimeout, isolating));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets a held channel send again.
    async fn release(&self, (client, disk): &(String, usize)) {
        let req = ControlRequest::Release { disk: *disk };
        match self.control(client, &req, REPLAY_TIMEOUT).await {
            Ok(_) | Err(SupervisorError::NotRunning(_)) => {}
            Err(e) => tracing::error!(client, disk, error = %e, "release"),
        }
    }

    /// The channels of `driver` whose client runs (only those have a live ring to serve).
    fn channel_views(&self, driver: &str) -> Vec<ChannelView> {
        let quarantined = self.book().policy.quarantined().clone();
        let g = self.lock();
        g.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| c.driver == driver)
            .filter(|(_, c)| !quarantined.contains(&(c.client.clone(), c.client_index)))
            .filter(|(_, c)| {
                g.vms
                    .get(&c.client)
                    .is_some_and(|v| v.state == VmState::Running)
            })
            .map(|(index, c)| {
                let header = c.slot.ring_header().unwrap_or_default();
                ChannelView {
                    index,
                    client: c.client.clone(),
                    disk: c.client_index,
                    ready: header.agent_serves_current(),
                    heartbeat: header.heartbeat,
                    req_prod: header.req_prod,
                }
            })
            .collect()
    }

    /// Whether every live channel's agent serves the channel's current generation.
    pub(super) fn agents_ready(&self, driver: &str) -> bool {
        self.channel_views(driver).iter().all(|c| c.ready)
    }

    /// The watcher of one driver VM: hang, garbage and boot-timeout detection.
    async fn watch(self: Arc<Self>, driver: String) {
        let mut watches: BTreeMap<usize, ChannelWatch> = BTreeMap::new();
        let mut seen_start = 0;
        let mut boot_recorded = 0;
        let cfg = self.recovery.clone();
        let heartbeat_timeout = Duration::from_millis(cfg.heartbeat_timeout_ms);
        let idle_timeout = heartbeat_timeout + Duration::from_millis(cfg.idle_heartbeat_ms);
        let progress_timeout = Duration::from_millis(cfg.progress_timeout_ms);
        let boot_timeout = Duration::from_millis(cfg.boot_timeout_ms);
        loop {
            tokio::time::sleep(WATCH_PERIOD).await;
            let (active, starts, started_at, cold) = {
                let g = self.lock();
                let Some(vm) = g.vms.get(&driver) else { return };
                (
                    vm.state == VmState::Running && !vm.recovering,
                    vm.starts,
                    vm.started_at,
                    !vm.started_by_recovery,
                )
            };
            if starts != seen_start {
                watches.clear();
                seen_start = starts;
            }
            if !active {
                continue;
            }
            let now = Instant::now();
            let views = self.channel_views(&driver);
            // The first look with every agent of this start ready: a cold boot, unless a
            // recovery started it (recoveries time their own boots).
            let all_ready = !views.is_empty() && views.iter().all(|v| v.ready);
            if all_ready {
                // Serving from a usable template: restore it ahead of the next restart (once
                // per template and start; again after a client added at runtime dismissed it).
                self.ensure_standby(&driver);
            }
            if boot_recorded != starts && all_ready {
                boot_recorded = starts;
                if cold {
                    let mut b = self.book();
                    if b.cold_boots_ms.len() >= MAX_EVENTS {
                        b.cold_boots_ms.pop_front();
                    }
                    b.cold_boots_ms
                        .push_back(now.duration_since(started_at).as_secs_f64() * 1e3);
                }
            }
            let mut found = None;
            for ChannelView {
                index,
                client,
                disk,
                ready,
                heartbeat: hb,
                req_prod,
            } in views
            {
                let w = watches.entry(index).or_default();
                if !ready {
                    // Not attached (yet, or again after a client restart): only the boot
                    // deadline applies.
                    w.heartbeat = None;
                    let since = *w.not_ready_since.get_or_insert(now.max(started_at));
                    if now.duration_since(since) > boot_timeout {
                        found = Some((Detection::BootTimeout, None));
                        break;
                    }
                    continue;
                }
                w.not_ready_since = None;
                if w.beat_is_late(hb, req_prod, now, heartbeat_timeout, idle_timeout) {
                    tracing::warn!(
                        vm = driver,
                        channel = format!("{client}/{disk}"),
                        heartbeat = hb,
                        req_prod,
                        waiting_request = w.request_since.is_some(),
                        "agent heartbeat late"
                    );
                    found = Some((Detection::Heartbeat, None));
                    break;
                }
                let Some(counters) = client_disk(&self, &client, disk) else {
                    w.completed = None;
                    continue;
                };
                let channel = Some((client.clone(), disk));
                // A broken ring stops that channel until a new generation: always a restart.
                if counters.corrupt {
                    found = Some((Detection::CorruptRing, channel));
                    break;
                }
                match counters {
                    RingProgress {
                        outstanding,
                        completed,
                        ..
                    } if outstanding > 0 => {
                        match w.completed {
                            Some((v, _)) if v == completed => {}
                            _ => w.completed = Some((completed, now)),
                        }
                        if w.completed
                            .is_some_and(|(_, t)| now.duration_since(t) > progress_timeout)
                        {
                            found = Some((Detection::NoProgress, channel));
                            break;
                        }
                    }
                    _ => w.completed = None,
                }
                let grew = w
                    .bogus
                    .is_some_and(|before| counters.bogus_completions > before);
                w.bogus = Some(counters.bogus_completions);
                if grew && cfg.restart_on_corrupt {
                    found = Some((Detection::CorruptCompletions, channel));
                    break;
                }
            }
            if let Some((d, channel)) = found {
                self.fault_detected_on(&driver, d, channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(35);

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn missed_boots_double_the_deadline_up_to_a_cap() {
        let s = |n| boot_allowance(90_000, n).as_secs();
        assert_eq!(
            [s(0), s(1), s(2), s(3), s(4), s(40)],
            [90, 180, 360, 720, 720, 720]
        );
        assert_eq!(boot_allowance(u64::MAX, 3), Duration::from_millis(u64::MAX));
    }

    /// Looks at a fresh watch, one `(heartbeat, req_prod, seconds, late)` per look, and
    /// checks each verdict.
    fn looks(steps: &[(u64, u32, u64, bool)]) {
        let t0 = Instant::now();
        let mut w = ChannelWatch::default();
        for (n, &(hb, req_prod, s, late)) in steps.iter().enumerate() {
            let got = w.beat_is_late(hb, req_prod, at(t0, s), BUSY, IDLE);
            assert_eq!(got, late, "look {n}: hb {hb}, req_prod {req_prod}, {s} s");
        }
    }

    #[test]
    fn an_idle_channel_may_beat_rarely() {
        looks(&[
            (1, 7, 0, false),
            (1, 7, 30, false),
            (2, 7, 34, false),
            (2, 7, 60, false),
            (2, 7, 70, true),
        ]);
    }

    #[test]
    fn a_request_wants_a_beat_within_the_busy_timeout() {
        // Quiet for 20 s, then a request: the clock starts when it is seen.
        looks(&[
            (1, 7, 0, false),
            (1, 8, 20, false),
            (1, 9, 24, false),
            (1, 9, 26, true),
        ]);
        // A live agent beat in time: the request is answered, the clock starts over.
        looks(&[
            (1, 7, 0, false),
            (1, 8, 20, false),
            (2, 8, 21, false),
            (2, 8, 40, false),
            (2, 9, 41, false),
            (2, 9, 47, true),
        ]);
    }
}
