//! A type-0 PCI configuration space (256 bytes): identity registers, BARs with sizing
//! semantics, a capability list, and per-bit write masks so guest writes can only change what
//! real hardware would let them change.

/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Offset of the capability pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Offset of the interrupt line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Status bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Command bits a guest may toggle: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x1 | 0x2 | 0x4 | 0x400;
/// First byte available for capabilities.
const CAPABILITIES_START: usize = 0x40;
/// Size of the configuration space.
pub const CONFIG_SIZE: usize = 256;

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciIdentity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code: (class, subclass, programming interface).
    pub class: (u8, u8, u8),
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// A memory BAR as assigned by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBar {
    /// BAR index (0..=5; a 64-bit BAR also uses index + 1).
    pub index: usize,
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes (a power of two, at least 16).
    pub size: u64,
    /// Whether the BAR is 64-bit.
    pub is_64bit: bool,
    /// Whether reads have no side effects (the OS may map it write-combining).
    pub prefetchable: bool,
}

/// Errors building a configuration space (VMM bugs, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Bad BAR index, size or alignment.
    #[error("invalid BAR {index}: addr {addr:#x} size {size:#x}")]
    InvalidBar {
        /// Index.
        index: usize,
        /// Address.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// Capabilities do not fit.
    #[error("capability list is full")]
    NoCapabilitySpace,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct PciConfig {
    regs: [u32; CONFIG_SIZE / 4],
    writable: [u32; CONFIG_SIZE / 4],
    bars: Vec<MemoryBar>,
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfig {
    /// A function with the given identity, no BARs and no capabilities.
    pub fn new(id: &PciIdentity) -> Self {
        let mut c = PciConfig {
            regs: [0; CONFIG_SIZE / 4],
            writable: [0; CONFIG_SIZE / 4],
            bars: Vec::new(),
            next_capability: CAPABILITIES_START,
            last_capability: None,
        };
        c.regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        c.regs[2] = u32::from(id.revision)
            | (u32::from(id.class.2) << 8)
            | (u32::from(id.class.1) << 16)
            | (u32::from(id.class.0) << 24);
        c.regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        c.writable[COMMAND / 4] = COMMAND_WRITABLE;
        // Interrupt line is scratch for the OS; interrupt pin is 0 (no INTx) unless set.
        c.writable[INTERRUPT_LINE / 4] = 0xff;
        c
    }

    /// Adds a memory BAR at a fixed address.
    pub fn add_memory_bar(&mut self, bar: MemoryBar) -> Result<(), ConfigError> {
        let bad = ConfigError::InvalidBar {
            index: bar.index,
            addr: bar.addr,
            size: bar.size,
        };
        let last_index = bar.index + usize::from(bar.is_64bit);
        if last_index > 5
            || !bar.size.is_power_of_two()
            || bar.size < 16
            || bar.addr % bar.size != 0
            || (!bar.is_64bit && bar.addr + bar.size > 1 << 32)
            || self.bars.iter().any(|b| {
                let b_last = b.index + usize::from(b.is_64bit);
                b.index <= last_index && bar.index <= b_last
            })
        {
            return Err(bad);
        }
        let reg = BAR0 / 4 + bar.index;
        let mask = !(bar.size - 1);
        let kind = if bar.is_64bit { 0b100 } else { 0 } | if bar.prefetchable { 0b1000 } else { 0 };
        self.regs[reg] = (bar.addr as u32) | kind;
        self.writable[reg] = mask as u32 & !0xf;
        if bar.is_64bit {
            self.regs[reg + 1] = (bar.addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars.push(bar);
        Ok(())
    }

    /// The BARs as assigned by the VMM.
    pub fn bars(&self) -> &[MemoryBar] {
        &self.bars
    }

    /// The address a BAR currently holds (it differs from the assigned one while the guest
    /// sizes it, or if the guest tried to move it).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.regs[reg + 1]) << 32
        } else {
            0
        };
        Some(high | low)
    }

    /// Appends a capability with the given id; `body` is everything after the id and next
    /// pointer. `writable` gives write masks for the body bytes (same length or empty).
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let len = (2 + body.len()).next_multiple_of(4);
        if offset + len > CONFIG_SIZE {
            return Err(ConfigError::NoCapabilitySpace);
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
            let mask = writable.get(i).copied().unwrap_or(0);
            self.set_writable_byte(offset + 2 + i, mask);
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.set_byte(CAPABILITIES_POINTER, offset as u8);
                self.regs[STATUS / 4] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(value) << shift);
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.writable[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// Reads the dword register `reg` (0..64).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Reads `data.len()` bytes at `offset`; out-of-range bytes read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i);
            *b = if off < CONFIG_SIZE {
                (self.regs[off / 4] >> ((off % 4) * 8)) as u8
            } else {
                0xff
            };
        }
    }

    /// Writes `data` at `offset`, honouring write masks; out-of-range bytes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset.saturating_add(i);
            if off >= CONFIG_SIZE {
                break;
            }
            let shift = (off % 4) * 8;
            let mask = (self.writable[off / 4] >> shift) & 0xff;
            let r = &mut self.regs[off / 4];
            let old = (*r >> shift) & 0xff;
            let new = (old & !mask) | (u32::from(*b) & mask);
            *r = (*r & !(0xff << shift)) | (new << shift);
        }
    }

    /// The registers (for a snapshot).
    pub fn save_regs(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Restores saved registers. Refused (nothing changed) if their length is wrong or a BAR
    /// holds another address than the one this VMM assigned: BARs are not relocatable here.
    pub fn restore_regs(&mut self, saved: &[u32]) -> Result<(), String> {
        if saved.len() != self.regs.len() {
            return Err(format!("{} configuration registers saved", saved.len()));
        }
        let old = self.regs;
        self.regs.copy_from_slice(saved);
        for b in self.bars.clone() {
            if self.bar_address(b.index) != Some(b.addr) {
                self.regs = old;
                return Err(format!(
                    "BAR {} moved from its address {:#x}",
                    b.index, b.addr
                ));
            }
        }
        Ok(())
    }

    /// Sets the interrupt pin register (1 = INTA .. 4 = INTD, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_byte(INTERRUPT_LINE + 1, pin);
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND / 4] & 0x2 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciIdentity {
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (0x01, 0x80, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn read32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_registers() {
        let c = PciConfig::new(&id());
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8), 0x0180_0001);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
        let mut b = [0u8; 2];
        c.read(0x300, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = PciConfig::new(&id());
        c.add_memory_bar(MemoryBar {
            index: 0,
            addr: 0xc000_4000,
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        })
        .expect("bar");
        assert_eq!(read32(&c, BAR0), 0xc000_4004);
        // Sizing: write all ones, read back the size mask (flags preserved).
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        c.write(BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xffff_c004);
        assert_eq!(read32(&c, BAR0 + 4), 0xffff_ffff);
        // Restore.
        c.write(BAR0, &0xc000_4000u32.to_le_bytes());
        c.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_4000));
    }

    #[test]
    fn rejects_bad_bars() {
        let mut c = PciConfig::new(&id());
        let bar = |index, addr, size, is_64bit| MemoryBar {
            index,
            addr,
            size,
            is_64bit,
            prefetchable: false,
        };
        assert!(c.add_memory_bar(bar(5, 0, 0x1000, true)).is_err());
        assert!(c.add_memory_bar(bar(0, 0x800, 0x1000, false)).is_err());
        assert!(c.add_memory_bar(bar(0, 0, 0x1800, false)).is_err());
        assert!(c.add_memory_bar(bar(0, 0x1000, 0x1000, true)).is_ok());
        assert!(c.add_memory_bar(bar(1, 0x2000, 0x1000, false)).is_err());
    }

    #[test]
    fn read_only_registers_stay() {
        let mut c = PciConfig::new(&id());
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(read32(&c, COMMAND) & 0xffff, 0x407);
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfig::new(&id());
        let a = c.add_capability(0x09, &[1, 2, 3], &[]).expect("cap");
        let b = c.add_capability(0x11, &[0, 0], &[0xff, 0]).expect("cap");
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        let mut p = [0u8];
        c.read(CAPABILITIES_POINTER, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x48);
        assert_ne!(read32(&c, STATUS - 2) & (STATUS_CAP_LIST << 16), 0);
        c.write(b + 2, &[0xaa, 0xbb]);
        let mut w = [0u8; 2];
        c.read(b + 2, &mut w);
        assert_eq!(w, [0xaa, 0]);
    }
}
