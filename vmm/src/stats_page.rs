//! A stats page: a small memfd through which a VMM process publishes its device counters to
//! the daemon (no socket, no extra thread in the daemon).
//!
//! Layout: `seq` (u64 LE) at 0, `len` (u64 LE) at 8, `len` bytes of JSON at 16. The writer
//! makes `seq` odd, writes length and data, then makes `seq` even again; a reader retries
//! until it sees the same even `seq` before and after reading. The reader treats the content
//! as untrusted: the length is bounded and the JSON is parsed, never trusted.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The progress counters of one ring device (disk or NIC), which the daemon's watcher reads
/// from the page's `rings` list (every ring device in control order: disks, then NICs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingProgress {
    /// Journaled requests on the ring awaiting completion.
    pub outstanding: u64,
    /// Journaled requests not yet on the ring.
    pub waiting: u64,
    /// Completions taken from the ring.
    pub completed: u64,
    /// Completions the frontend refused as garbage.
    pub bogus_completions: u64,
    /// The driver VM broke the ring (until the next generation).
    pub corrupt: bool,
    /// Requests one more crash would make poison.
    pub suspects: u64,
    /// Wall clock (ms since the epoch) of the first completion on the current generation, 0
    /// until there is one.
    pub first_completion_ms: u64,
}

/// The part of a VMM's page the daemon's watcher reads (the rest, per-device counters by
/// name, is rendered as it is by `ctl stats` and the metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct WatchedPage {
    /// Every ring device, disks then NICs.
    #[serde(default)]
    pub rings: Vec<RingProgress>,
}

/// Largest snapshot.
pub const MAX_LEN: usize = 60 * 1024;
/// Size of the page file.
pub const PAGE_SIZE: u64 = 64 * 1024;

/// Writes snapshots.
pub struct StatsWriter {
    file: File,
    seq: u64,
}

impl StatsWriter {
    /// Publishes into `file` (grown to [`PAGE_SIZE`] if smaller).
    pub fn new(file: File) -> std::io::Result<Self> {
        if file.metadata()?.len() < PAGE_SIZE {
            file.set_len(PAGE_SIZE)?;
        }
        Ok(StatsWriter { file, seq: 0 })
    }

    /// Publishes `json` (truncated snapshots are never written: too long is an error).
    pub fn publish(&mut self, json: &str) -> std::io::Result<()> {
        if json.len() > MAX_LEN {
            return Err(std::io::Error::other("stats snapshot too large"));
        }
        self.seq = self.seq.wrapping_add(1) | 1;
        self.file.write_all_at(&self.seq.to_le_bytes(), 0)?;
        self.file
            .write_all_at(&(json.len() as u64).to_le_bytes(), 8)?;
        self.file.write_all_at(json.as_bytes(), 16)?;
        self.seq = self.seq.wrapping_add(1);
        self.file.write_all_at(&self.seq.to_le_bytes(), 0)
    }
}

/// Reads the latest consistent snapshot, if any.
pub fn read(file: &File) -> Option<serde_json::Value> {
    read_as(file)
}

/// Reads the latest consistent snapshot as a `T`, if there is one and it parses as a `T`.
pub fn read_as<T: DeserializeOwned>(file: &File) -> Option<T> {
    let u64_at = |off| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, off)
            .ok()
            .map(|()| u64::from_le_bytes(b))
    };
    for _ in 0..16 {
        let before = u64_at(0)?;
        if before == 0 {
            return None;
        }
        if before % 2 == 1 {
            std::thread::yield_now();
            continue;
        }
        let len = usize::try_from(u64_at(8)?).ok().filter(|l| *l <= MAX_LEN)?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, 16).ok()?;
        if u64_at(0)? == before {
            return serde_json::from_slice(&data).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_content() {
        let f = tempfile::tempfile().expect("tmp");
        assert!(read(&f).is_none());
        let mut w = StatsWriter::new(f.try_clone().expect("dup")).expect("writer");
        w.publish(r#"{"a":1}"#).expect("publish");
        assert_eq!(read(&f).expect("snapshot")["a"], 1);
        w.publish(r#"{"a":2}"#).expect("publish");
        assert_eq!(read(&f).expect("snapshot")["a"], 2);
        // Garbage lengths and content are rejected, not trusted.
        f.write_all_at(&u64::MAX.to_le_bytes(), 8).expect("w");
        assert!(read(&f).is_none());
        f.write_all_at(&4u64.to_le_bytes(), 8).expect("w");
        f.write_all_at(b"{{{{", 16).expect("w");
        assert!(read(&f).is_none());
        assert!(w.publish(&"x".repeat(MAX_LEN + 1)).is_err());
    }
}
