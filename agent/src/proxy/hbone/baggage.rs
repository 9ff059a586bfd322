//! W3C `baggage` as Istio's ztunnel fills it on HBONE: the sending workload's metadata
//! (`k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name`, `service.name`,
//! `service.version`), on the CONNECT request for the source and on the 200 answer for
//! the destination.
//!
//! A peer's baggage is what it *says* about itself, not what its certificate proves: it
//! only fills metric labels of a peer this agent knows nothing else about (a pod behind
//! a ztunnel node), never a policy decision — as in ztunnel. Since a peer could say
//! anything, a value is taken only in the shape Kubernetes gives it (a namespace is a
//! DNS-1123 label, a workload name a DNS-1123 subdomain, the others label values, all of
//! bounded length); the metrics cap how many sources baggage may name
//! (`metrics::MetricLimits::baggage_sources`).
use http::{header::GetAll, HeaderValue};

use crate::workload::{Workload, CLUSTER_ID};

pub const BAGGAGE_HEADER: &str = "baggage";

/// The workload kinds of `k8s.<kind>.name` members, as ztunnel reads them.
const WORKLOAD_KINDS: [&str; 7] = [
    "deployment",
    "statefulset",
    "daemonset",
    "replicaset",
    "cronjob",
    "job",
    "pod",
];

/// The workload metadata one `baggage` header carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// The workload's name (`k8s.deployment.name`, `k8s.pod.name`, …).
    pub workload: Option<String>,
    /// The workload's kind as the key spells it (`deployment`, `pod`, …).
    pub workload_kind: Option<String>,
    /// Istio's canonical service (`service.name`).
    pub service: Option<String>,
    /// Istio's canonical revision (`service.version`).
    pub revision: Option<String>,
}

impl Baggage {
    /// What this agent says about one of its pods: its workload (owner) as ztunnel says
    /// it, `k8s.<kind>.name=<name>` (a kind ztunnel does not read is sent as `pod`).
    pub fn of(workload: &Workload) -> Self {
        let kind = workload.workload_kind().to_ascii_lowercase();
        let kind = if WORKLOAD_KINDS.contains(&kind.as_str()) {
            kind
        } else {
            "pod".to_owned()
        };
        Baggage {
            cluster: Some(CLUSTER_ID.to_owned()),
            namespace: Some(workload.namespace.clone()),
            workload: Some(workload.workload_name().to_owned()),
            workload_kind: Some(kind),
            service: Some(workload.canonical_service()),
            revision: Some(workload.canonical_revision()),
        }
    }

    /// Nothing known.
    pub fn is_empty(&self) -> bool {
        *self == Baggage::default()
    }

    /// The header value: `key=value` members joined by commas. A value that is not a
    /// plain token (possible only in a hand-written local config) is left out rather
    /// than sent in a form ztunnel would misread.
    pub fn header_value(&self) -> Option<HeaderValue> {
        let workload_key = format!(
            "k8s.{}.name",
            self.workload_kind
                .as_deref()
                .filter(|k| WORKLOAD_KINDS.contains(k))
                .unwrap_or("pod")
        );
        let members: Vec<String> = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload),
            ("service.name", &self.service),
            ("service.version", &self.revision),
        ]
        .into_iter()
        .filter_map(|(key, value)| {
            let value = value.as_deref().filter(|v| is_token(v))?;
            Some(format!("{key}={value}"))
        })
        .collect();
        if members.is_empty() {
            return None;
        }
        HeaderValue::from_str(&members.join(",")).ok()
    }

    /// The metadata in every `baggage` header of a request or answer. Members are
    /// `key=value[;properties]`; unknown keys, empty or unusable values and headers that
    /// are not visible ASCII are ignored, as ztunnel ignores them.
    pub fn parse(headers: GetAll<'_, HeaderValue>) -> Self {
        let mut baggage = Baggage::default();
        for value in headers {
            let Ok(value) = value.to_str() else {
                tracing::debug!(
                    ?value,
                    "ignoring a baggage header that is not visible ASCII"
                );
                continue;
            };
            for member in value.split(',') {
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                let value = value.split(';').next().unwrap_or_default().trim();
                let key = key.trim();
                let kind = key
                    .strip_prefix("k8s.")
                    .and_then(|k| k.strip_suffix(".name"))
                    .filter(|k| WORKLOAD_KINDS.contains(k));
                let slot = match (key, kind) {
                    ("k8s.cluster.name", _) => &mut baggage.cluster,
                    ("k8s.namespace.name", _) => &mut baggage.namespace,
                    (_, Some(_)) => &mut baggage.workload,
                    ("service.name", _) => &mut baggage.service,
                    ("service.version", _) => &mut baggage.revision,
                    _ => continue,
                };
                let valid = match key {
                    "k8s.namespace.name" => is_dns1123_label(value),
                    "k8s.cluster.name" | "service.name" | "service.version" => {
                        is_label_value(value)
                    }
                    _ => is_dns1123_subdomain(value),
                };
                if !valid {
                    tracing::debug!(
                        key,
                        length = value.len(),
                        "ignoring a baggage value that is not a Kubernetes name or label value"
                    );
                }
                let value = valid.then(|| value.to_owned());
                if value.is_some() {
                    *slot = value;
                    if let Some(kind) = kind {
                        baggage.workload_kind = Some(kind.to_owned());
                    }
                }
            }
        }
        baggage
    }
}

/// A DNS-1123 label (what a namespace is called): at most 63 lowercase letters, digits
/// and `-`, starting and ending with a letter or digit.
fn is_dns1123_label(value: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|&b| alnum(b) || b == b'-')
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
}

/// A DNS-1123 subdomain (what a Deployment or pod is called): DNS-1123 labels joined by
/// dots, at most 253 characters.
fn is_dns1123_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns1123_label)
}

/// A Kubernetes label value (an Istio canonical service or revision, a cluster name): at
/// most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Characters of Kubernetes names and label values (and a few more that baggage allows
/// unencoded): nothing that needs percent-encoding or could split a member.
fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderMap;

    use super::*;

    fn parse(values: &[&str]) -> Baggage {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(BAGGAGE_HEADER, HeaderValue::from_str(value).unwrap());
        }
        Baggage::parse(headers.get_all(BAGGAGE_HEADER))
    }

    #[test]
    fn reads_what_ztunnel_sends() {
        // ztunnel's own test values, in the shapes Kubernetes gives names (a namespace
        // and a Deployment name are lowercase DNS names).
        let got = parse(&[
            "k8s.cluster.name=K1,k8s.namespace.name=ns1,k8s.deployment.name=n1,service.name=N2,service.version=V1",
        ]);
        assert_eq!(
            got,
            Baggage {
                cluster: Some("K1".into()),
                namespace: Some("ns1".into()),
                workload: Some("n1".into()),
                workload_kind: Some("deployment".into()),
                service: Some("N2".into()),
                revision: Some("V1".into()),
            }
        );
        // One member per header line, as some peers send it.
        assert_eq!(
            parse(&[
                "k8s.cluster.name=K1",
                "k8s.namespace.name=ns1",
                "k8s.deployment.name=n1",
                "service.name=N2",
                "service.version=V1"
            ]),
            got
        );
    }

    #[test]
    fn ignores_what_it_cannot_use() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&["k8s.cluster.name=,service.name=,k8s.namespace.name="]).is_empty());
        assert!(parse(&["nonsense", "=x", "other.key=1", ",,,"]).is_empty());
        assert!(parse(&["service.name=a b", "k8s.namespace.name=x\"y"]).is_empty());
        assert!(parse(&[&format!("service.name={}", "x".repeat(300))]).is_empty());
        // Only what Kubernetes would call something: a peer cannot make up labels.
        for refused in [
            "k8s.namespace.name=Shop",                           // uppercase
            "k8s.namespace.name=-shop",                          // not starting alphanumeric
            "k8s.namespace.name=a.b",                            // a label, not a subdomain
            &format!("k8s.namespace.name={}", "a".repeat(64)),   // too long
            "k8s.deployment.name=cart/v1",                       // not a DNS name
            "k8s.pod.name=cart..x",                              // empty DNS label
            &format!("k8s.pod.name={}", "a.".repeat(127) + "a"), // 255 characters
            "service.name=cart:v1",
            "service.version=v1-",
            &format!("service.version={}", "1".repeat(64)),
            "k8s.cluster.name=east/1",
            "service.name=%63art",
        ] {
            assert!(parse(&[refused]).is_empty(), "{refused}");
        }
        for (accepted, read) in [
            ("k8s.namespace.name=shop-2", "shop-2"),
            ("k8s.statefulset.name=db.shop-0", "db.shop-0"),
            (
                &*format!("k8s.pod.name={}", "a".repeat(63)),
                &*"a".repeat(63),
            ),
            ("service.name=Cart_Svc.v1", "Cart_Svc.v1"),
            ("k8s.cluster.name=Kubernetes", "Kubernetes"),
        ] {
            let got = parse(&[accepted]);
            let value = [got.namespace, got.workload, got.service, got.cluster]
                .into_iter()
                .flatten()
                .next();
            assert_eq!(value.as_deref(), Some(read), "{accepted}");
        }
        // A refused value does not erase a good one said before.
        let got = parse(&["service.name=cart", "service.name=CART!"]);
        assert_eq!(got.service.as_deref(), Some("cart"));
        // W3C properties after `;` are not part of the value; spaces around are trimmed.
        let got = parse(&[" service.name = web ;prop=1 , service.version=v2;x"]);
        assert_eq!(got.service.as_deref(), Some("web"));
        assert_eq!(got.revision.as_deref(), Some("v2"));
    }

    #[test]
    fn round_trips_a_workload() {
        let workload = Workload {
            namespace: "demo".into(),
            name: "server-1".into(),
            service_account: "server".into(),
            labels: BTreeMap::from([
                ("app".to_owned(), "server".to_owned()),
                ("version".to_owned(), "v2".to_owned()),
            ]),
            node: "n2".into(),
            ips: vec![],
            netns: "/run/netns/x".into(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: None,
        };
        let baggage = Baggage::of(&workload);
        let value = baggage.header_value().unwrap();
        assert_eq!(
            value,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=server-1,service.name=server,service.version=v2"
        );
        assert_eq!(parse(&[value.to_str().unwrap()]), baggage);
        // A value that would need encoding is left out, not mangled.
        let odd = Baggage {
            service: Some("my app".into()),
            ..baggage.clone()
        };
        let value = odd.header_value().unwrap();
        assert!(
            !value.to_str().unwrap().contains("service.name"),
            "{value:?}"
        );
        assert_eq!(Baggage::default().header_value(), None);
    }

    #[test]
    fn names_the_owner_as_ztunnel_does() {
        let mut workload = Workload {
            namespace: "demo".into(),
            name: "server-7f9c4d5b8-abcde".into(),
            service_account: "server".into(),
            labels: BTreeMap::new(),
            node: "n2".into(),
            ips: vec![],
            netns: "/run/netns/x".into(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: Some(crate::workload::Owner {
                kind: "Deployment".into(),
                name: "server".into(),
            }),
        };
        let value = Baggage::of(&workload).header_value().unwrap();
        assert_eq!(
            value,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.deployment.name=server,service.name=server,service.version=latest"
        );
        assert_eq!(parse(&[value.to_str().unwrap()]), Baggage::of(&workload));
        // A kind ztunnel does not read is sent as a pod's.
        workload.owner.as_mut().unwrap().kind = "Rollout".into();
        let value = Baggage::of(&workload).header_value().unwrap();
        assert!(
            value.to_str().unwrap().contains(",k8s.pod.name=server,"),
            "{value:?}"
        );
    }
}
