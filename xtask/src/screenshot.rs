//! `cargo xtask screenshot`: a three-service trace in the embedded Jaeger UI, photographed by
//! headless Chromium.
//!
//! Starts the test programs as a chain (Python `gateway` -> Node.js `orders` -> Go `inventory`)
//! on loopback, the agent with its embedded UI on a free port, sends one request with curl,
//! finds the trace through the UI's API, and saves a PNG of its trace page. Every process it
//! starts is stopped by its PID at the end.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::procs::{Started, free_port, start, wait_port};

fn spawn(name: &str, cmd: &mut Command, port: u16) -> anyhow::Result<Started> {
    let s = start(name, cmd.env("OTEL_SERVICE_NAME", name))?;
    wait_port(port)?;
    Ok(s)
}

fn curl(url: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()?;
    if !out.status.success() {
        bail!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(root: &Path, out: &Path) -> anyhow::Result<()> {
    crate::setup::chromium()?;
    let programs = root.join("tests/programs");
    let dir = root.join("target/screenshot");
    std::fs::create_dir_all(&dir)?;
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
    let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
    let _go = spawn(
        "inventory",
        Command::new(&go_bin).arg(format!("127.0.0.1:{}", ports[2])),
        ports[2],
    )?;
    let _node = spawn(
        "orders",
        Command::new("node")
            .arg(programs.join("chain.js"))
            .arg(ports[1].to_string())
            .arg(format!("http://127.0.0.1:{}/hello", ports[2])),
        ports[1],
    )?;
    let _py = spawn(
        "gateway",
        Command::new("python3")
            .arg(programs.join("chain.py"))
            .args(["--port", &ports[0].to_string()])
            .args(["--next", &format!("http://127.0.0.1:{}/orders", ports[1])]),
        ports[0],
    )?;
    let ui = format!("127.0.0.1:{}", ports[3]);
    let mut agent = Command::new(root.join("target/release/wirespan"))
        .args(["--ui-address", &ui, "--log-spans"])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wirespan")?;
    let stderr = agent.stderr.take().context("piped stderr")?;
    let _agent = Started {
        child: agent,
        name: "wirespan".into(),
    };
    // The UI listens before the probes attach: wait for the agent to say it is ready.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
            if line.starts_with("wirespan: ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .context("wirespan did not become ready within 60 s")?;
    curl(&format!("http://127.0.0.1:{}/checkout", ports[0]))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let trace_id = loop {
        let body = curl(&format!("http://{ui}/api/traces?service=curl&limit=5"))?;
        // The first traceID of a trace with the whole chain in it.
        if body.contains("\"inventory\"")
            && let Some(i) = body.find("\"traceID\":\"")
        {
            let rest = &body[i + 11..];
            break rest[..rest.find('"').unwrap_or(0)].to_string();
        }
        if Instant::now() > deadline {
            bail!("no three-service trace in the UI after 15 s: {body}");
        }
        sleep(Duration::from_millis(300));
    };
    let profile = dir.join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let url = format!("http://{ui}/trace/{trace_id}");
    crate::run(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--virtual-time-budget=8000",
                "--window-size=1600,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--screenshot={}", out.display()))
            .arg(&url),
    )?;
    eprintln!("xtask: trace {trace_id} ({url}) saved to {}", out.display());
    Ok(())
}

/// Default output file.
pub fn default_out(root: &Path) -> PathBuf {
    root.join("target/trace.png")
}
