//! Types shared by the kernel programs (`wirespan-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of hidden padding: the kernel writes these
//! bytes and userspace reads them back, so both sides must agree on every offset. Each struct
//! carries a compile-time size check.
#![no_std]

pub mod event;
pub mod layout;

pub use event::*;
pub use layout::*;

/// Largest per-call prefix the kernel can copy (a power of two: offsets are masked with it).
/// The kernel builds events in a per-CPU slot of twice this size plus the header, and per-CPU
/// values are limited to 32 KiB.
pub const MAX_CAPTURE: usize = 8 * 1024;
/// A plain-buffer call that begins like an HTTP request and is longer than the per-call prefix
/// is followed by `DATA_MORE` records of `MAX_CAPTURE` bytes each, up to this many bytes of the
/// call in all, so that large request heads (and the trace headers at their end) are seen whole.
pub const MAX_HEAD_CAPTURE: u32 = 96 * 1024;
/// Most `DATA_MORE` records after one call.
pub const MAX_MORE: u32 = MAX_HEAD_CAPTURE / MAX_CAPTURE as u32;
/// Default per-call prefix copied from socket buffers.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// Most iovec entries read from one readv/writev/recvmsg/sendmsg call; later entries keep
/// their length in `EventHeader::len` but contribute no captured bytes.
pub const MAX_IOV: u32 = 16;

/// Names of the maps and globals, used by both sides.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const LOST: &str = "LOST";
    pub const LAYOUT: &str = "LAYOUT";
    pub const SETTINGS: &str = "SETTINGS";
}

/// Values of the `PID_FILTER` map.
pub mod pid_filter {
    /// Trace this process (used when `Settings::filter_mode` is `ONLY_LISTED`).
    pub const TRACE: u32 = 1;
    /// Never trace this process (wirespan itself, user exclusions).
    pub const IGNORE: u32 = 2;
    /// `Settings::filter_mode`: every process except those marked `IGNORE`.
    pub const ALL_EXCEPT_IGNORED: u32 = 0;
    /// `Settings::filter_mode`: only processes marked `TRACE`.
    pub const ONLY_LISTED: u32 = 1;
}

/// Indexes of the per-CPU `LOST` counter array.
pub mod lost {
    /// The ring buffer was full: an event was dropped.
    pub const RINGBUF_FULL: u32 = 0;
    /// A user buffer could not be read (e.g. paged out): the event was sent without bytes.
    pub const READ_FAILED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Runtime settings the agent writes into the kernel programs' `SETTINGS` global at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Bytes copied from each call's buffer, at most `MAX_CAPTURE`.
    pub capture_bytes: u32,
    /// One of `pid_filter::ALL_EXCEPT_IGNORED`, `pid_filter::ONLY_LISTED`.
    pub filter_mode: u32,
    /// Bytes of records a CPU writes into its ring between two wake-ups of the agent it
    /// forces: half the ring, so that the records written since the last wake-up do not fill
    /// it (at least one largest record; see the agent's `wake_bytes`).
    pub wake_bytes: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 12);

impl Settings {
    pub const fn zeroed() -> Self {
        Self {
            capture_bytes: 0,
            filter_mode: pid_filter::ALL_EXCEPT_IGNORED,
            wake_bytes: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no padding (checked above), any bit pattern is valid.
unsafe impl aya::Pod for Settings {}
