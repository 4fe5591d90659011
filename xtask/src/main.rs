//! Project tasks: `cargo xtask setup | build | run | test | lint`.
//!
//! `run` and `test` set up what is missing first, so that on a fresh Debian 12 machine (root)
//! each is the only command needed.

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
    /// Install what is missing: rust-src for nightly, bpf-linker, Debian packages; mount tracefs.
    Setup,
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::all(),
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
            test(filter.as_deref())
        }
        Task::Lint => {
            setup::all()?;
            lint()
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
        // Unit tests do not load the kernel object.
        .env("AYA_BUILD_SKIP", "0");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    // Privileged end-to-end tests share one kernel: one at a time, as aya's own do.
    cmd.args(["--", "--test-threads=1"]);
    run(&mut cmd)
}
