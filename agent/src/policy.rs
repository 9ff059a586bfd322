//! Istio-compatible policy at L4: `PeerAuthentication` (which mTLS mode a workload's
//! inbound side requires) and `AuthorizationPolicy` (who may connect), evaluated at the
//! destination with the identity the mTLS handshake proved — what Istio's ztunnel
//! enforces, so YAML written for Istio keeps its meaning.
//!
//! | concern | file |
//! |---------|------|
//! | the model, independent of the source (files now, the API server later) | [`model`] |
//! | Kubernetes-style YAML: documents, files, directories, errors with file and line | [`decode`] |
//! | mTLS mode: port over workload over namespace over mesh, the oldest wins | `peer_authentication` |
//! | authorization: DENY before ALLOW, fail closed on what L4 cannot see | `authorization` |
//!
//! A [`PolicySet`] is immutable and cheap to clone (one `Arc`); a reload builds a new one
//! and swaps it in whole, so a connection is always judged by one consistent set.
//!
//! # Semantics where Istio leaves room, or warren cannot do what the YAML asks
//!
//! The rule throughout: **an unsupported feature never loosens policy**, and neither
//! does a document that does not decode: it is a [`BrokenPolicy`] in the set, failing
//! closed for every workload it may target (refused for an AuthorizationPolicy, STRICT
//! for a PeerAuthentication), while the documents that decode are in force as written.
//!
//! - **L7 attributes** (`to.operation` `hosts`/`methods`/`paths`, `from.source`
//!   `requestPrincipals`/`remoteIpBlocks`, `when` keys other than `source.ip`,
//!   `source.principal`, `source.namespace`, `destination.ip`, `destination.port`, and
//!   their `not*`): an L4 proxy cannot see them. As ztunnel does, a rule using any of
//!   them **matches nothing in an ALLOW policy**, and **in a DENY policy is enforced by its
//!   L4 part alone** (the L7 parts are taken to match), so it denies more than written.
//!   One warning per policy names the rules and attributes.
//! - **CUSTOM** (an external authorizer decides when the rules match): not supported. Its
//!   rules are evaluated **as DENY rules** (L7 parts reduced as for DENY): whatever
//!   Istio would have sent to the authorizer — which might have refused it — is refused,
//!   and connections the rules do not match are unaffected, as in Istio. This is the
//!   tightest choice that never allows what Istio could deny; a DENY-all would refuse
//!   more without protecting more. ztunnel ignores CUSTOM policies, which can open access.
//! - **AUDIT**: never changes a decision in Istio, so ignoring it loosens nothing. Warned.
//! - **`targetRef`/`targetRefs`**: the policy binds to a gateway, Service or waypoint, not
//!   to workloads; ztunnel ignores it and so does warren (warned).
//! - **`istio.io/dry-run`**: not supported; the policy is enforced (warned).
//! - **A selector with no labels** (`selector: {}`) applies namespace-wide, as in
//!   Istio's sidecar mode (never narrower than written).
//! - **PeerAuthentication with a selector in the root namespace**: ignored, as Istio
//!   documents (warned). **`portLevelMtls` without a selector**: ignored (warned); Istio's
//!   validation refuses it.
//! - **DISABLE** is reported as [`MtlsMode::Disable`]; in ambient mode traffic between
//!   mesh workloads is always tunnelled, so for incoming connections it acts like
//!   PERMISSIVE ([`MtlsMode::allows_plaintext`]). Warned.
//! - **Precedence among equals** (two namespace-wide PeerAuthentications...): the
//!   oldest `creationTimestamp` wins; a policy without one counts as older than any with
//!   one, and ties keep the order the policies were given in (file name, then document).
pub mod decode;
pub mod model;
pub mod watch;

mod authorization;
mod peer_authentication;
mod trust_domain;

use std::{fmt, net::IpAddr, path::Path, sync::Arc};

pub use decode::{
    decode_file, decode_str, load_documents, load_path, Decoded, InvalidDocument, PolicyError,
    PolicyFiles,
};
pub use model::{
    Action, AuthorizationPolicy, BrokenPolicy, PeerAuthentication, PeerAuthenticationMode, Policy,
    PolicyMeta,
};
pub use watch::SharedPolicy;

use crate::{identity::Identity, workload::Workload};

/// Istio's default root namespace: policies there apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// How policies are read, whatever their source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Istio's `rootNamespace` (mesh config): a PeerAuthentication without selector
    /// there is the mesh-wide default; an AuthorizationPolicy there applies to every
    /// namespace.
    pub root_namespace: String,
    /// Istio's `trustDomain` (mesh config): the trust domain `cluster.local` in a
    /// principal stands for.
    pub trust_domain: String,
    /// Istio's `trustDomainAliases`: a principal of the trust domain or of an alias
    /// names the same namespace and service account in each of them (see
    /// `trust_domain.rs`).
    pub trust_domain_aliases: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            trust_domain: crate::config::DEFAULT_TRUST_DOMAIN.to_owned(),
            trust_domain_aliases: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    PeerAuthentication,
    AuthorizationPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
        })
    }
}

/// Names one policy: displayed `namespace/name`, as logs and counters show it — or, for
/// a document that does not decode ([`BrokenPolicy`]), its location (`file:line`),
/// shown `policy document file:line` in the access log. Cloning costs two reference
/// counts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    kind: PolicyKind,
    namespace: Arc<str>,
    name: Arc<str>,
    /// A document that does not decode: `name` is its location, `namespace` is empty.
    unreadable: bool,
}

impl PolicyRef {
    pub fn new(kind: PolicyKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
            unreadable: false,
        }
    }

    /// The document at `location` that does not decode, acting as a `kind`.
    pub fn unreadable(kind: PolicyKind, location: &str) -> Self {
        Self {
            kind,
            namespace: "".into(),
            name: location.into(),
            unreadable: true,
        }
    }

    /// Whether this names a document that does not decode (see [`Self::unreadable`]).
    pub fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    fn of(kind: PolicyKind, meta: &PolicyMeta) -> Self {
        Self::new(kind, &meta.namespace, &meta.name)
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unreadable {
            return f.write_str(&self.name);
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unreadable {
            return write!(f, "policy document {}", self.name);
        }
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Something about the policies an operator should know: an unsupported feature and
/// what warren does instead, a policy that is ignored or overridden. `warren check`
/// prints them; the agent logs them once per load ([`PolicySet::log_warnings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    /// The policy concerned, if one is.
    pub policy: Option<PolicyRef>,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(policy) => write!(f, "{} {policy}: {}", policy.kind, self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The effective mTLS mode for a workload's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are accepted; plain text is refused.
    Strict,
    /// mTLS and plain text are accepted (the mesh default).
    Permissive,
    /// Written as DISABLE. Ambient meshes tunnel between mesh workloads regardless, so
    /// incoming connections are treated as under PERMISSIVE.
    Disable,
}

impl MtlsMode {
    /// Whether a plaintext connection may be delivered.
    pub fn allows_plaintext(self) -> bool {
        !matches!(self, MtlsMode::Strict)
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// What the destination knows about an incoming connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address (for HBONE: the one the source agent forwarded).
    pub source_ip: IpAddr,
    /// The peer identity proven by mTLS; `None` for plain text.
    pub source_identity: Option<Identity>,
    /// The workload address the client dialled (`destination.ip` in `when`).
    pub destination_ip: IpAddr,
    /// The workload port the client dialled (`ports`, `destination.port`, `portLevelMtls`).
    pub destination_port: u16,
}

/// The outcome of [`PolicySet::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refuse (reset) the connection. `policy` is the DENY (or CUSTOM) policy that
    /// matched, or — when ALLOW policies apply and none matched — the oldest of them
    /// (the reason lists them all); `reason` says what happened, in words.
    Deny {
        policy: PolicyRef,
        reason: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Every policy in force, indexed for the per-connection questions. Clone it freely.
#[derive(Clone)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

struct Inner {
    config: PolicyConfig,
    /// Oldest first.
    peer_authentications: Vec<PeerAuthentication>,
    /// Oldest first.
    authorization_policies: Vec<AuthorizationPolicy>,
    peer: peer_authentication::PeerIndex,
    authz: authorization::AuthzIndex,
    /// Documents that do not decode: they fail closed for what they may target.
    broken: Vec<BrokenPolicy>,
    warnings: Vec<PolicyWarning>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("root_namespace", &self.inner.config.root_namespace)
            .field(
                "peer_authentications",
                &self.inner.peer_authentications.len(),
            )
            .field(
                "authorization_policies",
                &self.inner.authorization_policies.len(),
            )
            .field("broken", &self.inner.broken.len())
            .field("warnings", &self.inner.warnings.len())
            .finish()
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::new(PolicyConfig::default(), [])
    }
}

impl PolicySet {
    /// Build the set. `policies` are taken in the order that breaks ties between equally
    /// old policies (for files: file name, then document). Never fails: what cannot be
    /// honoured as written is handled fail-closed and listed in [`Self::warnings`].
    pub fn new(config: PolicyConfig, policies: impl IntoIterator<Item = Policy>) -> Self {
        Self::decoded(config, policies, [])
    }

    /// Build the set from what decoded and what did not: each [`BrokenPolicy`] fails
    /// closed for the workloads it may apply to ([`Self::authorize`] refuses them every
    /// connection, [`Self::mtls_mode`] makes them STRICT), whatever the good policies
    /// say.
    pub fn decoded(
        config: PolicyConfig,
        policies: impl IntoIterator<Item = Policy>,
        broken: impl IntoIterator<Item = BrokenPolicy>,
    ) -> Self {
        let mut peer_authentications = Vec::new();
        let mut authorization_policies = Vec::new();
        for policy in policies {
            match policy {
                Policy::PeerAuthentication(p) => peer_authentications.push(p),
                Policy::AuthorizationPolicy(p) => authorization_policies.push(p),
            }
        }
        // Stable: equal timestamps (or none) keep the given order; `None` sorts first.
        peer_authentications.sort_by_key(|p| p.meta.creation_timestamp);
        authorization_policies.sort_by_key(|p| p.meta.creation_timestamp);

        let mut warnings = Vec::new();
        let root = config.root_namespace.as_str();
        if root != DEFAULT_ROOT_NAMESPACE {
            let in_default_root = peer_authentications
                .iter()
                .map(|p| (&p.meta, PolicyKind::PeerAuthentication))
                .chain(
                    authorization_policies
                        .iter()
                        .map(|p| (&p.meta, PolicyKind::AuthorizationPolicy)),
                )
                .filter(|(meta, _)| meta.namespace == DEFAULT_ROOT_NAMESPACE);
            for (meta, kind) in in_default_root {
                warnings.push(PolicyWarning {
                    policy: Some(PolicyRef::of(kind, meta)),
                    message: format!(
                        "the root namespace is {root:?}, so this policy in {DEFAULT_ROOT_NAMESPACE} applies to that namespace only, not to the whole mesh"
                    ),
                });
            }
        }
        let peer = peer_authentication::PeerIndex::new(root, &peer_authentications, &mut warnings);
        let bundle = trust_domain::TrustDomainBundle::new(
            &config.trust_domain,
            &config.trust_domain_aliases,
        );
        let authz = authorization::AuthzIndex::new(&authorization_policies, &bundle, &mut warnings);
        Self {
            inner: Arc::new(Inner {
                config,
                peer_authentications,
                authorization_policies,
                peer,
                authz,
                broken: broken.into_iter().collect(),
                warnings,
            }),
        }
    }

    /// Read a policy file or directory document by document ([`load_documents`]) and
    /// build the set; documents that do not decode are in it as [`BrokenPolicy`]. Only a
    /// path that cannot be read is an error.
    pub fn load(config: PolicyConfig, path: &Path) -> Result<Self, PolicyError> {
        let decoded = load_documents(path)?;
        Ok(Self::decoded(config, decoded.policies, decoded.broken))
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.inner.config
    }

    /// Every PeerAuthentication, oldest first.
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.inner.peer_authentications
    }

    /// Every AuthorizationPolicy, oldest first.
    pub fn authorization_policies(&self) -> &[AuthorizationPolicy] {
        &self.inner.authorization_policies
    }

    /// The documents that do not decode, in the order read.
    pub fn broken(&self) -> &[BrokenPolicy] {
        &self.inner.broken
    }

    /// The first document that does not decode and may be a `kind` applying to
    /// `workload`.
    pub fn broken_for(&self, kind: PolicyKind, workload: &Workload) -> Option<&BrokenPolicy> {
        let root = self.inner.config.root_namespace.as_str();
        self.inner
            .broken
            .iter()
            .find(|b| b.may_apply(kind, root, workload))
    }

    /// Log every document that does not decode, with what it fails closed for.
    pub fn log_broken(&self) {
        let root = self.inner.config.root_namespace.as_str();
        for broken in &self.inner.broken {
            tracing::error!(
                document = %broken.location,
                "policy document does not decode, failing closed for {}: {}: {}",
                broken.scope(root),
                broken.consequence(),
                broken.error
            );
        }
    }

    /// What the operator should know about these policies (see [`PolicyWarning`]).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.inner.warnings
    }

    /// Log every warning once (call after each successful load).
    pub fn log_warnings(&self) {
        for warning in &self.inner.warnings {
            tracing::warn!(policy = ?warning.policy, "{}", warning.message);
        }
    }

    /// The mTLS mode `workload` requires on `port`, and the PeerAuthentication that
    /// decided it (`None`: no policy applies, the mesh default PERMISSIVE).
    /// A PeerAuthentication document that does not decode and may apply to `workload`
    /// makes it STRICT, whatever else applies.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> (MtlsMode, Option<PolicyRef>) {
        if let Some(broken) = self.broken_for(PolicyKind::PeerAuthentication, workload) {
            return (
                MtlsMode::Strict,
                Some(PolicyRef::unreadable(
                    PolicyKind::PeerAuthentication,
                    &broken.location,
                )),
            );
        }
        self.inner.peer.resolve(workload, port)
    }

    /// Whether the connection may reach `workload`: any matching DENY (or CUSTOM)
    /// policy denies; otherwise, if ALLOW policies apply to the workload, one of them
    /// must match; otherwise it is allowed. Before all that, an AuthorizationPolicy
    /// document that does not decode and may apply to `workload` refuses everything.
    pub fn authorize(&self, workload: &Workload, connection: &ConnectionInfo) -> Decision {
        if let Some(broken) = self.broken_for(PolicyKind::AuthorizationPolicy, workload) {
            return Decision::Deny {
                policy: PolicyRef::unreadable(PolicyKind::AuthorizationPolicy, &broken.location),
                reason: format!(
                    "it does not decode, so every connection to the workloads it may apply to is refused until it is fixed (fail closed): {}",
                    broken.error
                ),
            };
        }
        self.inner
            .authz
            .authorize(&self.inner.config.root_namespace, workload, connection)
    }

    /// The AuthorizationPolicies whose scope covers `workload` (root namespace, its
    /// namespace, selector), whatever their action, oldest first; policies bound with
    /// `targetRefs` are not included.
    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        let root = self.inner.config.root_namespace.as_str();
        self.inner
            .authorization_policies
            .iter()
            .filter(move |p| authorization::in_scope(p, root, workload))
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
