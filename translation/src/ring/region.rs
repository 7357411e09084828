//! The shared memory both sides of a ring talk through.
//!
//! All accesses are atomic (`core::sync::atomic` on properly aligned pointers), so a peer writing
//! concurrently — an honest one racing as designed, or a hostile one racing on purpose — can only
//! make us read some value, never cause undefined behaviour. Bulk copies use Relaxed atomic
//! `u64`/`u8` accesses; their ordering against the indices comes from the Acquire/Release
//! accesses of the protocol.
//!
//! One caveat: the two sides may split a byte range differently (e.g. the client writes a slot
//! with `u64` stores, the agent reads part of it with `u8` loads). Racing *mixed-size* atomics
//! are not defined by the C++/Rust memory model, but they only race when a peer breaks the
//! protocol (an honest peer's slot and entry accesses are ordered by the index Acquire/Release
//! pairs), the real peer is another process or VM outside our abstract machine, and on x86-64
//! each access is a single aligned `mov`: the worst outcome is reading arbitrary bytes, which
//! the protocol already treats as untrusted.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::RingError;

/// Ordering of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// No ordering.
    Relaxed,
    /// Later accesses are not reordered before this load.
    Acquire,
}

/// Ordering of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// No ordering.
    Relaxed,
    /// Earlier accesses are not reordered after this store.
    Release,
}

impl From<Load> for Ordering {
    fn from(o: Load) -> Self {
        match o {
            Load::Relaxed => Ordering::Relaxed,
            Load::Acquire => Ordering::Acquire,
        }
    }
}

impl From<Store> for Ordering {
    fn from(o: Store) -> Self {
        match o {
            Store::Relaxed => Ordering::Relaxed,
            Store::Release => Ordering::Release,
        }
    }
}

/// A byte region shared with a peer that may write it at any time.
///
/// Offsets are byte offsets from the start; integers are stored little-endian. Every access is
/// bounds-checked (`offset + size <= size()`) and integer accesses must be naturally aligned;
/// violations are errors, never panics.
pub trait SharedRegion {
    /// Length in bytes.
    fn size(&self) -> usize;
    /// Atomically loads a little-endian u32.
    fn load_u32(&self, offset: usize, order: Load) -> Result<u32, RingError>;
    /// Atomically stores a little-endian u32.
    fn store_u32(&self, offset: usize, value: u32, order: Store) -> Result<(), RingError>;
    /// Atomically loads a little-endian u64.
    fn load_u64(&self, offset: usize, order: Load) -> Result<u64, RingError>;
    /// Atomically stores a little-endian u64.
    fn store_u64(&self, offset: usize, value: u64, order: Store) -> Result<(), RingError>;
    /// Copies `buf.len()` bytes out of the region (no ordering; not atomic as a whole).
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), RingError>;
    /// Copies `data` into the region (no ordering; not atomic as a whole).
    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), RingError>;

    /// Sets `len` bytes to zero.
    fn zero(&self, offset: usize, len: usize) -> Result<(), RingError> {
        const Z: [u8; 512] = [0; 512];
        check(self.size(), offset, len, 1)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(Z.len());
            self.write_bytes(offset + done, &Z[..n])?;
            done += n;
        }
        Ok(())
    }
}

/// Bounds and alignment check shared by the implementations.
fn check(size: usize, offset: usize, len: usize, align: usize) -> Result<(), RingError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => {}
        _ => return Err(RingError::OutOfBounds { offset, len, size }),
    }
    if offset % align != 0 {
        return Err(RingError::Misaligned { offset });
    }
    Ok(())
}

/// A region at a raw address: an `mmap` of the channel memfd on the host, a sysfs `resourceN`
/// mapping of the channel BAR inside the driver VM.
#[derive(Debug)]
pub struct RawRegion {
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: a RawRegion is an address range, not an owner of Rust data; every access through it is
// atomic, so using it from several threads at once is as sound as sharing `&AtomicU64`s.
unsafe impl Send for RawRegion {}
// SAFETY: as above: `&RawRegion` only allows atomic accesses.
unsafe impl Sync for RawRegion {}

impl RawRegion {
    /// Wraps `size` bytes at `base`. Fails if `base` is null or not 8-byte aligned.
    ///
    /// # Safety
    ///
    /// For as long as the returned value (or anything borrowing it) lives:
    /// - `base..base + size` is valid for reads and writes (e.g. a `MAP_SHARED` mapping that is
    ///   not unmapped or remapped meanwhile);
    /// - within this process the bytes are accessed only atomically (through `RawRegion`s or
    ///   other atomics) — no `&[u8]`/`&mut [u8]` to them may exist. Other processes and VMs may
    ///   access them in any way: to us their writes are just untrusted values.
    pub unsafe fn new(base: *mut u8, size: usize) -> Result<Self, RingError> {
        let base = NonNull::new(base).ok_or(RingError::Misaligned { offset: 0 })?;
        if base.as_ptr() as usize % 8 != 0 || (base.as_ptr() as usize).checked_add(size).is_none() {
            return Err(RingError::Misaligned { offset: 0 });
        }
        Ok(Self { base, size })
    }

    /// Pointer to `offset` after checking `offset..offset + len` and alignment.
    fn at(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8, RingError> {
        check(self.size, offset, len, align)?;
        // SAFETY: `offset + len <= size` was just checked, so the result stays inside (or one past
        // the end of) the mapping the constructor's contract guarantees.
        Ok(unsafe { self.base.as_ptr().add(offset) })
    }
}

impl SharedRegion for RawRegion {
    fn size(&self) -> usize {
        self.size
    }

    fn load_u32(&self, offset: usize, order: Load) -> Result<u32, RingError> {
        let p = self.at(offset, 4, 4)?;
        // SAFETY: `p` is in bounds and 4-aligned (base is 8-aligned, offset checked); the contract
        // of `new` makes it valid for the region's lifetime and accessed only atomically here.
        let a = unsafe { AtomicU32::from_ptr(p.cast()) };
        Ok(u32::from_le(a.load(order.into())))
    }

    fn store_u32(&self, offset: usize, value: u32, order: Store) -> Result<(), RingError> {
        let p = self.at(offset, 4, 4)?;
        // SAFETY: as in `load_u32`.
        let a = unsafe { AtomicU32::from_ptr(p.cast()) };
        a.store(value.to_le(), order.into());
        Ok(())
    }

    fn load_u64(&self, offset: usize, order: Load) -> Result<u64, RingError> {
        let p = self.at(offset, 8, 8)?;
        // SAFETY: as in `load_u32`, with 8-byte size and alignment.
        let a = unsafe { AtomicU64::from_ptr(p.cast()) };
        Ok(u64::from_le(a.load(order.into())))
    }

    fn store_u64(&self, offset: usize, value: u64, order: Store) -> Result<(), RingError> {
        let p = self.at(offset, 8, 8)?;
        // SAFETY: as in `load_u64`.
        let a = unsafe { AtomicU64::from_ptr(p.cast()) };
        a.store(value.to_le(), order.into());
        Ok(())
    }

    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), RingError> {
        let p = self.at(offset, buf.len(), 1)?;
        let mut i = 0;
        while i < buf.len() {
            // SAFETY: `i < buf.len()` and `offset + buf.len() <= size` was checked, so `p + i` is
            // in bounds; the contract of `new` covers validity and atomic-only access.
            let q = unsafe { p.add(i) };
            if q as usize % 8 == 0 && buf.len() - i >= 8 {
                // SAFETY: `q` is 8-aligned with 8 bytes left in bounds (see above).
                let v = unsafe { AtomicU64::from_ptr(q.cast()) }.load(Ordering::Relaxed);
                buf[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: `q` is in bounds (see above); u8 needs no alignment.
                buf[i] = unsafe { AtomicU8::from_ptr(q) }.load(Ordering::Relaxed);
                i += 1;
            }
        }
        Ok(())
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), RingError> {
        let p = self.at(offset, data.len(), 1)?;
        let mut i = 0;
        while i < data.len() {
            // SAFETY: as in `read_bytes`.
            let q = unsafe { p.add(i) };
            if q as usize % 8 == 0 && data.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&data[i..i + 8]);
                // SAFETY: `q` is 8-aligned with 8 bytes left in bounds (see above).
                unsafe { AtomicU64::from_ptr(q.cast()) }
                    .store(u64::from_ne_bytes(w), Ordering::Relaxed);
                i += 8;
            } else {
                // SAFETY: `q` is in bounds; u8 needs no alignment.
                unsafe { AtomicU8::from_ptr(q) }.store(data[i], Ordering::Relaxed);
                i += 1;
            }
        }
        Ok(())
    }
}

/// A zero-initialised heap region, for tests, fuzzing and single-process use.
#[derive(Debug)]
pub struct HeapRegion {
    raw: RawRegion,
    alloc: NonNull<[u64]>,
}

// SAFETY: the allocation is owned by this value and only reachable through `raw`, which is
// Send + Sync (atomic-only access).
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `size` zeroed bytes (8-byte aligned).
    pub fn new(size: usize) -> Self {
        let words = size.div_ceil(8).max(1);
        let alloc = NonNull::from(Box::leak(vec![0u64; words].into_boxed_slice()));
        // What `RawRegion::new` requires holds: the allocation has at least `size` bytes, is
        // non-null and 8-aligned, lives until `drop` (which drops `raw` with it), and is reachable
        // only through `raw`, which accesses it atomically.
        let raw = RawRegion {
            base: alloc.cast(),
            size,
        };
        Self { raw, alloc }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `alloc` came from `Box::leak` in `new` and is freed only here; `raw`, the only
        // other pointer to it, is dropped together with `self`.
        drop(unsafe { Box::from_raw(self.alloc.as_ptr()) });
    }
}

impl SharedRegion for HeapRegion {
    fn size(&self) -> usize {
        self.raw.size()
    }
    fn load_u32(&self, offset: usize, order: Load) -> Result<u32, RingError> {
        self.raw.load_u32(offset, order)
    }
    fn store_u32(&self, offset: usize, value: u32, order: Store) -> Result<(), RingError> {
        self.raw.store_u32(offset, value, order)
    }
    fn load_u64(&self, offset: usize, order: Load) -> Result<u64, RingError> {
        self.raw.load_u64(offset, order)
    }
    fn store_u64(&self, offset: usize, value: u64, order: Store) -> Result<(), RingError> {
        self.raw.store_u64(offset, value, order)
    }
    fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), RingError> {
        self.raw.read_bytes(offset, buf)
    }
    fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), RingError> {
        self.raw.write_bytes(offset, data)
    }
}

macro_rules! forward {
    ($($t:ty),*) => {$(
        impl<T: SharedRegion + ?Sized> SharedRegion for $t {
            fn size(&self) -> usize {
                (**self).size()
            }
            fn load_u32(&self, offset: usize, order: Load) -> Result<u32, RingError> {
                (**self).load_u32(offset, order)
            }
            fn store_u32(&self, offset: usize, value: u32, order: Store) -> Result<(), RingError> {
                (**self).store_u32(offset, value, order)
            }
            fn load_u64(&self, offset: usize, order: Load) -> Result<u64, RingError> {
                (**self).load_u64(offset, order)
            }
            fn store_u64(&self, offset: usize, value: u64, order: Store) -> Result<(), RingError> {
                (**self).store_u64(offset, value, order)
            }
            fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), RingError> {
                (**self).read_bytes(offset, buf)
            }
            fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), RingError> {
                (**self).write_bytes(offset, data)
            }
        }
    )*};
}
forward!(&T, Arc<T>, Box<T>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_alignment() {
        let r = HeapRegion::new(64);
        assert!(r.load_u32(60, Load::Relaxed).is_ok());
        assert!(r.load_u32(61, Load::Relaxed).is_err());
        assert!(r.load_u32(64, Load::Relaxed).is_err());
        assert!(r.load_u64(56, Load::Acquire).is_ok());
        assert!(r.load_u64(60, Load::Acquire).is_err());
        assert!(r.store_u64(usize::MAX - 3, 1, Store::Release).is_err());
        assert!(r.read_bytes(60, &mut [0; 5]).is_err());
        assert!(r.write_bytes(usize::MAX, &[1]).is_err());
        assert!(r.zero(0, 65).is_err());
    }

    #[test]
    fn bytes_round_trip_unaligned() {
        let r = HeapRegion::new(256);
        let data: Vec<u8> = (0..100u8).collect();
        for off in 0..20 {
            r.write_bytes(off, &data).unwrap();
            let mut back = vec![0; 100];
            r.read_bytes(off, &mut back).unwrap();
            assert_eq!(back, data);
        }
        r.store_u32(8, 0x0403_0201, Store::Release).unwrap();
        let mut b = [0; 4];
        r.read_bytes(8, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4], "little-endian in memory");
        r.zero(0, 256).unwrap();
        assert_eq!(r.load_u64(8, Load::Relaxed).unwrap(), 0);
    }
}
