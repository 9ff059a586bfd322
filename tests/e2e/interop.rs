//! HBONE against an implementation that is not warren's: an HBONE client written in Python
//! (the `ssl` module and the `h2` package, `interop/hbone_client.py`) speaking what
//! Istio's ztunnel speaks. It runs in `legacy/client` or `outside` (captured by nobody)
//! with a certificate made by openssl, and dials `demo/server`'s port 15008 itself, as a
//! ztunnel node would; and a Python HBONE server (`interop/hbone_server.py`) on
//! `outside` that enrolled pods reach as a foreign HBONE workload.
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use warren_lab::{AppMode, Family, Lab};

use crate::support::{
    access_record, client_certificate, field, rogue_ca, sample_sum, scrape, wait_for_log_line,
};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "interop::python_hbone_client_reaches_a_pod",
        python_client_reaches_a_pod,
    ),
    (
        "interop::ztunnel_peer_is_labelled_by_its_baggage",
        ztunnel_peer_is_labelled_by_its_baggage,
    ),
    (
        "interop::leaf_only_peer_of_the_second_root_is_accepted",
        leaf_only_peer_of_the_second_root_is_accepted,
    ),
    (
        "interop::python_hbone_client_from_another_ca_is_refused",
        python_client_from_another_ca_is_refused,
    ),
    (
        "interop::enrolled_pod_reaches_a_foreign_hbone_server",
        enrolled_pod_reaches_a_foreign_hbone_server,
    ),
];

pub(crate) const CLIENT_POD: &str = "legacy/client";
pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/default";
pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// The Python client's CONNECT is accepted for the identity its certificate proves: the
/// echo comes back byte-exact through `demo/server`'s agent, whose access record names
/// the client's SPIFFE ID, the source from `forwarded`, and — the client sending no
/// warren header — the trace id of its `traceparent` as the connection id. The 200
/// carries `demo/server`'s metadata in `baggage`, as ztunnel's does.
fn python_client_reaches_a_pod(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), CLIENT_ID, 1)?;
    let (dst, offset, code, report) = python_client_echo(lab, &cert, &key)?;
    ensure!(
        code == 0 && report["status"] == 200 && report["echo_ok"] == true,
        "the Python HBONE client should get its echo back (exit {code}): {report}"
    );
    ensure!(report["server_id"] == SERVER_ID, "{report}");
    let version = &lab.pod("demo/server").labels["version"];
    ensure!(
        report["baggage"]
            == format!(
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=demo,k8s.pod.name=server,\
                 service.name=server,service.version={version}"
            ),
        "the 200 should carry demo/server's baggage: {report}"
    );

    let record = access_record(lab, "n2", offset, "inbound", dst)?;
    let source = lab.pod(CLIENT_POD).ip(Family::V4).to_string();
    ensure!(
        field(&record, "security") == "mutual_tls"
            && field(&record, "src_identity") == CLIENT_ID
            && field(&record, "src_addr") == source
            && field(&record, "connection_id") == report["trace_id"].as_str().unwrap_or("?")
            && record["bytes_sent"] == report["sent"]
            && record["outcome"] == "ok",
        "n2's record of the Python client's tunnel: {record}"
    );
    Ok(())
}

/// A pod behind a ztunnel node, which warren knows nothing about: the Python client in
/// `outside` (no workload of the lab's) with a certificate for `shop/sa/cart` and
/// ztunnel's `baggage`. n2's Istio metrics label the connection's source from that
/// baggage — workload, namespace, app, version, cluster — and its principal from the
/// certificate.
fn ztunnel_peer_is_labelled_by_its_baggage(lab: &Lab) -> Result<()> {
    const PEER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), PEER_ID, 1)?;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let client = PythonClient {
        from: "outside",
        source: lab.outside_ip(Family::V4),
        baggage: Some(
            "k8s.cluster.name=ambient-east,k8s.namespace.name=shop,k8s.deployment.name=cart,\
             service.name=cart,service.version=v3",
        ),
    };
    let (code, report) = client.run(lab, &cert, &key, &lab.ca_dir(), dst)?;
    ensure!(
        code == 0 && report["echo_ok"] == true,
        "the Python HBONE client in outside should get its echo back (exit {code}): {report}"
    );
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "cart"),
        ("source_workload_namespace", "shop"),
        ("source_canonical_service", "cart"),
        ("source_app", "cart"),
        ("source_version", "v3"),
        ("source_cluster", "ambient-east"),
        ("source_principal", PEER_ID),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let scrape = scrape(lab, "n2")?;
    let opened = sample_sum(&scrape, "istio_tcp_connections_opened_total", &labels);
    ensure!(
        opened >= 1.0,
        "n2 should count the connection with the peer's baggage as source labels {labels:?}; \
         its samples: {:#?}",
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == "istio_tcp_connections_opened_total"
                && s.labels.get("source_principal") == Some(PEER_ID))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// The suite's trust bundle holds two roots (the RSA root the agents' intermediate chains
/// to, and a P-256 "next" root, as during a rotation; see `plug_in_ca`). A peer whose
/// certificate the next root signed directly, sending only its leaf — its root is
/// configured on both sides, not sent — is accepted and logged with its identity.
fn leaf_only_peer_of_the_second_root_is_accepted(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let next_root = crate::plug_in_ca::next_root()?;
    let (cert, key) = client_certificate(dir.path(), &next_root, CLIENT_ID, 1)?;
    let sent = std::fs::read_to_string(&cert)?;
    ensure!(
        sent.matches("BEGIN CERTIFICATE").count() == 1,
        "the peer should hold only its leaf:\n{sent}"
    );
    let (dst, offset, code, report) = python_client_echo(lab, &cert, &key)?;
    ensure!(
        code == 0 && report["echo_ok"] == true,
        "a leaf-only peer of the second root should get its echo back (exit {code}): {report}"
    );
    let record = access_record(lab, "n2", offset, "inbound", dst)?;
    ensure!(
        field(&record, "src_identity") == CLIENT_ID && record["outcome"] == "ok",
        "n2's record of the leaf-only peer: {record}"
    );
    Ok(())
}

/// A certificate for a real identity, from a CA the mesh does not trust: the handshake
/// fails on the Python side too (warren aborts it), and the app sees nothing.
fn python_client_from_another_ca_is_refused(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rogue_ca = rogue_ca(dir.path())?;
    let (cert, key) = client_certificate(dir.path(), &rogue_ca, CLIENT_ID, 1)?;
    // Trusting the mesh's roots, it still verifies the server; only its own certificate
    // is foreign.
    let (_, offset, code, report) = python_client_echo(lab, &cert, &key)?;
    ensure!(
        code != 0 && report["echo_ok"] != true,
        "a client certificate from another CA must be refused (exit {code}): {report}"
    );
    wait_for_log_line(
        lab,
        "n2",
        offset,
        &["tunnel refused", "certificate signed by an unknown CA"],
        std::time::Duration::from_secs(10),
    )?;
    Ok(())
}

const FOREIGN_ID: &str = "spiffe://cluster.local/ns/outside/sa/default";
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `outside` declared a foreign HBONE workload, served by the Python HBONE server on its
/// port 15008: `demo/client`'s connection to `outside:9000` is tunnelled there by n1's
/// agent, which checks the server's identity; the server sees a plain CONNECT for
/// `outside:9000`, `forwarded` naming `demo/client`, `traceparent`, and the client's
/// SPIFFE ID from its certificate — and echoes the bytes back.
fn enrolled_pod_reaches_a_foreign_hbone_server(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), FOREIGN_ID, 1)?;
    let offset = lab.agent_log_len("n1");
    lab.set_foreign_hbone(true)?;
    let result = (|| -> Result<()> {
        wait_for_log_line(lab, "n1", offset, &["config reloaded"], RELOAD_WAIT)?;
        let mut server = PythonServer::start(lab, &cert, &key, &lab.ca_dir())?;
        let dst = std::net::SocketAddr::new(lab.outside_ip(Family::V4), 9000);
        let report = lab.connect("demo/client", dst, AppMode::Echo, 64 * 1024)?;
        ensure!(report.ok, "demo/client → foreign HBONE outside: {report:?}");
        let seen = server.stream_report()?;
        let client_ip = lab.pod("demo/client").ip(Family::V4);
        ensure!(
            seen["status"] == 200
                && seen["authority"] == dst.to_string()
                && seen["forwarded"] == format!("for={client_ip}")
                && seen["client_id"] == "spiffe://cluster.local/ns/demo/sa/client"
                && seen["traceparent"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("00-"))
                && seen["baggage"].as_str().is_some_and(|b| b
                    .contains("k8s.namespace.name=demo,k8s.pod.name=client,service.name=client,"))
                && seen["bytes"] == 64 * 1024,
            "what the foreign HBONE server saw: {seen}"
        );
        let record = access_record(lab, "n1", offset, "outbound", dst)?;
        ensure!(
            field(&record, "security") == "mutual_tls"
                && field(&record, "dst_identity") == FOREIGN_ID
                && field(&record, "dst_workload") == "outside/outside",
            "n1's record of the tunnel to the foreign workload: {record}"
        );
        Ok(())
    })();
    let offset = lab.agent_log_len("n1");
    lab.set_foreign_hbone(false)?;
    wait_for_log_line(lab, "n1", offset, &["config reloaded"], RELOAD_WAIT)?;
    result
}

/// `interop/hbone_server.py` on `outside`'s port 15008, killed on drop.
struct PythonServer {
    child: std::process::Child,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PythonServer {
    fn start(lab: &Lab, cert: &Path, key: &Path, ca_dir: &Path) -> Result<Self> {
        use std::io::BufRead as _;
        let mut child = python_peer(lab, "outside", "hbone_server.py", cert, key, ca_dir)?
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the Python HBONE server")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut server = PythonServer {
            child,
            stdout: std::io::BufReader::new(stdout).lines(),
        };
        let first = server.stdout.next().transpose()?;
        ensure!(
            first.as_deref() == Some("listening"),
            "the Python HBONE server did not start: {first:?}"
        );
        Ok(server)
    }

    /// The JSON line the server printed for the stream it served.
    fn stream_report(&mut self) -> Result<Value> {
        let line = self
            .stdout
            .next()
            .transpose()?
            .context("the Python HBONE server ended without reporting a stream")?;
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python client in `legacy/client`, with `cert` and `key`, through a fresh echo
/// server on `demo/server`: the destination, n2's log offset before, the client's exit
/// status and report.
fn python_client_echo(
    lab: &Lab,
    cert: &Path,
    key: &Path,
) -> Result<(std::net::SocketAddr, u64, i32, Value)> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let offset = lab.agent_log_len("n2");
    let client = PythonClient::in_pod(lab, CLIENT_POD);
    let (code, report) = client.run(lab, cert, key, &lab.ca_dir(), dst)?;
    Ok((dst, offset, code, report))
}

/// Where `interop/hbone_client.py` runs, which source it names in `forwarded` and which
/// `baggage` it sends.
pub(crate) struct PythonClient<'a> {
    pub from: &'a str,
    /// What it names in `forwarded` (its own address, or a forged one).
    pub source: std::net::IpAddr,
    pub baggage: Option<&'a str>,
}

impl<'a> PythonClient<'a> {
    /// In `pod` (IPv4), with the script's default baggage.
    pub fn in_pod(lab: &Lab, pod: &'a str) -> Self {
        PythonClient {
            from: pod,
            source: lab.pod(pod).ip(Family::V4),
            baggage: None,
        }
    }

    /// Run it against `dst` through `dst`'s port 15008: its exit status and JSON report.
    pub fn run(
        &self,
        lab: &Lab,
        cert: &Path,
        key: &Path,
        ca_dir: &Path,
        dst: std::net::SocketAddr,
    ) -> Result<(i32, Value)> {
        let mut cmd = python_peer(lab, self.from, "hbone_client.py", cert, key, ca_dir)?;
        cmd.args(["--tunnel", &format!("{}:15008", dst.ip())])
            .args(["--authority", &dst.to_string()])
            .args(["--forwarded-for", &self.source.to_string()])
            .args(["--server-id", SERVER_ID]);
        if let Some(baggage) = self.baggage {
            cmd.args(["--baggage", baggage]);
        }
        let out = cmd.output().context(
            "running the Python HBONE client (python3 with the h2 package; `cargo xtask setup` installs it)",
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str(line).ok())
            .with_context(|| {
                format!(
                    "the Python HBONE client printed no JSON ({}): {stdout}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        Ok((out.status.code().unwrap_or(-1), report))
    }
}

/// `python3 interop/<script>` in `target`, with its certificate, key and the mesh's trust
/// bundle, stdin closed.
fn python_peer(
    lab: &Lab,
    target: &str,
    script: &str,
    cert: &Path,
    key: &Path,
    ca_dir: &Path,
) -> Result<std::process::Command> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("e2e/interop")
        .join(script);
    let mut cmd = lab.command(target, "python3")?;
    cmd.arg(script)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(ca_dir.join("root-cert.pem"))
        .stdin(std::process::Stdio::null());
    Ok(cmd)
}
