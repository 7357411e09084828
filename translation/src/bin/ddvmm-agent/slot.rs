//! A channel slot (one channel device) for the agent's whole life: its registers, its
//! interrupt, the gate, and the channels the VMM assigns to it one after another (see
//! `ddvmm_translation::channel`, "Vacant slots").
//!
//! The slot's thread maps BAR 0 and opens the interrupt once, then loops on `KIND`:
//! - **vacant**: parks at the gate (the slot's first time), then sleeps on the interrupt until
//!   `KIND` reads otherwise. Fault requests for the whole driver VM (panic, reset, hang) still
//!   act; those for a ring, and a late take-back, have nothing to act on and are dropped.
//! - **block or net** (`backend::serve`, `net::serve`): sets up (device, I/O threads, TAP),
//!   passes the gate unless the slot already has (so a channel assigned at boot parks ready to
//!   serve), and serves ring generations until the channel is let go: a `DETACH` request, or
//!   registers found to describe another assignment when (re)attaching to a ring (a take-back
//!   that was missed, or a snapshot restored under another assignment: BAR 0 is the restoring
//!   VMM's, the agent's memory the snapshot's). It releases what the channel used (backend,
//!   threads, TAP, the ring and its BAR 2 mapping) and returns; the slot writes `DETACHED` and
//!   reads `KIND` again. A channel it cannot serve (a backend device that never appears, an
//!   unknown kind) is reported on the console and held until the VMM takes it back: the slot
//!   outlives it.

use std::path::PathBuf;
use std::time::Duration;

use ddvmm_translation::channel::{
    regs, BACKEND_LEN, DEFAULT_WEIGHT, FLAG_READ_ONLY, KIND_BLOCK, KIND_NET, KIND_VACANT, MAGIC,
    MAX_WEIGHT, REGS_SIZE, VERSION,
};
use ddvmm_translation::ring::{AgentRing, RawRegion};

use crate::fault::{Injected, Request};
use crate::pci::{BarMapping, ChannelDevice, UioIrq};
use crate::Options;

/// How long a vacant slot sleeps between looks at its registers when no interrupt comes (an
/// assignment comes with one; this only bounds the wait should it be lost, and each look is two
/// exits to the VMM).
const VACANT_WAIT: Duration = Duration::from_secs(30);
/// How often a channel waiting for its client's ring looks again.
const ATTACH_WAIT: Duration = Duration::from_millis(100);

/// Why serving a ring generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The client started a new generation: attach again.
    Generation,
    /// The channel is taken back: let it go.
    Detach,
}

/// What BAR 0 says about the channel assigned to a slot (every register that describes it; not
/// `FAULT`, which a read takes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// `KIND_VACANT`, `KIND_BLOCK` or `KIND_NET`.
    pub kind: u32,
    /// The channel index (the slot's).
    pub index: u32,
    /// Block: the window's first sector and length on the backend device.
    pub start: u64,
    pub sectors: u64,
    pub read_only: bool,
    /// Bytes of BAR 2.
    pub mem_size: u64,
    /// Block: the backend device's path; net: the uplink interface.
    pub backend: String,
    /// Net: the client's MAC address.
    pub mac: [u8; 6],
    /// Block: the share of the backend device (1..=`MAX_WEIGHT`).
    pub weight: u32,
}

impl Assignment {
    /// Parses the registers `read32` reads.
    fn parse(read32: impl Fn(u64) -> u32) -> Self {
        let read64 = |at| u64::from(read32(at)) | (u64::from(read32(at + 4)) << 32);
        let name: Vec<u8> = (0..BACKEND_LEN as u64)
            .step_by(4)
            .flat_map(|i| read32(regs::BACKEND + i).to_le_bytes())
            .collect();
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        let mac = read64(regs::MAC).to_le_bytes();
        Assignment {
            kind: read32(regs::KIND),
            index: read32(regs::INDEX),
            start: read64(regs::START),
            sectors: read64(regs::SECTORS),
            read_only: read32(regs::FLAGS) & FLAG_READ_ONLY != 0,
            mem_size: read64(regs::MEM_SIZE),
            backend: String::from_utf8_lossy(&name[..end]).into_owned(),
            mac: [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]],
            weight: match read32(regs::WEIGHT) {
                0 => DEFAULT_WEIGHT,
                w => w.min(MAX_WEIGHT),
            },
        }
    }

    /// Reads BAR 0 until two reads agree: none torn by the VMM changing the registers midway.
    fn read(bar0: &BarMapping) -> Self {
        let mut a = Self::parse(|at| bar0.read32(at));
        loop {
            let b = Self::parse(|at| bar0.read32(at));
            if a == b {
                return a;
            }
            a = b;
        }
    }
}

/// A channel device, its registers mapped and its interrupt open for the agent's life.
pub struct Slot {
    /// PCI address, e.g. `0000:00:03.0`.
    pub address: String,
    sysfs: PathBuf,
    /// BAR 0.
    pub regs: BarMapping,
    /// The client's notifications; the VMM's assignments and requests.
    pub irq: UioIrq,
    /// The slot's channel index (a slot keeps it across assignments).
    pub index: u32,
    /// The registers when the channel being served was taken up.
    pub assignment: Assignment,
    /// The gate has been passed (exactly once per slot).
    gated: bool,
    /// A ring fault requested while no ring was attached: done once one is.
    deferred: Request,
    /// How often the channel's heartbeat is written while it is served.
    pub heartbeat: crate::heartbeat::Policy,
}

/// Runs the slot of `dev` until an unrecoverable error.
pub fn run(dev: &ChannelDevice, opts: &Options) -> Result<(), String> {
    let ctx = |e: String| format!("{}: {e}", dev.address);
    let mut slot = Slot::open(dev, opts.heartbeat).map_err(ctx)?;
    loop {
        slot.assignment = Assignment::read(&slot.regs);
        let served = match slot.assignment.kind {
            KIND_VACANT => {
                slot.wait_assignment();
                continue;
            }
            KIND_BLOCK => crate::backend::serve(&mut slot, opts),
            KIND_NET => crate::net::serve(&mut slot),
            other => Err(format!("unsupported channel kind {other}")),
        }
        .map_err(ctx);
        // A channel this slot cannot serve (its device missing, an unknown kind): the slot
        // stays, for the VMM to take the channel back and give the slot to another.
        if let Err(e) = served {
            crate::console::say(format!(
                "ddvmm-agent: channel {}: {e}; not served, waiting to be taken back",
                slot.index
            ));
            slot.wait_taken_back();
        }
        slot.detached();
    }
}

impl Slot {
    fn open(dev: &ChannelDevice, heartbeat: crate::heartbeat::Policy) -> Result<Self, String> {
        let bar0 = BarMapping::map(&dev.sysfs.join("resource0"), REGS_SIZE as usize)?;
        if bar0.read32(regs::MAGIC) != MAGIC || bar0.read32(regs::VERSION) != VERSION {
            return Err(format!("not a ddvmm channel of register version {VERSION}"));
        }
        let irq = UioIrq::open(&dev.uio, &dev.sysfs)?;
        Ok(Slot {
            address: dev.address.clone(),
            sysfs: dev.sysfs.clone(),
            index: bar0.read32(regs::INDEX),
            regs: bar0,
            irq,
            assignment: Assignment::default(),
            gated: false,
            deferred: Request::None,
            heartbeat,
        })
    }

    /// Maps the channel memory (BAR 2) at the assignment's size.
    pub fn map_memory(&self) -> Result<BarMapping, String> {
        let len = usize::try_from(self.assignment.mem_size).map_err(|_| "memory size")?;
        BarMapping::map(&self.sysfs.join("resource2"), len)
    }

    /// Parks at the gate and waits for it to open, the first time only.
    pub fn pass_gate(&mut self) {
        if !self.gated {
            crate::gate::pass(&self.regs, self.index);
            self.gated = true;
        }
    }

    /// Takes the fault request register (when it is empty, a ring fault put off earlier) and
    /// does what concerns the whole driver VM; the request is returned either way.
    fn take_request(&mut self) -> Request {
        let request = match Request::from_code(self.regs.read32(regs::FAULT)) {
            Request::None => std::mem::take(&mut self.deferred),
            r => r,
        };
        request.act_on_vm();
        request
    }

    /// Takes a fault request while serving `ring` (ringing the doorbell for what it published).
    pub fn take_fault(&mut self, ring: &mut AgentRing<RawRegion>) -> Injected {
        let injected = crate::fault::on_ring(self.take_request(), ring);
        if injected.published() {
            self.regs.write32(regs::DOORBELL, 1);
        }
        injected
    }

    /// Waits up to `timeout` for the interrupt (the caller has unmasked it).
    fn wait(&mut self, timeout: Duration) {
        let woken = self.irq.wait(None, timeout.as_millis() as i32);
        if woken.irq_error {
            std::thread::sleep(timeout);
        }
    }

    /// A vacant slot: parks at the gate (the first time), then waits for an assignment.
    fn wait_assignment(&mut self) {
        self.pass_gate();
        crate::console::say(format!(
            "ddvmm-agent: channel {} vacant, waiting for a client",
            self.index
        ));
        loop {
            // Unmask before looking, so an assignment after the look interrupts the wait. A
            // failed unmask costs the timeout.
            let _ = self.irq.enable();
            // Ring faults and a late take-back find nothing to act on.
            let _ = self.take_request();
            let kind = self.regs.read32(regs::KIND);
            if kind != KIND_VACANT {
                crate::console::say(format!(
                    "ddvmm-agent: channel {} assigned (kind {kind})",
                    self.index
                ));
                return;
            }
            self.wait(VACANT_WAIT);
        }
    }

    /// A channel that could not be served: parks at the gate (the first time), then waits
    /// until the VMM takes it back (`DETACH`, or registers that no longer read this kind).
    fn wait_taken_back(&mut self) {
        self.pass_gate();
        loop {
            let _ = self.irq.enable();
            if self.take_request() == Request::Detach
                || self.regs.read32(regs::KIND) != self.assignment.kind
            {
                return;
            }
            self.wait(VACANT_WAIT);
        }
    }

    /// Attaches to the ring in `mem` once the client has created it. `None`: let the channel
    /// go instead: it was taken back, or the registers no longer describe
    /// [`Self::assignment`] (a take-back that was missed, or a driver VM restored from a
    /// snapshot made under another assignment: the registers are the restoring VMM's).
    pub fn attach(
        &mut self,
        mem: &BarMapping,
        supported: u64,
    ) -> Result<Option<AgentRing<RawRegion>>, String> {
        let mut last = String::new();
        loop {
            let _ = self.irq.enable();
            match self.take_request() {
                Request::Detach => return Ok(None),
                r if r.needs_ring() => self.deferred = r,
                _ => {}
            }
            // SAFETY: `mem` maps `mem.len()` bytes read-write and outlives the ring (the caller
            // drops the ring before the mapping). This process accesses the mapping only
            // through the ring's atomics.
            let region =
                unsafe { RawRegion::new(mem.as_ptr(), mem.len()) }.map_err(|e| e.to_string())?;
            let ring = AgentRing::attach(region, supported);
            // Every register before serving a ring; the kind alone while waiting for one.
            let current = match ring {
                Ok(_) => Assignment::parse(|at| self.regs.read32(at)) == self.assignment,
                Err(_) => self.regs.read32(regs::KIND) == self.assignment.kind,
            };
            if !current {
                println!(
                    "ddvmm-agent: channel {}: the registers describe another assignment; \
                     letting this one go",
                    self.index
                );
                return Ok(None);
            }
            match ring {
                Ok(ring) => return Ok(Some(ring)),
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last {
                        println!("ddvmm-agent: waiting for the client's ring ({msg})");
                        last = msg;
                    }
                    self.wait(ATTACH_WAIT);
                }
            }
        }
    }

    /// The channel was let go (everything it used released): tells the VMM.
    fn detached(&mut self) {
        self.deferred = Request::None;
        self.regs.write32(regs::DETACHED, 1);
        crate::console::say(format!("ddvmm-agent: channel {} detached", self.index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn assignment_from_registers() {
        let mut r: HashMap<u64, u32> = HashMap::new();
        r.insert(regs::KIND, KIND_BLOCK);
        r.insert(regs::INDEX, 3);
        r.insert(regs::START, 8);
        r.insert(regs::SECTORS + 4, 1);
        r.insert(regs::FLAGS, FLAG_READ_ONLY);
        r.insert(regs::MEM_SIZE, 1 << 20);
        r.insert(regs::BACKEND, u32::from_le_bytes(*b"/dev"));
        r.insert(regs::BACKEND + 4, u32::from_le_bytes(*b"/vdb"));
        r.insert(regs::MAC, u32::from_le_bytes([2, 0, 0, 0]));
        r.insert(regs::MAC + 4, u32::from_le_bytes([0, 9, 0xff, 0xff]));
        r.insert(regs::WEIGHT, 50_000);
        r.insert(regs::FAULT, 1);
        let a = Assignment::parse(|at| {
            assert_ne!(at, regs::FAULT, "a read takes the fault request");
            r.get(&at).copied().unwrap_or(0)
        });
        assert_eq!(
            a,
            Assignment {
                kind: KIND_BLOCK,
                index: 3,
                start: 8,
                sectors: 1 << 32,
                read_only: true,
                mem_size: 1 << 20,
                backend: "/dev/vdb".into(),
                mac: [2, 0, 0, 0, 0, 9],
                weight: MAX_WEIGHT,
            }
        );
        // A vacant slot: everything but the index and memory size reads zero.
        let vacant = Assignment::parse(|at| match at {
            regs::INDEX => 3,
            regs::MEM_SIZE => 1 << 20,
            _ => 0,
        });
        assert_eq!(vacant.kind, KIND_VACANT);
        assert_eq!(vacant.backend, "");
        assert_eq!(vacant.weight, DEFAULT_WEIGHT);
        assert_ne!(vacant, a);
    }
}
