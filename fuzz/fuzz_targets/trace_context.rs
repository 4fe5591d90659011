//! Trace-context parsing: traceparent, tracestate, B3 single and multi, from arbitrary header
//! values. Nothing may panic; whatever is accepted must be well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirespan::http::{
    context,
    framing::{Head, KEPT_HEADERS, MessageKind},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(c) = context::parse_traceparent(&text) {
        assert_ne!(c.trace_id, [0; 16]);
        assert_ne!(c.span_id, [0; 8]);
    }
    let _ = context::valid_tracestate(&text);
    if let Some(c) = context::parse_b3_single(&text) {
        assert_ne!(c.span_id, [0; 8]);
    }
    // Lines "i:value" become kept header fields of a request head.
    let mut head = Head {
        kind: Some(MessageKind::Request),
        method: "GET".into(),
        target: "/".into(),
        version: 1,
        ..Head::default()
    };
    for line in text.lines() {
        let Some((i, v)) = line.split_once(':') else {
            continue;
        };
        let i = i.bytes().map(|b| b as usize).sum::<usize>() % KEPT_HEADERS.len();
        head.headers.push((KEPT_HEADERS[i], v.to_string().into()));
    }
    if let Ok(Some(c)) = context::extract(&head) {
        assert_ne!(c.trace_id, [0; 16]);
    }
});
