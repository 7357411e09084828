//! What crosses the VM boundary between client VMs and driver VMs: the shared-memory ring
//! protocol, the client-side device frontends whose backend is a ring, the in-flight journal
//! that makes driver-VM restarts transparent, and the in-guest translation agent.
//!
//! This crate is deliberately empty until the ring protocol lands (issue "Driver VMs serve block
//! devices to client VMs"); see `ARCHITECTURE.md` for the design it will implement.
