//! The userspace data path: the listeners the agent serves inside each enrolled pod.
//!
//! | port  | listener            | bound in       | what arrives                               |
//! |-------|---------------------|----------------|--------------------------------------------|
//! | 15001 | [`outbound`]        | pod netns, `[::]` | the pod's own outbound TCP, redirected   |
//! | 15006 | [`inbound_passthrough`] | pod netns, `[::]` | TCP to the pod's addresses, steered by sk_lookup or iptables |
//! | 15008 | [`inbound`]         | pod netns, `[::]` | HBONE (HTTP/2 CONNECT over mTLS) from other agents |
//!
//! Each listener accepts through [`accept::accept_loop`]: a failed accept is counted,
//! logged at most once a second and, when the next would fail too (out of file
//! descriptors), waited out. 15006 and 15008 then admit each connection against the
//! per-source [`limits`] before any other work.
pub mod accept;
pub mod access_log;
pub mod hbone;
pub mod inbound;
pub mod inbound_passthrough;
pub mod limits;
pub mod outbound;
pub mod refusals;
pub mod relay;

pub use accept::accept_loop;
pub(crate) use relay::relay;

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use tokio::net::TcpStream;

use access_log::ConnectionRecord;
use warren_common::{INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT};

use crate::{
    identity::{Identity, SecretManager},
    metrics::Metrics,
    netns::Netns,
    policy::{PolicyRef, SharedPolicy},
    redirect::OriginalDst,
    workload::{SharedWorkloads, Workload},
};

/// What every connection handler needs, shared by all pods of the node.
pub struct ProxyContext {
    /// Every known workload by address; replaced when pods join or leave the mesh.
    pub workloads: SharedWorkloads,
    pub original_dst: OriginalDst,
    pub trust_domain: String,
    pub secrets: Arc<SecretManager>,
    /// Outbound HBONE connections, shared by all pods (keyed by source pod).
    pub pool: hbone::Pool,
    /// PeerAuthentication and AuthorizationPolicy, evaluated at the destination; replaced
    /// when the policy source changes.
    pub policy: Arc<SharedPolicy>,
    /// The node's own addresses: connections from them are the node's health probes.
    pub node_ips: HashSet<IpAddr>,
    pub metrics: Arc<Metrics>,
    /// The last refusals by policy, for `/config_dump` and `warren status`.
    pub refusals: refusals::RecentRefusals,
    /// What each client may hold of the tunnel (15008) and plaintext (15006) listeners.
    pub admission: Arc<limits::ListenerAdmission>,
    /// Failed accepts on every pod's listeners: counted, and logged once a second.
    pub accept_errors: Arc<accept::AcceptErrors>,
    /// A proxied connection on which no byte moved either way for this long is closed
    /// (reset), as Istio's TCP idle timeout does (`--idle-timeout`, 1 h).
    pub idle_timeout: Duration,
}

/// An enrolled pod as the proxy sees it.
pub struct Pod {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub netns: Netns,
    pub netns_cookie: u64,
    /// TLS for the pod's 15008: presents the pod's identity, requires a client certificate.
    pub tls_server: Arc<rustls::ServerConfig>,
    /// What the pod's tunnels say about it in `baggage` (made once, sent on every one).
    pub baggage: hbone::Baggage,
    /// Set when the pod leaves the mesh (or changes): its HBONE connections drain.
    leaving: tokio::sync::watch::Sender<bool>,
}

impl Pod {
    pub fn new(
        workload: Arc<Workload>,
        identity: Identity,
        netns: Netns,
        netns_cookie: u64,
        tls_server: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self {
            baggage: hbone::Baggage::of(&workload),
            workload,
            identity,
            netns,
            netns_cookie,
            tls_server,
            leaving: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The pod left the mesh: tell its tunnel connections to drain.
    pub fn leave(&self) {
        self.leaving.send_replace(true);
    }

    /// Completes once [`Self::leave`] was called.
    pub fn left(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut leaving = self.leaving.subscribe();
        async move {
            // An error means the pod is gone altogether: leaving too.
            let _ = leaving.wait_for(|left| *left).await;
        }
    }

    /// The pod's address of the same family as `other`.
    pub fn ip_like(&self, other: std::net::IpAddr) -> Option<std::net::IpAddr> {
        let v4 = other.to_canonical().is_ipv4();
        self.workload
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == v4)
    }
}

/// The three listeners of every enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// 15001: the pod's own outbound connections.
    Outbound,
    /// 15006: plain TCP to the pod.
    Plaintext,
    /// 15008: HBONE tunnels to the pod.
    Tunnel,
}

impl Listener {
    pub fn port(self) -> u16 {
        match self {
            Listener::Outbound => OUTBOUND_PORT,
            Listener::Plaintext => INBOUND_PLAINTEXT_PORT,
            Listener::Tunnel => INBOUND_TUNNEL_PORT,
        }
    }

    /// The `listener` label of the agent's metrics: the port.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Outbound => "15001",
            Listener::Plaintext => "15006",
            Listener::Tunnel => "15008",
        }
    }

    /// Its name in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Plaintext => "inbound-plaintext",
            Listener::Tunnel => "inbound-tunnel",
        }
    }

    /// What it carries, for log lines ("tunnel connections refused").
    pub fn traffic(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Plaintext => "plaintext",
            Listener::Tunnel => "tunnel",
        }
    }
}

/// The agent's own ports: a connection *to* one of them through a capture path would loop.
pub fn is_agent_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_TUNNEL_PORT
    )
}

/// Record and count a refusal by a security policy.
pub fn refused_by_policy(
    ctx: &ProxyContext,
    record: &mut ConnectionRecord,
    policy: &PolicyRef,
    reason: &str,
) {
    record.outcome = Err(format!("denied by {policy:?}: {reason}"));
    record.response_flags = access_log::ResponseFlags::Deny;
    ctx.metrics.count_refusal(policy);
    ctx.refusals.record(record, policy, reason);
}

/// Close `stream` with a reset (RST), as a refused connection should be: the client sees
/// "connection reset", not a clean end of stream.
pub fn reset(mut stream: TcpStream) {
    relay::Duplex::abort(&mut stream);
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listeners_metric_label_is_its_port() {
        for listener in [Listener::Outbound, Listener::Plaintext, Listener::Tunnel] {
            assert_eq!(listener.label(), listener.port().to_string());
            assert!(is_agent_port(listener.port()));
        }
    }
}
