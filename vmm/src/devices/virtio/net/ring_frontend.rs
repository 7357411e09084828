//! The client frontend: a virtio-net device whose backend is a ring to a driver VM.
//!
//! The guest sees an ordinary virtio-net NIC (link always up, MAC from the configuration, no
//! control queue). Frames cross the ring ([`ddvmm_translation::ring`], network channels)
//! through bounce buffers: the driver VM never sees guest memory.
//!
//! This file holds only what is specific to a NIC ([`NetRing`], a [`RingDevice`]); the
//! journal, replay, poison isolation, quarantine and the worker loop are the shared core in
//! [`crate::devices::virtio::ring`].
//!
//! **TX.** A chain is gathered (12-byte header + frame, the same checks as the TAP device),
//! its source MAC checked against the configured one (a spoofed frame is dropped and
//! counted, it never reaches the ring), and journaled as a `net-tx` request. The guest's
//! descriptors stay unreturned until the driver VM completes the request: the journal holds
//! the head and a copy of the frame (replayed from there, never from a slot). At most
//! [`TX_MAX`] frames are journaled; beyond that the chains wait in the guest's queue
//! (backpressure). Transmit offloads (checksum, TSO) are offered: the header passes to the
//! driver VM's TAP, whose kernel finishes the work.
//!
//! **RX.** [`RX_POSTED`] `net-rx` requests are kept standing on the ring as receive buffers. A
//! completed one carries a frame, which is copied into the guest's next RX chain (with a
//! header that claims nothing: no receive offloads are offered); while the guest has no
//! buffers, up to [`RX_PENDING_MAX`] frames wait here, more are dropped and counted.
//!
//! **Recovery** is the core's: journaled transmits are sent again in their order (at least
//! once), receive buffers are posted again; the guest sees a pause, never a link change. A
//! transmit that fails (poison, quarantine) is completed to the guest as a lost frame.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ddvmm_translation::journal::Journal;
use ddvmm_translation::ring::{
    features as ring_features, Completed, Opcode, Request as RingRequest, RingParams, Status,
};
use vm_memory::GuestMemoryMmap;

use super::tap::VNET_HDR_LEN;
use super::{gather, read_net_config, scatter, DEVICE_TYPE, MAX_FRAME, QUEUE_SIZE};
use crate::devices::channel::ChannelFds;
use crate::devices::virtio::ring::{
    Failure, Guest, GuestError, Payload, RateLimit, RingCommands, RingCounters, RingDevice,
    RingFrontend, RingKind, RingPort, RingProgress, RingSetupError, RingStats, RingView, Setup,
};
use crate::devices::virtio::{
    ActivateError, ActiveQueue, DeviceFailure, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_MTU: u32 = 3;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_STATUS: u32 = 16;
/// Ethernet header: destination, source, ethertype.
const ETH_HLEN: usize = 14;
/// The guest's receive queue.
const RXQ: usize = 0;
/// The guest's transmit queue.
const TXQ: usize = 1;

/// Ring sizes of a network channel: 256 entries, 256 slots of 68 KiB (a 64 KiB TSO frame and
/// its header fit one slot).
pub const NET_RING_PARAMS: RingParams = RingParams {
    ring_entries: 256,
    slot_count: 256,
    slot_size: 17 << 12,
    features: ring_features::NET,
};
/// Receive buffers kept posted on the ring.
pub const RX_POSTED: usize = 64;
/// Transmits journaled at most (the rest of the ring's entries).
pub const TX_MAX: usize = NET_RING_PARAMS.ring_entries as usize - RX_POSTED;
/// Received frames held while the guest has no receive buffers.
pub const RX_PENDING_MAX: usize = 256;

/// Errors setting up a ring NIC.
#[derive(Debug, thiserror::Error)]
pub enum RingNetError {
    /// The ring cannot be set up.
    #[error(transparent)]
    Setup(#[from] RingSetupError),
}

/// Counters of one ring NIC, readable while it runs: the core's and the NIC's own.
#[derive(Debug, Default)]
pub struct RingNetStats {
    /// The core's counters (ring, journal, replay); its `completed` counts transmits.
    pub ring: Arc<RingStats>,
    /// Frames the guest sent that the driver VM took.
    pub tx_frames: AtomicU64,
    /// Their bytes (Ethernet frames, headers excluded).
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Transmits dropped: source MAC not the client's.
    pub tx_dropped_spoofed: AtomicU64,
    /// Transmits dropped: malformed chain or frame.
    pub tx_dropped_invalid: AtomicU64,
    /// Transmits the driver VM refused.
    pub tx_dropped_driver: AtomicU64,
    /// Transmits dropped by a quarantine or as poison.
    pub tx_dropped_failed: AtomicU64,
    /// Received frames dropped: the guest had no buffer for them.
    pub rx_dropped_no_buffer: AtomicU64,
    /// Received frames dropped: too short, or no guest buffer large enough.
    pub rx_dropped_invalid: AtomicU64,
}

impl RingCounters for RingNetStats {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut v = self.ring.snapshot();
        v.extend([
            ("tx_frames", g(&self.tx_frames)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("rx_frames", g(&self.rx_frames)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("tx_dropped_spoofed", g(&self.tx_dropped_spoofed)),
            ("tx_dropped_invalid", g(&self.tx_dropped_invalid)),
            ("tx_dropped_driver", g(&self.tx_dropped_driver)),
            ("tx_dropped_failed", g(&self.tx_dropped_failed)),
            ("rx_dropped_no_buffer", g(&self.rx_dropped_no_buffer)),
            ("rx_dropped_invalid", g(&self.rx_dropped_invalid)),
        ]);
        v
    }

    fn progress(&self) -> RingProgress {
        self.ring.progress()
    }
}

/// A journaled transmit.
pub struct Tx {
    head: u16,
    /// Header + frame, as gathered.
    frame: Vec<u8>,
}

/// What is specific to a NIC over a ring.
pub struct NetRing {
    mac: [u8; 6],
    stats: Arc<RingNetStats>,
    /// Received frames (header + frame) waiting for guest buffers.
    rx_pending: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl NetRing {
    /// Gathers a TX chain and checks it: well-formed, fits a slot, from our MAC.
    fn check_frame<I>(&mut self, mem: &GuestMemoryMmap, chain: I) -> Option<Vec<u8>>
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let stats = &self.stats;
        let len = match gather(mem, chain, &mut self.buf) {
            Ok(len) if len >= VNET_HDR_LEN + ETH_HLEN => len,
            Ok(_) | Err(_) => {
                stats.tx_dropped_invalid.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        if len > NET_RING_PARAMS.slot_size as usize {
            stats.tx_dropped_invalid.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let source = &self.buf[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12];
        if source != self.mac {
            stats.tx_dropped_spoofed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?source, "spoofed source MAC: frame dropped");
            return None;
        }
        Some(self.buf[..len].to_vec())
    }
}

impl RingDevice for NetRing {
    type Item = Tx;
    const QUEUES: usize = 2;

    fn accept(
        &mut self,
        guest: &mut Guest,
        journal: &mut Journal<Tx>,
        quarantined: bool,
    ) -> Result<(), GuestError> {
        let room = journal.room();
        guest.pop_chains(TXQ, room, |mem, chain| {
            let head = chain.head_index();
            match self.check_frame(mem, chain) {
                Some(_) if quarantined => {
                    self.stats.tx_dropped_failed.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(0))
                }
                Some(frame) => Ok(journal.push(Tx { head, frame }).err().map(|_| 0)),
                None => Ok(Some(0)),
            }
        })
    }

    fn payload_bytes(&self, tx: &Tx) -> u64 {
        tx.frame.len() as u64
    }

    fn encode<'a>(&mut self, tx: &'a Tx) -> Option<(RingRequest, Payload<'a>)> {
        // The frame goes from the journal straight into the slot.
        let request = RingRequest {
            id: 0,
            op: Opcode::NetTx,
            flags: 0,
            sector: 0,
            len: u32::try_from(tx.frame.len()).ok()?,
        };
        Some((request, Payload::Bytes(&tx.frame)))
    }

    fn complete(&mut self, guest: &mut Guest, _ring: &RingView<'_>, tx: Tx, c: &Completed) {
        if c.status == Status::Ok {
            let bytes = (tx.frame.len() - VNET_HDR_LEN) as u64;
            self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.stats.tx_dropped_driver.fetch_add(1, Ordering::Relaxed);
        }
        guest.finish(TXQ, tx.head, 0);
    }

    fn fail(&mut self, guest: &mut Guest, tx: Tx, why: Failure) {
        if why == Failure::Refused {
            self.stats
                .tx_dropped_invalid
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.tx_dropped_failed.fetch_add(1, Ordering::Relaxed);
        }
        guest.finish(TXQ, tx.head, 0);
    }

    fn standing(&self) -> Option<(RingRequest, usize)> {
        let rx = RingRequest {
            id: 0,
            op: Opcode::NetRx,
            flags: 0,
            sector: 0,
            len: NET_RING_PARAMS.slot_size,
        };
        Some((rx, RX_POSTED))
    }

    /// Copies a received frame out of its slot into the pending queue.
    fn standing_done(&mut self, guest: Option<&mut Guest>, ring: &RingView<'_>, c: &Completed) {
        let (Some(_), Some(slot), Status::Ok) = (guest, c.slot, c.status) else {
            return;
        };
        let len = c.len as usize;
        if !(VNET_HDR_LEN + ETH_HLEN..=MAX_FRAME).contains(&len) {
            self.stats
                .rx_dropped_invalid
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.rx_pending.len() >= RX_PENDING_MAX {
            self.stats
                .rx_dropped_no_buffer
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut frame = vec![0u8; len];
        if ring.ring.read_slot(slot, 0, &mut frame).is_err() {
            self.stats
                .rx_dropped_invalid
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        // The header claims nothing (no receive offloads); one buffer (virtio 1.x).
        frame[..VNET_HDR_LEN].fill(0);
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        self.rx_pending.push_back(frame);
    }

    /// Moves pending frames into the guest's receive buffers while it has some.
    fn service_guest(&mut self, guest: &mut Guest) -> Result<(), GuestError> {
        let pending = self.rx_pending.len();
        guest.pop_chains(RXQ, pending, |mem, chain| {
            let Some(frame) = self.rx_pending.pop_front() else {
                return Ok(Some(0));
            };
            let written = scatter(mem, chain, &frame);
            if written == 0 {
                self.stats
                    .rx_dropped_invalid
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                let bytes = (frame.len() - VNET_HDR_LEN) as u64;
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Ok(Some(written))
        })
    }

    fn guest_gone(&mut self) {
        self.rx_pending.clear();
    }
}

impl NetRing {
    /// A NIC with `mac`, and its counters.
    pub fn new(mac: [u8; 6]) -> (Self, Arc<RingNetStats>) {
        let stats = Arc::new(RingNetStats::default());
        let dev = NetRing {
            mac,
            stats: stats.clone(),
            rx_pending: VecDeque::new(),
            buf: vec![0u8; MAX_FRAME],
        };
        (dev, stats)
    }

    /// The ring sizes and journal capacity a NIC uses (for
    /// [`Stepper`](crate::devices::virtio::ring::stepper::Stepper)).
    #[doc(hidden)]
    pub fn sizes() -> (RingParams, usize) {
        (NET_RING_PARAMS, TX_MAX)
    }
}

/// The virtio-net device model over a ring.
pub struct RingNet {
    mac: [u8; 6],
    stats: Arc<RingNetStats>,
    frontend: RingFrontend,
}

impl RingNet {
    /// Maps the channel memory, creates the ring in it at `generation` and starts the worker.
    pub fn new(fds: ChannelFds, mac: [u8; 6], generation: u64) -> Result<Self, RingNetError> {
        let (device, stats) = NetRing::new(mac);
        let setup = Setup {
            fds: &fds,
            params: NET_RING_PARAMS,
            generation,
            capacity: TX_MAX,
            stats: stats.ring.clone(),
            limit: RateLimit::default(),
        };
        let frontend = RingFrontend::spawn("ring-net", device, setup)?;
        Ok(RingNet {
            mac,
            stats,
            frontend,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RingNetStats> {
        self.stats.clone()
    }

    /// The control handle (replay after a driver VM restart, release, quarantine).
    pub fn control(&self) -> Arc<dyn RingCommands> {
        self.frontend.control()
    }

    /// Its kind, counters and control for the rest of the VMM.
    pub fn port(&self) -> RingPort {
        RingPort {
            kind: RingKind::Nic,
            counters: self.stats.clone(),
            control: self.frontend.control(),
        }
    }
}

impl VirtioDevice for RingNet {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_net_config(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        failure: Arc<dyn DeviceFailure>,
    ) -> Result<(), ActivateError> {
        self.frontend.activate(mem, queues, failure)
    }

    fn reset(&mut self) {
        self.frontend.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::msix::Msix;
    use crate::devices::virtio::ring::testing::{channel_fds, wait_for, Failures, ScriptedAgent};
    use crate::devices::virtio::ring::{RingCommand, RingOutcome};
    use crate::devices::virtio::Interrupt;
    use ddvmm_translation::ring::RequestEntry;
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const WRITE: u16 = 2;
    /// Where TX frame `i` sits in guest memory.
    const TX_AT: u64 = 0x10_0000;
    /// Where RX buffer `i` sits.
    const RX_AT: u64 = 0x20_0000;
    const FRAME: usize = VNET_HDR_LEN + 64;

    /// Header + a 64-byte frame from `src`, payload bytes `fill`.
    fn frame(src: [u8; 6], fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; FRAME];
        f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&src);
        f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0x00]);
        f[VNET_HDR_LEN + ETH_HLEN..].fill(fill);
        f
    }

    struct Nic<'a> {
        m: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        dev: RingNet,
        fds: ChannelFds,
        tx_notify: EventFd,
        failures: Arc<Failures>,
    }

    impl Nic<'_> {
        fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>, m: &GuestMemoryMmap) -> u16 {
            m.read_obj::<u16>(q.used_addr().unchecked_add(2))
                .expect("used")
        }
        fn tx_used(&self) -> u16 {
            Self::used(&self.tx, self.m)
        }
        fn rx_used(&self) -> u16 {
            Self::used(&self.rx, self.m)
        }
    }

    /// An activated ring NIC whose TX queue holds `frames` (one descriptor each) and whose RX
    /// queue holds `rx_buffers` 2 KiB buffers.
    fn nic<'a>(m: &'a GuestMemoryMmap, frames: &[Vec<u8>], rx_buffers: u16) -> Nic<'a> {
        let rx = MockSplitQueue::create(m, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(m, GuestAddress(0x8000), 64);
        let mut tx_descs = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let at = TX_AT + i as u64 * 0x1000;
            m.write_slice(f, GuestAddress(at)).expect("frame");
            tx_descs.push(RawDescriptor::from(D::new(at, f.len() as u32, 0, 0)));
        }
        if !tx_descs.is_empty() {
            tx.build_multiple_desc_chains(&tx_descs).expect("tx chains");
        }
        let rx_descs: Vec<RawDescriptor> = (0..u64::from(rx_buffers))
            .map(|i| RawDescriptor::from(D::new(RX_AT + i * 0x1000, 2048, WRITE, 0)))
            .collect();
        if !rx_descs.is_empty() {
            rx.build_multiple_desc_chains(&rx_descs).expect("rx chains");
        }
        let fds = channel_fds(NET_RING_PARAMS);
        let mut dev = RingNet::new(fds.clone(), MAC, 1).expect("ring nic");
        let rx_notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let tx_notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let failures = Arc::new(Failures::default());
        let queue = |q: &MockSplitQueue<'_, GuestMemoryMmap>, n: &EventFd| ActiveQueue {
            queue: q.create_queue::<Queue>().expect("queue"),
            notify: n.try_clone().expect("clone"),
            interrupt: Interrupt::new(Msix::detached(2), 0),
        };
        let queues = vec![queue(&rx, &rx_notify), queue(&tx, &tx_notify)];
        dev.activate(m.clone(), 0, queues, failures.clone())
            .expect("activate");
        tx_notify.write(1).expect("notify");
        Nic {
            m,
            rx,
            tx,
            dev,
            fds,
            tx_notify,
            failures,
        }
    }

    /// Splits what an agent took into receive buffers and transmits.
    fn split(reqs: Vec<RequestEntry>) -> (Vec<RequestEntry>, Vec<RequestEntry>) {
        reqs.into_iter().partition(|r| r.op == Opcode::NetRx)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    #[test]
    fn frames_cross_both_ways_and_spoofed_ones_never_reach_the_ring() {
        let m = mem();
        let frames = [frame(MAC, 1), frame([2; 6], 2), frame(MAC, 3)];
        let n = nic(&m, &frames, 2);
        let mut agent = ScriptedAgent::attach(&n.fds, 1);
        let (rx, tx) = split(agent.take(RX_POSTED + 2));
        assert_eq!(rx.len(), RX_POSTED, "receive buffers kept posted");
        assert_eq!(tx.len(), 2, "the spoofed frame stayed out");
        for (r, fill) in tx.iter().zip([1u8, 3]) {
            let mut got = vec![0u8; r.len as usize];
            agent
                .ring
                .read_slot(r.slot.expect("slot"), 0, &mut got)
                .expect("slot");
            assert_eq!(
                got,
                frame(MAC, fill),
                "header and frame as the guest sent them"
            );
        }
        // The spoofed chain came back at once, the others once the driver VM took them.
        wait_for("the spoofed chain returned", || n.tx_used() == 1);
        for r in &tx {
            agent.answer(r, Status::Ok, None);
        }
        wait_for("all chains returned", || n.tx_used() == 3);
        // A frame for the guest, with offload claims the frontend must strip.
        let mut incoming = frame([9; 6], 7);
        incoming[0] = 1; // NEEDS_CSUM
        agent
            .ring
            .write_slot(rx[0].slot.expect("slot"), 0, &incoming)
            .expect("slot");
        agent
            .ring
            .complete(ddvmm_translation::ring::Completion {
                id: rx[0].id,
                status: Status::Ok,
                len: incoming.len() as u32,
            })
            .expect("complete");
        agent.ring_doorbell();
        wait_for("the frame delivered", || n.rx_used() == 1);
        let mut got = vec![0u8; FRAME];
        m.read_slice(&mut got, GuestAddress(RX_AT)).expect("rx");
        assert_eq!(&got[VNET_HDR_LEN..], &incoming[VNET_HDR_LEN..]);
        assert_eq!(got[0], 0, "no offload claimed");
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "one buffer");
        // The receive buffer is posted again.
        let again = agent.take(1);
        assert_eq!(again[0].op, Opcode::NetRx);
        let s = n.dev.stats();
        assert_eq!(s.tx_dropped_spoofed.load(Ordering::SeqCst), 1);
        assert_eq!(s.tx_frames.load(Ordering::SeqCst), 2);
        assert_eq!(s.rx_frames.load(Ordering::SeqCst), 1);
        assert_eq!(s.ring.completed.load(Ordering::SeqCst), 2);
        assert_eq!(n.failures.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn transmits_are_replayed_in_order_and_receive_buffers_posted_again() {
        let m = mem();
        let frames = [frame(MAC, 1), frame(MAC, 2)];
        let n = nic(&m, &frames, 0);
        let control = n.dev.control();
        let mut dead = ScriptedAgent::attach(&n.fds, 1);
        let (_, tx) = split(dead.take(RX_POSTED + 2));
        assert_eq!(tx.len(), 2);
        // The driver VM dies with both frames in flight: nothing returns to the guest.
        let o = control
            .request(
                RingCommand::Replay {
                    poison_after: 3,
                    hold: false,
                },
                Duration::from_secs(5),
            )
            .expect("replay");
        assert_eq!(
            o,
            RingOutcome {
                replayed: 2,
                ..RingOutcome::default()
            }
        );
        assert_eq!(n.tx_used(), 0);
        let mut next = ScriptedAgent::attach(&n.fds, 2);
        let (rx, tx) = split(next.take(RX_POSTED + 2));
        assert_eq!(rx.len(), RX_POSTED, "receive buffers posted again");
        for (r, fill) in tx.iter().zip([1u8, 2]) {
            let mut got = vec![0u8; r.len as usize];
            next.ring
                .read_slot(r.slot.expect("slot"), 0, &mut got)
                .expect("slot");
            assert_eq!(got, frame(MAC, fill), "replayed in order, from the journal");
            next.answer(r, Status::Ok, None);
        }
        wait_for("both returned", || n.tx_used() == 2);
        let s = n.dev.stats();
        assert_eq!(s.ring.replayed.load(Ordering::SeqCst), 2);
        assert_eq!(s.ring.generations.load(Ordering::SeqCst), 1);
        assert_eq!(s.ring.reposted.load(Ordering::SeqCst), RX_POSTED as u64);
        assert_eq!(s.tx_frames.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_held_replay_sends_nothing_until_released() {
        let m = mem();
        let n = nic(&m, &[frame(MAC, 1)], 0);
        let control = n.dev.control();
        let mut dead = ScriptedAgent::attach(&n.fds, 1);
        dead.take(RX_POSTED + 1);
        let replay = RingCommand::Replay {
            poison_after: 3,
            hold: true,
        };
        control
            .request(replay, Duration::from_secs(5))
            .expect("replay");
        let mut next = ScriptedAgent::attach(&n.fds, 2);
        let (_, tx) = split(next.take(RX_POSTED));
        assert!(tx.is_empty());
        std::thread::sleep(Duration::from_millis(50));
        assert!(next.ring.pop_request().is_none(), "held: nothing sent");
        assert_eq!(n.dev.stats().ring.held.load(Ordering::SeqCst), 1);
        control
            .request(RingCommand::Release, Duration::from_secs(5))
            .expect("release");
        let (_, tx) = split(next.take(1));
        assert_eq!(tx.len(), 1);
    }

    #[test]
    fn quarantine_drops_transmits_and_a_broken_ring_is_reported() {
        let m = mem();
        let n = nic(&m, &[frame(MAC, 1)], 0);
        let control = n.dev.control();
        let mut agent = ScriptedAgent::attach(&n.fds, 1);
        agent.take(RX_POSTED + 1);
        let o = control
            .request(RingCommand::Quarantine, Duration::from_secs(5))
            .expect("quarantine");
        assert_eq!(o.failed, 1);
        wait_for("the chain returned", || n.tx_used() == 1);
        let s = n.dev.stats();
        assert_eq!(s.tx_dropped_failed.load(Ordering::SeqCst), 1);
        agent.ring.corrupt_completion_index().expect("corrupt");
        agent.ring_doorbell();
        wait_for("reported corrupt", || {
            s.ring.corrupt.load(Ordering::SeqCst) == 1
        });
    }

    #[test]
    fn a_broken_tx_queue_needs_a_reset_and_receive_goes_on_being_drained() {
        let m = mem();
        let n = nic(&m, &[], 0);
        let mut agent = ScriptedAgent::attach(&n.fds, 1);
        let rx = agent.take(RX_POSTED);
        // The guest points its TX avail ring's index far beyond the queue: broken queue.
        n.tx.avail().idx().store(1000);
        n.tx_notify.write(1).expect("notify");
        wait_for("reported broken", || {
            n.failures.0.load(Ordering::SeqCst) == 1
        });
        // Receive buffers answered afterwards are still consumed: their slots are freed and
        // posted again (the worker serves the ring without a guest).
        for r in &rx[..4] {
            agent.answer(r, Status::Ok, Some(0));
        }
        let again = agent.take(4);
        assert!(again.iter().all(|r| r.op == Opcode::NetRx), "{again:?}");
        assert_eq!(n.rx_used(), 0, "nothing delivered to the broken guest");
    }
}
