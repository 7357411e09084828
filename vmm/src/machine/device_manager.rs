//! The device manager: assembles the PCI root bus (host bridge, virtio devices, channel
//! devices, passed-through functions), allocates their BARs in the PCI MMIO window and puts
//! them on the MMIO bus. Memory slots belong to [`MemorySlots`]; each device wires its own
//! eventfds.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use super::{ChannelConfig, MachineError};
use crate::arch::x86_64::acpi;
use crate::arch::x86_64::layout::{PCI_MMIO_END, PCI_MMIO_START};
use crate::devices::bus::Bus;
use crate::devices::channel::{self, ChannelDevice, ChannelGate, ChannelSlot, ChannelWiring};
use crate::devices::pci::msix::IrqRouter;
use crate::devices::pci::root::PciRoot;
use crate::devices::pci::{BarRegion, HostBridge, SharedPciDevice};
use crate::devices::vfio_pci::{AttachContext, OpenedFunction, VfioPci};
use crate::devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use crate::devices::virtio::VirtioDevice;
use crate::kvm::slots::MemorySlots;
use crate::memory::GuestRam;

/// Assembles the PCI root bus: the host bridge, then devices in slot order, with BARs allocated
/// upwards from the start of the PCI MMIO window and placed on the MMIO bus.
pub(super) struct PciBuilder {
    root: PciRoot,
    next_bar: u64,
    /// What each function is, in slot order (a snapshot's shape).
    labels: Vec<String>,
}

impl PciBuilder {
    pub(super) fn new() -> Self {
        let mut root = PciRoot::new();
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        // Slot 0 of an empty bus.
        let _ = root.add(bridge);
        PciBuilder {
            root,
            next_bar: PCI_MMIO_START,
            labels: vec!["host bridge".into()],
        }
    }

    /// What each function is, in slot order.
    pub(super) fn labels(&self) -> &[String] {
        &self.labels
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
        let slot = self
            .root
            .add(dev)
            .ok_or_else(|| MachineError::PciFull(label.to_string()))?;
        self.labels.push(label.to_string());
        Ok(slot)
    }

    pub(super) fn add_virtio(
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
        let slot = self.add(dev.clone(), &format!("virtio type {kind}"))?;
        mmio_bus.insert(Arc::new(Mutex::new(BarRegion::new(dev, 0))), bar, BAR_SIZE)?;
        tracing::info!(device = %label, virtio_type = kind, slot, bar = format_args!("{bar:#x}"), "virtio-pci device");
        Ok(())
    }

    /// A host function through VFIO: BARs allocated here and placed on the MMIO bus (the
    /// parts not mapped into the guest trap there).
    pub(super) fn add_vfio(
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
    pub(super) fn add_channel(
        &mut self,
        vm: &VmFd,
        slots: &mut MemorySlots,
        c: &ChannelConfig,
        gate: Arc<ChannelGate>,
        mmio_bus: &mut Bus,
    ) -> Result<(ChannelWiring, Arc<ChannelSlot>), MachineError> {
        let label = format!("channel {}", c.info.index);
        let size = c
            .fds
            .memory_size()
            .map_err(|e| MachineError::Sys("sizing channel memory", e))?;
        let regs_addr = self.alloc_bar(channel::REGS_SIZE, &label)?;
        let mem_addr = self.alloc_bar(size.max(0x1000).next_power_of_two(), &label)?;
        let dev = ChannelDevice::new(&c.info, regs_addr, mem_addr, size, gate, c.fds.kick.clone())?;
        let handle = dev.slot();
        let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
        // Not the kind: a slot keeps its place in a snapshot whatever it serves.
        let slot = self.add(dev.clone(), &format!("{label} {size:#x}"))?;
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
            kind = ?c.info.kind,
            "channel device"
        );
        Ok((wiring, handle))
    }

    pub(super) fn finish(self) -> Arc<Mutex<PciRoot>> {
        Arc::new(Mutex::new(self.root))
    }
}
