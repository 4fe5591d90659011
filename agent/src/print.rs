//! One line per event for `wirespan capture`: text for people, JSON lines for tools.
//!
//! Lines are written into a caller-owned buffer that is reused, so printing allocates nothing
//! per event.

use std::io::Write;

use crate::{
    capture::{Direction, EventKind, SocketEvent},
    clock::WallClock,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Accept => "accept",
        EventKind::Connect => "connect",
        EventKind::Close => "close",
        EventKind::Data(Direction::Ingress) => "ingress",
        EventKind::Data(Direction::Egress) => "egress",
        EventKind::DataMore(Direction::Ingress) => "ingress-more",
        EventKind::DataMore(Direction::Egress) => "egress-more",
    }
}

/// Appends `bytes` with non-printable bytes escaped (`\r`, `\n`, `\t`, `\\`, `\"`, `\xNN`).
pub fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            0x20..=0x7e => out.push(b),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
}

/// `12:34:56.123456789 pid=.. tid=.. comm=.. fd=.. conn=.. LOCAL <- REMOTE ingress read len=.. "…"`
pub fn text_line(out: &mut Vec<u8>, ev: &SocketEvent<'_>, clock: &WallClock, show_bytes: usize) {
    let unix_ns = clock.to_unix_ns(ev.header.ts_ns);
    let secs_of_day = (unix_ns / 1_000_000_000) % 86_400;
    let h = &ev.header;
    let arrow = match ev.kind {
        EventKind::Data(Direction::Ingress) => "<-",
        EventKind::Data(Direction::Egress) => "->",
        EventKind::DataMore(Direction::Ingress) => "<+",
        EventKind::DataMore(Direction::Egress) => "+>",
        _ => "<>",
    };
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{:09} pid={} tid={} comm={} fd={} conn={} {} {} {} {} {}",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        unix_ns % 1_000_000_000,
        h.pid,
        h.tid,
        ev.comm(),
        h.fd,
        h.conn_id,
        ev.local(),
        arrow,
        ev.remote(),
        kind_name(ev.kind),
        ev.syscall_name(),
    );
    if let EventKind::Data(_) | EventKind::DataMore(_) = ev.kind {
        let _ = write!(out, " len={}", h.len);
        if h.offset > 0 {
            let _ = write!(out, " offset={}", h.offset);
        }
        if ev.truncated() {
            let _ = write!(out, " captured={}", ev.payload.len());
        }
        if ev.after_loss() {
            out.extend_from_slice(b" after-loss");
        }
        out.extend_from_slice(b" \"");
        let n = ev.payload.len().min(show_bytes);
        escape_into(out, &ev.payload[..n]);
        out.push(b'"');
        if n < ev.payload.len() {
            out.extend_from_slice(b"...");
        }
    }
    out.push(b'\n');
}

/// One JSON object per line with every field and the whole captured payload in hex.
pub fn json_line(out: &mut Vec<u8>, ev: &SocketEvent<'_>, clock: &WallClock) {
    let h = &ev.header;
    out.extend_from_slice(b"{\"ts_unix_ns\":");
    let _ = write!(
        out,
        "{},\"ts_mono_ns\":{},\"pid\":{},\"tid\":{},\"comm\":\"",
        clock.to_unix_ns(h.ts_ns),
        h.ts_ns,
        h.pid,
        h.tid
    );
    escape_into(out, ev.comm().as_bytes());
    let _ = write!(
        out,
        "\",\"fd\":{},\"conn_id\":{},\"kind\":\"{}\",\"syscall\":\"{}\",\"len\":{},\"captured\":{},\"after_loss\":{},\"local\":\"{}\",\"remote\":\"{}\",\"data_hex\":\"",
        h.fd,
        h.conn_id,
        kind_name(ev.kind),
        ev.syscall_name(),
        h.len,
        ev.payload.len(),
        ev.after_loss(),
        ev.local(),
        ev.remote(),
    );
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in ev.payload {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
    out.extend_from_slice(b"\"}\n");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One concise line per span (`--log-spans`).
pub fn span_line(out: &mut String, span: &crate::trace::Span) {
    use std::fmt::Write as _;
    let attr = |k: &str| {
        span.attributes
            .get(k)
            .map(|v| match v {
                crate::http::attributes::Attr::Str(s) => s.to_string(),
                crate::http::attributes::Attr::Int(i) => i.to_string(),
            })
            .unwrap_or_else(|| "-".into())
    };
    let kind = match span.attributes.side {
        crate::http::attributes::Side::Server => "SERVER",
        crate::http::attributes::Side::Client => "CLIENT",
    };
    let _ = writeln!(
        out,
        "span {} {} {} {} {} {}us{} trace={} span={} parent={} link={} pid={}",
        span.process.service_name,
        kind,
        &*span.name,
        attr("url.path"),
        attr("http.response.status_code"),
        span.end_unix_ns.saturating_sub(span.start_unix_ns) / 1000,
        if span.error.is_some() { " ERROR" } else { "" },
        hex(&span.trace_id),
        hex(&span.span_id),
        span.parent_span_id
            .map(|p| hex(&p))
            .unwrap_or_else(|| "-".into()),
        span.link.map(|l| l.as_str()).unwrap_or("-"),
        span.process.pid,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use wirespan_common::{EventHeader, direction, family, kind};

    fn event(payload: &[u8], len: u64) -> SocketEvent<'_> {
        let mut h = EventHeader::zeroed();
        h.kind = kind::DATA;
        h.direction = direction::EGRESS;
        h.syscall = wirespan_common::syscall::WRITEV;
        h.family = family::INET;
        h.pid = 10;
        h.tid = 11;
        h.fd = 3;
        h.conn_id = 777;
        h.len = len;
        h.captured = payload.len() as u32;
        h.ts_ns = 1_000;
        h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        h.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        h.local_port = 40000;
        h.remote_port = 80;
        h.comm[..4].copy_from_slice(b"curl");
        SocketEvent {
            header: h,
            kind: EventKind::Data(Direction::Egress),
            payload,
        }
    }

    #[test]
    fn text_line_escapes_and_marks_truncation() {
        let clock = WallClock::from_pair(0, 3_600_000_000_000 + 5);
        let mut out = Vec::new();
        text_line(&mut out, &event(b"GET /\r\n\x00\"", 100), &clock, 64);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "01:00:00.000001005 pid=10 tid=11 comm=curl fd=3 conn=777 127.0.0.1:40000 -> 127.0.0.1:80 egress writev len=100 captured=9 \"GET /\\r\\n\\x00\\\"\"\n"
        );
        let mut after = event(b"GET", 3);
        after.header.kind = kind::DATA_AFTER_LOSS;
        let mut out = Vec::new();
        text_line(&mut out, &after, &clock, 64);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with(" egress writev len=3 after-loss \"GET\"\n"),
            "{line}"
        );
    }

    #[test]
    fn json_line_is_valid_json_with_full_payload() {
        let clock = WallClock::from_pair(0, 0);
        let mut out = Vec::new();
        json_line(&mut out, &event(b"hi\n", 3), &clock);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data_hex"], "68690a");
        assert_eq!(v["kind"], "egress");
        assert_eq!(v["syscall"], "writev");
        assert_eq!(v["local"], "127.0.0.1:40000");
        assert_eq!(v["conn_id"], 777);
        assert_eq!(v["ts_unix_ns"], 1000);
        assert_eq!(v["after_loss"], false);
    }
}
