//! Trace context carried by request headers: W3C Trace Context (`traceparent`, `tracestate`)
//! and B3 (single `b3` header, and multi `X-B3-*` headers with 64- or 128-bit trace ids).

use super::framing::Head;

/// A span context received from (or sent to) the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// W3C trace flags (bit 0 sampled, bit 1 random), or the B3 equivalent.
    pub flags: u8,
    /// The `tracestate` value, kept as received (W3C only).
    pub trace_state: Option<String>,
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// Why a header present on a request was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("malformed traceparent")]
    Traceparent,
    #[error("malformed b3 header")]
    B3,
}

fn hex_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Lowercase hex only (W3C requires it; B3 ids are lowercase hex as well).
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Parses a `traceparent` value by W3C Trace Context level 2, section 3.2: version `ff` is
/// invalid; version `00` must be exactly four fields; a higher version is parsed by the
/// version-00 fields and may carry more after a dash. All-zero ids are invalid.
pub fn parse_traceparent(value: &str) -> Option<Remote> {
    let value = value.trim_matches([' ', '\t']);
    if value.len() < 55 || !value.is_ascii() {
        return None;
    }
    let version = hex_exact::<1>(value.get(0..2)?)?[0];
    if version == 0xff {
        return None;
    }
    if version == 0 && value.len() != 55 {
        return None;
    }
    if version > 0 && value.len() > 55 && value.as_bytes()[55] != b'-' {
        return None;
    }
    let b = value.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = hex_exact::<16>(&value[3..35])?;
    let span_id = hex_exact::<8>(&value[36..52])?;
    let flags = hex_exact::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Remote {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        // Version 00 defines bits 0 (sampled) and 1 (random); others are not passed on.
        flags: flags & 0x03,
        trace_state: None,
        format: Format::W3c,
    })
}

/// A `tracestate` value is kept if it is a well-formed list of at most 32 members.
pub fn valid_tracestate(value: &str) -> bool {
    let members: Vec<&str> = value
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    if members.len() > 32 || value.len() > 512 {
        return false;
    }
    members.iter().all(|m| {
        let Some((key, val)) = m.split_once('=') else {
            return false;
        };
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
            });
        let val_ok = !val.is_empty()
            && val.len() <= 256
            && val
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
            && !val.ends_with(' ');
        key_ok && val_ok
    })
}

/// Trace id of B3: 16 or 32 lowercase hex digits; a 64-bit id is left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let id = match s.len() {
        16 => {
            let low = hex_exact::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        32 => hex_exact::<16>(s)?,
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_span_id(s: &str) -> Option<[u8; 8]> {
    hex_exact::<8>(s).filter(|id| *id != [0; 8])
}

/// Parses the B3 single header: `{trace}-{span}[-{sampling}[-{parent}]]`, sampling `0`, `1` or
/// `d` (debug). A lone sampling decision carries no ids and gives no context.
pub fn parse_b3_single(value: &str) -> Option<Remote> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    if parts.len() < 2 || parts.len() > 4 {
        return None;
    }
    let trace_id = b3_trace_id(parts[0])?;
    let span_id = b3_span_id(parts[1])?;
    let sampled = match parts.get(2) {
        None => true,
        Some(&"1") | Some(&"d") => true,
        Some(&"0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.get(3) {
        b3_span_id(parent)?;
    }
    Some(Remote {
        trace_id,
        span_id,
        sampled,
        flags: sampled as u8,
        trace_state: None,
        format: Format::B3Single,
    })
}

/// Parses B3 multi headers (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`).
pub fn parse_b3_multi(head: &Head) -> Option<Remote> {
    let trace_id = b3_trace_id(head.header("x-b3-traceid")?)?;
    let span_id = b3_span_id(head.header("x-b3-spanid")?)?;
    if let Some(parent) = head.header("x-b3-parentspanid") {
        b3_span_id(parent)?;
    }
    let debug = head.header("x-b3-flags") == Some("1");
    let sampled = match head.header("x-b3-sampled") {
        None => true,
        Some("1") | Some("true") => true,
        Some("0") | Some("false") => debug,
        Some(_) => return None,
    } || debug;
    Some(Remote {
        trace_id,
        span_id,
        sampled,
        flags: sampled as u8,
        trace_state: None,
        format: Format::B3Multi,
    })
}

/// The context a request carries, W3C first, then B3 single, then B3 multi. `Err` when a
/// header was present but invalid (counted; the request then starts a new trace).
pub fn extract(head: &Head) -> Result<Option<Remote>, Invalid> {
    let traceparents: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| *n == "traceparent")
        .map(|(_, v)| &**v)
        .collect();
    match traceparents.as_slice() {
        [] => {}
        [one] => {
            let mut ctx = parse_traceparent(one).ok_or(Invalid::Traceparent)?;
            // Several tracestate fields are one list joined by commas (RFC 9110 5.3).
            let state: Vec<&str> = head
                .headers
                .iter()
                .filter(|(n, _)| *n == "tracestate")
                .map(|(_, v)| &**v)
                .collect();
            let joined = state.join(",");
            if !joined.is_empty() && valid_tracestate(&joined) {
                ctx.trace_state = Some(joined);
            }
            return Ok(Some(ctx));
        }
        // Several traceparent fields: the spec says to ignore them all.
        _ => return Err(Invalid::Traceparent),
    }
    if let Some(b3) = head.header("b3") {
        if matches!(b3.trim(), "0" | "1" | "d") {
            // A sampling decision alone, without ids: no context to join.
            return Ok(None);
        }
        return parse_b3_single(b3).map(Some).ok_or(Invalid::B3);
    }
    if head.header("x-b3-traceid").is_some() || head.header("x-b3-spanid").is_some() {
        return parse_b3_multi(head).map(Some).ok_or(Invalid::B3);
    }
    Ok(None)
}
