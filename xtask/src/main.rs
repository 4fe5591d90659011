//! Project tasks: `cargo xtask setup | build | run | test | lint | fuzz | bench | screenshot`.
//!
//! `run` and `test` set up what is missing first, so that on a fresh Debian 12 machine (root)
//! each is the only command needed.

mod bench;
mod fuzz;
mod procs;
mod screenshot;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "wirespan's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: rust-src for nightly, bpf-linker, Debian packages, the test
    /// tools (Python venv, helm); mount tracefs.
    Setup {
        /// Only what building needs: rust-src and bpf-linker.
        #[arg(long)]
        toolchain: bool,
    },
    /// Build the agent (release) with its kernel programs.
    Build,
    /// Set up, build, and run the agent as root with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, lint, and run every test (unit and privileged end-to-end).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// cargo fmt --check and clippy -D warnings for the host crates and the kernel crate.
    Lint,
    /// Run the libFuzzer targets in fuzz/ (installs cargo-fuzz if missing).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (http_framing, trace_context, event_decode, stitcher).
        target: Option<String>,
    },
    /// Measure what wirespan costs traced applications (nginx at saturation, a realistic
    /// service at a fixed rate, eBPF time, agent CPU and memory); `--soak SECS` for a long run.
    Bench(bench::BenchArgs),
    /// Run a Python -> Node.js -> Go chain under the agent and save a headless-Chromium
    /// screenshot of its trace in the embedded Jaeger UI (installs Debian's chromium).
    Screenshot {
        /// The PNG to write (default target/trace.png).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { toolchain: true } => setup::toolchain(),
        Task::Setup { toolchain: false } => setup::all(),
        Task::Build => build(),
        Task::Run { args } => {
            setup::all()?;
            build()?;
            let bin = root().join("target/release/wirespan");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("wirespan exited with {status}");
            }
            Ok(())
        }
        Task::Test { filter } => {
            setup::all()?;
            build()?;
            lint()?;
            if filter.is_none() {
                // Every fuzz target briefly; `cargo xtask fuzz` runs them long.
                fuzz::run(&root(), fuzz::TARGETS, 10)?;
            }
            test(filter.as_deref())
        }
        Task::Lint => {
            setup::all()?;
            lint()
        }
        Task::Fuzz { seconds, target } => {
            setup::all()?;
            let targets: Vec<&str> = match &target {
                Some(t) => vec![t.as_str()],
                None => fuzz::TARGETS.to_vec(),
            };
            fuzz::run(&root(), &targets, seconds).map(|_| ())
        }
        Task::Bench(args) => {
            setup::all()?;
            build()?;
            bench::run(&root(), &args)
        }
        Task::Screenshot { out } => {
            setup::all()?;
            build()?;
            let root = root();
            let out = out.unwrap_or_else(|| screenshot::default_out(&root));
            screenshot::run(&root, &out)
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--package", "wirespan"]))
}

fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1"))?;
    // The kernel crate, for its own target, with the nightly that builds it.
    run(Command::new("rustup")
        .current_dir(root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "wirespan-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_TARGET_DIR", root().join("target/ebpf-lint")))
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let bin = root().join("target/release/wirespan");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--release"])
        .env("WIRESPAN_BIN", &bin)
        .env("WIRESPAN_TEST_VENV", setup::venv())
        // Unit tests do not load the kernel object.
        .env("AYA_BUILD_SKIP", "0");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    // Privileged end-to-end tests share one kernel: one at a time, as aya's own do.
    cmd.args(["--", "--test-threads=1"]);
    cmd.stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut totals = Totals::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // One closing line for the whole run (the last binary's own line may be a doc-test
    // binary with nothing in it).
    println!(
        "summary: {} passed, {} failed",
        totals.passed, totals.failed
    );
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; ...` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 20 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.12s");
        t.add("test result: FAILED. 8 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 28,
                failed: 2
            }
        );
    }
}
