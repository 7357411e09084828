//! Emulated devices and the buses that route guest port I/O and MMIO to them.
//!
//! Every device implements [`bus::BusDevice`]; all guest-provided values (offsets, widths, data)
//! are untrusted and each device handles any of them without panicking.

pub mod acpi_pm;
pub mod bus;
pub mod channel;
pub mod i8042;
pub mod pci;
pub mod pvpanic;
pub mod serial;
pub mod vfio_pci;
pub mod virtio;
