//! Copying a prefix of the user's buffers into the event, in a shape the verifier accepts.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_probe_read_user, generated};
use wirespan_common::{MAX_CAPTURE, MAX_IOV};

/// Mask that keeps an offset below `MAX_CAPTURE`, so offset + length stays inside the
/// 2 * MAX_CAPTURE data area whatever the verifier knows about the values.
const OFFSET_MASK: u64 = MAX_CAPTURE as u64 - 1;
/// Keeps a count of copied bytes below 2 * MAX_CAPTURE (see `copy_iov`).
const DONE_MASK: u64 = 2 * MAX_CAPTURE as u64 - 1;

/// `struct iovec` of the syscall ABI.
#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// The part of `struct user_msghdr` (syscall ABI, not a kernel-internal layout) we need.
const MSGHDR_IOV: usize = 16;
const MSGHDR_IOVLEN: usize = 24;

/// Copies up to `len` bytes from `src` to `data[offset..]`; false if the user memory was not
/// readable.
#[inline(always)]
fn copy(data: *mut u8, offset: u64, src: u64, len: u64) -> bool {
    let offset = offset & OFFSET_MASK;
    let len = if len > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        len
    };
    if len == 0 {
        return true;
    }
    // SAFETY: data points at a 2 * MAX_CAPTURE area (EventBuf::data); offset < MAX_CAPTURE and
    // len <= MAX_CAPTURE keep the write inside it. The source is user memory, read by the helper
    // that tolerates bad addresses.
    unsafe {
        generated::bpf_probe_read_user(
            data.add(offset as usize) as *mut c_void,
            len as u32,
            src as *const c_void,
        ) == 0
    }
}

/// Copies `min(limit, MAX_CAPTURE)` bytes of one contiguous user buffer. Returns bytes copied,
/// or None if unreadable.
#[inline(always)]
pub fn copy_buf(data: *mut u8, src: u64, limit: u64) -> Option<u32> {
    let n = if limit > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        limit
    };
    if copy(data, 0, src, n) {
        Some(n as u32)
    } else {
        None
    }
}

/// Copies the first `limit` bytes spread over an iovec array of `iovcnt` entries.
#[inline(always)]
pub fn copy_iov(data: *mut u8, iov: u64, iovcnt: u64, limit: u64) -> Option<u32> {
    let limit = if limit > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        limit
    };
    let mut done: u64 = 0;
    for i in 0..MAX_IOV as u64 {
        if i >= iovcnt || done >= limit {
            break;
        }
        // SAFETY: user memory, read by a helper that tolerates bad addresses.
        let entry: Iovec =
            unsafe { bpf_probe_read_user((iov as *const Iovec).add(i as usize)) }.ok()?;
        let room = limit - done;
        let n = if entry.len < room { entry.len } else { room };
        if !copy(data, done, entry.base, n) {
            return None;
        }
        // `done` stays at most `limit` (<= MAX_CAPTURE), so the mask changes nothing; it gives
        // `done` the same range on every path into the next round, and the verifier can prune
        // what it already checked instead of walking each combination of entry lengths (it
        // took up to a second per program, most of the agent's start-up).
        done = (done + n) & DONE_MASK;
    }
    Some(done as u32)
}

/// Copies the first `limit` bytes of a `struct user_msghdr`'s iovecs.
#[inline(always)]
pub fn copy_msghdr(data: *mut u8, msghdr: u64, limit: u64) -> Option<u32> {
    // SAFETY: user memory, read by a helper that tolerates bad addresses.
    let (iov, iovlen) = unsafe {
        let iov: u64 = bpf_probe_read_user((msghdr as usize + MSGHDR_IOV) as *const u64).ok()?;
        let iovlen: u64 =
            bpf_probe_read_user((msghdr as usize + MSGHDR_IOVLEN) as *const u64).ok()?;
        (iov, iovlen)
    };
    copy_iov(data, iov, iovlen, limit)
}
