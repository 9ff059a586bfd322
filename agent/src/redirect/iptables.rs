//! iptables redirection: the fallback for kernels without the eBPF hooks. Rules live in
//! each enrolled pod's own netns (never in the node's), in two chains of the `nat` table:
//!
//! ```text
//! -A OUTPUT     -p tcp -j WARREN_OUTPUT
//! -A PREROUTING -p tcp -j WARREN_PREROUTING
//! -A WARREN_OUTPUT -m mark --mark 0x539 -j RETURN            the agent's own sockets
//! -A WARREN_OUTPUT -o lo -j RETURN                           loopback, the pod's own IPs
//! -A WARREN_OUTPUT -p tcp -j REDIRECT --to-ports 15001       outbound → the agent
//! -A WARREN_PREROUTING -p tcp --dport 15008 -j RETURN        HBONE reaches the agent as is
//! -A WARREN_PREROUTING -p tcp -j REDIRECT --to-ports 15006   inbound plain text → the agent
//! ```
//!
//! The node's own connections (kubelet's probes) are redirected too: the agent lets
//! through those a socket of the node owns and applies policy to what the node only
//! forwards (`crate::host_sockets`), which no source-address rule could tell apart.
//!
//! UDP is never matched. The original destination of a redirected connection is what
//! conntrack remembers (`SO_ORIGINAL_DST`, see [`super::OriginalDst`]).
//!
//! Each change to a pod is one `iptables-restore --noflush` batch per address family,
//! which the kernel applies atomically: a pod is never half-configured. The batch
//! declares warren's chains (which flushes them when they exist), so applying it twice
//! gives the same rules; the jumps from the built-in chains are added only when
//! `iptables-save` shows them missing.
//!
//! Each batch runs the tools as child processes and waits for them (hundreds of
//! milliseconds on a node with a big ruleset): while the agent serves, it calls them on
//! a blocking thread ([`crate::blocking`]). The child enters the pod's netns itself
//! (`pre_exec`), so any thread of the agent can run them.
//!
//! Both iptables backends are supported: `nft` (iptables-nft, the default of current
//! distributions) and `legacy` (x_tables). Rules of one backend are invisible to the
//! other's tools, so the agent uses the one the node's own rules (kube-proxy, the CNI)
//! are written with, and removes leftovers with both.
use std::{
    fmt,
    io::{self, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    process::{Command, Stdio},
};

use warren_common::{
    AGENT_SOCKET_MARK, INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT,
};

use crate::netns::Netns;

/// warren's chain for a pod's outgoing connections.
pub const OUTPUT_CHAIN: &str = "WARREN_OUTPUT";
/// warren's chain for a pod's incoming connections.
pub const PREROUTING_CHAIN: &str = "WARREN_PREROUTING";

/// `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// The backend the node's own rules use; nft when the node has none.
    #[default]
    Auto,
    /// iptables-nft (nf_tables).
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
}

/// An iptables backend: which binaries write the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Nft, Backend::Legacy];

    fn program(self, family: Family, tool: Tool) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let backend = match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        let tool = match tool {
            Tool::Save => "-save",
            Tool::Restore => "-restore",
        };
        format!("{base}-{backend}{tool}")
    }

    /// Pick the backend for `choice`: for `auto`, the one holding more of the node's
    /// rules (read in the agent's netns, the node's); nft on a tie. Logs the choice.
    pub fn choose(choice: BackendChoice) -> Result<Backend, IptablesError> {
        let available = |backend: Backend| -> Result<usize, IptablesError> {
            let program = backend.program(Family::V4, Tool::Save);
            run(None, &program, &[], None).map(|saved| count_rules(&saved))
        };
        let backend = match choice {
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Auto => match (available(Backend::Nft), available(Backend::Legacy)) {
                (Ok(nft), Ok(legacy)) => {
                    let backend = if legacy > nft {
                        Backend::Legacy
                    } else {
                        Backend::Nft
                    };
                    tracing::info!(%backend, node_rules_nft = nft, node_rules_legacy = legacy, "iptables backend chosen by the node's own rules");
                    backend
                }
                (Ok(_), Err(err)) => {
                    tracing::info!(backend = %Backend::Nft, legacy = %err, "iptables backend: nft (legacy is unavailable)");
                    Backend::Nft
                }
                (Err(err), Ok(_)) => {
                    tracing::info!(backend = %Backend::Legacy, nft = %err, "iptables backend: legacy (nft is unavailable)");
                    Backend::Legacy
                }
                (Err(err), Err(_)) => return Err(err),
            },
        };
        // The chosen backend must work for both families before any pod is touched.
        for family in Family::ALL {
            run(
                None,
                &backend.program(family, Tool::Save),
                &["-t", "nat"],
                None,
            )?;
        }
        Ok(backend)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];
}

#[derive(Debug, Clone, Copy)]
enum Tool {
    Save,
    Restore,
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source}. Install iptables (`apt install iptables`), which provides the nft and legacy variants, or use --redirect ebpf")]
    Spawn { program: String, source: io::Error },
    #[error("{program}{netns} failed ({status}): {stderr}")]
    Failed {
        program: String,
        netns: NetnsLabel,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// " in <netns path>" or nothing (the node's netns), for error messages.
#[derive(Debug)]
pub struct NetnsLabel(Option<String>);

impl fmt::Display for NetnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(path) => write!(f, " in {path}"),
            None => Ok(()),
        }
    }
}

/// Writes and removes warren's rules in pods' netns with one backend.
#[derive(Debug, Clone)]
pub struct IptablesRedirect {
    backend: Backend,
}

impl IptablesRedirect {
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Capture the pod in `netns`: both families, each in one atomic batch. The pod's
    /// listeners must already listen (a redirected connection without one is reset).
    pub fn enroll(&self, netns: &Netns) -> Result<(), IptablesError> {
        for family in Family::ALL {
            let saved = self.save(netns, family)?;
            let batch = install_batch(&SavedNat::parse(&saved));
            self.restore(netns, family, &batch)?;
        }
        Ok(())
    }

    fn save(&self, netns: &Netns, family: Family) -> Result<String, IptablesError> {
        save(self.backend, netns, family)
    }

    fn restore(&self, netns: &Netns, family: Family, batch: &str) -> Result<(), IptablesError> {
        restore(self.backend, netns, family, batch)
    }
}

/// Remove warren's rules from `netns`, written with either backend. Returns how many
/// chains and jumps were removed (0: there were none — a second run is a no-op). A
/// backend whose tools are not installed cannot have written rules and is skipped.
pub fn remove(netns: &Netns) -> Result<usize, IptablesError> {
    let mut removed = 0;
    for backend in Backend::ALL {
        for family in Family::ALL {
            let saved = match save(backend, netns, family) {
                Ok(saved) => saved,
                Err(IptablesError::Spawn { .. }) => continue,
                Err(err) => return Err(err),
            };
            let saved = SavedNat::parse(&saved);
            if let Some(batch) = remove_batch(&saved) {
                restore(backend, netns, family, &batch)?;
                removed += saved.jumps.len() + saved.chains.len();
            }
        }
    }
    Ok(removed)
}

/// Whether `netns` holds any warren rule, with either backend (for tests and `status`).
pub fn has_rules(netns: &Netns) -> Result<bool, IptablesError> {
    for backend in Backend::ALL {
        for family in Family::ALL {
            match save(backend, netns, family) {
                Ok(saved) if !SavedNat::parse(&saved).is_empty() => return Ok(true),
                Ok(_) | Err(IptablesError::Spawn { .. }) => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(false)
}

fn save(backend: Backend, netns: &Netns, family: Family) -> Result<String, IptablesError> {
    run(
        Some(netns),
        &backend.program(family, Tool::Save),
        &["-t", "nat"],
        None,
    )
}

fn restore(
    backend: Backend,
    netns: &Netns,
    family: Family,
    batch: &str,
) -> Result<(), IptablesError> {
    run(
        Some(netns),
        &backend.program(family, Tool::Restore),
        &["--noflush"],
        Some(batch),
    )
    .map(drop)
}

/// The `nat` table's warren parts, as `iptables-save` shows them.
#[derive(Debug, Default, PartialEq, Eq)]
struct SavedNat {
    /// `-A OUTPUT -p tcp -j WARREN_OUTPUT` and the like: rules in other chains that jump
    /// to warren's.
    jumps: Vec<String>,
    /// warren's chains that exist.
    chains: Vec<String>,
}

impl SavedNat {
    fn parse(saved: &str) -> Self {
        let mut nat = SavedNat::default();
        let mut in_nat = false;
        for line in saved.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat {
                continue;
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or_default();
                if is_warren_chain(name) {
                    nat.chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let target = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1);
                if !is_warren_chain(chain) && target.is_some_and(is_warren_chain) {
                    nat.jumps.push(rule.to_owned());
                }
            }
        }
        nat
    }

    fn is_empty(&self) -> bool {
        self.jumps.is_empty() && self.chains.is_empty()
    }

    fn has_jump(&self, from: &str, to: &str) -> bool {
        self.jumps.iter().any(|rule| {
            rule.split_whitespace().next() == Some(from)
                && rule.split_whitespace().skip_while(|w| *w != "-j").nth(1) == Some(to)
        })
    }
}

fn is_warren_chain(name: &str) -> bool {
    name.starts_with("WARREN_")
}

/// The batch that (re)writes warren's rules (the same for both families), given what is
/// there now.
/// Every inbound connection but HBONE goes to 15006, the node's own included: whether
/// the node *originated* it (a probe, let through) or only forwards it (a NodePort,
/// subject to policy) is a question of sockets, not of source addresses, and the agent
/// asks the kernel (`host_sockets`).
fn install_batch(saved: &SavedNat) -> String {
    let mut batch = String::from("*nat\n");
    // Declaring a chain with --noflush creates it, or empties it when it exists.
    for chain in [OUTPUT_CHAIN, PREROUTING_CHAIN] {
        batch.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for (from, to) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", PREROUTING_CHAIN)] {
        if !saved.has_jump(from, to) {
            batch.push_str(&format!("-A {from} -p tcp -j {to}\n"));
        }
    }
    batch.push_str(&format!(
        "-A {OUTPUT_CHAIN} -m mark --mark {AGENT_SOCKET_MARK:#x} -j RETURN\n\
         -A {OUTPUT_CHAIN} -o lo -j RETURN\n\
         -A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}\n\
         -A {PREROUTING_CHAIN} -p tcp --dport {INBOUND_TUNNEL_PORT} -j RETURN\n"
    ));
    batch.push_str(&format!(
        "-A {PREROUTING_CHAIN} -p tcp -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}\nCOMMIT\n"
    ));
    batch
}

/// The batch that removes every warren jump and chain, or `None` when there are none.
fn remove_batch(saved: &SavedNat) -> Option<String> {
    if saved.is_empty() {
        return None;
    }
    let mut batch = String::from("*nat\n");
    for jump in &saved.jumps {
        batch.push_str(&format!("-D {jump}\n"));
    }
    for chain in &saved.chains {
        batch.push_str(&format!("-F {chain}\n"));
    }
    for chain in &saved.chains {
        batch.push_str(&format!("-X {chain}\n"));
    }
    batch.push_str("COMMIT\n");
    Some(batch)
}

/// Rules (`-A` lines) in an `iptables-save` output, whatever the table.
fn count_rules(saved: &str) -> usize {
    saved.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Run an iptables tool, inside `netns` when given (the child enters it before exec, so
/// the agent's threads never move), with `stdin`; its stdout on success.
fn run(
    netns: Option<&Netns>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, IptablesError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(netns) = netns {
        let fd = netns.as_fd().as_raw_fd();
        // SAFETY: between fork and exec only setns(2), which is async-signal-safe, runs;
        // the netns fd stays open in the child until exec (it is CLOEXEC).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let spawn_error = |source| IptablesError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(IptablesError::Failed {
            program: program.to_owned(),
            netns: NetnsLabel(netns.map(|n| n.path().display().to_string())),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_batch_on_a_fresh_pod() {
        let batch = install_batch(&SavedNat::default());
        assert_eq!(
            batch,
            "*nat\n\
             :WARREN_OUTPUT - [0:0]\n\
             :WARREN_PREROUTING - [0:0]\n\
             -A OUTPUT -p tcp -j WARREN_OUTPUT\n\
             -A PREROUTING -p tcp -j WARREN_PREROUTING\n\
             -A WARREN_OUTPUT -m mark --mark 0x539 -j RETURN\n\
             -A WARREN_OUTPUT -o lo -j RETURN\n\
             -A WARREN_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
             -A WARREN_PREROUTING -p tcp --dport 15008 -j RETURN\n\
             -A WARREN_PREROUTING -p tcp -j REDIRECT --to-ports 15006\n\
             COMMIT\n"
        );
    }

    #[test]
    fn install_batch_exempts_no_source_address() {
        // The node's probes are told from forwarded traffic by socket, not by address.
        let batch = install_batch(&SavedNat::default());
        assert!(!batch.contains(" -s "), "{batch}");
    }

    const ENROLLED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:WARREN_OUTPUT - [0:0]
:WARREN_PREROUTING - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j WARREN_PREROUTING
-A OUTPUT -p tcp -j WARREN_OUTPUT
-A OUTPUT -d 10.0.0.1/32 -j OTHER
-A WARREN_OUTPUT -m mark --mark 0x539 -j RETURN
-A WARREN_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn parses_warren_chains_and_jumps_only() {
        let saved = SavedNat::parse(ENROLLED);
        assert_eq!(saved.chains, ["WARREN_OUTPUT", "WARREN_PREROUTING"]);
        assert_eq!(
            saved.jumps,
            [
                "PREROUTING -p tcp -j WARREN_PREROUTING",
                "OUTPUT -p tcp -j WARREN_OUTPUT"
            ]
        );
        assert!(SavedNat::parse("*filter\n:WARREN_OUTPUT - [0:0]\nCOMMIT\n").is_empty());
    }

    #[test]
    fn reinstall_keeps_one_jump_per_chain() {
        let batch = install_batch(&SavedNat::parse(ENROLLED));
        assert!(!batch.contains("-A OUTPUT "), "{batch}");
        assert!(!batch.contains("-A PREROUTING "), "{batch}");
        assert!(batch.contains(":WARREN_OUTPUT - [0:0]\n"), "{batch}");
    }

    #[test]
    fn remove_batch_deletes_jumps_before_chains_and_leaves_others() {
        let batch = remove_batch(&SavedNat::parse(ENROLLED)).unwrap();
        assert_eq!(
            batch,
            "*nat\n\
             -D PREROUTING -p tcp -j WARREN_PREROUTING\n\
             -D OUTPUT -p tcp -j WARREN_OUTPUT\n\
             -F WARREN_OUTPUT\n\
             -F WARREN_PREROUTING\n\
             -X WARREN_OUTPUT\n\
             -X WARREN_PREROUTING\n\
             COMMIT\n"
        );
        assert_eq!(remove_batch(&SavedNat::default()), None);
    }

    #[test]
    fn counts_rules_of_every_table() {
        assert_eq!(count_rules(ENROLLED), 5);
        assert_eq!(count_rules(""), 0);
    }
}
