//! Builds the kernel programs in `ebpf/` and leaves the object in OUT_DIR for embedding.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let object = std::path::Path::new(&out_dir).join("wirespan");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // AYA_BUILD_SKIP=1 keeps `cargo check`/clippy fast and lets hosts without bpf-linker
    // compile: the binary then embeds an empty object and refuses to capture, saying why.
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        std::fs::write(&object, []).context("writing the empty placeholder object")?;
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent/ has no parent"))?
        .join("ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "wirespan-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs (needs the nightly toolchain with rust-src and bpf-linker: run `cargo xtask setup`)")
}
