//! 15006: plain TCP to a pod's address, steered here by sk_lookup, is delivered to the app
//! at the address the client dialled. (PERMISSIVE; STRICT will refuse it.)
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
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let dst = match downstream.local_addr() {
        Ok(local) => SocketAddr::new(local.ip().to_canonical(), local.port()),
        Err(err) => {
            tracing::warn!(pod = %pod.workload, %peer, error = %err, "cannot read the destination of an inbound connection");
            return;
        }
    };
    let src_workload = ctx.workloads.by_ip(peer.ip()).cloned();
    let mut record = ConnectionRecord {
        direction: Direction::Inbound,
        src: Some(peer),
        dst,
        src_workload: src_workload.as_deref(),
        dst_workload: Some(&pod.workload),
        bytes_sent: 0,
        bytes_received: 0,
        started,
        outcome: Ok(()),
    };
    if is_agent_port(dst.port()) {
        record.outcome = Err(format!(
            "refused: {dst} is one of the agent's own ports (loop)"
        ));
        record.emit();
        return;
    }
    // The pod dialling its own address is not captured again (sk_lookup skips it).
    let mut upstream = match connect_from(&pod.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            record.outcome = Err(err.to_string());
            record.emit();
            return;
        }
    };
    let (sent, received, outcome) = relay(&mut downstream, &mut upstream).await;
    record.bytes_sent = sent;
    record.bytes_received = received;
    record.outcome = outcome;
    record.emit();
}
