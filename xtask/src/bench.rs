//! `cargo xtask bench`: what the mesh costs, measured on the lab in one run for each path
//! — direct (the lab without agents: the floor), warren in eBPF mode, warren in iptables
//! mode — across nodes (`demo/client` → `demo/server`) and on one node (`demo/client` →
//! `demo/peer`). Every figure is reported as an absolute and as a ratio to direct, in a
//! table on stdout and as JSON under `target/bench/`. Each case runs several times and
//! the median is kept; nothing here asserts a time.
//!
//! Load generators: `lab-app bench` (latency percentiles from HDR histograms, connection
//! rate, held connections) and iperf3 (throughput).
mod measure;
mod report;

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::ValueEnum;
use warren_lab::{Lab, RedirectMode, UpOptions};

use crate::setup::{self, Scope};
use report::{Figure, Report};

/// `cargo xtask bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run (under two minutes): one run per case, shorter cases, fewer held
    /// connections. For checking that nothing regressed badly, not for the record.
    #[arg(long)]
    pub quick: bool,
    /// The paths to measure (direct is always measured: it is the baseline).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [MeshPath::Ebpf, MeshPath::Iptables])]
    pub paths: Vec<MeshPath>,
    /// Runs of each case (the median is reported); default 3, 1 with --quick.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Let the CPUs go idle between packets. By default the bench holds
    /// `/dev/cpu_dma_latency` at 0 while it runs (as tuned's latency-performance profile
    /// does), because waking an idle CPU of a VM costs tens of microseconds — more than
    /// the path being measured (a direct round trip on the lab: 23 µs awake, 90 µs with
    /// idle CPUs).
    #[arg(long)]
    pub allow_cpu_idle: bool,
}

/// A way traffic goes between pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum MeshPath {
    /// No agents: the pods talk directly.
    Direct,
    /// warren with eBPF redirection.
    Ebpf,
    /// warren with iptables redirection.
    Iptables,
}

impl MeshPath {
    pub fn name(self) -> &'static str {
        match self {
            MeshPath::Direct => "direct",
            MeshPath::Ebpf => "ebpf",
            MeshPath::Iptables => "iptables",
        }
    }

    fn up_options(self) -> UpOptions {
        match self {
            MeshPath::Direct => UpOptions::no_agents(),
            MeshPath::Ebpf => UpOptions::with_agents(RedirectMode::Ebpf),
            MeshPath::Iptables => UpOptions::with_agents(RedirectMode::Iptables),
        }
    }
}

/// How much of each case to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub runs: usize,
    /// Length of each latency and rate case.
    pub case_length: Duration,
    /// Bytes of the single-stream throughput case.
    pub stream_bytes: u64,
    /// Parallel streams, and how long they run.
    pub parallel_streams: usize,
    pub parallel_length: Duration,
    /// Concurrency levels of the connection-rate case; the best rate is the saturation.
    pub rate_concurrency: Vec<usize>,
    /// Connections held open for the memory case.
    pub held_connections: usize,
    /// Whether the CPUs were kept out of idle states ([`CpusAwake`]).
    pub cpus_awake: bool,
}

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        if args.quick {
            Plan {
                quick: true,
                runs: args.runs.unwrap_or(1),
                case_length: Duration::from_secs(1),
                stream_bytes: 256 << 20,
                parallel_streams: 8,
                parallel_length: Duration::from_secs(1),
                rate_concurrency: vec![16],
                held_connections: 2_000,
                cpus_awake: false,
            }
        } else {
            Plan {
                quick: false,
                runs: args.runs.unwrap_or(3),
                case_length: Duration::from_secs(5),
                stream_bytes: 1 << 30,
                parallel_streams: 8,
                parallel_length: Duration::from_secs(5),
                rate_concurrency: vec![4, 16, 64],
                held_connections: 10_000,
                cpus_awake: false,
            }
        }
    }
}

/// Takes the lab down when the bench ends, however it ends.
struct DownGuard;

impl Drop for DownGuard {
    fn drop(&mut self) {
        if let Err(e) = Lab::down() {
            eprintln!("error: taking the lab down: {e:#}");
        }
    }
}

/// Keeps the CPUs out of idle states while it lives: the kernel honours a latency
/// request of 0 µs written to `/dev/cpu_dma_latency` for as long as the file is open.
struct CpusAwake {
    _request: std::fs::File,
}

impl CpusAwake {
    fn hold() -> Result<Self> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .context("opening /dev/cpu_dma_latency (run as root, or pass --allow-cpu-idle)")?;
        file.write_all(&0i32.to_ne_bytes())
            .context("writing 0 to /dev/cpu_dma_latency")?;
        Ok(CpusAwake { _request: file })
    }
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let mut plan = Plan::new(args);
    let _awake = if args.allow_cpu_idle {
        None
    } else {
        let awake = CpusAwake::hold()?;
        plan.cpus_awake = true;
        Some(awake)
    };
    let mut paths = vec![MeshPath::Direct];
    paths.extend(
        args.paths
            .iter()
            .copied()
            .filter(|p| *p != MeshPath::Direct),
    );
    paths.dedup();
    setup::ensure(Scope::Everything)?;
    // The agent and the load generators as they would be shipped: optimized.
    warren_lab::cargo::use_release_builds();
    let _down = DownGuard;

    let mut figures: Vec<(MeshPath, Vec<Figure>)> = Vec::new();
    for path in &paths {
        eprintln!("bench: {} — bringing the lab up", path.name());
        // Each path gets a fresh lab: nothing of the previous one (sockets in TIME_WAIT,
        // agents) weighs on it.
        Lab::down().context("taking the previous lab down")?;
        let lab = Lab::up(&path.up_options())
            .with_context(|| format!("bringing the lab up for the {} path", path.name()))?;
        let measured = measure::path(&lab, *path, &plan)
            .with_context(|| format!("measuring the {} path", path.name()))?;
        figures.push((*path, measured));
    }

    let report = Report::new(&plan, figures);
    print!("{}", report.table());
    let written = report.write_json()?;
    println!("\nJSON: {}", written.display());
    Ok(ExitCode::SUCCESS)
}
