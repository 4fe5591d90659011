//! Privileged end-to-end tests of wirespan as a node agent: process selection, sampling, the
//! metrics and health endpoints, SIGTERM, and the start-up capability check. Real servers,
//! the real kernel, a real OTLP receiver; loopback only.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use wirespan_tests::{
    Proc, SpanAgent, chain_node, chain_python, counter, curl, free_port, load_client,
    otlp::{Receiver, Span},
    require_privileges, summary, wirespan_bin,
};

/// Starts the agent exporting to `receiver` with extra flags.
fn agent(receiver: &Receiver, extra: &[&str]) -> SpanAgent {
    SpanAgent::to_with(receiver, extra, &[]).unwrap()
}

fn server_services(spans: &[Span]) -> Vec<String> {
    let mut s: Vec<String> = spans
        .iter()
        .filter(|s| s.kind == "SERVER")
        .map(|s| s.service().to_string())
        .collect();
    s.sort();
    s
}

/// Sends one curl to each port with the agent running with `flags`; returns the spans.
fn traced_with(flags: &[&str], ports: &[u16], expect: usize) -> Vec<Span> {
    let receiver = Receiver::start().unwrap();
    let agent = agent(&receiver, flags);
    for p in ports {
        curl(&[&format!("http://127.0.0.1:{p}/")]).unwrap();
    }
    agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(5), |s| s.len() >= expect);
    // Nothing else arrives late.
    std::thread::sleep(Duration::from_millis(300));
    let all = receiver.spans();
    assert_eq!(all.len(), spans.len(), "late spans: {all:#?}");
    all
}

#[test]
fn selection_by_pid_exe_and_port_includes_and_excludes_exactly() {
    require_privileges!();
    let (a, b, c) = (free_port(), free_port(), free_port());
    let py_a = chain_python("py-a", a, None).unwrap();
    let _py_b = chain_python("py-b", b, None).unwrap();
    let _node = chain_node("node-c", c, None).unwrap();
    let ports = [a, b, c];

    // Executable glob: only Node.js (curl, the clients, and the Pythons are not).
    let spans = traced_with(&["--exe", "**/node*"], &ports, 1);
    assert_eq!(server_services(&spans), ["node-c"], "{spans:#?}");
    assert_eq!(spans.len(), 1, "{spans:#?}");

    // Listening port: only the server on b.
    let spans = traced_with(&["--port", &b.to_string()], &ports, 1);
    assert_eq!(server_services(&spans), ["py-b"]);
    assert_eq!(spans.len(), 1, "{spans:#?}");

    // A port range that holds none of them: nothing.
    let spans = traced_with(&["--port", "1-1023"], &ports, 0);
    assert!(spans.is_empty(), "{spans:#?}");

    // Process id: only py-a.
    let pid = py_a.pid().to_string();
    let spans = traced_with(&["--pid", &pid], &ports, 1);
    assert_eq!(server_services(&spans), ["py-a"]);
    assert_eq!(spans.len(), 1, "{spans:#?}");

    // Two kinds of rule narrow: Python executables listening on a.
    let spans = traced_with(
        &["--exe", "**/python3*", "--port", &a.to_string()],
        &ports,
        1,
    );
    assert_eq!(server_services(&spans), ["py-a"]);

    // Exclusions: no Node.js, nothing listening on a; curl's client spans stay.
    let spans = traced_with(
        &[
            "--exclude-exe",
            "**/node*",
            "--exclude-port",
            &a.to_string(),
        ],
        &ports,
        4,
    );
    assert_eq!(server_services(&spans), ["py-b"], "{spans:#?}");
    let curls = spans.iter().filter(|s| s.service() == "curl").count();
    assert_eq!(curls, 3, "{spans:#?}");
    assert_eq!(spans.len(), 4);
}

#[test]
fn a_server_started_after_the_agent_is_traced_from_its_first_request() {
    require_privileges!();
    let port = free_port();
    let receiver = Receiver::start().unwrap();
    let agent = agent(&receiver, &["--port", &port.to_string()]);
    // Started after the agent; the first request follows as soon as it listens.
    let _late = chain_python("late", port, None).unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/first")]).unwrap();
    agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(5), |s| !s.is_empty());
    assert_eq!(server_services(&spans), ["late"], "{spans:#?}");
    assert_eq!(spans[0].attr("url.path"), Some("/first"));
}

/// Groups spans by trace id.
fn traces<'a>(spans: impl IntoIterator<Item = &'a Span>) -> HashMap<&'a str, Vec<&'a Span>> {
    let mut t: HashMap<&str, Vec<&Span>> = HashMap::new();
    for s in spans {
        t.entry(s.trace_id.as_str()).or_default().push(s);
    }
    t
}

#[test]
fn traceidratio_keeps_a_quarter_of_the_traces_and_never_splits_one() {
    require_privileges!();
    let (front, back) = (free_port(), free_port());
    let _back = chain_python("back", back, None).unwrap();
    let _front = chain_python("front", front, Some(&format!("http://127.0.0.1:{back}/"))).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = agent(
        &receiver,
        &[
            "--sampler",
            "traceidratio",
            "--sampler-arg",
            "0.25",
            "--exe",
            "**/python3*",
        ],
    );
    let statuses = load_client(&format!("http://127.0.0.1:{front}/work"), 2000).unwrap();
    assert_eq!(statuses.len(), 2000);
    assert!(statuses.iter().all(|&s| s == 200));
    let (_, stderr) = agent.stop().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let spans = receiver.spans();
    // This test's traces (other tests' Python servers match the rule too and run meanwhile).
    let mut by_trace = traces(&spans);
    by_trace.retain(|_, t| t.iter().any(|s| ["front", "back"].contains(&s.service())));
    // Each request is one trace of four spans: the load client's call, front's server span,
    // front's call to back, back's server span.
    for (id, t) in &by_trace {
        assert_eq!(t.len(), 4, "trace {id} is split: {t:#?}");
        let kinds: Vec<(&str, &str)> = t.iter().map(|s| (s.service(), s.kind)).collect();
        for want in [("front", "SERVER"), ("front", "CLIENT"), ("back", "SERVER")] {
            assert!(kinds.contains(&want), "{kinds:?}");
        }
    }
    let kept = by_trace.len();
    eprintln!("traceidratio 0.25 kept {kept} of 2000 traces");
    assert!(
        (440..=560).contains(&kept),
        "{kept} of 2000 traces kept, want 25% +- 3% (440..=560)"
    );
    let summary = summary(&stderr);
    // Every span of the dropped traces is counted. Other tests' Python processes run
    // meanwhile and match the rule too: their spans (beyond this test's 8000) may add to the
    // count, never more than there were.
    let (spans_made, unsampled) = (
        counter(&summary, " spans:"),
        counter(&summary, " not sampled"),
    );
    let dropped = (2000 - kept as u64) * 4;
    assert!(
        unsampled >= dropped && unsampled - dropped <= spans_made.saturating_sub(8000),
        "every span of the dropped traces is counted ({dropped}): {summary}"
    );
}

#[test]
fn error_spans_survive_always_off_with_keep_errors() {
    require_privileges!();
    let port = free_port();
    let _svc = chain_python("flaky", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = agent(&receiver, &["--sampler", "always_off", "--keep-errors"]);
    for path in ["/ok", "/fail", "/ok", "/fail", "/ok"] {
        curl(&[&format!("http://127.0.0.1:{port}{path}")]).unwrap();
    }
    agent.stop().unwrap();
    receiver.wait_for(Duration::from_secs(5), |s| s.len() >= 4);
    std::thread::sleep(Duration::from_millis(300));
    let spans = receiver.spans();
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| s.attr("server.port") == Some(&port.to_string()))
        .collect();
    assert_eq!(ours.len(), 4, "two failed requests, both ends: {ours:#?}");
    for s in &ours {
        assert!(s.error, "{s:#?}");
        assert_eq!(s.attr("http.response.status_code"), Some("500"));
        assert_eq!(s.attr("url.path"), Some("/fail"));
    }
    // The two ends of each failed request are kept together, linked.
    let ours_traces = traces(ours.iter().copied());
    assert_eq!(ours_traces.len(), 2, "{ours_traces:#?}");
    for t in ours_traces.values() {
        assert_eq!(t.len(), 2, "{t:#?}");
    }
}

/// A GET on loopback: status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn the_metrics_endpoint_counts_the_traffic_that_was_sent() {
    require_privileges!();
    let port = free_port();
    let _svc = chain_python("counted", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let telemetry = format!("127.0.0.1:{}", free_port());
    let agent = agent(
        &receiver,
        &[
            "--telemetry-address",
            &telemetry,
            "--port",
            &port.to_string(),
        ],
    );
    assert_eq!(get(&telemetry, "/readyz").0, 200);
    assert_eq!(get(&telemetry, "/healthz").0, 200);
    const N: u64 = 37;
    let statuses = load_client(&format!("http://127.0.0.1:{port}/n"), N as usize).unwrap();
    assert_eq!(statuses.len() as u64, N);
    // Exports are batched every 100 ms in tests: wait until all are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = get(&telemetry, "/metrics");
        assert_eq!(status, 200);
        if metric(&text, "wirespan_spans_exported_total") >= N || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(metric(&text, "wirespan_spans_total{kind=\"server\"}"), N);
    assert_eq!(
        metric(&text, "wirespan_spans_total{kind=\"client\"}"),
        0,
        "the client is not selected"
    );
    assert_eq!(metric(&text, "wirespan_spans_exported_total"), N);
    assert_eq!(receiver.spans().len() as u64, N);
    assert_eq!(
        metric(&text, "wirespan_spans_dropped_total{reason=\"queue_full\"}"),
        0
    );
    assert_eq!(
        metric(
            &text,
            "wirespan_events_lost_total{reason=\"ring_buffer_full\"}"
        ),
        0
    );
    assert_eq!(
        metric(
            &text,
            "wirespan_processes_selected_total{decision=\"trace\"}"
        ),
        1
    );
    assert!(
        metric(
            &text,
            "wirespan_processes_selected_total{decision=\"ignore\"}"
        ) >= 1
    );
    // At least a read and a write per request on the server's side.
    assert!(metric(&text, "wirespan_events_total") >= 2 * N);
    assert_eq!(metric(&text, "wirespan_ready"), 1);
    agent.stop().unwrap();
}

#[test]
fn sigterm_flushes_spans_and_detaches_every_program_within_five_seconds() {
    require_privileges!();
    let port = free_port();
    let _svc = chain_python("stopping", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    // Batches every 5 s (the default): only the shutdown flush can deliver in time.
    let agent = SpanAgent::to_with(
        &receiver,
        &["--log-format", "json"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "5000")],
    )
    .unwrap();
    let programs = wirespan_tests::bpf_ids_of(agent.pid(), "prog_id");
    // Every program: 13 syscalls, the 5 sending ones at enter and exit.
    assert_eq!(programs.len(), 18, "{programs:?}");
    curl(&[&format!("http://127.0.0.1:{port}/last")]).unwrap();
    let (took, _, stderr) = agent.stop_with(libc::SIGTERM).unwrap();
    eprintln!("exited {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let left: Vec<&u64> = programs
        .iter()
        .filter(|&&id| wirespan_tests::bpf_prog_loaded(id))
        .collect();
    assert!(left.is_empty(), "programs left attached: {left:?}");
    let spans = receiver.spans();
    assert!(
        spans.iter().any(|s| s.attr("url.path") == Some("/last")),
        "the last request's spans were flushed: {spans:#?}"
    );
    // Structured logs: every line a JSON object; the summary among them.
    assert!(!stderr.is_empty());
    for line in &stderr {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["ts"].is_string(), "{line}");
    }
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("\"message\":\"wirespan: ") && l.contains(" spans: ")),
        "{stderr:#?}"
    );
}

#[test]
fn without_privileges_the_agent_names_what_is_missing() {
    require_privileges!();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(wirespan_bin())
        .args(["run", "--no-export"])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needed in ["CAP_BPF", "CAP_PERFMON"] {
        assert!(
            stderr.contains(&format!("missing capability {needed}")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("wirespan: cannot capture"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Pids in the kernel pid filter map of the agent `agent_pid` (bpftool prints keys as
/// little-endian bytes, or as numbers when the map has BTF).
fn pid_filter_entries(agent_pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let bpftool_map = |verb: &str, id: u64| -> serde_json::Value {
        let out = Command::new("bpftool")
            .args(["map", verb, "id", &id.to_string(), "--json"])
            .output()
            .expect("bpftool runs");
        serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
    };
    for id in wirespan_tests::bpf_ids_of(agent_pid, "map_id") {
        if bpftool_map("show", id)["name"] != "PID_FILTER" {
            continue;
        }
        let v = bpftool_map("dump", id);
        pids.extend(
            v.as_array()
                .expect("a list of entries")
                .iter()
                .map(|e| match &e["key"] {
                    serde_json::Value::Number(n) => n.as_u64().unwrap() as u32,
                    serde_json::Value::Array(bytes) => {
                        let b: Vec<u8> = bytes
                            .iter()
                            .map(|x| {
                                u8::from_str_radix(x.as_str().unwrap().trim_start_matches("0x"), 16)
                                    .unwrap()
                            })
                            .collect();
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    }
                    other => panic!("unexpected key {other}"),
                }),
        );
    }
    pids
}

#[test]
fn processes_that_exit_are_forgotten_in_the_kernel_too() {
    require_privileges!();
    let port = free_port();
    let server = chain_python("ignored", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    // A rule that selects nothing here (other tests run node servers meanwhile).
    let agent = agent(&receiver, &["--exe", "**/no-such-program-here"]);
    // Clients that wait (the server's /slow answers after 60 s), so that all are alive when
    // the filter is read.
    let clients: Vec<Proc> = (0..20)
        .map(|_| {
            Proc::spawn(
                "curl",
                Command::new("curl")
                    .args(["-s", "-o", "/dev/null"])
                    .arg(format!("http://127.0.0.1:{port}/slow")),
            )
            .unwrap()
        })
        .collect();
    let pids: Vec<u32> = clients.iter().map(Proc::pid).collect();
    // Each client is decided against and written into the kernel's filter...
    let deadline = Instant::now() + Duration::from_secs(5);
    let during = loop {
        let entries = pid_filter_entries(agent.pid());
        if pids.iter().all(|p| entries.contains(p)) || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        pids.iter().all(|p| during.contains(p)),
        "clients missing from the filter: {pids:?} {during:?}"
    );
    assert!(during.contains(&server.pid()));
    // ...and is gone from it once it exited (swept every 2 s).
    drop(clients);
    std::thread::sleep(Duration::from_secs(5));
    let after = pid_filter_entries(agent.pid());
    assert!(
        pids.iter().all(|p| !after.contains(p)),
        "exited clients still in the filter: {after:?}"
    );
    assert!(
        after.contains(&server.pid()),
        "a live process stays: {after:?}"
    );
    assert!(
        after.contains(&agent.pid()),
        "the agent never traces itself"
    );
    agent.stop().unwrap();
    assert!(receiver.spans().is_empty());
}

/// Moves `pid` into a cgroup named the way Docker names a container's, in this machine's
/// hierarchy (v2, or v1's pids controller); returns the cgroup directory, or None (and why)
/// when cgroups cannot be made here.
fn containerise(pid: u32, id: &str) -> Result<std::path::PathBuf, String> {
    let v2 = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup") && l.contains("cgroup2"));
    let dir = if v2 {
        std::path::PathBuf::from(format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"))
    } else {
        std::path::PathBuf::from(format!("/sys/fs/cgroup/pids/docker/{id}"))
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| format!("moving {pid} into {}: {e}", dir.display()))?;
    Ok(dir)
}

#[test]
fn a_container_is_selected_by_its_id_and_named_in_the_resource() {
    require_privileges!();
    let id = "c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5c0ffee00d15ea5e5";
    let (inside, outside) = (free_port(), free_port());
    let boxed = chain_python("boxed", inside, None).unwrap();
    let _plain = chain_python("plain", outside, None).unwrap();
    let dir = match containerise(boxed.pid(), id) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: cgroups cannot be made here: {why}");
            return;
        }
    };
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", boxed.pid())).unwrap();
    assert!(cgroup.contains(id), "{cgroup}");
    let receiver = Receiver::start().unwrap();
    let agent = agent(&receiver, &["--container", &id[..12]]);
    for p in [inside, outside] {
        curl(&[&format!("http://127.0.0.1:{p}/")]).unwrap();
    }
    agent.stop().unwrap();
    let spans = receiver.wait_for(Duration::from_secs(5), |s| !s.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let spans_now = receiver.spans();
    assert_eq!(spans_now.len(), spans.len());
    assert_eq!(server_services(&spans), ["boxed"], "{spans:#?}");
    assert_eq!(spans.len(), 1);
    assert_eq!(
        spans[0].resource.get("container.id").map(String::as_str),
        Some(id)
    );
    drop(boxed);
    // The cgroup is empty once its process is reaped.
    let _ = std::fs::remove_dir(&dir);
}
