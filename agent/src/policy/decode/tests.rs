use std::path::Path;

use super::*;
use crate::policy::model::{Condition, IpBlock, StringMatch};

fn decode(text: &str) -> Result<Vec<Policy>, PolicyError> {
    decode_str(text, Path::new("policies/test.yaml"))
}

fn invalid(text: &str) -> InvalidDocument {
    match decode(text) {
        Err(PolicyError::Invalid(invalid)) => invalid,
        other => panic!("expected an invalid document, got {other:?}"),
    }
}

fn authz(policy: &Policy) -> &AuthorizationPolicy {
    match policy {
        Policy::AuthorizationPolicy(p) => p,
        other => panic!("not an AuthorizationPolicy: {other:?}"),
    }
}

fn peer(policy: &Policy) -> &PeerAuthentication {
    match policy {
        Policy::PeerAuthentication(p) => p,
        other => panic!("not a PeerAuthentication: {other:?}"),
    }
}

const HTTPBIN: &str = r#"
apiVersion: security.istio.io/VERSION
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
        notIpBlocks: ["203.0.113.4", "2001:db8::/32"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        ports: ["8080", 9090]
        notPorts: ["9091"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
    - key: source.ip
      notValues: ["10.0.0.0/8"]
    - key: destination.port
      values: ["8080"]
"#;

#[test]
fn v1_and_v1beta1_decode_alike() {
    let v1 = decode(&HTTPBIN.replace("VERSION", "v1")).unwrap();
    let v1beta1 = decode(&HTTPBIN.replace("VERSION", "v1beta1")).unwrap();
    assert_eq!(v1, v1beta1);
    let [policy] = &v1[..] else { panic!("{v1:?}") };
    let policy = authz(policy);
    assert_eq!(policy.meta.namespace, "foo");
    assert_eq!(policy.meta.name, "httpbin");
    assert_eq!(policy.meta.origin, "policies/test.yaml, document 1");
    assert_eq!(policy.meta.creation_timestamp, None);
    assert_eq!(policy.action, Action::Allow);
    assert_eq!(
        policy.selector.as_ref().unwrap().to_string(),
        "app=httpbin,version=v1"
    );
    let [rule] = &policy.rules[..] else { panic!() };
    assert_eq!(rule.from.len(), 2);
    assert_eq!(
        rule.from[0].principals.values,
        [StringMatch::Exact(
            "cluster.local/ns/default/sa/sleep".into()
        )]
    );
    assert_eq!(
        rule.from[1].ip_blocks.not_values,
        [
            "203.0.113.4/32".parse::<IpBlock>().unwrap(),
            "2001:db8::/32".parse().unwrap()
        ]
    );
    assert_eq!(rule.to[0].l7_fields, ["methods", "paths"]);
    assert_eq!(rule.to[1].ports.values, [8080, 9090]);
    assert_eq!(rule.to[1].ports.not_values, [9091]);
    assert!(matches!(&rule.when[0], Condition::L7 { key } if key == "request.auth.claims[iss]"));
    assert!(matches!(&rule.when[1], Condition::SourceIp(m) if m.not_values.len() == 1));
    assert!(matches!(&rule.when[2], Condition::DestinationPort(m) if m.values == [8080]));
    assert!(rule.uses_l7());
    assert_eq!(
        rule.l7_attributes(),
        [
            "to.operation.methods",
            "to.operation.paths",
            "when request.auth.claims[iss]"
        ]
    );
}

#[test]
fn several_documents_other_kinds_and_empty_documents() {
    let text = r#"
# a comment before anything
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: demo}
spec: {replicas: 1, template: {spec: {containers: [{name: x, image: y}]}}}
---
---
# only a comment
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
  creationTimestamp: "2024-05-01T12:00:00Z"
  uid: 5f0c0000-0000-0000-0000-000000000000
  resourceVersion: "42"
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
spec:
  mtls:
    mode: STRICT
status: {anything: [1, 2]}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: UNSET
  portLevelMtls:
    8080:
      mode: DISABLE
    "9090":
      mode: PERMISSIVE
    9091: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-spec
  namespace: ""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules:
  - {}
"#;
    let policies = decode(text).unwrap();
    let names: Vec<String> = policies
        .iter()
        .map(|p| format!("{} {}/{}", p.kind(), p.meta().namespace, p.meta().name))
        .collect();
    assert_eq!(
        names,
        [
            "PeerAuthentication istio-system/default",
            "PeerAuthentication foo/finance",
            "AuthorizationPolicy default/allow-nothing",
            "AuthorizationPolicy default/no-spec",
            "AuthorizationPolicy foo/allow-all",
        ]
    );
    let mesh = peer(&policies[0]);
    assert_eq!(mesh.mode, PeerAuthenticationMode::Strict);
    assert_eq!(
        mesh.meta.creation_timestamp,
        Some(time::macros::datetime!(2024-05-01 12:00:00 UTC))
    );
    // The comment before the first `---` is not a document.
    assert_eq!(mesh.meta.origin, "policies/test.yaml, document 4");
    assert!(!mesh.meta.dry_run);
    let finance = peer(&policies[1]);
    assert_eq!(finance.mode, PeerAuthenticationMode::Unset);
    assert_eq!(
        finance
            .port_level_mtls
            .iter()
            .map(|(p, m)| (*p, *m))
            .collect::<Vec<_>>(),
        [
            (8080, PeerAuthenticationMode::Disable),
            (9090, PeerAuthenticationMode::Permissive),
            (9091, PeerAuthenticationMode::Unset)
        ]
    );
    assert!(
        authz(&policies[2]).rules.is_empty(),
        "spec: {{}} has no rules"
    );
    assert!(
        authz(&policies[3]).rules.is_empty(),
        "no spec at all: no rules"
    );
    assert_eq!(
        authz(&policies[4]).rules,
        [Rule::default()],
        "an empty rule"
    );
}

#[test]
fn empty_inputs_have_no_policies() {
    for text in [
        "",
        "\n",
        "---",
        "---\n---\n",
        "# nothing\n",
        "---\n...\n",
        "~",
        "null",
    ] {
        assert_eq!(decode(text).unwrap(), [], "{text:?}");
    }
}

#[test]
fn metadata_details() {
    let doc = |metadata: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n{metadata}\n"
        )
    };
    let policies = decode(&doc(
        "  name: a\n  annotations:\n    istio.io/dry-run: \"true\"\n  creationTimestamp: 2024-05-01T12:00:00+02:00",
    ))
    .unwrap();
    let meta = policies[0].meta();
    assert!(meta.dry_run);
    assert_eq!(meta.namespace, "default");
    assert_eq!(
        meta.creation_timestamp,
        Some(time::macros::datetime!(2024-05-01 10:00:00 UTC))
    );
    let policies = decode(&doc(
        "  name: a\n  annotations: {istio.io/dry-run: \"false\"}",
    ))
    .unwrap();
    assert!(!policies[0].meta().dry_run);
    let policies = decode(&doc("  name: a\n  annotations: {istio.io/dry-run: true}")).unwrap();
    assert!(policies[0].meta().dry_run);

    let err = invalid(&doc("  name: a\n  creationTimestamp: yesterday"));
    assert_eq!((err.line, err.column), (Some(5), Some(22)), "{err}");
    assert!(
        err.message
            .starts_with("metadata.creationTimestamp: \"yesterday\" is not an RFC 3339 time"),
        "{err}"
    );
    let err = invalid(&doc("  namespace: demo"));
    assert_eq!(err.message, "metadata: `name` is missing", "{err}");
    assert_eq!(err.line, Some(4), "{err}");
    let err = invalid("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n");
    assert!(err.message.contains("no `metadata`"), "{err}");
}

#[test]
fn spec_before_kind_is_still_decoded_and_checked() {
    let text = "spec:\n  mtls: {mode: STRICT}\nmetadata: {name: a, namespace: demo}\nkind: PeerAuthentication\napiVersion: security.istio.io/v1\n";
    let policies = decode(text).unwrap();
    assert_eq!(peer(&policies[0]).mode, PeerAuthenticationMode::Strict);
    let err = invalid(&text.replace("mtls:", "mtl:"));
    assert!(err.message.contains("spec: unknown field `mtl`"), "{err}");
    // Another kind's spec is never looked at, wherever it is.
    let text = "spec: {anything: [goes]}\nkind: ConfigMap\napiVersion: v1\nmetadata: {name: x}\n";
    assert_eq!(decode(text).unwrap(), []);
}

#[test]
fn service_accounts_default_to_the_policy_namespace() {
    let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sa, namespace: demo}
spec:
  rules:
  - from:
    - source:
        serviceAccounts: ["client", "other/app"]
        notServiceAccounts: ["peer"]
"#;
    let policies = decode(text).unwrap();
    let source = &authz(&policies[0]).rules[0].from[0];
    let accounts: Vec<String> = source
        .service_accounts
        .values
        .iter()
        .chain(&source.service_accounts.not_values)
        .map(|a| a.to_string())
        .collect();
    assert_eq!(accounts, ["demo/client", "other/app", "demo/peer"]);
}

/// Each bad document: the expected line and column, and what the message must say.
#[test]
fn errors_name_file_line_and_field() {
    let header = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\n";
    let cases: &[(&str, (usize, usize), &str)] = &[
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        principal: [\"cluster.local/ns/demo/sa/client\"]\n",
            (8, 9),
            "spec.rules[0].from[0].source: unknown field `principal`, expected one of `principals`",
        ),
        ("spec:\n  acton: DENY\n", (5, 3), "spec: unknown field `acton`"),
        ("spec:\n  action: deny\n", (5, 11), "spec.action: unknown variant `deny`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`"),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n",
            (8, 20),
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\": a prefix length of 33 is longer than the address",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"10.0.0.256\"]\n",
            (8, 23),
            "\"10.0.0.256\" is not an IP address or CIDR block",
        ),
        (
            "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
            (8, 17),
            "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number",
        ),
        (
            "spec:\n  rules:\n  - to:\n    - operation:\n        notPorts: [65536]\n",
            (8, 20),
            "port 65536 is out of range (0 to 65535)",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: source.principle\n      values: [x]\n",
            (7, 7),
            "spec.rules[0].when[0]: unknown `when` key \"source.principle\"",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: source.ip\n      values: [\"not-an-ip\"]\n",
            (7, 7),
            "\"not-an-ip\" is not an IP address",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: destination.port\n      notValues: [\"99999\"]\n",
            (7, 7),
            "port 99999 is out of range",
        ),
        (
            "spec:\n  rules:\n  - when:\n    - key: source.namespace\n",
            (7, 7),
            "condition \"source.namespace\" needs `values` or `notValues`",
        ),
        ("spec:\n  rules:\n  - from: []\n", (6, 5), "spec.rules[0]: `from` must not be an empty list"),
        ("spec:\n  rules:\n  - to: []\n", (6, 5), "`to` must not be an empty list"),
        ("spec:\n  rules:\n  - from:\n    - {}\n", (7, 7), "spec.rules[0].from[0]: `source` is missing"),
        ("spec:\n  rules:\n  - from:\n    - source: {}\n", (7, 7), "`source` is empty"),
        ("spec:\n  rules:\n  - to:\n    - operation: {ports: []}\n", (7, 7), "`operation` is empty"),
        (
            "spec:\n  rules:\n  - from:\n    - source: {principals: [\"\"]}\n",
            (7, 7),
            "`principals` contains an empty string",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [\"a/b/c\"]}\n",
            (7, 7),
            "`serviceAccounts`: \"a/b/c\" is not a service account",
        ),
        ("spec:\n  action: CUSTOM\n", (5, 3), "spec: action CUSTOM needs `provider.name`"),
        ("spec:\n  provider: {name: x}\n", (5, 3), "`provider` is only valid with action CUSTOM"),
        (
            "spec:\n  selector: {matchLabels: {app: x}}\n  targetRefs: [{kind: Gateway, name: gw}]\n",
            (5, 3),
            "set `selector` or `targetRef`/`targetRefs`, not both",
        ),
        (
            "spec:\n  selector: {matchLabel: {app: x}}\n",
            (5, 14),
            "spec.selector: unknown field `matchLabel`",
        ),
        ("spec:\n  rules: {}\n", (5, 10), "spec.rules: invalid type: map, expected a sequence"),
        ("spec: [1]\n", (4, 7), "invalid type: sequence"),
        (
            "spec:\n  rules:\n  - from:\n    - source:\n      principals: [a]\n",
            (8, 7),
            "spec.rules[0].from[0]: unknown field `principals`, expected `source`",
        ),
    ];
    let mut failures = Vec::new();
    for (spec, (line, column), expected) in cases {
        let text = format!("{header}{spec}");
        let err = invalid(&text);
        let shown = PolicyError::Invalid(err.clone()).to_string();
        let prefix = format!("policies/test.yaml:{line}:{column} (document 1): ");
        if !err.message.contains(expected) || !shown.starts_with(&prefix) || err.document != 1 {
            failures.push(format!(
                "{spec:?}\n   got {shown:?}\n  want {prefix}...{expected}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn peer_authentication_errors() {
    let header = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: demo}\n";
    let cases: &[(&str, usize, &str)] = &[
        ("spec:\n  mtls: {mode: strict}\n", 5, "spec.mtls.mode: unknown variant `strict`, expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`"),
        ("spec:\n  mtls: {mode: STRICT, extra: 1}\n", 5, "spec.mtls: unknown field `extra`"),
        ("spec:\n  portLevelMtls:\n    0: {mode: STRICT}\n", 6, "port 0 is out of range (1 to 65535)"),
        ("spec:\n  portLevelMtls:\n    http: {mode: STRICT}\n", 6, "\"http\" is not a port number"),
        ("spec:\n  portLevelMtls:\n    8080: {mod: STRICT}\n", 6, "spec.portLevelMtls.8080: unknown field `mod`"),
        ("spec:\n  mTLS: {mode: STRICT}\n", 5, "spec: unknown field `mTLS`"),
    ];
    for (spec, line, expected) in cases {
        let err = invalid(&format!("{header}{spec}"));
        assert!(err.message.contains(expected), "{spec:?}: {err}");
        assert_eq!(err.line, Some(*line), "{spec:?}: {err}");
    }
}

#[test]
fn document_level_errors() {
    let cases: &[(&str, usize, usize, &str)] = &[
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ok}\n---\nkind: AuthorizationPolicy\nmetadata: {name: x}\n",
            2,
            5,
            "the document needs `apiVersion` and `kind`",
        ),
        (
            "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n",
            1,
            1,
            "apiVersion \"security.istio.io/v1alpha1\" is not supported for AuthorizationPolicy",
        ),
        (
            "apiVersion: securty.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n",
            1,
            1,
            "is not supported for PeerAuthentication: use security.istio.io/v1 or security.istio.io/v1beta1",
        ),
        ("apiVersion: v1\nkind: List\nitems: []\n", 1, 1, "kind List is not supported"),
        ("- a\n- b\n", 1, 1, "invalid type: sequence, expected a Kubernetes object"),
        ("just text\n", 1, 1, "invalid type: string \"just text\", expected a Kubernetes object"),
        ("kind: A\nkind: B\n", 1, 1, "`kind` appears twice"),
        ("{unclosed: [\n", 1, 2, "did not find expected node content"),
    ];
    for (text, document, line, expected) in cases {
        let err = invalid(text);
        assert!(err.message.contains(expected), "{text:?}: {err}");
        assert_eq!(err.document, *document, "{text:?}: {err}");
        assert_eq!(err.line, Some(*line), "{text:?}: {err}");
    }
}

#[test]
fn duplicates_are_refused() {
    let one = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n";
    let err = decode(&format!("{one}---\n{one}")).unwrap_err().to_string();
    assert_eq!(
        err,
        "AuthorizationPolicy demo/a is defined twice: in policies/test.yaml, document 1 and in policies/test.yaml, document 2"
    );
    // Same name, other kind: two objects.
    let other = one.replace("AuthorizationPolicy", "PeerAuthentication");
    assert_eq!(decode(&format!("{one}---\n{other}")).unwrap().len(), 2);
}

#[test]
fn directory_in_file_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |name: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n")
    };
    std::fs::write(dir.path().join("b.yml"), doc("from-b")).unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        format!("{}---\n{}", doc("from-a1"), doc("from-a2")),
    )
    .unwrap();
    std::fs::write(dir.path().join("c.txt"), "not: [yaml").unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [yaml").unwrap();
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    std::fs::write(dir.path().join("sub.yaml/d.yaml"), doc("nested")).unwrap();
    let policies = load_path(dir.path()).unwrap();
    let names: Vec<&str> = policies.iter().map(|p| p.meta().name.as_str()).collect();
    assert_eq!(names, ["from-a1", "from-a2", "from-b"]);
    assert_eq!(
        policies[2].meta().origin,
        format!("{}, document 1", dir.path().join("b.yml").display())
    );

    // One file.
    let single = load_path(&dir.path().join("b.yml")).unwrap();
    assert_eq!(single.len(), 1);

    // The same policy in two files.
    std::fs::write(dir.path().join("c.yaml"), doc("from-b")).unwrap();
    let err = load_path(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("AuthorizationPolicy demo/from-b is defined twice"),
        "{err}"
    );
    assert!(err.contains("b.yml, document 1 and in "), "{err}");

    // A bad file names itself.
    std::fs::write(
        dir.path().join("c.yaml"),
        format!("{}spec: {{rules: [{{from: []}}]}}\n", doc("c")),
    )
    .unwrap();
    let err = load_path(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:4:", dir.path().join("c.yaml").display())),
        "{err}"
    );
    std::fs::write(dir.path().join("c.yaml"), [0xff, 0xfe, b'\n']).unwrap();
    let err = load_path(dir.path()).unwrap_err().to_string();
    assert!(err.contains("c.yaml") && err.contains("not UTF-8"), "{err}");

    let err = load_path(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

/// Decoding arbitrary text never panics (the cargo-fuzz target will do this at scale).
#[test]
fn junk_never_panics() {
    let mut inputs: Vec<String> = [
        "\0", "\u{feff}", "- - - -", "{", "}", "[", "]]]", ":", "::", "? : ?", "!!binary AAAA",
        "!!int x", "&a [*a]", "*unknown", "%YAML 1.2\n---\n", "%TAG ! x\n", "---\n...\n---",
        "\t\tkind: x", "kind: [", "'", "\"\\u", "a: b: c", "- [a, {b: c}]\n- !!map {}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: [x]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [[]]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{when: [{key: 1, values: [1]}]}]}",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {portLevelMtls: {[1]: {}}}",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {portLevelMtls: {-1: {}, 1.5: {}}}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{to: [{operation: {ports: [-1, 1e9, 0x10, true, null]}}]}]}",
        "apiVersion: 1\nkind: 2\nmetadata: 3\nspec: 4",
        "kind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata: {name: x, creationTimestamp: 1}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    inputs.push("[".repeat(10_000));
    inputs.push("{a: ".repeat(5_000));
    inputs.push(format!("a: &a [{}]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]", "x,".repeat(1000)));
    // Every prefix of a valid policy, and pseudo-random splices of YAML tokens.
    let valid = HTTPBIN.replace("VERSION", "v1");
    for end in 0..valid.len() {
        if valid.is_char_boundary(end) {
            inputs.push(valid[..end].to_owned());
        }
    }
    let tokens = [
        "apiVersion: security.istio.io/v1\n",
        "kind: AuthorizationPolicy\n",
        "kind: PeerAuthentication\n",
        "metadata: {name: x}\n",
        "spec:\n",
        "  rules:\n",
        "  - from:\n",
        "    - source:\n",
        "        ipBlocks: [\"::/0\"]\n",
        "  portLevelMtls:\n",
        "    80: {mode: STRICT}\n",
        "---\n",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "\"",
        "'",
        "&x ",
        "*x ",
        "!!str ",
        "\t",
        "  ",
        "\n",
        "#",
        "é",
        "\u{0}",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1500 {
        let mut text = String::new();
        for _ in 0..(seed % 24) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            text.push_str(tokens[(seed % tokens.len() as u64) as usize]);
        }
        inputs.push(text);
    }
    for input in &inputs {
        let _ = decode(input);
    }
}

fn lenient(text: &str) -> Decoded {
    decode_file(text, Path::new("policies/test.yaml"))
}

#[test]
fn a_document_that_does_not_decode_spoils_no_other() {
    let good = |name: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n")
    };
    // A syntax error in document 2 (lines 4-7), good documents around it.
    let text = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec: {{mtls: [\n---\n{}",
        good("first"),
        good("last")
    );
    let decoded = lenient(&text);
    let names: Vec<&str> = decoded
        .policies
        .iter()
        .map(|p| p.meta().name.as_str())
        .collect();
    assert_eq!(names, ["first", "last"]);
    assert_eq!(
        decoded.policies[1].meta().origin,
        "policies/test.yaml, document 3"
    );
    assert_eq!(decoded.broken.len(), 1);
    let broken = &decoded.broken[0];
    assert_eq!(broken.location, "policies/test.yaml:4");
    assert!(
        broken.error.starts_with("policies/test.yaml:"),
        "{broken:?}"
    );
    assert!(broken.error.contains("(document 2)"), "{broken:?}");
    // Not even YAML: nothing of it can be read.
    assert_eq!(
        (broken.kind, &broken.namespace, &broken.selector),
        (None, &None, &None)
    );
    // The strict reading reports the same error, with the file's line numbers.
    let err = invalid(&text);
    assert_eq!((err.document, err.line), (2, Some(7)), "{err}");
}

#[test]
fn what_can_be_read_of_a_bad_document_bounds_it() {
    let doc = |kind: &str, metadata: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {metadata}\nspec: {spec}\n"
        )
    };
    let selector = |labels: &[(&str, &str)]| {
        Some(WorkloadSelector {
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    };
    type Case = (
        String,
        Option<PolicyKind>,
        Option<&'static str>,
        Option<WorkloadSelector>,
    );
    let cases: Vec<Case> = vec![
        // The selector reads: only what it selects.
        (
            doc("AuthorizationPolicy", "{name: a, namespace: demo}", "{selector: {matchLabels: {app: server}}, rules: [{to: []}]}"),
            Some(PolicyKind::AuthorizationPolicy),
            Some("demo"),
            selector(&[("app", "server")]),
        ),
        // The selector is what is wrong: the namespace.
        (
            doc("PeerAuthentication", "{name: a, namespace: demo}", "{selector: {matchLabels: {app: [x]}}, mtls: {mode: STRICT}}"),
            Some(PolicyKind::PeerAuthentication),
            Some("demo"),
            None,
        ),
        (
            doc("PeerAuthentication", "{name: a, namespace: demo}", "{selector: {labels: {app: x}}}"),
            Some(PolicyKind::PeerAuthentication),
            Some("demo"),
            None,
        ),
        // No namespace written: default, as for a good document.
        (
            doc("AuthorizationPolicy", "{name: a}", "{action: deny}"),
            Some(PolicyKind::AuthorizationPolicy),
            Some("default"),
            None,
        ),
        // The namespace is unreadable, or metadata is missing: every namespace.
        (
            doc("AuthorizationPolicy", "{name: a, namespace: [demo]}", "{}"),
            Some(PolicyKind::AuthorizationPolicy),
            None,
            None,
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nspec: {}\n".to_owned(),
            Some(PolicyKind::AuthorizationPolicy),
            None,
            None,
        ),
        // The kind is wrong or missing: both kinds.
        (
            doc("List", "{name: a, namespace: demo}", "{}"),
            None,
            Some("demo"),
            None,
        ),
        (
            "apiVersion: security.istio.io/v1\nmetadata: {name: a, namespace: demo}\n".to_owned(),
            None,
            Some("demo"),
            None,
        ),
        // A wrong API group still says what it was meant to be.
        (
            "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: a, namespace: demo}\n".to_owned(),
            Some(PolicyKind::PeerAuthentication),
            Some("demo"),
            None,
        ),
        // Keys twice: YAML refuses it, nothing is read.
        (
            doc("PeerAuthentication", "{name: a, namespace: demo, namespace: x}", "{}"),
            None,
            None,
            None,
        ),
    ];
    for (text, kind, namespace, selector) in cases {
        let decoded = lenient(&text);
        assert!(decoded.policies.is_empty(), "{text}");
        assert_eq!(decoded.broken.len(), 1, "{text}");
        let broken = &decoded.broken[0];
        assert_eq!(broken.kind, kind, "{text}");
        assert_eq!(broken.namespace.as_deref(), namespace, "{text}");
        assert_eq!(broken.selector, selector, "{text}");
        assert_eq!(broken.location, "policies/test.yaml:1", "{text}");
    }
}

/// A file cut short can read as a valid, different policy (a DENY without its rules, a
/// PeerAuthentication without its mode): the watch applies only contents stable for a
/// poll (see `watch`). The decoder does its part where it can: an ALLOW policy cut
/// after `from:` or `to:` is refused rather than read as "from anyone".
#[test]
fn half_written_allow_policies_never_allow_anyone() {
    let whole = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/demo/sa/client]}\n    to:\n    - operation: {ports: [\"8080\"]}\n";
    for end in 0..whole.len() {
        let decoded = lenient(&whole[..end]);
        for policy in &decoded.policies {
            let Policy::AuthorizationPolicy(p) = policy else {
                panic!("{end}: {policy:?}")
            };
            assert!(
                p.rules.iter().all(|r| !r.from.is_empty()),
                "{end}: a prefix reads as a wider policy: {p:?}"
            );
        }
    }
}

#[test]
fn null_rule_fields_are_refused() {
    for (field, value) in [("from", "from:"), ("to", "to: null"), ("when", "when: ~")] {
        let text = format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n  rules:\n  - {value}\n");
        let err = invalid(&text);
        assert!(err.message.contains(&format!("`{field}` is null")), "{err}");
        assert_eq!(err.line, Some(6), "{err}");
    }
    let authz = |rules: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n  action: DENY\n{rules}")
    };
    assert!(invalid(&authz("  rules:\n"))
        .message
        .contains("`rules` is null"));
    assert!(invalid(&authz("  rules:\n  -\n"))
        .message
        .contains("`rules[0]` is null"));
    let peer = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: a}}\nspec:\n{spec}")
    };
    for spec in ["  mtls:\n", "  mtls:\n    mode:\n"] {
        assert!(invalid(&peer(spec)).message.contains("is null"), "{spec:?}");
    }
}

#[test]
fn a_directory_with_a_bad_file_keeps_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |name: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n")
    };
    std::fs::write(dir.path().join("a.yaml"), doc("a")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), "kind: [\n").unwrap();
    std::fs::write(dir.path().join("c.yaml"), [0xff, 0xfe, b'\n']).unwrap();
    std::fs::write(dir.path().join("d.yaml"), doc("a")).unwrap();
    let decoded = load_documents(dir.path()).unwrap();
    let names: Vec<&str> = decoded
        .policies
        .iter()
        .map(|p| p.meta().name.as_str())
        .collect();
    assert_eq!(names, ["a"]);
    let broken: Vec<String> = decoded
        .broken
        .iter()
        .map(|b| {
            b.location
                .replace(&format!("{}/", dir.path().display()), "")
        })
        .collect();
    assert_eq!(broken, ["b.yaml:1", "c.yaml", "d.yaml, document 1"]);
    assert!(decoded.broken[1].error.contains("not UTF-8"));
    // Defined twice: the second is broken for its scope, the first is read.
    assert!(decoded.broken[2].error.contains("defined twice"));
    assert_eq!(
        decoded.broken[2].kind,
        Some(PolicyKind::AuthorizationPolicy)
    );
    assert_eq!(decoded.broken[2].namespace.as_deref(), Some("demo"));
    // The path itself unreadable is the only error.
    assert!(load_documents(&dir.path().join("missing")).is_err());
}
