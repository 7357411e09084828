//! The worker loop of a ring frontend: one thread per device, for the device's whole life.
//!
//! Each turn: apply queued commands, then up to [`ROUNDS`] rounds of (post standing requests,
//! take completions, serve the guest, submit waiting requests, publish used entries) while the
//! ring says more completions are pending, then sleep in epoll on typed [`Token`]s. A turn
//! does bounded work (completions: one ring's worth per round; guest chains: one queue's worth
//! per round; submissions: bounded by the journal's capacity), so a hostile agent or guest
//! costs at most a bounded amount of CPU per wakeup, and wakeups come only from eventfds.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use ddvmm_translation::journal::Journal;
use ddvmm_translation::ring::{ClientRing, RawRegion, RingError};
use vm_memory::MmapRegion;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::control::{Command, Reply, RingCommand, RingOutcome};
use super::rate_limit::{RateLimit, RateLimiter};
use super::{
    raw, CommandError, Failure, Guest, GuestError, Payload, RingDevice, RingStats, RingView,
};

/// Rounds per turn before going back to epoll (with a zero timeout if work remains).
const ROUNDS: usize = 4;
/// Wake up this often while requests are on the ring, even without a doorbell: a lost or
/// withheld notification costs a delay, never a hang.
const POLL_MS: i32 = 1000;

/// What woke the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    /// The guest notified queue `n`.
    Queue(u16),
    /// The driver VM rang the doorbell.
    Doorbell,
    /// A command is queued.
    Control,
}

impl Token {
    fn raw(self) -> u64 {
        match self {
            Token::Control => 0,
            Token::Doorbell => 1,
            Token::Queue(n) => 2 + u64::from(n),
        }
    }

    fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Token::Control),
            1 => Some(Token::Doorbell),
            n => u16::try_from(n - 2).ok().map(Token::Queue),
        }
    }
}

/// What a worker is built from.
pub(super) struct Parts<D: RingDevice> {
    pub device: D,
    pub ring: ClientRing<RawRegion>,
    pub map: Arc<MmapRegion>,
    pub journal: Journal<D::Item>,
    pub kick: Arc<EventFd>,
    pub doorbell: Arc<EventFd>,
    pub stats: Arc<RingStats>,
    pub commands: mpsc::Receiver<(Command, mpsc::Sender<Reply>)>,
    pub wake: EventFd,
    pub limit: RateLimit,
}

pub(super) struct Worker<D: RingDevice> {
    device: D,
    // Declared before `map`: the ring's raw region points into the mapping.
    ring: ClientRing<RawRegion>,
    map: Arc<MmapRegion>,
    journal: Journal<D::Item>,
    /// Ring ids of the standing requests on the ring.
    standing: HashSet<u64>,
    quarantined: bool,
    guest: Option<Guest>,
    kick: Arc<EventFd>,
    doorbell: Arc<EventFd>,
    doorbell_armed: bool,
    stats: Arc<RingStats>,
    commands: mpsc::Receiver<(Command, mpsc::Sender<Reply>)>,
    wake: EventFd,
    epoll: Epoll,
    seen_bogus: u64,
    limiter: Option<RateLimiter>,
    /// A request waits for the rate limit until then.
    throttled_until: Option<Instant>,
}

impl<D: RingDevice> Worker<D> {
    pub(super) fn new(p: Parts<D>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut w = Worker {
            device: p.device,
            ring: p.ring,
            map: p.map,
            journal: p.journal,
            standing: HashSet::new(),
            quarantined: false,
            guest: None,
            kick: p.kick,
            doorbell: p.doorbell,
            doorbell_armed: false,
            stats: p.stats,
            commands: p.commands,
            wake: p.wake,
            epoll,
            seen_bogus: 0,
            limiter: RateLimiter::new(p.limit, Instant::now()),
            throttled_until: None,
        };
        w.watch(raw(&w.wake), Token::Control, true)?;
        w.watch(raw(&w.doorbell), Token::Doorbell, true)?;
        w.doorbell_armed = true;
        Ok(w)
    }

    fn watch(&self, fd: i32, token: Token, add: bool) -> std::io::Result<()> {
        let op = if add {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, token.raw()))
    }

    fn arm_doorbell(&mut self, on: bool) {
        if self.doorbell_armed != on && self.watch(raw(&self.doorbell), Token::Doorbell, on).is_ok()
        {
            self.doorbell_armed = on;
        }
    }

    /// The thread's body: returns when told to stop or when its device is gone.
    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok((Command::Stop, reply)) => {
                        self.drop_guest();
                        let _ = reply.send(Ok(RingOutcome::default()));
                        return;
                    }
                    Ok((cmd, reply)) => {
                        let _ = reply.send(self.apply(cmd));
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let busy = self.turn();
            self.update_gauges();
            let timeout = if busy {
                0
            } else if self.ring.corruption().is_none()
                && (self.journal.on_ring() > 0 || !self.standing.is_empty())
            {
                POLL_MS
            } else {
                -1
            };
            // A throttled request is retried when its tokens are back.
            let timeout = match self.throttled_until {
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_micros();
                    let ms = i32::try_from(ms.div_ceil(1000)).unwrap_or(POLL_MS);
                    if timeout < 0 {
                        ms
                    } else {
                        timeout.min(ms)
                    }
                }
                None => timeout,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "ring frontend epoll failed; worker ends");
                    return;
                }
            };
            for ev in &events[..n] {
                match Token::from_raw(ev.data()) {
                    Some(Token::Control) => {
                        let _ = self.wake.read();
                    }
                    Some(Token::Doorbell) => {
                        let _ = self.doorbell.read();
                        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Token::Queue(q)) => {
                        if let Some(g) = self.guest.as_ref() {
                            if let Some(aq) = g.queues.get(usize::from(q)) {
                                let _ = aq.notify.read();
                            }
                        }
                    }
                    None => {}
                }
            }
        }
    }

    /// Up to [`ROUNDS`] rounds; returns whether work is left (completions still pending).
    pub(super) fn turn(&mut self) -> bool {
        for _ in 0..ROUNDS {
            self.post_standing();
            self.take_completions();
            self.serve_guest();
            self.submit();
            self.publish();
            if !self.ring.enable_notify() {
                self.note_corruption();
                return false;
            }
        }
        true
    }

    pub(super) fn apply(&mut self, cmd: Command) -> Reply {
        match cmd {
            Command::Activate(guest) => {
                self.drop_guest();
                for i in 0..guest.queues.len() {
                    let Ok(n) = u16::try_from(i) else { break };
                    if let Err(e) = self.watch(raw(&guest.queues[i].notify), Token::Queue(n), true)
                    {
                        tracing::error!(error = %e, "cannot watch a guest queue");
                    }
                }
                self.guest = Some(guest);
                Ok(RingOutcome::default())
            }
            Command::Reset => {
                self.drop_guest();
                Ok(RingOutcome::default())
            }
            Command::Ring(c) => self.apply_ring(c),
            // Handled by the loop.
            Command::Stop => Ok(RingOutcome::default()),
        }
    }

    fn apply_ring(&mut self, cmd: RingCommand) -> Reply {
        let mut outcome = RingOutcome::default();
        match cmd {
            RingCommand::Replay { poison_after, hold } => {
                // The old ring's requests are all in the journal; the ring's own list is
                // not needed.
                self.ring.new_generation().map_err(CommandError::Renew)?;
                self.stats.generations.fetch_add(1, Ordering::Relaxed);
                self.stats.first_completion_ms.store(0, Ordering::Relaxed);
                let reposted = self.standing.len() as u64;
                self.stats.reposted.fetch_add(reposted, Ordering::Relaxed);
                self.standing.clear();
                self.quarantined = false;
                let renewal = self.journal.renew(poison_after);
                self.journal.set_hold(hold);
                outcome.replayed = renewal.replayed;
                outcome.poisoned = renewal.poisoned.len() as u64;
                for item in renewal.poisoned {
                    tracing::error!(crashes = poison_after, "poison request: failed alone");
                    self.fail(item, Failure::Poison);
                }
                outcome.suspects = self.journal.suspects() as u64;
                self.arm_doorbell(true);
                self.stats
                    .replayed
                    .fetch_add(outcome.replayed, Ordering::Relaxed);
                self.stats
                    .poisoned
                    .fetch_add(outcome.poisoned, Ordering::Relaxed);
            }
            RingCommand::Release => self.journal.set_hold(false),
            RingCommand::Quarantine => {
                self.quarantined = true;
                for item in self.journal.take_all() {
                    outcome.failed += 1;
                    self.fail(item, Failure::Quarantine);
                }
                self.stats
                    .quarantine_failed
                    .fetch_add(outcome.failed, Ordering::Relaxed);
            }
        }
        self.publish();
        self.update_gauges();
        Ok(outcome)
    }

    fn fail(&mut self, item: D::Item, why: Failure) {
        if let Some(g) = self.guest.as_mut() {
            self.device.fail(g, item, why);
        }
    }

    /// Forgets the guest: its queues are no longer watched or touched; requests on the ring
    /// stay there (and are drained) without their guest side.
    fn drop_guest(&mut self) {
        let Some(g) = self.guest.take() else { return };
        for (i, q) in g.queues.iter().enumerate() {
            if let Ok(n) = u16::try_from(i) {
                let _ = self.watch(raw(&q.notify), Token::Queue(n), false);
            }
        }
        self.journal.forget_guest();
        self.device.guest_gone();
    }

    /// A guest error: the device needs a reset; the ring goes on.
    fn guest_failed(&mut self, e: GuestError) {
        if let Some(g) = self.guest.as_ref() {
            g.failure.needs_reset(&e.to_string());
        }
        tracing::warn!(error = %e, "guest queue broken: device needs a reset");
        self.drop_guest();
    }

    fn post_standing(&mut self) {
        if self.quarantined || self.ring.corruption().is_some() {
            return;
        }
        let Some((template, count)) = self.device.standing() else {
            return;
        };
        let mut sent = false;
        while self.standing.len() < count {
            let id = self.journal.fresh_ring_id();
            let req = ddvmm_translation::ring::Request { id, ..template };
            if self.ring.submit(req, None).is_err() {
                break;
            }
            self.standing.insert(id);
            sent = true;
        }
        if sent {
            self.kick_if_asked();
        }
    }

    fn take_completions(&mut self) {
        for c in self.ring.poll_completions() {
            let id = c.req.id;
            let view = RingView::new(&self.ring, &self.map);
            if self.standing.remove(&id) {
                self.device.standing_done(self.guest.as_mut(), &view, &c);
            } else if self.journal.is_on_ring(id) {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                if self.stats.first_completion_ms.load(Ordering::Relaxed) == 0 {
                    self.stats
                        .first_completion_ms
                        .store(super::wall_ms(), Ordering::Relaxed);
                }
                let item = self.journal.complete(id);
                if let (Some(item), Some(g)) = (item, self.guest.as_mut()) {
                    self.device.complete(g, &view, item, &c);
                }
            }
            if let Some(slot) = c.slot {
                let _ = self.ring.release_slot(slot);
            }
        }
        let stats = self.ring.stats();
        let bogus = stats.bogus();
        if bogus != self.seen_bogus {
            tracing::warn!(
                new = bogus - self.seen_bogus,
                stale_generation = stats.stale_generation,
                unknown_id = stats.unknown_id,
                bad_status = stats.bad_status,
                bad_length = stats.bad_length,
                bad_index = stats.bad_index,
                "driver VM published invalid completions; dropped"
            );
            self.seen_bogus = bogus;
            self.stats.bogus_completions.store(bogus, Ordering::Relaxed);
        }
    }

    fn serve_guest(&mut self) {
        let Some(g) = self.guest.as_mut() else { return };
        let r = self
            .device
            .service_guest(g)
            .and_then(|()| self.device.accept(g, &mut self.journal, self.quarantined));
        if let Err(e) = r {
            self.guest_failed(e);
        }
    }

    /// Moves waiting requests onto the ring, in order, while it takes them; kicks the driver
    /// VM if it asked.
    fn submit(&mut self) {
        // Set again below only while a request waits for the limit: a request that can no
        // longer go (guest reset, quarantine, hold) leaves no stale deadline to spin on.
        self.throttled_until = None;
        let mut sent = false;
        while let Some(g) = self.guest.as_ref() {
            let Some((seq, item, _)) = self.journal.next_to_send() else {
                break;
            };
            // Only under a limit, and not for a replay (charged when it was first sent).
            let charge = match &self.limiter {
                Some(_) if !self.journal.is_replay(seq) => Some(self.device.payload_bytes(item)),
                _ => None,
            };
            if let (Some(limiter), Some(bytes)) = (self.limiter.as_mut(), charge) {
                let now = Instant::now();
                if let Err(wait) = limiter.check(now, bytes) {
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    self.throttled_until = Some(now + wait);
                    break;
                }
            }
            let Some((mut req, payload)) = self.device.encode(item) else {
                if let Some(item) = self.journal.refuse(seq) {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    self.fail(item, Failure::Refused);
                }
                continue;
            };
            req.id = self.journal.peek_ring_id();
            let submitted = match payload {
                Payload::None => self.ring.submit(req, None),
                Payload::Bytes(d) => self.ring.submit(req, Some(d)),
                Payload::Guest(pieces) => {
                    let (map, mem) = (&self.map, &g.mem);
                    self.ring.submit_with(req, |at| {
                        super::copy_pieces(map, at, mem, pieces, super::Direction::FromGuest)
                    })
                }
            };
            match submitted {
                Ok(_) => {
                    self.journal.sent(seq);
                    self.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    if let (Some(limiter), Some(bytes)) = (self.limiter.as_mut(), charge) {
                        limiter.commit(bytes);
                    }
                    sent = true;
                }
                // No room, or the ring is corrupt: the request waits (for a completion, or
                // for the replay on the next generation).
                Err(RingError::RingFull | RingError::NoFreeSlot | RingError::IndexCorrupt) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "ring refused a request");
                    if let Some(item) = self.journal.refuse(seq) {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        self.fail(item, Failure::Refused);
                    }
                }
            }
        }
        if sent {
            self.kick_if_asked();
        }
        self.note_corruption();
    }

    fn kick_if_asked(&mut self) {
        if self.ring.needs_notify_agent() {
            let _ = self.kick.write(1);
            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish(&mut self) {
        if let Some(g) = self.guest.as_mut() {
            if let Err(e) = g.publish() {
                self.guest_failed(e);
            }
        }
    }

    /// A corrupt ring: said once, and the driver VM's doorbell is no longer listened to
    /// until the next generation (a hostile agent cannot keep this thread busy).
    fn note_corruption(&mut self) {
        if let Some(what) = self.ring.corruption() {
            if self.doorbell_armed {
                tracing::error!(
                    ?what,
                    "the driver VM broke the ring; requests are kept for the replay"
                );
                self.arm_doorbell(false);
            }
        }
    }

    pub(super) fn update_gauges(&self) {
        let s = &self.stats;
        let j = &self.journal;
        s.outstanding.store(j.on_ring() as u64, Ordering::Relaxed);
        s.waiting.store(j.waiting() as u64, Ordering::Relaxed);
        s.suspects.store(j.suspects() as u64, Ordering::Relaxed);
        s.held.store(u64::from(j.held()), Ordering::Relaxed);
        s.corrupt.store(
            u64::from(self.ring.corruption().is_some()),
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Control,
            Token::Doorbell,
            Token::Queue(0),
            Token::Queue(u16::MAX),
        ] {
            assert_eq!(Token::from_raw(t.raw()), Some(t));
        }
        assert_eq!(Token::from_raw(u64::MAX), None);
    }
}
