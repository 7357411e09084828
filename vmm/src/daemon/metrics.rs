//! The daemon's counters in the Prometheus text exposition format (version 0.0.4), served on
//! the API socket (`{"op":"metrics"}`) and, if `[api] metrics_listen` is set, over HTTP
//! (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::fault_log::Summary;
use super::supervisor::Supervisor;

/// Largest HTTP request head read.
const MAX_HEAD: usize = 8192;

/// Samples grouped by metric name, rendered with one `# HELP`/`# TYPE` per family.
#[derive(Debug, Default)]
pub struct Metrics {
    families: BTreeMap<String, (&'static str, String, Vec<String>)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    fn sample(&mut self, kind: &'static str, name: &str, help: &str, line: String) {
        self.families
            .entry(name.to_string())
            .or_insert_with(|| (kind, help.to_string(), Vec::new()))
            .2
            .push(line);
    }

    /// A monotonically increasing count.
    pub fn counter(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.sample("counter", name, help, format!("{name}{} {v}", labels(l)));
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.sample("gauge", name, help, format!("{name}{} {v}", labels(l)));
    }

    /// Sum, count and maximum of durations (the maximum as a separate gauge family).
    pub fn summary(&mut self, name: &str, help: &str, l: &[(&str, &str)], s: &Summary) {
        let ls = labels(l);
        self.sample("summary", name, help, format!("{name}_sum{ls} {}", s.sum));
        self.sample(
            "summary",
            name,
            help,
            format!("{name}_count{ls} {}", s.count),
        );
        let max = format!("{name}_max");
        self.gauge(&max, &format!("{help} (maximum)"), l, s.max);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, (kind, help, lines)) in &self.families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }
}

/// Connections served at once; more wait in the listen backlog.
const MAX_HTTP_CONNECTIONS: usize = 8;
/// Time a client has to send its request, and to take the reply.
const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped: at most
/// [`MAX_HTTP_CONNECTIONS`] at once, each given [`HTTP_TIMEOUT`] to ask and to read.
pub async fn serve_http(listener: TcpListener, sup: Arc<Supervisor>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let sup = sup.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(HTTP_TIMEOUT, read).await.is_err() {
                return;
            }
            let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let first = String::from_utf8_lossy(first);
            let mut parts = first.split_whitespace();
            let (status, body) = match (parts.next(), parts.next()) {
                (Some("GET"), Some("/metrics")) => ("200 OK", sup.metrics_text()),
                (Some("GET"), Some(_)) => ("404 Not Found", "not found\n".to_string()),
                _ => ("400 Bad Request", "bad request\n".to_string()),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(HTTP_TIMEOUT, stream.write_all(reply.as_bytes())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once_with_escaped_labels() {
        let mut m = Metrics::default();
        m.counter("a_total", "A", &[("vm", "x\"y")], 1.0);
        m.counter("a_total", "A", &[("vm", "z")], 2.0);
        let s = Summary {
            sum: 3.0,
            count: 2,
            max: 2.5,
        };
        m.summary("t_seconds", "T", &[], &s);
        let text = m.render();
        assert_eq!(text.matches("# TYPE a_total counter").count(), 1);
        assert!(text.contains("a_total{vm=\"x\\\"y\"} 1\n"), "{text}");
        assert!(text.contains("a_total{vm=\"z\"} 2\n"));
        assert!(text.contains("t_seconds_sum 3\nt_seconds_count 2\n"));
        assert!(text.contains("# TYPE t_seconds_max gauge\nt_seconds_max 2.5\n"));
    }
}
