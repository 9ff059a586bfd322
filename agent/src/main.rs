use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// aya warns at every start, with a hundred lines of BTF, that the kernel refused the
/// object's BTF (aya-log's `Global<u8>` has a type name the kernel rejects); the programs
/// load without it, so that warning is noise for operators. Kept quiet unless RUST_LOG
/// mentions aya.
const QUIET_AYA: &str = "aya::bpf=error";

/// The log filter from RUST_LOG (default `info`), with aya's noise kept quiet, and its
/// directives as text.
fn log_filter() -> (String, EnvFilter) {
    let requested = std::env::var("RUST_LOG").unwrap_or_default();
    let base = if requested.trim().is_empty() {
        "info".to_owned()
    } else {
        requested
    };
    let directives = quiet_aya(&base);
    match EnvFilter::try_new(&directives) {
        Ok(filter) => (directives, filter),
        Err(err) => {
            eprintln!(
                "warning: RUST_LOG={directives:?} is not a valid log filter ({err}); using info"
            );
            let fallback = quiet_aya("info");
            let filter = EnvFilter::new(&fallback);
            (fallback, filter)
        }
    }
}

fn quiet_aya(directives: &str) -> String {
    if directives.contains("aya") {
        directives.to_owned()
    } else {
        format!("{directives},{QUIET_AYA}")
    }
}

/// Log to stderr through a filter that the admin endpoint can change at run time.
/// Diagnostics to stderr and the access log to stdout, both through writer threads that
/// never make the caller wait (`log_output`); the returned guard flushes them when
/// `main` ends.
fn init_logging() -> (warren::admin::LogControl, warren::log_output::Outputs) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let outputs = warren::log_output::install();
    let (directives, filter) = log_filter();
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(outputs.diagnostics.clone())
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let control = warren::admin::LogControl::new(directives, move |requested| {
        let filter = EnvFilter::try_new(quiet_aya(requested)).map_err(|err| err.to_string())?;
        handle.reload(filter).map_err(|err| err.to_string())
    });
    (control, outputs)
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
    /// Put the `warren-cni` plugin into this node's CNI chain, or take it out.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Explain what the agents will enforce for a config and policy, workload by
    /// workload, and flag what will fail or surprise. Exit status: 0 nothing flagged,
    /// 1 problems flagged, 2 the inputs cannot be read.
    Check(warren::check::CheckArgs),
    /// Istio policy files (PeerAuthentication, AuthorizationPolicy).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove everything warren added to a node (eBPF pins, iptables rules in its pods),
    /// so pod traffic flows directly again. Run it once the agent has stopped; a second
    /// run finds nothing to do.
    Uninstall(warren::uninstall::UninstallArgs),
    /// Prove that traffic between enrolled workloads is encrypted: capture TCP on an
    /// interface for a while (tcpdump, as root) or read a pcap file, and report, per pair
    /// of addresses, whether the payload was TLS or clear text. Exit status: 0 all
    /// encrypted, 1 clear text flagged (or no traffic seen: nothing proved), 2 nothing
    /// could be captured or read.
    Verify(warren::verify::VerifyArgs),
    /// The node's view at a glance, from the running agent (its admin endpoint on the
    /// node's loopback): redirect mode, readiness, enrolled pods, certificate health,
    /// policies and the last refusals. Exit status: 0 healthy, 1 something needs
    /// attention, 2 no agent answered.
    Status(warren::status::StatusArgs),
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
    /// Check that DIR holds a CA warren can use (e.g. Istio's `cacerts`: RSA or ECDSA,
    /// a root or an intermediate, several roots in root-cert.pem) and describe it. A leaf
    /// it signs must verify against root-cert.pem, as peers will verify it.
    Check {
        /// The CA directory (root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem).
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
    },
    /// Serve the cluster's CA (Istio's certificate API over gRPC): sign the CSRs of node
    /// agents for the pods on their node, after a TokenReview of their token. The CA is
    /// kept in a Secret (a new root on the first start) and its root published in a
    /// ConfigMap.
    Serve(Box<warren::ca_service::CaServeArgs>),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Decode a policy file (or every *.yaml/*.yml of a directory) exactly as the agent
    /// does, and refuse it, with file:line:column and the reason, if any document does
    /// not decode — what `kubectl apply` or `istioctl validate` would say before a file
    /// is put in place. Exit status: 0 every document decodes, 1 one does not or the
    /// path cannot be read.
    Validate {
        /// The policy file or directory.
        #[arg(value_name = "PATH")]
        path: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CniCommand {
    /// Copy `warren-cni` into the CNI bin dir and append it to the node's network config.
    /// Running it again changes nothing.
    Install(warren::cni::install::InstallArgs),
    /// Remove `warren-cni` from the node's network config and its bin dir.
    Uninstall(warren::cni::install::UninstallArgs),
}

fn main() -> ExitCode {
    // A usage error exits 2, which `check` and `verify` also use for "could not check".
    let cli = Cli::parse();
    let (logs, _outputs) = init_logging();
    match cli.command {
        Command::Check(args) => {
            let outcome = warren::check::run(&args);
            match &outcome {
                Ok(report) => print!("{report}"),
                Err(err) => eprintln!("error: {err}"),
            }
            ExitCode::from(warren::check::exit_code(&outcome))
        }
        Command::Verify(args) => {
            let outcome = warren::verify::run(&args, |progress| eprintln!("{progress}"));
            match &outcome {
                Ok(report) => print!("{report}"),
                Err(err) => eprintln!("error: {err}"),
            }
            ExitCode::from(warren::verify::exit_code(&outcome))
        }
        Command::Status(args) => status(&args),
        Command::Policy(PolicyCommand::Validate { path }) => {
            match warren::policy::decode::load_path(&path) {
                Ok(policies) => {
                    println!(
                        "{}: {} polic{} decode{}",
                        path.display(),
                        policies.len(),
                        if policies.len() == 1 { "y" } else { "ies" },
                        if policies.len() == 1 { "s" } else { "" }
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Uninstall(args) => {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("error: warren uninstall must run as root: it enters pods' network namespaces and removes pinned eBPF objects");
                return ExitCode::FAILURE;
            }
            if let Some(daemonset) = &args.unless_daemonset_remains {
                match daemonset_remains(daemonset) {
                    Ok(true) => {
                        println!("DaemonSet {daemonset} remains (a rolling update or a restart): nothing removed; the next agent takes the pods over, and they fail closed until it does");
                        return ExitCode::SUCCESS;
                    }
                    Ok(false) => {
                        println!("DaemonSet {daemonset} is being removed: uninstalling warren from this node")
                    }
                    // Not knowing, keep the pods protected: a node left captured fails
                    // closed and `warren uninstall` can still be run by hand.
                    Err(err) => {
                        eprintln!("error: {err}; nothing removed (run `warren uninstall` by hand if warren is being removed)");
                        return ExitCode::FAILURE;
                    }
                }
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
        Command::Cni(CniCommand::Install(args)) => match warren::cni::install::install(&args) {
            Ok(config) => {
                println!(
                    "warren-cni installed in {} and chained in {}",
                    args.bin_dir.display(),
                    config.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Cni(CniCommand::Uninstall(args)) => match warren::cni::install::uninstall(&args) {
            Ok(changed) if changed.is_empty() => {
                println!("warren-cni was not installed; nothing to do");
                ExitCode::SUCCESS
            }
            Ok(changed) => {
                for path in changed {
                    println!("removed warren-cni from {}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
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
        Command::Ca(CaCommand::Serve(args)) => serve(warren::ca_service::run(*args)),
        Command::Ca(CaCommand::Check { dir }) => {
            match warren::identity::CertificateAuthority::load(&dir) {
                Ok(ca) => {
                    print!("{}", ca.summary());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Agent(args) => {
            let config = match warren::config::Config::try_from(*args) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            serve(warren::agent::run(config, Some(logs)))
        }
    }
}

/// Run a long-lived service (the agent, the CA) to its end on a small multi-thread
/// runtime, as ztunnel does; its error is logged and printed.
fn serve<E: std::fmt::Display>(
    service: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
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
    match runtime.block_on(service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Ask the API server (in-cluster credentials, or KUBECONFIG) about the DaemonSet.
fn daemonset_remains(daemonset: &str) -> Result<bool, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|err| format!("cannot make a Kubernetes client: {err}"))?;
        warren::uninstall::daemonset_remains(client, daemonset).await
    })
}

/// `warren status`: fetch the agent's view and print it.
fn status(args: &warren::status::StatusArgs) -> ExitCode {
    use warren::status::{self, Summary, EXIT_UNREACHABLE};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let fetched = runtime.block_on(status::fetch(args.admin_addr));
    let view = fetched.and_then(|json| {
        if args.json {
            print!("{json}");
        }
        status::parse(args.admin_addr, &json)
    });
    match view {
        Ok(view) => {
            let summary = Summary {
                view: &view,
                now: std::time::SystemTime::now(),
            };
            if !args.json {
                print!("{summary}");
            }
            ExitCode::from(summary.exit_code())
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}
