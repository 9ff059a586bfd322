//! Evaluation against tables of cases from Istio's documented semantics
//! (istio.io/latest/docs/reference/config/security/authorization-policy/ and
//! peer_authentication/) and ztunnel's L4 enforcement.
use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc};

use super::*;
use crate::policy::testing::{authz, peer_auth};

fn policies(yaml: &str) -> PolicySet {
    policies_with_root(yaml, DEFAULT_ROOT_NAMESPACE)
}

fn policies_with_root(yaml: &str, root: &str) -> PolicySet {
    let decoded = decode_str(yaml, Path::new("test.yaml")).expect("test policies decode");
    PolicySet::new(
        PolicyConfig {
            root_namespace: root.to_owned(),
            ..PolicyConfig::default()
        },
        decoded,
    )
}

fn workload(id: &str, labels: &[(&str, &str)]) -> Workload {
    let (namespace, name) = id.split_once('/').unwrap();
    Workload {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        service_account: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        node: "n1".to_owned(),
        ips: vec![],
        netns: "/run/netns/x".into(),
        cgroup: None,
        in_mesh: true,
        foreign_hbone: false,
        owner: None,
    }
}

/// The callers of the tables: `ns/sa` peers over mTLS, or plain text.
#[derive(Clone, Copy)]
enum Caller {
    /// `demo/client` at 10.77.1.10 (mTLS).
    DemoClient,
    /// `demo/client` from its IPv6 address fd00:77:1::10 (mTLS).
    DemoClientV6,
    /// `demo/peer` at 10.77.1.11 (mTLS).
    DemoPeer,
    /// `other/app` at 10.77.3.10 (mTLS).
    OtherApp,
    /// `legacy/client` at 10.77.1.12: a pod outside the mesh, plain text.
    Legacy,
    /// A host outside the cluster, 192.0.2.7, plain text.
    Outside,
    /// The same host over IPv6, 2001:db8::7, plain text.
    OutsideV6,
    /// `demo/client`'s address written IPv4-mapped, ::ffff:10.77.1.10 (mTLS).
    DemoClientMapped,
}

fn connection(peer: Caller, port: u16) -> ConnectionInfo {
    let (ip, identity) = match peer {
        Caller::DemoClient => ("10.77.1.10", Some(("demo", "client"))),
        Caller::DemoClientV6 => ("fd00:77:1::10", Some(("demo", "client"))),
        Caller::DemoClientMapped => ("::ffff:10.77.1.10", Some(("demo", "client"))),
        Caller::DemoPeer => ("10.77.1.11", Some(("demo", "peer"))),
        Caller::OtherApp => ("10.77.3.10", Some(("other", "app"))),
        Caller::Legacy => ("10.77.1.12", None),
        Caller::Outside => ("192.0.2.7", None),
        Caller::OutsideV6 => ("2001:db8::7", None),
    };
    ConnectionInfo {
        source_ip: ip.parse().unwrap(),
        source_identity: identity.map(|(ns, sa)| Identity::new("cluster.local", ns, sa).unwrap()),
        destination_ip: "10.77.2.10".parse().unwrap(),
        destination_port: port,
    }
}

/// `demo/server` (app=server, version=v1), the destination unless a case says otherwise.
fn server() -> Workload {
    workload("demo/server", &[("app", "server"), ("version", "v1")])
}

/// `None`: allowed; `Some("ns/name")`: denied, naming that policy.
type Expected = Option<&'static str>;
const ALLOW: Expected = None;

struct Case {
    what: &'static str,
    policies: String,
    checks: Vec<(Workload, Caller, u16, Expected)>,
}

fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let set = policies(&case.policies);
        for (destination, peer, port, expected) in &case.checks {
            let decision = set.authorize(destination, &connection(*peer, *port));
            let got = match &decision {
                Decision::Allow => None,
                Decision::Deny { policy, reason } => {
                    assert!(!reason.is_empty());
                    assert_eq!(policy.kind(), PolicyKind::AuthorizationPolicy);
                    Some(policy.to_string())
                }
            };
            if got.as_deref() != *expected {
                failures.push(format!(
                    "{}: {peer:?} → {destination}:{port}: expected {}, got {decision:?}",
                    case.what,
                    expected.map_or("allow".to_owned(), |p| format!("deny by {p}")),
                    peer = PeerName(*peer),
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

struct PeerName(Caller);
impl std::fmt::Debug for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = connection(self.0, 0);
        match c.source_identity {
            Some(id) => write!(f, "{id} at {}", c.source_ip),
            None => write!(f, "plain text from {}", c.source_ip),
        }
    }
}

#[test]
fn authorization_table() {
    use Caller::*;
    let s = server;
    let db = || workload("demo/db", &[("app", "db")]);
    let other = || workload("other/app", &[("app", "server")]);
    let cases = vec![
        Case {
            what: "no policy: everything is allowed",
            policies: String::new(),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), Legacy, 8080, ALLOW)],
        },
        Case {
            what: "allow-nothing (empty spec) denies every workload of the namespace only",
            policies: authz("demo", "allow-nothing", "  {}"),
            checks: vec![
                (s(), DemoClient, 8080, Some("demo/allow-nothing")),
                (s(), Legacy, 8080, Some("demo/allow-nothing")),
                (db(), DemoPeer, 5432, Some("demo/allow-nothing")),
                (other(), DemoClient, 8080, ALLOW),
            ],
        },
        Case {
            what: "allow-all (`rules: [{}]`) next to allow-nothing allows everything",
            policies: authz("demo", "allow-nothing", "  {}") + &authz("demo", "allow-all", "  rules:\n  - {}"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), Legacy, 1, ALLOW), (s(), OutsideV6, 9, ALLOW)],
        },
        Case {
            what: "DENY by namespace; a plaintext peer has no namespace, so it is not matched",
            policies: authz("demo", "deny-other", "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\", \"legacy\"]"),
            checks: vec![
                (s(), OtherApp, 8080, Some("demo/deny-other")),
                (s(), DemoClient, 8080, ALLOW),
                (s(), Legacy, 8080, ALLOW),
            ],
        },
        Case {
            what: "DENY notNamespaces: a plaintext peer has no namespace, so it is matched",
            policies: authz("demo", "only-demo", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [\"demo\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), OtherApp, 8080, Some("demo/only-demo")),
                (s(), Legacy, 8080, Some("demo/only-demo")),
            ],
        },
        Case {
            what: "ALLOW ipBlocks, IPv4 and IPv6; an IPv4-mapped source is IPv4",
            policies: authz("demo", "from-nodes", "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.77.1.0/24\", \"fd00:77:1::/48\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), Legacy, 8080, ALLOW),
                (s(), DemoClientV6, 8080, ALLOW),
                (s(), DemoClientMapped, 8080, ALLOW),
                (s(), OtherApp, 8080, Some("demo/from-nodes")),
                (s(), Outside, 8080, Some("demo/from-nodes")),
                (s(), OutsideV6, 8080, Some("demo/from-nodes")),
            ],
        },
        Case {
            what: "DENY notIpBlocks with single addresses and CIDRs of both families",
            policies: authz("demo", "cluster-only", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"10.77.0.0/16\", \"fd00:77::/32\", \"192.0.2.7\"]"),
            checks: vec![
                (s(), Legacy, 8080, ALLOW),
                (s(), DemoClientV6, 8080, ALLOW),
                (s(), Outside, 8080, ALLOW),
                (s(), OutsideV6, 8080, Some("demo/cluster-only")),
            ],
        },
        Case {
            what: "DENY notPrincipals: everyone but demo/client, plain text included",
            policies: authz("demo", "only-client", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"cluster.local/ns/demo/sa/client\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoPeer, 8080, Some("demo/only-client")),
                (s(), Legacy, 8080, Some("demo/only-client")),
            ],
        },
        Case {
            what: "principal prefix wildcard",
            policies: authz("demo", "demo-ns", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/*\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoPeer, 8080, ALLOW),
                (s(), OtherApp, 8080, Some("demo/demo-ns")),
                (s(), Legacy, 8080, Some("demo/demo-ns")),
            ],
        },
        Case {
            what: "principal suffix wildcard",
            policies: authz("demo", "any-client", "  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/client\"]"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), DemoPeer, 8080, Some("demo/any-client"))],
        },
        Case {
            what: "principals [\"*\"]: any authenticated peer, never plain text",
            policies: authz("demo", "mtls-only", "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), OtherApp, 8080, ALLOW),
                (s(), Legacy, 8080, Some("demo/mtls-only")),
                (s(), Outside, 8080, Some("demo/mtls-only")),
            ],
        },
        Case {
            what: "DENY notPrincipals [\"*\"]: refuses plain text only (Istio's STRICT as a policy)",
            policies: authz("demo", "no-plaintext", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]"),
            checks: vec![(s(), DemoPeer, 8080, ALLOW), (s(), Legacy, 8080, Some("demo/no-plaintext"))],
        },
        Case {
            what: "principals are written without spiffe://; with it they match nothing",
            policies: authz("demo", "spiffe-prefix", "  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/demo/sa/client\"]"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/spiffe-prefix"))],
        },
        Case {
            what: "serviceAccounts: `sa` in the policy's namespace, or `ns/sa`",
            policies: authz("demo", "sas", "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"client\", \"other/app\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), OtherApp, 8080, ALLOW),
                (s(), DemoPeer, 8080, Some("demo/sas")),
                (s(), Legacy, 8080, Some("demo/sas")),
            ],
        },
        Case {
            what: "ports: one principal on one port (the seeds' least privilege)",
            policies: authz("demo", "client-8080", "  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n    to:\n    - operation:\n        ports: [\"8080\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoClient, 9090, Some("demo/client-8080")),
                (s(), DemoPeer, 8080, Some("demo/client-8080")),
                (db(), DemoPeer, 5432, ALLOW),
            ],
        },
        Case {
            what: "DENY notPorts: only 8080 is open",
            policies: authz("demo", "only-8080", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        notPorts: [\"8080\"]"),
            checks: vec![(s(), Legacy, 8080, ALLOW), (s(), Legacy, 9090, Some("demo/only-8080"))],
        },
        Case {
            what: "ports and notPorts in one operation, several operations OR'd",
            policies: authz("demo", "ranges", "  rules:\n  - to:\n    - operation: {ports: [\"80\", \"443\"], notPorts: [\"443\"]}\n    - operation: {ports: [\"9000\"]}"),
            checks: vec![
                (s(), DemoClient, 80, ALLOW),
                (s(), DemoClient, 443, Some("demo/ranges")),
                (s(), DemoClient, 9000, ALLOW),
                (s(), DemoClient, 9001, Some("demo/ranges")),
            ],
        },
        Case {
            what: "from AND to within a rule, sources OR'd, rules OR'd",
            policies: authz("demo", "mixed", "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/demo/sa/client\"]}\n    - source: {namespaces: [\"other\"]}\n    to:\n    - operation: {ports: [\"8080\"]}\n  - from:\n    - source: {ipBlocks: [\"192.0.2.0/24\"]}"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), OtherApp, 8080, ALLOW),
                (s(), OtherApp, 9090, Some("demo/mixed")),
                (s(), DemoPeer, 8080, Some("demo/mixed")),
                (s(), Outside, 1234, ALLOW),
            ],
        },
        Case {
            what: "fields within one source are AND'd",
            policies: authz("demo", "and", "  rules:\n  - from:\n    - source:\n        namespaces: [\"demo\"]\n        notPrincipals: [\"cluster.local/ns/demo/sa/peer\"]\n        ipBlocks: [\"10.77.0.0/16\"]"),
            checks: vec![
                (s(), DemoClient, 1, ALLOW),
                (s(), DemoClientV6, 1, Some("demo/and")),
                (s(), DemoPeer, 1, Some("demo/and")),
                (s(), OtherApp, 1, Some("demo/and")),
            ],
        },
        Case {
            what: "when: L4 keys, values and notValues, conditions AND'd",
            policies: authz("demo", "when", "  rules:\n  - when:\n    - key: source.namespace\n      values: [\"demo\"]\n    - key: source.principal\n      notValues: [\"cluster.local/ns/demo/sa/peer\"]\n    - key: destination.port\n      values: [\"8080\", \"8443\"]\n      notValues: [\"8443\"]\n    - key: source.ip\n      values: [\"10.77.1.0/24\"]\n    - key: destination.ip\n      notValues: [\"10.77.2.99\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoClient, 8443, Some("demo/when")),
                (s(), DemoClientV6, 8080, Some("demo/when")),
                (s(), DemoPeer, 8080, Some("demo/when")),
                (s(), Legacy, 8080, Some("demo/when")),
            ],
        },
        Case {
            what: "when destination.ip",
            policies: authz("demo", "dst", "  action: DENY\n  rules:\n  - when:\n    - key: destination.ip\n      values: [\"10.77.2.0/24\"]"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/dst"))],
        },
        Case {
            what: "selector on labels: only workloads carrying all the labels",
            policies: authz("demo", "db-nothing", "  selector:\n    matchLabels:\n      app: db\n")
                + &authz("demo", "v2-nothing", "  selector:\n    matchLabels:\n      app: server\n      version: v2\n"),
            checks: vec![
                (db(), DemoClient, 5432, Some("demo/db-nothing")),
                (s(), DemoClient, 8080, ALLOW),
            ],
        },
        Case {
            what: "an empty selector applies to the whole namespace",
            policies: authz("demo", "empty-selector", "  selector: {}\n"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/empty-selector"))],
        },
        Case {
            what: "root namespace: a policy there applies to every namespace",
            policies: authz("istio-system", "mesh-deny-outside", "  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"192.0.2.0/24\"]"),
            checks: vec![
                (s(), Outside, 8080, Some("istio-system/mesh-deny-outside")),
                (other(), Outside, 8080, Some("istio-system/mesh-deny-outside")),
                (s(), Legacy, 8080, ALLOW),
            ],
        },
        Case {
            what: "root namespace with a selector: matching workloads of every namespace",
            policies: authz("istio-system", "v1-nothing", "  selector:\n    matchLabels:\n      version: v1\n"),
            checks: vec![
                (s(), DemoClient, 8080, Some("istio-system/v1-nothing")),
                (workload("other/x", &[("version", "v1")]), DemoClient, 1, Some("istio-system/v1-nothing")),
                (other(), DemoClient, 8080, ALLOW),
            ],
        },
        Case {
            what: "a selector-less policy of another namespace never applies",
            policies: authz("other", "nothing", "  {}"),
            checks: vec![(s(), DemoClient, 8080, ALLOW)],
        },
        Case {
            what: "DENY wins over a matching ALLOW, wherever they are",
            policies: authz("demo", "allow-all", "  rules:\n  - {}")
                + &authz("istio-system", "deny-peer", "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/peer\"]"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), DemoPeer, 8080, Some("istio-system/deny-peer"))],
        },
        Case {
            what: "an ALLOW in the root namespace counts as an ALLOW policy for the workload",
            policies: authz("istio-system", "mesh-client", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]")
                + &authz("demo", "peer", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/peer\"]"),
            checks: vec![
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoPeer, 8080, ALLOW),
                (s(), OtherApp, 8080, Some("istio-system/mesh-client")),
                (other(), DemoPeer, 8080, Some("istio-system/mesh-client")),
            ],
        },
        Case {
            what: "L7-only ALLOW rule matches nothing (fail closed)",
            policies: authz("demo", "get-only", "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/get-only")), (s(), Legacy, 8080, Some("demo/get-only"))],
        },
        Case {
            what: "ALLOW rule mixing L4 and L7 matches nothing; an L4-only rule beside it still works",
            policies: authz("demo", "mixed-l7", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n    to:\n    - operation:\n        paths: [\"/admin\"]\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/peer\"]\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n  - when:\n    - key: request.headers[x-user]\n      values: [\"admin\"]"),
            checks: vec![
                (s(), DemoClient, 8080, Some("demo/mixed-l7")),
                (s(), DemoPeer, 8080, ALLOW),
                (s(), Legacy, 8080, Some("demo/mixed-l7")),
            ],
        },
        Case {
            what: "L7 DENY rule is enforced on its L4 part alone (Istio's POST-on-8080 example)",
            policies: authz("demo", "no-post-8080", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [\"POST\"]\n        ports: [\"8080\"]"),
            checks: vec![
                (s(), DemoClient, 8080, Some("demo/no-post-8080")),
                (s(), Legacy, 8080, Some("demo/no-post-8080")),
                (s(), DemoClient, 9090, ALLOW),
            ],
        },
        Case {
            what: "L7 DENY rule: L7 source fields and when keys count as matched, L4 fields still apply",
            policies: authz("demo", "deny-jwt", "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\"]\n        requestPrincipals: [\"issuer/sub\"]\n    when:\n    - key: request.auth.claims[groups]\n      values: [\"admins\"]\n  - from:\n    - source:\n        remoteIpBlocks: [\"1.2.3.4\"]\n    to:\n    - operation: {ports: [\"9090\"]}"),
            checks: vec![
                (s(), OtherApp, 8080, Some("demo/deny-jwt")),
                (s(), DemoClient, 8080, ALLOW),
                (s(), DemoClient, 9090, Some("demo/deny-jwt")),
            ],
        },
        Case {
            what: "L7-only DENY rule with no L4 part denies everything it is scoped to",
            policies: authz("demo", "deny-admin-path", "  selector:\n    matchLabels: {app: server}\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/deny-admin-path")), (db(), DemoClient, 5432, ALLOW)],
        },
        Case {
            what: "CUSTOM: its rules act as DENY rules (fail closed); other connections unaffected",
            policies: authz("demo", "ext-authz", "  action: CUSTOM\n  provider:\n    name: my-authz\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\"]"),
            checks: vec![(s(), OtherApp, 8080, Some("demo/ext-authz")), (s(), DemoClient, 8080, ALLOW), (s(), Legacy, 8080, ALLOW)],
        },
        Case {
            what: "CUSTOM with only L7 rules refuses every connection to its workloads",
            policies: authz("istio-system", "ext-authz", "  selector:\n    matchLabels: {app: server}\n  action: CUSTOM\n  provider: {name: my-authz}\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]"),
            checks: vec![
                (s(), DemoClient, 8080, Some("istio-system/ext-authz")),
                (other(), DemoClient, 8080, Some("istio-system/ext-authz")),
                (db(), DemoClient, 5432, ALLOW),
            ],
        },
        Case {
            what: "CUSTOM does not count as an ALLOW policy",
            policies: authz("demo", "ext-authz", "  action: CUSTOM\n  provider: {name: x}\n  rules:\n  - from:\n    - source: {namespaces: [\"other\"]}")
                + &authz("demo", "allow-client", "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/demo/sa/client\"]}"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), DemoPeer, 8080, Some("demo/allow-client"))],
        },
        Case {
            what: "AUDIT never changes a decision, and is not an ALLOW policy",
            policies: authz("demo", "audit", "  action: AUDIT\n  rules:\n  - {}")
                + &authz("demo", "audit-nothing", "  action: AUDIT"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), Legacy, 8080, ALLOW)],
        },
        Case {
            what: "targetRefs policies bind to gateways/Services, not workloads: ignored",
            policies: authz("demo", "gateway-nothing", "  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: waypoint"),
            checks: vec![(s(), DemoClient, 8080, ALLOW)],
        },
        Case {
            what: "a DENY policy without rules matches nothing",
            policies: authz("demo", "deny-nothing", "  action: DENY"),
            checks: vec![(s(), DemoClient, 8080, ALLOW), (s(), Legacy, 8080, ALLOW)],
        },
        Case {
            what: "a dry-run policy is enforced anyway (dry runs are not supported)",
            policies: authz("demo", "dry", "  {}").replace("  namespace: demo\n", "  namespace: demo\n  annotations: {istio.io/dry-run: \"true\"}\n"),
            checks: vec![(s(), DemoClient, 8080, Some("demo/dry"))],
        },
    ];
    run(cases);
}

#[test]
fn the_oldest_policy_is_named_first() {
    // Without timestamps: file order; the reason lists every ALLOW policy.
    let set = policies(
        &(authz(
            "demo",
            "b-first-in-file",
            "  rules:\n  - from:\n    - source: {namespaces: [\"x\"]}",
        ) + &authz("demo", "a-second", "  {}")
            + &authz(
                "istio-system",
                "mesh",
                "  rules:\n  - to:\n    - operation: {methods: [\"GET\"]}",
            )),
    );
    let Decision::Deny { policy, reason } =
        set.authorize(&server(), &connection(Caller::DemoClient, 80))
    else {
        panic!()
    };
    assert_eq!(policy.to_string(), "demo/b-first-in-file");
    assert_eq!(
        reason,
        "not allowed by any of the 3 ALLOW policies for this workload: demo/b-first-in-file (none of its rules matched); demo/a-second (it has no rules, so it allows nothing); istio-system/mesh (its rules all use HTTP attributes, which match nothing at L4)"
    );
    // With timestamps, the oldest is named.
    let dated = authz("demo", "newer", "  {}").replace(
        "  namespace: demo\n",
        "  namespace: demo\n  creationTimestamp: \"2025-01-01T00:00:00Z\"\n",
    ) + &authz("demo", "older", "  {}").replace(
        "  namespace: demo\n",
        "  namespace: demo\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
    );
    let Decision::Deny { policy, .. } =
        policies(&dated).authorize(&server(), &connection(Caller::DemoClient, 80))
    else {
        panic!()
    };
    assert_eq!(policy.to_string(), "demo/older");
}

#[test]
fn deny_reasons() {
    let set = policies(
        &(authz("demo", "allow-nothing", "  {}")
            + &authz("demo", "deny-legacy", "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [x]}}]\n  - from: [{source: {notPrincipals: [\"*\"]}}]")
            + &authz("demo", "custom", "  action: CUSTOM\n  provider: {name: opa}\n  rules:\n  - from: [{source: {namespaces: [\"other\"]}}]")),
    );
    let reason = |peer| match set.authorize(&server(), &connection(peer, 80)) {
        Decision::Deny { policy, reason } => format!("{policy}: {reason}"),
        Decision::Allow => "allow".to_owned(),
    };
    assert_eq!(
        reason(Caller::Legacy),
        "demo/deny-legacy: rules[1] of the DENY policy matched"
    );
    assert_eq!(
        reason(Caller::OtherApp),
        "demo/custom: rules[0] of the CUSTOM policy (external authorizer \"opa\") matched; CUSTOM is not supported, so the connection is refused (fail closed)"
    );
    assert_eq!(
        reason(Caller::DemoClient),
        "demo/allow-nothing: not allowed by the ALLOW policy: it has no rules, so it allows nothing"
    );
}

#[test]
fn authorization_warnings() {
    let set = policies(
        &(authz("demo", "get-only", "  rules:\n  - from: [{source: {namespaces: [demo]}}]\n  - to:\n    - operation: {methods: [GET], notPaths: [\"/x\"]}\n    when:\n    - key: request.headers[x]\n      values: [y]")
            + &authz("demo", "deny-post", "  action: DENY\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n  - from: [{source: {requestPrincipals: [\"*\"], remoteIpBlocks: [\"1.2.3.4\"]}}]")
            + &authz("demo", "audit", "  action: AUDIT")
            + &authz("demo", "custom", "  action: CUSTOM\n  provider: {name: opa}")
            + &authz("demo", "gw", "  targetRef: {kind: Gateway, name: gw}")
            + &authz("demo", "dry", "  {}").replace("name: dry\n", "name: dry\n  annotations: {istio.io/dry-run: \"1\"}\n")),
    );
    let warnings: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "AuthorizationPolicy demo/get-only: rules[1] (to.operation.methods, to.operation.notPaths, when request.headers[x]) uses HTTP (L7) attributes that warren cannot see at L4; in an ALLOW policy such a rule matches nothing, so it allows less than written; an L7 proxy (waypoint) is needed to enforce them",
            "AuthorizationPolicy demo/deny-post: rules[0] (to.operation.methods), rules[1] (from.source.remoteIpBlocks, from.source.requestPrincipals) use HTTP (L7) attributes that warren cannot see at L4; such a rule is enforced on its L4 attributes alone, so it denies more than written; an L7 proxy (waypoint) is needed to enforce them",
            "AuthorizationPolicy demo/audit: action AUDIT is not supported; the policy is ignored (AUDIT never changes whether a connection is allowed)",
            "AuthorizationPolicy demo/custom: action CUSTOM (external authorizer \"opa\") is not supported; failing closed, the connections its rules match are refused, as a DENY policy would",
            "AuthorizationPolicy demo/gw: ignored: it is bound with targetRefs (Gateway/gw) to a gateway, Service or waypoint, not to workloads; warren enforces policies on workloads only (as ztunnel does)",
            "AuthorizationPolicy demo/dry: the istio.io/dry-run annotation is not supported; this policy is enforced",
        ]
    );
    assert_eq!(
        set.warnings()[0].policy,
        Some(PolicyRef::new(
            PolicyKind::AuthorizationPolicy,
            "demo",
            "get-only"
        ))
    );
}

#[test]
fn policies_for_a_workload() {
    let set = policies(
        &(authz("istio-system", "mesh", "  {}")
            + &authz(
                "istio-system",
                "mesh-db",
                "  selector: {matchLabels: {app: db}}",
            )
            + &authz("demo", "ns", "  action: AUDIT")
            + &authz("demo", "gw", "  targetRefs: [{kind: Gateway, name: gw}]")
            + &authz("other", "elsewhere", "  {}")),
    );
    let names: Vec<String> = set
        .authorization_policies_for(&server())
        .map(|p| format!("{}/{} {}", p.meta.namespace, p.meta.name, p.action))
        .collect();
    assert_eq!(names, ["istio-system/mesh ALLOW", "demo/ns AUDIT"]);
}

/// `(destination, port, expected mode, deciding policy)`
type MtlsCheck = (Workload, u16, MtlsMode, Option<&'static str>);

fn run_mtls(what: &str, set: &PolicySet, checks: &[MtlsCheck]) {
    for (destination, port, mode, by) in checks {
        let (got_mode, got_by) = set.mtls_mode(destination, *port);
        assert_eq!(
            (got_mode, got_by.as_ref().map(|p| p.to_string())),
            (*mode, by.map(str::to_owned)),
            "{what}: {destination}:{port}"
        );
        if let Some(p) = got_by {
            assert_eq!(p.kind(), PolicyKind::PeerAuthentication);
        }
    }
}

#[test]
fn peer_authentication_table() {
    use MtlsMode::*;
    let s = server;
    let db = || workload("demo/db", &[("app", "db")]);
    let other = || workload("other/app", &[("app", "server")]);
    let dated = |text: String, when: &str| {
        text.replacen(
            "  name: ",
            &format!("  creationTimestamp: \"{when}\"\n  name: "),
            1,
        )
    };
    let cases: Vec<(&str, String, Vec<MtlsCheck>)> = vec![
        (
            "no policy: PERMISSIVE, the mesh default",
            String::new(),
            vec![(s(), 8080, Permissive, None)],
        ),
        (
            "mesh-wide STRICT in the root namespace",
            peer_auth("istio-system", "default", "  mtls:\n    mode: STRICT"),
            vec![(s(), 8080, Strict, Some("istio-system/default")), (other(), 1, Strict, Some("istio-system/default"))],
        ),
        (
            "namespace over mesh",
            peer_auth("istio-system", "default", "  mtls:\n    mode: STRICT") + &peer_auth("demo", "default", "  mtls:\n    mode: PERMISSIVE"),
            vec![(s(), 8080, Permissive, Some("demo/default")), (other(), 8080, Strict, Some("istio-system/default"))],
        ),
        (
            "namespace UNSET (or no mtls at all) inherits the mesh",
            peer_auth("istio-system", "default", "  mtls:\n    mode: STRICT") + &peer_auth("demo", "default", "  mtls:\n    mode: UNSET") + &peer_auth("other", "default", "  {}"),
            vec![(s(), 8080, Strict, Some("istio-system/default")), (other(), 8080, Strict, Some("istio-system/default"))],
        ),
        (
            "workload over namespace (Istio's finance example)",
            peer_auth("demo", "default", "  mtls:\n    mode: PERMISSIVE") + &peer_auth("demo", "server", "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT"),
            vec![(s(), 8080, Strict, Some("demo/server")), (db(), 5432, Permissive, Some("demo/default"))],
        ),
        (
            "a workload policy only applies in its own namespace",
            peer_auth("other", "server", "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT"),
            vec![(s(), 8080, Permissive, None), (other(), 8080, Strict, Some("other/server"))],
        ),
        (
            "workload UNSET inherits; its portLevelMtls still applies",
            peer_auth("demo", "default", "  mtls:\n    mode: STRICT") + &peer_auth("demo", "server", "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n    8081:\n      mode: PERMISSIVE\n    8082:\n      mode: UNSET"),
            vec![
                (s(), 8080, Disable, Some("demo/server")),
                (s(), 8081, Permissive, Some("demo/server")),
                (s(), 8082, Strict, Some("demo/default")),
                (s(), 9090, Strict, Some("demo/default")),
                (db(), 8080, Strict, Some("demo/default")),
            ],
        ),
        (
            "portLevelMtls STRICT on one port of a PERMISSIVE workload",
            peer_auth("demo", "server", "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: PERMISSIVE\n  portLevelMtls:\n    9090:\n      mode: STRICT"),
            vec![(s(), 9090, Strict, Some("demo/server")), (s(), 8080, Permissive, Some("demo/server"))],
        ),
        (
            "portLevelMtls without a selector is ignored",
            peer_auth("demo", "default", "  mtls:\n    mode: PERMISSIVE\n  portLevelMtls:\n    9090:\n      mode: STRICT"),
            vec![(s(), 9090, Permissive, Some("demo/default"))],
        ),
        (
            "a selector in the root namespace is ignored",
            peer_auth("istio-system", "servers", "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT"),
            vec![(s(), 8080, Permissive, None)],
        ),
        (
            "oldest namespace policy wins, whatever the file order",
            dated(peer_auth("demo", "newer", "  mtls:\n    mode: STRICT"), "2025-01-01T00:00:00Z") + &dated(peer_auth("demo", "older", "  mtls:\n    mode: PERMISSIVE"), "2024-01-01T00:00:00Z"),
            vec![(s(), 8080, Permissive, Some("demo/older"))],
        ),
        (
            "without timestamps the first in file order wins; an undated policy counts as oldest",
            peer_auth("demo", "first", "  mtls:\n    mode: STRICT") + &peer_auth("demo", "second", "  mtls:\n    mode: PERMISSIVE")
                + &dated(peer_auth("istio-system", "dated", "  mtls:\n    mode: PERMISSIVE"), "2020-01-01T00:00:00Z") + &peer_auth("istio-system", "undated", "  mtls:\n    mode: STRICT"),
            vec![(s(), 8080, Strict, Some("demo/first")), (other(), 8080, Strict, Some("istio-system/undated"))],
        ),
        (
            "the oldest workload policy wins even when it says UNSET",
            dated(peer_auth("demo", "old-unset", "  selector: {matchLabels: {app: server}}\n  mtls: {mode: UNSET}"), "2024-01-01T00:00:00Z")
                + &dated(peer_auth("demo", "new-strict", "  selector: {matchLabels: {version: v1}}\n  mtls: {mode: STRICT}"), "2025-01-01T00:00:00Z")
                + &peer_auth("demo", "default", "  mtls: {mode: PERMISSIVE}"),
            vec![(s(), 8080, Permissive, Some("demo/default"))],
        ),
        (
            "DISABLE is reported as such (and allows plain text)",
            peer_auth("demo", "default", "  mtls:\n    mode: DISABLE"),
            vec![(s(), 8080, Disable, Some("demo/default"))],
        ),
    ];
    for (what, yaml, checks) in cases {
        run_mtls(what, &policies(&yaml), &checks);
    }
    assert!(!MtlsMode::Strict.allows_plaintext());
    assert!(MtlsMode::Permissive.allows_plaintext());
    assert!(MtlsMode::Disable.allows_plaintext());
}

#[test]
fn root_namespace_is_configurable() {
    let yaml = peer_auth("mesh-root", "default", "  mtls: {mode: STRICT}")
        + &peer_auth("istio-system", "default", "  mtls: {mode: STRICT}")
        + &authz(
            "mesh-root",
            "deny-other",
            "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [other]}}]",
        );
    let set = policies_with_root(&yaml, "mesh-root");
    assert_eq!(set.config().root_namespace, "mesh-root");
    run_mtls(
        "custom root",
        &set,
        &[
            (server(), 8080, MtlsMode::Strict, Some("mesh-root/default")),
            (
                workload("istio-system/x", &[]),
                8080,
                MtlsMode::Strict,
                Some("istio-system/default"),
            ),
        ],
    );
    assert!(!set
        .authorize(&server(), &connection(Caller::OtherApp, 1))
        .is_allow());
    let warnings: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        ["PeerAuthentication istio-system/default: the root namespace is \"mesh-root\", so this policy in istio-system applies to that namespace only, not to the whole mesh"]
    );
    // With the default root, the same YAML's mesh-root policies are namespace policies.
    let set = policies(&yaml);
    assert_eq!(
        set.mtls_mode(&server(), 8080),
        (
            MtlsMode::Strict,
            Some(PolicyRef::new(
                PolicyKind::PeerAuthentication,
                "istio-system",
                "default"
            ))
        )
    );
    assert!(set
        .authorize(&server(), &connection(Caller::OtherApp, 1))
        .is_allow());
}

#[test]
fn peer_authentication_warnings() {
    let set = policies(
        &(peer_auth("istio-system", "default", "  mtls: {mode: STRICT}")
            + &peer_auth("istio-system", "second-mesh", "  mtls: {mode: PERMISSIVE}")
            + &peer_auth(
                "istio-system",
                "selected",
                "  selector: {matchLabels: {app: x}}\n  mtls: {mode: STRICT}",
            )
            + &peer_auth(
                "demo",
                "default",
                "  mtls: {mode: DISABLE}\n  portLevelMtls: {80: {mode: STRICT}}",
            )
            + &peer_auth("demo", "again", "  mtls: {mode: STRICT}")),
    );
    let warnings: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "PeerAuthentication istio-system/second-mesh: ignored: istio-system/default is older and also applies to the whole mesh",
            "PeerAuthentication istio-system/selected: a PeerAuthentication with a selector in the root namespace istio-system is ignored (as in Istio); remove the selector for a mesh-wide policy, or move it to the workloads' namespace",
            "PeerAuthentication demo/default: mode DISABLE: traffic between mesh workloads is always tunnelled in an ambient mesh, so for incoming connections DISABLE acts like PERMISSIVE",
            "PeerAuthentication demo/default: portLevelMtls is ignored: it is only valid with a selector (Istio refuses it otherwise)",
            "PeerAuthentication demo/again: ignored: demo/default is older and also applies to all of namespace demo",
        ]
    );
}

#[test]
fn policy_set_is_cheap_to_share() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<PolicySet>();
    let set = policies(&authz("demo", "a", "  {}"));
    let copy = set.clone();
    assert!(Arc::ptr_eq(&set.inner, &copy.inner));
    assert_eq!(copy.authorization_policies().len(), 1);
    assert_eq!(
        PolicySet::default().authorize(&server(), &connection(Caller::Legacy, 1)),
        Decision::Allow
    );
    assert_eq!(
        PolicySet::default().mtls_mode(&server(), 1),
        (MtlsMode::Permissive, None)
    );
    assert_eq!(format!("{set:?}"), "PolicySet { root_namespace: \"istio-system\", peer_authentications: 0, authorization_policies: 1, broken: 0, warnings: 0 }");
    let reference = PolicyRef::new(PolicyKind::AuthorizationPolicy, "demo", "a");
    assert_eq!(reference.to_string(), "demo/a");
    assert_eq!(format!("{reference:?}"), "AuthorizationPolicy demo/a");
    let _: IpAddr = connection(Caller::Legacy, 1).source_ip;
}

#[test]
fn load_reads_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        peer_auth("istio-system", "default", "  mtls: {mode: STRICT}"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("authz.yml"),
        authz("demo", "allow-nothing", "  {}"),
    )
    .unwrap();
    let set = PolicySet::load(PolicyConfig::default(), dir.path()).unwrap();
    assert_eq!(set.mtls_mode(&server(), 1).0, MtlsMode::Strict);
    assert!(!set
        .authorize(&server(), &connection(Caller::DemoClient, 1))
        .is_allow());
}

/// Istio's `trustDomainAliases`: a principal of the trust domain or an alias names the
/// same namespace and service account in each of them (`principals`, `notPrincipals`,
/// `source.principal`); namespaces and service accounts are trust-domain free anyway.
mod trust_domain_aliases {
    use super::*;

    fn aliased(trust_domain: &str, aliases: &[&str], yaml: &str) -> PolicySet {
        let decoded = decode_str(yaml, Path::new("test.yaml")).expect("test policies decode");
        PolicySet::new(
            PolicyConfig {
                trust_domain: trust_domain.to_owned(),
                trust_domain_aliases: aliases.iter().map(|a| a.to_string()).collect(),
                ..PolicyConfig::default()
            },
            decoded,
        )
    }

    /// `spiffe://TD/ns/demo/sa/SA` over mTLS to demo/server:8080.
    fn from(trust_domain: &str, service_account: &str) -> ConnectionInfo {
        ConnectionInfo {
            source_ip: "10.77.1.10".parse().unwrap(),
            source_identity: Some(Identity::new(trust_domain, "demo", service_account).unwrap()),
            destination_ip: "10.77.2.10".parse().unwrap(),
            destination_port: 8080,
        }
    }

    fn allowed(set: &PolicySet, connection: &ConnectionInfo) -> bool {
        matches!(set.authorize(&server(), connection), Decision::Allow)
    }

    const ALLOW_CLIENT: &str = "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]";

    #[test]
    fn an_allowed_principal_of_the_trust_domain_also_allows_the_aliases() {
        let yaml = authz("demo", "client-only", ALLOW_CLIENT);
        let set = aliased("cluster.local", &["old.example"], &yaml);
        assert!(allowed(&set, &from("cluster.local", "client")));
        assert!(allowed(&set, &from("old.example", "client")), "the alias");
        assert!(
            !allowed(&set, &from("other.example", "client")),
            "a trust domain that is not an alias"
        );
        assert!(
            !allowed(&set, &from("old.example", "peer")),
            "another service account of the alias"
        );

        // Without the alias, the old trust domain's peer is not that principal.
        let set = aliased("cluster.local", &[], &yaml);
        assert!(!allowed(&set, &from("old.example", "client")));
    }

    #[test]
    fn a_principal_written_for_the_alias_matches_the_trust_domain_too() {
        let yaml = authz(
            "demo",
            "client-only",
            "  rules:\n  - from:\n    - source:\n        principals: [\"old.example/ns/demo/sa/client\"]",
        );
        let set = aliased("new.example", &["old.example"], &yaml);
        assert!(allowed(&set, &from("new.example", "client")));
        assert!(allowed(&set, &from("old.example", "client")));
        assert!(!allowed(&set, &from("cluster.local", "client")));
    }

    #[test]
    fn cluster_local_stands_for_the_local_trust_domain() {
        let yaml = authz("demo", "client-only", ALLOW_CLIENT);
        let set = aliased("example.org", &[], &yaml);
        assert!(allowed(&set, &from("example.org", "client")));
        // As in Istio: the principal is rewritten, not kept beside.
        assert!(!allowed(&set, &from("cluster.local", "client")));
    }

    #[test]
    fn deny_not_principals_and_conditions_cover_the_aliases() {
        let deny = format!(
            "{}{}",
            authz(
                "demo",
                "deny-evil",
                "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"old.example/ns/demo/sa/evil\"]"
            ),
            authz(
                "demo",
                "deny-by-condition",
                "  action: DENY\n  rules:\n  - when:\n    - key: source.principal\n      values: [\"cluster.local/ns/demo/sa/banned\"]"
            ),
        );
        let set = aliased("cluster.local", &["old.example"], &deny);
        for trust_domain in ["cluster.local", "old.example"] {
            assert!(
                !allowed(&set, &from(trust_domain, "evil")),
                "{trust_domain}"
            );
            assert!(
                !allowed(&set, &from(trust_domain, "banned")),
                "{trust_domain}"
            );
            assert!(
                allowed(&set, &from(trust_domain, "client")),
                "{trust_domain}"
            );
        }

        let not_principals = authz(
            "demo",
            "all-but-evil",
            "  rules:\n  - from:\n    - source:\n        notPrincipals: [\"cluster.local/ns/demo/sa/evil\"]",
        );
        let set = aliased("cluster.local", &["old.example"], &not_principals);
        assert!(allowed(&set, &from("old.example", "client")));
        assert!(
            !allowed(&set, &from("old.example", "evil")),
            "notPrincipals excludes the alias's evil too"
        );
    }

    #[test]
    fn wildcard_trust_domains_are_left_as_written() {
        let yaml = authz(
            "demo",
            "any-domain",
            "  rules:\n  - from:\n    - source:\n        principals: [\"*/ns/demo/sa/client\"]",
        );
        let set = aliased("cluster.local", &["old.example"], &yaml);
        assert!(allowed(&set, &from("anything.example", "client")));
        assert!(!allowed(&set, &from("old.example", "peer")));
    }
}

/// A set from text decoded leniently, as the agent reads files.
fn lenient(yaml: &str) -> PolicySet {
    let decoded = decode_file(yaml, Path::new("bad.yaml"));
    PolicySet::decoded(PolicyConfig::default(), decoded.policies, decoded.broken)
}

#[test]
fn a_broken_authorization_policy_refuses_what_it_may_target() {
    // Namespace demo, selector app=server; the rule has a typo.
    let set = lenient(&format!(
        "{}{}",
        authz("demo", "allow-all", "  rules: [{}]"),
        authz(
            "demo",
            "typo",
            "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principal: [x]}}]}]"
        )
    ));
    assert_eq!(
        set.authorization_policies().len(),
        1,
        "the good one is read"
    );
    assert_eq!(set.broken().len(), 1);
    let server = workload("demo/server", &[("app", "server")]);
    let decision = set.authorize(&server, &connection(Caller::DemoClient, 8080));
    let Decision::Deny { policy, reason } = &decision else {
        panic!("{decision:?}")
    };
    assert!(policy.is_unreadable());
    assert_eq!(format!("{policy:?}"), "policy document bad.yaml:9");
    assert_eq!(policy.kind(), PolicyKind::AuthorizationPolicy);
    assert!(
        reason.starts_with("it does not decode") && reason.contains("bad.yaml:17:"),
        "{reason}"
    );
    // Other workloads: only the good policy, which allows all.
    for other in [
        workload("demo/client", &[("app", "client")]),
        workload("other/server", &[("app", "server")]),
    ] {
        assert!(set
            .authorize(&other, &connection(Caller::DemoClient, 8080))
            .is_allow());
    }
    // An AuthorizationPolicy says nothing about mTLS.
    assert_eq!(set.mtls_mode(&server, 8080).0, MtlsMode::Permissive);
}

#[test]
fn a_broken_peer_authentication_is_strict_for_what_it_may_target() {
    // PERMISSIVE written for the workload, a broken STRICT for the namespace: STRICT.
    let set = lenient(&format!(
        "{}{}",
        peer_auth(
            "demo",
            "permissive",
            "  selector: {matchLabels: {app: server}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {8080: {mode: DISABLE}}"
        ),
        peer_auth("demo", "strict", "  mtls: {mode: Strict}")
    ));
    let server = workload("demo/server", &[("app", "server")]);
    let (mode, by) = set.mtls_mode(&server, 8080);
    assert_eq!(mode, MtlsMode::Strict);
    let by = by.unwrap();
    assert!(by.is_unreadable() && by.kind() == PolicyKind::PeerAuthentication);
    assert_eq!(by.to_string(), "bad.yaml:11");
    assert_eq!(
        set.mtls_mode(&workload("other/server", &[("app", "server")]), 8080)
            .0,
        MtlsMode::Permissive
    );
    // A PeerAuthentication refuses nothing by authorization.
    assert!(set
        .authorize(&server, &connection(Caller::DemoClient, 8080))
        .is_allow());
}

#[test]
fn a_broken_document_in_the_root_namespace_or_without_readable_scope_covers_the_mesh() {
    let everywhere = [
        workload("demo/server", &[("app", "server")]),
        workload("other/app", &[]),
        workload("istio-system/x", &[]),
    ];
    let mesh_wide = lenient(&peer_auth(
        "istio-system",
        "default",
        "  mtls: {mode: strict}",
    ));
    // Unreadable kind and namespace: both kinds, everywhere.
    let unknown = lenient("apiVersion: security.istio.io/v1\nkind: [PeerAuthentication\n");
    assert_eq!(unknown.broken()[0].kind, None);
    assert_eq!(unknown.broken()[0].namespace, None);
    for w in &everywhere {
        assert_eq!(mesh_wide.mtls_mode(w, 80).0, MtlsMode::Strict, "{w}");
        assert!(mesh_wide
            .authorize(w, &connection(Caller::DemoClient, 80))
            .is_allow());
        assert_eq!(unknown.mtls_mode(w, 80).0, MtlsMode::Strict, "{w}");
        assert!(!unknown
            .authorize(w, &connection(Caller::DemoClient, 80))
            .is_allow());
    }
}
