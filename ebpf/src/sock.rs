//! From a file descriptor of the current task to its TCP socket and endpoints.
//!
//! Walks task->files->fdt->fd[fd]->(f_inode, private_data)->sk with offsets the agent derived
//! from BTF; any field that cannot be read ends the walk with "not a TCP socket".

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};
use wirespan_common::{EventHeader, KernelLayout, family};

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
}

#[inline(always)]
unsafe fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copes with any address (it returns an error instead of
    // faulting); the caller only chooses what to interpret the bytes as.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
}

/// The TCP socket open on `fd` in the current task, if it is one.
#[inline(always)]
pub fn tcp_socket(layout: &KernelLayout, fd: i64) -> Option<TcpSock> {
    if fd < 0 {
        return None;
    }
    // SAFETY: every dereference below goes through bpf_probe_read_kernel, which validates the
    // address; a wrong pointer yields None, never a fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files: *const u8 = read(task, layout.task_files)?;
        let fdt: *const u8 = read(files, layout.files_fdt)?;
        let max_fds: u32 = read(fdt, layout.fdt_max_fds)?;
        if fd as u64 >= max_fds as u64 {
            return None;
        }
        let fd_array: *const *const u8 = read(fdt, layout.fdt_fd)?;
        let file: *const u8 = bpf_probe_read_kernel(fd_array.add(fd as usize)).ok()?;
        if file.is_null() {
            return None;
        }
        let inode: *const u8 = read(file, layout.file_inode)?;
        let mode: u16 = read(inode, layout.inode_mode)?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket: *const u8 = read(file, layout.file_private_data)?;
        let sock_type: i16 = read(socket, layout.socket_type)?;
        if sock_type != SOCK_STREAM {
            return None;
        }
        let sk: *const u8 = read(socket, layout.socket_sk)?;
        let fam: u16 = read(sk, layout.sk_family)?;
        if fam != family::INET && fam != family::INET6 {
            return None;
        }
        let protocol: u16 = read(sk, layout.sk_protocol)?;
        if protocol != IPPROTO_TCP && protocol != IPPROTO_MPTCP {
            return None;
        }
        let ino: u64 = read(inode, layout.inode_ino)?;
        Some(TcpSock {
            sk,
            ino,
            family: fam,
        })
    }
}

/// Copies both endpoints of `sock` into `header` (ports in host order).
#[inline(always)]
pub fn fill_endpoints(layout: &KernelLayout, sock: &TcpSock, header: &mut EventHeader) {
    header.conn_id = sock.ino;
    header.family = sock.family;
    // SAFETY: reads go through bpf_probe_read_kernel (see `read`); a failed read leaves zeros.
    unsafe {
        let dport: u16 = read(sock.sk, layout.sk_dport).unwrap_or(0);
        header.remote_port = u16::from_be(dport);
        header.local_port = read(sock.sk, layout.sk_num).unwrap_or(0);
        if header.local_port == 0 {
            // Cleared when the connection reached TCP_CLOSE (e.g. close after shutdown).
            let sport: u16 = read(sock.sk, layout.inet_sport).unwrap_or(0);
            header.local_port = u16::from_be(sport);
        }
        if sock.family == family::INET6 {
            header.local_addr = read(sock.sk, layout.sk_v6_rcv_saddr).unwrap_or([0; 16]);
            header.remote_addr = read(sock.sk, layout.sk_v6_daddr).unwrap_or([0; 16]);
        } else {
            let local: [u8; 4] = read(sock.sk, layout.sk_rcv_saddr).unwrap_or([0; 4]);
            let remote: [u8; 4] = read(sock.sk, layout.sk_daddr).unwrap_or([0; 4]);
            header.local_addr = [0; 16];
            header.remote_addr = [0; 16];
            header.local_addr[..4].copy_from_slice(&local);
            header.remote_addr[..4].copy_from_slice(&remote);
        }
    }
}
