use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// aya warns at every start, with a hundred lines of BTF, that the kernel refused the
/// object's BTF (aya-log's `Global<u8>` has a type name the kernel rejects); the programs
/// load without it, so that warning is noise for operators. Kept quiet unless RUST_LOG
/// mentions aya.
const QUIET_AYA: &str = "aya::bpf=error";

fn log_filter() -> EnvFilter {
    let requested = std::env::var("RUST_LOG").unwrap_or_default();
    let base = if requested.trim().is_empty() {
        "info".to_owned()
    } else {
        requested
    };
    let directives = if base.contains("aya") {
        base
    } else {
        format!("{base},{QUIET_AYA}")
    };
    EnvFilter::try_new(&directives).unwrap_or_else(|err| {
        eprintln!("warning: RUST_LOG={directives:?} is not a valid log filter ({err}); using info");
        EnvFilter::new(format!("info,{QUIET_AYA}"))
    })
}

/// warren: sidecarless mutual TLS for Kubernetes pods, one agent per node.
#[derive(Debug, Parser)]
#[command(name = "warren", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: capture the node's enrolled pods and carry their traffic.
    Agent(Box<warren::config::AgentArgs>),
    /// Manage the certificate authority that signs workload certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Explain what the agents will enforce for a config and policy, workload by
    /// workload, and flag what will fail or surprise. Exit status: 0 nothing flagged,
    /// 2 problems flagged, 1 the inputs cannot be read.
    Check(warren::check::CheckArgs),
    /// Remove everything warren added to a node (eBPF pins, iptables rules in its pods),
    /// so pod traffic flows directly again. Run it once the agent has stopped; a second
    /// run finds nothing to do.
    Uninstall(warren::uninstall::UninstallArgs),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a new root CA in DIR (Istio's plug-in CA file layout).
    Init {
        /// Directory to create the CA in; must not already hold one.
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// SPIFFE trust domain the CA signs identities for.
        #[arg(long, default_value = warren::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // clap exits 2 on a usage error, which `warren check` uses for "problems
            // found"; for check, a usage error is an input that cannot be read.
            let check = std::env::args_os().nth(1).is_some_and(|arg| arg == "check");
            let code = match err.exit_code() {
                0 => 0,
                _ if check => warren::check::EXIT_INPUT_ERROR,
                _ => 2,
            };
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Check(args) => {
            let outcome = warren::check::run(&args);
            match &outcome {
                Ok(report) => print!("{report}"),
                Err(err) => eprintln!("error: {err}"),
            }
            ExitCode::from(warren::check::exit_code(&outcome))
        }
        Command::Uninstall(args) => {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("error: warren uninstall must run as root: it enters pods' network namespaces and removes pinned eBPF objects");
                return ExitCode::FAILURE;
            }
            match warren::uninstall::run(&args) {
                Ok(removed) => {
                    print!("{removed}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            match warren::identity::CertificateAuthority::init(&dir, &trust_domain) {
                Ok(()) => {
                    println!(
                        "created a CA for trust domain {trust_domain} in {}",
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Agent(args) => {
            // Data path on a small multi-thread runtime, as ztunnel does.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("warren-worker")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(warren::agent::run((*args).into())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err}");
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
