//! Istio security policy at the destination: the seeds' story. Plaintext clients work
//! under PERMISSIVE (the default, covered by `capture::legacy_client_is_not_captured`);
//! STRICT refuses them; least-privilege authorization refuses everyone not allowed.
//! Policies are Istio YAML applied as `cargo xtask lab apply -f` does; the agents reload
//! them while running.
use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, AppServer, Family, Lab};

use crate::support::{
    access_record, ensure_ok, field, metric_value, metrics_page, wait_for_log_line,
};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "policy::strict_namespace_refuses_plaintext",
        strict_namespace,
    ),
    (
        "policy::allow_only_one_principal_on_one_port",
        allow_only_client,
    ),
    (
        "policy::deny_by_namespace_ip_block_and_not_principals",
        deny_by_namespace_ip_block_and_not_principals,
    ),
    (
        "policy::authorization_selector_matches_labels",
        authorization_selector_matches_labels,
    ),
    (
        "policy::workload_peer_authentication_overrides_namespace",
        workload_overrides_namespace,
    ),
    (
        "policy::mesh_wide_policy_in_root_namespace",
        mesh_wide_policy,
    ),
    ("policy::port_level_mtls", port_level_mtls),
    (
        "policy::malformed_file_fails_closed_and_freezes_nothing",
        malformed_file_fails_closed_and_freezes_nothing,
    ),
];

/// `PeerAuthentication` STRICT for namespace `demo`: `legacy/client` is reset and the
/// refusal names the policy; enrolled clients still work; the node's probe still works.
fn strict_namespace(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    with_policies(lab, "strict", STRICT, || {
        let n2 = lab.agent_log_len("n2");
        let legacy = lab.connect("legacy/client", dst, AppMode::Echo, 1024)?;
        ensure!(
            !legacy.ok,
            "plaintext from legacy/client got through under STRICT: {legacy:?}"
        );
        // A reset shows as "connection reset" on a read, or "broken pipe" on a write; a clean
        // close would read as "server closed after echoing 0 of 1024 bytes".
        ensure!(
            legacy.detail.contains("reset") || legacy.detail.contains("Broken pipe"),
            "the refusal should be a reset: {legacy:?}"
        );
        let record = access_record(lab, "n2", n2, "inbound", dst)?;
        ensure!(
            field(&record, "error").contains("denied by PeerAuthentication demo/strict"),
            "the refusal should name the policy: {record}"
        );
        let refusals = metric_value(
            &metrics_page(lab, "n2")?,
            r#"warren_policy_refusals_total{kind="PeerAuthentication",policy="demo/strict"}"#,
        );
        ensure!(
            refusals >= Some(1),
            "the refusal was not counted: {refusals:?}"
        );

        ensure_ok(
            &lab.connect("demo/client", dst, AppMode::Echo, 1024)?,
            "mTLS client under STRICT",
        )?;
        ensure_ok(
            &lab.connect("node/n2", dst, AppMode::Echo, 1024)?,
            "the node's health probe under STRICT",
        )
    })
}

/// Least privilege: only `demo/client`'s identity may reach `demo`'s workloads, and only
/// on one port of `demo/server`.
fn allow_only_client(lab: &Lab) -> Result<()> {
    let allowed = lab.serve("demo/server", 0, AppMode::Echo)?;
    let other = lab.serve("demo/server", 0, AppMode::Echo)?;
    let to_allowed = lab.pod("demo/server").addr(Family::V4, allowed.port());
    let to_other = lab.pod("demo/server").addr(Family::V4, other.port());
    let yaml = format!(
        "\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: client-only
  namespace: demo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/demo/sa/client\"]
    to:
    - operation:
        ports: [\"{}\"]
",
        allowed.port()
    );
    with_policies(lab, "client-only", &yaml, || {
        ensure_ok(
            &lab.connect("demo/client", to_allowed, AppMode::Echo, 1024)?,
            "the allowed principal on the allowed port",
        )?;
        for (from, dst) in [
            ("demo/peer", to_allowed),     // another principal
            ("demo/client", to_other),     // another port
            ("legacy/client", to_allowed), // a plaintext client
        ] {
            ensure_refused(lab, from, dst, "AuthorizationPolicy demo/client-only")?;
        }
        Ok(())
    })
}

/// DENY policies, each on its own port of `demo/server`: by namespace (`notNamespaces`:
/// a plaintext client has no namespace), by the client's address (`ipBlocks`: for a
/// tunnelled connection, the address the source agent forwarded), and by identity
/// (`notPrincipals`). Each refuses only what it names.
fn deny_by_namespace_ip_block_and_not_principals(lab: &Lab) -> Result<()> {
    let servers = serve_many(lab, "demo/server", 3)?;
    let [outside_demo, peer_ip, not_client] = [0, 1, 2].map(|i| servers[i].1);
    let peer_v4 = lab.pod("demo/peer").ip(Family::V4);
    let yaml = format!(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-outside-demo, namespace: demo}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{notNamespaces: [demo]}}}}]
    to: [{{operation: {{ports: [\"{}\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-peer-address, namespace: demo}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: [\"{peer_v4}/32\"]}}}}]
    to: [{{operation: {{ports: [\"{}\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all-but-client, namespace: demo}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{notPrincipals: [cluster.local/ns/demo/sa/client]}}}}]
    to: [{{operation: {{ports: [\"{}\"]}}}}]
",
        outside_demo.port(),
        peer_ip.port(),
        not_client.port()
    );
    with_policies(lab, "deny", &yaml, || {
        ensure_refused(lab, "legacy/client", outside_demo, "demo/deny-outside-demo")?;
        ensure_allowed(lab, "demo/client", outside_demo)?;
        ensure_allowed(lab, "demo/peer", outside_demo)?;

        ensure_refused(lab, "demo/peer", peer_ip, "demo/deny-peer-address")?;
        ensure_allowed(lab, "demo/client", peer_ip)?;
        ensure_allowed(lab, "legacy/client", peer_ip)?;

        ensure_refused(lab, "demo/peer", not_client, "demo/deny-all-but-client")?;
        ensure_refused(lab, "legacy/client", not_client, "demo/deny-all-but-client")?;
        ensure_allowed(lab, "demo/client", not_client)
    })
}

/// An AuthorizationPolicy with a label selector binds to the workloads it selects
/// only: DENY-all on `app: peer` refuses everyone at `demo/peer` and nobody at
/// `demo/server`; an ALLOW-nothing policy (empty spec) on `version: v1` refuses all at
/// `demo/server`.
fn authorization_selector_matches_labels(lab: &Lab) -> Result<()> {
    let peer = lab.serve("demo/peer", 0, AppMode::Echo)?;
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let to_peer = lab.pod("demo/peer").addr(Family::V4, peer.port());
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let deny_peer = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-peer, namespace: demo}
spec:
  selector: {matchLabels: {app: peer}}
  action: DENY
  rules: [{}]
";
    with_policies(lab, "deny-peer", deny_peer, || {
        ensure_refused(lab, "demo/client", to_peer, "demo/deny-peer")?;
        ensure_allowed(lab, "demo/client", to_server)
    })?;
    let allow_nothing = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: demo}
spec:
  selector: {matchLabels: {app: server, version: v1}}
";
    with_policies(lab, "allow-nothing", allow_nothing, || {
        ensure_refused(lab, "demo/client", to_server, "demo/allow-nothing")?;
        ensure_allowed(lab, "demo/client", to_peer)
    })
}

/// A workload's own PeerAuthentication (selector) overrides its namespace's: `demo` is
/// STRICT, `demo/server` alone is PERMISSIVE, so the plaintext client reaches the
/// server but not `demo/peer`.
fn workload_overrides_namespace(lab: &Lab) -> Result<()> {
    let peer = lab.serve("demo/peer", 0, AppMode::Echo)?;
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let to_peer = lab.pod("demo/peer").addr(Family::V4, peer.port());
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let yaml = format!(
        "{STRICT}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server-permissive, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: PERMISSIVE}}
"
    );
    with_policies(lab, "workload", &yaml, || {
        ensure_allowed(lab, "legacy/client", to_server)?;
        ensure_refused(
            lab,
            "legacy/client",
            to_peer,
            "PeerAuthentication demo/strict",
        )?;
        ensure_allowed(lab, "demo/client", to_peer)
    })
}

/// A PeerAuthentication without selector in the root namespace (`istio-system`) is the
/// mesh-wide default; a namespace's own policy overrides it.
fn mesh_wide_policy(lab: &Lab) -> Result<()> {
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let mesh_strict = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";
    let demo_permissive = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive, namespace: demo}
spec:
  mtls: {mode: PERMISSIVE}
";
    with_policies(lab, "mesh-strict", mesh_strict, || {
        ensure_refused(
            lab,
            "legacy/client",
            to_server,
            "PeerAuthentication istio-system/default",
        )?;
        ensure_allowed(lab, "demo/client", to_server)?;
        with_policies(lab, "demo-permissive", demo_permissive, || {
            ensure_allowed(lab, "legacy/client", to_server)
        })
    })
}

/// `portLevelMtls` sets the mode of one port of the selected workload: STRICT for
/// `demo/server` except one PERMISSIVE port (a metrics port a plaintext scraper reads).
fn port_level_mtls(lab: &Lab) -> Result<()> {
    let servers = serve_many(lab, "demo/server", 2)?;
    let [open, strict] = [0, 1].map(|i| servers[i].1);
    let yaml = format!(
        "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server-ports, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    {}: {{mode: PERMISSIVE}}
",
        open.port()
    );
    with_policies(lab, "ports", &yaml, || {
        ensure_allowed(lab, "legacy/client", open)?;
        ensure_refused(
            lab,
            "legacy/client",
            strict,
            "PeerAuthentication demo/server-ports",
        )?;
        ensure_allowed(lab, "demo/client", strict)
    })
}

/// A malformed file among good ones: the good files' changes (apply and delete) still
/// take effect; the workload the bad file targets is refused every connection, and the
/// refusal, `warren status`, and `warren_policy_errors` name the file and line.
///
/// `demo` is STRICT (a good file); the bad file is an AuthorizationPolicy for
/// `app=server` in `demo` with `principal:` for `principals:` on line 9.
fn malformed_file_fails_closed_and_freezes_nothing(lab: &Lab) -> Result<()> {
    let server_app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let peer_app = lab.serve("demo/peer", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server_app.port());
    let to_peer = lab.pod("demo/peer").addr(Family::V4, peer_app.port());
    let dir = tempfile::tempdir()?;
    let strict = dir.path().join("e2e-strict.yaml");
    let broken = dir.path().join("e2e-broken.yaml");
    std::fs::write(&strict, STRICT)?;
    std::fs::write(&broken, BROKEN_FOR_SERVER)?;
    let reloaded_everywhere =
        |change: &dyn Fn() -> Result<std::path::PathBuf>| reloaded(lab, change);
    reloaded_everywhere(&|| lab.apply_policy(&strict))?;
    let n2 = lab.agent_log_len("n2");
    // `lab apply` refuses it, as `kubectl apply` would; placed by a tool that does not
    // check, the agents must fail closed on their own.
    ensure!(
        lab.apply_policy(&broken).is_err(),
        "lab apply should refuse a file that does not decode"
    );
    reloaded_everywhere(&|| lab.place_policy_unchecked(&broken))?;
    let result = (|| -> Result<()> {
        let line = wait_for_log(lab, "n2", n2, "does not decode")?;
        ensure!(
            line.contains("e2e-broken.yaml:1")
                && line.contains("e2e-broken.yaml:9")
                && line.contains("principal"),
            "the error should name the file, line and field: {line}"
        );

        // The targeted workload fails closed, even for the allowed identity over mTLS.
        let n2 = lab.agent_log_len("n2");
        let refused = lab.connect("demo/client", to_server, AppMode::Echo, 1024)?;
        ensure!(
            !refused.ok,
            "demo/server is the bad file's target and must be refused: {refused:?}"
        );
        let record = access_record(lab, "n2", n2, "inbound", to_server)?;
        let error = field(&record, "error");
        ensure!(
            error.contains("denied by policy document")
                && error.contains("e2e-broken.yaml:1")
                && error.contains("does not decode"),
            "the refusal should name the bad document: {record}"
        );
        let page = metrics_page(lab, "n2")?;
        ensure!(
            metric_value(&page, r#"warren_policy_errors{kind="AuthorizationPolicy"}"#) == Some(1),
            "warren_policy_errors should count the bad document:\n{page}"
        );
        let (code, status) = crate::observability::warren_status(lab, "n2")?;
        ensure!(
            code == 1
                && status.contains("POLICY DOCUMENT(S) DO NOT DECODE")
                && status.contains("e2e-broken.yaml:1")
                && status.contains("(demo/server)"),
            "warren status on n2 should name the bad document and demo/server (exit {code}):\n{status}"
        );

        // Not its target: demo/peer, STRICT from the good file.
        ensure_ok(
            &lab.connect("demo/client", to_peer, AppMode::Echo, 1024)?,
            "demo/peer (not the bad file's target) over mTLS",
        )?;
        let legacy = lab.connect("legacy/client", to_peer, AppMode::Echo, 1024)?;
        ensure!(
            !legacy.ok,
            "plaintext to demo/peer under STRICT: {legacy:?}"
        );

        // Deleting the good file still applies while the bad one stays.
        reloaded_everywhere(&|| lab.delete_policy(&strict))?;
        ensure_ok(
            &lab.connect("legacy/client", to_peer, AppMode::Echo, 1024)?,
            "plaintext to demo/peer once STRICT is deleted",
        )?;
        let legacy = lab.connect("legacy/client", to_server, AppMode::Echo, 1024)?;
        ensure!(
            !legacy.ok,
            "demo/server stays closed while the bad file is there: {legacy:?}"
        );
        // And applying a good file again applies too.
        reloaded_everywhere(&|| lab.apply_policy(&strict))?;
        let legacy = lab.connect("legacy/client", to_peer, AppMode::Echo, 1024)?;
        ensure!(!legacy.ok, "STRICT applied again: {legacy:?}");
        Ok(())
    })();
    // Fixed (deleted): demo/server is reachable again.
    reloaded_everywhere(&|| lab.delete_policy(&broken)).context("removing the bad file")?;
    let _ = lab.delete_policy(&strict);
    result?;
    ensure_ok(
        &lab.connect("demo/client", to_server, AppMode::Echo, 1024)?,
        "demo/server once the bad file is gone",
    )
}

/// An AuthorizationPolicy for `app=server` in `demo`, `principal` for `principals` on
/// line 9.
const BROKEN_FOR_SERVER: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source:
        principal: [\"cluster.local/ns/demo/sa/client\"]
";

pub(crate) const STRICT: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls:
    mode: STRICT
";

/// Apply `yaml` as the file `e2e-<name>.yaml` (as `cargo xtask lab apply -f` does) and wait until both agents reloaded
/// it; run `body`; afterwards — also when `body` fails — delete it and wait again.
pub(crate) fn with_policies(
    lab: &Lab,
    name: &str,
    yaml: &str,
    body: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("e2e-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    let result = reloaded(lab, &|| lab.apply_policy(&file)).and_then(|()| body());
    reloaded(lab, &|| lab.delete_policy(&file)).context("removing the test's policy")?;
    result
}

/// Make a change to the policy directory and wait until both agents reloaded.
fn reloaded(lab: &Lab, change: &dyn Fn() -> Result<std::path::PathBuf>) -> Result<()> {
    let offsets = [
        ("n1", lab.agent_log_len("n1")),
        ("n2", lab.agent_log_len("n2")),
    ];
    change()?;
    for (node, offset) in offsets {
        wait_for_log(lab, node, offset, "policy reloaded")?;
    }
    Ok(())
}

/// Wait until `node`'s agent logged a line containing `needle` after `offset`.
fn wait_for_log(lab: &Lab, node: &str, offset: u64, needle: &str) -> Result<String> {
    wait_for_log_line(lab, node, offset, &[needle], Duration::from_secs(20))
}

/// Start `count` echo servers on `target`, each on its own port; the servers stop when
/// the returned values are dropped.
fn serve_many(lab: &Lab, target: &str, count: usize) -> Result<Vec<(AppServer, SocketAddr)>> {
    (0..count)
        .map(|_| {
            let server = lab.serve(target, 0, AppMode::Echo)?;
            let addr = lab.pod(target).addr(Family::V4, server.port());
            Ok((server, addr))
        })
        .collect()
}

/// `from` reaches `dst` and the echo comes back whole.
fn ensure_allowed(lab: &Lab, from: &str, dst: SocketAddr) -> Result<()> {
    ensure_ok(
        &lab.connect(from, dst, AppMode::Echo, 1024)?,
        &format!("{from} → {dst} (allowed by policy)"),
    )
}

/// `from` is refused at `dst`, and the destination agent's access log names the policy
/// (`refused_by`: "demo/strict", or with its kind "PeerAuthentication demo/strict").
fn ensure_refused(lab: &Lab, from: &str, dst: SocketAddr, refused_by: &str) -> Result<()> {
    let node = lab
        .pods()
        .iter()
        .find(|pod| pod.ip(Family::V4) == dst.ip() || pod.ip(Family::V6) == dst.ip())
        .map(|pod| pod.node.clone())
        .with_context(|| format!("{dst} is no pod's address"))?;
    let offset = lab.agent_log_len(&node);
    let report = lab.connect(from, dst, AppMode::Echo, 1024)?;
    ensure!(
        !report.ok,
        "{from} → {dst} got through; {refused_by} should refuse it: {report:?}"
    );
    let record = access_record(lab, &node, offset, "inbound", dst)?;
    let error = field(&record, "error");
    ensure!(
        error.contains("denied by") && error.contains(refused_by),
        "the refusal of {from} → {dst} should name {refused_by}: {record}"
    );
    Ok(())
}
