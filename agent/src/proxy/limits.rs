//! What one client may hold of the listeners that take connections from other hosts: the
//! tunnel listeners (15008) and the plaintext inbound listeners (15006). One agent serves
//! every pod of its node, so one host that opens connections and never finishes a
//! handshake — or never sends a byte — must not take the memory, file descriptors or
//! tasks that the node's other clients need.
//!
//! Invariants:
//! - **Admission happens at accept**, before any TLS work (15008) and before the app is
//!   dialled (15006): a connection over a limit is reset at once, costing nothing but the
//!   accept.
//! - A connection counts against its source while it is open — 15006 and 15008 each
//!   have their own budget per source — and a tunnel connection also against its pod's
//!   listener and its source's *pending* budget until its handshake completes (or fails,
//!   or times out): [`Admission`] releases on drop, so every path — error, panic,
//!   cancellation — gives the slot back.
//! - Counts are kept only for sources and listeners that hold something: the maps never
//!   grow past the connections open (no entry survives its last connection).
//! - Each refusal is counted (`warren_listener_limit_refusals_total{listener,limit}`),
//!   and logged at most once per second per listener and limit ([`crate::log_limit`]),
//!   so a flood cannot flood the log too.
//!
//! Defaults are chosen from measurement (docs/performance.md, "under attack"): a pending
//! handshake costs a few KiB once the transport is bare ([`super::hbone::Transport`]), so
//! the node-wide worst case of pending handshakes is a few MiB per pod.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::Listener;
use crate::{log_limit::LogLimit, metrics::Metrics};

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

/// The limits of the plaintext inbound listeners (15006), from the agent's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaintextLimits {
    /// Plaintext connections open from one source address, on all the node's pods.
    ///
    /// 1024 by default. An open plaintext connection costs the agent two file descriptors
    /// (the client's and the one to the app) and a task, but no buffer while it is idle
    /// ([`super::relay`]), and the app one connection: 1024 bounds one host — a slowloris
    /// of idle connections — at 2048 of the agent's descriptors, so it takes hundreds of
    /// hosts to use up a million-descriptor limit. A legitimate client rarely holds more
    /// than a few hundred connections to one node's pods (a connection pool is tens per
    /// destination), and it is the tunnels' budget too, so a client that joins the mesh
    /// keeps the same allowance.
    ///
    /// Traffic the node forwards and masquerades (a NodePort, a LoadBalancer with
    /// `externalTrafficPolicy: Cluster`, a hostPort) arrives from a node address, so on
    /// each node it shares one budget: raise this on nodes that carry much of it. The
    /// node's own connections (the kubelet's probes) are not counted
    /// ([`super::inbound_passthrough`]), so that forwarded traffic can never starve them.
    pub connections_per_source: usize,
}

impl Default for PlaintextLimits {
    fn default() -> Self {
        Self {
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

    /// The flag that raises it on `listener`, for the log line.
    pub fn flag(self, listener: Listener) -> &'static str {
        match (self, listener) {
            (Limit::PendingHandshakesPerListener, _) => "--max-pending-handshakes",
            (Limit::PendingHandshakesPerSource, _) => "--max-pending-handshakes-per-source",
            (Limit::ConnectionsPerSource, Listener::Plaintext) => {
                "--max-plaintext-connections-per-source"
            }
            (Limit::ConnectionsPerSource, _) => "--max-tunnel-connections-per-source",
        }
    }
}

/// The node's counts against [`TunnelLimits`] and [`PlaintextLimits`]; shared by every
/// pod's 15006 and 15008.
pub struct ListenerAdmission {
    tunnel: TunnelLimits,
    plaintext: PlaintextLimits,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
    /// At most one line per second per listener and limit.
    logged: LogLimit<(Listener, Limit)>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Pending handshakes by tunnel listener (the pod's netns cookie).
    pending_by_listener: HashMap<u64, usize>,
    /// Pending handshakes by source, on the tunnel listeners.
    pending_by_source: HashMap<IpAddr, usize>,
    /// Open connections by listener kind and source: each kind has its own budget.
    connections_by_source: HashMap<(Listener, IpAddr), usize>,
}

impl ListenerAdmission {
    pub fn new(
        tunnel: TunnelLimits,
        plaintext: PlaintextLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            tunnel,
            plaintext,
            counts: Mutex::default(),
            metrics,
            logged: LogLimit::per_second(),
        })
    }

    pub fn tunnel_limits(&self) -> TunnelLimits {
        self.tunnel
    }

    pub fn plaintext_limits(&self) -> PlaintextLimits {
        self.plaintext
    }

    /// Admit a tunnel connection from `source` to the 15008 of the pod whose netns cookie
    /// is `listener`, or say which limit refuses it (counted and, rate-limited, logged
    /// here). It counts as a pending handshake until [`Admission::handshake_done`].
    pub fn admit_tunnel(
        self: &Arc<Self>,
        listener: u64,
        source: IpAddr,
    ) -> Result<Admission, Limit> {
        let refused = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let key = (Listener::Tunnel, source);
            if count(&counts.connections_by_source, &key) >= self.tunnel.connections_per_source {
                Some(Limit::ConnectionsPerSource)
            } else if count(&counts.pending_by_source, &source)
                >= self.tunnel.pending_handshakes_per_source
            {
                Some(Limit::PendingHandshakesPerSource)
            } else if count(&counts.pending_by_listener, &listener)
                >= self.tunnel.pending_handshakes_per_listener
            {
                Some(Limit::PendingHandshakesPerListener)
            } else {
                *counts.connections_by_source.entry(key).or_default() += 1;
                *counts.pending_by_source.entry(source).or_default() += 1;
                *counts.pending_by_listener.entry(listener).or_default() += 1;
                None
            }
        };
        match refused {
            None => Ok(Admission {
                admission: self.clone(),
                listener: Listener::Tunnel,
                source,
                pending: Some(listener),
            }),
            Some(limit) => Err(self.refuse(Listener::Tunnel, limit, source)),
        }
    }

    /// Admit a plaintext connection from `source` to any pod's 15006, or say which limit
    /// refuses it (counted and, rate-limited, logged here).
    pub fn admit_plaintext(self: &Arc<Self>, source: IpAddr) -> Result<Admission, Limit> {
        let admitted = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let key = (Listener::Plaintext, source);
            let admitted =
                count(&counts.connections_by_source, &key) < self.plaintext.connections_per_source;
            if admitted {
                *counts.connections_by_source.entry(key).or_default() += 1;
            }
            admitted
        };
        if admitted {
            Ok(Admission {
                admission: self.clone(),
                listener: Listener::Plaintext,
                source,
                pending: None,
            })
        } else {
            Err(self.refuse(Listener::Plaintext, Limit::ConnectionsPerSource, source))
        }
    }

    /// Count a refusal, and log it unless one was logged less than a second ago.
    fn refuse(&self, listener: Listener, limit: Limit, source: IpAddr) -> Limit {
        self.metrics
            .listener_limit_refused(listener.label(), limit.label());
        if let Some(held_back) = self.logged.allow((listener, limit)) {
            tracing::warn!(%source, listener = listener.label(), limit = limit.label(), held_back, "{} connections refused at accept: over {} (raise it with {}); warren_listener_limit_refusals_total counts every one", listener.traffic(), limit.label(), limit.flag(listener));
        }
        limit
    }

    fn release(&self, listener: Listener, source: IpAddr, pending: Option<u64>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut counts.connections_by_source, (listener, source));
        if let Some(listener) = pending {
            decrement(&mut counts.pending_by_source, source);
            decrement(&mut counts.pending_by_listener, listener);
        }
    }

    fn finish_handshake(&self, listener: u64, source: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut counts.pending_by_source, source);
        decrement(&mut counts.pending_by_listener, listener);
    }

    /// How many connections (of both kinds) and pending handshakes are counted (for tests
    /// and `/config_dump`).
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
    admission: Arc<ListenerAdmission>,
    listener: Listener,
    source: IpAddr,
    /// The tunnel listener (pod netns cookie) whose pending budget this connection holds,
    /// until its handshake is done; never for a plaintext connection.
    pending: Option<u64>,
}

impl Admission {
    /// The handshake completed: the connection no longer counts as pending (it still
    /// counts against its source until it closes).
    pub fn handshake_done(&mut self) {
        if let Some(listener) = self.pending.take() {
            self.admission.finish_handshake(listener, self.source);
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

    fn admission(tunnel: TunnelLimits, plaintext: PlaintextLimits) -> Arc<ListenerAdmission> {
        let pool = crate::proxy::hbone::Pool::new(Default::default());
        ListenerAdmission::new(tunnel, plaintext, Arc::new(Metrics::new(pool).unwrap()))
    }

    fn tunnels(limits: TunnelLimits) -> Arc<ListenerAdmission> {
        admission(limits, PlaintextLimits::default())
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
        let node = tunnels(limits);
        let a1 = node.admit_tunnel(1, A).unwrap();
        let _a2 = node.admit_tunnel(1, A).unwrap();
        assert_eq!(
            node.admit_tunnel(2, A).unwrap_err(),
            Limit::PendingHandshakesPerSource,
            "per source, whatever the pod"
        );
        let _b1 = node.admit_tunnel(1, B).unwrap();
        assert_eq!(
            node.admit_tunnel(1, B).unwrap_err(),
            Limit::PendingHandshakesPerListener
        );
        // Another pod's listener has its own budget.
        let _b2 = node.admit_tunnel(2, B).unwrap();
        // A finished handshake frees its pending slots at once.
        let mut a1 = a1;
        a1.handshake_done();
        let _a3 = node.admit_tunnel(1, A).unwrap();
        assert_eq!(node.held(), (5, 4));
    }

    #[test]
    fn connections_are_bounded_per_source_and_given_back_on_drop() {
        let limits = TunnelLimits {
            pending_handshakes_per_listener: 100,
            pending_handshakes_per_source: 100,
            connections_per_source: 2,
        };
        let node = tunnels(limits);
        let mut held: Vec<Admission> = (0..2).map(|_| node.admit_tunnel(1, A).unwrap()).collect();
        for admitted in &mut held {
            admitted.handshake_done();
        }
        assert_eq!(
            node.admit_tunnel(1, A).unwrap_err(),
            Limit::ConnectionsPerSource
        );
        assert!(
            node.admit_tunnel(1, B).is_ok(),
            "other sources are not affected"
        );
        held.pop();
        assert!(node.admit_tunnel(1, A).is_ok());
        drop(held);
        assert_eq!(
            node.held(),
            (0, 0),
            "nothing is kept for sources that hold nothing"
        );
        let counts = node.counts.lock().unwrap();
        assert!(counts.connections_by_source.is_empty() && counts.pending_by_source.is_empty());
    }

    /// A slowloris of idle plaintext connections from one host is bounded on 15006 as on
    /// 15008, with a budget of its own, and each refusal is counted under 15006.
    #[test]
    fn plaintext_connections_are_bounded_per_source_with_their_own_budget() {
        let node = admission(
            TunnelLimits {
                connections_per_source: 2,
                ..TunnelLimits::default()
            },
            PlaintextLimits {
                connections_per_source: 3,
            },
        );
        let mut held: Vec<Admission> = (0..3).map(|_| node.admit_plaintext(A).unwrap()).collect();
        assert_eq!(
            node.admit_plaintext(A).unwrap_err(),
            Limit::ConnectionsPerSource
        );
        assert_eq!(
            node.admit_plaintext(A).unwrap_err(),
            Limit::ConnectionsPerSource
        );
        // Tunnels from the same host have their own budget, and plaintext from another
        // host is not affected.
        let tunnels: Vec<Admission> = (0..2).map(|_| node.admit_tunnel(7, A).unwrap()).collect();
        assert_eq!(
            node.admit_tunnel(7, A).unwrap_err(),
            Limit::ConnectionsPerSource
        );
        let b = node.admit_plaintext(B).unwrap();
        // A plaintext connection is never a pending handshake.
        assert_eq!(node.held(), (3 + 2 + 1, 2));
        held.pop();
        held.push(node.admit_plaintext(A).unwrap());

        let page = node.metrics.render();
        for (listener, refused) in [("15006", 2), ("15008", 1)] {
            let line = format!("warren_listener_limit_refusals_total{{limit=\"connections_per_source\",listener=\"{listener}\"}} {refused}\n");
            assert!(page.contains(&line), "{line} in {page}");
        }
        drop((held, tunnels, b));
        assert_eq!(node.held(), (0, 0));
        let counts = node.counts.lock().unwrap();
        assert!(
            counts.connections_by_source.is_empty(),
            "the maps never outgrow the connections open"
        );
    }

    #[test]
    fn each_listener_names_the_flag_that_raises_its_limit() {
        let limit = Limit::ConnectionsPerSource;
        assert_eq!(
            limit.flag(Listener::Plaintext),
            "--max-plaintext-connections-per-source"
        );
        assert_eq!(
            limit.flag(Listener::Tunnel),
            "--max-tunnel-connections-per-source"
        );
    }
}
