//! Coalesced port writes: KVM queues the guest's writes to some ports in a ring page instead of
//! returning to the VMM for each, and a vCPU thread replays them into the bus, in order, before
//! it handles any other port access.
//!
//! Used for writes that only matter to the next access the guest makes through the VMM:
//! - the PCI configuration address register (0xcf8): every configuration access is a write
//!   there, then an access to the data register, which exits and drains first; one exit to
//!   the VMM per access instead of two;
//! - the UART's transmit register while the guest polls it (its transmit interrupt disabled,
//!   as the kernel's console does): the guest reads the UART's status before each byte or
//!   each 16, which drains.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET;
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

use super::KvmError;
use crate::devices::bus::Bus;

/// The ring page (x86-64 pages are 4 KiB): `first`, `last`, then 24-byte entries.
const PAGE: usize = 4096;
const HEADER: usize = 8;
const ENTRY: usize = 24;
const SLOTS: u32 = ((PAGE - HEADER) / ENTRY) as u32;
/// Entry layout (`struct kvm_coalesced_mmio`): address, length, pio flag, 8 data bytes.
const ENTRY_LEN: usize = 8;
const ENTRY_DATA: usize = 16;

/// The VM's ring of coalesced writes, and the port ranges that may be coalesced.
pub struct CoalescedRing {
    vm: Arc<VmFd>,
    /// `(first port, length)` of every range a [`CoalescedPort`] may register: an entry
    /// outside them is dropped, not dispatched.
    zones: Vec<(u16, u16)>,
    /// The ring page (mapped through any vCPU's descriptor, once one exists).
    ring: OnceLock<MmapRegion<()>>,
    /// One consumer at a time.
    drain: Mutex<()>,
    /// Writes replayed, per zone (same order as `zones`).
    replayed: Vec<AtomicU64>,
    batches: AtomicU64,
}

/// One port range whose writes can be coalesced, on or off.
pub struct CoalescedPort {
    ring: Arc<CoalescedRing>,
    port: u16,
    len: u16,
    /// Whether the range is registered with KVM now.
    registered: Mutex<bool>,
}

impl CoalescedRing {
    /// The ring of `vm`, for writes to the `zones` (`(first port, length)`); their writes are
    /// replayed once [`Self::map_ring`] has mapped the ring.
    pub fn new(vm: Arc<VmFd>, zones: &[(u16, u16)]) -> Arc<Self> {
        Arc::new(CoalescedRing {
            vm,
            zones: zones.to_vec(),
            ring: OnceLock::new(),
            drain: Mutex::new(()),
            replayed: zones.iter().map(|_| AtomicU64::new(0)).collect(),
            batches: AtomicU64::new(0),
        })
    }

    /// The zone starting at `port` (one of those given to [`Self::new`]), not yet coalesced.
    pub fn port(self: &Arc<Self>, port: u16) -> Option<CoalescedPort> {
        let &(port, len) = self.zones.iter().find(|(p, _)| *p == port)?;
        Some(CoalescedPort {
            ring: self.clone(),
            port,
            len,
            registered: Mutex::new(false),
        })
    }

    /// Maps the VM's ring page through `vcpu` (the page is the VM's: one mapping serves
    /// every vCPU thread). A second call is a no-op.
    pub fn map_ring(&self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        if self.ring.get().is_some() {
            return Ok(());
        }
        let sys = |e: std::io::Error| KvmError::Ioctl("mmap of the coalesced I/O ring", e.into());
        // SAFETY: `vcpu` is an open vCPU descriptor for the whole call; the borrow only
        // lives until it is duplicated into a descriptor of our own.
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(sys)?;
        let offset = u64::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * PAGE as u64;
        let map = MmapRegion::<()>::build(
            Some(FileOffset::new(File::from(fd), offset)),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| sys(std::io::Error::other(e.to_string())))?;
        let _ = self.ring.set(map);
        Ok(())
    }

    /// Replays the queued writes into `bus` in order, then lets the device that took them
    /// flush. Returns how many were replayed.
    pub fn drain(&self, bus: &Bus) -> usize {
        let Some(ring) = self.ring.get() else {
            return 0;
        };
        self.drain_page(&ring.as_volatile_slice(), bus)
    }

    fn drain_page(&self, page: &VolatileSlice<'_, ()>, bus: &Bus) -> usize {
        // Every port exit comes here: an empty ring costs two loads, not the lock. `first`
        // is stored only after its entries were dispatched, so equal indices mean nothing is
        // left to replay for this exit.
        if page.load::<u32>(0, Ordering::Acquire).ok()
            == page.load::<u32>(4, Ordering::Acquire).ok()
        {
            return 0;
        }
        let _one = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        // KVM writes `last` after the entry; we own `first`. Both are read once per drain
        // and checked: the loop runs at most one ring's worth.
        let (Ok(mut first), Ok(last)) = (
            page.load::<u32>(0, Ordering::Relaxed),
            page.load::<u32>(4, Ordering::Acquire),
        ) else {
            return 0;
        };
        if first >= SLOTS || last >= SLOTS {
            tracing::warn!(first, last, "coalesced I/O ring indices out of range");
            return 0;
        }
        let mut n = 0;
        let mut entry = [0u8; ENTRY];
        while first != last {
            if page
                .read_slice(&mut entry, HEADER + first as usize * ENTRY)
                .is_err()
            {
                break;
            }
            first = (first + 1) % SLOTS;
            n += 1;
            self.replay(bus, &entry);
        }
        if n > 0 {
            let _ = page.store(first, 0, Ordering::Release);
            for &(port, _) in &self.zones {
                bus.flush(u64::from(port));
            }
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
        n
    }

    /// Dispatches one entry. Only the zones are ever queued; anything else is dropped, not
    /// dispatched to whatever device sits at that address.
    fn replay(&self, bus: &Bus, entry: &[u8; ENTRY]) {
        let field = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&entry[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        let addr = u64::from(field(0)) | (u64::from(field(4)) << 32);
        let len = field(ENTRY_LEN) as usize;
        let zone = self.zones.iter().position(|&(port, n)| {
            addr >= u64::from(port) && addr + len as u64 <= u64::from(port) + u64::from(n)
        });
        let (Some(zone), true) = (zone, (1..=8).contains(&len)) else {
            tracing::warn!(addr, len, "unexpected coalesced I/O entry dropped");
            return;
        };
        self.replayed[zone].fetch_add(1, Ordering::Relaxed);
        bus.write(addr, &entry[ENTRY_DATA..ENTRY_DATA + len]);
    }

    /// Writes replayed so far per zone (`(first port, writes)`), and in how many drains.
    pub fn counts(&self) -> (Vec<(u16, u64)>, u64) {
        let per_zone = self
            .zones
            .iter()
            .zip(&self.replayed)
            .map(|(z, n)| (z.0, n.load(Ordering::Relaxed)))
            .collect();
        (per_zone, self.batches.load(Ordering::Relaxed))
    }
}

impl CoalescedPort {
    /// Starts or stops coalescing the range's writes. Writes already queued stay in the ring
    /// until the next drain, which comes before any other port access is handled.
    pub fn set_enabled(&self, on: bool) -> Result<(), KvmError> {
        let mut registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        if *registered == on {
            return Ok(());
        }
        let addr = IoEventAddress::Pio(u64::from(self.port));
        let vm = &self.ring.vm;
        if on {
            vm.register_coalesced_mmio(addr, u32::from(self.len))
                .map_err(|e| KvmError::Ioctl("KVM_REGISTER_COALESCED_MMIO", e))?;
        } else {
            vm.unregister_coalesced_mmio(addr, u32::from(self.len))
                .map_err(|e| KvmError::Ioctl("KVM_UNREGISTER_COALESCED_MMIO", e))?;
        }
        *registered = on;
        Ok(())
    }

    /// Whether writes are being coalesced now.
    pub fn enabled(&self) -> bool {
        *self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::devices::bus::BusDevice;

    /// Records what reaches it.
    #[derive(Default)]
    struct Sink {
        writes: Vec<(u64, Vec<u8>)>,
        flushes: usize,
    }
    impl BusDevice for Sink {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
    }

    fn entry(page: &VolatileSlice<'_, ()>, slot: u32, addr: u64, data: &[u8]) {
        let at = HEADER + slot as usize * ENTRY;
        page.write_obj(addr, at).expect("addr");
        page.write_obj(data.len() as u32, at + ENTRY_LEN)
            .expect("len");
        page.write_obj(1u32, at + 12).expect("pio");
        let mut d = [0u8; 8];
        d[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        page.write_slice(&d, at + ENTRY_DATA).expect("data");
    }

    /// A ring object whose VM is never touched (drain_page does not use it).
    fn ring() -> Option<Arc<CoalescedRing>> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        Some(CoalescedRing::new(Arc::new(vm), &[(0x3f8, 1), (0xcf8, 4)]))
    }

    #[test]
    fn replays_in_order_across_the_wrap_and_drops_strangers() {
        // Needs a VmFd to build the object; machines without /dev/kvm skip.
        // The VM only registers zones (not done here); the VMM's tests need /dev/kvm anyway.
        let port = ring().expect("a VM on /dev/kvm");
        let sink = Arc::new(StdMutex::new(Sink::default()));
        let pci = Arc::new(StdMutex::new(Sink::default()));
        let mut bus = Bus::new();
        bus.insert(sink.clone(), 0x3f8, 8).expect("insert");
        bus.insert(pci.clone(), 0xcf8, 8).expect("insert");
        let map = MmapRegion::<()>::new(PAGE).expect("page");
        let page = map.as_volatile_slice();
        // Entries from the last slot around to slot 4: one for a port outside the zones, one
        // with a bad length, one that straddles a zone's end.
        let last = SLOTS - 1;
        entry(&page, last, 0x3f8, b"a");
        entry(&page, 0, 0x80, b"x");
        entry(&page, 1, 0xcf8, &[0, 8, 0, 0x80]);
        entry(&page, 2, 0x3f8, &[]);
        entry(&page, 3, 0xcfa, &[1, 2, 3, 4]);
        entry(&page, 4, 0x3f8, b"b");
        page.store(last, 0, Ordering::Relaxed).expect("first");
        page.store(5u32, 4, Ordering::Relaxed).expect("last");
        assert_eq!(port.drain_page(&page, &bus), 6);
        let s = sink.lock().expect("sink");
        assert_eq!(s.writes, vec![(0, b"a".to_vec()), (0, b"b".to_vec())]);
        assert_eq!(s.flushes, 1);
        drop(s);
        assert_eq!(
            pci.lock().expect("pci").writes,
            vec![(0, vec![0, 8, 0, 0x80])]
        );
        assert_eq!(page.load::<u32>(0, Ordering::Relaxed).expect("first"), 5);
        // Empty now; indices out of range are refused without a loop.
        assert_eq!(port.drain_page(&page, &bus), 0);
        page.store(SLOTS + 5, 4, Ordering::Relaxed).expect("last");
        assert_eq!(port.drain_page(&page, &bus), 0);
        assert_eq!(port.counts(), (vec![(0x3f8, 2), (0xcf8, 1)], 1));
    }
}
