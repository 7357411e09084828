//! Channels and the driver VMs' channel slots, as the daemon owns them.
//!
//! A driver VM has a fixed number of channel devices (*slots*) for its whole life: one per
//! client disk or NIC of the configuration, plus `spare_channels` for clients added at runtime.
//! The daemon owns each slot's resources (the memfd and both eventfds) so that they outlive any
//! VMM process; a slot serves one client at a time ([`Channel`]) or nobody ([`Spare`]). A slot
//! taken back from a removed client is wiped before another client gets it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use ddvmm_translation::channel::DEFAULT_WEIGHT;
use ddvmm_translation::ring::HeaderView;
use vmm_sys_util::eventfd::EventFd;

use super::config::VmConfig;
use crate::devices::virtio::ring::RateLimit;
use crate::memory::create_memfd;

/// A slot's resources: a driver VM's channel device `index` is wired to them for its whole
/// life, whichever client they serve.
pub(super) struct Slot {
    /// Index among the driver VM's channel devices.
    pub(super) index: usize,
    pub(super) memory: File,
    kick: EventFd,
    doorbell: EventFd,
    /// Client starts so far: the ring generation's high half (see `ClientRing::create_at`).
    /// Kept across clients, so that no client's generation is an earlier client's.
    client_starts: u64,
}

impl Slot {
    /// A new slot `index` of driver VM `driver` with `size` bytes of channel memory.
    pub(super) fn new(driver: &str, index: usize, size: u64) -> std::io::Result<Self> {
        let cname = CString::new(format!("ddvmm-chan-{driver}-{index}")).unwrap_or_default();
        let memory = create_memfd(&cname).map_err(std::io::Error::other)?;
        memory.set_len(size)?;
        seal_size(&memory)?;
        let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        Ok(Slot {
            index,
            memory,
            kick: efd()?,
            doorbell: efd()?,
            client_starts: 0,
        })
    }

    /// Its descriptors, for a VMM process to inherit.
    pub(super) fn fds(&self) -> [RawFd; 3] {
        [
            self.memory.as_raw_fd(),
            self.kick.as_raw_fd(),
            self.doorbell.as_raw_fd(),
        ]
    }

    /// `mem=FD,kick=FD,doorbell=FD`.
    pub(super) fn fd_spec(&self) -> String {
        let [m, k, d] = self.fds();
        format!("mem={m},kick={k},doorbell={d}")
    }

    /// The ring generation of the next client start.
    pub(super) fn next_generation(&mut self) -> u64 {
        self.client_starts += 1;
        (self.client_starts << 32) | 1
    }

    /// Readies the slot for another client: the memory reads as zeroes (a hole punched over
    /// all of it also gives its pages back), and stale notifications are drained.
    pub(super) fn wipe(&self) -> std::io::Result<()> {
        let len = self.memory.metadata()?.len();
        let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: fallocate on a memfd we own; it only changes the file's content.
        let rc = unsafe {
            libc::fallocate(
                self.memory.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = self.kick.read();
        let _ = self.doorbell.read();
        Ok(())
    }

    /// One read of the ring header in the slot's memory.
    pub(super) fn ring_header(&self) -> Option<HeaderView> {
        let mut b = [0u8; HeaderView::LEN];
        self.memory.read_exact_at(&mut b, 0).ok()?;
        HeaderView::parse(&b)
    }
}

/// A slot that serves nobody.
pub(super) struct Spare {
    pub(super) driver: String,
    pub(super) slot: Slot,
}

/// What a channel carries: a window of a driver VM's block device, or a port on its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Port {
    /// Block: the device in the driver VM. Net: the driver VM's uplink interface.
    pub(super) backend: String,
    pub(super) start_sector: u64,
    pub(super) sectors: u64,
    pub(super) read_only: bool,
    /// `Some`: a network port for the client NIC with this MAC (no window).
    pub(super) mac: Option<[u8; 6]>,
    /// Block: the share of the device against the driver VM's other channels.
    pub(super) weight: u32,
    /// Block: the requests and bytes per second the client may use.
    pub(super) limit: RateLimit,
}

impl Port {
    /// Client `vm`'s ports with their driver VMs, in its ring device order: disks, then NICs.
    pub(super) fn of_client(vm: &VmConfig) -> Vec<(String, Port)> {
        let disks = vm.client_disks.iter().map(|d| {
            let port = Port {
                backend: d.device.clone(),
                start_sector: d.offset / 512,
                sectors: d.size / 512,
                read_only: d.read_only,
                mac: None,
                weight: d.weight,
                limit: d.limit,
            };
            (d.driver.clone(), port)
        });
        let nets = vm.client_nets.iter().map(|n| {
            let port = Port {
                backend: n.uplink.clone(),
                start_sector: 0,
                sectors: 0,
                read_only: false,
                mac: Some(n.mac),
                weight: DEFAULT_WEIGHT,
                limit: RateLimit::default(),
            };
            (n.driver.clone(), port)
        });
        disks.chain(nets).collect()
    }

    /// The channel device's description, as `ddvmm run --channel` and the control socket's
    /// assignments take it (without descriptors).
    pub(super) fn device_spec(&self) -> String {
        match self.mac {
            Some(mac) => format!("backend={},mac={}", self.backend, format_mac(&mac)),
            None => format!(
                "backend={},start={},sectors={},weight={}{}",
                self.backend,
                self.start_sector,
                self.sectors,
                self.weight,
                if self.read_only { ",ro" } else { "" }
            ),
        }
    }
}

/// One channel: a slot of driver VM `driver` serving a disk or NIC of `client`.
pub(super) struct Channel {
    pub(super) driver: String,
    pub(super) client: String,
    /// Index among the client's ring devices (its running VMM's order).
    pub(super) client_index: usize,
    pub(super) slot: Slot,
    pub(super) port: Port,
}

impl Channel {
    /// The client VMM's `--ring-disk`/`--ring-net` argument for its next start.
    pub(super) fn client_arg(&mut self) -> (&'static str, String) {
        let generation = self.slot.next_generation();
        let fds = self.slot.fd_spec();
        let p = &self.port;
        match p.mac {
            Some(mac) => (
                "--ring-net",
                format!("{fds},mac={},generation={generation}", format_mac(&mac)),
            ),
            None => (
                "--ring-disk",
                format!(
                    "{fds},sectors={},generation={generation},id={}-{}{}{}",
                    p.sectors,
                    self.driver,
                    self.slot.index,
                    if p.read_only { ",ro" } else { "" },
                    p.limit.options()
                ),
            ),
        }
    }

    /// Its line in the stats.
    pub(super) fn stats(&self) -> serde_json::Value {
        let h = self.slot.ring_header();
        let p = &self.port;
        serde_json::json!({
            "driver": self.driver,
            "client": self.client,
            "slot": self.slot.index,
            "backend": p.backend,
            "start_sector": p.start_sector,
            "sectors": p.sectors,
            "mac": p.mac.as_ref().map(format_mac),
            "weight": p.weight,
            "iops_limit": p.limit.ops_per_s,
            "bandwidth_limit": p.limit.bytes_per_s,
            "generation": h.map(|h| h.generation),
            "agent_ready": h.map(|h| h.agent_serves_current()),
            "heartbeat": h.map(|h| h.heartbeat),
            "requests": h.map(|h| h.req_prod),
            "completions": h.map(|h| h.cmp_prod),
        })
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Seals memfd `f` against shrinking and growing: a process it is handed to (a VMM that maps
/// it) can never be made to fault on a truncated mapping.
pub(super) fn seal_size(f: &File) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS only changes the seals of the memfd we own.
    let rc = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wiped_slot_reads_zeroes_and_keeps_its_size_and_generations() {
        let mut s = Slot::new("drv", 3, 1 << 20).expect("slot");
        s.memory.write_all_at(&[0xaa; 4096], 8192).expect("write");
        s.kick.write(1).expect("kick");
        assert_eq!(s.next_generation(), (1 << 32) | 1);
        s.wipe().expect("wipe");
        let mut b = [0xffu8; 4096];
        s.memory.read_exact_at(&mut b, 8192).expect("read");
        assert!(b.iter().all(|x| *x == 0));
        assert_eq!(s.memory.metadata().expect("meta").len(), 1 << 20);
        assert!(s.kick.read().is_err(), "drained");
        assert_eq!(s.next_generation(), (2 << 32) | 1, "generations go on");
        assert!(s.memory.set_len(1 << 21).is_err(), "size sealed");
    }

    #[test]
    fn device_specs_parse_as_the_vmm_parses_them() {
        let p = Port {
            backend: "/dev/vda".into(),
            start_sector: 2048,
            sectors: 4096,
            read_only: true,
            mac: None,
            weight: 250,
            limit: RateLimit::default(),
        };
        let info = crate::devices::channel::ChannelInfo::parse(2, &p.device_spec()).expect("parse");
        assert_eq!(info.weight, 250);
        assert_eq!(
            info.kind,
            crate::devices::channel::ChannelKind::Block {
                start_sector: 2048,
                sectors: 4096,
                read_only: true
            }
        );
        let n = Port {
            backend: "eth0".into(),
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            ..p
        };
        let info = crate::devices::channel::ChannelInfo::parse(1, &n.device_spec()).expect("net");
        assert_eq!(
            info.kind,
            crate::devices::channel::ChannelKind::Net {
                mac: [0x52, 0x54, 0, 1, 2, 3]
            }
        );
    }
}
