//! HBONE: TCP connections carried between agents as HTTP/2 `CONNECT` streams (port 15008),
//! the tunnel protocol of Istio ambient's ztunnel.
//!
//! This module is transport-generic: it speaks HTTP/2 over whatever established byte
//! stream it is handed (`AsyncRead + AsyncWrite + Unpin + Send + 'static`). The agent hands
//! it a mutual-TLS stream; authenticating the peer, secure naming and policy happen before
//! (client) or around (server) these calls, so identities are opaque strings here.
//!
//! | concern | file |
//! |---------|------|
//! | what goes on the wire: the CONNECT request, `Forwarded`, the refusal reason | [`headers`] |
//! | workload metadata in `baggage`, both ways | [`baggage`] |
//! | one tunnel as `AsyncRead + AsyncWrite` (half-close, flow control) | [`stream`] |
//! | client side: a pool of HTTP/2 connections per (source, destination, IP) | [`pool`] |
//! | server side: accept CONNECT requests and hand them to a handler | [`server`] |
//! | HTTP/2 PING keepalive shared by both sides | `keepalive` |
//!
//! # On the wire
//!
//! ```text
//! :method     CONNECT
//! :authority  10.77.2.10:9000              original destination (ip:port, IPv6 in brackets)
//! forwarded   for=10.77.1.10               original source (RFC 7239; IPv6: for="[fd00::1]")
//! x-warren-connection-id  <id>             shared by both agents' access-log lines
//! traceparent 00-<id>-<span>-01            the same id as a W3C trace id (ztunnel reads it)
//! baggage     k8s.namespace.name=demo,…    the source workload's metadata
//! ```
//!
//! The answer is `200` (the stream is now the tunnel; it carries the destination's
//! `baggage`) or an error status that ends the stream, with a human-readable reason in
//! `x-warren-reason` — the statuses ztunnel uses: 400 not a CONNECT we can serve (bad
//! authority, an address that is not the pod's), 401 denied by policy, 503 nothing to
//! connect to (the app refused, an agent port). The connection id has its own header
//! rather than riding in `baggage`: Istio peers parse `baggage` for workload metadata
//! (`k8s.*` keys, see [`baggage`]), and an opaque id does not belong there.
//!
//! # Flow control
//!
//! Windows are large (4 MiB per stream, 16 MiB per connection, like ztunnel) so a single
//! tunnel can fill a fast link; receive capacity is handed back to the peer only as the
//! reader consumes bytes, and writers only hand h2 as many bytes as it has send capacity
//! for, so neither direction buffers without bound.
pub mod baggage;
pub mod headers;
mod keepalive;
pub mod pool;
pub mod server;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod transport;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

pub use baggage::Baggage;
pub use headers::{CONNECTION_ID_HEADER, REASON_HEADER};
pub use pool::{Pool, PoolConfig, PoolKey};
pub use server::{serve, serve_until, InboundRequest};
pub use stream::HboneStream;
pub use transport::Transport;

/// What the client asks the peer agent to connect to, and on whose behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The original destination the application dialled (`:authority`). IPv4-mapped IPv6
    /// addresses are sent as plain IPv4.
    pub authority: SocketAddr,
    /// Shared by the access-log lines of both agents (`x-warren-connection-id`). Must be
    /// visible ASCII.
    pub connection_id: String,
    /// The original source address (`forwarded: for=<ip>`).
    pub forwarded_for: IpAddr,
    /// The source workload's metadata (`baggage`), for a ztunnel peer's metrics.
    pub baggage: Baggage,
}

/// HTTP/2 settings both sides use. Large windows let one stream use the whole link.
pub(crate) mod tuning {
    use std::time::Duration;

    /// Per-stream receive window (ztunnel: 4 MiB).
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    /// Per-connection receive window (ztunnel: 16 MiB).
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    /// Largest frame we accept: the HTTP/2 default, which every peer supports, and one TLS
    /// record's worth. Measured on loopback (one stream, release build, no TLS), 16 KiB
    /// frames moved ~1.4 GiB/s against ~0.9 GiB/s for 64 KiB and less for 256 KiB: h2
    /// buffers a frame whole before delivering it, so big frames add latency per hop.
    pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
    /// Our headers are a handful of short fields.
    pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
    /// Bytes a stream may hand h2 before the connection task has written them out, or
    /// while the peer grants no window. The relay reads from the application only as
    /// much as h2 has room for, so this is all a peer that stops reading can pin per
    /// stream: with [`SERVER_MAX_CONCURRENT_STREAMS`] streams, 100 × 64 KiB = 6.25 MiB per
    /// HBONE connection (512 KiB pinned 50 MiB). See docs/performance.md for what the
    /// smaller buffer costs in throughput.
    pub const MAX_SEND_BUFFER: usize = 64 * 1024;
    /// Streams a peer may open on one connection. ztunnel and our own pool
    /// (`PoolConfig::max_streams_per_connection`) open at most 100 and then dial a new
    /// connection, so more only lets one peer multiply what it can pin (above).
    pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 100;
    /// Framing-overhead budget for small DATA frames the application has not read yet,
    /// in h2's unit (each frame under 256 bytes costs `256 - len`). h2's default (half the
    /// connection window) lets a chatty writer facing a slow reader kill the whole
    /// connection, and every stream on it, with ENHANCE_YOUR_CALM; ztunnel turned the
    /// budget off for that reason. Peers are authenticated agents, so we allow four times
    /// the connection window: about 260 000 unread tiny frames, still a bound on memory.
    pub const DATA_FRAME_BUDGET: usize = 4 * CONNECTION_WINDOW as usize;
    /// Buffers between a tunnel's TCP socket and rustls (per pooled connection, not per
    /// stream). Reading: rustls asks for at most 4 KiB at a time; one `recv` now fills
    /// 64 KiB. Writing: h2 hands rustls one DATA frame at a time, and rustls writes each
    /// record out at once; the records now leave together when h2 flushes. See
    /// docs/performance.md for what they changed. Allocated only once the TLS handshake
    /// is done ([`super::Transport`]).
    pub const TRANSPORT_BUFFER: usize = 64 * 1024;
    /// A peer must finish the HTTP/2 preface within this time.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Why a tunnel could not be opened, accepted or served.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("could not reach the HBONE port (15008) of {dst_ip}; is the peer agent running, or is a NetworkPolicy blocking it? {error}")]
    Dial { dst_ip: IpAddr, error: String },
    #[error("the peer did not complete the HTTP/2 handshake within {0:?}; it is stalled or does not speak HBONE")]
    HandshakeTimeout(Duration),
    #[error("HTTP/2 handshake failed; the peer does not speak HBONE (HTTP/2 over mTLS) or closed the connection: {0}")]
    Handshake(#[source] h2::Error),
    #[error("the HBONE connection failed before the peer agent answered the CONNECT request: {0}")]
    Request(#[source] h2::Error),
    #[error("the peer agent refused the tunnel: {status}: {reason}")]
    Refused {
        status: http::StatusCode,
        reason: String,
    },
    #[error("connection id {0:?} cannot be sent as an HTTP header (visible ASCII only)")]
    InvalidConnectionId(String),
    #[error("answering the CONNECT request failed; the peer reset the stream or the connection closed: {0}")]
    Respond(#[source] h2::Error),
    #[error("the HBONE connection failed: {0}")]
    Connection(#[source] h2::Error),
    #[error("the HBONE peer did not answer keepalive pings for {0:?}; the connection was dropped (peer node gone or network partitioned?)")]
    KeepaliveTimeout(Duration),
}
