//! wirespan: distributed tracing without code changes.
//!
//! Follow one request through the modules in order: the kernel programs in `ebpf/` report
//! socket syscalls; [`capture`] loads them and decodes their events; [`clock`] puts kernel
//! timestamps on the wall clock; [`http`] frames HTTP/1.x messages and reads their trace
//! context; [`trace`] turns exchanges into linked spans; [`export`] sends them over OTLP or keeps
//! them for the embedded Jaeger UI.

pub mod capture;
pub mod clock;
pub mod config;
pub mod export;
pub mod http;
pub mod identity;
pub mod k8s;
pub mod ops;
pub mod print;
pub mod sampling;
pub mod select;
pub mod trace;

/// mimalloc: glibc's malloc took a third of the agent's CPU at saturation (lock contention
/// between the event thread and the export thread, consolidation on free); see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    // mimalloc's (the agent's allocator, linked by the binary).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Memory the allocator frees goes back to the system at once instead of after a delay that
/// only runs out on a later allocation: without this an idle agent kept the ~40 MiB that
/// loading the programs took (BTF) for as long as it ran, and what a burst took after it. No
/// slower at saturation (docs/BENCHMARKS.md).
pub fn return_freed_memory_at_once() {
    // SAFETY: mi_option_set has no preconditions; the option index is checked by a test.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_the_option_we_set() {
        // mimalloc v3's default purge_delay is 1000 (ms, options.c); no neighbouring option's
        // default is 1000.
        // SAFETY: mi_option_get has no preconditions.
        let value = unsafe { super::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000);
    }
}
