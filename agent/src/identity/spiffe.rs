//! SPIFFE IDs of the Istio shape: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict because the ID is compared byte for byte during secure naming: one
//! spelling per identity, no percent-encoding, no query, no trailing slash. Characters
//! follow the SPIFFE ID standard (trust domain: lowercase letters, digits, `.`, `-`, `_`;
//! path segments: letters, digits, `.`, `-`, `_`), which covers every Kubernetes name.
use std::{fmt, sync::Arc};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::IdentityError;

const SCHEME: &str = "spiffe://";
/// The SPIFFE standard's limit for the whole URI, in bytes.
const MAX_LEN: usize = 2048;
/// The SPIFFE standard's limit for a trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload identity: the service account a pod runs as, within a trust domain.
///
/// Held as its URI in an `Arc<str>`, so cloning one per connection (logs, policy) costs
/// a reference count, and equality is equality of the URI.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    /// Where the namespace starts in `uri`.
    namespace_at: usize,
    /// Where the service account starts in `uri`.
    service_account_at: usize,
}

impl Identity {
    /// The identity of `service_account` in `namespace`. Fails when a part holds a
    /// character a SPIFFE ID cannot carry (e.g. a `/`), so a bad name in the config is
    /// caught here rather than by a peer that cannot parse our certificate.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (trust_domain, namespace, service_account) = (
            trust_domain.into(),
            namespace.into(),
            service_account.into(),
        );
        let invalid =
            |part: &'static str, value: &str, reason: String| IdentityError::InvalidPart {
                part,
                value: value.to_owned(),
                reason,
            };
        check_trust_domain(&trust_domain).map_err(|r| invalid("trust domain", &trust_domain, r))?;
        check_segment(&namespace).map_err(|r| invalid("namespace", &namespace, r))?;
        check_segment(&service_account)
            .map_err(|r| invalid("service account", &service_account, r))?;
        let identity = Self::from_parts(&trust_domain, &namespace, &service_account);
        if identity.uri.len() > MAX_LEN {
            return Err(IdentityError::InvalidPart {
                part: "service account",
                value: service_account,
                reason: format!("the SPIFFE ID would be longer than {MAX_LEN} bytes"),
            });
        }
        Ok(identity)
    }

    /// Parts already checked.
    fn from_parts(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let namespace_at = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let service_account_at = namespace_at + namespace.len() + "/sa/".len();
        Self {
            uri: uri.into(),
            namespace_at,
            service_account_at,
        }
    }

    /// Parse `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, nothing else.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let malformed = |reason: String| IdentityError::Malformed {
            input: input.to_owned(),
            reason,
        };
        if input.len() > MAX_LEN {
            return Err(malformed(format!("longer than {MAX_LEN} bytes")));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| malformed("it does not start with spiffe:// (lowercase)".to_owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| malformed("it has no path after the trust domain".to_owned()))?;
        check_trust_domain(trust_domain).map_err(malformed)?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(malformed(format!(
                "the path has {} segments; it must be /ns/<namespace>/sa/<service-account>",
                segments.len()
            )));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(malformed(
                "the path must be /ns/<namespace>/sa/<service-account>".to_owned(),
            ));
        }
        check_segment(namespace).map_err(|r| malformed(format!("namespace: {r}")))?;
        check_segment(service_account).map_err(|r| malformed(format!("service account: {r}")))?;
        Ok(Self::from_parts(trust_domain, namespace, service_account))
    }

    /// The SPIFFE ID in a certificate's URI subject alternative name. The certificate must
    /// carry exactly one URI SAN (the SPIFFE X.509-SVID rule), of the Istio shape.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            IdentityError::UnreadableCertificate {
                reason: e.to_string(),
            }
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::UnreadableCertificate {
                reason: format!("subject alternative names: {e}"),
            })?
            .ok_or(IdentityError::NoSpiffeId)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris[..] {
            [] => Err(IdentityError::NoSpiffeId),
            [uri] => Self::parse(uri),
            _ => Err(IdentityError::SeveralUriSans { count: uris.len() }),
        }
    }

    /// The SPIFFE ID as a URI, as `Display` writes it.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.namespace_at - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace_at..self.service_account_at - "/sa/".len()]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account_at..]
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&&*self.uri).finish()
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A trust domain name: the SPIFFE standard's character set, lowercase only.
pub(crate) fn check_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("the trust domain is empty".to_owned());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes"
        ));
    }
    match trust_domain
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(format!(
            "the trust domain {trust_domain:?} contains {c:?}; trust domains use lowercase letters, digits, '.', '-' and '_'"
        )),
        None => Ok(()),
    }
}

/// One path segment: non-empty, not `.` or `..`, the SPIFFE standard's character set.
fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("it is empty".to_owned());
    }
    if segment == "." || segment == ".." {
        return Err(format!("{segment:?} is not allowed"));
    }
    match segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(format!(
            "{segment:?} contains {c:?}; use letters, digits, '.', '-' and '_'"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = Identity::new("cluster.local", "demo", "server").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/server");
        assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "server");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/server");
        assert_eq!(
            format!("{id:?}"),
            "Identity(\"spiffe://cluster.local/ns/demo/sa/server\")"
        );
        let parsed: Identity = "spiffe://td_1/ns/kube-system/sa/my.sa_1".parse().unwrap();
        assert_eq!(parsed.trust_domain(), "td_1");
        assert_eq!(parsed.namespace(), "kube-system");
        assert_eq!(parsed.service_account(), "my.sa_1");
    }

    #[test]
    fn equal_and_hashed_by_value() {
        let mut set = std::collections::HashSet::new();
        set.insert(Identity::new("td", "a", "b").unwrap());
        assert!(set.contains(&Identity::parse("spiffe://td/ns/a/sa/b").unwrap()));
        assert!(!set.contains(&Identity::parse("spiffe://td/ns/a/sa/c").unwrap()));
    }

    #[test]
    fn parse_rejects() {
        let cases = [
            ("", "does not start with spiffe://"),
            ("https://td/ns/a/sa/b", "does not start with spiffe://"),
            ("SPIFFE://td/ns/a/sa/b", "does not start with spiffe://"),
            ("spiffe://td", "no path"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://TD/ns/a/sa/b", "contains 'T'"),
            ("spiffe://td:443/ns/a/sa/b", "contains ':'"),
            ("spiffe://user@td/ns/a/sa/b", "contains '@'"),
            ("spiffe://td/", "1 segments"),
            ("spiffe://td/ns/a", "2 segments"),
            ("spiffe://td/ns/a/sa/b/", "5 segments"),
            ("spiffe://td/ns/a/sa/b/c", "5 segments"),
            ("spiffe://td/ns//sa/b", "namespace: it is empty"),
            ("spiffe://td/ns/a/sa/", "service account: it is empty"),
            (
                "spiffe://td/sa/a/ns/b",
                "must be /ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://td/NS/a/sa/b",
                "must be /ns/<namespace>/sa/<service-account>",
            ),
            ("spiffe://td/ns/../sa/b", "\"..\" is not allowed"),
            ("spiffe://td/ns/a/sa/b%2F", "contains '%'"),
            ("spiffe://td/ns/a/sa/b?x=1", "contains '?'"),
            ("spiffe://td/ns/a/sa/b#f", "contains '#'"),
        ];
        for (input, expected) in cases {
            let err = Identity::parse(input).expect_err(input).to_string();
            assert!(
                err.contains(expected),
                "{input:?}: {err:?} should mention {expected:?}"
            );
            assert!(err
                .contains("expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"));
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(MAX_LEN));
        assert!(Identity::parse(&long).is_err());
    }

    #[test]
    fn new_rejects_bad_parts() {
        let err = Identity::new("cluster.local", "a/b", "sa")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespace \"a/b\""), "{err}");
        let err = Identity::new("Cluster.Local", "a", "sa")
            .unwrap_err()
            .to_string();
        assert!(err.contains("trust domain"), "{err}");
        let err = Identity::new("td", "a", "").unwrap_err().to_string();
        assert!(err.contains("service account"), "{err}");
    }

    #[test]
    fn from_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let with = |sans: Vec<rcgen::SanType>| {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let dns = rcgen::SanType::DnsName("example.com".try_into().unwrap());

        let one = with(vec![dns.clone(), uri("spiffe://td/ns/a/sa/b")]);
        assert_eq!(
            Identity::from_certificate(&one).unwrap(),
            Identity::new("td", "a", "b").unwrap()
        );
        assert!(matches!(
            Identity::from_certificate(&with(vec![dns])),
            Err(IdentityError::NoSpiffeId)
        ));
        assert!(matches!(
            Identity::from_certificate(&with(vec![])),
            Err(IdentityError::NoSpiffeId)
        ));
        assert!(matches!(
            Identity::from_certificate(&with(vec![
                uri("spiffe://td/ns/a/sa/b"),
                uri("spiffe://td/ns/a/sa/c")
            ])),
            Err(IdentityError::SeveralUriSans { count: 2 })
        ));
        assert!(matches!(
            Identity::from_certificate(&with(vec![uri("spiffe://td/workload/x")])),
            Err(IdentityError::Malformed { .. })
        ));
        assert!(matches!(
            Identity::from_certificate(b"not a certificate"),
            Err(IdentityError::UnreadableCertificate { .. })
        ));
    }
}
