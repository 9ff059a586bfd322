//! The access log: one JSON line per connection, written by each agent the connection
//! crosses when it ends. Both ends of a tunnelled connection log the same
//! `connection_id` (the source agent makes it and sends it in the CONNECT request), so a
//! connection can be followed across nodes.
//!
//! Lines go to stdout, apart from the diagnostic log on stderr, so they can be collected
//! and parsed as they are — through a writer thread (`crate::log_output`), so a stdout
//! nobody reads never stalls the data path.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use serde::Serialize;

use super::hbone::Baggage;
use crate::{
    metrics::Metrics,
    workload::{Service, Workload},
};

/// Which way a connection crossed this agent.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// How the connection was protected between the nodes (Istio's
/// `connection_security_policy`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    MutualTls,
    None,
}

/// Why a connection did not complete normally (Istio's `response_flags`, as ztunnel
/// reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFlags {
    /// `-`: nothing to report.
    #[default]
    None,
    /// `DENY`: refused by a security policy.
    Deny,
    /// `CONNECT`: no upstream connection (connect or tunnel failure, no route).
    Connect,
    /// `UH`: a service address was dialled and no endpoint of it is ready.
    NoHealthyUpstream,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::NoHealthyUpstream => "UH",
        }
    }
}

/// A connection's record, filled in as it progresses and written once when it ends; it
/// also drives the connection's Istio metrics (opened once known, closed when written).
#[derive(Debug)]
pub struct ConnectionRecord {
    pub connection_id: String,
    pub direction: Direction,
    pub security: Security,
    /// `ip:port` where known, or just the IP (a tunnelled connection's original source).
    pub src_addr: Option<String>,
    pub dst_addr: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub dst_workload: Option<Arc<Workload>>,
    /// What a tunnelling peer said about the source in `baggage`: the metric labels of
    /// a source this agent does not know (never the access log's `src_workload`, which
    /// names only workloads this agent knows).
    pub src_baggage: Option<Baggage>,
    /// The service whose virtual address the client dialled (`dst_addr` is then the
    /// endpoint it was sent to).
    pub dst_service: Option<Arc<Service>>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started: Instant,
    pub outcome: Result<(), String>,
    pub response_flags: ResponseFlags,
    /// Whether `istio_tcp_connections_opened_total` counted it already.
    counted_open: bool,
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    connection_id: &'a str,
    direction: Direction,
    security: Security,
    src_addr: Option<&'a str>,
    dst_addr: SocketAddr,
    src_workload: Option<String>,
    dst_workload: Option<String>,
    /// `<name>.<namespace>.svc.cluster.local` when a service address was dialled.
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_service: Option<String>,
    src_identity: Option<&'a str>,
    dst_identity: Option<&'a str>,
    /// Bytes from the client towards the destination.
    bytes_sent: u64,
    /// Bytes from the destination back to the client.
    bytes_received: u64,
    duration_ms: u64,
    outcome: &'static str,
    response_flags: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl ConnectionRecord {
    pub fn new(connection_id: String, direction: Direction, dst_addr: SocketAddr) -> Self {
        Self {
            connection_id,
            direction,
            security: Security::None,
            src_addr: None,
            dst_addr,
            src_workload: None,
            dst_workload: None,
            src_baggage: None,
            dst_service: None,
            src_identity: None,
            dst_identity: None,
            bytes_sent: 0,
            bytes_received: 0,
            started: Instant::now(),
            outcome: Ok(()),
            response_flags: ResponseFlags::None,
            counted_open: false,
        }
    }

    /// The connection failed for want of an upstream: `error`, flagged `CONNECT`.
    pub fn failed(&mut self, error: String) {
        self.outcome = Err(error);
        self.response_flags = ResponseFlags::Connect;
    }

    /// Count the connection as opened (once), with what is known of it now.
    pub fn opened(&mut self, metrics: &Metrics) {
        if !self.counted_open {
            metrics.connection_opened(self);
            self.counted_open = true;
        }
    }

    /// The record as one JSON line.
    pub fn to_json(&self) -> String {
        let line = Line {
            timestamp: timestamp(SystemTime::now()),
            connection_id: &self.connection_id,
            direction: self.direction,
            security: self.security,
            src_addr: self.src_addr.as_deref(),
            dst_addr: self.dst_addr,
            src_workload: self.src_workload.as_ref().map(|w| w.to_string()),
            dst_workload: self.dst_workload.as_ref().map(|w| w.to_string()),
            dst_service: self.dst_service.as_ref().map(|s| s.hostname()),
            src_identity: self.src_identity.as_deref(),
            dst_identity: self.dst_identity.as_deref(),
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            duration_ms: self.started.elapsed().as_millis() as u64,
            outcome: if self.outcome.is_ok() { "ok" } else { "error" },
            response_flags: self.response_flags.as_str(),
            error: self.outcome.as_ref().err().map(String::as_str),
        };
        serde_json::to_string(&line)
            .unwrap_or_else(|err| format!("{{\"error\":\"access log: {err}\"}}"))
    }

    /// The connection ended: count it closed (and opened, if that was not counted yet)
    /// with its bytes, and write the line (whole, in one write, so lines of concurrent
    /// connections never mix).
    pub fn emit(mut self, metrics: &Metrics) {
        self.opened(metrics);
        metrics.connection_closed(&self);
        let mut line = self.to_json();
        line.push('\n');
        // Through a queue to a writer thread: a stalled stdout drops (and counts) lines,
        // it never stalls the data path.
        crate::log_output::access_line(&line);
    }
}

/// A new connection id: 128 random bits, hex.
pub fn new_connection_id() -> String {
    let mut bytes = [0u8; 16];
    let random = rustls::crypto::ring::default_provider().secure_random;
    if random.fill(&mut bytes).is_err() {
        // The system RNG failing is not a reason to drop traffic; ids just get weaker.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 with fractions of a second, as access log lines carry it.
pub(crate) fn timestamp(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_json_with_every_field() {
        let mut record = ConnectionRecord::new(
            "abc".into(),
            Direction::Outbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        record.src_addr = Some("10.0.0.1:4000".into());
        record.src_identity = Some("spiffe://cluster.local/ns/demo/sa/client".into());
        record.security = Security::MutualTls;
        record.bytes_sent = 5;
        record.outcome = Err("reset".into());
        let value: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        assert_eq!(value["connection_id"], "abc");
        assert_eq!(value["direction"], "outbound");
        assert_eq!(value["security"], "mutual_tls");
        assert_eq!(value["dst_addr"], "10.0.0.2:80");
        assert_eq!(
            value["src_identity"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(value["bytes_sent"], 5);
        assert_eq!(value["outcome"], "error");
        assert_eq!(value["error"], "reset");
        assert!(value["timestamp"].as_str().unwrap().contains('T'));
    }

    #[test]
    fn connection_ids_differ() {
        let (a, b) = (new_connection_id(), new_connection_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
