//! The daemon's counters in the Prometheus text exposition format (version 0.0.4), served on
//! the API socket (`GET /v1/metrics`) and, if `[api] metrics_listen` is set, over TCP
//! (`GET /metrics`; both in [`super::api::server`]).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::fault_log::Summary;

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
