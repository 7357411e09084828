//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.

use std::collections::BTreeSet;

/// An in-memory cpio archive.
#[derive(Default)]
pub struct Archive {
    data: Vec<u8>,
    dirs: BTreeSet<String>,
    ino: u32,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, contents: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            contents.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(contents);
        self.pad();
    }

    fn pad(&mut self) {
        let len = self.data.len().next_multiple_of(4);
        self.data.resize(len, 0);
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let p = prefix.clone();
                self.entry(&p, 0o040755, &[]);
            }
        }
    }

    /// Adds a regular file at `path` (relative, no leading slash), creating parent folders.
    pub fn file(&mut self, path: &str, contents: &[u8], perm: u32) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, 0o100000 | (perm & 0o7777), contents);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_tool_reads_our_archive() {
        let mut a = Archive::new();
        a.file("work/sub/hello.txt", b"hello world\n", 0o644);
        a.file("cmd.sh", b"echo hi\n", 0o755);
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio is installed");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&bytes)
            .expect("write");
        assert!(child.wait().expect("wait").success());
        assert_eq!(
            std::fs::read(dir.join("work/sub/hello.txt")).expect("extracted"),
            b"hello world\n"
        );
        assert_eq!(
            std::fs::read(dir.join("cmd.sh")).expect("extracted"),
            b"echo hi\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
