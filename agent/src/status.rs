//! `warren status`: the node's view at a glance — redirect mode, readiness, enrolled
//! pods, certificate health, policies in force and the last refusals. It reads the
//! running agent's `/config_dump` on the node's loopback (`--admin-addr`), so it runs
//! where the agent runs (`kubectl exec` into the DaemonSet pod, or the lab's node).
//!
//! Exit status: [`EXIT_HEALTHY`], [`EXIT_UNHEALTHY`] (not ready, a certificate expired
//! or failing to renew, or a policy document that does not decode — the workloads it may
//! target fail closed), [`EXIT_UNREACHABLE`] (no agent answered).
use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::proxy::refusals::Refusal;

/// Exit status: ready, and every certificate valid and renewing.
pub const EXIT_HEALTHY: u8 = 0;
/// Exit status: the agent answered, and something needs attention (readiness, a
/// certificate, a policy document that does not decode).
pub const EXIT_UNHEALTHY: u8 = 1;
/// Exit status: no agent answered on the admin address.
pub const EXIT_UNREACHABLE: u8 = 2;

/// How long to wait for the agent.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `warren status` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The agent's admin address (its `--admin-addr`).
    #[arg(
        long,
        value_name = "ADDR",
        env = "WARREN_ADMIN_ADDR",
        default_value = crate::config::DEFAULT_ADMIN_ADDR
    )]
    pub admin_addr: SocketAddr,
    /// Print the agent's `/config_dump` JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no warren agent answers on {addr} ({source}): is the agent running on this node, and is its --admin-addr {addr}? (run warren status where the agent runs, e.g. kubectl exec into its pod)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent on {addr} did not answer within {TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("talking to the agent on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the agent on {addr} answered {status} to /config_dump: {body}")]
    Status {
        addr: SocketAddr,
        status: http::StatusCode,
        body: String,
    },
    #[error("the answer on {addr} is not warren's /config_dump ({source}); is something else listening there?")]
    Decode {
        addr: SocketAddr,
        source: serde_json::Error,
    },
}

/// What `warren status` reads of `/config_dump`.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeView {
    pub node: String,
    pub redirect_mode: String,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    pub enrolled_pods: Vec<String>,
    pub pending_pods: Vec<String>,
    pub policies: PoliciesView,
    pub certificates: Vec<CertificateView>,
    pub recent_refusals: Vec<Refusal>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PoliciesView {
    pub peer_authentications: Vec<serde_json::Value>,
    pub authorization_policies: Vec<serde_json::Value>,
    pub warnings: Vec<String>,
    /// Policy documents that do not decode (absent from older agents' dumps).
    #[serde(default)]
    pub not_decoding: Vec<BrokenPolicyView>,
}

/// A policy document that does not decode, and the workloads it fails closed for.
#[derive(Debug, Clone, Deserialize)]
pub struct BrokenPolicyView {
    pub location: String,
    pub scope: String,
    pub consequence: String,
    pub error: String,
    pub workloads: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CertificateView {
    pub identity: String,
    pub not_after: String,
    pub renew_at: String,
    pub last_error: Option<String>,
}

/// Fetch `/config_dump` from the agent: the raw JSON text.
pub async fn fetch(addr: SocketAddr) -> Result<String, StatusError> {
    tokio::time::timeout(TIMEOUT, fetch_unbounded(addr))
        .await
        .map_err(|_| StatusError::Timeout { addr })?
}

async fn fetch_unbounded(addr: SocketAddr) -> Result<String, StatusError> {
    let http = |source| StatusError::Http { addr, source };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| StatusError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let request = Request::get("/config_dump")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("a static request is well-formed");
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(StatusError::Status { addr, status, body });
    }
    Ok(body)
}

/// Read the dump's JSON.
pub fn parse(addr: SocketAddr, json: &str) -> Result<NodeView, StatusError> {
    serde_json::from_str(json).map_err(|source| StatusError::Decode { addr, source })
}

/// The summary of a node's view at `now`.
pub struct Summary<'a> {
    pub view: &'a NodeView,
    pub now: SystemTime,
}

/// A certificate's health at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateHealth {
    Valid {
        left: Duration,
    },
    /// Valid, but the last renewal failed.
    RenewalFailing {
        left: Duration,
        error: String,
    },
    Expired,
    /// `not_after` does not read as a time.
    Unknown,
}

impl CertificateView {
    pub fn health(&self, now: SystemTime) -> CertificateHealth {
        let Some(not_after) = parse_time(&self.not_after) else {
            return CertificateHealth::Unknown;
        };
        match (not_after.duration_since(now), &self.last_error) {
            (Err(_), _) => CertificateHealth::Expired,
            (Ok(left), None) => CertificateHealth::Valid { left },
            (Ok(left), Some(error)) => CertificateHealth::RenewalFailing {
                left,
                error: error.clone(),
            },
        }
    }
}

fn parse_time(text: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

impl Summary<'_> {
    /// Whether anything needs attention.
    pub fn healthy(&self) -> bool {
        self.view.ready
            && self.view.policies.not_decoding.is_empty()
            && self
                .view
                .certificates
                .iter()
                .all(|c| matches!(c.health(self.now), CertificateHealth::Valid { .. }))
    }

    pub fn exit_code(&self) -> u8 {
        if self.healthy() {
            EXIT_HEALTHY
        } else {
            EXIT_UNHEALTHY
        }
    }
}

/// Rounded to what a person reads: `23h 59m`, `4m 10s`, `9s`.
fn approximately(left: Duration) -> String {
    let secs = left.as_secs();
    let rounded = if secs >= 3600 {
        Duration::from_secs(secs / 60 * 60)
    } else {
        Duration::from_secs(secs)
    };
    humantime::format_duration(rounded).to_string()
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.view;
        writeln!(
            f,
            "node {}: redirect mode {}",
            view.node, view.redirect_mode
        )?;
        match (&view.ready, &view.not_ready_reason) {
            (true, _) => writeln!(f, "ready: yes")?,
            (false, reason) => writeln!(
                f,
                "ready: NO — {}",
                reason.as_deref().unwrap_or("no reason given")
            )?,
        }

        writeln!(f, "\nenrolled pods ({}):", view.enrolled_pods.len())?;
        if view.enrolled_pods.is_empty() {
            writeln!(
                f,
                "  none (is a namespace of this node's pods in the mesh?)"
            )?;
        }
        for pod in &view.enrolled_pods {
            writeln!(f, "  {pod}")?;
        }
        if !view.pending_pods.is_empty() {
            writeln!(
                f,
                "  not yet captured: {} (see the agent's log)",
                view.pending_pods.join(", ")
            )?;
        }

        writeln!(f, "\ncertificates ({}):", view.certificates.len())?;
        for certificate in &view.certificates {
            let health = match certificate.health(self.now) {
                CertificateHealth::Valid { left } => format!(
                    "ok, expires in {} ({}), renews at {}",
                    approximately(left),
                    certificate.not_after,
                    certificate.renew_at
                ),
                CertificateHealth::RenewalFailing { left, error } => format!(
                    "RENEWAL FAILING, expires in {} ({}): {error}",
                    approximately(left),
                    certificate.not_after
                ),
                CertificateHealth::Expired => format!(
                    "EXPIRED at {}{}",
                    certificate.not_after,
                    certificate
                        .last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                CertificateHealth::Unknown => {
                    format!("expiry unreadable ({:?})", certificate.not_after)
                }
            };
            writeln!(f, "  {}: {health}", certificate.identity)?;
        }

        let policies = &view.policies;
        writeln!(
            f,
            "\npolicies: {} PeerAuthentication, {} AuthorizationPolicy, {} warning(s){}",
            policies.peer_authentications.len(),
            policies.authorization_policies.len(),
            policies.warnings.len(),
            if policies.warnings.is_empty() {
                ""
            } else {
                " (warren check explains them)"
            }
        )?;
        if !policies.not_decoding.is_empty() {
            writeln!(
                f,
                "  {} POLICY DOCUMENT(S) DO NOT DECODE — failing closed until fixed:",
                policies.not_decoding.len()
            )?;
        }
        for broken in &policies.not_decoding {
            let workloads = if broken.workloads.is_empty() {
                "no workload in the mesh now".to_owned()
            } else {
                broken.workloads.join(", ")
            };
            writeln!(
                f,
                "  ! {}: for {}, {} ({workloads}): {}",
                broken.location, broken.scope, broken.consequence, broken.error
            )?;
        }

        writeln!(
            f,
            "\nrecent refusals ({}, newest first):",
            view.recent_refusals.len()
        )?;
        if view.recent_refusals.is_empty() {
            writeln!(f, "  none")?;
        }
        for refusal in &view.recent_refusals {
            writeln!(
                f,
                "  {} {} -> {}{} refused by {}: {}",
                refusal.at,
                match (&refusal.source_identity, &refusal.source) {
                    (Some(identity), Some(source)) => format!("{identity} ({source})"),
                    (Some(identity), None) => identity.clone(),
                    (None, Some(source)) => format!("{source} (plaintext)"),
                    (None, None) => "unknown source".to_owned(),
                },
                refusal.destination,
                refusal
                    .destination_workload
                    .as_ref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default(),
                refusal.policy,
                refusal.reason
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(json: serde_json::Value) -> NodeView {
        serde_json::from_value(json).unwrap()
    }

    fn sample(ready: bool, not_after: &str, last_error: Option<&str>) -> NodeView {
        view(serde_json::json!({
            "node": "n1",
            "redirect_mode": "ebpf",
            "ready": ready,
            "not_ready_reason": if ready { None } else { Some("not yet captured: demo/ghost") },
            "enrolled_pods": ["demo/client", "demo/server"],
            "pending_pods": if ready { vec![] } else { vec!["demo/ghost"] },
            "workloads": [],
            "policies": {
                "root_namespace": "istio-system",
                "peer_authentications": [{"namespace": "demo", "name": "strict"}],
                "authorization_policies": [],
                "warnings": [],
            },
            "certificates": [{
                "identity": "spiffe://cluster.local/ns/demo/sa/client",
                "serial": "01",
                "not_before": "2026-12-01T10:00:00Z",
                "not_after": not_after,
                "renew_at": "2026-12-01T22:00:00Z",
                "last_error": last_error,
            }],
            "recent_refusals": [{
                "at": "2026-12-01T11:00:00.5Z",
                "connection_id": "c1",
                "source": "10.77.2.12:40000",
                "source_identity": null,
                "destination": "10.77.1.10:8080",
                "destination_workload": "demo/server",
                "policy": "PeerAuthentication demo/strict",
                "reason": "plaintext is refused under STRICT",
            }],
        }))
    }

    fn at(text: &str) -> SystemTime {
        parse_time(text).unwrap()
    }

    #[test]
    fn a_ready_node_with_valid_certificates_is_healthy() {
        let view = sample(true, "2026-12-02T10:00:00Z", None);
        let summary = Summary {
            view: &view,
            now: at("2026-12-01T11:00:00Z"),
        };
        assert!(summary.healthy());
        assert_eq!(summary.exit_code(), EXIT_HEALTHY);
        let text = summary.to_string();
        assert!(text.contains("node n1: redirect mode ebpf"), "{text}");
        assert!(text.contains("ready: yes"), "{text}");
        assert!(
            text.contains("enrolled pods (2):\n  demo/client\n  demo/server"),
            "{text}"
        );
        assert!(
            text.contains("spiffe://cluster.local/ns/demo/sa/client: ok, expires in 23h"),
            "{text}"
        );
        assert!(
            text.contains("policies: 1 PeerAuthentication, 0 AuthorizationPolicy, 0 warning(s)"),
            "{text}"
        );
        assert!(
            text.contains("10.77.2.12:40000 (plaintext) -> 10.77.1.10:8080 (demo/server) refused by PeerAuthentication demo/strict"),
            "{text}"
        );
    }

    #[test]
    fn a_policy_document_that_does_not_decode_needs_attention() {
        let mut view = sample(true, "2026-12-02T10:00:00Z", None);
        view.policies.not_decoding = vec![BrokenPolicyView {
            location: "/run/policies/bad.yaml:3".into(),
            scope: "every workload of namespace demo".into(),
            consequence: "every connection to them is refused".into(),
            error: "/run/policies/bad.yaml:7:5 (document 2): spec: unknown field `rule`".into(),
            workloads: vec!["demo/server".into()],
        }];
        let summary = Summary {
            view: &view,
            now: at("2026-12-01T11:00:00Z"),
        };
        assert!(!summary.healthy());
        assert_eq!(summary.exit_code(), EXIT_UNHEALTHY);
        let text = summary.to_string();
        assert!(
            text.contains("1 POLICY DOCUMENT(S) DO NOT DECODE")
                && text.contains("! /run/policies/bad.yaml:3: for every workload of namespace demo, every connection to them is refused (demo/server): /run/policies/bad.yaml:7:5"),
            "{text}"
        );
    }

    #[test]
    fn unready_expired_or_failing_renewal_needs_attention() {
        let now = at("2026-12-01T11:00:00Z");
        let unready = sample(false, "2026-12-02T10:00:00Z", None);
        let summary = Summary {
            view: &unready,
            now,
        };
        assert_eq!(summary.exit_code(), EXIT_UNHEALTHY);
        assert!(summary
            .to_string()
            .contains("ready: NO — not yet captured: demo/ghost"));

        let expired = sample(true, "2026-12-01T10:59:00Z", Some("CA unreachable"));
        let summary = Summary {
            view: &expired,
            now,
        };
        assert_eq!(summary.exit_code(), EXIT_UNHEALTHY);
        assert!(summary
            .to_string()
            .contains("EXPIRED at 2026-12-01T10:59:00Z: CA unreachable"));

        let failing = sample(true, "2026-12-01T12:00:00Z", Some("CA unreachable"));
        let summary = Summary {
            view: &failing,
            now,
        };
        assert_eq!(summary.exit_code(), EXIT_UNHEALTHY);
        assert!(summary
            .to_string()
            .contains("RENEWAL FAILING, expires in 1h"));
    }

    #[test]
    fn something_else_on_the_port_is_named() {
        let addr: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let err = parse(addr, "{\"hello\": 1}").unwrap_err();
        assert!(
            err.to_string().contains("not warren's /config_dump"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn no_agent_is_a_clear_error() {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = fetch(addr).await.unwrap_err();
        assert!(matches!(err, StatusError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("is the agent running"), "{err}");
    }
}
