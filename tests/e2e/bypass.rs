//! No way around policy: what a peer *says* grants nothing, the node's address is not a
//! pass, the agent's own ports cannot be turned on the agent, and no address of a pod
//! reaches the app behind the agent's back. Each scenario is an attack that worked
//! before its fix.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use warren_lab::{AppMode, ConnectOptions, Family, Lab};

use crate::interop::{PythonClient, CLIENT_ID, CLIENT_POD};
use crate::policy::{with_policies, STRICT};
use crate::support::{access_record, client_certificate, ensure_ok, field};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "bypass::forged_forwarded_header_grants_nothing",
        forged_forwarded_header_grants_nothing,
    ),
    (
        "bypass::traffic_the_node_forwards_meets_policy",
        traffic_the_node_forwards_meets_policy,
    ),
    (
        "bypass::agent_ports_dialled_from_the_pod_are_refused",
        agent_ports_dialled_from_the_pod_are_refused,
    ),
    (
        "bypass::unlisted_pod_address_is_refused",
        unlisted_pod_address_is_refused,
    ),
];

/// A pod outside the mesh holding a certificate for its own service account — what
/// `warren ca serve` issues any caller — names `demo/peer`'s address in `forwarded`,
/// against a policy that lets only that address reach `demo/server`: refused (401), and
/// n2's access log names the true source. `demo/peer` itself still gets in.
fn forged_forwarded_header_grants_nothing(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let peer_ip = lab.pod("demo/peer").ip(Family::V4);
    let yaml = format!(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: peer-address-only, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: [\"{peer_ip}/32\"]}}}}]
"
    );
    let dir = tempfile::tempdir()?;
    let (cert, key) = client_certificate(dir.path(), &lab.ca_dir(), CLIENT_ID, 1)?;
    with_policies(lab, "peer-address-only", &yaml, || {
        let offset = lab.agent_log_len("n2");
        let forger = PythonClient {
            source: peer_ip,
            ..PythonClient::in_pod(lab, CLIENT_POD)
        };
        let (code, report) = forger.run(lab, &cert, &key, &lab.ca_dir(), dst)?;
        ensure!(
            code != 0 && report["status"] == 401 && report["echo_ok"] != true,
            "a forged forwarded header must not pass an ipBlocks policy (exit {code}): {report}"
        );
        let record = access_record(lab, "n2", offset, "inbound", dst)?;
        let true_source = lab.pod(CLIENT_POD).ip(Family::V4).to_string();
        ensure!(
            field(&record, "src_addr") == true_source
                && field(&record, "src_identity") == CLIENT_ID
                && field(&record, "src_workload") != "demo/peer"
                && field(&record, "error").contains("peer-address-only"),
            "n2's record should name the true source and the policy: {record}"
        );
        ensure_ok(
            &lab.connect("demo/peer", dst, AppMode::Echo, 1024)?,
            "demo/peer, whose address the policy allows",
        )
    })
}

/// The node port of a NodePort Service, made as kube-proxy makes it: n2 DNATs
/// `<n2>:30080` to `demo/server` and masquerades, so the pod sees n2's address as the
/// source. Under STRICT plus a DENY of that very address, `outside` is refused through
/// it; a probe the node itself opens from the same address still gets through.
fn traffic_the_node_forwards_meets_policy(lab: &Lab) -> Result<()> {
    const NODE_PORT: u16 = 30080;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    let node_ip = lab.node_ip("n2", Family::V4);
    let node_port = SocketAddr::new(node_ip, NODE_PORT);
    let rules = [
        format!(
            "PREROUTING -p tcp -d {node_ip} --dport {NODE_PORT} -j DNAT --to-destination {dst}"
        ),
        format!(
            "POSTROUTING -p tcp -d {} --dport {} -j MASQUERADE",
            dst.ip(),
            dst.port()
        ),
    ];
    // Without policy the node port works: the rules are right and the path exists.
    let _node_port = NodeNat::add(lab, "n2", &rules)?;
    ensure_ok(
        &lab.connect("outside", node_port, AppMode::Echo, 1024)?,
        "outside through n2's node port, no policy",
    )?;
    // Masqueraded to n2's address on the pods' bridge, where the probes come from too.
    let gateway = lab.node("n2").gateway_v4;
    let yaml = format!(
        "{STRICT}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-node-address, namespace: demo}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: [\"{gateway}/32\"]}}}}]
"
    );
    with_policies(lab, "node-forwarded", &yaml, || {
        let offset = lab.agent_log_len("n2");
        let forwarded = lab.connect("outside", node_port, AppMode::Echo, 1024)?;
        ensure!(
            !forwarded.ok,
            "traffic n2 forwards from outside reached demo/server under STRICT: {forwarded:?}"
        );
        let record = access_record(lab, "n2", offset, "inbound", dst)?;
        ensure!(
            field(&record, "error").contains("denied by"),
            "n2 should record the refusal of the forwarded connection: {record}"
        );
        ensure_ok(
            &lab.connect("node/n2", dst, AppMode::Echo, 1024)?,
            "the node's own probe under STRICT and a DENY of its address",
        )
    })
}

/// A pod dialling the agent's ports itself — on loopback, the unspecified address or
/// its own address, both families — is refused at once (no hang until a timeout), and
/// the agent does not dial itself in a loop: its open files do not grow.
fn agent_ports_dialled_from_the_pod_are_refused(lab: &Lab) -> Result<()> {
    let pod = lab.pod("demo/client");
    let pid = lab
        .agent_pid(&pod.node)
        .context("n1's agent is not running")?;
    let before = open_files(pid)?;
    let hosts = [
        "127.0.0.1".parse()?,
        "0.0.0.0".parse()?,
        "::1".parse()?,
        "::".parse()?,
        pod.ip(Family::V4),
        pod.ip(Family::V6),
    ];
    for host in hosts {
        for port in [15001, 15006, 15008] {
            let addr = SocketAddr::new(host, port);
            let options = ConnectOptions {
                timeout: Duration::from_secs(5),
                ..ConnectOptions::tcp(addr, AppMode::Echo, 1024)
            };
            let report = lab.connect_with("demo/client", &options)?;
            ensure!(!report.ok, "demo/client → {addr} was served: {report:?}");
            ensure!(
                !report.detail.contains("timed out")
                    && !report.detail.contains("temporarily unavailable"),
                "demo/client → {addr} should be refused at once, not left hanging: {report:?}"
            );
        }
    }
    // What those connections made the agent open is closed again (give the tasks a
    // moment to finish); a loop would hold hundreds.
    let mut after = open_files(pid)?;
    for _ in 0..20 {
        if after <= before + 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        after = open_files(pid)?;
    }
    ensure!(
        after <= before + 4,
        "n1's agent held {before} files before and {after} after the pod dialled its ports"
    );
    Ok(())
}

/// An address of `demo/server` the agent does not serve — its IPv6 link-local address,
/// which every pod has — does not reach the app: under STRICT, and even from the node
/// (the only host on the pod's link), the connection is refused.
fn unlisted_pod_address_is_refused(lab: &Lab) -> Result<()> {
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let link_local = link_local_address(lab, "demo/server")?;
    let scope = interface_index(lab, "node/n2", warren_lab::topology::NODE_BRIDGE)?;
    let dst = SocketAddr::V6(std::net::SocketAddrV6::new(
        link_local,
        app.port(),
        0,
        scope,
    ));
    with_policies(lab, "strict", STRICT, || {
        let report = lab.connect("node/n2", dst, AppMode::Echo, 1024)?;
        ensure!(
            !report.ok,
            "n2 reached demo/server's app at its link-local address {dst} under STRICT: {report:?}"
        );
        Ok(())
    })
}

/// Rules added to a node's `nat` table for one test and deleted when dropped.
struct NodeNat<'a> {
    lab: &'a Lab,
    node: String,
    rules: Vec<String>,
}

impl<'a> NodeNat<'a> {
    fn add(lab: &'a Lab, node: &str, rules: &[String]) -> Result<Self> {
        let mut added = NodeNat {
            lab,
            node: node.to_owned(),
            rules: Vec::new(),
        };
        for rule in rules {
            added.iptables("-A", rule)?;
            added.rules.push(rule.clone());
        }
        Ok(added)
    }

    fn iptables(&self, action: &str, rule: &str) -> Result<()> {
        let mut cmd = self
            .lab
            .command(&format!("node/{}", self.node), "iptables")?;
        cmd.args(["-w", "-t", "nat", action])
            .args(rule.split_whitespace());
        run(cmd)
            .map(drop)
            .with_context(|| format!("iptables -t nat {action} {rule} on {}", self.node))
    }
}

impl Drop for NodeNat<'_> {
    fn drop(&mut self) {
        for rule in self.rules.iter().rev() {
            if let Err(err) = self.iptables("-D", rule) {
                eprintln!("warning: {err:#}");
            }
        }
    }
}

fn run(mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv6 link-local address of `pod`'s interface.
fn link_local_address(lab: &Lab, pod: &str) -> Result<std::net::Ipv6Addr> {
    let mut cmd = lab.command(pod, "ip")?;
    cmd.args([
        "-6",
        "-o",
        "addr",
        "show",
        "dev",
        warren_lab::topology::ETH,
        "scope",
        "link",
    ]);
    let out = run(cmd)?;
    out.split_whitespace()
        .skip_while(|word| *word != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
        .with_context(|| format!("no link-local address on {pod}: {out}"))
}

/// The index of interface `name` in `target`'s netns (the scope of a link-local address).
fn interface_index(lab: &Lab, target: &str, name: &str) -> Result<u32> {
    let mut cmd = lab.command(target, "ip")?;
    cmd.args(["-o", "link", "show", "dev", name]);
    let out = run(cmd)?;
    out.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .with_context(|| format!("no index for {name} in {target}: {out}"))
}

/// How many files process `pid` holds open.
fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}
