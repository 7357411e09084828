//! Places a Linux kernel, its initrd and command line in guest memory and builds the zero page.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::boot_params::{build_zero_page, e820_map, BootParamsError, BootParamsSpec};
use super::bzimage::{BzImage, BzImageError, ENTRY_64_OFFSET};
use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, ZERO_PAGE_START};
use crate::memory::GuestRam;

/// Errors loading the kernel.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The kernel image is not bootable.
    #[error(transparent)]
    Kernel(#[from] BzImageError),
    /// Command line too long.
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Kernel limit.
        max: usize,
    },
    /// Command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Not enough RAM below the 32-bit hole for kernel and initrd.
    #[error(
        "memory too small: {mem_mib} MiB given, the kernel and initrd need at least {need_mib} MiB"
    )]
    MemoryTooSmall {
        /// RAM given, MiB.
        mem_mib: u64,
        /// RAM needed, MiB.
        need_mib: u64,
    },
    /// Zero page construction failed.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The zero page cannot be written.
    #[error("cannot write the zero page to guest memory")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where things ended up; the vCPU setup needs the entry point and the zero page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// Guest address of the zero page (goes in RSI).
    pub zero_page: u64,
    /// Where the protected-mode kernel was loaded.
    pub load_address: u64,
    /// Where the initrd was placed, and its size.
    pub initrd: Option<(u64, u64)>,
}

/// Headroom kept free above the kernel's `init_size` for early allocations (page tables, the
/// decompressor's heap when it relocates).
const KERNEL_SLACK: u64 = 4 << 20;
const PAGE: u64 = 4096;

fn write(ram: &GuestRam, what: &'static str, addr: u64, data: &[u8]) -> Result<(), LoaderError> {
    ram.memory()
        .write_slice(data, GuestAddress(addr))
        .map_err(|source| LoaderError::GuestWrite { what, addr, source })
}

/// Loads `kernel` (a bzImage), an optional initrd and `cmdline` into `ram`.
pub fn load_linux(
    ram: &GuestRam,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<LoadedKernel, LoaderError> {
    let bz = BzImage::parse(kernel)?;

    let max_cmdline = bz.cmdline_size().min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max_cmdline {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_cmdline,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoaderError::CmdlineNul);
    }

    let load_address = bz.load_address();
    let kernel_end = load_address + bz.init_size() + KERNEL_SLACK;
    let low_end = ram.low_end();
    let initrd_len = initrd.map_or(0, |i| i.len() as u64);
    let need = kernel_end + initrd_len.next_multiple_of(PAGE);
    if need > low_end {
        return Err(LoaderError::MemoryTooSmall {
            mem_mib: ram.size() >> 20,
            need_mib: need.div_ceil(1 << 20),
        });
    }

    write(ram, "kernel", load_address, bz.payload())?;

    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    write(ram, "command line", CMDLINE_START, &cmdline_bytes)?;

    let initrd_placed = match initrd {
        Some(data) => {
            // As high as allowed, page aligned, like a PC boot loader does.
            let top = low_end.min(bz.initrd_addr_max().saturating_add(1));
            let addr = top.saturating_sub(data.len() as u64) & !(PAGE - 1);
            if addr < kernel_end {
                return Err(LoaderError::MemoryTooSmall {
                    mem_mib: ram.size() >> 20,
                    need_mib: need.div_ceil(1 << 20),
                });
            }
            write(ram, "initrd", addr, data)?;
            Some((addr, data.len() as u64))
        }
        None => None,
    };

    let e820 = e820_map(ram.ranges());
    let zero_page = build_zero_page(
        &bz,
        &BootParamsSpec {
            cmdline_addr: CMDLINE_START,
            initrd: initrd_placed,
            rsdp_addr,
            e820: &e820,
        },
    )?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START)),
        ram.memory(),
    )
    .map_err(LoaderError::ZeroPage)?;

    Ok(LoadedKernel {
        entry: load_address + ENTRY_64_OFFSET,
        zero_page: ZERO_PAGE_START,
        load_address,
        initrd: initrd_placed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::bzimage::tests::fake_bzimage;

    #[test]
    fn loads_kernel_initrd_cmdline() {
        let ram = GuestRam::new(64 << 20).expect("ram");
        let img = fake_bzimage(0x020f, 1);
        let initrd = vec![0x5a; 10_000];
        let loaded = load_linux(&ram, &img, Some(&initrd), "console=ttyS0", 0xe0000).expect("load");
        assert_eq!(loaded.entry, 0x100_0200);
        let (addr, len) = loaded.initrd.expect("initrd");
        assert_eq!(len, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + len <= 64 << 20);
        let mut b = [0u8; 14];
        ram.memory()
            .read_slice(&mut b, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&b, b"console=ttyS0\0");
        let mut k = [0u8; 1];
        ram.memory()
            .read_slice(&mut k, GuestAddress(addr))
            .expect("read");
        assert_eq!(k[0], 0x5a);
    }

    #[test]
    fn memory_too_small() {
        let ram = GuestRam::new(16 << 20).expect("ram");
        let img = fake_bzimage(0x020f, 1);
        let err = load_linux(&ram, &img, None, "", 0).unwrap_err();
        assert!(
            matches!(err, LoaderError::MemoryTooSmall { mem_mib: 16, .. }),
            "{err}"
        );
        let ram = GuestRam::new(32 << 20).expect("ram");
        let initrd = vec![0; 20 << 20];
        let err = load_linux(&ram, &img, Some(&initrd), "", 0).unwrap_err();
        assert!(matches!(err, LoaderError::MemoryTooSmall { .. }), "{err}");
    }

    #[test]
    fn cmdline_too_long() {
        let ram = GuestRam::new(64 << 20).expect("ram");
        let img = fake_bzimage(0x020f, 1);
        let long = "x".repeat(3000);
        assert!(matches!(
            load_linux(&ram, &img, None, &long, 0),
            Err(LoaderError::CmdlineTooLong {
                len: 3000,
                max: 2047
            })
        ));
    }
}
