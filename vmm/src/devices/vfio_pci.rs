//! A host PCI function given to the guest through VFIO.
//!
//! What the guest sees is the real function, with the parts a VMM must own virtualized:
//! - **BARs** live at addresses this VMM assigns; the BAR registers (and the expansion ROM,
//!   hidden) are emulated by a [`PciConfig`]. BAR pages are mapped straight into the guest
//!   (KVM memory slots over mmaps of the device file), except the pages holding the MSI-X table
//!   and pending-bit array, which trap here; BARs the host will not let us map trap entirely
//!   and are forwarded with `pread`/`pwrite`.
//! - **Interrupts** are MSI-X only: the guest programs an emulated table ([`Msix`] in direct
//!   mode) and the host's vfio-pci signals one eventfd per vector, which is KVM's irqfd for
//!   that vector's GSI: no exit to this process per interrupt. The MSI capability is unlinked
//!   from the capability list and the interrupt pin reads 0 (no INTx).
//! - Everything else in configuration space (command register, PCIe and power-management
//!   capabilities, ...) goes to the device, through the kernel's own vfio-pci filtering.
//!
//! The function is reset when it is opened (before the guest runs). Letting go of it is the
//! kernel's job, the same whether this process exits or is killed: vfio-pci disables its
//! interrupts, clears bus mastering and resets the function when the device file closes, which
//! happens before the container (and so the IOMMU mappings of guest RAM) is released. A driver
//! VM killed mid-DMA therefore leaves a quiesced device.

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_GROUP,
    KVM_DEV_VFIO_GROUP_ADD,
};
use kvm_ioctls::{DeviceFd, VmFd};
use std::os::fd::AsRawFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::pci::config::{
    MemoryBar, PciConfig, PciIdentity, BAR0, CAPABILITIES_POINTER, COMMAND, CONFIG_SIZE,
    INTERRUPT_LINE,
};
use crate::devices::pci::msix::{IrqRouter, Msix, MsixError, CONTROL_ENABLE};
use crate::devices::pci::PciDevice;
use crate::kvm::slots::MemorySlots;
use crate::memory::GuestRam;
use crate::vfio::container::Container;
use crate::vfio::device::{VfioDevice, CONFIG_REGION};
use crate::vfio::host::{self, PciAddress};
use crate::vfio::VfioError;

const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_MSIX: u8 = 0x11;
/// Expansion ROM BAR.
const ROM_BAR: usize = 0x30;
const PAGE: u64 = 4096;

/// Errors attaching a passed-through function to a VM.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// A BAR's pages cannot get a memory slot.
    #[error("passthrough of {0}: BAR pages")]
    Slot(PciAddress, #[source] crate::kvm::KvmError),
    /// Host-side VFIO problem.
    #[error("passthrough of {address}")]
    Vfio {
        /// The function.
        address: PciAddress,
        /// Cause.
        #[source]
        source: VfioError,
    },
    /// Interrupt setup failed.
    #[error("MSI-X for passed-through {0}")]
    Msix(PciAddress, #[source] MsixError),
    /// A BAR the guest cannot be given.
    #[error("passed-through {address}: BAR {bar} has an unusable size {size:#x}")]
    BadBar {
        /// The function.
        address: PciAddress,
        /// BAR index.
        bar: usize,
        /// Size the host reported.
        size: u64,
    },
}

/// A memory BAR of the physical function.
#[derive(Debug, Clone, Copy)]
pub struct PhysBar {
    /// BAR index.
    pub index: usize,
    /// Size (a power of two).
    pub size: u64,
    /// 64-bit BAR.
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
    /// The host lets us mmap it.
    pub mappable: bool,
}

/// Where the MSI-X structures are.
#[derive(Debug, Clone, Copy)]
struct MsixLayout {
    cap: usize,
    vectors: u16,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
}

impl MsixLayout {
    fn table_size(&self) -> u64 {
        u64::from(self.vectors) * 16
    }
    fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
    /// The trapped (page-aligned) ranges in `bar`.
    fn trapped(&self, bar: usize) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for (b, off, size) in [
            (self.table_bar, self.table_offset, self.table_size()),
            (self.pba_bar, self.pba_offset, self.pba_size()),
        ] {
            if b == bar {
                let start = off / PAGE * PAGE;
                v.push((start, (off + size).next_multiple_of(PAGE)));
            }
        }
        v
    }
}

/// A function opened on the host and reset, not yet attached to a VM. Opening first lets a
/// bad address or an unusable host fail before any VM exists.
pub struct OpenedFunction {
    address: PciAddress,
    device: VfioDevice,
    container: Container,
    config: [u8; CONFIG_SIZE],
    bars: Vec<PhysBar>,
    msix: Option<MsixLayout>,
    /// Capability-list pointer bytes to show instead of the device's (MSI unlinked).
    pointer_patches: Vec<(usize, u8)>,
}

/// Parses the capability list of a configuration space: the MSI-X layout and the pointer
/// bytes that unlink MSI. A malformed list (loops, pointers out of range) ends the walk.
fn parse_capabilities(cfg: &[u8; CONFIG_SIZE]) -> (Option<MsixLayout>, Vec<(usize, u8)>) {
    let mut kept = Vec::new();
    let mut msix = None;
    let mut ptr = usize::from(cfg[CAPABILITIES_POINTER] & 0xfc);
    let mut seen = [false; CONFIG_SIZE];
    // Pointers are dword-aligned bytes, so every capability header (id, next) fits.
    while ptr >= 0x40 && !seen[ptr] {
        seen[ptr] = true;
        let id = cfg[ptr];
        if id == CAP_ID_MSIX && ptr + 12 <= CONFIG_SIZE {
            let word = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
            let control = u16::from_le_bytes([cfg[ptr + 2], cfg[ptr + 3]]);
            let (table, pba) = (word(ptr + 4), word(ptr + 8));
            msix = Some(MsixLayout {
                cap: ptr,
                vectors: (control & 0x7ff) + 1,
                table_bar: (table & 7) as usize,
                table_offset: u64::from(table & !7),
                pba_bar: (pba & 7) as usize,
                pba_offset: u64::from(pba & !7),
            });
        }
        if id != CAP_ID_MSI {
            kept.push(ptr);
        }
        ptr = usize::from(cfg[ptr + 1] & 0xfc);
    }
    let mut patches = vec![(CAPABILITIES_POINTER, kept.first().map_or(0, |p| *p as u8))];
    for (i, p) in kept.iter().enumerate() {
        patches.push((p + 1, kept.get(i + 1).map_or(0, |n| *n as u8)));
    }
    (msix, patches)
}

impl OpenedFunction {
    /// Checks the function under sysfs root `sys`, opens its group and device, and resets it.
    pub fn open(sys: &Path, address: PciAddress) -> Result<Self, VfioPciError> {
        let vfio = |source| VfioPciError::Vfio { address, source };
        let hostdev = host::check(sys, address).map_err(vfio)?;
        let container = Container::open(&hostdev).map_err(vfio)?;
        let device =
            VfioDevice::new(container.device_file(&hostdev).map_err(vfio)?).map_err(vfio)?;
        match device.reset().map_err(vfio)? {
            true => tracing::info!(%address, "function reset"),
            false => tracing::warn!(%address, "function offers no reset; starting it as found"),
        }
        let mut config = [0u8; CONFIG_SIZE];
        device.read(CONFIG_REGION, 0, &mut config).map_err(vfio)?;
        let mut bars = Vec::new();
        let mut index = 0;
        while index < 6 {
            let off = BAR0 + index * 4;
            let reg = u32::from_le_bytes([
                config[off],
                config[off + 1],
                config[off + 2],
                config[off + 3],
            ]);
            let region = device.region(index as u32);
            let is_64bit = reg & 1 == 0 && (reg >> 1) & 3 == 2;
            if region.size == 0 {
                index += 1;
                continue;
            }
            if reg & 1 == 1 {
                tracing::warn!(%address, bar = index, "I/O BAR not supported; hidden from the guest");
                index += 1;
                continue;
            }
            if !region.size.is_power_of_two() || region.size < 16 {
                return Err(VfioPciError::BadBar {
                    address,
                    bar: index,
                    size: region.size,
                });
            }
            bars.push(PhysBar {
                index,
                size: region.size,
                is_64bit,
                prefetchable: reg & 8 != 0,
                mappable: region.mmap,
            });
            index += if is_64bit { 2 } else { 1 };
        }
        let (msix, pointer_patches) = parse_capabilities(&config);
        if let Some(m) = &msix {
            if u32::from(m.vectors) > device.msix_count() {
                tracing::warn!(%address, table = m.vectors, host = device.msix_count(), "MSI-X table larger than the host allows");
            }
        }
        Ok(OpenedFunction {
            address,
            device,
            container,
            config,
            bars,
            msix,
            pointer_patches,
        })
    }

    /// The function's address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// Its memory BARs.
    pub fn bars(&self) -> &[PhysBar] {
        &self.bars
    }
}

/// Resources of a VM that an attached function uses.
pub struct AttachContext<'a> {
    /// The VM.
    pub vm: &'a VmFd,
    /// Its RAM (mapped for DMA).
    pub ram: &'a GuestRam,
    /// Its interrupt routes.
    pub router: &'a Arc<IrqRouter>,
    /// Its memory slots (BAR pages mapped into the guest go there).
    pub slots: &'a mut MemorySlots,
}

/// The function as the guest's PCI bus sees it.
pub struct VfioPci {
    // Drop order: the BAR pages mapped into the guest are held by the VM's memory slots and
    // go first (with the VM); then the device file
    // (the kernel quiesces and resets the function), then the container (DMA unmapped only
    // after that).
    _kvm_device: Option<DeviceFd>,
    device: VfioDevice,
    _container: Container,
    address: PciAddress,
    virt: PciConfig,
    msix_layout: Option<MsixLayout>,
    msix: Option<Arc<Msix>>,
    msix_control: u16,
    pointer_patches: Vec<(usize, u8)>,
}

impl VfioPci {
    /// Attaches `f` to a VM with its BARs at `bar_addrs` (one per [`OpenedFunction::bars`]
    /// entry, each aligned to at least its size and a page).
    pub fn attach(
        f: OpenedFunction,
        bar_addrs: &[u64],
        ctx: AttachContext<'_>,
    ) -> Result<Self, VfioPciError> {
        let address = f.address;
        let vfio = |source| VfioPciError::Vfio { address, source };
        let OpenedFunction {
            device,
            mut container,
            config,
            bars,
            msix: msix_layout,
            pointer_patches,
            ..
        } = f;

        // DMA: all of guest RAM at IOVA = guest-physical address.
        for region in ctx.ram.memory().iter() {
            let host = ctx
                .ram
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|_| vfio(VfioError::Unsupported("guest RAM has no host mapping")))?;
            // SAFETY: guest RAM stays mapped for the life of the machine, which owns both the
            // RAM and this device and drops the device (closing the container) first.
            unsafe { container.map_dma(region.start_addr().0, host as u64, region.len()) }
                .map_err(vfio)?;
        }
        // KVM's VFIO device: lets KVM know DMA may be non-coherent.
        let kvm_device = attach_kvm_vfio(ctx.vm, &container);
        if kvm_device.is_none() {
            tracing::warn!(%address, "KVM VFIO device unavailable; assuming coherent DMA");
        }

        let w = |o: usize| u16::from_le_bytes([config[o], config[o + 1]]);
        let mut virt = PciConfig::new(&PciIdentity {
            vendor: w(0),
            device: w(2),
            revision: config[8],
            class: (config[0xb], config[0xa], config[9]),
            subsystem_vendor: w(0x2c),
            subsystem: w(0x2e),
        });
        for (bar, addr) in bars.iter().zip(bar_addrs) {
            virt.add_memory_bar(MemoryBar {
                index: bar.index,
                addr: *addr,
                size: bar.size,
                is_64bit: bar.is_64bit,
                prefetchable: bar.prefetchable,
            })
            .map_err(|_| VfioPciError::BadBar {
                address,
                bar: bar.index,
                size: bar.size,
            })?;
            if !bar.mappable || bar.size < PAGE {
                continue;
            }
            let trapped = msix_layout
                .map(|m| m.trapped(bar.index))
                .unwrap_or_default();
            for (start, end) in mapped_ranges(bar.size, &trapped) {
                let map = device
                    .mmap(bar.index as u32, start, end - start)
                    .map_err(vfio)?;
                let (guest, len) = (addr + start, map.len());
                let slot = ctx
                    .slots
                    .map("BAR pages", guest, Box::new(map))
                    .map_err(|e| VfioPciError::Slot(address, e))?;
                tracing::info!(%address, bar = bar.index, guest = format_args!("{guest:#x}"), len = format_args!("{len:#x}"), slot, "BAR pages mapped into the guest");
            }
        }
        let msix = match msix_layout {
            Some(m) => Some(
                Msix::new_direct(ctx.router.clone(), m.vectors)
                    .map_err(|e| VfioPciError::Msix(address, e))?,
            ),
            None => None,
        };
        let msix_control = msix_layout
            .map(|m| u16::from_le_bytes([config[m.cap + 2], config[m.cap + 3]]) & 0x7ff)
            .unwrap_or(0);
        Ok(VfioPci {
            _kvm_device: kvm_device,
            device,
            _container: container,
            address,
            virt,
            msix_layout,
            msix,
            msix_control,
            pointer_patches,
        })
    }

    /// The byte the guest sees at `off` if it is virtualized, `None` if it is the device's.
    fn virtual_byte(&self, off: usize) -> Option<u8> {
        let mut b = [0u8];
        if (BAR0..BAR0 + 24).contains(&off)
            || (ROM_BAR..ROM_BAR + 4).contains(&off)
            || off == INTERRUPT_LINE
        {
            self.virt.read(off, &mut b);
            return Some(b[0]);
        }
        if off == INTERRUPT_LINE + 1 {
            return Some(0);
        }
        if let Some((_, v)) = self.pointer_patches.iter().find(|(o, _)| *o == off) {
            return Some(*v);
        }
        let m = self.msix_layout?;
        if off == m.cap + 2 || off == m.cap + 3 {
            return Some(self.msix_control.to_le_bytes()[off - m.cap - 2]);
        }
        None
    }

    fn write_msix_control(&mut self, offset: usize, data: &[u8]) {
        let (Some(m), Some(msix)) = (self.msix_layout, self.msix.clone()) else {
            return;
        };
        let mut bytes = self.msix_control.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(j) = (offset + i).checked_sub(m.cap + 2).filter(|j| *j < 2) {
                bytes[j] = *b;
            }
        }
        // Only enable and function-mask are writable; the table size is read-only.
        let new = (u16::from_le_bytes(bytes) & 0xc000) | (self.msix_control & 0x7ff);
        let was_enabled = self.msix_control & CONTROL_ENABLE != 0;
        let enable = new & CONTROL_ENABLE != 0;
        self.msix_control = new;
        // The device's vectors go off before the emulated table stops delivering, and come on
        // after it is ready to.
        let (off, on) = (was_enabled && !enable, enable && !was_enabled);
        if off {
            if let Err(e) = self.device.set_msix(&[]) {
                tracing::error!(address = %self.address, error = %e, "cannot disable MSI-X on the device");
            }
        }
        msix.set_control(new);
        if on {
            // Never more vectors than the host grants (the table may advertise more).
            let mut fds = msix.irqfds();
            fds.truncate(self.device.msix_count() as usize);
            if let Err(e) = self.device.set_msix(&fds) {
                tracing::error!(address = %self.address, error = %e, "cannot enable MSI-X on the device");
            }
        }
    }

    /// The MSI-X structure (table or PBA) `bar`+`offset` falls in, with the offset inside it.
    fn msix_hit(&self, bar: usize, offset: u64) -> Option<(bool, u64)> {
        let m = self.msix_layout?;
        if bar == m.table_bar && (m.table_offset..m.table_offset + m.table_size()).contains(&offset)
        {
            return Some((true, offset - m.table_offset));
        }
        if bar == m.pba_bar && (m.pba_offset..m.pba_offset + m.pba_size()).contains(&offset) {
            return Some((false, offset - m.pba_offset));
        }
        None
    }
}

/// The page-aligned pieces of a BAR of `size` bytes left after removing `trapped` ranges.
fn mapped_ranges(size: u64, trapped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = vec![(0, size)];
    for (ts, te) in trapped {
        out = out
            .into_iter()
            .flat_map(|(s, e)| {
                if *te <= s || *ts >= e {
                    vec![(s, e)]
                } else {
                    [(s, (*ts).max(s)), ((*te).min(e), e)]
                        .into_iter()
                        .filter(|(a, b)| b > a)
                        .collect()
                }
            })
            .collect();
    }
    out
}

fn attach_kvm_vfio(vm: &VmFd, container: &Container) -> Option<DeviceFd> {
    let mut create = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let dev = vm.create_device(&mut create).ok()?;
    let group_fd: i32 = container.group_file().as_raw_fd();
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_DEV_VFIO_GROUP,
        attr: u64::from(KVM_DEV_VFIO_GROUP_ADD),
        addr: &group_fd as *const i32 as u64,
    };
    dev.set_device_attr(&attr).ok()?;
    Some(dev)
}

impl PciDevice for VfioPci {
    fn config(&self) -> &PciConfig {
        &self.virt
    }

    fn save_state(&mut self) -> Result<serde_json::Value, String> {
        Err("a passed-through function's state lives in the hardware: not in a snapshot".into())
    }

    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("a passed-through function cannot be restored from a snapshot".into())
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset.saturating_add(data.len()) > CONFIG_SIZE
            || self
                .device
                .read(CONFIG_REGION, offset as u64, data)
                .is_err()
        {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = self.virtual_byte(offset + i) {
                *b = v;
            }
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if offset.saturating_add(data.len()) > CONFIG_SIZE {
            return;
        }
        let in_range = |lo: usize, hi: usize| offset < hi && offset + data.len() > lo;
        if in_range(BAR0, BAR0 + 24)
            || in_range(ROM_BAR, ROM_BAR + 4)
            || in_range(INTERRUPT_LINE, INTERRUPT_LINE + 2)
        {
            // Emulated registers (read-only ones are protected by the write masks).
            self.virt.write(offset, data);
            return;
        }
        if let Some(m) = self.msix_layout {
            if in_range(m.cap + 2, m.cap + 4) {
                self.write_msix_control(offset, data);
                return;
            }
        }
        if in_range(COMMAND, COMMAND + 2) {
            // Keep the memory-enable bit the BAR regions check.
            self.virt.write(offset, data);
        }
        if let Err(e) = self.device.write(CONFIG_REGION, offset as u64, data) {
            tracing::warn!(address = %self.address, error = %e, "configuration write failed");
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (self.msix_hit(bar, offset), &self.msix) {
            (Some((true, o)), Some(m)) => m.read_table(o, data),
            (Some((false, o)), Some(m)) => m.read_pba(o, data),
            _ => {
                if self.device.read(bar as u32, offset, data).is_err() {
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (self.msix_hit(bar, offset), &self.msix) {
            (Some((true, o)), Some(m)) => m.write_table(o, data),
            (Some((false, _)), Some(_)) => {}
            _ => {
                if let Err(e) = self.device.write(bar as u32, offset, data) {
                    tracing::warn!(address = %self.address, bar, error = %e, "BAR write failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_pieces_skip_the_msix_pages() {
        assert_eq!(
            mapped_ranges(0x4000, &[(0x2000, 0x3000)]),
            vec![(0, 0x2000), (0x3000, 0x4000)]
        );
        assert_eq!(
            mapped_ranges(0x4000, &[(0x2000, 0x3000), (0x3000, 0x4000)]),
            vec![(0, 0x2000)]
        );
        assert_eq!(mapped_ranges(0x2000, &[(0, 0x2000)]), vec![]);
        assert_eq!(mapped_ranges(0x2000, &[]), vec![(0, 0x2000)]);
    }

    /// A config space with capabilities PM (0x40) -> MSI (0x50) -> MSI-X (0x60) -> PCIe (0x70).
    fn config_with_caps() -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[CAPABILITIES_POINTER] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x50] = CAP_ID_MSI;
        c[0x51] = 0x60;
        c[0x60] = CAP_ID_MSIX;
        c[0x61] = 0x70;
        c[0x62..0x64].copy_from_slice(&64u16.to_le_bytes()); // 65 vectors
        c[0x64..0x68].copy_from_slice(&0x2000u32.to_le_bytes()); // table: BAR 0 + 0x2000
        c[0x68..0x6c].copy_from_slice(&0x3000u32.to_le_bytes()); // PBA: BAR 0 + 0x3000
        c[0x70] = 0x10;
        c
    }

    #[test]
    fn msi_is_unlinked_and_msix_found() {
        let (m, patches) = parse_capabilities(&config_with_caps());
        let m = m.expect("msix");
        assert_eq!(
            (m.cap, m.vectors, m.table_bar, m.table_offset),
            (0x60, 65, 0, 0x2000)
        );
        assert_eq!((m.pba_bar, m.pba_offset, m.pba_size()), (0, 0x3000, 16));
        assert_eq!(
            patches,
            vec![
                (CAPABILITIES_POINTER, 0x40),
                (0x41, 0x60),
                (0x61, 0x70),
                (0x71, 0)
            ]
        );
        assert_eq!(m.trapped(0), vec![(0x2000, 0x3000), (0x3000, 0x4000)]);
        assert!(m.trapped(2).is_empty());
    }

    #[test]
    fn hostile_capability_lists_end_the_walk() {
        let mut c = [0u8; CONFIG_SIZE];
        c[CAPABILITIES_POINTER] = 0x40;
        c[0x40] = 0x09;
        c[0x41] = 0x40; // loops to itself
        let (m, patches) = parse_capabilities(&c);
        assert!(m.is_none());
        assert_eq!(patches, vec![(CAPABILITIES_POINTER, 0x40), (0x41, 0)]);
        // The last dword holds a capability; an MSI-X there would not fit and is ignored.
        c[0x41] = 0xfc;
        c[0xfc] = CAP_ID_MSIX;
        c[0xfd] = 0x40; // and loops back
        let (m, patches) = parse_capabilities(&c);
        assert!(m.is_none());
        assert_eq!(
            patches,
            vec![(CAPABILITIES_POINTER, 0x40), (0x41, 0xfc), (0xfd, 0)]
        );
        c[CAPABILITIES_POINTER] = 0x10; // points into the header
        assert_eq!(parse_capabilities(&c).1, vec![(CAPABILITIES_POINTER, 0)]);
    }
}
