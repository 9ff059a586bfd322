//! `cargo xtask demo`: the mesh at work in one minute. Brings the lab up, sends
//! 1 MiB checked by sha256 across nodes (IPv4 and IPv6), within a node, and from a
//! pod outside the mesh, prints what the agents logged about each connection, and
//! always takes the lab down again.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Result;
use warren_lab::{AppMode, ConnectOptions, Family, Lab, RedirectMode, UpOptions};

use crate::setup::{self, Scope};

const PORT: u16 = 8080;
const BYTES: u64 = 1 << 20;

/// Takes the lab down when the demo ends, however it ends.
struct DownGuard;

impl Drop for DownGuard {
    fn drop(&mut self) {
        println!("\ntaking the lab down");
        if let Err(e) = Lab::down() {
            eprintln!("error: taking the lab down: {e:#}");
        }
    }
}

struct Case {
    from: &'static str,
    to: &'static str,
    family: Family,
    what: &'static str,
}

const CASES: &[Case] = &[
    Case {
        from: "demo/client",
        to: "demo/server",
        family: Family::V4,
        what: "across nodes",
    },
    Case {
        from: "demo/client",
        to: "demo/server",
        family: Family::V6,
        what: "across nodes",
    },
    Case {
        from: "demo/client",
        to: "demo/peer",
        family: Family::V4,
        what: "same node",
    },
    Case {
        from: "legacy/client",
        to: "demo/server",
        family: Family::V4,
        what: "from outside the mesh",
    },
];

pub fn run(redirect: RedirectMode, agents: bool) -> Result<ExitCode> {
    let options = if agents {
        UpOptions::with_agents(redirect)
    } else {
        UpOptions::no_agents()
    };
    setup::ensure(if agents {
        Scope::Everything
    } else {
        Scope::Tools
    })?;
    let _down = DownGuard;
    let lab = Lab::up(&options)?;
    println!("lab is up, mode {}", lab.mode());

    // Servers are dropped (killed) before the guard takes the lab down.
    let _servers = ["demo/server", "demo/peer"]
        .iter()
        .map(|target| lab.serve(target, PORT, AppMode::Sha))
        .collect::<Result<Vec<_>>>()?;

    let mut failed = 0;
    for case in CASES {
        let addr: SocketAddr = lab.pod(case.to).addr(case.family, PORT);
        let offsets: Vec<(String, u64)> = lab
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), lab.agent_log_len(&n.name)))
            .collect();
        let report = lab.connect(case.from, addr, AppMode::Sha, BYTES)?;
        println!(
            "\n{} {} -> {} {addr} ({}, {}): {}",
            if report.ok { "PASS" } else { "FAIL" },
            case.from,
            case.to,
            case.family,
            case.what,
            report.detail
        );
        println!("  client: {}", report.to_json());
        if !report.ok {
            failed += 1;
        }
        if agents {
            print_agent_lines(&lab, &offsets, &addr.to_string());
        }
    }

    if agents {
        failed += wire_proof(&lab)?;
    }

    println!();
    if failed == 0 {
        println!(
            "demo passed: {} connections, {BYTES} bytes each, checked by sha256",
            CASES.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo FAILED: {failed} of {} checks failed", CASES.len() + 2);
        Ok(ExitCode::FAILURE)
    }
}

/// The operator's proof, with tcpdump on the bridge between the nodes: a marker sent
/// from an enrolled pod never crosses in clear text and TLS records do; the same marker
/// from `legacy/client` (not in the mesh) is visible — the control that shows the
/// capture would have seen it. Returns the number of failed checks.
fn wire_proof(lab: &Lab) -> Result<usize> {
    println!(
        "\n== on the wire: tcpdump on {} in netns {} ==",
        lab.topology().wire.bridge,
        lab.topology().wire.netns_name
    );
    let addr = lab.pod("demo/server").addr(Family::V4, PORT);
    let mut failed = 0;
    for (from, in_mesh) in [("demo/client", true), ("legacy/client", false)] {
        let marker = format!("WARREN-DEMO-MARKER-FROM-{from}");
        let capture = lab.capture("tcp")?;
        let report = lab.connect_with(
            from,
            &ConnectOptions::tcp(addr, AppMode::Sha, 64 * 1024).with_marker(&marker),
        )?;
        let captured = capture.stop()?;
        let clear = captured.contains(marker.as_bytes());
        let tls = captured.tls_records()?;
        let ok = report.ok && if in_mesh { !clear && tls > 0 } else { clear };
        println!(
            "{} {from} -> demo/server {addr}: marker {:?} {} on the wire; {tls} packets of TLS application data on port 15008",
            if ok { "PASS" } else { "FAIL" },
            marker,
            if clear { "seen in clear text" } else { "not seen" },
        );
        println!(
            "     {}",
            if in_mesh {
                "expected: encrypted (demo is in the mesh)"
            } else {
                "expected: clear text (legacy is not in the mesh; this is the control that proves the capture works)"
            }
        );
        if !report.ok {
            println!("     the connection itself failed: {}", report.detail);
        }
        if !ok {
            failed += 1;
        }
    }
    println!("     try it yourself: cargo xtask lab up; cargo xtask lab exec wire -- tcpdump -ni br0 -A tcp");
    Ok(failed)
}

/// The agent log lines, written since `offsets`, that name the destination.
fn print_agent_lines(lab: &Lab, offsets: &[(String, u64)], destination: &str) {
    let mut any = false;
    for (node, offset) in offsets {
        let text = lab.agent_log_since(node, *offset).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(destination)) {
            println!("  agent {node}: {line}");
            any = true;
        }
    }
    if !any {
        println!("  (no agent logged a line naming {destination})");
    }
}
