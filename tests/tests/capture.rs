//! Privileged end-to-end tests of the capture layer on the real kernel: real servers (Python,
//! nginx, Go), real clients (curl, a Python client), loopback only.

use std::net::SocketAddr;

use wirespan_tests::{
    Agent, Event, PyClient, TempDir, curl, free_port, go_server, nginx, python_server,
    require_privileges, stream,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The single connection `pid` has in `events` to or from `port`.
fn conn_of(events: &[Event], pid: u32, port: u16) -> u64 {
    let mut ids: Vec<u64> = events
        .iter()
        .filter(|e| e.pid == pid && (e.local.port() == port || e.remote.port() == port))
        .map(|e| e.conn_id)
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 1, "pid {pid} port {port}: connections {ids:?}");
    ids[0]
}

#[test]
fn python_server_and_client_exact_bytes_both_ends() {
    require_privileges!();
    let port = free_port();
    let server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let client = PyClient::start(&["--port", &port.to_string(), "--path", "/hello"]).unwrap();
    let report = client.finish().unwrap();
    let events = agent.stop().unwrap();

    let client_ep = addr(&format!("127.0.0.1:{}", report.local_port));
    let server_ep = addr(&format!("127.0.0.1:{port}"));

    // Client side: its own pid and fd, its local port, both directions, exact bytes.
    let cconn = conn_of(&events, report.pid, port);
    let connect: Vec<_> = events
        .iter()
        .filter(|e| e.pid == report.pid && e.kind == "connect")
        .collect();
    assert_eq!(connect.len(), 1, "{connect:?}");
    for e in events
        .iter()
        .filter(|e| e.conn_id == cconn && e.pid == report.pid)
    {
        assert_eq!(e.fd, report.fd, "{e:?}");
        assert_eq!((e.local, e.remote), (client_ep, server_ep), "{e:?}");
    }
    assert_eq!(stream(&events, report.pid, cconn, "egress"), report.sent[0]);
    assert_eq!(
        stream(&events, report.pid, cconn, "ingress"),
        report.received[0]
    );

    // Server side: the mirrored endpoints; it read exactly what the client sent and wrote
    // exactly what the client received.
    let spid = server.pid();
    let sconn = conn_of(&events, spid, report.local_port);
    assert_ne!(sconn, cconn, "each end has its own socket");
    let accept: Vec<_> = events
        .iter()
        .filter(|e| e.pid == spid && e.kind == "accept")
        .collect();
    assert_eq!(accept.len(), 1, "{accept:?}");
    for e in events.iter().filter(|e| e.conn_id == sconn) {
        assert_eq!(e.pid, spid);
        assert_eq!((e.local, e.remote), (server_ep, client_ep), "{e:?}");
    }
    assert_eq!(stream(&events, spid, sconn, "ingress"), report.sent[0]);
    assert_eq!(stream(&events, spid, sconn, "egress"), report.received[0]);
    assert!(report.received[0].ends_with(b"hello from python\n"));
    // Both sides closed their descriptor.
    assert!(
        events
            .iter()
            .any(|e| e.conn_id == cconn && e.kind == "close")
    );
}

#[test]
fn writev_request_is_captured_whole() {
    writev_is_captured_whole("writev");
}

/// A writev of a single entry (the whole request in one buffer).
#[test]
fn writev_of_one_buffer_is_captured_whole() {
    writev_is_captured_whole("writev1");
}

fn writev_is_captured_whole(mode: &str) {
    require_privileges!();
    let dir = TempDir::new("writev").unwrap();
    let port = free_port();
    let server = nginx(port, &dir.0).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let client = PyClient::start(&["--port", &port.to_string(), "--mode", mode]).unwrap();
    let report = client.finish().unwrap();
    let events = agent.stop().unwrap();

    let cconn = conn_of(&events, report.pid, port);
    let sends: Vec<_> = events
        .iter()
        .filter(|e| e.conn_id == cconn && e.kind == "egress")
        .collect();
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].syscall, "writev");
    assert_eq!(sends[0].data, report.sent[0]);
    assert_eq!(sends[0].len, report.sent[0].len() as u64);
    let sconn = conn_of(&events, server.pid(), report.local_port);
    assert_eq!(
        stream(&events, server.pid(), sconn, "ingress"),
        report.sent[0]
    );
    assert_eq!(
        stream(&events, server.pid(), sconn, "egress"),
        report.received[0]
    );
    assert!(report.received[0].ends_with(b"hello from nginx\n"));
}

#[test]
fn response_larger_than_prefix_keeps_true_length_and_prefix() {
    require_privileges!();
    let port = free_port();
    let server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let client = PyClient::start(&["--port", &port.to_string(), "--path", "/big"]).unwrap();
    let report = client.finish().unwrap();
    let events = agent.stop().unwrap();

    let response = &report.received[0];
    assert!(response.len() > 100_000);
    let sconn = conn_of(&events, server.pid(), report.local_port);
    let writes: Vec<&Event> = events
        .iter()
        .filter(|e| e.conn_id == sconn && e.kind == "egress")
        .collect();
    // Every byte is accounted for by true lengths, and each call's prefix is the real data.
    let total: u64 = writes.iter().map(|e| e.len).sum();
    assert_eq!(total, response.len() as u64);
    let mut offset = 0usize;
    let mut saw_truncated = false;
    for w in &writes {
        assert_eq!(w.data.len() as u64, w.len.min(4096), "{w:?}");
        assert_eq!(&response[offset..offset + w.data.len()], &w.data[..]);
        saw_truncated |= w.len > 4096;
        offset += w.len as usize;
    }
    assert!(
        saw_truncated,
        "one call larger than the 4 KiB prefix: {writes:?}"
    );
}

#[test]
fn capture_bytes_option_changes_the_prefix() {
    require_privileges!();
    let port = free_port();
    let server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&["--capture-bytes", "8192"]).unwrap();
    let client = PyClient::start(&["--port", &port.to_string(), "--path", "/big"]).unwrap();
    let report = client.finish().unwrap();
    let events = agent.stop().unwrap();
    let sconn = conn_of(&events, server.pid(), report.local_port);
    let big = events
        .iter()
        .find(|e| e.conn_id == sconn && e.kind == "egress" && e.len > 8192)
        .expect("a write larger than 8 KiB");
    assert_eq!(big.captured, 8192);
}

#[test]
fn keep_alive_connection_carries_three_requests() {
    require_privileges!();
    let dir = TempDir::new("keepalive").unwrap();
    let port = free_port();
    let server = nginx(port, &dir.0).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("http://127.0.0.1:{port}/r{i}"))
        .collect();
    let (curl_pid, body) = curl(&urls.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let events = agent.stop().unwrap();
    assert_eq!(body, b"hello from nginx\n".repeat(3));

    let spid = server.pid();
    let accepts = events
        .iter()
        .filter(|e| e.pid == spid && e.kind == "accept")
        .count();
    assert_eq!(accepts, 1, "one connection for three requests");
    let connects: Vec<_> = events
        .iter()
        .filter(|e| e.pid == curl_pid && e.kind == "connect")
        .collect();
    assert_eq!(connects.len(), 1);
    let client_port = connects[0].local.port();
    let sconn = conn_of(&events, spid, client_port);
    let requests = stream(&events, spid, sconn, "ingress");
    let text = String::from_utf8_lossy(&requests);
    for i in 1..=3 {
        assert!(text.contains(&format!("GET /r{i} HTTP/1.1\r\n")), "{text}");
    }
    assert_eq!(text.matches("GET ").count(), 3);
    let cconn = connects[0].conn_id;
    assert_eq!(stream(&events, curl_pid, cconn, "egress"), requests);
    assert_eq!(
        stream(&events, curl_pid, cconn, "ingress"),
        stream(&events, spid, sconn, "egress")
    );
}

/// The agent maps its ring's data once (the kernel's second mapping of it would double what
/// the ring takes of the agent's memory), so a record that runs past the ring's end is put
/// together from its two parts. A thousand requests through a 1 MiB ring wrap it six times,
/// with records of a few sizes straddling its end (with the second part of a wrapped record
/// zeroed, this test fails): both directions at both ends are still exactly the bytes sent
/// and received.
#[test]
fn records_that_wrap_around_the_ring_arrive_whole() {
    require_privileges!();
    let dir = TempDir::new("wrap").unwrap();
    let port = free_port();
    let server = nginx(port, &dir.0).unwrap();
    let agent = Agent::start(&["--ring-mib", "1"]).unwrap();
    // Requests of 3 KiB (captured whole) on one connection: 6 MiB of records, six passes.
    // Paced (1.5 s in all) so that the agent, printing every byte in hex, keeps up: a record
    // lost would leave nothing to compare.
    let path = format!("/{}", "w".repeat(3000));
    let client = PyClient::start(&[
        "--port",
        &port.to_string(),
        "--path",
        &path,
        "--requests",
        "1000",
        "--interval-ms",
        "1",
    ])
    .unwrap();
    let report = client.finish().unwrap();
    let (events, log) = agent.stop_with_log().unwrap();
    let lost = log.iter().find(|l| l.contains("lost in kernel")).cloned();
    assert!(
        lost.as_deref()
            .is_some_and(|l| l.contains("ring buffer full 0,")),
        "records lost, the streams cannot be compared: {lost:?}"
    );
    let ring_bytes: u64 = events.iter().map(|e| 112 + e.captured).sum();
    assert!(ring_bytes > 5 << 20, "only {ring_bytes} bytes of records");

    let sent = report.sent.concat();
    let received = report.received.concat();
    assert_eq!(report.sent.len(), 1000);
    let cconn = conn_of(&events, report.pid, port);
    let sconn = conn_of(&events, server.pid(), report.local_port);
    // Compared whole, not with assert_eq: the streams are megabytes.
    assert!(stream(&events, report.pid, cconn, "egress") == sent);
    assert!(stream(&events, server.pid(), sconn, "ingress") == sent);
    assert!(stream(&events, server.pid(), sconn, "egress") == received);
    assert!(stream(&events, report.pid, cconn, "ingress") == received);
}

#[test]
fn ipv6_connection_has_ipv6_endpoints() {
    require_privileges!();
    let dir = TempDir::new("ipv6").unwrap();
    let port = free_port();
    let server = nginx(port, &dir.0).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let (curl_pid, body) = curl(&["-g", &format!("http://[::1]:{port}/six")]).unwrap();
    let events = agent.stop().unwrap();
    assert_eq!(body, b"hello from nginx\n");

    let server_ep = addr(&format!("[::1]:{port}"));
    let c: Vec<_> = events
        .iter()
        .filter(|e| e.pid == curl_pid && e.remote == server_ep)
        .collect();
    assert!(
        c.iter()
            .any(|e| e.kind == "egress" && e.data.starts_with(b"GET /six HTTP/1.1\r\n"))
    );
    let client_ep = c[0].local;
    assert!(client_ep.is_ipv6());
    let s: Vec<_> = events
        .iter()
        .filter(|e| e.pid == server.pid() && e.remote == client_ep)
        .collect();
    assert!(s.iter().all(|e| e.local == server_ep));
    assert!(
        s.iter()
            .any(|e| e.kind == "ingress" && e.data.starts_with(b"GET /six HTTP/1.1\r\n"))
    );
    assert!(
        s.iter()
            .any(|e| e.kind == "egress" && e.data.ends_with(b"hello from nginx\n"))
    );
}

#[test]
fn connection_opened_before_the_agent_started() {
    require_privileges!();
    let port = free_port();
    let server = python_server("127.0.0.1", port).unwrap();
    let (mut client, connected) = PyClient::paused_after_one(port).unwrap();
    // The connection exists and has carried one request; only now does capture start.
    let agent = Agent::start(&[]).unwrap();
    client.resume().unwrap();
    let report = client.report(connected).unwrap();
    let events = agent.stop().unwrap();

    let client_ep = addr(&format!("127.0.0.1:{}", report.local_port));
    let server_ep = addr(&format!("127.0.0.1:{port}"));
    let cconn = conn_of(&events, report.pid, port);
    assert!(
        !events
            .iter()
            .any(|e| e.conn_id == cconn && e.kind == "connect"),
        "the connect happened before capture"
    );
    assert_eq!(stream(&events, report.pid, cconn, "egress"), report.sent[1]);
    assert_eq!(
        stream(&events, report.pid, cconn, "ingress"),
        report.received[1]
    );
    for e in events.iter().filter(|e| e.conn_id == cconn && e.is_data()) {
        assert_eq!((e.local, e.remote, e.fd), (client_ep, server_ep, report.fd));
    }
    let sconn = conn_of(&events, server.pid(), report.local_port);
    assert_eq!(
        stream(&events, server.pid(), sconn, "ingress"),
        report.sent[1]
    );
    for e in events.iter().filter(|e| e.conn_id == sconn && e.is_data()) {
        assert_eq!((e.local, e.remote), (server_ep, client_ep));
    }
}

#[test]
fn go_server_driven_by_curl() {
    require_privileges!();
    let dir = TempDir::new("go").unwrap();
    let port = free_port();
    let server = go_server(port, &dir.0).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let (curl_pid, body) = curl(&[&format!("http://127.0.0.1:{port}/hello")]).unwrap();
    let events = agent.stop().unwrap();
    assert_eq!(body, b"hello from go\n");

    let connect = events
        .iter()
        .find(|e| e.pid == curl_pid && e.kind == "connect")
        .expect("curl's connect");
    let client_ep = connect.local;
    let cconn = connect.conn_id;
    let sconn = conn_of(&events, server.pid(), client_ep.port());
    let request = stream(&events, curl_pid, cconn, "egress");
    assert!(request.starts_with(b"GET /hello HTTP/1.1\r\n"));
    assert_eq!(stream(&events, server.pid(), sconn, "ingress"), request);
    let response = stream(&events, server.pid(), sconn, "egress");
    assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(response.ends_with(b"hello from go\n"));
    assert_eq!(stream(&events, curl_pid, cconn, "ingress"), response);
    assert!(
        events
            .iter()
            .any(|e| e.pid == server.pid() && e.kind == "accept" && e.conn_id == sconn)
    );
}

#[test]
fn file_pipe_udp_and_unix_socket_io_produce_no_events() {
    require_privileges!();
    let port = free_port();
    let _server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let out = std::process::Command::new("python3")
        .arg(wirespan_tests::program("noise.py"))
        .arg(port.to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let events = agent.stop().unwrap();
    let mine: Vec<_> = events.iter().filter(|e| e.pid == pid).collect();
    // The positive control: its one TCP connection was seen...
    assert!(
        mine.iter()
            .any(|e| e.kind == "egress" && e.data.starts_with(b"GET /hello"))
    );
    // ...and nothing else was.
    for e in &mine {
        assert_eq!(e.remote.port(), port, "only the TCP connection: {e:?}");
        assert!(!String::from_utf8_lossy(&e.data).contains("/file"));
        assert!(!String::from_utf8_lossy(&e.data).contains("/pipe"));
        assert!(!String::from_utf8_lossy(&e.data).contains("/udp"));
        assert!(!String::from_utf8_lossy(&e.data).contains("/unix"));
    }
}

/// Voluntary context switches of the main thread of process `pid` (the agent's, which reads
/// the ring): how often it went to sleep and was woken.
fn wakeups(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .expect("the agent's main thread")
}

/// A process's first connect wakes the agent at once (it reads the new client's /proc entry
/// at its first event); its later ones wait for the agent's next read. A client opening a
/// connection per request, 200 of them in 2 s, woke the agent's reading thread at each: 200
/// wake-ups or more, where its 50 ms reads alone make about 40.
#[test]
fn a_client_connecting_per_request_wakes_the_agent_at_its_first_connect_only() {
    require_privileges!();
    let port = free_port();
    let _server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let before = wakeups(agent.pid());
    let out = std::process::Command::new("python3")
        .arg(wirespan_tests::program("connect_per_request.py"))
        .args([&port.to_string(), "200", "100"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let woken = wakeups(agent.pid()) - before;
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let events = agent.stop().unwrap();
    // Every connection was seen, with its request.
    let connects = events
        .iter()
        .filter(|e| e.pid == pid && e.kind == "connect")
        .count();
    let requests = events
        .iter()
        .filter(|e| e.pid == pid && e.kind == "egress" && e.data.starts_with(b"GET /"))
        .count();
    assert_eq!((connects, requests), (200, 200));
    assert!(
        woken < 120,
        "the agent was woken {woken} times for 200 connects"
    );
}

#[test]
fn pid_option_traces_only_that_process_and_never_wirespan_itself() {
    require_privileges!();
    let port = free_port();
    let server = python_server("127.0.0.1", port).unwrap();
    let agent = Agent::start(&["--pid", &server.pid().to_string()]).unwrap();
    let agent_pid = agent.pid();
    let (_curl_pid, body) = curl(&[&format!("http://127.0.0.1:{port}/hello")]).unwrap();
    let events = agent.stop().unwrap();
    assert_eq!(body, b"hello from python\n");
    assert!(
        events
            .iter()
            .any(|e| e.pid == server.pid() && e.kind == "ingress")
    );
    assert!(
        events.iter().all(|e| e.pid == server.pid()),
        "only the server"
    );
    assert!(events.iter().all(|e| e.pid != agent_pid));
}

/// A thread already blocked in send on a TCP connection when the agent starts (its enter was
/// never seen) has its call reported when it returns, with its length and bytes, and the
/// kernel's aya-log diagnostic saying so reaches the agent's log.
#[test]
fn a_send_blocked_before_start_is_reported_when_it_returns() {
    require_privileges!();
    use std::io::{BufRead, BufReader, Write};
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(wirespan_tests::program("blocked_tcp_send.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut proc = wirespan_tests::Proc::spawn("blocked_tcp_send.py", &mut cmd).unwrap();
    let mut out = BufReader::new(proc.child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // Let the main thread reach its blocking send.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let agent = Agent::start_with_log_level(&["--pid", &proc.pid().to_string()], "debug").unwrap();
    let mut stdin = proc.child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "sent 65536");
    let (events, log) = agent.stop_with_log().unwrap();
    let sends: Vec<_> = events
        .iter()
        .filter(|e| e.pid == proc.pid() && e.kind == "egress")
        .collect();
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].len, 65536);
    assert!(
        sends[0].data.starts_with(b"BLOCKED-SEND yyy"),
        "{:?}",
        sends[0]
    );
    assert!(
        log.iter().any(|l| l.contains("was already sending on fd")),
        "no kernel diagnostic in the agent's log: {log:?}"
    );
}

/// The kernel programs remember which socket a process's descriptor held. A descriptor that
/// `dup2` points at another connection (no close of that number is ever seen) must be reported
/// as that other connection from its next call on, with its own id and endpoints.
#[test]
fn a_descriptor_replaced_by_dup2_reports_its_new_connection() {
    require_privileges!();
    let dir = TempDir::new("dup2").unwrap();
    let port = free_port();
    let _server = nginx(port, &dir.0).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let script = r#"
import os, socket, sys
port = int(sys.argv[1])
a = socket.create_connection(("127.0.0.1", port))
b = socket.create_connection(("127.0.0.1", port))
fd = a.fileno()
ports = (a.getsockname()[1], b.getsockname()[1])
def get(path):
    os.write(fd, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"hello from nginx\n" not in data:
        data += os.read(fd, 4096)
get("/first")
os.dup2(b.fileno(), fd)
get("/second")
print(os.getpid(), ports[0], ports[1])
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<u32> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (pid, a_port, b_port) = (f[0], f[1] as u16, f[2] as u16);
    let events = agent.stop().unwrap();
    let sent = |path: &str| -> Vec<&Event> {
        let line = format!("GET {path} HTTP/1.1");
        events
            .iter()
            .filter(|e| e.pid == pid && e.kind == "egress")
            .filter(|e| String::from_utf8_lossy(&e.data).contains(&line))
            .collect()
    };
    let connect = |local: u16| -> u64 {
        events
            .iter()
            .find(|e| e.pid == pid && e.kind == "connect" && e.local.port() == local)
            .map(|e| e.conn_id)
            .unwrap_or_else(|| panic!("no connect from port {local}"))
    };
    let (first, second) = (sent("/first"), sent("/second"));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(first[0].fd, second[0].fd, "the same descriptor number");
    assert_eq!(first[0].local.port(), a_port);
    assert_eq!(first[0].conn_id, connect(a_port));
    assert_eq!(
        second[0].local.port(),
        b_port,
        "the new connection's endpoints"
    );
    assert_eq!(
        second[0].conn_id,
        connect(b_port),
        "the new connection's id"
    );
}
