//! From socket events to linked spans.
//!
//! Each TCP connection gets two [`Stream`]s (one per direction) and a queue of exchanges:
//! requests matched to responses in order. A finished exchange becomes a SERVER or CLIENT span.
//! Its parent is decided by the most certain evidence available, and how is recorded on the
//! span (`wirespan.link`):
//!
//! - `connection`: a server span whose connection we saw from its first byte, and a client span
//!   of ours at the other end of the same connection (mirrored endpoints) whose request started
//!   at the same byte offset;
//! - `header`: the request's `traceparent`/B3 context. For a client span, a header that repeats
//!   the context a server span of the same process received puts it under that server span; a
//!   header naming any other span means the process is instrumented already (an OpenTelemetry
//!   SDK or a client that sends its own context), and wirespan stays out of its way: that
//!   client span, and the process's server spans, are not exported;
//! - `thread`: a request sent by a thread between reading a request and finishing its response,
//!   unless the thread was ever seen serving two requests at once, the process is a Go program,
//!   or the process answered a request from another thread than the one that read it;
//! - otherwise a new trace. A link that could be wrong is never made.
//!
//! Trace ids are settled lazily, when a span finishes: a server span's client may be reported by
//! the kernel a moment after the server read its bytes, so a server span that found no client
//! waits a little for it (see [`PEER_WAIT`]).

use std::{
    collections::{VecDeque, hash_map::Entry},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    capture::{Direction, EventKind, SocketEvent},
    clock::WallClock,
    http::{
        attributes::{self, Attributes, Exchange, Outcome, Side, Text},
        context::{self, Remote},
        framing::{self, Head, MessageKind, Output, Stream},
    },
};

use super::process::{OwnSockets, ProcessInfo};
use crate::{http::routes::Routes, identity::Pods, sampling::Sampler};

/// Traces kept by the agent's own sampling rules, remembered at most.
const MAX_KEPT_TRACES: usize = 4096;
/// How long such a trace is remembered.
const KEEP_TRACE: Duration = Duration::from_secs(30);

/// Keys here are kernel ids and random span ids, not attacker-chosen strings: a fast hash.
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// How long a server span without its client waits for the client's write to be reported.
pub const PEER_WAIT: Duration = Duration::from_millis(30);
/// Finished spans are remembered this long, for children and far ends that finish later.
/// (Late children: a call a handler makes after it answered.)
const KEEP_FINISHED: Duration = Duration::from_secs(2);
/// Finished spans remembered at most; older ones are forgotten first. Bounds memory at high
/// request rates (a span a child or far end still needs is almost always unfinished or fresh;
/// one whose span waits for its far end is kept anyway). 4,096 is 40 ms of spans at this
/// machine's saturation (100,000 spans/s), longer than `PEER_WAIT`, and 0.4 s at 10,000/s.
const MAX_FINISHED: usize = 4_096;
/// Connections without an event for this long are forgotten.
const IDLE_CONNECTION: Duration = Duration::from_secs(600);
/// Requests waiting for responses on one connection (pipelining depth).
const MAX_PENDING: usize = 256;
/// Connections tracked at once by default; more are counted and ignored.
pub const MAX_CONNECTIONS: usize = 262_144;

/// How a span's parent was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Header,
    Connection,
    Thread,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Header => "header",
            Link::Connection => "connection",
            Link::Thread => "thread",
        }
    }
}

/// A finished span, ready for export.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent is a span of another tracer (from a header).
    pub parent_remote: bool,
    /// How the parent was found: exported as `wirespan.link`.
    pub link: Option<Link>,
    pub name: Text,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Attributes,
    /// `Some` marks an error, with a description (possibly empty).
    pub error: Option<&'static str>,
    pub flags: u8,
    pub trace_state: Option<String>,
    pub process: Arc<ProcessInfo>,
}

/// Counters of what the stitcher saw and did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub undecodable_events: u64,
    pub http: framing::Stats,
    pub invalid_trace_headers: u64,
    pub spans: u64,
    /// Of `spans`, server spans.
    pub server_spans: u64,
    /// Spans not exported because the process is instrumented already.
    pub suppressed: u64,
    /// Spans not exported because their trace is not sampled.
    pub unsampled: u64,
    /// Spans of unsampled traces kept by the agent's rules (errors, slow spans).
    pub kept_by_rule: u64,
    /// Connections between a traced process and wirespan itself, ignored.
    pub own_connections: u64,
    pub connections_dropped: u64,
    /// Requests given up: waiting for a response too long, beyond `MAX_PENDING`, or in
    /// progress on a connection that lost records.
    pub pending_dropped: u64,
    /// Connections read again from the next message after records of theirs were lost (see
    /// `kind::DATA_AFTER_LOSS`).
    pub resynced_after_loss: u64,
    /// `DataMore` records that did not continue the call they follow (their first record was
    /// lost): the call is used with the bytes that did arrive.
    pub orphan_continuations: u64,
    /// OTLP export requests seen (never made into spans).
    pub telemetry_requests: u64,
    /// Requests in progress when their process exited (ended as cut-off error spans).
    pub process_exits: u64,
}

/// Whether `pid` is running: it has a /proc entry and is not a zombie (a killed process whose
/// parent has not reaped it yet has closed its sockets already).
fn process_alive(proc_root: &std::path::Path, pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | Some("x"))
}

/// An OTLP/HTTP export request (`POST /v1/traces`, `/v1/metrics`, `/v1/logs`).
fn is_telemetry_export(head: &Head) -> bool {
    let (path, _) = attributes::split_target(&head.target);
    &*head.method == "POST" && matches!(path, "/v1/traces" | "/v1/metrics" | "/v1/logs")
}

#[derive(Clone, Debug)]
enum Parent {
    Root,
    Span(SpanId, Link),
    /// Context from a header that names no span of ours.
    Remote(Remote),
    /// The client span at the other end of the connection (found by the node's `peer_key`),
    /// if there is one, else the header.
    Peer {
        header: Option<Remote>,
    },
}

/// Client endpoint, server endpoint, and the request's byte offset on the connection: the
/// addresses exactly, as IPv6 (an IPv4 one mapped), in 48 bytes (a `SocketAddr` pair takes 64
/// and hashes field by field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PeerKey {
    client_ip: [u64; 2],
    server_ip: [u64; 2],
    /// Client port in the high half, server port in the low.
    ports: u32,
    offset: u64,
}

impl PeerKey {
    fn new(client: SocketAddr, server: SocketAddr, offset: u64) -> Self {
        let ip = |a: &SocketAddr| {
            let v6 = match a.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            let b = u128::from(v6);
            [(b >> 64) as u64, b as u64]
        };
        PeerKey {
            client_ip: ip(&client),
            server_ip: ip(&server),
            ports: u32::from(client.port()) << 16 | u32::from(server.port()),
            offset,
        }
    }
}

#[derive(Clone, Debug)]
struct Resolved {
    trace_id: TraceId,
    sampled: bool,
    flags: u8,
    trace_state: Option<String>,
    parent: Option<(SpanId, bool, Link)>,
}

#[derive(Debug)]
struct Node {
    parent: Parent,
    resolved: Option<Resolved>,
    pid: u32,
    side: Side,
    /// Not exported: the process made this span itself.
    suppressed: bool,
    finished: Option<Instant>,
    /// The connection's key for this request: the one a client span is indexed by in
    /// `Stitcher::clients`, the one a server span's `Parent::Peer` looks up.
    peer_key: Option<PeerKey>,
    /// Waiting in `Stitcher::deferred`.
    deferred: bool,
}

/// A request waiting for (or receiving) its response.
#[derive(Debug)]
struct Pending {
    id: SpanId,
    head: Head,
    start_ts: u64,
    request_body: u64,
    tid: u32,
    status: Option<u16>,
    /// Informational (1xx) response heads seen, whose ends are skipped.
    informational: u32,
}

#[derive(Debug)]
struct Conn {
    pid: u32,
    side: Option<Side>,
    from_start: bool,
    local: SocketAddr,
    remote: SocketAddr,
    /// The addresses as span attributes write them, formatted once.
    local_ip: Text,
    remote_ip: Text,
    ingress: Stream,
    egress: Stream,
    pending: VecDeque<Pending>,
    /// The far end is wirespan: nothing here is traced.
    own: bool,
    /// When the connection was first seen, while `own` is not settled yet (see
    /// `OwnSockets::is_own`): asked again at each of its events until it is.
    own_unsettled: Option<Instant>,
    last_seen: Instant,
    /// Kernel time of the connection's last event.
    last_ts: u64,
}

#[derive(Debug, Default)]
struct ThreadState {
    active: Option<SpanId>,
    multiplexed: bool,
}

#[derive(Debug)]
struct Proc {
    info: Arc<ProcessInfo>,
    /// Makes its own spans (sends context naming spans that are not ours).
    instrumented: bool,
    /// Answered a request from another thread than the one that read it.
    cross_thread: bool,
    /// Contexts received by its server spans still being served: (trace, span) -> our server
    /// span.
    /// (Keys come from request headers: the standard, DoS-resistant hash.)
    received: std::collections::HashMap<(TraceId, SpanId), SpanId>,
    last_seen: Instant,
    /// When `info` was read.
    read_at: Instant,
}

/// A call whose later bytes are still arriving in `DataMore` records.
struct Assembling {
    event: SocketEvent<'static>,
    bytes: Vec<u8>,
    left: u16,
    since: Instant,
}

/// A finished exchange whose parent may still appear.
struct Deferred {
    since: Instant,
    span: Span,
    id: SpanId,
}

/// Turns socket events into spans.
pub struct Stitcher {
    clock: WallClock,
    proc_root: PathBuf,
    /// Boxed: a connection is taken out of the map for each of its events (its handling needs
    /// the rest of `self`), and moving a pointer is cheaper than moving two stream states.
    conns: HashMap<u64, Box<Conn>>,
    /// Boxed: the table moves 8 bytes per insert and removal instead of the node, and its
    /// empty slots cost 8 bytes each, not a node's size.
    nodes: HashMap<SpanId, Box<Node>>,
    clients: HashMap<PeerKey, SpanId>,
    threads: HashMap<u32, ThreadState>,
    procs: HashMap<u32, Proc>,
    own: OwnSockets,
    deferred: VecDeque<Deferred>,
    /// Finished spans in the order they finished, for forgetting them.
    finished: VecDeque<(Instant, SpanId)>,
    assembling: HashMap<u64, Assembling>,
    /// The framing's outputs of one call, kept between calls for its allocation.
    outputs: Vec<Output>,
    /// `resolve`'s walk up a span's ancestors, kept between spans for its allocation.
    ancestors: Vec<SpanId>,
    rng: fastrand::Rng,
    last_prune: Instant,
    /// A coarse clock, advanced by `tick`: reading the clock per event costs more than the
    /// precision is worth for expiry.
    now: Instant,
    /// Replace query values with `REDACTED` (default true).
    pub redact_query: bool,
    /// Connections tracked at once; more are counted (`connections_dropped`) and ignored.
    pub max_connections: usize,
    pub sampler: Sampler,
    /// Traces the agent's own rules kept a span of, and since when.
    kept_traces: HashMap<TraceId, Instant>,
    /// Span names and `http.route` / `url.template`.
    pub routes: Routes,
    /// Strings that recur from span to span (routes, names, addresses, `Host` and
    /// `User-Agent` values, error statuses), kept once for all spans.
    interner: attributes::Interner,
    /// Pods of this node, when Kubernetes metadata is on.
    pub pods: Option<Arc<Pods>>,
    pub stats: Stats,
}

impl Stitcher {
    pub fn new(clock: WallClock) -> Self {
        Self::with_proc_root(clock, PathBuf::from("/proc"))
    }

    pub fn with_proc_root(clock: WallClock, proc_root: PathBuf) -> Self {
        Self {
            clock,
            proc_root,
            conns: HashMap::default(),
            nodes: HashMap::default(),
            clients: HashMap::default(),
            threads: HashMap::default(),
            procs: HashMap::default(),
            own: OwnSockets::new(),
            deferred: VecDeque::new(),
            finished: VecDeque::new(),
            assembling: HashMap::default(),
            outputs: Vec::new(),
            ancestors: Vec::new(),
            rng: fastrand::Rng::new(),
            last_prune: Instant::now(),
            now: Instant::now(),
            redact_query: true,
            max_connections: MAX_CONNECTIONS,
            sampler: Sampler::default(),
            kept_traces: HashMap::default(),
            routes: Routes::default(),
            interner: attributes::Interner::default(),
            pods: None,
            stats: Stats::default(),
        }
    }

    /// Sizes of the internal tables: connections, processes, spans remembered, client spans by
    /// connection, threads, spans waiting for their peer, strings interned.
    pub fn table_sizes(&self) -> [usize; 7] {
        [
            self.conns.len(),
            self.procs.len(),
            self.nodes.len(),
            self.clients.len(),
            self.threads.len(),
            self.deferred.len(),
            self.interner.kept().0,
        ]
    }

    fn span_id(&mut self) -> SpanId {
        loop {
            let id = self.rng.u64(..).to_be_bytes();
            if id != [0; 8] && !self.nodes.contains_key(&id) {
                return id;
            }
        }
    }

    fn trace_id(&mut self) -> TraceId {
        loop {
            let id = self.rng.u128(..).to_be_bytes();
            if id != [0; 16] {
                return id;
            }
        }
    }

    fn proc(&mut self, pid: u32, comm: &str) -> &mut Proc {
        let root = &self.proc_root;
        let now = self.now;
        let pods = self.pods.as_deref();
        let p = self.procs.entry(pid).or_insert_with(|| Proc {
            info: Arc::new(ProcessInfo::read(root, pid, comm, pods)),
            read_at: now,
            instrumented: false,
            cross_thread: false,
            received: std::collections::HashMap::new(),
            last_seen: now,
        });
        p.last_seen = now;
        // A process in a pod the watcher had not reported yet is read again once a second,
        // until its pod is known.
        if p.info.k8s_pending && now.duration_since(p.read_at) >= Duration::from_secs(1) {
            p.info = Arc::new(ProcessInfo::read(root, pid, &p.info.executable_name, pods));
            p.read_at = now;
        }
        p
    }

    /// Handles one socket event; finished spans are appended to `out`.
    pub fn event(&mut self, ev: &SocketEvent<'_>, out: &mut Vec<Span>) {
        self.stats.events += 1;
        let id = ev.header.conn_id;
        // A call sent in several records (a large request head) is put back together first.
        if let EventKind::DataMore(_) = ev.kind {
            let fits = self.assembling.get(&id).is_some_and(|a| {
                a.event.header.tid == ev.header.tid
                    && a.bytes.len() as u64 == u64::from(ev.header.offset)
            });
            if !fits {
                self.stats.orphan_continuations += 1;
                self.flush_assembling(id, out);
                return;
            }
            if let Some(a) = self.assembling.get_mut(&id) {
                a.bytes.extend_from_slice(ev.payload);
                a.left = a.left.saturating_sub(1);
                if a.left > 0 {
                    return;
                }
            }
            self.flush_assembling(id, out);
            return;
        }
        self.flush_assembling(id, out);
        if let EventKind::Data(_) = ev.kind
            && ev.header.more > 0
        {
            self.assembling.insert(
                id,
                Assembling {
                    event: SocketEvent {
                        header: ev.header,
                        kind: ev.kind,
                        payload: &[],
                    },
                    bytes: ev.payload.to_vec(),
                    left: ev.header.more,
                    since: Instant::now(),
                },
            );
            return;
        }
        self.event_whole(ev, out);
    }

    /// Processes a call being assembled with what has arrived of it.
    fn flush_assembling(&mut self, id: u64, out: &mut Vec<Span>) {
        if let Some(a) = self.assembling.remove(&id) {
            let mut ev = a.event;
            ev.header.captured = a.bytes.len() as u32;
            ev.payload = &a.bytes;
            self.event_whole(&ev, out);
        }
    }

    fn event_whole(&mut self, ev: &SocketEvent<'_>, out: &mut Vec<Span>) {
        let h = &ev.header;
        let id = h.conn_id;
        match ev.kind {
            EventKind::Accept | EventKind::Connect => {
                // A new connection on this socket: anything left from an old one is over.
                if let Some(old) = self.conns.remove(&id) {
                    self.close_conn(old, h.ts_ns, out);
                }
                let side = if ev.kind == EventKind::Accept {
                    Side::Server
                } else {
                    Side::Client
                };
                // Read what /proc says about the process at its first sight, before anything
                // else: a short-lived client (curl, a script) may exit within milliseconds of
                // its connect, sooner than the own-socket check of a new connection takes.
                self.proc(h.pid, ev.comm());
                if let Some(conn) = self.new_conn(ev, Some(side), true) {
                    self.conns.insert(id, conn);
                }
            }
            EventKind::Data(dir) => {
                self.proc(h.pid, ev.comm());
                let Some(mut conn) = self
                    .conns
                    .remove(&id)
                    .or_else(|| self.new_conn(ev, None, false))
                else {
                    return;
                };
                conn.last_seen = self.now;
                conn.last_ts = h.ts_ns;
                if let Some(seen) = conn.own_unsettled {
                    self.settle_own(&mut conn, seen);
                }
                if ev.after_loss() {
                    self.resync_after_loss(&mut conn);
                }
                if !conn.own {
                    self.data(&mut conn, ev, dir, out);
                }
                self.conns.insert(id, conn);
            }
            EventKind::Close => {
                if let Some(conn) = self.conns.remove(&id) {
                    self.close_conn(conn, h.ts_ns, out);
                }
            }
            EventKind::DataMore(_) => {}
        }
    }

    /// Asks again whether a connection first seen at `seen` is wirespan's own. One found to
    /// be ours drops what it had in progress, untraced (the telemetry-export check kept any
    /// export request in it from becoming a span meanwhile).
    fn settle_own(&mut self, conn: &mut Conn, seen: Instant) {
        let Some(own) = self.own.is_own(conn.local, conn.remote, seen) else {
            return;
        };
        conn.own_unsettled = None;
        if own {
            conn.own = true;
            self.stats.own_connections += 1;
            for p in conn.pending.drain(..) {
                self.forget_node(p.id);
            }
        }
    }

    /// Records of this connection were lost before this one (`kind::DATA_AFTER_LOSS`): in
    /// either direction, whole requests or responses may be missing, so a response that comes
    /// next could belong to any request in progress. Those are given up (counted), both
    /// directions are read again from the next message that starts a call, as on a connection
    /// joined midway, and its byte offsets (which the missing bytes put out of step with the
    /// peer's) no longer link spans.
    fn resync_after_loss(&mut self, conn: &mut Conn) {
        self.stats.resynced_after_loss += 1;
        self.give_up(std::mem::take(&mut conn.pending));
        conn.ingress = Stream::joined_midway(conn.ingress.kind());
        conn.egress = Stream::joined_midway(conn.egress.kind());
        conn.from_start = false;
    }

    /// Requests that will get no response here: forgotten, and counted as given up.
    fn give_up(&mut self, pending: VecDeque<Pending>) {
        for p in pending {
            self.forget_node(p.id);
            self.stats.pending_dropped += 1;
        }
    }

    /// A connection's state from its first event, unless the table is full (counted).
    fn new_conn(
        &mut self,
        ev: &SocketEvent<'_>,
        side: Option<Side>,
        from_start: bool,
    ) -> Option<Box<Conn>> {
        if self.conns.len() >= self.max_connections {
            self.stats.connections_dropped += 1;
            return None;
        }
        let (ingress_kind, egress_kind) = match side {
            Some(Side::Server) => (Some(MessageKind::Request), Some(MessageKind::Response)),
            Some(Side::Client) => (Some(MessageKind::Response), Some(MessageKind::Request)),
            None => (None, None),
        };
        let stream = |k| {
            if from_start {
                Stream::new(k)
            } else {
                Stream::joined_midway(k)
            }
        };
        let remote = ev.remote();
        let seen = Instant::now();
        let verdict = self.own.is_own(ev.local(), remote, seen);
        let own = verdict == Some(true);
        if own {
            self.stats.own_connections += 1;
        }
        Some(Box::new(Conn {
            pid: ev.header.pid,
            side,
            from_start,
            local: ev.local(),
            remote,
            local_ip: self.interner.text(&attributes::ip_text(&ev.local())),
            remote_ip: self.interner.text(&attributes::ip_text(&remote)),
            ingress: stream(ingress_kind),
            egress: stream(egress_kind),
            pending: VecDeque::new(),
            own,
            own_unsettled: verdict.is_none().then_some(seen),
            last_seen: self.now,
            last_ts: ev.header.ts_ns,
        }))
    }

    fn data(&mut self, conn: &mut Conn, ev: &SocketEvent<'_>, dir: Direction, out: &mut Vec<Span>) {
        let h = &ev.header;
        let mut outputs = std::mem::take(&mut self.outputs);
        let before = match dir {
            Direction::Ingress => conn.ingress.stats,
            Direction::Egress => conn.egress.stats,
        };
        {
            let Conn {
                ingress,
                egress,
                pending,
                side,
                ..
            } = conn;
            let stream = match dir {
                Direction::Ingress => ingress,
                Direction::Egress => egress,
            };
            // Requests come from whichever side the stream carries; the response framing
            // needs the method of the oldest request without a final response.
            let mut frame = |head: &Head| match head.kind {
                Some(MessageKind::Request) => framing::request_body(head),
                _ => {
                    let method = pending
                        .iter()
                        .find(|p| p.status.is_none())
                        .map(|p| &*p.head.method);
                    framing::response_body(head, method)
                }
            };
            stream.feed(
                h.ts_ns,
                h.len,
                ev.payload,
                &mut frame,
                &mut self.interner,
                &mut outputs,
            );
            if side.is_none() {
                // Role of a connection seen midway: whoever reads requests serves them.
                *side = match (dir, stream.kind()) {
                    (Direction::Ingress, Some(MessageKind::Request))
                    | (Direction::Egress, Some(MessageKind::Response)) => Some(Side::Server),
                    (Direction::Egress, Some(MessageKind::Request))
                    | (Direction::Ingress, Some(MessageKind::Response)) => Some(Side::Client),
                    _ => None,
                };
            }
        }
        let after = match dir {
            Direction::Ingress => conn.ingress.stats,
            Direction::Egress => conn.egress.stats,
        };
        let mut delta = after;
        delta.malformed -= before.malformed;
        delta.oversized -= before.oversized;
        delta.truncated -= before.truncated;
        delta.skipped_calls -= before.skipped_calls;
        self.stats.http.add(&delta);
        if let Some(side) = conn.side {
            let requests_dir = match side {
                Side::Server => Direction::Ingress,
                Side::Client => Direction::Egress,
            };
            // By reference: a head is taken out of the list where it is used, not moved
            // through each call on the way (heads are large and most of them are responses,
            // of which only the status is read).
            for o in outputs.iter_mut() {
                if dir == requests_dir {
                    self.request_output(conn, side, ev, o);
                } else {
                    self.response_output(conn, side, ev, o, out);
                }
            }
        }
        outputs.clear();
        self.outputs = outputs;
    }

    fn request_output(
        &mut self,
        conn: &mut Conn,
        side: Side,
        ev: &SocketEvent<'_>,
        o: &mut Output,
    ) {
        match o {
            Output::Head { head, ts, offset } => {
                let (ts, offset) = (*ts, *offset);
                if head.kind != Some(MessageKind::Request) {
                    return;
                }
                if conn.pending.len() >= MAX_PENDING {
                    self.stats.pending_dropped += 1;
                    return;
                }
                let id = self.span_id();
                let tid = ev.header.tid;
                let pid = ev.header.pid;
                let header = match context::extract(head) {
                    Ok(c) => c,
                    Err(_) => {
                        self.stats.invalid_trace_headers += 1;
                        None
                    }
                };
                let mut peer_key = None;
                let telemetry = is_telemetry_export(head);
                if telemetry {
                    // OTLP export is telemetry plumbing, not the application's work: no span
                    // at either end, and a client that exports is instrumented already.
                    self.stats.telemetry_requests += 1;
                    if side == Side::Client {
                        self.proc(pid, ev.comm()).instrumented = true;
                    }
                }
                let (parent, mut suppressed) = match side {
                    Side::Server => {
                        if let Some(h) = &header {
                            let p = self.proc(pid, ev.comm());
                            p.received.insert((h.trace_id, h.span_id), id);
                        }
                        let parent = if conn.from_start {
                            peer_key = Some(PeerKey::new(conn.remote, conn.local, offset));
                            Parent::Peer { header }
                        } else {
                            match header {
                                Some(h) => Parent::Remote(h),
                                None => Parent::Root,
                            }
                        };
                        let t = self.threads.entry(tid).or_default();
                        if let Some(a) = t.active
                            && self.nodes.get(&a).is_some_and(|n| n.finished.is_none())
                        {
                            t.multiplexed = true;
                        }
                        t.active = Some(id);
                        (parent, false)
                    }
                    Side::Client => {
                        if conn.from_start {
                            peer_key = Some(PeerKey::new(conn.local, conn.remote, offset));
                        }
                        self.client_parent(pid, tid, ev.comm(), header)
                    }
                };
                suppressed |= telemetry;
                if let Some(k) = peer_key
                    && side == Side::Client
                {
                    self.clients.insert(k, id);
                }
                self.nodes.insert(
                    id,
                    Box::new(Node {
                        parent,
                        resolved: None,
                        pid,
                        side,
                        suppressed,
                        finished: None,
                        peer_key,
                        deferred: false,
                    }),
                );
                conn.pending.push_back(Pending {
                    id,
                    head: std::mem::take(head),
                    start_ts: ts,
                    request_body: 0,
                    tid,
                    status: None,
                    informational: 0,
                });
            }
            Output::End { body_bytes, .. } => {
                if let Some(p) = conn.pending.back_mut() {
                    p.request_body = *body_bytes;
                }
            }
        }
    }

    /// Parent of a client span sent by thread `tid` of process `pid`.
    fn client_parent(
        &mut self,
        pid: u32,
        tid: u32,
        comm: &str,
        header: Option<Remote>,
    ) -> (Parent, bool) {
        let ours = header
            .as_ref()
            .is_some_and(|h| self.nodes.contains_key(&h.span_id));
        let proc = self.proc(pid, comm);
        if let Some(h) = header {
            if let Some(server) = proc.received.get(&(h.trace_id, h.span_id)) {
                // The process forwards the context it received.
                return (Parent::Span(*server, Link::Header), false);
            }
            if ours {
                return (Parent::Span(h.span_id, Link::Header), false);
            }
            // The header names a span the process made itself.
            proc.instrumented = true;
            return (Parent::Remote(h), true);
        }
        let go = proc.info.go;
        let cross = proc.cross_thread;
        if go || cross {
            return (Parent::Root, false);
        }
        let Some(t) = self.threads.get(&tid) else {
            return (Parent::Root, false);
        };
        match t.active {
            Some(a)
                if !t.multiplexed
                    && self
                        .nodes
                        .get(&a)
                        .is_some_and(|n| n.finished.is_none() && n.pid == pid) =>
            {
                (Parent::Span(a, Link::Thread), false)
            }
            _ => (Parent::Root, false),
        }
    }

    fn response_output(
        &mut self,
        conn: &mut Conn,
        side: Side,
        ev: &SocketEvent<'_>,
        o: &mut Output,
        out: &mut Vec<Span>,
    ) {
        match *o {
            Output::Head { ref head, .. } => {
                let Some(p) = conn.pending.iter_mut().find(|p| p.status.is_none()) else {
                    return;
                };
                if (100..200).contains(&head.status) && head.status != 101 {
                    p.informational += 1;
                } else {
                    p.status = Some(head.status);
                }
            }
            Output::End {
                ts,
                body_bytes,
                complete,
            } => {
                let Some(front) = conn.pending.front_mut() else {
                    return;
                };
                if front.informational > 0 {
                    front.informational -= 1;
                    return;
                }
                let Some(p) = conn.pending.pop_front() else {
                    return;
                };
                let outcome = match (p.status, complete) {
                    (Some(code), true) => Outcome::Response(code),
                    _ => Outcome::CutOff,
                };
                if side == Side::Server && ev.header.tid != p.tid {
                    let comm = ev.comm().to_string();
                    self.proc(conn.pid, &comm).cross_thread = true;
                }
                self.finish(conn, side, p, ts, outcome, body_bytes, out);
            }
        }
    }

    fn close_conn(&mut self, mut conn: Box<Conn>, ts: u64, out: &mut Vec<Span>) {
        if conn.own {
            return;
        }
        let mut outputs = Vec::new();
        conn.ingress.close(ts, &mut outputs);
        let ingress_outputs = std::mem::take(&mut outputs);
        conn.egress.close(ts, &mut outputs);
        if let Some(side) = conn.side {
            let (req, resp) = match side {
                Side::Server => (ingress_outputs, outputs),
                Side::Client => (outputs, ingress_outputs),
            };
            // Only ends come out of a close.
            for o in req {
                if let Output::End { body_bytes, .. } = o
                    && let Some(p) = conn.pending.back_mut()
                {
                    p.request_body = body_bytes;
                }
            }
            for o in resp {
                if let Output::End {
                    ts,
                    body_bytes,
                    complete,
                } = o
                    && let Some(p) = conn.pending.pop_front()
                {
                    let outcome = match (p.status, complete) {
                        (Some(code), true) => Outcome::Response(code),
                        _ => Outcome::CutOff,
                    };
                    self.finish(&conn, side, p, ts, outcome, body_bytes, out);
                }
            }
            while let Some(p) = conn.pending.pop_front() {
                self.finish(&conn, side, p, ts, Outcome::CutOff, 0, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        conn: &Conn,
        side: Side,
        p: Pending,
        end_ts: u64,
        outcome: Outcome,
        response_body: u64,
        out: &mut Vec<Span>,
    ) {
        let mut head = p.head;
        let mut ex = Exchange {
            side,
            request: &mut head,
            response_status: match outcome {
                Outcome::Response(c) => Some(c),
                Outcome::CutOff => p.status,
            },
            outcome,
            local: conn.local,
            remote: conn.remote,
            local_ip: conn.local_ip.clone(),
            remote_ip: conn.remote_ip.clone(),
            request_body: p.request_body,
            response_body,
            redact_query: self.redact_query,
        };
        let routes = &self.routes;
        let attrs = attributes::attributes(&mut ex, &mut self.interner, |path, interner| {
            interner.text_of(|s| routes.route_into(path, s))
        });
        let error = attributes::error(&ex);
        let name = attributes::span_name(&head.method, attrs.route.as_deref(), &mut self.interner);
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(&p.id) {
            n.finished = Some(now);
            self.finished.push_back((now, p.id));
        }
        if let Some(t) = self.threads.get_mut(&p.tid)
            && t.active == Some(p.id)
        {
            t.active = None;
        }
        // Known since the connection's first event (`event_whole` registers the process).
        let info = self.proc(conn.pid, "").info.clone();
        let span = Span {
            trace_id: [0; 16],
            span_id: p.id,
            parent_span_id: None,
            parent_remote: false,
            link: None,
            name,
            start_unix_ns: self.clock.to_unix_ns(p.start_ts),
            end_unix_ns: self.clock.to_unix_ns(end_ts),
            attributes: attrs,
            error,
            flags: 1,
            trace_state: None,
            process: info,
        };
        self.stats.spans += 1;
        if side == Side::Server {
            self.stats.server_spans += 1;
        }
        if self.awaits_peer(p.id) {
            if let Some(n) = self.nodes.get_mut(&p.id) {
                n.deferred = true;
            }
            self.deferred.push_back(Deferred {
                since: Instant::now(),
                span,
                id: p.id,
            });
        } else {
            self.emit(p.id, span, out);
        }
    }

    /// Settles the span's trace and parent, and hands it out unless it is not to be exported.
    fn emit(&mut self, id: SpanId, mut span: Span, out: &mut Vec<Span>) {
        let r = self.resolve(id);
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        let instrumented =
            node.side == Side::Server && self.procs.get(&node.pid).is_some_and(|p| p.instrumented);
        if node.suppressed || instrumented {
            self.stats.suppressed += 1;
            return;
        }
        if !r.sampled {
            let kept_trace = self.kept_traces.contains_key(&r.trace_id);
            let duration = span.end_unix_ns.saturating_sub(span.start_unix_ns);
            if !kept_trace && !self.sampler.keep_anyway(span.error.is_some(), duration) {
                self.stats.unsampled += 1;
                return;
            }
            // Kept by the agent's own rules: the rest of the trace this agent still sees
            // (the parents, which end later) is kept with it.
            self.stats.kept_by_rule += 1;
            if !kept_trace && self.kept_traces.len() < MAX_KEPT_TRACES {
                self.kept_traces.insert(r.trace_id, self.now);
            }
        }
        span.trace_id = r.trace_id;
        // Exported means sampled, whoever decided.
        span.flags = r.flags | 1;
        span.trace_state = r.trace_state;
        if let Some((parent, remote, link)) = r.parent {
            span.parent_span_id = Some(parent);
            span.parent_remote = remote;
            span.link = Some(link);
        }
        out.push(span);
    }

    /// The trace a span belongs to, fixed the first time it is asked for.
    fn resolve(&mut self, id: SpanId) -> Resolved {
        // Walk up to the first ancestor whose trace is settled (or a root), then settle the
        // path top-down. Depth is bounded: a cycle cannot form (parents are older), but a bound
        // keeps a corrupted map from looping.
        let mut path = std::mem::take(&mut self.ancestors);
        path.clear();
        path.push(id);
        let mut top: Option<Resolved> = None;
        while path.len() < 256 {
            let cur = *path.last().unwrap_or(&id);
            let Some(node) = self.nodes.get(&cur) else {
                break;
            };
            if let Some(r) = &node.resolved {
                top = Some(r.clone());
                path.pop();
                break;
            }
            let next = match &node.parent {
                Parent::Span(p, _) => Some(*p),
                Parent::Peer { .. } => self
                    .peer(node)
                    .filter(|c| self.nodes.get(c).is_some_and(|n| !n.suppressed)),
                _ => None,
            };
            match next.filter(|n| self.nodes.contains_key(n) && !path.contains(n)) {
                Some(n) => path.push(n),
                None => break,
            }
        }
        let mut above = top;
        while let Some(cur) = path.pop() {
            let r = self.settle(cur, above.as_ref());
            if let Some(n) = self.nodes.get_mut(&cur) {
                n.resolved = Some(r.clone());
            }
            above = Some(r);
        }
        self.ancestors = path;
        above.unwrap_or(Resolved {
            trace_id: [0; 16],
            sampled: false,
            flags: 0,
            trace_state: None,
            parent: None,
        })
    }

    /// Settles one node given its parent's settled trace (`None` if it has no span parent).
    fn settle(&mut self, id: SpanId, parent: Option<&Resolved>) -> Resolved {
        let Some(node) = self.nodes.get(&id) else {
            return self.new_root();
        };
        let inherit = |p: &Resolved, pid: SpanId, link: Link| Resolved {
            trace_id: p.trace_id,
            sampled: p.sampled,
            flags: p.flags,
            trace_state: p.trace_state.clone(),
            parent: Some((pid, false, link)),
        };
        let sampler = &self.sampler;
        let remote = |h: &Remote| Resolved {
            trace_id: h.trace_id,
            sampled: sampler.remote_sampled(&h.trace_id, h.sampled),
            flags: h.flags,
            trace_state: h.trace_state.clone(),
            parent: Some((h.span_id, true, Link::Header)),
        };
        match (&node.parent, parent) {
            (Parent::Span(pid, link), Some(p)) => inherit(p, *pid, *link),
            (Parent::Peer { .. }, Some(p)) => {
                inherit(p, self.peer(node).unwrap_or([0; 8]), Link::Connection)
            }
            (Parent::Peer { header: Some(h) }, None) | (Parent::Remote(h), _) => remote(h),
            _ => self.new_root(),
        }
    }

    /// A trace that starts here, sampled by the root sampler.
    fn new_root(&mut self) -> Resolved {
        let trace_id = self.trace_id();
        let sampled = self.sampler.root_sampled(&trace_id);
        Resolved {
            trace_id,
            sampled,
            flags: u8::from(sampled),
            trace_state: None,
            parent: None,
        }
    }

    /// Time-based work: deferred server spans whose client did not show up, and forgetting
    /// old state. Call regularly.
    pub fn tick(&mut self, out: &mut Vec<Span>) {
        let now = Instant::now();
        self.now = now;
        let stale: Vec<u64> = self
            .assembling
            .iter()
            .filter(|(_, a)| now.duration_since(a.since) > Duration::from_millis(100))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.flush_assembling(id, out);
        }
        while self
            .deferred
            .front()
            .is_some_and(|d| now.duration_since(d.since) >= PEER_WAIT)
        {
            if let Some(d) = self.deferred.pop_front() {
                if let Some(n) = self.nodes.get_mut(&d.id) {
                    n.deferred = false;
                }
                self.emit(d.id, d.span, out);
            }
        }
        self.forget_finished(now);
        if now.duration_since(self.last_prune) < Duration::from_secs(1) {
            return;
        }
        self.last_prune = now;
        self.kept_traces
            .retain(|_, since| now.duration_since(*since) < KEEP_TRACE);
        let nodes = &self.nodes;
        self.threads
            .retain(|_, t| t.multiplexed || t.active.is_some_and(|a| nodes.contains_key(&a)));
        // A process that exited closed its sockets without a close syscall: its requests in
        // progress end as cut-off error spans at the connection's last event.
        let mut alive: HashMap<u32, bool> = HashMap::default();
        let root = &self.proc_root;
        let exited: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !*alive
                    .entry(c.pid)
                    .or_insert_with(|| process_alive(root, c.pid))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in exited {
            if let Some(c) = self.conns.remove(&id) {
                self.stats.process_exits += c.pending.len() as u64;
                let ts = c.last_ts;
                self.close_conn(c, ts, out);
            }
        }
        let mut closed = Vec::new();
        for (id, c) in &self.conns {
            if now.duration_since(c.last_seen) > IDLE_CONNECTION {
                closed.push(*id);
            }
        }
        for id in closed {
            // Requests that waited this long for a response are given up (counted).
            if let Some(c) = self.conns.remove(&id) {
                self.give_up(c.pending);
            }
        }
        let live: std::collections::HashSet<u32> = self.conns.values().map(|c| c.pid).collect();
        let nodes = &self.nodes;
        self.procs.retain(|pid, p| {
            // A received context matters while its server span is being served.
            p.received
                .retain(|_, span| nodes.get(span).is_some_and(|n| n.finished.is_none()));
            live.contains(pid) || now.duration_since(p.last_seen) < IDLE_CONNECTION
        });
        self.shrink_tables();
    }

    /// Gives back the room a burst made the tables grow to (hash tables never shrink by
    /// themselves): a table using under a quarter of its room is cut to twice its size.
    fn shrink_tables(&mut self) {
        fn shrink<K: Eq + std::hash::Hash, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 1024 && m.len() < m.capacity() / 4 {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink(&mut self.conns);
        shrink(&mut self.nodes);
        shrink(&mut self.clients);
        shrink(&mut self.threads);
        shrink(&mut self.assembling);
        fn shrink_queue<T>(q: &mut VecDeque<T>) {
            if q.capacity() > 1024 && q.len() < q.capacity() / 4 {
                q.shrink_to(q.len() * 2);
            }
        }
        shrink_queue(&mut self.finished);
        shrink_queue(&mut self.deferred);
    }

    /// Forgets finished spans older than `KEEP_FINISHED`, or the oldest beyond `MAX_FINISHED`.
    fn forget_finished(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.finished.front() {
            let old = now.duration_since(at) >= KEEP_FINISHED;
            if !old && self.finished.len() <= MAX_FINISHED {
                break;
            }
            // A node is deferred only while its span is in `deferred` (usually empty at
            // saturation): the lookup, a cache miss on a span finished 40 ms ago, is skipped.
            if !self.deferred.is_empty() && self.nodes.get(&id).is_some_and(|n| n.deferred) {
                // Emitted within PEER_WAIT; forget it on a later tick.
                break;
            }
            self.finished.pop_front();
            self.forget_node(id);
        }
    }

    /// Whether the span's trace depends on a client span that has not come yet: the span, or
    /// the server span it was sent from (by thread) or any above, is linked by connection to a
    /// client whose record is not in yet. Such a span waits, as its server span does: settled
    /// now, it would make its server span a root (the settled trace is kept for the rest of
    /// the tree), and split the trace in two when the client's record came a little late (a
    /// client preempted in its write after the bytes were delivered, while the server answered
    /// and made its own calls).
    fn awaits_peer(&self, id: SpanId) -> bool {
        let mut cur = id;
        for _ in 0..256 {
            let Some(n) = self.nodes.get(&cur) else {
                return false;
            };
            if n.resolved.is_some() {
                return false;
            }
            cur = match &n.parent {
                Parent::Span(p, _) => *p,
                Parent::Peer { .. } => match self.peer(n) {
                    Some(client) => client,
                    None => return true,
                },
                _ => return false,
            };
        }
        false
    }

    /// The client span indexed under a server node's connection key, if it has come.
    fn peer(&self, node: &Node) -> Option<SpanId> {
        self.clients.get(node.peer_key.as_ref()?).copied()
    }

    /// Removes a span's node, and its client index entry if that still names this span.
    fn forget_node(&mut self, id: SpanId) {
        if let Some(n) = self.nodes.remove(&id)
            && n.side == Side::Client
            && let Some(k) = n.peer_key
            && let Entry::Occupied(e) = self.clients.entry(k)
            && *e.get() == id
        {
            e.remove();
        }
    }

    /// Ends everything in progress (at shutdown): deferred spans go out as they are.
    pub fn flush(&mut self, out: &mut Vec<Span>) {
        let ids: Vec<u64> = self.assembling.keys().copied().collect();
        for id in ids {
            self.flush_assembling(id, out);
        }
        while let Some(d) = self.deferred.pop_front() {
            self.emit(d.id, d.span, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wirespan_common::{EventHeader, family, kind};

    /// Builds events of one connection between two endpoints on 127.0.0.1.
    struct Wire {
        ts: u64,
    }

    impl Wire {
        #[allow(clippy::too_many_arguments)]
        fn ev(
            &mut self,
            pid: u32,
            tid: u32,
            conn: u64,
            local: u16,
            remote: u16,
            k: EventKind,
            payload: &'static [u8],
        ) -> SocketEvent<'static> {
            self.ts += 1000;
            let mut h = EventHeader::zeroed();
            h.ts_ns = self.ts;
            h.conn_id = conn;
            h.pid = pid;
            h.tid = tid;
            h.family = family::INET;
            h.local_port = local;
            h.remote_port = remote;
            h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
            h.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
            h.len = payload.len() as u64;
            h.captured = payload.len() as u32;
            h.kind = match k {
                EventKind::Accept => kind::ACCEPT,
                EventKind::Connect => kind::CONNECT,
                EventKind::Close => kind::CLOSE,
                _ => kind::DATA,
            };
            SocketEvent {
                header: h,
                kind: k,
                payload,
            }
        }
    }

    const IN: EventKind = EventKind::Data(Direction::Ingress);
    const OUT: EventKind = EventKind::Data(Direction::Egress);
    const REQ: &[u8] = b"GET /a HTTP/1.1\r\nHost: x:80\r\nUser-Agent: t/1\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    fn stitcher() -> Stitcher {
        // A /proc without our test pids: processes are named by comm, none is Go.
        Stitcher::with_proc_root(
            WallClock::from_pair(0, 0),
            PathBuf::from("/nonexistent-proc"),
        )
    }

    fn run(events: &[SocketEvent<'static>]) -> Vec<Span> {
        let mut s = stitcher();
        let mut out = Vec::new();
        for e in events {
            s.event(e, &mut out);
        }
        s.flush(&mut out);
        out
    }

    fn find(spans: &[Span], pid: u32, side: Side) -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.process.pid == pid && s.attributes.side == side)
            .collect()
    }

    /// Client pid 1 -> server pid 2 (thread 20), which calls pid 3 from thread `call_tid`
    /// while serving. `overlap` makes thread 20 read a second request first.
    fn nested(call_tid: u32, overlap: bool) -> Vec<Span> {
        let mut w = Wire { ts: 0 };
        let mut ev = vec![
            w.ev(1, 10, 100, 5000, 80, EventKind::Connect, b""),
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(1, 10, 100, 5000, 80, OUT, REQ),
            w.ev(2, 20, 200, 80, 5000, IN, REQ),
        ];
        if overlap {
            ev.push(w.ev(2, 20, 201, 80, 5001, EventKind::Accept, b""));
            ev.push(w.ev(2, 20, 201, 80, 5001, IN, REQ));
        }
        ev.extend([
            w.ev(2, call_tid, 300, 6000, 90, EventKind::Connect, b""),
            w.ev(3, 30, 400, 90, 6000, EventKind::Accept, b""),
            w.ev(2, call_tid, 300, 6000, 90, OUT, REQ),
            w.ev(3, 30, 400, 90, 6000, IN, REQ),
            w.ev(3, 30, 400, 90, 6000, OUT, RESP),
            w.ev(2, call_tid, 300, 6000, 90, IN, RESP),
            w.ev(2, 20, 200, 80, 5000, OUT, RESP),
            w.ev(1, 10, 100, 5000, 80, IN, RESP),
        ]);
        run(&ev)
    }

    /// The first record of a socket after records of it were lost (`kind::DATA_AFTER_LOSS`).
    fn after_loss(mut ev: SocketEvent<'static>) -> SocketEvent<'static> {
        ev.header.kind = kind::DATA_AFTER_LOSS;
        ev
    }

    #[test]
    fn a_response_after_lost_records_never_ends_an_earlier_request() {
        const GET0: &[u8] = b"GET /0 HTTP/1.1\r\nHost: x:80\r\n\r\n";
        const GET1: &[u8] = b"GET /1 HTTP/1.1\r\nHost: x:80\r\n\r\n";
        const R201: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let status = |s: &Span| match s.attributes.get("http.response.status_code") {
            Some(crate::http::attributes::Attr::Int(n)) => n,
            other => panic!("status {other:?}"),
        };
        let path = |s: &Span| match s.attributes.get("url.path") {
            Some(crate::http::attributes::Attr::Str(p)) => p.to_string(),
            other => panic!("path {other:?}"),
        };
        // The server's answer to /0 was lost: the answer to /1 ends /1, and /0 is given up.
        let mut w = Wire { ts: 0 };
        let spans = run(&[
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(2, 20, 200, 80, 5000, IN, GET0),
            after_loss(w.ev(2, 20, 200, 80, 5000, IN, GET1)),
            w.ev(2, 20, 200, 80, 5000, OUT, R201),
        ]);
        let server = find(&spans, 2, Side::Server);
        assert_eq!(server.len(), 1, "{spans:#?}");
        assert_eq!((path(server[0]), status(server[0])), ("/1".into(), 201));

        // The server's read of /0 was lost: its read of /1 is at the client's offset of /0
        // by the bytes it saw, and must not be linked to the client's /0 by it.
        let mut w = Wire { ts: 0 };
        let spans = run(&[
            w.ev(1, 10, 100, 5000, 80, EventKind::Connect, b""),
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(1, 10, 100, 5000, 80, OUT, GET0),
            after_loss(w.ev(2, 20, 200, 80, 5000, OUT, RESP)),
            w.ev(1, 10, 100, 5000, 80, IN, RESP),
            w.ev(1, 10, 100, 5000, 80, OUT, GET1),
            w.ev(2, 20, 200, 80, 5000, IN, GET1),
            w.ev(2, 20, 200, 80, 5000, OUT, R201),
            w.ev(1, 10, 100, 5000, 80, IN, R201),
        ]);
        let clients = find(&spans, 1, Side::Client);
        let server = find(&spans, 2, Side::Server);
        assert_eq!((clients.len(), server.len()), (2, 1), "{spans:#?}");
        assert_eq!((path(server[0]), status(server[0])), ("/1".into(), 201));
        let client0 = clients.iter().find(|c| path(c) == "/0").unwrap();
        assert_ne!(server[0].parent_span_id, Some(client0.span_id));
        assert_ne!(server[0].link, Some(Link::Connection));
    }

    #[test]
    fn a_client_record_that_comes_after_the_servers_own_call_still_links_the_trace() {
        // Client pid 1 -> server pid 2 (thread 20), which calls pid 3 while serving; the
        // client's record of its request comes only after that call has ended (the client was
        // preempted in its write once the bytes were delivered).
        let mut w = Wire { ts: 0 };
        let spans = run(&[
            w.ev(1, 10, 100, 5000, 80, EventKind::Connect, b""),
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(2, 20, 200, 80, 5000, IN, REQ),
            w.ev(2, 20, 300, 6000, 90, EventKind::Connect, b""),
            w.ev(3, 30, 400, 90, 6000, EventKind::Accept, b""),
            w.ev(2, 20, 300, 6000, 90, OUT, REQ),
            w.ev(3, 30, 400, 90, 6000, IN, REQ),
            w.ev(3, 30, 400, 90, 6000, OUT, RESP),
            w.ev(2, 20, 300, 6000, 90, IN, RESP),
            w.ev(1, 10, 100, 5000, 80, OUT, REQ),
            w.ev(2, 20, 200, 80, 5000, OUT, RESP),
            w.ev(1, 10, 100, 5000, 80, IN, RESP),
        ]);
        assert_eq!(spans.len(), 4, "{spans:#?}");
        let root = find(&spans, 1, Side::Client)[0];
        let server = find(&spans, 2, Side::Server)[0];
        let call = find(&spans, 2, Side::Client)[0];
        assert_eq!(server.parent_span_id, Some(root.span_id));
        assert_eq!(server.link, Some(Link::Connection));
        assert_eq!(call.parent_span_id, Some(server.span_id));
        assert!(
            spans.iter().all(|s| s.trace_id == root.trace_id),
            "{spans:#?}"
        );
    }

    #[test]
    fn connection_and_thread_links_make_one_trace() {
        let spans = nested(20, false);
        assert_eq!(spans.len(), 4);
        let root = find(&spans, 1, Side::Client)[0];
        let server = find(&spans, 2, Side::Server)[0];
        let call = find(&spans, 2, Side::Client)[0];
        let leaf = find(&spans, 3, Side::Server)[0];
        assert_eq!(root.parent_span_id, None);
        assert_eq!(server.parent_span_id, Some(root.span_id));
        assert_eq!(server.link, Some(Link::Connection));
        assert_eq!(call.parent_span_id, Some(server.span_id));
        assert_eq!(call.link, Some(Link::Thread));
        assert_eq!(leaf.parent_span_id, Some(call.span_id));
        assert!(spans.iter().all(|s| s.trace_id == root.trace_id));
    }

    #[test]
    fn spans_of_one_route_share_its_name_route_addresses_and_user_agent() {
        let spans = nested(20, false);
        // The one kept copy of a string, or none if the span has its own.
        let kept = |t: &Text| match t {
            Text::Static(k) => Some(k.as_ptr()),
            Text::Owned(_) => None,
        };
        let route = |s: &Span| s.attributes.route.as_ref().and_then(kept);
        let user_agent = |s: &Span| s.attributes.user_agent.as_ref().and_then(kept);
        let first = &spans[0];
        assert_eq!(&*first.name, "GET /a");
        for s in &spans {
            assert!(kept(&s.name).is_some(), "{s:?}");
            assert_eq!(kept(&s.name), kept(&first.name));
            assert!(route(s).is_some(), "{s:?}");
            assert_eq!(route(s), route(first));
            assert!(kept(&s.attributes.peer_address).is_some(), "{s:?}");
            assert!(kept(&s.attributes.server_address).is_some(), "{s:?}");
            assert_eq!(&*s.attributes.server_address, "x");
            assert_eq!(s.attributes.user_agent.as_deref(), Some("t/1"));
            assert!(user_agent(s).is_some(), "{s:?}");
            assert_eq!(user_agent(s), user_agent(first));
        }
        let peer = |s: &Span| kept(&s.attributes.peer_address);
        assert!(spans.windows(2).all(|w| peer(&w[0]) == peer(&w[1])));
    }

    #[test]
    fn a_call_from_another_thread_is_not_linked_by_thread() {
        let spans = nested(21, false);
        let call = find(&spans, 2, Side::Client)[0];
        assert_eq!(call.parent_span_id, None);
        assert_ne!(call.trace_id, find(&spans, 1, Side::Client)[0].trace_id);
    }

    #[test]
    fn a_thread_serving_overlapping_requests_makes_no_thread_links() {
        let spans = nested(20, true);
        let call = find(&spans, 2, Side::Client)[0];
        assert_eq!(call.parent_span_id, None, "event loop must not be guessed");
        // The leaf still joins the call's trace by its connection.
        let leaf = find(&spans, 3, Side::Server)[0];
        assert_eq!(leaf.parent_span_id, Some(call.span_id));
    }

    #[test]
    fn connection_seen_midway_is_not_linked_by_position() {
        let mut w = Wire { ts: 0 };
        // No accept/connect: both ends joined an existing connection.
        let spans = run(&[
            w.ev(1, 10, 100, 5000, 80, OUT, REQ),
            w.ev(2, 20, 200, 80, 5000, IN, REQ),
            w.ev(2, 20, 200, 80, 5000, OUT, RESP),
            w.ev(1, 10, 100, 5000, 80, IN, RESP),
        ]);
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(|s| s.parent_span_id.is_none()));
    }

    #[test]
    fn close_before_the_response_is_an_error_span() {
        let mut w = Wire { ts: 0 };
        let spans = run(&[
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(2, 20, 200, 80, 5000, IN, REQ),
            w.ev(2, 20, 200, 80, 5000, EventKind::Close, b""),
        ]);
        assert_eq!(spans.len(), 1);
        assert!(spans[0].error.is_some());
    }

    #[test]
    fn non_http_connection_makes_no_spans_and_is_counted() {
        let mut w = Wire { ts: 0 };
        let mut s = stitcher();
        let mut out = Vec::new();
        for e in [
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(
                2,
                20,
                200,
                80,
                5000,
                IN,
                b"\x16\x03\x01\x00\xa5\x01\x00\x00",
            ),
            w.ev(2, 20, 200, 80, 5000, OUT, b"\x16\x03\x03\x00\x5d\x02"),
        ] {
            s.event(&e, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(s.stats.http.skipped_calls, 2);
    }

    #[test]
    fn forwarded_header_keeps_client_spans_under_the_server_span() {
        let mut w = Wire { ts: 0 };
        const IN_TP: &[u8] = b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
        // pid 2 serves on thread 20 and forwards the header from thread 21 (not a thread link).
        let spans = run(&[
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(2, 20, 200, 80, 5000, IN, IN_TP),
            w.ev(2, 21, 300, 6000, 90, EventKind::Connect, b""),
            w.ev(2, 21, 300, 6000, 90, OUT, IN_TP),
            w.ev(2, 21, 300, 6000, 90, IN, RESP),
            w.ev(2, 20, 200, 80, 5000, OUT, RESP),
        ]);
        let server = find(&spans, 2, Side::Server)[0];
        let call = find(&spans, 2, Side::Client)[0];
        assert_eq!(
            server.parent_span_id,
            Some([0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31])
        );
        assert_eq!(call.parent_span_id, Some(server.span_id));
        assert_eq!(call.link, Some(Link::Header));
        assert_eq!(call.trace_id, server.trace_id);
    }

    #[test]
    fn foreign_header_marks_the_process_instrumented() {
        let mut w = Wire { ts: 0 };
        const OWN: &[u8] = b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01\r\n\r\n";
        let spans = run(&[
            w.ev(2, 20, 200, 80, 5000, EventKind::Accept, b""),
            w.ev(2, 20, 200, 80, 5000, IN, REQ),
            w.ev(2, 20, 300, 6000, 90, EventKind::Connect, b""),
            w.ev(2, 20, 300, 6000, 90, OUT, OWN),
            w.ev(2, 20, 300, 6000, 90, IN, RESP),
            w.ev(2, 20, 200, 80, 5000, OUT, RESP),
        ]);
        assert!(spans.is_empty(), "{spans:#?}");
    }

    #[test]
    fn random_event_sequences_never_panic() {
        const PAYLOADS: &[&[u8]] = &[
            REQ,
            RESP,
            b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"POST /v1/traces HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            b"\x00\x01garbage",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut w = Wire { ts: 0 };
        let mut s = stitcher();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let conn = rng.u64(1..6);
            let (pid, tid) = (rng.u32(1..4), rng.u32(1..6));
            let (local, remote) = if rng.bool() { (80, 5000) } else { (5000, 80) };
            let k = match rng.u8(0..8) {
                0 => EventKind::Accept,
                1 => EventKind::Connect,
                2 => EventKind::Close,
                3 | 4 => IN,
                _ => OUT,
            };
            let e = w.ev(
                pid,
                tid,
                conn,
                local,
                remote,
                k,
                PAYLOADS[rng.usize(..PAYLOADS.len())],
            );
            s.event(&e, &mut out);
            if rng.u8(0..50) == 0 {
                s.tick(&mut out);
            }
        }
        s.flush(&mut out);
        assert!(!out.is_empty());
        for span in &out {
            assert_ne!(span.trace_id, [0; 16]);
            assert_ne!(span.parent_span_id, Some(span.span_id));
        }
    }

    /// A traced client's connection to a socket of this (test) process, first seen right
    /// after the stitcher read its own sockets: not ours at first sight, ours once they are
    /// read again. Its request in progress is dropped then and never becomes a span.
    #[test]
    fn a_connection_to_us_seen_right_after_a_read_of_our_sockets_is_settled_later() {
        let mut w = Wire { ts: 0 };
        let mut s = stitcher();
        let mut out = Vec::new();
        // Any connection that is not ours makes the stitcher read our sockets now.
        s.event(&w.ev(1, 1, 1, 5000, 80, EventKind::Connect, b""), &mut out);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        s.event(
            &w.ev(2, 2, 2, 5001, port, EventKind::Connect, b""),
            &mut out,
        );
        s.event(&w.ev(2, 2, 2, 5001, port, OUT, REQ), &mut out);
        assert_eq!(s.stats.own_connections, 0, "not known yet");
        std::thread::sleep(Duration::from_millis(110));
        s.event(&w.ev(2, 2, 2, 5001, port, IN, RESP), &mut out);
        s.flush(&mut out);
        assert_eq!(s.stats.own_connections, 1);
        assert!(out.is_empty(), "{out:?}");
        assert!(s.clients.is_empty() && s.nodes.is_empty());
    }

    #[test]
    fn finished_spans_remembered_are_bounded_under_load() {
        let mut w = Wire { ts: 0 };
        let mut s = stitcher();
        let mut out = Vec::new();
        // A keep-alive connection seen midway: its server spans need no far end.
        for _ in 0..3 * MAX_FINISHED {
            s.event(&w.ev(1, 1, 1, 80, 5000, IN, REQ), &mut out);
            s.event(&w.ev(1, 1, 1, 80, 5000, OUT, RESP), &mut out);
        }
        s.tick(&mut out);
        assert_eq!(out.len(), 3 * MAX_FINISHED);
        assert!(
            s.nodes.len() <= MAX_FINISHED && s.finished.len() <= MAX_FINISHED,
            "{} nodes, {} finished",
            s.nodes.len(),
            s.finished.len()
        );
    }

    #[test]
    fn tables_give_back_the_room_of_a_burst() {
        let mut st = Stitcher::new(WallClock::from_pair(0, 0));
        let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for i in 0..20_000u64 {
            st.clients.insert(PeerKey::new(any, any, i), [1; 8]);
            st.finished.push_back((st.now, [2; 8]));
        }
        let grown = (st.clients.capacity(), st.finished.capacity());
        st.clients.retain(|k, _| k.offset < 10);
        st.finished.truncate(10);
        st.shrink_tables();
        assert!(grown.0 >= 20_000 && grown.1 >= 20_000);
        assert!(st.clients.capacity() < 100, "{}", st.clients.capacity());
        assert!(st.finished.capacity() < 100, "{}", st.finished.capacity());
        assert_eq!(st.clients.len(), 10);
        // A table in use keeps its room.
        for i in 0..5_000u64 {
            st.clients.insert(PeerKey::new(any, any, i), [1; 8]);
        }
        let used = st.clients.capacity();
        st.shrink_tables();
        assert_eq!(st.clients.capacity(), used);
    }
}
