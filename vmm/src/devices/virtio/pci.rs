//! The modern virtio-pci transport (virtio 1.x, 4.1): a PCI function whose BAR 0 holds the
//! common configuration, ISR, device configuration, queue notification registers and the
//! MSI-X table, all described by vendor capabilities in configuration space.
//!
//! BAR 0 layout (64-bit, 32 KiB):
//!
//! | offset | size   | what |
//! |--------|--------|------|
//! | 0x0000 | 0x38   | common configuration |
//! | 0x1000 | 4      | ISR status |
//! | 0x2000 | 0x1000 | device-specific configuration |
//! | 0x3000 | 0x1000 | notify: queue *q* at 0x3000 + 4*q* (an ioeventfd each) |
//! | 0x4000 | 16/vec | MSI-X table |
//! | 0x6000 | 8/64 v | MSI-X pending bits |

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActiveQueue, DeviceFailure, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::pci::config::{MemoryBar, PciConfig, PciIdentity};
use crate::devices::pci::msix::{IrqRouter, Msix, MsixError};
use crate::devices::pci::PciDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// virtio's "no MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// PCI capability id of vendor-specific (virtio) capabilities.
const CAP_VENDOR: u8 = 0x09;
/// PCI capability id of MSI-X.
const CAP_MSIX: u8 = 0x11;
/// Capability id: PCI power management.
const CAP_PM: u8 = 0x01;
/// PMCSR power-state field (D0 = 0, D3hot = 3).
const PM_STATE_MASK: u16 = 0x3;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Errors creating the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// MSI-X setup failed.
    #[error(transparent)]
    Msix(#[from] MsixError),
    /// eventfd creation failed.
    #[error("eventfd failed")]
    EventFd(#[source] std::io::Error),
    /// ioeventfd registration failed.
    #[error("KVM_IOEVENTFD for queue {0} failed")]
    IoEvent(usize, #[source] kvm_ioctls::Error),
    /// BAR setup failed.
    #[error(transparent)]
    Config(#[from] crate::devices::pci::config::ConfigError),
}

#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max: u16) -> Self {
        QueueConfig {
            max,
            size: max,
            ready: false,
            vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Shared between the transport and device workers: a device error that needs a reset.
struct Failure {
    needs_reset: AtomicBool,
    msix: Arc<Msix>,
    config_vector: AtomicU16,
    isr: Arc<AtomicU8>,
}

impl DeviceFailure for Failure {
    fn needs_reset(&self, reason: &str) {
        tracing::error!(reason, "virtio device needs reset");
        self.needs_reset.store(true, Ordering::Release);
        self.isr.fetch_or(2, Ordering::AcqRel);
        self.msix
            .trigger(self.config_vector.load(Ordering::Acquire));
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msix: Arc<Msix>,
    msix_cap: usize,
    /// Offset of the power-management capability.
    pm_cap: usize,
    /// The function is in D3hot; going back to D0 resets it (PMCSR No_Soft_Reset is 0), which
    /// is how a guest resets one function on its own (`/sys/bus/pci/devices/*/reset`).
    d3hot: bool,
    notify: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    common: CommonRegs,
    isr: Arc<AtomicU8>,
    failure: Arc<Failure>,
    active: bool,
    /// Set while paused (or restored and not yet resumed): the device was active, and each
    /// ready queue's position (its used index, equal to the next available one since the
    /// workers completed everything they took).
    paused: Option<Vec<Option<u16>>>,
}

/// The common configuration registers the driver writes (besides the per-queue ones).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct CommonRegs {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
}

/// A virtio-pci function as saved in a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
struct VirtioPciState {
    config: Vec<u32>,
    d3hot: bool,
    queues: Vec<QueueConfig>,
    common: CommonRegs,
    isr: u8,
    needs_reset: bool,
    config_vector: u16,
    msix: crate::devices::pci::msix::MsixState,
    /// `Some` if the device was active: the queues' positions.
    positions: Option<Vec<Option<u16>>>,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (+ extra)
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciDevice {
    /// Wraps `device` as a PCI function with BAR 0 at `bar_addr` (aligned to [`BAR_SIZE`]).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        router: Arc<IrqRouter>,
        bar_addr: u64,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let class = match device_type {
            1 => (0x02, 0x00, 0x00),
            2 => (0x01, 0x80, 0x00),
            _ => (0xff, 0x00, 0x00),
        };
        let mut config = PciConfig::new(&PciIdentity {
            vendor: 0x1af4,
            device: 0x1040 + device_type as u16,
            revision: 1,
            class,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_memory_bar(MemoryBar {
            index: 0,
            addr: bar_addr,
            size: BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        })?;
        let queue_sizes = device.queue_max_sizes();
        let nqueues = queue_sizes.len();
        // One vector per queue plus one for configuration changes.
        let msix = Msix::new(router.clone(), nqueues as u16 + 1)?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &vendor_cap(CFG_ISR, ISR_OFFSET, 4, &[]), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
            &[],
        )?;
        let mut msix_body = ((msix.count() - 1) as u16).to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &msix_body, &[0x00, 0xc0])?;
        // PM 1.2 (version 3), D0 and D3hot only; PMCSR's power state is writable.
        let pm_cap = config.add_capability(
            CAP_PM,
            &[0x03, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0x00, 0x00, 0x03, 0x00, 0x00, 0x00],
        )?;

        let mut notify = Vec::with_capacity(nqueues);
        for q in 0..nqueues {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?;
            let addr = bar_addr + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            router
                .vm()
                .register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| TransportError::IoEvent(q, e))?;
            notify.push(fd);
        }
        let isr = Arc::new(AtomicU8::new(0));
        let failure = Arc::new(Failure {
            needs_reset: AtomicBool::new(false),
            msix: msix.clone(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: isr.clone(),
        });
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            msix,
            msix_cap,
            pm_cap,
            d3hot: false,
            notify,
            queues: queue_sizes.into_iter().map(QueueConfig::new).collect(),
            common: CommonRegs::default(),
            isr,
            failure,
            active: false,
            paused: None,
        })
    }

    fn status(&self) -> u8 {
        let mut s = self.common.status;
        if self.failure.needs_reset.load(Ordering::Acquire) {
            s |= status::NEEDS_RESET;
        }
        s
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.max).collect();
        self.queues = sizes.into_iter().map(QueueConfig::new).collect();
        // The configuration generation survives a reset (it only ever grows).
        self.common = CommonRegs {
            config_generation: self.common.config_generation,
            ..CommonRegs::default()
        };
        self.isr.store(0, Ordering::Release);
        self.failure.needs_reset.store(false, Ordering::Release);
        self.failure
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.common.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.common.driver_features & !offered == 0
                && self.common.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                tracing::warn!(
                    driver = format_args!("{:#x}", self.common.driver_features),
                    offered = format_args!("{:#x}", offered),
                    "driver features rejected"
                );
                value &= !status::FEATURES_OK;
            }
        }
        let newly_ok =
            value & status::DRIVER_OK != 0 && self.common.status & status::DRIVER_OK == 0;
        self.common.status = value;
        if newly_ok && !self.active {
            if let Err(reason) = self.activate() {
                self.failure.needs_reset(&reason);
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        self.activate_at(None)
    }

    /// Activates the device; `positions` (from a pause or a snapshot) sets where each queue
    /// resumes instead of at index 0.
    fn activate_at(&mut self, positions: Option<&[Option<u16>]>) -> Result<(), String> {
        if self.common.status & status::FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let event_idx = self.common.driver_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.ready {
                continue;
            }
            let mut q = Queue::new(qc.max).map_err(|e| format!("queue {i}: {e:?}"))?;
            q.set_size(qc.size);
            q.set_desc_table_address(Some(qc.desc as u32), Some((qc.desc >> 32) as u32));
            q.set_avail_ring_address(Some(qc.avail as u32), Some((qc.avail >> 32) as u32));
            q.set_used_ring_address(Some(qc.used as u32), Some((qc.used >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if let Some(p) = positions {
                let at = p
                    .get(i)
                    .copied()
                    .flatten()
                    .ok_or_else(|| format!("queue {i}: no saved position"))?;
                q.set_next_avail(at);
                q.set_next_used(at);
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: invalid size {} or rings outside guest memory",
                    qc.size
                ));
            }
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: {e}"))?;
            active.push(ActiveQueue {
                queue: q,
                notify,
                interrupt: Interrupt::new(self.msix.clone(), qc.vector),
            });
        }
        let failure: Arc<dyn DeviceFailure> = self.failure.clone();
        self.device
            .activate(
                self.mem.clone(),
                self.common.driver_features,
                active,
                failure,
            )
            .map_err(|e| e.to_string())?;
        self.active = true;
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.common.queue_select))
    }

    fn common_read(&mut self, offset: u64) -> u64 {
        let features = self.device.features();
        let nqueues = self.queues.len() as u64;
        let select = self.common.device_feature_select;
        let q = self
            .queues
            .get(usize::from(self.common.queue_select))
            .copied();
        match offset {
            0x00 => u64::from(self.common.device_feature_select),
            0x04 => match select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.common.driver_feature_select),
            0x0c => match self.common.driver_feature_select {
                0 => self.common.driver_features & 0xffff_ffff,
                1 => self.common.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.failure.config_vector.load(Ordering::Acquire)),
            0x12 => nqueues,
            0x14 => u64::from(self.status()),
            0x15 => u64::from(self.common.config_generation),
            0x16 => u64::from(self.common.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.common.queue_select),
            0x20 => q.map_or(0, |q| q.desc & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u64) {
        let v32 = value as u32;
        let v16 = value as u16;
        // Queue configuration is frozen once the driver is running.
        let running = self.common.status & status::DRIVER_OK != 0;
        let set_half = |field: &mut u64, high: bool| {
            *field = if high {
                (*field & 0xffff_ffff) | (u64::from(v32) << 32)
            } else {
                (*field & !0xffff_ffff) | u64::from(v32)
            }
        };
        match offset {
            0x00 => self.common.device_feature_select = v32,
            0x08 => self.common.driver_feature_select = v32,
            0x0c if self.common.status & status::FEATURES_OK == 0 => {
                match self.common.driver_feature_select {
                    0 => {
                        self.common.driver_features =
                            (self.common.driver_features & !0xffff_ffff) | u64::from(v32)
                    }
                    1 => {
                        self.common.driver_features =
                            (self.common.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
            }
            0x10 => {
                let vector = if usize::from(v16) < self.msix.count() {
                    v16
                } else {
                    NO_VECTOR
                };
                self.failure.config_vector.store(vector, Ordering::Release);
            }
            0x14 => self.set_status(value as u8),
            0x16 => self.common.queue_select = v16,
            _ if running => {}
            0x18 => {
                if let Some(q) = self.selected_queue() {
                    // The driver may shrink a queue; the transport validates on activation.
                    q.size = v16;
                }
            }
            0x1a => {
                let count = self.msix.count();
                if let Some(q) = self.selected_queue() {
                    q.vector = if usize::from(v16) < count {
                        v16
                    } else {
                        NO_VECTOR
                    };
                }
            }
            0x1c => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v16 == 1;
                }
            }
            0x20 | 0x24 => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.desc, offset == 0x24);
                }
            }
            0x28 | 0x2c => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.avail, offset == 0x2c);
                }
            }
            0x30 | 0x34 => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.used, offset == 0x34);
                }
            }
            _ => {}
        }
    }
}

fn to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let pmcsr = self.pm_cap + 4;
        if offset < pmcsr + 2 && offset + data.len() > pmcsr {
            let mut b = [0u8; 2];
            self.config.read(pmcsr, &mut b);
            let d3hot = u16::from_le_bytes(b) & PM_STATE_MASK == 3;
            if self.d3hot && !d3hot {
                tracing::info!("function reset by a D3hot to D0 transition");
                self.reset();
            }
            self.d3hot = d3hot;
        }
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let mut b = [0u8; 2];
            self.config.read(control, &mut b);
            self.msix.set_control(u16::from_le_bytes(b));
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => {
                if matches!(data.len(), 1 | 2 | 4) {
                    let v = self.common_read(o).to_le_bytes();
                    data.copy_from_slice(&v[..data.len()]);
                }
            }
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                if let Some(b) = data.first_mut() {
                    // Reading ISR acknowledges it.
                    *b = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.msix.pba_size()).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => {
                if matches!(data.len(), 1 | 2 | 4) {
                    self.common_write(o, to_u64(data));
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Normally caught by the ioeventfd in KVM; this is the slow path.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.notify.get(q) {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }

    fn pause(&mut self) {
        if !self.active {
            return;
        }
        // Stops the workers; they complete and publish what they took from the queues.
        self.device.reset();
        self.active = false;
        let positions = self
            .queues
            .iter()
            .map(|q| {
                q.ready.then(|| {
                    self.mem
                        .read_obj::<u16>(vm_memory::GuestAddress(q.used.wrapping_add(2)))
                        .ok()
                })?
            })
            .collect();
        self.paused = Some(positions);
    }

    fn resume(&mut self) {
        let Some(positions) = self.paused.take() else {
            return;
        };
        if let Err(reason) = self.activate_at(Some(&positions)) {
            self.failure.needs_reset(&reason);
            return;
        }
        // Completions published while paused raised no interrupt, and requests made just
        // before the pause may not have been seen: one interrupt and one notification per
        // queue (both harmless if there was nothing).
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready {
                self.msix.trigger(q.vector);
                if let Some(fd) = self.notify.get(i) {
                    let _ = fd.write(1);
                }
            }
        }
    }

    fn save_state(&mut self) -> Result<serde_json::Value, String> {
        if self.active {
            return Err("saved while running (not paused)".into());
        }
        let state = VirtioPciState {
            config: self.config.save_regs(),
            d3hot: self.d3hot,
            queues: self.queues.clone(),
            common: self.common,
            isr: self.isr.load(Ordering::Acquire),
            needs_reset: self.failure.needs_reset.load(Ordering::Acquire),
            config_vector: self.failure.config_vector.load(Ordering::Acquire),
            msix: self.msix.save_state(),
            positions: self.paused.clone(),
        };
        serde_json::to_value(state).map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: VirtioPciState =
            serde_json::from_value(state.clone()).map_err(|e| format!("virtio state: {e}"))?;
        if s.queues.len() != self.queues.len()
            || s.queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max != b.max)
        {
            return Err("queue count or sizes differ".into());
        }
        if s.common.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "driver features {:#x} not offered by this device",
                s.common.driver_features
            ));
        }
        self.config.restore_regs(&s.config)?;
        self.msix.restore_state(&s.msix)?;
        self.d3hot = s.d3hot;
        self.queues = s.queues;
        self.common = s.common;
        self.isr.store(s.isr, Ordering::Release);
        self.failure
            .needs_reset
            .store(s.needs_reset, Ordering::Release);
        self.failure
            .config_vector
            .store(s.config_vector, Ordering::Release);
        // Activated by `resume`, once the machine runs.
        self.paused = s.positions;
        Ok(())
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}
