//! The HTTP/1.1 server (hyper) behind the API socket and the optional metrics port.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Notify;

use super::model::{
    allowed_methods, ApiError, CampaignReport, EventList, Reply, Request, Status, VmList,
    DEFAULT_SEED, MAX_BODY, METRICS_CONTENT_TYPE,
};
use crate::daemon::supervisor::Supervisor;

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Most of an oversized body read (and dropped) before the 413.
const MAX_DISCARD: usize = 1 << 20;
/// Time a client has to send a request's head, and then its body.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Metrics connections served at once; more wait in the listen backlog.
const MAX_METRICS_CONNECTIONS: usize = 8;
/// Longest a metrics connection lives (one request; a peer that never reads its reply).
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the shutdown reply gets to reach the client before the daemon starts stopping.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(100);

/// A reply on the wire.
struct Wire {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// The `Allow` header of a 405.
    allow: Option<String>,
}

impl Wire {
    fn new((status, content_type, body): (u16, &'static str, Vec<u8>)) -> Self {
        Wire {
            status,
            content_type,
            body,
            allow: None,
        }
    }
}

/// Serves one connection with `answer`, bounded in head size and head time; with
/// `keep_alive` false, one request only.
async fn connection<I, F, Fut>(io: I, keep_alive: bool, answer: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Wire> + Send + 'static,
{
    let answer = Arc::new(answer);
    let svc = service_fn(move |req| {
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(response(answer(req).await)) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(keep_alive)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "API connection");
    }
}

fn response(w: Wire) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(w.body)));
    *r.status_mut() =
        hyper::StatusCode::from_u16(w.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if !w.content_type.is_empty() {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(w.content_type));
    }
    if let Some(allow) = w.allow {
        r.headers_mut().insert(
            ALLOW,
            HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("GET")),
        );
    }
    r
}

fn error_wire(e: &ApiError, path: &str) -> Wire {
    Wire {
        allow: (e.status == Status::MethodNotAllowed)
            .then(|| allowed_methods(path))
            .flatten(),
        ..Wire::new((e.status.code(), "application/json", e.body()))
    }
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, sup: Arc<Supervisor>, shutdown: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let refusal = check_peer(&stream).err();
                if let Some(r) = &refusal {
                    tracing::warn!(refusal = %r, "API connection refused");
                }
                let (sup, shutdown) = (sup.clone(), shutdown.clone());
                // A refused peer gets its 403 and the connection ends.
                let keep_alive = refusal.is_none();
                tokio::spawn(connection(stream, keep_alive, move |req| {
                    let (sup, shutdown, refusal) = (sup.clone(), shutdown.clone(), refusal.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let answered = match refusal {
                            Some(r) => Err(ApiError::new(Status::Forbidden, r)),
                            None => answer(&sup, &shutdown, req).await,
                        };
                        match answered {
                            Ok(reply) => Wire::new(reply.to_http()),
                            Err(e) => error_wire(&e, &path),
                        }
                    }
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "API accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Admits a connection only from the daemon's own uid or root (the socket's mode, 0600, says
/// the same; this holds even if the mode is loosened).
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("permission denied: cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let uid = cred.uid();
    if uid == me || uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {uid} may not use this daemon (only uid {me} and root)"
        ))
    }
}

/// Reads the body (bounded), parses the request and carries it out in a task of its own, so
/// that a client that hangs up does not cut an operation (a stop, a campaign) short.
async fn answer(
    sup: &Arc<Supervisor>,
    shutdown: &Arc<Notify>,
    req: hyper::Request<Incoming>,
) -> Result<Reply, ApiError> {
    let (method, path) = (
        req.method().as_str().to_string(),
        req.uri().path().to_string(),
    );
    let body = tokio::time::timeout(HEAD_TIMEOUT, read_body(req.into_body()))
        .await
        .map_err(|_| ApiError::bad_request("request body not sent in time"))??;
    let request = Request::from_http(&method, &path, &body)?;
    tracing::debug!(?request, "API request");
    let (sup, shutdown) = (sup.clone(), shutdown.clone());
    tokio::spawn(async move { execute(&sup, &shutdown, request).await })
        .await
        .map_err(|e| ApiError::new(Status::Internal, format!("the request's task failed: {e}")))?
}

/// Reads a body of up to [`MAX_BODY`] bytes. A longer one is a 413, after reading on (up to
/// [`MAX_DISCARD`]) so that the client, still sending, gets the reply rather than a reset.
async fn read_body(mut body: Incoming) -> Result<Vec<u8>, ApiError> {
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            if total <= MAX_BODY {
                kept.extend_from_slice(&data);
            } else if total > MAX_DISCARD {
                break;
            }
        }
    }
    if total > MAX_BODY {
        return Err(ApiError::new(
            Status::TooLarge,
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    Ok(kept)
}

/// Carries out a parsed request.
pub async fn execute(
    sup: &Arc<Supervisor>,
    shutdown: &Arc<Notify>,
    request: Request,
) -> Result<Reply, ApiError> {
    Ok(match request {
        Request::List => Reply::Vms(VmList { vms: sup.list() }),
        Request::Stats => Reply::Stats(sup.stats()),
        Request::Events => Reply::Events(EventList {
            events: sup.events(),
            cold_boots_ms: sup.cold_boots_ms(),
        }),
        Request::Metrics => Reply::Metrics(sup.metrics_text()),
        Request::Start { vm } => {
            sup.start_vm(&vm).await?;
            Reply::Done
        }
        Request::Stop { vm } => {
            sup.stop(&vm).await?;
            Reply::Done
        }
        Request::Inject { vm, fault } => {
            sup.inject(&vm, fault.kind).await?;
            Reply::Done
        }
        Request::Campaign { vm, campaign } => {
            let interval = campaign.interval()?;
            let seed = campaign.seed.unwrap_or(DEFAULT_SEED);
            let events = sup
                .campaign(&vm, campaign.faults, &campaign.kinds, interval, seed)
                .await?;
            Reply::Campaign(CampaignReport { events })
        }
        Request::Add { vms } => {
            let names = sup.add(&vms).await?;
            let vms = sup
                .list()
                .into_iter()
                .filter(|v| names.contains(&v.name))
                .collect();
            Reply::Vms(VmList { vms })
        }
        Request::Remove { vm, remove } => {
            sup.remove(&vm, remove.force).await?;
            Reply::Done
        }
        Request::Shutdown => {
            // After the reply is on its way: a daemon without VMs stops at once.
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_REPLY_GRACE).await;
                shutdown.notify_one();
            });
            Reply::Done
        }
    })
}

/// Serves `GET /metrics` over TCP until the task is dropped: at most
/// [`MAX_METRICS_CONNECTIONS`] at once.
pub async fn serve_metrics(listener: TcpListener, sup: Arc<Supervisor>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sup = sup.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = connection(stream, false, move |req| {
                let sup = sup.clone();
                async move {
                    let text = |s: &str| s.as_bytes().to_vec();
                    match (req.method().as_str(), req.uri().path()) {
                        ("GET", "/metrics") => {
                            Wire::new((200, METRICS_CONTENT_TYPE, sup.metrics_text().into_bytes()))
                        }
                        ("GET", _) => Wire::new((404, METRICS_CONTENT_TYPE, text("not found\n"))),
                        _ => Wire {
                            allow: Some("GET".into()),
                            ..Wire::new((405, METRICS_CONTENT_TYPE, text("method not allowed\n")))
                        },
                    }
                }
            });
            let _ = tokio::time::timeout(METRICS_TIMEOUT, served).await;
        });
    }
}
