//! The workload model: what the agent knows about pods, whatever the source (local file
//! now, Kubernetes later).
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use crate::identity::{Identity, IdentityError};

mod service;
pub use service::{Endpoint, Service};

/// The cluster id in metrics and baggage: Istio's default (`global.multiCluster.clusterName`).
pub const CLUSTER_ID: &str = "Kubernetes";

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The pod's labels: what `selector.matchLabels` of a policy is matched against.
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory, when known.
    pub cgroup: Option<PathBuf>,
    /// Whether the pod is in the mesh (its namespace is enrolled): connections to it are
    /// tunnelled, and its node's agent captures its traffic.
    pub in_mesh: bool,
    /// Served by another HBONE implementation (a ztunnel node): connections to it are
    /// tunnelled to its port 15008 and its identity checked, but no agent of ours
    /// captures it (`node` and `netns` are empty).
    pub foreign_hbone: bool,
    /// The pod's owner as Istio names it (a Deployment, StatefulSet, …): the workload of
    /// metric labels and baggage. `None`: the pod is its own workload (a bare pod, or
    /// local mode without `owner`).
    pub owner: Option<Owner>,
}

/// The workload a pod belongs to, as Istio derives it (`kube.GetWorkloadMetaFromPod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet`, … as
    /// Kubernetes spells kinds.
    pub kind: String,
    pub name: String,
}

impl Workload {
    /// A pod of namespace `demo` in the mesh, its service account its name, for tests.
    #[cfg(test)]
    pub(crate) fn test_pod(name: &str, node: &str, ips: &[&str]) -> Arc<Workload> {
        Arc::new(Workload {
            namespace: "demo".into(),
            name: name.into(),
            service_account: name.into(),
            labels: Default::default(),
            node: node.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            netns: PathBuf::new(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: None,
        })
    }

    /// Istio's workload name (`*_workload` metric labels): the owner's, else the pod's.
    /// It survives pod restarts, so a Deployment's pods share their series.
    pub fn workload_name(&self) -> &str {
        self.owner.as_ref().map_or(&self.name, |o| &o.name)
    }

    /// The kind of [`Self::workload_name`]: the owner's, else `Pod`.
    pub fn workload_kind(&self) -> &str {
        self.owner.as_ref().map_or("Pod", |o| &o.kind)
    }

    /// The pod's SPIFFE identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn identity(&self, trust_domain: &str) -> Result<Identity, IdentityError> {
        Identity::new(
            trust_domain,
            self.namespace.as_str(),
            self.service_account.as_str(),
        )
    }

    /// Istio's canonical service: its own label first, then the Kubernetes recommended
    /// one, then `app`, else the workload's name (the owner's, as Istio).
    pub fn canonical_service(&self) -> String {
        self.label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| self.workload_name().to_owned())
    }

    /// Istio's canonical revision, found the same way, else `latest`.
    pub fn canonical_revision(&self) -> String {
        self.label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into())
    }

    fn label(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find_map(|k| self.labels.get(*k).cloned())
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Every known workload, looked up by address; and the services, by virtual address.
#[derive(Debug, Default, Clone)]
pub struct WorkloadIndex {
    all: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<IpAddr, Arc<Service>>,
}

impl WorkloadIndex {
    pub fn new(workloads: impl IntoIterator<Item = Arc<Workload>>) -> Self {
        let all: Vec<Arc<Workload>> = workloads.into_iter().collect();
        let mut by_ip = HashMap::new();
        for workload in &all {
            for ip in &workload.ips {
                by_ip.insert(*ip, workload.clone());
            }
        }
        Self {
            all,
            by_ip,
            services: HashMap::new(),
        }
    }

    /// The same index with `services` reachable at their virtual addresses.
    pub fn with_services(mut self, services: impl IntoIterator<Item = Arc<Service>>) -> Self {
        for service in services {
            for vip in &service.vips {
                self.services.insert(*vip, service.clone());
            }
        }
        self
    }

    /// The service at virtual address `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services.get(&ip.to_canonical())
    }

    /// Every workload, in the order given.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.all.iter()
    }

    /// The workload that owns `ip` (IPv4-mapped IPv6 addresses are treated as IPv4).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }
}

/// The workload index in force, shared by every connection handler and replaced when the
/// control plane changes (a pod joins or leaves the mesh).
#[derive(Debug, Default)]
pub struct SharedWorkloads {
    current: std::sync::RwLock<Arc<WorkloadIndex>>,
}

impl SharedWorkloads {
    pub fn new(index: WorkloadIndex) -> Self {
        Self {
            current: std::sync::RwLock::new(Arc::new(index)),
        }
    }

    /// The index in force now (a cheap clone: one Arc).
    pub fn current(&self) -> Arc<WorkloadIndex> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, index: WorkloadIndex) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(index);
    }
}
