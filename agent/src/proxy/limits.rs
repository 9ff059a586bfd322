//! What one client may hold of the tunnel listeners (15008): one agent serves every pod
//! of its node, so one host that opens connections and never finishes a handshake must
//! not take the memory, file descriptors or tasks that the node's other clients need.
//!
//! Invariants:
//! - **Admission happens at accept, before any TLS work**: a connection over a limit is
//!   reset at once, costing nothing but the accept.
//! - A connection counts against its source while it is open, and against its pod's
//!   listener and its source's *pending* budget until its handshake completes (or fails,
//!   or times out): [`Admission`] releases on drop, so every path — error, panic,
//!   cancellation — gives the slot back.
//! - Counts are kept only for sources and listeners that hold something: the maps never
//!   grow past the connections open (no entry survives its last connection).
//! - Each refusal is counted (`warren_listener_limit_refusals_total{listener,limit}`),
//!   and logged at most once per second per limit, so a flood cannot flood the log too.
//!
//! Defaults are chosen from measurement (docs/performance.md, "under attack"): a pending
//! handshake costs a few KiB once the transport is bare ([`super::hbone::Transport`]), so
//! the node-wide worst case of pending handshakes is a few MiB per pod.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::metrics::Metrics;

/// The limits of the tunnel listeners, from the agent's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelLimits {
    /// TLS handshakes in progress on one pod's 15008.
    pub pending_handshakes_per_listener: usize,
    /// TLS handshakes in progress from one source address, on all the node's pods.
    pub pending_handshakes_per_source: usize,
    /// Tunnel connections (pending or established) from one source address, on all the
    /// node's pods. A peer agent pools its streams on one connection per (source pod,
    /// destination pod), so this bounds hosts, not legitimate peers.
    pub connections_per_source: usize,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            pending_handshakes_per_listener: 256,
            pending_handshakes_per_source: 64,
            connections_per_source: 1024,
        }
    }
}

/// Which limit refused a connection (the metric's `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    PendingHandshakesPerListener,
    PendingHandshakesPerSource,
    ConnectionsPerSource,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::PendingHandshakesPerListener => "pending_handshakes_per_listener",
            Limit::PendingHandshakesPerSource => "pending_handshakes_per_source",
            Limit::ConnectionsPerSource => "connections_per_source",
        }
    }

    /// The flag that raises it, for the log line.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::PendingHandshakesPerListener => "--max-pending-handshakes",
            Limit::PendingHandshakesPerSource => "--max-pending-handshakes-per-source",
            Limit::ConnectionsPerSource => "--max-tunnel-connections-per-source",
        }
    }
}

/// The node's counts against [`TunnelLimits`]; shared by every pod's 15008.
pub struct TunnelAdmission {
    limits: TunnelLimits,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
    /// When each limit was last logged (at most one line per second each).
    logged: Mutex<HashMap<Limit, Instant>>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Pending handshakes by listener (the pod's netns cookie).
    pending_by_listener: HashMap<u64, usize>,
    pending_by_source: HashMap<IpAddr, usize>,
    connections_by_source: HashMap<IpAddr, usize>,
}

const LOG_EVERY: Duration = Duration::from_secs(1);

impl TunnelAdmission {
    pub fn new(limits: TunnelLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
            metrics,
            logged: Mutex::default(),
        })
    }

    pub fn limits(&self) -> TunnelLimits {
        self.limits
    }

    /// Admit a connection from `source` to the listener of pod `listener`, or say which
    /// limit refuses it (counted and, rate-limited, logged here).
    pub fn admit(self: &Arc<Self>, listener: u64, source: IpAddr) -> Result<Admission, Limit> {
        let refused = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if count(&counts.connections_by_source, &source) >= self.limits.connections_per_source {
                Some(Limit::ConnectionsPerSource)
            } else if count(&counts.pending_by_source, &source)
                >= self.limits.pending_handshakes_per_source
            {
                Some(Limit::PendingHandshakesPerSource)
            } else if count(&counts.pending_by_listener, &listener)
                >= self.limits.pending_handshakes_per_listener
            {
                Some(Limit::PendingHandshakesPerListener)
            } else {
                *counts.connections_by_source.entry(source).or_default() += 1;
                *counts.pending_by_source.entry(source).or_default() += 1;
                *counts.pending_by_listener.entry(listener).or_default() += 1;
                None
            }
        };
        match refused {
            None => Ok(Admission {
                admission: self.clone(),
                listener,
                source,
                pending: true,
            }),
            Some(limit) => {
                self.metrics.listener_limit_refused("15008", limit.label());
                self.log_refusal(limit, source);
                Err(limit)
            }
        }
    }

    fn log_refusal(&self, limit: Limit, source: IpAddr) {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged
            .get(&limit)
            .is_some_and(|last| now.duration_since(*last) < LOG_EVERY)
        {
            return;
        }
        logged.insert(limit, now);
        tracing::warn!(%source, limit = limit.label(), "tunnel connections refused at accept: over {} (raise it with {}); warren_listener_limit_refusals_total counts every one", limit.label(), limit.flag());
    }

    fn release(&self, listener: u64, source: IpAddr, pending: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut counts.connections_by_source, source);
        if pending {
            decrement(&mut counts.pending_by_source, source);
            decrement(&mut counts.pending_by_listener, listener);
        }
    }

    fn finish_handshake(&self, listener: u64, source: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut counts.pending_by_source, source);
        decrement(&mut counts.pending_by_listener, listener);
    }

    /// How many connections and pending handshakes are counted (for tests and
    /// `/config_dump`).
    pub fn held(&self) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (
            counts.connections_by_source.values().sum(),
            counts.pending_by_listener.values().sum(),
        )
    }
}

fn count<K: std::hash::Hash + Eq>(map: &HashMap<K, usize>, key: &K) -> usize {
    map.get(key).copied().unwrap_or(0)
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut entry) = map.entry(key) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

/// One admitted connection's slots; given back when dropped.
pub struct Admission {
    admission: Arc<TunnelAdmission>,
    listener: u64,
    source: IpAddr,
    pending: bool,
}

impl Admission {
    /// The handshake completed: the connection no longer counts as pending (it still
    /// counts against its source until it closes).
    pub fn handshake_done(&mut self) {
        if std::mem::replace(&mut self.pending, false) {
            self.admission.finish_handshake(self.listener, self.source);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("listener", &self.listener)
            .field("source", &self.source)
            .field("pending", &self.pending)
            .finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admission
            .release(self.listener, self.source, self.pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limits: TunnelLimits) -> Arc<TunnelAdmission> {
        let pool = crate::proxy::hbone::Pool::new(Default::default());
        TunnelAdmission::new(limits, Arc::new(Metrics::new(pool).unwrap()))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn pending_handshakes_are_bounded_per_source_and_per_listener() {
        let limits = TunnelLimits {
            pending_handshakes_per_listener: 3,
            pending_handshakes_per_source: 2,
            connections_per_source: 100,
        };
        let node = admission(limits);
        let a1 = node.admit(1, A).unwrap();
        let _a2 = node.admit(1, A).unwrap();
        assert_eq!(
            node.admit(2, A).unwrap_err(),
            Limit::PendingHandshakesPerSource,
            "per source, whatever the pod"
        );
        let _b1 = node.admit(1, B).unwrap();
        assert_eq!(
            node.admit(1, B).unwrap_err(),
            Limit::PendingHandshakesPerListener
        );
        // Another pod's listener has its own budget.
        let _b2 = node.admit(2, B).unwrap();
        // A finished handshake frees its pending slots at once.
        let mut a1 = a1;
        a1.handshake_done();
        let _a3 = node.admit(1, A).unwrap();
        assert_eq!(node.held(), (5, 4));
    }

    #[test]
    fn connections_are_bounded_per_source_and_given_back_on_drop() {
        let limits = TunnelLimits {
            pending_handshakes_per_listener: 100,
            pending_handshakes_per_source: 100,
            connections_per_source: 2,
        };
        let node = admission(limits);
        let mut held: Vec<Admission> = (0..2).map(|_| node.admit(1, A).unwrap()).collect();
        for admitted in &mut held {
            admitted.handshake_done();
        }
        assert_eq!(node.admit(1, A).unwrap_err(), Limit::ConnectionsPerSource);
        assert!(node.admit(1, B).is_ok(), "other sources are not affected");
        held.pop();
        assert!(node.admit(1, A).is_ok());
        drop(held);
        assert_eq!(
            node.held(),
            (0, 0),
            "nothing is kept for sources that hold nothing"
        );
        let counts = node.counts.lock().unwrap();
        assert!(counts.connections_by_source.is_empty() && counts.pending_by_source.is_empty());
    }
}
