//! The API's requests, replies and routes: one set of types for the daemon (which parses
//! requests and renders replies) and `ddvmm ctl` (which renders requests and parses replies).
//! `docs/openapi.json` describes the same routes and bodies; a test checks it against the
//! running server.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::control::FaultKind;
use crate::daemon::config::NewVms;
use crate::daemon::fault_log::FaultEvent;
use crate::daemon::supervisor::{SupervisorError, VmInfo};

/// Largest request body (JSON) the server reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest pause between two campaign faults (an hour).
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// A campaign's longest pause when the request names none (at least its shortest).
pub const DEFAULT_MAX_INTERVAL_MS: u64 = 2000;
/// A campaign's seed when the request names none.
pub const DEFAULT_SEED: u64 = 0x5eed;
/// Content type of the metrics text (Prometheus exposition format).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads; no body.
    Get,
    /// Actions (idempotent in effect: starting a running VM is refused, not repeated).
    Put,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "GET" => Some(Method::Get),
            "PUT" => Some(Method::Put),
            _ => None,
        }
    }
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// VMs and their states.
    List,
    /// Per-VM device and channel counters.
    Stats,
    /// Start a stopped VM.
    Start,
    /// Stop a running VM.
    Stop,
    /// Stop every VM and end the daemon.
    Shutdown,
    /// Inject a fault into a driver VM.
    Inject,
    /// Inject many faults and wait for every recovery.
    Campaign,
    /// Every fault the daemon saw.
    Events,
    /// Counters in the Prometheus text format.
    Metrics,
    /// Add VMs (and start them).
    Add,
    /// Stop and remove a VM.
    Remove,
}

/// One route: a method and a path pattern, where the segment `{vm}` is a VM's name.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path pattern.
    pub path: &'static str,
    /// What it does.
    pub op: Op,
}

const fn route(method: Method, path: &'static str, op: Op) -> Route {
    Route { method, path, op }
}

/// Every route the server answers (and the OpenAPI document describes).
pub const ROUTES: [Route; 11] = [
    route(Method::Get, "/v1/vms", Op::List),
    route(Method::Put, "/v1/vms", Op::Add),
    route(Method::Get, "/v1/stats", Op::Stats),
    route(Method::Get, "/v1/events", Op::Events),
    route(Method::Get, "/v1/metrics", Op::Metrics),
    route(Method::Put, "/v1/vms/{vm}/start", Op::Start),
    route(Method::Put, "/v1/vms/{vm}/stop", Op::Stop),
    route(Method::Put, "/v1/vms/{vm}/fault", Op::Inject),
    route(Method::Put, "/v1/vms/{vm}/campaign", Op::Campaign),
    route(Method::Put, "/v1/vms/{vm}/remove", Op::Remove),
    route(Method::Put, "/v1/shutdown", Op::Shutdown),
];

/// Body of `PUT /v1/vms/{vm}/fault`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// The fault to inject.
    pub kind: FaultKind,
}

/// Body of `PUT /v1/vms/{vm}/campaign`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    /// Number of faults.
    pub faults: u32,
    /// Kinds to draw from (empty: every kind).
    #[serde(default)]
    pub kinds: Vec<FaultKind>,
    /// Shortest pause after a recovery before the next fault.
    #[serde(default)]
    pub min_interval_ms: u64,
    /// Longest pause (default: the larger of the shortest and 2000).
    #[serde(default)]
    pub max_interval_ms: Option<u64>,
    /// Seed of the kind order and pauses.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl CampaignRequest {
    /// The pause range, checked: shortest ≤ longest ≤ an hour.
    pub fn interval(&self) -> Result<(u64, u64), ApiError> {
        let lo = self.min_interval_ms;
        let hi = self
            .max_interval_ms
            .unwrap_or(lo.max(DEFAULT_MAX_INTERVAL_MS));
        if lo > hi {
            return Err(ApiError::bad_request(
                "min_interval_ms exceeds max_interval_ms",
            ));
        }
        if hi > MAX_INTERVAL_MS {
            return Err(ApiError::bad_request(format!(
                "max_interval_ms must be at most {MAX_INTERVAL_MS}"
            )));
        }
        Ok((lo, hi))
    }
}

/// Body of `PUT /v1/vms/{vm}/remove` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    /// Also remove a driver VM that serves clients (their disks and NICs on it fail).
    #[serde(default)]
    pub force: bool,
}

/// A request, whatever its route.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `GET /v1/vms`.
    List,
    /// `GET /v1/stats`.
    Stats,
    /// `GET /v1/events`.
    Events,
    /// `GET /v1/metrics`.
    Metrics,
    /// `PUT /v1/vms/{vm}/start`.
    Start {
        /// VM.
        vm: String,
    },
    /// `PUT /v1/vms/{vm}/stop`.
    Stop {
        /// VM.
        vm: String,
    },
    /// `PUT /v1/vms/{vm}/fault`.
    Inject {
        /// Driver VM.
        vm: String,
        /// Body.
        fault: FaultRequest,
    },
    /// `PUT /v1/vms/{vm}/campaign`.
    Campaign {
        /// Driver VM.
        vm: String,
        /// Body.
        campaign: CampaignRequest,
    },
    /// `PUT /v1/shutdown`.
    Shutdown,
    /// `PUT /v1/vms`: `[[driver]]`/`[[client]]` tables as in the configuration file.
    Add {
        /// Body.
        vms: NewVms,
    },
    /// `PUT /v1/vms/{vm}/remove`.
    Remove {
        /// VM.
        vm: String,
        /// Body.
        remove: RemoveRequest,
    },
}

/// A request as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Path (VM names percent-encoded).
    pub path: String,
    /// JSON body, if the route takes one.
    pub body: Option<Vec<u8>>,
}

impl Request {
    /// What the request does.
    pub fn op(&self) -> Op {
        match self {
            Request::List => Op::List,
            Request::Stats => Op::Stats,
            Request::Events => Op::Events,
            Request::Metrics => Op::Metrics,
            Request::Start { .. } => Op::Start,
            Request::Stop { .. } => Op::Stop,
            Request::Inject { .. } => Op::Inject,
            Request::Campaign { .. } => Op::Campaign,
            Request::Shutdown => Op::Shutdown,
            Request::Add { .. } => Op::Add,
            Request::Remove { .. } => Op::Remove,
        }
    }

    /// The method, path and body that carry this request.
    pub fn to_http(&self) -> HttpRequest {
        let op = self.op();
        // Every op has exactly one route (a unit test checks).
        let r = ROUTES.iter().find(|r| r.op == op).unwrap_or(&ROUTES[0]);
        let vm = match self {
            Request::Start { vm }
            | Request::Stop { vm }
            | Request::Inject { vm, .. }
            | Request::Campaign { vm, .. }
            | Request::Remove { vm, .. } => Some(vm.as_str()),
            _ => None,
        };
        let path = match vm {
            Some(vm) => r.path.replace("{vm}", &percent_encode(vm)),
            None => r.path.to_string(),
        };
        // Serialising these plain structs cannot fail.
        let body = match self {
            Request::Inject { fault, .. } => serde_json::to_vec(fault).ok(),
            Request::Campaign { campaign, .. } => serde_json::to_vec(campaign).ok(),
            Request::Add { vms } => serde_json::to_vec(vms).ok(),
            Request::Remove { remove, .. } => serde_json::to_vec(remove).ok(),
            _ => None,
        };
        HttpRequest {
            method: r.method,
            path,
            body,
        }
    }

    /// Parses a request from its method, path (without the query) and body.
    pub fn from_http(method: &str, path: &str, body: &[u8]) -> Result<Self, ApiError> {
        let (route, vm) = match_route(path)
            .ok_or_else(|| ApiError::new(Status::NotFound, format!("no route {path}")))?;
        let matching = route
            .iter()
            .find(|r| Method::parse(method) == Some(r.method))
            .ok_or_else(|| {
                ApiError::new(
                    Status::MethodNotAllowed,
                    format!(
                        "{method} not allowed on {path} (use {})",
                        route
                            .iter()
                            .map(|r| r.method.as_str())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                )
            })?;
        let takes_body = matches!(
            matching.op,
            Op::Inject | Op::Campaign | Op::Add | Op::Remove
        );
        if !takes_body && !body.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{method} {path} takes no body"
            )));
        }
        let vm = || vm.clone().unwrap_or_default();
        Ok(match matching.op {
            Op::List => Request::List,
            Op::Stats => Request::Stats,
            Op::Events => Request::Events,
            Op::Metrics => Request::Metrics,
            Op::Shutdown => Request::Shutdown,
            Op::Start => Request::Start { vm: vm() },
            Op::Stop => Request::Stop { vm: vm() },
            Op::Inject => Request::Inject {
                vm: vm(),
                fault: json_body(body)?,
            },
            Op::Campaign => {
                let campaign: CampaignRequest = json_body(body)?;
                campaign.interval()?;
                Request::Campaign { vm: vm(), campaign }
            }
            Op::Add => Request::Add {
                vms: json_body(body)?,
            },
            Op::Remove => Request::Remove {
                vm: vm(),
                remove: if body.is_empty() {
                    RemoveRequest::default()
                } else {
                    json_body(body)?
                },
            },
        })
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad body: {e}")))
}

/// The routes whose pattern matches `path` (all with one pattern, differing in method), and
/// the VM name if the pattern has one.
fn match_route(path: &str) -> Option<(Vec<&'static Route>, Option<String>)> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut vm = None;
    let hits: Vec<&Route> = ROUTES
        .iter()
        .filter(|r| {
            let pat: Vec<&str> = r.path.split('/').collect();
            pat.len() == segs.len()
                && pat.iter().zip(&segs).all(|(p, s)| match *p {
                    "{vm}" => match percent_decode(s) {
                        Some(name) if !name.is_empty() => {
                            vm = Some(name);
                            true
                        }
                        _ => false,
                    },
                    p => p == *s,
                })
        })
        .collect();
    (!hits.is_empty()).then_some((hits, vm))
}

/// The methods `path` takes (`GET, PUT`), if it is a route.
pub fn allowed_methods(path: &str) -> Option<String> {
    match_route(path).map(|(routes, _)| {
        routes
            .iter()
            .map(|r| r.method.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` for a bad escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// Replies accept fields they do not know (a newer daemon may add some); requests do not.

/// `GET /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmList {
    /// Every VM, in configuration order.
    pub vms: Vec<VmInfo>,
}

/// `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventList {
    /// Every fault (the most recent 20,000).
    pub events: Vec<FaultEvent>,
    /// The driver VMs' cold boot times.
    pub cold_boots_ms: Vec<f64>,
}

/// `PUT /v1/vms/{vm}/campaign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignReport {
    /// The campaign's faults.
    pub events: Vec<FaultEvent>,
}

/// The body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, with its causes.
    pub error: String,
}

/// A successful reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200, [`VmList`].
    Vms(VmList),
    /// 200, per-VM counters (an object keyed by VM name; what each VMM publishes).
    Stats(serde_json::Value),
    /// 200, [`EventList`].
    Events(EventList),
    /// 200, [`CampaignReport`].
    Campaign(CampaignReport),
    /// 200, the metrics text.
    Metrics(String),
    /// 204: done, nothing to say.
    Done,
}

impl Reply {
    /// Status code, content type (empty: none) and body.
    pub fn to_http(&self) -> (u16, &'static str, Vec<u8>) {
        const JSON: &str = "application/json";
        let json = |v: Result<Vec<u8>, serde_json::Error>| match v {
            Ok(body) => (200, JSON, body),
            Err(e) => {
                let e = ApiError::new(Status::Internal, format!("cannot render the reply: {e}"));
                (e.status.code(), JSON, e.body())
            }
        };
        match self {
            Reply::Vms(v) => json(serde_json::to_vec(v)),
            Reply::Stats(v) => json(serde_json::to_vec(v)),
            Reply::Events(v) => json(serde_json::to_vec(v)),
            Reply::Campaign(v) => json(serde_json::to_vec(v)),
            Reply::Metrics(t) => (200, METRICS_CONTENT_TYPE, t.clone().into_bytes()),
            Reply::Done => (204, "", Vec::new()),
        }
    }

    /// Parses the reply to a request of kind `op` from its status and body.
    pub fn from_http(op: Op, status: u16, body: &[u8]) -> Result<Self, ApiError> {
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ErrorBody>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
            return Err(ApiError {
                status: Status::from_code(status),
                message: error,
            });
        }
        let bad = |e: serde_json::Error| {
            ApiError::new(Status::Internal, format!("invalid reply to {op:?}: {e}"))
        };
        Ok(match op {
            Op::List => Reply::Vms(serde_json::from_slice(body).map_err(bad)?),
            Op::Stats => Reply::Stats(serde_json::from_slice(body).map_err(bad)?),
            Op::Events => Reply::Events(serde_json::from_slice(body).map_err(bad)?),
            Op::Campaign => Reply::Campaign(serde_json::from_slice(body).map_err(bad)?),
            Op::Add => Reply::Vms(serde_json::from_slice(body).map_err(bad)?),
            Op::Metrics => Reply::Metrics(String::from_utf8_lossy(body).into_owned()),
            Op::Start | Op::Stop | Op::Inject | Op::Shutdown | Op::Remove => Reply::Done,
        })
    }
}

/// The status codes the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 400: the request is malformed.
    BadRequest,
    /// 403: the peer may not use the daemon.
    Forbidden,
    /// 404: no such route or VM.
    NotFound,
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 409: the VM's state does not allow it (already running, recovering, ...).
    Conflict,
    /// 413: the body is too large.
    TooLarge,
    /// 500: the daemon failed.
    Internal,
    /// 504: a wait inside the daemon ran out.
    Timeout,
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::Conflict => 409,
            Status::TooLarge => 413,
            Status::Internal => 500,
            Status::Timeout => 504,
        }
    }

    fn from_code(code: u16) -> Self {
        match code {
            400 => Status::BadRequest,
            403 => Status::Forbidden,
            404 => Status::NotFound,
            405 => Status::MethodNotAllowed,
            409 => Status::Conflict,
            413 => Status::TooLarge,
            504 => Status::Timeout,
            _ => Status::Internal,
        }
    }
}

/// A failed request: a status and a one-line message.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct ApiError {
    /// Status.
    pub status: Status,
    /// Message (with the causes, `: `-separated).
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Status::BadRequest, message)
    }

    /// The error body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: self.message.clone(),
        })
        .unwrap_or_default()
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        let status = match &e {
            SupervisorError::UnknownVm(_) => Status::NotFound,
            SupervisorError::AlreadyRunning(_)
            | SupervisorError::NotRunning(_)
            | SupervisorError::Busy(..) => Status::Conflict,
            SupervisorError::NotDriver(_) | SupervisorError::Config(_) => Status::BadRequest,
            SupervisorError::NoSlot(_) | SupervisorError::InUse(..) => Status::Conflict,
            SupervisorError::Timeout(_) => Status::Timeout,
            SupervisorError::Channel { .. }
            | SupervisorError::Control { .. }
            | SupervisorError::Spawn { .. } => Status::Internal,
        };
        ApiError::new(status, error_chain(&e))
    }
}

/// `e` and its causes, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Request> {
        vec![
            Request::List,
            Request::Stats,
            Request::Events,
            Request::Metrics,
            Request::Shutdown,
            Request::Start { vm: "web-1".into() },
            Request::Stop {
                vm: "odd name/é%".into(),
            },
            Request::Inject {
                vm: "storage".into(),
                fault: FaultRequest {
                    kind: FaultKind::TripleFault,
                },
            },
            Request::Campaign {
                vm: "storage".into(),
                campaign: CampaignRequest {
                    faults: 3,
                    kinds: vec![FaultKind::Panic, FaultKind::Kill],
                    min_interval_ms: 5,
                    max_interval_ms: Some(10),
                    seed: Some(7),
                },
            },
            Request::Add {
                vms: serde_json::from_str(
                    r#"{"client": [{"name": "c3", "kernel": "/k", "memory": "128M",
                        "disk": [{"driver": "storage", "size": "8M", "weight": 200}],
                        "net": [{"driver": "storage", "mac": "52:54:00:00:00:03"}]}]}"#,
                )
                .expect("new VMs"),
            },
            Request::Remove {
                vm: "c3".into(),
                remove: RemoveRequest { force: true },
            },
        ]
    }

    #[test]
    fn every_request_round_trips_through_its_route() {
        for r in samples() {
            let h = r.to_http();
            let body = h.body.clone().unwrap_or_default();
            let back = Request::from_http(h.method.as_str(), &h.path, &body);
            assert_eq!(back.ok().as_ref(), Some(&r), "{h:?}");
        }
    }

    #[test]
    fn a_removal_body_is_optional_and_an_addition_is_checked() {
        assert_eq!(
            Request::from_http("PUT", "/v1/vms/c3/remove", b"").ok(),
            Some(Request::Remove {
                vm: "c3".into(),
                remove: RemoveRequest { force: false }
            })
        );
        for bad in [
            &b""[..],
            b"{}x",
            br#"{"client": [{"name": "c"}]}"#,
            br#"{"vm": []}"#,
        ] {
            let e = Request::from_http("PUT", "/v1/vms", bad).expect_err("bad body");
            assert_eq!(e.status, Status::BadRequest);
        }
    }

    #[test]
    fn every_op_has_exactly_one_route() {
        for r in samples() {
            assert_eq!(ROUTES.iter().filter(|x| x.op == r.op()).count(), 1);
        }
        assert_eq!(ROUTES.len(), samples().len());
    }

    #[test]
    fn bad_requests_are_named() {
        let cases: [(&str, &str, &[u8], Status, &str); 11] = [
            ("GET", "/v2/vms", b"", Status::NotFound, "no route /v2/vms"),
            ("GET", "/v1/vms//start", b"", Status::NotFound, "no route"),
            (
                "POST",
                "/v1/vms",
                b"",
                Status::MethodNotAllowed,
                "use GET or PUT",
            ),
            (
                "GET",
                "/v1/shutdown",
                b"",
                Status::MethodNotAllowed,
                "use PUT",
            ),
            ("GET", "/v1/vms", b"{}", Status::BadRequest, "takes no body"),
            (
                "PUT",
                "/v1/vms/d/fault",
                b"",
                Status::BadRequest,
                "body is required",
            ),
            (
                "PUT",
                "/v1/vms/d/fault",
                b"{\"kind\":\"meteor\"}",
                Status::BadRequest,
                "unknown variant `meteor`",
            ),
            (
                "PUT",
                "/v1/vms/d/fault",
                b"{\"kind\":\"panic\",\"x\":1}",
                Status::BadRequest,
                "unknown field `x`",
            ),
            (
                "PUT",
                "/v1/vms/d/campaign",
                b"{}",
                Status::BadRequest,
                "missing field `faults`",
            ),
            (
                "PUT",
                "/v1/vms/d/campaign",
                b"{\"faults\":1,\"min_interval_ms\":9,\"max_interval_ms\":1}",
                Status::BadRequest,
                "min_interval_ms exceeds",
            ),
            ("PUT", "/v1/vms/%ZZ/stop", b"", Status::NotFound, "no route"),
        ];
        for (m, p, b, status, needle) in cases {
            let e = Request::from_http(m, p, b).expect_err(p);
            assert_eq!(e.status, status, "{m} {p}: {e}");
            assert!(e.message.contains(needle), "{m} {p}: {e}");
        }
    }

    #[test]
    fn error_replies_carry_status_and_message() {
        let e = ApiError::from(SupervisorError::UnknownVm("ghost".into()));
        assert_eq!(e.status.code(), 404);
        let back = Reply::from_http(Op::Stop, 404, &e.body()).expect_err("error");
        assert_eq!(back.message, "no VM named 'ghost'");
        assert_eq!(back.status, Status::NotFound);
        assert!(matches!(
            Reply::from_http(Op::Stop, 204, b""),
            Ok(Reply::Done)
        ));
    }
}
