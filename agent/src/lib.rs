//! wirespan: distributed tracing without code changes.
//!
//! Follow one request through the modules in order: the kernel programs in `ebpf/` report
//! socket syscalls; [`capture`] loads them and decodes their events; [`clock`] puts kernel
//! timestamps on the wall clock.

pub mod capture;
pub mod clock;
pub mod print;
