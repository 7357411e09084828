//! A complete VM: guest RAM, the boot state of a Linux kernel, the platform devices, and one
//! thread per vCPU. [`Machine::build`] validates everything up front; [`Machine::run`] returns
//! when the guest stops.

mod config;
mod device_manager;
mod error;

pub use config::*;
use device_manager::PciBuilder;
pub use error::MachineError;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::bzimage::BzImage;
use crate::arch::x86_64::layout::{ports, PCI_CONFIG_IO};
use crate::arch::x86_64::{acpi, cpuid, loader, msrs, regs, reset_vector};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::{Bus, BusDevice, SharedDevice};
pub use crate::devices::channel::ChannelFds;
use crate::devices::channel::{ChannelGate, ChannelSlot, ChannelWiring};
use crate::devices::i8042::I8042;
use crate::devices::pci::msix::IrqRouter;
use crate::devices::pci::root::PciRoot;
use crate::devices::pci::SharedPciDevice;
use crate::devices::pvpanic::PvPanic;
use crate::devices::serial::SerialConsole;
use crate::devices::vfio_pci::OpenedFunction;
use crate::devices::virtio::block::ring_frontend::RingBlock;
use crate::devices::virtio::block::{open_disk, Block};
use crate::devices::virtio::net::ring_frontend::RingNet;
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::ring::RingPort;
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitNotifier, GuestExit, MachineEvent};
use crate::kvm::coalesced::CoalescedRing;
use crate::kvm::slots::MemorySlots;
use crate::kvm::{self, KvmError};
use crate::memory::GuestRam;
use crate::sandbox::seccomp::ThreadKind;
use crate::snapshot::{
    self, Identity, Shape, Snapshot, SnapshotError, SnapshotState, SnapshotTarget, VmState,
};
use crate::vcpu::{self, PauseGate, Vcpu, VcpuInjection, VmmExits};

/// The console as the machine holds it.
type Console = SerialConsole<BufWriter<Box<dyn Write + Send>>>;

/// How long vCPUs get to pause for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What signals asked of the running machine (its main loop looks at least every 200 ms):
/// [`ASKED_SNAPSHOT`] (`SIGUSR1`, [`snapshot_on_sigusr1`]), [`ASKED_DUMP`] (`SIGUSR2`: the boot
/// vCPU logs its registers, for diagnostics).
static SIGNALLED: AtomicU8 = AtomicU8::new(0);
const ASKED_SNAPSHOT: u8 = 1;
const ASKED_DUMP: u8 = 2;

extern "C" fn flag_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let asked = match signo {
        libc::SIGUSR1 => ASKED_SNAPSHOT,
        libc::SIGUSR2 => ASKED_DUMP,
        _ => 0,
    };
    SIGNALLED.fetch_or(asked, Ordering::Release);
}

/// Makes `SIGUSR1` ask the running machine for its snapshot (into its
/// [`SnapshotMode::TemplateTo`] directory; the main loop looks at least every 200 ms).
pub fn snapshot_on_sigusr1() -> Result<(), MachineError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, flag_signal)
        .map_err(|e| MachineError::Sys("installing the SIGUSR1 handler", e.into()))
}

/// Our ACPI tables use 8-bit APIC ids.
pub(crate) const MAX_VCPUS_ACPI: u32 = 254;

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
    vm: Arc<VmFd>,
    pci: Arc<Mutex<PciRoot>>,
    serial: Arc<Mutex<Console>>,
    /// KVM's queue of coalesced port writes (PCI configuration address, the UART's transmit
    /// register), when KVM can coalesce port writes.
    coalesced: Option<Arc<CoalescedRing>>,
    pause: Arc<PauseGate>,
    /// Every channel's gate.
    gates: Vec<Arc<ChannelGate>>,
    /// Where the snapshot template goes (until it is written).
    target: Option<SnapshotTarget>,
    identity: Identity,
    shape: Shape,
    /// Started from a snapshot: its state (irqchip, clock, vCPUs, devices) is loaded when the
    /// machine runs, so that a standby VMM built long before starts its guest's clock and TSC
    /// from the snapshot instant, not from the build.
    pending_restore: Option<(PathBuf, SnapshotState)>,
    _kvm: Kvm,
    /// The memory slots and the mappings behind them (channel memory, BAR pages): released
    /// with the VM, before the passed-through functions (their BAR pages first, then the
    /// device, then its DMA mappings) and before guest RAM.
    _slots: MemorySlots,
    /// Passed-through functions: released before guest RAM (their DMA mappings pin it).
    _passthrough: Vec<SharedPciDevice>,
    /// What keeps the channels wired (INTx resample eventfds).
    /// Connected to their interrupt lines when the machine runs.
    channels: Vec<ChannelWiring>,
    ram: GuestRam,
    exit_rx: Receiver<MachineEvent>,
    stop: Arc<AtomicBool>,
    /// Ring disks, then ring NICs.
    ring_ports: Vec<RingPort>,
    faults: Arc<FaultInjector>,
    vmm_exits: Arc<VmmExits>,
}

/// Ways to make a running machine fail on purpose (the daemon's fault injection).
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// The boot vCPU.
    pub vcpu: Arc<VcpuInjection>,
    /// Each channel device's slot (fault requests, runtime assignment).
    pub channels: Vec<Arc<ChannelSlot>>,
}

impl FaultInjector {
    /// Asks the agent behind every channel to fail with `code` (see
    /// `ddvmm_translation::channel::fault`), and interrupts it so that a sleeping agent reads
    /// the request at once (a busy one reads it within its fault poll). False if the machine
    /// has no channel.
    pub fn request_agent_fault(&self, code: u32) -> bool {
        for c in &self.channels {
            c.request_fault(code);
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
        if cfg.snapshot != SnapshotMode::None {
            let unsupported = if !cfg.ring_disks.is_empty() || !cfg.ring_nets.is_empty() {
                Some("its ring disks and NICs hold a journal that lives with the client")
            } else if !cfg.passthrough.is_empty() {
                Some("a passed-through function's state is in the hardware")
            } else {
                None
            };
            if let Some(why) = unsupported {
                return Err(SnapshotError::Unsupported(why.into()).into());
            }
        }
        // A restore boots nothing: the kernel is not even read.
        let payload = match &cfg.snapshot {
            SnapshotMode::Restore(_) => None,
            _ => Some(BootPayload::read(&cfg.boot)?),
        };
        let kvm = kvm::open(&cfg.kvm_device)?;
        let identity = Identity::of_host(&kvm)?;
        if cfg.snapshot != SnapshotMode::None {
            snapshot::check_xsave_size(&kvm)?;
        }
        let restore = match &cfg.snapshot {
            SnapshotMode::Restore(dir) => {
                let s = Snapshot::open(dir, &identity)?;
                // Before RAM is mapped from its file: the sizes must agree.
                s.check_size(cfg.vcpus, cfg.mem_size)?;
                Some(s)
            }
            _ => None,
        };
        let kvm_max = u32::try_from(kvm::max_vcpus(&kvm)).unwrap_or(u32::MAX);
        let max = kvm_max.min(MAX_VCPUS_ACPI);
        if cfg.vcpus > max {
            return Err(MachineError::TooManyVcpus {
                requested: cfg.vcpus,
                max,
                kvm_max,
            });
        }

        let (ram, entry) = match (&restore, &payload) {
            (Some(s), _) => (GuestRam::from_snapshot(&s.memory, cfg.mem_size)?, None),
            (None, None) => unreachable!("a machine either restores or boots"),
            (None, Some(payload)) => {
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
                (ram, Some(entry))
            }
        };
        let target = match &cfg.snapshot {
            SnapshotMode::TemplateTo(dir) => Some(SnapshotTarget::create(dir)?),
            _ => None,
        };

        // Open disks before creating the VM: a bad path is a user error, reported first.
        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        let mut ring_ports = Vec::new();
        for d in &cfg.disks {
            let disk = open_disk(&d.path, d.read_only)?.with_limit(d.limit);
            devices.push((d.path.display().to_string(), Box::new(Block::new(disk))));
        }
        for (i, r) in cfg.ring_disks.iter().enumerate() {
            let dev = RingBlock::new(
                r.fds.clone(),
                r.sectors,
                r.read_only,
                &r.id,
                r.generation,
                r.limit,
            )?;
            ring_ports.push(dev.port());
            devices.push((format!("ring disk {i}"), Box::new(dev)));
        }
        for n in &cfg.nets {
            let tap = Tap::open(&n.tap)?;
            devices.push((format!("tap {}", n.tap), Box::new(Net::new(tap, n.mac))));
        }
        for (i, r) in cfg.ring_nets.iter().enumerate() {
            let dev = RingNet::new(r.fds.clone(), r.mac, r.generation)?;
            ring_ports.push(dev.port());
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
        let (mut io_bus, serial, coalesced) = platform_io_bus(&vm, &cfg.console, &exits)?;
        let mut mmio_bus = Bus::new();
        let router = Arc::new(IrqRouter::new(vm.clone()));
        let mut pci = PciBuilder::new();
        for (label, device) in devices {
            pci.add_virtio(&ram, &router, label, device, &mut mmio_bus)?;
        }
        let mut channels = Vec::new();
        let mut gates = Vec::new();
        let mut faults = FaultInjector::default();
        // A template's gates stay shut until the snapshot is written.
        let gates_open = target.is_none();
        for c in &cfg.channels {
            let parked = exits.clone();
            let gate = ChannelGate::new(
                c.info.index,
                gates_open,
                Arc::new(move |i| parked.event(MachineEvent::Parked(i))),
            );
            gates.push(gate.clone());
            let (wiring, slot) = pci.add_channel(&vm, &mut slots, c, gate, &mut mmio_bus)?;
            channels.push(wiring);
            faults.channels.push(slot);
        }
        let mut passthrough = Vec::new();
        for f in functions {
            passthrough.push(pci.add_vfio(&vm, &mut slots, &ram, &router, f, &mut mmio_bus)?);
        }
        let mut shape = Shape {
            vcpus: cfg.vcpus,
            mem_size: cfg.mem_size,
            devices: pci.labels().to_vec(),
        };
        shape.devices.insert(0, "COM1".into());
        let pci = pci.finish();
        let pci_bus: SharedDevice = pci.clone();
        io_bus.insert(pci_bus, u64::from(PCI_CONFIG_IO), 8)?;
        // The configuration address register: a write there only selects what the next
        // access to the data register (which exits, and replays the queue first) reaches.
        // Registered for the VM's life; without it each access costs two exits.
        if let Some(address) = coalesced.as_ref().and_then(|c| c.port(PCI_CONFIG_IO)) {
            if let Err(e) = address.set_enabled(true) {
                tracing::warn!(error = %e, "PCI configuration address writes not coalesced");
            }
        }

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let supported_msrs = msrs::supported_msrs(&kvm)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pause = PauseGate::new(cfg.vcpus as usize, supported_msrs.clone());
        if let Some(s) = &restore {
            s.check_shape(&shape)?;
        }
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for index in 0..cfg.vcpus {
            let fd: VcpuFd = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| KvmError::Ioctl("KVM_CREATE_VCPU", e))?;
            if let Some(c) = &coalesced {
                c.map_ring(&fd)?;
            }
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported_cpuid, index, cfg.vcpus))
                .map_err(|e| KvmError::Ioctl("KVM_SET_CPUID2", e))?;
            msrs::setup_msrs(&fd, &supported_msrs)?;
            regs::setup_lint(&fd)?;
            // A restored vCPU gets its state when the machine runs. Application processors
            // wait for INIT/SIPI from the boot processor.
            if let (0, Some(entry)) = (index, &entry) {
                entry.setup_boot_vcpu(&fd)?;
            }
            vcpus.push((index, fd));
        }

        Ok(Machine {
            vcpus,
            io_bus,
            mmio_bus,
            exits,
            vm,
            pci,
            serial,
            coalesced,
            pause,
            gates,
            target,
            identity,
            shape,
            pending_restore: restore.map(|s| (s.dir, s.state)),
            _kvm: kvm,
            _slots: slots,
            _passthrough: passthrough,
            channels,
            ram,
            exit_rx,
            stop,
            ring_ports,
            faults: Arc::new(faults),
            vmm_exits: Arc::new(VmmExits::new(cfg.vcpus as usize)),
        })
    }

    /// Guest RAM (for tests and inspection).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Before the machine runs, for RAM restored from a snapshot: see [`GuestRam::prefault`].
    /// Not with passed-through functions: their DMA mappings pinned the pages RAM has now.
    pub fn prefault_ram(
        &self,
        stop: impl FnMut() -> bool,
    ) -> Result<u64, crate::memory::MemoryError> {
        // After `run` the guest has written RAM: putting the snapshot back would undo that.
        if !self._passthrough.is_empty() || self.vcpus.is_empty() {
            return Ok(0);
        }
        self.ram.prefault(stop)
    }

    /// The ring devices (disks, then NICs, in configuration order): counters and control.
    pub fn ring_ports(&self) -> &[RingPort] {
        &self.ring_ports
    }

    /// The exits of this VM's vCPUs that reached the VMM.
    pub fn vmm_exits(&self) -> Arc<VmmExits> {
        self.vmm_exits.clone()
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

    /// Asks the running machine to write a snapshot into its snapshot target (a machine
    /// built with [`SnapshotMode::TemplateTo`]); the result is logged.
    pub fn snapshot_trigger(&self) -> impl Fn() + Send + Sync + 'static {
        let exits = self.exits.clone();
        move || exits.event(MachineEvent::Snapshot)
    }

    /// Runs the guest until it powers off, reboots, panics or crashes. A machine runs once.
    pub fn run(&mut self) -> Result<GuestExit, MachineError> {
        vcpu::install_kick_handler()
            .map_err(|e| MachineError::Sys("installing the vCPU kick signal handler", e.into()))?;
        // `SIGUSR2`: the boot vCPU logs where the guest runs (the main loop looks at least
        // every 200 ms).
        vmm_sys_util::signal::register_signal_handler(libc::SIGUSR2, flag_signal)
            .map_err(|e| MachineError::Sys("installing the SIGUSR2 handler", e.into()))?;
        let started = std::time::Instant::now();
        let restored = self.pending_restore.is_some();
        if let Some((dir, state)) = self.pending_restore.take() {
            self.load_snapshot(&dir, &state)?;
            // Restored devices start their workers now (after the VMM is confined).
            lock(&self.pci).resume_all();
        }
        for c in &self.channels {
            c.connect_interrupt(&self.vm)?;
        }
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
                pause: self.pause.clone(),
                coalesced: self.coalesced.clone(),
                vmm_exits: self.vmm_exits.of_vcpu(index as usize),
            };
            let name = format!("vcpu{index}");
            let handle = crate::sandbox::seccomp::spawn(ThreadKind::Vcpu, name, move || v.run())
                .map_err(|e| MachineError::Sys("spawning a vCPU thread", e))?;
            if index == 0 {
                self.faults.vcpu.set_thread(Some(handle.as_pthread_t()));
            }
            threads.push(handle);
        }
        if threads.is_empty() {
            return Err(MachineError::AlreadyRan);
        }
        if restored {
            // A step of a restart's timeline: state loaded, devices resumed, vCPUs started.
            tracing::info!(
                ms = started.elapsed().as_secs_f64() * 1e3,
                "restored VM running"
            );
        }
        let exit = self.recv_exit(&threads);
        self.faults.vcpu.set_thread(None);
        stop_vcpus(&self.stop, threads);
        // What the guest wrote last: writes other vCPUs queued, then the UART's buffer.
        if let Some(c) = &self.coalesced {
            c.drain(&self.io_bus);
        }
        BusDevice::flush(&mut *lock(&self.serial));
        if let Some(c) = &self.coalesced {
            let (per_zone, batches) = c.counts();
            let count = |port| per_zone.iter().find(|(p, _)| *p == port).map_or(0, |z| z.1);
            tracing::info!(
                com1 = count(ports::COM1),
                pci_address = count(PCI_CONFIG_IO),
                batches,
                "port writes coalesced by KVM"
            );
        }
        exit
    }
}

impl Machine {
    /// Waits for the first exit report, taking snapshots on the way when asked (or when
    /// every agent parked, for a template). The machine itself holds a sender, so a plain
    /// `recv` would never fail; poll for the case where every vCPU thread ended without
    /// reporting.
    fn recv_exit(&mut self, threads: &[JoinHandle<()>]) -> Result<GuestExit, MachineError> {
        loop {
            let asked = SIGNALLED.swap(0, Ordering::AcqRel);
            if asked & ASKED_SNAPSHOT != 0 {
                self.exits.event(MachineEvent::Snapshot);
            }
            if asked & ASKED_DUMP != 0 {
                self.faults.vcpu.dump_state();
            }
            let event = match self.exit_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(event) => event,
                Err(_) if threads.iter().all(|t| t.is_finished()) => loop {
                    match self.exit_rx.try_recv() {
                        Ok(MachineEvent::Exit(exit)) => return Ok(exit),
                        Ok(_) => {}
                        Err(_) => return Err(MachineError::VcpusVanished),
                    }
                },
                Err(_) => continue,
            };
            match event {
                MachineEvent::Exit(exit) => return Ok(exit),
                MachineEvent::Parked(_) => {
                    if self.target.is_some() && self.gates.iter().all(|g| g.parked()) {
                        self.snapshot_template(threads);
                    }
                }
                MachineEvent::Snapshot => {
                    if self.target.is_some() {
                        self.snapshot_template(threads);
                    } else {
                        tracing::warn!("snapshot requested, but no snapshot target");
                    }
                }
            }
        }
    }

    /// Writes the template snapshot (once), then opens the channels' gates whatever the
    /// outcome: a VM without a template still serves (its restarts boot cold).
    fn snapshot_template(&mut self, threads: &[JoinHandle<()>]) {
        let Some(target) = self.target.take() else {
            return;
        };
        let started = std::time::Instant::now();
        match self.take_snapshot(&target, threads) {
            Ok(bytes) => tracing::info!(
                dir = %target.dir().display(),
                ram_bytes_written = bytes,
                ms = started.elapsed().as_millis() as u64,
                "snapshot template written"
            ),
            Err(e) => tracing::error!(
                dir = %target.dir().display(),
                error = %e,
                "snapshot template failed; restarts of this VM will boot cold"
            ),
        }
        for g in &self.gates {
            g.open();
        }
    }

    /// Loads a snapshot's state into the built machine: irqchip, PIT and clock, each vCPU,
    /// then the devices.
    fn load_snapshot(&self, dir: &Path, state: &SnapshotState) -> Result<(), MachineError> {
        state.vm.restore(&self.vm)?;
        for (index, fd) in &self.vcpus {
            let saved = state.vcpus.get(*index as usize).ok_or_else(|| {
                SnapshotError::Unsupported(format!("no saved state for vCPU {index}"))
            })?;
            saved.restore(fd)?;
        }
        restore_devices(&state.devices, &self.pci, &self.serial)?;
        tracing::info!(
            snapshot = %dir.display(),
            rip = format_args!("{:#x}", state.vcpus.first().map_or(0, |v| v.rip())),
            "restored from snapshot"
        );
        Ok(())
    }

    /// Pauses the vCPUs and devices, writes everything into `target`, resumes.
    fn take_snapshot(
        &self,
        target: &SnapshotTarget,
        threads: &[JoinHandle<()>],
    ) -> Result<u64, SnapshotError> {
        let Some(memfd) = self.ram.memfd() else {
            return Err(SnapshotError::Unsupported(
                "it was itself restored from a snapshot (take snapshots of a booted VM)".into(),
            ));
        };
        let kick = || {
            for t in threads {
                let _ = t.kill(vcpu::kick_signal());
            }
        };
        let vcpus = self.pause.pause(&kick, PAUSE_TIMEOUT)?;
        let pci = lock(&self.pci);
        pci.pause_all();
        let result = (|| {
            let devices = serde_json::json!({
                "com1": lock(&self.serial).save(),
                "pci": pci
                    .save_state()
                    .map_err(|(slot, e)| SnapshotError::device(format!("PCI slot {slot}"), e))?,
            });
            let mut state = SnapshotState {
                identity: self.identity.clone(),
                shape: self.shape.clone(),
                memory_id: snapshot::random_id(),
                vm: VmState::save(&self.vm)?,
                vcpus,
                devices,
            };
            target.write(memfd, self.ram.size(), &mut state)
        })();
        pci.resume_all();
        drop(pci);
        self.pause.resume();
        result
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

/// The port I/O bus, COM1, and the queue KVM coalesces port writes into.
type PlatformIo = (Bus, Arc<Mutex<Console>>, Option<Arc<CoalescedRing>>);

/// COM1, i8042, pvpanic and the ACPI sleep registers on the port I/O bus; and the queue KVM
/// coalesces COM1's transmit writes into, if it can.
fn platform_io_bus(
    vm: &Arc<VmFd>,
    console: &ConsoleOutput,
    exits: &ExitNotifier,
) -> Result<PlatformIo, MachineError> {
    let mut bus = Bus::new();
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, ports::COM1_IRQ)
        .map_err(|e| MachineError::Sys("KVM_IRQFD for COM1", e.into()))?;
    let out: Box<dyn Write + Send> = match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File {
            path,
            limit,
            append,
        } => {
            let file = File::options()
                .create(true)
                .write(true)
                .append(*append)
                .truncate(!*append)
                .open(path)
                .map_err(|source| MachineError::Console {
                    path: path.clone(),
                    source,
                })?;
            // Appending: the cap is for the whole file, what is there already included.
            let used = if *append {
                file.metadata().map(|m| m.len()).unwrap_or(0)
            } else {
                0
            };
            Box::new(crate::sandbox::limits::CappedWriter::new(
                file,
                limit.saturating_sub(used),
            ))
        }
    };
    let mut uart = SerialConsole::new(serial_irq, BufWriter::new(out));
    let coalesced = vm
        .check_extension(kvm_ioctls::Cap::CoalescedPio)
        .then(|| CoalescedRing::new(vm.clone(), &[(ports::COM1, 1), (PCI_CONFIG_IO, 4)]));
    if let Some(com1) = coalesced.as_ref().and_then(|c| c.port(ports::COM1)) {
        uart.coalesce_transmit(com1);
    }
    let console = Arc::new(Mutex::new(uart));
    let serial: SharedDevice = console.clone();
    bus.insert(serial, u64::from(ports::COM1), 8)?;
    let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(exits.clone())));
    // One range 0x60..=0x64: port 0x61 in between is handled inside KVM (PIT speaker).
    let i8042_len = u64::from(ports::I8042_COMMAND - ports::I8042_DATA) + 1;
    bus.insert(i8042, u64::from(ports::I8042_DATA), i8042_len)?;
    let pvpanic: SharedDevice = Arc::new(Mutex::new(PvPanic::new(exits.clone())));
    bus.insert(pvpanic, u64::from(ports::PVPANIC), 1)?;
    let sleep: SharedDevice = Arc::new(Mutex::new(AcpiSleep::new(exits.clone())));
    bus.insert(sleep, u64::from(ports::ACPI_SLEEP_CONTROL), 2)?;
    Ok((bus, console, coalesced))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Restores the devices' saved states (see [`Machine::take_snapshot`]).
fn restore_devices(
    saved: &serde_json::Value,
    pci: &Mutex<PciRoot>,
    serial: &Mutex<Console>,
) -> Result<(), SnapshotError> {
    let com1: crate::devices::serial::SavedSerial =
        serde_json::from_value(saved["com1"].clone())
            .map_err(|e| SnapshotError::device("COM1", e.to_string()))?;
    lock(serial)
        .restore(&com1, BufWriter::new(Box::new(std::io::sink())))
        .map_err(|e| SnapshotError::device("COM1", e))?;
    lock(pci)
        .restore_state(&saved["pci"])
        .map_err(|(slot, e)| SnapshotError::device(format!("PCI slot {slot}"), e))
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
