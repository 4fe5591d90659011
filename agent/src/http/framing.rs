//! HTTP/1.0 and 1.1 message framing for one direction of one connection.
//!
//! The kernel reports each read or write as one call: its true length, its time, and a prefix of
//! its bytes (the rest is a gap we can count but not read). A [`Stream`] turns that sequence of
//! calls into message starts (a parsed head, timed by the call that carried its first byte) and
//! message ends (timed by the call that carried the last byte). Heads are parsed by `httparse`;
//! bodies are framed here (RFC 9112 section 6): Content-Length, chunked with trailers, no body,
//! read-until-close, and tunnels after an upgrade. When bytes cannot be followed (capture started
//! mid-message, a gap over a chunk-size line, malformed input), the stream resynchronises at the
//! next call that begins like a message.

use std::mem::MaybeUninit;

use super::attributes::{self, Text};

/// Largest head accepted; larger ones are counted and skipped.
pub const MAX_HEAD: usize = 96 * 1024;
/// Most header fields parsed in one head.
const MAX_HEADERS: usize = 256;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Request,
    Response,
}

/// The header fields a span can use. Everything else (cookies, credentials, bodies) is never
/// kept.
pub const KEPT_HEADERS: &[&str] = &[
    "host",
    "user-agent",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// A parsed head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub kind: Option<MessageKind>,
    /// Request method (requests only).
    pub method: Text,
    /// Request target as sent: origin-form path and query, absolute-form URL, or authority.
    pub target: String,
    /// Status code (responses only).
    pub status: u16,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Bytes of the head, request or status line to the empty line included.
    pub len: usize,
    pub content_length: Option<u64>,
    /// The last transfer coding is `chunked`.
    pub chunked: bool,
    /// The connection closes after this message (`Connection: close`, or HTTP/1.0 without
    /// `keep-alive`).
    pub close: bool,
    pub expect_continue: bool,
    /// Fields listed in [`KEPT_HEADERS`], names lowercase, in order.
    pub headers: Headers,
    /// Content-Length and Transfer-Encoding disagreed or were malformed.
    pub invalid_framing: bool,
}

/// A head's kept fields: name and value. A plain vector: kept inline, two fields made every
/// head 64 bytes larger, and heads are moved several times on their way to a span (measured
/// slower: docs/BENCHMARKS.md).
pub type Headers = Vec<(&'static str, Text)>;

/// Fields whose values recur from request to request, kept once in the stitcher's interner:
/// the others (trace context) are each request's own.
const INTERNED_HEADERS: &[&str] = &["host", "user-agent"];

impl Head {
    /// The first value of a kept field.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| &**v)
    }
}

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
    /// The connection stops carrying HTTP (101 Switching Protocols, a CONNECT tunnel).
    Tunnel,
}

/// Framing of a request body (RFC 9112 6.3: requests never read until close).
pub fn request_body(head: &Head) -> Body {
    if head.chunked {
        Body::Chunked
    } else {
        match head.content_length {
            Some(0) | None => Body::None,
            Some(n) => Body::Length(n),
        }
    }
}

/// Framing of a response body, given the method of the request it answers.
pub fn response_body(head: &Head, request_method: Option<&str>) -> Body {
    let status = head.status;
    if status == 101 {
        return Body::Tunnel;
    }
    if request_method == Some("CONNECT") && (200..300).contains(&status) {
        return Body::Tunnel;
    }
    if (100..200).contains(&status)
        || status == 204
        || status == 304
        || request_method == Some("HEAD")
    {
        return Body::None;
    }
    if head.chunked {
        Body::Chunked
    } else {
        match head.content_length {
            Some(0) => Body::None,
            Some(n) => Body::Length(n),
            None => Body::UntilClose,
        }
    }
}

/// What a stream found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A message began in the call at `ts`, at byte `offset` of the stream (counted from the
    /// first call this stream was fed).
    Head { head: Head, ts: u64, offset: u64 },
    /// The message ended in the call at `ts`. `complete` is false when its end was not seen
    /// (cut off by a close, or lost to a gap and closed by the next message's start).
    End {
        ts: u64,
        body_bytes: u64,
        complete: bool,
    },
}

/// Counters of input that could not be followed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Heads that `httparse` or our framing rules rejected.
    pub malformed: u64,
    /// Heads larger than [`MAX_HEAD`].
    pub oversized: u64,
    /// Heads cut by a gap in the captured bytes.
    pub truncated: u64,
    /// Calls skipped while waiting for a message start.
    pub skipped_calls: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.malformed += o.malformed;
        self.oversized += o.oversized;
        self.truncated += o.truncated;
        self.skipped_calls += o.skipped_calls;
    }
}

#[derive(Clone, Debug)]
enum Chunk {
    /// Reading a chunk-size line.
    Size(Vec<u8>),
    /// Reading chunk data.
    Data(u64),
    /// Expecting the CRLF after chunk data (bytes still expected).
    DataEnd(u8),
    /// Reading trailer lines after the last chunk.
    Trailer(Vec<u8>),
}

#[derive(Clone, Debug)]
enum State {
    /// Between messages: the next byte starts one.
    Idle,
    Head {
        buf: Vec<u8>,
        ts: u64,
        offset: u64,
    },
    Body {
        mode: BodyState,
        bytes: u64,
        last_ts: u64,
    },
    /// Waiting for a call that begins like a message; `open` is the last time of a message whose
    /// end was not seen.
    Lost {
        open: Option<(u64, u64)>,
    },
    /// No more HTTP on this direction.
    Tunnel,
}

#[derive(Clone, Debug)]
enum BodyState {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// One direction of a connection.
#[derive(Clone, Debug)]
pub struct Stream {
    /// What this direction carries, once known.
    kind: Option<MessageKind>,
    state: State,
    pub stats: Stats,
    /// Messages whose head was seen.
    pub messages: u64,
    /// Bytes fed before the current call.
    total: u64,
}

/// Whether bytes at a call's start can begin a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Yes(MessageKind),
    /// A prefix of a possible start (too few bytes to tell).
    Maybe,
    No,
}

/// Classifies the first bytes of a call.
pub fn message_start(bytes: &[u8], kind: Option<MessageKind>) -> Start {
    const VERSION: &[u8] = b"HTTP/1.";
    if kind != Some(MessageKind::Request) {
        let n = bytes.len().min(VERSION.len());
        if bytes[..n] == VERSION[..n] {
            return if n == VERSION.len() {
                Start::Yes(MessageKind::Response)
            } else {
                Start::Maybe
            };
        }
    }
    if kind != Some(MessageKind::Response) {
        // A method is a token; real ones are upper-case letters (RFC 9110 9.1 registry).
        let token = bytes
            .iter()
            .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
            .count();
        if token > 0 && token <= 24 {
            match bytes.get(token) {
                Some(b' ') => {
                    // Method, space, and a target that starts like one.
                    return match bytes.get(token + 1) {
                        None => Start::Maybe,
                        Some(b) if b.is_ascii_graphic() => Start::Yes(MessageKind::Request),
                        Some(_) => Start::No,
                    };
                }
                None => return Start::Maybe,
                Some(_) => {}
            }
        }
    }
    if bytes.is_empty() {
        Start::Maybe
    } else {
        Start::No
    }
}

impl Stream {
    pub fn new(kind: Option<MessageKind>) -> Self {
        Self {
            kind,
            state: State::Idle,
            stats: Stats::default(),
            messages: 0,
            total: 0,
        }
    }

    /// A stream that joined a connection already in progress: it waits for a message start.
    pub fn joined_midway(kind: Option<MessageKind>) -> Self {
        Self {
            state: State::Lost { open: None },
            ..Self::new(kind)
        }
    }

    pub fn kind(&self) -> Option<MessageKind> {
        self.kind
    }

    /// No message is in progress.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Feeds one call: `len` bytes at time `ts`, of which `data` (a prefix) was captured.
    /// `frame` decides how the body after each head is delimited.
    ///
    /// The values of `Host` and `User-Agent` are kept in `interner` when there is room.
    pub fn feed(
        &mut self,
        ts: u64,
        len: u64,
        data: &[u8],
        frame: &mut dyn FnMut(&Head) -> Body,
        interner: &mut attributes::Interner,
        out: &mut Vec<Output>,
    ) {
        self.feed_call(ts, len, data, frame, interner, out);
        self.total += len;
    }

    fn feed_call(
        &mut self,
        ts: u64,
        len: u64,
        data: &[u8],
        frame: &mut dyn FnMut(&Head) -> Body,
        interner: &mut attributes::Interner,
        out: &mut Vec<Output>,
    ) {
        let data = &data[..data.len().min(len as usize)];
        // Bytes not captured, after `data`.
        let mut gap = len - data.len() as u64;
        let mut pos = 0usize;
        let mut call_start = true;
        loop {
            let rest = &data[pos..];
            if rest.is_empty() && gap == 0 {
                break;
            }
            match &mut self.state {
                State::Tunnel => break,
                State::Lost { open } => {
                    if !call_start {
                        // Resynchronise only at call boundaries.
                        break;
                    }
                    match message_start(rest, self.kind) {
                        Start::Yes(_) | Start::Maybe if !rest.is_empty() => {
                            if let Some((last, bytes)) = open.take() {
                                out.push(Output::End {
                                    ts: last,
                                    body_bytes: bytes,
                                    complete: false,
                                });
                            }
                            self.state = State::Idle;
                        }
                        _ => {
                            if let Some((last, _)) = open {
                                *last = ts;
                            }
                            self.stats.skipped_calls += 1;
                            break;
                        }
                    }
                }
                State::Idle => {
                    if rest.is_empty() {
                        // A message starts in bytes we cannot see.
                        self.stats.truncated += 1;
                        self.state = State::Lost { open: None };
                        continue;
                    }
                    match message_start(rest, self.kind) {
                        Start::No => {
                            self.stats.skipped_calls += 1;
                            self.state = State::Lost { open: None };
                            // This call is not a message start; wait for the next one.
                            break;
                        }
                        _ => {
                            self.state = State::Head {
                                buf: Vec::new(),
                                ts,
                                offset: self.total + pos as u64,
                            }
                        }
                    }
                }
                State::Head {
                    buf,
                    ts: start,
                    offset,
                } => {
                    let (start, offset) = (*start, *offset);
                    let before = buf.len();
                    let room = MAX_HEAD - before;
                    let take = rest.len().min(room);
                    // A head that begins and ends in one call (nearly every one) is parsed where
                    // it lies; only a head spread over calls is gathered into `buf`.
                    let parsed = if before == 0 {
                        let parsed = parse_head(&rest[..take], self.kind, interner);
                        if matches!(parsed, Parsed::Partial) {
                            buf.extend_from_slice(&rest[..take]);
                        }
                        parsed
                    } else {
                        buf.extend_from_slice(&rest[..take]);
                        parse_head(buf, self.kind, interner)
                    };
                    match parsed {
                        Parsed::Complete(mut head) => {
                            let used = head.len - before;
                            pos += used;
                            if self.kind.is_none() {
                                self.kind = head.kind;
                            }
                            head.kind = self.kind;
                            let body = if head.invalid_framing {
                                self.stats.malformed += 1;
                                None
                            } else {
                                Some(frame(&head))
                            };
                            self.messages += 1;
                            out.push(Output::Head {
                                head,
                                ts: start,
                                offset,
                            });
                            self.state = match body {
                                None => State::Lost {
                                    open: Some((ts, 0)),
                                },
                                Some(b @ (Body::None | Body::Tunnel)) => {
                                    // No body: the message ends with its head.
                                    out.push(Output::End {
                                        ts,
                                        body_bytes: 0,
                                        complete: true,
                                    });
                                    if b == Body::Tunnel {
                                        State::Tunnel
                                    } else {
                                        State::Idle
                                    }
                                }
                                Some(Body::Length(n)) => State::Body {
                                    mode: BodyState::Length(n),
                                    bytes: 0,
                                    last_ts: ts,
                                },
                                Some(Body::Chunked) => State::Body {
                                    mode: BodyState::Chunked(Chunk::Size(Vec::new())),
                                    bytes: 0,
                                    last_ts: ts,
                                },
                                Some(Body::UntilClose) => State::Body {
                                    mode: BodyState::UntilClose,
                                    bytes: 0,
                                    last_ts: ts,
                                },
                            };
                        }
                        Parsed::Partial => {
                            pos += take;
                            if take < rest.len() || buf.len() >= MAX_HEAD {
                                self.stats.oversized += 1;
                                self.state = State::Lost { open: None };
                                break;
                            }
                            if gap > 0 {
                                self.stats.truncated += 1;
                                self.state = State::Lost { open: None };
                                break;
                            }
                        }
                        Parsed::Invalid => {
                            self.stats.malformed += 1;
                            self.state = State::Lost { open: None };
                            break;
                        }
                    }
                }
                State::Body {
                    mode,
                    bytes,
                    last_ts,
                } => {
                    *last_ts = ts;
                    match mode {
                        BodyState::UntilClose => {
                            *bytes += rest.len() as u64 + gap;
                            break;
                        }
                        BodyState::Length(remaining) => {
                            let avail = rest.len() as u64 + gap;
                            let used = avail.min(*remaining);
                            *remaining -= used;
                            *bytes += used;
                            let from_data = used.min(rest.len() as u64);
                            pos += from_data as usize;
                            gap -= used - from_data;
                            if *remaining == 0 {
                                out.push(Output::End {
                                    ts,
                                    body_bytes: *bytes,
                                    complete: true,
                                });
                                self.state = State::Idle;
                                call_start = false;
                            }
                        }
                        BodyState::Chunked(chunk) => {
                            match step_chunked(chunk, rest, &mut gap) {
                                ChunkStep::Consumed { used, data, done } => {
                                    pos += used;
                                    *bytes += data;
                                    if done {
                                        out.push(Output::End {
                                            ts,
                                            body_bytes: *bytes,
                                            complete: true,
                                        });
                                        self.state = State::Idle;
                                        call_start = false;
                                    }
                                }
                                ChunkStep::Lost { data } => {
                                    *bytes += data;
                                    if gap == 0 {
                                        // Malformed chunk framing, not a gap.
                                        self.stats.malformed += 1;
                                    }
                                    let open = Some((ts, *bytes));
                                    self.state = State::Lost { open };
                                    break;
                                }
                            }
                        }
                    }
                    continue;
                }
            }
            call_start = false;
        }
    }

    /// The connection closed at `ts`: ends a read-until-close body, and reports a message cut
    /// off mid-way as incomplete.
    pub fn close(&mut self, ts: u64, out: &mut Vec<Output>) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Body {
                mode: BodyState::UntilClose,
                bytes,
                last_ts,
            } => out.push(Output::End {
                ts: last_ts,
                body_bytes: bytes,
                complete: true,
            }),
            State::Body { bytes, .. } => out.push(Output::End {
                ts,
                body_bytes: bytes,
                complete: false,
            }),
            State::Lost {
                open: Some((_, bytes)),
            } => out.push(Output::End {
                ts,
                body_bytes: bytes,
                complete: false,
            }),
            State::Head { .. } => self.stats.truncated += 1,
            _ => {}
        }
    }
}

enum Parsed {
    Complete(Head),
    Partial,
    Invalid,
}

fn parse_head(
    buf: &[u8],
    kind: Option<MessageKind>,
    interner: &mut attributes::Interner,
) -> Parsed {
    let kind = match kind {
        Some(k) => k,
        None => match message_start(buf, None) {
            Start::Yes(k) => k,
            Start::Maybe => return Parsed::Partial,
            Start::No => return Parsed::Invalid,
        },
    };
    // Uninitialised: the parser writes the fields it finds, and 256 empty ones would be 8 KiB
    // to fill for every head.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let config = httparse::ParserConfig::default();
    let mut head = Head {
        kind: Some(kind),
        ..Head::default()
    };
    let status = match kind {
        MessageKind::Request => {
            let mut req = httparse::Request::new(&mut []);
            let status = config.parse_request_with_uninit_headers(&mut req, buf, &mut fields);
            if let Ok(httparse::Status::Complete(_)) = status {
                head.method = attributes::method_text(req.method.unwrap_or_default());
                head.target = req.path.unwrap_or_default().to_string();
                head.version = req.version.unwrap_or(1);
                fill_fields(&mut head, req.headers, interner);
            }
            status
        }
        MessageKind::Response => {
            let mut resp = httparse::Response::new(&mut []);
            let status = config.parse_response_with_uninit_headers(&mut resp, buf, &mut fields);
            if let Ok(httparse::Status::Complete(_)) = status {
                head.status = resp.code.unwrap_or_default();
                head.version = resp.version.unwrap_or(1);
                fill_fields(&mut head, resp.headers, interner);
            }
            status
        }
    };
    match status {
        Ok(httparse::Status::Complete(n)) => {
            head.len = n;
            Parsed::Complete(head)
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// What a header field is to the framing or to the spans.
#[derive(Clone, Copy)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Kept(&'static str),
}

/// The field a name is, if it matters (names compared by length first: most fields are none).
fn classify(name: &str) -> Option<Field> {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        14 if is("content-length") => Some(Field::ContentLength),
        17 if is("transfer-encoding") => Some(Field::TransferEncoding),
        10 if is("connection") => Some(Field::Connection),
        6 if is("expect") => Some(Field::Expect),
        _ => KEPT_HEADERS.iter().find(|k| is(k)).map(|k| Field::Kept(k)),
    }
}

/// The comma-separated elements of a field value, optional whitespace around them removed.
fn elements(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

fn fill_fields(
    head: &mut Head,
    fields: &[httparse::Header<'_>],
    interner: &mut attributes::Interner,
) {
    let mut keep_alive = false;
    let mut close = false;
    for f in fields {
        // Most fields matter to neither framing nor spans: their values are not looked at.
        let Some(field) = classify(f.name) else {
            continue;
        };
        let value = f.value.trim_ascii();
        match field {
            Field::ContentLength => {
                // Repeated identical values are allowed (RFC 9110 8.6); anything else is
                // invalid.
                let mut values = elements(value).map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                });
                let first = values.next().flatten();
                match first {
                    Some(first) if values.all(|v| v == Some(first)) => {
                        if head.content_length.is_some_and(|c| c != first) {
                            head.invalid_framing = true;
                        }
                        head.content_length = Some(first);
                    }
                    _ => head.invalid_framing = true,
                }
            }
            Field::TransferEncoding => {
                let last = elements(value).next_back().unwrap_or_default();
                head.chunked = last.eq_ignore_ascii_case(b"chunked");
                if !head.chunked && head.kind == Some(MessageKind::Request) {
                    // A request whose length cannot be determined (RFC 9112 6.3 rule 4).
                    head.invalid_framing = true;
                }
            }
            Field::Connection => {
                for token in elements(value) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            Field::Expect => head.expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
            Field::Kept(name) => {
                let value = String::from_utf8_lossy(value);
                let value = if INTERNED_HEADERS.contains(&name) {
                    interner.text(&value)
                } else {
                    Text::Owned(value.into_owned())
                };
                head.headers.push((name, value));
            }
        }
    }
    if head.chunked {
        // Transfer-Encoding overrides Content-Length (RFC 9112 6.3 rule 3).
        head.content_length = None;
    }
    head.close = close || (head.version == 0 && !keep_alive);
}

enum ChunkStep {
    /// `used` captured bytes consumed (and some of `gap`), `data` body bytes counted.
    Consumed { used: usize, data: u64, done: bool },
    /// Framing could not be followed (after `data` body bytes).
    Lost { data: u64 },
}

/// Advances chunked decoding over one call's remaining bytes.
fn step_chunked(chunk: &mut Chunk, bytes: &[u8], gap: &mut u64) -> ChunkStep {
    let mut pos = 0;
    let mut data = 0u64;
    loop {
        if pos == bytes.len() {
            if *gap == 0 {
                return ChunkStep::Consumed {
                    used: pos,
                    data,
                    done: false,
                };
            }
            // Only chunk data can be skipped without seeing it.
            match chunk {
                Chunk::Data(remaining) => {
                    let n = (*remaining).min(*gap);
                    *remaining -= n;
                    *gap -= n;
                    data += n;
                    if *remaining == 0 {
                        *chunk = Chunk::DataEnd(2);
                    }
                    continue;
                }
                // The CRLF after chunk data is fixed: skipping it unseen is safe.
                Chunk::DataEnd(left) => {
                    let n = (*left as u64).min(*gap);
                    *gap -= n;
                    *left -= n as u8;
                    if *left == 0 {
                        *chunk = Chunk::Size(Vec::new());
                    }
                    continue;
                }
                // A size line we cannot see.
                _ => return ChunkStep::Lost { data },
            }
        }
        match chunk {
            Chunk::Size(line) => {
                match take_line(line, bytes, &mut pos) {
                    Line::Done => {}
                    Line::More => continue,
                    Line::TooLong => return ChunkStep::Lost { data },
                }
                let Some(size) = chunk_size(line) else {
                    return ChunkStep::Lost { data };
                };
                *chunk = if size == 0 {
                    Chunk::Trailer(Vec::new())
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(remaining) => {
                let n = (*remaining).min((bytes.len() - pos) as u64);
                *remaining -= n;
                pos += n as usize;
                data += n;
                if *remaining == 0 {
                    *chunk = Chunk::DataEnd(2);
                }
            }
            Chunk::DataEnd(left) => {
                let b = bytes[pos];
                let ok = (*left == 2 && (b == b'\r' || b == b'\n')) || (*left == 1 && b == b'\n');
                if !ok {
                    return ChunkStep::Lost { data };
                }
                pos += 1;
                *left = if b == b'\n' { 0 } else { *left - 1 };
                if *left == 0 {
                    *chunk = Chunk::Size(Vec::new());
                }
            }
            Chunk::Trailer(line) => {
                match take_line(line, bytes, &mut pos) {
                    Line::Done => {}
                    Line::More => continue,
                    Line::TooLong => return ChunkStep::Lost { data },
                }
                let empty = line.is_empty() || line.as_slice() == b"\r";
                line.clear();
                if empty {
                    return ChunkStep::Consumed {
                        used: pos,
                        data,
                        done: true,
                    };
                }
            }
        }
    }
}

enum Line {
    /// `line` holds a whole line (without its LF).
    Done,
    /// The line continues in the next call.
    More,
    TooLong,
}

/// Appends bytes from `bytes[*pos..]` to `line` up to the next LF, which is consumed.
fn take_line(line: &mut Vec<u8>, bytes: &[u8], pos: &mut usize) -> Line {
    let rest = &bytes[*pos..];
    let (part, done) = match rest.iter().position(|b| *b == b'\n') {
        Some(nl) => (&rest[..nl], true),
        None => (rest, false),
    };
    line.extend_from_slice(part);
    *pos += part.len() + done as usize;
    if line.len() > MAX_LINE {
        Line::TooLong
    } else if done {
        Line::Done
    } else {
        Line::More
    }
}

/// Parses a chunk-size line (hex size, optional `;ext`, optional trailing CR).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line
        .iter()
        .position(|b| *b == b';' || *b == b' ' || *b == b'\t')
        .unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for b in hex {
        n = n * 16 + (*b as char).to_digit(16)? as u64;
    }
    Some(n)
}
