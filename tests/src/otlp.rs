//! A real OTLP receiver for the tests: the gRPC trace service (tonic, on the
//! `opentelemetry-proto` types) and the HTTP/protobuf endpoint `POST /v1/traces`, both on
//! loopback, keeping every span they receive.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message as _;

/// One received span, flattened with its resource.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root.
    pub parent: String,
    pub name: String,
    /// "SERVER" or "CLIENT".
    pub kind: &'static str,
    pub error: bool,
    pub status_message: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: HashMap<String, String>,
    pub resource: HashMap<String, String>,
}

impl Span {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.get(k).map(|s| s.as_str())
    }
    pub fn service(&self) -> &str {
        self.resource
            .get("service.name")
            .map(|s| s.as_str())
            .unwrap_or("")
    }
    pub fn link(&self) -> &str {
        self.attr("wirespan.link").unwrap_or("")
    }
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn map(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Default)]
struct Store(
    Arc<Mutex<Vec<Span>>>,
    Arc<Mutex<Vec<String>>>,
    /// Spans received; with `count_only` nothing else is kept (for benchmarks).
    Arc<std::sync::atomic::AtomicU64>,
    bool,
);

impl Store {
    fn add(&self, req: ExportTraceServiceRequest) {
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.2
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if self.3 {
            return;
        }
        let mut spans = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| map(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let status = s.status.clone().unwrap_or_default();
                    spans.push(Span {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: match s.kind {
                            2 => "SERVER",
                            3 => "CLIENT",
                            _ => "OTHER",
                        },
                        error: status.code == 2,
                        status_message: status.message,
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        attrs: map(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(v) = request.metadata().get("x-wirespan-test") {
            self.1
                .lock()
                .unwrap()
                .push(v.to_str().unwrap_or("").to_string());
        }
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver; runs until dropped.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    store: Store,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// A receiver that only counts spans (for load tests: memory stays flat).
    pub fn start_counting() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.store.2.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver whose gRPC endpoint is `grpc` (to come back on the same address).
    pub fn start_on(grpc: SocketAddr) -> anyhow::Result<Self> {
        Self::start_at(false, grpc)
    }

    fn start_with(count_only: bool) -> anyhow::Result<Self> {
        Self::start_at(count_only, "127.0.0.1:0".parse()?)
    }

    fn start_at(count_only: bool, grpc_addr: SocketAddr) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let store = Store {
            3: count_only,
            ..Store::default()
        };
        let (grpc, http) = runtime.block_on(async {
            let grpc_listener = tokio::net::TcpListener::bind(grpc_addr).await?;
            let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((grpc_listener, http_listener))
        })?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let service = TraceServiceServer::new(store.clone());
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        let http_store = store.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let store = http_store.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body.as_ref()) {
                        Ok(req) => {
                            store.add(req);
                            (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse {
                                    partial_success: None,
                                }
                                .encode_to_vec(),
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "text/plain")],
                            b"bad protobuf".to_vec(),
                        ),
                    }
                }
            }),
        );
        runtime.spawn(async move {
            let _ = axum::serve(http, app).await;
        });
        Ok(Self {
            grpc: grpc_addr,
            http: http_addr,
            store,
            runtime: Some(runtime),
        })
    }

    /// Values of the `x-wirespan-test` header on gRPC exports.
    pub fn test_headers(&self) -> Vec<String> {
        self.store.1.lock().unwrap().clone()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.0.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the received spans (or `timeout` passes) and returns them.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if pred(&spans) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
