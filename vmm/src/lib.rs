//! `ddvmm`: a KVM virtual machine monitor for driver-domain VMs.
//!
//! Reading guide:
//! - [`machine`] assembles a VM (memory, devices, boot state) and runs it to a [`machine::GuestExit`].
//! - [`vcpu`] is the vCPU run loop, one thread per vCPU.
//! - [`memory`] creates memfd-backed guest RAM and the x86 physical memory map.
//! - [`arch::x86_64`] holds the Linux boot protocol, CPUID, MSRs, registers and ACPI tables.
//! - [`devices`] holds the emulated devices and the I/O buses they sit on.
//! - [`exit`] says why a guest stopped and how that maps to the process exit status.
//! - [`kvm`] opens and checks `/dev/kvm`.
//! - [`daemon`] supervises driver and client VMs (config, API, channels).
//! - [`stats_page`] carries a VMM's device counters to the daemon.
//! - [`control`] is the daemon's command line to each VMM (replay, quarantine, fault injection).
//! - [`handoff`] passes channel descriptors from the daemon to VMM processes.
//! - [`snapshot`] saves a running VM to files and restores it (vCPUs, KVM state, devices, RAM).
//! - [`sandbox`] confines a VMM process: jail, per-thread seccomp filters, output caps.
//! - [`units`] parses sizes given on the command line.
//! - [`vfio`] opens host PCI functions for passthrough (`devices::vfio_pci` is the guest side).

pub mod arch;
pub mod control;
pub mod daemon;
pub mod devices;
pub mod exit;
pub mod handoff;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod sandbox;
pub mod snapshot;
pub mod stats_page;
pub mod units;
pub mod vcpu;
pub mod vfio;
