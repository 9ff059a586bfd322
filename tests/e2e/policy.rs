//! Istio security policy at the destination: the seeds' story. Plaintext clients work
//! under PERMISSIVE (the default, covered by `capture::legacy_client_is_not_captured`);
//! STRICT refuses them; least-privilege authorization refuses everyone not allowed.
//! Policies are Istio YAML in the lab's policy directory, read by the agents at start-up.
use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, Family, Lab, Signal};

use crate::support::{access_record, ensure_ok, field, metric_value, metrics_page};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "policy::strict_namespace_refuses_plaintext",
        strict_namespace,
    ),
    (
        "policy::allow_only_one_principal_on_one_port",
        allow_only_client,
    ),
];

/// `PeerAuthentication` STRICT for namespace `demo`: `legacy/client` is reset and the
/// refusal names the policy; enrolled clients still work; the node's probe still works.
fn strict_namespace(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let yaml = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls:
    mode: STRICT
";
    with_policies(lab, yaml, || {
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
    with_policies(lab, &yaml, || {
        ensure_ok(
            &lab.connect("demo/client", to_allowed, AppMode::Echo, 1024)?,
            "the allowed principal on the allowed port",
        )?;
        for (from, dst, what) in [
            ("demo/peer", to_allowed, "another principal"),
            ("demo/client", to_other, "another port"),
            ("legacy/client", to_allowed, "a plaintext client"),
        ] {
            let n2 = lab.agent_log_len("n2");
            let report = lab.connect(from, dst, AppMode::Echo, 1024)?;
            ensure!(
                !report.ok,
                "{what} ({from} → {dst}) got through: {report:?}"
            );
            let record = access_record(lab, "n2", n2, "inbound", dst)?;
            ensure!(
                field(&record, "error").contains("denied by AuthorizationPolicy demo/client-only"),
                "the refusal of {what} should name the policy: {record}"
            );
        }
        Ok(())
    })
}

/// Run `body` with `yaml` in the lab's policy directory, read by freshly restarted
/// agents; afterwards — also when `body` fails — the file goes and the agents restart
/// without it.
fn with_policies(lab: &Lab, yaml: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    let file = lab.policy_dir().join("e2e.yaml");
    let restart = || -> Result<()> {
        for node in ["n1", "n2"] {
            if lab.agent_pid(node).is_some() {
                lab.kill_agent(node, Signal::SIGTERM)?;
            }
            lab.start_agent(node)
                .with_context(|| format!("restarting {node}'s agent"))?;
        }
        Ok(())
    };
    let result = std::fs::write(&file, yaml)
        .with_context(|| format!("writing {}", file.display()))
        .and_then(|()| restart())
        .and_then(|()| body());
    let _ = std::fs::remove_file(&file);
    restart().context("restarting the agents without the test's policy")?;
    result
}
