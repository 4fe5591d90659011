//! The agent as a node service: its own HTTP endpoints (`/healthz`, `/readyz`, `/metrics` in
//! the Prometheus text format), structured logs, and the start-up check of capabilities and
//! kernel features.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::config::LogFormat;

/// Counters and gauges, written by the event loop at each tick, read by `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    /// Unix ms of the event loop's last turn (liveness).
    pub heartbeat_ms: AtomicU64,
    pub events: AtomicU64,
    pub lost_ringbuf: AtomicU64,
    pub lost_read: AtomicU64,
    pub undecodable: AtomicU64,
    pub http_malformed: AtomicU64,
    pub http_oversized: AtomicU64,
    pub http_truncated: AtomicU64,
    pub http_skipped_calls: AtomicU64,
    pub invalid_trace_headers: AtomicU64,
    pub spans_server: AtomicU64,
    pub spans_client: AtomicU64,
    pub spans_unsampled: AtomicU64,
    pub spans_kept_by_rule: AtomicU64,
    pub spans_instrumented: AtomicU64,
    pub connections_dropped: AtomicU64,
    pub connections: AtomicU64,
    pub processes: AtomicU64,
    pub processes_selected: AtomicU64,
    pub processes_ignored: AtomicU64,
    pub events_not_selected: AtomicU64,
    pub pods: AtomicU64,
    /// Shared with the exporter, once it runs.
    pub export: std::sync::OnceLock<Arc<crate::export::ExportStats>>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The event loop counts as alive when it turned within this long (it turns at least every
/// 50 ms when idle).
const LIVENESS: Duration = Duration::from_secs(10);

impl Metrics {
    pub fn beat(&self) {
        self.heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Starting (the loop has not turned yet: /readyz tells that part) or turned recently.
    pub fn alive(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        last == 0 || unix_ms().saturating_sub(last) < LIVENESS.as_millis() as u64
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        metric(
            "wirespan_ready",
            "gauge",
            "1 once the kernel programs are attached.",
            &[("", u64::from(self.ready.load(Ordering::Relaxed)))],
        );
        metric(
            "wirespan_events_total",
            "counter",
            "Socket events read from the kernel.",
            &[("", g(&self.events))],
        );
        metric(
            "wirespan_events_lost_total",
            "counter",
            "Socket events the kernel could not report.",
            &[
                ("reason=\"ring_buffer_full\"", g(&self.lost_ringbuf)),
                ("reason=\"unreadable_buffer\"", g(&self.lost_read)),
                ("reason=\"undecodable\"", g(&self.undecodable)),
            ],
        );
        metric(
            "wirespan_events_not_selected_total",
            "counter",
            "Events of processes outside the selection, dropped in the agent.",
            &[("", g(&self.events_not_selected))],
        );
        metric(
            "wirespan_http_parse_errors_total",
            "counter",
            "HTTP messages that could not be used.",
            &[
                ("kind=\"malformed\"", g(&self.http_malformed)),
                ("kind=\"oversized\"", g(&self.http_oversized)),
                ("kind=\"truncated\"", g(&self.http_truncated)),
                (
                    "kind=\"invalid_trace_header\"",
                    g(&self.invalid_trace_headers),
                ),
            ],
        );
        metric(
            "wirespan_non_http_calls_total",
            "counter",
            "Socket calls skipped because they carried no HTTP/1.x.",
            &[("", g(&self.http_skipped_calls))],
        );
        metric(
            "wirespan_spans_total",
            "counter",
            "Spans made, by kind.",
            &[
                ("kind=\"server\"", g(&self.spans_server)),
                ("kind=\"client\"", g(&self.spans_client)),
            ],
        );
        let export = self.export.get().map(|e| &**e);
        let e =
            |f: fn(&crate::export::ExportStats) -> &AtomicU64| export.map(|s| g(f(s))).unwrap_or(0);
        metric(
            "wirespan_spans_exported_total",
            "counter",
            "Spans the backend accepted.",
            &[("", e(|s| &s.exported))],
        );
        metric(
            "wirespan_spans_dropped_total",
            "counter",
            "Spans made but not exported, by reason.",
            &[
                ("reason=\"queue_full\"", e(|s| &s.dropped_queue_full)),
                ("reason=\"export_failed\"", e(|s| &s.failed)),
                ("reason=\"not_sampled\"", g(&self.spans_unsampled)),
                (
                    "reason=\"instrumented_process\"",
                    g(&self.spans_instrumented),
                ),
            ],
        );
        metric(
            "wirespan_spans_kept_by_rule_total",
            "counter",
            "Spans of unsampled traces kept because they failed or were slow.",
            &[("", g(&self.spans_kept_by_rule))],
        );
        metric(
            "wirespan_connections_dropped_total",
            "counter",
            "Connections not tracked because the table was full.",
            &[("", g(&self.connections_dropped))],
        );
        metric(
            "wirespan_connections_tracked",
            "gauge",
            "Connections tracked now.",
            &[("", g(&self.connections))],
        );
        metric(
            "wirespan_processes_tracked",
            "gauge",
            "Processes with traced connections known now.",
            &[("", g(&self.processes))],
        );
        metric(
            "wirespan_processes_selected_total",
            "counter",
            "Processes the selection decided on, by decision.",
            &[
                ("decision=\"trace\"", g(&self.processes_selected)),
                ("decision=\"ignore\"", g(&self.processes_ignored)),
            ],
        );
        metric(
            "wirespan_kubernetes_pods",
            "gauge",
            "Pods of this node known from the API server.",
            &[("", g(&self.pods))],
        );
        out
    }
}

/// Serves `/healthz` (the event loop turns), `/readyz` (probes attached) and `/metrics`.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    use axum::{Router, http::StatusCode, routing::get};
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("telemetry address {address}: {e}"))?;
    let bound = listener.local_addr()?;
    let m1 = metrics.clone();
    let m2 = metrics.clone();
    let app = Router::new()
        .route(
            "/healthz",
            get(move || async move {
                if m1.alive() {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "event loop stalled\n")
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                if m2.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "probes not attached yet\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.render(),
                )
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("telemetry endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

/// Sets up logging: `RUST_LOG` filters (default info); text or one JSON object per line.
pub fn init_logging(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write;
            let obj = json_record(
                &record.level().as_str().to_ascii_lowercase(),
                record.target(),
                &record.args().to_string(),
            );
            writeln!(buf, "{obj}")
        });
    }
    let _ = b.try_init();
}

/// RFC 3339 UTC with milliseconds, without a date crate.
fn humantime_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A line the operator must see (ready, summary, stats) whatever the log level: plain on
/// stderr, or a JSON log record with the same text.
pub fn say(format: LogFormat, line: &str) {
    match format {
        LogFormat::Text => eprintln!("{line}"),
        LogFormat::Json => eprintln!("{}", json_record("info", "wirespan", line)),
    }
}

fn json_record(level: &str, target: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "ts": humantime_rfc3339(SystemTime::now()),
        "level": level,
        "target": target,
        "message": message,
    })
}

/// Capabilities the agent uses, and what for.
const CAPABILITIES: &[(u32, &str, &str, bool)] = &[
    (
        39,
        "CAP_BPF",
        "load the eBPF programs and create their maps",
        true,
    ),
    (
        38,
        "CAP_PERFMON",
        "attach programs to tracepoints and read kernel memory",
        true,
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "read other processes' /proc entries (executable, environment, sockets)",
        false,
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "read /sys/kernel/tracing and other users' /proc files",
        false,
    ),
];
const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability set of this process.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// What is missing for tracing, each a sentence naming it. `fatal` ones stop the agent.
#[derive(Debug, Default, PartialEq)]
pub struct Check {
    pub fatal: Vec<String>,
    pub warnings: Vec<String>,
}

/// Checks capabilities (from /proc/self/status) and kernel features (under `root`, `/` in
/// production).
pub fn check_environment(status: &str, root: &Path) -> Check {
    let mut c = Check::default();
    let caps = effective_capabilities(status).unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON (and is all that kernels before 5.8 know).
    for &(bit, name, why, required) in CAPABILITIES {
        if has(bit) || has(CAP_SYS_ADMIN) && (bit == 39 || bit == 38) {
            continue;
        }
        let line = format!("missing capability {name}: needed to {why}");
        if required {
            c.fatal.push(line);
        } else {
            c.warnings.push(line);
        }
    }
    let tracefs = ["sys/kernel/tracing", "sys/kernel/debug/tracing"]
        .iter()
        .any(|p| root.join(p).join("events/syscalls").is_dir());
    if !tracefs {
        c.fatal.push(
            "tracefs is not mounted (or not readable): syscall tracepoints are under /sys/kernel/tracing; mount it with `mount -t tracefs tracefs /sys/kernel/tracing`".into(),
        );
    }
    if !root.join("sys/kernel/btf/vmlinux").exists() {
        c.fatal.push(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux): a kernel built with CONFIG_DEBUG_INFO_BTF is needed".into(),
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_named() {
        // CapEff of root: all; of a plain user: none.
        let root = check_environment("CapEff:\t000001ffffffffff\n", Path::new("/"));
        assert!(
            root.fatal.iter().all(|l| !l.contains("CAP_")),
            "{:?}",
            root.fatal
        );
        assert!(root.warnings.is_empty());
        let user = check_environment("CapEff:\t0000000000000000\n", Path::new("/nonexistent"));
        let all = user.fatal.join("\n");
        assert!(
            all.contains("CAP_BPF") && all.contains("CAP_PERFMON"),
            "{all}"
        );
        assert!(all.contains("tracefs") && all.contains("BTF"), "{all}");
        assert!(user.warnings.join("\n").contains("CAP_SYS_PTRACE"));
        // CAP_SYS_ADMIN alone (older kernels): enough for loading and attaching.
        let admin = check_environment("CapEff:\t0000000000200000\n", Path::new("/"));
        assert!(admin.fatal.iter().all(|l| !l.contains("CAP_")), "{admin:?}");
    }

    #[test]
    fn metrics_render_in_the_text_format() {
        let m = Metrics::default();
        m.events.store(12, Ordering::Relaxed);
        m.spans_server.store(3, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("# TYPE wirespan_events_total counter\nwirespan_events_total 12\n"));
        assert!(text.contains("wirespan_spans_total{kind=\"server\"} 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("wirespan_"), "{line}");
        }
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let m = Metrics::default();
        assert!(m.alive(), "starting");
        m.beat();
        assert!(m.alive());
        m.heartbeat_ms.store(unix_ms() - 11_000, Ordering::Relaxed);
        assert!(!m.alive(), "stalled for 11 s");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            humantime_rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)),
            "2026-11-18T11:06:40.123Z"
        );
        assert_eq!(humantime_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
