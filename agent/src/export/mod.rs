//! Sending spans: over OTLP (gRPC on tonic's transport, or HTTP/protobuf by reqwest) to any
//! backend, or into the embedded in-memory store behind the Jaeger UI (`otlp-embedded`).
//!
//! Spans are encoded straight into OTLP protobuf bytes ([`wire`]): no SDK span objects or
//! generated messages in between. They go through a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) to one export
//! task that sends batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`) at least every
//! `OTEL_BSP_SCHEDULE_DELAY`, each batch one request with a resource per traced process. A full
//! queue drops spans and counts them; memory never grows without bound.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::{
    Message as _,
    bytes::{Buf as _, Bytes},
};
use tokio::sync::mpsc;
use tonic::codegen::http;

use crate::trace::{Span, process::ProcessInfo};

mod pool;
use pool::Pool;

pub mod wire;

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
    /// Groups of spans (one message per group: one wake-up of the export task, not one per
    /// span).
    tx: Option<mpsc::Sender<Vec<Span>>>,
    /// Spans in the queue; the queue's bound is in spans.
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    max_batch: usize,
    /// How long the event loop keeps a partial group (see [`Outbox`]).
    hold: Duration,
    pub stats: Arc<ExportStats>,
    spare: Arc<Spare>,
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
                    queued: Arc::default(),
                    max_queue: batching.max_queue,
                    max_batch: batching.max_batch,
                    hold: batching.delay.min(HOLD),
                    stats,
                    spare: spare(batching.max_batch),
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
        let queued = Arc::new(AtomicUsize::new(0));
        let spare = spare(batching.max_batch);
        let task = tokio::spawn(run(
            rx,
            queued.clone(),
            sink,
            batching,
            stats.clone(),
            spare.clone(),
        ));
        Ok(Self {
            tx: Some(tx),
            queued,
            max_queue: batching.max_queue,
            max_batch: batching.max_batch,
            hold: batching.delay.min(HOLD),
            stats,
            spare,
            task: Some(task),
        })
    }

    /// Spans per export request: the event loop hands out groups of this size under load
    /// (one wake-up of the export task per batch).
    pub fn batch_size(&self) -> usize {
        self.max_batch
    }

    /// Whether the spans gathered in `outbox` go to the queue now (see [`Outbox`]).
    pub fn due(&self, outbox: &mut Outbox, now: Instant) -> bool {
        outbox.due(now, self.max_batch, self.hold)
    }

    /// An empty group for the next spans: one the export task has emptied, or a new one with
    /// room for a batch.
    pub fn group(&self) -> Vec<Span> {
        self.spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(self.max_batch))
    }

    /// Queues spans as one group; what does not fit in the queue is dropped (counted).
    pub fn send_all(&self, mut spans: Vec<Span>) {
        let Some(tx) = &self.tx else {
            self.spare.give(spans);
            return;
        };
        // Only this sender adds to `queued` (the export task only takes away), so the room
        // read here can only grow before the add below.
        let room = self
            .max_queue
            .saturating_sub(self.queued.load(Ordering::Relaxed));
        if spans.len() > room {
            self.stats
                .dropped_queue_full
                .fetch_add((spans.len() - room) as u64, Ordering::Relaxed);
            spans.truncate(room);
        }
        if spans.is_empty() {
            // Kept for the next hand-out: while exports fall behind, a group is dropped every
            // few milliseconds, and a new one each time was the allocator's largest churn.
            self.spare.give(spans);
            return;
        }
        self.queued.fetch_add(spans.len(), Ordering::Relaxed);
        if let Err(e) = tx.try_send(spans) {
            let spans = match e {
                mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
            };
            self.queued.fetch_sub(spans.len(), Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(spans.len() as u64, Ordering::Relaxed);
            self.spare.give(spans);
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

/// The longest the event loop keeps a partial group of spans (the export delay, if shorter).
pub const HOLD: Duration = Duration::from_millis(100);

/// The spans the event loop gathers between two hand-outs to the export queue.
///
/// A whole batch goes as soon as it is gathered; fewer spans only once the first of them has
/// waited [`HOLD`]. At saturation the event loop reads the ring over a thousand times a second,
/// and handing out what each read made put groups of a few hundred spans in the queue, each in
/// a block with room for a batch (1,024 spans of 408 bytes) that the allocator had touched
/// before: with a full queue the agent's RSS under load was 44-51 MiB, and 38-41 MiB with
/// whole groups (docs/BENCHMARKS.md, eleventh session). The export task waits for a whole batch or its delay
/// (5 s by default) anyway, so a span is sent at most [`HOLD`] later than before.
#[derive(Default)]
pub struct Outbox {
    pub spans: Vec<Span>,
    /// When a call to `due` first saw spans gathered.
    waiting_since: Option<Instant>,
}

impl Outbox {
    /// Whether the spans gathered go now: `batch` of them or more, or any once `hold` has
    /// passed since a call first saw them (at `now`).
    pub fn due(&mut self, now: Instant, batch: usize, hold: Duration) -> bool {
        if self.spans.is_empty() {
            self.waiting_since = None;
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        self.spans.len() >= batch || now.saturating_duration_since(since) >= hold
    }

    /// The spans gathered, `next` (empty) in their place.
    pub fn take(&mut self, next: Vec<Span>) -> Vec<Span> {
        self.waiting_since = None;
        std::mem::replace(&mut self.spans, next)
    }
}

/// Groups the export task has emptied, for the event loop to fill again. A group has room for
/// a batch (1,024 spans of 408 bytes); a new one per hand-out, freed by the export task on
/// another thread, was a large block of the allocator's passing between threads about a
/// hundred times a second at saturation.
type Spare = Pool<Span>;

/// Groups kept: the hand-outs in the queue at saturation are one or two. A group that grew
/// past twice a batch goes back to the allocator, not to the event loop.
fn spare(max_batch: usize) -> Arc<Spare> {
    Arc::new(Pool::new(4, 2 * max_batch))
}

/// Where batches go; cloned (as handles) for each export in flight.
#[derive(Clone)]
enum Sink {
    Otlp(Arc<Transport>),
    Embedded(Arc<otlp_embedded::TraceServiceImpl>),
}

impl Sink {
    /// Sends one encoded `ExportTraceServiceRequest`.
    async fn export(self, request: wire::Request) -> anyhow::Result<()> {
        match self {
            Sink::Otlp(t) => t.export(request).await,
            Sink::Embedded(service) => embedded_export(&service, request.message()).await,
        }
    }
}

/// An OTLP connection and what each request carries.
enum Transport {
    Grpc {
        channel: tonic::transport::Channel,
        /// gRPC's and the configured headers of every call.
        headers: http::HeaderMap,
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
                Self::Grpc {
                    channel,
                    headers: grpc_headers(headers, timeout)?,
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

    async fn export(&self, request: wire::Request) -> anyhow::Result<()> {
        match self {
            Self::Grpc { channel, headers } => {
                grpc_export(channel.clone(), headers.clone(), request.grpc()).await
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
                    .body(request.message())
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

/// The most of an export call's answer read (an `ExportTraceServiceResponse` is a count and a
/// message).
const MAX_GRPC_ANSWER: usize = 64 * 1024;

/// The OTLP trace service's one method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The headers of every export call: gRPC's, the deadline, and the configured ones.
fn grpc_headers(
    configured: Vec<(String, String)>,
    timeout: Duration,
) -> anyhow::Result<http::HeaderMap> {
    use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, TE};
    let mut map = http::HeaderMap::new();
    for (k, v) in configured {
        let name = HeaderName::from_bytes(k.as_bytes())
            .with_context(|| format!("OTLP header name {k}"))?;
        let value = HeaderValue::from_str(&v)
            .with_context(|| format!("OTLP header {k}: not a valid value"))?;
        map.insert(name, value);
    }
    map.insert(TE, HeaderValue::from_static("trailers"));
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    // The server may stop working on a call the agent gave up on (milliseconds: 8 digits at
    // most for a day).
    let millis = timeout.as_millis().clamp(1, 99_999_999);
    map.insert(
        HeaderName::from_static("grpc-timeout"),
        HeaderValue::from_str(&format!("{millis}m")).expect("digits and a unit"),
    );
    Ok(map)
}

/// One unary `TraceService/Export` call on the channel's connection. The body is the request
/// already prefixed ([`wire::Request::grpc`]), handed to the transport as it is: tonic's
/// client would copy it into its own buffer first.
async fn grpc_export(
    mut channel: tonic::transport::Channel,
    headers: http::HeaderMap,
    body: Bytes,
) -> anyhow::Result<()> {
    use http_body_util::BodyExt as _;
    use tonic::codegen::Service as _;

    let mut call = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(body)));
    *call.method_mut() = http::Method::POST;
    // The channel puts the endpoint's scheme and authority in front.
    *call.uri_mut() = http::Uri::from_static(EXPORT_PATH);
    *call.version_mut() = http::Version::HTTP_2;
    *call.headers_mut() = headers;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| anyhow::anyhow!("OTLP/gRPC: {e}"))?;
    let response = channel
        .call(call)
        .await
        .map_err(|e| anyhow::anyhow!("OTLP/gRPC: {e}"))?;
    let (head, body) = response.into_parts();
    // A trailers-only answer (how a call that failed at once answers) has its status in the
    // headers and no body.
    if let Some(status) = grpc_status(&head.headers) {
        return grpc_ok(status);
    }
    // An answer is a few bytes; a backend that sends more is not read into memory.
    let body = http_body_util::Limited::new(body, MAX_GRPC_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("OTLP/gRPC response: {e}"))?;
    match body.trailers().and_then(grpc_status) {
        Some(status) => grpc_ok(status)?,
        None if !head.status.is_success() => {
            anyhow::bail!("OTLP/gRPC: HTTP status {}", head.status)
        }
        None => anyhow::bail!("OTLP/gRPC: the response ended without a grpc-status"),
    }
    let response = grpc_message(body.to_bytes())?;
    if let Some(p) = response.partial_success
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

/// The status in a response's headers or trailers (`grpc-status`, and `grpc-message`
/// percent-decoded), if they carry one. Read here, not by `tonic::Status::from_header_map`,
/// which panics on a `grpc-status-details-bin` that is not base64: whatever a backend or a
/// proxy sends, an export fails and is counted.
fn grpc_status(headers: &http::HeaderMap) -> Option<(tonic::Code, String)> {
    let code = tonic::Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    let message = headers
        .get("grpc-message")
        .map(|m| crate::trace::process::percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some((code, message))
}

fn grpc_ok((code, message): (tonic::Code, String)) -> anyhow::Result<()> {
    if code == tonic::Code::Ok {
        return Ok(());
    }
    anyhow::bail!("OTLP/gRPC: {code:?}: {message}")
}

/// The `ExportTraceServiceResponse` in a response body: one prefixed message, or none (a
/// server may end the stream with its trailers alone).
fn grpc_message(mut data: Bytes) -> anyhow::Result<ExportTraceServiceResponse> {
    if data.is_empty() {
        return Ok(ExportTraceServiceResponse::default());
    }
    anyhow::ensure!(
        data.len() >= wire::GRPC_PREFIX,
        "OTLP/gRPC response: {} bytes, shorter than a message prefix",
        data.len()
    );
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    anyhow::ensure!(
        compressed == 0,
        "OTLP/gRPC response: compressed, which the agent never accepts"
    );
    anyhow::ensure!(
        len == data.len(),
        "OTLP/gRPC response: a message of {len} bytes announced, {} received",
        data.len()
    );
    ExportTraceServiceResponse::decode(data).context("OTLP/gRPC response")
}

async fn run(
    mut rx: mpsc::Receiver<Vec<Span>>,
    queued: Arc<AtomicUsize>,
    sink: Sink,
    batching: Batching,
    stats: Arc<ExportStats>,
    spare: Arc<Spare>,
) {
    // The groups as the event loop handed them out, exported from where they are: a batch is
    // the next `max_batch` spans across them (no span is moved into a batch of its own, and no
    // batch grows past a group's room), and a group goes back to the event loop once all its
    // spans are encoded.
    let mut groups: VecDeque<Vec<Span>> = VecDeque::new();
    // Spans of the front group already exported, and spans received and not yet exported.
    let mut first = 0;
    let mut pending = 0;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut resources = Resources::new(crate::trace::process::host_name(), batching.max_concurrent);
    let mut closed = false;
    while !closed {
        let deadline = tokio::time::sleep(batching.delay);
        tokio::pin!(deadline);
        let mut due = false;
        while pending < batching.max_batch {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(group) => {
                        queued.fetch_sub(group.len(), Ordering::Relaxed);
                        pending += group.len();
                        if group.is_empty() {
                            spare.give(group);
                        } else {
                            groups.push_back(group);
                        }
                    }
                    None => { closed = true; break; }
                },
                () = &mut deadline => { due = true; break; }
            }
        }
        // Full batches go now; a partial one when the delay is over or at the end.
        while pending >= batching.max_batch || (pending > 0 && (due || closed)) {
            let take = pending.min(batching.max_batch);
            let parts = batch_parts(&groups, first, take);
            export_batch(
                &parts,
                &mut resources,
                &mut in_flight,
                &sink,
                &batching,
                &stats,
            )
            .await;
            drop(parts);
            pending -= take;
            let mut done = take;
            while let Some(front) = groups.front()
                && done >= front.len() - first
            {
                done -= front.len() - first;
                first = 0;
                spare.give(groups.pop_front().expect("a front group"));
            }
            first += done;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// The next `take` spans of `groups`, the first `first` spans of the front one already
/// exported, as slices of the groups.
fn batch_parts(groups: &VecDeque<Vec<Span>>, first: usize, take: usize) -> Vec<&[Span]> {
    let mut parts = Vec::new();
    let mut left = take;
    let mut start = first;
    for group in groups {
        if left == 0 {
            break;
        }
        let n = (group.len() - start).min(left);
        parts.push(&group[start..start + n]);
        left -= n;
        start = 0;
    }
    debug_assert_eq!(left, 0, "fewer spans in the groups than pending");
    parts
}

/// Encodes one batch and starts its export, after waiting for room among the exports in
/// flight.
async fn export_batch(
    batch: &[&[Span]],
    resources: &mut Resources,
    in_flight: &mut tokio::task::JoinSet<()>,
    sink: &Sink,
    batching: &Batching,
    stats: &Arc<ExportStats>,
) {
    let n = batch.iter().map(|part| part.len() as u64).sum::<u64>();
    let request = resources.request(batch);
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

/// The OTLP resource of each traced process, encoded once per process (and again when what is
/// known about it changes).
struct Resources {
    host: String,
    by_pid: HashMap<u32, (Arc<ProcessInfo>, Arc<[u8]>)>,
    scope: Vec<u8>,
    buffers: Arc<wire::Buffers>,
}

impl Resources {
    /// Resources for a task with up to `exports_at_once` requests in flight.
    fn new(host: String, exports_at_once: usize) -> Self {
        Self {
            host,
            by_pid: HashMap::new(),
            scope: wire::scope(),
            buffers: wire::buffers(exports_at_once),
        }
    }

    fn get(&mut self, info: &Arc<ProcessInfo>) -> Arc<[u8]> {
        if let Some((known, r)) = self.by_pid.get(&info.pid)
            && (Arc::ptr_eq(known, info) || **known == **info)
        {
            return r.clone();
        }
        let r: Arc<[u8]> = wire::resource(&info.resource(&self.host)).into();
        // Forget processes that no longer send spans: bounded by the processes of one batch
        // window at a time.
        if self.by_pid.len() >= 4096 {
            self.by_pid.clear();
        }
        self.by_pid.insert(info.pid, (info.clone(), r.clone()));
        r
    }

    /// One encoded `ExportTraceServiceRequest` for a batch (its spans in parts): a resource
    /// per process, one scope, the spans.
    fn request(&mut self, parts: &[&[Span]]) -> wire::Request {
        let mut owners: Vec<&Arc<ProcessInfo>> = Vec::new();
        let mut groups: Vec<wire::Group<'_>> = Vec::new();
        for s in parts.iter().flat_map(|part| part.iter()) {
            let info = &s.process;
            match owners
                .iter()
                .position(|p| Arc::ptr_eq(p, info) || ***p == **info)
            {
                Some(i) => groups[i].spans.push(s),
                None => {
                    owners.push(info);
                    groups.push(wire::Group {
                        resource: self.get(info),
                        spans: vec![s],
                    });
                }
            }
        }
        wire::request(&groups, &self.scope, &self.buffers)
    }
}

async fn embedded_export(
    service: &otlp_embedded::TraceServiceImpl,
    request: Bytes,
) -> anyhow::Result<()> {
    use otlp_embedded::TraceService as _;
    // The store has its own generated types of the same schema: decode the wire format.
    let request =
        otlp_embedded::proto::collector::trace::v1::ExportTraceServiceRequest::decode(request)?;
    service
        .export(tonic::Request::new(request))
        .await
        .map_err(|e| anyhow::anyhow!("embedded store: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::attributes::{Attributes, Side};

    /// A server span with the least attributes, of process `info`.
    fn plain_span(info: &Arc<ProcessInfo>, id: u8) -> Span {
        Span {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_span_id: None,
            parent_remote: false,
            link: None,
            name: "GET".into(),
            start_unix_ns: 1,
            end_unix_ns: 2,
            attributes: Attributes::least(Side::Server),
            error: None,
            flags: 1,
            trace_state: None,
            process: info.clone(),
        }
    }

    /// How the test's trace service answers a call.
    #[derive(Clone, Copy)]
    enum Answer {
        Accept,
        Refuse,
        RejectSome,
        /// A partial success whose message is larger than any answer the agent reads.
        Huge,
    }

    /// What the service saw of one call: spans, the test header, the deadline header.
    type Seen = Arc<std::sync::Mutex<Vec<(usize, Option<String>, Option<String>)>>>;

    /// A real gRPC trace service (tonic's server and the generated service).
    #[derive(Clone)]
    struct TestService {
        answer: Answer,
        seen: Seen,
    }

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for TestService
    {
        async fn export(
            &self,
            request: tonic::Request<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
            >,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
            let header = |k: &str| {
                request
                    .metadata()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            };
            let (test, deadline) = (header("x-wirespan-test"), header("grpc-timeout"));
            let spans = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.seen.lock().unwrap().push((spans, test, deadline));
            match self.answer {
                Answer::Accept => Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: None,
                })),
                Answer::Refuse => Err(tonic::Status::resource_exhausted("too much, slow down")),
                Answer::RejectSome => Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans: 2,
                        error_message: "spans too old".into(),
                    }),
                })),
                Answer::Huge => Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans: 0,
                        error_message: "x".repeat(MAX_GRPC_ANSWER + 1),
                    }),
                })),
            }
        }
    }

    /// Serves a `TestService` on a loopback port: the agent's configuration for it.
    async fn serve(answer: Answer) -> (OtlpConfig, Seen) {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let service = TraceServiceServer::new(TestService {
            answer,
            seen: seen.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let config = OtlpConfig {
            protocol: OtlpProtocol::Grpc,
            endpoint: Some(format!("http://{addr}")),
            traces_endpoint: None,
            timeout: Some(Duration::from_millis(2500)),
        };
        (config, seen)
    }

    /// Serves a `TestService` on a loopback port; the transport the agent would build for it.
    async fn grpc_service(answer: Answer) -> (Transport, Seen) {
        let (config, seen) = serve(answer).await;
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_HEADERS" => Ok("x-wirespan-test=from%20env".to_string()),
            _ => Err(std::env::VarError::NotPresent),
        };
        let batching = Batching::from_env(|_| None).unwrap();
        (Transport::new(&config, &batching, &env).unwrap(), seen)
    }

    #[tokio::test]
    async fn grpc_export_sends_the_batch_and_reads_the_answer() {
        let info = Arc::new(ProcessInfo {
            pid: 1,
            service_name: "s".into(),
            ..Default::default()
        });
        let batch: Vec<Span> = (1..=3).map(|i| plain_span(&info, i)).collect();
        let mut resources = Resources::new("host".into(), 1);

        let (accepting, seen) = grpc_service(Answer::Accept).await;
        accepting
            .export(resources.request(&[&batch]))
            .await
            .unwrap();
        accepting
            .export(resources.request(&[&batch[..1]]))
            .await
            .unwrap();
        let from_env = Some("from env".to_string());
        let deadline = Some("2500m".to_string());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (3, from_env.clone(), deadline.clone()),
                (1, from_env.clone(), deadline.clone())
            ]
        );

        // What an export of the batch to a service answering `answer` fails with.
        let failure = async |answer| {
            let (transport, seen) = grpc_service(answer).await;
            let e = transport.export(Resources::new("host".into(), 1).request(&[&batch]));
            (e.await.unwrap_err().to_string(), seen.lock().unwrap().len())
        };
        // An error status in the answer (tonic sends it in the headers, with no body).
        assert_eq!(
            failure(Answer::Refuse).await,
            (
                "OTLP/gRPC: ResourceExhausted: too much, slow down".into(),
                1
            )
        );
        // A partial success is a failure of the spans it names.
        assert_eq!(
            failure(Answer::RejectSome).await,
            ("the backend rejected 2 spans: spans too old".into(), 1)
        );
        // An answer larger than any real one is not read whole.
        let (e, _) = failure(Answer::Huge).await;
        assert!(
            e.starts_with("OTLP/gRPC response: length limit exceeded"),
            "{e}"
        );
    }

    #[test]
    fn grpc_status_is_read_from_any_headers() {
        let header = |v: &str| http::HeaderValue::from_str(v).unwrap();
        let mut h = http::HeaderMap::new();
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", header("8"));
        h.insert("grpc-message", header("too%20much%2C slow%zz down%4"));
        // Not base64: tonic's own reader of these headers panics on it.
        h.insert("grpc-status-details-bin", header("!!not base64!!"));
        assert_eq!(
            grpc_status(&h),
            Some((
                tonic::Code::ResourceExhausted,
                "too much, slow%zz down%4".to_string()
            ))
        );
        let e = grpc_ok(grpc_status(&h).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "OTLP/gRPC: ResourceExhausted: too much, slow%zz down%4"
        );
        h.insert("grpc-status", header("0"));
        assert!(grpc_ok(grpc_status(&h).unwrap()).is_ok());
        h.insert("grpc-status", header("banana"));
        h.remove("grpc-message");
        assert_eq!(grpc_status(&h), Some((tonic::Code::Unknown, String::new())));
    }

    #[test]
    fn grpc_answers_are_one_plain_message_or_none() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let answer = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 5,
                error_message: "full".into(),
            }),
        };
        let message = answer.encode_to_vec();
        let framed = |flag: u8, len: u32, message: &[u8]| {
            let mut b = vec![flag];
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(message);
            Bytes::from(b)
        };
        assert_eq!(
            grpc_message(Bytes::new()).unwrap(),
            ExportTraceServiceResponse::default()
        );
        assert_eq!(
            grpc_message(framed(0, message.len() as u32, &message)).unwrap(),
            answer
        );
        let e = grpc_message(Bytes::from_static(&[0, 0])).unwrap_err();
        assert!(
            e.to_string().contains("shorter than a message prefix"),
            "{e}"
        );
        let e = grpc_message(framed(1, message.len() as u32, &message)).unwrap_err();
        assert!(e.to_string().contains("compressed"), "{e}");
        let e = grpc_message(framed(0, 40, &message)).unwrap_err();
        assert!(e.to_string().contains("40 bytes announced"), "{e}");
    }

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
    fn one_resource_per_process() {
        use opentelemetry_proto::tonic::{
            collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value,
        };
        let process = |pid: u32, name: &str| {
            Arc::new(ProcessInfo {
                pid,
                service_name: name.into(),
                ..Default::default()
            })
        };
        let (a, b) = (process(3, "svc"), process(4, "other"));
        // An equal description in another allocation is the same process.
        let a2 = process(3, "svc");
        let mut r = Resources::new("h".into(), 1);
        let batch = [plain_span(&a, 1), plain_span(&b, 2), plain_span(&a2, 3)];
        let req = ExportTraceServiceRequest::decode(r.request(&[&batch]).message()).unwrap();
        assert_eq!(req.resource_spans.len(), 2);
        let service = |i: usize| {
            req.resource_spans[i]
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
        };
        assert_eq!(
            service(0),
            Some(any_value::Value::StringValue("svc".into()))
        );
        assert_eq!(
            service(1),
            Some(any_value::Value::StringValue("other".into()))
        );
        let ids = |i: usize| -> Vec<u8> {
            req.resource_spans[i].scope_spans[0]
                .spans
                .iter()
                .map(|s| s.span_id[0])
                .collect()
        };
        assert_eq!((ids(0), ids(1)), (vec![1, 3], vec![2]));
        // The resource is encoded once per process and reused.
        assert!(Arc::ptr_eq(&r.get(&a), &r.get(&a2)));
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

    /// An exporter to `config` sending batches of `max_batch` one at a time (they reach the
    /// service in order), a partial one only at shutdown.
    async fn exporter_to(config: OtlpConfig, max_batch: usize) -> Exporter {
        let batching = Batching {
            max_queue: 100,
            max_batch,
            delay: Duration::from_secs(60),
            export_timeout: Duration::from_secs(5),
            max_concurrent: 1,
        };
        Exporter::start(Target::Otlp(config), batching)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn requests_are_whole_batches_of_the_groups_handed_out() {
        let (config, seen) = serve(Answer::Accept).await;
        let exporter = exporter_to(config, 4).await;
        let info = Arc::new(ProcessInfo::default());
        let spans = |n: u8| (0..n).map(|i| plain_span(&info, i)).collect::<Vec<_>>();
        // Groups of 3, 3 and 10: split and joined into batches of 4, never more; the last
        // 4 go at the end without waiting for the delay.
        for n in [3, 3, 10] {
            exporter.send_all(spans(n));
        }
        let stats = exporter.stats.clone();
        exporter.shutdown(Duration::from_secs(5)).await;
        let sizes: Vec<usize> = seen.lock().unwrap().iter().map(|c| c.0).collect();
        assert_eq!(sizes, [4, 4, 4, 4]);
        assert_eq!(stats.exported.load(Ordering::Relaxed), 16);
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_come_back_to_the_event_loop_emptied() {
        let (config, seen) = serve(Answer::Accept).await;
        // Batches of 2: groups with room for up to 4 are kept.
        let exporter = exporter_to(config, 2).await;
        let info = Arc::new(ProcessInfo::default());
        let group = |room: usize, ids: &[u8]| {
            let mut g = Vec::with_capacity(room);
            g.extend(ids.iter().map(|&id| plain_span(&info, id)));
            g
        };
        let exported = async |n: usize| {
            let begin = std::time::Instant::now();
            while seen.lock().unwrap().len() < n {
                assert!(begin.elapsed() < Duration::from_secs(5), "not exported");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        // A batch is taken across groups in place: the first is one span of a group with
        // room for 3, with one of the next group's; the second is the rest of that group.
        let (a, b) = (group(3, &[1]), group(4, &[2, 3, 4]));
        let (sent_a, sent_b) = (a.as_ptr(), b.as_ptr());
        exporter.send_all(a);
        exporter.send_all(b);
        exported(2).await;
        assert_eq!(
            seen.lock().unwrap().iter().map(|c| c.0).collect::<Vec<_>>(),
            [2, 2]
        );
        // A group is given back just after its last batch is handed to the transport.
        let begin = std::time::Instant::now();
        while exporter.spare.kept() < 2 {
            assert!(begin.elapsed() < Duration::from_secs(5), "not given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Both groups came back as they were sent (not moved into a batch that grew), emptied,
        // the second last.
        let back = exporter.group();
        assert_eq!((back.as_ptr(), back.capacity(), back.len()), (sent_b, 4, 0));
        let back = exporter.group();
        assert_eq!((back.as_ptr(), back.capacity(), back.len()), (sent_a, 3, 0));
        // A group with more room than is kept goes back to the allocator.
        exporter.send_all(group(5, &[5, 6]));
        exported(3).await;
        let spare = exporter.spare.clone();
        exporter.shutdown(Duration::from_secs(5)).await;
        assert!(spare.take().is_none());
    }

    #[test]
    fn a_partial_group_waits_for_its_hold_and_a_whole_batch_does_not() {
        let info = Arc::new(ProcessInfo::default());
        let hold = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        assert!(!outbox.due(t0, 4, hold));
        // The wait starts when spans are first seen, not at the last hand-out.
        let t1 = t0 + Duration::from_secs(1);
        outbox.spans.push(plain_span(&info, 1));
        assert!(!outbox.due(t1, 4, hold));
        outbox.spans.push(plain_span(&info, 2));
        assert!(!outbox.due(t1 + Duration::from_millis(99), 4, hold));
        assert!(outbox.due(t1 + hold, 4, hold));
        assert_eq!(outbox.take(Vec::new()).len(), 2);
        // After a hand-out the next spans wait again from when they are seen.
        let t2 = t1 + Duration::from_secs(1);
        outbox.spans.push(plain_span(&info, 3));
        assert!(!outbox.due(t2, 4, hold));
        // A whole batch goes at once.
        outbox.spans.extend((4..7).map(|id| plain_span(&info, id)));
        assert!(outbox.due(t2, 4, hold));
        outbox.take(Vec::new());
        // Emptied some other way (a flush), the wait is forgotten.
        outbox.spans.push(plain_span(&info, 7));
        assert!(!outbox.due(t2, 4, hold));
        outbox.spans.clear();
        assert!(!outbox.due(t2 + hold, 4, hold));
        outbox.spans.push(plain_span(&info, 8));
        assert!(!outbox.due(t2 + hold, 4, hold));
    }

    #[tokio::test]
    async fn a_dropped_group_comes_back_for_the_next_hand_out() {
        let (config, _seen) = serve(Answer::Accept).await;
        let exporter = Exporter::start(
            Target::Otlp(config),
            Batching {
                max_queue: 2,
                max_batch: 2,
                delay: Duration::from_secs(60),
                export_timeout: Duration::from_secs(5),
                max_concurrent: 1,
            },
        )
        .await
        .unwrap();
        let info = Arc::new(ProcessInfo::default());
        let group = |room: usize| {
            let mut g = Vec::with_capacity(room);
            g.extend((0..2).map(|id| plain_span(&info, id)));
            g
        };
        // The export task cannot run while this single-threaded test sends: the first group
        // fills the queue and the second is dropped whole, and kept.
        exporter.send_all(group(2));
        let dropped = group(3);
        let sent = dropped.as_ptr();
        exporter.send_all(dropped);
        assert_eq!(exporter.stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        let back = exporter.group();
        assert_eq!((back.as_ptr(), back.capacity(), back.len()), (sent, 3, 0));
        exporter.shutdown(Duration::from_secs(5)).await;
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
        let span = |i: u8| plain_span(&info, i + 1);
        let stats = exporter.stats.clone();
        // The export task cannot run while this single-threaded test sends. A group of 3
        // fits; of the next 3 one fits and two are dropped; then the queue is full.
        exporter.send_all((0..3).map(span).collect());
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 0);
        exporter.send_all((3..6).map(span).collect());
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 2);
        for i in 6..10 {
            exporter.send_all(vec![span(i)]);
        }
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 6);
        exporter.shutdown(Duration::from_secs(5)).await;
        // The 4 queued were sent (and failed: nothing listens), none lost uncounted.
        assert_eq!(stats.failed.load(Ordering::Relaxed), 4);
    }
}
