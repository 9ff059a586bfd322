//! Catching up at start-up: pods that were running before this agent (a restart, an
//! upgrade, an install on a busy node) were never announced by the plugin. Their
//! network namespaces are found through the node's /proc, as istio-cni does: every
//! process's `ns/net`, each distinct namespace once, matched to a pod by the addresses
//! its interfaces carry.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::protocol::PodSandbox;
use crate::{netns::Netns, workload::Workload};

/// The sandboxes of `pods` found under `proc_root`, by `namespace/name`. A pod whose
/// addresses are in no namespace there (not started yet, or gone) is not in the answer.
pub fn find_sandboxes(proc_root: &Path, pods: &[Arc<Workload>]) -> HashMap<String, PodSandbox> {
    let by_ip: HashMap<IpAddr, &Arc<Workload>> = pods
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (ip.to_canonical(), w)))
        .collect();
    let mut found = HashMap::new();
    if by_ip.is_empty() {
        return found;
    }
    for path in network_namespaces(proc_root) {
        let Some(ips) = addresses_in(&path) else {
            continue;
        };
        let Some(workload) = ips.iter().find_map(|ip| by_ip.get(ip)) else {
            continue;
        };
        found.insert(
            workload.to_string(),
            PodSandbox {
                container_id: String::new(),
                netns: path,
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
                uid: String::new(),
                ips,
            },
        );
    }
    found
}

/// Every network namespace with a process in it under `proc_root`, each once (as the
/// `ns/net` of one of its processes), the node's own left out.
pub fn network_namespaces(proc_root: &Path) -> Vec<PathBuf> {
    let host = namespace_id(&proc_root.join("1/ns/net"));
    let mut seen = HashSet::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        tracing::warn!(proc_root = %proc_root.display(), "cannot read the node's /proc: pods running before the agent started are not found there");
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|entry| entry.path().join("ns/net"))
        .filter(|path| namespace_id(path).is_some_and(|id| Some(id) != host && seen.insert(id)))
        .collect()
}

/// (device, inode) of a namespace file: equal for every process in the namespace.
fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// The non-loopback addresses of the interfaces in the namespace at `path`.
fn addresses_in(path: &Path) -> Option<Vec<IpAddr>> {
    let netns = Netns::open(path).ok()?;
    netns.run(crate::netns::interface_addresses).ok()?.ok()
}

/// A netns path as the agent can open it: `/proc/...` paths the runtime reports are
/// the node's, read here through `proc_root` (the node's /proc mounted in the agent's
/// container).
pub fn on_node(proc_root: &Path, netns: &Path) -> PathBuf {
    match netns.strip_prefix("/proc") {
        Ok(rest) if proc_root != Path::new("/proc") => proc_root.join(rest),
        _ => netns.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_are_read_through_the_mounted_proc() {
        assert_eq!(
            on_node(Path::new("/host/proc"), Path::new("/proc/42/ns/net")),
            Path::new("/host/proc/42/ns/net")
        );
        assert_eq!(
            on_node(Path::new("/host/proc"), Path::new("/var/run/netns/cni-1")),
            Path::new("/var/run/netns/cni-1")
        );
        assert_eq!(
            on_node(Path::new("/proc"), Path::new("/proc/42/ns/net")),
            Path::new("/proc/42/ns/net")
        );
    }
}
