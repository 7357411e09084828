//! The daemon: reads the system configuration, starts driver VMs then client VMs (one VMM
//! process each), serves the API, and on SIGTERM/SIGINT or an API `shutdown` stops clients
//! first, then driver VMs.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`supervisor`]: VMM processes, their states; [`channels`]: channels and the driver VMs'
//!   channel slots; [`manage`]: adding and removing VMs at runtime.
//! - [`recovery`]: driver VM fault watching, restart (restore of a template or boot) and replay.
//! - [`detection`]: how a fault was detected; [`policy`]: backoff, restart caps, quarantine
//!   (a pure type); [`inject`]: fault injection and campaigns; [`fault_log`]: events and
//!   counters.
//! - [`metrics`]: the counters in Prometheus text format.
//! - [`api`]: the HTTP API on the Unix socket (and the metrics port); [`client`] talks it.

pub mod api;
pub mod cgroup;
pub mod channels;
pub mod client;
pub mod config;
pub mod detection;
pub mod fault_log;
pub mod inject;
pub mod manage;
pub mod metrics;
pub mod policy;
pub mod recovery;
pub mod standby;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use config::SystemConfig;
use supervisor::{Supervisor, SupervisorError};

/// Daemon start-up errors.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Another daemon serves the socket.
    #[error("API socket {0} is in use by a running daemon")]
    SocketInUse(PathBuf),
    /// The socket or state directory cannot be set up.
    #[error("{what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A VM could not be started.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_path_buf();
    move |source| DaemonError::Io { what, path, source }
}

/// Creates the state directory `dir` (mode 0700) or checks an existing one: it must be a real
/// directory (opened with `O_NOFOLLOW`), owned by this user; its mode is set to 0700.
fn private_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    if let Err(e) = builder.create(dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(io_err("cannot create state directory", dir)(e));
        }
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(io_err(
            "state directory is not a directory (or is a symlink)",
            dir,
        ))?;
    let meta = f
        .metadata()
        .map_err(io_err("cannot inspect state directory", dir))?;
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(io_err("state directory belongs to another user", dir)(
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ));
    }
    f.set_permissions(std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set the state directory's mode", dir))
}

/// Binds the API socket with mode 0600 (a umask around the bind: the socket never exists with
/// a wider mode).
fn bind_private(socket: &Path) -> Result<UnixListener, DaemonError> {
    // SAFETY: umask only swaps the process's file creation mask (restored right after).
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound.map_err(io_err("cannot bind API socket", socket))
}

/// Runs the daemon for `config_path` until shutdown.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let cfg = SystemConfig::load(config_path)?;
    let socket = cfg.socket.clone();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(DaemonError::SocketInUse(socket));
    }
    let _ = std::fs::remove_file(&socket);
    let state_dir = socket.with_extension("d");
    private_dir(&state_dir)?;
    // Absolute: VMM processes get paths under it (their jail roots) and resolve them alone.
    let state_dir = std::fs::canonicalize(&state_dir)
        .map_err(io_err("cannot resolve state directory", &state_dir))?;
    let listener = bind_private(&socket)?;
    let exe = std::env::current_exe().map_err(io_err(
        "cannot find own executable",
        Path::new("/proc/self/exe"),
    ))?;
    let sup = Supervisor::new(&cfg, exe, state_dir.clone())?;
    let shutdown = Arc::new(Notify::new());
    let api = tokio::spawn(api::server::serve(listener, sup.clone(), shutdown.clone()));
    let metrics_http = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(io_err(
                "cannot listen for metrics on",
                Path::new(&addr.to_string()),
            ))?;
            Some(tokio::spawn(api::server::serve_metrics(l, sup.clone())))
        }
        None => None,
    };
    tracing::info!(socket = %socket.display(), state = %state_dir.display(), "daemon up");
    if let Err(e) = sup.start_all() {
        tracing::error!(error = %e, "start-up failed; stopping what started");
        sup.stop_all().await;
        sup.remove_cgroups();
        api.abort();
        let _ = std::fs::remove_file(&socket);
        return Err(e.into());
    }
    sup.spawn_watchers();
    let mut term =
        signal(SignalKind::terminate()).map_err(io_err("signal handler", Path::new("SIGTERM")))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(io_err("signal handler", Path::new("SIGINT")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = shutdown.notified() => tracing::info!("shutdown requested"),
    }
    sup.stop_all().await;
    sup.remove_cgroups();
    api.abort();
    if let Some(h) = metrics_http {
        h.abort();
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("daemon stopped");
    Ok(())
}
