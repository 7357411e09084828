//! The channel device: the driver VM's end of a client-to-driver-VM channel.
//!
//! A PCI function (vendor [`VENDOR`], device [`DEVICE`], class "other memory controller") with:
//!
//! - **BAR 0**, 4 KiB of registers ([`regs`]): the doorbell the agent writes to notify the
//!   client (an *ioeventfd*: KVM signals the eventfd in the kernel, this process never sees the
//!   write), and read-only facts the driver VM's agent needs: which of its block devices serves
//!   this channel, the sector window it may touch, and whether it is read-only. They come from
//!   the daemon's configuration, never from the client, so a client cannot widen its window.
//! - **BAR 2**, the channel memory: a memfd shared with the client VMM process, mapped into the
//!   guest as a KVM memory slot (64-bit prefetchable BAR). The agent maps it through sysfs
//!   `resource2`. Its content is the ring protocol of `ddvmm_translation::ring`.
//! - **INTx** (pin A, routed by the DSDT's `_PRT` to an IOAPIC pin): the client's notification.
//!   The client VMM writes an eventfd that is this VM's *irqfd* with a resample eventfd, so KVM
//!   raises a level-triggered line and lowers it at the guest's EOI. `uio_pci_generic` in the
//!   guest masks it with the command register's INTx-disable bit and the agent re-enables it
//!   through the function's sysfs `config` (the stock driver has no `irqcontrol`; `/dev/uioN`
//!   only counts interrupts). The status register's interrupt bit reads as set while INTx is
//!   enabled: the line is exclusive to this device, and the ring's notification suppression
//!   (the agent arms its event index only before it sleeps) keeps interrupts rare.
//!
//! **Slots.** The device is a slot: the daemon can leave it vacant at boot
//! ([`ChannelKind::Vacant`]) and fill or empty it while the guest runs ([`ChannelSlot`]), so
//! clients come and go without a new PCI function. The memory and both eventfds stay wired
//! across assignments (the daemon owns them and wipes the memory between clients).
//!
//! This process is not on the data path: after setup the guest's loads and stores go to shared
//! memory and both notifications are eventfds handled inside KVM. It does see the two
//! configuration-space accesses per delivered interrupt (the handler's status read, the
//! agent's unmask); the ring's notification suppression keeps those to one per agent sleep.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::slots::MemorySlots;

use crate::devices::pci::config::{self, MemoryBar, PciConfig, PciIdentity};
use crate::devices::pci::PciDevice;

pub use ddvmm_translation::channel::{
    fault, regs, BACKEND_LEN, DEFAULT_WEIGHT, DEVICE, ENTROPY_LEN, FLAG_READ_ONLY, KIND_BLOCK,
    KIND_NET, KIND_VACANT, MAGIC, MAX_WEIGHT, REGS_SIZE, VENDOR, VERSION,
};

/// Called with the channel's index when its agent parks at the gate.
pub type ParkNotifier = Arc<dyn Fn(u32) + Send + Sync>;

/// A channel's gate ([`regs::GATE`]), shared by the device and the machine: the machine shuts
/// it while it makes a snapshot template and learns from it when the agent is parked.
pub struct ChannelGate {
    index: u32,
    open: AtomicBool,
    parked: AtomicBool,
    /// The agent has read the gate open (logged once: a step of a restart's timeline).
    passed: AtomicBool,
    notify: ParkNotifier,
}

impl ChannelGate {
    /// A gate, open or shut, that calls `notify` when the agent parks.
    pub fn new(index: u32, open: bool, notify: ParkNotifier) -> Arc<Self> {
        Arc::new(ChannelGate {
            index,
            open: AtomicBool::new(open),
            parked: AtomicBool::new(false),
            passed: AtomicBool::new(false),
            notify,
        })
    }

    /// Lets the agent attach.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Whether the agent announced itself parked.
    pub fn parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }
}

/// Status register bit: INTx asserted.
const STATUS_INTERRUPT: u8 = 1 << 3;
/// Command register bit: INTx disabled.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// What the driver VM is told about one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Index within the driver VM.
    pub index: u32,
    /// Block: the device in the driver VM that serves the channel (e.g. `/dev/vda`). Net: the
    /// driver VM's uplink interface the client's port is bridged with (e.g. `eth0`).
    pub backend: String,
    /// What the channel carries.
    pub kind: ChannelKind,
    /// Its share of the backend against the driver VM's other channels ([`regs::WEIGHT`]).
    pub weight: u32,
}

/// A block window or a network port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// A window of the backend block device.
    Block {
        /// First sector of the client's window.
        start_sector: u64,
        /// Sectors in the window.
        sectors: u64,
        /// Refuse writes.
        read_only: bool,
    },
    /// A port on the driver VM's bridge for one client NIC.
    Net {
        /// The client's MAC address: the only source address its frames may carry.
        mac: [u8; 6],
    },
    /// No client yet: a slot the daemon can fill at runtime.
    Vacant,
}

impl ChannelInfo {
    /// Parses the description part of a `--channel` spec (or of a control request's
    /// assignment): `backend=/dev/vdX,start=SECTOR,sectors=N[,ro][,weight=W]`,
    /// `backend=UPLINK,mac=MAC[,weight=W]` or `vacant`. Checks it as [`ChannelDevice`] would.
    pub fn parse(index: u32, spec: &str) -> Result<Self, ChannelError> {
        let bad = |why: String| ChannelError::BadSpec(spec.to_string(), why);
        let mut values = std::collections::BTreeMap::new();
        let mut flags = Vec::new();
        for part in spec.split(',') {
            match part.split_once('=') {
                Some((k, v)) if ["backend", "start", "sectors", "mac", "weight"].contains(&k) => {
                    if values.insert(k, v).is_some() {
                        return Err(bad(format!("'{k}' given twice")));
                    }
                }
                None if ["ro", "vacant"].contains(&part) => flags.push(part),
                _ => return Err(bad(format!("unknown option '{part}'"))),
            }
        }
        let get = |k: &str| {
            values
                .get(k)
                .copied()
                .ok_or_else(|| bad(format!("missing {k}=")))
        };
        let num = |k: &str| -> Result<u64, ChannelError> {
            let v = get(k)?;
            v.parse()
                .map_err(|_| bad(format!("{k}={v} is not a number")))
        };
        let weight = match values.get("weight") {
            None => DEFAULT_WEIGHT,
            Some(w) => w
                .parse()
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .ok_or_else(|| bad(format!("weight={w} is outside 1..={MAX_WEIGHT}")))?,
        };
        let info = if flags.contains(&"vacant") {
            if !values.is_empty() || flags.len() > 1 {
                return Err(bad("a vacant slot takes no other option".into()));
            }
            ChannelInfo {
                index,
                backend: String::new(),
                kind: ChannelKind::Vacant,
                weight,
            }
        } else {
            let kind = match values.get("mac") {
                Some(mac) => ChannelKind::Net {
                    mac: crate::devices::virtio::net::parse_mac(mac)
                        .ok_or_else(|| bad(format!("bad mac={mac}")))?,
                },
                None => ChannelKind::Block {
                    start_sector: num("start")?,
                    sectors: num("sectors")?,
                    read_only: flags.contains(&"ro"),
                },
            };
            ChannelInfo {
                index,
                backend: get("backend")?.to_string(),
                kind,
                weight,
            }
        };
        info.check()?;
        Ok(info)
    }

    /// Checks what the agent will be told: an absolute device path or an interface name, a
    /// window that neither is empty nor overflows.
    fn check(&self) -> Result<(), ChannelError> {
        match self.kind {
            ChannelKind::Block {
                start_sector,
                sectors,
                ..
            } => {
                if !self.backend.starts_with('/') || self.backend.len() >= BACKEND_LEN {
                    return Err(ChannelError::BadBackend(self.backend.clone()));
                }
                if sectors == 0 || start_sector.checked_add(sectors).is_none() {
                    return Err(ChannelError::BadWindow {
                        start: start_sector,
                        sectors,
                    });
                }
            }
            ChannelKind::Net { .. } => {
                let ok = (1..libc::IFNAMSIZ).contains(&self.backend.len())
                    && self
                        .backend
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
                if !ok {
                    return Err(ChannelError::BadUplink(self.backend.clone()));
                }
            }
            ChannelKind::Vacant => {}
        }
        Ok(())
    }

    /// The registers that describe this channel in a slot of `mem_size` bytes (all but the
    /// gate, the fault request and the entropy).
    fn registers(&self, mem_size: u64) -> Registers {
        let mut r = [0u8; regs::END as usize];
        let mut put = |at: u64, bytes: &[u8]| {
            r[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(regs::MAGIC, &MAGIC.to_le_bytes());
        put(regs::VERSION, &VERSION.to_le_bytes());
        put(regs::INDEX, &self.index.to_le_bytes());
        put(regs::MEM_SIZE, &mem_size.to_le_bytes());
        let kind = match self.kind {
            ChannelKind::Block {
                start_sector,
                sectors,
                read_only,
            } => {
                put(regs::START, &start_sector.to_le_bytes());
                put(regs::SECTORS, &sectors.to_le_bytes());
                let flags = if read_only { FLAG_READ_ONLY } else { 0 };
                put(regs::FLAGS, &flags.to_le_bytes());
                KIND_BLOCK
            }
            ChannelKind::Net { mac } => {
                put(regs::MAC, &mac);
                KIND_NET
            }
            ChannelKind::Vacant => return r,
        };
        put(regs::KIND, &kind.to_le_bytes());
        put(regs::BACKEND, self.backend.as_bytes());
        put(regs::WEIGHT, &self.weight.to_le_bytes());
        r
    }
}

/// A channel device's register block.
type Registers = [u8; regs::END as usize];

/// How long [`ChannelSlot::vacate`] waits for the agent to let go.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The part of a channel device that changes while the guest runs, shared by the device and
/// the VMM's control thread: what the slot serves, the fault request, the agent's interrupt.
pub struct ChannelSlot {
    index: u32,
    mem_size: u64,
    regs: Mutex<Registers>,
    /// Pending fault request ([`regs::FAULT`]).
    fault: AtomicU32,
    /// Times the agent wrote [`regs::DETACHED`].
    detached: AtomicU32,
    /// The channel's interrupt into this VM (the client's kick).
    kick: Arc<EventFd>,
}

impl std::fmt::Debug for ChannelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSlot")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ChannelSlot {
    fn new(info: &ChannelInfo, mem_size: u64, kick: Arc<EventFd>) -> Result<Self, ChannelError> {
        info.check()?;
        if !mem_size.is_power_of_two() || mem_size < 0x1000 {
            return Err(ChannelError::BadMemorySize(mem_size));
        }
        let mut r = info.registers(mem_size);
        crate::snapshot::fill_random(
            &mut r[regs::ENTROPY as usize..regs::ENTROPY as usize + ENTROPY_LEN],
        );
        Ok(ChannelSlot {
            index: info.index,
            mem_size,
            regs: Mutex::new(r),
            fault: AtomicU32::new(fault::NONE),
            detached: AtomicU32::new(0),
            kick,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registers> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, info: &ChannelInfo) {
        let new = info.registers(self.mem_size);
        let mut r = self.lock();
        let entropy = regs::ENTROPY as usize..regs::ENTROPY as usize + ENTROPY_LEN;
        let kept: [u8; ENTROPY_LEN] = r[entropy.clone()].try_into().unwrap_or_default();
        *r = new;
        r[entropy].copy_from_slice(&kept);
    }

    /// Which slot this is.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the slot serves nobody.
    pub fn is_vacant(&self) -> bool {
        let r = self.lock();
        r[regs::KIND as usize..regs::KIND as usize + 4] == KIND_VACANT.to_le_bytes()
    }

    /// Gives the slot to a client: the registers now describe `info` (its index must be this
    /// slot's), and the agent is interrupted to read them.
    pub fn assign(&self, info: &ChannelInfo) -> Result<(), ChannelError> {
        info.check()?;
        if info.index != self.index || info.kind == ChannelKind::Vacant {
            return Err(ChannelError::BadSpec(
                format!("slot {}", info.index),
                format!("cannot be assigned to slot {}", self.index),
            ));
        }
        // A take-back the agent never saw is moot now.
        let _ = self.fault.compare_exchange(
            fault::DETACH,
            fault::NONE,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.set(info);
        self.interrupt();
        Ok(())
    }

    /// Takes the slot back: the registers read vacant, then the agent is asked to let go
    /// ([`fault::DETACH`]). Waits up to `timeout` for it to confirm; false if it did not (a
    /// hung agent: the memory is wiped anyway, and the driver VM is trusted with its device's
    /// data only, never with another client's).
    pub fn vacate(&self, timeout: Duration) -> bool {
        let before = self.detached.load(Ordering::Acquire);
        self.set(&ChannelInfo {
            index: self.index,
            backend: String::new(),
            kind: ChannelKind::Vacant,
            weight: DEFAULT_WEIGHT,
        });
        self.request_fault(fault::DETACH);
        let deadline = Instant::now() + timeout;
        while self.detached.load(Ordering::Acquire) == before {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Asks the agent to fail with `code` (or to detach) and interrupts it, so that a sleeping
    /// agent reads the request at once (a busy one reads it within its fault poll).
    pub fn request_fault(&self, code: u32) {
        self.fault.store(code, Ordering::Release);
        self.interrupt();
    }

    fn interrupt(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!(channel = self.index, error = %e, "interrupting the agent");
        }
    }
}

/// Errors describing a channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The backend path does not fit the register window or is not an absolute path.
    #[error("channel backend '{0}' must be an absolute path shorter than 64 bytes")]
    BadBackend(String),
    /// The uplink interface name is not a Linux interface name.
    #[error("channel uplink '{0}' must be an interface name of 1-15 bytes")]
    BadUplink(String),
    /// The window is empty or overflows.
    #[error("channel window {start}+{sectors} sectors is empty or overflows")]
    BadWindow {
        /// First sector.
        start: u64,
        /// Sector count.
        sectors: u64,
    },
    /// A channel description does not parse.
    #[error("channel '{0}': {1}")]
    BadSpec(String, String),
    /// The channel memory size is not a power of two of at least 4 KiB.
    #[error("channel memory of {0} bytes is not a power of two of at least 4 KiB")]
    BadMemorySize(u64),
    /// The PCI configuration could not be built.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Wiring the channel into KVM (doorbell, interrupt, memory slot) failed.
    #[error("{0} failed for a channel")]
    Wire(&'static str, #[source] std::io::Error),
    /// The shared memory cannot get a memory slot.
    #[error(transparent)]
    Slot(#[from] crate::kvm::KvmError),
}

/// What keeps a channel wired into KVM: the client's kick and the INTx resample eventfd, and
/// the line they drive (the memory mapping is held by the VM's [`MemorySlots`]).
pub struct ChannelWiring {
    kick: Arc<EventFd>,
    resample: EventFd,
    gsi: u32,
}

impl ChannelWiring {
    /// Connects the client's kick to the channel's INTx line (a level-triggered irqfd with a
    /// resample eventfd), so that a kick costs no exit to this process. Called once, when the
    /// VM starts running (after a snapshot's interrupt controller state is loaded), never at
    /// build: KVM hands each signal of an eventfd to the *first* irqfd registered on it (irqfds
    /// are exclusive waiters), so a VMM that is built but not running (a standby waiting to
    /// resume, a process not yet reaped) must not hold one, or it takes the kicks meant for the
    /// driver VM that runs. A kick already pending is injected at registration.
    pub fn connect_interrupt(&self, vm: &VmFd) -> Result<(), ChannelError> {
        vm.register_irqfd_with_resample(self.kick.as_ref(), &self.resample, self.gsi)
            .map_err(|e| ChannelError::Wire("KVM_IRQFD", e.into()))
    }
}

/// Wires a channel into the VM: the agent's doorbell register (BAR 0 at `regs_addr`) as an
/// ioeventfd signalling `fds.doorbell`, and the shared memory (BAR 2 at `mem_addr`) as a KVM
/// memory slot, so that neither costs an exit to this process. The client's kick is
/// connected to INTx line `gsi` when the VM runs ([`ChannelWiring::connect_interrupt`]).
pub fn wire(
    vm: &VmFd,
    slots: &mut MemorySlots,
    fds: &ChannelFds,
    regs_addr: u64,
    mem_addr: u64,
    gsi: u32,
) -> Result<ChannelWiring, ChannelError> {
    vm.register_ioevent(
        fds.doorbell.as_ref(),
        &IoEventAddress::Mmio(regs_addr + regs::DOORBELL),
        NoDatamatch,
    )
    .map_err(|e| ChannelError::Wire("KVM_IOEVENTFD", e.into()))?;
    let resample =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ChannelError::Wire("eventfd", e))?;
    let size = fds
        .memory_size()
        .map_err(|e| ChannelError::Wire("sizing channel memory", e))?;
    let len = usize::try_from(size).map_err(|_| ChannelError::BadMemorySize(size))?;
    let file = fds
        .memory
        .try_clone()
        .map_err(|e| ChannelError::Wire("dup of channel memory", e))?;
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len)
        .map_err(|e| ChannelError::Wire("mapping channel memory", std::io::Error::other(e)))?;
    slots.map("channel memory", mem_addr, Box::new(map))?;
    Ok(ChannelWiring {
        kick: fds.kick.clone(),
        resample,
        gsi,
    })
}

/// The PCI function. The shared memory itself is a KVM memory slot at the BAR 2 address
/// ([`wire`]); this object serves configuration space and the register BAR.
pub struct ChannelDevice {
    config: PciConfig,
    slot: Arc<ChannelSlot>,
    gate: Arc<ChannelGate>,
}

impl ChannelDevice {
    /// A channel with registers at `regs_addr` (32-bit BAR 0) and `mem_size` bytes of channel
    /// memory at `mem_addr` (64-bit BAR 2); `kick` interrupts its agent.
    pub fn new(
        info: &ChannelInfo,
        regs_addr: u64,
        mem_addr: u64,
        mem_size: u64,
        gate: Arc<ChannelGate>,
        kick: Arc<EventFd>,
    ) -> Result<Self, ChannelError> {
        let slot = Arc::new(ChannelSlot::new(info, mem_size, kick)?);
        let mut config = PciConfig::new(&PciIdentity {
            vendor: VENDOR,
            device: DEVICE,
            revision: 1,
            class: (0x05, 0x80, 0x00),
            subsystem_vendor: VENDOR,
            subsystem: DEVICE,
        });
        config.add_memory_bar(MemoryBar {
            index: 0,
            addr: regs_addr,
            size: REGS_SIZE,
            is_64bit: false,
            prefetchable: false,
        })?;
        config.add_memory_bar(MemoryBar {
            index: 2,
            addr: mem_addr,
            size: mem_size,
            is_64bit: true,
            prefetchable: true,
        })?;
        config.set_interrupt_pin(1);
        Ok(ChannelDevice { config, slot, gate })
    }

    /// The slot: what the daemon changes while the guest runs (assignment, fault requests).
    pub fn slot(&self) -> Arc<ChannelSlot> {
        self.slot.clone()
    }
}

impl PciDevice for ChannelDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        // Interrupt status (PCI 2.3): reported while INTx is enabled, see the module docs.
        let mut cmd = [0u8; 2];
        self.config.read(config::COMMAND, &mut cmd);
        if u16::from_le_bytes(cmd) & COMMAND_INTX_DISABLE == 0 {
            if let Some(i) = config::STATUS
                .checked_sub(offset)
                .filter(|i| *i < data.len())
            {
                data[i] |= STATUS_INTERRUPT;
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 && offset == regs::FAULT && data.len() == 4 {
            let code = self.slot.fault.swap(fault::NONE, Ordering::AcqRel);
            data.copy_from_slice(&code.to_le_bytes());
            return;
        }
        if bar == 0 && offset == regs::GATE && data.len() == 4 {
            let open = u32::from(self.gate.open.load(Ordering::Acquire));
            if open == 1 && !self.gate.passed.swap(true, Ordering::AcqRel) {
                tracing::info!(channel = self.gate.index, "agent passed the gate");
            }
            data.copy_from_slice(&open.to_le_bytes());
            return;
        }
        let r = self.slot.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = match (bar, offset.checked_add(i as u64)) {
                (0, Some(at)) if at < regs::END => r[at as usize],
                (0, _) => 0,
                _ => 0xff,
            };
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        if bar == 0 && offset == regs::GATE {
            if !self.gate.parked.swap(true, Ordering::AcqRel) {
                tracing::info!(channel = self.gate.index, "agent parked at the gate");
                (self.gate.notify)(self.gate.index);
            }
            return;
        }
        if bar == 0 && offset == regs::DETACHED {
            tracing::info!(channel = self.slot.index, "agent let go of the channel");
            self.slot.detached.fetch_add(1, Ordering::AcqRel);
            return;
        }
        // A doorbell write only lands here if the ioeventfd did not match (an odd width);
        // anything else is a read-only register.
        tracing::debug!(bar, offset, "ignored write to a channel register");
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.config
            .restore_regs(&crate::devices::pci::saved_config(state)?)
    }
}

/// The channel memory as the machine maps it: the memfd and its size.
pub struct ChannelMemory {
    /// Shared with the client VMM process.
    pub memfd: File,
    /// Bytes (a power of two; the BAR size).
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ChannelInfo {
        ChannelInfo {
            index: 3,
            backend: "/dev/vda".into(),
            kind: ChannelKind::Block {
                start_sector: 2048,
                sectors: 4096,
                read_only: false,
            },
            weight: 250,
        }
    }

    fn read(dev: &mut ChannelDevice, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        dev.bar_read(0, at, &mut b);
        b
    }

    #[test]
    fn registers_describe_the_channel() {
        let mut d = dev(&info(), 1 << 24, gate()).expect("dev");
        assert_eq!(read(&mut d, regs::MAGIC, 4), b"DDCH");
        assert_eq!(read(&mut d, regs::INDEX, 4), 3u32.to_le_bytes());
        assert_eq!(read(&mut d, regs::START, 8), 2048u64.to_le_bytes());
        assert_eq!(read(&mut d, regs::SECTORS, 8), 4096u64.to_le_bytes());
        assert_eq!(read(&mut d, regs::MEM_SIZE, 8), (1u64 << 24).to_le_bytes());
        assert_eq!(&read(&mut d, regs::BACKEND, 9)[..], b"/dev/vda\0");
        assert_eq!(read(&mut d, regs::WEIGHT, 4), 250u32.to_le_bytes());
        // Past the end and across it: zeroes, no panic.
        assert_eq!(read(&mut d, regs::END - 2, 4)[2..], [0, 0]);
        assert_eq!(read(&mut d, u64::MAX, 4), [0, 0, 0, 0]);
        d.bar_write(0, regs::MAGIC, &[0; 4]);
        assert_eq!(read(&mut d, regs::MAGIC, 4), b"DDCH");
    }

    #[test]
    fn net_registers_carry_uplink_and_mac() {
        let i = ChannelInfo {
            index: 1,
            backend: "eth0".into(),
            kind: ChannelKind::Net {
                mac: [0x52, 0x54, 0, 1, 2, 3],
            },
            weight: 100,
        };
        let mut d = dev(&i, 1 << 24, gate()).expect("dev");
        assert_eq!(read(&mut d, regs::KIND, 4), KIND_NET.to_le_bytes());
        assert_eq!(&read(&mut d, regs::BACKEND, 5)[..], b"eth0\0");
        assert_eq!(read(&mut d, regs::MAC, 8), [0x52, 0x54, 0, 1, 2, 3, 0, 0]);
        assert_eq!(read(&mut d, regs::SECTORS, 8), [0; 8]);
    }

    fn dev(
        info: &ChannelInfo,
        size: u64,
        gate: Arc<ChannelGate>,
    ) -> Result<ChannelDevice, ChannelError> {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        ChannelDevice::new(info, 0xc000_0000, 0xc100_0000, size, gate, kick)
    }

    #[test]
    fn specs_parse_as_the_device_checks_them() {
        let i = ChannelInfo::parse(3, "backend=/dev/vda,start=2048,sectors=4096,weight=250")
            .expect("block");
        assert_eq!(i, info());
        let n = ChannelInfo::parse(1, "backend=eth0,mac=52:54:00:01:02:03").expect("net");
        assert_eq!(
            n.kind,
            ChannelKind::Net {
                mac: [0x52, 0x54, 0, 1, 2, 3]
            }
        );
        assert_eq!(
            ChannelInfo::parse(2, "vacant").expect("vacant").kind,
            ChannelKind::Vacant
        );
        for bad in [
            "backend=vda,start=0,sectors=1",
            "backend=/dev/vda,start=0,sectors=0",
            "backend=/dev/vda,start=0",
            "backend=/dev/vda,start=0,sectors=1,start=2",
            "backend=/dev/vda,start=x,sectors=1",
            "backend=/dev/vda,start=0,sectors=1,weight=0",
            "backend=/dev/vda,start=0,sectors=1,mem=3",
            "backend=eth0,mac=zz",
            "vacant,ro",
            "vacant,backend=/dev/vda",
        ] {
            assert!(ChannelInfo::parse(0, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_slot_is_filled_and_emptied_at_runtime() {
        let vacant = ChannelInfo::parse(3, "vacant").expect("vacant");
        let mut d = dev(&vacant, 1 << 24, gate()).expect("dev");
        let slot = d.slot();
        assert!(slot.is_vacant());
        assert_eq!(read(&mut d, regs::KIND, 4), KIND_VACANT.to_le_bytes());
        assert_eq!(read(&mut d, regs::MEM_SIZE, 8), (1u64 << 24).to_le_bytes());
        let entropy = read(&mut d, regs::ENTROPY, ENTROPY_LEN);
        let mut other = info();
        other.index = 4;
        assert!(slot.assign(&other).is_err(), "another slot's channel");
        slot.assign(&info()).expect("assign");
        assert!(!slot.is_vacant());
        assert_eq!(read(&mut d, regs::SECTORS, 8), 4096u64.to_le_bytes());
        assert_eq!(
            read(&mut d, regs::ENTROPY, ENTROPY_LEN),
            entropy,
            "entropy kept"
        );
        // No agent: the take-back is not confirmed, the registers read vacant anyway and the
        // request waits for the agent.
        assert!(!slot.vacate(Duration::from_millis(20)));
        assert_eq!(read(&mut d, regs::KIND, 4), KIND_VACANT.to_le_bytes());
        assert_eq!(read(&mut d, regs::SECTORS, 8), [0; 8]);
        // An agent that lets go confirms it.
        assert_eq!(read(&mut d, regs::FAULT, 4), fault::DETACH.to_le_bytes());
        let s2 = slot.clone();
        let t = std::thread::spawn(move || s2.vacate(Duration::from_secs(30)));
        while read(&mut d, regs::FAULT, 4) != fault::DETACH.to_le_bytes() {
            std::thread::yield_now();
        }
        d.bar_write(0, regs::DETACHED, &[1, 0, 0, 0]);
        assert!(t.join().expect("join"));
        // A new assignment clears a take-back the agent never read.
        slot.request_fault(fault::DETACH);
        slot.assign(&info()).expect("assign");
        assert_eq!(read(&mut d, regs::FAULT, 4), [0; 4]);
    }

    fn gate() -> Arc<ChannelGate> {
        ChannelGate::new(3, true, Arc::new(|_| {}))
    }

    #[test]
    fn gate_reports_parking_once_and_opens() {
        let parked = Arc::new(AtomicU32::new(0));
        let p = parked.clone();
        let gate = ChannelGate::new(
            3,
            false,
            Arc::new(move |i| {
                p.fetch_add(i, Ordering::SeqCst);
            }),
        );
        let mut d = dev(&info(), 1 << 24, gate.clone()).expect("dev");
        assert_eq!(read(&mut d, regs::GATE, 4), [0; 4]);
        d.bar_write(0, regs::GATE, &[1, 0, 0, 0]);
        d.bar_write(0, regs::GATE, &[1, 0, 0, 0]);
        assert_eq!(
            parked.load(Ordering::SeqCst),
            3,
            "one notification per park"
        );
        assert!(gate.parked());
        gate.open();
        assert_eq!(read(&mut d, regs::GATE, 4), 1u32.to_le_bytes());
        let e1 = read(&mut d, regs::ENTROPY, ENTROPY_LEN);
        let mut d2 = dev(&info(), 1 << 24, gate).expect("dev");
        assert_ne!(
            e1,
            read(&mut d2, regs::ENTROPY, ENTROPY_LEN),
            "entropy per device"
        );
    }

    #[test]
    fn fault_register_is_taken_by_one_read() {
        let mut d = dev(&info(), 1 << 24, gate()).expect("dev");
        assert_eq!(read(&mut d, regs::FAULT, 4), [0; 4]);
        d.slot().request_fault(fault::PANIC);
        assert_eq!(read(&mut d, regs::FAULT, 4), 1u32.to_le_bytes());
        assert_eq!(read(&mut d, regs::FAULT, 4), [0; 4]);
    }

    #[test]
    fn interrupt_status_follows_intx_disable() {
        let mut d = dev(&info(), 1 << 24, gate()).expect("dev");
        let mut b = [0u8; 4];
        d.config_read(config::COMMAND, &mut b);
        assert_ne!(b[2] & STATUS_INTERRUPT, 0);
        d.config_write(config::COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        d.config_read(config::COMMAND, &mut b);
        assert_eq!(b[2] & STATUS_INTERRUPT, 0);
        let mut pin = [0u8; 1];
        d.config_read(config::INTERRUPT_LINE + 1, &mut pin);
        assert_eq!(pin[0], 1);
    }

    #[test]
    fn rejects_bad_descriptions() {
        let mut i = info();
        i.backend = "vda".into();
        assert!(dev(&i, 1 << 24, gate()).is_err());
        let mut i = info();
        i.kind = ChannelKind::Block {
            start_sector: 0,
            sectors: 0,
            read_only: false,
        };
        assert!(dev(&i, 1 << 24, gate()).is_err());
        let net = |uplink: &str| ChannelInfo {
            index: 0,
            backend: uplink.into(),
            kind: ChannelKind::Net { mac: [2; 6] },
            weight: 100,
        };
        for bad in ["", "/dev/vda", "a-name-too-long-x", "eth 0"] {
            assert!(dev(&net(bad), 1 << 24, gate()).is_err(), "{bad}");
        }
        assert!(dev(&info(), 3 << 20, gate()).is_err());
    }
}

/// Descriptors shared with the other end of a channel (handed down by the daemon). Cloning
/// shares them.
#[derive(Debug, Clone)]
pub struct ChannelFds {
    /// The channel memory (a memfd of a power-of-two size).
    pub memory: Arc<File>,
    /// Client to driver VM: the driver VM's irqfd, written by the client VMM.
    pub kick: Arc<EventFd>,
    /// Driver VM to client: the driver VM's doorbell ioeventfd, waited on by the client VMM.
    pub doorbell: Arc<EventFd>,
}

impl ChannelFds {
    /// Size of the channel memory.
    pub fn memory_size(&self) -> std::io::Result<u64> {
        Ok(self.memory.metadata()?.len())
    }
}
