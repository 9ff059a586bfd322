//! Bad peers on the tunnel port 15008: each is refused within a bounded time with a log
//! line that says why, and the agent keeps serving everyone else. The bad peer sits in
//! `outside` (not captured), dialling `demo/server`'s 15008 directly; the TLS clients are
//! real ones (`openssl s_client`) with certificates made by `openssl`.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use warren_lab::{AppMode, Family, Lab};

use crate::support::{
    access_record, access_records_for, client_certificate, ensure_ok, field, rogue_ca, sample_sum,
    scrape, wait_for_log_line,
};

/// The identity the bad peers' certificates claim: a real one of the mesh.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    ("tunnel_refusals::random_bytes", |lab| {
        raw_peer(
            lab,
            b"\x8f\x00\x13garbage\xff\xfe not tls at all\r\n",
            "protocol",
        )
    }),
    ("tunnel_refusals::plain_http_request", |lab| {
        raw_peer(lab, b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n", "protocol")
    }),
    // A TLS handshake record whose ClientHello claims 0xffff bytes and carries 4.
    ("tunnel_refusals::malformed_client_hello", |lab| {
        // rustls waits for the rest of the message: cut off by the handshake timeout.
        raw_peer(
            lab,
            b"\x16\x03\x01\x00\x08\x01\x00\xff\xff\x03\x03\x00\x00",
            "timeout",
        )
    }),
    (
        "tunnel_refusals::stalled_handshake_is_cut_off",
        stalled_handshake,
    ),
    (
        "tunnel_refusals::client_certificate_from_another_ca",
        other_ca,
    ),
    (
        "tunnel_refusals::expired_client_certificate",
        expired_certificate,
    ),
    (
        "tunnel_refusals::server_with_unexpected_identity",
        unexpected_server_identity,
    ),
    (
        "tunnel_refusals::connect_to_a_non_local_address",
        connect_to_a_non_local_address,
    ),
];

/// How long a refused peer may wait for the agent to close: the agent's TLS handshake
/// timeout is 10 s; the margin is for a loaded machine.
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);

fn tunnel_addr(lab: &Lab) -> SocketAddr {
    lab.pod("demo/server").addr(Family::V4, 15008)
}

/// Send `bytes` to 15008 and expect the agent to close the connection, log the refusal,
/// and go on serving.
fn raw_peer(lab: &Lab, bytes: &'static [u8], reason: &str) -> Result<()> {
    let counted = HandshakeErrors::before(lab, reason)?;
    let offset = lab.agent_log_len("n2");
    let addr = tunnel_addr(lab);
    let local = lab.run_in("outside", move || -> Result<SocketAddr> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.write_all(bytes)?;
        wait_for_close(&mut stream)?;
        Ok(stream.local_addr()?)
    })??;
    refusal_logged(lab, offset, &[&format!("peer={local}"), "tunnel refused"])?;
    counted.grew(lab)?;
    still_serving(lab)
}

/// Half a ClientHello, then silence (slowloris): cut off by the handshake timeout.
fn stalled_handshake(lab: &Lab) -> Result<()> {
    let counted = HandshakeErrors::before(lab, "timeout")?;
    let offset = lab.agent_log_len("n2");
    let addr = tunnel_addr(lab);
    let local = lab.run_in("outside", move || -> Result<SocketAddr> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")?;
        wait_for_close(&mut stream)?;
        Ok(stream.local_addr()?)
    })??;
    refusal_logged(
        lab,
        offset,
        &[&format!("peer={local}"), "no TLS handshake within"],
    )?;
    counted.grew(lab)?;
    still_serving(lab)
}

/// A certificate with the right SPIFFE ID, signed by a CA the mesh does not trust.
fn other_ca(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rogue_ca = rogue_ca(dir.path())?;
    let (cert, key) = client_certificate(dir.path(), &rogue_ca, CLIENT_ID, 1)?;
    tls_peer_refused(
        lab,
        &cert,
        &key,
        ("certificate signed by an unknown CA", "unknown_ca"),
    )
}

/// A certificate from the mesh's own CA, for the right identity, but expired.
fn expired_certificate(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // `-days 0`: notAfter = notBefore = now, so it is expired a second later.
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), CLIENT_ID, 0)?;
    std::thread::sleep(Duration::from_millis(1500));
    tls_peer_refused(lab, &cert, &key, ("certificate expired at", "expired"))
}

/// Secure naming: n1's agent is told that `demo/server` runs as service account
/// `impostor`; the real server presents `…/sa/server`, a valid certificate of the mesh's
/// CA. n1's agent must refuse to send the connection, say why, and never reach the app.
fn unexpected_server_identity(lab: &Lab) -> Result<()> {
    with_agent_config(
        lab,
        "n1",
        |yaml| {
            replace_once(
                yaml,
                "serviceAccount: server\n",
                "serviceAccount: impostor\n",
            )
        },
        || {
            let app = lab.serve("demo/server", 0, AppMode::Echo)?;
            let dst = lab.pod("demo/server").addr(Family::V4, app.port());
            let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
            let report = lab.connect("demo/client", dst, AppMode::Echo, 1024)?;
            ensure!(
                !report.ok,
                "the connection went through to a server with the wrong identity: {report:?}"
            );
            let record = access_record(lab, "n1", n1, "outbound", dst)?;
            ensure!(
                field(&record, "error").contains(
                    "server presented spiffe://cluster.local/ns/demo/sa/server, expected spiffe://cluster.local/ns/demo/sa/impostor"
                ),
                "the refusal should name both identities: {record}"
            );
            let reached = access_records_for(lab, "n2", n2, dst)?;
            ensure!(
                reached.is_empty(),
                "the server's agent delivered the connection: {reached:?}"
            );
            Ok(())
        },
    )
}

/// A CONNECT for an address that is not one of the pod's: n2's agent is told that
/// `demo/server` has only its IPv4 address, so a tunnel for its IPv6 address — sent by n1,
/// which still knows both — names no local workload and is refused with 400, as ztunnel
/// refuses it.
fn connect_to_a_non_local_address(lab: &Lab) -> Result<()> {
    with_agent_config(
        lab,
        "n2",
        |yaml| replace_once(yaml, "  - fd00:77:2::10\n", ""),
        || {
            let app = lab.serve("demo/server", 0, AppMode::Echo)?;
            let dst = lab.pod("demo/server").addr(Family::V6, app.port());
            let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
            let report = lab.connect("demo/client", dst, AppMode::Echo, 1024)?;
            ensure!(
                !report.ok,
                "a CONNECT for a non-local address was delivered: {report:?}"
            );
            let inbound = access_record(lab, "n2", n2, "inbound", dst)?;
            ensure!(
                field(&inbound, "error").contains("400 Bad Request")
                    && field(&inbound, "error").contains("is not an address of demo/server"),
                "n2 should refuse with 400 and say why: {inbound}"
            );
            let outbound = access_record(lab, "n1", n1, "outbound", dst)?;
            ensure!(
                field(&outbound, "error").contains("refused the tunnel: 400"),
                "n1 should log the peer's refusal: {outbound}"
            );
            still_serving(lab)
        },
    )
}

fn replace_once(text: &str, from: &str, to: &str) -> Result<String> {
    ensure!(
        text.matches(from).count() == 1,
        "expected exactly one {from:?} in lab.yaml:\n{text}"
    );
    Ok(text.replacen(from, to, 1))
}

/// Run `body` while `node`'s agent runs with a copy of the lab's config changed by
/// `edit` (the other agents keep the lab's); afterwards — also when `body` fails — the
/// agent is restarted with the lab's config.
fn with_agent_config(
    lab: &Lab,
    node: &str,
    edit: impl FnOnce(&str) -> Result<String>,
    body: impl FnOnce() -> Result<()>,
) -> Result<()> {
    // A file of the node's own: every agent watches lab.yaml, and the other node must
    // keep the true view.
    let dir = tempfile::tempdir()?;
    let private = dir.path().join(format!("{node}.yaml"));
    let stop = || -> Result<()> {
        if lab.agent_pid(node).is_some() {
            lab.kill_agent(node, warren_lab::Signal::SIGTERM)?;
        }
        Ok(())
    };
    let changed = edit(&std::fs::read_to_string(lab.config_path())?)
        .and_then(|yaml| Ok(std::fs::write(&private, yaml)?))
        .and_then(|()| stop())
        .and_then(|()| lab.start_agent_with_config(node, &private).map(drop));
    let result = changed.and_then(|()| body());
    stop()
        .and_then(|()| lab.start_agent(node).map(drop))
        .context("restarting the agent with the lab's own config")?;
    result
}

/// `openssl s_client` from `outside` presenting `cert`; the n2 agent must refuse the
/// handshake and log `reason`.
/// `(logged, label)`: what the log line says and the metric's reason label.
fn tls_peer_refused(
    lab: &Lab,
    cert: &Path,
    key: &Path,
    (logged, label): (&str, &str),
) -> Result<()> {
    let counted = HandshakeErrors::before(lab, label)?;
    let offset = lab.agent_log_len("n2");
    let out = lab
        .command("outside", "openssl")?
        .args([
            "s_client",
            "-connect",
            &tunnel_addr(lab).to_string(),
            "-tls1_3",
            "-alpn",
            "h2",
            "-cert",
        ])
        .arg(cert)
        .arg("-cert_chain")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running openssl s_client")?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        printed.contains("sa/server") || printed.contains("Server certificate"),
        "openssl s_client did not reach the agent's TLS server:\n{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refusal_logged(lab, offset, &["tunnel refused", logged])?;
    counted.grew(lab)?;
    still_serving(lab)
}

/// Read until the peer closes (EOF or reset); fail if it is still open at the deadline.
fn wait_for_close(stream: &mut TcpStream) -> Result<()> {
    let deadline = Instant::now() + CLOSE_DEADLINE;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the agent kept a bad peer's connection open for {CLOSE_DEADLINE:?}");
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue, // e.g. a TLS alert
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return Ok(()), // reset
        }
    }
}

/// Wait until n2's agent logged a line (after `offset`) containing every needle.
/// n2's `warren_tls_handshake_errors_total{direction="inbound", reason}` before a bad
/// peer, to check that the refusal was counted under the right reason.
struct HandshakeErrors<'a> {
    reason: &'a str,
    before: f64,
}

impl<'a> HandshakeErrors<'a> {
    fn before(lab: &Lab, reason: &'a str) -> Result<Self> {
        Ok(Self {
            reason,
            before: Self::count(lab, reason)?,
        })
    }

    fn count(lab: &Lab, reason: &str) -> Result<f64> {
        Ok(sample_sum(
            &scrape(lab, "n2")?,
            "warren_tls_handshake_errors_total",
            &[("direction", "inbound"), ("reason", reason)],
        ))
    }

    /// The agent counts before it logs, so once the line is there the count is too.
    fn grew(&self, lab: &Lab) -> Result<()> {
        let after = Self::count(lab, self.reason)?;
        ensure!(
            after == self.before + 1.0,
            "n2's warren_tls_handshake_errors_total{{direction=\"inbound\", reason=\"{}\"}} went from {} to {after}, expected one more",
            self.reason,
            self.before
        );
        Ok(())
    }
}

fn refusal_logged(lab: &Lab, offset: u64, needles: &[&str]) -> Result<()> {
    wait_for_log_line(lab, "n2", offset, needles, CLOSE_DEADLINE).map(drop)
}

/// The agent still carries ordinary traffic after the bad peer.
fn still_serving(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    ensure_ok(
        &lab.connect("demo/client", dst, AppMode::Echo, 64 * 1024)?,
        "a tunnelled connection after a bad peer",
    )
}
