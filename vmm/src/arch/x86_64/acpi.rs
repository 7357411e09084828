//! ACPI tables: what a stock kernel needs to find every CPU (MADT), power off cleanly (FADT with
//! hardware-reduced sleep registers and `_S5` in the DSDT) and find the serial port and the
//! pvpanic device with working interrupts (DSDT).
//!
//! Power-off path: the FADT sets `HW_REDUCED_ACPI` and points `SLEEP_CONTROL_REG` at I/O port
//! [`ports::ACPI_SLEEP_CONTROL`]. The DSDT's `\_S5` package gives sleep type 5, so a guest
//! `poweroff` ends with the kernel writing `SLP_EN | (5 << 2)` there, which the VMM turns into a
//! power-off exit. No SCI, PM timer or PM1 blocks are needed.
//!
//! Reboot path: the FADT's reset register is the i8042 command port (0x64) with value 0xFE, the
//! same write the kernel's keyboard-controller fallback makes; the VMM turns it into a reboot
//! exit.
//!
//! Tables live in the BIOS area (reserved in e820); the RSDP is at its start, where the kernel's
//! legacy scan finds it, and its address is also passed in the zero page.

use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::{aml, Aml};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::i8042::CMD_RESET_CPU;

use super::layout::{
    ports, APIC_START, BIOS_AREA_SIZE, BIOS_AREA_START, IOAPIC_START, PCI_CONFIG_IO, PCI_MMIO_END,
    PCI_MMIO_START,
};

const OEM_ID: [u8; 6] = *b"DDVMM ";
const OEM_TABLE_ID: [u8; 8] = *b"DDVMMTBL";
const OEM_REVISION: u32 = 1;

/// Errors writing ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// Tables do not fit the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    /// More CPUs than an 8-bit APIC id allows.
    #[error("{0} vCPUs do not fit 8-bit local APIC ids")]
    TooManyCpus(u32),
    /// Guest memory write failed.
    #[error("cannot write ACPI table {0} to guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// FADT flag: the power button is a control-method device (we have none).
const FADT_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag: the sleep button is a control-method device (we have none).
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag: the reset register is supported.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: hardware-reduced ACPI (no PM1 blocks, SCI or PM timer).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flag: no VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: no CMOS RTC (nothing decodes ports 0x70/0x71).
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Sleep-type value the DSDT advertises for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    fadt.write_u16(109, IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT);
    fadt.write_u32(
        112,
        FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP,
    );
    // Reset register: the i8042 command port with the "pulse reset line" command, so the
    // kernel's first reboot method (ACPI) and its keyboard-controller fallback end up in the
    // same device.
    fadt.write(
        116,
        GenericAddress::io_port_address::<u8>(ports::I8042_COMMAND),
    );
    fadt.write_u8(128, CMD_RESET_CPU);
    // FADT minor version (ACPI 6.0).
    fadt.write_u8(131, 0);
    fadt.write_u64(140, dsdt_addr);
    fadt.write(
        244,
        GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP_CONTROL),
    );
    fadt.write(
        256,
        GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP_STATUS),
    );
    fadt.write_bytes(268, b"DDVMMKVM");
    fadt.update_checksum();
    fadt
}

fn madt(cpus: u32) -> Result<Sdt, AcpiError> {
    if cpus > 254 {
        return Err(AcpiError::TooManyCpus(cpus));
    }
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    // PCAT_COMPAT: dual 8259s are present (KVM's in-kernel PIC).
    madt.write_u32(40, 1);
    for cpu in 0..cpus {
        // Processor Local APIC: type 0, length 8, ACPI uid, APIC id, flags (enabled).
        let mut e = vec![0u8, 8, cpu as u8, cpu as u8];
        e.extend_from_slice(&1u32.to_le_bytes());
        madt.append_slice(&e);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    let mut ioapic = vec![1u8, 12, cpus as u8, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.update_checksum();
    Ok(madt)
}

/// First IOAPIC pin used for PCI INTx.
pub const PCI_INTX_GSI_BASE: u32 = 16;

/// The GSI that INTx pin `pin` (0 = INTA) of the device in `slot` raises (see the `_PRT`).
pub fn intx_gsi(slot: u32, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot + u32::from(pin)) % 8
}

fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    let pvpanic_io = aml::IO::new(ports::PVPANIC, ports::PVPANIC, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let crs = aml::Name::new("_CRS".into(), &pvpanic_crs);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&hid, &crs]);
    // COM1 must be described here: hardware-reduced ACPI makes Linux drop the legacy PIC and
    // its identity mapping of ISA IRQs, so the serial port's IRQ 4 only works when the port
    // comes with an ACPI interrupt resource (GSI 4 on the IOAPIC). Without it the console
    // prints kernel messages but userspace output is silently lost.
    let com1_irq = aml::Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    let com1_io = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    // The PCI root bridge: bus 0 through configuration mechanism #1, all legacy I/O ports
    // except the config ports, and the 32-bit MMIO window below the IOAPIC.
    let pci_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let pci_adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let pci_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let pci_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pci_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(PCI_CONFIG_IO, PCI_CONFIG_IO, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, PCI_CONFIG_IO - 1, None);
    let io_high = aml::AddressSpace::new_io(PCI_CONFIG_IO + 8, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio]);
    let pci_crs = aml::Name::new("_CRS".into(), &pci_crs);
    // INTx routing (used by the channel device; virtio devices use MSI-X): every slot's pins
    // go straight to IOAPIC GSIs 16..23, swizzled as a PCI bridge would.
    let prt_entries: Vec<(u32, u8, u32)> = (0..32u32)
        .flat_map(|slot| (0..4u8).map(move |pin| (slot, pin, intx_gsi(slot, pin))))
        .map(|(slot, pin, gsi)| ((slot << 16) | 0xffff, pin, gsi))
        .collect();
    let prt_packages: Vec<aml::Package> = prt_entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_packages.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Name::new("_PRT".into(), &aml::Package::new(prt_refs));
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![
            &pci_hid, &pci_adr, &pci_seg, &pci_uid, &pci_bbn, &pci_crs, &prt,
        ],
    );
    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &com1, &pvpanic]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.update_checksum();
    dsdt
}

/// Builds all tables for `cpus` vCPUs and writes them to the BIOS area. Returns the RSDP address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<u64, AcpiError> {
    let rsdp_addr = BIOS_AREA_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut place = |len: usize| {
        let at = next.next_multiple_of(16);
        next = at + len as u64;
        at
    };

    let dsdt = dsdt();
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cpus)?;
    let madt_addr = place(madt.len());

    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.append(fadt_addr);
    xsdt.append(madt_addr);
    xsdt.update_checksum();
    let xsdt_addr = place(xsdt.len());
    if next > BIOS_AREA_START + BIOS_AREA_SIZE {
        return Err(AcpiError::TooLarge(next - BIOS_AREA_START));
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    for (name, addr, bytes) in [
        ("RSDP", rsdp_addr, rsdp_bytes.as_slice()),
        ("DSDT", dsdt_addr, dsdt.as_slice()),
        ("FADT", fadt_addr, fadt.as_slice()),
        ("MADT", madt_addr, madt.as_slice()),
        ("XSDT", xsdt_addr, xsdt.as_slice()),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::GuestWrite(name, e))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let rsdp = write_acpi_tables(&mem, 2).expect("tables");
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).expect("read");
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]));
        assert!(checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().expect("8 bytes"));
        let mut x = [0u8; 52];
        mem.read_slice(&mut x, GuestAddress(xsdt_addr))
            .expect("read");
        assert_eq!(&x[..4], b"XSDT");
        assert!(checksum_ok(&x));
        let madt_addr = u64::from_le_bytes(x[44..52].try_into().expect("8 bytes"));
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(madt_addr))
            .expect("read");
        assert_eq!(&hdr[..4], b"APIC");
        let len = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes")) as usize;
        // Header + 8 + two local APICs + IOAPIC + NMI.
        assert_eq!(len, 44 + 2 * 8 + 12 + 6);
        let mut madt = vec![0u8; len];
        mem.read_slice(&mut madt, GuestAddress(madt_addr))
            .expect("read");
        assert!(checksum_ok(&madt));
    }

    #[test]
    fn dsdt_declares_s5_and_pvpanic() {
        let d = dsdt();
        let b = d.as_slice();
        assert!(checksum_ok(b));
        assert!(b.windows(4).any(|w| w == b"_S5_"));
        assert!(b.windows(8).any(|w| w == b"QEMU0001"));
        assert!(b.windows(4).any(|w| w == b"COM1"));
        assert!(b.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn too_many_cpus() {
        assert!(matches!(madt(300), Err(AcpiError::TooManyCpus(300))));
    }
}
