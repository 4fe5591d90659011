//! The agent's userspace work per span without the kernel or the network: the records the
//! kernel programs write for wrk calling nginx on loopback (client request, server request,
//! server response, client response, over 64 keep-alive connections) are decoded, stitched
//! into spans and encoded as OTLP requests of 1,024 spans, on one thread.
//!
//! `cargo bench -p wirespan --bench pipeline [-- REQUESTS]` prints the thread CPU time per span
//! of each stage, the best of seven rounds. It isolates what the event thread and the export
//! encoding cost from what the saturated machine adds (`cargo xtask bench`), so that a change
//! to either shows in a figure that moves by a few percent between runs, not ten.

use std::{path::PathBuf, sync::Arc, time::Duration};

use wirespan::{
    capture::event::SocketEvent,
    clock::WallClock,
    export::wire,
    trace::stitch::{Span, Stitcher},
};
use wirespan_common::{EventHeader, direction, family, kind};

const CONNECTIONS: u16 = 64;
const SERVER_PORT: u16 = 18081;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18081\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nContent-Type: application/octet-stream\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\nhello from nginx\n";
const WRK: u32 = 1000;
/// Rounds per run; the best is reported (this machine's neighbours only ever add time).
const ROUNDS: usize = 7;
const NGINX: u32 = 2000;

/// One ring record: header and payload, as the kernel lays them out.
fn record(h: &EventHeader, payload: &[u8]) -> Vec<u8> {
    // SAFETY: EventHeader is repr(C) plain data; its bytes are read, not interpreted.
    let head = unsafe {
        std::slice::from_raw_parts(
            (h as *const EventHeader).cast::<u8>(),
            size_of::<EventHeader>(),
        )
    };
    [head, payload].concat()
}

fn header(pid: u32, conn: u64, local: u16, remote: u16, k: u32, dir: u32) -> EventHeader {
    let mut h = EventHeader::zeroed();
    h.conn_id = conn;
    h.pid = pid;
    h.tid = pid;
    h.fd = 10 + (conn as i32 & 0xffff);
    h.family = family::INET;
    h.local_port = local;
    h.remote_port = remote;
    h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    h.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    h.kind = k;
    h.direction = dir;
    let comm: &[u8] = if pid == WRK { b"wrk" } else { b"nginx" };
    h.comm[..comm.len()].copy_from_slice(comm);
    h
}

/// The records of `requests` requests, round-robin over the connections, in the order the
/// ring holds them, after each connection's connect and accept.
fn records(requests: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut ts = 1_000_000u64;
    let mut push = |mut h: EventHeader, payload: &[u8], ts: &mut u64| {
        *ts += 2_500;
        h.ts_ns = *ts;
        h.len = payload.len() as u64;
        h.captured = payload.len() as u32;
        out.push(record(&h, payload));
    };
    let client = |c: u16| (u64::from(c) + 1, 40000 + c);
    let server = |c: u16| (u64::from(c) + 1001, 40000 + c);
    for c in 0..CONNECTIONS {
        let (cid, port) = client(c);
        let (sid, _) = server(c);
        let conn = header(WRK, cid, port, SERVER_PORT, kind::CONNECT, direction::NONE);
        push(conn, b"", &mut ts);
        let acc = header(NGINX, sid, SERVER_PORT, port, kind::ACCEPT, direction::NONE);
        push(acc, b"", &mut ts);
    }
    for r in 0..requests {
        let c = (r % u64::from(CONNECTIONS)) as u16;
        let (cid, port) = client(c);
        let (sid, _) = server(c);
        use direction::{EGRESS, INGRESS};
        let calls = [
            (WRK, cid, port, SERVER_PORT, EGRESS, REQUEST),
            (NGINX, sid, SERVER_PORT, port, INGRESS, REQUEST),
            (NGINX, sid, SERVER_PORT, port, EGRESS, RESPONSE),
            (WRK, cid, port, SERVER_PORT, INGRESS, RESPONSE),
        ];
        for (pid, conn, local, remote, dir, payload) in calls {
            push(
                header(pid, conn, local, remote, kind::DATA, dir),
                payload,
                &mut ts,
            );
        }
    }
    out
}

fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// One round: (ns per span stitching, ns per span encoding, spans).
fn round(records: &[Vec<u8>]) -> (f64, f64, usize) {
    let mut stitcher = Stitcher::with_proc_root(
        WallClock::from_pair(0, 0),
        PathBuf::from("/nonexistent-proc"),
    );
    let resource: Arc<[u8]> = wire::resource(&[]).into();
    let scope = wire::scope();
    let buffers = wire::buffers(1);
    let mut spans: Vec<Span> = Vec::new();
    let (mut stitch, mut encode) = (Duration::ZERO, Duration::ZERO);
    let mut total = 0;
    let mut bytes = 0;
    for chunk in records.chunks(4096) {
        let t0 = thread_cpu();
        for r in chunk {
            let ev = SocketEvent::decode(r).expect("a well-formed record");
            stitcher.event(&ev, &mut spans);
        }
        stitcher.tick(&mut spans);
        wirespan::return_idle_memory_if_due();
        let t1 = thread_cpu();
        while spans.len() >= 1024 {
            let batch: Vec<Span> = spans.drain(..1024).collect();
            let groups = [wire::Group {
                resource: resource.clone(),
                spans: batch.iter().collect(),
            }];
            bytes += wire::request(&groups, &scope, &buffers).grpc().len();
            total += batch.len();
        }
        encode += thread_cpu() - t1;
        stitch += t1 - t0;
    }
    std::hint::black_box(bytes);
    let per = |d: Duration| d.as_nanos() as f64 / total.max(1) as f64;
    (per(stitch), per(encode), total)
}

fn main() {
    // The agent's allocator settings (the purge delay), as `wirespan run` sets them.
    wirespan::configure_allocator();
    wirespan::settle_allocator();
    let requests: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let records = records(requests);
    let rounds: Vec<(f64, f64, usize)> = (0..ROUNDS).map(|_| round(&records)).collect();
    let spans = rounds[0].2;
    assert!(
        spans as u64 >= requests * 2 - 2048,
        "{spans} spans from {requests} requests: the stitcher did not pair the records"
    );
    let best =
        |key: fn(&(f64, f64, usize)) -> f64| rounds.iter().map(key).fold(f64::INFINITY, f64::min);
    println!(
        "pipeline: {requests} requests, {spans} spans per round; CPU per span, best of {ROUNDS}: \
         decode+stitch {:.0} ns, encode {:.0} ns, together {:.0} ns",
        best(|r| r.0),
        best(|r| r.1),
        best(|r| r.0 + r.1),
    );
}
