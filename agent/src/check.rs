//! `warren check`: what the agents will do with a local config and a policy, in words an
//! operator reads, and the configurations that will fail or surprise (Istio's
//! `istioctl authn tls-check` and `istioctl x describe`, for warren).
//!
//! | concern | file |
//! |---------|------|
//! | flags, reading the inputs, the report and its text | here |
//! | the flagged problems: plaintext callers of STRICT workloads, names that match no workload, selectors that select nothing, the policy set's own warnings | `findings` |
//! | an AuthorizationPolicy in one line | `describe` |
//!
//! [`check`] is pure (inputs in, [`Report`] out), so tests build its inputs directly; the
//! binary reads them with [`load`] — the same reading as the agent's, with the same
//! errors — and prints the report.
mod describe;
mod findings;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    sync::Arc,
};

use crate::{
    config::{
        ConfigError, DEFAULT_TRUST_DOMAIN, ENV_CONFIG, ENV_POLICY, ENV_ROOT_NAMESPACE,
        ENV_TRUST_DOMAIN, ENV_TRUST_DOMAIN_ALIASES,
    },
    control::local::{LocalConfig, LocalConfigError},
    identity::{Identity, IdentityError},
    policy::{
        Action, MtlsMode, PeerAuthentication, PeerAuthenticationMode, PolicyConfig, PolicyError,
        PolicyKind, PolicyRef, PolicySet, DEFAULT_ROOT_NAMESPACE,
    },
    workload::Workload,
};

/// Exit status: nothing was flagged.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: the report was printed and flags problems (as `warren verify` exits 1
/// when it flags clear text).
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit status: the inputs could not be read, or the command line is wrong (clap's own
/// usage status); nothing was checked.
pub const EXIT_INPUT_ERROR: u8 = 2;

/// `warren check` flags: the agent's inputs, read the same way.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Local control file (YAML) listing workloads and the namespaces in the mesh, as
    /// given to `warren agent --config`.
    #[arg(long, env = ENV_CONFIG, value_name = "FILE")]
    pub config: PathBuf,

    /// Istio security policy (PeerAuthentication, AuthorizationPolicy): a YAML file or a
    /// directory of them, as given to `warren agent --policy`. Without it: no policy.
    #[arg(long, env = ENV_POLICY, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// The mesh's root namespace: policies there apply mesh-wide (Istio's istio-system).
    #[arg(long, env = ENV_ROOT_NAMESPACE, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// SPIFFE trust domain of this mesh's identities (principals are matched in it).
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Other trust domains of this mesh, comma-separated, as given to `warren agent
    /// --trust-domain-aliases` (Istio's `trustDomainAliases`).
    #[arg(
        long,
        env = ENV_TRUST_DOMAIN_ALIASES,
        value_delimiter = ',',
        value_name = "DOMAIN,..."
    )]
    pub trust_domain_aliases: Vec<String>,

    /// Report only the workloads on this node (default: every node). Problems with the
    /// policies themselves are judged against every workload of the config.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}\nnothing was checked: fix the config file (the agent would refuse it too) and run warren check again")]
    Config(#[from] LocalConfigError),
    #[error("{0}\nnothing was checked: the policy path cannot be read (the agent would not start with it; if it becomes unreadable while the agent runs, the policy in force stays)")]
    Policy(#[from] PolicyError),
    #[error("--trust-domain {value:?} is not a valid SPIFFE trust domain: {reason}")]
    TrustDomain { value: String, reason: String },
    #[error("{0}")]
    TrustDomainAlias(ConfigError),
}

/// What [`check`] needs, as the agent reads it.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub config: LocalConfig,
    pub policy: PolicySet,
    pub trust_domain: String,
    pub node: Option<String>,
}

/// Read the config and the policy as the agent does (same errors), and check the trust
/// domain.
pub fn load(args: &CheckArgs) -> Result<Inputs, CheckError> {
    if let Err(err) = Identity::new(args.trust_domain.as_str(), "ns", "sa") {
        let reason = match err {
            IdentityError::InvalidPart { reason, .. } => reason,
            other => other.to_string(),
        };
        return Err(CheckError::TrustDomain {
            value: args.trust_domain.clone(),
            reason,
        });
    }
    crate::config::check_trust_domain_aliases(&args.trust_domain_aliases)
        .map_err(CheckError::TrustDomainAlias)?;
    let config = LocalConfig::load(&args.config)?;
    let policy_config = PolicyConfig {
        root_namespace: args.root_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        trust_domain_aliases: args.trust_domain_aliases.clone(),
    };
    let policy = match &args.policy {
        Some(path) => PolicySet::load(policy_config, path)?,
        None => PolicySet::new(policy_config, []),
    };
    Ok(Inputs {
        config,
        policy,
        trust_domain: args.trust_domain.clone(),
        node: args.node.clone(),
    })
}

/// Load and check: what `warren check` prints.
pub fn run(args: &CheckArgs) -> Result<Report, CheckError> {
    let inputs = load(args)?;
    Ok(check(
        &inputs.config,
        &inputs.policy,
        &inputs.trust_domain,
        inputs.node.as_deref(),
    ))
}

/// The exit status for an outcome of [`run`]: [`EXIT_CLEAN`], [`EXIT_PROBLEMS`] or
/// [`EXIT_INPUT_ERROR`].
pub fn exit_code(outcome: &Result<Report, CheckError>) -> u8 {
    match outcome {
        Ok(report) if report.findings.is_empty() => EXIT_CLEAN,
        Ok(_) => EXIT_PROBLEMS,
        Err(_) => EXIT_INPUT_ERROR,
    }
}

/// Everything `warren check` says.
#[derive(Debug, Clone)]
pub struct Report {
    pub trust_domain: String,
    pub root_namespace: String,
    /// `--node`: only this node's workloads are in [`Self::workloads`].
    pub node: Option<String>,
    /// `meshNamespaces`, sorted.
    pub mesh_namespaces: Vec<String>,
    /// Workloads whose namespace is not in the mesh (every node), by namespace/name.
    pub outside_mesh: Vec<Arc<Workload>>,
    pub peer_authentications: usize,
    pub authorization_policies: usize,
    /// Policy documents that do not decode (each is also a finding).
    pub not_decoding: usize,
    /// The workloads in the mesh (on `node`, if given), by namespace/name.
    pub workloads: Vec<WorkloadReport>,
    /// What will fail or surprise; empty when all is well.
    pub findings: Vec<Finding>,
}

/// What applies to one workload in the mesh.
#[derive(Debug, Clone)]
pub struct WorkloadReport {
    pub workload: Arc<Workload>,
    /// Its SPIFFE identity; `None` when its namespace or service account cannot make one
    /// (a finding says why).
    pub identity: Option<Identity>,
    /// The mode on every port without a port-level setting.
    pub mtls: MtlsDecision,
    /// Ports the applying workload PeerAuthentication's `portLevelMtls` sets, by port.
    pub port_mtls: Vec<PortMtls>,
    /// Meaning of the AuthorizationPolicies below, together.
    pub authorization: AuthorizationSummary,
    /// The AuthorizationPolicies whose scope covers the workload, oldest first.
    pub authorization_policies: Vec<AppliedPolicy>,
}

/// An effective mTLS mode and the PeerAuthentication that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsDecision {
    pub mode: MtlsMode,
    /// `None`: no PeerAuthentication applies, the mesh default PERMISSIVE.
    pub decided_by: Option<(PolicyRef, MtlsScope)>,
}

/// The level a PeerAuthentication acted at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MtlsScope {
    /// No selector, in the root namespace.
    Mesh,
    /// No selector, in the workload's namespace.
    Namespace,
    /// A selector (shown `k=v,...`) that matches the workload.
    Workload { selector: String },
    /// A `portLevelMtls` entry.
    Port,
    /// A PeerAuthentication document that does not decode and may apply: STRICT (fail
    /// closed).
    DoesNotDecode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMtls {
    pub port: u16,
    pub decision: MtlsDecision,
}

/// The AuthorizationPolicies of a workload, together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationSummary {
    /// No enforced policy applies (none, or AUDIT only): every connection the mTLS mode
    /// accepts is allowed.
    Open,
    /// Only DENY (or CUSTOM, enforced as DENY) policies: what they match is refused.
    DenyOnly,
    /// ALLOW policies: a connection must match one of their rules (DENY is checked first
    /// when `with_deny`).
    AllowList { with_deny: bool },
    /// ALLOW policies, none of whose rules can match at L4: everything is refused.
    DenyAll,
    /// An AuthorizationPolicy document that does not decode may apply: everything is
    /// refused (fail closed) until it is fixed.
    DoesNotDecode,
}

/// An AuthorizationPolicy in the scope of a workload.
#[derive(Debug, Clone)]
pub struct AppliedPolicy {
    pub policy: PolicyRef,
    pub action: Action,
    /// `mesh-wide`, `namespace-wide` or `selector k=v`.
    pub scope: String,
    /// One line: what it allows or refuses.
    pub meaning: String,
}

/// What a finding is about, for tests and tools; the message says it in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingKind {
    /// STRICT on a workload (or a port) while workloads outside the mesh exist.
    StrictRefusesPlaintext,
    /// A principal (principals, notPrincipals, source.principal) no workload has.
    UnknownPrincipal,
    /// A namespace (namespaces, notNamespaces, source.namespace) no workload is in.
    UnknownNamespace,
    /// A service account (serviceAccounts, notServiceAccounts) no workload runs as.
    UnknownServiceAccount,
    /// A principal, namespace or service account that only workloads outside the mesh
    /// have: they connect in plain text, without identity, so it never matches them.
    OnlyOutsideMesh,
    /// A selector that selects no workload.
    SelectsNothing,
    /// A workload PeerAuthentication ignored for a workload because an older one also
    /// selects it.
    ShadowedPeerAuthentication,
    /// A policy in a namespace with no workload in the mesh: it has no effect.
    NoWorkloadInNamespace,
    /// One of [`PolicySet::warnings`].
    PolicyWarning,
    /// A workload whose namespace or service account makes no valid SPIFFE ID.
    InvalidIdentity,
    /// `--node` names a node no workload is on.
    UnknownNode,
    /// A policy document that does not decode: the workloads it may target fail closed.
    PolicyDoesNotDecode,
}

/// One problem: what is concerned, what happens, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// The workload (`ns/name`), policy (`Kind ns/name`) or flag concerned.
    pub subject: String,
    /// The whole sentence(s), subject included.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Check `config` and `policy`: what applies to each workload in the mesh (on `node`, if
/// given), and what will fail or surprise.
pub fn check(
    config: &LocalConfig,
    policy: &PolicySet,
    trust_domain: &str,
    node: Option<&str>,
) -> Report {
    let mut all: Vec<&Arc<Workload>> = config.workloads.iter().collect();
    all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let outside_mesh: Vec<Arc<Workload>> = all
        .iter()
        .filter(|w| !w.in_mesh)
        .map(|w| Arc::clone(w))
        .collect();

    let mut findings = Vec::new();
    if let Some(node) = node {
        if !config.workloads.iter().any(|w| w.node == node) {
            let nodes: BTreeSet<&str> = config
                .workloads
                .iter()
                .filter(|w| !w.foreign_hbone)
                .map(|w| w.node.as_str())
                .collect();
            findings.push(Finding {
                kind: FindingKind::UnknownNode,
                subject: format!("--node {node}"),
                message: format!(
                    "--node {node}: no workload in the config is on node {node} (nodes: {}). Check the node name.",
                    list_or_none(nodes)
                ),
            });
        }
    }

    let workloads: Vec<WorkloadReport> = all
        .iter()
        .filter(|w| w.in_mesh && !w.foreign_hbone && node.is_none_or(|n| w.node == n))
        .map(|w| workload_report(w, policy, trust_domain))
        .collect();
    for report in &workloads {
        findings::workload(report, policy, &outside_mesh, trust_domain, &mut findings);
    }
    findings::policies(config, policy, trust_domain, &mut findings);

    let mut mesh_namespaces: Vec<String> = config.mesh_namespaces.iter().cloned().collect();
    mesh_namespaces.sort();
    Report {
        trust_domain: trust_domain.to_owned(),
        root_namespace: policy.config().root_namespace.clone(),
        node: node.map(str::to_owned),
        mesh_namespaces,
        outside_mesh,
        peer_authentications: policy.peer_authentications().len(),
        authorization_policies: policy.authorization_policies().len(),
        not_decoding: policy.broken().len(),
        workloads,
        findings,
    }
}

fn workload_report(
    workload: &Arc<Workload>,
    policy: &PolicySet,
    trust_domain: &str,
) -> WorkloadReport {
    let root = policy.config().root_namespace.as_str();
    // Only the workload-level policy's `portLevelMtls` ports can differ.
    let workload_level = workload_peer_authentications(policy, workload).next();
    let port_levels: BTreeMap<u16, PeerAuthenticationMode> = workload_level
        .map(|p| p.port_level_mtls.clone())
        .unwrap_or_default();
    // Any port without a port-level entry gives the workload's own mode.
    let other_port = (0..=u16::MAX)
        .find(|port| !port_levels.contains_key(port))
        .unwrap_or(0);
    let mtls = decision(policy, policy.mtls_mode(workload, other_port), false);
    let port_mtls = port_levels
        .iter()
        .filter(|(_, mode)| **mode != PeerAuthenticationMode::Unset)
        .map(|(&port, _)| PortMtls {
            port,
            decision: decision(policy, policy.mtls_mode(workload, port), true),
        })
        .collect();

    let authorization_policies: Vec<AppliedPolicy> = policy
        .authorization_policies_for(workload)
        .map(|p| AppliedPolicy {
            policy: PolicyRef::new(
                PolicyKind::AuthorizationPolicy,
                &p.meta.namespace,
                &p.meta.name,
            ),
            action: p.action.clone(),
            scope: match &p.selector {
                Some(selector) => format!("selector {selector}"),
                None if p.meta.namespace == root && workload.namespace != root => {
                    "mesh-wide".to_owned()
                }
                None => "namespace-wide".to_owned(),
            },
            meaning: describe::policy(p),
        })
        .collect();
    let enforced: Vec<_> = policy
        .authorization_policies_for(workload)
        .filter(|p| p.action != Action::Audit)
        .collect();
    let allows: Vec<_> = enforced
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    let with_deny = enforced.len() > allows.len();
    let authorization = if policy
        .broken_for(PolicyKind::AuthorizationPolicy, workload)
        .is_some()
    {
        AuthorizationSummary::DoesNotDecode
    } else if allows.is_empty() {
        if with_deny {
            AuthorizationSummary::DenyOnly
        } else {
            AuthorizationSummary::Open
        }
    } else if allows.iter().any(|p| describe::can_allow(p)) {
        AuthorizationSummary::AllowList { with_deny }
    } else {
        AuthorizationSummary::DenyAll
    };

    WorkloadReport {
        workload: Arc::clone(workload),
        identity: workload.identity(trust_domain).ok(),
        mtls,
        port_mtls,
        authorization,
        authorization_policies,
    }
}

/// The PeerAuthentications with a selector that selects `workload`, oldest first, as the
/// policy index considers them: in the workload's namespace, not the root namespace
/// (ignored there). Only the first counts.
fn workload_peer_authentications<'a>(
    policy: &'a PolicySet,
    workload: &'a Workload,
) -> impl Iterator<Item = &'a PeerAuthentication> + 'a {
    let root = policy.config().root_namespace.as_str();
    policy.peer_authentications().iter().filter(move |p| {
        p.meta.namespace == workload.namespace
            && p.meta.namespace != root
            && p.selector
                .as_ref()
                .is_some_and(|s| s.selects(&workload.labels))
    })
}

fn decision(
    policy: &PolicySet,
    (mode, decided_by): (MtlsMode, Option<PolicyRef>),
    port_level: bool,
) -> MtlsDecision {
    let root = policy.config().root_namespace.as_str();
    let decided_by = decided_by.map(|reference| {
        let selector = policy
            .peer_authentications()
            .iter()
            .find(|p| p.meta.namespace == reference.namespace() && p.meta.name == reference.name())
            .and_then(|p| p.selector.as_ref());
        let scope = match selector {
            _ if reference.is_unreadable() => MtlsScope::DoesNotDecode,
            _ if port_level => MtlsScope::Port,
            Some(selector) => MtlsScope::Workload {
                selector: selector.to_string(),
            },
            None if reference.namespace() == root => MtlsScope::Mesh,
            None => MtlsScope::Namespace,
        };
        (reference, scope)
    });
    MtlsDecision { mode, decided_by }
}

/// `a, b, c`, or `none`.
fn list_or_none<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl fmt::Display for MtlsDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((policy, scope)) = &self.decided_by else {
            return write!(
                f,
                "mesh default {} (no PeerAuthentication applies)",
                self.mode
            );
        };
        if *scope == MtlsScope::DoesNotDecode {
            return write!(
                f,
                "{} — policy document {policy} does not decode and may be a PeerAuthentication for this workload (fail closed)",
                self.mode
            );
        }
        write!(f, "{} — PeerAuthentication {policy} (", self.mode)?;
        match scope {
            MtlsScope::DoesNotDecode => {}
            MtlsScope::Mesh => f.write_str("mesh-wide")?,
            MtlsScope::Namespace => f.write_str("namespace-wide")?,
            MtlsScope::Workload { selector } => write!(f, "selector {selector}")?,
            MtlsScope::Port => f.write_str("portLevelMtls")?,
        }
        f.write_str(")")?;
        if self.mode == MtlsMode::Disable {
            f.write_str("; acts as PERMISSIVE for incoming connections")?;
        }
        Ok(())
    }
}

impl fmt::Display for AuthorizationSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthorizationSummary::Open => {
                "no AuthorizationPolicy is enforced; every connection the mTLS mode accepts is allowed"
            }
            AuthorizationSummary::DenyOnly => {
                "DENY policies apply; connections they match are refused, all others are allowed"
            }
            AuthorizationSummary::AllowList { with_deny: false } => {
                "ALLOW policies apply; connections no rule matches are refused"
            }
            AuthorizationSummary::AllowList { with_deny: true } => {
                "ALLOW policies apply; connections no rule matches are refused (and DENY policies are checked first)"
            }
            AuthorizationSummary::DenyAll => {
                "ALLOW policies apply but none of their rules can match at L4; every connection is refused (deny all)"
            }
            AuthorizationSummary::DoesNotDecode => {
                "an AuthorizationPolicy document that does not decode may apply; every connection is refused until it is fixed (fail closed, see the problems below)"
            }
        })
    }
}

impl fmt::Display for WorkloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = &self.workload;
        match &self.identity {
            Some(identity) => writeln!(f, "{workload} (node {}, {identity})", workload.node)?,
            None => writeln!(
                f,
                "{workload} (node {}, no valid identity: see the problems below)",
                workload.node
            )?,
        }
        writeln!(f, "  mTLS: {}", self.mtls)?;
        for port in &self.port_mtls {
            writeln!(f, "        port {}: {}", port.port, port.decision)?;
        }
        writeln!(f, "  authorization: {}", self.authorization)?;
        for applied in &self.authorization_policies {
            writeln!(
                f,
                "        {} {} ({}): {}",
                applied.action, applied.policy, applied.scope, applied.meaning
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = match &self.node {
            Some(node) => format!("node {node}"),
            None => "all nodes".to_owned(),
        };
        writeln!(
            f,
            "warren check: trust domain {}, root namespace {}, {nodes}",
            self.trust_domain, self.root_namespace
        )?;
        writeln!(
            f,
            "mesh namespaces: {}",
            list_or_none(&self.mesh_namespaces)
        )?;
        writeln!(
            f,
            "not in the mesh (plain text, no policy applies): {}",
            list_or_none(
                self.outside_mesh
                    .iter()
                    .map(|w| format!("{w} (node {})", w.node))
            )
        )?;
        writeln!(
            f,
            "policies: {} PeerAuthentication, {} AuthorizationPolicy{}",
            self.peer_authentications,
            self.authorization_policies,
            match self.not_decoding {
                0 => String::new(),
                n => format!(", {n} document(s) that do not decode"),
            }
        )?;
        if self.workloads.is_empty() {
            writeln!(
                f,
                "\nno workload in the mesh{}",
                match &self.node {
                    Some(node) => format!(" on node {node}"),
                    None => String::new(),
                }
            )?;
        }
        for workload in &self.workloads {
            writeln!(f)?;
            write!(f, "{workload}")?;
        }
        writeln!(f)?;
        match self.findings.len() {
            0 => writeln!(f, "no problems found")?,
            1 => writeln!(f, "1 problem:")?,
            n => writeln!(f, "{n} problems:")?,
        }
        for finding in &self.findings {
            writeln!(f, "  ! {finding}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
