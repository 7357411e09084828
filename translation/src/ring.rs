//! The shared-memory ring protocol between a client VMM process and the translation agent in a
//! driver VM, version 1.0.
//!
//! One memory region is shared: a memfd mapped by the client VMM process, exposed to the driver
//! VM as a PCI BAR that the agent maps through sysfs `resourceN`. The client submits requests on
//! the *request ring*; the agent answers on the *completion ring*. Data crosses only through
//! *slots* (bounce buffers) in the region, so the driver VM never sees client memory. The driver
//! VM may be malicious, may crash at any point and may be replaced: **the client treats every
//! byte the agent can write as untrusted**, and the agent in turn does not trust the client's
//! bytes either (a hostile header gives an error, never undefined behaviour or a panic).
//!
//! # Layout
//!
//! All integers are little-endian; all fields are naturally aligned. `C` = written by the
//! client, `A` = written by the agent; each field has exactly one writer (except that
//! [`ClientRing::new_generation`] resets the agent fields while no agent is attached).
//!
//! Header page (offset 0, 4096 bytes; unlisted bytes reserved, zero):
//!
//! | offset  | size | field              | by | meaning                                            |
//! |---------|------|--------------------|----|----------------------------------------------------|
//! | `0x000` | 8    | `magic`            | C  | `b"DDVMRING"`, written last at creation            |
//! | `0x008` | 4    | `version_major`    | C  | 1; an agent refuses another major                  |
//! | `0x00C` | 4    | `version_minor`    | C  | 0; additions are gated by feature bits             |
//! | `0x010` | 8    | `client_features`  | C  | feature bits offered ([`features`])                |
//! | `0x018` | 8    | `agent_features`   | A  | offered bits the agent accepts                     |
//! | `0x020` | 8    | `generation`       | C  | bumped per attached driver VM; never 0             |
//! | `0x028` | 8    | `agent_generation` | A  | the generation the agent serves                    |
//! | `0x030` | 4    | `agent_state`      | A  | 0 not ready, 1 ready                               |
//! | `0x038` | 8    | `heartbeat`        | A  | incremented periodically by a live agent           |
//! | `0x040` | 4    | `ring_entries`     | C  | entries per ring, power of two, 1..=32768          |
//! | `0x044` | 4    | `slot_count`       | C  | data slots, power of two, 1..=65536                |
//! | `0x048` | 4    | `slot_size`        | C  | bytes per slot, multiple of 4096, ≤ 16 MiB         |
//! | `0x050` | 8    | `req_ring_offset`  | C  | = 0x1000                                           |
//! | `0x058` | 8    | `cmp_ring_offset`  | C  | = align4k(0x1000 + 32·ring_entries)                |
//! | `0x060` | 8    | `slots_offset`     | C  | = align4k(cmp_ring_offset + 32·ring_entries)       |
//! | `0x068` | 8    | `region_size`      | C  | = slots_offset + slot_count·slot_size (≤ BAR size) |
//! | `0x100` | 4    | `req_prod`         | C  | request producer index                             |
//! | `0x140` | 4    | `req_cons`         | A  | request consumer index                             |
//! | `0x180` | 4    | `req_event`        | A  | notify the agent when `req_prod` passes this       |
//! | `0x1C0` | 4    | `cmp_prod`         | A  | completion producer index                          |
//! | `0x200` | 4    | `cmp_cons`         | C  | completion consumer index                          |
//! | `0x240` | 4    | `cmp_event`        | C  | notify the client when `cmp_prod` passes this      |
//!
//! (Each index has its own 64-byte cache line.) The offsets are fixed by the three sizes; the
//! client writes them anyway so a reader can check its arithmetic, and the agent refuses a
//! header whose stated offsets disagree.
//!
//! Request entry (32 bytes, at `req_ring_offset + 32·(index mod ring_entries)`):
//!
//! | offset | size | field    | meaning                                                        |
//! |--------|------|----------|----------------------------------------------------------------|
//! | `0x00` | 8    | `id`     | chosen by the client, unique among its outstanding requests    |
//! | `0x08` | 4    | `opcode` | 0 read, 1 write, 2 flush, 3 discard, 4 write-zeroes, 5 get-id; |
//! |        |      |          | 0x100 net-tx, 0x101 net-rx (0x102..=0x1FF reserved, network)   |
//! | `0x0C` | 4    | `flags`  | bit 0 FUA (write, write-zeroes), bit 1 UNMAP (write-zeroes)    |
//! | `0x10` | 8    | `sector` | start in 512-byte sectors                                      |
//! | `0x18` | 4    | `len`    | bytes (read/write/get-id/net: ≤ `slot_size`; flush: 0)         |
//! | `0x1C` | 4    | `slot`   | data slot for read/write/get-id, else `0xFFFF_FFFF`            |
//!
//! Completion entry (32 bytes, at `cmp_ring_offset + 32·(index mod ring_entries)`):
//!
//! | offset | size | field        | meaning                                          |
//! |--------|------|--------------|--------------------------------------------------|
//! | `0x00` | 8    | `id`         | the request's id                                 |
//! | `0x08` | 8    | `generation` | the generation the agent serves                  |
//! | `0x10` | 4    | `status`     | 0 ok, 1 I/O error, 2 unsupported                 |
//! | `0x14` | 4    | `len`        | bytes done (read: valid bytes at slot start)     |
//! | `0x18` | 8    | reserved     | zero                                             |
//!
//! # Network channels
//!
//! A channel of kind net (see [`crate::channel`]) uses the same rings with two opcodes. The
//! slot of a `net-tx` request holds a 12-byte `virtio_net_hdr_v1` (the client guest's, so
//! checksum and segmentation offload requests pass through) followed by one Ethernet frame;
//! the agent completes it once the frame is handed to the driver VM's network stack (status 1
//! if it refused it). A `net-rx` request lends the agent its slot as a receive buffer: when a
//! frame for the client arrives, the agent writes a header (all zero: no offloads towards the
//! client) and the frame into the slot and completes the request with `len` = bytes written.
//! The client keeps a number of `net-rx` requests posted; they are outstanding for as long as
//! no frame arrives, so only `net-tx` requests count towards progress. On a new generation
//! both are replayed like block requests: transmits are sent again (at least once), receive
//! buffers are posted again. Flags are zero; `sector` is ignored (zero).
//!
//! Slot `i` occupies `slots_offset + i·slot_size .. + slot_size`. One request uses at most one
//! slot, so the largest request is `slot_size` bytes (frontends split larger ones).
//!
//! # Rings and ordering
//!
//! Indices are free-running u32 counters (wrapping), masked by `ring_entries - 1` to find the
//! entry. `prod - cons` (wrapping) is the fill level and must be `<= ring_entries`; a peer's
//! index that breaks this is an error ([`RingError::IndexCorrupt`]), never a reason to read
//! out of place. Each side keeps its own indices privately and only *writes* them to the region;
//! it only ever reads the peer's.
//!
//! A producer writes the entry (and, for the client, write data into the slot; for the agent,
//! read data into the slot) and then stores its producer index with **Release**. A consumer
//! loads the producer index with **Acquire**, then reads entries and slot data, then stores its
//! consumer index with Release, after which the producer may reuse those entries. On the host
//! these are ordinary atomics on the shared mapping; the agent uses the same on the BAR mapping
//! (x86: plain moves plus `mfence` for the SeqCst fences below).
//!
//! At most `ring_entries` requests are outstanding, so an honest agent can never find the
//! completion ring full. A slot is owned by the agent from submission until the client consumes
//! the request's completion; the client then holds it (to copy read data out) until it
//! releases it. The client never reuses a slot whose request is outstanding.
//!
//! # Notification suppression
//!
//! As virtio's `VIRTIO_F_EVENT_IDX`: each consumer publishes an event index ("notify me when
//! the producer index passes X": `req_event` by the agent, `cmp_event` by the client). After
//! publishing entries, a producer notifies only if moving its index from the value at its last
//! notification decision `old` to `new` passed the event, i.e. `(new - event - 1) < (new - old)`
//! in wrapping u32 arithmetic ([`need_event`]). A consumer that wants to sleep sets its event
//! index to its consumer index, issues a full (SeqCst) fence, and re-checks the producer index;
//! the producer fences between storing its index and loading the event index, so one of the two
//! always sees the other (no lost wakeup). While a consumer polls it simply does not re-arm, and
//! the producer stays quiet. Notifications themselves are out of band: client to agent is the
//! driver VM's irqfd, agent to client a doorbell register backed by an ioeventfd.
//!
//! # Generations and replay
//!
//! `generation` identifies the driver VM incarnation the ring currently talks to. When a driver
//! VM dies, the client stops it for good and calls [`ClientRing::new_generation`]: generation
//! incremented, agent fields reset (state, heartbeat, features, its indices set to the client's so the
//! rings are empty), ring memory zeroed, and the outstanding requests returned in submission
//! order. The caller replays them on the new generation, copying write data again from its
//! own memory (the old driver VM could have modified slot contents). The new agent attaches,
//! adopts the indices, and echoes the generation in `agent_generation` and in every completion;
//! anything carrying an older generation is a late completion and is discarded.
//!
//! # What is validated
//!
//! Client ([`ClientRing::poll_completions`]), for every completion: generation equals the
//! current one; id is outstanding (unknown and duplicate ids are dropped); status is defined;
//! `len` is at most the request's length. Failures are counted in [`ClientStats`] and the entry
//! is skipped; the request stays outstanding (to be replayed if the agent never answers
//! properly). Read data is copied out only from a slot the client holds, within the slot.
//! Sizes are never re-read from the region after creation.
//!
//! Agent ([`AgentRing::attach`], [`AgentRing::pop_request`]): magic, major version, sizes
//! (powers of two, limits, no overflow), stated offsets, region length, generation non-zero,
//! index distances; per request: opcode known, flags allowed for it, slot present exactly when
//! data moves and in range, length within a slot. Sizes are read once, at attach.
//!
//! Every region access is bounds- and alignment-checked by [`SharedRegion`]; no content of the
//! region can make either side panic.

mod agent;
mod client;
mod layout;
mod region;
#[cfg(test)]
mod tests;

pub use agent::{AgentRing, Completion};
pub use client::{
    AgentStatus, ClientRing, ClientStats, Completed, Corruption, Request, RingParams,
};
pub use layout::{
    features, flags, need_event, offsets, HeaderView, Layout, Opcode, RawCompletion, RawRequest,
    RequestEntry, Status, AGENT_NOT_READY, AGENT_READY, ENTRY_SIZE, HEADER_SIZE, MAGIC,
    MAX_RING_ENTRIES, MAX_SLOT_COUNT, MAX_SLOT_SIZE, NO_SLOT, SECTOR_SIZE, VERSION_MAJOR,
    VERSION_MINOR,
};
pub use region::{HeapRegion, Load, RawRegion, SharedRegion, Store};

/// Errors of ring operations. None of them is fatal to the process; most mean the peer
/// misbehaves or the caller misused the API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A region access outside the region.
    #[error("access {offset:#x}+{len:#x} outside region of {size:#x} bytes")]
    OutOfBounds {
        /// Start.
        offset: usize,
        /// Length.
        len: usize,
        /// Region size.
        size: usize,
    },
    /// A misaligned integer access (or region base).
    #[error("misaligned access at {offset:#x}")]
    Misaligned {
        /// Offending offset.
        offset: usize,
    },
    /// The region is smaller than the layout needs.
    #[error("region too small: need {need:#x} bytes, have {have:#x}")]
    RegionTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// No ring header (wrong magic).
    #[error("bad magic")]
    BadMagic,
    /// Unsupported protocol major version.
    #[error("unsupported protocol version {major}.{minor}")]
    Version {
        /// Major.
        major: u32,
        /// Minor.
        minor: u32,
    },
    /// Sizes or offsets in the header (or parameters) are invalid.
    #[error("bad layout: {0}")]
    BadLayout(&'static str),
    /// The peer's index is more than a ring away from ours.
    #[error("peer ring index corrupt")]
    IndexCorrupt,
    /// No room in the ring (or too many outstanding requests).
    #[error("ring full")]
    RingFull,
    /// Every data slot is in use.
    #[error("no free data slot")]
    NoFreeSlot,
    /// The id is already outstanding.
    #[error("request id {0} already outstanding")]
    DuplicateId(u64),
    /// A request that breaks the protocol rules.
    #[error("invalid request {id}: {reason}")]
    InvalidRequest {
        /// Its id (so it can be completed with an error status).
        id: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A slot access outside the slot area or the slot.
    #[error("slot {slot} range {offset:#x}+{len:#x} out of bounds")]
    SlotRange {
        /// Slot.
        slot: u32,
        /// Offset in the slot.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// The slot does not belong to a completed, unreleased request.
    #[error("slot {0} not held")]
    SlotNotHeld(u32),
    /// The data of request `0` could not be written into its slot (its source is gone).
    #[error("request {0}: its data could not be written into the slot")]
    FillFailed(u64),
}
