//! Initial vCPU state for the 64-bit Linux entry: GDT, identity-mapped page tables, control
//! registers, general registers, FPU and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, IDENTITY_MAP_GIB, PDPT_START, PD_START,
    PML4_START,
};

/// Errors setting up vCPU registers.
#[derive(Debug, Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the 64-bit code segment: `__BOOT_CS` in the boot protocol.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment: `__BOOT_DS`.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// A segment descriptor from its flags (access byte and granularity nibble packed as in the GDT:
/// bits 0-7 access, bits 12-15 flags), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes a GDT entry into the form KVM wants.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity map covering the first
/// [`IDENTITY_MAP_GIB`] GiB with 2 MiB pages. Shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::GuestWrite("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| RegsError::GuestWrite("IDT", e))?;
    mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))
        .map_err(|e| RegsError::GuestWrite("PML4", e))?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_START + gib * 8))
            .map_err(|e| RegsError::GuestWrite("PDPT", e))?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = ((gib << 30) | (i << 21)) | 0x83;
            mem.write_obj(entry, GuestAddress(pd + i * 8))
                .map_err(|e| RegsError::GuestWrite("page directory", e))?;
        }
    }
    Ok(())
}

/// Long mode with paging, flat segments from the boot GDT.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("GET_SREGS", e))?;
    let code = segment_from_gdt(BOOT_GDT[2], 2);
    let data = segment_from_gdt(BOOT_GDT[3], 3);
    let tss = segment_from_gdt(BOOT_GDT[4], 4);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("SET_SREGS", e))
}

/// RIP at the 64-bit entry, RSI at the zero page, interrupts off.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, zero_page: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("SET_REGS", e))
}

/// Real mode with all segments based at 0, entering at `entry` (for flat test programs).
pub fn setup_real_mode(vcpu: &VcpuFd, entry: u16) -> Result<(), RegsError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("GET_SREGS", e))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: u64::from(entry),
        rsp: 0xfff0,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("SET_REGS", e))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("SET_FPU", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as PC firmware does ("virtual wire" mode).
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("GET_LAPIC", e))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let cs = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(cs.selector, BOOT_CS);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(ds.selector, BOOT_DS);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 0x3);
        let tss = segment_from_gdt(BOOT_GDT[4], 4);
        assert_eq!(tss.selector, BOOT_TSS);
        assert_eq!(tss.s, 0);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn identity_map_covers_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_boot_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, PDPT_START | 3);
        let last_pd = PD_START + (IDENTITY_MAP_GIB - 1) * 0x1000;
        let last: u64 = mem.read_obj(GuestAddress(last_pd + 511 * 8)).expect("read");
        assert_eq!(last, ((IDENTITY_MAP_GIB << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn lint_modes() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }
}
