//! The tunnel under load and over time: many connections share a few pooled HBONE
//! connections, and a long stream outlives several certificate renewals.
use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use warren_lab::{AppMode, ConnectOptions, Family, Lab, LoadOptions};

use crate::support::{access_record, access_records_for, ensure_ok, field};
use crate::traffic::identity;

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    ("tunnel::pooled_200_concurrent", pooled_200_concurrent),
    (
        "tunnel::long_stream_survives_certificate_renewals",
        long_stream_survives_certificate_renewals,
    ),
];

/// The agent's HBONE tunnel port.
const TUNNEL_PORT: u16 = 15008;
/// Streams one pooled HBONE connection carries before the agent dials another (the
/// agent's `PoolConfig`, as ztunnel).
const STREAMS_PER_CONNECTION: usize = 100;
/// Generous: everything below is waited for, never timed.
const DEADLINE: Duration = Duration::from_secs(120);

/// 200 connections from `demo/client` to `demo/server`, all open at once, ride two
/// pooled HBONE connections (100 streams each), which `ss` shows in the client's netns
/// where n1's agent dialled them; every connection's own bytes come back intact, and
/// both agents log each one, tunnelled, with the same 200 distinct connection ids.
fn pooled_200_concurrent(lab: &Lab) -> Result<()> {
    const PARALLEL: usize = 200;
    const BYTES: u64 = 64 * 1024;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let server_ip = lab.pod("demo/server").ip(Family::V4);
    let dst = SocketAddr::new(server_ip, app.port());
    let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));

    let mut client = lab.start_connect(
        "demo/client",
        &echo_options(dst, BYTES),
        &LoadOptions {
            parallel: PARALLEL,
            hold: true,
            duration: None,
        },
    )?;
    // The client holds its connections idle once connected; the server accepts each
    // only when n2's agent has its CONNECT stream, so 200 accepts mean 200 streams
    // open at once.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let accepted = app
            .log()
            .iter()
            .filter(|l| l.starts_with("accept "))
            .count();
        if accepted >= PARALLEL {
            break;
        }
        if client.exited()? {
            bail!(
                "lab-app connect ended while it should hold its connections: {:?}",
                client.wait()?
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the server accepted {accepted} of {PARALLEL} connections within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tunnels = tunnel_connections(lab, "demo/client", server_ip)?;
    let pooled = metric(lab, "n1", "warren_hbone_pool_connections")?;
    let report = client.wait()?;
    ensure_ok(
        &report,
        &format!("{PARALLEL} parallel connections to {dst}"),
    )?;
    ensure!(
        report.sent == PARALLEL as u64 * BYTES && report.received == report.sent,
        "{PARALLEL} × {BYTES} bytes should have gone both ways: {report:?}"
    );
    // Two are needed for 200 streams; a third may be one an earlier scenario left idle
    // that is being closed (GOAWAY) just now.
    let needed = PARALLEL.div_ceil(STREAMS_PER_CONNECTION);
    ensure!(
        (needed..=needed + 1).contains(&tunnels.len()),
        "with {PARALLEL} connections open, n1's agent should hold {needed} (at most {}) tunnel connections to {server_ip}:{TUNNEL_PORT} in demo/client's netns, not {}:\n{}",
        needed + 1,
        tunnels.len(),
        tunnels.join("\n")
    );
    // The agent's own counter agrees: at least those, plus any idle pooled connection
    // to another destination left by an earlier scenario.
    ensure!(
        pooled >= needed as u64,
        "warren_hbone_pool_connections on n1 is {pooled} while {needed} tunnel connections were open"
    );

    let outbound = wait_for_records(lab, "n1", n1, dst, "outbound", PARALLEL)?;
    let inbound = wait_for_records(lab, "n2", n2, dst, "inbound", PARALLEL)?;
    for record in outbound.iter().chain(&inbound) {
        ensure!(
            field(record, "security") == "mutual_tls" && field(record, "outcome") == "ok",
            "every connection should be tunnelled and ok: {record}"
        );
        ensure!(
            record["bytes_sent"] == BYTES && record["bytes_received"] == BYTES,
            "each connection carried {BYTES} bytes each way: {record}"
        );
    }
    let ids = |records: &[Value]| -> BTreeSet<String> {
        records
            .iter()
            .map(|r| field(r, "connection_id").to_owned())
            .filter(|id| !id.is_empty())
            .collect()
    };
    let (outbound_ids, inbound_ids) = (ids(&outbound), ids(&inbound));
    ensure!(
        outbound_ids.len() == PARALLEL,
        "n1 logged {} distinct connection ids for {PARALLEL} connections",
        outbound_ids.len()
    );
    ensure!(
        outbound_ids == inbound_ids,
        "n1 and n2 should log the same connection ids; only on n1: {:?}; only on n2: {:?}",
        outbound_ids.difference(&inbound_ids).collect::<Vec<_>>(),
        inbound_ids.difference(&outbound_ids).collect::<Vec<_>>()
    );
    Ok(())
}

/// A 12 s echo stream from `demo/client` to `demo/server` keeps flowing, every byte
/// checked, while both agents renew their certificates several times (the suite runs
/// with 6 s certificates); afterwards a new connection works, and `openssl s_client`
/// from `outside` (not captured) is offered a different server certificate than
/// before the stream — one that n2's agent logged issuing meanwhile, that chains to the
/// mesh's root and is valid now.
fn long_stream_survives_certificate_renewals(lab: &Lab) -> Result<()> {
    const STREAM: Duration = Duration::from_secs(12);
    const BYTES: u64 = 1 << 20;
    // Renewal at half-life: with at most STREAM / 2 of lifetime there are four
    // renewals or so during the stream, and two are asked for.
    let lifetime = lab.cert_lifetime().context(
        "the lab runs with the agent's default certificate lifetime (24 h): the e2e harness must bring it up with a short one",
    )?;
    ensure!(
        lifetime <= STREAM / 2,
        "the lab's certificate lifetime {lifetime:?} is too long to see renewals during a {STREAM:?} stream"
    );
    let client_identity = identity(lab, "demo/client");
    let server_identity = identity(lab, "demo/server");
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());

    let before = offered_serial(lab, &server_identity)?;
    let n2_so_far = lab.agent_log_since("n2", 0)?;
    ensure!(
        issued_serials(&n2_so_far, &server_identity).contains(&before),
        "s_client was offered serial {before}, which n2's agent never logged issuing for {server_identity}"
    );

    let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
    let report = lab.connect_load(
        "demo/client",
        &echo_options(dst, BYTES),
        &LoadOptions {
            duration: Some(STREAM),
            ..LoadOptions::default()
        },
    )?;
    ensure_ok(&report, &format!("a {STREAM:?} echo stream to {dst}"))?;
    ensure!(
        report.received == BYTES,
        "echoed {} of {BYTES} bytes",
        report.received
    );
    let outbound = access_record(lab, "n1", n1, "outbound", dst)?;
    let inbound = access_record(lab, "n2", n2, "inbound", dst)?;
    for record in [&outbound, &inbound] {
        ensure!(
            field(record, "security") == "mutual_tls"
                && field(record, "outcome") == "ok"
                && record["bytes_sent"] == BYTES,
            "the stream should have been tunnelled whole: {record}"
        );
    }
    // Renewals logged after the stream started and before its access record (written
    // when it closed) happened while it was open.
    for (node, who, record) in [
        ("n1", &client_identity, &outbound),
        ("n2", &server_identity, &inbound),
    ] {
        let log = lab.agent_log_since(node, if node == "n1" { n1 } else { n2 })?;
        let id = field(record, "connection_id");
        let during = log
            .find(&format!("\"connection_id\":\"{id}\""))
            .map_or(log.as_str(), |end| &log[..end]);
        let renewals = issued_serials(during, who);
        ensure!(
            renewals.len() >= 2,
            "{node}'s agent should have issued at least 2 certificates for {who} while the stream was open (lifetime {lifetime:?}); it logged {}:\n{during}",
            renewals.len()
        );
    }

    let report = lab.connect("demo/client", dst, AppMode::Echo, 64 * 1024)?;
    ensure_ok(
        &report,
        &format!("a new connection to {dst} after the renewals"),
    )?;
    let after = offered_serial(lab, &server_identity)?;
    let renewed = issued_serials(&lab.agent_log_since("n2", n2)?, &server_identity);
    ensure!(
        after != before,
        "s_client was offered serial {after} again after the renewals"
    );
    ensure!(
        renewed.contains(&after),
        "s_client was offered serial {after}, which is not one n2's agent issued since the stream started: {renewed:?}"
    );
    Ok(())
}

fn echo_options(addr: SocketAddr, bytes: u64) -> ConnectOptions {
    ConnectOptions::tcp(addr, AppMode::Echo, bytes)
}

/// The value of a metric series on `node`'s agent.
fn metric(lab: &Lab, node: &str, series: &str) -> Result<u64> {
    let page = crate::support::metrics_page(lab, node)?;
    crate::support::metric_value(&page, series)
        .with_context(|| format!("no {series} on {node}'s metrics page:\n{page}"))
}

fn tunnel_connections(lab: &Lab, pod: &str, ip: IpAddr) -> Result<Vec<String>> {
    let dst = SocketAddr::new(ip, TUNNEL_PORT).to_string();
    let out = lab
        .command(pod, "ss")?
        .args(["-Htn", "state", "established", "dst", &dst])
        .output()
        .with_context(|| format!("running ss in {pod}"))?;
    ensure!(
        out.status.success(),
        "ss in {pod} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Wait until `node`'s agent has logged `count` access records in `direction` for
/// `dst` after `offset` (each is written when its connection has closed).
fn wait_for_records(
    lab: &Lab,
    node: &str,
    offset: u64,
    dst: SocketAddr,
    direction: &str,
    count: usize,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let records: Vec<Value> = access_records_for(lab, node, offset, dst)?
            .into_iter()
            .filter(|r| r["direction"] == direction)
            .collect();
        if records.len() >= count {
            ensure!(
                records.len() == count,
                "{node}'s agent logged {} {direction} records for {dst}, expected {count}",
                records.len()
            );
            return Ok(records);
        }
        ensure!(
            Instant::now() < deadline,
            "{node}'s agent logged {} of {count} {direction} records for {dst} within {DEADLINE:?}",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The serials of the certificates for `identity` that an agent log says were issued
/// (`issued certificate …` the first time, `renewed certificate …` after), normalised.
fn issued_serials(log: &str, identity: &str) -> Vec<String> {
    let identity = format!("identity={identity} ");
    log.lines()
        .filter(|l| l.contains("issued certificate") || l.contains("renewed certificate"))
        .filter(|l| l.contains(&identity))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("serial=")))
        .map(normalise_serial)
        .collect()
}

/// A serial as upper-case hex without separators or leading zeros: the agent logs
/// `0a:1b:…` (the DER bytes, with a leading `00` when the top bit is set), openssl
/// prints `A1B…`.
fn normalise_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_owned()
}

/// The serial of the certificate `demo/server`'s tunnel port offers a new TLS client,
/// as `openssl s_client` in `outside` (not captured, so it reaches n2's agent directly)
/// sees it. The handshake fails for want of a client certificate, after the server's
/// certificate has been shown. The certificate must be for `identity`, chain to the
/// mesh's root, and be valid now (openssl checks the dates).
fn offered_serial(lab: &Lab, identity: &str) -> Result<String> {
    let addr = lab.pod("demo/server").addr(Family::V4, TUNNEL_PORT);
    let root = lab.ca_dir().join("root-cert.pem");
    let out = lab
        .command("outside", "timeout")?
        .args(["60", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(["-tls1_3", "-alpn", "h2", "-showcerts", "-CAfile"])
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .context("running openssl s_client in outside")?;
    let printed = String::from_utf8_lossy(&out.stdout);
    let shown = || {
        format!(
            "openssl s_client printed:\n{printed}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    ensure!(
        printed.contains("Verify return code: 0 (ok)"),
        "the server certificate of {addr} did not verify against {}; {}",
        root.display(),
        shown()
    );
    let begin = printed
        .find("-----BEGIN CERTIFICATE-----")
        .with_context(|| format!("no certificate from {addr}; {}", shown()))?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = printed[begin..]
        .find(end_marker)
        .with_context(|| format!("a truncated certificate from {addr}; {}", shown()))?;
    let pem = &printed[begin..begin + end + end_marker.len()];

    let mut x509 = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running openssl x509")?;
    x509.stdin
        .take()
        .context("openssl x509's stdin")?
        .write_all(format!("{pem}\n").as_bytes())?;
    let parsed = x509.wait_with_output()?;
    let fields = String::from_utf8_lossy(&parsed.stdout);
    ensure!(
        parsed.status.success(),
        "openssl x509 could not read the certificate: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    ensure!(
        fields.contains(&format!("URI:{identity}")),
        "the certificate offered by {addr} is not for {identity}:\n{fields}"
    );
    let serial = fields
        .lines()
        .find_map(|l| l.trim().strip_prefix("serial="))
        .with_context(|| format!("openssl x509 printed no serial:\n{fields}"))?;
    Ok(normalise_serial(serial))
}
