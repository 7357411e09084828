//! Handing file descriptors from the daemon to the VMM processes it starts.
//!
//! Channel memory (memfd) and notification eventfds are created by the daemon, which outlives
//! any one driver VM, and inherited by the two VMM processes of a channel. The parent keeps its
//! descriptors close-on-exec and clears the flag only in the child (between `fork` and `exec`)
//! for the ones named on that child's command line; the child adopts each named number exactly
//! once and marks it close-on-exec again.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use thiserror::Error;

/// Errors adopting an inherited descriptor.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandoffError {
    /// The number is not an open descriptor of this process.
    #[error("file descriptor {0} is not open (it must be inherited from the daemon)")]
    NotOpen(RawFd),
    /// Standard streams cannot be adopted.
    #[error("file descriptor {0} is a standard stream")]
    Reserved(RawFd),
    /// The same number was named twice.
    #[error("file descriptor {0} is named twice")]
    Twice(RawFd),
}

/// Adopts inherited descriptors, each at most once.
#[derive(Debug, Default)]
pub struct Adopter {
    taken: BTreeSet<RawFd>,
}

impl Adopter {
    /// No descriptor adopted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes ownership of inherited descriptor `fd`.
    pub fn adopt(&mut self, fd: RawFd) -> Result<OwnedFd, HandoffError> {
        if fd <= 2 {
            return Err(HandoffError::Reserved(fd));
        }
        if self.taken.contains(&fd) {
            return Err(HandoffError::Twice(fd));
        }
        // SAFETY: F_SETFD only changes descriptor flags; an invalid number fails with EBADF
        // and nothing else happens.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if rc != 0 {
            return Err(HandoffError::NotOpen(fd));
        }
        self.taken.insert(fd);
        // SAFETY: `fd` is open (F_SETFD succeeded), is not a standard stream, and nothing in
        // this process owns it: it was inherited for this purpose, and `taken` guarantees that
        // it is wrapped only once.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Lets `cmd`'s child inherit `fds` (at the same numbers); they stay close-on-exec here.
pub fn inherit(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe; it touches no memory shared with the parent's other threads.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn adopts_once_and_rejects_bad_numbers() {
        let f = tempfile::tempfile().expect("tmp").into_raw_fd();
        let mut a = Adopter::new();
        let owned = a.adopt(f).expect("adopt");
        assert_eq!(owned.as_raw_fd(), f);
        assert_eq!(a.adopt(f).err(), Some(HandoffError::Twice(f)));
        assert_eq!(a.adopt(1).err(), Some(HandoffError::Reserved(1)));
        assert_eq!(a.adopt(987_654).err(), Some(HandoffError::NotOpen(987_654)));
    }

    #[test]
    fn child_sees_exactly_the_inherited_descriptor() {
        let keep = tempfile::tempfile().expect("tmp");
        let other = tempfile::tempfile().expect("tmp");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "test -e /proc/self/fd/{} && ! test -e /proc/self/fd/{}",
            keep.as_raw_fd(),
            other.as_raw_fd()
        ));
        inherit(&mut cmd, vec![keep.as_raw_fd()]);
        assert!(cmd.status().expect("sh").success());
    }
}
