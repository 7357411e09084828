//! The zero page (`struct boot_params`) and the e820 memory map handed to the kernel.
//!
//! The zero page is linux-loader's typed `boot_params` (the kernel's own layout, generated from
//! its headers), written into guest memory by linux-loader's `LinuxBootConfigurator`. Parsing
//! and placing the bzImage stay in [`super::bzimage`] and [`super::loader`]: linux-loader's
//! `BzImage::load` accepts any protocol from 2.00 and loads at `code32_start`, while this VMM
//! enters the 64-bit entry point and must refuse, with a message that says why, kernels without
//! one (protocol < 2.12, no `XLF_KERNEL_64`) and place relocatable kernels at `pref_address`.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use thiserror::Error;
use vm_memory::ByteValued;

use super::bzimage::BzImage;
use super::layout::{BIOS_AREA_SIZE, BIOS_AREA_START, EBDA_START, HIGH_MEM_START, LOW_MEM_END};
use crate::memory::RamRange;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Entries the zero page's e820 table holds.
const E820_MAX_ENTRIES: usize = 128;

/// Errors building the zero page.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// More e820 entries than the zero page holds.
    #[error("e820 map has {0} entries, the zero page holds {E820_MAX_ENTRIES}")]
    TooManyE820Entries(usize),
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map a PC firmware would report for our RAM: usable low memory up to the EBDA, the
/// EBDA reserved, a hole for VGA and option ROMs, the BIOS area reserved (it holds our ACPI
/// tables), then RAM from 1 MiB, and RAM above 4 GiB if any.
pub fn e820_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: LOW_MEM_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: BIOS_AREA_SIZE,
            kind: E820_RESERVED,
        },
    ];
    for r in ram {
        let start = r.guest_addr.max(HIGH_MEM_START);
        let end = r.guest_addr + r.len;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Everything the zero page points at.
#[derive(Debug, Clone)]
pub struct BootParamsSpec<'a> {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest address of the ACPI RSDP.
    pub rsdp_addr: u64,
    /// The memory map.
    pub e820: &'a [E820Entry],
}

/// Builds the zero page: the kernel's own setup header, patched with what the boot loader fills
/// in (loader type, command line, initrd, RSDP, e820).
pub fn build_zero_page(
    kernel: &BzImage<'_>,
    spec: &BootParamsSpec<'_>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if spec.e820.len() > E820_MAX_ENTRIES.min(params.e820_table.len()) {
        return Err(BootParamsError::TooManyE820Entries(spec.e820.len()));
    }
    // The header as the kernel ships it (bytes past its own end, for an older protocol, stay
    // zero).
    let mut hdr = setup_header::default();
    let theirs = kernel.setup_header();
    let n = theirs.len().min(hdr.as_slice().len());
    hdr.as_mut_slice()[..n].copy_from_slice(&theirs[..n]);
    // "Undefined" boot loader id: we are not one of the registered loaders.
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = spec.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (spec.cmdline_addr >> 32) as u32;
    if let Some((addr, size)) = spec.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = spec.rsdp_addr;
    params.e820_entries = spec.e820.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(spec.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::bzimage::tests::fake_bzimage;
    use crate::memory::ram_ranges;

    #[test]
    fn e820_has_pc_holes() {
        let map = e820_map(&ram_ranges(256 << 20));
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0xe0000,
                size: 0x20000,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 20,
                size: (256 << 20) - (1 << 20),
                kind: E820_RAM
            }
        );
        assert_eq!(map.len(), 4);
        // Nothing covers the VGA/ROM hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= 0xa0000 || e.addr >= 0xe0000));
    }

    #[test]
    fn e820_above_4g() {
        let map = e820_map(&ram_ranges(4 << 30));
        let last = map.last().expect("entry");
        assert_eq!(last.addr, 1 << 32);
        assert_eq!(last.size, (4 << 30) - 0xc000_0000);
    }

    #[test]
    fn zero_page_fields() {
        let img = fake_bzimage(0x020f, 1);
        let kernel = BzImage::parse(&img).expect("kernel");
        let e820 = e820_map(&ram_ranges(64 << 20));
        let zp = build_zero_page(
            &kernel,
            &BootParamsSpec {
                cmdline_addr: 0x20000,
                initrd: Some((0x300_0000, 0x1234)),
                rsdp_addr: 0xe0000,
                e820: &e820,
            },
        )
        .expect("zero page");
        // Checked at the byte offsets of Documentation/arch/x86/zero-page.rst and boot.rst.
        let zp = zp.as_slice();
        assert_eq!(zp.len(), 4096);
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[0x210], 0xff, "type_of_loader");
        assert_eq!(zp[0x1e8] as usize, e820.len(), "e820_entries");
        assert_eq!(&zp[0x228..0x22c], &0x20000u32.to_le_bytes(), "cmd_line_ptr");
        assert_eq!(
            &zp[0x218..0x21c],
            &0x300_0000u32.to_le_bytes(),
            "ramdisk_image"
        );
        assert_eq!(&zp[0x21c..0x220], &0x1234u32.to_le_bytes(), "ramdisk_size");
        assert_eq!(
            &zp[0x070..0x078],
            &0xe0000u64.to_le_bytes(),
            "acpi_rsdp_addr"
        );
        assert_eq!(&zp[0x2d0..0x2d8], &0u64.to_le_bytes(), "first e820 entry");
        assert_eq!(&zp[0x2e0..0x2e4], &E820_RAM.to_le_bytes(), "its type");
    }
}
