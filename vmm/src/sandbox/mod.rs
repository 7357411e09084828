//! Confinement of a VMM process (threat model: `docs/SECURITY.md`).
//!
//! - [`jail`]: namespaces, an empty read-only root, the VM's own uid/gid, no capabilities,
//!   `NO_NEW_PRIVS`; the reaper left outside the PID namespace.
//! - [`seccomp`]: one allow-list per thread kind; a violation is logged and kills the process.
//! - [`limits`]: the console file's cap and the rate limit on log lines a guest can cause.
//!
//! `ddvmm run` always installs the seccomp filters (`--seccomp off` to debug); it jails itself
//! when given `--jail-root` (the daemon always gives it, with a uid and gid per VM).

pub mod jail;
pub mod limits;
pub mod seccomp;
