//! Agent configuration: clap flags (each also settable by a `WARREN_*` variable), gathered
//! into one [`Config`] that tests build directly.
use std::path::PathBuf;

use crate::redirect::{KernelFeature, RedirectMode};

/// `warren agent` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Name of the node this agent serves; only pods on this node are captured.
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node: String,

    /// Local control file (YAML) listing workloads and the namespaces in the mesh.
    #[arg(long, env = "WARREN_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// How pod traffic is steered into the agent.
    #[arg(long, env = "WARREN_REDIRECT", value_enum, default_value_t = RedirectMode::Auto)]
    pub redirect: RedirectMode,

    /// bpffs directory for warren's pinned programs and maps; the agent uses `<dir>/<node>`.
    #[arg(
        long,
        env = "WARREN_BPF_ROOT",
        value_name = "DIR",
        default_value = "/sys/fs/bpf/warren"
    )]
    pub bpf_root: PathBuf,

    /// cgroup v2 root to attach the connect hooks to (default: the cgroup2 mount).
    #[arg(long, env = "WARREN_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// Diagnostic switch: report these kernel features as missing, to exercise fallbacks.
    #[arg(long, value_enum, value_delimiter = ',', hide = true)]
    pub probe_pretend_missing: Vec<KernelFeature>,
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub config_file: PathBuf,
    pub redirect: RedirectMode,
    /// Where bpffs is mounted (checked at start-up).
    pub bpffs: PathBuf,
    /// This node's pin directory: `<bpf-root>/<node>`.
    pub pin_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub probe_pretend_missing: Vec<KernelFeature>,
}

impl From<AgentArgs> for Config {
    fn from(args: AgentArgs) -> Self {
        Self {
            pin_dir: args.bpf_root.join(&args.node),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            node: args.node,
            config_file: args.config,
            redirect: args.redirect,
            cgroup_root: args.cgroup_root,
            probe_pretend_missing: args.probe_pretend_missing,
        }
    }
}
