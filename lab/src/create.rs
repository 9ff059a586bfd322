//! Building the topology on the machine: namespaces, bridges, veths, addresses,
//! routes, forwarding and cgroups. The inverse is `teardown`.
//!
//! Links are always created inside lab namespaces (`ip -n`, with the peer placed
//! straight into its namespace), so no interface ever appears in the root namespace.

use anyhow::{Context as _, Result};

use crate::cgroup;
use crate::netns::{self, ip};
use crate::topology::{Topology, ETH, NODE_BRIDGE, PREFIX_V4, PREFIX_V6};

/// Create everything `topology` describes. On error, what was made so far is left
/// for the caller to remove (`teardown::down` works from any partial state).
pub fn create(topology: &Topology) -> Result<()> {
    for node in &topology.nodes {
        add_netns(&node.netns_name, &node.netns_path, true)?;
    }
    add_netns(&topology.wire.netns_name, &topology.wire.netns_path, false)?;
    add_netns(
        &topology.outside.netns_name,
        &topology.outside.netns_path,
        false,
    )?;
    for pod in &topology.pods {
        add_netns(&pod.netns_name, &pod.netns_path, false)?;
    }

    let wire = topology.wire.netns_name.as_str();
    ip(
        Some(wire),
        ["link", "add", &topology.wire.bridge, "type", "bridge"],
    )?;
    ip(Some(wire), ["link", "set", &topology.wire.bridge, "up"])?;

    // Hosts on the wire: the nodes and the outside host.
    let hosts = topology
        .nodes
        .iter()
        .map(|n| (&n.netns_name, &n.wire_veth, n.ipv4, n.ipv6))
        .chain(std::iter::once((
            &topology.outside.netns_name,
            &topology.outside.wire_veth,
            topology.outside.ipv4,
            topology.outside.ipv6,
        )));
    for (host_ns, wire_veth, ipv4, ipv6) in hosts {
        ip(
            Some(wire),
            [
                "link", "add", wire_veth, "type", "veth", "peer", "name", ETH, "netns", host_ns,
            ],
        )?;
        ip(
            Some(wire),
            [
                "link",
                "set",
                wire_veth,
                "master",
                &topology.wire.bridge,
                "up",
            ],
        )?;
        add_addresses(
            host_ns,
            ETH,
            &format!("{ipv4}/{PREFIX_V4}"),
            &format!("{ipv6}/{PREFIX_V6}"),
        )?;
        ip(Some(host_ns), ["link", "set", ETH, "up"])?;
    }

    // Each node's pod bridge, and routes to the other nodes' pod networks.
    for node in &topology.nodes {
        let ns = node.netns_name.as_str();
        ip(Some(ns), ["link", "add", NODE_BRIDGE, "type", "bridge"])?;
        add_addresses(
            ns,
            NODE_BRIDGE,
            &format!("{}/{PREFIX_V4}", node.gateway_v4),
            &format!("{}/{PREFIX_V6}", node.gateway_v6),
        )?;
        ip(Some(ns), ["link", "set", NODE_BRIDGE, "up"])?;
        for other in topology.nodes.iter().filter(|o| o.name != node.name) {
            ip(
                Some(ns),
                [
                    "route",
                    "add",
                    &other.pod_cidr_v4,
                    "via",
                    &other.ipv4.to_string(),
                ],
            )?;
            ip(
                Some(ns),
                [
                    "-6",
                    "route",
                    "add",
                    &other.pod_cidr_v6,
                    "via",
                    &other.ipv6.to_string(),
                ],
            )?;
        }
    }
    let outside = topology.outside.netns_name.as_str();
    for node in &topology.nodes {
        ip(
            Some(outside),
            [
                "route",
                "add",
                &node.pod_cidr_v4,
                "via",
                &node.ipv4.to_string(),
            ],
        )?;
        ip(
            Some(outside),
            [
                "-6",
                "route",
                "add",
                &node.pod_cidr_v6,
                "via",
                &node.ipv6.to_string(),
            ],
        )?;
    }

    // Pods: a veth from the node's bridge, addresses, default routes via the bridge.
    for pod in &topology.pods {
        let node = topology
            .node(&pod.node)
            .with_context(|| format!("pod {} names unknown node {}", pod.id(), pod.node))?;
        let node_ns = node.netns_name.as_str();
        let pod_ns = pod.netns_name.as_str();
        ip(
            Some(node_ns),
            [
                "link",
                "add",
                &pod.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                ETH,
                "netns",
                pod_ns,
            ],
        )?;
        ip(
            Some(node_ns),
            ["link", "set", &pod.host_veth, "master", NODE_BRIDGE, "up"],
        )?;
        add_addresses(
            pod_ns,
            ETH,
            &format!("{}/{PREFIX_V4}", pod.ipv4),
            &format!("{}/{PREFIX_V6}", pod.ipv6),
        )?;
        ip(Some(pod_ns), ["link", "set", ETH, "up"])?;
        ip(
            Some(pod_ns),
            [
                "route",
                "add",
                "default",
                "via",
                &node.gateway_v4.to_string(),
            ],
        )?;
        ip(
            Some(pod_ns),
            [
                "-6",
                "route",
                "add",
                "default",
                "via",
                &node.gateway_v6.to_string(),
            ],
        )?;
    }

    // cgroups: one per pod, one per agent.
    for node in &topology.nodes {
        cgroup::create(&node.agent_cgroup)?;
    }
    for pod in &topology.pods {
        cgroup::create(&pod.cgroup)?;
    }
    Ok(())
}

/// Create a namespace with `lo` up (the agent's redirect targets 127.0.0.1 and ::1)
/// and IPv6 duplicate address detection off (so addresses work at once); nodes also
/// forward.
fn add_netns(name: &str, path: &std::path::Path, forwarding: bool) -> Result<()> {
    netns::add(name)?;
    ip(Some(name), ["link", "set", "lo", "up"])?;
    // Set on `default` before any interface exists, so every later one inherits it.
    for key in [
        "net/ipv6/conf/all/accept_dad",
        "net/ipv6/conf/default/accept_dad",
    ] {
        netns::sysctl(path, key, "0")?;
    }
    if forwarding {
        netns::sysctl(path, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(path, "net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

fn add_addresses(ns: &str, dev: &str, v4: &str, v6: &str) -> Result<()> {
    ip(Some(ns), ["addr", "add", v4, "dev", dev])?;
    ip(Some(ns), ["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
    Ok(())
}
