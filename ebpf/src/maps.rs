//! Maps and globals shared by every program.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    btf_maps::{ArrayOfMaps, RingBuf},
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use wirespan_common::{EventBuf, KernelLayout, Settings, lost};

/// Filled by the agent at load time from BTF and the tracepoint format files.
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout::zeroed();

/// Filled by the agent at load time from its configuration.
#[unsafe(no_mangle)]
pub static SETTINGS: Settings = Settings::zeroed();

/// Events to userspace: one ring per CPU, each program writing to its own CPU's (index
/// `bpf_get_smp_processor_id()`). One ring shared by every CPU made each record take its lock,
/// its producer position and the header of the record before it from the CPU that wrote last:
/// with nginx and wrk on different CPUs, each exit program took 120-170 ns more than with both
/// on one (docs/BENCHMARKS.md). The agent creates the rings (`capture.ring_mib` split among the
/// online CPUs) and puts them here; the inner definition is only the template the kernel
/// checks them against (its size is not compared). A CPU without a ring counts its records as
/// lost.
#[btf_map]
pub static EVENTS: ArrayOfMaps<RingBuf<u8, 4096>, 1> = ArrayOfMaps::new();

/// tgid -> `pid_filter::TRACE` / `pid_filter::IGNORE`, maintained by the agent.
#[map(name = "PID_FILTER")]
pub static PID_FILTER: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// Per-CPU loss counters, indexed by `lost::*`.
#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost::COUNT, 0);

/// One event under construction per CPU: events are larger than the 512-byte stack.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<EventBuf> = PerCpuArray::with_max_entries(1, 0);

/// When a thread's sending call began: written by the enter program, taken by the exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stamp {
    /// `bpf_ktime_get_ns()` at enter.
    pub enter_ns: u64,
    /// The call's `syscall::*`; `syscall::NONE` once its exit took it.
    pub syscall: u32,
    pub _pad: u32,
}

/// A task-local storage map (`BPF_MAP_TYPE_TASK_STORAGE`), in the BTF form the kernel wants
/// for one: aya-ebpf has no type for it. The value lives with the task: found through the
/// task's own storage list (no hashing), and freed with the task.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The current task's value, created zeroed if `create` and there is none. Only the
    /// current task's program touches it: tracepoint programs do not nest on one CPU, and a
    /// task runs on one CPU at a time.
    #[inline(always)]
    pub fn current(&self, create: bool) -> Option<*mut T> {
        let flags = if create {
            BPF_LOCAL_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // SAFETY: the map pointer is this map's; the task pointer is the BTF-typed current
        // task, valid while the program runs; the value pointer is null (zero-fill on create).
        let value = unsafe {
            bpf_task_storage_get(
                self as *const Self as *mut core::ffi::c_void,
                bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        } as *mut T;
        (!value.is_null()).then_some(value)
    }
}

/// Each thread's last sending call's start (see `Stamp`).
#[btf_map]
pub static STAMPS: TaskStorage<Stamp> = TaskStorage::new();

/// Reads one field of a global the agent wrote at load time.
///
/// The volatile read keeps the compiler from folding the zeroed initial value into the code
/// (the real value only exists in the loaded map), and reading one field where it is used, not
/// the whole struct up front, keeps the others out of registers and off the stack.
macro_rules! fields {
    ($handle:ident, $global:ident, $($field:ident),+ $(,)?) => {
        impl $handle {
            $(
                #[inline(always)]
                pub fn $field(self) -> u32 {
                    // SAFETY: the global is a valid, aligned static; volatile only forbids
                    // constant folding.
                    unsafe { core::ptr::read_volatile(&raw const $global.$field) }
                }
            )+
        }
    };
}

/// The `LAYOUT` global, read a field at a time (`Layout.task_files()`).
#[derive(Clone, Copy)]
pub struct Layout;

fields!(
    Layout,
    LAYOUT,
    valid,
    task_files,
    task_group_leader,
    task_start_time,
    files_fdt,
    fdt_max_fds,
    fdt_fd,
    file_inode,
    file_private_data,
    inode_mode,
    inode_ino,
    socket_type,
    socket_sk,
    sk_protocol,
    sk_daddr,
    sk_v6_daddr,
    inet_sport,
);

/// The `SETTINGS` global, read a field at a time (`Config.capture_bytes()`).
#[derive(Clone, Copy)]
pub struct Config;

fields!(Config, SETTINGS, capture_bytes, filter_mode, wake_bytes);

#[inline(always)]
pub fn count_lost(index: u32) {
    if let Some(counter) = LOST.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and programs do not
        // preempt each other on one CPU for tracepoints.
        unsafe { *counter += 1 };
    }
}

/// tgid -> the start time of the process that made a connection under that pid last (see
/// `sock::first_connect`).
#[map(name = "CONNECTORS")]
pub static CONNECTORS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Sockets in the middle of a large request head: key `struct sock *` + direction, value the
/// bytes of the head still to capture in full (see `MAX_HEAD_CAPTURE`).
#[map(name = "HEADS")]
pub static HEADS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// A TCP socket found behind a descriptor of a process, with what shows it is still the one
/// there: the file and inode pointers and the inode number (`check` catches a value read
/// while another CPU rewrote the entry).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KnownSock {
    pub file: u64,
    pub inode: u64,
    pub sk: u64,
    pub ino: u64,
    pub family: u64,
    pub check: u64,
    /// 1 when a record of a call on this socket was lost since the last one sent (outside
    /// `check`: it is written in place, by the programs only).
    pub lost: u64,
}

impl KnownSock {
    #[inline(always)]
    pub fn sum(&self) -> u64 {
        self.file ^ self.inode.rotate_left(13) ^ self.sk.rotate_left(29) ^ self.ino ^ self.family
    }
}

/// (tgid << 32 | fd) -> the socket found there last. A hit still reads the descriptor's file
/// and its inode number (3 reads instead of 9); a miss, or a descriptor now holding another
/// file, walks again. 16,384 entries (about 1 MiB of kernel memory): a miss only costs the walk.
#[map(name = "SOCKS")]
pub static SOCKS: LruHashMap<u64, KnownSock> = LruHashMap::with_max_entries(16384, 0);

/// Sends one record through this CPU's ring; false when it is full or the CPU has none.
#[inline(always)]
pub fn output(bytes: &[u8], flags: u64) -> bool {
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    match EVENTS.get(cpu) {
        Some(ring) => ring.output_untyped::<[u8]>(bytes, flags).is_ok(),
        None => false,
    }
}
