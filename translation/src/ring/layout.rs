//! Wire format: constants, header offsets, entry encodings and the layout computed from the sizes.
//!
//! Everything here is protocol: changing a value is a major version bump. See the module docs of
//! [`crate::ring`] for the tables.

use super::region::{Load, SharedRegion, Store};
use super::RingError;

/// First eight bytes of the region.
pub const MAGIC: [u8; 8] = *b"DDVMRING";
/// Major protocol version: an agent refuses any other major.
pub const VERSION_MAJOR: u32 = 1;
/// Minor protocol version: backwards-compatible additions, each gated by a feature bit.
pub const VERSION_MINOR: u32 = 0;

/// Size of the header page; the request ring starts right after it.
pub const HEADER_SIZE: usize = 0x1000;
/// Rings and the slot area start on multiples of this.
pub const AREA_ALIGN: u64 = 0x1000;
/// Size of a request entry and of a completion entry.
pub const ENTRY_SIZE: usize = 32;
/// `slot` value of a request that carries no data.
pub const NO_SLOT: u32 = u32::MAX;
/// Largest number of entries per ring.
pub const MAX_RING_ENTRIES: u32 = 1 << 15;
/// Largest number of data slots.
pub const MAX_SLOT_COUNT: u32 = 1 << 16;
/// Largest slot size (bytes).
pub const MAX_SLOT_SIZE: u32 = 16 << 20;
/// Slot sizes are multiples of this.
pub const SLOT_SIZE_ALIGN: u32 = 0x1000;
/// Block requests address the disk in sectors of this many bytes.
pub const SECTOR_SIZE: u64 = 512;

/// `agent_state` values.
pub const AGENT_NOT_READY: u32 = 0;
/// The agent serves the generation in `agent_generation`.
pub const AGENT_READY: u32 = 1;

/// Byte offsets of the header fields (all little-endian).
pub mod offsets {
    /// `[u8; 8]`, client: [`super::MAGIC`].
    pub const MAGIC: usize = 0x000;
    /// u32, client.
    pub const VERSION_MAJOR: usize = 0x008;
    /// u32, client.
    pub const VERSION_MINOR: usize = 0x00C;
    /// u64, client: feature bits the client offers.
    pub const CLIENT_FEATURES: usize = 0x010;
    /// u64, agent: the subset of the offered bits the agent accepts.
    pub const AGENT_FEATURES: usize = 0x018;
    /// u64, client: current generation (never 0 once created).
    pub const GENERATION: usize = 0x020;
    /// u64, agent: the generation it serves.
    pub const AGENT_GENERATION: usize = 0x028;
    /// u32, agent: [`super::AGENT_NOT_READY`] or [`super::AGENT_READY`].
    pub const AGENT_STATE: usize = 0x030;
    /// u64, agent: incremented periodically while alive.
    pub const HEARTBEAT: usize = 0x038;
    /// u32, client: entries per ring (power of two).
    pub const RING_ENTRIES: usize = 0x040;
    /// u32, client: number of data slots (power of two).
    pub const SLOT_COUNT: usize = 0x044;
    /// u32, client: bytes per data slot.
    pub const SLOT_SIZE: usize = 0x048;
    /// u64, client: offset of the request ring.
    pub const REQ_RING_OFFSET: usize = 0x050;
    /// u64, client: offset of the completion ring.
    pub const CMP_RING_OFFSET: usize = 0x058;
    /// u64, client: offset of the slot area.
    pub const SLOTS_OFFSET: usize = 0x060;
    /// u64, client: bytes used by the protocol from offset 0.
    pub const REGION_SIZE: usize = 0x068;
    /// u32, client: request producer index.
    pub const REQ_PROD: usize = 0x100;
    /// u32, agent: request consumer index.
    pub const REQ_CONS: usize = 0x140;
    /// u32, agent: "notify me when `REQ_PROD` passes this".
    pub const REQ_EVENT: usize = 0x180;
    /// u32, agent: completion producer index.
    pub const CMP_PROD: usize = 0x1C0;
    /// u32, client: completion consumer index.
    pub const CMP_CONS: usize = 0x200;
    /// u32, client: "notify me when `CMP_PROD` passes this".
    pub const CMP_EVENT: usize = 0x240;
}

/// What an observer of a ring (the daemon's watcher, `ctl stats`) reads of its header: whose
/// generation is current, whether the agent serves it and is alive, and the producer indices.
/// Parsed from one copy of the header's first [`HeaderView::LEN`] bytes; the fields are
/// untrusted values, only compared and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeaderView {
    /// The client's current generation (0: no ring created yet).
    pub generation: u64,
    /// The generation the agent serves.
    pub agent_generation: u64,
    /// [`AGENT_READY`] or [`AGENT_NOT_READY`] (or anything an agent wrote).
    pub agent_state: u32,
    /// The agent's heartbeat counter.
    pub heartbeat: u64,
    /// Request producer index.
    pub req_prod: u32,
    /// Completion producer index.
    pub cmp_prod: u32,
}

impl HeaderView {
    /// Bytes of the header a view reads (offset 0 up to and including `cmp_prod`).
    pub const LEN: usize = offsets::CMP_PROD + 4;

    /// Parses the first [`Self::LEN`] bytes of a header; `None` if `header` is shorter.
    pub fn parse(header: &[u8]) -> Option<Self> {
        let bytes = |at: usize, n: usize| header.get(at..at + n);
        let u32_at = |at| bytes(at, 4)?.try_into().ok().map(u32::from_le_bytes);
        let u64_at = |at| bytes(at, 8)?.try_into().ok().map(u64::from_le_bytes);
        Some(HeaderView {
            generation: u64_at(offsets::GENERATION)?,
            agent_generation: u64_at(offsets::AGENT_GENERATION)?,
            agent_state: u32_at(offsets::AGENT_STATE)?,
            heartbeat: u64_at(offsets::HEARTBEAT)?,
            req_prod: u32_at(offsets::REQ_PROD)?,
            cmp_prod: u32_at(offsets::CMP_PROD)?,
        })
    }

    /// Whether the agent has attached to the client's current generation and is ready.
    pub fn agent_serves_current(&self) -> bool {
        self.generation != 0
            && self.agent_generation == self.generation
            && self.agent_state == AGENT_READY
    }
}

/// Feature bits (`client_features` / `agent_features`). Flush is always available.
pub mod features {
    /// The agent honours [`super::flags::FUA`] on writes.
    pub const FUA: u64 = 1 << 0;
    /// The agent implements [`super::Opcode::Discard`].
    pub const DISCARD: u64 = 1 << 1;
    /// The agent implements [`super::Opcode::WriteZeroes`].
    pub const WRITE_ZEROES: u64 = 1 << 2;
    /// The agent implements [`super::Opcode::GetId`].
    pub const GET_ID: u64 = 1 << 3;
    /// The agent carries network frames ([`super::Opcode::NetTx`], [`super::Opcode::NetRx`]).
    pub const NET: u64 = 1 << 4;
    /// Every block bit version 1.0 defines.
    pub const ALL: u64 = FUA | DISCARD | WRITE_ZEROES | GET_ID;
}

/// Request flag bits.
pub mod flags {
    /// Write through to stable storage before completing (Write, WriteZeroes).
    pub const FUA: u32 = 1 << 0;
    /// WriteZeroes may deallocate the range.
    pub const UNMAP: u32 = 1 << 1;
}

/// What a request asks for. Values 0x100..=0x1FF are reserved for network queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    /// Read `len` bytes at `sector` into the slot.
    Read = 0,
    /// Write `len` bytes from the slot at `sector`.
    Write = 1,
    /// Make all completed writes durable. No slot, `len` 0.
    Flush = 2,
    /// Discard `len` bytes at `sector`. No slot.
    Discard = 3,
    /// Zero `len` bytes at `sector`. No slot.
    WriteZeroes = 4,
    /// Put the device id string (up to `len` bytes) into the slot.
    GetId = 5,
    /// Network: send the frame of `len` bytes in the slot (a 12-byte virtio-net header, then
    /// the Ethernet frame). Completes once the driver VM took it (`len` 0).
    NetTx = 0x100,
    /// Network: a receive buffer of `len` bytes (the slot). Completes when a frame arrived,
    /// with `len` = bytes written (12-byte virtio-net header, then the frame).
    NetRx = 0x101,
}

impl Opcode {
    /// Decodes a wire value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Flush,
            3 => Self::Discard,
            4 => Self::WriteZeroes,
            5 => Self::GetId,
            0x100 => Self::NetTx,
            0x101 => Self::NetRx,
            _ => return None,
        })
    }

    /// Whether the request moves data through a slot (and so must name one).
    pub fn uses_slot(self) -> bool {
        matches!(
            self,
            Self::Read | Self::Write | Self::GetId | Self::NetTx | Self::NetRx
        )
    }

    /// Whether the client puts the request's data into the slot (and so must supply it).
    pub fn carries_data(self) -> bool {
        matches!(self, Self::Write | Self::NetTx)
    }

    /// Flag bits valid with this opcode.
    pub fn allowed_flags(self) -> u32 {
        match self {
            Self::Write => flags::FUA,
            Self::WriteZeroes => flags::FUA | flags::UNMAP,
            _ => 0,
        }
    }
}

/// Outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Done; `len` bytes transferred.
    Ok = 0,
    /// The device failed the request.
    IoErr = 1,
    /// The agent does not implement the request.
    Unsupported = 2,
}

impl Status {
    /// Decodes a wire value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Ok,
            1 => Self::IoErr,
            2 => Self::Unsupported,
            _ => return None,
        })
    }
}

/// Where everything is, computed from the three sizes. Both sides compute it the same way; the
/// client also writes the offsets into the header and the agent checks they agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Entries per ring (power of two).
    pub ring_entries: u32,
    /// Number of data slots (power of two).
    pub slot_count: u32,
    /// Bytes per slot (multiple of 4 KiB).
    pub slot_size: u32,
    /// Offset of the request ring.
    pub req_ring: usize,
    /// Offset of the completion ring.
    pub cmp_ring: usize,
    /// Offset of slot 0.
    pub slots: usize,
    /// Total bytes used, from offset 0.
    pub total: usize,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

impl Layout {
    /// Validates the sizes and computes the offsets. Never panics, whatever the inputs.
    pub fn new(ring_entries: u32, slot_count: u32, slot_size: u32) -> Result<Self, RingError> {
        if !ring_entries.is_power_of_two() || ring_entries > MAX_RING_ENTRIES {
            return Err(RingError::BadLayout(
                "ring entries not a power of two in range",
            ));
        }
        if !slot_count.is_power_of_two() || slot_count > MAX_SLOT_COUNT {
            return Err(RingError::BadLayout(
                "slot count not a power of two in range",
            ));
        }
        if slot_size == 0 || slot_size % SLOT_SIZE_ALIGN != 0 || slot_size > MAX_SLOT_SIZE {
            return Err(RingError::BadLayout(
                "slot size not a multiple of 4 KiB in range",
            ));
        }
        let ring_bytes = u64::from(ring_entries) * ENTRY_SIZE as u64;
        let req_ring = HEADER_SIZE as u64;
        let cmp_ring = align_up(req_ring + ring_bytes, AREA_ALIGN);
        let slots = cmp_ring.and_then(|c| align_up(c + ring_bytes, AREA_ALIGN));
        let total = slots.and_then(|s| s.checked_add(u64::from(slot_count) * u64::from(slot_size)));
        let (Some(cmp_ring), Some(slots), Some(total)) = (cmp_ring, slots, total) else {
            return Err(RingError::BadLayout("sizes overflow"));
        };
        let conv = |v: u64| usize::try_from(v).map_err(|_| RingError::BadLayout("sizes overflow"));
        Ok(Self {
            ring_entries,
            slot_count,
            slot_size,
            req_ring: conv(req_ring)?,
            cmp_ring: conv(cmp_ring)?,
            slots: conv(slots)?,
            total: conv(total)?,
        })
    }

    /// Index mask of both rings.
    pub fn mask(&self) -> u32 {
        self.ring_entries - 1
    }

    /// Offset of request entry `index` (free-running; masked here).
    pub fn req_entry(&self, index: u32) -> usize {
        self.req_ring + (index & self.mask()) as usize * ENTRY_SIZE
    }

    /// Offset of completion entry `index` (free-running; masked here).
    pub fn cmp_entry(&self, index: u32) -> usize {
        self.cmp_ring + (index & self.mask()) as usize * ENTRY_SIZE
    }

    /// Offset of `offset` within `slot`, if `len` bytes from there stay within the slot.
    pub fn slot_range(&self, slot: u32, offset: usize, len: usize) -> Result<usize, RingError> {
        let end = offset.checked_add(len);
        if slot >= self.slot_count || end.is_none_or(|e| e > self.slot_size as usize) {
            return Err(RingError::SlotRange { slot, offset, len });
        }
        Ok(self.slots + slot as usize * self.slot_size as usize + offset)
    }

    /// Structural check of a request, shared by both sides: opcode known, flags allowed for it,
    /// slot present exactly when the opcode moves data, data length within one slot.
    pub fn check_request(&self, e: &RawRequest) -> Result<RequestEntry, RingError> {
        let bad = |reason| RingError::InvalidRequest { id: e.id, reason };
        let op = Opcode::from_raw(e.opcode).ok_or(bad("unknown opcode"))?;
        if e.flags & !op.allowed_flags() != 0 {
            return Err(bad("flags not allowed"));
        }
        let slot = if op.uses_slot() {
            if e.slot >= self.slot_count {
                return Err(bad("slot out of range"));
            }
            if e.len > self.slot_size {
                return Err(bad("length exceeds slot"));
            }
            Some(e.slot)
        } else {
            if e.slot != NO_SLOT {
                return Err(bad("slot given to a dataless request"));
            }
            if op == Opcode::Flush && e.len != 0 {
                return Err(bad("flush with a length"));
            }
            None
        };
        Ok(RequestEntry {
            id: e.id,
            op,
            flags: e.flags,
            sector: e.sector,
            len: e.len,
            slot,
        })
    }
}

/// A request as it appears on the wire, undecoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRequest {
    /// Chosen by the client; echoed in the completion.
    pub id: u64,
    /// [`Opcode`] value.
    pub opcode: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// Start, in 512-byte sectors.
    pub sector: u64,
    /// Bytes.
    pub len: u32,
    /// Data slot index, or [`NO_SLOT`].
    pub slot: u32,
}

/// A validated request, as the agent receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEntry {
    /// Chosen by the client; echo it in the completion.
    pub id: u64,
    /// What to do.
    pub op: Opcode,
    /// [`flags`] bits, valid for `op`.
    pub flags: u32,
    /// Start, in 512-byte sectors.
    pub sector: u64,
    /// Bytes (at most the slot size when `slot` is set).
    pub len: u32,
    /// The data slot, for opcodes that move data.
    pub slot: Option<u32>,
}

/// A completion as it appears on the wire, undecoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCompletion {
    /// Id of the request.
    pub id: u64,
    /// Generation the agent serves.
    pub generation: u64,
    /// [`Status`] value.
    pub status: u32,
    /// Bytes done.
    pub len: u32,
}

// Entry field offsets.
const E_ID: usize = 0x00;
const E_OPCODE: usize = 0x08;
const E_FLAGS: usize = 0x0C;
const E_SECTOR: usize = 0x10;
const E_LEN: usize = 0x18;
const E_SLOT: usize = 0x1C;
const C_ID: usize = 0x00;
const C_GENERATION: usize = 0x08;
const C_STATUS: usize = 0x10;
const C_LEN: usize = 0x14;
const C_RESERVED: usize = 0x18;

impl RawRequest {
    /// Reads the entry at byte offset `at`. Relaxed: the caller orders it after the producer
    /// index with an Acquire load.
    pub fn load(r: &impl SharedRegion, at: usize) -> Result<Self, RingError> {
        Ok(Self {
            id: r.load_u64(at + E_ID, Load::Relaxed)?,
            opcode: r.load_u32(at + E_OPCODE, Load::Relaxed)?,
            flags: r.load_u32(at + E_FLAGS, Load::Relaxed)?,
            sector: r.load_u64(at + E_SECTOR, Load::Relaxed)?,
            len: r.load_u32(at + E_LEN, Load::Relaxed)?,
            slot: r.load_u32(at + E_SLOT, Load::Relaxed)?,
        })
    }

    /// Writes the entry at byte offset `at`. Relaxed: the caller publishes it with a Release
    /// store of the producer index.
    pub fn store(&self, r: &impl SharedRegion, at: usize) -> Result<(), RingError> {
        r.store_u64(at + E_ID, self.id, Store::Relaxed)?;
        r.store_u32(at + E_OPCODE, self.opcode, Store::Relaxed)?;
        r.store_u32(at + E_FLAGS, self.flags, Store::Relaxed)?;
        r.store_u64(at + E_SECTOR, self.sector, Store::Relaxed)?;
        r.store_u32(at + E_LEN, self.len, Store::Relaxed)?;
        r.store_u32(at + E_SLOT, self.slot, Store::Relaxed)
    }
}

impl RawCompletion {
    /// Reads the entry at byte offset `at` (Relaxed, like [`RawRequest::load`]).
    pub fn load(r: &impl SharedRegion, at: usize) -> Result<Self, RingError> {
        Ok(Self {
            id: r.load_u64(at + C_ID, Load::Relaxed)?,
            generation: r.load_u64(at + C_GENERATION, Load::Relaxed)?,
            status: r.load_u32(at + C_STATUS, Load::Relaxed)?,
            len: r.load_u32(at + C_LEN, Load::Relaxed)?,
        })
    }

    /// Writes the entry at byte offset `at` (Relaxed, like [`RawRequest::store`]).
    pub fn store(&self, r: &impl SharedRegion, at: usize) -> Result<(), RingError> {
        r.store_u64(at + C_ID, self.id, Store::Relaxed)?;
        r.store_u64(at + C_GENERATION, self.generation, Store::Relaxed)?;
        r.store_u32(at + C_STATUS, self.status, Store::Relaxed)?;
        r.store_u32(at + C_LEN, self.len, Store::Relaxed)?;
        r.store_u64(at + C_RESERVED, 0, Store::Relaxed)
    }
}

/// virtio's `vring_need_event` on free-running u32 indices: whether moving the producer index
/// from `old` to `new` passed `event` (i.e. `event` lies in `[old, new)`, modulo 2^32).
pub fn need_event(event: u32, new: u32, old: u32) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets() {
        let l = Layout::new(128, 128, 128 << 10).unwrap();
        assert_eq!(l.req_ring, 0x1000);
        assert_eq!(l.cmp_ring, 0x2000);
        assert_eq!(l.slots, 0x3000);
        assert_eq!(l.total, 0x3000 + (16 << 20));
        let l = Layout::new(1, 1, 4096).unwrap();
        assert_eq!(
            (l.req_ring, l.cmp_ring, l.slots, l.total),
            (0x1000, 0x2000, 0x3000, 0x4000)
        );
    }

    #[test]
    fn layout_rejects() {
        for (e, c, s) in [
            (0, 1, 4096),
            (3, 1, 4096),
            (MAX_RING_ENTRIES * 2, 1, 4096),
            (1, 0, 4096),
            (1, 6, 4096),
            (1, 1, 0),
            (1, 1, 4095),
            (1, 1, MAX_SLOT_SIZE + 4096),
            (u32::MAX, u32::MAX, u32::MAX),
        ] {
            assert!(Layout::new(e, c, s).is_err(), "{e} {c} {s}");
        }
    }

    #[test]
    fn need_event_matches_virtio() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(u32::MAX, 2, u32::MAX - 1));
        assert!(!need_event(3, 3, 3));
    }
}
