//! Helpers for wirespan's privileged end-to-end tests: run the real agent, real servers and
//! real clients on loopback, and read what the agent reported.
//!
//! Every process a test starts is wrapped in [`Proc`], which stops it by its own PID when the
//! test ends, pass or fail.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// Why the privileged tests cannot run here, or None when they can.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_BPF, CAP_PERFMON and tracefs access)".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("needs kernel BTF at /sys/kernel/btf/vmlinux".into());
    }
    if !Path::new("/sys/kernel/tracing/events/syscalls").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir()
    {
        return Some(
            "needs tracefs with syscall tracepoints (mount -t tracefs nodev /sys/kernel/tracing)"
                .into(),
        );
    }
    None
}

/// Returns early from a test, with a sentence, where the kernel features are missing.
#[macro_export]
macro_rules! require_privileges {
    () => {
        if let Some(why) = $crate::skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// The tests' own programs (clients and servers) shipped in tests/programs.
pub fn program(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("programs")
        .join(name)
}

/// The agent binary built by `cargo xtask test`.
pub fn wirespan_bin() -> PathBuf {
    std::env::var_os("WIRESPAN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/wirespan"))
}

/// A child process stopped (SIGKILL, by its PID) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on the PID of a child we own and have not reaped: it cannot name
        // another process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// Waits until something accepts connections on `addr`.
pub fn wait_for_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr} after 20 s")
}

/// One event as `wirespan capture --format json` prints it.
#[derive(Clone, Debug)]
pub struct Event {
    pub ts_mono_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub fd: i32,
    pub conn_id: u64,
    /// accept, connect, close, ingress, egress
    pub kind: String,
    pub syscall: String,
    pub len: u64,
    pub captured: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub data: Vec<u8>,
}

impl Event {
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let s = |k: &str| -> anyhow::Result<String> {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no string {k} in {line}"))
        };
        let n = |k: &str| -> anyhow::Result<u64> {
            v[k].as_u64()
                .ok_or_else(|| anyhow!("no number {k} in {line}"))
        };
        Ok(Self {
            ts_mono_ns: n("ts_mono_ns")?,
            pid: n("pid")? as u32,
            tid: n("tid")? as u32,
            comm: s("comm")?,
            fd: v["fd"].as_i64().ok_or_else(|| anyhow!("no fd"))? as i32,
            conn_id: n("conn_id")?,
            kind: s("kind")?,
            syscall: s("syscall")?,
            len: n("len")?,
            captured: n("captured")?,
            local: s("local")?.parse()?,
            remote: s("remote")?.parse()?,
            data: hex(&s("data_hex")?)?,
        })
    }

    pub fn is_data(&self) -> bool {
        self.kind == "ingress" || self.kind == "egress"
    }
}

pub fn hex(s: &str) -> anyhow::Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(Into::into))
        .collect()
}

/// Spawns wirespan with piped output and returns once it says it is ready: the process, a
/// thread collecting its stdout lines (echoed to the test log when `echo_stdout`), and its
/// stderr lines as they come.
#[allow(clippy::type_complexity)]
fn spawn_ready(
    cmd: &mut Command,
    echo_stdout: bool,
) -> anyhow::Result<(Proc, JoinHandle<Vec<String>>, mpsc::Receiver<String>)> {
    let mut proc = Proc::spawn("wirespan", cmd)?;
    let stdout = proc.child.stdout.take().expect("piped");
    let stdout = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| {
                if echo_stdout {
                    eprintln!("[wirespan] {l}")
                }
            })
            .collect::<Vec<_>>()
    });
    let stderr = proc.child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[wirespan] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            // Text logs, or JSON ones (`--log-format json`) carrying the same line.
            Ok(line)
                if line.starts_with("wirespan: ready")
                    || line.contains("\"message\":\"wirespan: ready") =>
            {
                break;
            }
            Ok(line) if line.starts_with("wirespan: cannot") || line.starts_with("Error") => {
                bail!("{line}")
            }
            Ok(_) => {}
            Err(_) => bail!("wirespan did not become ready within 30 s"),
        }
    }
    Ok((proc, stdout, rx))
}

/// A running `wirespan capture --format json`.
pub struct Agent {
    proc: Proc,
    stdout: Option<JoinHandle<Vec<String>>>,
    pub stderr: mpsc::Receiver<String>,
}

impl Agent {
    /// Starts the agent and returns once it says it is ready (probes attached).
    pub fn start(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_log_level(extra, "info")
    }

    /// As `start`, with RUST_LOG set to `level`.
    pub fn start_with_log_level(extra: &[&str], level: &str) -> anyhow::Result<Self> {
        let mut cmd = Command::new(wirespan_bin());
        cmd.env("RUST_LOG", level);
        cmd.args(["capture", "--format", "json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let (proc, stdout, rx) = spawn_ready(&mut cmd, false)?;
        Ok(Self {
            proc,
            stdout: Some(stdout),
            stderr: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends `sig` to the agent (SIGSTOP and SIGCONT to pause its reading).
    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    /// Stops the agent with SIGINT (it drains its ring buffer first) and returns every event.
    pub fn stop(self) -> anyhow::Result<Vec<Event>> {
        self.stop_with_log().map(|(events, _)| events)
    }

    /// As `stop`, also returning what the agent wrote to stderr after it was ready.
    pub fn stop_with_log(mut self) -> anyhow::Result<(Vec<Event>, Vec<String>)> {
        // Events are in the ring buffer when the syscall returns; give the reader a moment.
        std::thread::sleep(Duration::from_millis(200));
        self.proc.signal(libc::SIGINT);
        let status = self.proc.child.wait()?;
        if !status.success() {
            bail!("wirespan exited with {status}");
        }
        let lines = self
            .stdout
            .take()
            .expect("stop is called once")
            .join()
            .map_err(|_| anyhow!("stdout reader panicked"))?;
        let events = lines
            .iter()
            .map(|l| Event::parse(l))
            .collect::<Result<_, _>>()?;
        let log = self.stderr.try_iter().collect();
        Ok((events, log))
    }
}

/// Concatenated payload of the data events of `pid` in one direction, on one connection.
pub fn stream(events: &[Event], pid: u32, conn_id: u64, kind: &str) -> Vec<u8> {
    events
        .iter()
        .filter(|e| e.pid == pid && e.conn_id == conn_id && e.kind == kind)
        .flat_map(|e| e.data.iter().copied())
        .collect()
}

/// The test client in tests/programs/http_client.py, with its JSON lines.
pub struct PyClient {
    pub proc: Proc,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
}

#[derive(Debug)]
pub struct ClientReport {
    pub pid: u32,
    pub fd: i32,
    pub local_port: u16,
    pub sent: Vec<Vec<u8>>,
    pub received: Vec<Vec<u8>>,
}

impl PyClient {
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new("python3");
        cmd.arg(program("http_client.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("http_client.py", &mut cmd)?;
        let stdout = proc.child.stdout.take().expect("piped");
        let stdin = proc.child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            proc,
            lines: rx,
            stdin,
        })
    }

    /// A keep-alive connection to `port` that has carried one request and waits (for
    /// `resume`) before its second; also returns the client's `connected` report.
    pub fn paused_after_one(port: u16) -> anyhow::Result<(Self, serde_json::Value)> {
        let client = Self::start(&[
            "--port",
            &port.to_string(),
            "--requests",
            "2",
            "--pause-after",
            "1",
        ])?;
        let connected = client.next("connected")?;
        client.next("paused")?;
        Ok((client, connected))
    }

    pub fn next(&self, event: &str) -> anyhow::Result<serde_json::Value> {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .with_context(|| format!("client said nothing more while waiting for {event}"))?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v["event"] == event {
                return Ok(v);
            }
        }
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Runs the client to completion and returns what it did.
    pub fn finish(self) -> anyhow::Result<ClientReport> {
        let connected = self.next("connected")?;
        self.report(connected)
    }

    pub fn report(mut self, connected: serde_json::Value) -> anyhow::Result<ClientReport> {
        let done = self.next("done")?;
        let _ = self.proc.child.wait();
        let list = |k: &str| -> anyhow::Result<Vec<Vec<u8>>> {
            done[k]
                .as_array()
                .context("list")?
                .iter()
                .map(|h| hex(h.as_str().unwrap_or_default()))
                .collect()
        };
        Ok(ClientReport {
            pid: connected["pid"].as_u64().context("pid")? as u32,
            fd: connected["fd"].as_i64().context("fd")? as i32,
            local_port: connected["local_port"].as_u64().context("port")? as u16,
            sent: list("sent")?,
            received: list("received")?,
        })
    }
}

/// tests/programs/http_server.py on `host:port`.
pub fn python_server(host: &str, port: u16) -> anyhow::Result<Proc> {
    let proc = Proc::spawn(
        "http_server.py",
        Command::new("python3")
            .arg(program("http_server.py"))
            .args(["--host", host, "--port", &port.to_string()]),
    )?;
    let addr: SocketAddr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
    .parse()?;
    wait_for_port(addr)?;
    Ok(proc)
}

/// Debian's nginx in the foreground as one process (no master/worker split), answering
/// `return 200` on 127.0.0.1 and [::1].
pub fn nginx(port: u16, dir: &Path) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {dir}/logs/error.log;\npid {dir}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  keepalive_requests 1000;\n  server {{\n    listen 127.0.0.1:{port};\n    listen [::1]:{port};\n    location / {{ return 200 \"hello from nginx\\n\"; }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let proc = Proc::spawn(
        "nginx",
        Command::new("nginx")
            .env("OTEL_SERVICE_NAME", "nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir),
    )?;
    wait_for_port(format!("127.0.0.1:{port}").parse()?)?;
    Ok(proc)
}

/// Builds tests/programs/goserver.go with Debian's Go (standard library only, offline).
pub fn go_server(port: u16, dir: &Path) -> anyhow::Result<Proc> {
    let bin = dir.join("goserver");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(program("goserver.go"))
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .status()
        .context("running go build (Debian golang-go)")?;
    if !status.success() {
        bail!("go build failed: {status}");
    }
    let proc = Proc::spawn(
        "goserver",
        Command::new(&bin)
            .arg(format!("127.0.0.1:{port}"))
            .env("OTEL_SERVICE_NAME", "go"),
    )?;
    wait_for_port(format!("127.0.0.1:{port}").parse()?)?;
    Ok(proc)
}

/// A fresh directory under the system temp dir, removed when the guard is dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("wirespan-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs curl with `args` and returns its stdout.
pub fn curl(args: &[&str]) -> anyhow::Result<(u32, Vec<u8>)> {
    let child = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running curl")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("curl {args:?} failed: {}", out.status);
    }
    Ok((pid, out.stdout))
}

pub mod otlp;

/// A running `wirespan run` exporting to an OTLP endpoint (or the embedded UI).
pub struct SpanAgent {
    proc: Proc,
    stdout: Option<JoinHandle<Vec<String>>>,
    pub stderr: mpsc::Receiver<String>,
}

impl SpanAgent {
    /// Starts `wirespan run --log-spans` with `args`, batching every 100 ms, and returns once
    /// its probes are attached.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(args, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(wirespan_bin());
        cmd.args(["run", "--log-spans"]);
        Self::start_under(cmd, args, env)
    }

    /// `wirespan run` exporting to `receiver` with `extra` flags, without `--log-spans`, in
    /// the idle scheduling class (`chrt --idle 0`: it runs in what the busy processes leave):
    /// an agent that gets less CPU than the traffic it reads needs, as one under a CPU limit.
    /// `nice -n 19` was not enough: on two cores saturated by wrk and nginx, a niced agent
    /// sometimes kept up.
    pub fn starved_to(receiver: &otlp::Receiver, extra: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new("chrt");
        cmd.args(["--idle", "0"]).arg(wirespan_bin()).arg("run");
        let endpoint = format!("http://{}", receiver.grpc);
        let mut args = vec!["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"];
        args.extend_from_slice(extra);
        Self::start_under(cmd, &args, &[])
    }

    fn start_under(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        cmd.env("RUST_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let (proc, stdout, rx) = spawn_ready(&mut cmd, true)?;
        Ok(Self {
            proc,
            stdout: Some(stdout),
            stderr: rx,
        })
    }

    /// Starts the agent exporting over gRPC to `receiver`.
    pub fn to(receiver: &otlp::Receiver) -> anyhow::Result<Self> {
        Self::to_with(receiver, &[], &[])
    }

    /// As `to`, with extra flags and environment variables.
    pub fn to_with(
        receiver: &otlp::Receiver,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let endpoint = format!("http://{}", receiver.grpc);
        let mut args = vec!["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"];
        args.extend_from_slice(extra);
        Self::start_with_env(&args, env)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends `sig` to the agent (SIGSTOP and SIGCONT to pause its reading).
    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    /// Stops the agent with SIGINT (it flushes its spans first); returns the `--log-spans`
    /// lines and the closing stderr lines.
    pub fn stop(self) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let (_, out, err) = self.stop_with(libc::SIGINT)?;
        Ok((out, err))
    }

    /// Stops the agent with `signal`; returns how long it took to exit after the signal, the
    /// `--log-spans` lines and the closing stderr lines.
    pub fn stop_with(self, signal: i32) -> anyhow::Result<(Duration, Vec<String>, Vec<String>)> {
        // Events are in the ring buffer when the syscall returns; give the reader a moment.
        std::thread::sleep(Duration::from_millis(300));
        self.stop_within(signal, Duration::from_secs(60))
    }

    /// Stops the agent with `signal` at once; an error if it has not exited within `limit`
    /// (it is then killed). Returns as `stop_with`.
    pub fn stop_within(
        mut self,
        signal: i32,
        limit: Duration,
    ) -> anyhow::Result<(Duration, Vec<String>, Vec<String>)> {
        let sent = Instant::now();
        self.proc.signal(signal);
        let status = loop {
            if let Some(status) = self.proc.child.try_wait()? {
                break status;
            }
            if sent.elapsed() > limit {
                self.proc.signal(libc::SIGKILL);
                let _ = self.proc.child.wait();
                bail!("wirespan had not exited {limit:?} after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = sent.elapsed();
        if !status.success() {
            bail!("wirespan exited with {status}");
        }
        let lines = self
            .stdout
            .take()
            .expect("stop is called once")
            .join()
            .map_err(|_| anyhow!("stdout reader panicked"))?;
        // The stderr reader ends with the process; collect what it has.
        std::thread::sleep(Duration::from_millis(50));
        Ok((took, lines, self.stderr.try_iter().collect()))
    }
}

/// The agent's closing summary line among its stderr lines.
pub fn summary(log: &[String]) -> String {
    log.iter()
        .rfind(|l| l.contains(" spans: "))
        .cloned()
        .unwrap_or_else(|| panic!("no summary in {log:#?}"))
}

/// The number just before `label` in the agent's summary line.
pub fn counter(summary: &str, label: &str) -> u64 {
    let i = summary
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} not in {summary}"));
    summary[..i]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in {summary}"))
}

/// Starts a service program with `OTEL_SERVICE_NAME=name` and waits for its port.
pub fn service(name: &str, port: u16, cmd: &mut Command) -> anyhow::Result<Proc> {
    cmd.env("OTEL_SERVICE_NAME", name);
    let proc = Proc::spawn(name, cmd)?;
    wait_for_port(format!("127.0.0.1:{port}").parse()?)?;
    Ok(proc)
}

/// A tests/programs script run as `python3 SCRIPT PORT`, named `name`.
pub fn python_script(name: &str, port: u16, script: &str) -> anyhow::Result<Proc> {
    service(
        name,
        port,
        Command::new("python3")
            .arg(program(script))
            .arg(port.to_string()),
    )
}

/// tests/programs/chain.py on `port`, calling `next` if given.
pub fn chain_python(name: &str, port: u16, next: Option<&str>) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("python3");
    cmd.arg(program("chain.py"))
        .args(["--port", &port.to_string()]);
    if let Some(n) = next {
        cmd.args(["--next", n]);
    }
    service(name, port, &mut cmd)
}

/// tests/programs/chain.js (Node.js) on `port`, calling `next` if given.
pub fn chain_node(name: &str, port: u16, next: Option<&str>) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("node");
    cmd.arg(program("chain.js")).arg(port.to_string());
    if let Some(n) = next {
        cmd.arg(n);
    }
    service(name, port, &mut cmd)
}

/// tests/programs/Server.java run by Java 17's source launcher.
pub fn java_server(name: &str, port: u16) -> anyhow::Result<Proc> {
    service(
        name,
        port,
        Command::new("java")
            .arg(program("Server.java"))
            .arg(port.to_string()),
    )
}

/// The Python virtualenv with the OpenTelemetry SDK that `cargo xtask setup` makes.
pub fn test_venv() -> PathBuf {
    std::env::var_os("WIRESPAN_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv"))
}

/// tests/programs/sdk_service.py under `opentelemetry-instrument`, exporting its own spans over
/// OTLP/HTTP to `otlp` and calling `next` (if any) for each request.
pub fn sdk_python(name: &str, port: u16, next: Option<&str>, otlp: &str) -> anyhow::Result<Proc> {
    let venv = test_venv();
    let instrument = venv.join("bin/opentelemetry-instrument");
    if !instrument.exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it installs the OpenTelemetry SDK there)",
            instrument.display()
        );
    }
    let mut cmd = Command::new(instrument);
    cmd.args([
        "--traces_exporter",
        "otlp",
        "--metrics_exporter",
        "none",
        "--logs_exporter",
        "none",
    ])
    .arg(venv.join("bin/python"))
    .arg(program("sdk_service.py"))
    .arg(port.to_string())
    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
    .env("OTEL_BSP_SCHEDULE_DELAY", "100")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(n) = next {
        cmd.env("NEXT", n);
    }
    service(name, port, &mut cmd)
}

/// Ids of the BPF objects of one kind (`"prog_id"`, `"map_id"`) open in process `pid`, from
/// its descriptors' fdinfo: exact where counting by name is not (other tests' agents load
/// the same programs at the same time).
pub fn bpf_ids_of(pid: u32, kind: &str) -> Vec<u64> {
    let prefix = format!("{kind}:");
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = dir
        .filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the BPF program with this id is still loaded.
pub fn bpf_prog_loaded(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bpftool runs")
        .success()
}

/// tests/programs/load_client.py: `n` GET requests to `url` on one keep-alive connection;
/// returns the statuses it got.
pub fn load_client(url: &str, n: usize) -> anyhow::Result<Vec<u16>> {
    let out = Command::new("python3")
        .arg(program("load_client.py"))
        .args([url, &n.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "load_client: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect())
}

/// A tool `cargo xtask setup` downloads into target/tools (helm).
pub fn tool(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools")
        .join(name)
}
