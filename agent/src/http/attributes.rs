//! Span name, attributes and status of one HTTP exchange, by the stable OpenTelemetry HTTP
//! semantic conventions.

use std::{borrow::Cow, net::SocketAddr, ops::Range};

use super::framing::Head;

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Text),
    Int(i64),
}

/// A string attribute value, allocated only when it has to be: most values of a span are
/// constants (`http`, `1.1`, a known method) or kept once for all spans ([`Interner`]: routes,
/// span names, addresses).
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Owned(String),
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Owned(s) => s,
        }
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Text {}

impl Default for Text {
    fn default() -> Self {
        Text::Static("")
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Static(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Owned(s)
    }
}

pub type Attributes = Vec<(&'static str, Value)>;

/// Strings that recur from span to span (route templates, span names, addresses), kept for the
/// agent's lifetime so that spans refer to them: no allocation, no reference count, nothing for
/// the export threads to free (a span's blocks, freed there, cost the event thread's allocator
/// most: docs/BENCHMARKS.md). Bounded: past [`Interner::MAX`] strings or
/// [`Interner::MAX_BYTES`], a string is the span's own as before.
#[derive(Debug, Default)]
pub struct Interner {
    kept: rustc_hash::FxHashSet<&'static str>,
    bytes: usize,
    /// Where a string is put together before it is looked up (one allocation for the agent's
    /// life, not one per span).
    scratch: String,
}

impl Interner {
    pub const MAX: usize = 4096;
    pub const MAX_BYTES: usize = 256 << 10;

    /// `s` as a kept string when it is one or there is room for it, else a copy of it.
    pub fn text(&mut self, s: &str) -> Text {
        if let Some(&kept) = self.kept.get(s) {
            return Text::Static(kept);
        }
        if self.kept.len() >= Self::MAX || self.bytes + s.len() > Self::MAX_BYTES {
            return Text::Owned(s.to_string());
        }
        self.bytes += s.len();
        let kept: &'static str = Box::leak(s.into());
        self.kept.insert(kept);
        Text::Static(kept)
    }

    /// What `write` puts into the scratch buffer, as [`Interner::text`] of it.
    pub fn text_of(&mut self, write: impl FnOnce(&mut String)) -> Text {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        write(&mut scratch);
        let t = self.text(&scratch);
        self.scratch = scratch;
        t
    }

    /// Strings kept, and their bytes.
    pub fn kept(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }
}

/// Methods the conventions know; others are reported as `_OTHER`.
const KNOWN_METHODS: &[&str] = &[
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY",
];

/// The registry's spelling of a known method.
fn registered_method(method: &str) -> Option<&'static str> {
    KNOWN_METHODS.iter().find(|m| **m == method).copied()
}

/// A request's method, allocated only when it is not a known one.
pub fn method_text(method: &str) -> Text {
    registered_method(method).map_or_else(|| Text::Owned(method.to_string()), Text::Static)
}

/// The span name: the method, or `HTTP` for methods outside the registry. Raw paths are never
/// part of it (they would explode cardinality); a route template is added once one is known.
pub fn span_name(method: &str, route: Option<&str>, interner: &mut Interner) -> Text {
    let m = registered_method(method).unwrap_or("HTTP");
    match route {
        Some(r) => interner.text_of(|s| {
            s.push_str(m);
            s.push(' ');
            s.push_str(r);
        }),
        None => Text::Static(m),
    }
}

/// Splits a request target into path and query. An absolute-form target
/// (`http://host/path?q`, sent to proxies) keeps only its path and query; an origin-form one
/// (`/path?q`, nearly every request) is split at its first `?`, whatever the query holds.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    let (path, rest) = if target.starts_with('/') {
        (None, target)
    } else {
        match target.split_once("://") {
            // What follows the authority: its path, or `/` when it starts with the query.
            Some((_, after)) => match after.find(['/', '?', '#']) {
                Some(j) if after.as_bytes()[j] == b'/' => (None, &after[j..]),
                Some(j) => (Some("/"), &after[j..]),
                None => (Some("/"), ""),
            },
            None => (None, target),
        }
    };
    let rest = &rest[..position(rest, b'#').unwrap_or(rest.len())];
    match position(rest, b'?') {
        Some(i) => (path.unwrap_or(&rest[..i]), Some(&rest[i + 1..])),
        None => (path.unwrap_or(rest), None),
    }
}

/// The first `byte` (ASCII) in `s`: a plain scan, cheaper than a `str` pattern search on the
/// few bytes of a target or a host.
fn position(s: &str, byte: u8) -> Option<usize> {
    s.bytes().position(|b| b == byte)
}

/// A request's path and query; none for CONNECT, whose target is an authority.
pub fn target_parts(req: &Head) -> Option<(&str, Option<&str>)> {
    (&*req.method != "CONNECT").then(|| split_target(&req.target))
}

/// Keeps query parameter names and replaces every value with `REDACTED`.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) => format!("{k}=REDACTED"),
            None => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `Host` split into name and port; brackets of an IPv6 literal removed. The name is the
/// value itself cut short (no copy) unless it does not start the value (brackets, leading
/// whitespace).
pub fn split_host(mut host: String) -> (String, Option<u16>) {
    let (name, port) = host_parts(&host);
    if name.start == 0 {
        host.truncate(name.end);
        (host, port)
    } else {
        (host[name].to_string(), port)
    }
}

/// Where the name is in a `Host` value, and its port.
fn host_parts(value: &str) -> (Range<usize>, Option<u16>) {
    let host = value.trim_ascii();
    let start = host.as_ptr() as usize - value.as_ptr() as usize;
    let at = |r: Range<usize>| start + r.start..start + r.end;
    if let Some(rest) = host.strip_prefix('[')
        && let Some(end) = position(rest, b']')
    {
        let port = rest[end + 1..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        return (at(1..1 + end), port);
    }
    // One colon: name and port; more: an IPv6 literal without brackets, no port.
    match host.bytes().rposition(|b| b == b':') {
        Some(i) if position(&host[..i], b':').is_none() => match host[i + 1..].parse() {
            Ok(port) => (at(0..i), Some(port)),
            Err(_) => (at(0..host.len()), None),
        },
        _ => (at(0..host.len()), None),
    }
}

/// Which end of the exchange the span describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// What the exchange ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A final response with this status.
    Response(u16),
    /// The connection closed (or was reset) before the response completed.
    CutOff,
}

/// Everything known about one exchange, from the side that observed it.
#[derive(Debug)]
pub struct Exchange<'a> {
    pub side: Side,
    /// The request's head. [`attributes`] takes its target and the values of `Host` and
    /// `User-Agent` into the span's attributes (no copy): the head is not read after them.
    pub request: &'a mut Head,
    pub response_status: Option<u16>,
    pub outcome: Outcome,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `ip_text` of `local` and `remote`, formatted once per connection.
    pub local_ip: Text,
    pub remote_ip: Text,
    pub request_body: u64,
    pub response_body: u64,
    /// Replace query parameter values with `REDACTED` (the default; `--keep-query-values`
    /// turns it off).
    pub redact_query: bool,
}

/// Span status: `Some(description)` marks an error.
pub fn error(ex: &Exchange<'_>) -> Option<String> {
    match ex.outcome {
        Outcome::CutOff => Some("connection closed before the response completed".into()),
        Outcome::Response(code) => {
            let bad = match ex.side {
                Side::Server => code >= 500,
                Side::Client => code >= 400,
            };
            bad.then(String::new)
        }
    }
}

/// An endpoint's address as the conventions write it (IPv4-mapped IPv6 as IPv4).
pub fn ip_text(addr: &SocketAddr) -> String {
    addr.ip().to_canonical().to_string()
}

/// The first value of a kept field, taken out of the head.
fn take_header(head: &mut Head, name: &str) -> Option<String> {
    head.headers
        .iter_mut()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| std::mem::take(v))
}

/// The span's attributes, and the route of the request's path (none for CONNECT, whose
/// target is an authority) as `route` makes it. The request's target and its `Host` and
/// `User-Agent` values are moved into the attributes (see [`Exchange::request`]).
pub fn attributes(
    ex: &mut Exchange<'_>,
    route: impl FnOnce(&str) -> Text,
) -> (Attributes, Option<Text>) {
    let req = &mut *ex.request;
    let mut a: Attributes = Vec::with_capacity(18);
    let method = match registered_method(&req.method) {
        Some(m) => Text::Static(m),
        None => {
            a.push((
                "http.request.method_original",
                Value::Str(req.method.clone()),
            ));
            Text::Static("_OTHER")
        }
    };
    a.push(("http.request.method", Value::Str(method)));
    // Everything that reads the target or `Host` as sent, before they are taken.
    let (path, route, query, full) = {
        let parts = target_parts(req);
        let route = parts.map(|(path, _)| route(path));
        let (path, query) = parts.unwrap_or(("", None));
        let query = query.map(|q| {
            if ex.redact_query {
                redact_query(q)
            } else {
                q.to_string()
            }
        });
        let full = (ex.side == Side::Client).then(|| {
            let authority: Cow<'_, str> = match req.header("host") {
                Some(h) => h.into(),
                None => ex.remote.to_string().into(),
            };
            match query.as_deref() {
                Some(q) => ["http://", &authority, path, "?", q].concat(),
                None => ["http://", &authority, path].concat(),
            }
        });
        // The path of an origin-form target (nearly every one) starts it: the target is cut
        // to it below. Any other is copied now.
        let path = if path.as_ptr() == req.target.as_ptr() {
            Ok(path.len())
        } else {
            Err(path.to_string())
        };
        (path, route, query, full)
    };
    let path = match path {
        Ok(len) => {
            let mut target = std::mem::take(&mut req.target);
            target.truncate(len);
            target
        }
        Err(copied) => copied,
    };
    let host = take_header(req, "host").map(split_host);
    let user_agent = take_header(req, "user-agent");
    let (server_address, server_port): (Text, u16) = match (host, ex.side) {
        (Some((h, p)), Side::Client) => (h.into(), p.unwrap_or(ex.remote.port())),
        (Some((h, p)), Side::Server) => (h.into(), p.unwrap_or(ex.local.port())),
        (None, Side::Client) => (ex.remote_ip.clone(), ex.remote.port()),
        (None, Side::Server) => (ex.local_ip.clone(), ex.local.port()),
    };
    if let Some(full) = full {
        a.push(("url.full", Value::Str(full.into())));
    }
    a.push(("url.path", Value::Str(path.into())));
    if let Some(q) = query {
        a.push(("url.query", Value::Str(q.into())));
    }
    a.push(("url.scheme", Value::Str("http".into())));
    if ex.side == Side::Server {
        a.push(("client.address", Value::Str(ex.remote_ip.clone())));
        a.push(("client.port", Value::Int(ex.remote.port() as i64)));
    }
    a.push(("server.address", Value::Str(server_address)));
    a.push(("server.port", Value::Int(server_port as i64)));
    a.push(("network.peer.address", Value::Str(ex.remote_ip.clone())));
    a.push(("network.peer.port", Value::Int(ex.remote.port() as i64)));
    a.push((
        "network.protocol.version",
        Value::Str(Text::Static(if req.version == 0 { "1.0" } else { "1.1" })),
    ));
    if let Some(ua) = user_agent {
        a.push(("user_agent.original", Value::Str(ua.into())));
    }
    if let Some(code) = ex.response_status {
        a.push(("http.response.status_code", Value::Int(code as i64)));
    }
    a.push(("http.request.body.size", Value::Int(ex.request_body as i64)));
    if ex.response_status.is_some() {
        a.push((
            "http.response.body.size",
            Value::Int(ex.response_body as i64),
        ));
    }
    match (&ex.outcome, error(ex)) {
        (Outcome::CutOff, _) => a.push(("error.type", Value::Str("connection_closed".into()))),
        (Outcome::Response(code), Some(_)) => {
            a.push(("error.type", Value::Str(code.to_string().into())))
        }
        _ => {}
    }
    (a, route)
}
