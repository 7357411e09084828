//! One vCPU's architectural state as KVM holds it, read and written in an order that resumes a
//! Linux guest exactly (the order Firecracker and Cloud Hypervisor converged on).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `MSR_IA32_TSC`: written first, so that MSRs derived from it (the TSC deadline) are set
/// against the restored counter.
const MSR_IA32_TSC: u32 = 0x10;
/// MSRs read or written per ioctl.
const MSR_BATCH: usize = 64;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u32,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of `KVM_RUN` with no I/O left to complete.
    /// `msr_indices` is KVM's list of MSRs to save; the ones this vCPU refuses are skipped.
    pub fn save(index: u32, fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        Ok(VcpuState {
            index,
            // Events and MP state first: reading them does not change them, and they describe
            // what the register state below is in the middle of.
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
        })
    }

    /// Writes the state into a freshly created vCPU (CPUID already set). The caller has
    /// checked that the host's XSAVE area fits `kvm_xsave` ([`super::check_xsave_size`]).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        // MP state before the registers (an AP in wait-for-SIPI would otherwise be reset by
        // the later transition); sregs before regs (mode), xsave/xcrs after sregs (CR4).
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        // SAFETY: `set_xsave` lets the kernel read as much XSAVE area as the host's enabled
        // features need; the restore path refused to go on unless KVM reported that size to
        // be at most `size_of::<kvm_xsave>()` (no AMX), so the read stays inside `self.xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        // Last: pending exceptions, NMIs and interrupt shadows apply to the final state.
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The instruction pointer (for logs and tests).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}

/// Reads every MSR of `indices` the vCPU lets us read. `KVM_GET_MSRS` stops at the first MSR
/// it cannot read; that one is skipped and the rest of the batch read again.
pub(crate) fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(SnapshotError::Fam)?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(batch.len())]);
        // Skip the one it refused (if any).
        rest = &rest[(n + 1).min(rest.len())..];
        if n >= batch.len() {
            continue;
        }
        tracing::debug!(
            msr = format_args!("{:#x}", batch[n]),
            "MSR not readable, skipped"
        );
    }
    Ok(out)
}

/// Writes MSRs, the TSC first and the rest in index order. An MSR KVM refuses is reported
/// and skipped (its value was readable, so it is one KVM lists but derives itself).
fn write_msrs(fd: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    let mut ordered = saved.to_vec();
    ordered.sort_by_key(|e| (e.index != MSR_IA32_TSC, e.index));
    let mut rest = &ordered[..];
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let msrs = Msrs::from_entries(batch).map_err(SnapshotError::Fam)?;
        let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n < batch.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", batch[n].index),
                "MSR not writable, skipped"
            );
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(())
}
