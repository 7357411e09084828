//! The daemon's configuration errors and API errors: clear messages naming the problem, a
//! non-zero exit for a bad configuration, and a daemon that stays up through bad API calls.
//! No guest is needed (a configuration without VMs is valid), so these run on this machine.

use std::io::{BufRead, BufReader, Write};
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

    fn call(&self, line: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(line.as_bytes()).expect("send");
        s.write_all(b"\n").expect("send");
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).expect("reply");
        serde_json::from_str(&reply).unwrap_or_else(|_| panic!("not JSON: {reply}"))
    }
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
    let bad = [
        ("{not json", "bad request"),
        (
            "{\"op\":\"reboot-the-world\"}",
            "unknown op 'reboot-the-world'",
        ),
        ("{\"op\":\"stop\"}", "'stop' needs \\\"vm\\\""),
        ("{\"op\":\"stop\",\"vm\":\"ghost\"}", "no VM named 'ghost'"),
        ("{\"op\":\"start\",\"vm\":\"ghost\"}", "no VM named 'ghost'"),
        ("{\"op\":\"list\",\"extra\":1}", "unknown field"),
        (
            "{\"op\":\"inject\",\"vm\":\"ghost\",\"fault\":\"panic\"}",
            "no VM named 'ghost'",
        ),
        (
            "{\"op\":\"inject\",\"vm\":\"ghost\",\"fault\":\"meteor\"}",
            "unknown fault 'meteor'",
        ),
        ("{\"op\":\"inject\",\"vm\":\"ghost\"}", "'inject' needs \\\"fault\\\""),
        (
            "{\"op\":\"campaign\",\"vm\":\"ghost\"}",
            "'campaign' needs \\\"faults\\\"",
        ),
        (
            "{\"op\":\"campaign\",\"vm\":\"ghost\",\"faults\":1,\"min_interval_ms\":9,\"max_interval_ms\":1}",
            "min_interval_ms exceeds max_interval_ms",
        ),
        (
            "{\"op\":\"campaign\",\"vm\":\"ghost\",\"faults\":1,\"max_interval_ms\":18446744073709551615}",
            "max_interval_ms must be at most 3600000",
        ),
    ];
    for (req, needle) in bad {
        let r = d.call(req);
        assert_eq!(r["ok"], false, "{req}: {r}");
        let err = r["error"].as_str().unwrap_or_default().to_string();
        assert!(
            err.contains(needle.replace("\\\"", "\"").as_str()),
            "{req}: {err}"
        );
    }
    let huge = "x".repeat(100_000);
    assert_eq!(d.call(&huge)["ok"], false);
    // Still serving.
    let r = d.call("{\"op\":\"list\"}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["vms"].as_array().map(Vec::len), Some(0));
    let r = d.call("{\"op\":\"events\"}");
    assert_eq!(r["events"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(d.call("{\"op\":\"metrics\"}")["ok"], true);
    // The metrics over HTTP: 200 on /metrics, 404 elsewhere, 400 for garbage.
    let http = |request: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut s, &mut reply).expect("reply");
        reply
    };
    let ok = http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("Content-Type: text/plain; version=0.0.4"),
        "{ok}"
    );
    assert!(http("GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http("\u{1}\u{2}garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    // The CLI client reports errors with a non-zero exit.
    let out = Command::new(ddvmm_binary().expect("ddvmm"))
        .args(["ctl", "--socket"])
        .arg(&d.socket)
        .args(["stop", "ghost"])
        .output()
        .expect("ctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no VM named 'ghost'"));
    // A second daemon on the same socket is refused, the first keeps running.
    let second = daemon_with(&dir.join("system.toml"));
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by a running daemon"));
    // Clean shutdown through the API.
    assert_eq!(d.call("{\"op\":\"shutdown\"}")["ok"], true);
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
    assert_eq!(d.call("{\"op\":\"list\"}")["ok"], true);
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
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("permission denied: uid 65534 may not use this daemon"),
        "{text}"
    );
    // Root still gets in.
    assert_eq!(d.call("{\"op\":\"list\"}")["ok"], true);
}
