//! `warren check` as an operator runs it: the built binary on files, its output and exit
//! status (0 nothing flagged, 1 problems flagged, 2 inputs unreadable).
use std::{
    path::Path,
    process::{Command, Output},
};

/// The statuses `warren check` exits with.
const EXIT_PROBLEMS: i32 = 1;
const EXIT_INPUT_ERROR: i32 = 2;

const WORKLOADS: &str = r#"
meshNamespaces: [demo]
workloads:
- {name: client, namespace: demo, serviceAccount: client, labels: {app: client}, node: n1, ips: ["10.77.1.10"], netns: /run/netns/warren-n1-demo-client}
- {name: peer, namespace: demo, serviceAccount: peer, labels: {app: peer}, node: n1, ips: ["10.77.1.11"], netns: /run/netns/warren-n1-demo-peer}
- {name: client, namespace: legacy, node: n1, ips: ["10.77.1.12"], netns: /run/netns/warren-n1-legacy-client}
- {name: server, namespace: demo, serviceAccount: server, labels: {app: server}, node: n2, ips: ["10.77.2.10"], netns: /run/netns/warren-n2-demo-server}
"#;

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

const CLIENT_ONLY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: client-only, namespace: demo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

/// `principal:` for `principals:` on line 8.
const TYPO: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: demo}
spec:
  rules:
  - from:
    - source:
        principal: ["cluster.local/ns/demo/sa/client"]
"#;

fn warren_check(args: &[&str], cwd: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_warren"));
    command.arg("check").args(args).current_dir(cwd);
    // The caller's environment must not choose the inputs.
    for var in [
        "WARREN_CONFIG",
        "WARREN_POLICY",
        "WARREN_ROOT_NAMESPACE",
        "WARREN_TRUST_DOMAIN",
    ] {
        command.env_remove(var);
    }
    command.output().expect("warren runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_reports_and_sets_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("workloads.yaml"), WORKLOADS).unwrap();
    std::fs::create_dir(root.join("policies")).unwrap();

    // No policy: the mesh default, nothing flagged.
    let out = warren_check(
        &["--config", "workloads.yaml", "--policy", "policies"],
        root,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("demo/server (node n2, spiffe://cluster.local/ns/demo/sa/server)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mTLS: mesh default PERMISSIVE (no PeerAuthentication applies)"),
        "{stdout}"
    );
    assert!(stdout.ends_with("no problems found\n"), "{stdout}");

    // STRICT with legacy/client outside the mesh, and least privilege: flagged.
    std::fs::write(root.join("policies/strict.yaml"), STRICT).unwrap();
    std::fs::write(root.join("policies/client-only.yaml"), CLIENT_ONLY).unwrap();
    let out = warren_check(
        &[
            "--config",
            "workloads.yaml",
            "--policy",
            "policies",
            "--node",
            "n2",
        ],
        root,
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(EXIT_PROBLEMS),
        "{stdout}{}",
        text(&out.stderr)
    );
    for line in [
        "  mTLS: STRICT — PeerAuthentication demo/strict (namespace-wide)\n",
        "  authorization: ALLOW policies apply; connections no rule matches are refused\n",
        "ALLOW demo/client-only (namespace-wide): allows connections from principal cluster.local/ns/demo/sa/client to port 8080\n",
        "1 problem:\n",
        "  ! demo/server is STRICT (PeerAuthentication demo/strict) but legacy/client is not in the mesh: its plaintext connections to demo/server will be refused if it calls it.",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("demo/client (node"),
        "--node n2 only: {stdout}"
    );

    // A policy that does not decode is a problem, not an unreadable input: the file and
    // line are named, and the workloads it fails closed for.
    std::fs::write(root.join("policies/typo.yaml"), TYPO).unwrap();
    let out = warren_check(
        &["--config", "workloads.yaml", "--policy", "policies"],
        root,
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(EXIT_PROBLEMS),
        "{stdout}{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("  ! policy document policies/typo.yaml:1 does not decode: policies/typo.yaml:8:9 (document 1): spec.rules[0].from[0].source: unknown field `principal`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("The agent fails closed for every workload of namespace demo: every connection to them is refused (demo/client, demo/peer, demo/server)."),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "authorization: an AuthorizationPolicy document that does not decode may apply"
        ),
        "{stdout}"
    );

    // A policy path that cannot be read: nothing is checked.
    let out = warren_check(
        &["--config", "workloads.yaml", "--policy", "no-such-policies"],
        root,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_INPUT_ERROR), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("no-such-policies") && stderr.contains("the policy path cannot be read"),
        "{stderr}"
    );

    // A config that cannot be read, or none given: inputs unreadable, not "problems found".
    let out = warren_check(&["--config", "missing.yaml"], root);
    assert_eq!(out.status.code(), Some(EXIT_INPUT_ERROR));
    assert!(
        text(&out.stderr).contains("cannot read config file missing.yaml"),
        "{}",
        text(&out.stderr)
    );
    let out = warren_check(&[], root);
    assert_eq!(out.status.code(), Some(EXIT_INPUT_ERROR));
    assert!(
        text(&out.stderr).contains("--config <FILE>"),
        "{}",
        text(&out.stderr)
    );
}
