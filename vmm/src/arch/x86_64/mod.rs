//! x86-64: the physical memory layout, the 64-bit Linux boot protocol, vCPU state and ACPI.

pub mod acpi;
pub mod boot_params;
pub mod bzimage;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod msrs;
pub mod regs;
pub mod reset_vector;
