//! The stitcher over arbitrary event sequences: each 8-byte step picks the event kind, process,
//! thread, connection, ports and a payload (real HTTP pieces or raw bytes that follow).
//! Nothing may panic; every span made has a trace id and is not its own parent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirespan::{
    capture::{Direction, EventKind, SocketEvent},
    clock::WallClock,
    trace::Stitcher,
};
use wirespan_common::{EventHeader, family, kind};

const PIECES: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /v1/traces HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 100 Continue\r\n\r\n",
];

fuzz_target!(|data: &[u8]| {
    let mut s = Stitcher::with_proc_root(
        WallClock::from_pair(0, 0),
        std::path::PathBuf::from("/nonexistent-proc"),
    );
    let mut out = Vec::new();
    let mut ts = 0u64;
    for step in data.chunks(8) {
        if step.len() < 8 {
            break;
        }
        ts += 1000;
        let mut h = EventHeader::zeroed();
        h.ts_ns = ts;
        h.conn_id = (step[1] % 6) as u64;
        h.pid = (step[2] % 4) as u32;
        h.tid = (step[3] % 6) as u32;
        h.family = family::INET;
        let (l, r) = if step[4] & 1 == 0 {
            (80, 5000)
        } else {
            (5000, 80)
        };
        h.local_port = l;
        h.remote_port = r;
        h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        h.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let piece: &[u8] = if step[5] & 0x80 == 0 {
            PIECES[step[5] as usize % PIECES.len()]
        } else {
            &data[..(step[5] as usize & 0x7f).min(data.len())]
        };
        let captured = piece.len() * step[6] as usize / 255;
        h.len = piece.len() as u64 + (step[7] & 3) as u64 * 100;
        h.captured = captured as u32;
        let k = match step[0] % 6 {
            0 => EventKind::Accept,
            1 => EventKind::Connect,
            2 => EventKind::Close,
            3 => EventKind::Data(Direction::Ingress),
            _ => EventKind::Data(Direction::Egress),
        };
        h.kind = match k {
            EventKind::Accept => kind::ACCEPT,
            EventKind::Connect => kind::CONNECT,
            EventKind::Close => kind::CLOSE,
            _ => kind::DATA,
        };
        let ev = SocketEvent {
            header: h,
            kind: k,
            payload: &piece[..captured],
        };
        s.event(&ev, &mut out);
        if step[7] & 0x40 != 0 {
            s.tick(&mut out);
        }
    }
    s.flush(&mut out);
    for span in &out {
        assert_ne!(span.trace_id, [0; 16]);
        assert_ne!(span.parent_span_id, Some(span.span_id));
    }
});
