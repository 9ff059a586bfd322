//! Catching up at start-up: pods that were running before this agent (a restart, an
//! upgrade, an install on a busy node) were never announced by the plugin. Their
//! network namespaces are found through the node's /proc, as istio-cni does: every
//! process's `ns/net`, each distinct namespace once, matched to a pod by the addresses
//! its interfaces carry.
//!
//! Those addresses are the namespace's own say: a process that may add an address to an
//! interface (a dummy interface, `NET_ADMIN` in its pod) can carry another pod's. So the
//! match is strict, and anything unclear is refused rather than guessed:
//!
//! - a namespace matches a pod only if it holds **all** of the pod's addresses
//!   (`status.podIPs`);
//! - a pod matched by more than one namespace is **ambiguous**, and a namespace that
//!   matches more than one pod is **shared**: the pods concerned are refused — logged
//!   with the candidates, not served (a pod captured before stays failed closed) — until
//!   `warren-cni` reports their sandbox (a restart of the pod) or the extra addresses go;
//! - a namespace the agent already knows as a pod's sandbox (from `warren-cni`, or an
//!   earlier search) is nobody else's: it is left out of the search.
//!
//! [`match_pods`] is the matching alone, pure; [`find_sandboxes`] feeds it the node's
//! namespaces. That search blocks — it walks /proc and enters every network namespace of
//! the node — so the agent runs it on a blocking thread, never on a data-path worker
//! ([`crate::blocking`]).
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::protocol::PodSandbox;
use crate::{netns::Netns, workload::Workload};

/// A network namespace of the node and the non-loopback addresses of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceAddresses {
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// What a search found: the sandboxes of the pods matched, by `namespace/name`, and the
/// pods refused. A pod in neither was not found (not started yet, or gone).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub sandboxes: BTreeMap<String, PodSandbox>,
    pub refused: Vec<Refused>,
}

/// A pod whose network namespace cannot be told from /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// More than one namespace holds all of the pod's addresses.
    Ambiguous {
        pod: String,
        candidates: Vec<PathBuf>,
    },
    /// The one namespace holding all of the pod's addresses holds all of other pods' too.
    Shared {
        pod: String,
        netns: PathBuf,
        others: Vec<String>,
    },
}

impl Refused {
    /// The pod refused, `namespace/name`.
    pub fn pod(&self) -> &str {
        match self {
            Refused::Ambiguous { pod, .. } | Refused::Shared { pod, .. } => pod,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Ambiguous { pod, candidates } => {
                let candidates: Vec<String> =
                    candidates.iter().map(|c| c.display().to_string()).collect();
                write!(
                    f,
                    "{} network namespaces hold all the addresses of pod {pod}: {}; one of them carries addresses that are not its own",
                    candidates.len(),
                    candidates.join(", ")
                )
            }
            Refused::Shared { pod, netns, others } => write!(
                f,
                "the network namespace {} holds all the addresses of pod {pod} and of {}; it carries addresses that are not its own",
                netns.display(),
                others.join(", ")
            ),
        }
    }
}

/// The sandboxes of `pods` found under `proc_root`, leaving out the namespaces of
/// `claimed` (netns paths, as the agent opens them, of the sandboxes already known).
pub fn find_sandboxes(proc_root: &Path, pods: &[Arc<Workload>], claimed: &[PathBuf]) -> Found {
    find_sandboxes_with(proc_root, pods, claimed, addresses_in)
}

/// [`find_sandboxes`] with the addresses of a namespace read by `addresses` (entering it,
/// in the agent; a fake list, in tests).
fn find_sandboxes_with(
    proc_root: &Path,
    pods: &[Arc<Workload>],
    claimed: &[PathBuf],
    addresses: impl Fn(&Path) -> Option<Vec<IpAddr>>,
) -> Found {
    if pods.iter().all(|pod| pod.ips.is_empty()) {
        return Found::default();
    }
    let claimed: HashSet<(u64, u64)> = claimed.iter().filter_map(|p| namespace_id(p)).collect();
    let namespaces: Vec<NamespaceAddresses> = network_namespaces(proc_root)
        .into_iter()
        .filter(|path| namespace_id(path).is_some_and(|id| !claimed.contains(&id)))
        .filter_map(|netns| {
            let ips = addresses(&netns)?;
            Some(NamespaceAddresses { netns, ips })
        })
        .collect();
    match_pods(pods, &namespaces)
}

/// Match `pods` to `namespaces`: a namespace matches a pod when it holds every one of
/// the pod's addresses; a pod is found when exactly one namespace matches it and that
/// namespace matches no other pod, refused when more match. A pod without addresses
/// matches nothing.
pub fn match_pods(pods: &[Arc<Workload>], namespaces: &[NamespaceAddresses]) -> Found {
    let holds_all = |ns: &NamespaceAddresses, pod: &Workload| {
        let held: HashSet<IpAddr> = ns.ips.iter().map(|ip| ip.to_canonical()).collect();
        pod.ips.iter().all(|ip| held.contains(&ip.to_canonical()))
    };
    let pods: Vec<&Arc<Workload>> = pods.iter().filter(|pod| !pod.ips.is_empty()).collect();
    // For each pod, the namespaces that match it (indices into `namespaces`).
    let candidates: Vec<Vec<usize>> = pods
        .iter()
        .map(|pod| {
            (0..namespaces.len())
                .filter(|&i| holds_all(&namespaces[i], pod))
                .collect()
        })
        .collect();
    let mut found = Found::default();
    for (pod, matched) in pods.iter().zip(&candidates) {
        let name = pod.to_string();
        match matched.as_slice() {
            [] => {}
            [one] => {
                let others: Vec<String> = pods
                    .iter()
                    .zip(&candidates)
                    .filter(|(other, theirs)| other.to_string() != name && theirs.contains(one))
                    .map(|(other, _)| other.to_string())
                    .collect();
                let netns = namespaces[*one].netns.clone();
                if others.is_empty() {
                    found.sandboxes.insert(
                        name,
                        PodSandbox {
                            container_id: String::new(),
                            netns,
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            uid: String::new(),
                            ips: pod.ips.clone(),
                        },
                    );
                } else {
                    found.refused.push(Refused::Shared {
                        pod: name,
                        netns,
                        others,
                    });
                }
            }
            several => found.refused.push(Refused::Ambiguous {
                pod: name,
                candidates: several
                    .iter()
                    .map(|&i| namespaces[i].netns.clone())
                    .collect(),
            }),
        }
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

    fn pod(name: &str, ips: &[&str]) -> Arc<Workload> {
        Workload::test_pod(name, "n1", ips)
    }

    fn netns(path: &str, ips: &[&str]) -> NamespaceAddresses {
        NamespaceAddresses {
            netns: path.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    fn found_netns(found: &Found, pod: &str) -> Option<PathBuf> {
        found.sandboxes.get(pod).map(|s| s.netns.clone())
    }

    #[test]
    fn a_namespace_holding_all_of_a_pods_addresses_is_its_sandbox() {
        let pods = [
            pod("server", &["10.0.0.2", "fd00::2"]),
            pod("client", &["10.0.0.1"]),
        ];
        let found = match_pods(
            &pods,
            &[
                netns("/proc/10/ns/net", &["10.0.0.1", "fe80::1"]),
                // Only the IPv4 address of a dual-stack pod: not it.
                netns("/proc/20/ns/net", &["10.0.0.2"]),
                netns("/proc/30/ns/net", &["fe80::2", "fd00::2", "10.0.0.2"]),
            ],
        );
        assert_eq!(
            found_netns(&found, "demo/client"),
            Some("/proc/10/ns/net".into())
        );
        assert_eq!(
            found_netns(&found, "demo/server"),
            Some("/proc/30/ns/net".into())
        );
        assert!(found.refused.is_empty());
        assert_eq!(
            found.sandboxes["demo/server"].ips, pods[0].ips,
            "the pod's addresses, not whatever else the namespace carries"
        );
    }

    #[test]
    fn one_address_of_a_dual_stack_pod_is_not_enough() {
        // A pod that added the victim's IPv4 address to a dummy interface.
        let found = match_pods(
            &[pod("victim", &["10.0.0.2", "fd00::2"])],
            &[netns("/proc/66/ns/net", &["10.0.0.9", "10.0.0.2"])],
        );
        assert_eq!(found, Found::default());
    }

    #[test]
    fn a_pod_matched_by_two_namespaces_is_refused_not_guessed() {
        let pods = [
            pod("victim", &["10.0.0.2"]),
            pod("bystander", &["10.0.0.3"]),
        ];
        for order in [[0, 1], [1, 0]] {
            let all = [
                netns("/proc/20/ns/net", &["10.0.0.2"]),
                netns("/proc/66/ns/net", &["10.0.0.2"]),
            ];
            let namespaces: Vec<NamespaceAddresses> =
                order.iter().map(|&i| all[i].clone()).collect();
            let found = match_pods(&pods, &namespaces);
            assert!(
                found.sandboxes.is_empty(),
                "whichever comes last: {order:?}"
            );
            assert_eq!(found.refused.len(), 1);
            let Refused::Ambiguous { pod, candidates } = &found.refused[0] else {
                panic!("{:?}", found.refused);
            };
            assert_eq!(pod, "demo/victim");
            let mut candidates = candidates.clone();
            candidates.sort();
            assert_eq!(
                candidates,
                [PathBuf::from("/proc/20/ns/net"), "/proc/66/ns/net".into()]
            );
            let message = found.refused[0].to_string();
            assert!(
                message.contains("demo/victim")
                    && message.contains("/proc/20/ns/net")
                    && message.contains("/proc/66/ns/net"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_namespace_holding_two_pods_addresses_is_neither_pods() {
        // The attacker's own pod and the victim's address in one namespace; the victim's
        // own namespace is gone (or not seen): the victim is not given the attacker's.
        let pods = [pod("attacker", &["10.0.0.9"]), pod("victim", &["10.0.0.2"])];
        let found = match_pods(
            &pods,
            &[netns("/proc/66/ns/net", &["10.0.0.9", "10.0.0.2"])],
        );
        assert!(found.sandboxes.is_empty());
        let refused: Vec<&str> = found.refused.iter().map(Refused::pod).collect();
        assert_eq!(refused, ["demo/attacker", "demo/victim"]);
        assert!(matches!(
            &found.refused[1],
            Refused::Shared { netns, others, .. }
                if netns == Path::new("/proc/66/ns/net") && others == &["demo/attacker"]
        ));
    }

    #[test]
    fn v4_mapped_and_plain_addresses_are_the_same() {
        let found = match_pods(
            &[pod("server", &["::ffff:10.0.0.2"])],
            &[netns("/proc/20/ns/net", &["10.0.0.2"])],
        );
        assert!(found.sandboxes.contains_key("demo/server"));
    }

    #[test]
    fn a_pod_without_addresses_matches_nothing() {
        let found = match_pods(&[pod("starting", &[])], &[netns("/proc/20/ns/net", &[])]);
        assert_eq!(found, Found::default());
    }

    /// A fake /proc: `pid → namespace file`; processes of one namespace share the file
    /// (a hard link: the same inode, as `ns/net` of processes of one netns).
    fn fake_proc(processes: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let namespaces = root.path().join("namespaces");
        std::fs::create_dir(&namespaces).unwrap();
        for (pid, namespace) in processes {
            let file = namespaces.join(namespace);
            if !file.exists() {
                std::fs::write(&file, namespace).unwrap();
            }
            let dir = root.path().join(pid).join("ns");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::hard_link(&file, dir.join("net")).unwrap();
        }
        root
    }

    #[test]
    fn the_search_reads_each_namespace_once_skips_the_nodes_and_the_claimed() {
        let proc = fake_proc(&[
            ("1", "host"),
            ("7", "host"),
            ("10", "client"),
            ("11", "client"),
            ("20", "server"),
            ("66", "attacker"),
        ]);
        let root = proc.path();
        let addresses = |path: &Path| -> Option<Vec<IpAddr>> {
            let name = std::fs::read_to_string(path).ok()?;
            let ips: &[&str] = match name.as_str() {
                "host" => &["192.168.1.1"],
                "client" => &["10.0.0.1"],
                "server" => &["10.0.0.2", "fd00::2"],
                // Claims the server's addresses, and is known as another pod's sandbox.
                "attacker" => &["10.0.0.9", "10.0.0.2", "fd00::2"],
                _ => return None,
            };
            Some(ips.iter().map(|ip| ip.parse().unwrap()).collect())
        };
        let pods = [
            pod("client", &["10.0.0.1"]),
            pod("server", &["10.0.0.2", "fd00::2"]),
            pod("node-pod", &["192.168.1.1"]),
        ];
        let namespaces = network_namespaces(root);
        assert_eq!(namespaces.len(), 3, "{namespaces:?}");

        // Unclaimed, the attacker's namespace makes the server ambiguous.
        let found = find_sandboxes_with(root, &pods, &[], addresses);
        assert_eq!(
            found.sandboxes.keys().collect::<Vec<_>>(),
            ["demo/client"],
            "{found:?}"
        );
        assert_eq!(found.refused.len(), 1);
        assert_eq!(found.refused[0].pod(), "demo/server");

        // Known as its own pod's sandbox (warren-cni said so), it is nobody else's.
        let claimed = [root.join("66/ns/net")];
        let found = find_sandboxes_with(root, &pods, &claimed, addresses);
        assert!(found.refused.is_empty(), "{found:?}");
        assert_eq!(
            found_netns(&found, "demo/server"),
            Some(root.join("20/ns/net"))
        );
        assert!(
            matches!(found_netns(&found, "demo/client"), Some(p) if p == root.join("10/ns/net") || p == root.join("11/ns/net"))
        );
        assert!(
            !found.sandboxes.contains_key("demo/node-pod"),
            "the node's own namespace is never a pod's"
        );
    }

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
