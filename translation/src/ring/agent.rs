//! The agent (driver VM) side: attaches to a region the client created, takes requests,
//! publishes completions.

use std::sync::atomic::{fence, Ordering};

use super::layout::{
    need_event, offsets as o, Layout, RawCompletion, RawRequest, RequestEntry, Status, AGENT_READY,
    HEADER_SIZE, MAGIC, VERSION_MAJOR,
};
use super::region::{Load, SharedRegion, Store};
use super::RingError;

/// What the agent reports for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub id: u64,
    /// Outcome.
    pub status: Status,
    /// Bytes done.
    pub len: u32,
}

/// The agent side of a ring. Single-threaded (`&mut self`).
///
/// The sizes are read and validated once, at [`attach`](Self::attach); afterwards only the
/// client's indices, event index and request entries are read from the region, and each is
/// validated before use.
#[derive(Debug)]
pub struct AgentRing<R: SharedRegion> {
    region: R,
    layout: Layout,
    generation: u64,
    features: u64,
    req_cons: u32,
    cmp_prod: u32,
    /// `cmp_prod` at the last notification decision.
    notified: u32,
    heartbeat: u64,
}

impl<R: SharedRegion> AgentRing<R> {
    /// Validates the header (magic, major version, sizes, offsets, indices, all against the
    /// region's length) and takes over the ring at the indices the client left. `supported` are
    /// the feature bits this agent implements; the accepted set is the offered ones among them.
    /// Nothing is written until [`set_ready`](Self::set_ready) except the request event index.
    pub fn attach(region: R, supported: u64) -> Result<Self, RingError> {
        let r = &region;
        if r.size() < HEADER_SIZE {
            return Err(RingError::RegionTooSmall {
                need: HEADER_SIZE,
                have: r.size(),
            });
        }
        let mut magic = [0u8; 8];
        r.read_bytes(o::MAGIC, &mut magic)?;
        if magic != MAGIC {
            return Err(RingError::BadMagic);
        }
        fence(Ordering::Acquire);
        let major = r.load_u32(o::VERSION_MAJOR, Load::Relaxed)?;
        let minor = r.load_u32(o::VERSION_MINOR, Load::Relaxed)?;
        if major != VERSION_MAJOR {
            return Err(RingError::Version { major, minor });
        }
        let layout = Layout::new(
            r.load_u32(o::RING_ENTRIES, Load::Relaxed)?,
            r.load_u32(o::SLOT_COUNT, Load::Relaxed)?,
            r.load_u32(o::SLOT_SIZE, Load::Relaxed)?,
        )?;
        let stated = [
            r.load_u64(o::REQ_RING_OFFSET, Load::Relaxed)?,
            r.load_u64(o::CMP_RING_OFFSET, Load::Relaxed)?,
            r.load_u64(o::SLOTS_OFFSET, Load::Relaxed)?,
            r.load_u64(o::REGION_SIZE, Load::Relaxed)?,
        ];
        let computed = [layout.req_ring, layout.cmp_ring, layout.slots, layout.total];
        if stated.iter().zip(computed).any(|(&s, c)| s != c as u64) {
            return Err(RingError::BadLayout(
                "stated offsets disagree with the sizes",
            ));
        }
        if layout.total > r.size() {
            return Err(RingError::RegionTooSmall {
                need: layout.total,
                have: r.size(),
            });
        }
        let generation = r.load_u64(o::GENERATION, Load::Acquire)?;
        if generation == 0 {
            return Err(RingError::BadLayout("generation 0"));
        }
        let features = r.load_u64(o::CLIENT_FEATURES, Load::Relaxed)? & supported;
        let req_prod = r.load_u32(o::REQ_PROD, Load::Acquire)?;
        let req_cons = r.load_u32(o::REQ_CONS, Load::Relaxed)?;
        let cmp_prod = r.load_u32(o::CMP_PROD, Load::Relaxed)?;
        let cmp_cons = r.load_u32(o::CMP_CONS, Load::Relaxed)?;
        if req_prod.wrapping_sub(req_cons) > layout.ring_entries
            || cmp_prod.wrapping_sub(cmp_cons) > layout.ring_entries
        {
            return Err(RingError::IndexCorrupt);
        }
        r.store_u32(o::REQ_EVENT, req_cons, Store::Release)?;
        Ok(Self {
            region,
            layout,
            generation,
            features,
            req_cons,
            cmp_prod,
            notified: cmp_prod,
            heartbeat: 0,
        })
    }

    /// Sizes and offsets.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The generation this agent serves (stamped into every completion).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Accepted feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the client still runs the generation we attached to (false means we are a
    /// leftover and should stop).
    pub fn is_current(&self) -> bool {
        self.region.load_u64(o::GENERATION, Load::Acquire).ok() == Some(self.generation)
    }

    /// Publishes accepted features and the generation served, then the ready state.
    pub fn set_ready(&self) -> Result<(), RingError> {
        let r = &self.region;
        r.store_u64(o::AGENT_FEATURES, self.features, Store::Relaxed)?;
        r.store_u64(o::AGENT_GENERATION, self.generation, Store::Relaxed)?;
        r.store_u32(o::AGENT_STATE, AGENT_READY, Store::Release)
    }

    /// Increments the heartbeat counter.
    pub fn heartbeat(&mut self) -> Result<(), RingError> {
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.region
            .store_u64(o::HEARTBEAT, self.heartbeat, Store::Release)
    }

    /// Takes the next request, if any. The entry is consumed even when it is invalid
    /// ([`RingError::InvalidRequest`] carries its id, so it can be completed with an error
    /// status). A producer index more than a ring ahead gives [`RingError::IndexCorrupt`] and
    /// consumes nothing.
    pub fn pop_request(&mut self) -> Option<Result<RequestEntry, RingError>> {
        let prod = match self.region.load_u32(o::REQ_PROD, Load::Acquire) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        match prod.wrapping_sub(self.req_cons) {
            0 => return None,
            n if n > self.layout.ring_entries => return Some(Err(RingError::IndexCorrupt)),
            _ => {}
        }
        let raw = RawRequest::load(&self.region, self.layout.req_entry(self.req_cons));
        self.req_cons = self.req_cons.wrapping_add(1);
        // Release: the entry is read before the client may reuse it.
        if let Err(e) = self
            .region
            .store_u32(o::REQ_CONS, self.req_cons, Store::Release)
        {
            return Some(Err(e));
        }
        Some(raw.and_then(|raw| self.layout.check_request(&raw)))
    }

    /// Copies bytes out of a slot (write data), bounds-checked against the slot.
    pub fn read_slot(&self, slot: u32, offset: usize, buf: &mut [u8]) -> Result<(), RingError> {
        let at = self.layout.slot_range(slot, offset, buf.len())?;
        self.region.read_bytes(at, buf)
    }

    /// Copies bytes into a slot (read data), bounds-checked against the slot.
    pub fn write_slot(&self, slot: u32, offset: usize, data: &[u8]) -> Result<(), RingError> {
        let at = self.layout.slot_range(slot, offset, data.len())?;
        self.region.write_bytes(at, data)
    }

    /// Publishes a completion stamped with our generation. Slot data written before this call is
    /// visible to the client once it sees the completion.
    pub fn complete(&mut self, c: Completion) -> Result<(), RingError> {
        self.publish(RawCompletion {
            id: c.id,
            generation: self.generation,
            status: c.status as u32,
            len: c.len,
        })
    }

    /// Publishes an arbitrary completion entry, valid or not: **fault injection only** (the
    /// agent's garbage mode, tests of the client's validation). Still respects ring space.
    pub fn publish_unchecked(&mut self, raw: RawCompletion) -> Result<(), RingError> {
        self.publish(raw)
    }

    /// Stores a completion producer index more than a ring ahead of the client: **fault
    /// injection only** (a driver VM that breaks the ring; the client must call it corrupt).
    pub fn corrupt_completion_index(&mut self) -> Result<(), RingError> {
        let bad = self
            .cmp_prod
            .wrapping_add(self.layout.ring_entries.wrapping_mul(2).max(2));
        self.region.store_u32(o::CMP_PROD, bad, Store::Release)
    }

    fn publish(&mut self, raw: RawCompletion) -> Result<(), RingError> {
        let cons = self.region.load_u32(o::CMP_CONS, Load::Acquire)?;
        match self.cmp_prod.wrapping_sub(cons) {
            n if n > self.layout.ring_entries => return Err(RingError::IndexCorrupt),
            n if n == self.layout.ring_entries => return Err(RingError::RingFull),
            _ => {}
        }
        raw.store(&self.region, self.layout.cmp_entry(self.cmp_prod))?;
        self.cmp_prod = self.cmp_prod.wrapping_add(1);
        // Release: slot data and entry are visible before the new index.
        self.region
            .store_u32(o::CMP_PROD, self.cmp_prod, Store::Release)
    }

    /// Whether the client asked to be notified of the completions published since the last
    /// call (event-index rule on `cmp_event`). Call after a batch; ring the doorbell if true.
    pub fn needs_notify_client(&mut self) -> bool {
        // Full fence between our index store and the event load (see the client's mirror).
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.notified, self.cmp_prod);
        match self.region.load_u32(o::CMP_EVENT, Load::Acquire) {
            Ok(event) => need_event(event, self.cmp_prod, old),
            Err(_) => old != self.cmp_prod,
        }
    }

    /// Arms the request notification before sleeping. Returns true if requests are already
    /// pending (keep polling instead of sleeping).
    pub fn enable_notify(&mut self) -> bool {
        let armed = self
            .region
            .store_u32(o::REQ_EVENT, self.req_cons, Store::Release);
        fence(Ordering::SeqCst);
        match (armed, self.region.load_u32(o::REQ_PROD, Load::Acquire)) {
            (Ok(()), Ok(prod)) => prod != self.req_cons,
            _ => true,
        }
    }
}
