//! `check` on the lab's topology: demo/client, demo/peer (n1) and demo/server (n2) in the
//! mesh, legacy/client (n1) outside it.
use std::path::Path;

use super::*;
use crate::policy::{
    decode_str,
    testing::{authz, peer_auth},
};

const CONFIG: &str = r#"
meshNamespaces: [demo]
workloads:
- {name: client, namespace: demo, serviceAccount: client, labels: {app: client}, node: n1, netns: /run/netns/a}
- {name: peer, namespace: demo, serviceAccount: peer, labels: {app: peer}, node: n1, netns: /run/netns/b}
- {name: client, namespace: legacy, node: n1, netns: /run/netns/c}
- {name: server, namespace: demo, serviceAccount: server, labels: {app: server}, node: n2, netns: /run/netns/d}
"#;

/// The same without legacy/client: nothing outside the mesh.
fn mesh_only() -> String {
    CONFIG
        .lines()
        .filter(|l| !l.contains("legacy"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn strict(namespace: &str) -> String {
    peer_auth(namespace, "strict", "  mtls: {mode: STRICT}")
}

fn report_on(config: &str, policies: &str, node: Option<&str>) -> Report {
    let config = LocalConfig::parse(config, Path::new("workloads.yaml")).expect("config parses");
    let policies = decode_str(policies, Path::new("policy.yaml")).expect("policies decode");
    let policy = PolicySet::new(PolicyConfig::default(), policies);
    check(&config, &policy, "cluster.local", node)
}

fn report(config: &str, policies: &str) -> Report {
    report_on(config, policies, None)
}

fn workload<'a>(report: &'a Report, id: &str) -> &'a WorkloadReport {
    report
        .workloads
        .iter()
        .find(|w| w.workload.to_string() == id)
        .unwrap_or_else(|| panic!("{id} is not in the report:\n{report}"))
}

fn findings(report: &Report, kind: FindingKind) -> Vec<&Finding> {
    report.findings.iter().filter(|f| f.kind == kind).collect()
}

fn decided_by(decision: &MtlsDecision) -> Option<(String, MtlsScope)> {
    decision
        .decided_by
        .as_ref()
        .map(|(policy, scope)| (policy.to_string(), scope.clone()))
}

#[test]
fn no_policy_is_the_mesh_default_and_nothing_is_flagged() {
    let report = report(CONFIG, "");
    let ids: Vec<String> = report
        .workloads
        .iter()
        .map(|w| w.workload.to_string())
        .collect();
    assert_eq!(ids, ["demo/client", "demo/peer", "demo/server"]);
    for w in &report.workloads {
        assert_eq!(w.mtls.mode, MtlsMode::Permissive);
        assert_eq!(w.mtls.decided_by, None);
        assert!(w.port_mtls.is_empty());
        assert_eq!(w.authorization, AuthorizationSummary::Open);
    }
    assert_eq!(report.outside_mesh.len(), 1);
    assert!(report.findings.is_empty(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("mTLS: mesh default PERMISSIVE (no PeerAuthentication applies)"),
        "{text}"
    );
    assert!(
        text.contains("demo/server (node n2, spiffe://cluster.local/ns/demo/sa/server)"),
        "{text}"
    );
    assert!(
        text.contains("not in the mesh (plain text, no policy applies): legacy/client (node n1)"),
        "{text}"
    );
    assert!(text.ends_with("no problems found\n"), "{text}");
}

#[test]
fn strict_namespace_with_a_workload_outside_the_mesh_is_flagged() {
    let report = report(CONFIG, &strict("demo"));
    let server = workload(&report, "demo/server");
    assert_eq!(server.mtls.mode, MtlsMode::Strict);
    assert_eq!(
        decided_by(&server.mtls),
        Some(("demo/strict".to_owned(), MtlsScope::Namespace))
    );
    let flagged = findings(&report, FindingKind::StrictRefusesPlaintext);
    let subjects: Vec<&str> = flagged.iter().map(|f| f.subject.as_str()).collect();
    assert_eq!(subjects, ["demo/client", "demo/peer", "demo/server"]);
    let message = &flagged[2].message;
    assert!(
        message.starts_with("demo/server is STRICT (PeerAuthentication demo/strict) but legacy/client is not in the mesh: its plaintext connections to demo/server will be refused if it calls it."),
        "{message}"
    );
    assert!(message.contains("Enroll namespace legacy"), "{message}");
    assert_eq!(report.findings.len(), 3, "{report}");

    let without_legacy = self::report(&mesh_only(), &strict("demo"));
    assert!(without_legacy.findings.is_empty(), "{without_legacy}");
}

#[test]
fn mesh_wide_strict_names_the_root_policy() {
    let report = report(&mesh_only(), &strict("istio-system"));
    let client = workload(&report, "demo/client");
    assert_eq!(
        decided_by(&client.mtls),
        Some(("istio-system/strict".to_owned(), MtlsScope::Mesh))
    );
    assert!(report
        .to_string()
        .contains("mTLS: STRICT — PeerAuthentication istio-system/strict (mesh-wide)"));
    assert!(report.findings.is_empty(), "{report}");
}

#[test]
fn workload_permissive_overrides_namespace_strict() {
    let policies = strict("demo")
        + &peer_auth(
            "demo",
            "server-permissive",
            "  selector: {matchLabels: {app: server}}\n  mtls: {mode: PERMISSIVE}",
        );
    let report = report(CONFIG, &policies);
    let server = workload(&report, "demo/server");
    assert_eq!(server.mtls.mode, MtlsMode::Permissive);
    assert_eq!(
        decided_by(&server.mtls),
        Some((
            "demo/server-permissive".to_owned(),
            MtlsScope::Workload {
                selector: "app=server".to_owned()
            }
        ))
    );
    assert_eq!(workload(&report, "demo/client").mtls.mode, MtlsMode::Strict);
    assert!(report.to_string().contains(
        "mTLS: PERMISSIVE — PeerAuthentication demo/server-permissive (selector app=server)"
    ));
    let subjects: Vec<&str> = findings(&report, FindingKind::StrictRefusesPlaintext)
        .iter()
        .map(|f| f.subject.as_str())
        .collect();
    assert_eq!(subjects, ["demo/client", "demo/peer"]);
}

#[test]
fn port_level_mtls_is_shown_and_judged() {
    let policies = strict("demo")
        + &peer_auth(
            "demo",
            "server-probe",
            "  selector: {matchLabels: {app: server}}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    9090: {mode: UNSET}",
        )
        + &peer_auth(
            "demo",
            "peer-metrics",
            "  selector: {matchLabels: {app: peer}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    15020: {mode: STRICT}",
        );
    let report = report(CONFIG, &policies);
    let server = workload(&report, "demo/server");
    assert_eq!(server.mtls.mode, MtlsMode::Strict);
    assert_eq!(
        decided_by(&server.mtls),
        Some(("demo/strict".to_owned(), MtlsScope::Namespace)),
        "the workload policy says nothing for the whole workload"
    );
    assert_eq!(
        server.port_mtls.len(),
        1,
        "an UNSET port inherits: not shown"
    );
    assert_eq!(server.port_mtls[0].port, 8080);
    assert_eq!(server.port_mtls[0].decision.mode, MtlsMode::Permissive);
    assert_eq!(
        decided_by(&server.port_mtls[0].decision),
        Some(("demo/server-probe".to_owned(), MtlsScope::Port))
    );
    let text = report.to_string();
    assert!(
        text.contains(
            "port 8080: PERMISSIVE — PeerAuthentication demo/server-probe (portLevelMtls)"
        ),
        "{text}"
    );

    let flagged = findings(&report, FindingKind::StrictRefusesPlaintext);
    let server_finding = flagged.iter().find(|f| f.subject == "demo/server").unwrap();
    assert!(
        server_finding
            .message
            .contains("is STRICT except on port 8080 (PeerAuthentication demo/strict)"),
        "{}",
        server_finding.message
    );
    let peer_finding = flagged.iter().find(|f| f.subject == "demo/peer").unwrap();
    assert!(
        peer_finding
            .message
            .contains("demo/peer is STRICT on port 15020 (PeerAuthentication demo/peer-metrics)"),
        "{}",
        peer_finding.message
    );
}

const CLIENT_ONLY: &str = "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n    to:\n    - operation:\n        ports: [\"8080\"]";

#[test]
fn allow_policy_is_described() {
    let report = report(&mesh_only(), &authz("demo", "client-only", CLIENT_ONLY));
    let server = workload(&report, "demo/server");
    assert_eq!(
        server.authorization,
        AuthorizationSummary::AllowList { with_deny: false }
    );
    let text = report.to_string();
    assert!(
        text.contains(
            "authorization: ALLOW policies apply; connections no rule matches are refused"
        ),
        "{text}"
    );
    assert!(
        text.contains("ALLOW demo/client-only (namespace-wide): allows connections from principal cluster.local/ns/demo/sa/client to port 8080"),
        "{text}"
    );
    assert!(report.findings.is_empty(), "{report}");
}

#[test]
fn empty_allow_is_deny_all_and_deny_only_is_described() {
    let report = report(
        &mesh_only(),
        &(authz("demo", "allow-nothing", "  {}")
            + &authz(
                "istio-system",
                "no-legacy",
                "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [\"demo\"]",
            )),
    );
    let server = workload(&report, "demo/server");
    assert_eq!(server.authorization, AuthorizationSummary::DenyAll);
    let text = report.to_string();
    assert!(
        text.contains("every connection is refused (deny all)"),
        "{text}"
    );
    assert!(
        text.contains("ALLOW demo/allow-nothing (namespace-wide): no rules, so it allows nothing"),
        "{text}"
    );
    assert!(
        text.contains("DENY istio-system/no-legacy (mesh-wide): refuses connections from namespace other than demo"),
        "{text}"
    );

    let deny_only = self::report(
        &mesh_only(),
        &authz(
            "demo",
            "no-peer",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/peer\"]",
        ),
    );
    assert_eq!(
        workload(&deny_only, "demo/server").authorization,
        AuthorizationSummary::DenyOnly
    );
    assert!(deny_only.findings.is_empty(), "{deny_only}");
}

#[test]
fn unknown_principals_are_flagged() {
    let spec = "  rules:\n  - from:\n    - source:\n        principals:\n        - cluster.local/ns/demo/sa/clinet\n        - cluster.local/ns/demo/*\n        - \"*/sa/peer\"\n        - other.local/ns/demo/sa/client\n        - spiffe://cluster.local/ns/demo/sa/client\n  - when:\n    - key: source.principal\n      notValues: [cluster.local/ns/prod/sa/api]";
    let report = report(&mesh_only(), &authz("demo", "callers", spec));
    let flagged = findings(&report, FindingKind::UnknownPrincipal);
    let messages: Vec<&str> = flagged.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert!(
        messages[0].starts_with("AuthorizationPolicy demo/callers: rules[0].from[0].source.principals names principal cluster.local/ns/demo/sa/clinet, which matches no known workload; it lets no workload in the mesh in. Check the spelling"),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].contains("other.local/ns/demo/sa/client, which matches no known workload (it is in trust domain other.local, this mesh's is cluster.local)"),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].contains("(principals are written without spiffe://)"),
        "{}",
        messages[2]
    );
    assert!(
        messages[3].starts_with("AuthorizationPolicy demo/callers: rules[1].when[0] (source.principal) notValues names principal cluster.local/ns/prod/sa/api")
            && messages[3].contains("it excludes no workload in the mesh"),
        "{}",
        messages[3]
    );
    assert_eq!(flagged[0].subject, "AuthorizationPolicy demo/callers");
}

#[test]
fn deny_by_unknown_namespace_is_flagged() {
    let spec = "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [prod, \"dem*\"]\n  - when:\n    - key: source.namespace\n      values: [staging]";
    let report = report(CONFIG, &authz("demo", "deny-prod", spec));
    let flagged = findings(&report, FindingKind::UnknownNamespace);
    let messages: Vec<&str> = flagged.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(
        messages[0].starts_with("AuthorizationPolicy demo/deny-prod: rules[0].from[0].source.namespaces names namespace prod, which matches no known workload; it refuses no workload in the mesh."),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].contains("rules[1].when[0] (source.namespace) values names namespace staging"),
        "{}",
        messages[1]
    );
}

#[test]
fn names_matching_only_workloads_outside_the_mesh_are_flagged() {
    let spec = "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [legacy]\n        serviceAccounts: [legacy/default]";
    let report = report(CONFIG, &authz("demo", "deny-legacy", spec));
    let flagged = findings(&report, FindingKind::OnlyOutsideMesh);
    assert_eq!(flagged.len(), 2, "{report}");
    assert!(
        flagged[0].message.contains("names namespace legacy, which matches only legacy/client, not in the mesh: it connects in plain text, without an identity, so this never matches it"),
        "{}",
        flagged[0].message
    );
    assert!(
        flagged[0].message.contains("ipBlocks"),
        "{}",
        flagged[0].message
    );
}

#[test]
fn service_accounts_are_matched_in_the_policy_namespace() {
    let spec = "  rules:\n  - from:\n    - source:\n        serviceAccounts: [client, demo/peer, demo/nobody]";
    let report = report(&mesh_only(), &authz("demo", "by-account", spec));
    let flagged = findings(&report, FindingKind::UnknownServiceAccount);
    assert_eq!(flagged.len(), 1, "{report}");
    assert!(
        flagged[0]
            .message
            .contains("serviceAccounts names service account demo/nobody"),
        "{}",
        flagged[0].message
    );
}

#[test]
fn selectors_that_select_nothing_are_flagged() {
    let policies = authz(
        "demo",
        "typo",
        "  selector: {matchLabels: {app: sever}}\n  rules:\n  - {}",
    ) + &peer_auth(
        "demo",
        "typo",
        "  selector: {matchLabels: {app: server, version: v2}}\n  mtls: {mode: PERMISSIVE}",
    ) + &authz(
        "istio-system",
        "servers",
        "  selector: {matchLabels: {app: server}}\n  rules:\n  - {}",
    ) + &authz(
        "istio-system",
        "nothing",
        "  selector: {matchLabels: {app: nothing}}\n  rules:\n  - {}",
    );
    let report = report(&mesh_only(), &policies);
    let flagged = findings(&report, FindingKind::SelectsNothing);
    let messages: Vec<&str> = flagged.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(
        messages[0].starts_with("PeerAuthentication demo/typo: selector app=server,version=v2 selects no workload in namespace demo"),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].starts_with("AuthorizationPolicy demo/typo: selector app=sever selects no workload in namespace demo"),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].starts_with("AuthorizationPolicy istio-system/nothing: selector app=nothing selects no workload in any namespace"),
        "{}",
        messages[2]
    );
    assert_eq!(
        workload(&report, "demo/server").authorization_policies[0].scope,
        "selector app=server"
    );
}

#[test]
fn policies_where_nothing_is_in_the_mesh_are_flagged() {
    let policies = strict("legacy") + &authz("prod", "allow-all", "  rules:\n  - {}");
    let report = report(CONFIG, &policies);
    let flagged = findings(&report, FindingKind::NoWorkloadInNamespace);
    assert_eq!(flagged.len(), 2, "{report}");
    assert!(
        flagged[0].message.starts_with("PeerAuthentication legacy/strict: namespace legacy is not in the mesh (meshNamespaces), so warren enforces nothing there and this policy has no effect on legacy/client."),
        "{}",
        flagged[0].message
    );
    assert!(
        flagged[1].message.starts_with(
            "AuthorizationPolicy prod/allow-all: no workload in the config is in namespace prod"
        ),
        "{}",
        flagged[1].message
    );
    assert!(
        findings(&report, FindingKind::StrictRefusesPlaintext).is_empty(),
        "STRICT in legacy applies to no workload in the mesh"
    );
}

#[test]
fn policy_set_warnings_are_findings() {
    let spec =
        "  rules:\n  - to:\n    - operation:\n        methods: [GET]\n        ports: [\"8080\"]";
    let report = report(&mesh_only(), &authz("demo", "get-only", spec));
    let flagged = findings(&report, FindingKind::PolicyWarning);
    assert_eq!(flagged.len(), 1, "{report}");
    assert!(
        flagged[0].message.starts_with("AuthorizationPolicy demo/get-only: rules[0] (to.operation.methods) uses HTTP (L7) attributes"),
        "{}",
        flagged[0].message
    );
    let server = workload(&report, "demo/server");
    assert_eq!(server.authorization, AuthorizationSummary::DenyAll);
    assert!(
        server.authorization_policies[0]
            .meaning
            .contains("allows nothing at L4"),
        "{}",
        server.authorization_policies[0].meaning
    );
    assert!(report
        .to_string()
        .contains("1 problem:\n  ! AuthorizationPolicy demo/get-only:"));
}

#[test]
fn a_workload_policy_shadowed_by_an_older_one_is_flagged() {
    let policies = peer_auth(
        "demo",
        "server-strict",
        "  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}",
    ) + &peer_auth(
        "demo",
        "server-permissive",
        "  selector: {matchLabels: {app: server}}\n  mtls: {mode: PERMISSIVE}",
    );
    let report = report(&mesh_only(), &policies);
    assert_eq!(
        decided_by(&workload(&report, "demo/server").mtls).map(|(p, _)| p),
        Some("demo/server-strict".to_owned()),
        "equally old: the first given wins"
    );
    let flagged = findings(&report, FindingKind::ShadowedPeerAuthentication);
    assert_eq!(flagged.len(), 1, "{report}");
    assert_eq!(
        flagged[0].subject,
        "PeerAuthentication demo/server-permissive"
    );
    assert!(
        flagged[0].message.starts_with("PeerAuthentication demo/server-permissive is ignored for demo/server: demo/server-strict also selects it and takes precedence"),
        "{}",
        flagged[0].message
    );
}

#[test]
fn node_limits_the_workloads_reported() {
    let report = report_on(CONFIG, &strict("demo"), Some("n2"));
    let ids: Vec<String> = report
        .workloads
        .iter()
        .map(|w| w.workload.to_string())
        .collect();
    assert_eq!(ids, ["demo/server"]);
    assert_eq!(
        findings(&report, FindingKind::StrictRefusesPlaintext).len(),
        1,
        "legacy/client on n1 may still call demo/server on n2"
    );

    let unknown = report_on(CONFIG, "", Some("n3"));
    assert!(unknown.workloads.is_empty());
    let flagged = findings(&unknown, FindingKind::UnknownNode);
    assert_eq!(flagged.len(), 1);
    assert!(
        flagged[0].message.contains("(nodes: n1, n2)"),
        "{}",
        flagged[0].message
    );
}

#[test]
fn invalid_identity_is_flagged() {
    let config = mesh_only().replace("serviceAccount: peer", "serviceAccount: \"peer/x\"");
    let report = report(&config, "");
    let flagged = findings(&report, FindingKind::InvalidIdentity);
    assert_eq!(flagged.len(), 1, "{report}");
    assert!(flagged[0].message.starts_with(
        "demo/peer has no valid identity, so the agent on node n1 will refuse to start"
    ));
    assert!(workload(&report, "demo/peer").identity.is_none());
}

#[test]
fn exit_status() {
    let clean: Result<Report, CheckError> = Ok(report(CONFIG, ""));
    assert_eq!(exit_code(&clean), EXIT_CLEAN);
    let flagged: Result<Report, CheckError> = Ok(report(CONFIG, &strict("demo")));
    assert_eq!(exit_code(&flagged), EXIT_PROBLEMS);
    let unreadable: Result<Report, CheckError> = Err(LocalConfig::parse(
        "meshNamespace: [demo]\n",
        Path::new("w.yaml"),
    )
    .unwrap_err()
    .into());
    assert_eq!(exit_code(&unreadable), EXIT_INPUT_ERROR);
    assert_eq!((EXIT_CLEAN, EXIT_PROBLEMS, EXIT_INPUT_ERROR), (0, 1, 2));
}

#[test]
fn bad_inputs_are_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workloads.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let policy = dir.path().join("bad.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: demo}\nspec:\n  mtls: {mod: STRICT}\n",
    )
    .unwrap();
    let args = CheckArgs {
        config: config.clone(),
        policy: Some(policy.clone()),
        root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
        trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        trust_domain_aliases: vec![],
        node: None,
    };
    // A document that does not decode is a problem, named with the workloads it closes.
    let outcome = run(&args);
    assert_eq!(exit_code(&outcome), EXIT_PROBLEMS);
    let report = outcome.unwrap();
    let finding = report
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::PolicyDoesNotDecode)
        .expect("a finding for the bad document");
    assert_eq!(
        finding.subject,
        format!("policy document {}:1", policy.display())
    );
    assert!(
        finding
            .message
            .contains(&format!("{}:5:", policy.display()))
            && finding
                .message
                .contains("every workload of namespace demo: they are STRICT"),
        "{finding}"
    );
    for workload in report
        .workloads
        .iter()
        .filter(|w| w.workload.namespace == "demo")
    {
        assert_eq!(workload.mtls.mode, MtlsMode::Strict);
        assert_eq!(
            workload.mtls.decided_by.as_ref().map(|(_, scope)| scope),
            Some(&MtlsScope::DoesNotDecode)
        );
    }
    assert!(
        report
            .to_string()
            .contains("1 document(s) that do not decode"),
        "{report}"
    );

    // An AuthorizationPolicy that does not decode: its workloads are refused everything.
    std::fs::write(
        &policy,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: demo}\nspec: {rule: []}\n",
    )
    .unwrap();
    let report = run(&args).unwrap();
    assert!(report
        .workloads
        .iter()
        .filter(|w| w.workload.namespace == "demo")
        .all(|w| w.authorization == AuthorizationSummary::DoesNotDecode));

    // A policy path that cannot be read is an input error.
    let err = run(&CheckArgs {
        policy: Some(dir.path().join("missing-policy")),
        ..args.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("the policy path cannot be read"), "{err}");

    let err = run(&CheckArgs {
        trust_domain: "Bad Domain".to_owned(),
        ..args.clone()
    })
    .unwrap_err();
    assert!(matches!(err, CheckError::TrustDomain { .. }), "{err}");

    let err = run(&CheckArgs {
        trust_domain_aliases: vec!["old.example".to_owned(), "Bad Alias".to_owned()],
        ..args.clone()
    })
    .unwrap_err();
    assert!(matches!(err, CheckError::TrustDomainAlias(_)), "{err}");
    assert!(err.to_string().contains("\"Bad Alias\""), "{err}");

    let err = run(&CheckArgs {
        config: dir.path().join("missing.yaml"),
        ..args
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing.yaml"), "{err}");
}
