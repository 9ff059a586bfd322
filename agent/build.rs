//! Builds the kernel programs (`warren-ebpf`) and embeds them, as aya-template does.
//!
//! The eBPF crate needs the nightly toolchain with `rust-src` and `bpf-linker`. Their
//! absence is checked first so that a plain `cargo build` says which command fixes it,
//! instead of failing deep inside a nested cargo invocation.
use std::process::Command;

use anyhow::{anyhow, Context as _};

const FIX: &str = "run `cargo xtask setup` (it installs them), or by hand: \
`rustup toolchain install nightly --component rust-src` and \
`cargo +nightly install bpf-linker@0.10.0 --locked`";

fn main() {
    // Print the cause chain only: a backtrace of the build script helps nobody here.
    if let Err(err) = build() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    check_prerequisites()?;
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "warren-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .with_context(|| {
        format!("building the eBPF programs (warren-ebpf) failed; if a tool is missing, {FIX}")
    })
}

fn check_prerequisites() -> anyhow::Result<()> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(&linker, Ok(out) if out.status.success()) {
        return Err(anyhow!(
            "bpf-linker is not installed (needed to build the eBPF programs); {FIX}"
        ));
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .ok_or_else(|| anyhow!("the nightly Rust toolchain is not installed; {FIX}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let rust_src = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !rust_src.exists() {
        return Err(anyhow!(
            "the nightly toolchain lacks the rust-src component; {FIX}"
        ));
    }
    Ok(())
}
