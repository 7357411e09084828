//! The guest-physical memory map. Addresses are chosen to match what a PC firmware leaves behind,
//! so that a stock kernel finds familiar holes: the EBDA below 640 KiB, the legacy VGA/ROM hole,
//! the BIOS area (where our ACPI tables live) and the 32-bit PCI hole below 4 GiB.

/// GDT used for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT (the kernel loads its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (grows down, below the zero page region is unused).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map used at the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the identity map.
pub const PDPT_START: u64 = 0xa000;
/// First of [`IDENTITY_MAP_GIB`] page directories (2 MiB pages).
pub const PD_START: u64 = 0xb000;
/// How much memory the boot identity map covers, in GiB.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (the kernel's own limit comes from the setup header).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; e820 reserves from here to 640 KiB.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (640 KiB).
pub const LOW_MEM_END: u64 = 0xa0000;
/// Start of the BIOS area. ACPI tables are placed here; the kernel scans it for the RSDP.
pub const BIOS_AREA_START: u64 = 0xe0000;
/// Size of the BIOS area (up to 1 MiB).
pub const BIOS_AREA_SIZE: u64 = 0x20000;
/// Start of high memory (1 MiB).
pub const HIGH_MEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (PCI, IOAPIC, LAPIC). RAM above this moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO address (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS region for real-mode emulation on Intel (three pages, inside the MMIO hole).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel (the page before the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Start of the window PCI memory BARs are allocated from (the 32-bit MMIO hole).
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI memory window: the IOAPIC and LAPIC live above it.
pub const PCI_MMIO_END: u64 = IOAPIC_START;
/// PCI configuration mechanism #1 address port (data at +4).
pub const PCI_CONFIG_IO: u16 = 0xcf8;
/// Number of pins on KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// Legacy I/O ports of the platform devices.
pub mod ports {
    /// COM1, the 8250 serial console.
    pub const COM1: u16 = 0x3f8;
    /// IRQ line of COM1.
    pub const COM1_IRQ: u32 = 4;
    /// i8042 data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port.
    pub const I8042_COMMAND: u16 = 0x64;
    /// pvpanic (QEMU-compatible ISA pvpanic, ACPI id `QEMU0001`).
    pub const PVPANIC: u16 = 0x505;
    /// ACPI hardware-reduced sleep control register (status register at +1).
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    /// ACPI hardware-reduced sleep status register.
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
}
