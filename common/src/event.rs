//! The event the kernel sends for each traced socket syscall.

use crate::MAX_CAPTURE;

/// What happened on the socket.
pub mod kind {
    /// A connection was accepted: the process is the server on it.
    pub const ACCEPT: u32 = 1;
    /// A connection was initiated: the process is the client on it.
    pub const CONNECT: u32 = 2;
    /// Bytes were read or written.
    pub const DATA: u32 = 3;
    /// The process closed its descriptor for the socket.
    pub const CLOSE: u32 = 4;
    /// More bytes of the previous `DATA` record's call (a large request head), at
    /// `EventHeader::offset` within the call.
    pub const DATA_MORE: u32 = 5;
    /// A `DATA` record that is the first on its socket (in this process) since a record of it
    /// was lost (the ring was full): the bytes of the lost calls are
    /// missing between the two, in one direction or both, and what was in progress on the
    /// connection cannot be paired across them.
    pub const DATA_AFTER_LOSS: u32 = 6;
}

/// Direction of a `kind::DATA` event, seen from the traced process.
pub mod direction {
    pub const NONE: u32 = 0;
    /// The process received the bytes (read, readv, recvfrom, recvmsg).
    pub const INGRESS: u32 = 1;
    /// The process sent the bytes (write, writev, sendto, sendmsg, sendfile).
    pub const EGRESS: u32 = 2;
}

/// The syscall that produced an event.
pub mod syscall {
    /// A sending call's stamp already taken by its exit (stamps are reused per thread).
    pub const NONE: u32 = 0;
    pub const ACCEPT: u32 = 1;
    pub const ACCEPT4: u32 = 2;
    pub const CONNECT: u32 = 3;
    pub const CLOSE: u32 = 4;
    pub const READ: u32 = 5;
    pub const WRITE: u32 = 6;
    pub const READV: u32 = 7;
    pub const WRITEV: u32 = 8;
    pub const RECVFROM: u32 = 9;
    pub const SENDTO: u32 = 10;
    pub const RECVMSG: u32 = 11;
    pub const SENDMSG: u32 = 12;
    pub const SENDFILE: u32 = 13;

    /// The tracepoint name of a syscall id (`sys_enter_<name>` / `sys_exit_<name>`).
    pub const fn tracepoint_name(id: u32) -> &'static str {
        match id {
            ACCEPT => "accept",
            ACCEPT4 => "accept4",
            CONNECT => "connect",
            CLOSE => "close",
            READ => "read",
            WRITE => "write",
            READV => "readv",
            WRITEV => "writev",
            RECVFROM => "recvfrom",
            SENDTO => "sendto",
            RECVMSG => "recvmsg",
            SENDMSG => "sendmsg",
            SENDFILE => "sendfile64",
            _ => "unknown",
        }
    }
}

/// Address family of the endpoints (Linux `AF_*` values).
pub mod family {
    pub const INET: u16 = 2;
    pub const INET6: u16 = 10;
}

/// Fixed part of every event. `captured` bytes of payload follow it in the ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at syscall exit; for egress data at syscall enter,
    /// before the bytes can reach the peer, so a peer's read of them is never timed earlier than
    /// the write that sent them (spans at the two ends nest).
    pub ts_ns: u64,
    /// The socket's inode number: the same for the socket's whole life, different for the
    /// next socket that reuses the descriptor number; the `socket:[N]` of /proc/PID/fd.
    pub conn_id: u64,
    /// The syscall's true length (its return value) for `kind::DATA`; 0 otherwise.
    pub len: u64,
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    /// One of `kind::*`.
    pub kind: u32,
    /// One of `direction::*`.
    pub direction: u32,
    /// One of `syscall::*`.
    pub syscall: u32,
    /// Bytes of payload that follow this header (a prefix of `len`).
    pub captured: u32,
    /// One of `family::*`.
    pub family: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// `DATA` only: how many `DATA_MORE` records with later bytes of this call follow.
    pub more: u16,
    /// Offset of this record's payload within the call (non-zero for `DATA_MORE`).
    pub offset: u32,
    /// IPv4 in the first 4 bytes, or IPv6 (network byte order).
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// The thread's `comm`, NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 112);
const _: () = assert!(core::mem::align_of::<EventHeader>() == 8);
// The programs write the addresses as words (see `SockHead`).
const _: () = assert!(core::mem::offset_of!(EventHeader, local_addr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(EventHeader, remote_addr) % 8 == 0);

impl EventHeader {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            conn_id: 0,
            len: 0,
            pid: 0,
            tid: 0,
            fd: 0,
            kind: 0,
            direction: 0,
            syscall: 0,
            captured: 0,
            family: 0,
            local_port: 0,
            remote_port: 0,
            more: 0,
            offset: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
            comm: [0; 16],
        }
    }
}

/// The kernel's per-CPU scratch record: a header and room for a masked-offset copy.
///
/// The payload area is twice `MAX_CAPTURE` so that a copy at any offset below `MAX_CAPTURE` of
/// at most `MAX_CAPTURE` bytes stays inside it, which is what the verifier can prove.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EventBuf {
    pub header: EventHeader,
    pub data: [u8; 2 * MAX_CAPTURE],
    /// Bytes of records this CPU wrote since it last forced a wake-up of the agent (not sent).
    pub unwoken: u64,
}
const _: () = assert!(
    core::mem::size_of::<EventBuf>() == core::mem::size_of::<EventHeader>() + 2 * MAX_CAPTURE + 8
);
// The programs read the payload's first word as one (see `starts_like_request`).
const _: () = assert!(core::mem::offset_of!(EventBuf, data) % 8 == 0);
