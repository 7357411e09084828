//! The vCPU run loop: one thread per vCPU, dispatching port I/O and MMIO exits to the buses and
//! turning terminal exits (shutdown, internal error, system events) into a [`GuestExit`].
//!
//! Stopping: the machine sets the shared `stop` flag and signals each vCPU thread with
//! [`kick_signal`] until it exits; the signal interrupts `KVM_RUN` with `EINTR`.
//!
//! Pausing (for a snapshot): the machine raises a [`PauseGate`] and kicks; each vCPU thread
//! completes the I/O its last exit left pending (one `KVM_RUN` with `immediate_exit` set),
//! saves its own state into the gate and waits there until the machine resumes it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::msrs::MSR_LSTAR;
use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, GuestExit};
use crate::kvm::coalesced::CoalescedRing;
use crate::snapshot::{SnapshotError, VcpuState};

/// Where vCPU threads wait while the machine is paused, and leave their saved state.
pub struct PauseGate {
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
    /// MSRs each vCPU saves.
    msr_indices: Vec<u32>,
}

#[derive(Default)]
struct PauseState {
    /// Pause rounds so far: a vCPU waits until the round it paused in is over.
    round: u64,
    paused: usize,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

impl PauseGate {
    /// A gate for `vcpus` vCPUs that save `msr_indices`.
    pub fn new(vcpus: usize, msr_indices: Vec<u32>) -> Arc<Self> {
        Arc::new(PauseGate {
            requested: AtomicBool::new(false),
            state: Mutex::new(PauseState {
                saved: (0..vcpus).map(|_| None).collect(),
                ..Default::default()
            }),
            changed: Condvar::new(),
            msr_indices,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pauses every vCPU (`kick` interrupts their `KVM_RUN`) and returns their saved states,
    /// or an error if they are not all parked within `timeout` (the machine is then resumed).
    pub fn pause(
        &self,
        kick: &dyn Fn(),
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, SnapshotError> {
        let n = self.lock().saved.len();
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.paused < n {
            if Instant::now() >= deadline {
                drop(s);
                self.resume();
                return Err(SnapshotError::PauseTimeout(timeout.as_millis() as u64));
            }
            drop(s);
            kick();
            s = self.lock();
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(n);
        for (i, slot) in s.saved.iter_mut().enumerate() {
            match slot.take() {
                Some(Ok(v)) => states.push(v),
                Some(Err(e)) => {
                    drop(s);
                    self.resume();
                    return Err(SnapshotError::device(format!("vCPU {i}"), e));
                }
                None => {
                    drop(s);
                    self.resume();
                    return Err(SnapshotError::device(format!("vCPU {i}"), "saved no state"));
                }
            }
        }
        Ok(states)
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        self.requested.store(false, Ordering::Release);
        s.round += 1;
        self.changed.notify_all();
    }

    /// The vCPU side: save, report, wait for the round to end.
    fn park(&self, index: u32, state: Result<VcpuState, String>) {
        let mut s = self.lock();
        let round = s.round;
        if let Some(slot) = s.saved.get_mut(index as usize) {
            *slot = Some(state);
        }
        s.paused += 1;
        self.changed.notify_all();
        while s.round == round {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.paused -= 1;
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`], so the signal interrupts `KVM_RUN` instead
/// of killing the process. Idempotent.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), noop_handler)
}

/// Fault injection into a running vCPU (the boot vCPU): requests from other threads, applied
/// by the vCPU thread itself between two `KVM_RUN`s.
#[derive(Debug, Default)]
pub struct VcpuInjection {
    /// Pending requests ([`REQ_TRIPLE_FAULT`], [`REQ_DUMP`]): one load per exit.
    requests: AtomicU8,
    /// The vCPU thread while it runs (cleared before it is joined).
    thread: Mutex<Option<libc::pthread_t>>,
}

/// Request: make the guest triple-fault.
const REQ_TRIPLE_FAULT: u8 = 1;
/// Request: log the vCPU's registers once.
const REQ_DUMP: u8 = 2;

impl VcpuInjection {
    /// Records the thread to kick.
    pub fn set_thread(&self, thread: Option<libc::pthread_t>) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = thread;
    }

    /// Kicks the vCPU out of `KVM_RUN` to take its requests; false if its thread is not
    /// running.
    fn kick(&self) -> bool {
        let g = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = *g else { return false };
        // SAFETY: `t` is a live vCPU thread: the machine clears this slot (under the same lock,
        // held here) before it joins the thread, so the id cannot have been reused.
        unsafe { libc::pthread_kill(t, kick_signal()) };
        true
    }

    /// The requests posted since the last call (the vCPU thread's side).
    fn take(&self) -> u8 {
        if self.requests.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.requests.swap(0, Ordering::AcqRel)
    }

    /// Asks the vCPU to log its registers once (where the guest runs, for a guest that stalls
    /// busy: `SIGUSR2` to the VMM). Does not wait.
    pub fn dump_state(&self) {
        self.requests.fetch_or(REQ_DUMP, Ordering::AcqRel);
        self.kick();
    }

    /// Makes the guest triple-fault: the vCPU thread empties the IDT and injects an NMI, which
    /// the CPU can then deliver through neither the NMI, #GP nor #DF vector, so KVM reports a
    /// shutdown exactly as for a guest that broke its own IDT. Returns whether the vCPU took
    /// the request within `wait`.
    pub fn triple_fault(&self, wait: Duration) -> bool {
        self.requests.fetch_or(REQ_TRIPLE_FAULT, Ordering::AcqRel);
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if !self.kick() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
            if self.requests.load(Ordering::Acquire) & REQ_TRIPLE_FAULT == 0 {
                return true;
            }
        }
        false
    }
}

/// The exits that reached this process (the VMM's userspace), by kind. KVM's own statistics
/// count every exit, also those it handles in the kernel (ioeventfds, coalesced writes, HLT
/// with the in-kernel LAPIC): the difference is what the kernel kept from the VMM. Each vCPU
/// counts into its own cache line (one relaxed increment per exit, no line shared between
/// vCPUs); a snapshot sums them.
#[derive(Debug)]
pub struct VmmExits {
    per_vcpu: Vec<Arc<ExitCounts>>,
}

/// One vCPU's counts, in [`VmmExits::KINDS`] order.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ExitCounts([AtomicU64; 3]);

impl ExitCounts {
    fn count(&self, exit: &VcpuExit<'_>) {
        let kind = match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => 0,
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => 1,
            _ => 2,
        };
        self.0[kind].fetch_add(1, Ordering::Relaxed);
    }
}

impl VmmExits {
    /// The kinds counted: port I/O, MMIO, anything else.
    pub const KINDS: [&'static str; 3] = ["pio", "mmio", "other"];

    /// Counters for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        VmmExits {
            per_vcpu: (0..vcpus).map(|_| Arc::default()).collect(),
        }
    }

    /// Vcpu `index`'s counters (a spare set for an index out of range: counted, not reported).
    pub fn of_vcpu(&self, index: usize) -> Arc<ExitCounts> {
        self.per_vcpu.get(index).cloned().unwrap_or_default()
    }

    /// `(kind, count)` per kind, summed over the vCPUs.
    pub fn snapshot(&self) -> [(&'static str, u64); 3] {
        let mut out = Self::KINDS.map(|k| (k, 0u64));
        for c in &self.per_vcpu {
            for (o, v) in out.iter_mut().zip(&c.0) {
                o.1 += v.load(Ordering::Relaxed);
            }
        }
        out
    }
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    /// vCPU index (also its APIC id).
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub io_bus: Bus,
    /// MMIO bus.
    pub mmio_bus: Bus,
    /// Where to report that the guest stopped.
    pub exits: ExitNotifier,
    /// Set by the machine when all vCPUs must stop.
    pub stop: Arc<AtomicBool>,
    /// Fault injection requests (the boot vCPU only).
    pub inject: Option<Arc<VcpuInjection>>,
    /// Where to pause for a snapshot.
    pub pause: Arc<PauseGate>,
    /// The VM's ring of port writes KVM queued instead of exiting.
    pub coalesced: Option<Arc<CoalescedRing>>,
    /// This vCPU's count of exits to userspace.
    pub vmm_exits: Arc<ExitCounts>,
}

/// What one `KVM_RUN` exit means for the loop.
enum Step {
    Continue,
    Exit(GuestExit),
}

impl Vcpu {
    /// Runs until the guest stops or the machine asks us to stop.
    pub fn run(mut self) {
        tracing::debug!(vcpu = self.index, "vCPU thread running");
        while !self.stop.load(Ordering::Acquire) {
            if self.pause.requested.load(Ordering::Acquire) {
                self.pause_here();
                continue;
            }
            // A plain load on every exit; the read-modify-write only when a request is there.
            let requests = self.inject.as_ref().map_or(0, |i| i.take());
            if requests & REQ_TRIPLE_FAULT != 0 {
                self.break_idt();
            }
            if requests & REQ_DUMP != 0 {
                self.log_requested_state();
            }
            match self.run_once() {
                Step::Continue => {}
                Step::Exit(exit) => {
                    // The guest's last console output, before the exit is reported.
                    self.drain_coalesced();
                    if let GuestExit::Crash { .. } = exit {
                        self.log_state();
                    }
                    self.exits.notify(exit);
                    return;
                }
            }
        }
    }

    /// Completes the I/O the last exit left pending (KVM finishes it on entry and returns at
    /// once with `immediate_exit`), then saves this vCPU and waits at the pause gate.
    fn pause_here(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(exit) => Err(format!("unexpected exit while pausing: {exit:?}")),
            Err(e) => Err(format!("KVM_RUN while pausing: {e}")),
        };
        self.fd.set_kvm_immediate_exit(0);
        self.drain_coalesced();
        let state = completed.and_then(|()| {
            VcpuState::save(self.index, &self.fd, &self.pause.msr_indices)
                .map_err(|e| e.to_string())
        });
        self.pause.park(self.index, state);
    }

    /// Replays the port writes KVM queued, so that they reach their device before anything
    /// this vCPU does next.
    fn drain_coalesced(&self) {
        if let Some(c) = &self.coalesced {
            c.drain(&self.io_bus);
        }
    }

    fn crash(&self, reason: impl Into<String>) -> Step {
        Step::Exit(GuestExit::Crash {
            vcpu: self.index,
            reason: reason.into(),
        })
    }

    fn run_once(&mut self) -> Step {
        let index = self.index;
        let coalesced = self.coalesced.as_deref();
        let exit = self.fd.run();
        if let Ok(e) = &exit {
            self.vmm_exits.count(e);
        }
        // Port writes KVM queued come before this exit's access: a read of the UART's status
        // follows the writes it waits for.
        if let (Some(c), Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..))) = (coalesced, &exit) {
            c.drain(&self.io_bus);
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    tracing::trace!(vcpu = index, port, "unhandled port read");
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.io_bus.write(u64::from(port), data) {
                    tracing::trace!(vcpu = index, port, "unhandled port write");
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    tracing::debug!(vcpu = index, addr, "unhandled MMIO read");
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio_bus.write(addr, data) {
                    tracing::debug!(vcpu = index, addr, "unhandled MMIO write");
                }
                Step::Continue
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; if one ever arrives, resume.
            Ok(VcpuExit::Hlt) => Step::Continue,
            Ok(VcpuExit::Shutdown) => self.crash("triple fault (KVM_EXIT_SHUTDOWN)"),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
                // `internal` member of the exit union; reading plain integers from it is sound.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                self.crash(format!("KVM internal error, suberror {suberror}"))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => self.crash(format!(
                "KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(GuestExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Step::Exit(GuestExit::Reboot),
                KVM_SYSTEM_EVENT_CRASH => self.crash("KVM system event: crash"),
                other => self.crash(format!("unknown KVM system event {other}")),
            },
            Ok(other) => {
                let reason = format!("unexpected vCPU exit {other:?}");
                self.crash(reason)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked by the machine; reset immediate_exit in case it was used and re-check
                // the stop flag in the loop.
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => self.crash(format!("KVM_RUN failed: {e}")),
        }
    }

    /// Fault injection: an empty IDT plus a pending NMI, so the next event triple-faults.
    fn break_idt(&mut self) {
        let result = self.fd.get_sregs().and_then(|mut s| {
            s.idt.base = 0;
            s.idt.limit = 0;
            self.fd.set_sregs(&s)?;
            self.fd.nmi()
        });
        match result {
            Ok(()) => tracing::warn!(vcpu = self.index, "fault injection: IDT emptied, NMI sent"),
            Err(e) => tracing::error!(vcpu = self.index, error = %e, "fault injection failed"),
        }
    }

    /// The registers that say where the guest runs, and `MSR_LSTAR` (the kernel's system-call
    /// entry), from which the kernel's load address (KASLR) follows, so that `rip` can be looked
    /// up in the kernel's symbols.
    fn state_text(&self) -> String {
        let lstar = crate::snapshot::vcpu::read_msrs(&self.fd, &[MSR_LSTAR])
            .ok()
            .and_then(|m| m.first().map(|e| e.data))
            .unwrap_or(0);
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
                 cr4={:#x} efer={:#x} cs={:#x} lstar={lstar:#x}",
                r.rip, r.rsp, r.rflags, r.rax, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            (r, s) => format!(
                "registers unreadable (regs: {:?}, sregs: {:?})",
                r.err(),
                s.err()
            ),
        }
    }

    /// Logs where the guest runs, when asked (`SIGUSR2` to the VMM: a guest that stalls busy).
    fn log_requested_state(&self) {
        tracing::warn!(vcpu = self.index, state = %self.state_text(), "vCPU state on request");
    }

    /// Logs registers so a crash can be diagnosed from the log alone.
    fn log_state(&self) {
        tracing::error!(vcpu = self.index, state = %self.state_text(), "vCPU state at crash");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_taken_once_and_together() {
        let i = VcpuInjection::default();
        assert_eq!(i.take(), 0);
        // No vCPU thread: nothing takes the request, and the caller hears so at once.
        assert!(!i.triple_fault(Duration::from_secs(5)));
        i.dump_state();
        assert_eq!(i.take(), REQ_TRIPLE_FAULT | REQ_DUMP);
        assert_eq!(i.take(), 0);
    }

    #[test]
    fn exits_are_counted_per_vcpu_and_summed_by_kind() {
        let exits = VmmExits::new(2);
        let (a, b) = (exits.of_vcpu(0), exits.of_vcpu(1));
        let mut data = [0u8; 4];
        a.count(&VcpuExit::IoIn(0x3f8, &mut data));
        b.count(&VcpuExit::IoOut(0xcfc, &data));
        b.count(&VcpuExit::MmioWrite(0xfe00_0000, &data));
        a.count(&VcpuExit::Hlt);
        assert_eq!(exits.snapshot(), [("pio", 2), ("mmio", 1), ("other", 1)]);
        // Out of range: counted somewhere, never reported against another vCPU.
        exits.of_vcpu(7).count(&VcpuExit::Hlt);
        assert_eq!(exits.snapshot()[2], ("other", 1));
    }
}
