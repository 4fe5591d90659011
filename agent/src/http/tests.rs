//! Framing, trace-context and attribute rules, one test each.

use super::{
    attributes::{self, Attr, Exchange, Outcome, Side},
    context::{self, Format},
    framing::{self, Body, Head, MessageKind, Output, Stream},
};

/// Feeds calls (time = index + 1, all bytes captured) to a stream of `kind`; responses are
/// framed as answers to `method`.
fn run(kind: MessageKind, method: &str, calls: &[&[u8]]) -> (Vec<Output>, Stream) {
    let mut s = Stream::new(Some(kind));
    let mut out = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        feed(&mut s, i as u64 + 1, c.len() as u64, c, method, &mut out);
    }
    (out, s)
}

fn feed(s: &mut Stream, ts: u64, len: u64, data: &[u8], method: &str, out: &mut Vec<Output>) {
    let mut frame = |h: &Head| match h.kind {
        Some(MessageKind::Request) => framing::request_body(h),
        _ => framing::response_body(h, Some(method)),
    };
    s.feed(
        ts,
        len,
        data,
        &mut frame,
        &mut attributes::Interner::default(),
        out,
    );
}

fn heads(out: &[Output]) -> Vec<&Head> {
    out.iter()
        .filter_map(|o| match o {
            Output::Head { head, .. } => Some(head),
            _ => None,
        })
        .collect()
}

fn ends(out: &[Output]) -> Vec<(u64, u64, bool)> {
    out.iter()
        .filter_map(|o| match o {
            Output::End {
                ts,
                body_bytes,
                complete,
            } => Some((*ts, *body_bytes, *complete)),
            _ => None,
        })
        .collect()
}

#[test]
fn content_length_body_split_over_calls() {
    let (out, _) = run(
        MessageKind::Response,
        "GET",
        &[
            b"HTTP/1.1 200 OK\r\nContent-",
            b"Length: 10\r\n\r\n01234",
            b"567",
            b"89",
        ],
    );
    assert_eq!(heads(&out)[0].status, 200);
    assert_eq!(ends(&out), vec![(4, 10, true)]);
    // The head is timed by the call that carried its first byte.
    assert!(matches!(
        out[0],
        Output::Head {
            ts: 1,
            offset: 0,
            ..
        }
    ));
}

#[test]
fn head_spread_over_calls_is_the_head_read_in_one() {
    // A request and a response, each with a body and the next message in the same bytes.
    let cases: [(MessageKind, &[u8]); 2] = [
        (
            MessageKind::Request,
            b"POST /orders?id=7 HTTP/1.1\r\nHost: shop:8080\r\nContent-Length: 5\r\n\
              traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n\
              helloGET /next HTTP/1.1\r\n\r\n",
        ),
        (
            MessageKind::Response,
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n\
              okHTTP/1.1 204 No Content\r\n\r\n",
        ),
    ];
    for (kind, bytes) in cases {
        let (whole, _) = run(kind, "POST", &[bytes]);
        assert_eq!(heads(&whole).len(), 2, "{whole:?}");
        let bodies = |out: &[Output]| -> Vec<(u64, bool)> {
            ends(out).into_iter().map(|(_, b, c)| (b, c)).collect()
        };
        // Cut once anywhere, and in three pieces.
        for cut in 1..bytes.len() {
            let mid = cut + (bytes.len() - cut) / 2;
            for calls in [
                vec![&bytes[..cut], &bytes[cut..]],
                vec![&bytes[..cut], &bytes[cut..mid], &bytes[mid..]],
            ] {
                let (out, s) = run(kind, "POST", &calls);
                assert_eq!(heads(&out), heads(&whole), "cut at {cut}");
                assert_eq!(bodies(&out), bodies(&whole), "cut at {cut}");
                assert_eq!(s.stats, framing::Stats::default(), "cut at {cut}");
            }
        }
    }
}

#[test]
fn request_without_body_ends_with_its_head() {
    let (out, _) = run(
        MessageKind::Request,
        "",
        &[b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n"],
    );
    let h = heads(&out)[0];
    assert_eq!((&*h.method, h.target.as_str()), ("GET", "/a?b=1"));
    assert_eq!(h.header("user-agent"), Some("t"));
    assert_eq!(ends(&out), vec![(1, 0, true)]);
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let (out, _) = run(
        MessageKind::Response,
        "GET",
        &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5;ext=1\r\nhello\r\n",
            b"6\r\n world\r",
            b"\n0\r\nX-Trailer: 1\r\n",
            b"\r\n",
        ],
    );
    assert_eq!(ends(&out), vec![(5, 11, true)]);
}

#[test]
fn chunked_data_larger_than_the_capture_is_skipped_by_length() {
    let mut s = Stream::new(Some(MessageKind::Response));
    let mut out = Vec::new();
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    feed(&mut s, 1, head.len() as u64, head, "GET", &mut out);
    // A 0x2000-byte chunk in one call of which only 16 bytes were captured.
    let mut call = b"2000\r\n".to_vec();
    call.extend(std::iter::repeat_n(b'a', 0x2000));
    call.extend_from_slice(b"\r\n");
    feed(&mut s, 2, call.len() as u64, &call[..16], "GET", &mut out);
    feed(&mut s, 3, 5, b"0\r\n\r\n", "GET", &mut out);
    assert_eq!(ends(&out), vec![(3, 0x2000, true)]);
}

#[test]
fn gap_over_chunk_framing_is_resolved_by_the_next_message() {
    let mut s = Stream::new(Some(MessageKind::Response));
    let mut out = Vec::new();
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    feed(&mut s, 1, head.len() as u64, head, "GET", &mut out);
    // Two chunks in one call; the second size line falls in the uncaptured part.
    feed(
        &mut s,
        2,
        4000,
        b"10\r\n0123456789abcdef\r\n",
        "GET",
        &mut out,
    );
    feed(&mut s, 3, 100, b"more body", "GET", &mut out);
    let next = b"HTTP/1.1 204 No Content\r\n\r\n";
    feed(&mut s, 4, next.len() as u64, next, "GET", &mut out);
    // The first message ends, incomplete, at the last call before the next one began.
    assert_eq!(ends(&out)[0], (3, 16, false));
    assert_eq!(heads(&out)[1].status, 204);
    assert_eq!(s.stats.skipped_calls, 1);
}

#[test]
fn head_response_and_no_body_statuses() {
    for (method, status) in [("HEAD", 200), ("GET", 204), ("GET", 304), ("GET", 100)] {
        let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 50\r\n\r\n");
        let (out, s) = run(MessageKind::Response, method, &[resp.as_bytes()]);
        assert_eq!(ends(&out), vec![(1, 0, true)], "{method} {status}");
        assert!(s.is_idle());
    }
}

#[test]
fn read_until_close_body() {
    let mut s = Stream::new(Some(MessageKind::Response));
    let mut out = Vec::new();
    feed(&mut s, 1, 19, b"HTTP/1.0 200 OK\r\n\r\n", "GET", &mut out);
    feed(&mut s, 2, 3, b"abc", "GET", &mut out);
    feed(&mut s, 3, 4, b"defg", "GET", &mut out);
    assert!(ends(&out).is_empty());
    s.close(9, &mut out);
    // Ends at the last byte, not at the close.
    assert_eq!(ends(&out), vec![(3, 7, true)]);
    assert!(heads(&out)[0].close, "HTTP/1.0 without keep-alive closes");
}

#[test]
fn close_mid_body_is_incomplete() {
    let mut s = Stream::new(Some(MessageKind::Response));
    let mut out = Vec::new();
    let r = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc";
    feed(&mut s, 1, r.len() as u64, r, "GET", &mut out);
    s.close(5, &mut out);
    assert_eq!(ends(&out), vec![(5, 3, false)]);
}

#[test]
fn pipelined_requests_in_one_call_have_their_own_offsets() {
    let call = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyzGET /3 HTTP/1.1\r\n\r\n";
    let (out, _) = run(MessageKind::Request, "", &[call]);
    let offsets: Vec<(String, u64)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Head { head, offset, .. } => Some((head.target.clone(), *offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        offsets,
        vec![("/1".into(), 0), ("/2".into(), 28), ("/3".into(), 79)]
    );
    assert_eq!(ends(&out).len(), 3);
    assert_eq!(ends(&out)[1].1, 3);
}

#[test]
fn expect_continue_request_body_after_interim_response() {
    let (out, _) = run(
        MessageKind::Request,
        "",
        &[
            b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
            b"data",
        ],
    );
    assert!(heads(&out)[0].expect_continue);
    assert_eq!(ends(&out), vec![(2, 4, true)]);
    let (out, _) = run(
        MessageKind::Response,
        "PUT",
        &[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        ],
    );
    assert_eq!(
        heads(&out).iter().map(|h| h.status).collect::<Vec<_>>(),
        vec![100, 201]
    );
}

#[test]
fn upgrade_stops_parsing() {
    let (out, s) = run(
        MessageKind::Response,
        "GET",
        &[
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"\x81\x05hello",
        ],
    );
    assert_eq!(ends(&out).len(), 1);
    assert_eq!(s.stats, framing::Stats::default());
}

#[test]
fn midway_stream_resynchronises_at_a_message_start() {
    let mut s = Stream::joined_midway(Some(MessageKind::Request));
    let mut out = Vec::new();
    feed(&mut s, 1, 10, b"tail of a ", "", &mut out);
    feed(&mut s, 2, 18, b"GET / HTTP/1.1\r\n\r\n", "", &mut out);
    assert_eq!(heads(&out).len(), 1);
    assert_eq!(s.stats.skipped_calls, 1);
}

#[test]
fn non_http_bytes_make_no_messages() {
    let (out, s) = run(
        MessageKind::Request,
        "",
        &[
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
            b"*1\r\n$4\r\nPING\r\n",
        ],
    );
    assert!(out.is_empty());
    assert_eq!(s.stats.skipped_calls, 2);
}

#[test]
fn malformed_head_is_counted_and_skipped() {
    let (out, s) = run(
        MessageKind::Request,
        "",
        &[
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /ok HTTP/1.1\r\n\r\n",
        ],
    );
    assert_eq!(s.stats.malformed, 1);
    assert_eq!(heads(&out)[0].target, "/ok");
}

#[test]
fn conflicting_content_lengths_are_malformed() {
    let (_, s) = run(
        MessageKind::Request,
        "",
        &[b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"],
    );
    assert_eq!(s.stats.malformed, 1);
}

#[test]
fn oversized_head_is_counted() {
    let mut s = Stream::new(Some(MessageKind::Request));
    let mut out = Vec::new();
    let mut call = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    call.extend(std::iter::repeat_n(b'a', framing::MAX_HEAD));
    feed(&mut s, 1, call.len() as u64, &call, "", &mut out);
    assert_eq!(s.stats.oversized, 1);
    assert!(out.is_empty());
}

#[test]
fn truncated_head_is_counted() {
    let mut s = Stream::new(Some(MessageKind::Request));
    let mut out = Vec::new();
    feed(
        &mut s,
        1,
        9000,
        b"GET / HTTP/1.1\r\nX-Pad: aaaa",
        "",
        &mut out,
    );
    assert_eq!(s.stats.truncated, 1);
    assert!(out.is_empty());
}

#[test]
fn head_of_64_kib_with_traceparent_at_its_end() {
    let mut call = b"GET /big-head HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..66 {
        call.extend(format!("X-Pad-{i}: {}\r\n", "p".repeat(1010)).as_bytes());
    }
    call.extend(b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n");
    assert!(call.len() > 64 * 1024);
    let (out, _) = run(MessageKind::Request, "", &[&call]);
    let ctx = context::extract(heads(&out)[0]).unwrap().unwrap();
    assert_eq!(
        ctx.span_id,
        [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]
    );
}

#[test]
fn message_start_classification() {
    use framing::{Start, message_start};
    assert_eq!(
        message_start(b"GET / HTTP/1.1", None),
        Start::Yes(MessageKind::Request)
    );
    assert_eq!(
        message_start(b"HTTP/1.1 200", None),
        Start::Yes(MessageKind::Response)
    );
    assert_eq!(message_start(b"HTT", None), Start::Maybe);
    assert_eq!(
        message_start(b"GE", Some(MessageKind::Request)),
        Start::Maybe
    );
    assert_eq!(message_start(b"get / HTTP/1.1", None), Start::No);
    assert_eq!(
        message_start(b"HTTP/1.1 200", Some(MessageKind::Request)),
        Start::No
    );
    assert_eq!(message_start(b"\x00\x01", None), Start::No);
}

fn head_with(headers: &[(&'static str, &str)]) -> Head {
    Head {
        kind: Some(MessageKind::Request),
        method: "GET".into(),
        target: "/".into(),
        version: 1,
        headers: headers
            .iter()
            .map(|(k, v)| (*k, v.to_string().into()))
            .collect(),
        ..Head::default()
    }
}

#[test]
fn traceparent_valid_cases() {
    let ok = context::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .unwrap();
    assert!(ok.sampled);
    assert_eq!(ok.trace_id[0], 0x0a);
    let not_sampled =
        context::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
            .unwrap();
    assert!(!not_sampled.sampled);
    // The random flag (bit 1) is kept; unknown bits are not passed on.
    let random =
        context::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff")
            .unwrap();
    assert_eq!(random.flags, 0x03);
    // A future version may append fields after a dash.
    assert!(
        context::parse_traceparent(
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future"
        )
        .is_some()
    );
}

#[test]
fn traceparent_invalid_cases() {
    for bad in [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
        "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
        // Non-ASCII where ids belong: rejected, never a panic on a char boundary.
        "00-é0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033é-01x",
    ] {
        assert!(context::parse_traceparent(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn invalid_traceparent_is_an_error_and_two_are_ignored() {
    let h = head_with(&[("traceparent", "00-xyz")]);
    assert_eq!(context::extract(&h), Err(context::Invalid::Traceparent));
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let h = head_with(&[("traceparent", tp), ("traceparent", tp)]);
    assert!(context::extract(&h).is_err());
}

#[test]
fn tracestate_is_kept_when_valid() {
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let h = head_with(&[
        ("traceparent", tp),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]);
    let c = context::extract(&h).unwrap().unwrap();
    assert_eq!(
        c.trace_state.as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    let h = head_with(&[("traceparent", tp), ("tracestate", "BAD KEY=1")]);
    assert_eq!(context::extract(&h).unwrap().unwrap().trace_state, None);
}

#[test]
fn b3_single_variants() {
    let c = context::parse_b3_single(
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    )
    .unwrap();
    assert!(c.sampled);
    assert_eq!(c.format, Format::B3Single);
    let c = context::parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-0").unwrap();
    assert!(!c.sampled);
    assert_eq!(&c.trace_id[..8], &[0; 8], "64-bit ids are left-padded");
    assert!(
        context::parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-d")
            .unwrap()
            .sampled
    );
    assert!(context::parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-x").is_none());
    assert!(context::parse_b3_single("64fe8b2a57d3eff7").is_none());
    // A lone sampling decision carries no context.
    assert_eq!(context::extract(&head_with(&[("b3", "0")])), Ok(None));
}

#[test]
fn b3_multi_variants() {
    let h = head_with(&[
        ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "1"),
    ]);
    let c = context::extract(&h).unwrap().unwrap();
    assert_eq!(c.format, Format::B3Multi);
    assert!(c.sampled);
    let h = head_with(&[
        ("x-b3-traceid", "48485a3953bb6124"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "0"),
    ]);
    let c = context::extract(&h).unwrap().unwrap();
    assert!(!c.sampled);
    let h = head_with(&[("x-b3-traceid", "48485a3953bb6124")]);
    assert_eq!(context::extract(&h), Err(context::Invalid::B3));
}

fn exchange<'a>(side: Side, req: &'a mut Head, outcome: Outcome) -> Exchange<'a> {
    Exchange {
        side,
        request: req,
        response_status: match outcome {
            Outcome::Response(c) => Some(c),
            _ => None,
        },
        outcome,
        local: "127.0.0.1:8080".parse().unwrap(),
        remote: "127.0.0.1:50000".parse().unwrap(),
        local_ip: "127.0.0.1".into(),
        remote_ip: "127.0.0.1".into(),
        request_body: 0,
        response_body: 12,
        redact_query: true,
    }
}

/// A route: the path as it is.
fn route(path: &str, _: &mut attributes::Interner) -> attributes::Text {
    path.to_string().into()
}

/// The attributes of an exchange, with the path as its route.
fn attributes_of(ex: &mut Exchange<'_>) -> attributes::Attributes {
    attributes::attributes(ex, &mut attributes::Interner::default(), route)
}

/// The attributes of an exchange of `req` answered with a 200.
fn answered(side: Side, req: &mut Head) -> attributes::Attributes {
    attributes_of(&mut exchange(side, req, Outcome::Response(200)))
}

fn attr<'a>(a: &'a attributes::Attributes, k: &str) -> Option<Attr<'a>> {
    a.get(k)
}

#[test]
fn server_span_attributes_and_redacted_query() {
    let mut req = head_with(&[("host", "shop.local:8080"), ("user-agent", "curl/8")]);
    req.target = "/users/42?token=abc&x=1".into();
    let mut ex = exchange(Side::Server, &mut req, Outcome::Response(200));
    let a = attributes_of(&mut ex);
    let s = |v| Some(Attr::Str(v));
    assert_eq!(attr(&a, "http.request.method"), s("GET"));
    assert_eq!(attr(&a, "url.path"), s("/users/42"));
    assert_eq!(attr(&a, "url.query"), s("token=REDACTED&x=REDACTED"));
    assert_eq!(attr(&a, "server.address"), s("shop.local"));
    assert_eq!(attr(&a, "server.port"), Some(Attr::Int(8080)));
    assert_eq!(attr(&a, "client.port"), Some(Attr::Int(50000)));
    assert_eq!(attr(&a, "user_agent.original"), s("curl/8"));
    assert_eq!(attr(&a, "http.response.status_code"), Some(Attr::Int(200)));
    assert_eq!(attributes::error(&ex), None);
    // The name is the method, never the path; with a route, the method and the route.
    let mut i = attributes::Interner::default();
    assert_eq!(&*attributes::span_name(&req.method, None, &mut i), "GET");
    assert_eq!(&*attributes::span_name("FOO", None, &mut i), "HTTP");
    let named = attributes::span_name("FOO", Some("/a/{id}"), &mut i);
    assert_eq!(&*named, "HTTP /a/{id}");
    assert_eq!(i.kept(), (1, 12), "kept for the next span of the route");
}

#[test]
fn status_rules() {
    let mut req = head_with(&[]);
    let mut e = |side, o| attributes::error(&exchange(side, &mut req, o)).is_some();
    assert!(e(Side::Server, Outcome::Response(500)));
    assert!(!e(Side::Server, Outcome::Response(404)));
    assert!(e(Side::Client, Outcome::Response(404)));
    assert!(!e(Side::Client, Outcome::Response(302)));
    assert!(e(Side::Server, Outcome::CutOff));
    let a = attributes_of(&mut exchange(Side::Client, &mut req, Outcome::CutOff));
    assert_eq!(attr(&a, "error.type"), Some(Attr::Str("connection_closed")));
}

#[test]
fn client_span_full_url() {
    let mut req = head_with(&[("host", "[::1]:9000")]);
    req.target = "/p?q=secret".into();
    let a = answered(Side::Client, &mut req);
    assert_eq!(
        attr(&a, "url.full"),
        Some(Attr::Str("http://[::1]:9000/p?q=REDACTED"))
    );
    assert_eq!(attr(&a, "server.address"), Some(Attr::Str("::1")));
}

#[test]
fn target_and_fields_taken_from_the_head_are_the_values_sent() {
    let s = |v| Some(Attr::Str(v));
    // An absolute-form target: its path is inside it, not at its start.
    let mut req = head_with(&[("host", "api.local"), ("user-agent", "Go-http-client/1.1")]);
    req.target = "http://api.local/v1/items?id=7".into();
    let a = answered(Side::Client, &mut req);
    assert_eq!(
        attr(&a, "url.full"),
        s("http://api.local/v1/items?id=REDACTED")
    );
    assert_eq!(attr(&a, "url.path"), s("/v1/items"));
    assert_eq!(attr(&a, "url.query"), s("id=REDACTED"));
    assert_eq!(attr(&a, "server.address"), s("api.local"));
    assert_eq!(attr(&a, "server.port"), Some(Attr::Int(50000)));
    assert_eq!(attr(&a, "user_agent.original"), s("Go-http-client/1.1"));
    // Without a path, and an origin-form target cut at its query; a name that does not
    // start the field's value.
    for (target, path) in [
        ("http://api.local?x=1", "/"),
        ("/a/b?c", "/a/b"),
        ("/", "/"),
    ] {
        let mut req = head_with(&[("host", " api.local:81")]);
        req.target = target.into();
        let mut ex = exchange(Side::Server, &mut req, Outcome::Response(200));
        // The route is made of the path alone, while the target is whole.
        let a = attributes_of(&mut ex);
        assert_eq!(a.route.as_deref(), Some(path), "{target}");
        assert_eq!(attr(&a, "url.path"), s(path), "{target}");
        assert_eq!(attr(&a, "server.address"), s("api.local"));
        assert_eq!(attr(&a, "server.port"), Some(Attr::Int(81)));
    }
    // CONNECT's target is an authority: no path, no query.
    let mut req = head_with(&[]);
    req.method = "CONNECT".into();
    req.target = "api.local:443".into();
    let mut ex = exchange(Side::Server, &mut req, Outcome::Response(200));
    let a = attributes_of(&mut ex);
    assert_eq!(a.route, None, "no route for CONNECT");
    assert_eq!(attr(&a, "url.path"), s(""));
    assert_eq!(attr(&a, "url.query"), None);
    // A field the head does not keep is no attribute.
    assert_eq!(attr(&a, "user_agent.original"), None);
}

#[test]
fn unknown_method_is_other() {
    let mut req = head_with(&[]);
    req.method = "PURGE".into();
    let a = answered(Side::Server, &mut req);
    assert_eq!(attr(&a, "http.request.method"), Some(Attr::Str("_OTHER")));
    let _ = Body::None;
}

#[test]
fn random_input_never_panics_and_messages_stay_ordered() {
    const PIECES: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n",
        b"\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"ffffffffffffffff\r\n",
        b"\xff\xfe\x00garbage",
        b"hello",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..3000 {
        let kind = if rng.bool() {
            MessageKind::Request
        } else {
            MessageKind::Response
        };
        let mut s = if rng.bool() {
            Stream::new(Some(kind))
        } else {
            Stream::joined_midway(None)
        };
        let mut out = Vec::new();
        for ts in 0..rng.usize(1..12) {
            let mut call = Vec::new();
            for _ in 0..rng.usize(1..5) {
                call.extend_from_slice(PIECES[rng.usize(..PIECES.len())]);
            }
            let captured = rng.usize(0..=call.len());
            let len = call.len() as u64 + rng.u64(0..3) * 1000;
            feed(&mut s, ts as u64, len, &call[..captured], "GET", &mut out);
        }
        s.close(99, &mut out);
        // Every end follows a head (or closes a message whose head was seen).
        let mut open = 0i64;
        for o in &out {
            match o {
                Output::Head { .. } => open += 1,
                Output::End { .. } => {
                    open -= 1;
                    assert!(open >= 0, "{out:?}");
                }
            }
        }
    }
}

#[test]
fn query_values_are_kept_only_when_asked() {
    let mut req = head_with(&[]);
    req.target = "/p?q=secret".into();
    let mut ex = exchange(Side::Server, &mut req, Outcome::Response(200));
    ex.redact_query = false;
    let a = attributes_of(&mut ex);
    assert_eq!(attr(&a, "url.query"), Some(Attr::Str("q=secret")));
}

#[test]
fn request_targets_split_into_path_and_query() {
    use attributes::split_target as split;
    assert_eq!(split("/"), ("/", None));
    assert_eq!(split("/a/b?x=1&y"), ("/a/b", Some("x=1&y")));
    // A URL in the query of an origin-form target is the query's, not the target's.
    assert_eq!(
        split("/login?next=http://example.com/home"),
        ("/login", Some("next=http://example.com/home"))
    );
    assert_eq!(split("/p#frag"), ("/p", None));
    // Absolute-form (to a proxy): the path and query after the authority.
    assert_eq!(split("http://h:8080/a?q=1"), ("/a", Some("q=1")));
    assert_eq!(split("http://h"), ("/", None));
    assert_eq!(split("http://h?q=1"), ("/", Some("q=1")));
    // Asterisk-form (OPTIONS *).
    assert_eq!(split("*"), ("*", None));
}

#[test]
fn host_fields_split_into_name_and_port() {
    let split = attributes::split_host;
    let s = |h, p: Option<u16>| (h, p);
    assert_eq!(split("example.com:8080"), s("example.com", Some(8080)));
    assert_eq!(split(" example.com "), s("example.com", None));
    assert_eq!(split("[::1]:80"), s("::1", Some(80)));
    assert_eq!(split("[::1]"), s("::1", None));
    // Unbracketed IPv6 has no port to split off; a port that is not a number stays.
    assert_eq!(split("::1"), s("::1", None));
    assert_eq!(split("h:x"), s("h:x", None));
}

#[test]
fn header_fields_decide_framing_whatever_their_case_and_spacing() {
    let (out, s) = run(
        MessageKind::Request,
        "",
        &[b"POST / HTTP/1.1\r\nHOST:  shop.local \r\nContent-Length: 5 , 5\r\nX-Other: y\r\nConnection: Keep-Alive, Close\r\nExpect: 100-Continue\r\n\r\nhello"],
    );
    let h = heads(&out)[0];
    assert_eq!(
        h.content_length,
        Some(5),
        "repeated identical lengths are one"
    );
    assert!(h.close && h.expect_continue && !h.invalid_framing);
    // Kept fields only, names lowercase, values without the spaces around them.
    assert_eq!(h.headers[..], [("host", "shop.local".into())]);
    assert_eq!(s.stats.malformed, 0);
    let (out, _) = run(
        MessageKind::Response,
        "GET",
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 7\r\n\r\n0\r\n\r\n"],
    );
    let h = heads(&out)[0];
    assert!(h.chunked, "the last coding is chunked");
    assert_eq!(
        h.content_length, None,
        "Transfer-Encoding wins over Content-Length"
    );
    assert_eq!(ends(&out), [(1, 0, true)]);
    let (out, _) = run(
        MessageKind::Request,
        "",
        &[b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"],
    );
    assert!(!heads(&out)[0].close, "HTTP/1.0 with keep-alive stays open");
    // A length that cannot be read, differing repeats, a request coding other than chunked.
    for bad in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: five\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    ] {
        let (_, s) = run(MessageKind::Request, "", &[bad]);
        assert_eq!(s.stats.malformed, 1, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn interned_strings_are_kept_once_and_bounded() {
    use attributes::{Interner, Text};
    let kept = |t: &Text| match t {
        Text::Static(s) => Some(s.as_ptr()),
        _ => None,
    };
    let mut i = Interner::default();
    let a = i.text("GET /users/{id}");
    let b = i.text("GET /users/{id}");
    assert_eq!(&*a, "GET /users/{id}");
    assert!(kept(&a).is_some(), "kept, not the span's own");
    assert_eq!(kept(&a), kept(&b), "one copy for every span");
    assert_eq!(i.kept(), (1, 15));
    // Past the bound in strings, a new string stays the span's own; kept ones are still found.
    for n in 1..Interner::MAX {
        i.text(&format!("/{n}"));
    }
    assert_eq!(i.kept().0, Interner::MAX);
    let late = i.text("/late");
    assert!(matches!(late, Text::Owned(ref s) if s == "/late"));
    assert!(kept(&i.text("/7")).is_some());
    assert_eq!(i.kept().0, Interner::MAX);
    // And in bytes: strings of the longest kept length fill it.
    let mut i = Interner::default();
    let long = |n: usize| format!("{n:0width$}", width = Interner::MAX_LEN);
    for n in 0..Interner::MAX_BYTES / Interner::MAX_LEN {
        assert!(kept(&i.text(&long(n))).is_some(), "{n}");
    }
    assert_eq!(i.kept().1, Interner::MAX_BYTES);
    assert!(kept(&i.text(&long(usize::MAX))).is_none());
    assert!(kept(&i.text(&long(7))).is_some(), "the kept one is found");
    // A longer string is never kept, however much room is left.
    let mut i = Interner::default();
    let longer = "x".repeat(Interner::MAX_LEN + 1);
    assert!(kept(&i.text(&longer)).is_none());
    assert_eq!(&*i.text(&longer), longer);
    assert_eq!(i.kept(), (0, 0));
}
