//! Decoding the kernel's ring buffer records into typed, borrowed events.
//!
//! Decoding copies only the fixed header; the payload stays a slice into the ring buffer, so
//! the reader allocates nothing per event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use wirespan_common::{EventHeader, direction, family, kind, syscall};

/// Why a ring buffer record was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than the {need}-byte header")]
    Short { got: usize, need: usize },
    #[error("header says {captured} payload bytes but the record holds {available}")]
    Truncated { captured: u32, available: usize },
    #[error("captured {captured} bytes is more than the call's length {len}")]
    CapturedExceedsLen { captured: u32, len: u64 },
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// What the event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Accept,
    Connect,
    Data(Direction),
    /// More bytes of the previous `Data` event's call (`header.offset` within it).
    DataMore(Direction),
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The traced process received the bytes.
    Ingress,
    /// The traced process sent the bytes.
    Egress,
}

/// One socket event, borrowing its payload from the record it was decoded from.
#[derive(Clone, Copy, Debug)]
pub struct SocketEvent<'a> {
    pub header: EventHeader,
    pub kind: EventKind,
    /// The captured prefix of the call's bytes (`header.len` is the true length).
    pub payload: &'a [u8],
}

impl<'a> SocketEvent<'a> {
    /// A data record that follows lost records of its socket (`kind::DATA_AFTER_LOSS`).
    pub fn after_loss(&self) -> bool {
        self.header.kind == kind::DATA_AFTER_LOSS
    }

    /// Decodes one ring buffer record.
    pub fn decode(record: &'a [u8]) -> Result<Self, DecodeError> {
        let need = size_of::<EventHeader>();
        if record.len() < need {
            return Err(DecodeError::Short {
                got: record.len(),
                need,
            });
        }
        // SAFETY: the record holds at least size_of::<EventHeader>() bytes (checked above);
        // EventHeader is repr(C) plain data for which every bit pattern is valid, and
        // read_unaligned makes no alignment assumption about the ring buffer.
        let header: EventHeader =
            unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<EventHeader>()) };
        let available = record.len() - need;
        if header.captured as usize > available {
            return Err(DecodeError::Truncated {
                captured: header.captured,
                available,
            });
        }
        let kind = match header.kind {
            kind::ACCEPT => EventKind::Accept,
            kind::CONNECT => EventKind::Connect,
            kind::CLOSE => EventKind::Close,
            kind::DATA | kind::DATA_AFTER_LOSS => match header.direction {
                direction::INGRESS => EventKind::Data(Direction::Ingress),
                direction::EGRESS => EventKind::Data(Direction::Egress),
                _ => return Err(DecodeError::Kind(header.kind)),
            },
            kind::DATA_MORE => match header.direction {
                direction::INGRESS => EventKind::DataMore(Direction::Ingress),
                direction::EGRESS => EventKind::DataMore(Direction::Egress),
                _ => return Err(DecodeError::Kind(header.kind)),
            },
            other => return Err(DecodeError::Kind(other)),
        };
        let end = u64::from(header.offset) + u64::from(header.captured);
        if end > header.len && matches!(kind, EventKind::Data(_) | EventKind::DataMore(_)) {
            return Err(DecodeError::CapturedExceedsLen {
                captured: header.captured,
                len: header.len,
            });
        }
        if header.family != family::INET && header.family != family::INET6 {
            return Err(DecodeError::Family(header.family));
        }
        let payload = &record[need..need + header.captured as usize];
        Ok(Self {
            header,
            kind,
            payload,
        })
    }

    pub fn local(&self) -> SocketAddr {
        socket_addr(
            self.header.family,
            &self.header.local_addr,
            self.header.local_port,
        )
    }

    pub fn remote(&self) -> SocketAddr {
        socket_addr(
            self.header.family,
            &self.header.remote_addr,
            self.header.remote_port,
        )
    }

    /// The thread's command name.
    pub fn comm(&self) -> &str {
        let end = self
            .header
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.header.comm.len());
        std::str::from_utf8(&self.header.comm[..end]).unwrap_or("?")
    }

    /// Whether the kernel copied fewer bytes than the call moved.
    pub fn truncated(&self) -> bool {
        (self.payload.len() as u64) < self.header.len
    }

    pub fn syscall_name(&self) -> &'static str {
        syscall::tracepoint_name(self.header.syscall)
    }
}

/// An endpoint from the kernel's raw address bytes (network order) and host-order port.
///
/// IPv4-mapped IPv6 addresses (dual-stack sockets) are shown as the IPv4 address they carry,
/// so both ends of one connection print the same way.
pub fn socket_addr(fam: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if fam == family::INET6 {
        let v6 = Ipv6Addr::from(*addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> EventHeader {
        let mut h = EventHeader::zeroed();
        h.kind = kind::DATA;
        h.direction = direction::INGRESS;
        h.family = family::INET;
        h.len = 18;
        h.pid = 42;
        h.fd = 7;
        h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        h.local_port = 8080;
        h.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        h.remote_port = 51234;
        h.comm[..7].copy_from_slice(b"python3");
        h
    }

    fn record(h: &EventHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; size_of::<EventHeader>()];
        // SAFETY: v has exactly size_of::<EventHeader>() bytes; write_unaligned has no
        // alignment requirement.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast::<EventHeader>(), *h) };
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_data_event_with_payload() {
        let mut h = header();
        h.captured = 18;
        let rec = record(&h, b"GET / HTTP/1.1\r\n\r\n");
        let ev = SocketEvent::decode(&rec).unwrap();
        assert_eq!(ev.kind, EventKind::Data(Direction::Ingress));
        assert_eq!(ev.payload, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(ev.local().to_string(), "127.0.0.1:8080");
        assert_eq!(ev.remote().to_string(), "10.1.2.3:51234");
        assert_eq!(ev.comm(), "python3");
        assert!(!ev.truncated());
    }

    #[test]
    fn payload_shorter_than_len_is_a_truncated_prefix() {
        let mut h = header();
        h.len = 100_000;
        h.captured = 4;
        let rec = record(&h, b"HTTP");
        let ev = SocketEvent::decode(&rec).unwrap();
        assert!(ev.truncated());
        assert_eq!(ev.payload, b"HTTP");
    }

    #[test]
    fn rejects_short_and_inconsistent_records() {
        assert_eq!(
            SocketEvent::decode(&[0u8; 10]).unwrap_err(),
            DecodeError::Short { got: 10, need: 112 }
        );
        let mut h = header();
        h.captured = 50;
        let rec = record(&h, b"abc");
        assert_eq!(
            SocketEvent::decode(&rec).unwrap_err(),
            DecodeError::Truncated {
                captured: 50,
                available: 3
            }
        );
        let mut h = header();
        h.kind = 99;
        assert_eq!(
            SocketEvent::decode(&record(&h, b"")).unwrap_err(),
            DecodeError::Kind(99)
        );
        let mut h = header();
        h.family = 1;
        assert_eq!(
            SocketEvent::decode(&record(&h, b"")).unwrap_err(),
            DecodeError::Family(1)
        );
        let mut h = header();
        h.len = 2;
        h.captured = 3;
        assert!(matches!(
            SocketEvent::decode(&record(&h, b"abc")).unwrap_err(),
            DecodeError::CapturedExceedsLen { .. }
        ));
    }

    #[test]
    fn decodes_every_kind() {
        for (k, d, want) in [
            (kind::ACCEPT, direction::NONE, EventKind::Accept),
            (kind::CONNECT, direction::NONE, EventKind::Connect),
            (kind::CLOSE, direction::NONE, EventKind::Close),
            (
                kind::DATA,
                direction::EGRESS,
                EventKind::Data(Direction::Egress),
            ),
            (
                kind::DATA_AFTER_LOSS,
                direction::INGRESS,
                EventKind::Data(Direction::Ingress),
            ),
        ] {
            let mut h = header();
            h.kind = k;
            h.direction = d;
            let bytes = record(&h, b"");
            let ev = SocketEvent::decode(&bytes).unwrap();
            assert_eq!(ev.kind, want);
            assert_eq!(ev.after_loss(), k == kind::DATA_AFTER_LOSS);
        }
        let mut h = header();
        h.direction = direction::NONE;
        assert!(SocketEvent::decode(&record(&h, b"")).is_err());
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let loopback6 = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            socket_addr(family::INET6, &loopback6, 443).to_string(),
            "[::1]:443"
        );
        let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped().octets();
        assert_eq!(
            socket_addr(family::INET6, &mapped, 80).to_string(),
            "192.0.2.7:80"
        );
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(socket_addr(family::INET, &v4, 1).to_string(), "127.0.0.1:1");
    }
}
