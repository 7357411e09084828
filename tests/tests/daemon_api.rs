//! The daemon's configuration errors and API errors: clear messages naming the problem, a
//! non-zero exit for a bad configuration, and a daemon that stays up through bad API calls.
//! No guest is needed (a configuration without VMs is valid), so these run on this machine.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddvmm_tests::ddvmm_binary;

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddvmm-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn daemon_with(config: &Path) -> std::process::Output {
    Command::new(ddvmm_binary().expect("ddvmm"))
        .args(["daemon", "--config"])
        .arg(config)
        .output()
        .expect("run daemon")
}

#[test]
fn bad_configs_name_the_key_and_exit_1() {
    let dir = tempdir("config");
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").expect("write");
    let cases = [
        ("[[driver]]\nname = \"d\"\nkernel = \"vmlinuz\"\nmemroy = \"1G\"\n", "memroy"),
        ("[[driver]]\nname = \"d\"\nkernel = \"missing\"\n", "driver[0].kernel: no such file"),
        (
            "[[client]]\nname = \"c\"\nkernel = \"vmlinuz\"\n[[client.disk]]\ndriver = \"x\"\nsize = \"1M\"\n",
            "client[0].disk[0].driver: unknown driver VM 'x'",
        ),
        (
            "[[driver]]\nname = \"d\"\nkernel = \"vmlinuz\"\n[[client]]\nname = \"d\"\nkernel = \"vmlinuz\"\n",
            "client[0].name: duplicate VM name 'd'",
        ),
        ("[[driver]]\nname = \"d\"\nkernel = \"vmlinuz\"\ncpus = 0\n", "driver[0].cpus"),
        ("this is = = not toml", "system.toml"),
    ];
    for (text, needle) in cases {
        let path = dir.join("system.toml");
        std::fs::write(&path, text).expect("write config");
        let out = daemon_with(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{text}: expected {needle:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = daemon_with(&dir.join("absent.toml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, config_text: &str) -> Self {
        let config = dir.join("system.toml");
        std::fs::write(&config, config_text).expect("config");
        let child = Command::new(ddvmm_binary().expect("ddvmm"))
            .args(["daemon", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        let socket = dir.join("system.sock");
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon { child, socket }
    }

    /// One raw HTTP/1.1 exchange (as curl would send it): the status and the body as JSON
    /// (`null` for an empty body, a string for text).
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, head, body) = http_exchange(
            &mut UnixStream::connect(&self.socket).expect("connect"),
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        let json = if status == 204 {
            serde_json::Value::Null
        } else if head
            .to_lowercase()
            .contains("content-type: application/json")
        {
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))
        } else {
            serde_json::Value::String(body)
        };
        (status, json)
    }
}

/// Sends `request` on `s`, reads to the end: status, head, body.
fn http_exchange<S: Read + Write>(s: &mut S, request: &str) -> (u16, String, String) {
    s.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    (status, head.to_string(), body.to_string())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bad_api_calls_get_errors_and_the_daemon_stays_up() {
    let dir = tempdir("api");
    // A free port for the metrics endpoint (released just before the daemon binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut d = Daemon::start(
        &dir,
        &format!("# no VMs\n[api]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let bad: [(&str, &str, &str, u16, &str); 14] = [
        ("GET", "/v1/nothing", "", 404, "no route /v1/nothing"),
        (
            "POST",
            "/v1/vms",
            "",
            405,
            "POST not allowed on /v1/vms (use GET or PUT)",
        ),
        ("GET", "/v1/vms/ghost/stop", "", 405, "use PUT"),
        ("PUT", "/v1/vms/ghost/stop", "", 404, "no VM named 'ghost'"),
        ("PUT", "/v1/vms/ghost/start", "", 404, "no VM named 'ghost'"),
        ("GET", "/v1/vms", "{\"extra\":1}", 400, "takes no body"),
        (
            "PUT",
            "/v1/vms/ghost/fault",
            "{\"kind\":\"panic\"}",
            404,
            "no VM named 'ghost'",
        ),
        (
            "PUT",
            "/v1/vms/ghost/fault",
            "{\"kind\":\"meteor\"}",
            400,
            "unknown variant `meteor`",
        ),
        ("PUT", "/v1/vms/ghost/fault", "{not json", 400, "bad body"),
        (
            "PUT",
            "/v1/vms/ghost/fault",
            "",
            400,
            "a JSON body is required",
        ),
        (
            "PUT",
            "/v1/vms/ghost/campaign",
            "{}",
            400,
            "missing field `faults`",
        ),
        (
            "PUT",
            "/v1/vms/ghost/campaign",
            "{\"faults\":1,\"min_interval_ms\":9,\"max_interval_ms\":1}",
            400,
            "min_interval_ms exceeds max_interval_ms",
        ),
        (
            "PUT",
            "/v1/vms/ghost/campaign",
            "{\"faults\":1,\"max_interval_ms\":18446744073709551615}",
            400,
            "max_interval_ms must be at most 3600000",
        ),
        (
            "PUT",
            "/v1/vms/ghost/campaign",
            "{\"faults\":1,\"colour\":\"red\"}",
            400,
            "unknown field `colour`",
        ),
    ];
    for (method, path, body, status, needle) in bad {
        let (code, r) = d.call(method, path, body);
        assert_eq!(code, status, "{method} {path} {body}: {r}");
        let err = r["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains(needle), "{method} {path} {body}: {err}");
    }
    let huge = "x".repeat(100_000);
    let (code, r) = d.call("PUT", "/v1/vms/ghost/fault", &huge);
    assert_eq!(code, 413, "{r}");
    // A request head that is garbage gets a 400 from the HTTP layer.
    let (code, _, _) = http_exchange(
        &mut UnixStream::connect(&d.socket).expect("connect"),
        "\u{1}\u{2}garbage\r\n\r\n",
    );
    assert_eq!(code, 400);
    // Still serving.
    let (code, r) = d.call("GET", "/v1/vms", "");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["vms"].as_array().map(Vec::len), Some(0));
    let (_, r) = d.call("GET", "/v1/events", "");
    assert_eq!(r["events"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(d.call("GET", "/v1/metrics", "").0, 200);
    // The metrics over TCP: 200 on /metrics, 404 elsewhere, 400 for garbage.
    let http = |request: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        http_exchange(&mut s, request)
    };
    let (code, head, _) = http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        http("GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0,
        404
    );
    assert_eq!(http("\u{1}\u{2}garbage\r\n\r\n").0, 400);
    // The CLI client reports errors with a non-zero exit.
    let out = Command::new(ddvmm_binary().expect("ddvmm"))
        .args(["ctl", "--socket"])
        .arg(&d.socket)
        .args(["stop", "ghost"])
        .output()
        .expect("ctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: no VM named 'ghost'"));
    // A second daemon on the same socket is refused, the first keeps running.
    let second = daemon_with(&dir.join("system.toml"));
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by a running daemon"));
    // Clean shutdown through the API.
    assert_eq!(d.call("PUT", "/v1/shutdown", "").0, 204);
    let start = Instant::now();
    loop {
        if let Some(status) = d.child.try_wait().expect("wait") {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!d.socket.exists(), "socket left behind");
}

/// The API socket is 0600 and the state directory 0700; another uid cannot connect through the
/// socket's mode, and with the mode loosened the daemon still refuses it (peer credentials).
/// The other-uid part needs root (to run as another uid); without it only the modes are checked.
#[test]
fn the_api_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempdir("peer");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = Daemon::start(&dir, "# no VMs\n");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket), 0o600, "API socket mode");
    assert_eq!(mode(&dir.join("system.d")), 0o700, "state directory mode");
    assert_eq!(d.call("GET", "/v1/vms", "").0, 200);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the_api_refuses_other_users: not root, other-uid part not run");
        return;
    }
    // A copy of the client that user 65534 can run.
    let ctl = dir.join("ddvmm-ctl");
    std::fs::copy(ddvmm_binary().expect("ddvmm"), &ctl).expect("copy");
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = || {
        Command::new(&ctl)
            .args(["ctl", "--socket"])
            .arg(&d.socket)
            .arg("list")
            .uid(65534)
            .gid(65534)
            .output()
            .expect("ctl as uid 65534")
    };
    let out = as_nobody();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ermission denied"), "{text}");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("permission denied: uid 65534 may not use this daemon"),
        "{text}"
    );
    // Root still gets in.
    assert_eq!(d.call("GET", "/v1/vms", "").0, 200);
}

/// The OpenAPI document (`docs/openapi.json`).
fn openapi() -> serde_json::Value {
    let path = ddvmm_tests::repo_root().join("docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// Checks `v` against an OpenAPI 3.0 schema (the subset the document uses: `$ref`, `allOf`,
/// `type`, `nullable`, `enum`, `properties`, `required`, `additionalProperties`, `items`,
/// `minimum`, `maximum`); returns the first mismatch with its JSON path.
fn check_schema(
    doc: &serde_json::Value,
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    use serde_json::Value;
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "dangling $ref {r}");
        return check_schema(doc, target, v, at);
    }
    if v.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().try_for_each(|s| check_schema(doc, s, v, at));
    }
    let fail = |what: String| Err(format!("{at}: {what} (value {v})"));
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            return fail(format!("not one of {allowed:?}"));
        }
    }
    let type_ok = match schema["type"].as_str() {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_u64() || v.is_i64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(t) => panic!("schema type {t} not handled"),
    };
    if !type_ok {
        return fail(format!("not of type {}", schema["type"]));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if n < min {
            return fail(format!("below {min}"));
        }
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), v.as_f64()) {
        if n > max {
            return fail(format!("above {max}"));
        }
    }
    if let Value::Object(map) = v {
        let props = schema["properties"].as_object();
        for req in schema["required"].as_array().into_iter().flatten() {
            let req = req.as_str().unwrap_or_default();
            if !map.contains_key(req) {
                return fail(format!("lacks required '{req}'"));
            }
        }
        for (k, item) in map {
            match (
                props.and_then(|p| p.get(k)),
                &schema["additionalProperties"],
            ) {
                (Some(s), _) => check_schema(doc, s, item, &format!("{at}.{k}"))?,
                (None, Value::Bool(false)) => return fail(format!("undocumented property '{k}'")),
                (None, extra) if extra.is_object() => {
                    check_schema(doc, extra, item, &format!("{at}.{k}"))?
                }
                (None, _) => {}
            }
        }
    }
    if let Value::Array(items) = v {
        for (i, item) in items.iter().enumerate() {
            check_schema(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The OpenAPI document describes exactly the server's routes, and its request and reply
/// schemas match what the server accepts and sends: typed samples of every body (every field
/// set), the documented examples sent to a live daemon, and the live daemon's replies (a VM
/// that failed to start included) checked against the document.
#[test]
fn the_openapi_document_matches_the_server() {
    use ddvmm::control::FaultKind;
    use ddvmm::daemon::api::model::{
        CampaignRequest, EventList, FaultRequest, Method, RemoveRequest, Request, VmList, ROUTES,
    };
    use ddvmm::daemon::detection::Detection;
    use ddvmm::daemon::fault_log::{FaultEvent, RecoverySteps};
    let doc = openapi();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    // Routes: the same (method, path) pairs.
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: std::collections::BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served, "documented routes vs the server's");
    let schema_of =
        |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    let op = |method: Method, path: &str| &doc["paths"][path][method.as_str().to_lowercase()];
    // Request bodies: documented for exactly the routes that take one, with the types' fields.
    let samples = [
        Request::Inject {
            vm: "d".into(),
            fault: FaultRequest {
                kind: FaultKind::TripleFault,
            },
        },
        Request::Campaign {
            vm: "d".into(),
            campaign: CampaignRequest {
                faults: 2,
                kinds: vec![FaultKind::Panic, FaultKind::BadIndex],
                min_interval_ms: 1,
                max_interval_ms: Some(3),
                seed: Some(9),
            },
        },
        Request::Add {
            vms: serde_json::from_value(serde_json::json!({
                "driver": [{
                    "name": "d2", "kernel": "/k", "initrd": "/i", "cmdline": "quiet",
                    "memory": "256M", "cpus": 1, "console": "/c", "console_limit": "1M",
                    "limits": {"memory": "1G", "cpus": 1.5, "pids": 64},
                    "disks": ["/d.img"], "disk_limits": {"iops": 100, "bandwidth": "1M"},
                    "passthrough": ["0000:01:00.0"], "taps": ["t0"], "disk": [], "net": [],
                    "spare_channels": 4
                }],
                "client": [{
                    "name": "c2", "kernel": "/k",
                    "disk": [{"driver": "d2", "device": "/dev/vda", "offset": "0M",
                              "size": "8M", "read_only": true, "weight": 5, "iops": 10,
                              "bandwidth": "1M"}],
                    "net": [{"driver": "d2", "mac": "52:54:00:00:00:01", "uplink": "eth0"}]
                }]
            }))
            .expect("typed NewVms"),
        },
        Request::Remove {
            vm: "d".into(),
            remove: RemoveRequest { force: true },
        },
    ];
    for r in &ROUTES {
        let body = &op(r.method, r.path)["requestBody"];
        let sample = samples.iter().find(|s| s.op() == r.op);
        assert_eq!(body.is_object(), sample.is_some(), "{} requestBody", r.path);
        let Some(sample) = sample else { continue };
        let content = &body["content"]["application/json"];
        let h = sample.to_http();
        let value: serde_json::Value =
            serde_json::from_slice(h.body.as_deref().unwrap_or_default()).expect("sample body");
        check_schema(&doc, &content["schema"], &value, r.path).unwrap_or_else(|e| panic!("{e}"));
        let props = doc["components"]["schemas"][content["schema"]["$ref"]
            .as_str()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()]["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect::<Vec<_>>());
        let fields = value
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            props, fields,
            "{}: documented body properties vs the type's",
            r.path
        );
        // The documented example parses as this route's request.
        let example = serde_json::to_vec(&content["example"]).expect("example");
        let parsed = Request::from_http("PUT", &h.path, &example)
            .unwrap_or_else(|e| panic!("{}: the example is refused: {e}", r.path));
        assert_eq!(parsed.op(), r.op);
    }
    // Live: every route answers with a documented status and a body that fits the document.
    let dir = tempdir("openapi");
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").expect("kernel");
    let d = Daemon::start(
        &dir,
        "[[client]]\nname = \"c\"\nkernel = \"vmlinuz\"\nmemory = \"64M\"\n",
    );
    // The VM fails to start (no kernel): wait until the daemon saw it exit.
    let start = Instant::now();
    let list = loop {
        let (code, list) = d.call("GET", "/v1/vms", "");
        assert_eq!(code, 200, "{list}");
        if list["vms"][0]["state"] == "exited" {
            break list;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(list["vms"][0]["last_exit"].is_string(), "{list}");
    serde_json::from_value::<VmList>(list).expect("typed VmList");
    let added = format!(
        r#"{{"client":[{{"name":"c2","kernel":"{}","memory":"64M"}}]}}"#,
        dir.join("vmlinuz").display()
    );
    let driver = format!(
        r#"{{"driver":[{{"name":"d2","kernel":"{}","memory":"64M","spare_channels":3}}]}}"#,
        dir.join("vmlinuz").display()
    );
    let checks: [(Method, &str, &str, &str); 15] = [
        (Method::Get, "/v1/vms", "/v1/vms", ""),
        (Method::Put, "/v1/vms", "/v1/vms", &added),
        (Method::Put, "/v1/vms", "/v1/vms", &added),
        (Method::Put, "/v1/vms/{vm}/remove", "/v1/vms/c2/remove", ""),
        (
            Method::Put,
            "/v1/vms/{vm}/remove",
            "/v1/vms/c2/remove",
            "{\"force\":true}",
        ),
        (Method::Put, "/v1/vms", "/v1/vms", &driver),
        (Method::Put, "/v1/vms/{vm}/remove", "/v1/vms/d2/remove", ""),
        (Method::Get, "/v1/stats", "/v1/stats", ""),
        (Method::Get, "/v1/events", "/v1/events", ""),
        (Method::Get, "/v1/metrics", "/v1/metrics", ""),
        (Method::Put, "/v1/vms/{vm}/stop", "/v1/vms/c/stop", ""),
        (Method::Put, "/v1/vms/{vm}/start", "/v1/vms/ghost/start", ""),
        (
            Method::Put,
            "/v1/vms/{vm}/fault",
            "/v1/vms/c/fault",
            "{\"kind\":\"hang\"}",
        ),
        (
            Method::Put,
            "/v1/vms/{vm}/campaign",
            "/v1/vms/ghost/campaign",
            "{\"faults\":1}",
        ),
        (Method::Put, "/v1/shutdown", "/v1/shutdown", ""),
    ];
    let mut codes = Vec::new();
    for (method, route, path, body) in checks {
        let (code, reply) = d.call(method.as_str(), path, body);
        codes.push(code);
        let mut documented = &op(method, route)["responses"][code.to_string()];
        if let Some(r) = documented["$ref"].as_str() {
            let name = r.trim_start_matches("#/components/responses/");
            documented = &doc["components"]["responses"][name];
        }
        assert!(
            documented.is_object(),
            "{path}: status {code} not documented ({reply})"
        );
        let schema = &documented["content"]
            .as_object()
            .and_then(|c| c.values().next())
            .map(|c| c["schema"].clone())
            .unwrap_or(serde_json::Value::Null);
        if code == 204 {
            assert!(reply.is_null(), "{path}: 204 with a body {reply}");
        } else {
            check_schema(&doc, schema, &reply, path).unwrap_or_else(|e| panic!("{e}"));
        }
        if code >= 400 {
            assert_eq!(schema, &schema_of("Error"), "{path}");
        }
    }
    // Added (its kernel is no kernel: it fails to start), added twice (the configuration's
    // duplicate name), removed, removed twice.
    // A driver VM (no clients: removed without force).
    assert_eq!(codes[1..7], [200, 400, 204, 404, 200, 204], "{codes:?}");
    // An event with every field set, as the server renders it, fits the document.
    let event = FaultEvent {
        driver: "storage".into(),
        injected: Some(FaultKind::Reset),
        detected_by: Detection::Reset,
        channel: Some("c/disk0".into()),
        detected_at_ms: 1,
        detect_ms: Some(2.5),
        outage_ms: Some(3.5),
        boot_ms: None,
        steps: Some(RecoverySteps {
            serve_ms: Some(1.0),
            ..RecoverySteps::default()
        }),
        replayed: 4,
        poisoned: 0,
        restart: "restore".into(),
        standby: true,
        fallback: Some("no template".into()),
        outcome: "restarted".into(),
    };
    let list = serde_json::to_value(EventList {
        events: vec![event],
        cold_boots_ms: vec![11.5],
    })
    .expect("serialise");
    check_schema(&doc, &schema_of("EventList"), &list, "events").unwrap_or_else(|e| panic!("{e}"));
}
