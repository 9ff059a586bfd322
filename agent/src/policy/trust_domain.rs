//! Istio's trust domain aliases (MeshConfig `trustDomain` and `trustDomainAliases`), as
//! Istio applies them to AuthorizationPolicy principals (`principals`, `notPrincipals`,
//! and the `source.principal` condition's `values`/`notValues`) — Istio's
//! `trustdomain.Bundle.ReplaceTrustDomainAliases`:
//!
//! - the bundle is the trust domain, then its aliases;
//! - a principal `TD/ns/NS/sa/SA` (exactly five `/`-separated parts) whose `TD` is in the
//!   bundle — or is `cluster.local`, which stands for the local trust domain — becomes one
//!   principal per trust domain of the bundle, `T/ns/NS/sa/SA` (a `TD` with a `*` that
//!   matches a bundle domain stays as written for the domains it matches);
//! - any other principal is kept as written: `*`, `*/ns/NS/sa/SA` (any trust domain
//!   already), one of another trust domain, or not of that form.
//!
//! So with trust domain `cluster.local` and alias `old.example`, a policy naming
//! `cluster.local/ns/demo/sa/client` also matches the peer `spiffe://old.example/ns/demo/sa/client`
//! — and a DENY of `old.example/ns/demo/sa/evil` also denies `cluster.local/…/evil`. It
//! widens who a principal names, never who may connect at all: a peer of any trust domain
//! is known only from a certificate that chains to the trust bundle (`tls.rs`).
use super::model::{Match, StringMatch};
use crate::config::DEFAULT_TRUST_DOMAIN;

/// The trust domain and its aliases, the trust domain first, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TrustDomainBundle {
    domains: Vec<String>,
}

impl TrustDomainBundle {
    pub(super) fn new(trust_domain: &str, aliases: &[String]) -> Self {
        let mut domains = vec![trust_domain.to_owned()];
        for alias in aliases {
            if !domains.contains(alias) {
                domains.push(alias.clone());
            }
        }
        Self { domains }
    }

    /// Whether the bundle changes no principal: the trust domain is `cluster.local` and
    /// has no aliases.
    fn is_identity(&self) -> bool {
        self.domains == [DEFAULT_TRUST_DOMAIN]
    }

    /// `principals` with their trust domain replaced by each of the bundle's (see the
    /// module's documentation), in Istio's order, each once.
    pub(super) fn expand(&self, principals: &Match<StringMatch>) -> Match<StringMatch> {
        if self.is_identity() {
            return principals.clone();
        }
        let expand_all = |values: &[StringMatch]| -> Vec<StringMatch> {
            let mut out: Vec<StringMatch> = Vec::new();
            for value in values {
                for principal in self.expand_one(&value.to_string()) {
                    let principal = StringMatch::parse(&principal);
                    if !out.contains(&principal) {
                        out.push(principal);
                    }
                }
            }
            out
        };
        Match::new(
            expand_all(&principals.values),
            expand_all(&principals.not_values),
        )
    }

    /// One principal, as written in the policy (without `spiffe://`).
    pub(super) fn expand_one(&self, principal: &str) -> Vec<String> {
        let parts: Vec<&str> = principal.split('/').collect();
        let [domain, "ns", _, "sa", _] = parts.as_slice() else {
            return vec![principal.to_owned()];
        };
        let domain = *domain;
        let named = |bundled: &str| domain_matches(domain, bundled);
        if domain == "*"
            || !(self.domains.iter().any(|d| named(d)) || domain == DEFAULT_TRUST_DOMAIN)
        {
            return vec![principal.to_owned()];
        }
        let rest = &principal[domain.len()..];
        let mut out: Vec<String> = Vec::new();
        for bundled in &self.domains {
            let replaced = if named(bundled) {
                principal.to_owned()
            } else {
                format!("{bundled}{rest}")
            };
            if !out.contains(&replaced) {
                out.push(replaced);
            }
        }
        out
    }
}

/// Whether the trust domain `written` in a principal (`*`-prefixed or -suffixed, or
/// exact) names the trust domain `domain`.
fn domain_matches(written: &str, domain: &str) -> bool {
    if let Some(suffix) = written.strip_prefix('*') {
        domain.ends_with(suffix)
    } else if let Some(prefix) = written.strip_suffix('*') {
        domain.starts_with(prefix)
    } else {
        written == domain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(trust_domain: &str, aliases: &[&str]) -> TrustDomainBundle {
        let aliases: Vec<String> = aliases.iter().map(|a| a.to_string()).collect();
        TrustDomainBundle::new(trust_domain, &aliases)
    }

    /// Trust domain, aliases, principals as written, principals as enforced.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

    /// Istio's own cases (pkg/config/security/trustdomain, TestReplaceTrustDomainAliases).
    #[test]
    fn principals_are_expanded_as_istio_does() {
        let cases: &[Case<'_>] = &[
            (
                "cluster.local",
                &[],
                &["cluster.local/ns/foo/sa/bar"],
                &["cluster.local/ns/foo/sa/bar"],
            ),
            ("cluster.local", &[], &["*"], &["*"]),
            (
                "cluster.local",
                &[],
                &["*/ns/foo/sa/bar"],
                &["*/ns/foo/sa/bar"],
            ),
            (
                "td2",
                &["td1"],
                &["td1/ns/foo/sa/bar"],
                &["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"],
            ),
            (
                "td1",
                &["cluster.local"],
                &["cluster.local/ns/foo/sa/bar", "cluster.local/ns/yyy/sa/zzz"],
                &[
                    "td1/ns/foo/sa/bar",
                    "cluster.local/ns/foo/sa/bar",
                    "td1/ns/yyy/sa/zzz",
                    "cluster.local/ns/yyy/sa/zzz",
                ],
            ),
            (
                "td1",
                &["cluster.local"],
                &["*/ns/foo/sa/bar", "*sa/zzz", "*"],
                &["*/ns/foo/sa/bar", "*sa/zzz", "*"],
            ),
            (
                "td2",
                &["td1", "cluster.local"],
                &["cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"],
                &[
                    "td2/ns/foo/sa/bar",
                    "td1/ns/foo/sa/bar",
                    "cluster.local/ns/foo/sa/bar",
                    "td2/ns/yyy/sa/zzz",
                    "td1/ns/yyy/sa/zzz",
                    "cluster.local/ns/yyy/sa/zzz",
                ],
            ),
            (
                "td2",
                &["foo-td1", "cluster.local"],
                &["*-td1/ns/foo/sa/bar"],
                &[
                    "td2/ns/foo/sa/bar",
                    "*-td1/ns/foo/sa/bar",
                    "cluster.local/ns/foo/sa/bar",
                ],
            ),
            (
                "td1",
                &["td2"],
                &["some-td/ns/foo/sa/bar"],
                &["some-td/ns/foo/sa/bar"],
            ),
            (
                "td1",
                &["td2", "some-td"],
                &["some-td/ns/foo/sa/bar"],
                &[
                    "td1/ns/foo/sa/bar",
                    "td2/ns/foo/sa/bar",
                    "some-td/ns/foo/sa/bar",
                ],
            ),
            (
                "new-td",
                &["td2", "td3"],
                &["td1/ns/some-ns/sa/some-sa", "td2/ns/foo/sa/bar"],
                &[
                    "td1/ns/some-ns/sa/some-sa",
                    "new-td/ns/foo/sa/bar",
                    "td2/ns/foo/sa/bar",
                    "td3/ns/foo/sa/bar",
                ],
            ),
            (
                "new-td",
                &["td2", "td3"],
                &["/ns/some-ns/sa/some-sa"],
                &["/ns/some-ns/sa/some-sa"],
            ),
            (
                "new-td",
                &["old-td"],
                &["*-td/ns/some-ns/sa/some-sa"],
                &["*-td/ns/some-ns/sa/some-sa"],
            ),
            // cluster.local stands for the local trust domain, aliases or not.
            (
                "example.org",
                &[],
                &["cluster.local/ns/foo/sa/bar"],
                &["example.org/ns/foo/sa/bar"],
            ),
        ];
        for (trust_domain, aliases, principals, expected) in cases {
            let bundle = bundle(trust_domain, aliases);
            let got: Vec<String> = principals
                .iter()
                .flat_map(|p| bundle.expand_one(p))
                .collect();
            assert_eq!(
                got, *expected,
                "trust domain {trust_domain}, aliases {aliases:?}, principals {principals:?}"
            );
        }
    }

    #[test]
    fn values_and_not_values_are_both_expanded_and_parsed_back() {
        let bundle = bundle("cluster.local", &["old.example"]);
        let written = Match::new(
            vec![StringMatch::parse("cluster.local/ns/demo/sa/*")],
            vec![StringMatch::parse("old.example/ns/demo/sa/evil")],
        );
        let expanded = bundle.expand(&written);
        assert_eq!(
            expanded.values,
            [
                StringMatch::Prefix("cluster.local/ns/demo/sa/".into()),
                StringMatch::Prefix("old.example/ns/demo/sa/".into())
            ]
        );
        assert_eq!(
            expanded.not_values,
            [
                StringMatch::Exact("cluster.local/ns/demo/sa/evil".into()),
                StringMatch::Exact("old.example/ns/demo/sa/evil".into())
            ]
        );
    }
}
