//! What a machine is built from: boot source, RAM, vCPUs, console, and its devices (local
//! disks and TAP NICs, ring disks and NICs served by driver VMs, channel devices of a driver
//! VM, passed-through host functions).

use std::path::PathBuf;

use crate::devices::channel::{ChannelFds, ChannelInfo};
use crate::vfio::PciAddress;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A log file (created, then truncated or appended to) that stops growing at `limit`
    /// bytes.
    File {
        /// The file.
        path: PathBuf,
        /// Its cap (`u64::MAX`: none).
        limit: u64,
        /// Append instead of truncating.
        append: bool,
    },
}

/// What the boot vCPU starts executing.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux bzImage entered through the 64-bit boot protocol.
    Linux {
        /// bzImage to boot.
        kernel: PathBuf,
        /// Optional initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// A flat real-mode binary loaded at `load_addr` and entered there with CS=0: for firmware-
    /// less test programs (the KVM-layer tests use it). The platform devices are the same.
    RealMode {
        /// The code.
        image: Vec<u8>,
        /// Guest-physical load and entry address (below 64 KiB).
        load_addr: u16,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Requests and bytes per second the disk may do (a slower device).
    pub limit: crate::devices::virtio::ring::RateLimit,
}

/// A virtio-net NIC backed by a TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name (created if missing).
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// The driver VM's end of a block channel: a channel device.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// What the agent is told.
    pub info: ChannelInfo,
    /// Shared memory and eventfds.
    pub fds: ChannelFds,
}

/// A client disk whose backend is a ring to a driver VM (virtio-blk in front).
#[derive(Debug, Clone)]
pub struct RingDiskConfig {
    /// Shared memory and eventfds.
    pub fds: ChannelFds,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Device id string the guest sees (virtio-blk get-id).
    pub id: String,
    /// Ring generation to start at (see `ClientRing::create_at`).
    pub generation: u64,
    /// Requests and bytes per second the disk may use.
    pub limit: crate::devices::virtio::ring::RateLimit,
}

/// A client NIC whose backend is a ring to a driver VM (virtio-net in front).
#[derive(Debug, Clone)]
pub struct RingNetConfig {
    /// Shared memory and eventfds.
    pub fds: ChannelFds,
    /// The guest's MAC address (and the only source address its frames may carry).
    pub mac: [u8; 6],
    /// Ring generation to start at (see `ClientRing::create_at`).
    pub generation: u64,
}

/// What to boot and on what virtual hardware.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-blk disks served by a driver VM over a ring, after the local disks.
    pub ring_disks: Vec<RingDiskConfig>,
    /// virtio-net NICs, after the disks.
    pub nets: Vec<NetConfig>,
    /// virtio-net NICs served by a driver VM over a ring, after the TAP NICs.
    pub ring_nets: Vec<RingNetConfig>,
    /// Channel devices (driver VMs), after the NICs.
    pub channels: Vec<ChannelConfig>,
    /// Host PCI functions given to the guest through VFIO, after the channels.
    pub passthrough: Vec<PciAddress>,
    /// What to run.
    pub boot: BootSource,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Serial console destination.
    pub console: ConsoleOutput,
    /// Path of the KVM device.
    pub kvm_device: PathBuf,
    /// Snapshot template to make, or snapshot to restore.
    pub snapshot: SnapshotMode,
}

impl MachineConfig {
    /// A machine with `vcpus` vCPUs and `mem_size` bytes of RAM running `boot`, its console in
    /// `console`, no devices beyond the platform's, `/dev/kvm`, no snapshot.
    pub fn new(boot: BootSource, mem_size: u64, vcpus: u32, console: ConsoleOutput) -> Self {
        MachineConfig {
            disks: Vec::new(),
            ring_disks: Vec::new(),
            nets: Vec::new(),
            ring_nets: Vec::new(),
            channels: Vec::new(),
            passthrough: Vec::new(),
            boot,
            mem_size,
            vcpus,
            console,
            kvm_device: PathBuf::from("/dev/kvm"),
            snapshot: SnapshotMode::None,
        }
    }
}

/// Whether a machine makes a snapshot or starts from one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Neither.
    #[default]
    None,
    /// Boot, and write a snapshot into this directory when every channel's agent is parked
    /// at its gate (the gates stay shut until then), or when asked
    /// ([`super::Machine::snapshot_trigger`]).
    TemplateTo(PathBuf),
    /// Start from the snapshot in this directory instead of booting.
    Restore(PathBuf),
}
