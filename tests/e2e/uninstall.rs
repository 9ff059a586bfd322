//! Removing warren from a node. `warren uninstall`: with the agent stopped, it removes
//! everything warren added to the node — whichever mode added it — and pod traffic flows
//! directly again; a second run is a no-op. A node switched to the other redirect mode
//! keeps nothing of the old one.
use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, Family, Lab, RedirectMode, Signal};

use crate::support::{access_record, ensure_ok, field, RedirectState};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "uninstall::removes_everything_and_traffic_flows_directly",
        removes_everything,
    ),
    (
        "uninstall::switching_modes_leaves_nothing_of_the_old_one",
        switching_modes,
    ),
];

fn removes_everything(lab: &Lab) -> Result<()> {
    let installed = RedirectState::of(lab, "n1")?;
    ensure!(
        !installed.pins.is_empty() || !installed.rules.is_empty(),
        "n1 shows no redirection before the uninstall: {installed:?}"
    );
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let outside = lab.serve("outside", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let to_outside = std::net::SocketAddr::new(lab.outside_ip(Family::V4), outside.port());

    lab.kill_agent("n1", Signal::SIGTERM)?;
    let result = (|| -> Result<()> {
        let first = uninstall(lab)?;
        ensure!(
            first.contains("removed"),
            "the first uninstall should report what it removed:\n{first}"
        );
        let after = RedirectState::of(lab, "n1")?;
        ensure!(
            after.pins.is_empty() && after.rules.is_empty(),
            "warren state left on n1 after uninstall: {}",
            installed.diff(&after)
        );
        ensure!(
            !std::path::Path::new("/sys/fs/bpf/warren/n1").exists(),
            "/sys/fs/bpf/warren/n1 is still there"
        );
        ensure!(
            after.bpf_links <= installed.bpf_links,
            "BPF links grew: {} → {}",
            installed.bpf_links,
            after.bpf_links
        );

        // Direct: with no agent on n1, its pods reach the outside and n2's server; the
        // server's agent sees plain text from demo/client (PERMISSIVE lets it in).
        ensure_ok(
            &lab.connect("demo/client", to_outside, AppMode::Echo, 4096)?,
            "demo/client → outside after uninstall",
        )?;
        let n2 = lab.agent_log_len("n2");
        ensure_ok(
            &lab.connect("demo/client", to_server, AppMode::Echo, 4096)?,
            "demo/client → demo/server after uninstall",
        )?;
        let record = access_record(lab, "n2", n2, "inbound", to_server)?;
        ensure!(
            field(&record, "security") == "none" && field(&record, "src_workload") == "demo/client",
            "demo/client's connection should arrive directly, in plain text: {record}"
        );

        let second = uninstall(lab)?;
        ensure!(
            second.contains("nothing to remove"),
            "the second uninstall should find nothing:\n{second}"
        );
        Ok(())
    })();
    lab.start_agent("n1").context("restarting n1's agent")?;
    result?;
    ensure_ok(
        &lab.connect("demo/client", to_server, AppMode::Echo, 4096)?,
        "demo/client → demo/server once the agent is back",
    )?;
    let back = RedirectState::of(lab, "n1")?;
    ensure!(
        back.pins == installed.pins && back.rules == installed.rules,
        "the restarted agent should put the same redirection back: {}",
        installed.diff(&back)
    );
    Ok(())
}

/// Restart n1's agent in the other redirect mode: only the new mode's state is there,
/// traffic flows both ways through it; back in the lab's mode, the state is what it was.
fn switching_modes(lab: &Lab) -> Result<()> {
    let (own, other) = match lab.redirect() {
        Some(RedirectMode::Iptables) => (RedirectMode::Iptables, RedirectMode::Ebpf),
        _ => (RedirectMode::Ebpf, RedirectMode::Iptables),
    };
    let before = RedirectState::of(lab, "n1")?;
    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let peer = lab.serve("demo/peer", 0, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let to_peer = lab.pod("demo/peer").addr(Family::V4, peer.port());

    lab.kill_agent("n1", Signal::SIGTERM)?;
    let switched = (|| -> Result<()> {
        lab.start_agent_with_redirect("n1", other)?;
        let now = RedirectState::of(lab, "n1")?;
        let (ebpf_left, iptables_left) = (!now.pins.is_empty(), !now.rules.is_empty());
        match other {
            RedirectMode::Iptables => ensure!(
                iptables_left && !ebpf_left,
                "after switching n1 from {own} to {other}, only iptables rules should be there: {}",
                before.diff(&now)
            ),
            _ => ensure!(
                ebpf_left && !iptables_left,
                "after switching n1 from {own} to {other}, only eBPF pins should be there: {}",
                before.diff(&now)
            ),
        }
        for (from, dst) in [("demo/client", to_server), ("demo/server", to_peer)] {
            let n1 = lab.agent_log_len("n1");
            ensure_ok(
                &lab.connect(from, dst, AppMode::Echo, 4096)?,
                &format!("{from} → {dst} with n1 in {other} mode"),
            )?;
            let direction = if from == "demo/client" {
                "outbound"
            } else {
                "inbound"
            };
            let record = access_record(lab, "n1", n1, direction, dst)?;
            ensure!(
                field(&record, "security") == "mutual_tls",
                "n1 in {other} mode should tunnel {from} → {dst}: {record}"
            );
        }
        lab.kill_agent("n1", Signal::SIGTERM)
    })();
    if lab.agent_pid("n1").is_some() {
        lab.kill_agent("n1", Signal::SIGTERM)?;
    }
    lab.start_agent("n1")
        .context("restarting n1's agent in the lab's mode")?;
    switched?;
    let back = RedirectState::of(lab, "n1")?;
    ensure!(
        back.pins == before.pins && back.rules == before.rules,
        "back in {own} mode, n1 should hold what it held before: {}",
        before.diff(&back)
    );
    Ok(())
}

/// Run `warren uninstall` for n1 in n1's netns; its stdout.
fn uninstall(lab: &Lab) -> Result<String> {
    let warren = warren_lab::cargo::build_bin("warren", "warren")?;
    let out = lab
        .command("node/n1", warren)?
        .args(["uninstall", "--node", "n1", "--config"])
        .arg(lab.config_path())
        .output()
        .context("running warren uninstall")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "warren uninstall failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}
