//! Parsing and loading a Linux bzImage for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst).
//!
//! The real-mode setup code is never run: the VMM enters the kernel's 64-bit entry point
//! (`startup_64`, 0x200 bytes into the protected-mode part) with paging already enabled. That
//! entry exists from boot protocol 2.12 on, advertised by `XLF_KERNEL_64` in `xloadflags`.

use thiserror::Error;

/// Offset of the setup header in the image (and in the zero page).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const HEADER_MAGIC_OFFSET: usize = 0x202;
const VERSION_OFFSET: usize = 0x206;
const LOADFLAGS_OFFSET: usize = 0x211;
const INITRD_ADDR_MAX_OFFSET: usize = 0x22c;
const KERNEL_ALIGNMENT_OFFSET: usize = 0x230;
const RELOCATABLE_OFFSET: usize = 0x234;
const XLOADFLAGS_OFFSET: usize = 0x236;
const CMDLINE_SIZE_OFFSET: usize = 0x238;
const PREF_ADDRESS_OFFSET: usize = 0x258;
const INIT_SIZE_OFFSET: usize = 0x260;
/// Minimum protocol version with a 64-bit entry point.
pub const MIN_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
const LOADED_HIGH: u8 = 1;
/// The 64-bit entry point, relative to the start of the protected-mode kernel.
pub const ENTRY_64_OFFSET: u64 = 0x200;

/// Why an image is not a kernel we can boot.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BzImageError {
    /// Shorter than a boot sector plus header.
    #[error("not a bzImage: file is only {0} bytes")]
    TooShort(usize),
    /// Missing the 0xAA55 boot flag or the `HdrS` magic.
    #[error("not a bzImage: no 'HdrS' Linux boot header")]
    NoHeader,
    /// Boot protocol older than 2.12.
    #[error(
        "kernel uses boot protocol {}.{:02}, too old: the 64-bit entry needs >= 2.12",
        .0 >> 8,
        .0 & 0xff
    )]
    ProtocolTooOld(u16),
    /// Not loadable high or no 64-bit entry point.
    #[error("kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    No64BitEntry,
    /// Setup sectors run past the end of the file.
    #[error("bzImage is truncated: setup code claims {setup_bytes} bytes, file has {file_len}")]
    Truncated {
        /// Setup size claimed by the header.
        setup_bytes: usize,
        /// Actual file size.
        file_len: usize,
    },
}

/// A parsed bzImage: its setup header and where the protected-mode kernel starts.
#[derive(Debug)]
pub struct BzImage<'a> {
    image: &'a [u8],
    /// Offset of the protected-mode kernel in the file.
    payload_offset: usize,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    (u64::from(u32_at(b, off + 4)) << 32) | u64::from(u32_at(b, off))
}

impl<'a> BzImage<'a> {
    /// Validates `image` as a bzImage with a 64-bit entry point.
    pub fn parse(image: &'a [u8]) -> Result<Self, BzImageError> {
        // Everything up to and including init_size must be present to read the header.
        if image.len() < INIT_SIZE_OFFSET + 4 {
            return Err(BzImageError::TooShort(image.len()));
        }
        if u16_at(image, BOOT_FLAG_OFFSET) != 0xaa55
            || &image[HEADER_MAGIC_OFFSET..][..4] != b"HdrS"
        {
            return Err(BzImageError::NoHeader);
        }
        let version = u16_at(image, VERSION_OFFSET);
        if version < MIN_PROTOCOL {
            return Err(BzImageError::ProtocolTooOld(version));
        }
        if image[LOADFLAGS_OFFSET] & LOADED_HIGH == 0
            || u16_at(image, XLOADFLAGS_OFFSET) & XLF_KERNEL_64 == 0
        {
            return Err(BzImageError::No64BitEntry);
        }
        let setup_sects = match image[SETUP_HEADER_OFFSET] {
            0 => 4,
            n => usize::from(n),
        };
        let payload_offset = (setup_sects + 1) * 512;
        if payload_offset >= image.len() {
            return Err(BzImageError::Truncated {
                setup_bytes: payload_offset,
                file_len: image.len(),
            });
        }
        Ok(BzImage {
            image,
            payload_offset,
        })
    }

    /// The boot protocol version (e.g. 0x020f for 2.15).
    pub fn protocol(&self) -> u16 {
        u16_at(self.image, VERSION_OFFSET)
    }

    /// The setup header bytes as they must be copied into the zero page at
    /// [`SETUP_HEADER_OFFSET`]: from 0x1f1 up to the end given by the byte at 0x201.
    pub fn setup_header(&self) -> &'a [u8] {
        let end = (0x202 + usize::from(self.image[0x201])).min(self.image.len());
        &self.image[SETUP_HEADER_OFFSET..end]
    }

    /// The protected-mode kernel, to be loaded at [`Self::load_address`].
    pub fn payload(&self) -> &'a [u8] {
        &self.image[self.payload_offset..]
    }

    /// Where the kernel prefers to be loaded. Relocatable kernels move themselves anyway; loading
    /// at the preferred address avoids a copy and is what the decompressor expects.
    pub fn load_address(&self) -> u64 {
        let pref = u64_at(self.image, PREF_ADDRESS_OFFSET);
        let align = u64::from(u32_at(self.image, KERNEL_ALIGNMENT_OFFSET)).max(1);
        if pref == 0 {
            // Pre-2.10 header layout would not reach here (MIN_PROTOCOL); stay defensive.
            return 0x100_0000;
        }
        if self.is_relocatable() {
            pref.div_ceil(align) * align
        } else {
            pref
        }
    }

    /// Whether the kernel can run from an address other than its preferred one.
    pub fn is_relocatable(&self) -> bool {
        self.image[RELOCATABLE_OFFSET] != 0
    }

    /// Memory the kernel needs from its load address until it has set itself up.
    pub fn init_size(&self) -> u64 {
        u64::from(u32_at(self.image, INIT_SIZE_OFFSET)).max(self.payload().len() as u64)
    }

    /// Highest address (inclusive) the initrd may occupy.
    pub fn initrd_addr_max(&self) -> u64 {
        u64::from(u32_at(self.image, INITRD_ADDR_MAX_OFFSET))
    }

    /// Longest command line the kernel accepts, without the terminating NUL.
    pub fn cmdline_size(&self) -> usize {
        u32_at(self.image, CMDLINE_SIZE_OFFSET) as usize
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal image that satisfies the parser.
    pub(crate) fn fake_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + 4096];
        img[SETUP_HEADER_OFFSET] = 4;
        img[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x201] = 0x6a;
        img[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        img[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&version.to_le_bytes());
        img[LOADFLAGS_OFFSET] = LOADED_HIGH;
        img[INITRD_ADDR_MAX_OFFSET..INITRD_ADDR_MAX_OFFSET + 4]
            .copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[KERNEL_ALIGNMENT_OFFSET..KERNEL_ALIGNMENT_OFFSET + 4]
            .copy_from_slice(&0x20_0000u32.to_le_bytes());
        img[RELOCATABLE_OFFSET] = 1;
        img[XLOADFLAGS_OFFSET..XLOADFLAGS_OFFSET + 2].copy_from_slice(&xloadflags.to_le_bytes());
        img[CMDLINE_SIZE_OFFSET..CMDLINE_SIZE_OFFSET + 4].copy_from_slice(&2047u32.to_le_bytes());
        img[PREF_ADDRESS_OFFSET..PREF_ADDRESS_OFFSET + 8]
            .copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[INIT_SIZE_OFFSET..INIT_SIZE_OFFSET + 4].copy_from_slice(&0x80_0000u32.to_le_bytes());
        img
    }

    #[test]
    fn accepts_a_64bit_kernel() {
        let img = fake_bzimage(0x020f, 1);
        let bz = BzImage::parse(&img).expect("valid");
        assert_eq!(bz.protocol(), 0x020f);
        assert_eq!(bz.load_address(), 0x100_0000);
        assert_eq!(bz.payload().len(), 4096);
        assert_eq!(bz.init_size(), 0x80_0000);
        assert_eq!(bz.cmdline_size(), 2047);
        assert_eq!(bz.setup_header().len(), 0x202 + 0x6a - 0x1f1);
    }

    #[test]
    fn rejects_non_bzimage() {
        assert_eq!(
            BzImage::parse(&[0u8; 100]).unwrap_err(),
            BzImageError::TooShort(100)
        );
        assert_eq!(
            BzImage::parse(&[0u8; 8192]).unwrap_err(),
            BzImageError::NoHeader
        );
    }

    #[test]
    fn rejects_old_protocol() {
        let img = fake_bzimage(0x0206, 0);
        assert_eq!(
            BzImage::parse(&img).unwrap_err(),
            BzImageError::ProtocolTooOld(0x0206)
        );
        assert_eq!(
            BzImageError::ProtocolTooOld(0x0206).to_string(),
            "kernel uses boot protocol 2.06, too old: the 64-bit entry needs >= 2.12"
        );
    }

    #[test]
    fn rejects_32bit_only() {
        let img = fake_bzimage(0x020f, 0);
        assert_eq!(
            BzImage::parse(&img).unwrap_err(),
            BzImageError::No64BitEntry
        );
    }

    #[test]
    fn rejects_truncated() {
        let mut img = fake_bzimage(0x020f, 1);
        img[SETUP_HEADER_OFFSET] = 200;
        assert!(matches!(
            BzImage::parse(&img),
            Err(BzImageError::Truncated { .. })
        ));
    }
}
