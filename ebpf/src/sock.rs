//! From a file descriptor of the current task to its TCP socket and endpoints.
//!
//! Walks task->files->fdt->fd[fd]->(f_inode, private_data)->sk with offsets the agent derived
//! from BTF; any field that cannot be read ends the walk with "not a TCP socket". The first
//! steps are direct loads through the BTF-typed task pointer (the verifier knows the offsets:
//! they come from the frozen, read-only `LAYOUT`); from the descriptor array on, the pointers
//! are plain numbers to the verifier and are read with `bpf_probe_read_kernel`. A socket found
//! is remembered per (process, descriptor) in `SOCKS`; the next call only checks that the
//! descriptor still holds the same file with the same inode (pointer and number).

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task_btf};
use wirespan_common::{EventHeader, SockHead, SockHead6, family};

use crate::maps::{CONNECTORS, KnownSock, Layout, SOCKS};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: i16 = 1;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_MPTCP: u16 = 262;

/// A TCP socket found behind a descriptor.
#[derive(Clone, Copy)]
pub struct TcpSock {
    /// `struct sock *`
    pub sk: *const u8,
    /// The socket inode's number: the connection id.
    pub ino: u64,
    pub family: u16,
    /// The addresses and ports, when the walk already copied them.
    pub head: Option<SockHead>,
    /// A record of this socket was lost since the last one sent (see `mark_lost`); the flag
    /// is taken by the lookup that returns it, and set again if this call's record is lost too.
    pub after_loss: bool,
}

impl TcpSock {
    /// A socket found in the `SOCKS` cache: its endpoints are read when needed.
    #[inline(always)]
    pub fn known(sk: *const u8, ino: u64, family: u16) -> Self {
        Self {
            sk,
            ino,
            family,
            head: None,
            after_loss: false,
        }
    }
}

/// The `SOCKS` key of descriptor `fd` of the current process.
#[inline(always)]
fn sock_key(pid_tgid: u64, fd: i64) -> u64 {
    (pid_tgid >> 32) << 32 | (fd as u64 & 0xffff_ffff)
}

/// Notes that the record of a call on descriptor `fd` of the current process was lost: the
/// next record of that socket is sent as `kind::DATA_AFTER_LOSS`, so the agent does not pair
/// a request with a response across the missing bytes. Only on a loss (the ring full). A
/// socket whose cache entry was evicted meanwhile cannot be marked;
/// its loss is still counted.
#[inline(always)]
pub fn mark_lost(pid_tgid: u64, fd: i64) {
    if let Some(known) = SOCKS.get_ptr_mut(sock_key(pid_tgid, fd)) {
        // SAFETY: a plain store into this entry's own field; the LRU frees an entry only after
        // the programs that may hold it have finished (RCU).
        unsafe { (*known).lost = 1 };
    }
}

#[inline(always)]
unsafe fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copes with any address (it returns an error instead of
    // faulting); the caller only chooses what to interpret the bytes as.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
}

/// A direct load through a BTF-typed kernel pointer (a `PROBE_MEM` load: a bad address reads
/// as zero instead of faulting).
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: the verifier checks the offset and size against the pointer's BTF type at load
    // and turns the load into one that tolerates a bad address.
    unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) }
}

/// The TCP socket open on `fd` in the current task (`pid_tgid`), if it is one.
#[inline(always)]
pub fn tcp_socket(pid_tgid: u64, fd: i64) -> Option<TcpSock> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the first loads go through BTF-typed pointers (see `load`), every dereference
    // after them through bpf_probe_read_kernel, which validates the address; a wrong pointer
    // yields None, never a fault.
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let files: *const u8 = load(task, Layout.task_files());
        // The verifier may type these as possibly null: no arithmetic before the checks.
        if files.is_null() {
            return None;
        }
        let fdt: *const u8 = load(files, Layout.files_fdt());
        if fdt.is_null() {
            return None;
        }
        let max_fds: u32 = load(fdt, Layout.fdt_max_fds());
        if fd as u64 >= max_fds as u64 {
            return None;
        }
        let fd_array: *const *const u8 = load(fdt, Layout.fdt_fd());
        if fd_array.is_null() {
            return None;
        }
        let file: *const u8 = bpf_probe_read_kernel(fd_array.add(fd as usize)).ok()?;
        if file.is_null() {
            return None;
        }
        let key = sock_key(pid_tgid, fd);
        let inode: *const u8 = read(file, Layout.file_inode())?;
        let entry = SOCKS.get_ptr_mut(key);
        if let Some(entry) = entry
            && let known = *entry
            && known.check == known.sum()
            && known.file == file as u64
            && known.inode == inode as u64
        {
            // The same file on the descriptor, and its inode still the socket's: a file or
            // inode freed and reused at the same address would carry a new inode number.
            let ino: u64 = read(inode, Layout.inode_ino())?;
            if ino == known.ino {
                let mut sock =
                    TcpSock::known(known.sk as *const u8, known.ino, known.family as u16);
                if known.lost != 0 {
                    (*entry).lost = 0;
                    sock.after_loss = true;
                }
                return Some(sock);
            }
        }
        let mode: u16 = read(inode, Layout.inode_mode())?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket: *const u8 = read(file, Layout.file_private_data())?;
        let sock_type: i16 = read(socket, Layout.socket_type())?;
        if sock_type != SOCK_STREAM {
            return None;
        }
        let sk: *const u8 = read(socket, Layout.socket_sk())?;
        let head: SockHead = read(sk, Layout.sk_daddr())?;
        if head.family != family::INET && head.family != family::INET6 {
            return None;
        }
        let protocol: u16 = read(sk, Layout.sk_protocol())?;
        if protocol != IPPROTO_TCP && protocol != IPPROTO_MPTCP {
            return None;
        }
        let ino: u64 = read(inode, Layout.inode_ino())?;
        let mut known = KnownSock {
            file: file as u64,
            inode: inode as u64,
            sk: sk as u64,
            ino,
            family: head.family as u64,
            check: 0,
            lost: 0,
        };
        known.check = known.sum();
        let _ = SOCKS.insert(key, known, 0);
        Some(TcpSock {
            sk,
            ino,
            family: head.family,
            head: Some(head),
            after_loss: false,
        })
    }
}

/// Whether this is the first connect the programs see of the current process (`pid_tgid`):
/// its pid is not in `CONNECTORS`, or was last there for a process started at another time
/// (the pid was reused). Noted for the next one.
#[inline(always)]
pub fn first_connect(pid_tgid: u64) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: direct loads through BTF-typed task pointers (see `load`); a bad address reads
    // as zero, which at worst makes a connect count as a first one.
    let started: u64 = unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let leader: *const u8 = load(task, Layout.task_group_leader());
        if leader.is_null() {
            return true;
        }
        load(leader, Layout.task_start_time())
    };
    // SAFETY: the value is copied out at once.
    if unsafe { CONNECTORS.get(tgid) }.copied() == Some(started) {
        return false;
    }
    let _ = CONNECTORS.insert(tgid, started, 0);
    true
}

/// Copies both endpoints of `sock` into `header` (ports in host order).
#[inline(always)]
pub fn fill_endpoints(sock: &TcpSock, header: &mut EventHeader) {
    header.conn_id = sock.ino;
    header.family = sock.family;
    // SAFETY: reads go through bpf_probe_read_kernel (see `read`); a failed read leaves zeros.
    unsafe {
        let head = sock
            .head
            .unwrap_or_else(|| read(sock.sk, Layout.sk_daddr()).unwrap_or_default());
        header.remote_port = u16::from_be(head.dport);
        header.local_port = head.num;
        if header.local_port == 0 {
            // Cleared when the connection reached TCP_CLOSE (e.g. close after shutdown).
            let sport: u16 = read(sock.sk, Layout.inet_sport()).unwrap_or(0);
            header.local_port = u16::from_be(sport);
        }
        if sock.family == family::INET6 {
            let v6: SockHead6 = read(sock.sk, Layout.sk_v6_daddr()).unwrap_or_default();
            set_v6(&mut header.local_addr, v6.rcv_saddr);
            set_v6(&mut header.remote_addr, v6.daddr);
        } else {
            set_v4(&mut header.local_addr, head.rcv_saddr);
            set_v4(&mut header.remote_addr, head.daddr);
        }
    }
}

/// An IPv4 address (its bytes as in memory) into a header address, the rest zeroed: with word
/// stores, where a byte array's copy and fill compile to a store per byte and a byte loop.
#[inline(always)]
fn set_v4(dst: &mut [u8; 16], addr: u32) {
    // SAFETY: header addresses are at 8-aligned offsets of an 8-aligned header (asserted in
    // wirespan_common), and 16 bytes long.
    unsafe {
        let words = dst.as_mut_ptr() as *mut u32;
        words.write(addr);
        words.add(1).write(0);
        (dst.as_mut_ptr() as *mut u64).add(1).write(0);
    }
}

/// An IPv6 address (its bytes as in memory, in two words) into a header address.
#[inline(always)]
fn set_v6(dst: &mut [u8; 16], addr: [u64; 2]) {
    // SAFETY: as for `set_v4`.
    unsafe {
        let words = dst.as_mut_ptr() as *mut u64;
        words.write(addr[0]);
        words.add(1).write(addr[1]);
    }
}
