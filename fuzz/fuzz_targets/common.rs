// Shared input decoding for the virtio fuzz targets: guest memory seeded from the input and a
// list of descriptors whose addresses, lengths and flags come from the input (in range, out of
// range, overflowing, any direction).
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 1 << 20;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// Splits the input into descriptors (14 bytes each, at most 16) and memory contents.
pub fn decode(data: &[u8], mem: &GuestMemoryMmap) -> Vec<Descriptor> {
    let Some((&n, rest)) = data.split_first() else {
        return Vec::new();
    };
    let n = usize::from(n % 16) + 1;
    let cut = (n * 14).min(rest.len());
    let (raw, contents) = rest.split_at(cut);
    let _ = mem.write_slice(&contents[..contents.len().min(8192)], GuestAddress(0));
    raw.chunks_exact(14)
        .map(|c| {
            let addr = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            // Mostly near guest memory, sometimes anywhere (top bit selects).
            let addr = if addr >> 63 == 1 {
                addr
            } else {
                addr % (MEM_SIZE as u64 + 0x1_0000)
            };
            let len = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
            let len = if len >> 31 == 1 { len } else { len % 0x2_0000 };
            let flags = u16::from_le_bytes([c[12], c[13]]) & 0x7;
            Descriptor::new(addr, len, flags, 0)
        })
        .collect()
}
