//! Kubernetes mode: follow the cluster. Every new [`ClusterState`] and every CNI
//! request comes to one task, which owns the [`Enrollment`]: this node's pods in the
//! mesh whose network namespace is known (from `warren-cni`, or found in /proc) are
//! served; the policies in force are the state's.
//!
//! A CNI ADD is answered only after the reconcile that follows it, so a mesh pod's
//! containers start captured. The pod watch may lag behind the runtime: an ADD for a
//! pod the state does not know yet waits a little for it.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use super::{Enrollment, POLL_INTERVAL};
use crate::{
    blocking,
    cni::{
        procfs,
        protocol::{PodSandbox, Reply, Request},
        server::{self, CniEvent, Sandboxes},
    },
    control::{
        kubernetes::{ClusterState, KubernetesControl},
        local::LocalConfig,
    },
    policy::SharedPolicy,
    workload::Workload,
};

/// How often /proc is searched again for the same pods that were not found there.
const PROC_RESCAN: Duration = Duration::from_secs(10);
/// How long an ADD waits for the API server to show its pod.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(10);

/// What the follow loop reads from, and what it remembers between states.
pub struct ClusterSource {
    node: String,
    control: KubernetesControl,
    cni: mpsc::Receiver<CniEvent>,
    cni_socket: PathBuf,
    proc_root: PathBuf,
    sandboxes: Sandboxes,
    /// Sandboxes already checked for an earlier agent's rules.
    checked: HashSet<(String, PathBuf)>,
    /// When /proc was last searched, and for which pods.
    last_proc_scan: Option<(std::time::Instant, BTreeSet<String>)>,
}

impl ClusterSource {
    /// The cluster's watches (listed once) and the CNI socket's requests, for `node`.
    pub fn new(
        node: String,
        control: KubernetesControl,
        cni: mpsc::Receiver<CniEvent>,
        cni_socket: PathBuf,
        proc_root: PathBuf,
    ) -> Self {
        Self {
            node,
            control,
            cni,
            cni_socket,
            proc_root,
            sandboxes: Sandboxes::default(),
            checked: HashSet::new(),
            last_proc_scan: None,
        }
    }

    /// The cluster's state now.
    pub fn state(&self) -> Arc<ClusterState> {
        self.control.current()
    }

    /// `state` as this node sees it: see [`node_config`].
    pub fn node_config(&self, state: &ClusterState) -> LocalConfig {
        node_config(state, &self.node, &self.sandboxes, &self.proc_root)
    }

    /// This node's pods in the mesh that can be served: see [`servable`].
    pub fn servable(&self, local: &LocalConfig) -> Vec<Arc<Workload>> {
        servable(local, &self.node)
    }

    /// Look for `pods`' network namespaces in /proc and record those found. The
    /// namespaces of the sandboxes already known (from `warren-cni`, or an earlier
    /// search) are nobody else's and are not searched; a pod whose namespace cannot be
    /// told (see [`procfs`]) is refused: logged, not recorded, so not served. The search
    /// enters every network namespace of the node: it runs on a blocking thread
    /// ([`crate::blocking`]).
    pub async fn find_running(&mut self, pods: &[Arc<Workload>]) {
        let claimed: Vec<PathBuf> = self
            .sandboxes
            .iter()
            .map(|sandbox| procfs::on_node(&self.proc_root, &sandbox.netns))
            .collect();
        let (proc_root, pods) = (self.proc_root.clone(), pods.to_vec());
        let found =
            blocking::run(move || procfs::find_sandboxes(&proc_root, &pods, &claimed)).await;
        for refused in &found.refused {
            tracing::error!(pod = refused.pod(), reason = %refused, "refusing to serve a pod found in /proc: its network namespace cannot be told, so it is not captured (if it was, it stays failed closed) until warren-cni reports its sandbox (restart the pod) or the extra addresses are removed");
        }
        for (pod, sandbox) in found.sandboxes {
            tracing::info!(%pod, netns = %sandbox.netns.display(), "found the network namespace of a running pod");
            self.sandboxes.record(sandbox);
        }
    }
}

/// The node's view of a state: the state's workloads, with the network namespace (and,
/// before the kubelet writes them, the addresses) of this node's pods filled in from
/// their sandboxes.
fn node_config(
    state: &ClusterState,
    node: &str,
    sandboxes: &Sandboxes,
    proc_root: &std::path::Path,
) -> LocalConfig {
    let workloads = state
        .config
        .workloads
        .iter()
        .map(|workload| {
            if workload.node != node {
                return workload.clone();
            }
            let Some(sandbox) = sandboxes.get(&workload.to_string()) else {
                return workload.clone();
            };
            let mut filled = Workload::clone(workload);
            filled.netns = procfs::on_node(proc_root, &sandbox.netns);
            if filled.ips.is_empty() {
                filled.ips = sandbox.ips.clone();
            }
            // One order, whichever source: a reordering is not a change of the pod.
            filled.ips.sort();
            Arc::new(filled)
        })
        .collect();
    LocalConfig {
        mesh_namespaces: state.config.mesh_namespaces.clone(),
        workloads,
        services: state.config.services.clone(),
    }
}

/// This node's pods in the mesh that can be served (their netns is known).
fn servable(local: &LocalConfig, node: &str) -> Vec<Arc<Workload>> {
    local
        .enrolled_on(node)
        .into_iter()
        .filter(|w| !w.netns.as_os_str().is_empty())
        .collect()
}

/// Run until the control's states end (never, while the agent runs): serve this node's
/// pods as the cluster and the CNI plugin say, with the cluster's policies in `policy`.
pub async fn follow(source: ClusterSource, enrollment: Enrollment, policy: Arc<SharedPolicy>) {
    let mut states = source.control.subscribe();
    let mut follower = Follower {
        source,
        enrollment,
        policy,
        seen_pods: HashSet::new(),
    };
    let mut failed = follower.apply().await;
    let mut retry = tokio::time::interval(POLL_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                failed = follower.apply().await;
            }
            Some(event) = follower.source.cni.recv() => {
                let (reply, now_failed) = follower.handle_cni(event.request).await;
                failed = now_failed;
                let _ = event.reply.send(reply);
            }
            _ = retry.tick(), if !failed.is_empty() => {
                failed = follower.apply().await;
            }
        }
    }
}

/// The follow loop's state: what it reads, what it serves, and the pods of this node
/// it has seen in a state (so a deleted one's sandbox is forgotten).
struct Follower {
    source: ClusterSource,
    enrollment: Enrollment,
    policy: Arc<SharedPolicy>,
    seen_pods: HashSet<String>,
}

impl Follower {
    /// Bring the node in line with the current state. Returns the pods that failed.
    async fn apply(&mut self) -> BTreeMap<String, String> {
        let source = &mut self.source;
        let state = source.control.current();
        let written = {
            let (socket, namespaces) = (
                source.cni_socket.clone(),
                state.config.mesh_namespaces.clone(),
            );
            blocking::run(move || server::write_mesh_namespaces(&socket, &namespaces)).await
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "cannot write the mesh namespaces for warren-cni; while the agent is down it treats every pod as a mesh pod");
        }
        self.policy.replace(state.policies.clone());

        // Sandboxes of pods the API server has deleted go; a sandbox whose pod the state
        // has not shown yet stays (the runtime can be faster than the watch).
        let present: HashSet<String> = state
            .config
            .workloads
            .iter()
            .filter(|w| w.node == source.node)
            .map(|w| w.to_string())
            .collect();
        for gone in self.seen_pods.difference(&present) {
            source.sandboxes.forget(gone, "");
        }
        self.seen_pods = present;

        // Pods that ran before this agent: look for their netns in /proc — when the set
        // of such pods changes, else at most every PROC_RESCAN (each look enters every
        // netns of the node, and states change with every pod of the cluster).
        let missing: Vec<Arc<Workload>> = state
            .config
            .enrolled_on(&source.node)
            .into_iter()
            .filter(|w| !w.ips.is_empty() && source.sandboxes.get(&w.to_string()).is_none())
            .collect();
        let names: BTreeSet<String> = missing.iter().map(|w| w.to_string()).collect();
        let due = source
            .last_proc_scan
            .as_ref()
            .is_none_or(|(at, scanned)| *scanned != names || at.elapsed() >= PROC_RESCAN);
        if !missing.is_empty() && due {
            source.find_running(&missing).await;
            source.last_proc_scan = Some((std::time::Instant::now(), names));
        }

        let local = source.node_config(&state);
        let failed = self
            .enrollment
            .reconcile_to(source.servable(&local), local.index())
            .await;
        // Each sandbox once: a pod outside the mesh holds no rules of ours. (A mesh pod
        // not served yet keeps any: failing closed until it is.)
        for workload in local
            .workloads
            .iter()
            .filter(|w| w.node == source.node && !w.in_mesh)
        {
            let name = workload.to_string();
            if !workload.netns.as_os_str().is_empty()
                && source
                    .checked
                    .insert((name.clone(), workload.netns.clone()))
            {
                self.enrollment.clear_stale(&name, &workload.netns).await;
            }
        }
        let sandboxes = &source.sandboxes;
        source
            .checked
            .retain(|(pod, _)| sandboxes.get(pod).is_some());
        failed
    }

    async fn handle_cni(&mut self, request: Request) -> (Reply, BTreeMap<String, String>) {
        match request {
            Request::Add(sandbox) => self.add(sandbox).await,
            Request::Del {
                container_id,
                namespace,
                name,
            } => {
                let pod = format!("{namespace}/{name}");
                self.source.sandboxes.forget(&pod, &container_id);
                let failed = self.apply().await;
                tracing::info!(%pod, "CNI DEL: the pod's sandbox is gone");
                (Reply::ok("forgotten"), failed)
            }
            Request::Status => (Reply::ok("agent running"), BTreeMap::new()),
        }
    }

    async fn add(&mut self, sandbox: PodSandbox) -> (Reply, BTreeMap<String, String>) {
        let pod = format!("{}/{}", sandbox.namespace, sandbox.name);
        let namespace = sandbox.namespace.clone();
        tracing::info!(%pod, netns = %sandbox.netns.display(), ips = ?sandbox.ips, "CNI ADD");
        self.source.sandboxes.record(sandbox);
        let known =
            |state: &ClusterState| state.config.workloads.iter().any(|w| w.to_string() == pod);
        if !known(&self.source.control.current()) {
            // The kubelet runs the sandbox only for a pod the API server has; our watch
            // will show it in a moment.
            let mut states = self.source.control.subscribe();
            let _ = tokio::time::timeout(UNKNOWN_POD_WAIT, states.wait_for(|s| known(s))).await;
        }
        let failed = self.apply().await;
        let state = self.source.control.current();
        let reply = if self.enrollment.serves(&pod) {
            Reply::ok(format!("{pod} captured"))
        } else if let Some(err) = failed.get(&pod) {
            Reply::refused(format!("{pod}: {err}"))
        } else if !known(&state) && state.config.mesh_namespaces.contains(&namespace) {
            Reply::refused(format!(
                "{pod} is in mesh namespace {namespace} but the API server has not shown it to this agent within {UNKNOWN_POD_WAIT:?}; the kubelet retries"
            ))
        } else {
            Reply::ok(format!("{pod} is not in the mesh"))
        };
        (reply, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyConfig, PolicySet};

    fn workload(name: &str, node: &str, ips: &[&str]) -> Arc<Workload> {
        Workload::test_pod(name, node, ips)
    }

    #[test]
    fn this_nodes_pods_get_their_sandboxes_netns_and_addresses() {
        let state = ClusterState {
            config: LocalConfig {
                mesh_namespaces: ["demo".to_owned()].into(),
                workloads: vec![
                    workload("starting", "n1", &[]),
                    workload("running", "n1", &["fd00::2", "10.0.0.2"]),
                    workload("waiting", "n1", &["10.0.0.3"]),
                    workload("elsewhere", "n2", &["10.0.0.4"]),
                ],
                services: vec![],
            },
            policies: PolicySet::new(PolicyConfig::default(), []),
            policy_errors: vec![],
        };
        let mut sandboxes = Sandboxes::default();
        for (name, netns, ips) in [
            ("starting", "/var/run/netns/cni-1", vec!["10.0.0.1"]),
            ("running", "/proc/42/ns/net", vec!["10.0.0.2", "fd00::2"]),
            ("elsewhere", "/var/run/netns/cni-9", vec!["10.0.0.4"]),
        ] {
            sandboxes.record(PodSandbox {
                container_id: name.into(),
                netns: netns.into(),
                namespace: "demo".into(),
                name: name.into(),
                uid: String::new(),
                ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            });
        }
        let local = node_config(&state, "n1", &sandboxes, std::path::Path::new("/host/proc"));
        let by_name = |name: &str| {
            local
                .workloads
                .iter()
                .find(|w| w.name == name)
                .unwrap()
                .clone()
        };
        assert_eq!(
            by_name("starting").netns,
            PathBuf::from("/var/run/netns/cni-1")
        );
        assert_eq!(
            by_name("starting").ips,
            ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            by_name("running").netns,
            PathBuf::from("/host/proc/42/ns/net")
        );
        assert_eq!(
            by_name("running").ips,
            [
                "10.0.0.2".parse::<std::net::IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ],
            "one order whichever source"
        );
        assert!(
            by_name("elsewhere").netns.as_os_str().is_empty(),
            "another node's pod"
        );
        let servable: Vec<String> = servable(&local, "n1")
            .iter()
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(
            servable,
            ["starting", "running"],
            "waiting has no netns yet"
        );
    }
}
