//! Pod-to-pod traffic through the agents: across nodes and on one node, both families,
//! big payloads, half-close and server-speaks-first.
use anyhow::{ensure, Result};
use warren_lab::{AppMode, Family, Lab};

use crate::support::{access_line, ensure_ok};

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

/// 64 MiB from `client` to `server` arrive intact, and both agents logged the connection:
/// the client's agent outbound, the server's agent inbound, with the same source.
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

    let outbound = access_line(lab, client_node, client_off, "outbound", dst)?;
    let inbound = access_line(lab, server_node, server_off, "inbound", dst)?;
    for line in [&outbound, &inbound] {
        ensure!(line.contains("outcome=\"ok\""), "connection not ok: {line}");
        ensure!(
            line.contains(&format!("bytes_sent={BIG}")),
            "byte count wrong: {line}"
        );
    }
    let src = field(&outbound, "src").unwrap_or_default();
    let client_ip = lab.pod(client).ip(family).to_string();
    ensure!(
        src.contains(&client_ip),
        "outbound connection did not leave with the pod's address {client_ip}: {outbound}"
    );
    ensure!(
        field(&inbound, "src") == Some(src),
        "both ends should log the same source ({src}):\n{outbound}\n{inbound}"
    );
    Ok(())
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
    access_line(lab, "n1", offset, "outbound", dst)?;
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
        access_line(lab, "n1", offset, "outbound", dst)?;
    }
    Ok(())
}

/// `key=value` from an access-log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}
