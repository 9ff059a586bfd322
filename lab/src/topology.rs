//! The lab's fixed topology: which namespaces, links, addresses and cgroups exist.
//!
//! This module is pure data: it describes the simulated cluster and never touches the
//! system, so the creation code (`create`), the agent config (`config`) and the tests
//! all read the same description.
//!
//! ```text
//!                         netns warren-wire, bridge br0
//!          ┌──────────────────────┼──────────────────────┐
//!   n1 (192.168.77.11)     n2 (192.168.77.12)     outside (192.168.77.100)
//!   cni0 10.77.1.1/24      cni0 10.77.2.1/24      (not in the mesh)
//!   ├ demo/client  .10     └ demo/server  .10
//!   ├ demo/peer    .11
//!   └ legacy/client .12
//! ```
//! Every address has an IPv6 twin (`fd00:77::/64` on the wire, `fd00:77:<n>::/64` per
//! node).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// Every network namespace the lab creates starts with this, so `lab down` can find
/// them all even without `state.json`.
pub const NETNS_PREFIX: &str = "warren-";
/// Where `ip netns` keeps its namespace handles (bind mounts).
pub const NETNS_DIR: &str = "/run/netns";
/// The namespace holding the bridge that joins the nodes (tcpdump here to see
/// node-to-node traffic).
pub const WIRE_NETNS: &str = "warren-wire";
/// Bridge in [`WIRE_NETNS`].
pub const WIRE_BRIDGE: &str = "br0";
/// The bridge inside each node that its pods attach to.
pub const NODE_BRIDGE: &str = "cni0";
/// Name of the interface of a node, a pod or the outside host.
pub const ETH: &str = "eth0";
/// Directory under the cgroup2 mount that holds every lab cgroup.
pub const LAB_CGROUP: &str = "warren-lab";
/// Kubernetes namespaces enrolled in the mesh.
pub const MESH_NAMESPACES: &[&str] = &["demo"];
/// Prefix lengths of the wire network and of every pod network.
pub const PREFIX_V4: u8 = 24;
/// IPv6 prefix length of the wire network and of every pod network.
pub const PREFIX_V6: u8 = 64;
/// Linux limit on interface names (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// An IP address family, for picking one of a pod's two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// The bridge network that joins the nodes and the outside host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    /// Network namespace name (`warren-wire`).
    pub netns_name: String,
    /// `/run/netns/warren-wire`.
    pub netns_path: PathBuf,
    /// The bridge (`br0`), up and without addresses.
    pub bridge: String,
}

/// A simulated Kubernetes node: a netns with `eth0` on the wire and a `cni0` bridge
/// for its pods. One agent runs per node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node name (`n1`), as given to `warren agent --node`.
    pub name: String,
    /// Network namespace name (`warren-n1`).
    pub netns_name: String,
    /// `/run/netns/warren-n1`.
    pub netns_path: PathBuf,
    /// Address of the node's `eth0` (the node IP).
    pub ipv4: Ipv4Addr,
    /// IPv6 address of the node's `eth0`.
    pub ipv6: Ipv6Addr,
    /// Name of the veth peer of `eth0` inside the wire netns (`n1`).
    pub wire_veth: String,
    /// Address of `cni0`, the pods' IPv4 default gateway.
    pub gateway_v4: Ipv4Addr,
    /// Address of `cni0`, the pods' IPv6 default gateway.
    pub gateway_v6: Ipv6Addr,
    /// The node's pod network, CIDR notation (`10.77.1.0/24`).
    pub pod_cidr_v4: String,
    /// The node's IPv6 pod network, CIDR notation (`fd00:77:1::/64`).
    pub pod_cidr_v6: String,
    /// The cgroup the node's agent runs in (`<cgroup2>/warren-lab/n1/agent`).
    pub agent_cgroup: PathBuf,
}

impl Node {
    /// The node IP of the given family.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }
}

/// A simulated pod: its own netns (with `eth0` attached to its node's `cni0`) and its
/// own cgroup, like a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Kubernetes namespace (`demo`).
    pub namespace: String,
    /// Pod name (`client`).
    pub name: String,
    /// Node the pod runs on (`n1`).
    pub node: String,
    /// Service account, which is the pod's mesh identity.
    pub service_account: String,
    /// Pod labels, which policy selectors match (`app: server`, `version: v1`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the pod's namespace is enrolled in the mesh.
    pub enrolled: bool,
    /// The pod's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Network namespace name (`warren-n1-demo-client`).
    pub netns_name: String,
    /// `/run/netns/warren-n1-demo-client`.
    pub netns_path: PathBuf,
    /// The pod's cgroup (`<cgroup2>/warren-lab/n1/demo-client`).
    pub cgroup: PathBuf,
    /// Name of the node-side end of the pod's veth, attached to `cni0`.
    pub host_veth: String,
}

impl Pod {
    /// `<namespace>/<name>`, the form used for targets and in messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's address of the given family.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }

    /// The pod's address of the given family with a port, e.g. to connect to a server
    /// in the pod.
    pub fn addr(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(family), port)
    }
}

/// A host on the wire that is not part of the mesh (no agent, no pods).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outside {
    /// Network namespace name (`warren-outside`).
    pub netns_name: String,
    /// `/run/netns/warren-outside`.
    pub netns_path: PathBuf,
    /// IPv4 address of its `eth0`.
    pub ipv4: Ipv4Addr,
    /// IPv6 address of its `eth0`.
    pub ipv6: Ipv6Addr,
    /// Name of the veth peer of `eth0` inside the wire netns (`outside`).
    pub wire_veth: String,
}

impl Outside {
    /// The outside host's address of the given family.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }
}

/// The whole simulated cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Mount point of the cgroup2 hierarchy the lab's cgroups live in.
    pub cgroup2_mount: PathBuf,
    /// `<cgroup2>/warren-lab`, parent of every lab cgroup.
    pub lab_cgroup: PathBuf,
    /// Kubernetes namespaces enrolled in the mesh.
    pub mesh_namespaces: Vec<String>,
    /// The bridge network between hosts.
    pub wire: Wire,
    /// The nodes, in order.
    pub nodes: Vec<Node>,
    /// The host outside the mesh.
    pub outside: Outside,
    /// Every pod, enrolled or not.
    pub pods: Vec<Pod>,
    /// Whether the agents are told that `outside` is a foreign HBONE workload
    /// ([`OUTSIDE_FOREIGN_IDENTITY`]): whatever HBONE node runs there is dialled on its
    /// port 15008, and its connections are accepted as that identity.
    #[serde(default)]
    pub foreign_hbone: bool,
}

/// Namespace and service account of `outside` when it is a foreign HBONE workload:
/// `spiffe://cluster.local/ns/outside/sa/default`.
pub const OUTSIDE_FOREIGN_IDENTITY: (&str, &str) = ("outside", "default");

/// What the standard topology is made of; kept as a table so it reads like the brief.
struct PodSpec {
    namespace: &'static str,
    name: &'static str,
    node: &'static str,
    service_account: &'static str,
    /// The pod's `version` label; `app` is the pod's name.
    version: &'static str,
    host: u8,
}

const NODES: &[(&str, u8, u8)] = &[
    // (name, wire host octet, pod-network index)
    ("n1", 11, 1),
    ("n2", 12, 2),
];
const OUTSIDE_HOST: u8 = 100;
const PODS: &[PodSpec] = &[
    PodSpec {
        namespace: "demo",
        name: "client",
        node: "n1",
        service_account: "client",
        version: "v1",
        host: 10,
    },
    PodSpec {
        namespace: "demo",
        name: "peer",
        node: "n1",
        service_account: "peer",
        version: "v2",
        host: 11,
    },
    PodSpec {
        namespace: "legacy",
        name: "client",
        node: "n1",
        service_account: "default",
        version: "v1",
        host: 12,
    },
    PodSpec {
        namespace: "demo",
        name: "server",
        node: "n2",
        service_account: "server",
        version: "v1",
        host: 10,
    },
];

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// `fd00:77::<hex host>`: the wire network. The host part is written in hex digits
/// that read like the decimal octet (`.11` ↔ `::11`), as in the brief.
fn wire_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, decimal_as_hex(host))
}

fn pod_v6(net: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x77,
        u16::from(net),
        0,
        0,
        0,
        0,
        decimal_as_hex(host),
    )
}

/// 11 → 0x11, 100 → 0x100: keeps IPv4 and IPv6 host parts visually identical.
fn decimal_as_hex(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

/// A node-side veth name that fits IFNAMSIZ and is unique within the node.
fn host_veth_name(namespace: &str, pod: &str, index: usize, taken: &[String]) -> String {
    let full = format!("vp-{namespace}-{pod}");
    let truncated: String = full.chars().take(IFNAME_MAX).collect();
    if taken.contains(&truncated) {
        format!("veth{index}")
    } else {
        truncated
    }
}

impl Topology {
    /// The standard lab topology, with cgroups under `cgroup2_mount` (find it with
    /// [`crate::mounts::cgroup2_mount`]).
    pub fn standard(cgroup2_mount: &Path) -> Topology {
        let lab_cgroup = cgroup2_mount.join(LAB_CGROUP);
        let nodes: Vec<Node> = NODES
            .iter()
            .map(|&(name, host, net)| Node {
                name: name.to_string(),
                netns_name: format!("{NETNS_PREFIX}{name}"),
                netns_path: netns_path(&format!("{NETNS_PREFIX}{name}")),
                ipv4: Ipv4Addr::new(192, 168, 77, host),
                ipv6: wire_v6(host),
                wire_veth: name.to_string(),
                gateway_v4: Ipv4Addr::new(10, 77, net, 1),
                gateway_v6: pod_v6(net, 1),
                pod_cidr_v4: format!("10.77.{net}.0/{PREFIX_V4}"),
                pod_cidr_v6: format!("fd00:77:{net}::/{PREFIX_V6}"),
                agent_cgroup: lab_cgroup.join(name).join("agent"),
            })
            .collect();

        let mut pods: Vec<Pod> = Vec::new();
        for (index, spec) in PODS.iter().enumerate() {
            let net = NODES
                .iter()
                .find(|(name, _, _)| *name == spec.node)
                .map(|&(_, _, net)| net)
                .expect("every pod spec names a node of the table");
            let taken: Vec<String> = pods
                .iter()
                .filter(|p| p.node == spec.node)
                .map(|p| p.host_veth.clone())
                .collect();
            let netns_name = format!(
                "{NETNS_PREFIX}{}-{}-{}",
                spec.node, spec.namespace, spec.name
            );
            pods.push(Pod {
                namespace: spec.namespace.to_string(),
                name: spec.name.to_string(),
                node: spec.node.to_string(),
                service_account: spec.service_account.to_string(),
                labels: BTreeMap::from([
                    ("app".to_owned(), spec.name.to_owned()),
                    ("version".to_owned(), spec.version.to_owned()),
                ]),
                enrolled: MESH_NAMESPACES.contains(&spec.namespace),
                ipv4: Ipv4Addr::new(10, 77, net, spec.host),
                ipv6: pod_v6(net, spec.host),
                netns_path: netns_path(&netns_name),
                netns_name,
                cgroup: lab_cgroup
                    .join(spec.node)
                    .join(format!("{}-{}", spec.namespace, spec.name)),
                host_veth: host_veth_name(spec.namespace, spec.name, index, &taken),
            });
        }

        let outside_name = format!("{NETNS_PREFIX}outside");
        Topology {
            cgroup2_mount: cgroup2_mount.to_path_buf(),
            lab_cgroup,
            mesh_namespaces: MESH_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            wire: Wire {
                netns_name: WIRE_NETNS.to_string(),
                netns_path: netns_path(WIRE_NETNS),
                bridge: WIRE_BRIDGE.to_string(),
            },
            nodes,
            outside: Outside {
                netns_path: netns_path(&outside_name),
                netns_name: outside_name,
                ipv4: Ipv4Addr::new(192, 168, 77, OUTSIDE_HOST),
                ipv6: wire_v6(OUTSIDE_HOST),
                wire_veth: "outside".to_string(),
            },
            pods,
            foreign_hbone: false,
        }
    }

    /// The pod `<namespace>/<name>`, if the topology has it.
    pub fn pod(&self, id: &str) -> Option<&Pod> {
        let (namespace, name) = id.split_once('/')?;
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pods scheduled on `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// Names of every network namespace of the topology, in creation order.
    pub fn netns_names(&self) -> Vec<&str> {
        let mut names = vec![self.wire.netns_name.as_str()];
        names.extend(self.nodes.iter().map(|n| n.netns_name.as_str()));
        names.push(self.outside.netns_name.as_str());
        names.extend(self.pods.iter().map(|p| p.netns_name.as_str()));
        names
    }

    /// Resolve a [`Target`] to the namespace (and, for pods, the cgroup) a command
    /// should run in. Fails with the list of valid targets when it names nothing.
    pub fn resolve(&self, target: &Target) -> Result<Placement> {
        match target {
            Target::Pod { namespace, name } => {
                let pod = self.pod(&format!("{namespace}/{name}")).with_context(|| {
                    format!(
                        "the lab has no pod {namespace}/{name}; {}",
                        self.targets_hint()
                    )
                })?;
                Ok(Placement {
                    netns_path: pod.netns_path.clone(),
                    cgroup: Some(pod.cgroup.clone()),
                })
            }
            Target::Node(name) => {
                let node = self.node(name).with_context(|| {
                    format!("the lab has no node {name}; {}", self.targets_hint())
                })?;
                Ok(Placement {
                    netns_path: node.netns_path.clone(),
                    cgroup: None,
                })
            }
            Target::Outside => Ok(Placement {
                netns_path: self.outside.netns_path.clone(),
                cgroup: None,
            }),
            Target::Wire => Ok(Placement {
                netns_path: self.wire.netns_path.clone(),
                cgroup: None,
            }),
        }
    }

    fn targets_hint(&self) -> String {
        let mut targets: Vec<String> = self.pods.iter().map(Pod::id).collect();
        targets.extend(self.nodes.iter().map(|n| format!("node/{}", n.name)));
        targets.push("outside".into());
        targets.push("wire".into());
        format!("valid targets: {}", targets.join(", "))
    }
}

/// Where a command runs: a network namespace and, for pods, a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Network namespace handle to `setns` into.
    pub netns_path: PathBuf,
    /// cgroup to join (pods only: node, outside and wire commands stay in the
    /// caller's cgroup, like host processes).
    pub cgroup: Option<PathBuf>,
}

/// Something a command can run in: `<ns>/<pod>`, `node/<name>`, `outside` or `wire`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A pod, `<namespace>/<name>` (netns and cgroup of the pod).
    Pod {
        /// Kubernetes namespace.
        namespace: String,
        /// Pod name.
        name: String,
    },
    /// A node's netns, `node/<name>`.
    Node(String),
    /// The outside host's netns.
    Outside,
    /// The wire netns (the bridge between nodes).
    Wire,
}

impl FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        };
        match s {
            "outside" => return Ok(Target::Outside),
            "wire" => return Ok(Target::Wire),
            _ => {}
        }
        let Some((left, right)) = s.split_once('/') else {
            bail!("invalid target {s:?}: expected <namespace>/<pod>, node/<name>, outside or wire");
        };
        if !valid(left) || !valid(right) {
            bail!("invalid target {s:?}: expected <namespace>/<pod>, node/<name>, outside or wire");
        }
        // `node/` is reserved for nodes, as Kubernetes has no namespace called "node".
        if left == "node" {
            Ok(Target::Node(right.to_string()))
        } else {
            Ok(Target::Pod {
                namespace: left.to_string(),
                name: right.to_string(),
            })
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Target::Node(name) => write!(f, "node/{name}"),
            Target::Outside => f.write_str("outside"),
            Target::Wire => f.write_str("wire"),
        }
    }
}

impl From<&Pod> for Target {
    fn from(pod: &Pod) -> Self {
        Target::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::standard(Path::new("/sys/fs/cgroup/unified"))
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            "demo/client".parse::<Target>().unwrap(),
            Target::Pod {
                namespace: "demo".into(),
                name: "client".into()
            }
        );
        assert_eq!(
            "node/n2".parse::<Target>().unwrap(),
            Target::Node("n2".into())
        );
        assert_eq!("outside".parse::<Target>().unwrap(), Target::Outside);
        assert_eq!("wire".parse::<Target>().unwrap(), Target::Wire);
        for bad in [
            "",
            "client",
            "demo/",
            "/client",
            "demo/client/x",
            "a b/c",
            "outside/x/",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?} should not parse");
        }
        for s in ["demo/client", "node/n1", "outside", "wire"] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn standard_addresses_match_the_plan() {
        let t = topo();
        let client = t.pod("demo/client").unwrap();
        assert_eq!(client.ipv4, Ipv4Addr::new(10, 77, 1, 10));
        assert_eq!(client.ipv6, "fd00:77:1::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(client.netns_name, "warren-n1-demo-client");
        assert_eq!(
            client.netns_path,
            Path::new("/run/netns/warren-n1-demo-client")
        );
        assert_eq!(
            client.cgroup,
            Path::new("/sys/fs/cgroup/unified/warren-lab/n1/demo-client")
        );
        assert!(client.enrolled);
        let server = t.pod("demo/server").unwrap();
        assert_eq!(
            server.addr(Family::V6, 8080).to_string(),
            "[fd00:77:2::10]:8080"
        );
        let legacy = t.pod("legacy/client").unwrap();
        assert!(!legacy.enrolled);
        assert_eq!(legacy.service_account, "default");
        let n2 = t.node("n2").unwrap();
        assert_eq!(n2.ipv6, "fd00:77::12".parse::<Ipv6Addr>().unwrap());
        assert_eq!(n2.gateway_v6, "fd00:77:2::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(n2.pod_cidr_v6, "fd00:77:2::/64");
        assert_eq!(
            n2.agent_cgroup,
            Path::new("/sys/fs/cgroup/unified/warren-lab/n2/agent")
        );
        assert_eq!(t.outside.ipv6, "fd00:77::100".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn names_fit_the_kernel_limits_and_are_unique() {
        let t = topo();
        let mut veths: Vec<(&str, &str)> = Vec::new();
        for pod in &t.pods {
            assert!(pod.host_veth.len() <= IFNAME_MAX, "{}", pod.host_veth);
            assert!(!veths.contains(&(&pod.node, &pod.host_veth)));
            veths.push((&pod.node, &pod.host_veth));
        }
        assert_eq!(t.pod("legacy/client").unwrap().host_veth, "vp-legacy-clien");
        let names = t.netns_names();
        assert!(names.iter().all(|n| n.starts_with(NETNS_PREFIX)));
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len());
    }

    #[test]
    fn resolves_targets() {
        let t = topo();
        let p = t.resolve(&"demo/peer".parse().unwrap()).unwrap();
        assert_eq!(p.netns_path, Path::new("/run/netns/warren-n1-demo-peer"));
        assert_eq!(
            p.cgroup.unwrap(),
            Path::new("/sys/fs/cgroup/unified/warren-lab/n1/demo-peer")
        );
        let p = t.resolve(&Target::Node("n2".into())).unwrap();
        assert_eq!(p.netns_path, Path::new("/run/netns/warren-n2"));
        assert!(p.cgroup.is_none());
        let err = t
            .resolve(&"demo/nope".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no pod demo/nope") && err.contains("legacy/client"),
            "{err}"
        );
        assert!(t.resolve(&Target::Node("n9".into())).is_err());
    }

    #[test]
    fn host_veth_falls_back_when_truncation_collides() {
        let taken = vec!["vp-namespace-ab".to_string()];
        assert_eq!(host_veth_name("namespace", "abc", 7, &taken), "veth7");
        assert_eq!(
            host_veth_name("demo", "client", 0, &taken),
            "vp-demo-client"
        );
    }
}
