//! The userspace data path: the listeners the agent serves inside each enrolled pod.
//!
//! | port  | listener            | bound in       | what arrives                               |
//! |-------|---------------------|----------------|--------------------------------------------|
//! | 15001 | [`outbound`]        | pod netns, `[::]` | the pod's own outbound TCP, redirected   |
//! | 15006 | [`inbound_passthrough`] | pod netns, `[::]` | TCP to the pod's addresses, steered by sk_lookup |
//!
//! Plaintext for now: the mTLS tunnel (15008) comes next, on the same paths.
pub mod hbone;
pub mod inbound_passthrough;
pub mod outbound;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use warren_common::{INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT};

use crate::{
    netns::Netns,
    redirect::ebpf::OriginalDstTable,
    workload::{Workload, WorkloadIndex},
};

/// What every connection handler needs, shared by all pods of the node.
pub struct ProxyContext {
    pub workloads: WorkloadIndex,
    pub original_dst: OriginalDstTable,
}

/// An enrolled pod as the proxy sees it.
pub struct Pod {
    pub workload: Arc<Workload>,
    pub netns: Netns,
    pub netns_cookie: u64,
}

/// The agent's own ports: a connection *to* one of them through a capture path would loop.
pub fn is_agent_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_TUNNEL_PORT
    )
}

/// Which way a connection crossed this agent.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// One access-log record per proxied connection, written when it ends.
pub struct ConnectionRecord<'a> {
    pub direction: Direction,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub src_workload: Option<&'a Workload>,
    pub dst_workload: Option<&'a Workload>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started: Instant,
    pub outcome: Result<(), String>,
}

impl ConnectionRecord<'_> {
    pub fn emit(&self) {
        let name =
            |w: Option<&Workload>| w.map(|w| w.to_string()).unwrap_or_else(|| "-".to_owned());
        let src = self
            .src
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".to_owned());
        let duration_ms = self.started.elapsed().as_millis() as u64;
        match &self.outcome {
            Ok(()) => tracing::info!(
                target: "access",
                direction = self.direction.as_str(),
                src = %src,
                dst = %self.dst,
                src_workload = %name(self.src_workload),
                dst_workload = %name(self.dst_workload),
                bytes_sent = self.bytes_sent,
                bytes_received = self.bytes_received,
                duration_ms,
                outcome = "ok",
                "connection closed"
            ),
            Err(error) => tracing::warn!(
                target: "access",
                direction = self.direction.as_str(),
                src = %src,
                dst = %self.dst,
                src_workload = %name(self.src_workload),
                dst_workload = %name(self.dst_workload),
                bytes_sent = self.bytes_sent,
                bytes_received = self.bytes_received,
                duration_ms,
                outcome = "error",
                error = %error,
                "connection failed"
            ),
        }
    }
}

/// Accept forever on `listener`, handing each connection to `handle`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    pod: Arc<Pod>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Pod>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, pod.clone()));
            }
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = name, pod = %pod.workload, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Copy both ways until both sides are done, keeping half-close: when one side stops
/// sending, the other side's write half is shut down and the reverse direction goes on.
pub async fn relay(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
) -> (u64, u64, Result<(), String>) {
    match tokio::io::copy_bidirectional(downstream, upstream).await {
        Ok((sent, received)) => (sent, received, Ok(())),
        Err(err) => (0, 0, Err(err.to_string())),
    }
}
