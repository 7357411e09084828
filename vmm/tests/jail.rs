//! The jail on this machine: a forked child jails itself (namespaces, reaper, empty read-only
//! root through `pivot_root`, uid/gid 65534, no capabilities, `NO_NEW_PRIVS`) and reports what
//! it can still do. Needs root and a kernel that lets it create namespaces; without them it
//! says so and checks nothing else.

use ddvmm::sandbox::jail::{self, JailConfig};
use ddvmm::sandbox::seccomp::{self, SeccompMode, ThreadKind};

/// What the jailed process checks; its exit code is the first failure.
fn jailed(cfg: &JailConfig) -> i32 {
    if let Err(e) = jail::enter(cfg) {
        eprintln!("enter: {e:#?}");
        // A container that forbids namespaces (EPERM) is not a failure of the jail.
        if let jail::JailError::Sys { step, source } = &e {
            if step.starts_with("unshare") && source.raw_os_error() == Some(libc::EPERM) {
                return 9;
            }
        }
        return 10;
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        return 11;
    }
    if let Err(e) = jail::lock_down(cfg) {
        eprintln!("lock_down: {e:#?}");
        return 12;
    }
    // SAFETY: getuid/getgid have no preconditions.
    if unsafe { (libc::getuid(), libc::getgid()) } != (65534, 65534) {
        return 13;
    }
    if std::fs::read_dir("/").map(|d| d.count()).ok() != Some(0) {
        return 14;
    }
    if std::fs::File::create("/escape").is_ok() {
        return 15;
    }
    if std::fs::metadata("/etc").is_ok() || std::fs::metadata("/proc/self").is_ok() {
        return 16;
    }
    let status = capabilities();
    if status != Some((0, 0)) {
        eprintln!("capabilities {status:?}");
        return 17;
    }
    // SAFETY: prctl reads no memory for this option.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return 18;
    }
    // The network namespace is new: no interface but a loopback that is down.
    // SAFETY: plain socket/connect calls on a local sockaddr; the descriptor is closed.
    let reached = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 22u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error().raw_os_error();
        libc::close(fd);
        rc == 0 || err != Some(libc::ENETUNREACH)
    };
    if reached {
        return 19;
    }
    0
}

/// (effective, permitted) capability sets of this thread.
fn capabilities() -> Option<(u64, u64)> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two Data structs for version 3, as given.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    (rc == 0).then(|| {
        let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        (
            join(data[0].effective, data[1].effective),
            join(data[0].permitted, data[1].permitted),
        )
    })
}

/// Runs `body` in a forked child jailed in a fresh directory; returns its wait status, or
/// `None` where the jail cannot be exercised (not root).
fn in_forked_child(body: fn(&JailConfig) -> i32) -> Option<libc::c_int> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the jail is not exercised here");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = JailConfig {
        root: dir.path().to_path_buf(),
        uid: 65534,
        gid: 65534,
    };
    // SAFETY: the child runs only this test's code (glibc's fork keeps malloc usable) and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let code = std::panic::catch_unwind(|| body(&cfg)).unwrap_or(100);
        // SAFETY: ends the child without running the parent's destructors twice.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 9 {
        eprintln!("namespaces are not available here: the jail is not exercised");
        return None;
    }
    Some(status)
}

#[test]
fn a_jailed_process_has_an_empty_root_and_no_privileges() {
    let Some(status) = in_forked_child(jailed) else {
        return;
    };
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert_eq!(
        code, 0,
        "jailed child failed check {code} (see the test source)"
    );
}

/// A call off a thread's list kills the process with SIGSYS, even as the init of its own PID
/// namespace (which ignores signals it sends itself), and the reaper ends the same way.
#[test]
fn a_forbidden_call_kills_the_jailed_vmm_with_sigsys() {
    fn body(cfg: &JailConfig) -> i32 {
        if seccomp::enable(SeccompMode::Enforce).is_err() {
            return 20;
        }
        match jailed(cfg) {
            0 => {}
            code => return code,
        }
        if seccomp::confine(ThreadKind::Control).is_err() {
            return 21;
        }
        // SAFETY: socket(2) traps in the control thread's filter.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        22
    }
    let Some(status) = in_forked_child(body) else {
        return;
    };
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
        "status {status:#x} (exit code {} if it exited)",
        libc::WEXITSTATUS(status)
    );
}
