//! The tracepoint entry points: thin wrappers around `enter` and `exit`.
//!
//! Program names follow `sock_<enter|exit>_<syscall>`; the agent attaches each to
//! `syscalls:sys_<enter|exit>_<syscall>` from one table (agent/src/capture/probes.rs).

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_comm, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs,
        },
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use wirespan_common::{
    EventHeader, MAX_CAPTURE, MAX_HEAD_CAPTURE, MAX_MORE, SYSCALL_ARG_REGS, TP_ARGS, TP_RET,
    direction, kind, lost, pid_filter, syscall,
};

use crate::{
    maps::{Config, HEADS, Layout, PID_FILTER, SCRATCH, STAMPS, count_lost, output},
    payload,
    sock::{TcpSock, fill_endpoints, first_connect, mark_lost, tcp_socket},
};

const MSG_PEEK: u32 = 2;
const EINPROGRESS: i64 = 115;
/// Marks "this syscall has no such argument" in `Args`.
const NO_ARG: u32 = u32::MAX;

/// Where a syscall's interesting arguments sit (argument indexes, 8 bytes apart).
#[derive(Clone, Copy)]
struct Args {
    fd: u32,
    buf: u32,
    count: u32,
    flags: u32,
}

const fn args(fd: u32, buf: u32, count: u32, flags: u32) -> Args {
    Args {
        fd,
        buf,
        count,
        flags,
    }
}

/// A direct load from the tracepoint record; `offset` is a constant after inlining, as the
/// verifier wants for context loads.
#[inline(always)]
fn record<T: Copy>(ctx: &TracePointContext, offset: u32) -> T {
    // SAFETY: the agent checked every format file against TP_ARGS/TP_RET before loading, and
    // the verifier checks the constant offset against the record's size.
    unsafe {
        core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(offset as usize) as *const T)
    }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, index: u32) -> u64 {
    if index == NO_ARG {
        return 0;
    }
    record(ctx, TP_ARGS + 8 * index)
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    // SAFETY: the value is a plain u32 copied out immediately; the map is never deleted from
    // under us while the program runs.
    match unsafe { PID_FILTER.get(tgid) } {
        Some(&pid_filter::IGNORE) => false,
        Some(&pid_filter::TRACE) => true,
        _ => Config.filter_mode() == pid_filter::ALL_EXCEPT_IGNORED,
    }
}

/// `bpf_ringbuf_output` flags.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// The kernel's header before each ring record (`BPF_RINGBUF_HDR_SZ`).
const RECORD_HEADER: u64 = 8;

/// The wake-up flag for a record of `size` bytes, `unwoken` the bytes this CPU wrote since
/// it last forced one (this CPU's scratch slot, updated here); `force` wakes the agent at once.
///
/// The kernel's default wakes the reader for every record written while it had caught up,
/// which at high rates is nearly every record: an interrupt and a scheduler wake-up per
/// record, taken from the traced process, and an agent woken for one record at a time.
/// Records are written without one; each CPU wakes the agent each time it has written
/// `wake_bytes` into its ring (half of it: 1 MiB of each 2 MiB ring when 4 MiB are split
/// between 2 CPUs), and the agent drains the rings on its 50 ms tick anyway. The count is
/// kept in this CPU's scratch slot: asking the ring how much waits in it costs a load of the
/// position the agent writes (docs/BENCHMARKS.md). A
/// process's first connect wakes it at once (`sock::first_connect`):
/// the agent reads a new client's /proc entry at its connection's first event, and a
/// short-lived client (curl) may exit within milliseconds. Later connects of the same process
/// do not: a client that opens a connection per request woke the agent for each.
#[inline(always)]
fn wakeup(unwoken: &mut u64, force: bool, size: u64) -> u64 {
    let written = *unwoken + size + RECORD_HEADER;
    if force || written >= Config.wake_bytes() as u64 {
        *unwoken = 0;
        BPF_RB_FORCE_WAKEUP
    } else {
        *unwoken = written;
        BPF_RB_NO_WAKEUP
    }
}

/// The record of a call on descriptor `fd` of the current process is lost (`reason`, one of
/// `lost::*`): counted, and the socket marked so that its next record says so.
#[inline(always)]
fn lose_call(pid_tgid: u64, fd: i64, reason: u32) {
    count_lost(reason);
    mark_lost(pid_tgid, fd);
}

/// The caller's pid_tgid, if the programs are live and the caller's process is traced.
#[inline(always)]
fn traced_caller() -> Option<u64> {
    if Layout.valid() == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    traced((pid_tgid >> 32) as u32).then_some(pid_tgid)
}

/// Notes when a sending call of a traced process began, for its exit (see `Stamp`). Nothing
/// else happens at enter: the exit reads the arguments from the saved registers and checks the
/// descriptor then. A thread that already has a stamp belongs to a process that was traced
/// when it got it: the exit checks the pid filter again before it sends anything.
#[inline(always)]
fn enter_egress(id: u32) -> u32 {
    if Layout.valid() == 0 {
        return 0;
    }
    let stamp = match STAMPS.current(false) {
        Some(stamp) => stamp,
        None => {
            if traced_caller().is_none() {
                return 0;
            }
            // A failed allocation leaves the call without a stamp: its exit uses its own time.
            let Some(stamp) = STAMPS.current(true) else {
                return 0;
            };
            stamp
        }
    };
    // SAFETY: the current task's own value (see `TaskStorage::current`).
    unsafe {
        (*stamp).syscall = id;
        (*stamp).enter_ns = bpf_ktime_get_ns();
    }
    0
}

/// When this thread's sending call `id` began, taking its stamp; 0 when its enter was not seen
/// (the thread was already in the call when the programs attached).
#[inline(always)]
fn take_stamp(id: u32) -> u64 {
    let Some(stamp) = STAMPS.current(false) else {
        return 0;
    };
    // SAFETY: the current task's own value (see `TaskStorage::current`).
    unsafe {
        if (*stamp).syscall != id {
            return 0;
        }
        (*stamp).syscall = syscall::NONE;
        (*stamp).enter_ns
    }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    record(ctx, TP_RET)
}

/// What to put after the header.
#[derive(Clone, Copy)]
enum Payload {
    None,
    Buf(u64),
    Iov(u64, u64),
    Msghdr(u64),
}

/// Builds the event in per-CPU scratch space and sends header + captured prefix.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit(
    pid_tgid: u64,
    fd: i32,
    sock: &TcpSock,
    ev: (u32, u32, u32),
    len: u64,
    payload: Payload,
    enter_ns: u64,
    force_wakeup: bool,
) {
    let (event_kind, id, dir) = ev;
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `buf` is this CPU's scratch slot; nothing else uses it while we run.
    let buf = unsafe { &mut *buf };
    let header = &mut buf.header;
    // SAFETY: a helper without preconditions.
    header.ts_ns = if dir == direction::EGRESS && enter_ns != 0 {
        enter_ns
    } else {
        // SAFETY: a helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    };
    header.pid = (pid_tgid >> 32) as u32;
    header.tid = pid_tgid as u32;
    header.fd = fd;
    header.kind = if event_kind == kind::DATA && sock.after_loss {
        kind::DATA_AFTER_LOSS
    } else {
        event_kind
    };
    header.direction = dir;
    header.syscall = id;
    header.len = len;
    // Straight into the header (the kernel zeroes it if it fails), not through a copy.
    // SAFETY: `comm` is 16 writable bytes.
    unsafe {
        bpf_get_current_comm(
            header.comm.as_mut_ptr() as *mut core::ffi::c_void,
            header.comm.len() as u32,
        )
    };
    fill_endpoints(sock, header);

    // A socket in the middle of a large request head gets its calls captured whole.
    let head_key = sock.sk as u64 + dir as u64;
    // The socket's head record, looked up only for a call longer than the prefix (only such a
    // call can need more of its bytes): Some(0) when there is none.
    let prefix = Config.capture_bytes() as u64;
    let stored: Option<u64> = (event_kind == kind::DATA && len > prefix)
        // SAFETY: the value is copied out at once.
        .then(|| unsafe { HEADS.get(head_key) }.copied().unwrap_or(0) as u64);
    let budget = stored.unwrap_or(0);
    let limit = {
        let want = if budget > 0 {
            MAX_CAPTURE as u64
        } else {
            prefix
        };
        if want < len { want } else { len }
    };
    let data = buf.data.as_mut_ptr();
    let copied = match payload {
        Payload::None => Some(0),
        Payload::Buf(src) => payload::copy_buf(data, src, limit),
        Payload::Iov(iov, cnt) => payload::copy_iov(data, iov, cnt, limit),
        Payload::Msghdr(msg) => payload::copy_msghdr(data, msg, limit),
    };
    let captured = copied.unwrap_or_else(|| {
        count_lost(lost::READ_FAILED);
        0
    });
    let captured = if captured as usize > MAX_CAPTURE {
        MAX_CAPTURE
    } else {
        captured as usize
    };
    buf.header.captured = captured as u32;
    // A plain buffer that starts like a request and is longer than the prefix: send the rest
    // of its head in DATA_MORE records (see MAX_HEAD_CAPTURE).
    let mut more: u64 = 0;
    let mut total: u64 = 0;
    if event_kind == kind::DATA {
        let budget = if captured >= 8 && starts_like_request(&buf.data) {
            MAX_HEAD_CAPTURE as u64
        } else {
            budget
        };
        total = if len < budget { len } else { budget };
        if let Payload::Buf(_) = payload
            && total > captured as u64
        {
            more = (total - captured as u64).div_ceil(MAX_CAPTURE as u64);
        }
        // Later calls on this socket continue the head while the budget lasts, unless this
        // call was short (a whole small head).
        let left = budget - total;
        if left > 0 && len >= prefix {
            let _ = HEADS.insert(head_key, left as u32, 0);
        } else if budget > 0 && stored.map_or_else(|| heads_has(head_key), |b| b > 0) {
            // A delete from the LRU takes its locks even for a missing key; most requests
            // never had a record here.
            let _ = HEADS.remove(head_key);
        }
    }
    buf.header.more = more as u16;
    buf.header.offset = 0;
    let size = size_of::<EventHeader>() + captured;
    // SAFETY: `size` <= size_of::<EventHeader>() + MAX_CAPTURE, inside the EventBuf.
    let bytes = unsafe { core::slice::from_raw_parts(buf as *const _ as *const u8, size) };
    if !output(bytes, wakeup(&mut buf.unwoken, force_wakeup, size as u64)) {
        lose_call(pid_tgid, fd as i64, lost::RINGBUF_FULL);
        return;
    }
    let Payload::Buf(src) = payload else {
        return;
    };
    for k in 0..MAX_MORE as u64 {
        if k >= more {
            break;
        }
        let offset = captured as u64 + k * MAX_CAPTURE as u64;
        if offset >= total {
            break;
        }
        let n = total - offset;
        let Some(n) = payload::copy_buf(buf.data.as_mut_ptr(), src + offset, n) else {
            count_lost(lost::READ_FAILED);
            return;
        };
        let n = if n as usize > MAX_CAPTURE {
            MAX_CAPTURE
        } else {
            n as usize
        };
        buf.header.kind = kind::DATA_MORE;
        buf.header.more = 0;
        buf.header.offset = offset as u32;
        buf.header.captured = n as u32;
        let size = size_of::<EventHeader>() + n;
        // SAFETY: as above.
        let bytes = unsafe { core::slice::from_raw_parts(buf as *const _ as *const u8, size) };
        if !output(bytes, wakeup(&mut buf.unwoken, false, size as u64)) {
            count_lost(lost::RINGBUF_FULL);
            return;
        }
    }
}

#[inline(always)]
fn heads_has(key: u64) -> bool {
    // SAFETY: only the presence is used.
    unsafe { HEADS.get(key) }.is_some()
}

/// Whether a call's first bytes are an HTTP method and a space (or the start of a longer
/// method). The first four bytes are compared as one word: the payload is 8-aligned, at the end
/// of the header.
#[inline(always)]
fn starts_like_request(data: &[u8; 2 * MAX_CAPTURE]) -> bool {
    const fn word(w: &[u8; 4]) -> u32 {
        u32::from_ne_bytes(*w)
    }
    const GET: u32 = word(b"GET ");
    const POST: u32 = word(b"POST");
    const PUT: u32 = word(b"PUT ");
    const HEAD: u32 = word(b"HEAD");
    const DELETE: u32 = word(b"DELE");
    const PATCH: u32 = word(b"PATC");
    const OPTIONS: u32 = word(b"OPTI");
    // SAFETY: the payload follows the 112-byte header of an 8-aligned buffer (asserted in
    // wirespan_common), so its start is aligned for a word, and it is longer than one.
    let w = unsafe { (data.as_ptr() as *const u32).read() };
    matches!(w, GET | POST | PUT | HEAD | DELETE | PATCH | OPTIONS)
}

/// The current syscall's arguments `at`, read at its exit from the saved user registers (see
/// `SYSCALL_ARG_REGS`).
#[inline(always)]
fn exit_args(at: Args) -> (i64, u64, u64, u32) {
    // SAFETY: both helpers take and return kernel pointers the verifier tracks by BTF, and the
    // registers are direct loads at constant offsets it checks against `struct pt_regs` (the
    // agent checked the same offsets against BTF before loading).
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let get = |index: u32| -> u64 {
            if index == NO_ARG {
                return 0;
            }
            let offset = SYSCALL_ARG_REGS[(index & 3) as usize].1 as usize;
            core::ptr::read_volatile(regs.add(offset) as *const u64)
        };
        (
            get(at.fd) as i64,
            get(at.buf),
            get(at.count),
            get(at.flags) as u32,
        )
    }
}

/// Exit of a receiving syscall: its arguments come from the saved registers, so it needs no
/// enter program. Sending calls keep theirs for the time before the bytes left.
#[inline(always)]
fn exit_ingress(ctx: &TracePointContext, id: u32, at: Args) -> u32 {
    // First what costs nothing: a non-blocking server's reads that find nothing (a tenth of
    // nginx's) end here without the pid filter's lookup.
    let len = ret(ctx);
    if len <= 0 {
        return 0;
    }
    let Some(pid_tgid) = traced_caller() else {
        return 0;
    };
    let (fd, buf, count, flags) = exit_args(at);
    if flags & MSG_PEEK != 0 {
        return 0;
    }
    let Some(sock) = tcp_socket(pid_tgid, fd) else {
        return 0;
    };
    let payload = match id {
        syscall::READV => Payload::Iov(buf, count),
        syscall::RECVMSG => Payload::Msghdr(buf),
        _ => Payload::Buf(buf),
    };
    emit(
        pid_tgid,
        fd as i32,
        &sock,
        (kind::DATA, id, direction::INGRESS),
        len as u64,
        payload,
        0,
        false,
    );
    0
}

macro_rules! ingress_syscall {
    ($exit:ident, $id:expr, $args:expr) => {
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_ingress(&ctx, $id, $args)
        }
    };
}

/// Exit of a sending syscall: report `ret` bytes, with a prefix. Its arguments come from the
/// saved registers, like a receiving call's; the enter program only noted the time.
#[inline(always)]
fn exit_egress(ctx: &TracePointContext, id: u32, at: Args) -> u32 {
    let len = ret(ctx);
    if len <= 0 {
        return 0;
    }
    let enter_ns = take_stamp(id);
    let Some(pid_tgid) = traced_caller() else {
        return 0;
    };
    let (fd, buf, count, _) = exit_args(at);
    let Some(sock) = tcp_socket(pid_tgid, fd) else {
        return 0;
    };
    if enter_ns == 0 {
        debug!(
            ctx,
            "wirespan: thread {} was already sending on fd {} when the programs attached; its call is timed at its exit",
            pid_tgid as u32,
            fd
        );
    }
    let payload = match id {
        syscall::WRITEV => Payload::Iov(buf, count),
        syscall::SENDMSG => Payload::Msghdr(buf),
        syscall::SENDFILE => Payload::None,
        _ => Payload::Buf(buf),
    };
    emit(
        pid_tgid,
        fd as i32,
        &sock,
        (kind::DATA, id, direction::EGRESS),
        len as u64,
        payload,
        enter_ns,
        false,
    );
    0
}

macro_rules! egress_syscall {
    ($enter:ident, $exit:ident, $id:expr, $args:expr) => {
        #[tracepoint]
        pub fn $enter(_ctx: TracePointContext) -> u32 {
            enter_egress($id)
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_egress(&ctx, $id, $args)
        }
    };
}

ingress_syscall!(sock_exit_read, syscall::READ, args(0, 1, NO_ARG, NO_ARG));
egress_syscall!(
    sock_enter_write,
    sock_exit_write,
    syscall::WRITE,
    args(0, 1, NO_ARG, NO_ARG)
);
ingress_syscall!(sock_exit_readv, syscall::READV, args(0, 1, 2, NO_ARG));
egress_syscall!(
    sock_enter_writev,
    sock_exit_writev,
    syscall::WRITEV,
    args(0, 1, 2, NO_ARG)
);
ingress_syscall!(sock_exit_recvfrom, syscall::RECVFROM, args(0, 1, NO_ARG, 3));
egress_syscall!(
    sock_enter_sendto,
    sock_exit_sendto,
    syscall::SENDTO,
    args(0, 1, NO_ARG, NO_ARG)
);
ingress_syscall!(sock_exit_recvmsg, syscall::RECVMSG, args(0, 1, NO_ARG, 2));
egress_syscall!(
    sock_enter_sendmsg,
    sock_exit_sendmsg,
    syscall::SENDMSG,
    args(0, 1, NO_ARG, NO_ARG)
);
egress_syscall!(
    sock_enter_sendfile64,
    sock_exit_sendfile64,
    syscall::SENDFILE,
    args(0, NO_ARG, NO_ARG, NO_ARG)
);

/// Exit of accept/accept4: the returned descriptor is the server side of a new connection.
/// No enter program: the result is all it needs.
#[inline(always)]
fn exit_accept(ctx: &TracePointContext, id: u32) -> u32 {
    let fd = ret(ctx);
    if fd < 0 {
        return 0;
    }
    let Some(pid_tgid) = traced_caller() else {
        return 0;
    };
    if let Some(sock) = tcp_socket(pid_tgid, fd) {
        emit(
            pid_tgid,
            fd as i32,
            &sock,
            (kind::ACCEPT, id, direction::NONE),
            0,
            Payload::None,
            0,
            false,
        );
    }
    0
}

#[tracepoint]
pub fn sock_exit_accept(ctx: TracePointContext) -> u32 {
    exit_accept(&ctx, syscall::ACCEPT)
}

#[tracepoint]
pub fn sock_exit_accept4(ctx: TracePointContext) -> u32 {
    exit_accept(&ctx, syscall::ACCEPT4)
}

/// Exit of connect: the descriptor (from the saved registers) is the client side of a
/// connection, also when a non-blocking connect is still in progress (the endpoints are
/// already bound).
#[tracepoint]
pub fn sock_exit_connect(ctx: TracePointContext) -> u32 {
    let r = ret(&ctx);
    if r != 0 && r != -EINPROGRESS {
        return 0;
    }
    let Some(pid_tgid) = traced_caller() else {
        return 0;
    };
    let (fd, _, _, _) = exit_args(args(0, NO_ARG, NO_ARG, NO_ARG));
    if let Some(sock) = tcp_socket(pid_tgid, fd) {
        emit(
            pid_tgid,
            fd as i32,
            &sock,
            (kind::CONNECT, syscall::CONNECT, direction::NONE),
            0,
            Payload::None,
            0,
            first_connect(pid_tgid),
        );
    }
    0
}

/// close needs no exit program: the socket must be looked up before the descriptor goes away.
#[tracepoint]
pub fn sock_enter_close(ctx: TracePointContext) -> u32 {
    let Some(pid_tgid) = traced_caller() else {
        return 0;
    };
    let fd = arg(&ctx, 0) as i64;
    if let Some(sock) = tcp_socket(pid_tgid, fd) {
        emit(
            pid_tgid,
            fd as i32,
            &sock,
            (kind::CLOSE, syscall::CLOSE, direction::NONE),
            0,
            Payload::None,
            0,
            false,
        );
    }
    0
}
