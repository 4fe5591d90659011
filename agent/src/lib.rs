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
    fn mi_collect(force: bool);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// How long memory the allocator freed stays mapped before it goes back to the system, once
/// the programs are loaded ([`settle_allocator`]).
///
/// Returned at once (0), memory freed at saturation was faulted in again moments later: a
/// tenth of the agent's CPU went to page faults, zeroing pages and the TLB flushes of giving
/// them back (docs/BENCHMARKS.md). The delay only runs out on a later allocation, so an idle
/// agent would keep what a burst took: each thread calls [`return_idle_memory_if_due`] (the
/// event loop on its tick, the runtime's workers when they park).
pub const PURGE_DELAY_MS: i64 = 1000;

/// Sets the allocator's options for start-up; call first in `main`.
///
/// Until the programs are loaded, what is freed goes back at once: reading the kernel's BTF
/// and loading the programs allocate and free tens of MiB in 2-3 s, and kept for the delay
/// that made a start-up peak of 45 MiB (29 MiB given back at once).
pub fn configure_allocator() {
    set_purge_delay(0);
}

/// The allocator's options for the agent's steady work, once the programs are loaded: freed
/// memory is kept for [`PURGE_DELAY_MS`].
pub fn settle_allocator() {
    set_purge_delay(PURGE_DELAY_MS);
}

fn set_purge_delay(ms: i64) {
    // SAFETY: mi_option_set has no preconditions; the option index is checked by a test.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms as std::ffi::c_long) };
}

/// Gives back to the system the memory freed more than [`PURGE_DELAY_MS`] ago (process wide),
/// and this thread's free lists.
pub fn return_idle_memory() {
    // SAFETY: mi_collect has no preconditions; without `force` it purges only what is due.
    unsafe { mi_collect(false) };
}

/// [`return_idle_memory`] if this thread has not called it for a second: for the agent's
/// tick and the runtime's idle workers (each thread's free lists are its own to collect).
pub fn return_idle_memory_if_due() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = std::time::Instant::now();
    let due = LAST
        .get()
        .is_none_or(|last| now.duration_since(last) >= std::time::Duration::from_secs(1));
    if due {
        LAST.set(Some(now));
        return_idle_memory();
    }
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
