//! Agent configuration: clap flags (each also settable by a `WARREN_*` variable), gathered
//! into one [`Config`] that tests build directly.
use std::{path::PathBuf, time::Duration};

use crate::metrics::MetricLimits;
use crate::proxy::limits::{PlaintextLimits, TunnelLimits};
use crate::redirect::{iptables::BackendChoice, KernelFeature, RedirectMode};

/// Where warren pins its eBPF programs and maps (`<dir>/<node>`).
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/warren";

/// Where the node's /proc is unless told otherwise (in a pod, the host's is mounted
/// elsewhere).
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// Where `warren-cni` finds the agent unless told otherwise.
pub const DEFAULT_CNI_SOCKET: &str = "/var/run/warren/cni.sock";

/// Where the agent learns workloads, services and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlSource {
    /// A local YAML file (`--config`) and policy path (`--policy`): the lab, bare metal.
    Local,
    /// The Kubernetes API server, with pod network namespaces from `warren-cni`.
    Kubernetes,
}

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Where the admin endpoints listen unless told otherwise (Envoy's and ztunnel's port).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";

/// The variables behind the flags `warren agent` and `warren check` share.
pub const ENV_CONFIG: &str = "WARREN_CONFIG";
pub const ENV_POLICY: &str = "WARREN_POLICY";
pub const ENV_ROOT_NAMESPACE: &str = "WARREN_ROOT_NAMESPACE";
pub const ENV_TRUST_DOMAIN: &str = "WARREN_TRUST_DOMAIN";
pub const ENV_TRUST_DOMAIN_ALIASES: &str = "WARREN_TRUST_DOMAIN_ALIASES";

/// `warren agent` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Name of the node this agent serves; only pods on this node are captured.
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node: String,

    /// Where the agent learns workloads, services and policy: `local` reads `--config`
    /// (and `--policy`); `kubernetes` watches the cluster's API server (in-cluster
    /// service-account credentials) and learns pod network namespaces from `warren-cni`.
    #[arg(long, env = "WARREN_CONTROL", value_enum, default_value_t = ControlSource::Local)]
    pub control: ControlSource,

    /// Local control file (YAML) listing workloads and the namespaces in the mesh
    /// (`--control local`).
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Unix socket on which `warren-cni` hands over each new pod's network namespace
    /// (`--control kubernetes`).
    #[arg(
        long,
        env = "WARREN_CNI_SOCKET",
        value_name = "PATH",
        default_value = DEFAULT_CNI_SOCKET
    )]
    pub cni_socket: PathBuf,

    /// The node's /proc (mounted into the agent's container), searched at start-up for the
    /// network namespaces of pods that were already running (`--control kubernetes`).
    #[arg(
        long,
        env = "WARREN_PROC_ROOT",
        value_name = "DIR",
        default_value = DEFAULT_PROC_ROOT
    )]
    pub proc_root: PathBuf,

    /// How pod traffic is steered into the agent.
    #[arg(long, env = "WARREN_REDIRECT", value_enum, default_value_t = RedirectMode::Auto)]
    pub redirect: RedirectMode,

    /// iptables mode: which iptables backend writes the pods' rules. `auto` takes the one
    /// the node's own rules (kube-proxy, CNI) use, nft when there are none.
    #[arg(long, env = "WARREN_IPTABLES_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,

    /// bpffs directory for warren's pinned programs and maps; the agent uses `<dir>/<node>`.
    #[arg(
        long,
        env = "WARREN_BPF_ROOT",
        value_name = "DIR",
        default_value = DEFAULT_BPF_ROOT
    )]
    pub bpf_root: PathBuf,

    /// cgroup v2 root to attach the connect hooks to (default: the cgroup2 mount).
    #[arg(long, env = "WARREN_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// SPIFFE trust domain of this mesh's identities.
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Other trust domains of this mesh (Istio's `trustDomainAliases`, e.g. the old one
    /// during a migration), comma-separated: an AuthorizationPolicy principal of the
    /// trust domain or an alias also names the same namespace and service account in
    /// each of the others. Peers are still accepted only with a certificate that
    /// chains to the trust bundle.
    #[arg(
        long,
        env = ENV_TRUST_DOMAIN_ALIASES,
        value_delimiter = ',',
        value_name = "DOMAIN,..."
    )]
    pub trust_domain_aliases: Vec<String>,

    /// Directory of the CA that signs this node's workload certificates (Istio's plug-in
    /// CA layout: root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem). Create one with
    /// `warren ca init --dir DIR`.
    #[arg(
        long,
        env = "WARREN_CA_DIR",
        value_name = "DIR",
        conflicts_with = "ca_addr"
    )]
    pub ca_dir: Option<PathBuf>,

    /// Address of the CA that signs this node's workload certificates over the network
    /// (`warren ca serve`), e.g. `https://warren-ca.warren-system.svc:15012`.
    #[arg(long, env = "WARREN_CA_ADDR", value_name = "URL")]
    pub ca_addr: Option<String>,

    /// PEM root certificate that the `--ca-addr` server's certificate must chain to.
    #[arg(
        long,
        env = "WARREN_CA_ROOT_CERT",
        value_name = "FILE",
        requires = "ca_addr"
    )]
    pub ca_root_cert: Option<PathBuf>,

    /// Service-account token (projected, audience `warren-ca`) the agent presents to the
    /// `--ca-addr` server; re-read at every request, as the kubelet rotates it.
    #[arg(
        long,
        env = "WARREN_CA_TOKEN_FILE",
        value_name = "FILE",
        requires = "ca_addr"
    )]
    pub ca_token_file: Option<PathBuf>,

    /// Lifetime of workload certificates; renewed at half-life (e.g. 24h, 10m, 5s).
    #[arg(long, env = "WARREN_CERT_LIFETIME", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_lifetime: Duration,

    /// Istio security policy (PeerAuthentication, AuthorizationPolicy): a YAML file or a
    /// directory of them. Re-read when it changes (applied once it reads the same on two
    /// polls a second apart); a document that does not decode fails closed: the workloads
    /// it may target are refused (AuthorizationPolicy) or STRICT (PeerAuthentication).
    #[arg(long, env = ENV_POLICY, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// The mesh's root namespace: policies there apply mesh-wide (Istio's istio-system).
    #[arg(long, env = ENV_ROOT_NAMESPACE, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Where to serve Prometheus metrics (`/metrics`), in the agent's own netns.
    #[arg(
        long,
        env = "WARREN_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "[::]:15020"
    )]
    pub metrics_addr: std::net::SocketAddr,

    /// Where to serve the admin endpoints (`/config_dump`, `/logging`), in the agent's own
    /// netns. Loopback by default: they show the node's workloads and change logging.
    #[arg(
        long,
        env = "WARREN_ADMIN_ADDR",
        value_name = "ADDR",
        default_value = DEFAULT_ADMIN_ADDR
    )]
    pub admin_addr: std::net::SocketAddr,

    /// Where to serve `/healthz/ready` for the kubelet's readiness probe, in the agent's
    /// own netns.
    #[arg(
        long,
        env = "WARREN_READINESS_ADDR",
        value_name = "ADDR",
        default_value = "[::]:15021"
    )]
    pub readiness_addr: std::net::SocketAddr,

    /// Close (reset) a proxied connection on which no byte moved either way for this long
    /// (Istio's TCP idle timeout is 1 h too).
    #[arg(long, env = "WARREN_IDLE_TIMEOUT", value_parser = parse_positive_duration, default_value = "1h")]
    pub idle_timeout: Duration,

    /// TLS handshakes in progress allowed on one pod's tunnel port (15008); more are reset
    /// at accept and counted in warren_listener_limit_refusals_total.
    #[arg(long, env = "WARREN_MAX_PENDING_HANDSHAKES", value_name = "N", default_value_t = TunnelLimits::default().pending_handshakes_per_listener as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes: u32,

    /// TLS handshakes in progress allowed from one source address, over all the node's
    /// tunnel ports.
    #[arg(long, env = "WARREN_MAX_PENDING_HANDSHAKES_PER_SOURCE", value_name = "N", default_value_t = TunnelLimits::default().pending_handshakes_per_source as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes_per_source: u32,

    /// Tunnel connections (pending or established) allowed from one source address, over
    /// all the node's tunnel ports. Peer agents pool their streams, one connection per
    /// pair of pods.
    #[arg(long, env = "WARREN_MAX_TUNNEL_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = TunnelLimits::default().connections_per_source as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnel_connections_per_source: u32,

    /// Plaintext connections open from one source address, over all the node's inbound
    /// plaintext ports (15006); more are reset at accept and counted in
    /// warren_listener_limit_refusals_total. The node's own connections (the kubelet's
    /// probes) are not counted; traffic the node forwards (NodePort, hostPort) comes
    /// from a node address and shares one budget.
    #[arg(long, env = "WARREN_MAX_PLAINTEXT_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = PlaintextLimits::default().connections_per_source as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_plaintext_connections_per_source: u32,

    /// Label sets the istio_tcp_* metric families may hold together (each a series of
    /// each family); a connection that would make one more is counted in a folded label
    /// set (labels unknown but reporter, protocol, outcome and security) and in
    /// warren_metric_series_dropped_total.
    #[arg(long, env = "WARREN_MAX_METRIC_SERIES", value_name = "N", default_value_t = MetricLimits::default().series as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_metric_series: u32,

    /// Diagnostic switch: report these kernel features as missing, to exercise fallbacks.
    #[arg(long, value_enum, value_delimiter = ',', hide = true)]
    pub probe_pretend_missing: Vec<KernelFeature>,
}

/// Where workloads, services and policy come from, with what that source needs.
#[derive(Debug, Clone)]
pub enum Control {
    /// A config file (`--config`), re-read when it changes; policy from `--policy`.
    Local { config_file: PathBuf },
    /// The API server; pods' network namespaces from `warren-cni` on `cni_socket`, and
    /// from the node's /proc (`proc_root`) for pods that ran before the agent.
    Kubernetes {
        cni_socket: PathBuf,
        proc_root: PathBuf,
    },
}

/// Where workload certificates are signed.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A CA directory on this machine (`--ca-dir`).
    Local(PathBuf),
    /// A CA service (`--ca-addr`): `warren ca serve`, or istiod.
    Remote {
        address: String,
        root_cert: PathBuf,
        token_file: Option<PathBuf>,
    },
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub control: Control,
    pub redirect: RedirectMode,
    pub iptables_backend: BackendChoice,
    /// Where bpffs is mounted (checked at start-up).
    pub bpffs: PathBuf,
    /// This node's pin directory: `<bpf-root>/<node>`.
    pub pin_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub ca: CaSource,
    pub cert_lifetime: Duration,
    pub metrics_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    pub readiness_addr: std::net::SocketAddr,
    pub policy: Option<PathBuf>,
    pub root_namespace: String,
    pub probe_pretend_missing: Vec<KernelFeature>,
    pub tunnel_limits: TunnelLimits,
    pub plaintext_limits: PlaintextLimits,
    pub idle_timeout: Duration,
    pub metric_limits: MetricLimits,
}

/// Flags that parse but do not make a runnable agent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--control local needs --config FILE (the workloads and mesh namespaces); or run with --control kubernetes")]
    MissingLocalConfig,
    #[error("the agent needs a CA: --ca-dir DIR (a local CA, e.g. from `warren ca init`) or --ca-addr URL (`warren ca serve`)")]
    MissingCa,
    #[error("--ca-addr needs --ca-root-cert FILE: the root the CA's certificate (and the mesh's) chains to")]
    MissingCaRoot,
    #[error("--trust-domain-aliases: {value:?} is not a valid SPIFFE trust domain: {reason}")]
    TrustDomainAlias { value: String, reason: String },
    #[error("--policy is for --control local; with --control kubernetes the policies are the cluster's PeerAuthentication and AuthorizationPolicy objects (`kubectl apply` them)")]
    PolicyWithKubernetes,
}

impl TryFrom<AgentArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: AgentArgs) -> Result<Self, ConfigError> {
        let control = match args.control {
            ControlSource::Local => Control::Local {
                config_file: args.config.ok_or(ConfigError::MissingLocalConfig)?,
            },
            ControlSource::Kubernetes if args.policy.is_some() => {
                return Err(ConfigError::PolicyWithKubernetes)
            }
            ControlSource::Kubernetes => Control::Kubernetes {
                cni_socket: args.cni_socket,
                proc_root: args.proc_root,
            },
        };
        check_trust_domain_aliases(&args.trust_domain_aliases)?;
        let ca = match (args.ca_dir, args.ca_addr) {
            (Some(dir), _) => CaSource::Local(dir),
            (None, Some(address)) => CaSource::Remote {
                address,
                root_cert: args.ca_root_cert.ok_or(ConfigError::MissingCaRoot)?,
                token_file: args.ca_token_file,
            },
            (None, None) => return Err(ConfigError::MissingCa),
        };
        Ok(Self {
            pin_dir: args.bpf_root.join(&args.node),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            node: args.node,
            control,
            redirect: args.redirect,
            iptables_backend: args.iptables_backend,
            cgroup_root: args.cgroup_root,
            trust_domain: args.trust_domain,
            trust_domain_aliases: args.trust_domain_aliases,
            ca,
            cert_lifetime: args.cert_lifetime,
            metrics_addr: args.metrics_addr,
            admin_addr: args.admin_addr,
            readiness_addr: args.readiness_addr,
            policy: args.policy,
            root_namespace: args.root_namespace,
            probe_pretend_missing: args.probe_pretend_missing,
            idle_timeout: args.idle_timeout,
            metric_limits: MetricLimits {
                series: args.max_metric_series as usize,
                ..MetricLimits::default()
            },
            tunnel_limits: TunnelLimits {
                pending_handshakes_per_listener: args.max_pending_handshakes as usize,
                pending_handshakes_per_source: args.max_pending_handshakes_per_source as usize,
                connections_per_source: args.max_tunnel_connections_per_source as usize,
            },
            plaintext_limits: PlaintextLimits {
                connections_per_source: args.max_plaintext_connections_per_source as usize,
            },
        })
    }
}

/// A duration above zero (`1h`, `90s`): a zero idle timeout would close every connection.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be longer than 0".into()),
        Ok(duration) => Ok(duration),
        Err(err) => Err(err.to_string()),
    }
}

/// Each of `aliases` must be a valid SPIFFE trust domain (`warren agent` and `warren
/// check` refuse the same ones).
pub fn check_trust_domain_aliases(aliases: &[String]) -> Result<(), ConfigError> {
    for alias in aliases {
        crate::identity::spiffe::check_trust_domain(alias).map_err(|reason| {
            ConfigError::TrustDomainAlias {
                value: alias.clone(),
                reason,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn config(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "warren",
            "--node",
            "n1",
            "--config",
            "workloads.yaml",
            "--ca-dir",
            "/ca",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Cli::try_parse_from(argv).unwrap().agent)
    }

    #[test]
    fn trust_domain_aliases_are_a_comma_separated_list_of_trust_domains() {
        assert!(config(&[]).unwrap().trust_domain_aliases.is_empty());
        let config_ok = config(&["--trust-domain-aliases", "old.example,older.example"]).unwrap();
        assert_eq!(
            config_ok.trust_domain_aliases,
            ["old.example", "older.example"]
        );
        let err = config(&["--trust-domain-aliases", "old.example,Old.Example"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--trust-domain-aliases: \"Old.Example\" is not a valid"),
            "{err}"
        );
    }

    #[test]
    fn max_metric_series_defaults_to_ten_thousand_label_sets() {
        let limits = config(&[]).unwrap().metric_limits;
        assert_eq!(limits, MetricLimits::default());
        assert_eq!(limits.series, 10_000);
        let limits = config(&["--max-metric-series", "500"])
            .unwrap()
            .metric_limits;
        assert_eq!((limits.series, limits.baggage_sources), (500, 1_000));
        assert!(Cli::try_parse_from(["warren", "agent", "--max-metric-series", "0"]).is_err());
    }

    #[test]
    fn max_plaintext_connections_per_source_defaults_to_the_tunnels_budget() {
        let config_ok = config(&[]).unwrap();
        assert_eq!(config_ok.plaintext_limits, PlaintextLimits::default());
        assert_eq!(config_ok.plaintext_limits.connections_per_source, 1024);
        assert_eq!(
            config_ok.plaintext_limits.connections_per_source,
            config_ok.tunnel_limits.connections_per_source
        );
        let limits = config(&["--max-plaintext-connections-per-source", "64"])
            .unwrap()
            .plaintext_limits;
        assert_eq!(limits.connections_per_source, 64);
        let zero = Cli::try_parse_from([
            "warren",
            "--node",
            "n1",
            "--config",
            "workloads.yaml",
            "--ca-dir",
            "/ca",
            "--max-plaintext-connections-per-source",
            "0",
        ]);
        let err = zero.err().expect("0 connections is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
    }
}
