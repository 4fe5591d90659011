//! HTTP/1.x framing over arbitrary calls: the first byte picks the stream's kind and whether it
//! joined midway; then each call is a 2-byte length, a 1-byte "captured" fraction and the
//! bytes. Nothing may panic, and every message end must follow its start.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirespan::http::{
    attributes::Interner,
    framing::{self, Head, MessageKind, Output, Stream},
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let kind = match mode & 3 {
        0 => Some(MessageKind::Request),
        1 => Some(MessageKind::Response),
        _ => None,
    };
    let mut s = if mode & 4 == 0 {
        Stream::new(kind)
    } else {
        Stream::joined_midway(kind)
    };
    let method = if mode & 8 == 0 { "GET" } else { "HEAD" };
    let mut frame = |h: &Head| match h.kind {
        Some(MessageKind::Request) => framing::request_body(h),
        _ => framing::response_body(h, Some(method)),
    };
    let mut interner = Interner::default();
    let mut out = Vec::new();
    let mut ts = 0;
    while rest.len() >= 3 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let fraction = rest[2] as usize;
        rest = &rest[3..];
        let n = len.min(rest.len());
        let call = &rest[..n];
        rest = &rest[n..];
        let captured = call.len() * fraction / 255;
        // The true length may exceed what was captured (a gap the kernel did not copy).
        let true_len = (call.len() + (fraction & 7) * 1000) as u64;
        ts += 1;
        s.feed(
            ts,
            true_len,
            &call[..captured],
            &mut frame,
            &mut interner,
            &mut out,
        );
    }
    s.close(ts + 1, &mut out);
    let mut open = 0i64;
    for o in &out {
        match o {
            Output::Head { .. } => open += 1,
            Output::End { .. } => {
                open -= 1;
                assert!(open >= 0, "an end without a start");
            }
        }
    }
});
