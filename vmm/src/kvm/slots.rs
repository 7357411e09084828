//! The one owner of a VM's KVM memory slots.
//!
//! Guest RAM takes the first slots; every other mapping the guest sees directly (a channel's
//! shared memory, the pages of a passed-through BAR) gets the next one through
//! [`MemorySlots::map`], which takes the mapping's owner and keeps it for as long as the slot
//! exists: on drop, each such slot is deleted from the VM before its mapping is unmapped, so no
//! slot ever points at unmapped (or reused) memory, whoever else still holds the VM. This is
//! the only place that calls `KVM_SET_USER_MEMORY_REGION`.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::KvmError;
use crate::memory::GuestRam;
use crate::vfio::device::BarMapping;

/// A host mapping that can back a memory slot: it stays mapped for as long as the value
/// lives.
pub trait HostMapping: Send + Sync + 'static {
    /// Host address and length in bytes.
    fn host_range(&self) -> (u64, u64);
}

impl HostMapping for MmapRegion {
    fn host_range(&self) -> (u64, u64) {
        (self.as_ptr() as u64, self.size() as u64)
    }
}

impl HostMapping for BarMapping {
    fn host_range(&self) -> (u64, u64) {
        (self.addr(), self.len())
    }
}

/// The VM's memory slots and the mappings behind those after guest RAM.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    /// (slot, guest address, mapping) of every slot after guest RAM.
    held: Vec<(u32, u64, Box<dyn HostMapping>)>,
    next: u32,
}

impl Drop for MemorySlots {
    fn drop(&mut self) {
        for (slot, guest_addr, mapping) in self.held.drain(..) {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: guest_addr,
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: a zero-sized region deletes the slot; KVM then holds no reference to any
            // host memory for it, so unmapping `mapping` afterwards is sound.
            if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
                // The slot stays: keep its memory mapped (leaked) rather than unmap it under KVM.
                tracing::error!(slot, error = %e, "cannot delete a memory slot; its mapping is kept");
                std::mem::forget(mapping);
            }
        }
    }
}

impl MemorySlots {
    /// Registers every region of `ram` (slots 0..n). The caller keeps `ram` alive for as long
    /// as the VM (the machine owns both and drops the VM first).
    pub fn new(vm: Arc<VmFd>, ram: &GuestRam) -> Result<Self, KvmError> {
        let mut slots = MemorySlots {
            vm,
            held: Vec::new(),
            next: 0,
        };
        for region in ram.memory().iter() {
            let host = ram
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|_| {
                    KvmError::Ioctl("host address lookup", kvm_ioctls::Error::new(libc::EFAULT))
                })?;
            // SAFETY: `host..host+len` is a live mapping owned by `ram`, which the caller keeps
            // alive for as long as the VM (see above).
            unsafe {
                slots.set(
                    region.start_addr().0,
                    host as u64,
                    region.len(),
                    "guest RAM",
                )
            }?;
        }
        Ok(slots)
    }

    /// Maps `mapping` at guest physical address `guest_addr` in the next slot and keeps it
    /// until this is dropped. Returns the slot number.
    pub fn map(
        &mut self,
        what: &'static str,
        guest_addr: u64,
        mapping: Box<dyn HostMapping>,
    ) -> Result<u32, KvmError> {
        let (host, len) = mapping.host_range();
        // SAFETY: the range is `mapping`'s, which is kept in `self.held` below until the slot
        // is deleted (see `Drop`).
        let slot = unsafe { self.set(guest_addr, host, len, what) }?;
        self.held.push((slot, guest_addr, mapping));
        Ok(slot)
    }

    /// # Safety
    /// `host..host+len` must stay mapped for as long as the VM exists.
    unsafe fn set(
        &mut self,
        guest_addr: u64,
        host: u64,
        len: u64,
        what: &'static str,
    ) -> Result<u32, KvmError> {
        let slot = self.next;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| {
            tracing::error!(what, "KVM_SET_USER_MEMORY_REGION failed");
            KvmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e)
        })?;
        self.next += 1;
        Ok(slot)
    }
}
