//! Adding and removing VMs while the daemon runs.
//!
//! **Adding**: the new `[[driver]]` and `[[client]]` tables are checked together with the
//! running configuration, exactly as a configuration file is (names, files, windows that
//! overlap, unknown driver VMs, MACs given twice, ...). A new client's disks and NICs take free
//! slots of their driver VMs ([`super::channels`]; all or none); a running driver VM is told
//! through its VMM's control socket, and its agent starts serving the slot. Then the new VMs
//! start, driver VMs first, and the add completes once every slot a running driver VM took is
//! served: an agent that cannot serve one (its device missing in the driver VM, say) undoes the
//! whole add, so a bad client never reaches the driver VM's fault detection and its other
//! clients.
//!
//! **Removing**: the VM is stopped. A client's slots are taken back from their driver VMs (the
//! agent lets go of each), wiped, and kept as spares; those driver VMs' standbys go (a standby
//! VMM is built with the slots' assignments of its time) and new ones are restored. Their
//! templates stay: a template holds no client data (it is made with the agent parked at the
//! gate, before any ring), and a restored agent compares every slot's registers, which are the
//! restoring VMM's, with the assignment it remembers and lets a stale one go. A
//! driver VM that serves clients is removed only when forced: the clients' disks and NICs on it
//! then fail, as for a quarantined driver VM, and their channels go.

use std::sync::Arc;
use std::time::Duration;

use super::channels::Spare;
use super::config::{NewVms, Role};
use super::supervisor::{Inner, Supervisor, SupervisorError, VmState};
use crate::control::{ControlReply, ControlRequest};

/// How long a driver VM's VMM may take to assign a slot, or to take one back (its agent has
/// [`crate::devices::channel::DETACH_TIMEOUT`] to let go).
const SLOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a running driver VM's agent may take to serve a slot assigned to it, once the new
/// client's VMM has created the ring (at its start, before its guest boots).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

impl Supervisor {
    /// Adds the VMs of `new` and starts them; returns their names.
    pub async fn add(self: &Arc<Self>, new: &NewVms) -> Result<Vec<String>, SupervisorError> {
        let names: Vec<String> = new
            .driver
            .iter()
            .chain(&new.client)
            .map(|v| v.name().to_string())
            .collect();
        if names.is_empty() {
            return Err(SupervisorError::Config(
                super::config::ConfigError::Invalid {
                    key: "driver, client".into(),
                    message: "no VM to add".into(),
                },
            ));
        }
        // Slots to assign in running driver VMs: (driver, slot, description).
        let assigns = {
            let mut g = self.lock();
            let cfg = g.config.with_added(new)?;
            let added: Vec<_> = cfg.vms().filter(|v| names.contains(&v.name)).collect();
            for v in &added {
                for (driver, _) in super::channels::Port::of_client(v) {
                    if g.vms.get(&driver).is_some_and(|d| d.recovering) {
                        return Err(SupervisorError::Busy(driver, "being recovered"));
                    }
                }
            }
            for (i, v) in added.iter().enumerate() {
                if let Err(e) = self.provision(&mut g, v, &cfg) {
                    for done in &added[..i] {
                        self.unprovision(&mut g, &done.name);
                    }
                    return Err(e);
                }
            }
            g.config = cfg;
            g.channels
                .iter()
                .filter(|c| names.contains(&c.client) && !names.contains(&c.driver))
                .map(|c| {
                    let slot = c.slot.index as u32;
                    (c.driver.clone(), slot, c.port.device_spec())
                })
                .collect::<Vec<_>>()
        };
        // Slots a running driver VM took: they must be served before the add completes.
        let mut live = Vec::new();
        for (driver, slot, channel) in assigns {
            // A standby restored before this client existed would resume without it.
            self.dismiss_standby(&driver);
            let req = ControlRequest::Assign { slot, channel };
            match self.slot_request(&driver, &req).await {
                Ok(true) => live.push((driver.clone(), slot)),
                Ok(false) => {}
                Err(e) => return Err(self.undo_add(&names, e).await),
            }
            tracing::info!(vm = %driver, slot, "channel slot assigned");
            // Its watcher restores a new standby (this template, this client's slot assigned).
            if let Some(vm) = self.lock().vms.get_mut(&driver) {
                vm.standby_for = None;
            }
        }
        for role in [Role::Driver, Role::Client] {
            for name in &names {
                let has_role = self
                    .lock()
                    .vms
                    .get(name)
                    .is_some_and(|v| v.cfg.role == role);
                if !has_role {
                    continue;
                }
                if role == Role::Driver {
                    self.spawn_watcher(name.clone());
                }
                if let Err(e) = self.start(name) {
                    return Err(self.undo_add(&names, e).await);
                }
            }
        }
        for (driver, slot) in live {
            if !self.wait_served(&driver, slot).await {
                let e = SupervisorError::Timeout(format!(
                    "driver VM '{driver}' did not serve channel slot {slot} within {} s (see its \
                     console); nothing was added",
                    SERVE_TIMEOUT.as_secs()
                ));
                return Err(self.undo_add(&names, e).await);
            }
        }
        tracing::info!(vms = ?names, "VMs added");
        Ok(names)
    }

    /// Removes the VMs of a failed add; returns `e`.
    async fn undo_add(self: &Arc<Self>, names: &[String], e: SupervisorError) -> SupervisorError {
        tracing::warn!(vms = ?names, error = %e, "add failed: undoing it");
        for name in names.iter().rev() {
            match self.remove(name, true).await {
                Ok(()) | Err(SupervisorError::UnknownVm(_)) => {}
                Err(e) => tracing::warn!(vm = %name, error = %e, "undoing an add"),
            }
        }
        e
    }

    /// Waits until driver VM `driver`'s agent serves the ring in slot `slot` (false: not
    /// within [`SERVE_TIMEOUT`], or the channel is gone). A driver VM that stopped or is
    /// being recovered meanwhile is not waited for: its next start serves the slot.
    async fn wait_served(&self, driver: &str, slot: u32) -> bool {
        let deadline = tokio::time::Instant::now() + SERVE_TIMEOUT;
        loop {
            {
                let g = self.lock();
                let elsewhere = g
                    .vms
                    .get(driver)
                    .is_none_or(|v| v.recovering || v.state != VmState::Running);
                let Some(c) = g
                    .channels
                    .iter()
                    .find(|c| c.driver == driver && c.slot.index == slot as usize)
                else {
                    return false;
                };
                if elsewhere
                    || c.slot
                        .ring_header()
                        .is_some_and(|h| h.agent_serves_current())
                {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops and removes VM `name`. A driver VM that serves clients only if `force`.
    pub async fn remove(self: &Arc<Self>, name: &str, force: bool) -> Result<(), SupervisorError> {
        let served = {
            let mut g = self.lock();
            let vm = g
                .vms
                .get(name)
                .ok_or_else(|| SupervisorError::UnknownVm(name.to_string()))?;
            if vm.recovering {
                return Err(SupervisorError::Busy(name.to_string(), "being recovered"));
            }
            let served: Vec<(String, usize)> = g
                .channels
                .iter()
                .filter(|c| c.driver == name)
                .map(|c| (c.client.clone(), c.client_index))
                .collect();
            if !served.is_empty() && !force {
                let mut clients: Vec<&str> = served.iter().map(|(c, _)| c.as_str()).collect();
                clients.dedup();
                return Err(SupervisorError::InUse(name.to_string(), clients.join(", ")));
            }
            if let Some(vm) = g.vms.get_mut(name) {
                vm.removing = true;
            }
            served
        };
        self.dismiss_standby(name);
        match self.stop(name).await {
            Ok(()) | Err(SupervisorError::NotRunning(_)) => {}
            Err(e) => {
                if let Some(vm) = self.lock().vms.get_mut(name) {
                    vm.removing = false;
                }
                return Err(e);
            }
        }
        for (client, disk) in served {
            let req = ControlRequest::Quarantine { disk };
            match self.control(&client, &req, SLOT_TIMEOUT).await {
                Ok(_) | Err(SupervisorError::NotRunning(_)) => {}
                Err(e) => {
                    tracing::warn!(vm = %client, disk, error = %e, "failing a channel of a removed driver VM")
                }
            }
        }
        let taken: Vec<(String, u32)> = self
            .lock()
            .channels
            .iter()
            .filter(|c| c.client == name)
            .map(|c| (c.driver.clone(), c.slot.index as u32))
            .collect();
        for (driver, slot) in &taken {
            let req = ControlRequest::Vacate { slot: *slot };
            if let Err(e) = self.slot_request(driver, &req).await {
                // Its memory is wiped all the same; the driver VM is trusted with its device's
                // data, never with another client's.
                tracing::warn!(vm = %driver, slot, error = %e, "taking a channel slot back");
            }
        }
        {
            let mut g = self.lock();
            self.unprovision(&mut g, name);
            if let Some(cfg) = g.config.without(name) {
                g.config = cfg;
            }
        }
        tracing::info!(vm = name, "VM removed");
        Ok(())
    }

    /// Sends a slot request to driver VM `driver`'s VMM: true if it carried it out, false if
    /// the driver VM does not run (it gets its slots at its next start).
    async fn slot_request(
        &self,
        driver: &str,
        req: &ControlRequest,
    ) -> Result<bool, SupervisorError> {
        match self.control(driver, req, SLOT_TIMEOUT).await {
            Ok(ControlReply { ok: true, .. }) => Ok(true),
            Err(SupervisorError::NotRunning(_)) => Ok(false),
            Ok(r) => Err(SupervisorError::Control {
                name: driver.to_string(),
                source: crate::control::ControlError::Refused(r.error.unwrap_or_default()),
            }),
            Err(e) => Err(e),
        }
    }

    /// Forgets VM `name` (its process has ended): a client's slots go back to their driver VMs,
    /// wiped, and those driver VMs' standbys (built with the client on the slots) are dismissed
    /// and named in the result; a driver VM's slots and channels go; then its stats page, jail
    /// directory and cgroup.
    pub(super) fn unprovision(&self, inner: &mut Inner, name: &str) -> Vec<String> {
        let mut vacated = Vec::new();
        for c in std::mem::take(&mut inner.channels) {
            if c.client == name {
                if let Err(e) = c.slot.wipe() {
                    tracing::warn!(vm = %c.driver, slot = c.slot.index, error = %e, "wiping a channel slot");
                }
                if !vacated.contains(&c.driver) {
                    vacated.push(c.driver.clone());
                }
                inner.spare.push(Spare {
                    driver: c.driver,
                    slot: c.slot,
                });
            } else if c.driver != name {
                inner.channels.push(c);
            }
        }
        inner.spare.retain(|s| s.driver != name);
        for d in &vacated {
            if let Some(vm) = inner.vms.get_mut(d) {
                if let Some(s) = vm.standby.take() {
                    super::standby::dismiss(d, s, "dismissed: a client's slot was taken back");
                }
                // Its watcher restores a new one (this template, the slot vacant).
                vm.standby_for = None;
            }
        }
        inner.order.retain(|n| n != name);
        if let Some(vm) = inner.vms.remove(name) {
            if let Some(t) = &vm.template {
                if let Err(e) = std::fs::remove_dir_all(&t.dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(vm = name, error = %e, "removing the template");
                    }
                }
            }
            if let Err(e) = std::fs::remove_dir_all(vm.jail_root()) {
                tracing::warn!(vm = name, error = %e, "removing the jail directory");
            }
        }
        if let Some(c) = self.cgroups() {
            c.remove_vm(name);
        }
        vacated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_lowest_first_all_or_none_and_come_back_wiped() {
        let (dir, base) = crate::daemon::config::tests::setup();
        let text = format!(
            "{base}spare_channels = 1\n[[client]]\nname = \"a\"\nkernel = \"vmlinuz\"\n\
             [[client.disk]]\ndriver = \"drv\"\nsize = \"8M\"\n"
        );
        let cfg = crate::daemon::config::tests::parse(&dir, &text).expect("cfg");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state");
        let sup = Supervisor::new(&cfg, "/bin/false".into(), state).expect("supervisor");
        let slots = |sup: &Supervisor| {
            let g = sup.lock();
            let mut taken: Vec<(String, usize)> = g
                .channels
                .iter()
                .map(|c| (c.client.clone(), c.slot.index))
                .collect();
            taken.sort();
            let mut spare: Vec<usize> = g.spare.iter().map(|s| s.slot.index).collect();
            spare.sort();
            (taken, spare)
        };
        assert_eq!(slots(&sup), (vec![("a".into(), 0)], vec![1]));
        let client = |name: &str, offsets: &[&str]| -> NewVms {
            let disks: String = offsets
                .iter()
                .map(|o| {
                    format!("[[client.disk]]\ndriver = \"drv\"\noffset = \"{o}\"\nsize = \"4M\"\n")
                })
                .collect();
            toml::from_str(&format!(
                "[[client]]\nname = \"{name}\"\nkernel = \"vmlinuz\"\n{disks}"
            ))
            .expect("tables")
        };
        let add = |new: &NewVms| -> Result<(), SupervisorError> {
            let mut g = sup.lock();
            let cfg = g.config.with_added(new)?;
            let v = cfg.clients.last().cloned().expect("client");
            sup.provision(&mut g, &v, &cfg)?;
            g.config = cfg;
            Ok(())
        };
        // Two disks, one free slot: nothing taken.
        let e = add(&client("b", &["40M", "48M"])).expect_err("one slot for two disks");
        assert!(
            matches!(e, SupervisorError::NoSlot(ref d) if d == "drv"),
            "{e}"
        );
        assert_eq!(slots(&sup), (vec![("a".into(), 0)], vec![1]));
        assert!(!sup.lock().vms.contains_key("b"));
        add(&client("b", &["48M"])).expect("b");
        assert_eq!(
            slots(&sup),
            (vec![("a".into(), 0), ("b".into(), 1)], vec![])
        );
        let e = add(&client("c", &["56M"])).expect_err("no slot left");
        assert_eq!(
            e.to_string(),
            "driver VM 'drv' has no free channel slot (give it more with spare_channels)"
        );
        // b goes: its slot comes back wiped, with its generations; the driver VM's template
        // stays (it holds no client data), its standby (built with b on the slot) goes.
        {
            let g = sup.lock();
            let c = g.channels.iter().find(|c| c.client == "b").expect("b");
            std::os::unix::fs::FileExt::write_all_at(&c.slot.memory, b"secret", 4096)
                .expect("write");
        }
        let vacated = {
            let mut g = sup.lock();
            if let Some(t) = g.vms.get_mut("drv").and_then(|v| v.template.as_mut()) {
                t.made = Some(std::time::Instant::now());
            }
            sup.unprovision(&mut g, "b")
        };
        assert_eq!(vacated, vec!["drv".to_string()]);
        assert_eq!(slots(&sup), (vec![("a".into(), 0)], vec![1]));
        {
            let g = sup.lock();
            assert!(!g.vms.contains_key("b") && !g.order.contains(&"b".to_string()));
            let t = g.vms.get("drv").and_then(|v| v.template.as_ref());
            assert!(t.is_some_and(|t| t.made.is_some()), "template kept");
            let mut b = [0xffu8; 6];
            let s = &g.spare[0].slot;
            std::os::unix::fs::FileExt::read_exact_at(&s.memory, &mut b, 4096).expect("read");
            assert_eq!(b, [0; 6], "wiped");
        }
        add(&client("c", &["56M"])).expect("c takes b's slot");
        assert_eq!(
            slots(&sup),
            (vec![("a".into(), 0), ("c".into(), 1)], vec![])
        );
        // The driver VM goes: its slots with it.
        let _ = sup.unprovision(&mut sup.lock(), "drv");
        assert_eq!(slots(&sup), (vec![], vec![]));
        sup.remove_cgroups();
    }
}
