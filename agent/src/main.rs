//! The `wirespan` command line. The work is in the library; this file only wires it up.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wirespan::{
    capture::{Capture, CaptureConfig, DecodeError, EventSink, Lost, SocketEvent},
    clock::WallClock,
    config::{Config, ExportMode, LogFormat, Overrides},
    export::{Batching, Exporter, OtlpConfig, OtlpProtocol, Outbox, Target},
    http::routes::Routes,
    identity::Pods,
    k8s,
    ops::{self, Metrics},
    print::{self, Format},
    sampling::Sampler,
    select::{Policy, Selector},
    trace::Stitcher,
};

/// Distributed tracing without code changes: eBPF capture of the HTTP traffic of running
/// processes, stitched into linked spans and exported over OTLP.
///
/// Settings come from built-in defaults, a YAML file (--config or WIRESPAN_CONFIG), the
/// environment (WIRESPAN_<SECTION>_<KEY>, and the OTEL_* variables), and these flags, each
/// overriding the one before; `wirespan config print` shows the result. With no OTLP endpoint
/// configured, recent traces are kept in memory and shown by a Jaeger UI on
/// http://127.0.0.1:16686.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Trace HTTP requests and export spans (the default when no command is given).
    Run(RunArgs),
    /// Print one line per captured socket event instead of making spans.
    Capture(CaptureArgs),
    /// Show the configuration that the same flags, environment and file give.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Print the effective configuration as YAML (a valid configuration file).
    Print(RunArgs),
}

#[derive(clap::Args, Debug, Clone, Default)]
struct SelectArgs {
    /// YAML configuration file (default: WIRESPAN_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Trace only this process (repeatable). Default: every process except wirespan.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Never trace this process (repeatable).
    #[arg(long = "exclude-pid", value_name = "PID")]
    exclude_pids: Vec<u32>,
    /// Trace only executables whose path matches this glob (repeatable; `*`, `**`, `?`).
    #[arg(long, value_name = "GLOB")]
    exe: Vec<String>,
    /// Never trace executables whose path matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude_exe: Vec<String>,
    /// Trace only processes listening on this TCP port or range, e.g. 8080 or 8000-8999
    /// (repeatable).
    #[arg(long, value_name = "PORTS")]
    port: Vec<String>,
    /// Never trace processes listening on this port or range (repeatable).
    #[arg(long, value_name = "PORTS")]
    exclude_port: Vec<String>,
    /// Trace only this container (its id, or a prefix of at least 12 hex digits; repeatable).
    #[arg(long, value_name = "ID")]
    container: Vec<String>,
    /// Never trace this container (repeatable).
    #[arg(long, value_name = "ID")]
    exclude_container: Vec<String>,
    /// Trace only processes whose cgroup path matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    cgroup: Vec<String>,
    /// Never trace processes whose cgroup path matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude_cgroup: Vec<String>,
    /// Trace only pods of this Kubernetes namespace (repeatable).
    #[arg(long, value_name = "NAMESPACE")]
    k8s_namespace: Vec<String>,
    /// Never trace pods of this namespace (repeatable).
    #[arg(long, value_name = "NAMESPACE")]
    exclude_k8s_namespace: Vec<String>,
    /// Trace only pods whose name matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    k8s_pod: Vec<String>,
    /// Never trace pods whose name matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude_k8s_pod: Vec<String>,
    /// Trace only pods with this label, key=value or key (repeatable).
    #[arg(long, value_name = "LABEL")]
    k8s_label: Vec<String>,
    /// Never trace pods with this label (repeatable).
    #[arg(long, value_name = "LABEL")]
    exclude_k8s_label: Vec<String>,
    /// Bytes copied from each read or write (the true length is always reported), max 8192.
    /// Default 4096.
    #[arg(long, value_name = "BYTES")]
    capture_bytes: Option<u32>,
    /// Kernel ring buffer memory in MiB (a power of two), split among one ring per online
    /// CPU (at least 256 KiB each). Default 4.
    #[arg(long, value_name = "MIB")]
    ring_mib: Option<u32>,
    /// Benchmark floor: attach every tracepoint with programs that return at once.
    #[arg(long, hide = true)]
    inert: bool,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    #[command(flatten)]
    select: SelectArgs,
    /// OTLP endpoint, e.g. http://collector:4318 (http/protobuf) or http://collector:4317
    /// (grpc). Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; with
    /// neither set, spans go to the embedded Jaeger UI.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP protocol. Default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL,
    /// else http/protobuf.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    otlp_protocol: Option<OtlpProtocol>,
    /// Timeout of one export request in milliseconds. Default: OTEL_EXPORTER_OTLP_TIMEOUT, else
    /// 10 s. Each batch as a whole is also bounded by OTEL_BSP_EXPORT_TIMEOUT (30 s).
    #[arg(long, value_name = "MS")]
    otlp_timeout_ms: Option<u64>,
    /// Address of the embedded Jaeger UI (used when no OTLP endpoint is configured). Default
    /// 127.0.0.1:16686.
    #[arg(long, value_name = "ADDR")]
    ui_address: Option<SocketAddr>,
    /// Traces kept in memory for the embedded UI. Default 1000.
    #[arg(long, value_name = "N")]
    ui_max_traces: Option<u32>,
    /// Do not export at all (with --log-spans: only print spans).
    #[arg(long)]
    no_export: bool,
    /// Print one line per span on standard output.
    #[arg(long)]
    log_spans: bool,
    /// Export query parameter values as they are (by default each value is `REDACTED`: queries
    /// carry tokens and personal data).
    #[arg(long)]
    keep_query_values: bool,
    /// Connections tracked at once; more are counted and ignored.
    #[arg(long, hide = true)]
    max_connections: Option<usize>,
    /// Every this many seconds, print one line of counters and table sizes on stderr.
    #[arg(long, value_name = "SECS")]
    stats_every: Option<u64>,
    /// Sampler, as OTEL_TRACES_SAMPLER: always_on, always_off, traceidratio,
    /// parentbased_always_on (default), parentbased_always_off, parentbased_traceidratio.
    #[arg(long, value_name = "SAMPLER")]
    sampler: Option<String>,
    /// Sampler argument, as OTEL_TRACES_SAMPLER_ARG (the ratio, 0 to 1).
    #[arg(long, value_name = "RATIO")]
    sampler_arg: Option<f64>,
    /// Keep error spans of traces the sampler dropped.
    #[arg(long)]
    keep_errors: bool,
    /// Keep spans at least this slow (milliseconds) of traces the sampler dropped.
    #[arg(long, value_name = "MS")]
    keep_slower_than_ms: Option<u64>,
    /// Route pattern for span names and http.route, e.g. /users/{id}/orders/{order}
    /// (repeatable; tried in order before the built-in templating).
    #[arg(long, value_name = "PATTERN")]
    route: Vec<String>,
    /// Serve /healthz, /readyz and /metrics (Prometheus) on this address, e.g. 0.0.0.0:9464.
    #[arg(long, value_name = "ADDR")]
    telemetry_address: Option<SocketAddr>,
    /// Log format: text or json (one object per line).
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Kubernetes pod metadata: auto (when in a pod), on, off.
    #[arg(long, value_name = "MODE")]
    k8s_metadata: Option<String>,
    /// The Kubernetes node whose pods are watched (default: NODE_NAME, else the host name).
    #[arg(long, value_name = "NODE")]
    node_name: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
struct CaptureArgs {
    #[command(flatten)]
    select: SelectArgs,
    /// Output format: `text` for people, `json` for tools (one object per line, full payload).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Payload bytes shown per text line.
    #[arg(long, default_value_t = 64)]
    show_bytes: usize,
}

impl SelectArgs {
    fn overrides(&self, o: &mut Overrides) {
        let list = |o: &mut Overrides, path: &'static str, v: &[String]| {
            if !v.is_empty() {
                o.push((path, serde_json::json!(v)));
            }
        };
        if !self.pids.is_empty() {
            o.push(("select.pids", serde_json::json!(self.pids)));
        }
        if !self.exclude_pids.is_empty() {
            o.push(("exclude.pids", serde_json::json!(self.exclude_pids)));
        }
        list(o, "select.exe", &self.exe);
        list(o, "exclude.exe", &self.exclude_exe);
        list(o, "select.ports", &self.port);
        list(o, "exclude.ports", &self.exclude_port);
        list(o, "select.containers", &self.container);
        list(o, "exclude.containers", &self.exclude_container);
        list(o, "select.cgroups", &self.cgroup);
        list(o, "exclude.cgroups", &self.exclude_cgroup);
        list(o, "select.k8s_namespaces", &self.k8s_namespace);
        list(o, "exclude.k8s_namespaces", &self.exclude_k8s_namespace);
        list(o, "select.k8s_pods", &self.k8s_pod);
        list(o, "exclude.k8s_pods", &self.exclude_k8s_pod);
        list(o, "select.k8s_labels", &self.k8s_label);
        list(o, "exclude.k8s_labels", &self.exclude_k8s_label);
        if let Some(v) = self.capture_bytes {
            o.push(("capture.bytes", v.into()));
        }
        if let Some(v) = self.ring_mib {
            o.push(("capture.ring_mib", v.into()));
        }
    }
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        self.select.overrides(&mut o);
        let mut opt = |path: &'static str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                o.push((path, v));
            }
        };
        let j = |v| serde_json::Value::from(v);
        opt("export.endpoint", self.otlp_endpoint.clone().map(j));
        opt(
            "export.protocol",
            self.otlp_protocol.map(|p| j(p.as_str().to_string())),
        );
        opt("export.timeout_ms", self.otlp_timeout_ms.map(Into::into));
        opt(
            "export.ui_address",
            self.ui_address.map(|a| j(a.to_string())),
        );
        opt("export.ui_max_traces", self.ui_max_traces.map(Into::into));
        opt("export.mode", self.no_export.then(|| j("none".to_string())));
        opt("telemetry.log_spans", self.log_spans.then_some(true.into()));
        opt(
            "keep_query_values",
            self.keep_query_values.then_some(true.into()),
        );
        opt(
            "capture.max_connections",
            self.max_connections.map(Into::into),
        );
        opt(
            "telemetry.stats_every_secs",
            self.stats_every.map(Into::into),
        );
        opt("sampling.sampler", self.sampler.clone().map(j));
        opt("sampling.arg", self.sampler_arg.map(Into::into));
        opt(
            "sampling.keep_errors",
            self.keep_errors.then_some(true.into()),
        );
        opt(
            "sampling.keep_slower_than_ms",
            self.keep_slower_than_ms.map(Into::into),
        );
        opt(
            "telemetry.address",
            self.telemetry_address.map(|a| j(a.to_string())),
        );
        opt(
            "telemetry.log_format",
            self.log_format
                .map(|f| j(format!("{f:?}").to_ascii_lowercase())),
        );
        opt("kubernetes.metadata", self.k8s_metadata.clone().map(j));
        opt("kubernetes.node_name", self.node_name.clone().map(j));
        if !self.route.is_empty() {
            o.push(("routes", serde_json::json!(self.route)));
        }
        o
    }
}

fn load_config(file: Option<&std::path::Path>, overrides: &Overrides) -> Config {
    match Config::load(file, &env_var, overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wirespan: configuration: {e:#}");
            std::process::exit(2);
        }
    }
}

fn main() -> anyhow::Result<()> {
    wirespan::configure_allocator();
    let cli = Cli::parse();
    let (mode, args) = match cli.command {
        Some(Command::Capture(args)) => {
            let mut o = Overrides::new();
            args.select.overrides(&mut o);
            let config = load_config(args.select.config.as_deref(), &o);
            ops::init_logging(config.telemetry.log_format);
            return runtime()?.block_on(capture(args, config));
        }
        Some(Command::Config {
            action: ConfigAction::Print(args),
        }) => {
            let config = load_config(args.select.config.as_deref(), &args.overrides());
            print!("{}", config.to_yaml());
            return Ok(());
        }
        Some(Command::Run(args)) => ("run", args),
        None => ("run", cli.run),
    };
    debug_assert_eq!(mode, "run");
    let config = load_config(args.select.config.as_deref(), &args.overrides());
    ops::init_logging(config.telemetry.log_format);
    runtime()?.block_on(run(config, args.select.inert))
}

/// Two threads: reading the kernel's events never waits for an export to be encoded and
/// sent, nor the other way round. A worker going idle gives back what its allocations freed
/// (the event loop does on its tick).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_park(wirespan::return_idle_memory_if_due)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The line that says tracing has started (tests and operators wait for it).
fn say_ready(capture: &Capture, log_format: LogFormat) {
    ops::say(
        log_format,
        &format!(
            "wirespan: ready: {} of {} syscalls traced{}",
            capture.attached.len(),
            wirespan::capture::probes::PROBES.len(),
            if capture.failures.is_empty() {
                String::new()
            } else {
                format!(" ({} probes failed, see warnings)", capture.failures.len())
            }
        ),
    );
}

/// Loads and attaches the kernel programs, or exits with one clear line.
fn start_capture(config: &Config, inert: bool) -> anyhow::Result<Capture> {
    let check = ops::check_environment(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        std::path::Path::new("/"),
    );
    for w in &check.warnings {
        log::warn!("{w}");
    }
    if !check.fatal.is_empty() {
        for f in &check.fatal {
            eprintln!("wirespan: {f}");
        }
        eprintln!(
            "wirespan: cannot capture: {} (run as root, or grant the capabilities listed in deploy/README.md)",
            check.fatal.join("; ")
        );
        std::process::exit(1);
    }
    let capture_config = CaptureConfig {
        capture_bytes: config.capture.bytes,
        // Pids are the one rule the kernel applies from the start.
        pids: config.select.pids.clone(),
        exclude_pids: config.exclude.pids.clone(),
        ring_bytes: config.capture.ring_mib * 1024 * 1024,
        inert,
    };
    let capture = match Capture::start(&capture_config) {
        Ok(c) => c,
        Err(e) => {
            // One clear line, then a non-zero exit.
            eprintln!("wirespan: cannot capture: {}", error_chain(&e));
            std::process::exit(1);
        }
    };
    wirespan::settle_allocator();
    Ok(capture)
}

/// A future that completes on SIGINT or SIGTERM.
///
/// The handlers are installed here, before the agent says it is ready, not when the future is
/// first polled: a signal that came before that poll would be lost (or, for a process started
/// with the signal ignored, as a shell's background job is, silently ignored).
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where spans go.
fn target(config: &Config) -> Target {
    let e = &config.export;
    match config.export_mode() {
        ExportMode::None => Target::Discard,
        ExportMode::Embedded => Target::Embedded {
            ui: e.ui_address,
            max_traces: e.ui_max_traces,
        },
        ExportMode::Otlp => Target::Otlp(OtlpConfig {
            protocol: match e.protocol.as_deref() {
                Some("grpc") => OtlpProtocol::Grpc,
                _ => OtlpProtocol::HttpProtobuf,
            },
            endpoint: e.endpoint.clone(),
            traces_endpoint: e.traces_endpoint.clone(),
            timeout: e.timeout_ms.map(Duration::from_millis),
        }),
    }
}

/// The pods of this node, when Kubernetes metadata is on.
fn kubernetes(config: &Config) -> anyhow::Result<Option<Arc<Pods>>> {
    let in_cluster = env_var("KUBERNETES_SERVICE_HOST").is_some();
    let on = match config.kubernetes.metadata.as_str() {
        "on" => true,
        "off" => false,
        _ => in_cluster,
    };
    if !on {
        if config.select.uses_kubernetes() || config.exclude.uses_kubernetes() {
            anyhow::bail!(
                "Kubernetes selection rules need pod metadata, which is off (kubernetes.metadata = {}, KUBERNETES_SERVICE_HOST {})",
                config.kubernetes.metadata,
                if in_cluster { "set" } else { "not set" }
            );
        }
        return Ok(None);
    }
    let node = config
        .kubernetes
        .node_name
        .clone()
        .or_else(|| env_var("NODE_NAME"))
        .unwrap_or_else(wirespan::trace::process::host_name);
    let client = match k8s::Client::in_cluster() {
        Ok(c) => c,
        // Asked for: a clear error. Guessed from the environment: tracing goes on without.
        Err(e)
            if config.kubernetes.metadata == "on"
                || config.select.uses_kubernetes()
                || config.exclude.uses_kubernetes() =>
        {
            return Err(e.context("Kubernetes metadata (needed by kubernetes.metadata = on or by Kubernetes selection rules)"));
        }
        Err(e) => {
            log::warn!("Kubernetes metadata off: {e:#}");
            return Ok(None);
        }
    };
    let pods = Arc::new(Pods::default());
    k8s::spawn_watch(client, node, pods.clone());
    Ok(Some(pods))
}

async fn run(config: Config, inert: bool) -> anyhow::Result<()> {
    let log_format = config.telemetry.log_format;
    let batching = Batching::from_env(env_var)?;
    let metrics = Arc::new(Metrics::default());
    // Served before the probes attach: /readyz answers "not yet" until they are.
    if let Some(address) = config.telemetry.address {
        let bound = ops::serve(address, metrics.clone()).await?;
        log::info!("telemetry endpoints on http://{bound} (/healthz, /readyz, /metrics)");
    }
    let pods = kubernetes(&config)?;
    // The exporter starts first: a UI address in use is reported before probes attach.
    let exporter = Exporter::start(target(&config), batching).await?;
    let _ = metrics.export.set(exporter.stats.clone());
    let mut capture = start_capture(&config, inert)?;
    let policy = Policy::new(&config.select, &config.exclude)?;
    let selector = Selector::new(
        policy,
        capture.take_pid_filter(),
        pods.clone(),
        config.select.pids.clone(),
    );
    let mut stitcher = Stitcher::new(WallClock::measure());
    stitcher.redact_query = !config.keep_query_values;
    stitcher.max_connections = config.capture.max_connections;
    stitcher.sampler = Sampler::from_config(&config.sampling)?;
    stitcher.routes = Routes::new(&config.routes)?;
    stitcher.pods = pods.clone();
    let mut tracer = Tracer {
        stitcher,
        selector,
        exporter,
        outbox: Outbox::default(),
        log_spans: config.telemetry.log_spans,
        log_format,
        out: std::io::BufWriter::new(std::io::stdout()),
        line: String::new(),
        stats_every: config.telemetry.stats_every_secs.map(Duration::from_secs),
        last_stats: std::time::Instant::now(),
        events_since_tick: 0,
        lost: Lost::default(),
        metrics: metrics.clone(),
        pods,
    };
    // Alive and ready before anyone is told so.
    tracer.publish();
    metrics.ready.store(true, Ordering::Relaxed);
    let shutdown = shutdown_signal()?;
    say_ready(&capture, log_format);
    let lost = capture.run(&mut tracer, shutdown).await?;
    // The capture is dropped: every program is detached. What was read is made into spans
    // and sent, within the 5 seconds a node agent gets to stop.
    let stopping = std::time::Instant::now();
    metrics.ready.store(false, Ordering::Relaxed);
    tracer.stitcher.flush(&mut tracer.outbox.spans);
    tracer.hand_out();
    let _ = tracer.out.flush();
    let Tracer {
        stitcher,
        exporter,
        selector,
        ..
    } = tracer;
    let stats = exporter.stats.clone();
    exporter
        .shutdown(Duration::from_millis(4500).saturating_sub(stopping.elapsed()))
        .await;
    let s = &stitcher.stats;
    ops::say(
        log_format,
        &format!(
            "wirespan: {} events; {} spans: {} exported, {} dropped (queue full), {} failed to export, {} left to the process's own instrumentation, {} not sampled, {} kept by rule; http: {} malformed, {} oversized, {} truncated heads, {} calls skipped; {} invalid trace headers; {} connections not tracked (table full), {} requests given up, {} cut off by their process exiting; selection: {} processes traced, {} ignored, {} events dropped; lost in kernel: ring buffer full {}, unreadable buffers {}",
            s.events,
            s.spans,
            stats.exported.load(Ordering::Relaxed),
            stats.dropped_queue_full.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            s.suppressed,
            s.unsampled,
            s.kept_by_rule,
            s.http.malformed,
            s.http.oversized,
            s.http.truncated,
            s.http.skipped_calls,
            s.invalid_trace_headers,
            s.connections_dropped,
            s.pending_dropped,
            s.process_exits,
            selector.stats.traced,
            selector.stats.ignored,
            selector.stats.events_dropped,
            lost.ringbuf_full,
            lost.read_failed
        ),
    );
    Ok(())
}

/// Feeds events of selected processes to the stitcher and finished spans to the exporter.
struct Tracer<W: Write> {
    stitcher: Stitcher,
    selector: Selector,
    exporter: Exporter,
    /// Spans made and not yet handed to the exporter.
    outbox: Outbox,
    log_spans: bool,
    log_format: LogFormat,
    out: W,
    line: String,
    stats_every: Option<Duration>,
    last_stats: std::time::Instant,
    events_since_tick: u32,
    /// The kernel's loss counters as of the last drain.
    lost: Lost,
    metrics: Arc<Metrics>,
    pods: Option<Arc<Pods>>,
}

impl<W: Write> Tracer<W> {
    fn hand_out(&mut self) {
        if self.outbox.spans.is_empty() {
            return;
        }
        if self.log_spans {
            for span in &self.outbox.spans {
                self.line.clear();
                print::span_line(&mut self.line, span);
                let _ = self.out.write_all(self.line.as_bytes());
            }
        }
        let group = self.outbox.take(self.exporter.group());
        self.exporter.send_all(group);
    }

    /// Time-based work of the selector and the stitcher, and the metrics' values.
    fn tick(&mut self) {
        self.selector.sweep();
        self.stitcher.tick(&mut self.outbox.spans);
        // A partial group waits a little for more (see `Outbox`).
        if self
            .exporter
            .due(&mut self.outbox, std::time::Instant::now())
        {
            self.hand_out();
        }
        self.publish();
        self.maybe_print_stats();
        wirespan::return_idle_memory_if_due();
    }

    /// Copies the counters to the metrics endpoint's atomics.
    fn publish(&self) {
        let m = &self.metrics;
        let s = &self.stitcher.stats;
        let set = |a: &std::sync::atomic::AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&m.events, s.events);
        set(&m.lost_ringbuf, self.lost.ringbuf_full);
        set(&m.lost_read, self.lost.read_failed);
        set(&m.undecodable, s.undecodable_events);
        set(&m.http_malformed, s.http.malformed);
        set(&m.http_oversized, s.http.oversized);
        set(&m.http_truncated, s.http.truncated);
        set(&m.http_skipped_calls, s.http.skipped_calls);
        set(&m.invalid_trace_headers, s.invalid_trace_headers);
        set(&m.spans_server, s.server_spans);
        set(&m.spans_client, s.spans - s.server_spans);
        set(&m.spans_unsampled, s.unsampled);
        set(&m.spans_kept_by_rule, s.kept_by_rule);
        set(&m.spans_instrumented, s.suppressed);
        set(&m.connections_dropped, s.connections_dropped);
        let [conns, procs, ..] = self.stitcher.table_sizes();
        set(&m.connections, conns as u64);
        set(&m.processes, procs as u64);
        let sel = &self.selector.stats;
        set(&m.processes_selected, sel.traced);
        set(&m.processes_ignored, sel.ignored);
        set(&m.events_not_selected, sel.events_dropped);
        set(&m.pods, self.pods.as_ref().map_or(0, |p| p.len() as u64));
        m.beat();
    }
}

impl<W: Write> EventSink for Tracer<W> {
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>) {
        match event {
            Ok(ev) => {
                if self.selector.admit(&ev) {
                    self.stitcher.event(&ev, &mut self.outbox.spans)
                }
            }
            Err(e) => {
                self.stitcher.stats.undecodable_events += 1;
                log::debug!("dropped a malformed kernel record: {e}");
            }
        }
        // Whole export batches at a time: each hand-out wakes the export task, which at
        // saturation was every 64 spans, a tenth of a microsecond of scheduler work per span
        // on both sides. Fewer go at a tick once they have waited (`Outbox`).
        if self.outbox.spans.len() >= self.exporter.batch_size() {
            self.hand_out();
        }
        // Under constant load the ring is never empty and `idle` would not run: do the
        // time-based work (forgetting old state, deferred links) every 4096 events too.
        self.events_since_tick += 1;
        if self.events_since_tick >= 4096 {
            self.events_since_tick = 0;
            self.tick();
        }
    }

    fn idle(&mut self, lost: &Lost) {
        self.lost = *lost;
        self.tick();
        let _ = self.out.flush();
    }
}

impl<W: Write> Tracer<W> {
    /// With `--stats-every`, one line of counters and table sizes when it is due.
    fn maybe_print_stats(&mut self) {
        let Some(every) = self.stats_every else {
            return;
        };
        if self.last_stats.elapsed() < every {
            return;
        }
        self.last_stats = std::time::Instant::now();
        let s = &self.stitcher.stats;
        let [conns, procs, spans, clients, threads, deferred, interned] =
            self.stitcher.table_sizes();
        let e = &self.exporter.stats;
        ops::say(
            self.log_format,
            &format!(
                "wirespan: stats: events={} spans={} exported={} dropped={} failed={} lost_ringbuf={} resynced_after_loss={} requests_given_up={} connections={conns} processes={procs} remembered_spans={spans} client_index={clients} threads={threads} deferred={deferred} interned_strings={interned} selected_processes={}",
                s.events,
                s.spans,
                e.exported.load(Ordering::Relaxed),
                e.dropped_queue_full.load(Ordering::Relaxed),
                e.failed.load(Ordering::Relaxed),
                self.lost.ringbuf_full,
                s.resynced_after_loss,
                s.pending_dropped,
                self.selector.tracked(),
            ),
        );
    }
}

async fn capture(args: CaptureArgs, config: Config) -> anyhow::Result<()> {
    let mut capture = start_capture(&config, args.select.inert)?;
    let shutdown = shutdown_signal()?;
    say_ready(&capture, config.telemetry.log_format);
    let pods = kubernetes(&config)?;
    let selector = Selector::new(
        Policy::new(&config.select, &config.exclude)?,
        capture.take_pid_filter(),
        pods,
        config.select.pids.clone(),
    );
    let clock = WallClock::measure();
    let stdout = std::io::stdout();
    let mut printer = Printer {
        out: std::io::BufWriter::with_capacity(64 * 1024, stdout.lock()),
        line: Vec::with_capacity(64 * 1024),
        clock,
        format: args.format,
        show_bytes: args.show_bytes,
        events: 0,
        decode_errors: 0,
        selector,
    };
    let lost = capture.run(&mut printer, shutdown).await?;
    let Printer {
        mut out,
        events,
        decode_errors,
        ..
    } = printer;
    let _ = out.flush();
    eprintln!(
        "wirespan: {events} events; lost in kernel: ring buffer full {}, unreadable buffers {}; malformed records {decode_errors}",
        lost.ringbuf_full, lost.read_failed
    );
    Ok(())
}

/// Writes each event as one line; flushes whenever the kernel's ring buffer is drained.
struct Printer<W: Write> {
    out: W,
    line: Vec<u8>,
    clock: WallClock,
    format: Format,
    show_bytes: usize,
    events: u64,
    decode_errors: u64,
    selector: Selector,
}

impl<W: Write> EventSink for Printer<W> {
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>) {
        match event {
            Ok(ev) => {
                if !self.selector.admit(&ev) {
                    return;
                }
                self.events += 1;
                self.line.clear();
                match self.format {
                    Format::Text => {
                        print::text_line(&mut self.line, &ev, &self.clock, self.show_bytes)
                    }
                    Format::Json => print::json_line(&mut self.line, &ev, &self.clock),
                }
                let _ = self.out.write_all(&self.line);
            }
            Err(e) => {
                self.decode_errors += 1;
                log::debug!("dropped a malformed kernel record: {e}");
            }
        }
    }

    fn idle(&mut self, _lost: &Lost) {
        self.selector.sweep();
        let _ = self.out.flush();
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
