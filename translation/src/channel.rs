//! The channel device's register block (BAR 0), as both sides see it: the driver VM's VMM
//! implements it (`ddvmm::devices::channel`), the agent reads it. Version 1.
//!
//! All registers are little-endian and read-only except the doorbell and the gate. They come
//! from the daemon's configuration through the driver VM's VMM, never from the client.
//!
//! **The gate** (version 2): once set up (devices open, BARs mapped), the agent writes
//! [`regs::GATE`] ("parked: ready, not attached to any ring") and waits until it reads 1
//! before attaching. A VMM making a snapshot template keeps the gate shut until the snapshot
//! is taken, so the template holds a driver VM that is ready but has served nobody. Every VMM
//! process puts fresh random bytes in [`regs::ENTROPY`]; the agent feeds them to the kernel's
//! RNG and reseeds it when the gate opens, so driver VMs restored from one template do not
//! share random state.
//!
//! **Vacant slots** (version 3): a driver VM can have channel devices that serve nobody yet
//! ([`KIND_VACANT`]: only `MAGIC`, `VERSION`, `INDEX`, `MEM_SIZE`, `GATE` and `ENTROPY` mean
//! anything), so that the daemon can add a client at runtime without a new PCI device. A slot's
//! agent parks at the gate, then waits for its interrupt and reads `KIND` again: the VMM fills
//! the registers, then interrupts. To take a channel back, the VMM first makes the registers
//! vacant, then requests [`fault::DETACH`] (with an interrupt); the agent stops serving the
//! channel, lets go of its backend and memory, writes [`regs::DETACHED`] and waits for the next
//! assignment. The channel memory and both eventfds stay wired to the slot throughout: the
//! daemon wipes the memory before it gives the slot to another client.

/// PCI vendor id (Red Hat's, as used for paravirtual devices; the device id is ours).
pub const VENDOR: u16 = 0x1b36;
/// PCI device id of a ddvmm channel.
pub const DEVICE: u16 = 0x11dd;
/// Size of the register BAR.
pub const REGS_SIZE: u64 = 0x1000;
/// Value of [`regs::MAGIC`]: `"DDCH"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DDCH");
/// Register layout version.
pub const VERSION: u32 = 3;
/// Bytes of [`regs::ENTROPY`].
pub const ENTROPY_LEN: usize = 32;
/// [`regs::KIND`] of a vacant slot: no client yet (see the module docs).
pub const KIND_VACANT: u32 = 0;
/// [`regs::KIND`] of a block channel.
pub const KIND_BLOCK: u32 = 1;
/// [`regs::KIND`] of a network channel: `BACKEND` names the driver VM's uplink interface (the
/// NIC it owns, e.g. `eth0`), `MAC` the client's address; the window registers are zero.
pub const KIND_NET: u32 = 2;
/// Bit 0 of [`regs::FLAGS`]: the window is read-only.
pub const FLAG_READ_ONLY: u32 = 1;
/// [`regs::WEIGHT`] when the configuration names none (a zero register reads as this too).
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest [`regs::WEIGHT`].
pub const MAX_WEIGHT: u32 = 10_000;
/// Longest backend path, NUL padding included.
pub const BACKEND_LEN: usize = 64;

/// Values of [`regs::FAULT`]: what the agent must do to its own driver VM.
pub mod fault {
    /// Nothing requested.
    pub const NONE: u32 = 0;
    /// Panic the driver VM's kernel (`sysrq c`).
    pub const PANIC: u32 = 1;
    /// Stop serving and stop the heartbeat, forever.
    pub const HANG: u32 = 2;
    /// Publish garbage into the completion ring.
    pub const CORRUPT: u32 = 3;
    /// Reboot the driver VM's kernel at once (`sysrq b`).
    pub const RESET: u32 = 4;
    /// Store a completion producer index more than a ring ahead (a broken ring).
    pub const BAD_INDEX: u32 = 5;
    /// Not a fault: the channel is taken back (its registers already read vacant). Stop
    /// serving it, release what it used, write [`super::regs::DETACHED`], wait for the next
    /// assignment.
    pub const DETACH: u32 = 6;
}

/// Register offsets in BAR 0.
pub mod regs {
    /// Write any 32-bit value: notify the client (an ioeventfd in the driver VM's VMM).
    pub const DOORBELL: u64 = 0x00;
    /// [`super::MAGIC`].
    pub const MAGIC: u64 = 0x08;
    /// [`super::VERSION`].
    pub const VERSION: u64 = 0x0c;
    /// Channel kind ([`super::KIND_BLOCK`], [`super::KIND_NET`]).
    pub const KIND: u64 = 0x10;
    /// Channel index within this driver VM.
    pub const INDEX: u64 = 0x14;
    /// First sector of the window on the backend device (u64).
    pub const START: u64 = 0x18;
    /// Sectors in the window (u64).
    pub const SECTORS: u64 = 0x20;
    /// [`super::FLAG_READ_ONLY`].
    pub const FLAGS: u64 = 0x28;
    /// Size in bytes of the channel memory, BAR 2 (u64).
    pub const MEM_SIZE: u64 = 0x30;
    /// Fault request (u32, read clears it): one of the [`super::fault`] codes, set by the
    /// daemon through the driver VM's VMM to make the agent fail on purpose (fault injection).
    pub const FAULT: u64 = 0x38;
    /// Backend block device path (block) or uplink interface name (net) in the driver VM,
    /// NUL-padded ([`super::BACKEND_LEN`] bytes).
    pub const BACKEND: u64 = 0x40;
    /// Net: the client's MAC address in the low 6 bytes (u64, byte 0 first on the wire).
    pub const MAC: u64 = BACKEND + super::BACKEND_LEN as u64;
    /// Read: 1 when the agent may attach to its ring, 0 while it must wait (u32). Write any
    /// value: the agent is parked at the gate.
    pub const GATE: u64 = MAC + 8;
    /// Fresh random bytes from the host ([`super::ENTROPY_LEN`]), new in every VMM process.
    pub const ENTROPY: u64 = GATE + 8;
    /// The channel's share of its backend device against the driver VM's other channels on
    /// it (u32, 1..=[`super::MAX_WEIGHT`]; 0 reads as [`super::DEFAULT_WEIGHT`]).
    pub const WEIGHT: u64 = ENTROPY + super::ENTROPY_LEN as u64;
    /// Write any value: the agent let go of a channel after a [`super::fault::DETACH`].
    pub const DETACHED: u64 = WEIGHT + 4;
    /// End of the defined registers.
    pub const END: u64 = DETACHED + 4;
}
