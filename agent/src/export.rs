//! Sending spans: over OTLP (gRPC by tonic, or HTTP/protobuf by reqwest) to any backend, or
//! into the embedded in-memory store behind the Jaeger UI (`otlp-embedded`).
//!
//! Spans are encoded straight into the OTLP protobuf types (`opentelemetry-proto`): no SDK span
//! objects in between. They go through a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) to one export
//! task that sends batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`) at least every
//! `OTEL_BSP_SCHEDULE_DELAY`, each batch one request with a resource per traced process. A full
//! queue drops spans and counts them; memory never grows without bound.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Status, span::SpanKind, status::StatusCode},
};
use prost::Message as _;
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
                let env = |k: &str| std::env::var(k);
                Sink::Otlp(Arc::new(Transport::new(&config, &batching, &env)?))
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

/// Where batches go; cloned (as handles) for each export in flight.
#[derive(Clone)]
enum Sink {
    Otlp(Arc<Transport>),
    Embedded(Arc<otlp_embedded::TraceServiceImpl>),
}

impl Sink {
    async fn export(self, request: ExportTraceServiceRequest) -> anyhow::Result<()> {
        match self {
            Sink::Otlp(t) => t.export(request).await,
            Sink::Embedded(service) => embedded_export(&service, request).await,
        }
    }
}

/// An OTLP connection and what each request carries.
enum Transport {
    Grpc {
        client: TraceServiceClient<tonic::transport::Channel>,
        headers: tonic::metadata::MetadataMap,
        timeout: Duration,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
        timeout: Duration,
    },
}

/// `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (which wins per key):
/// `key=value` pairs separated by commas, values percent-encoded.
pub fn otlp_headers(
    get: &dyn Fn(&str) -> Result<String, std::env::VarError>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        let Ok(text) = get(var) else {
            continue;
        };
        for (k, v) in crate::trace::process::parse_resource_attributes(&text) {
            let k = k.to_ascii_lowercase();
            out.retain(|(n, _)| *n != k);
            out.push((k, v));
        }
    }
    out
}

impl Transport {
    fn new(
        config: &OtlpConfig,
        batching: &Batching,
        env: &dyn Fn(&str) -> Result<String, std::env::VarError>,
    ) -> anyhow::Result<Self> {
        let timeout = config.timeout.unwrap_or(batching.export_timeout);
        let headers = otlp_headers(env);
        Ok(match config.protocol {
            OtlpProtocol::Grpc => {
                let url = config
                    .traces_endpoint
                    .clone()
                    .or_else(|| config.endpoint.clone())
                    .unwrap_or_else(|| "http://localhost:4317".into());
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .with_context(|| format!("OTLP endpoint {url}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(timeout)
                    .connect_lazy();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .with_context(|| format!("OTLP header name {k}"))?;
                    let value = v
                        .parse()
                        .with_context(|| format!("OTLP header {k}: not a valid value"))?;
                    metadata.insert(key, value);
                }
                Self::Grpc {
                    client: TraceServiceClient::new(channel),
                    headers: metadata,
                    timeout,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let url = match (&config.traces_endpoint, &config.endpoint) {
                    (Some(t), _) => t.clone(),
                    // A base endpoint, like OTEL_EXPORTER_OTLP_ENDPOINT: the signal path is added.
                    (None, Some(e)) => format!("{}/v1/traces", e.trim_end_matches('/')),
                    (None, None) => "http://localhost:4318/v1/traces".into(),
                };
                reqwest::Url::parse(&url).with_context(|| format!("OTLP endpoint {url}"))?;
                let mut map = reqwest::header::HeaderMap::new();
                for (k, v) in headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .with_context(|| format!("OTLP header name {k}"))?;
                    let value = reqwest::header::HeaderValue::from_str(&v)
                        .with_context(|| format!("OTLP header {k}: not a valid value"))?;
                    map.insert(name, value);
                }
                map.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/x-protobuf"),
                );
                Self::Http {
                    client: reqwest::Client::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .build()
                        .context("the OTLP/HTTP client")?,
                    url,
                    headers: map,
                    timeout,
                }
            }
        })
    }

    async fn export(&self, request: ExportTraceServiceRequest) -> anyhow::Result<()> {
        match self {
            Self::Grpc {
                client,
                headers,
                timeout,
            } => {
                let mut req = tonic::Request::new(request);
                *req.metadata_mut() = headers.clone();
                req.set_timeout(*timeout);
                // A handle on the same connection.
                let mut client = client.clone();
                let resp = client
                    .export(req)
                    .await
                    .map_err(|s| anyhow::anyhow!("OTLP/gRPC: {:?}: {}", s.code(), s.message()))?;
                if let Some(p) = resp.into_inner().partial_success
                    && p.rejected_spans > 0
                {
                    anyhow::bail!(
                        "the backend rejected {} spans: {}",
                        p.rejected_spans,
                        p.error_message
                    );
                }
                Ok(())
            }
            Self::Http {
                client,
                url,
                headers,
                timeout,
            } => {
                let resp = client
                    .post(url)
                    .headers(headers.clone())
                    .timeout(*timeout)
                    .body(request.encode_to_vec())
                    .send()
                    .await?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp.bytes().await.unwrap_or_default();
                    anyhow::bail!(
                        "OTLP/HTTP {url}: {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    );
                }
                Ok(())
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Span>,
    sink: Sink,
    batching: Batching,
    stats: Arc<ExportStats>,
) {
    let mut batch: Vec<Span> = Vec::with_capacity(batching.max_batch);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut resources = Resources::new(crate::trace::process::host_name());
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
        let n = batch.len() as u64;
        let request = resources.request(std::mem::take(&mut batch));
        while in_flight.len() >= batching.max_concurrent {
            let _ = in_flight.join_next().await;
        }
        let stats = stats.clone();
        let timeout = batching.export_timeout;
        let sink = sink.clone();
        in_flight.spawn(async move {
            let result = tokio::time::timeout(timeout, sink.export(request)).await;
            match result {
                Ok(Ok(())) => {
                    stats.exported.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    stats.failed.fetch_add(n, Ordering::Relaxed);
                    log::warn!("exporting {n} spans failed: {e:#}");
                }
                Err(_) => {
                    stats.failed.fetch_add(n, Ordering::Relaxed);
                    log::warn!("exporting {n} spans timed out");
                }
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
}

/// The OTLP resource of each traced process, built once per process (and again when what is
/// known about it changes).
struct Resources {
    host: String,
    by_pid: HashMap<u32, (Arc<ProcessInfo>, Resource)>,
}

impl Resources {
    fn new(host: String) -> Self {
        Self {
            host,
            by_pid: HashMap::new(),
        }
    }

    fn get(&mut self, info: &Arc<ProcessInfo>) -> Resource {
        if let Some((known, r)) = self.by_pid.get(&info.pid)
            && (Arc::ptr_eq(known, info) || **known == **info)
        {
            return r.clone();
        }
        let r = resource(info, &self.host);
        self.by_pid.insert(info.pid, (info.clone(), r.clone()));
        // Forget processes that no longer send spans: bounded by the processes of one batch
        // window at a time.
        if self.by_pid.len() > 4096 {
            self.by_pid.clear();
        }
        r
    }

    /// One request for a batch: a resource per process, one scope, the spans.
    fn request(&mut self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        let mut groups: Vec<(
            Arc<ProcessInfo>,
            Vec<opentelemetry_proto::tonic::trace::v1::Span>,
        )> = Vec::new();
        for s in spans {
            let info = s.process.clone();
            let span = proto_span(s);
            match groups
                .iter_mut()
                .find(|(p, _)| Arc::ptr_eq(p, &info) || **p == *info)
            {
                Some((_, v)) => v.push(span),
                None => groups.push((info, vec![span])),
            }
        }
        let resource_spans = groups
            .into_iter()
            .map(|(info, spans)| ResourceSpans {
                resource: Some(self.get(&info)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect();
        ExportTraceServiceRequest { resource_spans }
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "wirespan".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

async fn embedded_export(
    service: &otlp_embedded::TraceServiceImpl,
    request: ExportTraceServiceRequest,
) -> anyhow::Result<()> {
    use otlp_embedded::TraceService as _;
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

fn kv(key: impl Into<String>, v: &Value) -> KeyValue {
    let value = match v {
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
        Value::Int(i) => any_value::Value::IntValue(*i),
    };
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The OTLP resource of a process.
pub fn resource(info: &ProcessInfo, host: &str) -> Resource {
    Resource {
        attributes: info
            .resource(host)
            .into_iter()
            .map(|(k, v)| kv(k, &v))
            .collect(),
        ..Default::default()
    }
}

/// OTLP span flags: the W3C trace flags, and whether the parent is remote (bits 8 and 9, as
/// the SDKs set them).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Our span as the OTLP message.
pub fn proto_span(s: Span) -> opentelemetry_proto::tonic::trace::v1::Span {
    let status = match s.error {
        Some(message) => Status {
            code: StatusCode::Error as i32,
            message,
        },
        None => Status::default(),
    };
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        trace_state: s.trace_state.unwrap_or_default(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(s.flags) | HAS_IS_REMOTE | if s.parent_remote { IS_REMOTE } else { 0 },
        name: s.name,
        kind: match s.side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns.max(s.start_unix_ns),
        attributes: s.attributes.iter().map(|(k, v)| kv(*k, v)).collect(),
        status: Some(status),
        ..Default::default()
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
    fn headers_from_the_environment() {
        let get = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_HEADERS" => Ok("Api-Key=a%20b, tenant=t1".to_string()),
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS" => Ok("tenant=t2".to_string()),
            _ => Err(std::env::VarError::NotPresent),
        };
        assert_eq!(
            otlp_headers(&get),
            [
                ("api-key".to_string(), "a b".to_string()),
                ("tenant".to_string(), "t2".to_string())
            ]
        );
    }

    #[test]
    fn spans_in_the_otlp_message() {
        let info = Arc::new(ProcessInfo {
            pid: 3,
            service_name: "svc".into(),
            ..Default::default()
        });
        let span = |remote: bool, error: Option<&str>| Span {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
            parent_remote: remote,
            link: None,
            side: Side::Server,
            name: "GET /x".into(),
            start_unix_ns: 10,
            end_unix_ns: 5,
            attributes: vec![("http.response.status_code", Value::Int(500))],
            error: error.map(String::from),
            flags: 1,
            trace_state: Some("k=v".into()),
            process: info.clone(),
        };
        let p = proto_span(span(true, Some("boom")));
        assert_eq!(p.trace_id, vec![7; 16]);
        assert_eq!(p.parent_span_id, vec![9; 8]);
        assert_eq!(p.flags, 1 | HAS_IS_REMOTE | IS_REMOTE);
        assert_eq!(p.kind, SpanKind::Server as i32);
        assert_eq!(p.end_time_unix_nano, 10, "never before the start");
        assert_eq!(p.trace_state, "k=v");
        let status = p.status.unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "boom")
        );
        assert_eq!(proto_span(span(false, None)).flags, 1 | HAS_IS_REMOTE);
        // One resource per process, one scope.
        let mut r = Resources::new("h".into());
        let req = r.request(vec![span(false, None), span(false, None)]);
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        assert_eq!(rs.scope_spans[0].spans.len(), 2);
        assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "wirespan");
        assert!(
            rs.resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .any(|kv| kv.key == "service.name"
                    && kv.value.as_ref().and_then(|v| v.value.clone())
                        == Some(any_value::Value::StringValue("svc".into())))
        );
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
