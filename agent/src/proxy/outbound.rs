//! 15001: a pod's outbound connection, redirected by the kernel, is sent on to where it
//! was going. To a workload in the mesh it goes through an HBONE tunnel (mTLS to the
//! destination pod's 15008, as the source pod's identity, checking the destination's
//! identity); anywhere else it is passed through as it is. Either way it leaves from the
//! pod's netns, with the pod's address.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use warren_common::INBOUND_TUNNEL_PORT;

use super::{
    access_log::{new_connection_id, ConnectionRecord, Direction, ResponseFlags, Security},
    hbone::{self, ConnectRequest, PoolKey},
    is_agent_port, relay, Pod, ProxyContext,
};
use crate::{socket::connect_from, tls, workload::Workload};

/// A tunnel handshake (TCP + TLS) that takes longer than this is given up.
const TUNNEL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Opening a tunnelled stream (dial if needed, CONNECT, the peer reaching the app).
const TUNNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(25);

pub async fn handle(
    ctx: Arc<ProxyContext>,
    mut downstream: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
) {
    let Some(dst) = ctx
        .original_dst
        .outbound(&downstream, pod.netns_cookie, peer)
    else {
        tracing::warn!(pod = %pod.workload, %peer, "no original destination recorded for this connection (was it made to port 15001 directly?); resetting it");
        super::reset(downstream);
        return;
    };
    let index = ctx.workloads.current();
    // A service address is sent on to one of its ready endpoints, as kube-proxy would.
    let service = index.service_by_vip(dst.ip()).cloned();
    let endpoint = service.as_ref().map(|s| s.pick(dst));
    let dst = endpoint.flatten().unwrap_or(dst);
    let dst_workload = index.by_ip(dst.ip()).cloned();
    let mut record = ConnectionRecord::new(new_connection_id(), Direction::Outbound, dst);
    record.src_workload = Some(pod.workload.clone());
    record.src_identity = Some(pod.identity.to_string());
    record.dst_workload = dst_workload.clone();
    record.dst_service = service.clone();
    if let (Some(service), Some(None)) = (&service, endpoint) {
        record.failed(format!(
            "service {service} has no ready endpoint for port {}",
            dst.port()
        ));
        record.response_flags = ResponseFlags::NoHealthyUpstream;
        record.emit(&ctx.metrics);
        super::reset(downstream);
        return;
    }

    if let Some(reason) = looping(&pod, dst) {
        record.failed(format!("refused: {reason}"));
        record.emit(&ctx.metrics);
        super::reset(downstream);
        return;
    }
    match dst_workload.filter(|w| w.in_mesh) {
        Some(workload) => tunnel(&ctx, &pod, &workload, dst, &mut downstream, &mut record).await,
        None => {
            record.opened(&ctx.metrics);
            passthrough(&pod, dst, &mut downstream, &mut record, ctx.idle_timeout).await
        }
    }
    // The app sees a failure as one: a destination that could not be reached, a tunnel
    // the peer refused, a relay that broke all end in a reset, never a clean end.
    let failed = record.outcome.is_err();
    record.emit(&ctx.metrics);
    if failed {
        super::reset(downstream);
    }
}

/// Why sending a connection on to `dst` would come back to the agent, if it would.
/// Neither mode captures loopback, so a loopback or unspecified (`0.0.0.0`, `::`)
/// destination means the pod dialled an agent port itself (iptables' conntrack then
/// reports that port as the original destination); an agent port on the pod's own
/// address is the same loop by another name.
fn looping(pod: &Pod, dst: SocketAddr) -> Option<String> {
    let ip = dst.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        Some(format!(
            "{dst} is not a destination a captured connection can have (the pod dialled an agent port directly?)"
        ))
    } else if is_agent_port(dst.port()) && pod.workload.ips.contains(&ip) {
        Some(format!("{dst} is the agent's own port in this pod (loop)"))
    } else {
        None
    }
}

/// Not in the mesh: connect directly, from the pod's netns.
async fn passthrough(
    pod: &Pod,
    dst: SocketAddr,
    downstream: &mut TcpStream,
    record: &mut ConnectionRecord,
    idle: Duration,
) {
    let mut upstream = match connect_from(&pod.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            record.failed(err.to_string());
            return;
        }
    };
    record.src_addr = upstream.local_addr().ok().map(|a| a.to_string());
    relay(downstream, &mut upstream, record, idle).await;
}

/// In the mesh: a CONNECT stream over a pooled mTLS connection to the destination pod.
async fn tunnel(
    ctx: &ProxyContext,
    pod: &Pod,
    dst_workload: &Workload,
    dst: SocketAddr,
    downstream: &mut TcpStream,
    record: &mut ConnectionRecord,
) {
    let expected = match dst_workload.identity(&ctx.trust_domain) {
        Ok(identity) => identity,
        Err(err) => {
            record.failed(format!("no identity for {dst_workload}: {err}"));
            return;
        }
    };
    record.security = Security::MutualTls;
    record.dst_identity = Some(expected.to_string());
    record.opened(&ctx.metrics);
    let Some(src_ip) = pod.ip_like(dst.ip()) else {
        record.failed(format!(
            "{} has no address of the family of {dst}",
            pod.workload
        ));
        return;
    };
    record.src_addr = Some(src_ip.to_string());
    let request = ConnectRequest {
        authority: dst,
        connection_id: record.connection_id.clone(),
        forwarded_for: src_ip,
        baggage: pod.baggage.clone(),
    };
    // One pool entry per (source pod address and identity, destination identity and
    // address): a pooled connection always leaves from the pod that dialled it.
    let key = PoolKey {
        source: format!("{}@{src_ip}", pod.identity),
        destination: expected.to_string(),
        dst_ip: dst.ip(),
    };
    let tunnel_addr = SocketAddr::new(dst.ip(), INBOUND_TUNNEL_PORT);
    let dial = || async {
        let config =
            tls::client_config(ctx.secrets.clone(), pod.identity.clone(), expected.clone())
                .map_err(|err| err.to_string())?;
        tokio::time::timeout(TUNNEL_HANDSHAKE_TIMEOUT, async {
            let tcp = connect_from(&pod.netns, tunnel_addr)
                .await
                .map_err(|err| err.to_string())?;
            TlsConnector::from(config)
                .connect(server_name(dst.ip()), hbone::Transport::new(tcp))
                .await
                .map(|mut tls| {
                    tls.get_mut().0.buffer();
                    tls
                })
                .map_err(|err| {
                    let reason = tls::classify_handshake_error(&err);
                    ctx.metrics
                        .handshake_failed(Direction::Outbound, reason.reason_label());
                    format!("TLS handshake with {tunnel_addr} failed: {reason}")
                })
        })
        .await
        .map_err(|_| {
            ctx.metrics.handshake_failed(Direction::Outbound, "timeout");
            format!(
                "tunnel handshake with {tunnel_addr} timed out after {TUNNEL_HANDSHAKE_TIMEOUT:?}"
            )
        })?
    };
    // The destination agent answers once it has reached the app (its own dial is bounded
    // by the same connect timeout), so the whole exchange is bounded too.
    let open = tokio::time::timeout(TUNNEL_OPEN_TIMEOUT, ctx.pool.connect(key, &request, dial));
    match open.await {
        Ok(Ok(mut stream)) => relay(downstream, &mut stream, record, ctx.idle_timeout).await,
        Ok(Err(err)) => record.failed(err.to_string()),
        Err(_) => record.failed(format!(
            "no answer from {tunnel_addr} within {TUNNEL_OPEN_TIMEOUT:?}"
        )),
    }
}

/// Peers never check the name (identity is checked on the SPIFFE ID instead), and send
/// no SNI for an address; the destination's address is the natural placeholder.
fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}
