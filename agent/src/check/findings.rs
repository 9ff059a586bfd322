//! The problems `warren check` flags: each names the workload or policy concerned, what
//! will happen, and what to do.
use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use super::{list_or_none, Finding, FindingKind, MtlsDecision, WorkloadReport};
use crate::{
    control::local::LocalConfig,
    policy::{
        model::{Condition, Match, ServiceAccountMatch, StringMatch, WorkloadSelector},
        Action, AuthorizationPolicy, MtlsMode, PolicyKind, PolicyRef, PolicySet,
    },
    workload::Workload,
};

/// Problems of one workload in the mesh: no identity; workload PeerAuthentications
/// shadowed by an older one; STRICT while workloads outside the mesh, which can only
/// connect in plain text, exist.
pub(super) fn workload(
    report: &WorkloadReport,
    policy: &PolicySet,
    outside_mesh: &[Arc<Workload>],
    trust_domain: &str,
    findings: &mut Vec<Finding>,
) {
    let workload = &report.workload;
    let mut selecting = super::workload_peer_authentications(policy, workload);
    if let Some(winner) = selecting.next() {
        let winner = format!("{}/{}", winner.meta.namespace, winner.meta.name);
        for shadowed in selecting {
            let subject = format!(
                "PeerAuthentication {}/{}",
                shadowed.meta.namespace, shadowed.meta.name
            );
            findings.push(Finding {
                kind: FindingKind::ShadowedPeerAuthentication,
                message: format!(
                    "{subject} is ignored for {workload}: {winner} also selects it and takes precedence (only one PeerAuthentication per workload counts, as in Istio: the oldest, or the first read when they are equally old). Merge them, or narrow their selectors."
                ),
                subject,
            });
        }
    }
    if let Err(err) = workload.identity(trust_domain) {
        findings.push(Finding {
            kind: FindingKind::InvalidIdentity,
            subject: workload.to_string(),
            message: format!(
                "{workload} has no valid identity, so the agent on node {} will refuse to start: {err}",
                workload.node
            ),
        });
    }
    if outside_mesh.is_empty() {
        return;
    }
    let strict_ports: Vec<u16> = report
        .port_mtls
        .iter()
        .filter(|p| p.decision.mode == MtlsMode::Strict)
        .map(|p| p.port)
        .collect();
    let open_ports: Vec<u16> = report
        .port_mtls
        .iter()
        .filter(|p| p.decision.mode.allows_plaintext())
        .map(|p| p.port)
        .collect();
    let (strict, by) = if report.mtls.mode == MtlsMode::Strict {
        let except = if open_ports.is_empty() {
            String::new()
        } else {
            format!(" except on {}", ports(&open_ports))
        };
        (format!("STRICT{except}"), decider(&report.mtls))
    } else if !strict_ports.is_empty() {
        let deciders: BTreeSet<String> = report
            .port_mtls
            .iter()
            .filter(|p| p.decision.mode == MtlsMode::Strict)
            .map(|p| decider(&p.decision))
            .collect();
        (
            format!("STRICT on {}", ports(&strict_ports)),
            deciders.into_iter().collect::<Vec<_>>().join(", "),
        )
    } else {
        return;
    };
    let names = list_or_none(outside_mesh.iter());
    let namespaces: BTreeSet<&str> = outside_mesh.iter().map(|w| w.namespace.as_str()).collect();
    let (are, its, calls) = if outside_mesh.len() == 1 {
        ("is", "its", "it calls")
    } else {
        ("are", "their", "they call")
    };
    findings.push(Finding {
        kind: FindingKind::StrictRefusesPlaintext,
        subject: workload.to_string(),
        message: format!(
            "{workload} is {strict} ({by}) but {names} {are} not in the mesh: {its} plaintext connections to {workload} will be refused if {calls} it. Enroll {} {}, or set PERMISSIVE for {workload} (a PeerAuthentication selecting it, or portLevelMtls for the ports {calls}).",
            if namespaces.len() == 1 { "namespace" } else { "namespaces" },
            namespaces.into_iter().collect::<Vec<_>>().join(", "),
        ),
    });
}

fn ports(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "{} {}",
        if ports.len() == 1 { "port" } else { "ports" },
        list.join(", ")
    )
}

fn decider(decision: &MtlsDecision) -> String {
    match &decision.decided_by {
        Some((policy, _)) => format!("PeerAuthentication {policy}"),
        None => "mesh default".to_owned(),
    }
}

/// Problems of the policies, judged against every workload of the config: namespaces
/// without workloads in the mesh, selectors that select nothing, names that match no
/// workload, and the policy set's own warnings — grouped by policy, oldest first.
pub(super) fn policies(
    config: &LocalConfig,
    policy: &PolicySet,
    trust_domain: &str,
    findings: &mut Vec<Finding>,
) {
    let known = Known {
        workloads: &config.workloads,
        mesh_namespaces: &config.mesh_namespaces,
        trust_domain,
        root: &policy.config().root_namespace,
    };
    let mut warnings: Vec<_> = policy.warnings().iter().map(Some).collect();
    let mut policy_warnings = |reference: &PolicyRef, findings: &mut Vec<Finding>| {
        for slot in warnings.iter_mut() {
            if let Some(warning) = slot.filter(|w| w.policy.as_ref() == Some(reference)) {
                findings.push(warning_finding(warning));
                *slot = None;
            }
        }
    };
    for peer in policy.peer_authentications() {
        let reference = PolicyRef::new(
            PolicyKind::PeerAuthentication,
            &peer.meta.namespace,
            &peer.meta.name,
        );
        let subject = format!("PeerAuthentication {reference}");
        let namespace_ok =
            known.namespace_has_mesh_workloads(&subject, reference.namespace(), findings);
        // A selector in the root namespace is ignored (the policy set warns).
        if namespace_ok && peer.meta.namespace != known.root {
            if let Some(selector) = &peer.selector {
                known.selector_selects(&subject, reference.namespace(), selector, findings);
            }
        }
        policy_warnings(&reference, findings);
    }
    for authz in policy.authorization_policies() {
        let reference = PolicyRef::new(
            PolicyKind::AuthorizationPolicy,
            &authz.meta.namespace,
            &authz.meta.name,
        );
        let subject = format!("AuthorizationPolicy {reference}");
        let namespace_ok =
            known.namespace_has_mesh_workloads(&subject, reference.namespace(), findings);
        if namespace_ok {
            if let Some(selector) = &authz.selector {
                known.selector_selects(&subject, reference.namespace(), selector, findings);
            }
        }
        // Policies warren ignores (targetRefs, AUDIT) are warned about as such.
        if authz.target_refs.is_empty() && authz.action != Action::Audit {
            known.names_in(&subject, authz, findings);
        }
        policy_warnings(&reference, findings);
    }
    for warning in warnings.into_iter().flatten() {
        findings.push(warning_finding(warning));
    }
    not_decoding(config, policy, findings);
}

/// Each document that does not decode, with the workloads in the mesh it fails closed
/// for — as the agent enforces it.
fn not_decoding(config: &LocalConfig, policy: &PolicySet, findings: &mut Vec<Finding>) {
    let root = policy.config().root_namespace.as_str();
    for broken in policy.broken() {
        let mut affected: Vec<String> = config
            .workloads
            .iter()
            .filter(|w| w.in_mesh && !w.foreign_hbone)
            .filter(|w| broken.may_affect(root, w))
            .map(|w| w.to_string())
            .collect();
        affected.sort();
        let subject = format!("policy document {}", broken.location);
        let affected = if affected.is_empty() {
            "no workload in the mesh now".to_owned()
        } else {
            affected.join(", ")
        };
        findings.push(Finding {
            kind: FindingKind::PolicyDoesNotDecode,
            message: format!(
                "{subject} does not decode: {}. The agent fails closed for {}: {} ({affected}). Fix the document; the agent applies the fix within 2 seconds.",
                broken.error,
                broken.scope(root),
                broken.consequence()
            ),
            subject,
        });
    }
}

fn warning_finding(warning: &crate::policy::PolicyWarning) -> Finding {
    Finding {
        kind: FindingKind::PolicyWarning,
        subject: match &warning.policy {
            Some(policy) => format!("{} {policy}", policy.kind()),
            None => "policy".to_owned(),
        },
        message: warning.to_string(),
    }
}

/// The workloads of the config, to judge the names policies use.
struct Known<'a> {
    workloads: &'a [Arc<Workload>],
    mesh_namespaces: &'a HashSet<String>,
    trust_domain: &'a str,
    root: &'a str,
}

/// A name a policy uses, and how it matches a workload.
enum Name<'a> {
    Principal(&'a StringMatch),
    Namespace(&'a StringMatch),
    ServiceAccount(&'a ServiceAccountMatch),
}

impl Name<'_> {
    fn matches(&self, workload: &Workload, trust_domain: &str) -> bool {
        match self {
            Name::Principal(m) => m.matches(&format!(
                "{trust_domain}/ns/{}/sa/{}",
                workload.namespace, workload.service_account
            )),
            Name::Namespace(m) => m.matches(&workload.namespace),
            Name::ServiceAccount(sa) => {
                workload.namespace == sa.namespace && workload.service_account == sa.service_account
            }
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Name::Principal(_) => "principal",
            Name::Namespace(_) => "namespace",
            Name::ServiceAccount(_) => "service account",
        }
    }

    fn value(&self) -> String {
        match self {
            Name::Principal(m) | Name::Namespace(m) => m.to_string(),
            Name::ServiceAccount(sa) => sa.to_string(),
        }
    }
}

impl Known<'_> {
    /// A policy outside the root namespace only acts on workloads in the mesh in its own
    /// namespace; flags it when there are none. Returns whether there are.
    fn namespace_has_mesh_workloads(
        &self,
        subject: &str,
        namespace: &str,
        findings: &mut Vec<Finding>,
    ) -> bool {
        if namespace == self.root {
            return true;
        }
        let in_namespace: Vec<&Arc<Workload>> = self
            .workloads
            .iter()
            .filter(|w| w.namespace == namespace)
            .collect();
        if in_namespace.iter().any(|w| w.in_mesh) {
            return true;
        }
        let message = if self.mesh_namespaces.contains(namespace) {
            format!(
                "{subject}: namespace {namespace} is in the mesh but no workload in the config is in it, so the policy applies to nothing. Check the namespace, or add its workloads to the config."
            )
        } else if !in_namespace.is_empty() {
            format!(
                "{subject}: namespace {namespace} is not in the mesh (meshNamespaces), so warren enforces nothing there and this policy has no effect on {}. Add {namespace} to meshNamespaces to enforce it, or remove the policy.",
                list_or_none(in_namespace)
            )
        } else {
            format!(
                "{subject}: no workload in the config is in namespace {namespace}, so the policy has no effect. Check the namespace (a policy for the whole mesh goes in the root namespace {}).",
                self.root
            )
        };
        findings.push(Finding {
            kind: FindingKind::NoWorkloadInNamespace,
            subject: subject.to_owned(),
            message,
        });
        false
    }

    /// A selector in the root namespace may select workloads of any namespace; elsewhere,
    /// only of its own.
    fn selector_selects(
        &self,
        subject: &str,
        namespace: &str,
        selector: &WorkloadSelector,
        findings: &mut Vec<Finding>,
    ) {
        let mesh_wide = namespace == self.root;
        let selects_one = self
            .workloads
            .iter()
            .filter(|w| w.in_mesh && (mesh_wide || w.namespace == namespace))
            .any(|w| selector.selects(&w.labels));
        if selects_one {
            return;
        }
        let scope = if mesh_wide {
            "any namespace in the mesh".to_owned()
        } else {
            format!("namespace {namespace}")
        };
        findings.push(Finding {
            kind: FindingKind::SelectsNothing,
            subject: subject.to_owned(),
            message: format!(
                "{subject}: selector {selector} selects no workload in {scope}, so the policy has no effect. Check the labels against the workloads' `labels` in the config."
            ),
        });
    }

    /// Every principal, namespace and service account `policy`'s rules name.
    fn names_in(&self, subject: &str, policy: &AuthorizationPolicy, findings: &mut Vec<Finding>) {
        for (i, rule) in policy.rules.iter().enumerate() {
            for (j, source) in rule.from.iter().enumerate() {
                let at = format!("rules[{i}].from[{j}].source");
                let mut check = |field: &str, negated: bool, name: Name<'_>| {
                    self.name(
                        subject,
                        &policy.action,
                        &format!("{at}.{field}"),
                        negated,
                        name,
                        findings,
                    )
                };
                each(&source.principals, |negated, m| {
                    check(
                        if negated {
                            "notPrincipals"
                        } else {
                            "principals"
                        },
                        negated,
                        Name::Principal(m),
                    )
                });
                each(&source.namespaces, |negated, m| {
                    check(
                        if negated {
                            "notNamespaces"
                        } else {
                            "namespaces"
                        },
                        negated,
                        Name::Namespace(m),
                    )
                });
                each(&source.service_accounts, |negated, m| {
                    check(
                        if negated {
                            "notServiceAccounts"
                        } else {
                            "serviceAccounts"
                        },
                        negated,
                        Name::ServiceAccount(m),
                    )
                });
            }
            for (j, condition) in rule.when.iter().enumerate() {
                let (key, m) = match condition {
                    Condition::SourcePrincipal(m) => ("source.principal", m),
                    Condition::SourceNamespace(m) => ("source.namespace", m),
                    _ => continue,
                };
                each(m, |negated, value| {
                    let field = format!(
                        "rules[{i}].when[{j}] ({key}) {}",
                        if negated { "notValues" } else { "values" }
                    );
                    let name = if key == "source.principal" {
                        Name::Principal(value)
                    } else {
                        Name::Namespace(value)
                    };
                    self.name(subject, &policy.action, &field, negated, name, findings)
                });
            }
        }
    }

    /// Flags `name` when no workload in the mesh matches it.
    fn name(
        &self,
        subject: &str,
        action: &Action,
        field: &str,
        negated: bool,
        name: Name<'_>,
        findings: &mut Vec<Finding>,
    ) {
        let matching: Vec<&Arc<Workload>> = self
            .workloads
            .iter()
            .filter(|w| name.matches(w, self.trust_domain))
            .collect();
        if matching.iter().any(|w| w.in_mesh) {
            return;
        }
        let (what, value) = (name.what(), name.value());
        let effect = match (negated, action) {
            (true, _) => "it excludes no workload in the mesh",
            (false, Action::Allow) => "it lets no workload in the mesh in",
            (false, _) => "it refuses no workload in the mesh",
        };
        if !matching.is_empty() {
            let (it, connects) = if matching.len() == 1 {
                ("it", "it connects")
            } else {
                ("them", "they connect")
            };
            let namespaces: BTreeSet<&str> =
                matching.iter().map(|w| w.namespace.as_str()).collect();
            findings.push(Finding {
                kind: FindingKind::OnlyOutsideMesh,
                subject: subject.to_owned(),
                message: format!(
                    "{subject}: {field} names {what} {value}, which matches only {}, not in the mesh: {connects} in plain text, without an identity, so this never matches {it} ({effect}). Enroll namespace {}, or match {it} by ipBlocks.",
                    list_or_none(&matching),
                    namespaces.into_iter().collect::<Vec<_>>().join(", "),
                ),
            });
            return;
        }
        let (kind, hint, fix) = match &name {
            Name::Principal(m) => (
                FindingKind::UnknownPrincipal,
                self.principal_hint(m),
                format!(
                    "Check the spelling (principals are <trust-domain>/ns/<namespace>/sa/<service-account>, without spiffe://, e.g. {}), or add the workload to the config.",
                    self.example_principal()
                ),
            ),
            Name::Namespace(_) => (
                FindingKind::UnknownNamespace,
                String::new(),
                "Check the spelling, or add that namespace's workloads to the config.".to_owned(),
            ),
            Name::ServiceAccount(_) => (
                FindingKind::UnknownServiceAccount,
                String::new(),
                "Check the spelling (namespace/account, or account alone for the policy's namespace), or add the workload to the config.".to_owned(),
            ),
        };
        findings.push(Finding {
            kind,
            subject: subject.to_owned(),
            message: format!(
                "{subject}: {field} names {what} {value}, which matches no known workload{hint}; {effect}. {fix}"
            ),
        });
    }

    /// Why a principal may match nothing: written as a URI, or in another trust domain.
    fn principal_hint(&self, m: &StringMatch) -> String {
        let written = m.to_string();
        if written.starts_with("spiffe://") {
            return " (principals are written without spiffe://)".to_owned();
        }
        match written.split_once("/ns/") {
            Some((domain, _)) if !domain.contains('*') && domain != self.trust_domain => format!(
                " (it is in trust domain {domain}, this mesh's is {})",
                self.trust_domain
            ),
            _ => String::new(),
        }
    }

    fn example_principal(&self) -> String {
        match self.workloads.iter().find(|w| w.in_mesh) {
            Some(w) => format!(
                "{}/ns/{}/sa/{}",
                self.trust_domain, w.namespace, w.service_account
            ),
            None => format!("{}/ns/demo/sa/client", self.trust_domain),
        }
    }
}

/// Calls `f(negated, value)` for every value of `m`.
fn each<T>(m: &Match<T>, mut f: impl FnMut(bool, &T)) {
    for value in &m.values {
        f(false, value);
    }
    for value in &m.not_values {
        f(true, value);
    }
}
