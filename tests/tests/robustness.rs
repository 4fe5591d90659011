//! Privileged robustness tests: secrets never leave the agent, hostile and malformed traffic
//! against real servers, faults (backend down, a traced process killed, the agent killed,
//! ring buffer overflow) and bounded state. Loopback only.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use wirespan_tests::{
    Proc, SpanAgent, TempDir, bpf_ids_of, bpf_prog_loaded, chain_python, counter, curl, free_port,
    nginx,
    otlp::{Receiver, Span},
    program, python_script, require_privileges, service, summary,
};

/// tests/programs/raw_client.py: sends `bytes`, returns what came back.
fn raw(port: u16, bytes: &[u8], extra: &[&str]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .arg(program("raw_client.py"))
        .args(["--port", &port.to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    wirespan_tests::hex(text.trim()).unwrap()
}

/// Events the kernel lost to a full ring buffer, from the agent's summary line.
fn ring_full(summary: &str) -> u64 {
    summary
        .split("ring buffer full ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ring buffer count in {summary}"))
}

fn all_text(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

const SECRETS: &[&str] = &[
    "SECRET-AUTHORIZATION-11",
    "SECRET-COOKIE-22",
    "SECRET-PROXY-33",
    "SECRET-BODY-44",
    "SECRET-QUERY-55",
    "SECRET-ARGV-66",
    "SECRET-SET-COOKIE-77",
];

#[test]
fn secrets_in_real_traffic_are_never_exported_logged_or_shown() {
    require_privileges!();
    let port = free_port();
    let _server = service(
        "vault",
        port,
        Command::new("python3").arg(program("chain.py")).args([
            "--port",
            &port.to_string(),
            "--token",
            "SECRET-ARGV-66",
        ]),
    )
    .unwrap();
    let send = || {
        curl(&[
            "-H",
            "Authorization: Bearer SECRET-AUTHORIZATION-11",
            "-H",
            "Cookie: sid=SECRET-COOKIE-22",
            "-H",
            "Proxy-Authorization: Basic SECRET-PROXY-33",
            "--data",
            "password=SECRET-BODY-44",
            &format!("http://127.0.0.1:{port}/login?password=SECRET-QUERY-55&user=a"),
        ])
        .unwrap();
    };
    // Over OTLP, with --log-spans and debug logs.
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to_with(&receiver, &[], &[("RUST_LOG", "debug")]).unwrap();
    send();
    let (stdout, stderr) = agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| s.len() >= 2);
    let server: Vec<&Span> = spans.iter().filter(|s| s.service() == "vault").collect();
    assert_eq!(server.len(), 1, "{spans:#?}");
    assert_eq!(
        server[0].attr("url.query"),
        Some("password=REDACTED&user=REDACTED")
    );
    assert!(
        server[0].resource["process.command_line"].contains("--token REDACTED"),
        "{:?}",
        server[0].resource
    );
    // Over the embedded UI's API.
    let ui = format!("127.0.0.1:{}", free_port());
    let agent = SpanAgent::start(&["--ui-address", &ui]).unwrap();
    send();
    std::thread::sleep(Duration::from_millis(800));
    let (_, api) = curl(&[&format!("http://{ui}/api/traces?service=curl&limit=50")]).unwrap();
    let api = String::from_utf8_lossy(&api).into_owned();
    assert!(api.contains("/login"), "the UI has the trace: {api}");
    let (ui_stdout, ui_stderr) = agent.stop().unwrap();
    let outputs = [
        ("OTLP spans", all_text(&spans)),
        ("--log-spans", stdout.join("\n")),
        ("debug log", stderr.join("\n")),
        ("UI API", api),
        ("UI run --log-spans", ui_stdout.join("\n")),
        ("UI run log", ui_stderr.join("\n")),
    ];
    for (name, text) in &outputs {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} leaked in {name}: {text}");
        }
    }
}

#[test]
fn query_values_are_exported_only_with_the_explicit_opt_out() {
    require_privileges!();
    let port = free_port();
    let _server = chain_python("plainq", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to_with(&receiver, &["--keep-query-values"], &[]).unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/q?page=2")]).unwrap();
    agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| s.len() >= 2);
    let s: Vec<&Span> = spans.iter().filter(|s| s.service() == "plainq").collect();
    assert_eq!(s[0].attr("url.query"), Some("page=2"));
}

/// Non-HTTP protocols and hostile bytes: an echo server returns them byte for byte while
/// traced, and no span is made.
#[test]
fn non_http_traffic_is_untouched_and_makes_no_spans() {
    require_privileges!();
    let port = free_port();
    let _echo = python_script("echo", port, "echo_server.py").unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let mut rng = 0x2545f4914f6cdd1du64;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let tls_client_hello: &[u8] = b"\x16\x03\x01\x00\x2f\x01\x00\x00\x2b\x03\x03\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x00\x00\x02\x13\x01\x01\x00";
    let h2_preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let redis: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n*1\r\n$4\r\nPING\r\n";
    let postgres: &[u8] =
        b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00";
    for payload in [&random[..], tls_client_hello, h2_preface, redis, postgres] {
        let back = raw(port, payload, &["--wait", "0.5"]);
        assert_eq!(back, payload, "the traced echo server returned other bytes");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, log) = agent.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let spans = receiver.spans();
    let echo_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service() == "echo" || s.attr("server.port") == Some(&port.to_string()))
        .collect();
    assert!(echo_spans.is_empty(), "false spans: {echo_spans:#?}");
    let s = summary(&log);
    assert!(counter(&s, "calls skipped") >= 10, "{s}");
}

/// Malformed HTTP at nginx: nginx answers (or closes) as it does; the agent makes no span for
/// what it cannot parse, counts it, and keeps working.
#[test]
fn malformed_http_is_counted_and_the_agent_keeps_working() {
    require_privileges!();
    let dir = TempDir::new("malformed").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let mut huge = b"GET /huge HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b"\r\n\r\n");
    let mut many = b"GET /many HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..10_000 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("1 MiB header block", huge, &[]),
        ("10,000 headers", many, &[]),
        ("no version", b"GET /nover\r\n\r\n".to_vec(), &[]),
        ("truncated", b"GET /trunc HTT".to_vec(), &["--close-after-send"]),
        (
            "invalid chunk size",
            b"POST /chunk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            &[],
        ),
        (
            "closed mid-body",
            b"POST /midbody HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly ten b".to_vec(),
            &["--close-after-send"],
        ),
        (
            "bare LF line endings",
            b"GET /barelf HTTP/1.1\nHost: x\n\n".to_vec(),
            &[],
        ),
        (
            "conflicting lengths",
            b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            &[],
        ),
    ];
    for (name, bytes, extra) in &cases {
        let _ = raw(port, bytes, &[&["--wait", "0.5"], *extra].concat());
        eprintln!("sent: {name}");
    }
    // The agent still makes correct spans afterwards.
    curl(&[&format!("http://127.0.0.1:{port}/after")]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (_, log) = agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter()
            .any(|s| s.attr("url.path") == Some("/after") && s.kind == "SERVER")
    });
    let nginx_spans: Vec<&Span> = spans.iter().filter(|s| s.service() == "nginx").collect();
    let paths: Vec<&str> = nginx_spans
        .iter()
        .filter_map(|s| s.attr("url.path"))
        .collect();
    // Heads we could not parse make no span.
    for bad in ["/huge", "/many", "/nover", "/trunc"] {
        assert!(!paths.contains(&bad), "span for {bad}: {nginx_spans:#?}");
    }
    // Parsable heads with broken framing are real requests: if nginx answered, the span says
    // what it answered (never a success it did not send).
    for framing in ["/chunk", "/cl"] {
        for s in nginx_spans
            .iter()
            .filter(|s| s.attr("url.path") == Some(framing))
        {
            assert_ne!(s.attr("http.response.status_code"), Some("200"), "{s:#?}");
        }
    }
    assert!(paths.contains(&"/after"), "{nginx_spans:#?}");
    // Bare LF line endings are tolerated by nginx and by httparse alike: a real exchange, and
    // its span says what nginx answered.
    for s in nginx_spans
        .iter()
        .filter(|s| s.attr("url.path") == Some("/barelf"))
    {
        assert_eq!(s.attr("http.response.status_code"), Some("200"), "{s:#?}");
    }
    // nginx's `return 200` answers before reading a body, so the request closed mid-body got a
    // real 200: its span says so (a request cut off before any answer is an error span, see
    // traced_server_killed_mid_request_ends_as_an_error_span).
    let s = summary(&log);
    assert!(counter(&s, "oversized") >= 1, "{s}");
    assert!(counter(&s, "malformed") >= 3, "{s}");
}

#[test]
fn backend_down_at_start_and_for_60_seconds_mid_run() {
    require_privileges!();
    let port = free_port();
    let _server = chain_python("resilient", port, None).unwrap();
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let endpoint = format!("http://{grpc}");
    let agent = SpanAgent::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--otlp-timeout-ms",
            "500",
            "--stats-every",
            "1",
        ],
        &[],
    )
    .unwrap();
    // Nothing listens yet.
    curl(&[&format!("http://127.0.0.1:{port}/before")]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let receiver = Receiver::start_on(grpc).unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/up")]).unwrap();
    receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().any(|s| s.attr("url.path") == Some("/up"))
    });
    // Down for 60 s with traffic throughout.
    drop(receiver);
    for i in 0..30 {
        curl(&[&format!("http://127.0.0.1:{port}/down/{i}")]).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    let receiver = Receiver::start_on(grpc).unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/back")]).unwrap();
    let spans = receiver.wait_for(Duration::from_secs(15), |s| {
        s.iter().any(|s| s.attr("url.path") == Some("/back"))
    });
    assert!(
        spans.iter().any(|s| s.attr("url.path") == Some("/back")),
        "export resumed: {spans:#?}"
    );
    let (_, log) = agent.stop().unwrap();
    let s = summary(&log);
    assert!(counter(&s, "failed to export") >= 2, "{s}");
}

#[test]
fn traced_server_killed_mid_request_ends_as_an_error_span() {
    require_privileges!();
    let port = free_port();
    let server = chain_python("doomed", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let client = std::thread::spawn(move || {
        let _ = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "20",
                &format!("http://127.0.0.1:{port}/slow"),
            ])
            .status();
    });
    std::thread::sleep(Duration::from_secs(1));
    server.signal(libc::SIGKILL);
    client.join().unwrap();
    // Exits are noticed within a second.
    std::thread::sleep(Duration::from_secs(2));
    let (_, log) = agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| s.len() >= 2);
    let server_spans: Vec<&Span> = spans.iter().filter(|s| s.service() == "doomed").collect();
    assert_eq!(server_spans.len(), 1, "{spans:#?}");
    assert!(server_spans[0].error);
    assert_eq!(
        server_spans[0].attr("error.type"),
        Some("connection_closed")
    );
    let client_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service() == "curl" && s.attr("url.path") == Some("/slow"))
        .collect();
    assert_eq!(client_spans.len(), 1);
    assert!(client_spans[0].error);
    assert!(counter(&summary(&log), "cut off by their process exiting") >= 1);
}

#[test]
fn sigkill_leaves_no_programs_and_a_restart_picks_up_open_connections() {
    require_privileges!();
    let port = free_port();
    let _server = chain_python("survivor", port, None).unwrap();
    let agent = SpanAgent::start(&["--no-export"]).unwrap();
    let ours = bpf_ids_of(agent.pid(), "prog_id");
    // Every program: 13 syscalls, the 5 sending ones at enter and exit.
    assert_eq!(ours.len(), 18, "{ours:?} programs attached");
    // A keep-alive connection opened while the first agent runs, idle across its death.
    let (mut client, connected) = wirespan_tests::PyClient::paused_after_one(port).unwrap();
    let killed = agent.pid();
    // SAFETY: SIGKILL to the agent we started, by its PID.
    unsafe { libc::kill(killed as i32, libc::SIGKILL) };
    // The kernel frees a dead process's programs when their last reference goes (deferred).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let loaded = || -> Vec<u64> {
        ours.iter()
            .copied()
            .filter(|&id| bpf_prog_loaded(id))
            .collect()
    };
    while !loaded().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(loaded(), Vec::<u64>::new(), "programs left after SIGKILL");
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let again = bpf_ids_of(agent.pid(), "prog_id");
    assert_eq!(again.len(), ours.len(), "the same programs, once");
    client.resume().unwrap();
    client.report(connected).unwrap();
    agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().any(|s| s.service() == "survivor")
    });
    let s: Vec<&Span> = spans.iter().filter(|s| s.service() == "survivor").collect();
    assert_eq!(s.len(), 1, "{spans:#?}");
    assert_eq!(s[0].attr("url.query"), Some("n=REDACTED"));
    assert!(
        again.iter().all(|&id| !bpf_prog_loaded(id)),
        "programs left after stop"
    );
}

#[test]
fn ring_buffer_overflow_is_counted_and_the_agent_recovers() {
    require_privileges!();
    let dir = TempDir::new("overflow").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start_counting().unwrap();
    let agent = SpanAgent::to_with(&receiver, &["--ring-mib", "1"], &[]).unwrap();
    let wrk = Command::new("wrk")
        .args(["-t2", "-c64", "-d4s"])
        .arg(format!("http://127.0.0.1:{port}/load"))
        .stdout(Stdio::null())
        .status()
        .expect("wrk (Debian package wrk, installed by cargo xtask setup)");
    assert!(wrk.success());
    std::thread::sleep(Duration::from_secs(1));
    let before = receiver.count();
    curl(&[&format!("http://127.0.0.1:{port}/after")]).unwrap();
    let (_, log) = agent.stop().unwrap();
    let after = receiver.count();
    let s = summary(&log);
    let lost = ring_full(&s);
    assert!(lost > 0, "{s}");
    // After the flood, a single request still makes its two spans.
    assert!(after >= before + 2, "{before} -> {after}: {s}");
}

/// Records lost to a full ring must never pair a request with another one's response. The
/// server answers GET /N with status 200 + N % 4 on one keep-alive connection, and the agent
/// is stopped (SIGSTOP) ten times for 1.2 s while the client keeps sending, so that its 1 MiB
/// ring fills and empties again many times. Before the kernel marked the first record after a loss, a
/// request whose response record was lost stayed first in its connection's queue, and every
/// later response on that connection ended the request before its own: each span after the
/// loss carried the next request's status and end.
#[test]
fn records_lost_in_the_kernel_never_pair_a_request_with_another_ones_response() {
    require_privileges!();
    let port = free_port();
    let _server = python_script("numbered", port, "numbered.py").unwrap();
    let agent = SpanAgent::start(&[
        "--no-export",
        "--ring-mib",
        "1",
        "--port",
        &port.to_string(),
        "--stats-every",
        "1",
    ])
    .unwrap();
    let client = Command::new("python3")
        .arg(program("numbered.py"))
        .args([&port.to_string(), "17"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Each pause ends a run of records with a request or a response, at random: a pause
    // that ends with a request whose response is lost put the old agent out of step (with
    // six pauses in 4 runs of 5; with ten in 3 of 3, 6,747-20,643 spans wrong).
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..10 {
        agent.signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1200));
        agent.signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let sent = String::from_utf8_lossy(&out.stdout).to_string();
    std::thread::sleep(Duration::from_secs(1));
    let (lines, log) = agent.stop().unwrap();
    let s = summary(&log);
    assert!(ring_full(&s) > 0, "the ring never filled: {s}");
    // `span SERVICE SERVER NAME... PATH STATUS DURATIONus [ERROR] trace=...`
    let (mut right, mut wrong) = (0, Vec::new());
    for line in &lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(mut at) = f.iter().position(|t| t.starts_with("trace=")) else {
            continue;
        };
        if f[at - 1] == "ERROR" {
            at -= 1;
        }
        if f[0] != "span" || f[2] != "SERVER" || at < 4 {
            continue;
        }
        let (Some(n), Ok(status)) = (
            f[at - 3]
                .strip_prefix('/')
                .and_then(|n| n.parse::<u64>().ok()),
            f[at - 2].parse::<u64>(),
        ) else {
            continue;
        };
        if status == 200 + n % 4 {
            right += 1;
        } else {
            wrong.push(line.clone());
        }
    }
    assert!(
        wrong.is_empty(),
        "{} spans of {} with another request's response (sent: {sent}); the first: {:#?}",
        wrong.len(),
        right + wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // The connection was read again after its losses, and made spans after them.
    let resynced = log
        .iter()
        .rev()
        .find_map(|l| l.split("resynced_after_loss=").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(resynced > 0, "{log:#?}");
    assert!(right > 1000, "{right} spans (sent: {sent}): {s}");
}

/// An agent that reads slower than the kernel writes (here: in the idle scheduling class
/// under a saturating load) never finds its ring empty. It must still stop promptly on
/// SIGTERM, the way a node agent is stopped, with its closing summary. The agent used to look
/// at signals only when its ring was empty: with a 64 MiB ring to catch up on, it had not
/// exited 10 s after SIGTERM (the ring makes the test decisive; with the default 4 MiB the old
/// agent happened to catch up within about 5 s).
#[test]
fn the_agent_stops_promptly_while_it_cannot_keep_up() {
    require_privileges!();
    let dir = TempDir::new("behind").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start_counting().unwrap();
    let agent = SpanAgent::starved_to(&receiver, &["--ring-mib", "64"]).unwrap();
    let mut wrk = Proc::spawn(
        "wrk",
        Command::new("wrk")
            .args(["-t2", "-c64", "-d30s"])
            .arg(format!("http://127.0.0.1:{port}/load"))
            .stdout(Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let (took, _, log) = agent
        .stop_within(libc::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert!(
        wrk.child.try_wait().unwrap().is_none(),
        "the load ended before the agent did"
    );
    let s = summary(&log);
    // It was behind: the ring overflowed (counted), and spans were still exported.
    let lost = ring_full(&s);
    assert!(lost > 0, "the agent kept up, so this shows nothing: {s}");
    assert!(counter(&s, "exported") > 0, "{s}");
    eprintln!("exited {took:?} after SIGTERM");
    // The 5 s it gives itself to send what it read, and a margin.
    assert!(took < Duration::from_secs(7), "took {took:?} to stop");
}

#[test]
fn connection_table_is_bounded_and_evictions_are_counted() {
    require_privileges!();
    let port = free_port();
    let _echo: Proc = python_script("echo", port, "echo_server.py").unwrap();
    let agent = SpanAgent::start(&["--no-export", "--max-connections", "100"]).unwrap();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = rss(agent.pid());
    // 500 connections held open at once (both ends are traced: 1,000 sockets).
    let conns: Vec<std::net::TcpStream> = (0..500)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::io::Write::write_all(&mut c, b"x").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = rss(agent.pid());
    drop(conns);
    let (_, log) = agent.stop().unwrap();
    let s = summary(&log);
    assert!(counter(&s, "connections not tracked") >= 800, "{s}");
    // 1,000 sockets beyond the limit cost no per-connection state.
    assert!(
        during < before + 8 * 1024,
        "RSS grew from {before} KiB to {during} KiB"
    );
}

#[test]
fn a_response_nobody_asked_for_makes_no_span() {
    require_privileges!();
    let port = free_port();
    let _banner = python_script("banner", port, "banner_server.py").unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    for _ in 0..3 {
        let got = raw(port, b"", &["--wait", "0.5"]);
        assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{got:?}");
    }
    // Positive control: a real exchange during the same run is a span.
    let real = free_port();
    let _real = chain_python("realone", real, None).unwrap();
    curl(&[&format!("http://127.0.0.1:{real}/real")]).unwrap();
    let (_, log) = agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().any(|s| s.service() == "realone")
    });
    assert!(
        spans.iter().any(|s| s.service() == "realone"),
        "the agent saw nothing: {spans:#?}"
    );
    let p = port.to_string();
    let false_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.service() == "banner"
                || s.attr("server.port") == Some(p.as_str())
                || s.attr("network.peer.port") == Some(p.as_str())
        })
        .collect();
    assert!(false_spans.is_empty(), "{false_spans:#?}");
    summary(&log);
}
