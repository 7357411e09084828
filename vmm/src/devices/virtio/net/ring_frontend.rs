//! The client frontend: a virtio-net device whose backend is a ring to a driver VM.
//!
//! The guest sees an ordinary virtio-net NIC (link always up, MAC from the configuration, no
//! control queue). Frames cross the ring ([`ddvmm_translation::ring`], network channels)
//! through bounce buffers: the driver VM never sees guest memory.
//!
//! **TX.** A chain is gathered (12-byte header + frame, the same checks as the TAP device),
//! its source MAC checked against the configured one (a spoofed frame is dropped and
//! counted, it never reaches the ring), and sent as a `net-tx` request. The guest's
//! descriptors stay unreturned until the driver VM completes the request: the journal holds
//! the head and a copy of the frame. At most [`TX_MAX`] frames are on the ring; beyond that
//! the chains wait in the guest's queue (backpressure). Transmit offloads (checksum, TSO)
//! are offered: the header passes to the driver VM's TAP, whose kernel finishes the work.
//!
//! **RX.** [`RX_POSTED`] `net-rx` requests are kept on the ring as receive buffers. A
//! completed one carries a frame, which is copied into the guest's next RX chain (with a
//! header that claims nothing: no receive offloads are offered); while the guest has no
//! buffers, up to [`RX_PENDING_MAX`] frames wait here, more are dropped and counted.
//!
//! **Recovery.** On [`RingCommand::Replay`] the ring starts a new generation; journaled
//! transmits are sent again in their order (at least once), receive buffers are posted again.
//! The guest sees a pause, never a link change. [`RingCommand::Quarantine`] drops what is
//! outstanding (completing it to the guest, as a lost frame) until the next replay.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddvmm_translation::ring::{
    features as ring_features, ClientRing, Opcode, RawRegion, Request as RingRequest, RingError,
    RingParams, Status,
};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryMmap, MmapRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use super::{gather, read_net_config, scatter, DEVICE_TYPE, MAX_FRAME, QUEUE_SIZE};
use crate::devices::virtio::ring_control::{
    map_client_ring, IdleRing, RingCommand, RingCommands, RingControl, RingOutcome, RingSetupError,
};
use crate::devices::virtio::{
    publish_used, ActivateError, ActiveQueue, DeviceFailure, QueueWorker, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::machine::ChannelFds;

const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_MTU: u32 = 3;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_STATUS: u32 = 16;
/// Ethernet header: destination, source, ethertype.
const ETH_HLEN: usize = 14;

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
/// Transmits on the ring at most (the rest of the entries).
pub const TX_MAX: usize = NET_RING_PARAMS.ring_entries as usize - RX_POSTED;
/// Received frames held while the guest has no receive buffers.
pub const RX_PENDING_MAX: usize = 256;

/// Errors setting up a ring NIC.
#[derive(Debug, thiserror::Error)]
pub enum RingNetError {
    /// The ring cannot be set up.
    #[error(transparent)]
    Setup(#[from] RingSetupError),
    /// A control eventfd cannot be created.
    #[error("cannot create the control eventfd")]
    Control(#[source] std::io::Error),
}

/// Counters of one ring NIC, readable while it runs.
#[derive(Debug, Default)]
pub struct RingNetStats {
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
    /// Transmits sent again on a new generation.
    pub replayed: AtomicU64,
    /// Receive buffers posted again on a new generation.
    pub rx_reposted: AtomicU64,
    /// Completions rejected by validation.
    pub bogus_completions: AtomicU64,
    /// Notifications sent to the driver VM.
    pub kicks: AtomicU64,
    /// Doorbells received from the driver VM.
    pub doorbells: AtomicU64,
    /// Transmit requests submitted on the ring.
    pub submitted: AtomicU64,
    /// Transmit requests completed by the driver VM (any status): progress.
    pub completed: AtomicU64,
    /// Transmits on the ring awaiting completion (a gauge; receive buffers not counted).
    pub outstanding: AtomicU64,
    /// Ring generations started after the first.
    pub generations: AtomicU64,
}

impl RingNetStats {
    /// `name value` pairs of the counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
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
            ("replayed", g(&self.replayed)),
            ("rx_reposted", g(&self.rx_reposted)),
            ("bogus_completions", g(&self.bogus_completions)),
            ("kicks", g(&self.kicks)),
            ("doorbells", g(&self.doorbells)),
            ("submitted", g(&self.submitted)),
            ("completed", g(&self.completed)),
            ("outstanding", g(&self.outstanding)),
            ("generations", g(&self.generations)),
        ]
    }
}

/// A transmit between pop and completion.
struct Tx {
    /// The guest's chain; `None` once the guest reset the queue (only the slot is left).
    head: Option<u16>,
    /// Header + frame, as gathered (replayed from here, never from the slot).
    frame: Vec<u8>,
    /// Driver VM crashes this frame was in flight at, in a row.
    crashes: u32,
}

/// Ring-side state that survives guest device resets.
struct NetRing {
    // Declared before `_map`: the ring's raw region points into the mapping.
    ring: ClientRing<RawRegion>,
    _map: Arc<MmapRegion>,
    /// Outstanding transmits by ring id.
    tx: HashMap<u64, Tx>,
    /// Transmits to send (again) before new ones, in order.
    replay: VecDeque<Tx>,
    /// Receive buffers on the ring.
    rx_posted: usize,
    next_id: u64,
    seen_bogus: u64,
    quarantined: bool,
    stats: Arc<RingNetStats>,
}

impl NetRing {
    /// A new generation: outstanding transmits go to the replay queue (in order, poison
    /// dropped), receive buffers are forgotten (posted again by the queue thread).
    fn renew(&mut self, poison_after: u32) -> Result<(RingOutcome, Vec<u16>), String> {
        let old = self.ring.new_generation().map_err(|e| e.to_string())?;
        self.stats.generations.fetch_add(1, Ordering::Relaxed);
        self.quarantined = false;
        let mut outcome = RingOutcome::default();
        let mut dropped = Vec::new();
        let mut replay = VecDeque::new();
        for r in old {
            match r.op {
                Opcode::NetRx => {
                    self.stats.rx_reposted.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    let Some(mut tx) = self.tx.remove(&r.id) else {
                        continue;
                    };
                    tx.crashes += 1;
                    if tx.head.is_none() {
                        continue;
                    }
                    if poison_after > 0 && tx.crashes >= poison_after {
                        tracing::error!(crashes = tx.crashes, "poison frame: dropped");
                        outcome.poisoned += 1;
                        dropped.extend(tx.head);
                        continue;
                    }
                    replay.push_back(tx);
                }
            }
        }
        self.tx.clear();
        self.rx_posted = 0;
        outcome.replayed = replay.len() as u64;
        // Older replays (from a generation that died before sending them) go first.
        self.replay.extend(replay);
        let s = &self.stats;
        s.replayed.fetch_add(outcome.replayed, Ordering::Relaxed);
        s.tx_dropped_failed
            .fetch_add(outcome.poisoned, Ordering::Relaxed);
        Ok((outcome, dropped))
    }

    /// Drops every transmit (outstanding or waiting): their heads, for the guest.
    fn fail_all(&mut self) -> Vec<u16> {
        let heads: Vec<u16> = self
            .tx
            .values_mut()
            .filter_map(|t| t.head.take())
            .chain(self.replay.drain(..).filter_map(|t| t.head))
            .collect();
        self.stats
            .tx_dropped_failed
            .fetch_add(heads.len() as u64, Ordering::Relaxed);
        heads
    }

    /// Forgets the guest's heads (a device reset): completions then only free slots.
    fn forget_guest(&mut self) {
        for t in self.tx.values_mut() {
            t.head = None;
        }
        self.replay.clear();
    }
}

impl IdleRing for NetRing {
    fn apply_idle(&mut self, cmd: RingCommand) -> Result<RingOutcome, String> {
        match cmd {
            RingCommand::Replay { poison_after } => {
                self.forget_guest();
                self.renew(poison_after)?;
            }
            RingCommand::Quarantine => self.quarantined = true,
        }
        Ok(RingOutcome::default())
    }
}

/// The virtio-net device model over a ring.
pub struct RingNet {
    fds: ChannelFds,
    mac: [u8; 6],
    state: Arc<Mutex<Option<NetRing>>>,
    stats: Arc<RingNetStats>,
    control: Arc<RingControl<NetRing>>,
    worker: Option<QueueWorker>,
}

impl RingNet {
    /// Maps the channel memory and creates the ring in it at `generation`.
    pub fn new(fds: ChannelFds, mac: [u8; 6], generation: u64) -> Result<Self, RingNetError> {
        let (ring, map) = map_client_ring(&fds, NET_RING_PARAMS, generation)?;
        let stats = Arc::new(RingNetStats::default());
        let state = Arc::new(Mutex::new(Some(NetRing {
            ring,
            _map: map,
            tx: HashMap::new(),
            replay: VecDeque::new(),
            rx_posted: 0,
            next_id: 1,
            seen_bogus: 0,
            quarantined: false,
            stats: stats.clone(),
        })));
        let control = RingControl::new(state.clone()).map_err(RingNetError::Control)?;
        Ok(RingNet {
            fds,
            mac,
            state,
            stats,
            control: Arc::new(control),
            worker: None,
        })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<RingNetStats> {
        self.stats.clone()
    }

    /// The control handle (replay after a driver VM restart, quarantine).
    pub fn control(&self) -> Arc<dyn RingCommands> {
        self.control.clone()
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
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.reset();
        let state = self.state.clone();
        let control = self.control.clone();
        let mut worker = Worker {
            mem,
            rx,
            tx,
            kick: self.fds.kick.clone(),
            doorbell: self.fds.doorbell.clone(),
            mac: self.mac,
            stats: self.stats.clone(),
            rx_pending: VecDeque::new(),
            buf: vec![0u8; MAX_FRAME],
        };
        self.worker = Some(QueueWorker::spawn("ring-net", move |stop| {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let Some(fe) = guard.as_mut() else { return };
            if let Err(e) = worker.run(fe, &control, &stop) {
                failure.needs_reset(&e);
            }
            fe.forget_guest();
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for RingNet {
    fn drop(&mut self) {
        self.reset();
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_DOORBELL: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_STOP: u64 = 4;

fn qerr(e: virtio_queue::Error) -> String {
    format!("virtqueue: {e:?}")
}

/// The queue thread's side.
struct Worker {
    mem: GuestMemoryMmap,
    rx: ActiveQueue,
    tx: ActiveQueue,
    kick: Arc<EventFd>,
    doorbell: Arc<EventFd>,
    mac: [u8; 6],
    stats: Arc<RingNetStats>,
    /// Received frames (header + frame) waiting for guest buffers.
    rx_pending: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl Worker {
    fn run(
        &mut self,
        fe: &mut NetRing,
        control: &RingControl<NetRing>,
        stop: &EventFd,
    ) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| e.to_string())?;
        for (fd, token) in [
            (self.rx.notify.as_raw_fd(), TOKEN_RX),
            (self.tx.notify.as_raw_fd(), TOKEN_TX),
            (self.doorbell.as_raw_fd(), TOKEN_DOORBELL),
            (control.wake_fd().as_raw_fd(), TOKEN_CONTROL),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| e.to_string())?;
        }
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            for (cmd, answer) in control.take() {
                let _ = answer.send(self.apply(fe, cmd));
            }
            loop {
                self.post_rx(fe);
                self.take_completions(fe)?;
                self.deliver_pending()?;
                self.transmit(fe)?;
                if !fe.ring.enable_notify() {
                    break;
                }
            }
            self.stats
                .outstanding
                .store(fe.tx.len() as u64, Ordering::Relaxed);
            // Receive buffers are always outstanding: look again now and then even without a
            // doorbell, so a lost notification costs a delay, never a hang.
            let n = match epoll.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RX => {
                        let _ = self.rx.notify.read();
                    }
                    TOKEN_TX => {
                        let _ = self.tx.notify.read();
                    }
                    TOKEN_DOORBELL => {
                        let _ = self.doorbell.read();
                        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                    }
                    TOKEN_CONTROL => {
                        let _ = control.wake_fd().read();
                    }
                    _ => return Ok(()),
                }
            }
        }
    }

    /// A daemon command while the queues run.
    fn apply(&mut self, fe: &mut NetRing, cmd: RingCommand) -> Result<RingOutcome, String> {
        let (outcome, dropped) = match cmd {
            RingCommand::Replay { poison_after } => fe.renew(poison_after)?,
            RingCommand::Quarantine => {
                fe.quarantined = true;
                let heads = fe.fail_all();
                let failed = heads.len() as u64;
                (
                    RingOutcome {
                        failed,
                        ..RingOutcome::default()
                    },
                    heads,
                )
            }
        };
        self.return_tx(dropped)?;
        Ok(outcome)
    }

    /// Keeps [`RX_POSTED`] receive buffers on the ring.
    fn post_rx(&mut self, fe: &mut NetRing) {
        let mut sent = false;
        while fe.rx_posted < RX_POSTED && !fe.quarantined {
            let req = RingRequest {
                id: fe.next_id,
                op: Opcode::NetRx,
                flags: 0,
                sector: 0,
                len: NET_RING_PARAMS.slot_size,
            };
            if fe.ring.submit(req, None).is_err() {
                break;
            }
            fe.next_id += 1;
            fe.rx_posted += 1;
            sent = true;
        }
        if sent {
            self.kick_if_asked(fe);
        }
    }

    fn kick_if_asked(&self, fe: &mut NetRing) {
        if fe.ring.needs_notify_agent() {
            let _ = self.kick.write(1);
            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes validated completions: transmits return their chains, receives carry frames.
    fn take_completions(&mut self, fe: &mut NetRing) -> Result<(), String> {
        let mut tx_done = Vec::new();
        for c in fe.ring.poll_completions() {
            match c.req.op {
                Opcode::NetRx => {
                    fe.rx_posted = fe.rx_posted.saturating_sub(1);
                    if let Some(slot) = c.slot {
                        if c.status == Status::Ok {
                            self.receive(fe, slot, c.len as usize);
                        }
                        let _ = fe.ring.release_slot(slot);
                    }
                }
                _ => {
                    if let Some(slot) = c.slot {
                        let _ = fe.ring.release_slot(slot);
                    }
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    let Some(tx) = fe.tx.remove(&c.req.id) else {
                        continue;
                    };
                    if c.status == Status::Ok {
                        let bytes = (tx.frame.len() - VNET_HDR_LEN) as u64;
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
                    } else {
                        self.stats.tx_dropped_driver.fetch_add(1, Ordering::Relaxed);
                    }
                    tx_done.extend(tx.head);
                }
            }
        }
        let bogus = fe.ring.stats().bogus();
        if bogus != fe.seen_bogus {
            tracing::warn!(
                new = bogus - fe.seen_bogus,
                "driver VM published invalid completions; dropped"
            );
            fe.seen_bogus = bogus;
            self.stats.bogus_completions.store(bogus, Ordering::Relaxed);
        }
        self.return_tx(tx_done)
    }

    /// Copies a received frame out of its slot into the pending queue.
    fn receive(&mut self, fe: &NetRing, slot: u32, len: usize) {
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
        if fe.ring.read_slot(slot, 0, &mut frame).is_err() {
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
    fn deliver_pending(&mut self) -> Result<(), String> {
        let mut used = Vec::new();
        while let Some(frame) = self.rx_pending.front() {
            let queue = &mut self.rx.queue;
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                if queue.enable_notification(&self.mem).map_err(qerr)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = scatter(&self.mem, chain, frame);
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
        publish_used(&mut self.rx.queue, &self.mem, used, &self.rx.interrupt)?;
        Ok(())
    }

    /// Sends replayed frames, then the guest's new ones, while the ring has room.
    fn transmit(&mut self, fe: &mut NetRing) -> Result<(), String> {
        let mut dropped = Vec::new();
        let mut sent = false;
        loop {
            if fe.tx.len() >= TX_MAX {
                break;
            }
            let tx = match fe.replay.pop_front() {
                Some(tx) => tx,
                None => {
                    let queue = &mut self.tx.queue;
                    queue.disable_notification(&self.mem).map_err(qerr)?;
                    let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                        if queue.enable_notification(&self.mem).map_err(qerr)? {
                            continue;
                        }
                        break;
                    };
                    let head = chain.head_index();
                    match check_frame(&self.mem, chain, &mut self.buf, &self.mac, &self.stats) {
                        Some(frame) if !fe.quarantined => Tx {
                            head: Some(head),
                            frame,
                            crashes: 0,
                        },
                        Some(_) => {
                            self.stats.tx_dropped_failed.fetch_add(1, Ordering::Relaxed);
                            dropped.push(head);
                            continue;
                        }
                        None => {
                            dropped.push(head);
                            continue;
                        }
                    }
                }
            };
            let req = RingRequest {
                id: fe.next_id,
                op: Opcode::NetTx,
                flags: 0,
                sector: 0,
                len: tx.frame.len() as u32,
            };
            match fe.ring.submit(req, Some(&tx.frame)) {
                Ok(_) => {
                    fe.next_id += 1;
                    fe.tx.insert(req.id, tx);
                    self.stats.submitted.fetch_add(1, Ordering::Relaxed);
                    sent = true;
                }
                Err(RingError::RingFull | RingError::NoFreeSlot) => {
                    fe.replay.push_front(tx);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ring refused a frame");
                    self.stats
                        .tx_dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    dropped.extend(tx.head);
                }
            }
        }
        if sent {
            self.kick_if_asked(fe);
        }
        self.return_tx(dropped)
    }

    /// Gives transmit chains back to the guest (sent, or dropped).
    fn return_tx(&mut self, heads: Vec<u16>) -> Result<(), String> {
        publish_used(
            &mut self.tx.queue,
            &self.mem,
            heads.into_iter().map(|h| (h, 0)),
            &self.tx.interrupt,
        )?;
        Ok(())
    }
}

/// Gathers a TX chain and checks it: well-formed, fits a slot, from our MAC.
fn check_frame<I>(
    mem: &GuestMemoryMmap,
    chain: I,
    buf: &mut [u8],
    mac: &[u8; 6],
    stats: &RingNetStats,
) -> Option<Vec<u8>>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let len = match gather(mem, chain, buf) {
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
    let source = &buf[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12];
    if source != *mac {
        stats.tx_dropped_spoofed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?source, "spoofed source MAC: frame dropped");
        return None;
    }
    Some(buf[..len].to_vec())
}
