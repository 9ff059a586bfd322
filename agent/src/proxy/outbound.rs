//! 15001: a pod's outbound connection, redirected by the kernel, is sent on to where it
//! was going — from the pod's netns, with the pod's address.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{is_agent_port, relay, ConnectionRecord, Direction, Pod, ProxyContext};
use crate::socket::connect_from;

pub async fn handle(
    ctx: Arc<ProxyContext>,
    mut downstream: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
) {
    let started = Instant::now();
    let Some(dst) = ctx.original_dst.take(pod.netns_cookie, peer) else {
        tracing::warn!(pod = %pod.workload, %peer, "no original destination recorded for this connection (was it made to port 15001 directly?); closing it");
        return;
    };
    let dst_workload = ctx.workloads.by_ip(dst.ip()).cloned();
    let mut record = ConnectionRecord {
        direction: Direction::Outbound,
        src: None,
        dst,
        src_workload: Some(&pod.workload),
        dst_workload: dst_workload.as_deref(),
        bytes_sent: 0,
        bytes_received: 0,
        started,
        outcome: Ok(()),
    };
    if is_agent_port(dst.port()) && pod.workload.ips.contains(&dst.ip().to_canonical()) {
        record.outcome = Err(format!(
            "refused: {dst} is the agent's own port in this pod (loop)"
        ));
        record.emit();
        return;
    }
    let mut upstream = match connect_from(&pod.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            record.outcome = Err(err.to_string());
            record.emit();
            return;
        }
    };
    record.src = upstream.local_addr().ok();
    let (sent, received, outcome) = relay(&mut downstream, &mut upstream).await;
    record.bytes_sent = sent;
    record.bytes_received = received;
    record.outcome = outcome;
    record.emit();
}
