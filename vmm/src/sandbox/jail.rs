//! The jail of a VMM process: its own mount, PID, IPC, UTS and network namespaces, an empty
//! read-only root, an unprivileged uid/gid and no capabilities.
//!
//! It is set up in two steps around building the VM, which needs root (opening `/dev/kvm`,
//! VFIO groups, creating TAPs, reading the kernel and disks):
//!
//! 1. [`enter`], first thing, while the process has one thread: new namespaces, then a fork,
//!    because only the children of a process join the PID namespace it creates. The child
//!    (PID 1 of the new namespace) goes on to be the VMM; the parent stays behind as a *reaper*
//!    that holds nothing but stderr, forwards a stop request as `SIGKILL`, waits, and ends the
//!    way the VMM ended (same exit code or signal), so whoever started `ddvmm run` sees the
//!    VMM's own exit status.
//! 2. [`lock_down`], once everything the VM needs is open: the root becomes an empty,
//!    read-only tmpfs (`pivot_root`, or on a host whose root is the initramfs, which cannot be
//!    pivoted, a move of the tmpfs over `/` and a `chroot`), a new network namespace (TAP
//!    descriptors keep working; nothing else can be reached), the capability bounding set is
//!    emptied, the supplementary groups, gid and uid are set to the VM's own (glibc applies them
//!    to every thread, and the kernel then clears every thread's capabilities), and
//!    `NO_NEW_PRIVS` is set.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use thiserror::Error;

/// Jail errors: each names the step that failed.
#[derive(Debug, Error)]
pub enum JailError {
    /// A system call of the jail set-up failed.
    #[error("jail: {step}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The jail was asked for in a process that already runs threads.
    #[error("jail: the process already runs {0} threads (namespaces need a single thread)")]
    Threads(usize),
    /// The jail root path is unusable.
    #[error("jail: root {0} is not an absolute path to a directory")]
    Root(PathBuf),
    /// Root was asked to stay root.
    #[error("jail: uid and gid must not be 0")]
    RootIds,
    /// The process is not privileged enough to jail itself.
    #[error(
        "jail: needs root (CAP_SYS_ADMIN) to create namespaces; run without --jail or as root"
    )]
    NotRoot,
}

fn sys(step: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Sys { step, source }
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Sys {
            step,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Where and as whom a VMM is jailed.
#[derive(Clone, Debug)]
pub struct JailConfig {
    /// An existing directory (the daemon's, per VM): an empty tmpfs is mounted on it in the
    /// VMM's own mount namespace and becomes its root.
    pub root: PathBuf,
    /// The VM's own uid.
    pub uid: u32,
    /// The VM's own gid.
    pub gid: u32,
}

impl JailConfig {
    fn validate(&self) -> Result<CString, JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::RootIds);
        }
        if !self.root.is_absolute() || !self.root.is_dir() {
            return Err(JailError::Root(self.root.clone()));
        }
        CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| JailError::Root(self.root.clone()))
    }
}

fn thread_count() -> Result<usize, JailError> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .map_err(sys("counting threads in /proc/self/task"))
}

/// Where this process is in its jail: not jailed, entered (still root, threads may start
/// and must drop their own bounding set), or locked down.
static STAGE: AtomicU8 = AtomicU8::new(0);
const ENTERED: u8 = 1;
const LOCKED: u8 = 2;

/// For a thread starting between [`enter`] and [`lock_down`] (ring workers, control, stats):
/// empties its own capability bounding set, which is per thread (its uid and capabilities go
/// with the process-wide change in [`lock_down`]). Does nothing otherwise.
pub fn confine_early_thread() -> Result<(), JailError> {
    if STAGE.load(Ordering::Acquire) == ENTERED {
        drop_bounding_set()?;
    }
    Ok(())
}

/// Step 1: new namespaces and the fork. Returns in the child, which is PID 1 of its own PID
/// namespace, in its own (private) mount namespace; the parent never returns (it reaps the
/// child and exits as it did).
pub fn enter(cfg: &JailConfig) -> Result<(), JailError> {
    cfg.validate()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let threads = thread_count()?;
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    // Guest memory must never land in a core file.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    check("RLIMIT_CORE", unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core)
    })?;
    // SAFETY: unshare only changes this (single-threaded) process's namespaces.
    check("unshare (mount, PID, IPC, UTS namespaces)", unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        )
    })?;
    // The child learns of the reaper's death from this pipe (EOF), which closes the window
    // between fork and PR_SET_PDEATHSIG.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    check("pipe2", unsafe {
        libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: both descriptors were just created and are owned here.
    let (alive_r, alive_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has a single thread (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(sys("fork")(std::io::Error::last_os_error())),
        0 => {
            drop(alive_w);
            // SAFETY: prctl sets this process's parent-death signal.
            check("PR_SET_PDEATHSIG", unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
            })?;
            if reaper_gone(&alive_r) {
                std::process::exit(1);
            }
            // Keep `alive_r` open: a later check is free, and it is close-on-exec.
            std::mem::forget(alive_r);
            STAGE.store(ENTERED, Ordering::Release);
            // Nothing mounted from now on propagates back to the host.
            // SAFETY: the arguments are valid C strings or null, as mount(2) allows.
            check("making mounts private", unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })
        }
        child => {
            drop(alive_r);
            reap(child, alive_w)
        }
    }
}

/// True if the pipe's write end (held by the reaper) is closed.
fn reaper_gone(alive: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

/// The VMM's pid, for the reaper's signal handlers.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_stop(_sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // The VMM is PID 1 of its namespace: only SIGKILL reaches it from here without a
        // handler of its own. kill(2) is async-signal-safe.
        // SAFETY: sends a signal to our own child, which we have not reaped yet (we reap it
        // only after this handler's signals are blocked, see `reap`).
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
}

/// The reaper: waits for the VMM and exits the way it did.
fn reap(child: libc::pid_t, alive: OwnedFd) -> ! {
    CHILD.store(child, Ordering::Relaxed);
    let keep = alive.as_raw_fd() as libc::c_uint;
    // Hold nothing of the VM's: only stdio and the liveness pipe.
    // SAFETY: close_range closes descriptors this process owns; none is used afterwards (the
    // Rust objects owning them live in the VMM branch, which this process never runs).
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0u32);
        libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler (it only calls kill).
        unsafe { libc::signal(sig, forward_stop as *const () as libc::sighandler_t) };
    }
    if let Ok(Some(program)) = reaper_filter() {
        // Nothing to do on failure: the reaper is as confined as the process was.
        let _ = seccompiler::apply_filter(&program);
    }
    // Wait for the VMM's end without reaping it, block the stop signals, then reap: the
    // handler never signals a pid that may have been reused.
    loop {
        // SAFETY: a zeroed siginfo is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child without reaping it; `info` is a valid out-pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                child as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(1) };
        }
    }
    // SAFETY: blocks three signals in this (single-threaded) process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut status = 0;
    // SAFETY: reaps our own child, which has ended; `status` is a valid out-pointer.
    if unsafe { libc::waitpid(child, &mut status, 0) } != child {
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(1) };
    }
    if libc::WIFSIGNALED(status) {
        // The VMM cannot say it was killed; its reaper can (to the same log), without
        // allocating (its filter has no memory calls).
        let mut line = super::seccomp::LineBuf::new();
        line.push(b"ddvmm: jail: the VMM (pid ");
        line.push_number(child);
        line.push(b") was killed by signal ");
        line.push_number(libc::WTERMSIG(status));
        line.push(b"\n");
        line.write_to_stderr();
    }
    drop(alive);
    exit_like(status)
}

/// Ends this process the way `status` says the VMM ended.
fn exit_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resets one signal to its default action, unblocks it and sends it to this
        // process; a fatal default action ends the process here (RLIMIT_CORE is 0).
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        // SAFETY: as above (reached only if the signal's default action is not fatal).
        unsafe { libc::_exit(128 + sig) };
    }
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// What the reaper calls: wait, signals, exit.
fn reaper_filter() -> Result<Option<seccompiler::BpfProgram>, seccompiler::BackendError> {
    let calls = [
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let filter = seccompiler::SeccompFilter::new(
        calls.into_iter().map(|c| (c, Vec::new())).collect(),
        seccompiler::SeccompAction::KillProcess,
        seccompiler::SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )?;
    filter.try_into().map(Some)
}

/// Step 2: empty read-only root, new network namespace, no capabilities, the VM's uid/gid,
/// `NO_NEW_PRIVS`. Call once everything the VM needs is open.
pub fn lock_down(cfg: &JailConfig) -> Result<(), JailError> {
    let root = cfg.validate()?;
    // SAFETY: mounts a fresh tmpfs on a directory of our private mount namespace; all
    // pointers are valid C strings.
    check("mounting the jail's tmpfs", unsafe {
        libc::mount(
            c"ddvmm-jail".as_ptr(),
            root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k,nr_inodes=4,mode=0555".as_ptr().cast(),
        )
    })?;
    std::env::set_current_dir(&cfg.root).map_err(sys("entering the jail root"))?;
    change_root()?;
    // SAFETY: remounts our own root read-only; nothing else is passed.
    check("making the jail root read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })?;
    // TAP descriptors keep their device; no new socket could reach anything.
    // SAFETY: unshare only changes this thread's network namespace (threads started later
    // inherit it; earlier ones cannot create sockets, their filters forbid it).
    check("unshare (network namespace)", unsafe {
        libc::unshare(libc::CLONE_NEWNET)
    })?;
    drop_bounding_set()?;
    let (uid, gid) = (cfg.uid, cfg.gid);
    // SAFETY: glibc applies each of these to every thread of the process (setxid broadcast).
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: as above.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above; with every uid non-zero the kernel clears each thread's capabilities.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: sets a flag on this thread; threads started later inherit it.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
    })?;
    // A regained uid 0 would be a bug of ours: check, do not assume.
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three ids into our variables.
    check("getresuid", unsafe {
        libc::getresuid(&mut r, &mut e, &mut s)
    })?;
    if r == 0 || e == 0 || s == 0 {
        return Err(JailError::RootIds);
    }
    STAGE.store(LOCKED, Ordering::Release);
    Ok(())
}

/// Makes the current directory (a mount point) the root, leaving nothing of the old one.
fn change_root() -> Result<(), JailError> {
    // pivot_root(".", "."): the old root ends up on top of the new one, then is detached.
    // SAFETY: both arguments are valid C strings; pivot_root only changes mounts of our own
    // namespace.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if rc == 0 {
        // SAFETY: detaches the old root (now stacked on ".") in our namespace.
        check("detaching the old root", unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        })?;
    } else {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(sys("pivot_root")(err));
        }
        // The old root is the initramfs (rootfs), which cannot be pivoted away: move our
        // tmpfs over "/" (hiding the rootfs in this namespace) and chroot into it, as
        // switch_root does. Without CAP_SYS_CHROOT and without a descriptor of a directory
        // outside, nothing leads back.
        // SAFETY: moves our own mount in our own namespace; valid C strings.
        check("moving the jail root over /", unsafe {
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        })?;
        // SAFETY: valid C string.
        check("chroot", unsafe { libc::chroot(c".".as_ptr()) })?;
    }
    std::env::set_current_dir("/").map_err(sys("chdir /"))
}

/// Empties the capability bounding set (while still privileged to do so).
fn drop_bounding_set() -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: prctl reads only its integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(sys("dropping the capability bounding set")(err));
        }
    }
    Ok(())
}

/// The pid of the VMM inside the jail whose reaper is `reaper` (from the host's view), if it
/// has been forked yet.
pub fn vmm_pid(reaper: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// The path as a C string (for `pre_exec` code that must not allocate).
pub fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}
