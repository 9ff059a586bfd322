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
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
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
