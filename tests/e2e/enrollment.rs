//! Pods join and leave the mesh while the agents run, as when a namespace is labelled or
//! unlabelled: they are captured and released within seconds, and the open connections
//! of other pods are not disturbed.
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, ConnectOptions, Family, Lab, LoadOptions};

use crate::support::{
    access_record, access_record_where, ensure_ok, field, wait_for_log_line, RedirectState,
};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "enrollment::namespace_joins_and_leaves_while_other_connections_run",
        namespace_joins_and_leaves,
    ),
    (
        "enrollment::pod_that_changes_identity_is_served_as_the_new_one_at_once",
        pod_changes_identity,
    ),
];

/// How long `demo/client`'s stream runs: across both changes.
const STREAM: Duration = Duration::from_secs(12);
/// How long an agent may take to notice a config change and act on it.
const RECONCILE: Duration = Duration::from_secs(20);

fn namespace_joins_and_leaves(lab: &Lab) -> Result<()> {
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let before = RedirectState::of(lab, "n1")?;
    let n1_start = lab.agent_log_len("n1");
    let stream = lab.start_connect(
        "demo/client",
        &ConnectOptions::tcp(to_server, AppMode::Echo, 1 << 20),
        &LoadOptions {
            duration: Some(STREAM),
            ..LoadOptions::default()
        },
    )?;
    let changes = join_and_leave(lab, to_server, &before);
    // Whatever happened, `legacy` leaves the mesh again (a no-op when it already has).
    let restored = lab.set_namespace_enrolled("legacy", false);
    let report = stream.wait()?;
    changes?;
    restored?;
    ensure_ok(&report, "demo/client's stream while legacy joined and left")?;

    // The stream was still open when legacy/client had left: its access record (written
    // when it closed, which may be a moment after the client saw the end) comes after the
    // release in n1's log.
    access_record_where(lab, "n1", n1_start, to_server, "outbound", |r| {
        r["src_workload"] == "demo/client"
    })?;
    let log = lab.agent_log_since("n1", n1_start)?;
    let released = log
        .find("pod left the mesh")
        .context("n1 never logged the release")?;
    let needle = format!("\"dst_addr\":\"{to_server}\"");
    let closed = log
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("\"src_workload\":\"demo/client\""))
        .find_map(|l| log.find(l))
        .context("n1 logged no access record for demo/client's stream")?;
    ensure!(
        released < closed,
        "demo/client's stream ended before legacy/client left the mesh; it should have run across both changes (make STREAM longer)"
    );
    Ok(())
}

fn join_and_leave(
    lab: &Lab,
    to_server: std::net::SocketAddr,
    before: &RedirectState,
) -> Result<()> {
    // Join.
    let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
    ensure!(
        lab.set_namespace_enrolled("legacy", true)?,
        "legacy was already in the mesh"
    );
    wait_for_log_line(
        lab,
        "n1",
        n1,
        &["pod joined the mesh", "legacy/client"],
        RECONCILE,
    )?;
    wait_for_log_line(lab, "n2", n2, &["config reloaded"], RECONCILE)?;
    let joined = RedirectState::of(lab, "n1")?;
    ensure!(
        joined.pins.len() > before.pins.len() || joined.rules.len() > before.rules.len(),
        "nothing was added to capture legacy/client: {}",
        before.diff(&joined)
    );
    let n2 = lab.agent_log_len("n2");
    ensure_ok(
        &lab.connect("legacy/client", to_server, AppMode::Echo, 4096)?,
        "legacy/client → demo/server once in the mesh",
    )?;
    let record = access_record(lab, "n2", n2, "inbound", to_server)?;
    ensure!(
        field(&record, "security") == "mutual_tls"
            && field(&record, "src_identity") == "spiffe://cluster.local/ns/legacy/sa/default",
        "legacy/client should now arrive through the tunnel with its identity: {record}"
    );

    // Leave.
    let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
    ensure!(lab.set_namespace_enrolled("legacy", false)?);
    wait_for_log_line(
        lab,
        "n1",
        n1,
        &["pod left the mesh", "legacy/client"],
        RECONCILE,
    )?;
    wait_for_log_line(lab, "n2", n2, &["config reloaded"], RECONCILE)?;
    let left = RedirectState::of(lab, "n1")?;
    ensure!(
        left.pins == before.pins && left.rules == before.rules,
        "legacy/client's redirection was not removed: {}",
        before.diff(&left)
    );
    let n2 = lab.agent_log_len("n2");
    ensure_ok(
        &lab.connect("legacy/client", to_server, AppMode::Echo, 4096)?,
        "legacy/client → demo/server after leaving the mesh",
    )?;
    let record = access_record(lab, "n2", n2, "inbound", to_server)?;
    ensure!(
        field(&record, "security") == "none" && field(&record, "src_identity").is_empty(),
        "legacy/client should arrive directly, in plain text, again: {record}"
    );
    Ok(())
}

/// A pod recreated under the same name with another service account (a StatefulSet pod
/// whose template changed): n2 releases and enrolls it in one reconcile — its ports are
/// free again before it binds them — and drains the HBONE connection n1 had pooled to
/// the old one, so every new connection is made to, and checked against, the new
/// identity.
fn pod_changes_identity(lab: &Lab) -> Result<()> {
    let config = lab.config_path();
    let original = std::fs::read_to_string(&config)?;
    ensure!(
        original.matches("serviceAccount: server\n").count() == 1,
        "expected one demo/server in lab.yaml:\n{original}"
    );
    let renamed = original.replacen("serviceAccount: server\n", "serviceAccount: server-v2\n", 1);
    let n2 = lab.agent_log_len("n2");
    let tmp = config.with_extension("e2e.tmp");
    std::fs::write(&tmp, renamed)?;
    std::fs::rename(&tmp, &config)?;
    let changed = (|| -> Result<()> {
        wait_for_log_line(
            lab,
            "n2",
            n2,
            &["pod joined the mesh", "demo/server"],
            RECONCILE,
        )?;
        let log = lab.agent_log_since("n2", n2)?;
        ensure!(
            !log.contains("cannot enroll"),
            "n2 should enroll demo/server again at once:\n{log}"
        );
        let server = lab.serve("demo/server", 0, AppMode::Echo)?;
        let dst = lab.pod("demo/server").addr(Family::V4, server.port());
        // n1 reloads too; until it has, it expects the old identity and refuses.
        let deadline = std::time::Instant::now() + RECONCILE;
        loop {
            let n1 = lab.agent_log_len("n1");
            let report = lab.connect("demo/client", dst, AppMode::Echo, 1024)?;
            if report.ok {
                let record = access_record(lab, "n1", n1, "outbound", dst)?;
                ensure!(
                    field(&record, "dst_identity") == "spiffe://cluster.local/ns/demo/sa/server-v2",
                    "demo/server should be reached as server-v2: {record}"
                );
                return Ok(());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "demo/client could not reach demo/server as server-v2: {}",
                report.detail
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    })();
    let n2 = lab.agent_log_len("n2");
    std::fs::write(&tmp, &original)?;
    std::fs::rename(&tmp, &config)?;
    wait_for_log_line(
        lab,
        "n2",
        n2,
        &["pod joined the mesh", "demo/server"],
        RECONCILE,
    )
    .context("restoring demo/server's service account")?;
    changed
}
