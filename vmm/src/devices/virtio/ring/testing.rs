//! Test support for ring frontends: channel fds on a memfd and a scripted agent driven from
//! the test's own thread (no timing games: the test decides when the "driver VM" answers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvmm_translation::ring::{AgentRing, Completion, RawRegion, RequestEntry, RingParams, Status};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::channel::ChannelFds;
use crate::devices::virtio::DeviceFailure;
use crate::memory::create_memfd;

/// Counts `needs_reset` reports.
#[derive(Default)]
pub struct Failures(pub AtomicUsize);

impl DeviceFailure for Failures {
    fn needs_reset(&self, _reason: &str) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Channel fds over a fresh memfd large enough for `params`.
pub fn channel_fds(params: RingParams) -> ChannelFds {
    let size = params.layout().expect("layout").total as u64;
    let memory = create_memfd(c"test-ring").expect("memfd");
    memory.set_len(size.next_power_of_two()).expect("size");
    let efd = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    ChannelFds {
        memory: Arc::new(memory),
        kick: efd(),
        doorbell: efd(),
    }
}

/// Polls `cond` every millisecond for up to 10 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An agent over the channel memory, driven by the test.
pub struct ScriptedAgent {
    // Declared before `_map`: the ring's region points into the mapping.
    pub ring: AgentRing<RawRegion>,
    _map: MmapRegion,
    doorbell: Arc<EventFd>,
}

impl ScriptedAgent {
    /// Attaches to generation `generation` of the ring in `fds` (waits for it) and says ready.
    pub fn attach(fds: &ChannelFds, generation: u64) -> Self {
        let len = fds.memory_size().expect("size") as usize;
        let file = fds.memory.try_clone().expect("dup");
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), len).expect("map");
        let mut ring = None;
        wait_for("the ring generation", || {
            // SAFETY: the mapping lives in the returned struct, after the ring, and is
            // accessed only through the ring.
            let r = unsafe { RawRegion::new(map.as_ptr(), len) }.expect("region");
            match AgentRing::attach(r, ddvmm_translation::ring::features::ALL) {
                Ok(a) if a.generation() == generation => {
                    ring = Some(a);
                    true
                }
                _ => false,
            }
        });
        let ring = ring.expect("attached");
        ring.set_ready().expect("ready");
        ScriptedAgent {
            ring,
            _map: map,
            doorbell: fds.doorbell.clone(),
        }
    }

    /// Waits until `n` requests have arrived (in total, over calls) and returns them.
    pub fn take(&mut self, n: usize) -> Vec<RequestEntry> {
        let mut out = Vec::new();
        wait_for("requests", || {
            while let Some(r) = self.ring.pop_request() {
                out.push(r.expect("valid request"));
            }
            out.len() >= n
        });
        out
    }

    /// Completes `r` with `status`, filling a read's slot with `fill` first; rings the
    /// doorbell.
    pub fn answer(&mut self, r: &RequestEntry, status: Status, fill: Option<u8>) {
        if let (Some(b), Some(slot)) = (fill, r.slot) {
            let buf = vec![b; r.len as usize];
            self.ring.write_slot(slot, 0, &buf).expect("slot");
        }
        let len = if status == Status::Ok { r.len } else { 0 };
        self.ring
            .complete(Completion {
                id: r.id,
                status,
                len,
            })
            .expect("complete");
        self.doorbell.write(1).expect("doorbell");
    }

    /// Rings the doorbell without publishing anything.
    pub fn ring_doorbell(&self) {
        self.doorbell.write(1).expect("doorbell");
    }
}
