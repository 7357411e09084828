//! A complete VM: guest RAM, the boot state of a Linux kernel, the platform devices, and one
//! thread per vCPU. [`Machine::build`] validates everything up front; [`Machine::run`] returns
//! when the guest stops.

use std::fs::File;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::bzimage::BzImage;
use crate::arch::x86_64::layout::{ports, PCI_CONFIG_IO, PCI_MMIO_END, PCI_MMIO_START};
use crate::arch::x86_64::{acpi, cpuid, loader, msrs, regs, reset_vector};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::{Bus, BusError, SharedDevice};
pub use crate::devices::channel::ChannelFds;
use crate::devices::channel::{self, ChannelDevice, ChannelError, ChannelInfo, ChannelWiring};
use crate::devices::i8042::I8042;
use crate::devices::pci::msix::{IrqRouter, MsixError};
use crate::devices::pci::root::PciRoot;
use crate::devices::pci::{BarRegion, HostBridge, SharedPciDevice};
use crate::devices::pvpanic::PvPanic;
use crate::devices::serial::SerialConsole;
use crate::devices::vfio_pci::{AttachContext, OpenedFunction, VfioPci, VfioPciError};
use crate::devices::virtio::block::ring_frontend::{RingBlock, RingDiskError, RingDiskStats};
use crate::devices::virtio::block::{open_disk, Block, BlockError};
use crate::devices::virtio::net::ring_frontend::{RingNet, RingNetError, RingNetStats};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::pci::{TransportError, VirtioPciDevice, BAR_SIZE};
use crate::devices::virtio::ring::RingCommands;
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitNotifier, GuestExit};
use crate::kvm::slots::MemorySlots;
use crate::kvm::{self, KvmError};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, Vcpu, VcpuInjection};
use crate::vfio::PciAddress;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A log file (created or truncated).
    File(PathBuf),
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
}

/// Errors building or running a machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A file could not be read.
    #[error("cannot read {what} {path}")]
    ReadFile {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not bootable.
    #[error("kernel image {path}")]
    Kernel {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: loader::LoaderError,
    },
    /// Loading failed for a reason not tied to the kernel file.
    #[error(transparent)]
    Loader(loader::LoaderError),
    /// No vCPUs asked for.
    #[error("at least one vCPU is needed")]
    NoVcpus,
    /// More vCPUs than KVM or our ACPI tables allow.
    #[error(
        "{requested} vCPUs requested, at most {max} possible here \
         (KVM allows {kvm_max}, 8-bit APIC ids allow {MAX_VCPUS_ACPI})"
    )]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Effective limit.
        max: u32,
        /// KVM's own limit on this host.
        kvm_max: u32,
    },
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI table construction failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MSR setup failed.
    #[error(transparent)]
    Msrs(#[from] msrs::MsrError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An ioctl or system call failed.
    #[error("{0} failed")]
    Sys(&'static str, #[source] std::io::Error),
    /// The console log could not be opened.
    #[error("cannot open console log {path}")]
    Console {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// [`Machine::run`] was called twice.
    #[error("this machine has already run")]
    AlreadyRan,
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A TAP device could not be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A virtio-pci device could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Interrupt routing could not be set up.
    #[error(transparent)]
    Msix(#[from] MsixError),
    /// No room for another PCI device.
    #[error("no free PCI slot or MMIO space for {0}")]
    PciFull(String),
    /// A channel device could not be set up.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A ring disk could not be set up.
    #[error(transparent)]
    RingDisk(#[from] RingDiskError),
    /// A ring NIC could not be set up.
    #[error(transparent)]
    RingNet(#[from] RingNetError),
    /// A host PCI function could not be passed through.
    #[error(transparent)]
    Passthrough(#[from] VfioPciError),
    /// All vCPU threads ended without reporting why.
    #[error("all vCPU threads ended without a guest exit")]
    VcpusVanished,
}

/// Our ACPI tables use 8-bit APIC ids.
const MAX_VCPUS_ACPI: u32 = 254;

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, MachineError> {
    std::fs::read(path).map_err(|source| MachineError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A VM ready to run.
pub struct Machine {
    // Field order matters for drop: vCPUs and the VM go before the RAM they map.
    vcpus: Vec<(u32, VcpuFd)>,
    io_bus: Bus,
    mmio_bus: Bus,
    exits: ExitNotifier,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
    /// The memory slots and the mappings behind them (channel memory, BAR pages): released
    /// with the VM, before the passed-through functions (their BAR pages first, then the
    /// device, then its DMA mappings) and before guest RAM.
    _slots: MemorySlots,
    /// Passed-through functions: released before guest RAM (their DMA mappings pin it).
    _passthrough: Vec<SharedPciDevice>,
    /// What keeps the channels wired (INTx resample eventfds).
    _channels: Vec<ChannelWiring>,
    ram: GuestRam,
    exit_rx: Receiver<GuestExit>,
    stop: Arc<AtomicBool>,
    ring_stats: Vec<Arc<RingDiskStats>>,
    net_stats: Vec<Arc<RingNetStats>>,
    /// Ring disks, then ring NICs.
    ring_controls: Vec<Arc<dyn RingCommands>>,
    faults: Arc<FaultInjector>,
}

/// Ways to make a running machine fail on purpose (the daemon's fault injection).
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// The boot vCPU.
    pub vcpu: Arc<VcpuInjection>,
    /// Each channel device's fault request register.
    pub channels: Vec<Arc<AtomicU32>>,
}

impl FaultInjector {
    /// Asks the agent behind every channel to fail with `code` (see
    /// `ddvmm_translation::channel::fault`). False if the machine has no channel.
    pub fn request_agent_fault(&self, code: u32) -> bool {
        for c in &self.channels {
            c.store(code, Ordering::Release);
        }
        !self.channels.is_empty()
    }
}

impl Machine {
    /// Validates the configuration and builds the VM without running it.
    pub fn build(cfg: &MachineConfig) -> Result<Self, MachineError> {
        if cfg.vcpus == 0 {
            return Err(MachineError::NoVcpus);
        }
        let payload = BootPayload::read(&cfg.boot)?;
        let kvm = kvm::open(&cfg.kvm_device)?;
        let kvm_max = u32::try_from(kvm::max_vcpus(&kvm)).unwrap_or(u32::MAX);
        let max = kvm_max.min(MAX_VCPUS_ACPI);
        if cfg.vcpus > max {
            return Err(MachineError::TooManyVcpus {
                requested: cfg.vcpus,
                max,
                kvm_max,
            });
        }

        let ram = GuestRam::new(cfg.mem_size)?;
        let rsdp = acpi::write_acpi_tables(ram.memory(), cfg.vcpus)?;
        reset_vector::write_reset_vector(ram.memory()).map_err(|source| {
            MachineError::Loader(loader::LoaderError::GuestWrite {
                what: "reset vector",
                addr: reset_vector::RESET_VECTOR,
                source,
            })
        })?;
        let entry = payload.load(&ram, rsdp)?;

        // Open disks before creating the VM: a bad path is a user error, reported first.
        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        let mut ring_stats = Vec::new();
        let mut ring_controls = Vec::new();
        for d in &cfg.disks {
            let disk = open_disk(&d.path, d.read_only)?;
            devices.push((d.path.display().to_string(), Box::new(Block::new(disk))));
        }
        for (i, r) in cfg.ring_disks.iter().enumerate() {
            let dev = RingBlock::new(r.fds.clone(), r.sectors, r.read_only, &r.id, r.generation)?;
            ring_stats.push(dev.stats());
            ring_controls.push(dev.control());
            devices.push((format!("ring disk {i}"), Box::new(dev)));
        }
        for n in &cfg.nets {
            let tap = Tap::open(&n.tap)?;
            devices.push((format!("tap {}", n.tap), Box::new(Net::new(tap, n.mac))));
        }
        let mut net_stats = Vec::new();
        for (i, r) in cfg.ring_nets.iter().enumerate() {
            let dev = RingNet::new(r.fds.clone(), r.mac, r.generation)?;
            net_stats.push(dev.stats());
            ring_controls.push(dev.control());
            devices.push((format!("ring NIC {i}"), Box::new(dev)));
        }
        let functions = cfg
            .passthrough
            .iter()
            .map(|a| OpenedFunction::open(Path::new("/sys"), *a))
            .collect::<Result<Vec<_>, _>>()?;

        let vm = Arc::new(kvm::create_vm(&kvm)?);
        let mut slots = MemorySlots::new(vm.clone(), &ram)?;

        let (exit_tx, exit_rx) = channel();
        let exits = ExitNotifier::new(exit_tx);
        let mut io_bus = platform_io_bus(&vm, &cfg.console, &exits)?;
        let mut mmio_bus = Bus::new();
        let router = Arc::new(IrqRouter::new(vm.clone()));
        let mut pci = PciBuilder::new();
        for (label, device) in devices {
            pci.add_virtio(&ram, &router, label, device, &mut mmio_bus)?;
        }
        let mut channels = Vec::new();
        let mut faults = FaultInjector::default();
        for c in &cfg.channels {
            let (wiring, fault) = pci.add_channel(&vm, &mut slots, c, &mut mmio_bus)?;
            channels.push(wiring);
            faults.channels.push(fault);
        }
        let mut passthrough = Vec::new();
        for f in functions {
            passthrough.push(pci.add_vfio(&vm, &mut slots, &ram, &router, f, &mut mmio_bus)?);
        }
        io_bus.insert(pci.finish(), u64::from(PCI_CONFIG_IO), 8)?;

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let supported_msrs = msrs::supported_msrs(&kvm)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for index in 0..cfg.vcpus {
            let fd: VcpuFd = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| KvmError::Ioctl("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported_cpuid, index, cfg.vcpus))
                .map_err(|e| KvmError::Ioctl("KVM_SET_CPUID2", e))?;
            msrs::setup_msrs(&fd, &supported_msrs)?;
            regs::setup_lint(&fd)?;
            if index == 0 {
                // Application processors wait for INIT/SIPI from the boot processor.
                entry.setup_boot_vcpu(&fd)?;
            }
            vcpus.push((index, fd));
        }

        Ok(Machine {
            vcpus,
            io_bus,
            mmio_bus,
            exits,
            _vm: vm,
            _kvm: kvm,
            _slots: slots,
            _passthrough: passthrough,
            _channels: channels,
            ram,
            exit_rx,
            stop,
            ring_stats,
            net_stats,
            ring_controls,
            faults: Arc::new(faults),
        })
    }

    /// Guest RAM (for tests and inspection).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Live counters of the ring disks, in configuration order.
    pub fn ring_disk_stats(&self) -> &[Arc<RingDiskStats>] {
        &self.ring_stats
    }

    /// Live counters of the ring NICs, in configuration order.
    pub fn ring_net_stats(&self) -> &[Arc<RingNetStats>] {
        &self.net_stats
    }

    /// Control of the ring devices (replay, quarantine): the ring disks in configuration
    /// order, then the ring NICs.
    pub fn ring_controls(&self) -> &[Arc<dyn RingCommands>] {
        &self.ring_controls
    }

    /// Fault injection handles (usable from any thread while the machine runs).
    pub fn fault_injector(&self) -> Arc<FaultInjector> {
        self.faults.clone()
    }

    /// Places an extra device on the MMIO bus (before [`Self::run`]).
    pub fn add_mmio_device(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), MachineError> {
        Ok(self.mmio_bus.insert(device, base, len)?)
    }

    /// Runs the guest until it powers off, reboots, panics or crashes. A machine runs once.
    pub fn run(&mut self) -> Result<GuestExit, MachineError> {
        vcpu::install_kick_handler()
            .map_err(|e| MachineError::Sys("installing the vCPU kick signal handler", e.into()))?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, fd) in self.vcpus.drain(..) {
            let v = Vcpu {
                index,
                fd,
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                exits: self.exits.clone(),
                stop: self.stop.clone(),
                inject: (index == 0).then(|| self.faults.vcpu.clone()),
            };
            let name = format!("vcpu{index}");
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || v.run())
                .map_err(|e| MachineError::Sys("spawning a vCPU thread", e))?;
            if index == 0 {
                self.faults.vcpu.set_thread(Some(handle.as_pthread_t()));
            }
            threads.push(handle);
        }
        if threads.is_empty() {
            return Err(MachineError::AlreadyRan);
        }
        let exit = self.recv_exit(&threads);
        self.faults.vcpu.set_thread(None);
        stop_vcpus(&self.stop, threads);
        exit
    }
}

impl Machine {
    /// Waits for the first exit report. The machine itself holds a sender, so a plain `recv`
    /// would never fail; poll for the case where every vCPU thread ended without reporting.
    fn recv_exit(&self, threads: &[JoinHandle<()>]) -> Result<GuestExit, MachineError> {
        loop {
            match self.exit_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(exit) => return Ok(exit),
                Err(_) if threads.iter().all(|t| t.is_finished()) => {
                    return self
                        .exit_rx
                        .try_recv()
                        .map_err(|_| MachineError::VcpusVanished)
                }
                Err(_) => {}
            }
        }
    }
}

/// Stops every vCPU thread: raise the flag, then kick until each has left `KVM_RUN`.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for t in threads {
        while !t.is_finished() {
            // ESRCH just means the thread has exited between the check and the kill.
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

fn eventfd() -> Result<EventFd, MachineError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| MachineError::Sys("eventfd", e))
}

/// COM1, i8042, pvpanic and the ACPI sleep registers on the port I/O bus.
fn platform_io_bus(
    vm: &VmFd,
    console: &ConsoleOutput,
    exits: &ExitNotifier,
) -> Result<Bus, MachineError> {
    let mut bus = Bus::new();
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, ports::COM1_IRQ)
        .map_err(|e| MachineError::Sys("KVM_IRQFD for COM1", e.into()))?;
    let out: Box<dyn Write + Send> = match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| MachineError::Console {
                path: path.clone(),
                source,
            })?)
        }
    };
    let serial: SharedDevice = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
    bus.insert(serial, u64::from(ports::COM1), 8)?;
    let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(exits.clone())));
    // One range 0x60..=0x64: port 0x61 in between is handled inside KVM (PIT speaker).
    let i8042_len = u64::from(ports::I8042_COMMAND - ports::I8042_DATA) + 1;
    bus.insert(i8042, u64::from(ports::I8042_DATA), i8042_len)?;
    let pvpanic: SharedDevice = Arc::new(Mutex::new(PvPanic::new(exits.clone())));
    bus.insert(pvpanic, u64::from(ports::PVPANIC), 1)?;
    let sleep: SharedDevice = Arc::new(Mutex::new(AcpiSleep::new(exits.clone())));
    bus.insert(sleep, u64::from(ports::ACPI_SLEEP_CONTROL), 2)?;
    Ok(bus)
}

/// The boot payload read from disk, validated before KVM is touched.
enum BootPayload<'a> {
    Linux {
        kernel_path: &'a Path,
        kernel: Vec<u8>,
        initrd: Option<Vec<u8>>,
        cmdline: &'a str,
    },
    RealMode {
        image: &'a [u8],
        load_addr: u16,
    },
}

/// Where the boot vCPU starts.
enum BootEntry {
    Linux(loader::LoadedKernel),
    RealMode(u16),
}

impl<'a> BootPayload<'a> {
    fn read(boot: &'a BootSource) -> Result<Self, MachineError> {
        match boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let image = read_file("kernel image", kernel)?;
                BzImage::parse(&image).map_err(|e| MachineError::Kernel {
                    path: kernel.clone(),
                    source: e.into(),
                })?;
                let initrd = initrd
                    .as_deref()
                    .map(|p| read_file("initrd", p))
                    .transpose()?;
                Ok(BootPayload::Linux {
                    kernel_path: kernel,
                    kernel: image,
                    initrd,
                    cmdline,
                })
            }
            BootSource::RealMode { image, load_addr } => Ok(BootPayload::RealMode {
                image,
                load_addr: *load_addr,
            }),
        }
    }

    fn load(&self, ram: &GuestRam, rsdp: u64) -> Result<BootEntry, MachineError> {
        match self {
            BootPayload::Linux {
                kernel_path,
                kernel,
                initrd,
                cmdline,
            } => {
                let loaded = loader::load_linux(ram, kernel, initrd.as_deref(), cmdline, rsdp)
                    .map_err(|e| match e {
                        loader::LoaderError::Kernel(_) => MachineError::Kernel {
                            path: kernel_path.to_path_buf(),
                            source: e,
                        },
                        other => MachineError::Loader(other),
                    })?;
                tracing::info!(
                    entry = format_args!("{:#x}", loaded.entry),
                    initrd = ?loaded.initrd,
                    "kernel loaded"
                );
                regs::write_boot_tables(ram.memory())?;
                Ok(BootEntry::Linux(loaded))
            }
            BootPayload::RealMode { image, load_addr } => {
                ram.memory()
                    .write_slice(image, GuestAddress(u64::from(*load_addr)))
                    .map_err(|e| {
                        MachineError::Loader(loader::LoaderError::GuestWrite {
                            what: "real-mode image",
                            addr: u64::from(*load_addr),
                            source: e,
                        })
                    })?;
                Ok(BootEntry::RealMode(*load_addr))
            }
        }
    }
}

impl BootEntry {
    fn setup_boot_vcpu(&self, fd: &VcpuFd) -> Result<(), MachineError> {
        match self {
            BootEntry::Linux(loaded) => {
                regs::setup_sregs(fd)?;
                regs::setup_regs(fd, loaded.entry, loaded.zero_page)?;
                regs::setup_fpu(fd)?;
            }
            BootEntry::RealMode(addr) => regs::setup_real_mode(fd, *addr)?,
        }
        Ok(())
    }
}

/// Assembles the PCI root bus: the host bridge, then devices in slot order, with BARs allocated
/// upwards from the start of the PCI MMIO window and placed on the MMIO bus.
struct PciBuilder {
    root: PciRoot,
    next_bar: u64,
}

impl PciBuilder {
    fn new() -> Self {
        let mut root = PciRoot::new();
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        // Slot 0 of an empty bus.
        let _ = root.add(bridge);
        PciBuilder {
            root,
            next_bar: PCI_MMIO_START,
        }
    }

    /// Reserves `size` bytes (a power of two) of MMIO space, naturally aligned.
    fn alloc_bar(&mut self, size: u64, label: &str) -> Result<u64, MachineError> {
        let bar = self.next_bar.next_multiple_of(size);
        if bar.checked_add(size).is_none_or(|end| end > PCI_MMIO_END) {
            return Err(MachineError::PciFull(label.to_string()));
        }
        self.next_bar = bar + size;
        Ok(bar)
    }

    fn add(&mut self, dev: SharedPciDevice, label: &str) -> Result<usize, MachineError> {
        self.root
            .add(dev)
            .ok_or_else(|| MachineError::PciFull(label.to_string()))
    }

    fn add_virtio(
        &mut self,
        ram: &GuestRam,
        router: &Arc<IrqRouter>,
        label: String,
        device: Box<dyn VirtioDevice>,
        mmio_bus: &mut Bus,
    ) -> Result<(), MachineError> {
        let bar = self.alloc_bar(BAR_SIZE, &label)?;
        let kind = device.device_type();
        let dev = VirtioPciDevice::new(device, ram.memory().clone(), router.clone(), bar)?;
        let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
        let slot = self.add(dev.clone(), &label)?;
        mmio_bus.insert(Arc::new(Mutex::new(BarRegion::new(dev, 0))), bar, BAR_SIZE)?;
        tracing::info!(device = %label, virtio_type = kind, slot, bar = format_args!("{bar:#x}"), "virtio-pci device");
        Ok(())
    }

    /// A host function through VFIO: BARs allocated here and placed on the MMIO bus (the
    /// parts not mapped into the guest trap there).
    fn add_vfio(
        &mut self,
        vm: &VmFd,
        slots: &mut MemorySlots,
        ram: &GuestRam,
        router: &Arc<IrqRouter>,
        f: OpenedFunction,
        mmio_bus: &mut Bus,
    ) -> Result<SharedPciDevice, MachineError> {
        let label = format!("passthrough {}", f.address());
        let bars = f.bars().to_vec();
        let mut addrs = Vec::new();
        for b in &bars {
            // At least a page, so that BAR pages can be mapped into the guest.
            addrs.push(self.alloc_bar(b.size.max(0x1000), &label)?);
        }
        let ctx = AttachContext {
            vm,
            ram,
            router,
            slots,
        };
        let dev: SharedPciDevice = Arc::new(Mutex::new(VfioPci::attach(f, &addrs, ctx)?));
        let slot = self.add(dev.clone(), &label)?;
        for (b, addr) in bars.iter().zip(&addrs) {
            let region = Arc::new(Mutex::new(BarRegion::new(dev.clone(), b.index)));
            mmio_bus.insert(region, *addr, b.size)?;
        }
        tracing::info!(device = %label, slot, bars = ?addrs, "passed-through PCI function");
        Ok(dev)
    }

    /// A channel device: its register BAR on the MMIO bus, the rest wired by the channel
    /// itself ([`channel::wire`]).
    fn add_channel(
        &mut self,
        vm: &VmFd,
        slots: &mut MemorySlots,
        c: &ChannelConfig,
        mmio_bus: &mut Bus,
    ) -> Result<(ChannelWiring, Arc<AtomicU32>), MachineError> {
        let label = format!("channel {}", c.info.index);
        let size = c
            .fds
            .memory_size()
            .map_err(|e| MachineError::Sys("sizing channel memory", e))?;
        let regs_addr = self.alloc_bar(channel::REGS_SIZE, &label)?;
        let mem_addr = self.alloc_bar(size.max(0x1000).next_power_of_two(), &label)?;
        let dev = ChannelDevice::new(&c.info, regs_addr, mem_addr, size)?;
        let fault = dev.fault_request();
        let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
        let slot = self.add(dev.clone(), &label)?;
        mmio_bus.insert(
            Arc::new(Mutex::new(BarRegion::new(dev, 0))),
            regs_addr,
            channel::REGS_SIZE,
        )?;
        let gsi = acpi::intx_gsi(slot as u32, 0);
        let wiring = channel::wire(vm, slots, &c.fds, regs_addr, mem_addr, gsi)?;
        tracing::info!(
            channel = c.info.index,
            slot,
            gsi,
            regs = format_args!("{regs_addr:#x}"),
            mem = format_args!("{mem_addr:#x}+{size:#x}"),
            backend = %c.info.backend,
            "channel device"
        );
        Ok((wiring, fault))
    }

    fn finish(self) -> SharedDevice {
        Arc::new(Mutex::new(self.root))
    }
}
