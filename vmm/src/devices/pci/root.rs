//! Configuration mechanism #1: the guest writes a function address to 0xCF8 and accesses that
//! function's configuration dword through 0xCFC..=0xCFF. Only bus 0, function 0 of each slot.

use super::{PciDevice, SharedPciDevice};
use crate::devices::bus::BusDevice;

/// Number of device slots on bus 0.
pub const SLOTS: usize = 32;
/// Offset of the data window relative to 0xCF8.
const DATA_OFFSET: u64 = 4;
const ENABLE: u32 = 1 << 31;

/// The root bus and its configuration-access ports (register at 0xCF8, length 8).
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// An empty bus.
    pub fn new() -> Self {
        PciRoot {
            slots: vec![None; SLOTS],
            address: 0,
        }
    }

    /// Places `device` in the first free slot; returns the slot number.
    pub fn add(&mut self, device: SharedPciDevice) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(device);
        Some(slot)
    }

    /// The function the address register selects, and the register offset in it.
    fn devices(&self) -> impl Iterator<Item = &SharedPciDevice> {
        self.slots.iter().flatten()
    }

    /// Pauses every function (see [`PciDevice::pause`]).
    pub fn pause_all(&self) {
        self.devices().for_each(|d| lock(d).pause());
    }

    /// Resumes every function (see [`PciDevice::resume`]).
    pub fn resume_all(&self) {
        self.devices().for_each(|d| lock(d).resume());
    }

    /// The configuration address latch and every function's state, in slot order.
    pub fn save_state(&self) -> Result<serde_json::Value, (usize, String)> {
        let mut functions = Vec::new();
        for (slot, d) in self.slots.iter().enumerate() {
            if let Some(d) = d {
                functions.push(lock(d).save_state().map_err(|e| (slot, e))?);
            }
        }
        Ok(serde_json::json!({ "address": self.address, "functions": functions }))
    }

    /// Restores [`Self::save_state`]'s result into a bus built from the same configuration.
    pub fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), (usize, String)> {
        let functions = state["functions"]
            .as_array()
            .ok_or((0, "no functions saved".to_string()))?;
        let present: Vec<usize> = (0..SLOTS).filter(|s| self.slots[*s].is_some()).collect();
        if functions.len() != present.len() {
            return Err((
                0,
                format!(
                    "{} functions saved, {} here",
                    functions.len(),
                    present.len()
                ),
            ));
        }
        for (slot, saved) in present.into_iter().zip(functions) {
            if let Some(d) = &self.slots[slot] {
                lock(d).restore_state(saved).map_err(|e| (slot, e))?;
            }
        }
        self.address = state["address"]
            .as_u64()
            .and_then(|a| u32::try_from(a).ok())
            .ok_or((0, "bad configuration address".to_string()))?;
        Ok(())
    }

    fn selected(&self) -> Option<(&SharedPciDevice, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let slot = ((self.address >> 11) & 0x1f) as usize;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        let reg = (self.address & 0xfc) as usize;
        self.slots[slot].as_ref().map(|d| (d, reg))
    }
}

fn lock(dev: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < DATA_OFFSET {
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        let within = (offset - DATA_OFFSET) as usize;
        match self.selected() {
            Some((dev, reg)) if within + data.len() <= 4 => {
                lock(dev).config_read(reg + within, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < DATA_OFFSET {
            if offset == 0 && data.len() == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        let within = (offset - DATA_OFFSET) as usize;
        if let Some((dev, reg)) = self.selected() {
            if within + data.len() <= 4 {
                lock(dev).config_write(reg + within, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::HostBridge;
    use std::sync::{Arc, Mutex};

    fn select(root: &mut PciRoot, slot: u32, reg: u32) {
        root.write(0, &(ENABLE | (slot << 11) | reg).to_le_bytes());
    }

    #[test]
    fn reads_host_bridge_and_empty_slots() {
        let mut root = PciRoot::new();
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), Some(0));
        select(&mut root, 0, 0);
        let mut id = [0u8; 4];
        root.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        // Byte access inside the dword (class code high byte at 0x0b).
        select(&mut root, 0, 8);
        let mut class = [0u8; 1];
        root.read(4 + 3, &mut class);
        assert_eq!(class[0], 0x06);
        select(&mut root, 5, 0);
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        // Disabled address, other buses and functions read as absent.
        root.write(0, &((1u32 << 16) | ENABLE).to_le_bytes());
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        root.write(0, &0u32.to_le_bytes());
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        // Misaligned, overlong accesses do not panic.
        let mut wide = [0u8; 8];
        root.read(6, &mut wide);
        root.write(7, &[1, 2, 3, 4]);
        root.write(2, &[1]);
    }
}
