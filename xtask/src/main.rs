//! `cargo xtask`: the chores a build script should not do — installing
//! prerequisites, the lab (a cluster simulated with network namespaces), the demo
//! and the end-to-end test run. The eBPF object itself is built by `agent/build.rs`.
#![deny(rust_2018_idioms)]

mod bench;
mod demo;
mod fuzz;
mod lab;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_lab::RedirectMode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "warren's development tasks",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and install what building and running warren needs (apt tools, nightly
    /// with rust-src, bpf-linker 0.10); a quick no-op when all is there.
    Setup,
    /// The lab: a cluster of network namespaces with one agent per node.
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
    /// Bring the lab up, send checked traffic between pods, show what the agents
    /// logged, and take the lab down again (also on failure).
    Demo {
        /// Redirect mode of the agents.
        #[arg(long, value_enum, default_value_t = RedirectMode::Ebpf)]
        redirect: RedirectMode,
        /// Run without agents: the same traffic with the mesh off.
        #[arg(long)]
        no_agents: bool,
    },
    /// Measure what the mesh costs (latency, throughput, connection rate, agent memory)
    /// on the lab, as ratios against direct connections measured in the same run; a
    /// table on stdout, JSON under target/bench/. Takes the lab down at the end.
    Bench(bench::BenchArgs),
    /// Run every fuzz target (cargo-fuzz, nightly) for a while each, from the seeds in
    /// fuzz/seeds; a finding fails with the input's path.
    Fuzz(fuzz::FuzzArgs),
    /// Run the tests (as root): build warren and the lab, `cargo test`, lab down, then a
    /// short run of every fuzz target.
    Test {
        /// Arguments passed on to `cargo test`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(setup::Scope::Tests).map(|()| {
            println!("setup: all prerequisites are present");
            ExitCode::SUCCESS
        }),
        Command::Lab { command } => lab::run(command),
        Command::Demo {
            redirect,
            no_agents,
        } => demo::run(redirect, !no_agents),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Test { args } => test::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a finished child: its own, or 128 + signal like a shell.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
