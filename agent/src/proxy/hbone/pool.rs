//! The client side: HTTP/2 connections to peer agents, pooled per (source identity,
//! destination identity, destination IP), each carrying many CONNECT streams.
//!
//! - A connection is reused while it has fewer than `max_streams_per_connection` open
//!   streams; when all are full, another is dialled.
//! - Dialling for a key is serialised (one gate per key): concurrent `connect`s that find
//!   no room wait for the one dial in flight and then share its connection, instead of
//!   each opening their own. If that dial fails, those already waiting get its error
//!   rather than all retrying one after another against a peer that is down.
//! - Each connection has a driver task. When the connection ends (peer closed it, I/O
//!   error, keepalive timeout) the driver removes it, so a broken connection is not handed
//!   out again. A connection that died before the driver noticed fails the request at the
//!   connection level before the peer answered; it is dropped and the request tried on
//!   another connection (or a fresh dial), which is safe because no tunnel byte has been
//!   sent yet.
//! - A connection with no streams for `idle_timeout` is removed and closed with GOAWAY.
use std::{
    collections::HashMap,
    fmt,
    future::{self, poll_fn, Future},
    net::IpAddr,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::StatusCode;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Notify,
    time::Instant,
};

use super::{headers, keepalive, tuning, ConnectRequest, HboneError, HboneStream};

/// How long a retired idle connection may take to say GOAWAY and close.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(5);

/// Which connections a stream may share: same source identity (the client certificate
/// presented), same expected server identity (secure naming), same destination IP (the
/// pod whose 15008 is dialled).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: String,
    pub destination: String,
    pub dst_ip: IpAddr,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} at {}",
            self.source, self.destination, self.dst_ip
        )
    }
}

/// Pool limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Streams per HTTP/2 connection before another is opened (ztunnel: 100). Zero is
    /// taken as one.
    pub max_streams_per_connection: u32,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// HBONE client connections, shared by every outbound connection of the agent. Cloning
/// is cheap and clones share the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .field("connections", &self.connections())
            .finish()
    }
}

impl Pool {
    pub fn new(config: PoolConfig) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                config,
                next_id: AtomicU64::new(1),
                connections: Mutex::new(HashMap::new()),
                dial_gates: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A CONNECT stream to `request.authority` over a pooled HTTP/2 connection for `key`.
    ///
    /// `dial` is awaited only when no pooled connection has room; it returns the
    /// established transport (in the agent: a TLS stream dialled from the pod's netns,
    /// with the peer's identity already verified against `key.destination`). A response
    /// other than 200 is [`HboneError::Refused`].
    ///
    /// There is no timeout here: wrap the call in `tokio::time::timeout` to bound the dial
    /// and the wait for the peer's answer (the peer typically connects to its application
    /// before it answers).
    pub async fn connect<IO, F, Fut, E>(
        &self,
        key: PoolKey,
        request: &ConnectRequest,
        dial: F,
    ) -> Result<HboneStream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: fmt::Display,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut dial = Some(dial);
        loop {
            // Built first so a bad connection id fails before anything is dialled.
            let head = headers::connect_request(request)?;
            let (connection, slot) = self.inner.checkout_or_dial(&key, &mut dial).await?;
            match open_stream(connection.sender.clone(), head, slot).await {
                Ok(stream) => return Ok(stream),
                Err(OpenError::Failed(err)) => return Err(err),
                Err(OpenError::ConnectionLost(err)) => {
                    tracing::debug!(%key, connection = connection.state.id, error = %err,
                        "pooled HBONE connection is gone; dropping it");
                    self.inner.discard(&key, &connection.state);
                    if dial.is_none() {
                        // The connection we just dialled failed at once: nothing left to try.
                        return Err(HboneError::Request(err));
                    }
                }
            }
        }
    }

    /// Open HTTP/2 connections (a gauge for metrics and tests).
    pub fn connections(&self) -> usize {
        lock(&self.inner.connections).values().map(Vec::len).sum()
    }

    /// Open HTTP/2 connections for `key`.
    pub fn connections_for(&self, key: &PoolKey) -> usize {
        lock(&self.inner.connections).get(key).map_or(0, Vec::len)
    }
}

/// Locks a pool map; a panic elsewhere while holding the lock leaves the map consistent
/// (every update is a single insert or remove), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct PoolInner {
    config: PoolConfig,
    next_id: AtomicU64,
    connections: Mutex<HashMap<PoolKey, Vec<PooledConnection>>>,
    dial_gates: Mutex<HashMap<PoolKey, Arc<DialGate>>>,
}

/// Serialises dialling for one key; remembers the last failure for those queued behind it.
type DialGate = tokio::sync::Mutex<Option<DialFailure>>;

struct DialFailure {
    at: Instant,
    error: String,
}

#[derive(Clone)]
struct PooledConnection {
    sender: SendRequest<Bytes>,
    state: Arc<ConnectionState>,
}

/// What the pool, the driver task and the streams share about one connection.
struct ConnectionState {
    id: u64,
    max_streams: usize,
    /// Streams handed out and not yet dropped (including those still being opened).
    active: AtomicUsize,
    /// When `active` last dropped to zero.
    idle_since: Mutex<Instant>,
    /// Wakes the driver to start its idle timer.
    became_idle: Notify,
    /// Set when the connection must not be handed out any more.
    closed: AtomicBool,
}

impl ConnectionState {
    /// A place for one more stream, if the connection is usable and has room. Called with
    /// the connections map locked, so it cannot race retirement.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_streams).then_some(n + 1)
            })
            .ok()?;
        Some(StreamSlot {
            state: Arc::clone(self),
        })
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        (self.active.load(Ordering::Acquire) == 0).then(|| *lock(&self.idle_since) + idle_timeout)
    }
}

/// One stream's place on a pooled connection; dropping it (with the stream) frees it.
pub(crate) struct StreamSlot {
    state: Arc<ConnectionState>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.state.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.state.idle_since) = Instant::now();
            self.state.became_idle.notify_one();
        }
    }
}

/// Removes an unused dial gate when the last user is done, even if the `connect` future
/// is dropped while waiting.
struct GateTicket<'a> {
    pool: &'a PoolInner,
    key: &'a PoolKey,
    gate: Arc<DialGate>,
}

impl Drop for GateTicket<'_> {
    fn drop(&mut self) {
        let mut gates = lock(&self.pool.dial_gates);
        // Clones are only made with `dial_gates` locked: 2 means the map's and ours.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(self.key);
        }
    }
}

impl PoolInner {
    fn checkout(&self, key: &PoolKey) -> Option<(PooledConnection, StreamSlot)> {
        let connections = lock(&self.connections);
        connections.get(key)?.iter().find_map(|connection| {
            let slot = connection.state.try_reserve()?;
            Some((connection.clone(), slot))
        })
    }

    async fn checkout_or_dial<IO, F, Fut, E>(
        self: &Arc<Self>,
        key: &PoolKey,
        dial: &mut Option<F>,
    ) -> Result<(PooledConnection, StreamSlot), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: fmt::Display,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        let ticket = GateTicket {
            pool: self,
            key,
            gate: Arc::clone(lock(&self.dial_gates).entry(key.clone()).or_default()),
        };
        let queued_at = Instant::now();
        let mut last_failure = ticket.gate.lock().await;
        // Whoever held the gate before us may have opened a connection with room.
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        if let Some(failure) = last_failure.as_ref().filter(|f| f.at >= queued_at) {
            return Err(HboneError::Dial {
                dst_ip: key.dst_ip,
                error: format!("{} (a concurrent dial failed just now)", failure.error),
            });
        }
        let Some(dial) = dial.take() else {
            return Err(HboneError::Dial {
                dst_ip: key.dst_ip,
                error: "the connection dialled for this request failed at once, and no pooled connection has room".into(),
            });
        };
        match self.establish(key, dial).await {
            Ok(found) => {
                *last_failure = None;
                Ok(found)
            }
            Err(err) => {
                let error = match &err {
                    HboneError::Dial { error, .. } => error.clone(),
                    other => other.to_string(),
                };
                *last_failure = Some(DialFailure {
                    at: Instant::now(),
                    error,
                });
                Err(err)
            }
        }
    }

    /// Dials, runs the HTTP/2 handshake, and adds the connection with one slot taken.
    async fn establish<IO, F, Fut, E>(
        self: &Arc<Self>,
        key: &PoolKey,
        dial: F,
    ) -> Result<(PooledConnection, StreamSlot), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: fmt::Display,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = dial().await.map_err(|err| HboneError::Dial {
            dst_ip: key.dst_ip,
            error: err.to_string(),
        })?;
        let max_streams = self.config.max_streams_per_connection.max(1);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(tuning::STREAM_WINDOW)
            .initial_connection_window_size(tuning::CONNECTION_WINDOW)
            .max_frame_size(tuning::MAX_FRAME_SIZE)
            .max_header_list_size(tuning::MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(tuning::MAX_SEND_BUFFER)
            // Until the server's SETTINGS say otherwise; h2 queues streams beyond its limit.
            .initial_max_send_streams(max_streams as usize)
            .enable_push(false)
            .data_frame_budget(tuning::DATA_FRAME_BUDGET);
        let (sender, connection) = match tokio::time::timeout(
            tuning::HANDSHAKE_TIMEOUT,
            builder.handshake::<_, Bytes>(io),
        )
        .await
        {
            Err(_elapsed) => return Err(HboneError::HandshakeTimeout(tuning::HANDSHAKE_TIMEOUT)),
            Ok(Err(err)) => return Err(HboneError::Handshake(err)),
            Ok(Ok(handshake)) => handshake,
        };
        let state = Arc::new(ConnectionState {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            max_streams: max_streams as usize,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            became_idle: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let slot = StreamSlot {
            state: Arc::clone(&state),
        };
        let pooled = PooledConnection { sender, state };
        lock(&self.connections)
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        tracing::debug!(%key, connection = pooled.state.id, "opened HBONE connection");
        // Spawned after the insert, so a connection that dies at once is still removed.
        tokio::spawn(drive(
            connection,
            Arc::clone(&pooled.state),
            Arc::downgrade(self),
            key.clone(),
            self.config.idle_timeout,
        ));
        Ok((pooled, slot))
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut connections = lock(&self.connections);
        if let Some(list) = connections.get_mut(key) {
            list.retain(|connection| connection.state.id != id);
            if list.is_empty() {
                connections.remove(key);
            }
        }
    }

    fn discard(&self, key: &PoolKey, state: &ConnectionState) {
        state.closed.store(true, Ordering::Release);
        self.remove(key, state.id);
    }

    /// Removes the connection if it has had no streams for `idle_timeout`. Under the map
    /// lock, so no checkout can slip in between the check and the removal.
    fn retire_if_idle(&self, key: &PoolKey, state: &ConnectionState) -> bool {
        let mut connections = lock(&self.connections);
        let idle = state.active.load(Ordering::Acquire) == 0
            && lock(&state.idle_since).elapsed() >= self.config.idle_timeout;
        if !idle {
            return false;
        }
        state.closed.store(true, Ordering::Release);
        if let Some(list) = connections.get_mut(key) {
            list.retain(|connection| connection.state.id != state.id);
            if list.is_empty() {
                connections.remove(key);
            }
        }
        true
    }
}

enum OpenError {
    /// The connection failed (I/O error, GOAWAY) before the peer answered. No tunnel byte
    /// has been sent yet, so trying another connection is safe: at worst the destination
    /// sees one extra connection that carries nothing.
    ConnectionLost(h2::Error),
    Failed(HboneError),
}

impl OpenError {
    fn from_response(err: h2::Error) -> Self {
        // REFUSED_STREAM: the server did not process the stream (it was draining), so
        // another connection may take it.
        if err.is_io() || err.is_go_away() || err.reason() == Some(h2::Reason::REFUSED_STREAM) {
            OpenError::ConnectionLost(err)
        } else {
            OpenError::Failed(HboneError::Request(err))
        }
    }
}

async fn open_stream(
    mut sender: SendRequest<Bytes>,
    head: http::Request<()>,
    slot: StreamSlot,
) -> Result<HboneStream, OpenError> {
    poll_fn(|cx| sender.poll_ready(cx))
        .await
        .map_err(OpenError::ConnectionLost)?;
    let (response, send) = sender
        .send_request(head, false)
        .map_err(OpenError::ConnectionLost)?;
    let response = response.await.map_err(OpenError::from_response)?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(OpenError::Failed(HboneError::Refused {
            status,
            reason: headers::reason_of(status, response.headers()),
        }));
    }
    Ok(HboneStream::new(send, response.into_body(), Some(slot)))
}

/// Drives one client connection: polls h2, pings the peer, retires the connection when
/// idle, and removes it from the pool when it ends.
async fn drive<IO>(
    connection: Connection<IO, Bytes>,
    state: Arc<ConnectionState>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    idle_timeout: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = connection;
    let mut keepalive = pin!(keepalive::watch(connection.ping_pong()));
    let mut connection = pin!(connection);
    let id = state.id;
    loop {
        let idle_deadline = state.idle_deadline(idle_timeout);
        tokio::select! {
            result = &mut connection => {
                match result {
                    Ok(()) => tracing::debug!(%key, connection = id, "HBONE connection closed"),
                    Err(err) => tracing::info!(%key, connection = id, error = %err, "HBONE connection failed"),
                }
                break;
            }
            silent_for = &mut keepalive => {
                tracing::warn!(%key, connection = id, ?silent_for,
                    "HBONE peer stopped answering pings; dropping the connection and its streams");
                break;
            }
            () = state.became_idle.notified() => {}
            () = sleep_until_or_forever(idle_deadline) => {
                let Some(pool) = pool.upgrade() else {
                    // The pool is gone and with it every SendRequest: h2 closes the
                    // connection by itself once its last stream ends.
                    tokio::select! {
                        _ = &mut connection => {}
                        _ = &mut keepalive => {}
                    }
                    return;
                };
                if pool.retire_if_idle(&key, &state) {
                    drop(pool);
                    tracing::debug!(%key, connection = id, ?idle_timeout, "closing idle HBONE connection");
                    // The pool held the last SendRequest: h2 now sends GOAWAY and ends.
                    if tokio::time::timeout(GRACEFUL_CLOSE, &mut connection).await.is_err() {
                        tracing::debug!(%key, connection = id, "idle HBONE connection did not close in time; dropping it");
                    }
                    return;
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, id);
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => future::pending().await,
    }
}
