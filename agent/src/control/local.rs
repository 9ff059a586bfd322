//! Local mode: one YAML file describing workloads and the namespaces in the mesh.
//!
//! ```yaml
//! meshNamespaces: [demo]
//! workloads:
//! - name: client
//!   namespace: demo
//!   serviceAccount: client
//!   labels: {app: client}          # optional; what policy selectors match
//!   owner: {kind: Deployment, name: client}  # optional; Istio's workload (the `*_workload`
//!                                  # metric labels, baggage), else the pod itself
//!   node: n1
//!   ips: ["10.77.1.10", "fd00:77:1::10"]
//!   netns: /run/netns/warren-n1-demo-client
//!   cgroup: /sys/fs/cgroup/unified/warren-lab/n1/demo-client
//! - name: outside                  # served by another HBONE node (ztunnel, another warren)
//!   namespace: outside
//!   foreignHbone: true             # no node, no netns: dialled on its 15008, identity checked
//!   ips: ["192.168.77.100"]
//! services:                        # a ClusterIP in front of workloads
//! - name: server
//!   namespace: demo
//!   vips: ["10.96.0.10"]           # what clients dial; not assigned to any interface
//!   ports: [{port: 80, targetPort: 9000}]
//!   selector: {app: server}        # endpoints: this namespace's workloads with these labels
//! ```
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use crate::workload::{Endpoint, Owner, Service, Workload, WorkloadIndex};

#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfigFile {
    #[serde(default)]
    mesh_namespaces: Vec<String>,
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePortSpec>,
    selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServicePortSpec {
    port: u16,
    /// The same as `port` when absent, as in Kubernetes.
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    name: String,
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    /// Served by another HBONE implementation (a ztunnel node, another warren): in a mesh,
    /// but on no node of ours.
    #[serde(default)]
    foreign_hbone: bool,
    /// The workload the pod belongs to (Istio's `*_workload`): what a Deployment,
    /// StatefulSet, … is called, the same for all its pods and across their restarts.
    #[serde(default)]
    owner: Option<OwnerSpec>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OwnerSpec {
    kind: String,
    name: String,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Where a workload runs: a pod of a node has a node and a netns; a foreign HBONE
/// workload has neither (and needs addresses, or nobody could reach it).
fn placement(spec: &WorkloadSpec, id: &str) -> Result<(String, PathBuf), String> {
    if spec.foreign_hbone {
        if spec.node.is_some() || spec.netns.is_some() || spec.cgroup.is_some() {
            return Err(format!(
                "workload {id} is foreignHbone (served by another HBONE node) and must not name a node, netns or cgroup; remove them, or remove foreignHbone if the pod runs on a node of this agent"
            ));
        }
        if spec.ips.is_empty() {
            return Err(format!(
                "workload {id} is foreignHbone but has no `ips`: list the addresses its HBONE node serves"
            ));
        }
        return Ok((String::new(), PathBuf::new()));
    }
    let node = match spec.node.as_deref().map(str::trim) {
        Some(node) if !node.is_empty() => node.to_owned(),
        Some(_) => return Err(format!("workload {id:?} has an empty `node`")),
        None => return Err(format!("workload {id} has no `node` (or set foreignHbone: true for a workload served by another HBONE node)")),
    };
    let netns = spec.netns.clone().ok_or_else(|| {
        format!("workload {id} has no `netns` (the path of the pod's network namespace)")
    })?;
    Ok((node, netns))
}

/// A service of the file, its endpoints the selected workloads (all ready: local mode
/// has no readiness). Its addresses must be its own.
fn service(
    spec: ServiceSpec,
    workloads: &[Arc<Workload>],
    owners: &mut HashMap<IpAddr, String>,
) -> Result<Arc<Service>, String> {
    let id = format!("service {}/{}", spec.namespace, spec.name);
    if spec.vips.is_empty() {
        return Err(format!("{id} has no `vips` (the addresses clients dial)"));
    }
    if spec.ports.is_empty()
        || spec
            .ports
            .iter()
            .any(|p| p.port == 0 || p.target_port == Some(0))
    {
        return Err(format!(
            "{id} needs `ports`, each with a non-zero `port` (and `targetPort`)"
        ));
    }
    if spec.selector.is_empty() {
        return Err(format!(
            "{id} has an empty `selector`; it would select every workload of {}",
            spec.namespace
        ));
    }
    for vip in &spec.vips {
        if let Some(other) = owners.insert(vip.to_canonical(), id.clone()) {
            return Err(format!("address {vip} is claimed by both {other} and {id}"));
        }
    }
    let target_ports: BTreeMap<u16, u16> = spec
        .ports
        .iter()
        .map(|p| (p.port, p.target_port.unwrap_or(p.port)))
        .collect();
    let endpoints = workloads
        .iter()
        .filter(|w| w.namespace == spec.namespace)
        .filter(|w| {
            spec.selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
        })
        .flat_map(|w| w.ips.iter())
        .map(|ip| Endpoint {
            ip: *ip,
            target_ports: target_ports.clone(),
            ready: true,
        })
        .collect();
    Ok(Arc::new(Service::new(
        spec.namespace,
        spec.name,
        spec.vips,
        target_ports.keys().copied().collect(),
        endpoints,
    )))
}

/// The validated contents of a local config file.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub mesh_namespaces: HashSet<String>,
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
}

impl LocalConfig {
    pub fn load(path: &Path) -> Result<Self, LocalConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, LocalConfigError> {
        let file: LocalConfigFile =
            serde_yaml::from_str(text).map_err(|source| LocalConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |problem: String| LocalConfigError::Invalid {
            path: path.to_owned(),
            problem,
        };
        let mut names = HashSet::new();
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        let mesh_namespaces: HashSet<String> = file.mesh_namespaces.into_iter().collect();
        let mut workloads = Vec::with_capacity(file.workloads.len());
        for spec in file.workloads {
            let id = format!("{}/{}", spec.namespace, spec.name);
            let (node, netns) = placement(&spec, &id).map_err(invalid)?;
            for (field, value) in [("name", &spec.name), ("namespace", &spec.namespace)] {
                if value.trim().is_empty() {
                    return Err(invalid(format!("workload {id:?} has an empty `{field}`")));
                }
            }
            if let Some(owner) = &spec.owner {
                if owner.kind.trim().is_empty() || owner.name.trim().is_empty() {
                    return Err(invalid(format!(
                        "workload {id} has an `owner` without a `kind` or `name` (e.g. {{kind: Deployment, name: {}}})",
                        spec.name
                    )));
                }
            }
            if !names.insert(id.clone()) {
                return Err(invalid(format!("workload {id} is listed twice")));
            }
            for ip in &spec.ips {
                if let Some(other) = owners.insert(ip.to_canonical(), id.clone()) {
                    return Err(invalid(format!(
                        "address {ip} is claimed by both {other} and {id}"
                    )));
                }
            }
            workloads.push(Arc::new(Workload {
                in_mesh: spec.foreign_hbone || mesh_namespaces.contains(&spec.namespace),
                foreign_hbone: spec.foreign_hbone,
                namespace: spec.namespace,
                name: spec.name,
                service_account: spec.service_account,
                labels: spec.labels,
                node,
                ips: spec.ips.into_iter().map(|ip| ip.to_canonical()).collect(),
                netns,
                cgroup: spec.cgroup,
                owner: spec.owner.map(|o| Owner {
                    kind: o.kind,
                    name: o.name,
                }),
            }));
        }
        let services = file
            .services
            .into_iter()
            .map(|spec| service(spec, &workloads, &mut owners))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        Ok(Self {
            mesh_namespaces,
            workloads,
            services,
        })
    }

    /// The index the proxy looks destinations up in.
    pub fn index(&self) -> WorkloadIndex {
        WorkloadIndex::new(self.workloads.iter().cloned())
            .with_services(self.services.iter().cloned())
    }

    /// Workloads on `node` whose namespace is in the mesh: the pods this agent captures.
    pub fn enrolled_on(&self, node: &str) -> Vec<Arc<Workload>> {
        self.workloads
            .iter()
            .filter(|w| w.node == node && w.in_mesh && !w.foreign_hbone)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
meshNamespaces: [demo]
workloads:
- name: client
  namespace: demo
  serviceAccount: client
  labels:
    app: client
    version: "1"
  node: n1
  ips: ["10.77.1.10", "fd00:77:1::10"]
  netns: /run/netns/warren-n1-demo-client
  cgroup: /sys/fs/cgroup/unified/warren-lab/n1/demo-client
- name: server
  namespace: demo
  node: n2
  ips: ["10.77.2.10"]
  netns: /run/netns/warren-n2-demo-server
- name: client
  namespace: legacy
  node: n1
  ips: ["10.77.1.12"]
  netns: /run/netns/warren-n1-legacy-client
"#;

    fn parse(text: &str) -> Result<LocalConfig, LocalConfigError> {
        LocalConfig::parse(text, Path::new("test.yaml"))
    }

    #[test]
    fn foreign_hbone_workloads_are_in_the_mesh_on_no_node() {
        let text = format!(
            "{SAMPLE}- name: outside\n  namespace: outside\n  foreignHbone: true\n  ips: [\"192.168.77.100\"]\n"
        );
        let config = parse(&text).unwrap();
        let outside = config.workloads.last().unwrap();
        assert!(outside.foreign_hbone && outside.in_mesh, "{outside:?}");
        assert!(config.enrolled_on("n1").iter().all(|w| !w.foreign_hbone));
        assert!(config.enrolled_on("").is_empty());

        let with_node = text.replace(
            "  foreignHbone: true\n",
            "  foreignHbone: true\n  node: n1\n",
        );
        let err = parse(&with_node).unwrap_err().to_string();
        assert!(
            err.contains("outside/outside is foreignHbone") && err.contains("must not name a node"),
            "{err}"
        );
        let without_ips = text.replace("  ips: [\"192.168.77.100\"]\n", "");
        let err = parse(&without_ips).unwrap_err().to_string();
        assert!(err.contains("has no `ips`"), "{err}");
        let without_node = text.replace("  foreignHbone: true\n", "");
        let err = parse(&without_node).unwrap_err().to_string();
        assert!(
            err.contains("has no `node`") && err.contains("foreignHbone"),
            "{err}"
        );
    }

    #[test]
    fn selects_enrolled_workloads_of_this_node() {
        let config = parse(SAMPLE).unwrap();
        let n1: Vec<_> = config
            .enrolled_on("n1")
            .iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(n1, ["demo/client"]);
        let n2: Vec<_> = config
            .enrolled_on("n2")
            .iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(n2, ["demo/server"]);
        assert_eq!(config.workloads[1].service_account, "default");
    }

    #[test]
    fn labels_are_optional() {
        let config = parse(SAMPLE).unwrap();
        let client = &config.workloads[0].labels;
        assert_eq!(client.get("app").map(String::as_str), Some("client"));
        assert_eq!(client.get("version").map(String::as_str), Some("1"));
        assert!(config.workloads[1].labels.is_empty());
        let err = parse(&SAMPLE.replace("app: client", "app: [client]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels"), "{err}");
    }

    #[test]
    fn the_owner_is_the_workload_else_the_pod() {
        let text = SAMPLE.replace(
            "  serviceAccount: client\n",
            "  serviceAccount: client\n  owner: {kind: Deployment, name: client-app}\n",
        );
        let config = parse(&text).unwrap();
        let client = &config.workloads[0];
        assert_eq!(client.name, "client");
        assert_eq!(
            (client.workload_kind(), client.workload_name()),
            ("Deployment", "client-app")
        );
        let server = &config.workloads[1];
        assert_eq!(
            (server.workload_kind(), server.workload_name()),
            ("Pod", "server")
        );
        // Without a label naming it, the canonical service is the workload's name.
        assert_eq!(server.canonical_service(), "server");
        let err = parse(&text.replace("name: client-app", "name: \"\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`owner` without a `kind` or `name`"), "{err}");
        let err = parse(&text.replace("kind: Deployment, ", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse("meshNamespace: [demo]\n").unwrap_err().to_string();
        assert!(err.contains("meshNamespace"), "{err}");
        assert!(err.contains("test.yaml"), "{err}");
    }

    #[test]
    fn duplicate_address_is_refused() {
        let text = SAMPLE.replace("10.77.1.12", "10.77.1.10");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("10.77.1.10 is claimed by both demo/client and legacy/client"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_workload_is_refused() {
        let text = format!("{SAMPLE}- name: client\n  namespace: demo\n  node: n1\n  netns: /x\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("demo/client is listed twice"), "{err}");
    }

    #[test]
    fn services_select_their_endpoints() {
        let text = format!(
            "{}services:\n- name: web\n  namespace: demo\n  vips: [\"10.96.0.10\"]\n  ports: [{{port: 80, targetPort: 9000}}, {{port: 443}}]\n  selector: {{app: client}}\n",
            SAMPLE
        );
        let config = parse(&text).unwrap();
        let index = config.index();
        let web = index.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(web.ports, [80, 443]);
        let picked = web.pick("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(picked.to_string(), "10.77.1.10:9000");
        let picked = web.pick("10.96.0.10:443".parse().unwrap()).unwrap();
        assert_eq!(picked.to_string(), "10.77.1.10:443");

        for (change, expected) in [
            ("vips: [\"10.96.0.10\"]", "vips: [\"10.77.2.10\"]"),
            ("selector: {app: client}", "selector: {}"),
            (
                "ports: [{port: 80, targetPort: 9000}, {port: 443}]",
                "ports: []",
            ),
        ]
        .map(|(from, to)| (text.replace(from, to), from))
        {
            let err = parse(&change).unwrap_err().to_string();
            assert!(err.contains("service demo/web"), "{expected}: {err}");
        }
    }

    #[test]
    fn bad_address_is_a_parse_error() {
        let text = SAMPLE.replace("10.77.2.10", "10.77.2.300");
        assert!(matches!(parse(&text), Err(LocalConfigError::Parse { .. })));
    }
}
