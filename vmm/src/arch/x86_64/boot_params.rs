//! The zero page (`struct boot_params`) and the e820 memory map handed to the kernel.

use thiserror::Error;

use super::bzimage::{BzImage, SETUP_HEADER_OFFSET};
use super::layout::{BIOS_AREA_SIZE, BIOS_AREA_START, EBDA_START, HIGH_MEM_START, LOW_MEM_END};
use crate::memory::RamRange;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const ZP_ACPI_RSDP_ADDR: usize = 0x070;
const ZP_E820_ENTRIES: usize = 0x1e8;
const ZP_TYPE_OF_LOADER: usize = 0x210;
const ZP_RAMDISK_IMAGE: usize = 0x218;
const ZP_RAMDISK_SIZE: usize = 0x21c;
const ZP_CMD_LINE_PTR: usize = 0x228;
const ZP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const ZP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const ZP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const ZP_E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: usize = 4096;

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

fn put_u8(zp: &mut [u8], off: usize, v: u8) {
    zp[off] = v;
}

fn put_u32(zp: &mut [u8], off: usize, v: u32) {
    zp[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(zp: &mut [u8], off: usize, v: u64) {
    zp[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Builds the zero page: the kernel's own setup header, patched with what the boot loader fills
/// in (loader type, command line, initrd, RSDP, e820).
pub fn build_zero_page(
    kernel: &BzImage<'_>,
    spec: &BootParamsSpec<'_>,
) -> Result<Vec<u8>, BootParamsError> {
    if spec.e820.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(spec.e820.len()));
    }
    let mut zp = vec![0u8; ZERO_PAGE_SIZE];
    let hdr = kernel.setup_header();
    zp[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + hdr.len()].copy_from_slice(hdr);
    // "Undefined" boot loader id: we are not one of the registered loaders.
    put_u8(&mut zp, ZP_TYPE_OF_LOADER, 0xff);
    put_u32(&mut zp, ZP_CMD_LINE_PTR, spec.cmdline_addr as u32);
    put_u32(
        &mut zp,
        ZP_EXT_CMD_LINE_PTR,
        (spec.cmdline_addr >> 32) as u32,
    );
    if let Some((addr, size)) = spec.initrd {
        put_u32(&mut zp, ZP_RAMDISK_IMAGE, addr as u32);
        put_u32(&mut zp, ZP_EXT_RAMDISK_IMAGE, (addr >> 32) as u32);
        put_u32(&mut zp, ZP_RAMDISK_SIZE, size as u32);
        put_u32(&mut zp, ZP_EXT_RAMDISK_SIZE, (size >> 32) as u32);
    }
    put_u64(&mut zp, ZP_ACPI_RSDP_ADDR, spec.rsdp_addr);
    put_u8(&mut zp, ZP_E820_ENTRIES, spec.e820.len() as u8);
    for (i, e) in spec.e820.iter().enumerate() {
        let off = ZP_E820_TABLE + i * E820_ENTRY_SIZE;
        put_u64(&mut zp, off, e.addr);
        put_u64(&mut zp, off + 8, e.size);
        put_u32(&mut zp, off + 16, e.kind);
    }
    Ok(zp)
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
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[ZP_TYPE_OF_LOADER], 0xff);
        assert_eq!(zp[ZP_E820_ENTRIES] as usize, e820.len());
        assert_eq!(
            &zp[ZP_CMD_LINE_PTR..ZP_CMD_LINE_PTR + 4],
            &0x20000u32.to_le_bytes()
        );
        assert_eq!(
            &zp[ZP_RAMDISK_SIZE..ZP_RAMDISK_SIZE + 4],
            &0x1234u32.to_le_bytes()
        );
        assert_eq!(
            &zp[ZP_ACPI_RSDP_ADDR..ZP_ACPI_RSDP_ADDR + 8],
            &0xe0000u64.to_le_bytes()
        );
    }
}
