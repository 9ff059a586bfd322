//! AuthorizationPolicy at L4, evaluated at the destination (Istio's order, as ztunnel
//! applies it):
//!
//! 1. a DENY policy (or CUSTOM, taken as DENY) that matches → deny;
//! 2. no ALLOW policy applies to the workload → allow;
//! 3. an ALLOW policy matches → allow;
//! 4. deny.
//!
//! A policy applies to a workload when it is in the root namespace or in the
//! workload's namespace, and its selector (if any) matches the workload's labels. It
//! matches when one of its rules does; a rule using L7 attributes never matches in an
//! ALLOW policy, and in a DENY policy matches on its L4 part alone.
use std::collections::HashMap;

use super::{
    model::{Action, AuthorizationPolicy, Condition, Operation, Rule, Source},
    trust_domain::TrustDomainBundle,
    ConnectionInfo, Decision, PolicyKind, PolicyRef, PolicyWarning,
};
use crate::workload::Workload;

/// Whether `policy`'s scope covers `workload` (its action aside).
pub(super) fn in_scope(policy: &AuthorizationPolicy, root: &str, workload: &Workload) -> bool {
    policy.target_refs.is_empty()
        && (policy.meta.namespace == workload.namespace || policy.meta.namespace == root)
        && policy
            .selector
            .as_ref()
            .is_none_or(|s| s.selects(&workload.labels))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
    /// CUSTOM: its rules refuse what they match (fail closed).
    CustomAsDeny,
}

struct Enforced {
    /// Position among all policies, oldest first: which policy a refusal names.
    order: usize,
    reference: PolicyRef,
    effect: Effect,
    policy: AuthorizationPolicy,
}

impl Enforced {
    /// The index of the first rule that matches, if any.
    fn first_match(&self, connection: &ConnectionInfo) -> Option<usize> {
        let principal = connection
            .source_identity
            .as_ref()
            .map(|id| id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str()));
        self.policy.rules.iter().position(|rule| {
            if self.effect == Effect::Allow && rule.uses_l7() {
                return false;
            }
            rule_matches(rule, connection, principal)
        })
    }
}

/// L7 parts (only reached in DENY policies) are taken to match.
fn rule_matches(rule: &Rule, connection: &ConnectionInfo, principal: Option<&str>) -> bool {
    (rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|s| source_matches(s, connection, principal)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, connection)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, connection, principal))
}

fn source_matches(source: &Source, connection: &ConnectionInfo, principal: Option<&str>) -> bool {
    let identity = connection.source_identity.as_ref();
    source
        .principals
        .matches(|m| principal.is_some_and(|p| m.matches(p)))
        && source
            .namespaces
            .matches(|m| identity.is_some_and(|id| m.matches(id.namespace())))
        && source.service_accounts.matches(|sa| {
            identity.is_some_and(|id| {
                id.namespace() == sa.namespace && id.service_account() == sa.service_account
            })
        })
        && source
            .ip_blocks
            .matches(|block| block.contains(connection.source_ip))
}

fn operation_matches(operation: &Operation, connection: &ConnectionInfo) -> bool {
    operation
        .ports
        .matches(|port| *port == connection.destination_port)
}

fn condition_matches(
    condition: &Condition,
    connection: &ConnectionInfo,
    principal: Option<&str>,
) -> bool {
    let identity = connection.source_identity.as_ref();
    match condition {
        Condition::SourceIp(m) => m.matches(|block| block.contains(connection.source_ip)),
        Condition::SourcePrincipal(m) => m.matches(|s| principal.is_some_and(|p| s.matches(p))),
        Condition::SourceNamespace(m) => {
            m.matches(|s| identity.is_some_and(|id| s.matches(id.namespace())))
        }
        Condition::DestinationIp(m) => m.matches(|block| block.contains(connection.destination_ip)),
        Condition::DestinationPort(m) => m.matches(|port| *port == connection.destination_port),
        Condition::L7 { .. } => true,
    }
}

/// The enforced policies, by namespace, oldest first.
pub(super) struct AuthzIndex {
    by_namespace: HashMap<String, Vec<Enforced>>,
}

impl AuthzIndex {
    /// `policies` oldest first; their principals are enforced with the trust domain
    /// aliases of `trust_domains`.
    pub(super) fn new(
        policies: &[AuthorizationPolicy],
        trust_domains: &TrustDomainBundle,
        warnings: &mut Vec<PolicyWarning>,
    ) -> Self {
        let mut by_namespace: HashMap<String, Vec<Enforced>> = HashMap::new();
        for (order, policy) in policies.iter().enumerate() {
            let reference = PolicyRef::of(PolicyKind::AuthorizationPolicy, &policy.meta);
            let mut warn = |message: String| {
                warnings.push(PolicyWarning {
                    policy: Some(reference.clone()),
                    message,
                })
            };
            if !policy.target_refs.is_empty() {
                warn(format!(
                    "ignored: it is bound with targetRefs ({}) to a gateway, Service or waypoint, not to workloads; warren enforces policies on workloads only (as ztunnel does)",
                    policy.target_refs.join(", ")
                ));
                continue;
            }
            let effect = match &policy.action {
                Action::Allow => Effect::Allow,
                Action::Deny => Effect::Deny,
                Action::Audit => {
                    warn("action AUDIT is not supported; the policy is ignored (AUDIT never changes whether a connection is allowed)".to_owned());
                    continue;
                }
                Action::Custom { provider } => {
                    warn(format!(
                        "action CUSTOM (external authorizer {provider:?}) is not supported; failing closed, the connections its rules match are refused, as a DENY policy would"
                    ));
                    Effect::CustomAsDeny
                }
            };
            if policy.meta.dry_run {
                warn(
                    "the istio.io/dry-run annotation is not supported; this policy is enforced"
                        .to_owned(),
                );
            }
            let l7_rules: Vec<String> = policy
                .rules
                .iter()
                .enumerate()
                .filter(|(_, rule)| rule.uses_l7())
                .map(|(i, rule)| format!("rules[{i}] ({})", rule.l7_attributes().join(", ")))
                .collect();
            if !l7_rules.is_empty() {
                let consequence = match effect {
                    Effect::Allow => "in an ALLOW policy such a rule matches nothing, so it allows less than written",
                    Effect::Deny | Effect::CustomAsDeny => "such a rule is enforced on its L4 attributes alone, so it denies more than written",
                };
                warn(format!(
                    "{} {} HTTP (L7) attributes that warren cannot see at L4; {consequence}; an L7 proxy (waypoint) is needed to enforce them",
                    l7_rules.join(", "),
                    if l7_rules.len() == 1 { "uses" } else { "use" },
                ));
            }
            by_namespace
                .entry(policy.meta.namespace.clone())
                .or_default()
                .push(Enforced {
                    order,
                    reference,
                    effect,
                    policy: with_trust_domain_aliases(policy, trust_domains),
                });
        }
        Self { by_namespace }
    }

    fn applicable<'a>(
        &'a self,
        root: &'a str,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Enforced> + Clone + 'a {
        let root_policies = self.by_namespace.get(root).into_iter().flatten();
        let namespace_policies = (workload.namespace != root)
            .then(|| self.by_namespace.get(&workload.namespace))
            .flatten()
            .into_iter()
            .flatten();
        root_policies.chain(namespace_policies).filter(move |p| {
            p.policy
                .selector
                .as_ref()
                .is_none_or(|s| s.selects(&workload.labels))
        })
    }

    pub(super) fn authorize(
        &self,
        root: &str,
        workload: &Workload,
        connection: &ConnectionInfo,
    ) -> Decision {
        let applicable = self.applicable(root, workload);
        // The oldest matching DENY policy is the one named.
        let denied_by = applicable
            .clone()
            .filter(|p| p.effect != Effect::Allow)
            .filter_map(|p| p.first_match(connection).map(|rule| (p, rule)))
            .min_by_key(|(p, _)| p.order);
        if let Some((policy, rule)) = denied_by {
            let reason = match &policy.policy.action {
                Action::Custom { provider } => format!(
                    "rules[{rule}] of the CUSTOM policy (external authorizer {provider:?}) matched; CUSTOM is not supported, so the connection is refused (fail closed)"
                ),
                _ => format!("rules[{rule}] of the DENY policy matched"),
            };
            return Decision::Deny {
                policy: policy.reference.clone(),
                reason,
            };
        }
        let mut considered = Vec::new();
        for policy in applicable.filter(|p| p.effect == Effect::Allow) {
            if policy.first_match(connection).is_some() {
                return Decision::Allow;
            }
            considered.push(policy);
        }
        // No ALLOW policy applies: allowed. Otherwise none matched: the oldest is named.
        considered.sort_by_key(|p| p.order);
        match considered.first() {
            None => Decision::Allow,
            Some(oldest) => Decision::Deny {
                policy: oldest.reference.clone(),
                reason: no_allow_matched(&considered),
            },
        }
    }
}

/// `policy` as enforced: each principal (`principals`, `notPrincipals`, the
/// `source.principal` condition) expanded to the trust domain's aliases, as Istio does.
fn with_trust_domain_aliases(
    policy: &AuthorizationPolicy,
    trust_domains: &TrustDomainBundle,
) -> AuthorizationPolicy {
    let mut policy = policy.clone();
    for rule in &mut policy.rules {
        for source in &mut rule.from {
            source.principals = trust_domains.expand(&source.principals);
        }
        for condition in &mut rule.when {
            if let Condition::SourcePrincipal(principals) = condition {
                *principals = trust_domains.expand(principals);
            }
        }
    }
    policy
}

fn no_allow_matched(policies: &[&Enforced]) -> String {
    let describe = |p: &Enforced| {
        let rules = &p.policy.rules;
        if rules.is_empty() {
            "it has no rules, so it allows nothing".to_owned()
        } else if rules.iter().all(Rule::uses_l7) {
            "its rules all use HTTP attributes, which match nothing at L4".to_owned()
        } else {
            "none of its rules matched".to_owned()
        }
    };
    match policies {
        [only] => format!("not allowed by the ALLOW policy: {}", describe(only)),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|p| format!("{} ({})", p.reference, describe(p)))
                .collect();
            format!(
                "not allowed by any of the {} ALLOW policies for this workload: {}",
                many.len(),
                list.join("; ")
            )
        }
    }
}
