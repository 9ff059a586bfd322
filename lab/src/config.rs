//! The agent's local-mode config file that the lab writes (`lab.yaml`): the mesh
//! namespaces and every workload of the topology, with where its netns and cgroup
//! are — in a cluster the CNI plugin would hand the agent the same facts.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::topology::{Family, Topology, OUTSIDE_FOREIGN_IDENTITY};

/// The lab's services: virtual addresses (assigned to no interface, as ClusterIPs are
/// not) in front of pods, which enrolled pods reach through their agent.
pub const SERVICES: [LabService; 2] = [
    // demo/server's port 9080 behind port 80.
    LabService {
        namespace: "demo",
        name: "server",
        vips: ["10.96.0.10", "fd00:96::10"],
        port: 80,
        target_port: 9080,
        selects_app: "server",
    },
    // Selects no pod: no endpoint is ever ready.
    LabService {
        namespace: "demo",
        name: "nowhere",
        vips: ["10.96.0.11", "fd00:96::11"],
        port: 80,
        target_port: 9080,
        selects_app: "nowhere",
    },
];

/// A service of the lab (see [`SERVICES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabService {
    /// The service's namespace.
    pub namespace: &'static str,
    /// The service's name.
    pub name: &'static str,
    /// Its virtual addresses: IPv4, IPv6.
    pub vips: [&'static str; 2],
    /// The port clients dial.
    pub port: u16,
    /// The port of the selected pods it forwards to.
    pub target_port: u16,
    /// The `app` label of the pods it selects.
    pub selects_app: &'static str,
}

impl LabService {
    /// The service's address of `family` and port.
    pub fn addr(&self, family: Family) -> std::net::SocketAddr {
        let vip = match family {
            Family::V4 => self.vips[0],
            Family::V6 => self.vips[1],
        };
        std::net::SocketAddr::new(vip.parse().expect("a valid lab VIP"), self.port)
    }
}

/// Top level of `lab.yaml`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Namespaces enrolled in the mesh.
    pub mesh_namespaces: Vec<String>,
    /// The lab's services ([`SERVICES`]).
    pub services: Vec<Service>,
    /// Every pod of the lab, enrolled or not. Last in the file, so that a test can add
    /// a workload by appending one.
    pub workloads: Vec<Workload>,
}

/// A service, as the agent's local control plane describes it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Virtual addresses.
    pub vips: Vec<IpAddr>,
    /// Ports and where they forward to.
    pub ports: Vec<ServicePort>,
    /// Labels of the workloads of the namespace that are its endpoints.
    pub selector: BTreeMap<String, String>,
}

/// One port of a [`Service`].
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// What clients dial.
    pub port: u16,
    /// The endpoints' port.
    pub target_port: u16,
}

/// One pod, as the agent's local control plane describes it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account (the workload's identity).
    pub service_account: String,
    /// Pod labels (what policy selectors match).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Node the pod runs on (none for a foreign HBONE workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Pod IPs, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The pod's netns handle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The pod's cgroup directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Served by another HBONE node, not by an agent of the lab.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub foreign_hbone: bool,
}

impl AgentConfig {
    /// The config for a topology.
    pub fn for_topology(topology: &Topology) -> AgentConfig {
        AgentConfig {
            mesh_namespaces: topology.mesh_namespaces.clone(),
            workloads: topology
                .pods
                .iter()
                .map(|pod| Workload {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    labels: pod.labels.clone(),
                    node: Some(pod.node.clone()),
                    ips: Family::BOTH.iter().map(|&f| pod.ip(f)).collect(),
                    netns: Some(pod.netns_path.clone()),
                    cgroup: Some(pod.cgroup.clone()),
                    foreign_hbone: false,
                })
                .chain(topology.foreign_hbone.then(|| {
                    let (namespace, service_account) = OUTSIDE_FOREIGN_IDENTITY;
                    Workload {
                        name: "outside".into(),
                        namespace: namespace.into(),
                        service_account: service_account.into(),
                        labels: BTreeMap::new(),
                        node: None,
                        ips: Family::BOTH
                            .iter()
                            .map(|&f| topology.outside.ip(f))
                            .collect(),
                        netns: None,
                        cgroup: None,
                        foreign_hbone: true,
                    }
                }))
                .collect(),
            services: SERVICES
                .iter()
                .map(|service| Service {
                    name: service.name.into(),
                    namespace: service.namespace.into(),
                    vips: service
                        .vips
                        .iter()
                        .map(|vip| vip.parse().expect("a valid lab VIP"))
                        .collect(),
                    ports: vec![ServicePort {
                        port: service.port,
                        target_port: service.target_port,
                    }],
                    selector: BTreeMap::from([("app".to_owned(), service.selects_app.to_owned())]),
                })
                .collect(),
        }
    }

    /// The YAML text, with a header saying where it comes from.
    pub fn to_yaml(&self) -> Result<String> {
        let body = serde_yaml::to_string(self).context("rendering lab.yaml")?;
        Ok(format!(
            "# Written by warren-lab (`cargo xtask lab up`): the agent's local control plane.\n{body}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn renders_the_agreed_schema() {
        let topology = Topology::standard(Path::new("/sys/fs/cgroup/unified"));
        let yaml = AgentConfig::for_topology(&topology).to_yaml().unwrap();
        let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        let expected: serde_yaml::Value = serde_yaml::from_str(
            r#"
meshNamespaces: [demo]
workloads:
- name: client
  namespace: demo
  serviceAccount: client
  labels: {app: client, version: v1}
  node: n1
  ips: ["10.77.1.10", "fd00:77:1::10"]
  netns: /run/netns/warren-n1-demo-client
  cgroup: /sys/fs/cgroup/unified/warren-lab/n1/demo-client
- name: peer
  namespace: demo
  serviceAccount: peer
  labels: {app: peer, version: v2}
  node: n1
  ips: ["10.77.1.11", "fd00:77:1::11"]
  netns: /run/netns/warren-n1-demo-peer
  cgroup: /sys/fs/cgroup/unified/warren-lab/n1/demo-peer
- name: client
  namespace: legacy
  serviceAccount: default
  labels: {app: client, version: v1}
  node: n1
  ips: ["10.77.1.12", "fd00:77:1::12"]
  netns: /run/netns/warren-n1-legacy-client
  cgroup: /sys/fs/cgroup/unified/warren-lab/n1/legacy-client
- name: server
  namespace: demo
  serviceAccount: server
  labels: {app: server, version: v1}
  node: n2
  ips: ["10.77.2.10", "fd00:77:2::10"]
  netns: /run/netns/warren-n2-demo-server
  cgroup: /sys/fs/cgroup/unified/warren-lab/n2/demo-server
services:
- name: server
  namespace: demo
  vips: ["10.96.0.10", "fd00:96::10"]
  ports: [{port: 80, targetPort: 9080}]
  selector: {app: server}
- name: nowhere
  namespace: demo
  vips: ["10.96.0.11", "fd00:96::11"]
  ports: [{port: 80, targetPort: 9080}]
  selector: {app: nowhere}
"#,
        )
        .unwrap();
        assert_eq!(value, expected, "got:\n{yaml}");
        assert!(yaml.starts_with("# Written by warren-lab"));
    }
}
