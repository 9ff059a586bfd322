//! What operators coming from Istio read: Istio's TCP metrics, with Istio's names and
//! labels, counting a known set of connections — mTLS, plain text and refused — on the
//! agent of each end, on a page a Prometheus parser accepts; the admin endpoints
//! (`/config_dump`, `/logging`), readiness and `warren status`.
use anyhow::{ensure, Context as _, Result};
use prometheus_parse::Scrape;
use warren_lab::{AppMode, Family, Lab};

use crate::{
    policy::{with_policies, STRICT},
    support::{access_record, ensure_ok, http, sample_sum, scrape, wait_for_log_line},
};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "observability::istio_tcp_metrics_count_connections",
        istio_tcp_metrics,
    ),
    (
        "observability::admin_endpoints_and_readiness",
        admin_and_readiness,
    ),
    (
        "observability::warren_verify_on_the_wire",
        verify_on_the_wire,
    ),
];

const BYTES: u64 = 3000;

fn istio_tcp_metrics(lab: &Lab) -> Result<()> {
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, server.port());
    let before = Pages::scrape(lab)?;

    // mTLS: demo/client → demo/server, reported by both agents.
    connect(lab, "demo/client", dst, true)?;
    // Plain text: legacy/client (not in the mesh) → demo/server, reported by n2 only.
    connect(lab, "legacy/client", dst, true)?;
    // Refused: the same under STRICT.
    with_policies(lab, "strict", STRICT, || {
        connect(lab, "legacy/client", dst, false)
    })?;
    let after = Pages::scrape(lab)?;

    // `warren status` on n2 names the refusal and the policy.
    let (code, status) = warren_status(lab, "n2")?;
    let legacy_ip = lab.pod("legacy/client").ip(Family::V4).to_string();
    ensure!(
        code == 0
            && status.lines().any(|l| l.contains(&format!("{legacy_ip}:"))
                && l.contains(&format!(
                    "-> {dst} (demo/server) refused by PeerAuthentication demo/strict"
                ))),
        "warren status on n2 (exit {code}) should list legacy/client's refusal:\n{status}"
    );

    let mtls = [
        ("source_workload", "client"),
        ("source_workload_namespace", "demo"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client",
        ),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "demo"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server",
        ),
        ("destination_app", "server"),
        ("destination_version", "v1"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
        ("request_protocol", "tcp"),
    ];
    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let labels = with(&mtls, ("reporter", reporter));
        for (metric, expected) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_received_bytes_total", BYTES as f64),
            ("istio_tcp_sent_bytes_total", BYTES as f64),
        ] {
            let delta = after.delta(&before, node, metric, &labels);
            ensure!(
                delta == expected,
                "{node}: {metric} for the mTLS connection grew by {delta}, expected {expected} ({labels:?})"
            );
        }
    }

    let plain = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "legacy"),
        ("source_principal", "unknown"),
        ("destination_workload", "server"),
        ("connection_security_policy", "none"),
    ];
    // As ztunnel does: a connection is counted opened when it arrives (no flags yet),
    // and closed with what happened to it.
    let accepted = with(&plain, ("response_flags", "-"));
    let refused = with(&plain, ("response_flags", "DENY"));
    for (metric, labels, expected) in [
        ("istio_tcp_connections_opened_total", &accepted, 2.0),
        ("istio_tcp_connections_opened_total", &refused, 0.0),
        ("istio_tcp_connections_closed_total", &accepted, 1.0),
        ("istio_tcp_connections_closed_total", &refused, 1.0),
    ] {
        let delta = after.delta(&before, "n2", metric, labels);
        ensure!(
            delta == expected,
            "n2: {metric} for plain-text connections grew by {delta}, expected {expected} ({labels:?})"
        );
    }
    ensure!(
        after.delta(&before, "n2", "istio_tcp_received_bytes_total", &accepted) == BYTES as f64,
        "n2 should count the plain-text request bytes"
    );
    let n1_legacy = after.delta(
        &before,
        "n1",
        "istio_tcp_connections_closed_total",
        &[("source_workload_namespace", "legacy")],
    );
    ensure!(
        n1_legacy == 0.0,
        "n1 does not carry legacy/client's connections, yet counted {n1_legacy}"
    );

    // warren's own: certificate expiry per identity of the node, in the future.
    let expires = after.value(
        "n1",
        "warren_certificate_expiration_timestamp_seconds",
        &[("identity", "spiffe://cluster.local/ns/demo/sa/client")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    ensure!(
        expires > now,
        "n1's certificate expiry for demo/client should be in the future: {expires} (now {now})"
    );
    // The mode in use.
    let mode = lab.redirect().context("the lab runs agents")?.to_string();
    for node in ["n1", "n2"] {
        ensure!(
            after.value(node, "warren_redirect_mode", &[("mode", mode.as_str())]) == 1.0,
            "{node} should report warren_redirect_mode{{mode=\"{mode}\"}} 1"
        );
    }
    // The series caps: label sets in use are counted, and these connections are far
    // from the caps (nothing folded).
    for node in ["n1", "n2"] {
        let series = after.value(node, "warren_metric_series", &[]);
        let dropped = after.delta(&before, node, "warren_metric_series_dropped_total", &[]);
        let folded = after.delta(
            &before,
            node,
            "warren_metric_baggage_sources_folded_total",
            &[],
        );
        ensure!(
            series >= 1.0 && dropped == 0.0 && folded == 0.0,
            "{node}: warren_metric_series {series} (expected at least 1), \
             warren_metric_series_dropped_total +{dropped} and \
             warren_metric_baggage_sources_folded_total +{folded} (expected +0)"
        );
    }
    Ok(())
}

/// One echo exchange of BYTES from `from` to `dst`; waits until the destination's agent
/// logged it (so its metrics are updated). `ok`: whether it must succeed.
fn connect(lab: &Lab, from: &str, dst: std::net::SocketAddr, ok: bool) -> Result<()> {
    let offset = lab.agent_log_len("n2");
    let report = lab.connect(from, dst, AppMode::Echo, BYTES)?;
    if ok {
        ensure_ok(&report, &format!("{from} → {dst}"))?;
    } else {
        ensure!(!report.ok, "{from} → {dst} should be refused: {report:?}");
    }
    access_record(lab, "n2", offset, "inbound", dst).map(drop)
}

fn with<'a>(labels: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(extra);
    all
}

/// Both agents' metrics pages, parsed.
struct Pages {
    n1: Scrape,
    n2: Scrape,
}

impl Pages {
    fn scrape(lab: &Lab) -> Result<Self> {
        Ok(Self {
            n1: scrape(lab, "n1")?,
            n2: scrape(lab, "n2")?,
        })
    }

    /// The sum of `metric`'s samples on `node` whose labels include `labels`.
    fn value(&self, node: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
        sample_sum(
            if node == "n1" { &self.n1 } else { &self.n2 },
            metric,
            labels,
        )
    }

    fn delta(&self, before: &Pages, node: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(node, metric, labels) - before.value(node, metric, labels)
    }
}

/// The admin port (node loopback) shows what the agent acts on, without keys, and
/// changes the log filter; the readiness port says ready only while every pod of the
/// node that should be captured is.
fn admin_and_readiness(lab: &Lab) -> Result<()> {
    let ready = http(lab, "n1", "GET", READY_ADDR, "/healthz/ready")?;
    ensure!(
        ready.starts_with("HTTP/1.1 200"),
        "n1 should be ready:\n{ready}"
    );

    let dump = http(lab, "n1", "GET", ADMIN_ADDR, "/config_dump")?;
    ensure!(
        dump.starts_with("HTTP/1.1 200"),
        "config_dump failed:\n{dump}"
    );
    ensure!(
        !dump.contains("PRIVATE KEY"),
        "config_dump must never show a private key"
    );
    let body = dump.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: serde_json::Value = serde_json::from_str(body).context("config_dump is not JSON")?;
    let mode = lab.redirect().context("the lab runs agents")?.to_string();
    ensure!(
        json["node"] == "n1" && json["redirect_mode"] == mode.as_str(),
        "{json}"
    );
    ensure!(
        json["enrolled_pods"] == serde_json::json!(["demo/client", "demo/peer"]),
        "enrolled pods: {}",
        json["enrolled_pods"]
    );
    let legacy = json["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["namespace"] == "legacy")
        .context("config_dump lists no legacy workload")?;
    ensure!(legacy["in_mesh"] == false, "{legacy}");
    let certificates = json["certificates"].as_array().context("no certificates")?;
    ensure!(
        certificates.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && c["serial"].as_str().is_some_and(|s| !s.is_empty())
        ),
        "config_dump should describe demo/client's certificate: {certificates:?}"
    );

    // The same, at a glance.
    let (code, status) = warren_status(lab, "n1")?;
    ensure!(
        code == 0
            && status.contains(&format!("node n1: redirect mode {mode}"))
            && status.contains("ready: yes")
            && status.contains("enrolled pods (2):\n  demo/client\n  demo/peer\n")
            && status.contains("spiffe://cluster.local/ns/demo/sa/client: ok, expires in"),
        "warren status on n1 (exit {code}):\n{status}"
    );

    // Logging at run time.
    let set = http(lab, "n1", "POST", ADMIN_ADDR, "/logging?level=debug")?;
    ensure!(set.starts_with("HTTP/1.1 200"), "{set}");
    let now = http(lab, "n1", "GET", ADMIN_ADDR, "/logging")?;
    ensure!(now.ends_with("debug\n"), "{now}");
    let bad = http(lab, "n1", "POST", ADMIN_ADDR, "/logging?level=warren=[")?;
    ensure!(
        bad.starts_with("HTTP/1.1 400"),
        "a bad filter should be refused: {bad}"
    );
    http(lab, "n1", "POST", ADMIN_ADDR, "/logging?level=info")?;

    // A pod of n1 that cannot be captured (its netns does not exist) makes n1 unready,
    // naming it; once it is gone from the config, n1 is ready again.
    let config = lab.config_path();
    let original = std::fs::read_to_string(&config)?;
    let ghost = format!(
        "{original}- name: ghost\n  namespace: demo\n  serviceAccount: ghost\n  node: n1\n  ips: [\"10.77.1.99\"]\n  netns: /run/netns/warren-e2e-no-such-netns\n"
    );
    let offset = lab.agent_log_len("n1");
    write_atomically(&config, &ghost)?;
    let unready = (|| -> Result<()> {
        wait_for_log_line(
            lab,
            "n1",
            offset,
            &["cannot enroll the pod", "demo/ghost"],
            WAIT,
        )?;
        let answer = http(lab, "n1", "GET", READY_ADDR, "/healthz/ready")?;
        ensure!(
            answer.starts_with("HTTP/1.1 503") && answer.contains("demo/ghost"),
            "n1 should be unready because of demo/ghost:\n{answer}"
        );
        let (code, status) = warren_status(lab, "n1")?;
        ensure!(
            code == 1 && status.contains("ready: NO") && status.contains("demo/ghost"),
            "warren status should say n1 is not ready because of demo/ghost (exit {code}):\n{status}"
        );
        Ok(())
    })();
    write_atomically(&config, &original)?;
    unready?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answer = http(lab, "n1", "GET", READY_ADDR, "/healthz/ready")?;
        if answer.starts_with("HTTP/1.1 200") {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "n1 did not get ready again once demo/ghost was gone:\n{answer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

const ADMIN_ADDR: &str = "127.0.0.1:15000";
const READY_ADDR: &str = "127.0.0.1:15021";
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Replace `path`'s contents in one rename, so the agent never reads half a file.
fn write_atomically(path: &std::path::Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("e2e.tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `warren status` run on `node`: its exit status and what it printed.
pub(crate) fn warren_status(lab: &Lab, node: &str) -> Result<(i32, String)> {
    let warren = warren_lab::cargo::build_bin("warren", "warren")?;
    let out = lab
        .command(&format!("node/{node}"), warren)?
        .args(["status", "--admin-addr", ADMIN_ADDR])
        .output()
        .context("running warren status")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `warren verify` on the bridge between the nodes (what `cargo xtask lab verify` runs):
/// with the enrolled pods as the mesh, the tunnelled traffic is TLS and legacy/client's
/// clear text is reported but not flagged (exit 0); counting legacy's addresses as mesh
/// too, the same clear text is flagged (exit 1).
fn verify_on_the_wire(lab: &Lab) -> Result<()> {
    const CAPTURE: std::time::Duration = std::time::Duration::from_secs(4);
    let ip = |pod: &str| lab.pod(pod).ip(Family::V4).to_string();
    let (client, server, legacy) = (ip("demo/client"), ip("demo/server"), ip("legacy/client"));
    let row = |report: &str, from: &str| -> Option<String> {
        report
            .lines()
            .find(|l| l.contains(&format!("{from} ↔ {server} ")))
            .map(str::to_owned)
    };

    let enrolled = lab.mesh_cidrs();
    let run = lab.verify_wire(CAPTURE, &enrolled, || lab.wire_traffic())?;
    let report = &run.report;
    ensure!(
        run.exit_code == Some(0),
        "warren verify with the enrolled pods as the mesh should exit 0, exited {:?}:\n{report}{}",
        run.exit_code,
        run.log
    );
    let tunnel = row(report, &client)
        .with_context(|| format!("no row for {client} ↔ {server}:\n{report}"))?;
    ensure!(
        tunnel.contains("TLS") && !tunnel.contains('!'),
        "demo/client ↔ demo/server should be TLS: {tunnel}\n{report}"
    );
    let control = row(report, &legacy)
        .with_context(|| format!("no row for {legacy} ↔ {server}:\n{report}"))?;
    ensure!(
        control.contains("CLEAR TEXT") && !control.contains('!'),
        "legacy/client's clear text should be shown, not flagged: {control}\n{report}"
    );

    let run = lab.verify_wire(CAPTURE, &["10.77.0.0/16".to_owned()], || lab.wire_traffic())?;
    let report = &run.report;
    ensure!(
        run.exit_code == Some(1),
        "with legacy counted as mesh, warren verify should exit 1, exited {:?}:\n{report}{}",
        run.exit_code,
        run.log
    );
    let control = row(report, &legacy)
        .with_context(|| format!("no row for {legacy} ↔ {server}:\n{report}"))?;
    ensure!(
        control.contains("CLEAR TEXT") && control.contains("! both ends in the mesh"),
        "legacy/client's clear text should be flagged: {control}\n{report}"
    );
    Ok(())
}
