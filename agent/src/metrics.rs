//! Prometheus metrics on `:15020/metrics` (Istio's port), in the agent's own netns.
//!
//! - Istio's TCP families, with Istio's names and labels, so dashboards and queries
//!   written for Istio (sidecars or ztunnel) work unchanged: `istio_tcp_connections_opened_total`,
//!   `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
//!   `istio_tcp_received_bytes_total`. Each connection is reported by the agent it
//!   crosses: `reporter="source"` on the client's node, `"destination"` on the server's.
//!   Labels come from workloads (bounded by the pods), never from addresses or ports.
//!   What bounds them whatever pods or peers are called or say ([`MetricLimits`]): a
//!   workload is its owner (a Deployment's pods share their series across restarts); a
//!   peer's `baggage` labels at most `baggage_sources` distinct sources, later ones are
//!   `unknown` (`warren_metric_baggage_sources_folded_total`); and the families together
//!   hold at most `series` label sets, a connection that would make another is counted in
//!   the folded label set of its reporter, outcome and security, every other label
//!   `unknown` (`warren_metric_series_dropped_total`).
//! - warren's own: `warren_*` (enrolled pods, redirect mode, policy refusals, HBONE pool,
//!   certificate expiry, TLS handshake errors by reason, listener limit refusals, failed
//!   accepts by error).
use std::{
    collections::HashSet,
    convert::Infallible,
    hash::{BuildHasher as _, RandomState},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::UNIX_EPOCH,
};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::{
    identity::SecretManager,
    policy::{PolicyKind, SharedPolicy},
    proxy::{
        access_log::{ConnectionRecord, Direction, Security},
        hbone::{self, Baggage},
    },
    workload::{Workload, CLUSTER_ID},
};

/// Istio's standard TCP metric labels, in the order [`TrafficLabels::values`] gives them.
pub const TRAFFIC_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Istio's value for a label nothing is known about.
const UNKNOWN: &str = "unknown";

/// The labels of [`TRAFFIC_LABELS`] that describe the source, in its order: what a peer's
/// baggage may fill (all but `source_principal`, which its certificate proves).
const BAGGAGE_SOURCE_LABELS: [usize; 7] = [1, 2, 3, 4, 6, 7, 8];

/// The labels a folded label set keeps: `reporter`, `request_protocol`, `response_flags`
/// and `connection_security_policy`, each of a handful of values.
const FOLDED_KEEPS: [usize; 4] = [0, 20, 21, 22];

/// How many label sets the Istio families may hold, and how many sources a peer's
/// `baggage` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricLimits {
    /// Label sets of the `istio_tcp_*` families together (each set is a series of each
    /// of the four families); `--max-metric-series`.
    pub series: usize,
    /// Distinct source label sets learned from peers' `baggage`.
    pub baggage_sources: usize,
}

impl Default for MetricLimits {
    /// 10,000 label sets: a full node (110 pods, the kubelet's default) whose every pod
    /// meets 45 peer workloads, as client or server, under two outcomes each (9,900);
    /// about 40,000 series and 30 MB of page at the most. 1,000 baggage sources:
    /// far more workloads behind ztunnel nodes than a node's pods talk to, 10% of the
    /// series.
    fn default() -> Self {
        MetricLimits {
            series: 10_000,
            baggage_sources: 1_000,
        }
    }
}

/// The label sets and baggage sources admitted so far (counters never go away, so
/// neither do these until the agent restarts).
struct Admitted {
    limits: MetricLimits,
    /// Hashes of the admitted label sets, keyed per process so a peer cannot aim at
    /// collisions.
    series: Mutex<HashSet<u64>>,
    hasher: RandomState,
    baggage_sources: Mutex<HashSet<Vec<String>>>,
}

impl Admitted {
    fn new(limits: MetricLimits) -> Self {
        Admitted {
            limits,
            series: Mutex::default(),
            hasher: RandomState::new(),
            baggage_sources: Mutex::default(),
        }
    }

    /// Whether `labels` may be a series: known already, or room for one more.
    fn series(&self, labels: &TrafficLabels) -> bool {
        let hash = self.hasher.hash_one(&labels.values);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.contains(&hash) || (series.len() < self.limits.series && series.insert(hash))
    }

    /// Whether the source labels of `labels` (learned from baggage) may be used.
    fn baggage_source(&self, labels: &TrafficLabels) -> bool {
        let key: Vec<String> = BAGGAGE_SOURCE_LABELS
            .iter()
            .map(|&i| labels.values[i].clone())
            .collect();
        let mut sources = self
            .baggage_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sources.contains(&key)
            || (sources.len() < self.limits.baggage_sources && sources.insert(key))
    }

    fn series_count(&self) -> usize {
        self.series.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
/// The label values of one connection, as Istio derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficLabels {
    values: [String; TRAFFIC_LABELS.len()],
}

/// What the labels say about one end of a connection.
struct End {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    cluster: String,
}

impl End {
    /// From the workload this agent knows at that address; else from what the peer said
    /// in `baggage` (a pod behind a ztunnel node), as ztunnel derives an unknown source.
    fn of(workload: Option<&Workload>, peer: Option<&Baggage>, principal: Option<&str>) -> Self {
        let principal = principal.unwrap_or(UNKNOWN).to_owned();
        if let Some(w) = workload {
            return End {
                // Istio's workload: the pod's owner (Deployment, …), else the pod.
                workload: w.workload_name().to_owned(),
                canonical_service: w.canonical_service(),
                canonical_revision: w.canonical_revision(),
                namespace: w.namespace.clone(),
                principal,
                cluster: CLUSTER_ID.into(),
            };
        }
        let said = |value: Option<&Option<String>>| {
            value
                .and_then(Option::as_deref)
                .unwrap_or(UNKNOWN)
                .to_owned()
        };
        End {
            workload: said(peer.map(|b| &b.workload)),
            canonical_service: said(peer.map(|b| &b.service)),
            canonical_revision: said(peer.map(|b| &b.revision)),
            namespace: said(peer.map(|b| &b.namespace)),
            principal,
            cluster: said(peer.map(|b| &b.cluster)),
        }
    }
}

impl TrafficLabels {
    /// The labels of `record` as it stands.
    pub fn of(record: &ConnectionRecord) -> Self {
        let source = End::of(
            record.src_workload.as_deref(),
            record.src_baggage.as_ref(),
            record.src_identity.as_deref(),
        );
        let destination = End::of(
            record.dst_workload.as_deref(),
            None,
            record.dst_identity.as_deref(),
        );
        // (destination_service, _namespace, _name), in TRAFFIC_LABELS order: known when a
        // service address was dialled.
        let destination_service = match &record.dst_service {
            Some(service) => (
                service.hostname(),
                service.namespace.clone(),
                service.name.clone(),
            ),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        let reporter = match record.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        };
        let security = match record.security {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        };
        let values = [
            reporter.to_owned(),
            source.workload,
            source.canonical_service.clone(),
            source.canonical_revision.clone(),
            source.namespace,
            source.principal,
            source.canonical_service,
            source.canonical_revision,
            source.cluster,
            destination_service.0,
            destination_service.1,
            destination_service.2,
            destination.workload,
            destination.canonical_service.clone(),
            destination.canonical_revision.clone(),
            destination.namespace,
            destination.principal,
            destination.canonical_service,
            destination.canonical_revision,
            destination.cluster,
            "tcp".into(),
            record.response_flags.as_str().into(),
            security.into(),
        ];
        Self { values }
    }

    /// The values in [`TRAFFIC_LABELS`] order.
    pub fn values(&self) -> [&str; TRAFFIC_LABELS.len()] {
        std::array::from_fn(|i| self.values[i].as_str())
    }

    /// The same connection with every label `unknown` but those of [`FOLDED_KEEPS`]: what
    /// a label set over the cap is counted as.
    fn folded(&self) -> Self {
        let values = std::array::from_fn(|i| {
            if FOLDED_KEEPS.contains(&i) {
                self.values[i].clone()
            } else {
                UNKNOWN.to_owned()
            }
        });
        Self { values }
    }

    /// The same with the source's labels learned from baggage `unknown`.
    fn without_baggage_source(mut self) -> Self {
        for i in BAGGAGE_SOURCE_LABELS {
            self.values[i] = UNKNOWN.to_owned();
        }
        self
    }

    /// The value of one label (for tests and logs).
    pub fn get(&self, name: &str) -> Option<&str> {
        TRAFFIC_LABELS
            .iter()
            .position(|n| *n == name)
            .map(|i| self.values[i].as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source} (is another agent running in this netns? change --metrics-addr)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// The agent's metrics. Gauges that mirror live state are refreshed at each scrape.
pub struct Metrics {
    registry: Registry,
    connections_opened: IntCounterVec,
    connections_closed: IntCounterVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
    redirect_mode: IntGaugeVec,
    enrolled_pods: IntGauge,
    pool_connections: IntGauge,
    policy_refusals: IntCounterVec,
    handshake_errors: IntCounterVec,
    listener_limit_refusals: IntCounterVec,
    accept_errors: IntCounterVec,
    log_lines_dropped: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    policy_errors: IntGaugeVec,
    series: IntGauge,
    series_dropped: IntCounter,
    baggage_sources_folded: IntCounter,
    admitted: Admitted,
    pool: hbone::Pool,
    /// Where certificate expiries are read at each scrape (set once the agent has one).
    secrets: OnceLock<Arc<SecretManager>>,
    /// Where the policy in force is read at each scrape.
    policy: OnceLock<Arc<SharedPolicy>>,
}

impl Metrics {
    /// The agent's metrics with the default [`MetricLimits`].
    pub fn new(pool: hbone::Pool) -> Result<Self, MetricsError> {
        Self::with_limits(pool, MetricLimits::default())
    }

    pub fn with_limits(pool: hbone::Pool, limits: MetricLimits) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let traffic = |name: &str, help: &str| -> Result<IntCounterVec, MetricsError> {
            let family = IntCounterVec::new(Opts::new(name, help), &TRAFFIC_LABELS)?;
            registry.register(Box::new(family.clone()))?;
            Ok(family)
        };
        let connections_opened = traffic(
            "istio_tcp_connections_opened_total",
            "The total number of TCP connections opened",
        )?;
        let connections_closed = traffic(
            "istio_tcp_connections_closed_total",
            "The total number of TCP connections closed",
        )?;
        let sent_bytes = traffic(
            "istio_tcp_sent_bytes_total",
            "The size of total bytes sent during response in case of a TCP connection",
        )?;
        let received_bytes = traffic(
            "istio_tcp_received_bytes_total",
            "The size of total bytes received during request in case of a TCP connection",
        )?;
        let redirect_mode = IntGaugeVec::new(
            Opts::new(
                "warren_redirect_mode",
                "The redirect mode in use: 1 for the mode in use (ebpf or iptables).",
            ),
            &["mode"],
        )?;
        registry.register(Box::new(redirect_mode.clone()))?;
        let enrolled_pods = IntGauge::new(
            "warren_enrolled_pods",
            "Pods of this node whose traffic the agent captures.",
        )?;
        let pool_connections = IntGauge::new(
            "warren_hbone_pool_connections",
            "Open outbound HBONE (HTTP/2 over mTLS) connections, shared by the tunnelled streams.",
        )?;
        // Bounded cardinality: one series per policy object (and its kind).
        let policy_refusals = IntCounterVec::new(
            Opts::new(
                "warren_policy_refusals_total",
                "Connections refused by a security policy.",
            ),
            &["kind", "policy"],
        )?;
        registry.register(Box::new(policy_refusals.clone()))?;
        // Bounded: two directions times the handful of reasons of `TlsError::reason_label`.
        let handshake_errors = IntCounterVec::new(
            Opts::new(
                "warren_tls_handshake_errors_total",
                "Mesh TLS handshakes that failed, by direction (inbound: a peer dialled this node's 15008; outbound: this node dialled a peer) and reason.",
            ),
            &["direction", "reason"],
        )?;
        registry.register(Box::new(handshake_errors.clone()))?;
        // Bounded: the listeners times the limits of `proxy::limits::Limit`.
        let listener_limit_refusals = IntCounterVec::new(
            Opts::new(
                "warren_listener_limit_refusals_total",
                "Connections reset at accept because a client was over a listener limit (pending TLS handshakes per listener or per source, connections per source).",
            ),
            &["listener", "limit"],
        )?;
        registry.register(Box::new(listener_limit_refusals.clone()))?;
        // Bounded: the three listeners times the five labels of `proxy::accept::AcceptError`.
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "warren_accept_errors_total",
                "Failed accepts on the pods' listeners, by listener (port) and error: emfile (the agent is out of file descriptors: raise its LimitNOFILE), enfile (the node is: fs.file-max), enomem (kernel socket memory), aborted (one connection failed before it was accepted), other. All but aborted make the listener back off (up to 1 s) while new connections wait in the kernel's backlog.",
            ),
            &["listener", "error"],
        )?;
        registry.register(Box::new(accept_errors.clone()))?;
        // Bounded: the two output streams.
        let log_lines_dropped = IntCounterVec::new(
            Opts::new(
                "warren_log_lines_dropped_total",
                "Log lines dropped because their stream's writer was behind (a stdout or stderr nobody reads): stream is access (the access log) or diagnostic. Traffic never waits for a log.",
            ),
            &["stream"],
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        // Bounded by the identities of the node's pods.
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "warren_certificate_expiration_timestamp_seconds",
                "When the workload certificate of each identity served on this node expires (Unix time).",
            ),
            &["identity"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        // Bounded: the two policy kinds and `unknown`.
        let policy_errors = IntGaugeVec::new(
            Opts::new(
                "warren_policy_errors",
                "Policy documents (or cluster objects) that do not decode, by kind (unknown: not even the kind can be read). The workloads each may target fail closed: refused (AuthorizationPolicy) or STRICT (PeerAuthentication). warren status names them.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(policy_errors.clone()))?;
        registry.register(Box::new(enrolled_pods.clone()))?;
        registry.register(Box::new(pool_connections.clone()))?;
        let series = IntGauge::new(
            "warren_metric_series",
            "Label sets of the istio_tcp_* families (each a series of each family), at most --max-metric-series.",
        )?;
        registry.register(Box::new(series.clone()))?;
        let series_dropped = IntCounter::new(
            "warren_metric_series_dropped_total",
            "Connections opened or closed whose istio_tcp_* label set would have been one more than --max-metric-series allows: counted in the folded label set instead (every label unknown but reporter, request_protocol, response_flags and connection_security_policy).",
        )?;
        registry.register(Box::new(series_dropped.clone()))?;
        let baggage_sources_folded = IntCounter::new(
            "warren_metric_baggage_sources_folded_total",
            "Connections opened or closed whose source labels, learned from a peer's baggage, would have named a source beyond the 1,000 this agent takes from baggage: labelled unknown instead.",
        )?;
        registry.register(Box::new(baggage_sources_folded.clone()))?;
        Ok(Self {
            registry,
            connections_opened,
            connections_closed,
            sent_bytes,
            received_bytes,
            redirect_mode,
            enrolled_pods,
            pool_connections,
            policy_refusals,
            handshake_errors,
            listener_limit_refusals,
            accept_errors,
            log_lines_dropped,
            certificate_expiry,
            policy_errors,
            series,
            series_dropped,
            baggage_sources_folded,
            admitted: Admitted::new(limits),
            pool,
            secrets: OnceLock::new(),
            policy: OnceLock::new(),
        })
    }

    /// Count a connection refused by `policy`.
    pub fn count_refusal(&self, policy: &crate::policy::PolicyRef) {
        let kind = format!("{:?}", policy.kind());
        self.policy_refusals
            .with_label_values(&[kind.as_str(), policy.to_string().as_str()])
            .inc();
    }

    /// Read certificate expiries from `secrets` at each scrape.
    pub fn watch_certificates(&self, secrets: Arc<SecretManager>) {
        let _ = self.secrets.set(secrets);
    }

    /// Read the policy in force from `policy` at each scrape (`warren_policy_errors`).
    pub fn watch_policy(&self, policy: Arc<SharedPolicy>) {
        let _ = self.policy.set(policy);
    }

    /// Count a failed mesh TLS handshake; `reason` from [`crate::tls::TlsError::reason_label`]
    /// or `timeout`.
    pub fn handshake_failed(&self, direction: Direction, reason: &str) {
        let direction = match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        };
        self.handshake_errors
            .with_label_values(&[direction, reason])
            .inc();
    }

    /// Count a connection refused at accept by a listener limit.
    pub fn listener_limit_refused(&self, listener: &str, limit: &str) {
        self.listener_limit_refusals
            .with_label_values(&[listener, limit])
            .inc();
    }

    /// Count a failed accept on a listener; `error` from
    /// [`crate::proxy::accept::AcceptError::label`].
    pub fn accept_failed(&self, listener: &str, error: &str) {
        self.accept_errors
            .with_label_values(&[listener, error])
            .inc();
    }

    /// The labels `record` is counted under: its own, within the limits.
    fn bounded_labels(&self, record: &ConnectionRecord) -> TrafficLabels {
        let mut labels = TrafficLabels::of(record);
        let from_baggage = record.src_workload.is_none()
            && record.src_baggage.as_ref().is_some_and(|b| !b.is_empty());
        if from_baggage && !self.admitted.baggage_source(&labels) {
            self.baggage_sources_folded.inc();
            labels = labels.without_baggage_source();
        }
        if !self.admitted.series(&labels) {
            self.series_dropped.inc();
            labels = labels.folded();
        }
        labels
    }

    /// A connection was opened (Istio counts it when its destination is decided).
    pub fn connection_opened(&self, record: &ConnectionRecord) {
        let labels = self.bounded_labels(record);
        self.connections_opened
            .with_label_values(&labels.values())
            .inc();
    }

    /// A connection ended: count it closed with its final labels (response flags) and
    /// add its bytes. Istio's direction names: `received` is what the client sent,
    /// `sent` what went back to it.
    pub fn connection_closed(&self, record: &ConnectionRecord) {
        let labels = self.bounded_labels(record);
        let values = labels.values();
        self.connections_closed.with_label_values(&values).inc();
        self.received_bytes
            .with_label_values(&values)
            .inc_by(record.bytes_sent);
        self.sent_bytes
            .with_label_values(&values)
            .inc_by(record.bytes_received);
    }

    /// Record the redirect mode the agent runs in.
    pub fn set_redirect_mode(&self, mode: &str) {
        self.redirect_mode.reset();
        self.redirect_mode.with_label_values(&[mode]).set(1);
    }

    pub fn set_enrolled_pods(&self, pods: usize) {
        self.enrolled_pods.set(pods as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.pool_connections.set(self.pool.connections() as i64);
        self.series.set(self.admitted.series_count() as i64);
        if let Some(secrets) = self.secrets.get() {
            // Forgotten identities disappear from the page.
            self.certificate_expiry.reset();
            for certificate in secrets.certificates() {
                let expires = certificate
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs() as i64);
                self.certificate_expiry
                    .with_label_values(&[certificate.identity.to_string().as_str()])
                    .set(expires);
            }
        }
        if let Some(policy) = self.policy.get() {
            let policy = policy.current();
            for kind in [
                Some(PolicyKind::PeerAuthentication),
                Some(PolicyKind::AuthorizationPolicy),
                None,
            ] {
                let count = policy.broken().iter().filter(|b| b.kind == kind).count();
                let label = kind.map_or("unknown".to_owned(), |k| k.to_string());
                self.policy_errors
                    .with_label_values(&[label.as_str()])
                    .set(count as i64);
            }
        }
        let (access, diagnostic) = crate::log_output::dropped_lines();
        for (stream, dropped) in [("access", access), ("diagnostic", diagnostic)] {
            let counter = self.log_lines_dropped.with_label_values(&[stream]);
            counter.inc_by(dropped.saturating_sub(counter.get()));
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Bind the metrics listener (so a busy port fails start-up, before anything is changed).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })
}

/// Serve `GET /metrics` on `listener` forever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &request)) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "metrics connection ended with an error");
            }
        });
    }
}

fn respond<B>(metrics: &Metrics, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (StatusCode::OK, metrics.render()),
        (&hyper::Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n".to_owned(),
        ),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_gauges_over_http() {
        let metrics =
            Arc::new(Metrics::new(hbone::Pool::new(hbone::PoolConfig::default())).unwrap());
        metrics.set_enrolled_pods(3);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, metrics));
        let page = get(addr, "/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("warren_enrolled_pods 3"), "{page}");
        assert!(page.contains("warren_hbone_pool_connections 0"), "{page}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn policy_documents_that_do_not_decode_are_counted_by_kind() {
        let metrics = Metrics::new(hbone::Pool::new(hbone::PoolConfig::default())).unwrap();
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\nspec: {rules: [{from: []}]}\n---\n{unclosed: [\n";
        let decoded = crate::policy::decode_file(text, std::path::Path::new("p.yaml"));
        let shared = SharedPolicy::new(crate::policy::PolicySet::decoded(
            Default::default(),
            decoded.policies,
            decoded.broken,
        ));
        metrics.watch_policy(shared.clone());
        let page = metrics.render();
        assert!(
            page.contains("warren_policy_errors{kind=\"AuthorizationPolicy\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("warren_policy_errors{kind=\"unknown\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("warren_policy_errors{kind=\"PeerAuthentication\"} 0"),
            "{page}"
        );
        shared.replace(Default::default());
        assert!(metrics
            .render()
            .contains("warren_policy_errors{kind=\"unknown\"} 0"));
    }

    fn workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
        Arc::new(Workload {
            namespace: namespace.into(),
            name: name.into(),
            service_account: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node: "n1".into(),
            ips: vec![],
            netns: "/run/netns/x".into(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: None,
        })
    }

    #[test]
    fn labels_follow_istio() {
        let mut record = ConnectionRecord::new(
            "id".into(),
            Direction::Inbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        record.src_workload = Some(workload("demo", "client-7f9", &[("app", "client")]));
        record.src_identity = Some("spiffe://cluster.local/ns/demo/sa/client".into());
        record.dst_workload = Some(workload(
            "demo",
            "server-1",
            &[
                ("service.istio.io/canonical-name", "server"),
                ("app", "ignored"),
                ("app.kubernetes.io/version", "v2"),
            ],
        ));
        record.security = Security::MutualTls;
        let labels = TrafficLabels::of(&record);
        for (name, value) in [
            ("reporter", "destination"),
            ("source_workload", "client-7f9"),
            ("source_canonical_service", "client"),
            ("source_app", "client"),
            ("source_version", "latest"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/client",
            ),
            ("destination_workload", "server-1"),
            ("destination_canonical_service", "server"),
            ("destination_version", "v2"),
            ("destination_principal", "unknown"),
            ("destination_service", "unknown"),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
            ("request_protocol", "tcp"),
        ] {
            assert_eq!(labels.get(name), Some(value), "{name}");
        }

        // A plain-text client from nowhere known, refused.
        let mut refused = ConnectionRecord::new(
            "id".into(),
            Direction::Outbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        refused.response_flags = crate::proxy::access_log::ResponseFlags::Deny;
        let labels = TrafficLabels::of(&refused);
        assert_eq!(labels.get("reporter"), Some("source"));
        assert_eq!(labels.get("source_workload"), Some("unknown"));
        assert_eq!(labels.get("connection_security_policy"), Some("none"));
        assert_eq!(labels.get("response_flags"), Some("DENY"));
    }

    #[test]
    fn a_dialled_service_is_the_destination_service() {
        let mut record = ConnectionRecord::new(
            "id".into(),
            Direction::Outbound,
            "10.0.0.2:9000".parse().unwrap(),
        );
        record.dst_service = Some(Arc::new(crate::workload::Service::new(
            "shop".into(),
            "cart".into(),
            vec!["10.96.0.1".parse().unwrap()],
            vec![80],
            vec![],
        )));
        let labels = TrafficLabels::of(&record);
        assert_eq!(
            labels.get("destination_service"),
            Some("cart.shop.svc.cluster.local")
        );
        assert_eq!(labels.get("destination_service_name"), Some("cart"));
        assert_eq!(labels.get("destination_service_namespace"), Some("shop"));
    }

    #[test]
    fn an_unknown_tunnelling_peer_is_labelled_by_its_baggage() {
        let mut record = ConnectionRecord::new(
            "id".into(),
            Direction::Inbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        record.src_identity = Some("spiffe://cluster.local/ns/shop/sa/cart".into());
        record.src_baggage = Some(Baggage {
            cluster: Some("east".into()),
            namespace: Some("shop".into()),
            workload: Some("cart".into()),
            workload_kind: Some("deployment".into()),
            service: Some("cart-svc".into()),
            revision: None,
        });
        let labels = TrafficLabels::of(&record);
        for (name, value) in [
            ("source_workload", "cart"),
            ("source_workload_namespace", "shop"),
            ("source_canonical_service", "cart-svc"),
            ("source_app", "cart-svc"),
            ("source_version", "unknown"),
            ("source_cluster", "east"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/cart"),
        ] {
            assert_eq!(labels.get(name), Some(value), "{name}");
        }
        // What the agent knows of the source wins over what the peer says.
        record.src_workload = Some(workload("demo", "client-7f9", &[("app", "client")]));
        let labels = TrafficLabels::of(&record);
        assert_eq!(labels.get("source_workload"), Some("client-7f9"));
        assert_eq!(labels.get("source_cluster"), Some("Kubernetes"));
    }

    #[test]
    fn the_workload_label_is_the_owner_not_the_pod() {
        let owned = |pod: &str| {
            let mut w = (*workload("demo", pod, &[])).clone();
            w.owner = Some(crate::workload::Owner {
                kind: "Deployment".into(),
                name: "server".into(),
            });
            Arc::new(w)
        };
        let labels = |pod: &str| {
            let mut record = ConnectionRecord::new(
                "id".into(),
                Direction::Inbound,
                "10.0.0.2:80".parse().unwrap(),
            );
            record.dst_workload = Some(owned(pod));
            TrafficLabels::of(&record)
        };
        let before = labels("server-7f9c4d5b8-abcde");
        assert_eq!(before.get("destination_workload"), Some("server"));
        // No label names a canonical service: Istio falls back to the workload's name.
        assert_eq!(before.get("destination_canonical_service"), Some("server"));
        // A restarted pod of the same Deployment: the same series.
        assert_eq!(labels("server-7f9c4d5b8-xyz12"), before);
    }

    #[test]
    fn a_connection_is_opened_once_and_closed_with_its_bytes() {
        let metrics = Metrics::new(hbone::Pool::new(hbone::PoolConfig::default())).unwrap();
        let mut record = ConnectionRecord::new(
            "id".into(),
            Direction::Outbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        record.opened(&metrics);
        record.opened(&metrics);
        record.bytes_sent = 100;
        record.bytes_received = 7;
        record.emit(&metrics);
        let page = metrics.render();
        let line = |name: &str| {
            page.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {page}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("istio_tcp_connections_opened_total{"), "1");
        assert_eq!(line("istio_tcp_connections_closed_total{"), "1");
        assert_eq!(line("istio_tcp_received_bytes_total{"), "100");
        assert_eq!(line("istio_tcp_sent_bytes_total{"), "7");
    }

    /// The value of the sample of `page` whose line starts with `prefix` and contains
    /// every one of `labels` (`name="value"`), 0 if none.
    fn sample(page: &str, prefix: &str, labels: &[&str]) -> u64 {
        page.lines()
            .filter(|l| l.starts_with(prefix) && labels.iter().all(|label| l.contains(label)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn inbound_from(source: &str, baggage: Option<Baggage>) -> ConnectionRecord {
        let mut record = ConnectionRecord::new(
            "id".into(),
            Direction::Inbound,
            "10.0.0.2:80".parse().unwrap(),
        );
        record.security = Security::MutualTls;
        record.dst_workload = Some(workload("demo", "server", &[]));
        record.src_identity = Some(format!("spiffe://cluster.local/ns/shop/sa/{source}"));
        record.src_baggage = baggage;
        record
    }

    fn said_by(workload: &str) -> Baggage {
        Baggage {
            namespace: Some("shop".into()),
            workload: Some(workload.into()),
            workload_kind: Some("deployment".into()),
            ..Baggage::default()
        }
    }

    #[test]
    fn baggage_names_a_bounded_number_of_sources() {
        let limits = MetricLimits {
            series: 100,
            baggage_sources: 2,
        };
        let pool = hbone::Pool::new(hbone::PoolConfig::default());
        let metrics = Metrics::with_limits(pool, limits).unwrap();
        for name in ["a", "b", "a", "c", "d", "b"] {
            let mut record = inbound_from("one", Some(said_by(name)));
            record.opened(&metrics);
            record.emit(&metrics);
        }
        let page = metrics.render();
        let opened = |labels: &[&str]| sample(&page, "istio_tcp_connections_opened_total{", labels);
        assert_eq!(opened(&["source_workload=\"a\""]), 2, "{page}");
        assert_eq!(opened(&["source_workload=\"b\""]), 2, "{page}");
        // c and d came after two sources were known: unknown, but still counted, with
        // what the certificate proved and what this agent knows.
        let folded = [
            "source_workload=\"unknown\"",
            "source_workload_namespace=\"unknown\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/one\"",
            "destination_workload=\"server\"",
        ];
        assert_eq!(opened(&folded), 2, "{page}");
        // Each folded opening and closing is counted.
        assert_eq!(
            sample(&page, "warren_metric_baggage_sources_folded_total", &[]),
            4,
            "{page}"
        );
        assert_eq!(sample(&page, "warren_metric_series_dropped_total", &[]), 0);

        // A source this agent knows is not learned from baggage, and takes no room.
        let mut known = inbound_from("one", Some(said_by("e")));
        known.src_workload = Some(workload("demo", "client", &[]));
        known.opened(&metrics);
        let page = metrics.render();
        assert_eq!(
            sample(
                &page,
                "istio_tcp_connections_opened_total{",
                &["source_workload=\"client\""]
            ),
            1
        );
        assert_eq!(
            sample(&page, "warren_metric_baggage_sources_folded_total", &[]),
            4
        );
    }

    #[test]
    fn label_sets_over_the_cap_are_folded_and_counted() {
        let limits = MetricLimits {
            series: 3,
            baggage_sources: 100,
        };
        let pool = hbone::Pool::new(hbone::PoolConfig::default());
        let metrics = Metrics::with_limits(pool, limits).unwrap();
        for source in ["a", "b", "c", "d", "e", "a"] {
            let mut record = inbound_from(source, None);
            record.opened(&metrics);
            record.bytes_sent = 10;
            record.emit(&metrics);
        }
        let mut refused = inbound_from("f", None);
        refused.response_flags = crate::proxy::access_log::ResponseFlags::Deny;
        refused.opened(&metrics);
        refused.emit(&metrics);
        let page = metrics.render();
        let families = [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_received_bytes_total{",
            "istio_tcp_sent_bytes_total{",
        ];
        // Each family: the three admitted label sets and the folded ones, no more.
        for family in families {
            let series = page.lines().filter(|l| l.starts_with(family)).count();
            assert_eq!(series, 3 + 2, "{family}: {page}");
        }
        assert!(page.contains("warren_metric_series 3\n"), "{page}");
        let principal =
            |p: &str| format!("source_principal=\"spiffe://cluster.local/ns/shop/sa/{p}\"");
        let opened = |labels: &[&str]| sample(&page, "istio_tcp_connections_opened_total{", labels);
        assert_eq!(opened(&[&principal("a")]), 2);
        assert_eq!(opened(&[&principal("d")]), 0);
        // Every connection is still counted: d and e in the folded set, which keeps the
        // reporter, the protocol, the outcome and the security; f's refusal in its own.
        let folded = [
            "source_principal=\"unknown\"",
            "destination_workload=\"unknown\"",
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(
            opened(&[&folded[..], &["response_flags=\"-\""]].concat()),
            2
        );
        assert_eq!(
            opened(&[&folded[..], &["response_flags=\"DENY\""]].concat()),
            1
        );
        assert_eq!(opened(&[]), 7);
        assert_eq!(sample(&page, "istio_tcp_received_bytes_total{", &[]), 60);
        // d, e and f, opened and closed.
        assert_eq!(
            sample(&page, "warren_metric_series_dropped_total", &[]),
            6,
            "{page}"
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).await.unwrap();
        page
    }
}
