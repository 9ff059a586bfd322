//! HBONE against an implementation that is not warren's: an HBONE client written in Python
//! (the `ssl` module and the `h2` package, `interop/hbone_client.py`) speaking what
//! Istio's ztunnel speaks. It runs in `legacy/client` (not in the mesh, so nothing
//! captures it) with a certificate made by openssl, and dials `demo/server`'s port 15008
//! itself, as a ztunnel node would.
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use warren_lab::{AppMode, Family, Lab};

use crate::support::{access_record, client_certificate, field, rogue_ca, wait_for_log_line};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "interop::python_hbone_client_reaches_a_pod",
        python_client_reaches_a_pod,
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

const CLIENT_POD: &str = "legacy/client";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/default";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// The Python client's CONNECT is accepted for the identity its certificate proves: the
/// echo comes back byte-exact through `demo/server`'s agent, whose access record names
/// the client's SPIFFE ID, the source from `forwarded`, and — the client sending no
/// warren header — the trace id of its `traceparent` as the connection id.
fn python_client_reaches_a_pod(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), CLIENT_ID, 1)?;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let offset = lab.agent_log_len("n2");

    let (code, report) = python_client(lab, &cert, &key, &lab.ca_dir(), dst)?;
    ensure!(
        code == 0 && report["status"] == 200 && report["echo_ok"] == true,
        "the Python HBONE client should get its echo back (exit {code}): {report}"
    );
    ensure!(report["server_id"] == SERVER_ID, "{report}");

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

/// A certificate for a real identity, from a CA the mesh does not trust: the handshake
/// fails on the Python side too (warren aborts it), and the app sees nothing.
fn python_client_from_another_ca_is_refused(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rogue_ca = rogue_ca(dir.path())?;
    let (cert, key) = client_certificate(dir.path(), &rogue_ca, CLIENT_ID, 1)?;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let offset = lab.agent_log_len("n2");
    // Trusting the mesh's roots, it still verifies the server; only its own certificate
    // is foreign.
    let (code, report) = python_client(lab, &cert, &key, &lab.ca_dir(), dst)?;
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

/// Run the Python client in `legacy/client` against `dst` through `dst`'s port 15008:
/// its exit status and JSON report.
fn python_client(
    lab: &Lab,
    cert: &Path,
    key: &Path,
    ca_dir: &Path,
    dst: std::net::SocketAddr,
) -> Result<(i32, Value)> {
    let source = lab.pod(CLIENT_POD).ip(Family::V4).to_string();
    let out = python_peer(lab, CLIENT_POD, "hbone_client.py", cert, key, ca_dir)?
        .args(["--tunnel", &format!("{}:15008", dst.ip())])
        .args(["--authority", &dst.to_string()])
        .args(["--forwarded-for", &source])
        .args(["--server-id", SERVER_ID])
        .output()
        .context("running the Python HBONE client (python3 with the h2 package; `cargo xtask setup` installs it)")?;
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
