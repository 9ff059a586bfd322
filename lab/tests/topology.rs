//! The lab checks itself on the machine (needs root, like every netns test; it fails
//! rather than skips without it): pods reach each other across and within nodes on
//! both families, nodes reach pods, pods reach the outside host, pod commands run in
//! the pod's cgroup, and `lo` is up everywhere.
//!
//! It uses the lab that is up, whatever its mode, or brings one up without agents and
//! takes it down again.

use std::net::{TcpListener, UdpSocket};
use std::thread;

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, ConnectOptions, Family, Lab, UpOptions};

/// Takes the lab down at the end if this test brought it up (a value, not an
/// `Option<Guard>`, so that no temporary guard is ever dropped early).
struct DownIfCreated(bool);

impl Drop for DownIfCreated {
    fn drop(&mut self) {
        if self.0 {
            if let Err(e) = Lab::down() {
                eprintln!("taking the lab down: {e:#}");
            }
        }
    }
}

#[test]
fn topology_connects_what_it_should() -> Result<()> {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run `sudo -E cargo xtask test`"
    );
    let created = !Lab::is_up();
    let lab = if created {
        Lab::up(&UpOptions::no_agents())?
    } else {
        Lab::load()?
    };
    let _down = DownIfCreated(created);

    let server = lab.serve("demo/server", 0, AppMode::Echo)?;
    let peer = lab.serve("demo/peer", 0, AppMode::Sha)?;
    let outside = lab.serve("outside", 0, AppMode::Greet)?;
    let udp = lab.serve_udp("demo/peer", 0)?;

    let cases = [
        (
            "demo/client",
            lab.pod("demo/server").addr(Family::V4, server.port()),
            AppMode::Echo,
        ),
        (
            "demo/client",
            lab.pod("demo/server").addr(Family::V6, server.port()),
            AppMode::Echo,
        ),
        (
            "legacy/client",
            lab.pod("demo/peer").addr(Family::V6, peer.port()),
            AppMode::Sha,
        ),
        (
            "demo/server",
            lab.pod("demo/peer").addr(Family::V4, peer.port()),
            AppMode::Sha,
        ),
        (
            "node/n1",
            lab.pod("demo/server").addr(Family::V4, server.port()),
            AppMode::Echo,
        ),
        (
            "node/n2",
            lab.pod("demo/peer").addr(Family::V6, peer.port()),
            AppMode::Sha,
        ),
        (
            "demo/client",
            (lab.outside_ip(Family::V4), outside.port()).into(),
            AppMode::Greet,
        ),
        (
            "demo/server",
            (lab.outside_ip(Family::V6), outside.port()).into(),
            AppMode::Greet,
        ),
    ];
    // From several threads at once, as tests use the lab.
    thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(from, addr, mode)| {
                let lab = &lab;
                scope.spawn(move || -> Result<()> {
                    let report = lab.connect(from, addr, mode, 200_000)?;
                    ensure!(report.ok, "{from} -> {addr} ({mode}) failed: {report:?}");
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("connect thread panicked")?;
        }
        Ok(())
    })?;

    let report = lab.connect_with(
        "outside",
        &ConnectOptions::udp(lab.pod("demo/peer").addr(Family::V6, udp.port()), 1200),
    )?;
    ensure!(report.ok, "UDP outside -> demo/peer failed: {report:?}");

    // A pod command runs in the pod's cgroup.
    let out = lab
        .command("demo/client", "cat")?
        .arg("/proc/self/cgroup")
        .output()?;
    let cgroups = String::from_utf8(out.stdout)?;
    let client = lab.pod("demo/client");
    let relative = client.cgroup.strip_prefix(&lab.topology().cgroup2_mount)?;
    ensure!(
        cgroups
            .lines()
            .any(|l| l == format!("0::/{}", relative.display())),
        "demo/client command is not in {}: {cgroups}",
        client.cgroup.display()
    );

    // Loopback works in every namespace (the agent redirects to 127.0.0.1 and ::1).
    let targets: Vec<String> = lab
        .pods()
        .iter()
        .map(|p| p.id())
        .chain(lab.nodes().iter().map(|n| format!("node/{}", n.name)))
        .chain(["outside".to_string(), "wire".to_string()])
        .collect();
    for target in &targets {
        lab.run_in(target, || -> Result<()> {
            for ip in ["127.0.0.1:0", "[::1]:0"] {
                let listener = TcpListener::bind(ip).with_context(|| format!("binding {ip}"))?;
                std::net::TcpStream::connect(listener.local_addr()?)
                    .with_context(|| format!("connecting to {ip} in {target}"))?;
            }
            // And the namespace is not the test's own: the pod's address is local.
            if let Some(pod) = lab.try_pod(target) {
                UdpSocket::bind((pod.ipv4, 0))
                    .with_context(|| format!("{} is not local in {target}", pod.ipv4))?;
                UdpSocket::bind((pod.ipv6, 0))
                    .with_context(|| format!("{} is not local in {target}", pod.ipv6))?;
            }
            Ok(())
        })??;
    }

    // With agents: stop one and start it again through the API, then traffic flows.
    if lab.redirect().is_some() {
        let before = lab
            .agent_pid("n2")
            .context("the agent of n2 is not running")?;
        lab.kill_agent("n2", warren_lab::Signal::SIGTERM)?;
        ensure!(
            lab.agent_pid("n2").is_none(),
            "the agent of n2 still runs after kill_agent"
        );
        let after = lab.start_agent("n2")?;
        ensure!(after != before && lab.agent_pid("n2") == Some(after));
        let addr = lab.pod("demo/server").addr(Family::V6, server.port());
        let report = lab.connect("demo/client", addr, AppMode::Echo, 100_000)?;
        ensure!(report.ok, "after restarting the agent of n2: {report:?}");
    }
    Ok(())
}
