//! What crosses the VM boundary between client VMs and driver VMs: the shared-memory ring
//! protocol, the client-side device frontends whose backend is a ring, the in-flight journal
//! that makes driver-VM restarts transparent, and the in-guest translation agent.
//!
//! Here: [`ring`], the versioned shared-memory layout and protocol; [`journal`], the in-flight
//! journal (replay, exactly-once, poison isolation) that every ring frontend uses; [`channel`],
//! the register block of the channel device; and the agent binary (`src/bin/ddvmm-agent`).
//!
//! The frontends themselves (the virtio-blk and virtio-net device models whose backend is a
//! ring) live in the `vmm` crate, next to the virtio transport they plug into:
//! `vmm/src/devices/virtio/ring/` is the one core both use (worker loop, journal, replay and
//! quarantine control), `vmm/src/devices/virtio/{block,net}/ring_frontend.rs` the per-device
//! parts. See `ARCHITECTURE.md` for the rest of the design this crate implements.

pub mod channel;
pub mod journal;
pub mod ring;
