//! Standby VMMs: a driver VM's template restored ahead of time in a VMM process that waits,
//! built and confined, with no vCPU started and no state loaded (`ddvmm run --restore DIR
//! --standby`). A restart that would restore the template resumes the standby instead (one
//! control request), so the outage no longer includes starting a process, entering the jail,
//! creating the KVM VM, mapping guest memory and reading the snapshot.
//!
//! One standby per driver VM, spawned once the VM serves from a usable template (at most
//! once per template and process start, so a standby that cannot start is not retried in a
//! loop); dismissed when the VM stops, when its template is refused or renewed, or when its
//! resume fails (the restart then spawns a process as without a standby). It waits in the VM's
//! cgroup and jail like the VM's own process; until resumed it touches none of the guest's
//! memory and runs no guest code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::supervisor::{send_signal_to_vm, Boot, Spawned, Supervisor, SupervisorError, VmState};
use crate::control::ControlRequest;

/// How long a standby may take to accept `resume`.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);

/// A VMM process that restored a template and waits for `resume`.
pub struct Standby {
    spawned: Spawned,
    /// The template it restored (when that template was made).
    template: Instant,
}

impl Supervisor {
    /// Spawns driver VM `name`'s standby if it should have one and has none: standbys on, the
    /// VM running with a usable template, no recovery under way, and no standby spawned for
    /// this template and process start yet.
    pub(super) fn ensure_standby(&self, name: &str) {
        if !self.recovery.standby {
            return;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(vm) = inner.vms.get_mut(name) else {
            return;
        };
        if vm.state != VmState::Running || vm.recovering || vm.standby.is_some() {
            return;
        }
        let Some(made) = vm.template.as_ref().and_then(|t| t.made) else {
            return;
        };
        if vm.standby_for == Some((made, vm.starts)) {
            return;
        }
        vm.standby_for = Some((made, vm.starts));
        match self.spawn_vmm(inner, name, &Boot::Restore, true) {
            Ok(spawned) => {
                if let Some(vm) = inner.vms.get_mut(name) {
                    vm.standby = Some(Standby {
                        spawned,
                        template: made,
                    });
                }
            }
            Err(e) => tracing::warn!(vm = name, error = %e, "standby not started"),
        }
    }

    /// Makes driver VM `name`'s standby its running process (the VM must not be running).
    /// False if it has none, the standby restored another template, or it did not resume (it
    /// is then dismissed).
    pub(super) async fn resume_standby(self: &Arc<Self>, name: &str) -> bool {
        let standby = {
            let mut g = self.lock();
            let Some(vm) = g.vms.get_mut(name) else {
                return false;
            };
            let current = vm.template.as_ref().and_then(|t| t.made);
            match vm.standby.take() {
                Some(s) if Some(s.template) == current && vm.state != VmState::Running => s,
                Some(s) => {
                    let why = if vm.state == VmState::Running {
                        "the VM runs"
                    } else {
                        "its template is no longer current"
                    };
                    dismiss(name, s, why);
                    return false;
                }
                None => return false,
            }
        };
        let mut spawned = standby.spawned;
        let started = Instant::now();
        let reply = spawned
            .control
            .call(&ControlRequest::Resume, RESUME_TIMEOUT)
            .await;
        if let Err(e) = reply {
            let s = Standby {
                spawned,
                template: standby.template,
            };
            dismiss(name, s, &format!("resume failed: {e}"));
            return false;
        }
        let mut g = self.lock();
        let Some(vm) = g.vms.get_mut(name) else {
            return false;
        };
        tracing::info!(
            vm = name,
            resume_ms = started.elapsed().as_secs_f64() * 1e3,
            "standby resumed"
        );
        self.adopt(vm, name, spawned, &Boot::Restore);
        true
    }

    /// Restarts driver VM `name` the way `boot` says: a restore resumes its standby when it has
    /// a current one, anything else spawns a process (and ends a standby no restore will use).
    /// Whether a standby was resumed.
    pub(super) async fn restart_as(
        self: &Arc<Self>,
        name: &str,
        boot: Boot,
    ) -> Result<bool, SupervisorError> {
        if boot == Boot::Restore && self.resume_standby(name).await {
            return Ok(true);
        }
        if boot != Boot::Restore {
            self.dismiss_standby(name);
        }
        self.start_as(name, boot).map(|()| false)
    }

    /// Ends driver VM `name`'s standby, if it has one.
    pub(super) fn dismiss_standby(&self, name: &str) {
        let standby = self.lock().vms.get_mut(name).and_then(|v| v.standby.take());
        if let Some(s) = standby {
            dismiss(name, s, "dismissed");
        }
    }
}

/// Kills a standby and reaps it in the background.
pub(super) fn dismiss(name: &str, s: Standby, why: &str) {
    let Spawned { mut child, control } = s.spawned;
    drop(control);
    tracing::info!(vm = name, pid = child.id(), why, "standby ended");
    if let Some(pid) = child.id() {
        send_signal_to_vm(pid, libc::SIGKILL);
    }
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
}
