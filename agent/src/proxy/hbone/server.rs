//! The server side: one HTTP/2 connection from a peer agent, each CONNECT request handed
//! to the caller's handler on a task of its own.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::pin,
    time::Duration,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    baggage::{Baggage, BAGGAGE_HEADER},
    headers::{self, ParsedConnect, REASON_HEADER},
    keepalive, tuning, HboneError, HboneStream,
};

/// A CONNECT request from a peer agent, waiting for an answer.
///
/// The handler decides: typically it connects to the application first, then
/// [`accept`](Self::accept)s (200) or [`refuse`](Self::refuse)s (e.g. 503 when the app
/// refused). Dropping it unanswered answers 500, so the client never waits forever.
pub struct InboundRequest {
    parsed: ParsedConnect,
    recv: Option<RecvStream>,
    respond: Option<SendResponse<Bytes>>,
}

impl InboundRequest {
    /// The original destination the client's application dialled.
    pub fn authority(&self) -> SocketAddr {
        self.parsed.authority
    }

    /// The id both agents log for this connection, if the client sent one.
    pub fn connection_id(&self) -> Option<&str> {
        self.parsed.connection_id.as_deref()
    }

    /// The original source address from `Forwarded`, if present and parsable.
    pub fn forwarded_for(&self) -> Option<IpAddr> {
        self.parsed.forwarded_for
    }

    /// What the client said about the source workload (`baggage`; empty if nothing).
    pub fn baggage(&self) -> &Baggage {
        &self.parsed.baggage
    }

    /// Answers 200, with the destination's metadata in `baggage` as ztunnel answers, and
    /// returns the tunnel.
    pub fn accept(mut self, baggage: &Baggage) -> Result<HboneStream, HboneError> {
        let (Some(mut respond), Some(recv)) = (self.respond.take(), self.recv.take()) else {
            // Both are only taken here or in refuse/drop, which consume self.
            return Err(HboneError::Respond(h2::Error::from(
                h2::Reason::INTERNAL_ERROR,
            )));
        };
        // `Response::new` is a 200 with no headers.
        let mut response = Response::new(());
        if let Some(value) = baggage.header_value() {
            response.headers_mut().insert(BAGGAGE_HEADER, value);
        }
        let send = respond
            .send_response(response, false)
            .map_err(HboneError::Respond)?;
        Ok(HboneStream::new(send, recv, None))
    }

    /// Answers `status` (ztunnel's: 400 not an address of this pod, 401 denied by
    /// policy, 503 the app refused, …) with `reason` in `x-warren-reason`; the stream ends. A 2xx status would
    /// read as success to the client, so it is sent as 500.
    pub fn refuse(mut self, status: StatusCode, reason: &str) {
        if let Some(respond) = self.respond.take() {
            let status = if status.is_success() {
                tracing::warn!(%status, reason, "refusing an HBONE request with a success status; sending 500 instead");
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                status
            };
            send_refusal(respond, status, reason);
        }
    }
}

impl Drop for InboundRequest {
    fn drop(&mut self) {
        if let Some(respond) = self.respond.take() {
            tracing::warn!(authority = %self.parsed.authority, connection_id = ?self.parsed.connection_id,
                "HBONE request dropped without an answer; answering 500");
            send_refusal(
                respond,
                StatusCode::INTERNAL_SERVER_ERROR,
                "the receiving agent dropped the request without answering",
            );
        }
    }
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("authority", &self.parsed.authority)
            .field("connection_id", &self.parsed.connection_id)
            .field("forwarded_for", &self.parsed.forwarded_for)
            .finish()
    }
}

fn send_refusal(mut respond: SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(REASON_HEADER, headers::reason_value(reason));
    if let Err(err) = respond.send_response(response, true) {
        // The client reset the stream or the connection is gone: nobody to tell.
        tracing::debug!(%status, error = %err, "could not send an HBONE refusal");
    }
}

/// Serves one HTTP/2 connection from a peer agent until it closes.
///
/// Each valid CONNECT request is handed to `handler` on a task of its own. Requests that
/// are not a plain CONNECT to an `ip:port` authority get 400 with the reason (h2 itself
/// resets a CONNECT that carries `:scheme` or `:path` with PROTOCOL_ERROR before we see
/// it). A peer that does not send the HTTP/2 preface within 10 s, or sends something else
/// (TLS garbage, HTTP/1.1), ends the connection with an error.
///
/// Returns `Ok` when the peer closes the connection cleanly; streams already handed out
/// keep running on their own tasks only as long as the connection does, so the caller
/// should keep this future alive (it is the connection's driver).
pub async fn serve<IO, H, Fut>(io: IO, handler: H) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_until(io, handler, std::future::pending()).await
}

/// [`serve`], draining once `drain` completes: the peer is told with GOAWAY to open no
/// more streams here (its pool dials a new connection), the streams it has run to their
/// end, then the connection closes. For a pod that left the mesh or changed: new
/// connections must meet its new state, not its old one.
pub async fn serve_until<IO, H, Fut>(
    io: IO,
    handler: H,
    drain: impl Future<Output = ()>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with_handshake_timeout(io, handler, tuning::HANDSHAKE_TIMEOUT, drain).await
}

pub(super) async fn serve_with_handshake_timeout<IO, H, Fut>(
    io: IO,
    handler: H,
    handshake_timeout: Duration,
    drain: impl Future<Output = ()>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(tuning::STREAM_WINDOW)
        .initial_connection_window_size(tuning::CONNECTION_WINDOW)
        .max_frame_size(tuning::MAX_FRAME_SIZE)
        .max_header_list_size(tuning::MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(tuning::MAX_SEND_BUFFER)
        .max_concurrent_streams(tuning::SERVER_MAX_CONCURRENT_STREAMS)
        .data_frame_budget(tuning::DATA_FRAME_BUDGET);
    let mut conn =
        match tokio::time::timeout(handshake_timeout, builder.handshake::<_, Bytes>(io)).await {
            Err(_elapsed) => return Err(HboneError::HandshakeTimeout(handshake_timeout)),
            Ok(Err(err)) => return Err(HboneError::Handshake(err)),
            Ok(Ok(conn)) => conn,
        };
    let mut keepalive = pin!(keepalive::watch(conn.ping_pong()));
    let mut drain = pin!(drain);
    let mut draining = false;
    loop {
        tokio::select! {
            () = &mut drain, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            next = conn.accept() => match next {
                None => return Ok(()),
                Some(Err(err)) => return Err(HboneError::Connection(err)),
                Some(Ok((request, respond))) => dispatch(request, respond, &handler),
            },
            silent_for = &mut keepalive => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(HboneError::KeepaliveTimeout(silent_for));
            }
        }
    }
}

fn dispatch<H, Fut>(request: http::Request<RecvStream>, respond: SendResponse<Bytes>, handler: &H)
where
    H: Fn(InboundRequest) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (parts, recv) = request.into_parts();
    let head = http::Request::from_parts(parts, ());
    match headers::parse_connect(&head) {
        Ok(parsed) => {
            tracing::debug!(authority = %parsed.authority, connection_id = ?parsed.connection_id,
                forwarded_for = ?parsed.forwarded_for, "HBONE CONNECT request");
            let request = InboundRequest {
                parsed,
                recv: Some(recv),
                respond: Some(respond),
            };
            tokio::spawn(handler(request));
        }
        Err(reason) => {
            tracing::warn!(method = %head.method(), uri = %head.uri(), %reason,
                "rejecting an HBONE request with 400");
            send_refusal(respond, StatusCode::BAD_REQUEST, &reason);
        }
    }
}
