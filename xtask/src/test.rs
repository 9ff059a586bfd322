//! `cargo xtask test`: the project's one test command (CI runs it through `.ci/run`):
//! the unit and end-to-end tests, then a short run of every fuzz target.

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use warren_lab::{cargo, Lab};

use crate::setup::{self, Scope};

pub fn run(args: &[String]) -> Result<ExitCode> {
    setup::ensure(Scope::Tests)?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the end-to-end tests need root: they create network namespaces and load eBPF; \
             run as root, e.g. sudo -E cargo xtask test"
        );
    }
    // Built up front, so that tests starting the lab find both binaries ready.
    let status = cargo::cargo()
        .args(["build", "-p", "warren", "-p", "warren-lab"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "cargo build -p warren -p warren-lab failed ({status}); see the compiler output above"
        );
    }
    let tests = cargo::cargo()
        .arg("test")
        .args(args)
        .status()
        .context("running cargo test")?;
    // Whatever the tests left running, take it down.
    if let Err(e) = Lab::down() {
        eprintln!("error: taking the lab down after the tests: {e:#}");
        if tests.success() {
            return Ok(ExitCode::FAILURE);
        }
    }
    if !tests.success() {
        return Ok(crate::exit_code(tests));
    }
    // The whole suite (no filter) ends with a short run of every fuzz target: enough to
    // replay the seeds and catch a parser that breaks on the obvious; `cargo xtask fuzz`
    // runs longer.
    if args.is_empty() {
        crate::fuzz::run_targets(crate::fuzz::TARGETS, FUZZ_TIME_PER_TARGET)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// How long the test run fuzzes each target.
const FUZZ_TIME_PER_TARGET: std::time::Duration = std::time::Duration::from_secs(20);
