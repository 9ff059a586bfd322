//! Looking at and stopping processes by pid, through `/proc` and signals.
//!
//! Agents outlive the `cargo xtask lab up` that started them, so the lab knows them
//! only by pid; before signalling a recorded pid it checks, from its command line,
//! that the pid still is that agent and was not reused.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, …), `None` if no such process.
fn state(pid: Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces and parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Whether `pid` exists and has not exited (a zombie counts as exited).
pub fn alive(pid: Pid) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The argument vector of `pid`, empty if it is gone.
pub fn cmdline(pid: Pid) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an argument vector is `warren agent … --node <node> …`.
pub fn is_agent_cmdline(argv: &[String], node: &str) -> bool {
    let is_warren = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "warren");
    let has_node = argv.windows(2).any(|w| w[0] == "--node" && w[1] == node)
        || argv.iter().any(|a| *a == format!("--node={node}"));
    is_warren && argv.get(1).is_some_and(|a| a == "agent") && has_node
}

/// Whether `pid` is alive and is the lab agent of `node`.
pub fn is_agent(pid: Pid, node: &str) -> bool {
    alive(pid) && is_agent_cmdline(&cmdline(pid), node)
}

/// Wait until `pid` has exited; `false` if it is still running after `timeout`.
pub fn wait_exit(pid: Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Send `signal`; a process that is already gone is not an error.
pub fn signal(pid: Pid, signal: Signal) -> nix::Result<()> {
    match kill(pid, signal) {
        Err(Errno::ESRCH) => Ok(()),
        other => other,
    }
}

/// SIGTERM every pid, give them `grace` to exit (the agent cleans up its redirection
/// on SIGTERM), then SIGKILL the rest and wait for them.
pub fn terminate(pids: &[Pid], grace: Duration) {
    for &pid in pids {
        let _ = signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for &pid in pids {
        let left = deadline.saturating_duration_since(Instant::now());
        if !wait_exit(pid, left) {
            let _ = signal(pid, Signal::SIGKILL);
            wait_exit(pid, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn recognises_agent_command_lines() {
        let a = argv("/t/debug/warren agent --node n1 --config /run/warren-lab/lab.yaml");
        assert!(is_agent_cmdline(&a, "n1"));
        assert!(!is_agent_cmdline(&a, "n2"));
        assert!(is_agent_cmdline(&argv("warren agent --node=n2"), "n2"));
        assert!(!is_agent_cmdline(
            &argv("/usr/bin/sleep agent --node n1"),
            "n1"
        ));
        assert!(!is_agent_cmdline(&argv("warren ca --node n1"), "n1"));
        assert!(!is_agent_cmdline(&[], "n1"));
    }

    #[test]
    fn sees_own_process() {
        let me = Pid::this();
        assert!(alive(me));
        assert!(!cmdline(me).is_empty());
        assert!(!alive(Pid::from_raw(i32::MAX)));
    }
}
