//! The VM-wide state KVM holds: the in-kernel interrupt controllers (both PICs, the IOAPIC),
//! the PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Interrupt controllers, PIT and clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| SnapshotError::Kvm("KVM_GET_IRQCHIP", e))?;
    Ok(c)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all paused.
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        Ok(VmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .get_pit2()
                .map_err(|e| SnapshotError::Kvm("KVM_GET_PIT2", e))?,
            clock: vm
                .get_clock()
                .map_err(|e| SnapshotError::Kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// Writes the state into a new VM (irqchip and PIT created, vCPUs not yet running). The
    /// guest's clock continues from the instant of the snapshot.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(c)
                .map_err(|e| SnapshotError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| SnapshotError::Kvm("KVM_SET_PIT2", e))?;
        // Only the value: the flags read back describe the host's clock, not a request.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| SnapshotError::Kvm("KVM_SET_CLOCK", e))?;
        Ok(())
    }
}
