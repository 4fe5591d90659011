//! OTLP protobuf encoding of spans, written straight into one buffer per export request.
//!
//! Building the generated `opentelemetry-proto` messages first cost an allocation per
//! attribute, a drop of each afterwards and a second pass to encode them: about a third of the
//! agent's CPU per span at saturation (docs/BENCHMARKS.md). The shapes here are the OTLP
//! `collector/trace/v1` and `trace/v1` schema's; the tests decode the output with the generated
//! types, so a wrong field number or length fails them.
//!
//! Every message's length is computed before it is written (protobuf puts lengths in front),
//! so nothing is written twice and nothing is moved; each message goes into a buffer of
//! exactly that size through a cursor, and a length that disagrees fails the write. An export
//! request is written behind room for gRPC's message prefix, so the one buffer goes out as it
//! is, over gRPC or as an HTTP body, without being copied into the transport's own.

use std::{mem::MaybeUninit, sync::Arc};

use prost::bytes::Bytes;

use super::pool::Pool;
use crate::{
    http::attributes::{Attr, Side, Value},
    trace::Span,
};

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// OTLP span flags: the W3C trace flags, and whether the parent is remote (bits 8 and 9, as
/// the SDKs set them).
pub const HAS_IS_REMOTE: u32 = 0x100;
pub const IS_REMOTE: u32 = 0x200;

/// `SpanKind` values.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `StatusCode::STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

fn varint_len(v: u64) -> usize {
    ((64 - (v | 1).leading_zeros()) as usize).div_ceil(7)
}

/// A message being written into a buffer of the size computed for it beforehand: a cursor
/// over the buffer's bytes, so each write is a store and a bounds check, with no capacity
/// check or length update of a growing `Vec` per byte. `pos` only ever advances over bytes
/// just written (`byte`, `slice`): the bytes before it are initialised.
struct Out<'a> {
    buf: &'a mut [MaybeUninit<u8>],
    pos: usize,
}

impl Out<'_> {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.buf[self.pos].write(b);
        self.pos += 1;
    }

    #[inline]
    fn slice(&mut self, b: &[u8]) {
        let end = self.pos + b.len();
        self.buf[self.pos..end].write_copy_of_slice(b);
        self.pos = end;
    }
}

/// A buffer of exactly `len` bytes, filled by `write`; not zeroed first (a batch's request is
/// hundreds of KiB, each written once).
fn encoded(len: usize, write: impl FnOnce(&mut Out<'_>)) -> Vec<u8> {
    encoded_into(Vec::new(), len, write)
}

/// [`encoded`] into the empty `buf`, whose room is used if it has enough.
fn encoded_into(mut buf: Vec<u8>, len: usize, write: impl FnOnce(&mut Out<'_>)) -> Vec<u8> {
    debug_assert!(buf.is_empty());
    buf.reserve_exact(len);
    let mut out = Out {
        buf: &mut buf.spare_capacity_mut()[..len],
        pos: 0,
    };
    write(&mut out);
    assert_eq!(out.pos, len, "length computed and written differ");
    // SAFETY: `Out` advances `pos` only over bytes it wrote, and it reached `len`.
    unsafe { buf.set_len(len) };
    buf
}

#[inline]
fn put_varint(buf: &mut Out<'_>, mut v: u64) {
    while v >= 0x80 {
        buf.byte(v as u8 | 0x80);
        v >>= 7;
    }
    buf.byte(v as u8);
}

fn key_len(field: u32) -> usize {
    varint_len(u64::from(field) << 3)
}

#[inline]
fn put_key(buf: &mut Out<'_>, field: u32, wire: u32) {
    put_varint(buf, u64::from(field << 3 | wire));
}

/// Size of a length-delimited field whose content is `n` bytes.
fn len_field(field: u32, n: usize) -> usize {
    key_len(field) + varint_len(n as u64) + n
}

#[inline]
fn put_len(buf: &mut Out<'_>, field: u32, n: usize) {
    put_key(buf, field, LEN);
    put_varint(buf, n as u64);
}

#[inline]
fn put_bytes(buf: &mut Out<'_>, field: u32, b: &[u8]) {
    put_len(buf, field, b.len());
    buf.slice(b);
}

fn put_fixed64(buf: &mut Out<'_>, field: u32, v: u64) {
    put_key(buf, field, FIXED64);
    buf.slice(&v.to_le_bytes());
}

/// `AnyValue` content.
fn any_value_len(v: Attr<'_>) -> usize {
    match v {
        Attr::Str(s) => len_field(1, s.len()),
        // int64 is a varint of the two's complement (10 bytes when negative).
        Attr::Int(i) => key_len(3) + varint_len(i as u64),
    }
}

/// `KeyValue` content.
fn key_value_len(key: &str, v: Attr<'_>) -> usize {
    len_field(1, key.len()) + len_field(2, any_value_len(v))
}

fn put_key_value(buf: &mut Out<'_>, field: u32, key: &str, v: Attr<'_>) {
    let any = any_value_len(v);
    let content = len_field(1, key.len()) + len_field(2, any);
    if content < 0x80 && field < 16 {
        // Nearly every attribute: every tag and length inside is one byte, written four at
        // a time.
        buf.slice(&[
            (field << 3 | LEN) as u8,
            content as u8,
            (1 << 3 | LEN) as u8,
            key.len() as u8,
        ]);
        buf.slice(key.as_bytes());
        match v {
            Attr::Str(s) => {
                buf.slice(&[
                    (2 << 3 | LEN) as u8,
                    any as u8,
                    (1 << 3 | LEN) as u8,
                    s.len() as u8,
                ]);
                buf.slice(s.as_bytes());
            }
            Attr::Int(i) => {
                buf.slice(&[(2 << 3 | LEN) as u8, any as u8, (3 << 3 | VARINT) as u8]);
                put_varint(buf, i as u64);
            }
        }
        return;
    }
    put_len(buf, field, content);
    put_bytes(buf, 1, key.as_bytes());
    put_len(buf, 2, any);
    match v {
        Attr::Str(s) => put_bytes(buf, 1, s.as_bytes()),
        Attr::Int(i) => {
            put_key(buf, 3, VARINT);
            put_varint(buf, i as u64);
        }
    }
}

/// `Status` content of an error span.
fn status_len(message: &str) -> usize {
    (if message.is_empty() {
        0
    } else {
        len_field(2, message.len())
    }) + key_len(3)
        + 1
}

/// A span's attributes in export order, and last how its parent was found.
fn each_attribute<'a>(s: &'a Span, mut f: impl FnMut(&'static str, Attr<'a>)) {
    s.attributes.each(&mut f);
    if let Some(link) = s.link {
        f("wirespan.link", Attr::Str(link.as_str()));
    }
}

/// `Span` content.
fn span_len(s: &Span) -> usize {
    let mut n = len_field(1, 16) + len_field(2, 8);
    if let Some(ts) = s.trace_state.as_deref().filter(|t| !t.is_empty()) {
        n += len_field(3, ts.len());
    }
    if s.parent_span_id.is_some() {
        n += len_field(4, 8);
    }
    if !s.name.is_empty() {
        n += len_field(5, s.name.len());
    }
    // kind, start and end, flags.
    n += key_len(6) + 1 + 2 * (key_len(7) + 8) + key_len(16) + 4;
    each_attribute(s, |k, v| n += len_field(9, key_value_len(k, v)));
    if let Some(message) = &s.error {
        n += len_field(15, status_len(message));
    }
    n
}

fn put_span(buf: &mut Out<'_>, s: &Span, len: usize) {
    let start = buf.pos;
    put_bytes(buf, 1, &s.trace_id);
    put_bytes(buf, 2, &s.span_id);
    if let Some(ts) = s.trace_state.as_deref().filter(|t| !t.is_empty()) {
        put_bytes(buf, 3, ts.as_bytes());
    }
    if let Some(parent) = &s.parent_span_id {
        put_bytes(buf, 4, parent);
    }
    if !s.name.is_empty() {
        put_bytes(buf, 5, s.name.as_bytes());
    }
    put_key(buf, 6, VARINT);
    put_varint(
        buf,
        match s.attributes.side {
            Side::Server => KIND_SERVER,
            Side::Client => KIND_CLIENT,
        },
    );
    put_fixed64(buf, 7, s.start_unix_ns);
    put_fixed64(buf, 8, s.end_unix_ns.max(s.start_unix_ns));
    each_attribute(s, |k, v| put_key_value(buf, 9, k, v));
    if let Some(message) = &s.error {
        put_len(buf, 15, status_len(message));
        if !message.is_empty() {
            put_bytes(buf, 2, message.as_bytes());
        }
        put_key(buf, 3, VARINT);
        put_varint(buf, STATUS_ERROR);
    }
    let flags = u32::from(s.flags) | HAS_IS_REMOTE | if s.parent_remote { IS_REMOTE } else { 0 };
    put_key(buf, 16, FIXED32);
    buf.slice(&flags.to_le_bytes());
    debug_assert_eq!(
        buf.pos - start,
        len,
        "span length computed and written differ"
    );
}

/// A `Resource` message's content: its attributes.
pub fn resource(attributes: &[(String, Value)]) -> Vec<u8> {
    let len = attributes
        .iter()
        .map(|(k, v)| len_field(1, key_value_len(k, v.as_attr())))
        .sum();
    encoded(len, |buf| {
        for (k, v) in attributes {
            put_key_value(buf, 1, k, v.as_attr());
        }
    })
}

/// The `InstrumentationScope` content of every span: wirespan and its version.
pub fn scope() -> Vec<u8> {
    let (name, version) = (b"wirespan", env!("CARGO_PKG_VERSION").as_bytes());
    encoded(
        len_field(1, name.len()) + len_field(2, version.len()),
        |buf| {
            put_bytes(buf, 1, name);
            put_bytes(buf, 2, version);
        },
    )
}

/// One `ResourceSpans`: a process's resource and its spans of the batch.
pub struct Group<'a> {
    /// The encoded `Resource` content (see [`resource`]).
    pub resource: Arc<[u8]>,
    pub spans: Vec<&'a Span>,
}

/// gRPC's prefix before a message on its stream: a compression flag and the message's length
/// (big-endian).
pub const GRPC_PREFIX: usize = 5;

/// An encoded `ExportTraceServiceRequest` after its gRPC prefix, in one allocation.
pub struct Request(Bytes);

impl Request {
    /// The prefixed message: the whole body of a gRPC call.
    pub fn grpc(self) -> Bytes {
        self.0
    }

    /// The message alone (an OTLP/HTTP body), the same bytes.
    pub fn message(self) -> Bytes {
        self.0.slice(GRPC_PREFIX..)
    }
}

/// Buffers of requests the transport is done with, for the next requests.
///
/// A request is hundreds of KiB (a batch of 1,024 spans), made on an export thread and freed
/// wherever the connection's last write of it ran: a new one per batch was a large block in
/// and out of the allocator a hundred times a second at saturation, and each freed block stayed
/// mapped for the allocator's purge delay, so that RSS rose with the export rate (up to 25 MiB
/// when exports fell behind). A request's bytes now hold their buffer, and give it back here
/// when the last of them is dropped.
pub type Buffers = Pool<u8>;

/// Buffers for up to `exports_at_once` requests in flight: one for each and the one being
/// encoded, each up to 2 MiB (a buffer that a batch of unusually large spans grew goes back to
/// the allocator).
pub fn buffers(exports_at_once: usize) -> Arc<Buffers> {
    Arc::new(Pool::new(exports_at_once + 1, 2 << 20))
}

/// A request's buffer while its bytes are in use; back to its [`Buffers`] when dropped.
struct Lent {
    buf: Vec<u8>,
    home: Arc<Buffers>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.buf));
    }
}

/// An encoded `ExportTraceServiceRequest` behind its gRPC prefix, in one buffer of `buffers`
/// (which it goes back to when its bytes are dropped).
pub fn request(groups: &[Group<'_>], scope: &[u8], buffers: &Arc<Buffers>) -> Request {
    let lens: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.spans.iter().map(|s| span_len(s)))
        .collect();
    let mut sizes = Vec::with_capacity(groups.len());
    let mut total = 0;
    let mut next = lens.iter();
    for g in groups {
        let scope_spans = len_field(1, scope.len())
            + next
                .by_ref()
                .take(g.spans.len())
                .map(|&n| len_field(2, n))
                .sum::<usize>();
        let resource_spans = len_field(1, g.resource.len()) + len_field(2, scope_spans);
        total += len_field(1, resource_spans);
        sizes.push((resource_spans, scope_spans));
    }
    let message_len = u32::try_from(total).expect("a batch's request is far below 4 GiB");
    let buf = encoded_into(
        buffers.take().unwrap_or_default(),
        GRPC_PREFIX + total,
        |out| {
            out.byte(0);
            out.slice(&message_len.to_be_bytes());
            let mut next = lens.iter();
            for (g, &(resource_spans, scope_spans)) in groups.iter().zip(&sizes) {
                put_len(out, 1, resource_spans);
                put_bytes(out, 1, &g.resource);
                put_len(out, 2, scope_spans);
                put_bytes(out, 1, scope);
                for (s, &n) in g.spans.iter().zip(next.by_ref()) {
                    put_len(out, 2, n);
                    put_span(out, s, n);
                }
            }
        },
    );
    Request(Bytes::from_owner(Lent {
        buf,
        home: buffers.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::any_value,
        trace::v1::{span::SpanKind, status::StatusCode},
    };
    use prost::Message as _;

    use super::*;
    use crate::{http::attributes::Attributes, trace::process::ProcessInfo};

    #[test]
    fn a_request_buffer_comes_back_when_its_bytes_are_dropped() {
        let pool = buffers(1);
        let one = span(false, None, Attributes::least(Side::Server));
        let groups = [Group {
            resource: resource(&[]).into(),
            spans: vec![&one],
        }];
        let first = request(&groups, &scope(), &pool).grpc();
        let at = first.as_ptr();
        let part = first.slice(GRPC_PREFIX..);
        drop(first);
        // Still lent while any of its bytes are held.
        assert_eq!(pool.kept(), 0);
        drop(part);
        assert_eq!(pool.kept(), 1);
        // The next request is written into it, the same bytes as into a new buffer.
        let again = request(&groups, &scope(), &pool).grpc();
        assert_eq!(again.as_ptr(), at);
        assert_eq!(pool.kept(), 0);
        let fresh = request(&groups, &scope(), &buffers(1)).grpc();
        assert_eq!(again, fresh);
        // Kept: one per export in flight and one more; the rest go back to the allocator.
        let held: Vec<Bytes> = (0..4)
            .map(|_| request(&groups, &scope(), &pool).grpc())
            .collect();
        drop(held);
        assert_eq!(pool.kept(), 2);
    }

    fn span(remote: bool, error: Option<&'static str>, attributes: Attributes) -> Span {
        Span {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
            parent_remote: remote,
            link: None,
            name: "GET /x".into(),
            start_unix_ns: 10,
            end_unix_ns: 5,
            attributes,
            error,
            flags: 1,
            trace_state: Some("k=v".into()),
            process: Arc::new(ProcessInfo::default()),
        }
    }

    fn decode(groups: &[Group<'_>]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(request(groups, &scope(), &buffers(1)).message())
            .expect("a valid OTLP request")
    }

    #[test]
    fn varint_sizes() {
        for (v, n) in [
            (0u64, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            let b = encoded(n, |out| put_varint(out, v));
            assert_eq!((b.len(), varint_len(v)), (n, n), "{v}");
            assert_eq!(
                prost::encoding::decode_varint(&mut b.as_slice()).ok(),
                Some(v)
            );
        }
    }

    #[test]
    fn spans_decode_as_otlp() {
        let long = "y".repeat(300);
        let mut a = span(
            true,
            Some("boom"),
            Attributes {
                status: Some(500),
                path: "/x".into(),
                query: Some(String::new()),
                user_agent: Some(long.clone().into()),
                error_type: Some("500".into()),
                route: Some("/{id}".into()),
                ..Attributes::least(Side::Server)
            },
        );
        a.link = Some(crate::trace::Link::Header);
        let mut b = span(false, Some(""), Attributes::least(Side::Client));
        b.parent_span_id = None;
        b.trace_state = None;
        let mut c = span(false, None, Attributes::least(Side::Server));
        c.name = "".into();
        let resource: Arc<[u8]> = resource(&[
            ("service.name".into(), Value::Str("svc".into())),
            ("process.pid".into(), Value::Int(3)),
        ])
        .into();
        let other = resource_of("other");
        let req = decode(&[
            Group {
                resource,
                spans: vec![&a, &b],
            },
            Group {
                resource: other,
                spans: vec![&c],
            },
        ]);
        assert_eq!(req.resource_spans.len(), 2);
        let rs = &req.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0].key, "service.name");
        assert_eq!(
            attrs[0].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("svc".into()))
        );
        assert_eq!(
            attrs[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(3))
        );
        let scope = rs.scope_spans[0].scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("wirespan", env!("CARGO_PKG_VERSION"))
        );
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        let p = &spans[0];
        assert_eq!(p.trace_id, vec![7; 16]);
        assert_eq!(p.span_id, vec![8; 8]);
        assert_eq!(p.parent_span_id, vec![9; 8]);
        assert_eq!(p.flags, 1 | HAS_IS_REMOTE | IS_REMOTE);
        assert_eq!(p.kind, SpanKind::Server as i32);
        assert_eq!(p.name, "GET /x");
        assert_eq!(p.start_time_unix_nano, 10);
        assert_eq!(p.end_time_unix_nano, 10, "never before the start");
        assert_eq!(p.trace_state, "k=v");
        let status = p.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (StatusCode::Error as i32, "boom")
        );
        // Every attribute the span has, in order, and each as it was.
        let mut want = Vec::new();
        each_attribute(&a, |k, v| {
            want.push((
                k.to_string(),
                Some(match v {
                    Attr::Str(s) => any_value::Value::StringValue(s.into()),
                    Attr::Int(i) => any_value::Value::IntValue(i),
                }),
            ))
        });
        let got: Vec<_> = p
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.as_ref().unwrap().value.clone()))
            .collect();
        assert_eq!(got, want);
        let value = |key: &str| got.iter().find(|(k, _)| k == key).unwrap().1.clone();
        assert_eq!(
            value("http.response.status_code"),
            Some(any_value::Value::IntValue(500))
        );
        assert_eq!(
            value("http.request.body.size"),
            Some(any_value::Value::IntValue(0))
        );
        assert_eq!(
            value("url.path"),
            Some(any_value::Value::StringValue("/x".into()))
        );
        assert_eq!(
            value("url.query"),
            Some(any_value::Value::StringValue(String::new()))
        );
        assert_eq!(
            value("user_agent.original"),
            Some(any_value::Value::StringValue(long))
        );
        assert_eq!(
            value("http.route"),
            Some(any_value::Value::StringValue("/{id}".into()))
        );
        assert_eq!(
            value("wirespan.link"),
            Some(any_value::Value::StringValue("header".into()))
        );
        assert_eq!(got.len(), 18);
        let q = &spans[1];
        assert_eq!(q.kind, SpanKind::Client as i32);
        assert_eq!(q.flags, 1 | HAS_IS_REMOTE);
        assert!(q.parent_span_id.is_empty() && q.trace_state.is_empty());
        assert_eq!(q.status.as_ref().unwrap().code, StatusCode::Error as i32);
        let r = &req.resource_spans[1];
        assert_eq!(r.scope_spans[0].spans.len(), 1);
        let unset = &r.scope_spans[0].spans[0];
        assert!(unset.name.is_empty());
        assert_eq!(unset.status, None, "no status: unset");
    }

    #[test]
    fn attribute_lengths_either_side_of_one_byte() {
        // An attribute's content is its key and value plus 6 bytes: 127 is the largest whose
        // lengths all fit in one byte each.
        let values: Vec<String> = (110..=125).map(|n| "v".repeat(n)).collect();
        let mut attributes: Vec<(String, Value)> = values
            .iter()
            .map(|v| ("edge".into(), Value::Str(v.clone().into())))
            .collect();
        for i in [i64::MIN, -1, 0, 127, 128, 1 << 40, i64::MAX] {
            attributes.push(("int".into(), Value::Int(i)));
        }
        attributes.push(("k".repeat(120), Value::Int(1 << 20)));
        let got = opentelemetry_proto::tonic::resource::v1::Resource::decode(
            resource(&attributes).as_slice(),
        )
        .expect("a valid Resource")
        .attributes;
        assert_eq!(got.len(), attributes.len());
        for (g, (k, v)) in got.iter().zip(&attributes) {
            assert_eq!(g.key, *k);
            let want = match v {
                Value::Str(t) => any_value::Value::StringValue(t.to_string()),
                Value::Int(i) => any_value::Value::IntValue(*i),
            };
            assert_eq!(g.value.as_ref().unwrap().value, Some(want));
        }
        // And in a span: a path either side of the one-byte length.
        for n in 110..=125 {
            let s = span(
                false,
                None,
                Attributes {
                    path: "p".repeat(n),
                    ..Attributes::least(Side::Server)
                },
            );
            let groups = [Group {
                resource: resource_of("p"),
                spans: vec![&s],
            }];
            let req = decode(&groups);
            let got = &req.resource_spans[0].scope_spans[0].spans[0].attributes;
            let path = got.iter().find(|kv| kv.key == "url.path").unwrap();
            assert_eq!(
                path.value.as_ref().unwrap().value,
                Some(any_value::Value::StringValue("p".repeat(n)))
            );
        }
    }

    fn resource_of(name: &str) -> Arc<[u8]> {
        resource(&[("service.name".into(), Value::Str(name.to_string().into()))]).into()
    }

    #[test]
    fn empty_batch_is_an_empty_request() {
        assert!(decode(&[]).resource_spans.is_empty());
    }

    #[test]
    fn grpc_body_is_the_message_behind_its_prefix() {
        let s = span(false, Some("boom"), Attributes::least(Side::Server));
        let groups = [Group {
            resource: resource_of("p"),
            spans: vec![&s],
        }];
        let grpc = request(&groups, &scope(), &buffers(1)).grpc();
        let message = request(&groups, &scope(), &buffers(1)).message();
        assert_eq!(grpc[0], 0, "not compressed");
        let len = u32::from_be_bytes(grpc[1..GRPC_PREFIX].try_into().unwrap()) as usize;
        assert_eq!(len, message.len());
        assert_eq!(&grpc[GRPC_PREFIX..], &message[..]);
        let decoded = ExportTraceServiceRequest::decode(message).unwrap();
        assert_eq!(decoded.resource_spans[0].scope_spans[0].spans.len(), 1);
    }
}
