//! `cargo xtask bench`: what wirespan costs the applications it traces, measured side by side
//! in one run, in alternating rounds, medians reported as ratios to the baseline of the same run.
//!
//! 1. nginx (one worker) driven by wrk at saturation: no agent, the floor (every tracepoint
//!    attached with programs that return at once, `wirespan run --inert`), and wirespan exporting
//!    to a real OTLP receiver (`otlp-sink`, a tonic server that counts spans).
//! 2. A realistic service: Flask doing WORK_MS of CPU work and one downstream call to a Go
//!    server, at a fixed request rate from an open-loop generator: plain, plain under wirespan,
//!    and instrumented by the OpenTelemetry Python SDK (exporting to the same receiver). Its
//!    p99 is also taken over every request of the rounds, with a 95% bootstrap interval of
//!    the ratio to plain that draws rounds and requests again (see `ratio_interval`).
//! 3. eBPF time per request from the kernel's own accounting (`kernel.bpf_stats_enabled`),
//!    switched on only for a 3 s run after each measured one (its clock reads are not a cost
//!    users pay), agent CPU per span and RSS from /proc (sampled every 500 ms under load; the
//!    peak), losses and span counts from the agent (its loss counts cover both runs).
//! 4. `--soak SECS`: wirespan on nginx at saturation for that long, sampled every 10 s.
//!
//! Everything started here is stopped by its PID; traffic stays on loopback.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::procs::{Started, free_port, start, wait_port};
use serde_json::{Value, json};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Rounds of each scenario (modes alternate within a round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests per second for the realistic service.
    #[arg(long, default_value_t = 40)]
    rate: u32,
    /// Seconds per realistic-service run.
    #[arg(long, default_value_t = 20)]
    service_seconds: u64,
    /// Milliseconds of CPU work per request in the realistic service.
    #[arg(long, default_value_t = 3)]
    work_ms: u32,
    /// Instead of the comparison: run wirespan on nginx at saturation for this many seconds,
    /// sampling its memory, descriptors and tables every 10 s.
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// Where the JSON results go (default target/bench.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run one of the two comparisons only.
    #[arg(long, value_enum)]
    only: Option<Scenario>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// nginx at saturation.
    Nginx,
    /// The realistic service at a fixed rate.
    Service,
}

/// The counting OTLP receiver.
struct Sink {
    proc: Started,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    grpc: String,
    http: String,
}

impl Sink {
    fn start(root: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(root.join("target/release/otlp-sink"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting otlp-sink")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let field = |k: &str| -> anyhow::Result<String> {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(|s| s.to_string())
                .with_context(|| format!("otlp-sink said {line:?}"))
        };
        let (grpc, http) = (field("grpc=")?, field("http=")?);
        Ok(Self {
            proc: Started {
                child,
                name: "otlp-sink".into(),
            },
            stdin,
            stdout,
            grpc,
            http,
        })
    }

    fn count(&mut self) -> anyhow::Result<u64> {
        writeln!(self.stdin)?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("spans=")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("otlp-sink said {line:?}"))
    }
}

/// A running agent whose stderr is collected.
struct Agent {
    proc: Started,
    lines: Arc<Mutex<Vec<String>>>,
    /// From its start to "ready" (the kernel programs loaded and attached).
    ready_after: Duration,
    /// CPU (user + system, the kernel's verifier included) it used to get there, in ns.
    startup_cpu_ns: u64,
}

impl Agent {
    fn start(root: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(root.join("target/release/wirespan"))
            .args(["run"])
            .args(args)
            .env("RUST_LOG", "warn")
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wirespan")?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("wirespan: ready") {
                    let _ = tx.send(());
                }
                l.lock().unwrap().push(line);
            }
        });
        let proc = Started {
            child,
            name: "wirespan".into(),
        };
        rx.recv_timeout(Duration::from_secs(60))
            .context("wirespan did not become ready within 60 s")?;
        let ready_after = started.elapsed();
        let startup_cpu_ns = proc_usage(proc.pid())?.0;
        Ok(Self {
            proc,
            lines,
            ready_after,
            startup_cpu_ns,
        })
    }

    /// CPU time (user + system) in nanoseconds, RSS and peak RSS in KiB, open descriptors.
    fn usage(&self) -> anyhow::Result<(u64, u64, u64, usize)> {
        proc_usage(self.proc.pid())
    }

    /// Stops the agent and returns its closing summary line.
    fn stop(mut self) -> String {
        self.proc.stop();
        sleep(Duration::from_millis(100));
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .rev()
            .find(|l| l.contains(" spans: "))
            .cloned()
            .unwrap_or_default()
    }
}

fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64, u64, usize)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu_ns = ticks * 1_000_000_000 / hz.max(1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((
        cpu_ns,
        status_number(&status, "VmRSS:"),
        status_number(&status, "VmHWM:"),
        fds,
    ))
}

/// Proportional set size in KiB: the RSS with each page divided among the processes that map
/// it (the binary's text is shared with any other wirespan on the machine).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|s| status_number(&s, "Pss:"))
        .unwrap_or(0)
}

/// Runs `f` while sampling `pid`'s RSS every 500 ms; returns what `f` returned and the samples
/// (KiB) from the third second on, the load's steady state (the first seconds are the agent's
/// start-up and its tables filling).
fn rss_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Vec<u64>) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let start = Instant::now();
            let mut samples = Vec::new();
            loop {
                sleep(Duration::from_millis(500));
                // Checked after the wait: a sample taken once the load is over is not one of it.
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if start.elapsed() >= Duration::from_secs(2)
                    && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                {
                    samples.push(status_number(&status, "VmRSS:"));
                }
            }
            samples
        });
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap_or_default())
    })
}

/// The first number after `key` in a /proc status file (0 if absent).
fn status_number(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Voluntary context switches of all of a process's threads: how often it went to sleep and
/// was woken (for the agent, mostly by the kernel's ring buffer).
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| status_number(&status, "voluntary_ctxt_switches:"))
        .sum()
}

/// A number after `key` in the agent's summary line (`... 123 spans: 120 exported, ...`).
fn summary_number(summary: &str, before: &str) -> u64 {
    let Some(i) = summary.find(before) else {
        return 0;
    };
    summary[..i]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or(0)
}

/// Run time and run count of each of wirespan's programs (`sock_*`), from the kernel's stats.
type BpfStats = BTreeMap<String, (u64, u64)>;

fn bpf_stats() -> anyhow::Result<BpfStats> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (Debian package bpftool)")?;
    let progs: Value = serde_json::from_slice(&out.stdout)?;
    let mut stats = BpfStats::new();
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        if name.starts_with("sock_enter_") || name.starts_with("sock_exit_") {
            let e = stats.entry(name.to_string()).or_default();
            e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            e.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(stats)
}

/// Seconds of the extra run per round, after the measured one, in which the kernel accounts
/// the programs' time.
const STATS_SECONDS: u64 = 3;

/// Runs `f` with `kernel.bpf_stats_enabled` on, and returns what each program did meanwhile.
///
/// The accounting reads the clock twice around each program run (on this machine's kvm-clock,
/// `sched_clock` was 1.6% of all CPU samples under load), a cost users do not pay, so it is on
/// only for this run, not for the runs whose throughput is compared.
fn with_bpf_stats<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, ProgramRuns)> {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    std::fs::write(KNOB, "1").context("enabling kernel.bpf_stats_enabled (needs root)")?;
    let before = bpf_stats();
    let out = f();
    let after = bpf_stats();
    std::fs::write(KNOB, "0").context("disabling kernel.bpf_stats_enabled")?;
    Ok((out, bpf_delta(&before?, &after?)))
}

/// What each program did between two readings: (name, run time, runs), busiest first.
type ProgramRuns = Vec<(String, u64, u64)>;

fn bpf_delta(before: &BpfStats, after: &BpfStats) -> ProgramRuns {
    let mut d: Vec<_> = after
        .iter()
        .map(|(name, &(time, count))| {
            let (t0, c0) = before.get(name).copied().unwrap_or_default();
            (
                name.clone(),
                time.saturating_sub(t0),
                count.saturating_sub(c0),
            )
        })
        .filter(|&(_, _, count)| count > 0)
        .collect();
    d.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    d
}

#[derive(Debug, Default, Clone)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
}

fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse()?;
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_us = duration_us(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_us = duration_us(v).unwrap_or(0.0);
        } else if t.contains(" requests in ") {
            w.requests = t.split_whitespace().next().unwrap_or("0").parse()?;
        }
    }
    if w.rps == 0.0 {
        bail!("could not read wrk's output: {out}");
    }
    Ok(w)
}

fn wrk(port: u16, seconds: u64) -> anyhow::Result<Wrk> {
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (Debian package wrk)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn nginx(dir: &Path, port: u16) -> anyhow::Result<Started> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/logs/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"hello from nginx\\n\"; }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )?;
    let s = start(
        "nginx",
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir),
    )?;
    wait_port(port)?;
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per-mode samples of one scenario.
type Samples = BTreeMap<&'static str, Vec<BTreeMap<&'static str, f64>>>;

fn med(samples: &Samples, mode: &str, key: &str) -> f64 {
    median(
        samples
            .get(mode)
            .map(|v| v.iter().filter_map(|m| m.get(key).copied()).collect())
            .unwrap_or_default(),
    )
}

fn nginx_scenario(root: &Path, args: &BenchArgs, sink: &mut Sink) -> anyhow::Result<Value> {
    let dir = root.join("target/bench/nginx");
    let port = free_port()?;
    let _nginx = nginx(&dir, port)?;
    // Warm up.
    wrk(port, 2)?;
    let modes = ["baseline", "floor", "wirespan"];
    let mut samples: Samples = BTreeMap::new();
    // Per wirespan round: (program, runs per request, ns per run).
    let mut programs_by_round: Vec<Vec<(String, f64, f64)>> = Vec::new();
    let endpoint = format!("http://{}", sink.grpc);
    for round in 0..args.rounds {
        for k in 0..modes.len() {
            let mode = modes[(round + k) % modes.len()];
            let agent = match mode {
                "floor" => Some(Agent::start(root, &["--inert", "--no-export"])?),
                "wirespan" => Some(Agent::start(
                    root,
                    &["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"],
                )?),
                _ => None,
            };
            let spans_before = sink.count()?;
            let cpu_before = agent.as_ref().map(|a| a.usage()).transpose()?;
            let wakeups_before = agent.as_ref().map_or(0, |a| wakeups(a.proc.pid()));
            let sink_cpu_before = proc_usage(sink.proc.pid())?.0;
            let (w, rss_samples) = match &agent {
                Some(a) => rss_during(a.proc.pid(), || wrk(port, args.seconds)),
                None => (wrk(port, args.seconds), Vec::new()),
            };
            let w = w?;
            let sink_cpu = proc_usage(sink.proc.pid())?.0 - sink_cpu_before;
            let mut m = BTreeMap::new();
            m.insert("rps", w.rps);
            m.insert("p50_us", w.p50_us);
            m.insert("p99_us", w.p99_us);
            m.insert("requests", w.requests as f64);
            if let Some(a) = agent {
                let (cpu, rss, hwm, _) = a.usage()?;
                let pss = pss_kib(a.proc.pid());
                let cpu_run = cpu - cpu_before.map(|c| c.0).unwrap_or(0);
                let woken = wakeups(a.proc.pid()).saturating_sub(wakeups_before);
                m.insert("startup_s", a.ready_after.as_secs_f64());
                m.insert("startup_cpu_s", a.startup_cpu_ns as f64 / 1e9);
                // Let the run's last batches arrive.
                sleep(Duration::from_secs(1));
                let spans = sink.count()? - spans_before;
                let (stats_run, programs) = with_bpf_stats(|| wrk(port, STATS_SECONDS))?;
                let stats_run = stats_run?;
                let summary = a.stop();
                sleep(Duration::from_millis(500));
                let bpf_ns: u64 = programs.iter().map(|p| p.1).sum();
                m.insert(
                    "bpf_ns_per_request",
                    bpf_ns as f64 / stats_run.requests.max(1) as f64,
                );
                if mode == "wirespan" {
                    let per_request = stats_run.requests.max(1) as f64;
                    programs_by_round.push(
                        programs
                            .iter()
                            .map(|(name, time, count)| {
                                (
                                    name.clone(),
                                    *count as f64 / per_request,
                                    *time as f64 / *count as f64,
                                )
                            })
                            .collect(),
                    );
                }
                // Steady: the median of the samples taken under load; also the one at its end.
                let steady = if rss_samples.is_empty() {
                    rss as f64
                } else {
                    median(rss_samples.iter().map(|&k| k as f64).collect())
                };
                m.insert("rss_kib", steady);
                m.insert("rss_end_kib", rss as f64);
                m.insert("pss_kib", pss as f64);
                m.insert("peak_rss_kib", hwm as f64);
                m.insert("agent_cpu_s", cpu_run as f64 / 1e9);
                m.insert(
                    "agent_wakeups_per_1k_requests",
                    woken as f64 * 1000.0 / w.requests.max(1) as f64,
                );
                if mode == "wirespan" {
                    // The receiver shares the cores: its decoding is part of what the traced
                    // nginx loses here, though it is not wirespan's own work.
                    m.insert("sink_cpu_s", sink_cpu as f64 / 1e9);
                    m.insert("spans_received", spans as f64);
                    m.insert("spans_per_request", spans as f64 / w.requests.max(1) as f64);
                    m.insert(
                        "agent_cpu_ns_per_span",
                        cpu_run as f64 / spans.max(1) as f64,
                    );
                    m.insert(
                        "lost_ringbuf",
                        summary_number(&summary, "unreadable buffers") as f64,
                    );
                    m.insert(
                        "spans_dropped",
                        summary_number(&summary, "dropped (queue full)") as f64,
                    );
                    m.insert(
                        "spans_exported",
                        summary_number(&summary, "exported,") as f64,
                    );
                    eprintln!("xtask: {summary}");
                }
            }
            eprintln!("xtask: nginx round {round} {mode}: {m:?}");
            samples.entry(mode).or_default().push(m);
        }
    }
    let base = med(&samples, "baseline", "rps");
    let mut result = json!({ "samples": samples_json(&samples) });
    for mode in modes {
        result[mode] = json!({
            "rps": med(&samples, mode, "rps"),
            "rps_ratio": med(&samples, mode, "rps") / base,
            "p50_us": med(&samples, mode, "p50_us"),
            "p99_us": med(&samples, mode, "p99_us"),
        });
    }
    for key in [
        "bpf_ns_per_request",
        "agent_cpu_ns_per_span",
        "rss_kib",
        "rss_end_kib",
        "pss_kib",
        "peak_rss_kib",
        "spans_per_request",
        "spans_dropped",
        "agent_wakeups_per_1k_requests",
        "agent_cpu_s",
        "sink_cpu_s",
        "startup_s",
        "startup_cpu_s",
    ] {
        result["wirespan"][key] = json!(med(&samples, "wirespan", key));
    }
    result["floor"]["bpf_ns_per_request"] = json!(med(&samples, "floor", "bpf_ns_per_request"));
    result["wirespan"]["programs"] = programs_json(&programs_by_round);
    Ok(result)
}

/// Each program's medians over the rounds, busiest first: runs per request, ns per run, and
/// their product, ns per request.
fn programs_json(rounds: &[Vec<(String, f64, f64)>]) -> Value {
    let mut names: Vec<&str> = rounds.iter().flatten().map(|p| p.0.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut rows: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let of = |f: fn(&(String, f64, f64)) -> f64| {
                median(
                    rounds
                        .iter()
                        .map(|r| r.iter().find(|p| p.0 == name).map_or(0.0, f))
                        .collect(),
                )
            };
            json!({
                "name": name,
                "runs_per_request": of(|p| p.1),
                "ns_per_run": of(|p| p.2),
                "ns_per_request": of(|p| p.1 * p.2),
            })
        })
        .collect();
    rows.sort_by(|a, b| num(&b["ns_per_request"]).total_cmp(&num(&a["ns_per_request"])));
    json!(rows)
}

fn samples_json(s: &Samples) -> Value {
    json!(s)
}

/// Open-loop load: `rate` GET requests per second for `seconds`, one connection per request
/// (the Flask development server closes after each answer), by 32 workers. Latency counts from
/// the scheduled send time, so a slow server cannot hide its queueing. Returns each request's
/// latency (sorted, in us), the rate achieved and the requests that failed.
fn fixed_rate(port: u16, rate: u32, seconds: u64) -> anyhow::Result<(Vec<f64>, f64, u64)> {
    let total = (rate as u64) * seconds;
    let start = Instant::now() + Duration::from_millis(100);
    let next = Arc::new(Mutex::new(0u64));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(Mutex::new(0u64));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (next, results, errors) = (next.clone(), results.clone(), errors.clone());
            std::thread::spawn(move || {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        if *n >= total {
                            return;
                        }
                        *n += 1;
                        *n - 1
                    };
                    let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    let now = Instant::now();
                    if at > now {
                        sleep(at - now);
                    }
                    match one_request(port) {
                        Ok(()) => results
                            .lock()
                            .unwrap()
                            .push(at.elapsed().as_secs_f64() * 1e6),
                        Err(_) => *errors.lock().unwrap() += 1,
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let mut lat = results.lock().unwrap().clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let errors = *errors.lock().unwrap();
    let rps = lat.len() as f64 / wall;
    Ok((lat, rps, errors))
}

/// The `q` quantile of `sorted` (the sample at rank `len * q`), 0 for none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n as f64 * q) as usize).min(n - 1)],
    }
}

/// A 95% bootstrap interval of the ratio of quantile `q` of all of `a`'s rounds to that of
/// `b`'s (each a round's latencies): in each of `draws` draws, the rounds of each side are
/// drawn again with replacement, and the requests of each round drawn (a fixed seed, so a
/// run's figures can be recomputed).
///
/// A p99 of a few thousand requests rests on its few dozen slowest, and it moves from round
/// to round with the machine by more than the 2% the target allows (plain rounds of one run:
/// 17.1, 17.7 and 19.6 ms); drawing rounds as well as requests puts both in the interval,
/// which says whether a run can tell a difference of that size at all.
fn ratio_interval(a: &[Vec<f64>], b: &[Vec<f64>], q: f64, draws: usize) -> (f64, f64) {
    let empty = |v: &[Vec<f64>]| v.iter().all(Vec::is_empty);
    if empty(a) || empty(b) || draws == 0 {
        return (0.0, 0.0);
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    // splitmix64
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut scratch = Vec::new();
    let mut resampled_quantile = |rounds: &[Vec<f64>], next: &mut dyn FnMut() -> u64| {
        scratch.clear();
        for _ in 0..rounds.len() {
            let v = &rounds[(next() % rounds.len() as u64) as usize];
            if !v.is_empty() {
                scratch.extend((0..v.len()).map(|_| v[(next() % v.len() as u64) as usize]));
            }
        }
        if scratch.is_empty() {
            return 0.0;
        }
        let k = ((scratch.len() as f64 * q) as usize).min(scratch.len() - 1);
        *scratch.select_nth_unstable_by(k, |x, y| x.total_cmp(y)).1
    };
    let mut ratios: Vec<f64> = (0..draws)
        .map(|_| {
            let qa = resampled_quantile(a, &mut next);
            let qb = resampled_quantile(b, &mut next);
            if qb > 0.0 { qa / qb } else { 0.0 }
        })
        .collect();
    ratios.sort_by(|x, y| x.total_cmp(y));
    (quantile(&ratios, 0.025), quantile(&ratios, 0.975))
}

fn one_request(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /work HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    if !buf.starts_with(b"HTTP/1.") || !buf.windows(4).any(|w| w == b" 200") {
        return Err(std::io::Error::other("not a 200"));
    }
    Ok(())
}

fn service_scenario(root: &Path, args: &BenchArgs, sink: &mut Sink) -> anyhow::Result<Value> {
    let dir = root.join("target/bench/service");
    std::fs::create_dir_all(&dir)?;
    let programs = root.join("tests/programs");
    let venv = crate::setup::venv();
    let go_bin = dir.join("goserver");
    crate::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&go_bin)
            .arg(programs.join("goserver.go"))
            .env("GOCACHE", dir.join("gocache"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", ""),
    )?;
    let go_port = free_port()?;
    let _go = start(
        "goserver",
        Command::new(&go_bin).arg(format!("127.0.0.1:{go_port}")),
    )?;
    wait_port(go_port)?;
    let next = format!("http://127.0.0.1:{go_port}/hello");
    let endpoint = format!("http://{}", sink.grpc);
    let http_endpoint = format!("http://{}", sink.http);
    let modes = ["plain", "wirespan", "sdk"];
    let mut samples: Samples = BTreeMap::new();
    // Every request's latency, per mode and round.
    let mut latencies: BTreeMap<&str, Vec<Vec<f64>>> = BTreeMap::new();
    for round in 0..args.rounds {
        for k in 0..modes.len() {
            let mode = modes[(round + k) % modes.len()];
            let port = free_port()?;
            let mut cmd = if mode == "sdk" {
                let mut c = Command::new(venv.join("bin/opentelemetry-instrument"));
                c.args([
                    "--traces_exporter",
                    "otlp",
                    "--metrics_exporter",
                    "none",
                    "--logs_exporter",
                    "none",
                ])
                .arg(venv.join("bin/python"))
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &http_endpoint)
                .env("OTEL_SERVICE_NAME", "bench-sdk");
                c
            } else {
                Command::new(venv.join("bin/python"))
            };
            cmd.arg(programs.join("sdk_service.py"))
                .arg(port.to_string())
                .env("NEXT", &next)
                .env("WORK_MS", args.work_ms.to_string());
            let _svc = start("service", &mut cmd)?;
            wait_port(port)?;
            let agent = if mode == "wirespan" {
                Some(Agent::start(
                    root,
                    &["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"],
                )?)
            } else {
                None
            };
            // Warm up the interpreter and the downstream connection path.
            let _ = fixed_rate(port, args.rate, 2)?;
            let spans_before = sink.count()?;
            let (lat, rps, errors) = fixed_rate(port, args.rate, args.service_seconds)?;
            let mut m = BTreeMap::new();
            m.insert("p50_us", quantile(&lat, 0.5));
            m.insert("p99_us", quantile(&lat, 0.99));
            latencies.entry(mode).or_default().push(lat);
            m.insert("rps", rps);
            m.insert("errors", errors as f64);
            if let Some(a) = agent {
                let (cpu, rss, _, _) = a.usage()?;
                a.stop();
                m.insert("agent_cpu_s", cpu as f64 / 1e9);
                m.insert("rss_kib", rss as f64);
            }
            sleep(Duration::from_millis(500));
            m.insert("spans_received", (sink.count()? - spans_before) as f64);
            eprintln!("xtask: service round {round} {mode}: {m:?}");
            samples.entry(mode).or_default().push(m);
        }
    }
    let base_p50 = med(&samples, "plain", "p50_us");
    let base_p99 = med(&samples, "plain", "p99_us");
    let mut result =
        json!({ "samples": samples_json(&samples), "rate": args.rate, "work_ms": args.work_ms });
    let pooled = |mode: &str| -> Vec<f64> {
        let mut all: Vec<f64> = latencies
            .get(mode)
            .into_iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        all.sort_by(|a, b| a.total_cmp(b));
        all
    };
    let rounds = |mode: &str| latencies.get(mode).map(Vec::as_slice).unwrap_or_default();
    let plain_p99 = quantile(&pooled("plain"), 0.99).max(f64::MIN_POSITIVE);
    for mode in modes {
        let all = pooled(mode);
        let all = all.as_slice();
        let (low, high) = ratio_interval(rounds(mode), rounds("plain"), 0.99, 1000);
        result[mode] = json!({
            "p50_us": med(&samples, mode, "p50_us"),
            "p99_us": med(&samples, mode, "p99_us"),
            "p50_ratio": med(&samples, mode, "p50_us") / base_p50,
            "p99_ratio": med(&samples, mode, "p99_us") / base_p99,
            "requests": all.len(),
            "pooled_p99_us": quantile(all, 0.99),
            "pooled_p99_ratio": quantile(all, 0.99) / plain_p99,
            "pooled_p99_ratio_95": [low, high],
            "rps": med(&samples, mode, "rps"),
            "spans_received": med(&samples, mode, "spans_received"),
        });
    }
    Ok(result)
}

fn soak(root: &Path, seconds: u64, sink: &mut Sink) -> anyhow::Result<Value> {
    let dir = root.join("target/bench/soak");
    let port = free_port()?;
    let _nginx = nginx(&dir, port)?;
    let endpoint = format!("http://{}", sink.grpc);
    let agent = Agent::start(
        root,
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--stats-every",
            "10",
        ],
    )?;
    let mut load = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::piped())
        .spawn()
        .context("running wrk")?;
    let mut rows = Vec::new();
    let begin = Instant::now();
    while begin.elapsed() < Duration::from_secs(seconds) {
        sleep(Duration::from_secs(10));
        let (cpu, rss, hwm, fds) = agent.usage()?;
        let tables = agent
            .lines
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|l| l.starts_with("wirespan: stats:"))
            .cloned()
            .unwrap_or_default();
        let row = json!({
            "t_s": begin.elapsed().as_secs(),
            "rss_kib": rss,
            "peak_rss_kib": hwm,
            "fds": fds,
            "cpu_s": cpu as f64 / 1e9,
            "agent": tables,
        });
        eprintln!("xtask: soak {row}");
        rows.push(row);
    }
    let mut out = String::new();
    load.wait()?;
    if let Some(mut o) = load.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    let summary = agent.stop();
    sleep(Duration::from_millis(500));
    Ok(json!({
        "seconds": seconds,
        "samples": rows,
        "wrk": out,
        "agent_summary": summary,
        "spans_received": sink.count()?,
    }))
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cores": cores,
    })
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    crate::run(Command::new("cargo").args([
        "build",
        "--release",
        "--package",
        "wirespan-tests",
        "--bin",
        "otlp-sink",
    ]))?;
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    // Off except in the runs that measure the programs' time (`with_bpf_stats`).
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0")
        .context("writing kernel.bpf_stats_enabled (needs root)")?;
    let mut sink = Sink::start(root)?;
    let result = (|| -> anyhow::Result<Value> {
        if let Some(secs) = args.soak {
            return Ok(json!({ "machine": machine(), "soak": soak(root, secs, &mut sink)? }));
        }
        let nginx = match args.only {
            Some(Scenario::Service) => Value::Null,
            _ => nginx_scenario(root, args, &mut sink)?,
        };
        let service = match args.only {
            Some(Scenario::Nginx) => Value::Null,
            _ => service_scenario(root, args, &mut sink)?,
        };
        Ok(json!({
            "machine": machine(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "rounds": args.rounds,
            "seconds": args.seconds,
            "nginx": nginx,
            "service": service,
        }))
    })();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    sink.proc.stop();
    let result = result?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    print_table(&result);
    eprintln!("xtask: results in {}", out.display());
    Ok(())
}

/// A number of the results, 0 where it is missing.
fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn print_table(r: &Value) {
    if let Some(s) = r.get("soak") {
        println!("soak: {} s", s["seconds"]);
        for row in s["samples"].as_array().into_iter().flatten() {
            println!(
                "  t={:>5}s rss={:>7} KiB peak={:>7} KiB fds={:>4} cpu={:>7.1}s",
                row["t_s"],
                row["rss_kib"],
                row["peak_rss_kib"],
                row["fds"],
                num(&row["cpu_s"])
            );
        }
        return;
    }
    if !r["nginx"].is_null() {
        print_nginx(r);
    }
    if !r["service"].is_null() {
        print_service(&r["service"]);
    }
}

fn print_nginx(r: &Value) {
    let n = &r["nginx"];
    println!(
        "nginx at saturation (wrk -t2 -c64), medians of {} rounds:",
        r["rounds"]
    );
    println!("  mode        req/s      ratio   p50 us   p99 us");
    for mode in ["baseline", "floor", "wirespan"] {
        let m = &n[mode];
        println!(
            "  {mode:<9} {:>9.0}  {:>7.3}  {:>7.0}  {:>7.0}",
            num(&m["rps"]),
            num(&m["rps_ratio"]),
            num(&m["p50_us"]),
            num(&m["p99_us"])
        );
    }
    let w = &n["wirespan"];
    println!(
        "  eBPF ns/request: wirespan {:.0}, floor {:.0}; agent CPU ns/span {:.0}; RSS under load {:.1} MiB (median of samples; {:.1} at the run's end, peak {:.1} MiB; PSS {:.1} MiB); spans/request {:.3}; spans dropped {:.0}; agent wake-ups per 1,000 requests {:.1}",
        num(&w["bpf_ns_per_request"]),
        num(&n["floor"]["bpf_ns_per_request"]),
        num(&w["agent_cpu_ns_per_span"]),
        num(&w["rss_kib"]) / 1024.0,
        num(&w["rss_end_kib"]) / 1024.0,
        num(&w["peak_rss_kib"]) / 1024.0,
        num(&w["pss_kib"]) / 1024.0,
        num(&w["spans_per_request"]),
        num(&w["spans_dropped"]),
        num(&w["agent_wakeups_per_1k_requests"]),
    );
    println!("  eBPF per program (wirespan):    runs/request   ns/run   ns/request");
    for p in w["programs"].as_array().into_iter().flatten() {
        println!(
            "    {:<28} {:>10.3} {:>8.0} {:>12.0}",
            p["name"].as_str().unwrap_or(""),
            num(&p["runs_per_request"]),
            num(&p["ns_per_run"]),
            num(&p["ns_per_request"]),
        );
    }
    println!(
        "  CPU during a wirespan run of {} s: agent {:.2} s, OTLP receiver {:.2} s (the receiver shares the cores)",
        r["seconds"],
        num(&w["agent_cpu_s"]),
        num(&w["sink_cpu_s"]),
    );
    println!(
        "  start-up: ready after {:.2} s, {:.2} s of CPU (most of it the kernel verifying the programs)",
        num(&w["startup_s"]),
        num(&w["startup_cpu_s"]),
    );
}

fn print_service(s: &Value) {
    println!(
        "realistic service (Flask, {} ms work + one call to Go) at {} req/s:",
        s["work_ms"], s["rate"]
    );
    println!(
        "  mode        p50 us   p99 us  p50 ratio  p99 ratio   spans  | all rounds: p99 ratio (95% interval)"
    );
    for mode in ["plain", "wirespan", "sdk"] {
        let m = &s[mode];
        println!(
            "  {mode:<9} {:>8.0} {:>8.0}  {:>9.3}  {:>9.3}  {:>6.0}  | {:.3} ({:.3}-{:.3}) of {} requests",
            num(&m["p50_us"]),
            num(&m["p99_us"]),
            num(&m["p50_ratio"]),
            num(&m["p99_ratio"]),
            num(&m["spans_received"]),
            num(&m["pooled_p99_ratio"]),
            num(&m["pooled_p99_ratio_95"][0]),
            num(&m["pooled_p99_ratio_95"][1]),
            m["requests"],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_the_sample_at_its_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 100.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.99), 0.0);
    }

    #[test]
    fn p99_ratio_interval_holds_the_true_ratio_and_counts_rounds_apart() {
        // Latencies spread like a service's: 5 ms of work and an exponential tail; rounds of
        // 1,000 requests.
        let mut state = 1u64;
        let mut round = |scale: f64| -> Vec<f64> {
            (0..1000)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                    scale * (5000.0 - 500.0 * (1.0 - u).max(1e-9).ln())
                })
                .collect()
        };
        let mut rounds = |scales: &[f64]| scales.iter().map(|&k| round(k)).collect::<Vec<_>>();
        let base = rounds(&[1.0, 1.0, 1.0]);
        let (low, high) = ratio_interval(&rounds(&[1.0, 1.0, 1.0]), &base, 0.99, 1000);
        assert!(low < 1.0 && 1.0 < high, "{low}-{high}");
        let (low, high) = ratio_interval(&rounds(&[1.3, 1.3, 1.3]), &base, 0.99, 1000);
        assert!(1.0 < low && low < 1.3 && 1.3 < high, "{low}-{high}");
        // The same requests, in rounds that the machine made 10% apart: a wider interval.
        let steady = ratio_interval(&rounds(&[1.0, 1.0, 1.0]), &base, 0.99, 1000);
        let spread = ratio_interval(&rounds(&[0.9, 1.0, 1.1]), &base, 0.99, 1000);
        assert!(
            spread.1 - spread.0 > 1.5 * (steady.1 - steady.0),
            "{steady:?} {spread:?}"
        );
        assert_eq!(ratio_interval(&[], &base, 0.99, 1000), (0.0, 0.0));
        assert_eq!(ratio_interval(&[vec![]], &base, 0.99, 1000), (0.0, 0.0));
    }
}
