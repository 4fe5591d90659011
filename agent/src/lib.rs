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
