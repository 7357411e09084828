//! The in-flight journal of a ring frontend: every guest request from the moment the frontend
//! accepts it until a driver VM completes it, in arrival order.
//!
//! The journal is what makes a driver VM restart transparent (ARCHITECTURE.md, property 5).
//! Each entry is *waiting* (accepted, not on the ring: no room yet, or held back) or *on the
//! ring* under a ring id the journal hands out. An entry leaves the journal only when
//!
//! - the driver VM completes it ([`Journal::complete`]): exactly once, since the ring id is
//!   forgotten at that moment and ids are never reused;
//! - it is poison ([`Journal::renew`]): it was on the ring at `poison_after` consecutive driver
//!   VM crashes, so it fails alone instead of crashing the next driver VM too;
//! - the guest gave it up (a device reset: [`Journal::forget_guest`]) or the channel is given up
//!   ([`Journal::take_all`]).
//!
//! On a new ring generation ([`Journal::renew`]) every entry that was on the ring goes back to
//! waiting in its original place, so replay keeps arrival order (and with it flush ordering).
//! An entry whose guest side is gone stays on the ring until the driver VM answers it (the
//! ring's slot is still the driver VM's), then vanishes; it is not replayed.
//!
//! **Poison isolation.** A request on the ring at `poison_after - 1` crashes in a row is a
//! *suspect*: it is sent only when nothing else of this journal is on the ring, and nothing is
//! sent after it until it completes, so a further crash can only be its own. Across the
//! channels of one driver VM the daemon does the same one level up: it [holds](Journal::set_hold)
//! every channel after a crash and releases the channels with suspects one at a time, then the
//! others (see `vmm/src/daemon/recovery.rs`). An innocent request is then never on the ring
//! together with a suspect at a crash, and is never failed as poison.
//!
//! Everything is bounded: at most `capacity` entries (the caller stops accepting guest work
//! when [`Journal::has_room`] is false). Taking the next request to send is logarithmic (the
//! hot path); renewal, guest reset and quarantine are linear in the entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One journaled request.
#[derive(Debug)]
struct Entry<T> {
    /// `None` once the guest side is gone (device reset, quarantine) while the request is
    /// still on the ring.
    item: Option<T>,
    /// Driver VM crashes this request was on the ring at, in a row.
    crashes: u32,
    /// Ring id while on the ring.
    ring_id: Option<u64>,
}

/// What [`Journal::renew`] did.
#[derive(Debug)]
pub struct Renewal<T> {
    /// Requests back to waiting, to be sent again on the new ring generation.
    pub replayed: u64,
    /// Requests failed as poison, in arrival order (the caller fails them to the guest).
    pub poisoned: Vec<T>,
}

/// The in-flight journal (see the module docs).
#[derive(Debug)]
pub struct Journal<T> {
    entries: BTreeMap<u64, Entry<T>>,
    by_ring_id: HashMap<u64, u64>,
    /// Keys of the entries not on the ring, oldest first (the next to send is the first).
    waiting: BTreeSet<u64>,
    /// Entries with a guest side that one more crash makes poison (kept, not recounted: the
    /// frontend reads it at every wakeup).
    suspects: usize,
    next_seq: u64,
    next_ring_id: u64,
    capacity: usize,
    poison_after: u32,
    /// The suspect on the ring, alone.
    isolating: Option<u64>,
    /// Nothing goes on the ring (the daemon holds this channel while another is isolated).
    hold: bool,
}

impl<T> Journal<T> {
    /// An empty journal holding at most `capacity` requests, with poison detection off until
    /// the first [`renew`](Self::renew).
    pub fn new(capacity: usize) -> Self {
        Journal {
            entries: BTreeMap::new(),
            by_ring_id: HashMap::new(),
            waiting: BTreeSet::new(),
            suspects: 0,
            next_seq: 0,
            next_ring_id: 1,
            capacity,
            poison_after: 0,
            isolating: None,
            hold: false,
        }
    }

    /// Whether another request can be accepted.
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.capacity
    }

    /// How many more requests can be accepted.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.entries.len())
    }

    /// Accepts a request (waiting, at the end). Gives it back when the journal is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if !self.has_room() {
            return Err(item);
        }
        self.entries.insert(
            self.next_seq,
            Entry {
                item: Some(item),
                crashes: 0,
                ring_id: None,
            },
        );
        self.waiting.insert(self.next_seq);
        self.next_seq += 1;
        Ok(())
    }

    /// A ring id for a request that is not journaled (a network receive buffer): ids come from
    /// one counter, so they never collide with journaled ones.
    pub fn fresh_ring_id(&mut self) -> u64 {
        let id = self.next_ring_id;
        self.next_ring_id += 1;
        id
    }

    /// The ring id the next [`sent`](Self::sent) or [`fresh_ring_id`](Self::fresh_ring_id)
    /// hands out (so a request can be written to the ring before it is recorded as sent).
    pub fn peek_ring_id(&self) -> u64 {
        self.next_ring_id
    }

    fn isolate_at(&self) -> u32 {
        match self.poison_after {
            0 | 1 => u32::MAX,
            k => k - 1,
        }
    }

    /// Whether request `seq` was on the ring at a driver VM crash (sending it is a replay).
    pub fn is_replay(&self, seq: u64) -> bool {
        self.entries.get(&seq).is_some_and(|e| e.crashes > 0)
    }

    /// The next waiting request that may go on the ring now, as (its key, the request, whether
    /// it is a suspect), or `None` if nothing may: the journal is held, a suspect is alone on
    /// the ring, or the next one is a suspect and something else is still on the ring. Always
    /// the oldest waiting entry: order is never skipped.
    pub fn next_to_send(&self) -> Option<(u64, &T, bool)> {
        if self.hold || self.isolating.is_some() {
            return None;
        }
        let &seq = self.waiting.first()?;
        let entry = self.entries.get(&seq)?;
        let item = entry.item.as_ref()?;
        let suspect = entry.crashes >= self.isolate_at();
        if suspect && !self.by_ring_id.is_empty() {
            return None;
        }
        Some((seq, item, suspect))
    }

    /// Records that the waiting request `seq` (from [`next_to_send`](Self::next_to_send)) is
    /// about to go on the ring, and returns the ring id to send it under.
    pub fn sent(&mut self, seq: u64) -> Option<u64> {
        let isolate_at = self.isolate_at();
        if !self.waiting.remove(&seq) {
            return None;
        }
        let entry = self.entries.get_mut(&seq)?;
        let id = self.next_ring_id;
        self.next_ring_id += 1;
        entry.ring_id = Some(id);
        if entry.crashes >= isolate_at {
            self.isolating = Some(id);
        }
        self.by_ring_id.insert(id, seq);
        Some(id)
    }

    /// Removes a waiting request the ring refused for good (it fails alone).
    pub fn refuse(&mut self, seq: u64) -> Option<T> {
        if !self.waiting.remove(&seq) {
            return None;
        }
        let entry = self.entries.remove(&seq)?;
        self.leaving(&entry);
        entry.item
    }

    /// Keeps the suspect count true as `entry` leaves the journal.
    fn leaving(&mut self, entry: &Entry<T>) {
        if entry.item.is_some() && entry.crashes >= self.isolate_at() {
            self.suspects = self.suspects.saturating_sub(1);
        }
    }

    /// The driver VM completed ring id `id`: the entry leaves the journal. Returns the request
    /// unless its guest side is gone; `None` also for an id the journal does not know.
    pub fn complete(&mut self, id: u64) -> Option<T> {
        let seq = self.by_ring_id.remove(&id)?;
        if self.isolating == Some(id) {
            self.isolating = None;
        }
        let entry = self.entries.remove(&seq)?;
        self.leaving(&entry);
        entry.item
    }

    /// Whether ring id `id` is a journaled request on the ring.
    pub fn is_on_ring(&self, id: u64) -> bool {
        self.by_ring_id.contains_key(&id)
    }

    /// A new ring generation after the driver VM was replaced: every request that was on the
    /// ring counts one more crash and goes back to waiting in its place, except those whose
    /// guest side is gone (dropped) and the poison ones (returned). `poison_after` 0 turns
    /// poison detection off.
    pub fn renew(&mut self, poison_after: u32) -> Renewal<T> {
        self.poison_after = poison_after;
        self.isolating = None;
        self.by_ring_id.clear();
        let mut replayed = 0;
        let mut poisoned = Vec::new();
        let mut dropped = Vec::new();
        for (&seq, e) in self.entries.iter_mut() {
            if e.ring_id.take().is_none() {
                continue;
            }
            e.crashes = e.crashes.saturating_add(1);
            match &e.item {
                None => dropped.push(seq),
                Some(_) if poison_after > 0 && e.crashes >= poison_after => dropped.push(seq),
                Some(_) => {
                    replayed += 1;
                    self.waiting.insert(seq);
                }
            }
        }
        for seq in dropped {
            if let Some(item) = self.entries.remove(&seq).and_then(|e| e.item) {
                poisoned.push(item);
            }
        }
        // Crash counts and the threshold both changed: count once, here.
        let at = self.isolate_at();
        self.suspects = self
            .entries
            .values()
            .filter(|e| e.item.is_some() && e.crashes >= at)
            .count();
        Renewal { replayed, poisoned }
    }

    /// The guest reset the device: waiting requests are dropped, those on the ring lose their
    /// guest side (the ring still owns their slots until the driver VM answers).
    pub fn forget_guest(&mut self) {
        self.entries.retain(|_, e| e.ring_id.is_some());
        self.waiting.clear();
        self.suspects = 0;
        for e in self.entries.values_mut() {
            e.item = None;
        }
    }

    /// Takes every request's guest side, in arrival order (to fail them all: the channel is
    /// given up). Those on the ring stay until the driver VM answers or the ring is renewed.
    pub fn take_all(&mut self) -> Vec<T> {
        let out = self
            .entries
            .values_mut()
            .filter_map(|e| e.item.take())
            .collect();
        for seq in std::mem::take(&mut self.waiting) {
            self.entries.remove(&seq);
        }
        self.suspects = 0;
        out
    }

    /// Holds (true) or releases (false) the journal: while held nothing goes on the ring.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Whether the journal is held.
    pub fn held(&self) -> bool {
        self.hold
    }

    /// Requests on the ring (answered or not by the driver VM yet), guest side or not.
    pub fn on_ring(&self) -> usize {
        self.by_ring_id.len()
    }

    /// Requests accepted and not yet on the ring.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests that are suspects (one more crash while on the ring makes them poison).
    pub fn suspects(&self) -> usize {
        self.suspects
    }

    /// Every entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entry at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends everything that may go now; returns the (ring id, item) pairs sent.
    fn send_all(j: &mut Journal<u32>) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Some((seq, &item, _)) = j.next_to_send() {
            let id = j.sent(seq).expect("waiting");
            out.push((id, item));
        }
        out
    }

    #[test]
    fn completes_exactly_once_and_keeps_order_across_replays() {
        let mut j = Journal::new(8);
        for i in 0..5 {
            j.push(i).expect("room");
        }
        let sent = send_all(&mut j);
        assert_eq!(
            sent.iter().map(|s| s.1).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(j.complete(sent[1].0), Some(1));
        assert_eq!(j.complete(sent[1].0), None, "twice is once");
        assert_eq!(j.complete(999), None);
        let r = j.renew(3);
        assert_eq!(r.replayed, 4);
        assert!(r.poisoned.is_empty());
        // Late completion from the dead generation's ids: unknown now.
        assert_eq!(j.complete(sent[0].0), None);
        let again = send_all(&mut j);
        assert_eq!(again.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 2, 3, 4]);
        assert!(again.iter().all(|(id, _)| *id > sent[4].0), "fresh ids");
        for (id, item) in again {
            assert_eq!(j.complete(id), Some(item));
        }
        assert!(j.is_empty());
    }

    #[test]
    fn capacity_bounds_the_journal() {
        let mut j = Journal::new(2);
        j.push(1).expect("room");
        j.push(2).expect("room");
        assert_eq!(j.push(3), Err(3));
        assert!(!j.has_room());
    }

    #[test]
    fn a_suspect_goes_alone_and_poison_fails_alone() {
        let mut j = Journal::new(8);
        for i in 0..4 {
            j.push(i).expect("room");
        }
        // Item 2 crashes the driver VM every time; 0 and 1 complete first, 3 never gets to run
        // before the crash.
        let mut crashes = 0;
        let mut done = Vec::new();
        let mut poisoned = Vec::new();
        while !j.is_empty() {
            let mut crashed = false;
            while let Some((seq, &item, suspect)) = j.next_to_send() {
                let id = j.sent(seq).expect("waiting");
                if item == 2 {
                    crashed = true;
                    if suspect {
                        assert_eq!(j.on_ring(), 1, "a suspect is alone");
                    }
                    break;
                }
                if !crashed {
                    assert_eq!(j.complete(id), Some(item));
                    done.push(item);
                }
            }
            if crashed {
                crashes += 1;
                // 3 was sent before the crash only while 2 was no suspect yet.
                poisoned.extend(j.renew(3).poisoned);
            }
            assert!(crashes <= 3);
        }
        assert_eq!(crashes, 3);
        assert_eq!(poisoned, [2]);
        assert_eq!(done, [0, 1, 3]);
    }

    #[test]
    fn guest_reset_drops_waiting_and_detaches_on_ring() {
        let mut j = Journal::new(8);
        for i in 0..4 {
            j.push(i).expect("room");
        }
        let (seq, _, _) = j.next_to_send().expect("one");
        let id = j.sent(seq).expect("sent");
        j.forget_guest();
        assert_eq!((j.on_ring(), j.waiting()), (1, 0));
        assert_eq!(j.complete(id), None, "no guest side left");
        assert!(j.is_empty());
        // On the ring at a crash with no guest side: dropped, not replayed.
        j.push(7).expect("room");
        let (seq, _, _) = j.next_to_send().expect("one");
        j.sent(seq);
        j.forget_guest();
        let r = j.renew(3);
        assert_eq!((r.replayed, r.poisoned.len()), (0, 0));
        assert!(j.is_empty());
    }

    #[test]
    fn hold_stops_sending_and_take_all_fails_everything_once() {
        let mut j = Journal::new(8);
        j.push(1).expect("room");
        j.push(2).expect("room");
        let (seq, _, _) = j.next_to_send().expect("one");
        let id = j.sent(seq).expect("sent");
        j.set_hold(true);
        assert!(j.next_to_send().is_none());
        assert_eq!(j.take_all(), [1, 2]);
        assert_eq!(j.take_all(), Vec::<u32>::new());
        assert_eq!((j.on_ring(), j.waiting()), (1, 0));
        assert_eq!(j.complete(id), None);
        j.set_hold(false);
        assert!(j.next_to_send().is_none());
    }

    #[test]
    fn suspects_are_counted_and_poison_off_never_poisons() {
        let mut j = Journal::new(8);
        j.push(1).expect("room");
        for _ in 0..10 {
            let (seq, _, _) = j.next_to_send().expect("one");
            j.sent(seq);
            assert!(j.renew(0).poisoned.is_empty());
        }
        assert_eq!(j.suspects(), 0);
        let (seq, _, _) = j.next_to_send().expect("one");
        j.sent(seq);
        assert_eq!(
            j.renew(3).poisoned,
            [1],
            "11 crashes with poison_after 3: poison"
        );
        assert!(j.is_empty());
        j.push(2).expect("room");
        let (seq, _, _) = j.next_to_send().expect("one");
        j.sent(seq);
        j.renew(3);
        let (seq, _, _) = j.next_to_send().expect("one");
        j.sent(seq);
        j.renew(3);
        assert_eq!(j.suspects(), 1);
    }

    #[test]
    fn the_kept_suspect_count_matches_a_recount_under_random_operations() {
        let mut j: Journal<u32> = Journal::new(16);
        let mut on_ring: Vec<u64> = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut most = 0;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 8 {
                0 | 1 => {
                    let _ = j.push(step);
                }
                2 | 3 => {
                    if let Some((seq, _, _)) = j.next_to_send() {
                        on_ring.extend(j.sent(seq));
                    }
                }
                4 => {
                    if !on_ring.is_empty() {
                        let id = on_ring.swap_remove((x >> 8) as usize % on_ring.len());
                        j.complete(id);
                    }
                }
                5 => {
                    on_ring.clear();
                    j.renew(((x >> 8) % 5) as u32);
                }
                6 if x & 0x100 == 0 => j.forget_guest(),
                6 => {
                    j.take_all();
                }
                _ => {
                    if let Some((seq, _, _)) = j.next_to_send() {
                        j.refuse(seq);
                    }
                }
            }
            let at = j.isolate_at();
            let recount = j
                .entries
                .values()
                .filter(|e| e.item.is_some() && e.crashes >= at)
                .count();
            assert_eq!(j.suspects(), recount, "step {step}");
            assert_eq!(j.waiting() + j.on_ring(), j.len(), "step {step}");
            most = most.max(recount);
        }
        assert!(most >= 2, "the walk never made suspects ({most})");
    }
}
