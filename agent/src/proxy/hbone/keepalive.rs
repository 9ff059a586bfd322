//! HTTP/2 PING keepalive. A peer node that vanishes without closing TCP (power loss, a
//! partition) would otherwise leave every stream of the connection hanging until the
//! kernel's TCP timeouts, and the pool handing out new streams on a dead connection.
use std::{future, time::Duration};

use h2::{Ping, PingPong};

/// Time between pings (ztunnel: 10 s).
pub(super) const INTERVAL: Duration = Duration::from_secs(10);
/// A pong later than this means the peer is gone (ztunnel: 20 s).
pub(super) const TIMEOUT: Duration = Duration::from_secs(20);

/// Pings the peer every [`INTERVAL`]; completes, with the timeout, only when a pong is
/// late. If the connection closes, the ping fails and this waits forever: the connection
/// future reports that itself.
pub(super) async fn watch(ping_pong: Option<PingPong>) -> Duration {
    let Some(mut ping_pong) = ping_pong else {
        return future::pending().await;
    };
    loop {
        tokio::time::sleep(INTERVAL).await;
        match tokio::time::timeout(TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Err(_elapsed) => return TIMEOUT,
            Ok(Ok(_pong)) => {}
            Ok(Err(err)) => {
                tracing::trace!(error = %err, "HBONE keepalive ping failed; connection closing");
                return future::pending().await;
            }
        }
    }
}
