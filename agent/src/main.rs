//! The `wirespan` command line. The work is in the library; this file only wires it up.

use std::{io::Write, net::SocketAddr, sync::atomic::Ordering, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wirespan::{
    capture::{Capture, CaptureConfig, DecodeError, EventSink, Lost, SocketEvent},
    clock::WallClock,
    export::{Batching, Exporter, OtlpConfig, OtlpProtocol, Target},
    print::{self, Format},
    trace::Stitcher,
};

/// Distributed tracing without code changes: eBPF capture of the HTTP traffic of running
/// processes, stitched into linked spans and exported over OTLP.
///
/// With no OTLP endpoint configured (no --otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT or
/// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), recent traces are kept in memory and shown by a Jaeger
/// UI on http://127.0.0.1:16686.
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
}

#[derive(clap::Args, Debug, Clone)]
struct SelectArgs {
    /// Trace only this process (repeatable). Default: every process except wirespan.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Never trace this process (repeatable).
    #[arg(long = "exclude-pid", value_name = "PID")]
    exclude_pids: Vec<u32>,
    /// Bytes copied from each read or write (the true length is always reported), max 8192.
    #[arg(long, default_value_t = wirespan_common::DEFAULT_CAPTURE, env = "WIRESPAN_CAPTURE_BYTES")]
    capture_bytes: u32,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    ring_mib: u32,
    /// Benchmark floor: attach every tracepoint with programs that return at once.
    #[arg(long, hide = true)]
    inert: bool,
}

#[derive(clap::Args, Debug, Clone)]
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
    /// Address of the embedded Jaeger UI (used when no OTLP endpoint is configured).
    #[arg(long, default_value = "127.0.0.1:16686", value_name = "ADDR")]
    ui_address: SocketAddr,
    /// Traces kept in memory for the embedded UI.
    #[arg(long, default_value_t = 1000)]
    ui_max_traces: u32,
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
    #[arg(long, default_value_t = wirespan::trace::stitch::MAX_CONNECTIONS, hide = true)]
    max_connections: usize,
    /// Every this many seconds, print one line of counters and table sizes on stderr.
    #[arg(long, value_name = "SECS")]
    stats_every: Option<u64>,
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

fn main() -> anyhow::Result<()> {
    // Two malloc arenas are enough for two worker threads; more only hold freed memory.
    // SAFETY: mallopt has no preconditions; called before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // Two threads: reading the kernel's events never waits for an export to be encoded and
    // sent, nor the other way round.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Some(Command::Capture(args)) => runtime.block_on(capture(args)),
        Some(Command::Run(args)) => runtime.block_on(run(args)),
        None => runtime.block_on(run(cli.run)),
    }
}

/// Loads and attaches the kernel programs, or exits with one clear line.
fn start_capture(args: &SelectArgs) -> anyhow::Result<Capture> {
    if !args.ring_mib.is_power_of_two() {
        anyhow::bail!("--ring-mib must be a power of two, got {}", args.ring_mib);
    }
    let config = CaptureConfig {
        capture_bytes: args.capture_bytes,
        pids: args.pids.clone(),
        exclude_pids: args.exclude_pids.clone(),
        ring_bytes: args.ring_mib * 1024 * 1024,
        inert: args.inert,
    };
    let capture = match Capture::start(&config) {
        Ok(c) => c,
        Err(e) => {
            // One clear line, then a non-zero exit.
            eprintln!("wirespan: cannot capture: {}", error_chain(&e));
            std::process::exit(1);
        }
    };
    eprintln!(
        "wirespan: ready: {} of {} syscalls traced{}",
        capture.attached.len(),
        wirespan::capture::probes::PROBES.len(),
        if capture.failures.is_empty() {
            String::new()
        } else {
            format!(" ({} probes failed, see warnings)", capture.failures.len())
        }
    );
    Ok(capture)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where spans go, from the flags and the OpenTelemetry environment (flags win).
fn target(args: &RunArgs) -> anyhow::Result<Target> {
    if args.no_export {
        return Ok(Target::Discard);
    }
    let env_endpoint = env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env_var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if args.otlp_endpoint.is_none() && env_endpoint.is_none() {
        return Ok(Target::Embedded {
            ui: args.ui_address,
            max_traces: args.ui_max_traces,
        });
    }
    let protocol = match args.otlp_protocol {
        Some(p) => p,
        None => OtlpProtocol::from_env(env_var)?.unwrap_or(OtlpProtocol::HttpProtobuf),
    };
    Ok(Target::Otlp(OtlpConfig {
        protocol,
        endpoint: args.otlp_endpoint.clone(),
        timeout: args.otlp_timeout_ms.map(Duration::from_millis),
    }))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let target = target(&args)?;
    let batching = Batching::from_env(env_var)?;
    // The exporter starts first: a UI address in use is reported before probes attach.
    let exporter = Exporter::start(target, batching).await?;
    let capture = start_capture(&args.select)?;
    let mut stitcher = Stitcher::new(WallClock::measure());
    stitcher.redact_query = !args.keep_query_values;
    stitcher.max_connections = args.max_connections;
    let mut tracer = Tracer {
        stitcher,
        exporter,
        spans: Vec::new(),
        log_spans: args.log_spans,
        out: std::io::BufWriter::new(std::io::stdout()),
        line: String::new(),
        stats_every: args.stats_every.map(Duration::from_secs),
        last_stats: std::time::Instant::now(),
        events_since_tick: 0,
        lost: Lost::default(),
    };
    let lost = capture.run(&mut tracer, shutdown_signal()).await?;
    tracer.stitcher.flush(&mut tracer.spans);
    tracer.hand_out();
    let _ = tracer.out.flush();
    let Tracer {
        stitcher, exporter, ..
    } = tracer;
    let stats = exporter.stats.clone();
    exporter.shutdown(Duration::from_secs(5)).await;
    let s = &stitcher.stats;
    eprintln!(
        "wirespan: {} events; {} spans: {} exported, {} dropped (queue full), {} failed to export, {} left to the process's own instrumentation, {} not sampled; http: {} malformed, {} oversized, {} truncated heads, {} calls skipped; {} invalid trace headers; {} connections not tracked (table full), {} requests given up, {} cut off by their process exiting; lost in kernel: ring buffer full {}, in-flight table full {}, unreadable buffers {}",
        s.events,
        s.spans,
        stats.exported.load(Ordering::Relaxed),
        stats.dropped_queue_full.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        s.suppressed,
        s.unsampled,
        s.http.malformed,
        s.http.oversized,
        s.http.truncated,
        s.http.skipped_calls,
        s.invalid_trace_headers,
        s.connections_dropped,
        s.pending_dropped,
        s.process_exits,
        lost.ringbuf_full,
        lost.inflight_full,
        lost.read_failed
    );
    Ok(())
}

/// Feeds events to the stitcher and finished spans to the exporter.
struct Tracer<W: Write> {
    stitcher: Stitcher,
    exporter: Exporter,
    spans: Vec<wirespan::trace::Span>,
    log_spans: bool,
    out: W,
    line: String,
    stats_every: Option<Duration>,
    last_stats: std::time::Instant,
    events_since_tick: u32,
    /// The kernel's loss counters as of the last drain.
    lost: Lost,
}

impl<W: Write> Tracer<W> {
    fn hand_out(&mut self) {
        for span in self.spans.drain(..) {
            if self.log_spans {
                self.line.clear();
                print::span_line(&mut self.line, &span);
                let _ = self.out.write_all(self.line.as_bytes());
            }
            self.exporter.send(span);
        }
    }
}

impl<W: Write> EventSink for Tracer<W> {
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>) {
        match event {
            Ok(ev) => self.stitcher.event(&ev, &mut self.spans),
            Err(e) => {
                self.stitcher.stats.undecodable_events += 1;
                log::debug!("dropped a malformed kernel record: {e}");
            }
        }
        if self.spans.len() >= 64 {
            self.hand_out();
        }
        // Under constant load the ring is never empty and `idle` would not run: do the
        // time-based work (forgetting old state, deferred links) every 4096 events too.
        self.events_since_tick += 1;
        if self.events_since_tick >= 4096 {
            self.events_since_tick = 0;
            self.stitcher.tick(&mut self.spans);
            self.hand_out();
            self.maybe_print_stats();
        }
    }

    fn idle(&mut self, lost: &Lost) {
        self.lost = *lost;
        self.stitcher.tick(&mut self.spans);
        self.hand_out();
        let _ = self.out.flush();
        self.maybe_print_stats();
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
        let [conns, procs, spans, clients, threads, deferred] = self.stitcher.table_sizes();
        let e = &self.exporter.stats;
        eprintln!(
            "wirespan: stats: events={} spans={} exported={} dropped={} failed={} lost_ringbuf={} lost_inflight={} connections={conns} processes={procs} remembered_spans={spans} client_index={clients} threads={threads} deferred={deferred}",
            s.events,
            s.spans,
            e.exported.load(Ordering::Relaxed),
            e.dropped_queue_full.load(Ordering::Relaxed),
            e.failed.load(Ordering::Relaxed),
            self.lost.ringbuf_full,
            self.lost.inflight_full,
        );
    }
}

async fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let capture = start_capture(&args.select)?;
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
    };
    let lost = capture.run(&mut printer, shutdown_signal()).await?;
    let Printer {
        mut out,
        events,
        decode_errors,
        ..
    } = printer;
    let _ = out.flush();
    eprintln!(
        "wirespan: {events} events; lost in kernel: ring buffer full {}, in-flight table full {}, unreadable buffers {}; malformed records {decode_errors}",
        lost.ringbuf_full, lost.inflight_full, lost.read_failed
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
}

impl<W: Write> EventSink for Printer<W> {
    fn event(&mut self, event: Result<SocketEvent<'_>, DecodeError>) {
        match event {
            Ok(ev) => {
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
