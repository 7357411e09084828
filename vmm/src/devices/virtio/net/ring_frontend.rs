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
    features as ring_features, ClientRing, Completed, Opcode, RawRegion, Request as RingRequest,
    RingParams, Status,
};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::tap::VNET_HDR_LEN;
use super::{gather, read_net_config, scatter, DEVICE_TYPE, MAX_FRAME, QUEUE_SIZE};
use crate::devices::channel::ChannelFds;
use crate::devices::virtio::ring::{
    Failure, Guest, GuestError, RingCommands, RingDevice, RingFrontend, RingSetupError, RingStats,
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

impl RingNetStats {
    /// `name value` pairs of the counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
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

    fn accept(
        &mut self,
        guest: &mut Guest,
        journal: &mut Journal<Tx>,
        quarantined: bool,
    ) -> Result<(), GuestError> {
        let mut dropped = Vec::new();
        let mut result = Ok(());
        {
            let Some(aq) = guest.queues.get_mut(TXQ) else {
                return Ok(());
            };
            let (queue, mem) = (&mut aq.queue, &guest.mem);
            for _ in 0..queue.size() {
                if !journal.has_room() {
                    break;
                }
                if let Err(e) = queue.disable_notification(mem) {
                    result = Err(GuestError::Queue(e));
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    match queue.enable_notification(mem) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            result = Err(GuestError::Queue(e));
                            break;
                        }
                    }
                };
                let head = chain.head_index();
                match self.check_frame(mem, chain) {
                    Some(_) if quarantined => {
                        self.stats.tx_dropped_failed.fetch_add(1, Ordering::Relaxed);
                        dropped.push(head);
                    }
                    Some(frame) => {
                        if let Err(tx) = journal.push(Tx { head, frame }) {
                            dropped.push(tx.head);
                        }
                    }
                    None => dropped.push(head),
                }
            }
        }
        for head in dropped {
            guest.finish(TXQ, head, 0);
        }
        result
    }

    fn encode(&mut self, _guest: &Guest, tx: &Tx, data: &mut Vec<u8>) -> Option<RingRequest> {
        data.clear();
        data.extend_from_slice(&tx.frame);
        Some(RingRequest {
            id: 0,
            op: Opcode::NetTx,
            flags: 0,
            sector: 0,
            len: u32::try_from(tx.frame.len()).ok()?,
        })
    }

    fn complete(
        &mut self,
        guest: &mut Guest,
        _ring: &ClientRing<RawRegion>,
        tx: Tx,
        c: &Completed,
    ) {
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
    fn standing_done(
        &mut self,
        guest: Option<&mut Guest>,
        ring: &ClientRing<RawRegion>,
        c: &Completed,
    ) {
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
        if ring.read_slot(slot, 0, &mut frame).is_err() {
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
        let mut used = Vec::new();
        let mut result = Ok(());
        {
            let Some(aq) = guest.queues.get_mut(RXQ) else {
                return Ok(());
            };
            let (queue, mem) = (&mut aq.queue, &guest.mem);
            let mut budget = usize::from(queue.size());
            while let Some(frame) = self.rx_pending.front() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    match queue.enable_notification(mem) {
                        Ok(true) if budget > 0 => {
                            budget -= 1;
                            continue;
                        }
                        Ok(_) => break,
                        Err(e) => {
                            result = Err(GuestError::Queue(e));
                            break;
                        }
                    }
                };
                let head = chain.head_index();
                let written = scatter(mem, chain, frame);
                if written == 0 {
                    self.stats
                        .rx_dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    let bytes = (frame.len() - VNET_HDR_LEN) as u64;
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                used.push((head, written));
                self.rx_pending.pop_front();
            }
        }
        for (head, written) in used {
            guest.finish(RXQ, head, written);
        }
        result
    }

    fn guest_gone(&mut self) {
        self.rx_pending.clear();
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
        let stats = Arc::new(RingNetStats::default());
        let device = NetRing {
            mac,
            stats: stats.clone(),
            rx_pending: VecDeque::new(),
            buf: vec![0u8; MAX_FRAME],
        };
        let frontend = RingFrontend::spawn(
            "ring-net",
            device,
            &fds,
            NET_RING_PARAMS,
            generation,
            TX_MAX,
            stats.ring.clone(),
        )?;
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
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        self.frontend.activate(mem, queues, failure)
    }

    fn reset(&mut self) {
        self.frontend.reset();
    }
}
