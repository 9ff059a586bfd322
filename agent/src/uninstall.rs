//! `warren uninstall`: remove everything warren added to a node — the eBPF links and
//! maps pinned for it, and the iptables rules in its pods' netns, whichever mode put them
//! there — so that pod traffic flows directly again. Run it after the agent stopped (the
//! DaemonSet's pre-stop hook, or by hand); the agent's listeners close with the agent.
//! Running it twice is harmless: the second run finds nothing and says so.
use std::{fmt, path::PathBuf};

use crate::{
    config::ENV_CONFIG,
    control::local::{LocalConfig, LocalConfigError},
    netns::Netns,
    redirect::{self, iptables},
};

/// `warren uninstall` flags (the agent's own, so the same environment works).
#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// The node to clean up.
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node: String,

    /// Local control file: the node's pods whose netns may hold rules.
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    pub config: PathBuf,

    /// bpffs directory the agent pinned under (`<dir>/<node>`).
    #[arg(
        long,
        env = "WARREN_BPF_ROOT",
        value_name = "DIR",
        default_value = crate::config::DEFAULT_BPF_ROOT
    )]
    pub bpf_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    Config(#[from] LocalConfigError),
    #[error("cannot remove the eBPF pins in {path}: {source}; remove the directory by hand (`rm -r {path}`) once no agent runs")]
    Pins {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: {source}")]
    Rules {
        pod: String,
        source: iptables::IptablesError,
    },
}

/// What was removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub node: String,
    pub pin_dir: PathBuf,
    /// Pinned links and maps, and the directory itself.
    pub pins: usize,
    /// Pods whose netns held warren rules.
    pub pods_with_rules: Vec<String>,
    /// The node's pods whose netns no longer exists (nothing to clean there).
    pub pods_gone: Vec<String>,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pins == 0 && self.pods_with_rules.is_empty() {
            writeln!(
                f,
                "nothing to remove: no eBPF pins in {} and no warren iptables rules in the pods of node {}",
                self.pin_dir.display(),
                self.node
            )?;
        } else {
            if self.pins > 0 {
                writeln!(
                    f,
                    "removed {} eBPF pins (links and maps) in {}",
                    self.pins,
                    self.pin_dir.display()
                )?;
            }
            if !self.pods_with_rules.is_empty() {
                writeln!(
                    f,
                    "removed warren's iptables rules from {}",
                    self.pods_with_rules.join(", ")
                )?;
            }
        }
        if !self.pods_gone.is_empty() {
            writeln!(
                f,
                "skipped pods whose network namespace is gone: {}",
                self.pods_gone.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Remove warren from the node. Every step runs even when one fails; the first error is
/// returned after all were tried.
pub fn run(args: &UninstallArgs) -> Result<Removed, UninstallError> {
    let local = LocalConfig::load(&args.config)?;
    let pin_dir = args.bpf_root.join(&args.node);
    let mut removed = Removed {
        node: args.node.clone(),
        pin_dir: pin_dir.clone(),
        ..Removed::default()
    };
    let mut first_error = None;
    match redirect::remove_ebpf_pins(&pin_dir) {
        Ok(pins) => {
            removed.pins = pins;
            // The root is shared by the nodes of a lab; remove it once it is empty.
            let _ = std::fs::remove_dir(&args.bpf_root);
        }
        Err(source) => {
            first_error.get_or_insert(UninstallError::Pins {
                path: pin_dir,
                source,
            });
        }
    }
    for workload in local.workloads.iter().filter(|w| w.node == args.node) {
        let Ok(netns) = Netns::open(&workload.netns) else {
            removed.pods_gone.push(workload.to_string());
            continue;
        };
        match iptables::remove(&netns) {
            Ok(0) => {}
            Ok(_) => removed.pods_with_rules.push(workload.to_string()),
            Err(source) => {
                first_error.get_or_insert(UninstallError::Rules {
                    pod: workload.to_string(),
                    source,
                });
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(removed),
    }
}
