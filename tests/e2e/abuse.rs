//! One client must not hurt the others: the agent serves every pod of its node, so what a
//! single misbehaving host can take of it is bounded, and everybody else is served.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use warren_lab::{AppMode, ConnectOptions, Family, Lab, LoadOptions};

use crate::support::{client_certificate, ensure_ok, metric_value, metrics_page};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "abuse::idle_connections_to_15008_are_bounded",
        idle_connections_to_15008_are_bounded,
    ),
    ("abuse::resets_stay_resets", resets_stay_resets),
    (
        "abuse::a_peer_that_stops_reading_is_bounded",
        a_peer_that_stops_reading_is_bounded,
    ),
    (
        "abuse::stalled_access_log_does_not_stop_traffic",
        stalled_access_log_does_not_stop_traffic,
    ),
];

/// Idle TCP connections `outside` opens to `demo/server`'s 15008 and never speaks TLS on.
const FLOOD: usize = 2000;
/// What those may add to n2's agent's resident memory. Before the transport buffers
/// waited for the handshake, 2,000 took ~250 MiB (2 × 64 KiB each); now the first
/// `--max-pending-handshakes-per-source` (64) wait for their handshake timeout, bare,
/// and the rest are reset at accept.
const RSS_BOUND_KIB: u64 = 32 * 1024;

/// 2,000 idle connections from one host outside the mesh to `demo/server`'s 15008: all
/// but the per-source pending-handshake budget are reset at once, counted in
/// `warren_listener_limit_refusals_total`, the agent's memory barely moves, and a mesh
/// client is served throughout.
fn idle_connections_to_15008_are_bounded(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let pid = lab.agent_pid("n2").context("n2's agent is not running")?;
    let before = rss_kib(pid)?;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/abuse/idle_flood.py");
    let mut flood = lab
        .command("outside", "python3")?
        .arg(script)
        .args(["--addr", &format!("{}:15008", dst.ip())])
        .args(["--count", &FLOOD.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the idle-connection flood")?;
    // Dropping stdin ends the flood; kill it too, whatever happens here.
    let result = (|| -> Result<()> {
        let mut line = String::new();
        BufReader::new(flood.stdout.as_mut().context("flood stdout")?).read_line(&mut line)?;
        let report: Value =
            serde_json::from_str(&line).with_context(|| format!("flood report: {line:?}"))?;
        let count = |key: &str| report[key].as_u64().unwrap_or(u64::MAX);
        // A few connects may fail outright while the accept queue is full: refused too.
        ensure!(
            count("open") <= 64
                && count("reset").saturating_add(count("failed_connect")) >= FLOOD as u64 - 64,
            "all but the per-source pending budget (64) should be reset at accept: {report}"
        );
        let during = rss_kib(pid)?;
        ensure!(
            during.saturating_sub(before) < RSS_BOUND_KIB,
            "n2's agent grew from {before} KiB to {during} KiB under {FLOOD} idle connections"
        );
        let refused = metric_value(
            &metrics_page(lab, "n2")?,
            r#"warren_listener_limit_refusals_total{limit="pending_handshakes_per_source",listener="15008"}"#,
        );
        ensure!(
            refused >= Some(count("reset") - 64),
            "the refusals should be counted: {refused:?} ({report})"
        );
        ensure_ok(
            &lab.connect("demo/client", dst, AppMode::Echo, 64 * 1024)?,
            "a mesh client during the flood",
        )
    })();
    drop(flood.stdin.take());
    let _ = flood.kill();
    let _ = flood.wait();
    result
}

/// Streams one HBONE peer asks for on one connection.
const STALLED_STREAMS: usize = 512;
/// What n2's agent may grow by while that peer stalls: the h2 send buffers of the
/// streams it was granted (100 × 64 KiB = 6.25 MiB, `hbone::tuning`), the relays' and
/// connections' bookkeeping, and allocator slack. Before the bound, 512 streams × 512 KiB
/// of send buffer could pin 256 MiB.
const STALLED_RSS_BOUND_KIB: u64 = 24 * 1024;

/// One HBONE peer with a valid identity opens 512 CONNECT streams at once to a source
/// that writes forever, grants 2 GiB windows, and never reads: the agent accepts the
/// 100 streams it allows a connection and refuses the rest (`REFUSED_STREAM`), reads
/// from each source only what h2 has room to send, so its memory grows by a few MiB,
/// and a mesh client is served meanwhile.
fn a_peer_that_stops_reading_is_bounded(lab: &Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(
        dir.path(),
        &lab.ca_dir(),
        "spiffe://cluster.local/ns/shop/sa/cart",
        1,
    )?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/abuse/stalled_reader.py");
    let echo = lab.serve("demo/server", 0, AppMode::Echo)?;
    let pid = lab.agent_pid("n2").context("n2's agent is not running")?;
    let mut source = lab
        .command("demo/server", "python3")?
        .arg(&script)
        .arg("source")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting stalled_reader.py source")?;
    let mut peer: Option<std::process::Child> = None;
    let result = (|| -> Result<()> {
        let mut line = String::new();
        BufReader::new(source.stdout.as_mut().context("source stdout")?).read_line(&mut line)?;
        let port: Value = serde_json::from_str(&line).with_context(|| format!("{line:?}"))?;
        let port = port["listening"].as_u64().context("no listening port")? as u16;
        let authority = lab.pod("demo/server").addr(Family::V4, port);
        let before = rss_kib(pid)?;
        let child = peer.insert(
            lab.command("outside", "python3")?
                .arg(&script)
                .arg("peer")
                .args(["--tunnel", &format!("{}:15008", authority.ip())])
                .args(["--authority", &authority.to_string()])
                .args(["--forwarded-for", &lab.outside_ip(Family::V4).to_string()])
                .args(["--server-id", crate::interop::SERVER_ID])
                .args(["--streams", &STALLED_STREAMS.to_string()])
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg("--ca")
                .arg(lab.ca_dir().join("root-cert.pem"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting stalled_reader.py peer")?,
        );
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().context("peer stdout")?).read_line(&mut line)?;
        let report: Value =
            serde_json::from_str(&line).with_context(|| format!("peer report: {line:?}"))?;
        ensure!(
            report["accepted"] == 100 && report["refused"] == STALLED_STREAMS - 100,
            "n2 should accept 100 streams on the connection and refuse the rest: {report}"
        );
        // Let the sources fill every buffer they are allowed to.
        std::thread::sleep(Duration::from_secs(3));
        let during = rss_kib(pid)?;
        ensure!(
            during.saturating_sub(before) < STALLED_RSS_BOUND_KIB,
            "n2's agent grew from {before} KiB to {during} KiB under a peer that stopped \
             reading {STALLED_STREAMS} streams (bound {STALLED_RSS_BOUND_KIB} KiB)"
        );
        let dst = lab.pod("demo/server").addr(Family::V4, echo.port());
        ensure_ok(
            &lab.connect("demo/client", dst, AppMode::Echo, 64 * 1024)?,
            "a mesh client while a peer stalls its streams",
        )
    })();
    if let Some(mut peer) = peer {
        drop(peer.stdin.take());
        let _ = peer.kill();
        let _ = peer.wait();
    }
    let _ = source.kill();
    let _ = source.wait();
    result
}

/// A server that writes 1 MiB and resets reaches the mesh client as a reset, never as a
/// clean end that would make a truncated answer look complete; and a client that does
/// the same reaches the server as a reset. Across nodes (HBONE between two agents:
/// `RST_STREAM(CONNECT_ERROR)` carries it) and on one node.
fn resets_stay_resets(lab: &Lab) -> Result<()> {
    for server in ["demo/server", "demo/peer"] {
        let (end, _) = reset_exchange(lab, server, "--write", "demo/client", "--read")?;
        ensure!(
            end["end"] == "reset",
            "demo/client → {server}: the server reset, the client saw {end}"
        );
        let (_, end) = reset_exchange(lab, server, "--read", "demo/client", "--write")?;
        ensure!(
            end["end"] == "reset",
            "demo/client → {server}: the client reset, the server saw {end}"
        );
    }
    Ok(())
}

/// `reset_peer.py server <server_role>` in `server` and `client <client_role>` in
/// `client` (a `--write` end writes 1 MiB then resets, a `--read` end reports how it
/// ended); the two reports, client's first.
fn reset_exchange(
    lab: &Lab,
    server: &str,
    server_role: &str,
    client: &str,
    client_role: &str,
) -> Result<(Value, Value)> {
    const BYTES: &str = "1048576";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/abuse/reset_peer.py");
    let with_bytes = |cmd: &mut std::process::Command, role: &str| {
        cmd.arg(role);
        if role == "--write" {
            cmd.arg(BYTES);
        }
    };
    let mut server_cmd = lab.command(server, "python3")?;
    server_cmd.arg(&script).arg("server");
    with_bytes(&mut server_cmd, server_role);
    let mut serving = server_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting reset_peer.py server")?;
    let result = (|| -> Result<(Value, Value)> {
        let mut lines = BufReader::new(serving.stdout.take().context("server stdout")?).lines();
        let mut next = || -> Result<Value> {
            let line = lines
                .next()
                .context("reset_peer.py server said nothing")??;
            serde_json::from_str(&line).with_context(|| format!("server line {line:?}"))
        };
        let port = next()?["listening"].as_u64().context("no listening port")?;
        let addr = lab.pod(server).addr(Family::V4, port as u16);
        let mut client_cmd = lab.command(client, "python3")?;
        client_cmd
            .arg(&script)
            .arg("client")
            .args(["--addr", &addr.to_string()]);
        with_bytes(&mut client_cmd, client_role);
        let out = client_cmd
            .stdin(Stdio::null())
            .output()
            .context("running reset_peer.py client")?;
        let line = String::from_utf8_lossy(&out.stdout);
        let client_report: Value = serde_json::from_str(line.trim()).with_context(|| {
            format!(
                "client report {line:?} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((client_report, next()?))
    })();
    let _ = serving.kill();
    let _ = serving.wait();
    result
}

/// n2's agent with its stdout — the access log — in a pipe nobody reads, as when a log
/// shipper stalls: the pipe fills after a few hundred lines, and the agent goes on
/// carrying traffic (dropping and counting the lines it cannot write) instead of
/// stopping its data path on a blocked write.
fn stalled_access_log_does_not_stop_traffic(lab: &Lab) -> Result<()> {
    /// Each connection logs a line of ~500 bytes on n2; the pipe holds 64 KiB.
    const CONNECTIONS: usize = 400;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    lab.kill_agent("n2", warren_lab::Signal::SIGTERM)?;
    let result = (|| -> Result<()> {
        let (_pid, unread) = lab.start_agent_with_stalled_stdout("n2")?;
        // In rounds, so that the later ones come after the pipe filled.
        for round in 0..CONNECTIONS / 100 {
            let options = ConnectOptions {
                timeout: Duration::from_secs(10),
                ..ConnectOptions::tcp(dst, AppMode::Echo, 64)
            };
            let load = LoadOptions {
                parallel: 100,
                ..LoadOptions::default()
            };
            let report = lab.connect_load("demo/client", &options, &load)?;
            ensure!(
                report.ok,
                "round {round}: 100 connections while n2's stdout was stalled: {report:?}"
            );
        }
        // The stall was real: the pipe is full (64 KiB, in pages: ~58 KiB of lines), so the agent's writer has been
        // blocked while the connections above went through.
        let waiting = pipe_contents(unread)?;
        ensure!(
            waiting >= 48 * 1024,
            "n2's stdout pipe should be full, it holds {waiting} bytes"
        );
        ensure!(
            metric_value(
                &metrics_page(lab, "n2")?,
                r#"warren_log_lines_dropped_total{stream="access"}"#
            )
            .is_some(),
            "n2 should report warren_log_lines_dropped_total"
        );
        Ok(())
    })();
    // Back to the usual log, whatever happened.
    lab.kill_agent("n2", warren_lab::Signal::SIGTERM)?;
    lab.start_agent("n2")?;
    result
}

/// How many bytes wait in the pipe `read` is the read end of (read without blocking).
fn pipe_contents(read: std::os::fd::OwnedFd) -> Result<usize> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let mut pipe = std::fs::File::from(read);
    fcntl(pipe.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .context("making the pipe non-blocking")?;
    let mut total = 0;
    let mut buf = [0u8; 65536];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return Ok(total),
            Err(err) => return Err(err.into()),
        }
    }
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}
