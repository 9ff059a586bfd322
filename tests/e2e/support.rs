//! Helpers shared by the scenarios.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use warren_lab::{ConnectReport, Lab};

/// How long to wait for an agent to write a connection's access-log line after the
/// client is done (the line is written when both directions have closed).
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Tears the lab down when dropped, so the lab goes even when a test panics.
pub struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(err) = Lab::down() {
            eprintln!("error: lab teardown failed: {err:#}");
        }
    }
}

/// The access-log line of `node`'s agent, written after `offset`, for a connection in
/// `direction` ("outbound"/"inbound") to `dst`. Waits for it to appear.
pub fn access_line(
    lab: &Lab,
    node: &str,
    offset: u64,
    direction: &str,
    dst: SocketAddr,
) -> Result<String> {
    let direction = format!("direction=\"{direction}\"");
    let dst = format!("dst={dst} ");
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let log = lab.agent_log_since(node, offset)?;
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(" access: ") && l.contains(&direction) && l.contains(&dst))
        {
            return Ok(line.to_owned());
        }
        if Instant::now() > deadline {
            bail!("agent of {node} logged no {direction} access line with {dst}within {LOG_WAIT:?}; it logged:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Access-log lines of `node`'s agent after `offset` that mention `dst` (no waiting).
pub fn access_lines_for(
    lab: &Lab,
    node: &str,
    offset: u64,
    dst: SocketAddr,
) -> Result<Vec<String>> {
    let needle = format!("dst={dst} ");
    Ok(lab
        .agent_log_since(node, offset)?
        .lines()
        .filter(|l| l.contains(" access: ") && l.contains(&needle))
        .map(str::to_owned)
        .collect())
}

pub fn ensure_ok(report: &ConnectReport, what: &str) -> Result<()> {
    ensure!(report.ok, "{what} failed: {report:?}");
    Ok(())
}

/// The last lines of every agent log, attached to a failure.
pub fn agent_log_tails(lab: &Lab) -> String {
    let mut out = String::new();
    for node in lab.nodes() {
        let path = lab.agent_log_path(&node.name);
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        out.push_str(&format!(
            "--- last lines of {} ---\n{}\n",
            path.display(),
            tail.join("\n")
        ));
    }
    out
}
