//! Pod-to-pod traffic through the agents: across nodes and on one node, both families,
//! big payloads, half-close and server-speaks-first.
use anyhow::{ensure, Result};
use warren_lab::{AppMode, Family, Lab};

use crate::support::{access_record, ensure_ok, field};

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
