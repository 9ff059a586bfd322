//! `cargo xtask lab …`: bring the lab up and down, look at it, run things in it.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use warren_lab::{Family, Lab, RedirectMode, UpOptions};

use crate::setup::{self, Scope};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create the lab (namespaces, links, cgroups) and start an agent per node;
    /// returns the running lab if it is already up in this mode.
    Up {
        /// Redirect mode of the agents.
        #[arg(long, value_enum, default_value_t = RedirectMode::Auto)]
        redirect: RedirectMode,
        /// Only the topology, no agents (the mesh off).
        #[arg(long)]
        no_agents: bool,
        /// Lifetime of the agents' workload certificates (e.g. 6s, 10m; default 24h).
        /// The end-to-end tests run their lab with 6s.
        #[arg(long, value_parser = humantime::parse_duration)]
        cert_lifetime: Option<std::time::Duration>,
        /// Run optimized agents (`--release` builds), as `cargo xtask bench` does: for
        /// measuring or profiling by hand.
        #[arg(long)]
        release: bool,
        /// Declare the `outside` host a foreign HBONE workload
        /// (spiffe://cluster.local/ns/outside/sa/default): enrolled pods reach it through
        /// its port 15008, whatever HBONE node (ztunnel, …) runs there.
        #[arg(long)]
        foreign_hbone: bool,
        /// Give every agent this existing CA instead of a new one: a directory in Istio's
        /// plug-in CA layout (`cacerts`: root-cert.pem, ca-cert.pem, ca-key.pem,
        /// cert-chain.pem; RSA or ECDSA), so the lab shares a root with an Istio mesh.
        /// It is copied into the lab and checked with `warren ca check`.
        #[arg(long, value_name = "DIR")]
        cacerts: Option<std::path::PathBuf>,
    },
    /// Remove everything the lab created (also from a half-made lab).
    Down,
    /// Show nodes, pods and their addresses, the mode and the agents.
    Status,
    /// Run a command in a pod (`<ns>/<pod>`: its netns and cgroup), `node/<name>`,
    /// `outside` or `wire`; its exit status is ours.
    Exec {
        /// Where to run it.
        target: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a pod's IPv4 address (or IPv6 with --6).
    Ip {
        /// The pod, `<ns>/<pod>`.
        pod: String,
        /// The IPv6 address instead.
        #[arg(long = "6")]
        v6: bool,
    },
    /// Add Istio policy documents for every agent, as `kubectl apply -f` would: the file
    /// is decoded first with the agent's own decoder, and one that does not decode is
    /// refused (file:line:column and the reason; exit status 1) and nothing is placed.
    /// The agents reload within a couple of seconds.
    Apply {
        /// A YAML file of PeerAuthentication / AuthorizationPolicy documents.
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Remove documents added with `apply -f FILE` (by the same file name).
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Put a namespace's pods in the mesh while the agents run (like labelling the
    /// namespace `warren.dev/mesh=enabled`); the agents capture them within seconds.
    Enroll {
        /// The namespace (`legacy`).
        namespace: String,
    },
    /// Take a namespace's pods out of the mesh while the agents run; their connections
    /// flow directly again.
    Unenroll {
        /// The namespace (`demo`).
        namespace: String,
    },
    /// Prove encryption as an operator would: `warren verify` on the bridge between the
    /// nodes while traffic flows (demo/client → demo/server over IPv4 and IPv6, and
    /// legacy/client → demo/server, the clear-text control). Its exit status is warren
    /// verify's: 0 all traffic between enrolled pods was TLS.
    Verify {
        /// How long to capture.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// What counts as the mesh (repeatable, e.g. 10.77.0.0/16); by default the
        /// addresses of the enrolled pods.
        #[arg(long = "mesh-cidr", value_name = "CIDR")]
        mesh_cidrs: Vec<String>,
    },
}

pub fn run(command: LabCommand) -> Result<ExitCode> {
    match command {
        LabCommand::Up {
            redirect,
            no_agents,
            cert_lifetime,
            release,
            foreign_hbone,
            cacerts,
        } => {
            if release {
                warren_lab::cargo::use_release_builds();
            }
            let mut options = if no_agents {
                UpOptions::no_agents()
            } else {
                UpOptions::with_agents(redirect)
            };
            if let Some(lifetime) = cert_lifetime {
                options = options.cert_lifetime(lifetime);
            }
            if let Some(cacerts) = cacerts {
                options = options.cacerts(cacerts);
            }
            setup::ensure(if options.agents {
                Scope::Everything
            } else {
                Scope::Tools
            })?;
            let lab = Lab::up(&options)?;
            if foreign_hbone {
                lab.set_foreign_hbone(true)?;
                println!("outside is a foreign HBONE workload (spiffe://cluster.local/ns/outside/sa/default); enrolled pods dial its port 15008");
            }
            println!("{}", lab.status());
        }
        LabCommand::Down => {
            Lab::down()?;
            println!("lab is down");
        }
        LabCommand::Status => {
            if Lab::is_up() {
                println!("{}", Lab::load()?.status());
            } else {
                let leftovers = Lab::leftovers()?;
                if leftovers.is_empty() {
                    println!("lab is down");
                } else {
                    let shown: Vec<String> =
                        leftovers.iter().map(|p| p.display().to_string()).collect();
                    println!(
                        "lab is down, but these are left over: {}\nremove them with `cargo xtask lab down`",
                        shown.join(", ")
                    );
                }
            }
        }
        LabCommand::Exec { target, command } => {
            let lab = Lab::load()?;
            let (program, args) = command.split_first().context("no command given after --")?;
            let status = match lab.command(&target, program)?.args(args).status() {
                Ok(status) => status,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::bail!("{program}: command not found in {target} (PATH is the caller's)")
                }
                Err(e) => return Err(e).with_context(|| format!("running {program} in {target}")),
            };
            return Ok(crate::exit_code(status));
        }
        LabCommand::Ip { pod, v6 } => {
            let lab = Lab::load()?;
            let found = lab.try_pod(&pod).with_context(|| {
                let ids: Vec<String> = lab.pods().iter().map(|p| p.id()).collect();
                format!("the lab has no pod {pod}; pods: {}", ids.join(", "))
            })?;
            println!("{}", found.ip(if v6 { Family::V6 } else { Family::V4 }));
        }
        LabCommand::Apply { file } => {
            let placed = Lab::load()?.apply_policy(&file)?;
            println!("applied {} as {}", file.display(), placed.display());
        }
        LabCommand::Delete { file } => {
            let removed = Lab::load()?.delete_policy(&file)?;
            println!("deleted {}", removed.display());
        }
        LabCommand::Verify {
            duration,
            mut mesh_cidrs,
        } => {
            let lab = Lab::load()?;
            if mesh_cidrs.is_empty() {
                mesh_cidrs = lab.mesh_cidrs();
            }
            println!(
                "running: warren verify --interface {} --duration {} --mesh-cidr {}",
                lab.topology().wire.bridge,
                humantime::format_duration(duration),
                mesh_cidrs.join(",")
            );
            let run = lab.verify_wire(duration, &mesh_cidrs, || lab.wire_traffic())?;
            eprint!("{}", run.log);
            print!("{}", run.report);
            return Ok(ExitCode::from(
                run.exit_code.unwrap_or(2).clamp(0, 255) as u8
            ));
        }
        LabCommand::Enroll { namespace } => {
            let changed = Lab::load()?.set_namespace_enrolled(&namespace, true)?;
            println!(
                "{}",
                if changed {
                    format!("namespace {namespace} enrolled; the agents capture its pods within seconds")
                } else {
                    format!("namespace {namespace} is already in the mesh")
                }
            );
        }
        LabCommand::Unenroll { namespace } => {
            let changed = Lab::load()?.set_namespace_enrolled(&namespace, false)?;
            println!(
                "{}",
                if changed {
                    format!("namespace {namespace} left the mesh; the agents release its pods within seconds")
                } else {
                    format!("namespace {namespace} is not in the mesh")
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
