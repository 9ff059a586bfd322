//! `cargo xtask fuzz`: run every fuzz target (`fuzz/`, cargo-fuzz on nightly, libFuzzer
//! with AddressSanitizer) for a bounded time each, starting from the seeds in
//! `fuzz/seeds/<target>/`. What a run learns goes to `target/fuzz-corpus/<target>/` (kept
//! between runs, never committed); a crash leaves its input in `fuzz/artifacts/<target>/`
//! and fails the command, naming it.
//!
//! Every target is a parser of input warren does not control: what a peer sends on
//! 15008, what any pod sends the CA, policy and config files, CNI JSON, capture files.
//! Besides crashes and sanitizer reports, libFuzzer fails a run on a single allocation
//! over [`MALLOC_LIMIT_MB`]: a parser must never size a buffer from a length field alone.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::setup::{self, Scope};

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &[
    "hbone_connect",
    "ca_request",
    "policy_yaml",
    "local_config",
    "cni_json",
    "pcap",
];

/// A single allocation larger than this is a finding.
const MALLOC_LIMIT_MB: u32 = 256;
/// The whole fuzzing process may not grow past this.
const RSS_LIMIT_MB: u32 = 2048;

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs (e.g. 60s, 10m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub time: Duration,
    /// Only these targets (default: all).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

pub fn run(args: &FuzzArgs) -> Result<ExitCode> {
    setup::ensure(Scope::Fuzz)?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for target in &args.targets {
            if !TARGETS.contains(&target.as_str()) {
                bail!(
                    "no fuzz target {target:?}; the targets are: {}",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    run_targets(&targets, args.time)?;
    Ok(ExitCode::SUCCESS)
}

/// Build the targets once, then run each for `time`; the first crash fails.
pub fn run_targets(targets: &[&str], time: Duration) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    println!(
        "fuzz: building {} target(s) (nightly, AddressSanitizer)",
        targets.len()
    );
    let status = cargo_fuzz(&root)
        .arg("build")
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status}); see the compiler output above");
    }
    for target in targets {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target);
        println!("fuzz: {target} for {}", humantime::format_duration(time));
        let status = cargo_fuzz(&root)
            .args(["run", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", time.as_secs().max(1)))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        if !status.success() {
            bail!(
                "fuzz target {target} found a failing input ({status}); it is in {}; reproduce \
                 with `cargo +nightly fuzz run {target} <that file>`",
                fuzz_dir.join("artifacts").join(target).display()
            );
        }
    }
    println!("fuzz: {} target(s) ran without a finding", targets.len());
    Ok(())
}

/// `cargo +nightly fuzz …`, run from the workspace root, where cargo-fuzz finds `fuzz/`.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root);
    cmd
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}
