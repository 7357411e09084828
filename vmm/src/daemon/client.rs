//! The API client behind `ddvmm ctl`: one HTTP/1.1 exchange on the daemon's Unix socket.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use thiserror::Error;

use super::api::model::{ApiError, Op, Reply, Request};

/// Largest reply read (the event list holds up to 20,000 events).
const MAX_REPLY: usize = 64 << 20;
/// How long a request other than a campaign may take (`stop` waits for the VM to go, bounded
/// by the daemon's SIGKILL grace).
const TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The client's own runtime could not start.
    #[error("cannot start the client runtime")]
    Runtime(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("API exchange failed")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No reply in time.
    #[error("no reply from the daemon within {0:?}")]
    Timeout(Duration),
    /// The daemon refused or failed the request.
    #[error("{0}")]
    Api(#[source] ApiError),
}

/// Sends one request and returns the reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(exchange(socket, request))
}

async fn exchange(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let http = |e: Box<dyn std::error::Error + Send + Sync>| ClientError::Http(e);
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.into()))?;
    let conn = tokio::spawn(conn);
    let h = request.to_http();
    let req = hyper::Request::builder()
        .method(h.method.as_str())
        .uri(&h.path)
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(h.body.unwrap_or_default())))
        .map_err(|e| http(e.into()))?;
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        Ok::<_, ClientError>((status, body))
    };
    // A campaign waits for every recovery it causes, an add or a removal for VMM processes
    // and agents: bounded by the daemon's own timeouts.
    let (status, body) = if matches!(request.op(), Op::Campaign | Op::Add | Op::Remove) {
        exchange.await?
    } else {
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout(TIMEOUT))??
    };
    conn.abort();
    Reply::from_http(request.op(), status, &body).map_err(ClientError::Api)
}
