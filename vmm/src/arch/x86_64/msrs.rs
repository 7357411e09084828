//! Boot-time MSR values, filtered to the MSRs this KVM actually supports.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;

/// Errors programming MSRs.
#[derive(Debug, Error)]
pub enum MsrError {
    /// Listing supported MSRs failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    IndexList(#[source] kvm_ioctls::Error),
    /// Building the MSR list failed.
    #[error("cannot build MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed or set fewer MSRs than asked.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Set {
        /// Number set.
        set: usize,
        /// Number requested.
        wanted: usize,
    },
    /// KVM_SET_MSRS ioctl error.
    #[error("KVM_SET_MSRS failed")]
    SetIoctl(#[source] kvm_ioctls::Error),
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
/// The 64-bit system-call entry point (the kernel's `entry_SYSCALL_64`).
pub(crate) const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs a boot loader leaves in a known state.
pub fn boot_msr_values() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// The MSR indices KVM can save and restore on this host.
pub fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>, MsrError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(MsrError::IndexList)?
        .as_slice()
        .to_vec())
}

/// Programs the boot MSRs that are in `supported`.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), MsrError> {
    let entries: Vec<kvm_msr_entry> = boot_msr_values()
        .into_iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::SetIoctl)?;
    if set != entries.len() {
        return Err(MsrError::Set {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}
