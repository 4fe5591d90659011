//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/` (HTTP framing, trace context, kernel
//! event decoding, the stitcher), each for a while, from the seed corpus in `fuzz/corpus/`.
//!
//! New inputs go to `target/fuzz-corpus/<target>` (the committed seeds stay as they are) and
//! crashes to `target/fuzz-artifacts/<target>/`; a crash fails the task with the reproducer's
//! path. Each run's executions are printed. `cargo xtask test` runs every target for 10 s.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

pub const TARGETS: &[&str] = &["http_framing", "trace_context", "event_decode", "stitcher"];

/// cargo-fuzz, installed with the stable toolchain if missing.
fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    crate::run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz@0.13.1"]))
}

/// Runs each of `targets` for `seconds`; returns (target, executions) per target.
pub fn run(root: &Path, targets: &[&str], seconds: u64) -> anyhow::Result<Vec<(String, u64)>> {
    cargo_fuzz()?;
    let mut results = Vec::new();
    for t in targets {
        let work = root.join("target/fuzz-corpus").join(t);
        let artifacts = root.join("target/fuzz-artifacts").join(t);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root)
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                t,
            ])
            .arg(&work)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            // The agent's kernel object is not needed to fuzz userspace code.
            .env("AYA_BUILD_SKIP", "1")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let out = cmd
            .output()
            .with_context(|| format!("running cargo fuzz for {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} failed (reproducer in {}):\n{}",
                artifacts.display(),
                tail.join("\n")
            );
        }
        // libFuzzer's final stats: "stat::number_of_executed_units: N".
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        eprintln!("xtask: fuzz {t}: {runs} executions in {seconds} s, no crash");
        results.push((t.to_string(), runs));
    }
    Ok(results)
}
