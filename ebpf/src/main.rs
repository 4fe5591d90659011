//! wirespan's kernel programs.
//!
//! Syscall tracepoints only (this project's tested kernels have no kprobes and refuse fentry):
//! a sending or connection syscall gets an enter program that records what the call was asked
//! to do, and an exit program that learns how much it really did and reports it; a receiving
//! syscall gets only an exit program, which reads the call's arguments from the thread's saved
//! registers. Everything that is not a TCP socket of a traced process returns at the first
//! check.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod payload;
#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path (there is no way to
    // unwind in the kernel), so a loaded program never gets here.
    unsafe { core::hint::unreachable_unchecked() }
}

/// Host builds (clippy, `cargo check --workspace`) compile this crate too; it has no host code.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
