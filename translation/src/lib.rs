//! What crosses the VM boundary between client VMs and driver VMs: the shared-memory ring
//! protocol, the client-side device frontends whose backend is a ring, the in-flight journal
//! that makes driver-VM restarts transparent, and the in-guest translation agent.
//!
//! So far: [`ring`], the versioned shared-memory layout and protocol; [`channel`], the register
//! block of the channel device; and the agent binary (`src/bin/ddvmm-agent`). See
//! `ARCHITECTURE.md` for the rest of the design this crate implements.

pub mod channel;
pub mod ring;
