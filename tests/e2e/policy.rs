//! Istio security policy at the destination: the seeds' story. Plaintext clients work
//! under PERMISSIVE (the default, covered by `capture::legacy_client_is_not_captured`);
//! STRICT refuses them; least-privilege authorization refuses everyone not allowed.
//! Policies are Istio YAML applied as `cargo xtask lab apply -f` does; the agents reload
//! them while running.
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, Family, Lab};

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
        "policy::malformed_file_keeps_the_previous_policy",
        malformed_file_keeps_the_previous_policy,
    ),
];

/// `PeerAuthentication` STRICT for namespace `demo`: `legacy/client` is reset and the
/// refusal names the policy; enrolled clients still work; the node's probe still works.
fn strict_namespace(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    with_policies(lab, STRICT, || {
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

/// A malformed policy file is refused with its file and line, and the policy in force
/// (STRICT) stays.
fn malformed_file_keeps_the_previous_policy(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    with_policies(lab, STRICT, || {
        let dir = tempfile::tempdir()?;
        let broken = dir.path().join("broken.yaml");
        // `mod` for `mode`, on line 8: the kind of typo that must not weaken policy.
        std::fs::write(
            &broken,
            STRICT
                .replace("mode: STRICT", "mod: STRICT")
                .replace("name: strict", "name: broken"),
        )?;
        let n2 = lab.agent_log_len("n2");
        lab.apply_policy(&broken)?;
        let line = wait_for_log(lab, "n2", n2, "policy not reloaded")?;
        let result = (|| -> Result<()> {
            ensure!(
                line.contains("broken.yaml:8"),
                "the error should name the file and line: {line}"
            );
            ensure!(
                line.contains("mod"),
                "the error should name the unknown field: {line}"
            );
            let legacy = lab.connect("legacy/client", dst, AppMode::Echo, 1024)?;
            ensure!(
                !legacy.ok,
                "STRICT was lost when a bad file arrived: {legacy:?}"
            );
            Ok(())
        })();
        lab.delete_policy(&broken)?;
        wait_for_log(lab, "n2", n2, "policy reloaded")?;
        result
    })
}

const STRICT: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls:
    mode: STRICT
";

/// Apply `yaml` (as `cargo xtask lab apply -f` does) and wait until both agents reloaded
/// it; run `body`; afterwards — also when `body` fails — delete it and wait again.
fn with_policies(lab: &Lab, yaml: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("e2e.yaml");
    std::fs::write(&file, yaml)?;
    let reloaded = |change: &dyn Fn() -> Result<std::path::PathBuf>| -> Result<()> {
        let offsets = [
            ("n1", lab.agent_log_len("n1")),
            ("n2", lab.agent_log_len("n2")),
        ];
        change()?;
        for (node, offset) in offsets {
            wait_for_log(lab, node, offset, "policy reloaded")?;
        }
        Ok(())
    };
    let result = reloaded(&|| lab.apply_policy(&file)).and_then(|()| body());
    reloaded(&|| lab.delete_policy(&file)).context("removing the test's policy")?;
    result
}

/// Wait until `node`'s agent logged a line containing `needle` after `offset`.
fn wait_for_log(lab: &Lab, node: &str, offset: u64, needle: &str) -> Result<String> {
    wait_for_log_line(lab, node, offset, &[needle], Duration::from_secs(20))
}
