//! Seccomp filters per thread kind.
//!
//! Every thread of a VMM installs the filter of its kind when it starts ([`spawn`]); the main
//! thread installs its own once the VM is built and the process is jailed. A filter lists the
//! system calls the kind makes (read off the code and checked by running every test with
//! `--seccomp log`); anything else traps: a `SIGSYS` handler writes one line naming the thread
//! and the call, and the process dies of `SIGSYS`, which the daemon counts as a `seccomp` fault.
//!
//! Filters stack: a thread started by another keeps its parent's filter under its own. So the
//! filter of a kind that starts threads (the main thread starts vCPUs, a vCPU activates devices
//! and so starts their queue threads) also allows what those threads need
//! ([`ThreadKind::starts`]); a queue thread itself is held to its own list.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use thiserror::Error;

/// Seccomp errors.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The filter of a thread kind does not compile (a bug in the lists).
    #[error("seccomp filter for {kind} threads")]
    Build {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of {kind} threads")]
    Apply {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The `SIGSYS` handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// What a filter does with a call that is not on its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process (after one log line): the default of `ddvmm run`.
    Enforce,
    /// Allow the call and let the kernel log it (audit type 1326): for building allow-lists.
    Log,
    /// No filter.
    Off,
}

/// The kinds of thread a VMM runs; each has its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The thread that builds the VM, starts the vCPUs and waits for the guest's exit.
    Main,
    /// A vCPU: `KVM_RUN` and the emulated devices' register accesses.
    Vcpu,
    /// A ring frontend's worker (`ring-blk`, `ring-net`).
    RingWorker,
    /// A file-backed virtio-blk queue thread.
    BlockQueue,
    /// One of a virtio-blk queue's I/O threads.
    BlockIo,
    /// A TAP-backed virtio-net queue thread.
    NetQueue,
    /// The daemon's control connection.
    Control,
    /// The stats page publisher.
    Stats,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::RingWorker,
        ThreadKind::BlockQueue,
        ThreadKind::BlockIo,
        ThreadKind::NetQueue,
        ThreadKind::Control,
        ThreadKind::Stats,
    ];

    /// Short name, as in log lines.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::RingWorker => "ring worker",
            ThreadKind::BlockQueue => "virtio-blk queue",
            ThreadKind::BlockIo => "virtio-blk I/O",
            ThreadKind::NetQueue => "virtio-net queue",
            ThreadKind::Control => "control",
            ThreadKind::Stats => "stats",
        }
    }

    /// The kinds of thread this kind starts after it is confined.
    pub fn starts(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Main => &[ThreadKind::Vcpu],
            // Device activation happens on the vCPU that writes DRIVER_OK.
            ThreadKind::Vcpu => &[ThreadKind::BlockQueue, ThreadKind::NetQueue],
            ThreadKind::BlockQueue => &[ThreadKind::BlockIo],
            _ => &[],
        }
    }

    /// The system calls of this kind itself (beyond [`BASE`]).
    fn own(self) -> &'static [Call] {
        use Call::*;
        match self {
            ThreadKind::Main => &[
                // The vCPU kick signal handler; dropping the VM (memory slots, irqfds, VFIO
                // DMA mappings); the last resident-memory report reads a descriptor opened
                // before the jail.
                Plain(libc::SYS_rt_sigaction),
                Ioctl,
                Plain(libc::SYS_pread64),
                // Writing a snapshot through descriptors opened before the jail: guest RAM is
                // copied sparse (SEEK_DATA/SEEK_HOLE), the files emptied first, the memory
                // file's id drawn from the kernel's RNG.
                Plain(libc::SYS_pwrite64),
                Plain(libc::SYS_lseek),
                Plain(libc::SYS_ftruncate),
                Plain(libc::SYS_getrandom),
            ],
            ThreadKind::Vcpu => &[
                Ioctl,
                // VFIO config space and BAR regions that are not mapped.
                Plain(libc::SYS_pread64),
                Plain(libc::SYS_pwrite64),
                Plain(libc::SYS_writev),
                // Device activation and reset: eventfds, epoll sets, duplicated descriptors.
                Plain(libc::SYS_eventfd2),
                Plain(libc::SYS_epoll_create1),
                Plain(libc::SYS_epoll_ctl),
                Plain(libc::SYS_fcntl),
                Plain(libc::SYS_dup),
            ],
            ThreadKind::RingWorker => &[
                Plain(libc::SYS_epoll_wait),
                Plain(libc::SYS_epoll_pwait),
                Plain(libc::SYS_epoll_ctl),
            ],
            ThreadKind::BlockQueue => &[
                Plain(libc::SYS_epoll_create1),
                Plain(libc::SYS_epoll_wait),
                Plain(libc::SYS_epoll_pwait),
                Plain(libc::SYS_epoll_ctl),
                Plain(libc::SYS_eventfd2),
                Plain(libc::SYS_fcntl),
                Plain(libc::SYS_dup),
            ],
            ThreadKind::BlockIo => &[
                Plain(libc::SYS_pread64),
                Plain(libc::SYS_pwrite64),
                Plain(libc::SYS_preadv),
                Plain(libc::SYS_pwritev),
                Plain(libc::SYS_preadv2),
                Plain(libc::SYS_pwritev2),
                Plain(libc::SYS_fdatasync),
                Plain(libc::SYS_fsync),
                Plain(libc::SYS_fallocate),
                Plain(libc::SYS_lseek),
            ],
            ThreadKind::NetQueue => &[
                Plain(libc::SYS_readv),
                Plain(libc::SYS_writev),
                Plain(libc::SYS_epoll_create1),
                Plain(libc::SYS_epoll_wait),
                Plain(libc::SYS_epoll_pwait),
                Plain(libc::SYS_epoll_ctl),
                Ioctl,
            ],
            ThreadKind::Control => &[
                Plain(libc::SYS_recvfrom),
                Plain(libc::SYS_sendto),
                Plain(libc::SYS_recvmsg),
                Plain(libc::SYS_sendmsg),
                Plain(libc::SYS_poll),
                Plain(libc::SYS_ppoll),
                Plain(libc::SYS_fcntl),
                Plain(libc::SYS_dup),
                Ioctl,
            ],
            ThreadKind::Stats => &[Plain(libc::SYS_pwrite64), Plain(libc::SYS_pread64)],
        }
    }

    /// Everything a thread of this kind may call: its own list, [`BASE`], and, for a kind that
    /// starts threads, [`SPAWN`] and the lists of what it starts.
    fn allowed(self, into: &mut Vec<Call>) {
        into.extend_from_slice(BASE);
        into.extend_from_slice(self.own());
        for child in self.starts() {
            into.extend_from_slice(SPAWN);
            child.allowed(into);
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of an allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// Any arguments.
    Plain(i64),
    /// `ioctl` with a KVM (0xAE), VFIO (';') or TUN/terminal ('T') request.
    Ioctl,
    /// `prctl` setting or reading the thread name, or setting `NO_NEW_PRIVS`.
    Prctl,
}

/// What every thread calls: memory, futexes, signals, time, its own exit, and the calls glibc
/// makes on every thread when the main thread drops its user and group ids (`setxid`).
const BASE: &[Call] = &[
    Call::Plain(libc::SYS_read),
    Call::Plain(libc::SYS_write),
    Call::Plain(libc::SYS_close),
    Call::Plain(libc::SYS_futex),
    Call::Plain(libc::SYS_mmap),
    Call::Plain(libc::SYS_munmap),
    Call::Plain(libc::SYS_mprotect),
    Call::Plain(libc::SYS_mremap),
    Call::Plain(libc::SYS_madvise),
    Call::Plain(libc::SYS_brk),
    Call::Plain(libc::SYS_rt_sigreturn),
    Call::Plain(libc::SYS_rt_sigprocmask),
    Call::Plain(libc::SYS_sigaltstack),
    Call::Plain(libc::SYS_exit),
    Call::Plain(libc::SYS_exit_group),
    Call::Plain(libc::SYS_restart_syscall),
    Call::Plain(libc::SYS_sched_yield),
    Call::Plain(libc::SYS_sched_getaffinity),
    Call::Plain(libc::SYS_clock_gettime),
    Call::Plain(libc::SYS_clock_nanosleep),
    Call::Plain(libc::SYS_nanosleep),
    Call::Plain(libc::SYS_gettid),
    Call::Plain(libc::SYS_getpid),
    Call::Plain(libc::SYS_tgkill),
    Call::Plain(libc::SYS_getrandom),
    Call::Plain(libc::SYS_fstat),
    Call::Plain(libc::SYS_newfstatat),
    Call::Plain(libc::SYS_statx),
    Call::Plain(libc::SYS_setresuid),
    Call::Plain(libc::SYS_setresgid),
    Call::Plain(libc::SYS_setgroups),
    Call::Prctl,
];

/// What starting a thread takes (the new thread then installs its own filter).
const SPAWN: &[Call] = &[
    Call::Plain(libc::SYS_clone),
    Call::Plain(libc::SYS_clone3),
    Call::Plain(libc::SYS_set_robust_list),
    Call::Plain(libc::SYS_rseq),
    Call::Plain(libc::SYS_seccomp),
];

fn ioctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    // The ioctl "type" byte (bits 8-15 of the request): KVM, VFIO, TUN and terminal requests
    // (FIONBIO, FIOCLEX are terminal-type).
    [0xAEu64, b';' as u64, b'T' as u64]
        .into_iter()
        .map(|ty| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                ty << 8,
            )?])
        })
        .collect()
}

fn prctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ]
    .into_iter()
    .map(|op| {
        SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            op as u64,
        )?])
    })
    .collect()
}

/// Compiles the filter of `kind` for `mode` (`None` when the mode is `Off`).
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut calls = Vec::new();
    kind.allowed(&mut calls);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in calls {
        let (nr, r) = match call {
            Call::Plain(nr) => (nr, Vec::new()),
            Call::Ioctl => (libc::SYS_ioctl, ioctl_rules().map_err(build)?),
            Call::Prctl => (libc::SYS_prctl, prctl_rules().map_err(build)?),
        };
        rules.insert(nr, r);
    }
    // Trapping `rt_sigreturn` would loop; it is in BASE, but make that a checked fact.
    debug_assert!(rules.contains_key(&libc::SYS_rt_sigreturn));
    let filter = SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map(Some).map_err(build)
}

/// The mode and the compiled filters of this process, set once by [`enable`].
struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the `SIGSYS` line (read in a signal handler: a const-initialized
    /// `Cell` of a `'static` string is plain thread-local memory, no lazy init, no destructor).
    static KIND: Cell<&'static str> = const { Cell::new("unconfined") };
}

/// Compiles every kind's filter for `mode` and installs the `SIGSYS` handler. Until this is
/// called (tests, the daemon), [`confine`] does nothing.
pub fn enable(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        if let Some(p) = compile(kind, mode)? {
            programs.insert(kind, p);
        }
    }
    if mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    let _ = FILTERS.set(Filters { mode, programs });
    Ok(())
}

/// The mode [`enable`] set (`Off` when it was not called).
pub fn mode() -> SeccompMode {
    FILTERS.get().map_or(SeccompMode::Off, |f| f.mode)
}

/// Installs `kind`'s filter on the calling thread (and sets its `NO_NEW_PRIVS`).
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(program) = FILTERS.get().and_then(|f| f.programs.get(&kind)) else {
        return Ok(());
    };
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
        kind: kind.name(),
        source,
    })
}

/// Starts thread `name` of kind `kind`: it installs its filter before running `body`. A thread
/// that cannot be confined does not run: the process aborts with a log line (the filter of a
/// kind either installs everywhere or nowhere, so this is a broken host, not a guest's doing).
pub fn spawn<T: Send + 'static>(
    kind: ThreadKind,
    name: impl Into<String>,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    // The spawner waits until the new thread has dropped its own bounding set: otherwise the
    // jail's lock-down could take the capability that needs (CAP_SETPCAP) away first, and the
    // thread would abort (seen: a restored VMM locks down within milliseconds of starting its
    // stats thread).
    let (early_done, early_wait) = std::sync::mpsc::sync_channel::<()>(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let early = super::jail::confine_early_thread();
            let _ = early_done.send(());
            if let Err(e) = early {
                tracing::error!(error = %e, "thread cannot drop its capabilities; aborting");
                std::process::abort();
            }
            if let Err(e) = confine(kind) {
                tracing::error!(error = %e, "thread cannot be confined; aborting");
                std::process::abort();
            }
            body()
        })?;
    // An error means the thread ended before sending: it aborted the process already.
    let _ = early_wait.recv();
    Ok(handle)
}

/// Installs the handler that reports a trapped call and then lets `SIGSYS` kill the process.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value that is filled in
    // before use.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    // SA_RESETHAND: the handler runs once, then SIGSYS is back to its default (terminate).
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: installs a handler for SIGSYS, which nothing else in the process uses; the
    // handler only calls async-signal-safe functions.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A system call number that no filter allows (and no kernel has): the handler's second trap.
const NO_SUCH_CALL: libc::c_long = 999;

/// Writes `ddvmm: seccomp: <kind> thread made forbidden system call <nr>; the VMM dies` to
/// stderr, then traps again: the kernel forces a trap's `SIGSYS` on a thread that blocks it
/// (it does while this handler runs) with the default action, now restored (`SA_RESETHAND`),
/// and a forced default signal kills even the init of a PID namespace, which the jailed VMM
/// is (a `SIGSYS` it sent itself would be ignored there). The process ends killed by `SIGSYS`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The `_sigsys` member of siginfo: after signo, errno, code (3 ints, padded to 16 bytes),
    // a pointer (call address), then the int system call number.
    const SYSCALL_OFFSET: usize = 16 + 8;
    let call_addr = if info.is_null() {
        0
    } else {
        // SAFETY: as below; the call address is the first field of `_sigsys` (offset 16).
        unsafe { std::ptr::read(info.cast::<u8>().add(16).cast::<usize>()) }
    };
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for SA_SIGINFO handlers; the
        // offset is within it and suitably aligned for an i32.
        unsafe { std::ptr::read(info.cast::<u8>().add(SYSCALL_OFFSET).cast::<i32>()) }
    };
    let kind = KIND.with(|k| k.get());
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let comm_len = comm.iter().position(|b| *b == 0).unwrap_or(16);
    let mut line = LineBuf::new();
    line.push(b"ddvmm: seccomp: ");
    line.push(kind.as_bytes());
    line.push(b" thread '");
    line.push(&comm[..comm_len]);
    line.push(b"' made forbidden system call ");
    line.push_number(nr);
    line.push(b" at ");
    line.push_hex(call_addr as u64);
    line.push(b"; the VMM dies (SIGSYS)\n");
    line.write_to_stderr();
    // SAFETY: syscall(2) is async-signal-safe; the unknown call has no effect but the trap
    // (ENOSYS without a filter).
    unsafe {
        libc::syscall(NO_SUCH_CALL);
        // Not reached under a filter; without one (never the case here), end the same way.
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// A fixed buffer for a line built where nothing may allocate (a signal handler, the reaper
/// under its filter).
pub(crate) struct LineBuf {
    buf: [u8; 160],
    len: usize,
}

impl LineBuf {
    pub(crate) fn new() -> Self {
        LineBuf {
            buf: [0; 160],
            len: 0,
        }
    }

    /// Writes the line to stderr (one write(2), async-signal-safe).
    pub(crate) fn write_to_stderr(&self) {
        // SAFETY: write(2) reads `len` initialized bytes of our buffer.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub(crate) fn push_hex(&mut self, v: u64) {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        for i in 0..16 {
            let nibble = ((v >> ((15 - i) * 4)) & 0xf) as u8;
            digits[2 + i] = if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            };
        }
        self.push(&digits);
    }

    pub(crate) fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for kind in ThreadKind::ALL {
            assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let p = compile(kind, mode).unwrap().unwrap();
                assert!(!p.is_empty(), "{kind}");
            }
        }
    }

    #[test]
    fn a_starter_allows_what_it_starts() {
        fn set(kind: ThreadKind) -> Vec<Call> {
            let mut v = Vec::new();
            kind.allowed(&mut v);
            v
        }
        let main = set(ThreadKind::Main);
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::BlockQueue,
            ThreadKind::BlockIo,
            ThreadKind::NetQueue,
        ] {
            for call in set(kind) {
                assert!(main.contains(&call), "main lacks {call:?} of {kind}");
            }
        }
        // A leaf keeps its own list: no thread creation, no file I/O in a ring worker.
        let ring = set(ThreadKind::RingWorker);
        assert!(!ring.contains(&Call::Plain(libc::SYS_clone3)));
        assert!(!ring.contains(&Call::Plain(libc::SYS_pwrite64)));
        assert!(!set(ThreadKind::Vcpu).contains(&Call::Plain(libc::SYS_openat)));
        // The SIGSYS handler's second trap must trap in every kind.
        for kind in ThreadKind::ALL {
            assert!(!set(kind).contains(&Call::Plain(NO_SUCH_CALL)), "{kind}");
        }
    }

    #[test]
    fn line_buffer_formats_numbers_and_truncates() {
        let mut l = LineBuf::new();
        l.push_number(0);
        l.push(b" ");
        l.push_number(-101);
        l.push(b" ");
        l.push_number(i32::MAX);
        assert_eq!(&l.buf[..l.len], b"0 -101 2147483647");
        l.push(&[b'x'; 400]);
        assert_eq!(l.len, 160);
    }
}
