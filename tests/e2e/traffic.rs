//! Pod-to-pod traffic through the agents: across nodes and on one node, both families,
//! big payloads, half-close and server-speaks-first.
use anyhow::{ensure, Result};
use warren_lab::{AppMode, Family, Lab};

use crate::support::{access_record, ensure_ok, field, sample_sum, scrape};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    ("traffic::across_nodes_ipv4_64mib", |lab| {
        carried(lab, "demo/client", "demo/server", Family::V4)
    }),
    ("traffic::across_nodes_ipv6_64mib", |lab| {
        carried(lab, "demo/client", "demo/server", Family::V6)
    }),
    ("traffic::same_node_ipv4_64mib", |lab| {
        carried(lab, "demo/client", "demo/peer", Family::V4)
    }),
    ("traffic::same_node_ipv6_64mib", |lab| {
        carried(lab, "demo/client", "demo/peer", Family::V6)
    }),
    (
        "traffic::service_vip_reaches_a_ready_endpoint_ipv4",
        |lab| service_vip(lab, Family::V4),
    ),
    (
        "traffic::service_vip_reaches_a_ready_endpoint_ipv6",
        |lab| service_vip(lab, Family::V6),
    ),
    (
        "traffic::service_without_ready_endpoints_is_refused",
        service_without_endpoints,
    ),
    ("traffic::half_close_across_nodes", half_close),
    ("traffic::server_speaks_first", server_speaks_first),
];

const BIG: u64 = 64 << 20;

/// 64 MiB from `client` to `server` arrive intact through the mTLS tunnel, and both
/// agents logged the connection with the same id: the client's agent outbound as the
/// client's identity, the server's agent inbound with the identity the handshake proved.
fn carried(lab: &Lab, client: &str, server: &str, family: Family) -> Result<()> {
    let app = lab.serve(server, 0, AppMode::Sha)?;
    let dst = lab.pod(server).addr(family, app.port());
    let (client_node, server_node) = (&lab.pod(client).node, &lab.pod(server).node);
    let (client_off, server_off) = (
        lab.agent_log_len(client_node),
        lab.agent_log_len(server_node),
    );

    let report = lab.connect(client, dst, AppMode::Sha, BIG)?;
    ensure_ok(&report, &format!("{client} → {dst}"))?;
    ensure!(
        report.received == BIG,
        "server saw {} bytes, not {BIG}",
        report.received
    );

    let outbound = access_record(lab, client_node, client_off, "outbound", dst)?;
    let inbound = access_record(lab, server_node, server_off, "inbound", dst)?;
    let client_identity = identity(lab, client);
    let server_identity = identity(lab, server);
    let client_ip = lab.pod(client).ip(family).to_string();
    for record in [&outbound, &inbound] {
        ensure!(
            field(record, "outcome") == "ok",
            "connection not ok: {record}"
        );
        ensure!(record["bytes_sent"] == BIG, "byte count wrong: {record}");
        for (key, expected) in [
            ("security", "mutual_tls"),
            ("src_identity", client_identity.as_str()),
            ("dst_identity", server_identity.as_str()),
            ("src_addr", client_ip.as_str()),
            ("src_workload", client),
        ] {
            ensure!(
                field(record, key) == expected,
                "{key} should be {expected}: {record}"
            );
        }
    }
    ensure!(
        outbound["connection_id"] == inbound["connection_id"]
            && !field(&outbound, "connection_id").is_empty(),
        "both ends should log the same connection id:\n{outbound}\n{inbound}"
    );
    Ok(())
}

/// `demo/client` dials the `demo/server` service's virtual address (assigned to no
/// interface; no kube-proxy in the lab): n1's agent sends the connection to the service's
/// ready endpoint — `demo/server`'s port 9080, through the mTLS tunnel — and names the
/// service in its access record and in `destination_service`.
fn service_vip(lab: &Lab, family: Family) -> Result<()> {
    let service = warren_lab::config::SERVICES[0];
    let app = lab.serve("demo/server", service.target_port, AppMode::Echo)?;
    let vip = service.addr(family);
    let endpoint = lab.pod("demo/server").addr(family, app.port());
    let offset = lab.agent_log_len("n1");
    let report = lab.connect("demo/client", vip, AppMode::Echo, 256 * 1024)?;
    ensure_ok(&report, &format!("demo/client → service {vip}"))?;
    let record = access_record(lab, "n1", offset, "outbound", endpoint)?;
    ensure!(
        field(&record, "dst_service") == "server.demo.svc.cluster.local"
            && field(&record, "dst_workload") == "demo/server"
            && field(&record, "security") == "mutual_tls"
            && field(&record, "outcome") == "ok",
        "n1's record of the connection to {vip}: {record}"
    );
    let opened = sample_sum(
        &scrape(lab, "n1")?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service", "server.demo.svc.cluster.local"),
            ("destination_service_name", "server"),
            ("destination_service_namespace", "demo"),
        ],
    );
    ensure!(
        opened >= 1.0,
        "n1 should count the connection with its service"
    );
    Ok(())
}

/// A service whose selector matches no pod: the connection is closed at once, and the
/// record says why, flagged `UH` (no healthy upstream) as Istio flags it.
fn service_without_endpoints(lab: &Lab) -> Result<()> {
    let vip = warren_lab::config::SERVICES[1].addr(Family::V4);
    let offset = lab.agent_log_len("n1");
    let report = lab.connect("demo/client", vip, AppMode::Echo, 1024)?;
    ensure!(
        !report.ok,
        "a service without endpoints carried data: {report:?}"
    );
    let record = access_record(lab, "n1", offset, "outbound", vip)?;
    ensure!(
        field(&record, "response_flags") == "UH"
            && field(&record, "error").contains("no ready endpoint")
            && field(&record, "dst_service") == "nowhere.demo.svc.cluster.local",
        "n1's record of the connection to {vip}: {record}"
    );
    Ok(())
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>` of a lab pod.
pub fn identity(lab: &Lab, pod: &str) -> String {
    let pod = lab.pod(pod);
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    )
}

/// The client shuts its write side and still reads the whole echo.
fn half_close(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let offset = lab.agent_log_len("n1");
    let report = lab.connect("demo/client", dst, AppMode::Echo, 1 << 20)?;
    ensure_ok(&report, "echo after half-close")?;
    ensure!(
        report.received == 1 << 20,
        "echoed {} bytes",
        report.received
    );
    access_record(lab, "n1", offset, "outbound", dst)?;
    Ok(())
}

/// A server that speaks first (like MySQL or SMTP) is heard before the client writes.
fn server_speaks_first(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Greet)?;
    for family in Family::BOTH {
        let dst = lab.pod("demo/server").addr(family, app.port());
        let offset = lab.agent_log_len("n1");
        let report = lab.connect("demo/client", dst, AppMode::Greet, 4096)?;
        ensure_ok(&report, &format!("greeting from {dst}"))?;
        access_record(lab, "n1", offset, "outbound", dst)?;
    }
    Ok(())
}
