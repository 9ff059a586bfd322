//! What is captured and what is not, and what happens when an agent restarts.

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, ConnectOptions, Family, Lab, RedirectMode, Signal};

use crate::support::{access_record, access_records_for, ensure_ok, field, RedirectState};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "capture::legacy_client_is_not_captured",
        legacy_client_is_not_captured,
    ),
    (
        "capture::enrolled_pod_to_outside_passes_through",
        enrolled_pod_to_outside,
    ),
    ("capture::udp_is_untouched", udp_is_untouched),
    ("capture::node_to_pod_probe_works", node_to_pod_probe),
    (
        "capture::loopback_and_own_address_are_untouched",
        loopback_and_own_address,
    ),
    (
        "capture::agent_restart_recovers_and_fails_closed_meanwhile",
        agent_restart,
    ),
    (
        "capture::same_loopback_tuple_in_two_pods",
        same_loopback_tuple_in_two_pods,
    ),
];

/// `legacy` is not in the mesh: n1's agent does not carry its outbound connection; the
/// server is in the mesh, so n2's agent does carry it inbound (PERMISSIVE).
fn legacy_client_is_not_captured(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Sha)?;
    for family in Family::BOTH {
        let dst = lab.pod("demo/server").addr(family, app.port());
        let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
        let report = lab.connect("legacy/client", dst, AppMode::Sha, 1 << 20)?;
        ensure_ok(&report, &format!("legacy/client → {dst}"))?;
        let inbound = access_record(lab, "n2", n2, "inbound", dst)?;
        ensure!(
            field(&inbound, "src_workload") == "legacy/client"
                && field(&inbound, "security") == "none",
            "inbound record should be plaintext from legacy/client: {inbound}"
        );
        let n1_lines = access_records_for(lab, "n1", n1, dst)?;
        ensure!(
            n1_lines.is_empty(),
            "n1's agent carried legacy/client's connection:\n{}",
            n1_lines
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// A destination outside the mesh is reached directly (the agent passes it through,
/// from the pod's netns, with the pod's address).
fn enrolled_pod_to_outside(lab: &Lab) -> Result<()> {
    let app = lab.serve("outside", 0, AppMode::Sha)?;
    for family in Family::BOTH {
        let dst = std::net::SocketAddr::new(lab.outside_ip(family), app.port());
        let offset = lab.agent_log_len("n1");
        let report = lab.connect("demo/client", dst, AppMode::Sha, 4 << 20)?;
        ensure_ok(&report, &format!("demo/client → outside {dst}"))?;
        let line = access_record(lab, "n1", offset, "outbound", dst)?;
        ensure!(
            line["dst_workload"].is_null() && field(&line, "security") == "none",
            "outside is not a workload: {line}"
        );
        let client_ip = lab.pod("demo/client").ip(family).to_string();
        let seen = app.log().join("\n");
        ensure!(
            seen.contains(&client_ip),
            "outside did not see the pod's address {client_ip}; server log:\n{seen}"
        );
    }
    Ok(())
}

/// UDP between enrolled pods and to the outside works, and no agent touches it.
fn udp_is_untouched(lab: &Lab) -> Result<()> {
    let server = lab.serve_udp("demo/server", 0)?;
    let outside = lab.serve_udp("outside", 0)?;
    for family in Family::BOTH {
        for dst in [
            lab.pod("demo/server").addr(family, server.port()),
            std::net::SocketAddr::new(lab.outside_ip(family), outside.port()),
        ] {
            let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
            let report = lab.connect_with(
                "demo/client",
                &ConnectOptions {
                    timeout: std::time::Duration::from_secs(5),
                    ..ConnectOptions::udp(dst, 512)
                },
            )?;
            ensure_ok(&report, &format!("UDP to {dst}"))?;
            ensure_untouched(lab, &[("n1", n1), ("n2", n2)], dst, "UDP")?;
        }
    }
    Ok(())
}

/// The node (where kubelet runs) reaches its pods, as health probes do.
fn node_to_pod_probe(lab: &Lab) -> Result<()> {
    for (node, pod) in [("n1", "demo/client"), ("n2", "demo/server")] {
        let app = lab.serve(pod, 0, AppMode::Echo)?;
        for family in Family::BOTH {
            let dst = lab.pod(pod).addr(family, app.port());
            let report = lab.connect(&format!("node/{node}"), dst, AppMode::Echo, 1024)?;
            ensure_ok(&report, &format!("node/{node} → {dst}"))?;
        }
    }
    Ok(())
}

/// A pod talking to itself — over loopback or to its own address — never goes through
/// the agent.
fn loopback_and_own_address(lab: &Lab) -> Result<()> {
    let server = lab.serve("demo/client", 0, AppMode::Echo)?;
    let pod = lab.pod("demo/client");
    for dst in [
        std::net::SocketAddr::from(([127, 0, 0, 1], server.port())),
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.port())),
        pod.addr(Family::V4, server.port()),
        pod.addr(Family::V6, server.port()),
    ] {
        let n1 = lab.agent_log_len("n1");
        ensure_ok(
            &lab.connect("demo/client", dst, AppMode::Echo, 4096)?,
            &format!("demo/client → its own {dst}"),
        )?;
        ensure_untouched(lab, &[("n1", n1)], dst, "a pod's connection to itself")?;
    }
    Ok(())
}

/// No agent wrote an access record for `dst` since the offsets. A record is written
/// when a connection closes, so a second is allowed for one that is on its way.
fn ensure_untouched(
    lab: &Lab,
    offsets: &[(&str, u64)],
    dst: std::net::SocketAddr,
    what: &str,
) -> Result<()> {
    std::thread::sleep(std::time::Duration::from_secs(1));
    for (node, offset) in offsets {
        let lines = access_records_for(lab, node, *offset, dst)?;
        ensure!(
            lines.is_empty(),
            "{node}'s agent touched {what} to {dst}:\n{}",
            lines
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// Kill n1's agent (a crash): its pods fail closed — no connection in or out reaches an
/// app unseen. Start it again: traffic flows with the same pods, and the kernel holds
/// exactly the links and pins it held before (nothing doubled, nothing half-installed).
fn agent_restart(lab: &Lab) -> Result<()> {
    let before = RedirectState::of(lab, "n1")?;
    match lab.redirect() {
        Some(RedirectMode::Iptables) => ensure!(
            before.rules.iter().any(|r| r.contains("REDIRECT")),
            "no REDIRECT rules in n1's pods: {before:?}"
        ),
        _ => ensure!(
            before.pins.iter().any(|p| p.starts_with("link_sk_lookup_")),
            "no sk_lookup pins in {before:?}"
        ),
    }

    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let peer = lab.serve("demo/peer", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let to_peer = lab.pod("demo/peer").addr(Family::V4, peer.port());
    ensure_ok(
        &lab.connect("demo/client", to_server, AppMode::Echo, 1024)?,
        "before the crash",
    )?;

    lab.kill_agent("n1", Signal::SIGKILL)?;
    let restart = (|| -> Result<()> {
        let out = lab.connect("demo/client", to_server, AppMode::Echo, 1024)?;
        ensure!(
            !out.ok,
            "outbound from an enrolled pod worked with its agent down (fail open): {out:?}"
        );
        let into = lab.connect("demo/server", to_peer, AppMode::Echo, 1024)?;
        ensure!(
            !into.ok,
            "inbound to an enrolled pod worked with its agent down (fail open): {into:?}"
        );
        let untouched = lab.connect("legacy/client", to_server, AppMode::Echo, 1024)?;
        ensure_ok(
            &untouched,
            "a pod outside the mesh while n1's agent is down",
        )?;
        let meanwhile = RedirectState::of(lab, "n1")?;
        ensure!(
            meanwhile == before,
            "the redirection changed while the agent was down: {}",
            before.diff(&meanwhile)
        );
        Ok(())
    })();
    lab.start_agent("n1").context("restarting n1's agent")?;
    restart?;

    ensure_ok(
        &lab.connect("demo/client", to_server, AppMode::Echo, 1 << 20)?,
        "outbound after the restart",
    )?;
    ensure_ok(
        &lab.connect("demo/server", to_peer, AppMode::Echo, 1 << 20)?,
        "inbound after the restart",
    )?;
    let after = RedirectState::of(lab, "n1")?;
    ensure!(
        after == before,
        "the redirection differs after the restart: {}",
        before.diff(&after)
    );
    Ok(())
}

/// Two pods of one node connect, at the same time, from the same source port — so both
/// redirected sockets have the 4-tuple 127.0.0.1:P → 127.0.0.1:15001, each in its own
/// netns — to different destinations. Each must reach its own destination.
///
/// The agent is stopped (SIGSTOP) while both handshakes complete in the kernel, so both
/// original destinations are recorded at once (eBPF: two ORIGINAL_DST records; iptables:
/// two conntrack entries); only then is it let go. An eBPF key without the netns cookie
/// would make the second record overwrite the first, and a connection would reach the
/// other pod's destination.
fn same_loopback_tuple_in_two_pods(lab: &Lab) -> Result<()> {
    const SOURCE_PORT: u16 = 40123;
    let server = lab.serve("demo/server", 0, AppMode::Sha)?;
    let outside = lab.serve("outside", 0, AppMode::Sha)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let to_outside = std::net::SocketAddr::new(lab.outside_ip(Family::V4), outside.port());
    let options = |addr| ConnectOptions {
        timeout: std::time::Duration::from_secs(30),
        source_port: Some(SOURCE_PORT),
        ..ConnectOptions::tcp(addr, AppMode::Sha, 1 << 16)
    };

    let (n1_offset, n2_offset) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
    let agent = nix::unistd::Pid::from_raw(
        lab.agent_pid("n1").context("n1's agent is not running")? as i32,
    );
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP)?;
    let continued = Continue(agent);
    let (client, peer) = std::thread::scope(|scope| -> Result<_> {
        let client = scope.spawn(|| lab.connect_with("demo/client", &options(to_server)));
        let peer = scope.spawn(|| lab.connect_with("demo/peer", &options(to_outside)));
        let recorded = wait_for_established(lab, &["demo/client", "demo/peer"], SOURCE_PORT);
        drop(continued);
        recorded?;
        Ok((
            client.join().expect("client thread"),
            peer.join().expect("peer thread"),
        ))
    })?;
    ensure_ok(
        &client?,
        "demo/client → demo/server from the shared source port",
    )?;
    ensure_ok(&peer?, "demo/peer → outside from the shared source port")?;

    // Each connection went where its own pod sent it, as both ends saw it.
    let to_server_line = access_record(lab, "n1", n1_offset, "outbound", to_server)?;
    ensure!(
        field(&to_server_line, "src_workload") == "demo/client",
        "wrong pod reached demo/server: {to_server_line}"
    );
    let to_outside_line = access_record(lab, "n1", n1_offset, "outbound", to_outside)?;
    ensure!(
        field(&to_outside_line, "src_workload") == "demo/peer",
        "wrong pod reached outside: {to_outside_line}"
    );
    let inbound = access_record(lab, "n2", n2_offset, "inbound", to_server)?;
    ensure!(
        field(&inbound, "src_workload") == "demo/client",
        "demo/server was reached by the wrong pod: {inbound}"
    );
    let (client_ip, peer_ip) = (
        lab.pod("demo/client").ip(Family::V4).to_string(),
        lab.pod("demo/peer").ip(Family::V4).to_string(),
    );
    let outside_log = outside.log().join("\n");
    ensure!(
        outside_log.contains(&peer_ip) && !outside_log.contains(&client_ip),
        "outside should have been reached by demo/peer only:\n{outside_log}"
    );
    Ok(())
}

/// Sends SIGCONT to the agent when dropped, whatever happened.
struct Continue(nix::unistd::Pid);
impl Drop for Continue {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Wait until every pod of `pods` has a connected TCP socket (handshake done) on local port
/// `port` (seen by `ss` in the pod's netns), whoever accepted it.
fn wait_for_established(lab: &Lab, pods: &[&str], port: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut waiting = Vec::new();
        for pod in pods {
            let out = lab
                .command(pod, "ss")?
                // The client may already have sent all and half-closed.
                .args(["-Htn", "state", "established", "state", "fin-wait-1"])
                .args(["state", "fin-wait-2"])
                .arg(format!("( sport = :{port} )"))
                .output()
                .context("running ss")?;
            ensure!(
                out.status.success(),
                "ss in {pod}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                waiting.push(*pod);
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let mut sockets = String::new();
            for pod in &waiting {
                let out = lab.command(pod, "ss")?.arg("-tan").output()?;
                sockets.push_str(&format!("{pod}:\n{}", String::from_utf8_lossy(&out.stdout)));
            }
            anyhow::bail!("no established connection from port {port} in {waiting:?} within 20 s; their sockets:\n{sockets}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
