//! Removing the lab, from any state: a healthy lab, a half-created one, or leftovers
//! without `state.json`. Everything is found by name pattern as well as from the
//! record, and every step runs even when an earlier one failed.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use nix::unistd::Pid;

use crate::agent::BPF_PIN_ROOT;
use crate::state::{LabLock, RuntimeDir, State};
use crate::topology::{Topology, LAB_CGROUP};
use crate::{cgroup, mounts, netns, process};

/// How long agents get to exit after SIGTERM before SIGKILL.
pub const AGENT_GRACE: Duration = Duration::from_secs(5);

/// What happens to the runtime directory at the end of [`down`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeDirRemoval {
    /// Remove it, lock file included (`lab down`).
    All,
    /// Empty it but keep the lock file, because the caller goes on to create a new
    /// lab under the same lock (`lab up` clearing leftovers).
    KeepLock,
    /// Keep the lock file and the agent logs (`lab up` that failed: the logs say
    /// why; `lab down` removes them).
    KeepLockAndLogs,
}

/// Remove everything the lab may have created. Call with the lock held.
pub fn down(dir: &RuntimeDir, _lock: &LabLock, removal: RuntimeDirRemoval) -> Result<()> {
    let mut failures: Vec<String> = Vec::new();
    // A state file from another version or a torn one must not stop the cleanup.
    let state: Option<State> = dir.read_state().unwrap_or_default();
    let lab_cgroup: Option<PathBuf> = match &state {
        Some(s) => Some(s.topology.lab_cgroup.clone()),
        None => mounts::cgroup2_mount().ok().map(|m| m.join(LAB_CGROUP)),
    };
    let nodes = node_names(state.as_ref(), lab_cgroup.as_deref());

    // 1. Agents first and gently: on SIGTERM they remove their redirection.
    let mut agents: BTreeSet<Pid> = BTreeSet::new();
    if let Some(state) = &state {
        for (node, record) in &state.agents {
            if let Some(pid) = record.pid.map(Pid::from_raw) {
                if process::is_agent(pid, node) {
                    agents.insert(pid);
                }
            }
        }
    }
    if let Some(lab_cgroup) = &lab_cgroup {
        for node in &nodes {
            agents.extend(cgroup::procs(&lab_cgroup.join(node).join("agent")));
        }
    }
    agents.remove(&Pid::this());
    process::terminate(&agents.into_iter().collect::<Vec<_>>(), AGENT_GRACE);

    // 2. Whatever still runs in a lab cgroup (servers started in pods, …).
    if let Some(lab_cgroup) = &lab_cgroup {
        if let Err(e) = cgroup::kill_all(lab_cgroup, Duration::from_secs(5)) {
            failures.push(format!("{e:#}"));
        }
    }

    // 3. Namespaces, after the processes living in them (started with `ip netns
    //    exec` or a node target, which are in no lab cgroup).
    match netns::list_lab() {
        Ok(names) => {
            for name in names {
                let pids: Vec<Pid> = netns::pids(&name)
                    .into_iter()
                    .filter(|p| *p != Pid::this())
                    .collect();
                process::terminate(&pids, Duration::from_secs(1));
                if let Err(e) = netns::delete(&name) {
                    failures.push(format!("{e:#}"));
                }
            }
        }
        Err(e) => failures.push(format!("{e:#}")),
    }

    // 4. cgroups, bottom-up.
    if let Some(lab_cgroup) = &lab_cgroup {
        if let Err(e) = cgroup::remove_tree(lab_cgroup) {
            failures.push(format!("{e:#}"));
        }
    }

    // 5. The agents' eBPF pins.
    if let Err(e) = remove_pins(Path::new(BPF_PIN_ROOT), &nodes) {
        failures.push(e);
    }

    // 6. The runtime directory.
    let removed = match removal {
        RuntimeDirRemoval::All => fs::remove_dir_all(dir.root()),
        RuntimeDirRemoval::KeepLock => empty_except(dir, false),
        RuntimeDirRemoval::KeepLockAndLogs => empty_except(dir, true),
    };
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => failures.push(format!("removing {}: {e}", dir.root().display())),
    }

    if !failures.is_empty() {
        bail!(
            "lab down could not remove everything:\n  - {}\nfix the cause and run `cargo xtask lab down` again",
            failures.join("\n  - ")
        );
    }
    Ok(())
}

fn empty_except(dir: &RuntimeDir, keep_logs: bool) -> std::io::Result<()> {
    for entry in fs::read_dir(dir.root())? {
        let entry = entry?;
        let path = entry.path();
        if path == dir.lock_file() || (keep_logs && path.extension().is_some_and(|e| e == "log")) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Node names from the record, from the cgroup tree, and from the standard topology.
fn node_names(state: Option<&State>, lab_cgroup: Option<&Path>) -> BTreeSet<String> {
    let mut nodes: BTreeSet<String> = Topology::standard(Path::new("/"))
        .nodes
        .into_iter()
        .map(|n| n.name)
        .collect();
    if let Some(state) = state {
        nodes.extend(state.topology.nodes.iter().map(|n| n.name.clone()));
    }
    if let Some(entries) = lab_cgroup.and_then(|c| fs::read_dir(c).ok()) {
        nodes.extend(
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    nodes
}

/// Remove `<root>/<node>` for each lab node, then `<root>` if nothing else is left in
/// it (a real agent on this machine would pin beside ours).
fn remove_pins(root: &Path, nodes: &BTreeSet<String>) -> std::result::Result<(), String> {
    for node in nodes {
        let dir = root.join(node);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing eBPF pins {}: {e}", dir.display())),
        }
    }
    match fs::remove_dir(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", root.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_lab_node_pins() {
        let root = std::env::temp_dir().join(format!("warren-lab-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("n1/maps")).unwrap();
        fs::write(root.join("n1/maps/x"), "").unwrap();
        fs::create_dir_all(root.join("real-node")).unwrap();
        let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        remove_pins(&root, &nodes).unwrap();
        assert!(!root.join("n1").exists());
        assert!(root.join("real-node").exists(), "foreign pins are kept");
        fs::remove_dir(root.join("real-node")).unwrap();
        remove_pins(&root, &nodes).unwrap();
        assert!(!root.exists());
        remove_pins(&root, &nodes).unwrap();
    }

    #[test]
    fn knows_standard_nodes_without_state() {
        let nodes = node_names(None, None);
        assert!(nodes.contains("n1") && nodes.contains("n2"));
    }
}
