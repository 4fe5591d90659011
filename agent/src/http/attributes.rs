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

/// An attribute value as a span holds it, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
}

impl Value {
    /// The value borrowed, as the encoder takes it (resource attributes are owned values).
    pub fn as_attr(&self) -> Attr<'_> {
        match self {
            Value::Str(s) => Attr::Str(s),
            Value::Int(i) => Attr::Int(*i),
        }
    }
}

/// A span's attributes, by the HTTP semantic conventions: each in its own field, held inline
/// in the span. Not a list of key-value pairs: that was a block of 720 bytes per span, made
/// on the event thread and freed on an export thread, the largest of a span's blocks
/// (docs/BENCHMARKS.md). [`Attributes::each`] walks them in the order they are exported.
#[derive(Clone, Debug, PartialEq)]
pub struct Attributes {
    pub side: Side,
    /// `http.request.method`: a registered method, or `_OTHER` (the method as sent is then
    /// `http.request.method_original`).
    pub method: &'static str,
    pub method_original: Option<Text>,
    /// `url.full`, on client spans.
    pub url_full: Option<String>,
    pub path: String,
    /// Redacted unless asked otherwise (`Exchange::redact_query`).
    pub query: Option<String>,
    pub server_address: Text,
    pub server_port: u16,
    /// The other end of the connection: `network.peer.*`, and `client.*` on server spans.
    pub peer_address: Text,
    pub peer_port: u16,
    pub version: &'static str,
    pub user_agent: Option<Text>,
    pub status: Option<u16>,
    pub request_body: u64,
    /// Exported with a status only.
    pub response_body: u64,
    pub error_type: Option<Text>,
    /// `http.route` on server spans, `url.template` on client spans.
    pub route: Option<Text>,
}

impl Attributes {
    /// Calls `f` with each attribute that has a value, in export order.
    #[inline]
    pub fn each<'a>(&'a self, mut f: impl FnMut(&'static str, Attr<'a>)) {
        use Attr::{Int, Str};
        if let Some(m) = &self.method_original {
            f("http.request.method_original", Str(m));
        }
        f("http.request.method", Str(self.method));
        if let Some(u) = &self.url_full {
            f("url.full", Str(u));
        }
        f("url.path", Str(&self.path));
        if let Some(q) = &self.query {
            f("url.query", Str(q));
        }
        f("url.scheme", Str("http"));
        if self.side == Side::Server {
            f("client.address", Str(&self.peer_address));
            f("client.port", Int(self.peer_port.into()));
        }
        f("server.address", Str(&self.server_address));
        f("server.port", Int(self.server_port.into()));
        f("network.peer.address", Str(&self.peer_address));
        f("network.peer.port", Int(self.peer_port.into()));
        f("network.protocol.version", Str(self.version));
        if let Some(ua) = &self.user_agent {
            f("user_agent.original", Str(ua));
        }
        if let Some(code) = self.status {
            f("http.response.status_code", Int(code.into()));
        }
        f("http.request.body.size", Int(self.request_body as i64));
        if self.status.is_some() {
            f("http.response.body.size", Int(self.response_body as i64));
        }
        if let Some(e) = &self.error_type {
            f("error.type", Str(e));
        }
        if let Some(r) = &self.route {
            let key = match self.side {
                Side::Server => "http.route",
                Side::Client => "url.template",
            };
            f(key, Str(r));
        }
    }

    /// A span's attributes with the least in them, for tests: a request for `/` from
    /// 127.0.0.1:50000 to 127.0.0.1:8080, not answered.
    #[cfg(test)]
    pub fn least(side: Side) -> Self {
        Attributes {
            side,
            method: "GET",
            method_original: None,
            url_full: None,
            path: "/".into(),
            query: None,
            server_address: "127.0.0.1".into(),
            server_port: 8080,
            peer_address: "127.0.0.1".into(),
            peer_port: 50000,
            version: "1.1",
            user_agent: None,
            status: None,
            request_body: 0,
            response_body: 0,
            error_type: None,
            route: None,
        }
    }

    /// The value of attribute `key`, if the span has it.
    pub fn get(&self, key: &str) -> Option<Attr<'_>> {
        let mut found = None;
        self.each(|k, v| {
            if k == key {
                found = Some(v);
            }
        });
        found
    }
}

/// Strings that recur from span to span (route templates, span names, addresses, `Host` names,
/// user agents, error statuses), kept for the agent's lifetime so that spans refer to them: no
/// allocation, no reference count, nothing for the export threads to free (a span's blocks,
/// freed there, cost the event thread's allocator most: docs/BENCHMARKS.md). Bounded: past
/// [`Interner::MAX`] strings or [`Interner::MAX_BYTES`], and for a string longer than
/// [`Interner::MAX_LEN`], a string is the span's own.
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
    /// Longer strings are not kept: a few would take the room of many.
    pub const MAX_LEN: usize = 512;

    /// `s` as a kept string when it is one or there is room for it, else a copy of it.
    pub fn text(&mut self, s: &str) -> Text {
        if let Some(&kept) = self.kept.get(s) {
            return Text::Static(kept);
        }
        if self.kept.len() >= Self::MAX
            || s.len() > Self::MAX_LEN
            || self.bytes + s.len() > Self::MAX_BYTES
        {
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

/// `Host` split into name and port; brackets of an IPv6 literal removed.
pub fn split_host(host: &str) -> (&str, Option<u16>) {
    let (name, port) = host_parts(host);
    (&host[name], port)
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
pub fn error(ex: &Exchange<'_>) -> Option<&'static str> {
    match ex.outcome {
        Outcome::CutOff => Some("connection closed before the response completed"),
        Outcome::Response(code) => {
            let bad = match ex.side {
                Side::Server => code >= 500,
                Side::Client => code >= 400,
            };
            bad.then_some("")
        }
    }
}

/// An endpoint's address as the conventions write it (IPv4-mapped IPv6 as IPv4).
pub fn ip_text(addr: &SocketAddr) -> String {
    addr.ip().to_canonical().to_string()
}

/// The first value of a kept field, taken out of the head.
fn take_header(head: &mut Head, name: &str) -> Option<Text> {
    head.headers
        .iter_mut()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| std::mem::take(v))
}

/// The span's attributes, built from the exchange. The request's target and its `Host` and
/// `User-Agent` values are moved into them (see [`Exchange::request`]); the route of the
/// request's path (none for CONNECT, whose target is an authority) is what `route` makes of
/// it. A `Host` name (the field's value is kept by `Stream::feed`) and an error's status are
/// kept in `interner` when there is room: they recur from span to span.
pub fn attributes(
    ex: &mut Exchange<'_>,
    interner: &mut Interner,
    route: impl FnOnce(&str, &mut Interner) -> Text,
) -> Attributes {
    let req = &mut *ex.request;
    let (method, method_original) = match registered_method(&req.method) {
        Some(m) => (m, None),
        None => ("_OTHER", Some(req.method.clone())),
    };
    // Everything that reads the target or `Host` as sent, before they are taken.
    let (path, route, query, url_full) = {
        let parts = target_parts(req);
        let route = parts.map(|(path, _)| route(path, interner));
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
    // Kept values (`Stream::feed` interns these two) are cut and moved, not looked up again.
    let host = take_header(req, "host").map(|h| match h {
        Text::Static(h) => {
            let (name, port) = split_host(h);
            (Text::Static(name), port)
        }
        Text::Owned(h) => {
            let (name, port) = split_host(&h);
            (interner.text(name), port)
        }
    });
    let user_agent = take_header(req, "user-agent");
    let (server_address, server_port): (Text, u16) = match (host, ex.side) {
        (Some((h, p)), Side::Client) => (h, p.unwrap_or(ex.remote.port())),
        (Some((h, p)), Side::Server) => (h, p.unwrap_or(ex.local.port())),
        (None, Side::Client) => (ex.remote_ip.clone(), ex.remote.port()),
        (None, Side::Server) => (ex.local_ip.clone(), ex.local.port()),
    };
    let error_type = match (&ex.outcome, error(ex)) {
        (Outcome::CutOff, _) => Some(Text::Static("connection_closed")),
        (Outcome::Response(code), Some(_)) => Some(interner.text_of(|s| {
            let _ = std::fmt::Write::write_fmt(s, format_args!("{code}"));
        })),
        _ => None,
    };
    Attributes {
        side: ex.side,
        method,
        method_original,
        url_full,
        path,
        query,
        server_address,
        server_port,
        peer_address: ex.remote_ip.clone(),
        peer_port: ex.remote.port(),
        version: if ex.request.version == 0 {
            "1.0"
        } else {
            "1.1"
        },
        user_agent,
        status: ex.response_status,
        request_body: ex.request_body,
        response_body: ex.response_body,
        error_type,
        route,
    }
}
