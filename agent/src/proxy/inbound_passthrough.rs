//! 15006: plain TCP to a pod's address, steered here by sk_lookup or iptables, is delivered to the app
//! at the address the client dialled — unless the pod's mTLS mode is STRICT or an
//! AuthorizationPolicy denies it, in which case it is reset. Connections the node itself
//! originated (kubelet's health probes: a socket of the node's netns owns them,
//! [`crate::host_sockets`]) are always delivered; traffic the node only forwards and
//! masquerades (NodePort, LoadBalancer, hostPort) comes from the same address and meets
//! policy like any other client.
//!
//! Before anything else — the app is not dialled yet — a connection is admitted against
//! `--max-plaintext-connections-per-source` ([`super::limits`]), so that one host's
//! thousands of idle connections (a slowloris) are bounded: over it, the connection is
//! reset, counted in `warren_listener_limit_refusals_total{listener="15006"}` and given
//! no access record. The node's own connections are not counted: forwarded traffic
//! arrives from the same node address, and if the kubelet's probes shared its budget, a
//! flood through a NodePort would fail the pods' liveness probes and have them
//! restarted. They are few and the kubelet's own, so nothing is lost by not counting them.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    access_log::{new_connection_id, ConnectionRecord, Direction},
    is_agent_port,
    limits::{Admission, Limit, ListenerAdmission},
    refused_by_policy, relay, reset, Pod, ProxyContext,
};
use crate::policy::{ConnectionInfo, Decision, PolicyRef};
use crate::socket::connect_from;

pub async fn handle(
    ctx: Arc<ProxyContext>,
    mut downstream: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
) {
    let dst = match ctx.original_dst.inbound(&downstream, peer) {
        Ok(dst) => dst,
        Err(err) => {
            tracing::warn!(pod = %pod.workload, %peer, error = %err, "cannot read the destination of an inbound connection");
            return;
        }
    };
    let by_node = originated_by_node(&ctx, peer, dst);
    // Held until the connection ends; over the limit, reset before the app is dialled.
    let Ok(_admission) = admit(&ctx.admission, by_node, peer) else {
        reset(downstream);
        return;
    };
    let mut record = ConnectionRecord::new(new_connection_id(), Direction::Inbound, dst);
    record.src_addr = Some(peer.to_string());
    record.src_workload = ctx.workloads.current().by_ip(peer.ip()).cloned();
    record.dst_workload = Some(pod.workload.clone());
    record.dst_identity = Some(pod.identity.to_string());
    record.opened(&ctx.metrics);
    // Only the pod's own addresses are served: iptables' REDIRECT takes any address
    // (IPv6 link-local, one added to the pod later), and an agent port would loop.
    if let Some(reason) = not_served(&pod, dst) {
        record.failed(format!("refused: {reason}"));
        record.emit(&ctx.metrics);
        reset(downstream);
        return;
    }
    if !by_node {
        if let Some((policy, reason)) = refusal(&ctx, &pod, peer, dst) {
            refused_by_policy(&ctx, &mut record, &policy, &reason);
            record.emit(&ctx.metrics);
            reset(downstream);
            return;
        }
    }
    // The pod dialling its own address is not captured again (sk_lookup skips it).
    match connect_from(&pod.netns, dst).await {
        Ok(mut upstream) => {
            relay(
                &mut downstream,
                &mut upstream,
                &mut record,
                ctx.idle_timeout,
            )
            .await
        }
        Err(err) => record.failed(err.to_string()),
    }
    // As the app itself would: nothing listening, or a broken relay, is a reset.
    let failed = record.outcome.is_err();
    record.emit(&ctx.metrics);
    if failed {
        reset(downstream);
    }
}

/// Admit a connection from `peer` against the per-source limit of the plaintext
/// listeners, unless the node itself opened it (`by_node`): the kubelet's probes are
/// never refused, however much the node forwards from the same address. `Ok(None)`:
/// admitted without being counted.
fn admit(
    admission: &Arc<ListenerAdmission>,
    by_node: bool,
    peer: SocketAddr,
) -> Result<Option<Admission>, Limit> {
    if by_node {
        return Ok(None);
    }
    admission.admit_plaintext(peer.ip()).map(Some)
}

/// Why a plaintext connection to `dst` is not delivered whatever the policy, if so.
fn not_served(pod: &Pod, dst: SocketAddr) -> Option<String> {
    if !pod.workload.ips.contains(&dst.ip()) {
        Some(format!("{dst} is not an address of {}", pod.workload))
    } else if is_agent_port(dst.port()) {
        Some(format!("{dst} is one of the agent's own ports (loop)"))
    } else {
        None
    }
}

/// Whether the node itself opened this connection (the kubelet's probes): the source is
/// one of the node's addresses *and* a socket of the node's netns owns the 4-tuple.
/// Forwarded traffic (a NodePort masqueraded to a node address) has no such socket.
fn originated_by_node(ctx: &ProxyContext, peer: SocketAddr, dst: SocketAddr) -> bool {
    if !ctx.node_ips.contains(&peer.ip()) {
        return false;
    }
    match crate::host_sockets::owns_connection(peer, dst) {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(%peer, %dst, "from a node address but no socket of the node owns it (forwarded: NodePort, hostPort, masquerade); policy applies");
            false
        }
        Err(err) => {
            tracing::warn!(%peer, %dst, error = %err, "cannot ask the kernel whether the node opened this connection; policy applies");
            false
        }
    }
}

/// Why policy refuses this plaintext connection, if it does: STRICT mTLS first, then
/// authorization (a plaintext client has no identity).
fn refusal(
    ctx: &ProxyContext,
    pod: &Pod,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<(PolicyRef, String)> {
    // One snapshot for both questions, so a reload in between cannot mix two sets.
    let policy = ctx.policy.current();
    let (mode, peer_authentication) = policy.mtls_mode(&pod.workload, dst.port());
    if !mode.allows_plaintext() {
        if let Some(policy) = peer_authentication {
            return Some((
                policy,
                format!(
                    "plaintext refused: mTLS mode is {mode:?} for port {}",
                    dst.port()
                ),
            ));
        }
    }
    let connection = ConnectionInfo {
        source_ip: peer.ip(),
        source_identity: None,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
    };
    match policy.authorize(&pod.workload, &connection) {
        Decision::Allow => None,
        Decision::Deny { policy, reason } => Some((policy, reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::Metrics,
        proxy::{
            hbone,
            limits::{PlaintextLimits, TunnelLimits},
        },
    };

    #[test]
    fn the_nodes_own_connections_are_not_counted_and_forwarded_ones_are() {
        let metrics = Arc::new(Metrics::new(hbone::Pool::new(Default::default())).unwrap());
        let limits = PlaintextLimits {
            connections_per_source: 2,
        };
        let admission = ListenerAdmission::new(TunnelLimits::default(), limits, metrics);
        let node: SocketAddr = "192.168.1.1:40000".parse().unwrap();
        // Forwarded traffic (a NodePort) from the node's address uses up its budget.
        let forwarded: Vec<_> = (0..2)
            .map(|_| admit(&admission, false, node).unwrap())
            .collect();
        assert!(forwarded.iter().all(Option::is_some));
        assert_eq!(
            admit(&admission, false, node).unwrap_err(),
            Limit::ConnectionsPerSource
        );
        // The kubelet's probes still get through, and take nothing.
        for _ in 0..10 {
            assert!(admit(&admission, true, node).unwrap().is_none());
        }
        assert_eq!(admission.held(), (2, 0));
        drop(forwarded);
        assert_eq!(admission.held(), (0, 0));
    }
}
