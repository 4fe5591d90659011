//! Offsets the kernel programs need, found by the agent at load time.
//!
//! Nothing here is hard-coded to one kernel: the agent reads the tracepoint format files and the
//! kernel's BTF, fills a `KernelLayout`, and writes it into the programs' `LAYOUT` global. The
//! programs do nothing while `valid` is 0, so a kernel whose layout could not be derived is never
//! read as garbage.

/// Byte offsets, all relative to the start of the named struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// 1 once the agent has filled every field; 0 makes every program return at once.
    pub valid: u32,
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_time`
    pub task_start_time: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.private_data`
    pub file_private_data: u32,
    /// `inode.i_mode`
    pub inode_mode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `socket.type`
    pub socket_type: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.sk_protocol`
    pub sk_protocol: u32,
    /// `sock.__sk_common.skc_daddr`: the start of the addresses, ports and family, read in one
    /// copy (see `SockHead`).
    pub sk_daddr: u32,
    /// `sock.__sk_common.skc_v6_daddr`, followed by `skc_v6_rcv_saddr` (see `SockHead6`).
    pub sk_v6_daddr: u32,
    /// `inet_sock.inet_sport` (the `struct sock` is the start of `inet_sock`): the local port,
    /// still set after the kernel clears `skc_num` on a fully closed connection.
    pub inet_sport: u32,
}
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 17 * 4);

impl KernelLayout {
    pub const fn zeroed() -> Self {
        Self {
            valid: 0,
            task_files: 0,
            task_group_leader: 0,
            task_start_time: 0,
            files_fdt: 0,
            fdt_max_fds: 0,
            fdt_fd: 0,
            file_inode: 0,
            file_private_data: 0,
            inode_mode: 0,
            inode_ino: 0,
            socket_type: 0,
            socket_sk: 0,
            sk_protocol: 0,
            sk_daddr: 0,
            sk_v6_daddr: 0,
            inet_sport: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no padding (size checked above), any bit pattern is valid.
unsafe impl aya::Pod for KernelLayout {}

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record (arguments are 8
/// bytes apart), and of `ret` in a `syscalls:sys_exit_*` record: after the 8-byte common header
/// and the padded `__syscall_nr`, on every kernel with syscall tracepoints. The programs read
/// the record with direct loads, whose offset is part of the instruction, so these are
/// constants; the agent checks them against every format file before loading.
pub const TP_ARGS: u32 = 16;
pub const TP_RET: u32 = 16;

/// The start of `struct sock_common`, from `skc_daddr` on, as the programs copy it in one read:
/// IPv4 addresses, ports (the remote one in network order) and the family. The agent checks
/// the relative offsets against the kernel's BTF before loading.
///
/// The addresses are the kernel's network-order bytes held in words, so that the programs
/// move them with word loads and stores (byte arrays compile to a load and a store per byte).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockHead {
    /// `skc_daddr` (its bytes as they are in memory)
    pub daddr: u32,
    /// `skc_rcv_saddr` (its bytes as they are in memory)
    pub rcv_saddr: u32,
    /// `skc_hash`
    pub hash: u32,
    /// `skc_dport`
    pub dport: u16,
    /// `skc_num`
    pub num: u16,
    /// `skc_family`
    pub family: u16,
    /// `skc_state` and what follows it, unused.
    pub rest: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockHead>() == 24);

/// `skc_v6_daddr` and `skc_v6_rcv_saddr`, adjacent in `struct sock_common`: their bytes as
/// they are in memory, held in words (see `SockHead`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockHead6 {
    pub daddr: [u64; 2],
    pub rcv_saddr: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<SockHead6>() == 32);

/// Where the kernel keeps a syscall's first four arguments in the thread's saved user
/// registers (`struct pt_regs`): the member that holds each and the argument's byte offset. A
/// syscall leaves them as they were at entry, so the receiving calls' exit programs read them
/// there; the agent checks them against the kernel's BTF before loading.
///
/// x86_64: di, si, dx, r10. arm64: orig_x0 (x0 holds the return value by then), then x1..x3,
/// elements of the `regs` array. (x86_64 is also the choice when no architecture is given, as
/// for the eBPF linter.)
#[cfg(not(any(target_arch = "aarch64", bpf_target_arch = "aarch64")))]
pub const SYSCALL_ARG_REGS: [(&str, u32); 4] = [("di", 112), ("si", 104), ("dx", 96), ("r10", 56)];
#[cfg(any(target_arch = "aarch64", bpf_target_arch = "aarch64"))]
pub const SYSCALL_ARG_REGS: [(&str, u32); 4] =
    [("orig_x0", 272), ("regs", 8), ("regs", 16), ("regs", 24)];
