//! Privileged end-to-end tests of spans: real services in five runtimes, real clients, the
//! agent on the real kernel, and a real OTLP receiver. Loopback only.

use std::{collections::HashSet, process::Command, time::Duration};

use wirespan_tests::{
    Proc, SpanAgent, TempDir, chain_node, chain_python, curl, free_port, go_server, java_server,
    nginx,
    otlp::{Receiver, Span},
    program, require_privileges, service,
};

fn of<'a>(spans: &'a [Span], service: &str, kind: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.service() == service && s.kind == kind)
        .collect()
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.span_id == id)
        .unwrap_or_else(|| panic!("no span {id} among {spans:#?}"))
}

/// curl's client spans to `port`.
fn curl_spans(spans: &[Span], port: u16) -> Vec<&Span> {
    of(spans, "curl", "CLIENT")
        .into_iter()
        .filter(|s| s.attr("server.port") == Some(&port.to_string()))
        .collect()
}

/// Asserts that `server`'s parent is `client`, linked by their connection, in one trace.
fn assert_connection_link(server: &Span, client: &Span) {
    assert_eq!(server.parent, client.span_id, "{server:#?}\n{client:#?}");
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.link(), "connection");
    assert_eq!(
        server.attr("server.port"),
        client.attr("network.peer.port"),
        "the two ends of one connection"
    );
}

fn receive(receiver: &Receiver, at_least: usize) -> Vec<Span> {
    receiver.wait_for(Duration::from_secs(10), |s| s.len() >= at_least)
}

#[test]
fn one_service_in_each_of_five_runtimes() {
    require_privileges!();
    let dir = TempDir::new("five").unwrap();
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let _py = chain_python("py", ports[0], None).unwrap();
    let _node = chain_node("node", ports[1], None).unwrap();
    let _go = go_server(ports[2], &dir.0).unwrap();
    let _java = java_server("java", ports[3]).unwrap();
    let _nginx = nginx(ports[4], &dir.0).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let names = ["py", "node", "go", "java", "nginx"];
    let mut curl_pids = Vec::new();
    for port in &ports {
        let (pid, _) = curl(&[&format!("http://127.0.0.1:{port}/hello?user=alice")]).unwrap();
        curl_pids.push(pid);
    }
    agent.stop().unwrap();
    let spans = receive(&receiver, 10);
    for (i, name) in names.iter().enumerate() {
        let servers = of(&spans, name, "SERVER");
        assert_eq!(servers.len(), 1, "{name}: {spans:#?}");
        let s = servers[0];
        assert_eq!(s.name, "GET /hello");
        assert_eq!(s.attr("http.route"), Some("/hello"));
        assert_eq!(s.attr("http.request.method"), Some("GET"));
        assert_eq!(s.attr("url.path"), Some("/hello"));
        assert_eq!(s.attr("url.query"), Some("user=REDACTED"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
        assert_eq!(s.attr("server.port"), Some(ports[i].to_string().as_str()));
        assert_eq!(s.attr("network.protocol.version"), Some("1.1"));
        assert!(s.attr("user_agent.original").unwrap().starts_with("curl/"));
        assert!(!s.error);
        assert!(s.end_ns > s.start_ns);
        assert_eq!(
            s.resource.get("telemetry.sdk.name").map(|s| s.as_str()),
            Some("wirespan")
        );
        assert!(s.resource.contains_key("process.command_line"));
        assert!(s.resource.contains_key("host.name"));
        let clients = curl_spans(&spans, ports[i]);
        assert_eq!(clients.len(), 1, "{name}: {clients:#?}");
        let c = clients[0];
        assert_eq!(c.parent, "", "curl's span is the root");
        assert_eq!(c.resource["process.pid"], curl_pids[i].to_string());
        assert_connection_link(s, c);
        // The server span lies within the client span.
        assert!(
            c.start_ns <= s.start_ns && s.end_ns <= c.end_ns,
            "{c:#?} {s:#?}"
        );
    }
    // nothing else from these services
    let ours: HashSet<&str> = names.into_iter().collect();
    let extra: Vec<_> = spans
        .iter()
        .filter(|s| ours.contains(s.service()) && s.kind != "SERVER")
        .collect();
    assert!(extra.is_empty(), "{extra:#?}");
}

/// Python -> Node -> Go, plain services that do not forward headers.
struct Chain {
    ports: [u16; 3],
    _procs: Vec<Proc>,
    _dir: TempDir,
}

fn chain() -> Chain {
    let dir = TempDir::new("chain").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let go = go_server(ports[2], &dir.0).unwrap();
    let node = chain_node(
        "orders",
        ports[1],
        Some(&format!("http://127.0.0.1:{}/hello", ports[2])),
    )
    .unwrap();
    let py = chain_python(
        "gateway",
        ports[0],
        Some(&format!("http://127.0.0.1:{}/orders", ports[1])),
    )
    .unwrap();
    Chain {
        ports,
        _procs: vec![go, node, py],
        _dir: dir,
    }
}

/// The six spans of one request through the chain, checked link by link.
/// `first_link` is how the gateway's server span joined `root`.
fn assert_chain_trace(spans: &[Span], root: &Span, ports: [u16; 3], first_link: &str) {
    let trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    assert_eq!(trace.len(), 6, "{trace:#?}");
    let child_of = |parent: &Span, service: &str, kind: &str| -> Span {
        let c: Vec<&&Span> = trace
            .iter()
            .filter(|s| s.parent == parent.span_id && s.service() == service && s.kind == kind)
            .collect();
        assert_eq!(c.len(), 1, "{service} {kind} under {parent:#?}: {trace:#?}");
        (*c[0]).clone()
    };
    let gw_server = child_of(root, "gateway", "SERVER");
    assert_eq!(gw_server.link(), first_link);
    let gw_client = child_of(&gw_server, "gateway", "CLIENT");
    assert_eq!(gw_client.link(), "thread");
    assert_eq!(
        gw_client.attr("server.port"),
        Some(ports[1].to_string().as_str())
    );
    assert_eq!(gw_client.attr("url.query"), Some("from=REDACTED"));
    let orders_server = child_of(&gw_client, "orders", "SERVER");
    assert_eq!(orders_server.link(), "connection");
    let orders_client = child_of(&orders_server, "orders", "CLIENT");
    assert_eq!(orders_client.link(), "thread");
    let go_server = child_of(&orders_client, "go", "SERVER");
    assert_eq!(go_server.link(), "connection");
    assert_eq!(go_server.attr("url.path"), Some("/hello"));
    // Each child lies within its parent.
    for (outer, inner) in [
        (root, &gw_server),
        (&gw_server, &gw_client),
        (&gw_client, &orders_server),
        (&orders_server, &orders_client),
        (&orders_client, &go_server),
    ] {
        assert!(outer.start_ns <= inner.start_ns && inner.end_ns <= outer.end_ns);
    }
}

#[test]
fn three_service_chain_one_trace_per_request() {
    require_privileges!();
    let c = chain();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    for _ in 0..3 {
        curl(&[&format!("http://127.0.0.1:{}/checkout", c.ports[0])]).unwrap();
    }
    agent.stop().unwrap();
    let spans = receive(&receiver, 18);
    let roots = curl_spans(&spans, c.ports[0]);
    assert_eq!(roots.len(), 3, "{spans:#?}");
    let traces: HashSet<&str> = roots.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 3);
    for root in roots {
        assert_eq!(root.parent, "");
        assert_chain_trace(&spans, root, c.ports, "connection");
    }
}

/// Each CPU writes its own ring. A server thread that reads a request on one CPU and calls on
/// from another has the two in different rings; read ring by ring, the call would come before
/// or after the whole request and find no request on its thread. The agent merges the rings by
/// time, so every call still joins its request's trace.
#[test]
fn a_thread_moving_between_cpus_keeps_its_spans_linked() {
    require_privileges!();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: a thread can only move between CPUs on a machine with two or more");
        return;
    }
    let dir = TempDir::new("hop").unwrap();
    let ports = [free_port(), free_port()];
    let _go = go_server(ports[1], &dir.0).unwrap();
    let _py = service(
        "gateway",
        ports[0],
        Command::new("python3").arg(program("chain.py")).args([
            "--port",
            &ports[0].to_string(),
            "--next",
            &format!("http://127.0.0.1:{}/hello", ports[1]),
            "--hop-cpus",
        ]),
    )
    .unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    const REQUESTS: usize = 20;
    let url = format!("http://127.0.0.1:{}/checkout", ports[0]);
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), REQUESTS).collect();
    let mut args = vec!["-o", "/dev/null"];
    args.extend(urls);
    // One curl, its requests in sequence on one connection.
    curl(&args).unwrap();
    agent.stop().unwrap();
    let spans = receive(&receiver, 4 * REQUESTS);
    let servers = of(&spans, "gateway", "SERVER");
    assert_eq!(servers.len(), REQUESTS, "{spans:#?}");
    for server in servers {
        let calls: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent == server.span_id && s.kind == "CLIENT")
            .collect();
        assert_eq!(calls.len(), 1, "the call under {server:#?}: {spans:#?}");
        assert_eq!(calls[0].link(), "thread");
        assert_eq!(calls[0].trace_id, server.trace_id);
        let go: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent == calls[0].span_id && s.kind == "SERVER")
            .collect();
        assert_eq!(go.len(), 1, "{spans:#?}");
        assert_eq!(go[0].link(), "connection");
    }
}

#[test]
fn chain_with_traceparent_from_the_first_client_joins_that_trace() {
    require_privileges!();
    let c = chain();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    curl(&[
        "-H",
        &format!("traceparent: 00-{trace}-{parent}-01"),
        "-H",
        "tracestate: vendor=abc",
        &format!("http://127.0.0.1:{}/checkout", c.ports[0]),
    ])
    .unwrap();
    agent.stop().unwrap();
    let spans = receive(&receiver, 5);
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| ["gateway", "orders", "go"].contains(&s.service()))
        .collect();
    assert_eq!(ours.len(), 5, "{ours:#?}");
    assert!(ours.iter().all(|s| s.trace_id == trace), "{ours:#?}");
    // curl sent its own context: it is an instrumented client, so no span of ours for it.
    assert!(curl_spans(&spans, c.ports[0]).is_empty());
    let gw = of(&spans, "gateway", "SERVER")[0];
    assert_eq!(gw.parent, parent);
    assert_eq!(gw.link(), "header");
    let root = Span {
        span_id: parent.to_string(),
        parent: String::new(),
        trace_id: trace.to_string(),
        start_ns: 0,
        end_ns: u64::MAX,
        ..gw.clone()
    };
    let mut all: Vec<Span> = ours.into_iter().cloned().collect();
    all.push(root.clone());
    assert_chain_trace(&all, &root, c.ports, "header");
}

#[test]
fn sampled_flag_zero_exports_nothing() {
    require_privileges!();
    let c = chain();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    curl(&[
        "-H",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        &format!("http://127.0.0.1:{}/checkout", c.ports[0]),
    ])
    .unwrap();
    // A sampled request afterwards proves the agent was exporting.
    curl(&[&format!("http://127.0.0.1:{}/checkout", c.ports[0])]).unwrap();
    agent.stop().unwrap();
    let spans = receive(&receiver, 6);
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736")
    );
    let roots = curl_spans(&spans, c.ports[0]);
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_chain_trace(&spans, roots[0], c.ports, "connection");
}

#[test]
fn server_errors_and_client_errors_are_marked() {
    require_privileges!();
    let port = free_port();
    let _py = chain_python("failing", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let _ = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/fail"),
        ])
        .status();
    agent.stop().unwrap();
    let spans = receive(&receiver, 2);
    let s = of(&spans, "failing", "SERVER");
    assert_eq!(s.len(), 1);
    assert!(s[0].error);
    assert_eq!(s[0].attr("error.type"), Some("500"));
    let c = curl_spans(&spans, port);
    assert_eq!(c.len(), 1);
    assert!(c[0].error);
}

#[test]
fn hundred_requests_on_one_keep_alive_connection() {
    require_privileges!();
    let dir = TempDir::new("keepalive").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://127.0.0.1:{port}/item/{i}"))
        .collect();
    let mut args: Vec<&str> = vec!["-o", "/dev/null"];
    for u in &urls {
        args.push(u);
    }
    // One curl, one connection, 100 requests in sequence.
    curl(&args).unwrap();
    agent.stop().unwrap();
    let spans = receive(&receiver, 200);
    let servers = of(&spans, "nginx", "SERVER");
    let clients = curl_spans(&spans, port);
    assert_eq!(servers.len(), 100);
    assert_eq!(clients.len(), 100);
    let client_ports: HashSet<_> = servers.iter().map(|s| s.attr("client.port")).collect();
    assert_eq!(client_ports.len(), 1, "one connection");
    for s in &servers {
        let c = by_id(&spans, &s.parent);
        assert_connection_link(s, c);
        assert_eq!(s.attr("url.path"), c.attr("url.path"));
    }
}

/// A client that exits 20 ms after its connect: the agent must read its /proc entry (and the
/// OTEL_SERVICE_NAME there) when the connect is reported, not at its next 50 ms look at the
/// ring, which comes too late for most of the runs. Pauses between the runs leave the agent
/// idle, so nothing but the connect can wake it.
#[test]
fn a_short_lived_client_is_named_by_its_own_environment() {
    require_privileges!();
    let dir = TempDir::new("oneshot").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    const RUNS: usize = 20;
    let client = "import socket, sys, time\n\
        s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
        s.sendall(b'GET /oneshot HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
        while s.recv(4096): pass\n\
        time.sleep(0.02)\n";
    for _ in 0..RUNS {
        let status = Command::new("python3")
            .args(["-c", client, &port.to_string()])
            .env("OTEL_SERVICE_NAME", "oneshot")
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop().unwrap();
    let spans = receive(&receiver, 2 * RUNS);
    assert_eq!(of(&spans, "nginx", "SERVER").len(), RUNS, "{spans:#?}");
    let clients: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == "CLIENT" && s.attr("server.port") == Some(&port.to_string()))
        .collect();
    assert_eq!(clients.len(), RUNS, "{spans:#?}");
    for c in clients {
        assert_eq!(
            c.service(),
            "oneshot",
            "/proc was read after it exited: {c:#?}"
        );
    }
}

#[test]
fn pipelined_requests_match_responses_in_order() {
    require_privileges!();
    let dir = TempDir::new("pipeline").unwrap();
    let port = free_port();
    let _nginx = nginx(port, &dir.0).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let out = Command::new("python3")
        .arg(program("pipeline.py"))
        .args(["--port", &port.to_string(), "--count", "5"])
        .env("OTEL_SERVICE_NAME", "pipeliner")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    agent.stop().unwrap();
    let spans = receive(&receiver, 10);
    let servers = of(&spans, "nginx", "SERVER");
    let clients = of(&spans, "pipeliner", "CLIENT");
    assert_eq!(servers.len(), 5, "{spans:#?}");
    assert_eq!(clients.len(), 5);
    for s in servers {
        let c = by_id(&spans, &s.parent);
        assert_connection_link(s, c);
        assert_eq!(s.attr("url.path"), c.attr("url.path"));
    }
}

#[test]
fn chunked_responses_are_framed() {
    require_privileges!();
    let port = free_port();
    let _node = chain_node("chunky", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    for _ in 0..3 {
        curl(&[&format!("http://127.0.0.1:{port}/")]).unwrap();
    }
    agent.stop().unwrap();
    let spans = receive(&receiver, 6);
    let servers = of(&spans, "chunky", "SERVER");
    assert_eq!(servers.len(), 3, "{spans:#?}");
    for s in servers {
        // "node\n" + "" + "end\n"
        assert_eq!(s.attr("http.response.body.size"), Some("9"));
        let c = by_id(&spans, &s.parent);
        assert_eq!(c.attr("http.response.body.size"), Some("9"));
    }
}

#[test]
fn fifty_concurrent_clients_spans_equal_requests() {
    require_privileges!();
    let port = free_port();
    let _py = chain_python("busy", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let children: Vec<_> = (0..50)
        .map(|i| {
            Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--max-time", "20"])
                .arg(format!("http://127.0.0.1:{port}/c/{i}"))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    agent.stop().unwrap();
    let spans = receive(&receiver, 100);
    let servers = of(&spans, "busy", "SERVER");
    assert_eq!(servers.len(), 50);
    assert_eq!(curl_spans(&spans, port).len(), 50);
    let paths: HashSet<_> = servers.iter().map(|s| s.attr("url.path")).collect();
    assert_eq!(paths.len(), 50);
    for s in servers {
        let c = by_id(&spans, &s.parent);
        assert_connection_link(s, c);
        assert_eq!(s.attr("url.path"), c.attr("url.path"));
    }
}

#[test]
fn http_protobuf_export() {
    require_privileges!();
    let port = free_port();
    let _py = chain_python("viahttp", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let endpoint = format!("http://{}", receiver.http);
    let agent = SpanAgent::start(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "http/protobuf",
    ])
    .unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/x")]).unwrap();
    let (_, log) = agent.stop().unwrap();
    let spans = receive(&receiver, 2);
    assert_eq!(of(&spans, "viahttp", "SERVER").len(), 1, "{spans:#?}");
    // The receiver's own handling of our export (it is traced too) is never a span.
    assert!(
        spans
            .iter()
            .all(|s| s.attr("url.path") != Some("/v1/traces")),
        "{spans:#?}"
    );
    let summary = log.iter().find(|l| l.contains("spans:")).unwrap();
    assert!(summary.contains(" 0 failed to export"), "{summary}");
}

/// GETs `path` from the embedded UI and parses the JSON answer.
fn ui_get(ui: &str, path: &str) -> serde_json::Value {
    let (_, body) = curl(&[&format!("http://{ui}{path}")]).unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"))
}

#[test]
fn embedded_jaeger_ui_shows_the_three_service_trace() {
    require_privileges!();
    let c = chain();
    let ui = format!("127.0.0.1:{}", free_port());
    // No endpoint configured anywhere: the embedded store and UI are the default.
    let agent = SpanAgent::start(&["--ui-address", &ui]).unwrap();
    curl(&[&format!("http://127.0.0.1:{}/checkout", c.ports[0])]).unwrap();
    // Spans reach the store after a batch delay; the UI answers while the agent runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let traces = loop {
        let t = ui_get(&ui, "/api/traces?service=curl&limit=20");
        let found: Vec<serde_json::Value> = t["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["spans"].as_array().is_some_and(|s| s.len() == 6))
            .cloned()
            .collect();
        if !found.is_empty() || std::time::Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(traces.len(), 1, "{traces:#?}");
    let trace = &traces[0];
    let services: HashSet<String> = trace["processes"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["serviceName"].as_str().unwrap().to_string())
        .collect();
    for s in ["curl", "gateway", "orders", "go"] {
        assert!(services.contains(s), "{services:?}");
    }
    // The trace page's own API call answers the same trace.
    let id = trace["traceID"].as_str().unwrap();
    let one = ui_get(&ui, &format!("/api/traces/{id}"));
    assert_eq!(one["data"][0]["spans"].as_array().unwrap().len(), 6);
    let services = ui_get(&ui, "/api/services");
    assert!(
        services["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "curl"),
        "{services}"
    );
    // The UI itself is served.
    let (_, page) = curl(&[&format!("http://{ui}/trace/{id}")]).unwrap();
    assert!(String::from_utf8_lossy(&page).contains("<html"));
    agent.stop().unwrap();
}

#[test]
fn traceparent_at_the_end_of_a_64_kib_header_block() {
    require_privileges!();
    let port = free_port();
    let _py = chain_python("bighead", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let pad = "p".repeat(1010);
    let headers: Vec<String> = (0..66).map(|i| format!("X-Pad-{i}: {pad}")).collect();
    let mut args: Vec<&str> = Vec::new();
    for h in &headers {
        args.extend(["-H", h]);
    }
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    args.extend(["-H", tp, "-o", "/dev/null"]);
    let url = format!("http://127.0.0.1:{port}/bighead");
    args.push(&url);
    curl(&args).unwrap();
    agent.stop().unwrap();
    let spans = receive(&receiver, 1);
    let s = of(&spans, "bighead", "SERVER");
    assert_eq!(s.len(), 1, "{spans:#?}");
    assert_eq!(s[0].trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(s[0].parent, "b7ad6b7169203331");
    assert_eq!(s[0].link(), "header");
}

#[test]
fn sdk_instrumented_service_next_to_plain_ones_makes_one_trace() {
    require_privileges!();
    let receiver = Receiver::start().unwrap();
    let otlp = format!("http://{}", receiver.http);
    let ports = [free_port(), free_port(), free_port()];
    // Names no other test uses: the chain tests' "orders" runs meanwhile.
    let _c = chain_python("inventory", ports[2], None).unwrap();
    let _b = chain_python(
        "basket",
        ports[1],
        Some(&format!("http://127.0.0.1:{}/stock", ports[2])),
    )
    .unwrap();
    let _a = wirespan_tests::sdk_python(
        "storefront",
        ports[0],
        Some(&format!("http://127.0.0.1:{}/orders", ports[1])),
        &otlp,
    )
    .unwrap();
    let agent = SpanAgent::to(&receiver).unwrap();
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "10f067aa0ba902b7";
    curl(&[
        "-H",
        &format!("traceparent: 00-{trace}-{parent}-01"),
        &format!("http://127.0.0.1:{}/buy", ports[0]),
    ])
    .unwrap();
    // The SDK exports on its own schedule (100 ms here).
    receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().filter(|s| s.service() == "storefront").count() >= 2
    });
    agent.stop().unwrap();
    let spans = receive(&receiver, 5);
    let services = ["storefront", "basket", "inventory"];
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| services.contains(&s.service()))
        .collect();
    // storefront: the SDK's SERVER and CLIENT, and nothing from wirespan (no duplicates);
    // basket: SERVER and CLIENT from wirespan; inventory: SERVER from wirespan.
    let count = |svc: &str, kind: &str, by_wirespan: bool| {
        ours.iter()
            .filter(|s| {
                s.service() == svc
                    && s.kind == kind
                    && (s.resource.get("telemetry.sdk.name").map(|n| n.as_str())
                        == Some("wirespan"))
                        == by_wirespan
            })
            .count()
    };
    assert_eq!(count("storefront", "SERVER", false), 1, "{ours:#?}");
    assert_eq!(count("storefront", "CLIENT", false), 1, "{ours:#?}");
    assert_eq!(count("storefront", "SERVER", true), 0, "{ours:#?}");
    assert_eq!(count("storefront", "CLIENT", true), 0, "{ours:#?}");
    assert_eq!(count("basket", "SERVER", true), 1, "{ours:#?}");
    assert_eq!(count("basket", "CLIENT", true), 1, "{ours:#?}");
    assert_eq!(count("inventory", "SERVER", true), 1, "{ours:#?}");
    assert_eq!(ours.len(), 5, "{ours:#?}");
    // One trace, and every parent is in it (or is the caller's span from the header).
    assert!(ours.iter().all(|s| s.trace_id == trace), "{ours:#?}");
    let ids: HashSet<&str> = ours.iter().map(|s| s.span_id.as_str()).collect();
    for s in &ours {
        assert!(
            s.parent == parent || ids.contains(s.parent.as_str()),
            "orphan: {s:#?}"
        );
    }
    let sdk_client = ours
        .iter()
        .find(|s| s.service() == "storefront" && s.kind == "CLIENT")
        .unwrap();
    let orders_server = of(&spans, "basket", "SERVER")[0];
    assert_eq!(orders_server.parent, sdk_client.span_id);
    assert_eq!(orders_server.link(), "header");
    // The SDK's own export requests are never spans.
    assert!(
        spans
            .iter()
            .all(|s| s.attr("url.path") != Some("/v1/traces"))
    );
}

#[test]
fn otel_environment_variables_configure_the_export() {
    require_privileges!();
    let port = free_port();
    let _py = chain_python("envconf", port, None).unwrap();
    let receiver = Receiver::start().unwrap();
    let endpoint = format!("http://{}", receiver.grpc);
    // Only the server is traced (by its port): other tests' processes run meanwhile, and the
    // counts below are this test's.
    let port_arg = port.to_string();
    let agent = SpanAgent::start_with_env(
        &["--stats-every", "1", "--port", &port_arg],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-wirespan-test=from%20env"),
        ],
    )
    .unwrap();
    curl(&[&format!("http://127.0.0.1:{port}/env")]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, log) = agent.stop().unwrap();
    // --stats-every prints counters and table sizes while running.
    let stats = log
        .iter()
        .rfind(|l| l.starts_with("wirespan: stats:"))
        .unwrap_or_else(|| panic!("no stats line in {log:#?}"));
    assert!(stats.contains(" exported=1 "), "{stats}");
    let spans = receive(&receiver, 1);
    assert_eq!(of(&spans, "envconf", "SERVER").len(), 1, "{spans:#?}");
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let headers = receiver.test_headers();
    assert!(!headers.is_empty());
    assert!(headers.iter().all(|h| h == "from env"), "{headers:?}");
}
