//! Sending spans: over OTLP (gRPC or HTTP/protobuf, by `opentelemetry-otlp`) to any backend, or
//! into the embedded in-memory store behind the Jaeger UI (`otlp-embedded`).
//!
//! Spans go through a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) to one export task that sends
//! batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`) at least every `OTEL_BSP_SCHEDULE_DELAY`; each
//! batch is sent as one request per traced process (each process is its own OTLP resource).
//! A full queue drops spans and counts them; memory never grows without bound.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanKind, Status, TraceFlags, TraceState},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use tokio::sync::mpsc;

use crate::{
    http::attributes::{Side, Value},
    trace::{Span, process::ProcessInfo},
};

/// Where spans go.
#[derive(Clone, Debug)]
pub enum Target {
    /// An OTLP endpoint.
    Otlp(OtlpConfig),
    /// The in-memory store and Jaeger UI served on this address.
    Embedded { ui: SocketAddr, max_traces: u32 },
    /// Nowhere (spans are only printed with `--log-spans`).
    Discard,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// Base endpoint (as `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Full traces URL (as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); wins over `endpoint`.
    pub traces_endpoint: Option<String>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }

    /// The protocol named by `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (the first set wins).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(v) = get(var).filter(|v| !v.trim().is_empty()) {
                return match v.trim() {
                    "grpc" => Ok(Some(Self::Grpc)),
                    "http/protobuf" => Ok(Some(Self::HttpProtobuf)),
                    other => {
                        anyhow::bail!("{var}={other} is not supported (use grpc or http/protobuf)")
                    }
                };
            }
        }
        Ok(None)
    }
}

/// Batching settings, from `OTEL_BSP_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    pub max_queue: usize,
    pub max_batch: usize,
    pub delay: Duration,
    pub export_timeout: Duration,
    /// Exports in flight at once.
    pub max_concurrent: usize,
}

impl Batching {
    /// Defaults for a node agent (a whole host's traffic goes through one queue, so the queue
    /// and batches are larger than an SDK's 2048/512 (8192/1024) and four exports run at once), overridden
    /// by `OTEL_BSP_*` variables.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let num = |var: &str, default: u64| -> anyhow::Result<u64> {
            match get(var) {
                Some(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("{var}={v} is not a whole number")),
                _ => Ok(default),
            }
        };
        let max_queue = num("OTEL_BSP_MAX_QUEUE_SIZE", 8192)?.max(1) as usize;
        let max_batch =
            (num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1024)?.max(1) as usize).min(max_queue);
        Ok(Self {
            max_queue,
            max_batch,
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            export_timeout: Duration::from_millis(num("OTEL_BSP_EXPORT_TIMEOUT", 30000)?),
            max_concurrent: num("OTEL_BSP_MAX_CONCURRENT_EXPORTS", 4)?.max(1) as usize,
        })
    }
}

/// Counters shared with the export task.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the backend refused them or could not be reached.
    pub failed: AtomicU64,
}

/// The sending side of the export queue.
pub struct Exporter {
    tx: Option<mpsc::Sender<Span>>,
    pub stats: Arc<ExportStats>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Exporter {
    /// Starts the export task (and, for the embedded target, the UI server).
    pub async fn start(target: Target, batching: Batching) -> anyhow::Result<Self> {
        crate::k8s::install_crypto_provider();
        let stats = Arc::new(ExportStats::default());
        let sink = match target {
            Target::Discard => {
                return Ok(Self {
                    tx: None,
                    stats,
                    task: None,
                });
            }
            Target::Otlp(config) => {
                // Fail at start on a bad configuration, not at the first span.
                build_otlp(&config, &batching)?;
                Sink::Otlp {
                    config,
                    batching,
                    exporters: HashMap::new(),
                }
            }
            Target::Embedded { ui, max_traces } => {
                let state = otlp_embedded::State::new(otlp_embedded::Config {
                    max_length: max_traces,
                    max_memory_usage: 256 << 20,
                });
                let listener = tokio::net::TcpListener::bind(ui)
                    .await
                    .with_context(|| format!("serving the Jaeger UI on {ui}"))?;
                log::info!("Jaeger UI on http://{}/", listener.local_addr()?);
                let app = otlp_embedded::ui_app(state.clone(), "/");
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        log::error!("Jaeger UI server stopped: {e}");
                    }
                });
                Sink::Embedded(Arc::new(otlp_embedded::TraceServiceImpl::new(state)))
            }
        };
        let (tx, rx) = mpsc::channel(batching.max_queue);
        let task = tokio::spawn(run(rx, sink, batching, stats.clone()));
        Ok(Self {
            tx: Some(tx),
            stats,
            task: Some(task),
        })
    }

    /// Queues a span; a full queue drops it (counted).
    pub fn send(&self, span: Span) {
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send(span).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends what is queued and stops the task, waiting at most `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) {
        drop(self.tx.take());
        if let Some(task) = self.task.take()
            && tokio::time::timeout(timeout, task).await.is_err()
        {
            log::warn!("export did not finish within {timeout:?}; queued spans were lost");
        }
    }
}

enum Sink {
    /// One exporter per traced process, each with that process's resource (built on first use).
    Otlp {
        config: OtlpConfig,
        batching: Batching,
        exporters: HashMap<u32, (Arc<ProcessInfo>, Arc<opentelemetry_otlp::SpanExporter>)>,
    },
    Embedded(Arc<otlp_embedded::TraceServiceImpl>),
}

fn build_otlp(
    cfg: &OtlpConfig,
    batching: &Batching,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let timeout = cfg.timeout.unwrap_or(batching.export_timeout);
    let exporter = match cfg.protocol {
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc);
            if let Some(e) = cfg.traces_endpoint.as_ref().or(cfg.endpoint.as_ref()) {
                b = b.with_endpoint(e.clone());
            }
            if cfg.timeout.is_some() {
                b = b.with_timeout(timeout);
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &cfg.traces_endpoint {
                b = b.with_endpoint(e.clone());
            } else if let Some(e) = &cfg.endpoint {
                // A base endpoint, like OTEL_EXPORTER_OTLP_ENDPOINT: the signal path is added.
                b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
            }
            if cfg.timeout.is_some() {
                b = b.with_timeout(timeout);
            }
            b.build()
        }
    };
    exporter.context("building the OTLP exporter")
}

async fn run(
    mut rx: mpsc::Receiver<Span>,
    mut sink: Sink,
    batching: Batching,
    stats: Arc<ExportStats>,
) {
    let mut batch: Vec<Span> = Vec::with_capacity(batching.max_batch);
    let mut in_flight = tokio::task::JoinSet::new();
    let host = crate::trace::process::host_name();
    let mut closed = false;
    while !closed {
        let deadline = tokio::time::sleep(batching.delay);
        tokio::pin!(deadline);
        while batch.len() < batching.max_batch {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => { closed = true; break; }
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        for (exporter, data) in groups(&mut sink, std::mem::take(&mut batch), &host) {
            while in_flight.len() >= batching.max_concurrent {
                let _ = in_flight.join_next().await;
            }
            let stats = stats.clone();
            let timeout = batching.export_timeout;
            in_flight.spawn(async move {
                let n = data.len() as u64;
                let result = tokio::time::timeout(timeout, exporter.export(data)).await;
                match result {
                    Ok(Ok(())) => {
                        stats.exported.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        stats.failed.fetch_add(n, Ordering::Relaxed);
                        log::warn!("exporting {n} spans failed: {e}");
                    }
                    Err(_) => {
                        stats.failed.fetch_add(n, Ordering::Relaxed);
                        log::warn!("exporting {n} spans timed out");
                    }
                }
            });
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Where one group of spans goes.
enum Destination {
    Otlp(Arc<opentelemetry_otlp::SpanExporter>),
    Embedded(Arc<otlp_embedded::TraceServiceImpl>, Resource),
}

impl Destination {
    async fn export(self, data: Vec<SpanData>) -> anyhow::Result<()> {
        match self {
            Destination::Otlp(e) => e.export(data).await.map_err(|e| anyhow::anyhow!("{e}")),
            Destination::Embedded(service, resource) => {
                embedded_export(&service, &resource, data).await
            }
        }
    }
}

/// Splits a batch by process (each its own resource) and finds each group's destination.
fn groups(sink: &mut Sink, spans: Vec<Span>, host: &str) -> Vec<(Destination, Vec<SpanData>)> {
    let mut by_process: Vec<(Arc<ProcessInfo>, Vec<SpanData>)> = Vec::new();
    for s in spans {
        let info = s.process.clone();
        let data = span_data(s);
        match by_process
            .iter_mut()
            .find(|(p, _)| Arc::ptr_eq(p, &info) || **p == *info)
        {
            Some((_, v)) => v.push(data),
            None => by_process.push((info, vec![data])),
        }
    }
    let mut out = Vec::with_capacity(by_process.len());
    for (info, data) in by_process {
        let destination = match sink {
            Sink::Embedded(service) => {
                Destination::Embedded(service.clone(), resource(&info, host))
            }
            Sink::Otlp {
                config,
                batching,
                exporters,
            } => {
                let current = exporters
                    .get(&info.pid)
                    .filter(|(known, _)| **known == *info)
                    .map(|(_, e)| e.clone());
                match current {
                    Some(e) => Destination::Otlp(e),
                    None => match build_otlp(config, batching) {
                        Ok(mut e) => {
                            e.set_resource(&resource(&info, host));
                            let e = Arc::new(e);
                            exporters.insert(info.pid, (info.clone(), e.clone()));
                            Destination::Otlp(e)
                        }
                        Err(err) => {
                            log::warn!("no exporter for pid {}: {err:#}", info.pid);
                            continue;
                        }
                    },
                }
            }
        };
        out.push((destination, data));
    }
    out
}

async fn embedded_export(
    service: &otlp_embedded::TraceServiceImpl,
    resource: &Resource,
    data: Vec<SpanData>,
) -> anyhow::Result<()> {
    use opentelemetry_proto::transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    };
    use otlp_embedded::TraceService as _;
    use prost::Message as _;
    let resource_spans =
        group_spans_by_resource_and_scope(data, &ResourceAttributesWithSchema::from(resource));
    let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        resource_spans,
    };
    // The store has its own generated types of the same schema: convert through the wire
    // format.
    let bytes = request.encode_to_vec();
    let request = otlp_embedded::proto::collector::trace::v1::ExportTraceServiceRequest::decode(
        bytes.as_slice(),
    )?;
    service
        .export(tonic::Request::new(request))
        .await
        .map_err(|e| anyhow::anyhow!("embedded store: {e}"))?;
    Ok(())
}

fn kv(key: impl Into<opentelemetry::Key>, v: &Value) -> KeyValue {
    match v {
        Value::Str(s) => KeyValue::new(key, s.clone()),
        Value::Int(i) => KeyValue::new(key, *i),
    }
}

/// The OTLP resource of a process.
pub fn resource(info: &ProcessInfo, host: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes(info.resource(host).iter().map(|(k, v)| kv(k.clone(), v)))
        .build()
}

fn time(unix_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

/// Our span as the SDK's export type.
pub fn span_data(s: Span) -> SpanData {
    let trace_state = s
        .trace_state
        .as_deref()
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(s.trace_id),
        opentelemetry::trace::SpanId::from_bytes(s.span_id),
        TraceFlags::new(s.flags),
        false,
        trace_state,
    );
    let status = match &s.error {
        Some(d) => Status::Error {
            description: Cow::Owned(d.clone()),
        },
        None => Status::Unset,
    };
    SpanData {
        span_context: context,
        parent_span_id: s
            .parent_span_id
            .map(opentelemetry::trace::SpanId::from_bytes)
            .unwrap_or(opentelemetry::trace::SpanId::INVALID),
        parent_span_is_remote: s.parent_remote,
        span_kind: match s.side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        },
        name: Cow::Owned(s.name),
        start_time: time(s.start_unix_ns),
        end_time: time(s.end_unix_ns.max(s.start_unix_ns)),
        attributes: s.attributes.iter().map(|(k, v)| kv(*k, v)).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: InstrumentationScope::builder("wirespan")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn batching_defaults_and_overrides() {
        let d = Batching::from_env(env(&[])).unwrap();
        assert_eq!(
            (d.max_queue, d.max_batch, d.delay, d.export_timeout),
            (8192, 1024, Duration::from_secs(5), Duration::from_secs(30))
        );
        let b = Batching::from_env(env(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ]))
        .unwrap();
        // A batch is never larger than the queue.
        assert_eq!((b.max_queue, b.max_batch), (100, 100));
        assert_eq!(b.delay, Duration::from_millis(250));
        assert!(Batching::from_env(env(&[("OTEL_BSP_MAX_QUEUE_SIZE", "lots")])).is_err());
    }

    #[test]
    fn protocol_from_environment() {
        assert_eq!(OtlpProtocol::from_env(env(&[])).unwrap(), None);
        assert_eq!(
            OtlpProtocol::from_env(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap(),
            Some(OtlpProtocol::Grpc)
        );
        // The signal-specific variable wins.
        assert_eq!(
            OtlpProtocol::from_env(env(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]))
            .unwrap(),
            Some(OtlpProtocol::HttpProtobuf)
        );
        assert!(
            OtlpProtocol::from_env(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])).is_err()
        );
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let exporter = Exporter::start(
            Target::Otlp(OtlpConfig {
                protocol: OtlpProtocol::HttpProtobuf,
                // Nothing listens here; exports fail and are counted, never block the sender.
                endpoint: Some("http://127.0.0.1:9".into()),
                traces_endpoint: None,
                timeout: Some(Duration::from_millis(200)),
            }),
            Batching {
                max_queue: 4,
                max_batch: 4,
                delay: Duration::from_secs(60),
                export_timeout: Duration::from_secs(1),
                max_concurrent: 1,
            },
        )
        .await
        .unwrap();
        let info = Arc::new(ProcessInfo {
            pid: 1,
            service_name: "s".into(),
            executable_name: "s".into(),
            executable_path: String::new(),
            command_line: String::new(),
            ..Default::default()
        });
        for i in 0..10u8 {
            exporter.send(Span {
                trace_id: [1; 16],
                span_id: [i + 1; 8],
                parent_span_id: None,
                parent_remote: false,
                link: None,
                side: Side::Server,
                name: "GET".into(),
                start_unix_ns: 1,
                end_unix_ns: 2,
                attributes: Vec::new(),
                error: None,
                flags: 1,
                trace_state: None,
                process: info.clone(),
            });
        }
        let stats = exporter.stats.clone();
        // The export task cannot run while this single-threaded test sends: 4 fit, 6 do not.
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 6);
        exporter.shutdown(Duration::from_secs(5)).await;
        let sent = 10 - stats.dropped_queue_full.load(Ordering::Relaxed);
        assert_eq!(stats.failed.load(Ordering::Relaxed), sent);
    }
}
