//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and their delivery
//! through KVM. Each vector owns a GSI with an MSI route (kept in [`IrqRouter`]) and an eventfd
//! registered as that GSI's irqfd, so device threads raise interrupts without exiting to the VMM.
//! A masked vector records a pending bit instead and fires when unmasked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::IOAPIC_PINS;

/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message-control bit: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message-control bit: all vectors masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;
/// Highest GSI KVM accepts in a routing table (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

/// Errors setting up interrupt delivery.
#[derive(Debug, Error)]
pub enum MsixError {
    /// No GSIs left.
    #[error("out of interrupt routes (GSIs)")]
    NoGsi,
    /// KVM_SET_GSI_ROUTING failed.
    #[error("KVM_SET_GSI_ROUTING failed")]
    Routing(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("KVM_IRQFD failed")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// eventfd creation failed.
    #[error("eventfd failed")]
    EventFd(#[source] std::io::Error),
    /// Building the routing table failed.
    #[error("cannot build the routing table")]
    Fam(#[source] vmm_sys_util::fam::Error),
}

/// An MSI-X table as saved in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Per vector: address low, address high, data, vector control.
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

#[derive(Default)]
struct RouterState {
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
}

/// The VM's GSI routing table: KVM's default PIC/IOAPIC routes plus one MSI route per vector.
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so every change rewrites all of it.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = addr as u32;
    e.u.msi.address_hi = (addr >> 32) as u32;
    e.u.msi.data = data;
    e
}

impl IrqRouter {
    /// A router for `vm`, whose in-kernel irqchip must already exist.
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouter {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    /// The VM this router programs.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a GSI for an MSI route (initially pointing nowhere useful).
    pub fn allocate_gsi(&self) -> Result<u32, MsixError> {
        let mut s = self.lock();
        if s.next_gsi >= MAX_GSI {
            return Err(MsixError::NoGsi);
        }
        let gsi = s.next_gsi;
        s.next_gsi += 1;
        s.msi.insert(gsi, (0, 0));
        self.commit(&s)?;
        Ok(gsi)
    }

    /// Points `gsi` at the MSI message (`addr`, `data`).
    pub fn set_msi(&self, gsi: u32, addr: u64, data: u32) -> Result<(), MsixError> {
        let mut s = self.lock();
        if s.msi.get(&gsi) == Some(&(addr, data)) {
            return Ok(());
        }
        s.msi.insert(gsi, (addr, data));
        self.commit(&s)
    }

    fn commit(&self, s: &RouterState) -> Result<(), MsixError> {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pin < 16 {
                let chip = if pin < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_route(pin, chip, pin % 8));
            }
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for (gsi, (addr, data)) in &s.msi {
            entries.push(msi_route(*gsi, *addr, *data));
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(MsixError::Fam)?;
        self.vm.set_gsi_routing(&table).map_err(MsixError::Routing)
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_CONTROL_MASKED != 0
    }
    fn addr(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// Direct mode: which vectors' irqfds KVM currently listens to.
    attached: Vec<bool>,
}

impl State {
    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[v].masked()
    }
}

/// The MSI-X vectors of one device.
pub struct Msix {
    router: Option<Arc<IrqRouter>>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    /// Something other than [`Msix::trigger`] writes the irqfds (a passed-through device):
    /// masking is then done by detaching a vector's irqfd from KVM (see [`Msix::new_direct`]).
    direct: bool,
    state: Mutex<State>,
}

impl Msix {
    /// `count` vectors, each with a GSI and a registered irqfd; all masked, MSI-X disabled.
    pub fn new(router: Arc<IrqRouter>, count: u16) -> Result<Arc<Self>, MsixError> {
        let (gsis, irqfds) = Self::allocate(&router, count)?;
        for (fd, gsi) in irqfds.iter().zip(&gsis) {
            router
                .vm()
                .register_irqfd(fd, *gsi)
                .map_err(MsixError::Irqfd)?;
        }
        Ok(Self::with_parts(Some(router), gsis, irqfds, false))
    }

    /// Vectors whose eventfds are signalled directly by a device outside the VMM (VFIO). The
    /// table is still emulated here; a vector's irqfd is attached to KVM only while it is
    /// deliverable (MSI-X on, function and vector unmasked). An event that arrives while it
    /// is detached stays counted in the eventfd, and KVM injects it when the irqfd is attached
    /// again, which gives the pending-until-unmasked behaviour of real MSI-X.
    pub fn new_direct(router: Arc<IrqRouter>, count: u16) -> Result<Arc<Self>, MsixError> {
        let (gsis, irqfds) = Self::allocate(&router, count)?;
        Ok(Self::with_parts(Some(router), gsis, irqfds, true))
    }

    fn allocate(router: &IrqRouter, count: u16) -> Result<(Vec<u32>, Vec<EventFd>), MsixError> {
        let mut gsis = Vec::new();
        let mut irqfds = Vec::new();
        for _ in 0..count {
            gsis.push(router.allocate_gsi()?);
            irqfds.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MsixError::EventFd)?);
        }
        Ok((gsis, irqfds))
    }

    /// Vectors not connected to KVM: triggering one only signals its eventfd. For device tests
    /// that run without a VM.
    pub fn detached(count: u16) -> Arc<Self> {
        let irqfds = (0..count)
            .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
            .collect::<Vec<_>>();
        Self::with_parts(None, vec![0; irqfds.len()], irqfds, false)
    }

    fn with_parts(
        router: Option<Arc<IrqRouter>>,
        gsis: Vec<u32>,
        irqfds: Vec<EventFd>,
        direct: bool,
    ) -> Arc<Self> {
        let n = gsis.len();
        Arc::new(Msix {
            router,
            gsis,
            irqfds,
            direct,
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        control: VECTOR_CONTROL_MASKED,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![false; n],
                enabled: false,
                function_masked: false,
                attached: vec![false; n],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vectors.
    pub fn count(&self) -> usize {
        self.gsis.len()
    }

    /// Size of the vector table in bytes.
    pub fn table_size(&self) -> u64 {
        self.count() as u64 * ENTRY_SIZE
    }

    /// Size of the pending-bit array in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.count() as u64).div_ceil(64) * 8
    }

    /// Updates enable and function-mask from the capability's message control.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.flush_pending(&mut s);
    }

    /// Raises `vector` (or marks it pending if masked). Out-of-range vectors (including
    /// virtio's NO_VECTOR, 0xffff) are ignored.
    pub fn trigger(&self, vector: u16) {
        let v = usize::from(vector);
        let mut s = self.lock();
        if v >= s.entries.len() {
            return;
        }
        if !s.deliverable(v) {
            s.pending[v] = true;
        } else if let Err(e) = self.irqfds[v].write(1) {
            tracing::warn!(vector, error = %e, "cannot raise MSI-X vector");
        }
    }

    fn flush_pending(&self, s: &mut State) {
        if self.direct {
            self.sync_direct(s);
            return;
        }
        if !s.enabled || s.function_masked {
            return;
        }
        for v in 0..s.entries.len() {
            if s.pending[v] && !s.entries[v].masked() {
                s.pending[v] = false;
                let _ = self.irqfds[v].write(1);
            }
        }
    }

    /// Direct mode: attach the irqfd of every deliverable vector to KVM, detach the others.
    fn sync_direct(&self, s: &mut State) {
        let Some(router) = &self.router else { return };
        for v in 0..s.entries.len() {
            let want = s.deliverable(v);
            if want == s.attached[v] {
                continue;
            }
            let (fd, gsi) = (&self.irqfds[v], self.gsis[v]);
            let result = if want {
                router.vm().register_irqfd(fd, gsi)
            } else {
                router.vm().unregister_irqfd(fd, gsi)
            };
            match result {
                Ok(()) => s.attached[v] = want,
                Err(e) => tracing::error!(vector = v, error = %e, "cannot (de)attach MSI-X irqfd"),
            }
        }
    }

    /// The eventfds of all vectors, in vector order (what a direct device signals).
    pub fn irqfds(&self) -> Vec<&EventFd> {
        self.irqfds.iter().collect()
    }

    /// Guest read of the vector table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let (index, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = s.entries.get(index) else {
            data.fill(0xff);
            return;
        };
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        bytes[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&e.control.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(field as usize + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write to the vector table (dword or qword accesses, as the spec allows).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let (index, field) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE) as usize,
        );
        let Some(entry) = s.entries.get(index).copied() else {
            return;
        };
        if field + data.len() > 16 {
            return;
        }
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&entry.addr_lo.to_le_bytes());
        bytes[4..8].copy_from_slice(&entry.addr_hi.to_le_bytes());
        bytes[8..12].copy_from_slice(&entry.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&entry.control.to_le_bytes());
        bytes[field..field + data.len()].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let new = Entry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            control: word(12) & VECTOR_CONTROL_MASKED,
        };
        s.entries[index] = new;
        if new.addr() != entry.addr() || new.data != entry.data {
            if let Some(Err(e)) = self
                .router
                .as_ref()
                .map(|r| r.set_msi(self.gsis[index], new.addr(), new.data))
            {
                tracing::error!(vector = index, error = %e, "cannot update MSI route");
            }
        }
        self.flush_pending(&mut s);
    }

    /// The eventfd behind `vector` (what KVM listens to as its irqfd).
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }

    /// The table, pending bits and control (for a snapshot).
    pub fn save_state(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            entries: s
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
        }
    }

    /// Restores a saved table (re-programming each vector's route), its pending bits and
    /// control. Pending vectors that are deliverable fire.
    pub fn restore_state(&self, saved: &MsixState) -> Result<(), String> {
        if saved.entries.len() != self.count() || saved.pending.len() != self.count() {
            return Err(format!(
                "{} MSI-X vectors saved, the device has {}",
                saved.entries.len(),
                self.count()
            ));
        }
        for (i, e) in saved.entries.iter().enumerate() {
            let mut bytes = [0u8; 16];
            for (k, w) in e.iter().enumerate() {
                bytes[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            self.write_table(i as u64 * ENTRY_SIZE, &bytes);
        }
        let mut s = self.lock();
        s.pending.clone_from(&saved.pending);
        s.enabled = saved.enabled;
        s.function_masked = saved.function_masked;
        self.flush_pending(&mut s);
        Ok(())
    }

    /// Guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            let mut v = 0u8;
            for bit in 0..8 {
                if s.pending.get(byte * 8 + bit).copied().unwrap_or(false) {
                    v |= 1 << bit;
                }
            }
            *b = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_entry(m: &Msix, v: u64, addr: u64, data: u32, masked: bool) {
        let base = v * ENTRY_SIZE;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let m = Msix::detached(2);
        // Disabled: everything pends.
        m.trigger(1);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(m.irqfd(1).expect("fd").read().is_err());
        m.set_control(CONTROL_ENABLE);
        // Still masked (reset state): nothing fires yet.
        assert!(m.irqfd(1).expect("fd").read().is_err());
        write_entry(&m, 1, 0xfee0_0000, 0x41, false);
        assert_eq!(m.irqfd(1).expect("fd").read().expect("fired"), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.trigger(1);
        assert_eq!(m.irqfd(1).expect("fd").read().expect("fired"), 1);
        // Function mask holds everything back.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(1);
        assert!(m.irqfd(1).expect("fd").read().is_err());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(m.irqfd(1).expect("fd").read().expect("fired"), 1);
    }

    #[test]
    fn table_reads_back_and_ignores_hostile_accesses() {
        let m = Msix::detached(1);
        write_entry(&m, 0, 0xfee0_1000, 0x4055, true);
        let mut e = [0u8; 16];
        m.read_table(0, &mut e);
        assert_eq!(&e[..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!(&e[8..12], &0x4055u32.to_le_bytes());
        assert_eq!(e[12], 1);
        // Out of range, straddling, oversized: ignored or 0xff.
        m.write_table(16, &[1, 2, 3, 4]);
        m.write_table(14, &[1, 2, 3, 4]);
        let mut out = [0u8; 4];
        m.read_table(64, &mut out);
        assert_eq!(out, [0xff; 4]);
        m.trigger(5);
        m.trigger(0xffff);
    }
}
