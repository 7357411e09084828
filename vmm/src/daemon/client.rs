//! The API client behind `ddvmm ctl`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// Errors talking to the daemon.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No daemon at the socket.
    #[error("cannot connect to the daemon at {path}")]
    Connect {
        /// Socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("API exchange failed")]
    Io(#[source] std::io::Error),
    /// The reply is not JSON.
    #[error("daemon sent an invalid reply: {0}")]
    BadReply(String),
}

/// Sends one request and returns the reply.
pub fn call(socket: &Path, request: &serde_json::Value) -> Result<serde_json::Value, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // `stop` waits for the VM to go (bounded by the daemon's SIGKILL grace); a campaign
    // waits for every recovery it causes, bounded by the daemon's own timeouts.
    let timeout = if request["op"] == "campaign" {
        None
    } else {
        Some(Duration::from_secs(60))
    };
    s.set_read_timeout(timeout).map_err(ClientError::Io)?;
    let mut line = request.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ClientError::Io)?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(ClientError::Io)?;
    serde_json::from_str(&reply).map_err(|_| ClientError::BadReply(reply.trim().to_string()))
}
