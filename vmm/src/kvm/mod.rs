//! Thin, checked access to KVM: opening the device, creating the VM with its in-kernel
//! interrupt controllers, and its memory slots ([`slots`]).

pub mod coalesced;
pub mod slots;

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors talking to KVM.
#[derive(Debug, Error)]
pub enum KvmError {
    /// The device cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// Device path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The device is not KVM (or a broken one).
    #[error("{path} is not a usable KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm {
        /// Device path.
        path: String,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Unexpected API version.
    #[error("KVM API version {0}, need 12")]
    ApiVersion(i32),
    /// A capability we rely on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// Opens the KVM device at `path` and checks that it is a KVM with what we need.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let display = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| KvmError::Open {
            path: display.clone(),
            source,
        })?;
    // SAFETY: `into_raw_fd` hands over sole ownership of an open descriptor to `Kvm`.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let version = kvm
        .get_api_version_checked()
        .map_err(|source| KvmError::NotKvm {
            path: display,
            source,
        })?;
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Highest vCPU count KVM allows for one VM on this host.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

/// Extension trait: `KVM_GET_API_VERSION` as a `Result` (kvm-ioctls returns the raw value).
trait ApiVersionChecked {
    fn get_api_version_checked(&self) -> Result<i32, kvm_ioctls::Error>;
}

impl ApiVersionChecked for Kvm {
    fn get_api_version_checked(&self) -> Result<i32, kvm_ioctls::Error> {
        let v = self.get_api_version();
        if v < 0 {
            Err(kvm_ioctls::Error::last())
        } else {
            Ok(v)
        }
    }
}

/// Creates a VM with the in-kernel IOAPIC/PIC/LAPIC and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| KvmError::Ioctl("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| KvmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
    if kvm.check_extension(Cap::SetIdentityMapAddr) {
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| KvmError::Ioctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    }
    vm.create_irq_chip()
        .map_err(|e| KvmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| KvmError::Ioctl("KVM_CREATE_PIT2", e))?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert_eq!(err.to_string(), "cannot open /nonexistent/kvm");
    }

    #[test]
    fn non_kvm_device_is_rejected() {
        let err = open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, KvmError::NotKvm { .. }), "{err}");
    }
}
