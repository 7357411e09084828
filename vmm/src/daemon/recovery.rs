//! Driver VM fault detection, restart with replay, restart policy and fault injection.
//!
//! **Detection** ([`Detection`]): an unexpected exit of the driver VM's VMM process, classified
//! by its status (pvpanic kernel panic, vCPU crash such as a triple fault, guest reset, SIGKILL
//! of the process, VMM error), and — from a watcher task per driver VM that reads the channel
//! memory and the clients' stats pages ten times a second — a stale agent heartbeat, requests
//! outstanding with none completing, garbage completions counted by a client, or an agent that
//! is not ready within the boot timeout. All timeouts come from `[recovery]`.
//!
//! **Recovery** of one driver VM, one at a time: SIGKILL what is left of it (a hung VM must not
//! write channel memory again), apply the policy (too many restarts in the window: quarantine —
//! the clients fail their outstanding and new requests), tell every running client to start a
//! new ring generation and replay its outstanding requests (the clients hold them until then:
//! never completed, never failed, except a poison request), wait an exponential backoff, boot a
//! fresh driver VM from its image, and wait for its agents and the first completion after the
//! restart. A fault during that wait starts the next round of the same recovery; the outage
//! runs from the (injected or detected) fault to that first completion.
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
//!
//! **Injection** ([`Supervisor::inject`]): `kill` is a SIGKILL from here; the others go through
//! the driver VM's control socket to its VMM (triple fault) or to its agent (panic, reset,
//! hang, corrupt, bad-index). A campaign injects many of mixed kinds at random intervals.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ddvmm_translation::ring::offsets as ring_offsets;
use serde::Serialize;

use super::config::Role;
use super::supervisor::{ring_word, Boot, Supervisor, SupervisorError, VmState};
use crate::control::{ControlRequest, FaultKind};
use crate::stats_page;

/// Events kept for the API.
const MAX_EVENTS: usize = 20_000;
/// Watcher period.
const WATCH_PERIOD: Duration = Duration::from_millis(100);
/// How long a client may take to start a new generation.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);

/// How a driver VM fault was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
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

/// One detected fault and what came of it.
#[derive(Debug, Clone, Serialize)]
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
    /// Requests the clients replayed.
    pub replayed: u64,
    /// Requests failed as poison.
    pub poisoned: u64,
    /// How the new driver VM started: `restore` (from its template) or `boot`.
    pub restart: &'static str,
    /// Why it booted where a restore was expected (no template, template refused or renewed,
    /// or the restore failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// `restarted`, `quarantined`, `restart-failed` or `restore-failed`.
    pub outcome: &'static str,
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
    fn add(&mut self, v: f64) {
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
    /// Restart times by driver within the policy window.
    restart_times: BTreeMap<String, VecDeque<Instant>>,
    /// Crashes attributed to a channel (its poison request), times within the policy window.
    channel_strikes: BTreeMap<(String, usize), VecDeque<Instant>>,
    /// Channels given up on their own (their driver VM serves the others), as (client, disk).
    quarantined_channels: BTreeSet<(String, usize)>,
    /// Boots not caused by a recovery (start to agents ready), milliseconds, most recent last.
    pub cold_boots_ms: VecDeque<f64>,
}

/// The delay before the `n`th restart within the policy window: none for the first (a driver
/// VM that was serving is replaced at once), then `initial` doubled per further restart, capped.
fn backoff(n: usize, initial_ms: u64, max_ms: u64) -> Duration {
    let ms = match n {
        0 | 1 => 0,
        n => initial_ms
            .saturating_mul(1u64 << (n - 2).min(20))
            .min(max_ms),
    };
    Duration::from_millis(ms)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the watcher remembers about one channel between looks.
#[derive(Default)]
struct ChannelWatch {
    not_ready_since: Option<Instant>,
    heartbeat: Option<(u64, Instant)>,
    completed: Option<(u64, Instant)>,
    bogus: Option<u64>,
}

/// Drops the times older than `window` from the front of `times` (oldest first).
fn forget_before(times: &mut VecDeque<Instant>, window: Duration) {
    while times.front().is_some_and(|t| t.elapsed() > window) {
        times.pop_front();
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

/// What the clients did on a replay.
#[derive(Default)]
struct Replayed {
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
}

/// The counters of a client ring disk the daemon watches.
#[derive(Debug, Clone, Copy)]
struct DiskCounters {
    outstanding: u64,
    waiting: u64,
    completed: u64,
    bogus: u64,
    corrupt: bool,
    suspects: u64,
}

/// A running client's ring disk counters, from one read of its stats page.
fn client_disk(sup: &Supervisor, client: &str, disk: usize) -> Option<DiskCounters> {
    let page = {
        let g = sup.lock();
        let vm = g.vms.get(client)?;
        if vm.state != VmState::Running {
            return None;
        }
        stats_page::read(&vm.stats)?
    };
    let d = &page["rings"][disk];
    Some(DiskCounters {
        outstanding: d["outstanding"].as_u64()?,
        waiting: d["waiting"].as_u64().unwrap_or(0),
        completed: d["completed"].as_u64()?,
        bogus: d["bogus_completions"].as_u64()?,
        corrupt: d["corrupt"].as_u64().unwrap_or(0) != 0,
        suspects: d["suspects"].as_u64().unwrap_or(0),
    })
}

impl Supervisor {
    fn book(&self) -> std::sync::MutexGuard<'_, FaultBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the watcher of every driver VM.
    pub fn spawn_watchers(self: &Arc<Self>) {
        for name in self.names(Role::Driver) {
            let me = self.clone();
            tokio::spawn(async move { me.watch(name).await });
        }
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
        let mut b = self.book();
        let window = Duration::from_secs(self.recovery.restart_window_s);
        let times = b.restart_times.entry(name.to_string()).or_default();
        forget_before(times, window);
        if times.len() >= self.recovery.max_restarts as usize {
            return None;
        }
        times.push_back(Instant::now());
        Some(backoff(
            times.len(),
            self.recovery.backoff_initial_ms,
            self.recovery.backoff_max_ms,
        ))
    }

    /// A channel's request turned out poison: the crashes it was on the ring at are that
    /// channel's, not the driver VM's. Takes them off the driver VM's restart window, adds
    /// them to the channel's, and returns whether the channel reached the cap.
    fn charge_channel(&self, driver: &str, channel: &(String, usize), crashes: u32) -> bool {
        let mut b = self.book();
        if let Some(times) = b.restart_times.get_mut(driver) {
            for _ in 1..crashes {
                times.pop_back();
            }
        }
        let window = Duration::from_secs(self.recovery.restart_window_s);
        let strikes = b.channel_strikes.entry(channel.clone()).or_default();
        forget_before(strikes, window);
        for _ in 0..crashes {
            strikes.push_back(Instant::now());
        }
        strikes.len() >= self.recovery.max_restarts as usize
    }

    /// One recovery, in rounds until a driver VM serves again or the VM is quarantined.
    async fn recover(self: &Arc<Self>, name: &str, mut round: Round, fault_at: Instant) {
        loop {
            self.kill_and_wait(name).await;
            let mut event = FaultEvent {
                driver: name.to_string(),
                injected: round.injected,
                detected_by: round.detection,
                channel: round.channel.as_ref().map(|(c, d)| format!("{c}/{d}")),
                detected_at_ms: now_ms(),
                detect_ms: round.detect_ms,
                outage_ms: None,
                boot_ms: None,
                replayed: 0,
                poisoned: 0,
                restart: "boot",
                fallback: round.after_failed_restore.clone(),
                outcome: "restarted",
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
                event.outcome = "quarantined";
                self.log_event(event);
                return;
            };
            let replay = self.replay_clients(name, true).await;
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
            if round.after_failed_restore.is_some() {
                self.drop_template(name);
            }
            let (boot, fallback) = self.restart_boot(name);
            let restoring = boot == Boot::Restore;
            if restoring {
                event.restart = "restore";
            }
            if event.fallback.is_none() {
                event.fallback = fallback;
            }
            let started = self.start_as(name, boot);
            if started.is_ok() {
                if let Some(vm) = self.lock().vms.get_mut(name) {
                    vm.started_by_recovery = true;
                }
            }
            if let Err(e) = started {
                tracing::error!(vm = name, error = %e, "restart failed");
                event.outcome = "restart-failed";
                self.log_event(event);
                round = Round::detected(Detection::VmmError, None, false);
                continue;
            }
            match self.await_service(name, replay.suspects).await {
                Ok(boot) => {
                    let outage = fault_at.elapsed().as_secs_f64();
                    event.outage_ms = Some(outage * 1e3);
                    event.boot_ms = Some(boot.as_secs_f64() * 1e3);
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
                    event.outcome = "restore-failed";
                    self.log_event(event);
                    let mut next = Round::detected(Detection::VmmError, None, false);
                    next.after_failed_restore = Some(why);
                    round = next;
                }
                Err((next, isolating)) => {
                    self.log_event(event);
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

    fn log_event(&self, e: FaultEvent) {
        let mut b = self.book();
        if b.events.len() >= MAX_EVENTS {
            b.events.pop_front();
        }
        b.events.push_back(e);
    }

    /// Tells every running client of `driver` to start a new generation and replay; with
    /// `hold`, nothing is sent until [`await_service`](Self::await_service) releases it.
    async fn replay_clients(&self, driver: &str, hold: bool) -> Replayed {
        let mut out = Replayed::default();
        for (client, disk) in self.client_disks_of(driver) {
            let req = ControlRequest::Replay {
                disk,
                poison_after: self.recovery.poison_after,
                hold,
            };
            match self.control(&client, &req, REPLAY_TIMEOUT).await {
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
        let quarantined = self.book().quarantined_channels.clone();
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
        self.book().quarantined_channels.insert(channel.clone());
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
        &self,
        driver: &str,
        mut suspects: Vec<(String, usize)>,
    ) -> Result<Duration, (Detection, Option<(String, usize)>)> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.recovery.boot_timeout_ms);
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
        let mut released_all = false;
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
            }
            if ready && !released_all {
                // The isolated channel is done once it has no suspect left (completed, or
                // its client went away).
                if let Some((client, disk)) = &isolating {
                    if client_disk(self, client, *disk).is_none_or(|c| c.suspects == 0) {
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
                            for ch in baseline.keys() {
                                self.release(ch).await;
                            }
                            released_all = true;
                        }
                    }
                }
            }
            let served = released_all
                && baseline
                    .iter()
                    .all(|((client, disk), before)| match before {
                        None => true,
                        Some(b) => {
                            client_disk(self, client, *disk).is_none_or(|c| c.completed > *b)
                        }
                    });
            if let (Some(boot), true) = (boot, served) {
                return Ok(boot);
            }
            if Instant::now() > deadline {
                return Err((Detection::BootTimeout, isolating));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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
        let quarantined = self.book().quarantined_channels.clone();
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
                let generation = ring_word(c, ring_offsets::GENERATION, 8);
                let ready = generation.is_some_and(|g| g != 0)
                    && ring_word(c, ring_offsets::AGENT_GENERATION, 8) == generation
                    && ring_word(c, ring_offsets::AGENT_STATE, 4) == Some(1);
                ChannelView {
                    index,
                    client: c.client.clone(),
                    disk: c.client_index,
                    ready,
                    heartbeat: ring_word(c, ring_offsets::HEARTBEAT, 8).unwrap_or(0),
                }
            })
            .collect()
    }

    /// Whether every live channel's agent serves the channel's current generation.
    fn agents_ready(&self, driver: &str) -> bool {
        self.channel_views(driver).iter().all(|c| c.ready)
    }

    /// The watcher of one driver VM: hang, garbage and boot-timeout detection.
    async fn watch(self: Arc<Self>, driver: String) {
        let mut watches: BTreeMap<usize, ChannelWatch> = BTreeMap::new();
        let mut seen_start = 0;
        let mut boot_recorded = 0;
        let cfg = self.recovery.clone();
        let heartbeat_timeout = Duration::from_millis(cfg.heartbeat_timeout_ms);
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
            if boot_recorded != starts && !views.is_empty() && views.iter().all(|v| v.ready) {
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
                match w.heartbeat {
                    Some((v, _)) if v == hb => {}
                    _ => w.heartbeat = Some((hb, now)),
                }
                if w.heartbeat
                    .is_some_and(|(_, t)| now.duration_since(t) > heartbeat_timeout)
                {
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
                    DiskCounters {
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
                let grew = w.bogus.is_some_and(|before| counters.bogus > before);
                w.bogus = Some(counters.bogus);
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
            self.book().restart_times.remove(name);
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
                .filter(|v| v.cfg.role == Role::Client)
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
    }

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
