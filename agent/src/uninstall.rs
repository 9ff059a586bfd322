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

    /// Local control file: the node's pods whose netns may hold rules. Without it (in
    /// Kubernetes), every network namespace seen through `--proc-root` is cleaned.
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The node's /proc, searched for network namespaces when there is no `--config`.
    #[arg(
        long,
        env = "WARREN_PROC_ROOT",
        value_name = "DIR",
        default_value = crate::config::DEFAULT_PROC_ROOT
    )]
    pub proc_root: PathBuf,

    /// The node's CNI config directory: take `warren-cni` out of the chain too (in
    /// Kubernetes; otherwise pods of mesh namespaces would wait for an agent that is
    /// not coming back).
    #[arg(long, value_name = "DIR", requires = "cni_bin_dir")]
    pub cni_conf_dir: Option<PathBuf>,

    /// The node's CNI plugin directory, from which `warren-cni` is removed.
    #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,

    /// `NAMESPACE/NAME` of the agent's DaemonSet: do nothing while it exists and is not
    /// being deleted — a rolling update or a restart, after which the next agent takes
    /// the pods over (they fail closed meanwhile) — and uninstall when it is removed.
    /// For the DaemonSet's pre-stop hook.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub unless_daemonset_remains: Option<String>,

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
    #[error("cannot take warren-cni out of the node's CNI chain: {0}")]
    Cni(crate::cni::install::InstallError),
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
    /// CNI config and plugin files changed to take `warren-cni` out.
    pub cni: Vec<PathBuf>,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for path in &self.cni {
            writeln!(f, "removed warren-cni from {}", path.display())?;
        }
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
    // The netns that may hold rules: the node's pods of the config, or every one there.
    let namespaces: Vec<(String, PathBuf)> = match &args.config {
        Some(config) => LocalConfig::load(config)?
            .workloads
            .iter()
            .filter(|w| w.node == args.node)
            .map(|w| (w.to_string(), w.netns.clone()))
            .collect(),
        None => crate::cni::procfs::network_namespaces(&args.proc_root)
            .into_iter()
            .map(|path| (format!("netns {}", path.display()), path))
            .collect(),
    };
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
    for (pod, path) in namespaces {
        let Ok(netns) = Netns::open(&path) else {
            removed.pods_gone.push(pod);
            continue;
        };
        match iptables::remove(&netns) {
            Ok(0) => {}
            Ok(_) => removed.pods_with_rules.push(pod),
            Err(source) => {
                first_error.get_or_insert(UninstallError::Rules { pod, source });
            }
        }
    }
    if let (Some(conf_dir), Some(bin_dir)) = (&args.cni_conf_dir, &args.cni_bin_dir) {
        match crate::cni::install::uninstall(&crate::cni::install::UninstallArgs {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
        }) {
            Ok(changed) => removed.cni = changed,
            Err(err) => {
                first_error.get_or_insert(UninstallError::Cni(err));
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(removed),
    }
}

/// Whether the DaemonSet `namespace/name` is there and not being deleted: the agent
/// stops for a rolling update or a restart, not for good.
pub async fn daemonset_remains(client: kube::Client, daemonset: &str) -> Result<bool, String> {
    let Some((namespace, name)) = daemonset.split_once('/') else {
        return Err(format!(
            "--unless-daemonset-remains {daemonset:?}: expected NAMESPACE/NAME, e.g. warren-system/warren-agent"
        ));
    };
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(Some(found)) => Ok(found.metadata.deletion_timestamp.is_none()),
        Ok(None) => Ok(false),
        Err(err) => Err(format!("cannot read DaemonSet {daemonset}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use warren_test_apiserver::TestApiServer;

    use super::daemonset_remains;

    #[tokio::test]
    async fn the_daemonset_remains_through_a_rollout_not_a_removal() {
        let server = TestApiServer::start().await.unwrap();
        let client =
            || kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
        let daemonset = |deleting: bool| {
            let mut object = json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"namespace": "warren-system", "name": "warren-agent"},
                "spec": {"selector": {"matchLabels": {"app": "warren-agent"}},
                         "template": {"metadata": {"labels": {"app": "warren-agent"}},
                                      "spec": {"containers": [{"name": "agent"}]}}}
            });
            if deleting {
                object["metadata"]["deletionTimestamp"] = json!("2026-12-03T00:00:00Z");
            }
            object
        };
        let remains = |c| daemonset_remains(c, "warren-system/warren-agent");
        assert_eq!(remains(client()).await, Ok(false), "no DaemonSet: removed");
        server.apply(daemonset(false));
        assert_eq!(remains(client()).await, Ok(true), "a rollout");
        server.apply(daemonset(true));
        assert_eq!(remains(client()).await, Ok(false), "being deleted");
        assert!(daemonset_remains(client(), "warren-agent")
            .await
            .unwrap_err()
            .contains("NAMESPACE/NAME"));
        // (kube's client retries a 503 on its own; a 500 it reports.)
        server.fail_next(1, 500);
        assert!(remains(client()).await.unwrap_err().contains("cannot read"));
    }
}
