//! `cargo xtask demo`: the mesh at work in one minute. Brings the lab up, sends
//! 1 MiB checked by sha256 across nodes (IPv4 and IPv6), within a node, and from a
//! pod outside the mesh, prints what the agents logged about each connection, and
//! always takes the lab down again.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Result;
use warren_lab::{AppMode, Family, Lab, RedirectMode, UpOptions};

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

    println!();
    if failed == 0 {
        println!(
            "demo passed: {} connections, {BYTES} bytes each, checked by sha256",
            CASES.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "demo FAILED: {failed} of {} connections failed",
            CASES.len()
        );
        Ok(ExitCode::FAILURE)
    }
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
