//! An AuthorizationPolicy in one line, as the L4 enforcement reads it: what it allows or
//! refuses, and which parts only an L7 proxy could see.
use std::fmt::Display;

use crate::policy::{
    model::{Condition, Match, Operation, Rule, Source},
    Action, AuthorizationPolicy,
};

/// Whether an ALLOW policy can match anything at L4: one of its rules uses no L7
/// attribute (an L7 rule matches nothing in an ALLOW policy).
pub(super) fn can_allow(policy: &AuthorizationPolicy) -> bool {
    policy.rules.iter().any(|rule| !rule.uses_l7())
}

/// What `policy` does, in one line.
pub(super) fn policy(policy: &AuthorizationPolicy) -> String {
    let rules = || {
        policy
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r, &policy.action))
            .collect::<Vec<_>>()
            .join("; or ")
    };
    match &policy.action {
        Action::Allow if policy.rules.is_empty() => {
            "no rules, so it allows nothing: every connection is refused (deny all)".to_owned()
        }
        Action::Allow if !can_allow(policy) => format!(
            "allows nothing at L4, every connection is refused: its rules all need HTTP attributes ({})",
            rules()
        ),
        Action::Allow => format!("allows connections {}", rules()),
        Action::Deny if policy.rules.is_empty() => "no rules, so it refuses nothing".to_owned(),
        Action::Deny => format!("refuses connections {}", rules()),
        Action::Custom { provider } if policy.rules.is_empty() => format!(
            "external authorizer {provider:?} (CUSTOM is not supported); no rules, so it refuses nothing"
        ),
        Action::Custom { provider } => format!(
            "external authorizer {provider:?}: CUSTOM is not supported, so warren refuses what its rules match (fail closed): connections {}",
            rules()
        ),
        Action::Audit => {
            "ignored: AUDIT is not supported (and never changes whether a connection is allowed)"
                .to_owned()
        }
    }
}

/// `from principal a to port 8080 when source.ip 10.0.0.0/8`, or `of any kind`.
fn rule(index: usize, rule: &Rule, action: &Action) -> String {
    let mut parts = Vec::new();
    if !rule.from.is_empty() {
        parts.push(format!(
            "from {}",
            alternatives(rule.from.iter().map(source))
        ));
    }
    if !rule.to.is_empty() {
        parts.push(format!(
            "to {}",
            alternatives(rule.to.iter().map(operation))
        ));
    }
    let conditions: Vec<String> = rule.when.iter().filter_map(condition).collect();
    if !conditions.is_empty() {
        parts.push(format!("when {}", conditions.join(" and ")));
    }
    let mut text = if parts.is_empty() {
        "of any kind".to_owned()
    } else {
        parts.join(" ")
    };
    if rule.uses_l7() {
        let l7 = rule.l7_attributes().join(", ");
        text.push_str(&match action {
            Action::Allow => {
                format!(" [rules[{index}] also needs {l7}, invisible at L4: it matches nothing]")
            }
            _ => {
                format!(" [rules[{index}] also names {l7}, invisible at L4: enforced without them]")
            }
        });
    }
    text
}

/// `a or b`, with each alternative in parentheses when it has several parts.
fn alternatives(items: impl Iterator<Item = Vec<String>>) -> String {
    let items: Vec<Vec<String>> = items.collect();
    let several = items.len() > 1;
    items
        .into_iter()
        .map(|parts| match parts.len() {
            0 => "anywhere".to_owned(),
            1 => parts.into_iter().next().unwrap_or_default(),
            _ if several => format!("({})", parts.join(" and ")),
            _ => parts.join(" and "),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

fn source(source: &Source) -> Vec<String> {
    let mut parts = matched("principal", &source.principals);
    parts.extend(matched("namespace", &source.namespaces));
    parts.extend(matched("service account", &source.service_accounts));
    parts.extend(matched("address", &source.ip_blocks));
    parts
}

fn operation(operation: &Operation) -> Vec<String> {
    matched("port", &operation.ports)
}

fn condition(condition: &Condition) -> Option<String> {
    let (key, text) = match condition {
        Condition::SourceIp(m) => ("source.ip", matched("", m)),
        Condition::SourcePrincipal(m) => ("source.principal", matched("", m)),
        Condition::SourceNamespace(m) => ("source.namespace", matched("", m)),
        Condition::DestinationIp(m) => ("destination.ip", matched("", m)),
        Condition::DestinationPort(m) => ("destination.port", matched("", m)),
        Condition::L7 { .. } => return None,
    };
    Some(format!("{key}{}", text.concat()))
}

/// `principal a or b`, `principal other than c`; `name` empty for `when` values.
fn matched<T: Display>(name: &str, m: &Match<T>) -> Vec<String> {
    let join = |values: &[T]| {
        values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let mut parts = Vec::new();
    if !m.values.is_empty() {
        parts.push(format!("{name} {}", join(&m.values)));
    }
    if !m.not_values.is_empty() {
        parts.push(format!("{name} other than {}", join(&m.not_values)));
    }
    parts
}
