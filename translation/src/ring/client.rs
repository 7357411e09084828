//! The client (host, frontend) side: creates the region, submits requests, validates completions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{fence, Ordering};

use super::layout::{
    need_event, offsets as o, Layout, Opcode, RawCompletion, RawRequest, Status, AGENT_READY,
    HEADER_SIZE, MAGIC, NO_SLOT, VERSION_MAJOR, VERSION_MINOR,
};
use super::region::{Load, SharedRegion, Store};
use super::RingError;

/// Sizes and offered features of a new region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingParams {
    /// Entries per ring (power of two, at most [`super::MAX_RING_ENTRIES`]). Also the most
    /// requests that can be outstanding at once.
    pub ring_entries: u32,
    /// Number of data slots (power of two, at most [`super::MAX_SLOT_COUNT`]): the most
    /// data-carrying requests outstanding (or completed but not yet released) at once.
    pub slot_count: u32,
    /// Bytes per slot (multiple of 4 KiB, at most [`super::MAX_SLOT_SIZE`]); the largest request.
    pub slot_size: u32,
    /// Feature bits offered to the agent ([`super::features`]).
    pub features: u64,
}

impl Default for RingParams {
    fn default() -> Self {
        Self {
            ring_entries: 128,
            slot_count: 128,
            slot_size: 128 << 10,
            features: super::features::ALL,
        }
    }
}

impl RingParams {
    /// The layout these sizes produce (validates them).
    pub fn layout(&self) -> Result<Layout, RingError> {
        Layout::new(self.ring_entries, self.slot_count, self.slot_size)
    }
}

/// A request as the client submits it (the ring picks the slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the caller; unique among outstanding requests.
    pub id: u64,
    /// What to do.
    pub op: Opcode,
    /// [`super::flags`] bits valid for `op`.
    pub flags: u32,
    /// Start, in 512-byte sectors.
    pub sector: u64,
    /// Bytes; at most the slot size for opcodes that move data.
    pub len: u32,
}

/// A completion that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The request as submitted.
    pub req: Request,
    /// Outcome.
    pub status: Status,
    /// Bytes done, at most `req.len`.
    pub len: u32,
    /// The request's slot. It stays reserved (readable with [`ClientRing::read_slot`]) until
    /// passed to [`ClientRing::release_slot`].
    pub slot: Option<u32>,
}

/// Counters of what `poll_completions` saw. Everything but `completed` is an agent misbehaving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Valid completions returned.
    pub completed: u64,
    /// Completions carrying another generation (late ones from a replaced agent), discarded.
    pub stale_generation: u64,
    /// Completions for an id that is not outstanding (unknown or already completed), discarded.
    pub unknown_id: u64,
    /// Completions with an undefined status, discarded (the request stays outstanding).
    pub bad_status: u64,
    /// Completions claiming more bytes than requested, discarded (request stays outstanding).
    pub bad_length: u64,
    /// Times a peer index was found more than a ring away (the ring then turned corrupt).
    pub bad_index: u64,
}

impl ClientStats {
    /// Sum of all the misbehaviour counters.
    pub fn bogus(&self) -> u64 {
        self.stale_generation + self.unknown_id + self.bad_status + self.bad_length + self.bad_index
    }
}

/// What the agent advertises in the header, as seen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent declared itself ready for the current generation.
    pub ready: bool,
    /// Heartbeat counter (only its changes mean anything).
    pub heartbeat: u64,
    /// Accepted features, masked with the offered ones.
    pub features: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    Held,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    req: Request,
    slot: Option<u32>,
}

/// The client side of a ring. Single-threaded (`&mut self`); the agent runs elsewhere.
///
/// Sizes, indices it produces and its bookkeeping live in this struct; the region is only ever
/// *read* for what the agent writes (its indices, event index, completions, slot data, status),
/// and every such value is validated before use.
#[derive(Debug)]
pub struct ClientRing<R: SharedRegion> {
    region: R,
    layout: Layout,
    features: u64,
    generation: u64,
    req_prod: u32,
    cmp_cons: u32,
    /// `req_prod` at the last notification decision.
    notified: u32,
    next_seq: u64,
    /// Outstanding requests by submission sequence number (submission order).
    pending: BTreeMap<u64, Pending>,
    by_id: HashMap<u64, u64>,
    slots: Vec<SlotState>,
    free: Vec<u32>,
    stats: ClientStats,
    /// Sticky until the next generation: an agent index broke the ring's invariants, so
    /// nothing more is consumed from or published to it.
    corrupt: Option<Corruption>,
}

/// Which agent-written index broke the ring (see [`ClientRing::corruption`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// `cmp_prod` more than a ring ahead of the client's `cmp_cons`.
    CompletionProducer,
    /// `req_cons` more than a ring behind, or ahead of, the client's `req_prod`.
    RequestConsumer,
}

impl<R: SharedRegion> ClientRing<R> {
    /// Writes a fresh header (generation 1) into `region` and returns the client side.
    pub fn create(region: R, params: RingParams) -> Result<Self, RingError> {
        Self::create_at(region, params, 1)
    }

    /// As [`create`](Self::create), starting at `generation` (non-zero). A client process
    /// that re-creates the ring in memory an agent may still be attached to must pick a
    /// generation that agent has not served, so the agent notices and attaches afresh.
    pub fn create_at(region: R, params: RingParams, generation: u64) -> Result<Self, RingError> {
        if generation == 0 {
            return Err(RingError::BadLayout("generation 0"));
        }
        let layout = params.layout()?;
        if region.size() < layout.total {
            return Err(RingError::RegionTooSmall {
                need: layout.total,
                have: region.size(),
            });
        }
        // Magic last, so an agent probing the region sees either nothing or a whole header.
        region.zero(0, layout.slots)?;
        let r = &region;
        r.store_u32(o::VERSION_MAJOR, VERSION_MAJOR, Store::Relaxed)?;
        r.store_u32(o::VERSION_MINOR, VERSION_MINOR, Store::Relaxed)?;
        r.store_u64(o::CLIENT_FEATURES, params.features, Store::Relaxed)?;
        r.store_u32(o::RING_ENTRIES, layout.ring_entries, Store::Relaxed)?;
        r.store_u32(o::SLOT_COUNT, layout.slot_count, Store::Relaxed)?;
        r.store_u32(o::SLOT_SIZE, layout.slot_size, Store::Relaxed)?;
        r.store_u64(o::REQ_RING_OFFSET, layout.req_ring as u64, Store::Relaxed)?;
        r.store_u64(o::CMP_RING_OFFSET, layout.cmp_ring as u64, Store::Relaxed)?;
        r.store_u64(o::SLOTS_OFFSET, layout.slots as u64, Store::Relaxed)?;
        r.store_u64(o::REGION_SIZE, layout.total as u64, Store::Relaxed)?;
        r.store_u64(o::GENERATION, generation, Store::Relaxed)?;
        fence(Ordering::Release);
        r.write_bytes(o::MAGIC, &MAGIC)?;
        Ok(Self {
            region,
            layout,
            features: params.features,
            generation,
            req_prod: 0,
            cmp_cons: 0,
            notified: 0,
            next_seq: 0,
            pending: BTreeMap::new(),
            by_id: HashMap::new(),
            slots: vec![SlotState::Free; layout.slot_count as usize],
            free: (0..layout.slot_count).rev().collect(),
            stats: ClientStats::default(),
            corrupt: None,
        })
    }

    /// The region (e.g. to hand its mapping to the driver VM).
    pub fn region(&self) -> &R {
        &self.region
    }

    /// Sizes and offsets.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Whether (and how) the agent broke the ring in this generation. A corrupt ring is dead
    /// until [`new_generation`](Self::new_generation): [`poll_completions`](Self::poll_completions)
    /// returns nothing, [`submit`](Self::submit) refuses with [`RingError::IndexCorrupt`] and
    /// [`enable_notify`](Self::enable_notify) reports nothing pending, so no caller can spin on
    /// it. The outstanding requests stay outstanding, to be replayed.
    pub fn corruption(&self) -> Option<Corruption> {
        self.corrupt
    }

    fn mark_corrupt(&mut self, what: Corruption) {
        if self.corrupt.is_none() {
            self.stats.bad_index += 1;
            self.corrupt = Some(what);
        }
    }

    /// Readiness, heartbeat and accepted features of the agent, as it claims them.
    pub fn agent_status(&self) -> Result<AgentStatus, RingError> {
        let r = &self.region;
        let state = r.load_u32(o::AGENT_STATE, Load::Acquire)?;
        let gen = r.load_u64(o::AGENT_GENERATION, Load::Relaxed)?;
        Ok(AgentStatus {
            ready: state == AGENT_READY && gen == self.generation,
            heartbeat: r.load_u64(o::HEARTBEAT, Load::Relaxed)?,
            features: r.load_u64(o::AGENT_FEATURES, Load::Relaxed)? & self.features,
        })
    }

    /// Number of outstanding (submitted, not validly completed) requests.
    pub fn outstanding_len(&self) -> usize {
        self.pending.len()
    }

    /// Outstanding requests in submission order.
    pub fn outstanding(&self) -> impl Iterator<Item = &Request> + '_ {
        self.pending.values().map(|p| &p.req)
    }

    /// Number of free data slots.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Queues `req`, copying `data` (required for, and only for, [`Opcode::Write`] and
    /// [`Opcode::NetTx`]; exactly
    /// `req.len` bytes) into a free slot. Publishes the entry; call
    /// [`needs_notify_agent`](Self::needs_notify_agent) after a batch. Returns the slot used.
    pub fn submit(&mut self, req: Request, data: Option<&[u8]>) -> Result<Option<u32>, RingError> {
        let bad = |reason| RingError::InvalidRequest { id: req.id, reason };
        match (req.op.carries_data(), data) {
            (true, Some(d)) if d.len() == req.len as usize => {
                self.submit_filled(req, |region, at| region.write_bytes(at, d))
            }
            (true, _) => Err(bad("write data must be exactly len bytes")),
            (false, Some(_)) => Err(bad("only writes carry data")),
            (false, None) => self.submit_filled(req, |_, _| Ok(())),
        }
    }

    /// As [`submit`](Self::submit) for a request that carries data, but the data is written
    /// by `fill`, given the byte offset in the region of the slot's first `req.len` bytes
    /// (checked against the layout): one copy from wherever the data is (guest memory) into
    /// the slot, none through a buffer. `fill` returning false fails the submission with
    /// [`RingError::FillFailed`] and publishes nothing.
    pub fn submit_with(
        &mut self,
        req: Request,
        fill: impl FnOnce(usize) -> bool,
    ) -> Result<Option<u32>, RingError> {
        if !req.op.carries_data() {
            return Err(RingError::InvalidRequest {
                id: req.id,
                reason: "only writes carry data",
            });
        }
        self.submit_filled(req, |_, at| {
            if fill(at) {
                Ok(())
            } else {
                Err(RingError::FillFailed(req.id))
            }
        })
    }

    /// The checks and bookkeeping of a submission; `fill` writes the data (if the request
    /// carries any) at the slot's offset before the entry is published.
    fn submit_filled(
        &mut self,
        req: Request,
        fill: impl FnOnce(&R, usize) -> Result<(), RingError>,
    ) -> Result<Option<u32>, RingError> {
        if self.by_id.contains_key(&req.id) {
            return Err(RingError::DuplicateId(req.id));
        }
        // Structural check with a placeholder slot, so the rules are the agent's.
        let slot_probe = if req.op.uses_slot() { 0 } else { NO_SLOT };
        let mut raw = RawRequest {
            id: req.id,
            opcode: req.op as u32,
            flags: req.flags,
            sector: req.sector,
            len: req.len,
            slot: slot_probe,
        };
        self.layout.check_request(&raw)?;
        if self.corrupt.is_some() {
            return Err(RingError::IndexCorrupt);
        }
        if self.pending.len() >= self.layout.ring_entries as usize {
            return Err(RingError::RingFull);
        }
        // The agent's consumer index is untrusted; it only gates whether the entry is free.
        let cons = self.region.load_u32(o::REQ_CONS, Load::Acquire)?;
        match self.req_prod.wrapping_sub(cons) {
            used if used > self.layout.ring_entries => {
                self.mark_corrupt(Corruption::RequestConsumer);
                return Err(RingError::IndexCorrupt);
            }
            used if used == self.layout.ring_entries => return Err(RingError::RingFull),
            _ => {}
        }
        let slot = if req.op.uses_slot() {
            Some(self.free.pop().ok_or(RingError::NoFreeSlot)?)
        } else {
            None
        };
        let filled = match slot {
            Some(s) if req.op.carries_data() => self
                .layout
                .slot_range(s, 0, req.len as usize)
                .and_then(|at| fill(&self.region, at)),
            _ => Ok(()),
        };
        if let Err(e) = filled.and_then(|()| self.write_entry(&mut raw, slot)) {
            if let Some(s) = slot {
                self.free.push(s);
            }
            return Err(e);
        }
        if let Some(s) = slot {
            self.slots[s as usize] = SlotState::InFlight;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(seq, Pending { req, slot });
        self.by_id.insert(req.id, seq);
        Ok(slot)
    }

    fn write_entry(&mut self, raw: &mut RawRequest, slot: Option<u32>) -> Result<(), RingError> {
        raw.slot = slot.unwrap_or(NO_SLOT);
        raw.store(&self.region, self.layout.req_entry(self.req_prod))?;
        self.req_prod = self.req_prod.wrapping_add(1);
        // Release: entry and slot data are visible before the new index.
        self.region
            .store_u32(o::REQ_PROD, self.req_prod, Store::Release)
    }

    /// Whether the agent asked to be notified of the requests published since the last call
    /// (virtio event-index rule on `req_event`). Call after a batch of submits; notify the
    /// agent (its irqfd) if true.
    pub fn needs_notify_agent(&mut self) -> bool {
        // Our index store must be globally visible before we read the agent's event index, and
        // the agent does the mirror image (event store, full fence, index load): at least one
        // of us sees the other's write, so no wakeup is lost.
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.notified, self.req_prod);
        match self.region.load_u32(o::REQ_EVENT, Load::Acquire) {
            Ok(event) => need_event(event, self.req_prod, old),
            // Unreachable with a valid layout; notifying is the safe answer.
            Err(_) => old != self.req_prod,
        }
    }

    /// Arms the completion notification before sleeping: asks the agent to notify once a
    /// completion beyond the consumed ones is published. Returns true if completions are
    /// already pending (poll instead of sleeping). A corrupt ring has nothing pending.
    pub fn enable_notify(&mut self) -> bool {
        if self.corrupt.is_some() {
            return false;
        }
        let armed = self
            .region
            .store_u32(o::CMP_EVENT, self.cmp_cons, Store::Release);
        fence(Ordering::SeqCst);
        match (armed, self.region.load_u32(o::CMP_PROD, Load::Acquire)) {
            (Ok(()), Ok(prod)) if prod.wrapping_sub(self.cmp_cons) > self.layout.ring_entries => {
                self.mark_corrupt(Corruption::CompletionProducer);
                false
            }
            (Ok(()), Ok(prod)) => prod != self.cmp_cons,
            // Unreachable with a valid layout (checked at creation).
            _ => false,
        }
    }

    /// Consumes everything the agent published and returns the completions that are valid:
    /// current generation, outstanding id, known status, length within the request. Everything
    /// else is counted in [`stats`](Self::stats) and dropped; the requests concerned stay
    /// outstanding. At most `ring_entries` entries are read per call; a producer index more
    /// than a ring ahead makes the ring [corrupt](Self::corruption).
    pub fn poll_completions(&mut self) -> Vec<Completed> {
        let mut out = Vec::new();
        if self.corrupt.is_some() {
            return out;
        }
        let Ok(prod) = self.region.load_u32(o::CMP_PROD, Load::Acquire) else {
            return out;
        };
        let avail = prod.wrapping_sub(self.cmp_cons);
        if avail > self.layout.ring_entries {
            self.mark_corrupt(Corruption::CompletionProducer);
            return out;
        }
        for _ in 0..avail {
            let raw = RawCompletion::load(&self.region, self.layout.cmp_entry(self.cmp_cons));
            self.cmp_cons = self.cmp_cons.wrapping_add(1);
            if let Ok(raw) = raw {
                if let Some(c) = self.validate(raw) {
                    out.push(c);
                }
            }
        }
        // Release: we are done reading the entries before the agent may overwrite them.
        let _ = self
            .region
            .store_u32(o::CMP_CONS, self.cmp_cons, Store::Release);
        out
    }

    fn validate(&mut self, raw: RawCompletion) -> Option<Completed> {
        if raw.generation != self.generation {
            self.stats.stale_generation += 1;
            return None;
        }
        let Some(&seq) = self.by_id.get(&raw.id) else {
            self.stats.unknown_id += 1;
            return None;
        };
        let Some(status) = Status::from_raw(raw.status) else {
            self.stats.bad_status += 1;
            return None;
        };
        let p = self.pending.get(&seq).copied()?;
        if raw.len > p.req.len {
            self.stats.bad_length += 1;
            return None;
        }
        self.pending.remove(&seq);
        self.by_id.remove(&raw.id);
        if let Some(s) = p.slot {
            self.slots[s as usize] = SlotState::Held;
        }
        self.stats.completed += 1;
        Some(Completed {
            req: p.req,
            status,
            len: raw.len,
            slot: p.slot,
        })
    }

    /// Copies `buf.len()` bytes at `offset` of a completed request's slot (read data) out of
    /// the region. The slot must be held (completed, not yet released) and the range inside it.
    pub fn read_slot(&self, slot: u32, offset: usize, buf: &mut [u8]) -> Result<(), RingError> {
        let at = self.held_range(slot, offset, buf.len())?;
        self.region.read_bytes(at, buf)
    }

    /// The byte offset in the region of `len` bytes at `offset` of a completed request's
    /// slot, for a copy straight out of it (read data into guest memory). The slot must be
    /// held (completed, not yet released) and the range inside it.
    pub fn held_range(&self, slot: u32, offset: usize, len: usize) -> Result<usize, RingError> {
        if self.slots.get(slot as usize) != Some(&SlotState::Held) {
            return Err(RingError::SlotNotHeld(slot));
        }
        self.layout.slot_range(slot, offset, len)
    }

    /// Returns a completed request's slot to the free pool.
    pub fn release_slot(&mut self, slot: u32) -> Result<(), RingError> {
        match self.slots.get_mut(slot as usize) {
            Some(s @ SlotState::Held) => {
                *s = SlotState::Free;
                self.free.push(slot);
                Ok(())
            }
            _ => Err(RingError::SlotNotHeld(slot)),
        }
    }

    /// Starts a new generation for a freshly attached driver VM and returns the outstanding
    /// requests, in submission order, for the caller to replay with [`submit`](Self::submit)
    /// (re-copying write data from its own memory: the old driver VM could have scribbled
    /// over the slots).
    ///
    /// Call only once the old driver VM can no longer run (its vCPUs stopped or the process
    /// gone) and before the new one attaches: the agent-owned header fields are reset here.
    /// Indices keep running (the agent adopts them at attach); unconsumed requests are dropped
    /// from the ring, their slots freed; slots of completed-but-unreleased requests stay held.
    pub fn new_generation(&mut self) -> Result<Vec<Request>, RingError> {
        let r = &self.region;
        self.generation = self.generation.wrapping_add(1).max(1);
        r.store_u32(o::AGENT_STATE, 0, Store::Relaxed)?;
        r.store_u64(o::AGENT_GENERATION, 0, Store::Relaxed)?;
        r.store_u64(o::AGENT_FEATURES, 0, Store::Relaxed)?;
        r.store_u64(o::HEARTBEAT, 0, Store::Relaxed)?;
        r.store_u32(o::REQ_CONS, self.req_prod, Store::Relaxed)?;
        r.store_u32(o::REQ_EVENT, self.req_prod, Store::Relaxed)?;
        r.store_u32(o::CMP_PROD, self.cmp_cons, Store::Relaxed)?;
        r.store_u32(o::CMP_CONS, self.cmp_cons, Store::Relaxed)?;
        r.store_u32(o::CMP_EVENT, self.cmp_cons, Store::Relaxed)?;
        r.zero(self.layout.req_ring, self.layout.slots - HEADER_SIZE)?;
        r.store_u64(o::GENERATION, self.generation, Store::Release)?;
        self.notified = self.req_prod;
        self.corrupt = None;
        self.by_id.clear();
        let replay: Vec<Request> = std::mem::take(&mut self.pending)
            .into_values()
            .map(|p| {
                if let Some(s) = p.slot {
                    self.slots[s as usize] = SlotState::Free;
                    self.free.push(s);
                }
                p.req
            })
            .collect();
        Ok(replay)
    }

    /// Test hook: starts all indices at `start` (e.g. just below the u32 wrap).
    #[cfg(test)]
    pub(crate) fn force_indices(&mut self, start: u32) {
        assert!(self.pending.is_empty());
        self.req_prod = start;
        self.cmp_cons = start;
        self.notified = start;
        for off in [
            o::REQ_PROD,
            o::REQ_CONS,
            o::REQ_EVENT,
            o::CMP_PROD,
            o::CMP_CONS,
            o::CMP_EVENT,
        ] {
            self.region.store_u32(off, start, Store::Release).unwrap();
        }
    }
}
