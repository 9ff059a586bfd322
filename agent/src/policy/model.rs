//! The policy model, independent of where policies come from (local YAML files now, the
//! Kubernetes API server later): Istio's `PeerAuthentication` and `AuthorizationPolicy`
//! (`security.istio.io/v1` and `v1beta1`, one schema), already validated.
//!
//! Values are parsed once, when a policy is built: CIDRs into [`IpBlock`], ports into
//! numbers, principals and namespaces into [`StringMatch`]. Fields an L4 proxy cannot see
//! (HTTP methods, paths, headers, JWT claims...) are kept by name only, so that the
//! evaluation can fail closed on them and `warren check` can name them.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use time::OffsetDateTime;

/// A policy as decoded: either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Policy {
    pub fn meta(&self) -> &PolicyMeta {
        match self {
            Policy::PeerAuthentication(p) => &p.meta,
            Policy::AuthorizationPolicy(p) => &p.meta,
        }
    }

    pub fn kind(&self) -> super::PolicyKind {
        match self {
            Policy::PeerAuthentication(_) => super::PolicyKind::PeerAuthentication,
            Policy::AuthorizationPolicy(_) => super::PolicyKind::AuthorizationPolicy,
        }
    }
}

/// A policy document that does not decode (or an object the API server holds that
/// does not), kept in the set so that what it was meant to govern **fails closed**:
/// decoding went as far as it could, and what it read bounds the damage —
///
/// - `kind` unreadable: it counts as both kinds;
/// - `metadata.namespace` unreadable: every namespace (`metadata` readable without a
///   namespace: `default`, as for a good document); in the root namespace: the mesh;
/// - `spec.selector.matchLabels` unreadable: the whole namespace.
///
/// A broken AuthorizationPolicy refuses every connection to the workloads it may apply to;
/// a broken PeerAuthentication makes them STRICT, whatever else says otherwise. Never
/// more permissive than any version of the document could have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenPolicy {
    /// Where it is: `policies/bad.yaml:12` (the file and the document's first line), or
    /// `kubernetes AuthorizationPolicy/demo/x`.
    pub location: String,
    /// Its kind, when that could be read; `None`: either kind.
    pub kind: Option<super::PolicyKind>,
    /// Its namespace, when that could be read; `None`: any namespace.
    pub namespace: Option<String>,
    /// Its `spec.selector.matchLabels`, when readable and not empty; `None`: every
    /// workload of the namespace.
    pub selector: Option<WorkloadSelector>,
    /// Why it does not decode: the decoder's message (file, line, column, field).
    pub error: String,
}

impl BrokenPolicy {
    /// Whether this document, had it been a valid `kind`, could apply to `workload`.
    pub fn may_apply(
        &self,
        kind: super::PolicyKind,
        root: &str,
        workload: &crate::workload::Workload,
    ) -> bool {
        self.kind.is_none_or(|k| k == kind) && self.may_affect(root, workload)
    }

    /// Whether this document could apply to `workload` as either kind: the workloads it
    /// closes, as `/config_dump` and `warren check` list them.
    pub fn may_affect(&self, root: &str, workload: &crate::workload::Workload) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == workload.namespace || ns == root)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.selects(&workload.labels))
    }

    /// What it may apply to, in words: `every workload of the mesh`, `namespace demo`,
    /// `workloads app=server of namespace demo`.
    pub fn scope(&self, root: &str) -> String {
        let namespace = match self.namespace.as_deref() {
            None => "the mesh (its namespace cannot be read)".to_owned(),
            Some(ns) if ns == root => format!("the mesh (root namespace {root})"),
            Some(ns) => format!("namespace {ns}"),
        };
        match &self.selector {
            Some(selector) => format!("workloads {selector} of {namespace}"),
            None => format!("every workload of {namespace}"),
        }
    }

    /// What it means at run time, in words.
    pub fn consequence(&self) -> &'static str {
        match self.kind {
            Some(super::PolicyKind::AuthorizationPolicy) => "every connection to them is refused",
            Some(super::PolicyKind::PeerAuthentication) => "they are STRICT",
            None => {
                "they are STRICT and every connection to them is refused (its kind cannot be read)"
            }
        }
    }
}

/// What every policy carries besides its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMeta {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`. Among policies of equal rank the oldest wins; a
    /// policy without one counts as older than any with one (as Kubernetes' zero time
    /// does in Istio), and ties keep the order the policies were given in (file name,
    /// then document).
    pub creation_timestamp: Option<OffsetDateTime>,
    /// Where it was read from, for messages: `policies/mesh.yaml, document 2`.
    pub origin: String,
    /// Annotated `istio.io/dry-run: "true"`. Istio evaluates such a policy without
    /// enforcing it; warren does not support dry runs and enforces it (with a warning).
    pub dry_run: bool,
}

/// `selector.matchLabels`: the workloads (pods) a policy applies to. A selector without
/// labels is no selector (the policy applies namespace-wide).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Every label of the selector is on the workload, with the same value.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

impl fmt::Display for WorkloadSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (key, value) in &self.match_labels {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// `spec.mtls.mode` and `spec.portLevelMtls.<port>.mode` as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PeerAuthenticationMode {
    /// Inherit from the level above (port → workload → namespace → mesh → PERMISSIVE).
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl fmt::Display for PeerAuthenticationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerAuthenticationMode::Unset => "UNSET",
            PeerAuthenticationMode::Disable => "DISABLE",
            PeerAuthenticationMode::Permissive => "PERMISSIVE",
            PeerAuthenticationMode::Strict => "STRICT",
        })
    }
}

/// A `PeerAuthentication`: which connections a workload's inbound side accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub meta: PolicyMeta,
    pub selector: Option<WorkloadSelector>,
    pub mode: PeerAuthenticationMode,
    /// `portLevelMtls`, by the workload's (container) port — not a Service port.
    pub port_level_mtls: BTreeMap<u16, PeerAuthenticationMode>,
}

/// `spec.action` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Marks requests for auditing; never changes a decision. Not supported (ignored).
    Audit,
    /// Delegates to an external authorizer (`provider.name`). Not supported: its rules
    /// act as DENY rules (fail closed, see [`crate::policy`]).
    Custom {
        provider: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom { .. } => "CUSTOM",
        })
    }
}

/// An `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub meta: PolicyMeta,
    pub selector: Option<WorkloadSelector>,
    /// `targetRef`/`targetRefs` (`Kind/name`): the policy binds to a gateway, Service or
    /// waypoint, not to workloads; ztunnel ignores such policies and so does warren.
    pub target_refs: Vec<String>,
    pub action: Action,
    /// No rules: matches nothing (so an ALLOW policy without rules allows nothing).
    pub rules: Vec<Rule>,
}

/// One rule: it matches when one of `from`, one of `to` and every `when` match (an
/// empty list matches anything, so an empty rule matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// The attributes of this rule that only an L7 (HTTP) proxy can see, sorted.
    pub fn l7_attributes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .from
            .iter()
            .flat_map(|s| s.l7_fields.iter().map(|f| format!("from.source.{f}")))
            .chain(
                self.to
                    .iter()
                    .flat_map(|o| o.l7_fields.iter().map(|f| format!("to.operation.{f}"))),
            )
            .chain(self.when.iter().filter_map(|c| match c {
                Condition::L7 { key } => Some(format!("when {key}")),
                _ => None,
            }))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn uses_l7(&self) -> bool {
        self.from.iter().any(|s| !s.l7_fields.is_empty())
            || self.to.iter().any(|o| !o.l7_fields.is_empty())
            || self.when.iter().any(|c| matches!(c, Condition::L7 { .. }))
    }
}

/// A field and its `not` twin (`principals`/`notPrincipals`, `values`/`notValues`...):
/// matches when `values` is empty or one of them matches, and none of `not_values` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

impl<T> Default for Match<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Match<T> {
    pub fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        Self { values, not_values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// `matches_one` says whether one value matches the connection; a connection that
    /// lacks the attribute (no principal for plain text) matches no value, so it fails
    /// `values` and passes `not_values`.
    pub fn matches(&self, matches_one: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches_one))
            && !self.not_values.iter().any(&matches_one)
    }
}

/// `from.source`. All present fields must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// `principals`/`notPrincipals`: SPIFFE IDs without `spiffe://`.
    pub principals: Match<StringMatch>,
    pub namespaces: Match<StringMatch>,
    /// `serviceAccounts`/`notServiceAccounts`: `ns/sa`, or `sa` in the policy's namespace.
    pub service_accounts: Match<ServiceAccountMatch>,
    pub ip_blocks: Match<IpBlock>,
    /// L7 fields present (`requestPrincipals`, `remoteIpBlocks` and their `not*`).
    pub l7_fields: Vec<&'static str>,
}

/// `to.operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Match<u16>,
    /// L7 fields present (`hosts`, `methods`, `paths` and their `not*`).
    pub l7_fields: Vec<&'static str>,
}

/// One `when` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    SourceIp(Match<IpBlock>),
    SourcePrincipal(Match<StringMatch>),
    SourceNamespace(Match<StringMatch>),
    DestinationIp(Match<IpBlock>),
    DestinationPort(Match<u16>),
    /// A key only an L7 proxy can evaluate (`request.headers[...]`, `request.auth.*`,
    /// `remote.ip`, `connection.sni`...).
    L7 {
        key: String,
    },
}

/// Istio's string match for principals and namespaces: `*` (present, i.e. any
/// authenticated peer), `*suffix`, `prefix*`, or exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    /// Istio's reading: `*` is presence, a leading `*` a suffix match, a trailing `*` a
    /// prefix match; any other `*` is a literal character.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(value.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(exact) => f.write_str(exact),
            StringMatch::Prefix(prefix) => write!(f, "{prefix}*"),
            StringMatch::Suffix(suffix) => write!(f, "*{suffix}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

/// A service account: matches a peer whose identity has this namespace and account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    /// `ns/sa`, or `sa` in `policy_namespace`.
    pub fn parse(value: &str, policy_namespace: &str) -> Self {
        match value.split_once('/') {
            Some((namespace, service_account)) => Self {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            },
            None => Self {
                namespace: policy_namespace.to_owned(),
                service_account: value.to_owned(),
            },
        }
    }
}

impl fmt::Display for ServiceAccountMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// A CIDR block (`10.0.0.0/16`, `fd00::/8`) or a single address (`192.0.2.7`, a /32 or
/// /128). Host bits are cleared; an IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) is
/// held as the IPv4 block it means. Matching treats an IPv4-mapped source as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    /// `None` when `prefix_len` is longer than the address.
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<Self> {
        let (network, prefix_len) = match address {
            IpAddr::V4(v4) if prefix_len <= 32 => (IpAddr::V4(mask_v4(v4, prefix_len)), prefix_len),
            IpAddr::V6(v6) if prefix_len <= 128 => match v6.to_ipv4_mapped() {
                Some(v4) if prefix_len >= 96 => {
                    (IpAddr::V4(mask_v4(v4, prefix_len - 96)), prefix_len - 96)
                }
                _ => (IpAddr::V6(mask_v6(v6, prefix_len)), prefix_len),
            },
            _ => return None,
        };
        Some(Self {
            network,
            prefix_len,
        })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => mask_v4(ip, self.prefix_len) == network,
            (IpAddr::V6(network), IpAddr::V6(ip)) => mask_v6(ip, self.prefix_len) == network,
            _ => false,
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix_len: u8) -> Ipv6Addr {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{input:?} is not an IP address or CIDR block (e.g. 192.0.2.7, 10.0.0.0/16, fd00::/8)"
            )
        };
        let (address, prefix_len) = match input.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (input, None),
        };
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_len {
            None => max,
            Some(len)
                if !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit()) =>
            {
                len.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        Self::new(address, prefix_len).ok_or_else(|| {
            format!("{input:?}: a prefix length of {prefix_len} is longer than the address ({max} bits)")
        })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks() {
        let block = |s: &str| s.parse::<IpBlock>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(block("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(
            block("10.1.2.3/8").contains(ip("10.9.9.9")),
            "host bits are cleared"
        );
        assert_eq!(block("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(block("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!block("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(block("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(
            !block("0.0.0.0/0").contains(ip("fd00::1")),
            "families never mix"
        );
        assert!(
            block("0.0.0.0/0").contains(ip("::ffff:203.0.113.9")),
            "mapped source is IPv4"
        );
        assert!(block("fd00:77::/32").contains(ip("fd00:77:1::10")));
        assert!(!block("fd00:77::/32").contains(ip("fd00:78::10")));
        assert!(block("::/0").contains(ip("2001:db8::1")));
        assert!(!block("::/0").contains(ip("10.0.0.1")));
        assert!(block("fd00::1").contains(ip("fd00::1")));
        assert!(!block("fd00::1").contains(ip("fd00::2")));
        assert_eq!(block("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert!(block("::ffff:10.0.0.0/104").contains(ip("10.3.3.3")));
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
            "10.0.0",
            "10.0.0.0.0",
            "10.0.0.0/8/8",
            " 10.0.0.1",
            "fd00::1%eth0",
            "host.example",
            "10.0.0.0/a",
            "*",
        ] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn string_matches() {
        let m = StringMatch::parse;
        assert_eq!(m("*"), StringMatch::Presence);
        assert!(m("*").matches("cluster.local/ns/a/sa/b"));
        assert!(!m("*").matches(""));
        assert!(m("cluster.local/ns/demo/*").matches("cluster.local/ns/demo/sa/x"));
        assert!(!m("cluster.local/ns/demo/*").matches("cluster.local/ns/demo2/sa/x"));
        assert!(m("*/sa/client").matches("cluster.local/ns/demo/sa/client"));
        assert!(!m("*/sa/client").matches("cluster.local/ns/demo/sa/client2"));
        assert!(m("a*b").matches("a*b"), "an inner * is literal");
        assert!(!m("a*b").matches("axb"));
        assert_eq!(m("**").to_string(), "**");
        assert!(
            m("**").matches("x*"),
            "*suffix wins over prefix*, as in Istio"
        );
    }
}
