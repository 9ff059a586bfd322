//! 15008: HBONE tunnels from other agents. The client's certificate chain is verified
//! against the trust bundle during the TLS handshake; its SPIFFE ID is the peer identity
//! of every stream on the connection. Each CONNECT stream names an address of this pod;
//! the agent connects to the app there, from inside the pod's netns.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    access_log::{new_connection_id, ConnectionRecord, Direction, Security},
    hbone::{self, InboundRequest},
    is_agent_port, refused_by_policy, relay, Pod, ProxyContext,
};
use crate::policy::{ConnectionInfo, Decision};
use crate::{identity::Identity, socket::connect_from, tls};

/// A peer that has not finished the TLS handshake by then is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(ctx: Arc<ProxyContext>, tcp: TcpStream, peer: SocketAddr, pod: Arc<Pod>) {
    // Tunnels come from other pods. The pod itself dialling its own 15008 (loopback, or
    // its own address, which no capture path sends here) is reset before any TLS.
    if peer.ip().is_loopback() || pod.workload.ips.contains(&peer.ip()) {
        tracing::debug!(pod = %pod.workload, %peer, "tunnel refused: from the pod itself");
        super::reset(tcp);
        return;
    }
    // Admitted against the listener limits before any TLS work: over a limit, reset.
    let Ok(mut admission) = ctx.admission.admit_tunnel(pod.netns_cookie, peer.ip()) else {
        super::reset(tcp);
        return;
    };
    let acceptor = TlsAcceptor::from(pod.tls_server.clone());
    let mut tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        acceptor.accept(hbone::Transport::new(tcp)),
    )
    .await
    {
        Err(_) => {
            ctx.metrics.handshake_failed(Direction::Inbound, "timeout");
            tracing::warn!(pod = %pod.workload, %peer, "tunnel refused: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
        Ok(Err(err)) => {
            let reason = tls::classify_handshake_error(&err);
            ctx.metrics
                .handshake_failed(Direction::Inbound, reason.reason_label());
            tracing::warn!(pod = %pod.workload, %peer, %reason, "tunnel refused: TLS handshake failed");
            return;
        }
        Ok(Ok(tls)) => tls,
    };
    // Authenticated: the connection now gets its transport buffers, and stops counting
    // as a pending handshake (it counts against its source until it closes).
    tls.get_mut().0.buffer();
    admission.handshake_done();
    let peer_identity = match tls::peer_identity(tls.get_ref().1) {
        Ok(identity) => identity,
        Err(err) => {
            tracing::warn!(pod = %pod.workload, %peer, reason = %err, "tunnel refused: no usable peer identity");
            return;
        }
    };
    let streams = {
        let (ctx, pod, peer_identity) = (ctx.clone(), pod.clone(), peer_identity.clone());
        move |request| {
            stream(
                ctx.clone(),
                pod.clone(),
                peer_identity.clone(),
                peer,
                request,
            )
        }
    };
    if let Err(err) = hbone::serve_until(tls, streams, pod.left()).await {
        tracing::warn!(pod = %pod.workload, %peer, identity = %peer_identity, error = %err, "tunnel connection ended with an error");
    }
}

/// The workload the tunnel comes from: the one at the transport peer's address, if its
/// identity is the one the certificate proved. A peer whose certificate is another
/// identity's (a node-level proxy, a stolen key) is named by its identity only.
fn source_workload(
    ctx: &ProxyContext,
    src_ip: std::net::IpAddr,
    peer_identity: &Identity,
) -> Option<Arc<crate::workload::Workload>> {
    let workload = ctx.workloads.current().by_ip(src_ip).cloned()?;
    match workload.identity(&ctx.trust_domain) {
        Ok(identity) if identity == *peer_identity => Some(workload),
        _ => {
            tracing::warn!(%src_ip, workload = %workload, identity = %peer_identity, "tunnel from a workload's address with another identity's certificate; not naming the workload as its source");
            None
        }
    }
}

/// One CONNECT stream: deliver it to the app, or refuse it with a reason.
async fn stream(
    ctx: Arc<ProxyContext>,
    pod: Arc<Pod>,
    peer_identity: Identity,
    peer: SocketAddr,
    request: InboundRequest,
) {
    let dst = request.authority();
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let id = request
        .connection_id()
        .map(str::to_owned)
        .unwrap_or_else(new_connection_id);
    let mut record = ConnectionRecord::new(id, Direction::Inbound, dst);
    record.security = Security::MutualTls;
    // The source is the tunnel's transport peer — the source pod dials from its own
    // address, as ztunnel does — and its certificate; `forwarded` is only what the peer
    // says, so it is logged when it disagrees and never decides anything.
    let src_ip = peer.ip().to_canonical();
    if let Some(claimed) = request.forwarded_for() {
        if claimed.to_canonical() != src_ip {
            tracing::info!(pod = %pod.workload, %peer, identity = %peer_identity, forwarded_for = %claimed, "tunnel's forwarded header names another source than its transport peer; the transport peer is used");
        }
    }
    record.src_addr = Some(src_ip.to_string());
    record.src_workload = source_workload(&ctx, src_ip, &peer_identity);
    if !request.baggage().is_empty() {
        record.src_baggage = Some(request.baggage().clone());
    }
    record.src_identity = Some(peer_identity.to_string());
    record.dst_workload = Some(pod.workload.clone());
    record.dst_identity = Some(pod.identity.to_string());
    record.opened(&ctx.metrics);

    // The statuses ztunnel answers with, so that a ztunnel client reads them alike.
    let refusal = if !pod.workload.ips.contains(&dst.ip()) {
        Some((
            StatusCode::BAD_REQUEST,
            format!("{dst} is not an address of {} on this node", pod.workload),
        ))
    } else if is_agent_port(dst.port()) {
        Some((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{dst} is one of the agent's own ports"),
        ))
    } else {
        None
    };
    if let Some((status, reason)) = refusal {
        request.refuse(status, &reason);
        record.failed(format!("refused ({status}): {reason}"));
        record.emit(&ctx.metrics);
        return;
    }
    let connection = ConnectionInfo {
        source_ip: src_ip,
        source_identity: Some(peer_identity),
        destination_ip: dst.ip(),
        destination_port: dst.port(),
    };
    if let Decision::Deny { policy, reason } =
        ctx.policy.current().authorize(&pod.workload, &connection)
    {
        refused_by_policy(&ctx, &mut record, &policy, &reason);
        request.refuse(StatusCode::UNAUTHORIZED, &format!("denied by {policy:?}"));
        record.emit(&ctx.metrics);
        return;
    }
    let mut upstream = match connect_from(&pod.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            request.refuse(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
            record.failed(err.to_string());
            record.emit(&ctx.metrics);
            return;
        }
    };
    match request.accept(&pod.baggage) {
        Ok(mut tunnel) => relay(&mut tunnel, &mut upstream, &mut record, ctx.idle_timeout).await,
        Err(err) => record.outcome = Err(err.to_string()),
    }
    record.emit(&ctx.metrics);
}
