//! The PCI platform: one root bus (bus 0) reached through configuration mechanism #1
//! (ports 0xCF8/0xCFC), a host bridge at 00:00.0, and devices with memory BARs whose MMIO
//! regions sit on the machine's MMIO bus. Interrupts are MSI-X only ([`msix`]).

pub mod config;
pub mod msix;
pub mod root;

use std::sync::{Arc, Mutex};

use crate::devices::bus::BusDevice;
use config::PciConfig;

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    /// Its configuration space (read side).
    fn config(&self) -> &PciConfig;
    /// Guest write to configuration space; the default applies the write masks.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Guest read from configuration space.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// Guest read inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write inside BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Stops the device's own activity (workers finish what they took from the guest and
    /// publish it) so that its state and guest memory can be saved. vCPUs are paused.
    fn pause(&mut self) {}

    /// Undoes [`Self::pause`] (and starts a restored device): workers run again.
    fn resume(&mut self) {}

    /// The device's state for a snapshot (after [`Self::pause`]). By default only the
    /// configuration space: right for functions whose other state is fixed at creation.
    fn save_state(&mut self) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!({ "config": self.config().save_regs() }))
    }

    /// Restores [`Self::save_state`]'s result into a device built from the same configuration.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String>;
}

/// Reads the `config` registers of a saved state (the default [`PciDevice::save_state`]).
pub fn saved_config(state: &serde_json::Value) -> Result<Vec<u32>, String> {
    serde_json::from_value(state["config"].clone()).map_err(|e| format!("config space: {e}"))
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Adapter that puts one BAR of a PCI function on the MMIO bus.
pub struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BarRegion {
    /// The MMIO view of `bar` of `device`.
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        BarRegion { device, bar }
    }
}

fn lock(dev: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut dev = lock(&self.device);
        if dev.config().memory_enabled() {
            dev.bar_read(self.bar, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut dev = lock(&self.device);
        if dev.config().memory_enabled() {
            dev.bar_write(self.bar, offset, data);
        }
    }
}

/// The host bridge at 00:00.0: identity only, so the kernel's sanity check of configuration
/// mechanism #1 finds a host-bridge-class function.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// A generic host bridge (the PCI-SIG id Red Hat registered for virtual PCIe host bridges).
    pub fn new() -> Self {
        HostBridge {
            config: PciConfig::new(&config::PciIdentity {
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0x1b36,
                subsystem: 0x0008,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.config.restore_regs(&saved_config(state)?)
    }
}
