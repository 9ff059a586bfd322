//! The agent's admin and health endpoints, Istio's ports:
//!
//! | port  | path              | what                                                      | bound      |
//! |-------|-------------------|-----------------------------------------------------------|------------|
//! | 15000 | `/config_dump`    | readiness, workloads, enrolled pods, policies, certificates, recent refusals (JSON; never a private key); `warren status` reads it | the node's loopback (`--admin-addr`) |
//! | 15000 | `/logging`        | `GET`: the log filter; `POST ?level=<filter>`: change it at run time | the node's loopback |
//! | 15021 | `/healthz/ready`  | 200 once every pod of the node that should be captured is (redirection, listeners, certificate); 503 with the reason before | all addresses (`--readiness-addr`), for the kubelet |
//!
//! The admin port can change how much the agent logs and shows the node's workloads, so it
//! listens on loopback only, as Envoy's and ztunnel's do; the readiness port says nothing
//! but ready or not.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::{identity::format_time, policy::PolicySet, proxy::ProxyContext, workload::Workload};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for the {what} endpoint on {addr}: {source} (is another agent running in this netns? change {flag})")]
pub struct AdminError {
    what: &'static str,
    flag: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Bind the admin listener (`--admin-addr`) at start-up, so a busy port fails first.
pub async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    bind(addr, "admin", "--admin-addr").await
}

/// Bind the readiness listener (`--readiness-addr`) at start-up; it answers 503 until
/// the agent is ready.
pub async fn bind_readiness(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    bind(addr, "readiness", "--readiness-addr").await
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError {
        what,
        flag,
        addr,
        source,
    })
}

/// Whether the node's pods are all captured, and which are not yet.
#[derive(Debug, Default)]
pub struct Readiness {
    state: RwLock<ReadinessState>,
}

#[derive(Debug, Clone, Default)]
struct ReadinessState {
    started: bool,
    enrolled: Vec<String>,
    pending: Vec<String>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The agent finished starting (redirection installed, listeners served).
    pub fn started(&self) {
        self.write().started = true;
    }

    /// What the enrollment serves, and what it could not enroll yet.
    pub fn set_pods(&self, enrolled: Vec<String>, pending: Vec<String>) {
        let mut state = self.write();
        state.enrolled = enrolled;
        state.pending = pending;
    }

    /// `Ok(())` when ready, or why not.
    pub fn check(&self) -> Result<(), String> {
        let state = self.read();
        if !state.started {
            return Err("starting: pods, certificates and redirection are being set up".to_owned());
        }
        if !state.pending.is_empty() {
            return Err(format!(
                "not yet captured: {} (see the agent's log)",
                state.pending.join(", ")
            ));
        }
        Ok(())
    }

    fn enrolled(&self) -> Vec<String> {
        self.read().enrolled.clone()
    }

    fn pending(&self) -> Vec<String> {
        self.read().pending.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ReadinessState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ReadinessState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Changes the log filter at run time (`tracing_subscriber`'s reload handle, behind a
/// function so this module does not depend on the subscriber's layering).
pub struct LogControl {
    current: RwLock<String>,
    apply: Box<ApplyFilter>,
}

/// Applies a filter; `Err` says why it does not parse.
type ApplyFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogControl {
    pub fn new(
        initial: String,
        apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            current: RwLock::new(initial),
            apply: Box::new(apply),
        }
    }

    pub fn current(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply `filter` (an `EnvFilter` directive such as `debug` or `info,warren=trace`);
    /// the old one stays when it does not parse.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.apply)(filter)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        tracing::info!(filter, "log filter changed through the admin endpoint");
        Ok(())
    }
}

/// What the admin endpoint shows.
pub struct AdminState {
    pub node: String,
    pub redirect_mode: String,
    /// Workloads, policy and certificates, as the data path sees them.
    pub ctx: Arc<ProxyContext>,
    pub readiness: Arc<Readiness>,
    pub logs: Option<LogControl>,
}

impl AdminState {
    /// `/config_dump`: everything the agent acts on, as JSON. Certificates are described
    /// (identity, serial, validity), never their keys.
    pub fn config_dump(&self) -> Value {
        let index = self.ctx.workloads.current();
        let mut workloads: Vec<Value> = index
            .all()
            .map(|w| {
                json!({
                    "namespace": w.namespace,
                    "name": w.name,
                    "service_account": w.service_account,
                    "workload": {"kind": w.workload_kind(), "name": w.workload_name()},
                    "labels": w.labels,
                    "node": w.node,
                    "ips": w.ips,
                    "in_mesh": w.in_mesh,
                    "foreign_hbone": w.foreign_hbone,
                })
            })
            .collect();
        workloads.sort_by_key(|w| format!("{}/{}", w["namespace"], w["name"]));
        let policy = self.ctx.policy.current();
        let peer_authentications: Vec<Value> = policy
            .peer_authentications()
            .iter()
            .map(|p| {
                json!({
                    "namespace": p.meta.namespace,
                    "name": p.meta.name,
                    "origin": p.meta.origin,
                    "selector": p.selector.as_ref().map(|s| &s.match_labels),
                    "mode": p.mode.to_string(),
                    "port_level_mtls": p.port_level_mtls.iter()
                        .map(|(port, mode)| (port.to_string(), mode.to_string()))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
            .collect();
        let authorization_policies: Vec<Value> = policy
            .authorization_policies()
            .iter()
            .map(|p| {
                json!({
                    "namespace": p.meta.namespace,
                    "name": p.meta.name,
                    "origin": p.meta.origin,
                    "selector": p.selector.as_ref().map(|s| &s.match_labels),
                    "action": p.action.to_string(),
                    "rules": p.rules.len(),
                })
            })
            .collect();
        let warnings: Vec<String> = policy.warnings().iter().map(|w| w.to_string()).collect();
        let not_decoding = not_decoding(&policy, index.all().map(|w| w.as_ref()));
        let certificates: Vec<Value> = self
            .ctx
            .secrets
            .certificates()
            .into_iter()
            .map(|c| {
                json!({
                    "identity": c.identity.to_string(),
                    "serial": c.serial,
                    "not_before": format_time(c.not_before),
                    "not_after": format_time(c.not_after),
                    "renew_at": format_time(c.renew_at),
                    "last_error": c.last_error,
                })
            })
            .collect();
        let ready = self.readiness.check();
        json!({
            "node": self.node,
            "redirect_mode": self.redirect_mode,
            "ready": ready.is_ok(),
            "not_ready_reason": ready.err(),
            "enrolled_pods": self.readiness.enrolled(),
            "pending_pods": self.readiness.pending(),
            "workloads": workloads,
            "policies": {
                "root_namespace": policy.config().root_namespace,
                "peer_authentications": peer_authentications,
                "authorization_policies": authorization_policies,
                "warnings": warnings,
                "not_decoding": not_decoding,
            },
            "certificates": certificates,
            "recent_refusals": self.ctx.refusals.snapshot(),
        })
    }
}

/// The policy documents that do not decode, each with the workloads in the mesh it fails
/// closed for (`ns/name`, sorted).
fn not_decoding<'a>(
    policy: &PolicySet,
    workloads: impl Iterator<Item = &'a Workload>,
) -> Vec<Value> {
    let root = policy.config().root_namespace.as_str();
    let workloads: Vec<&Workload> = workloads.filter(|w| w.in_mesh).collect();
    policy
        .broken()
        .iter()
        .map(|broken| {
            let mut affected: Vec<String> = workloads
                .iter()
                .filter(|w| broken.may_affect(root, w))
                .map(|w| w.to_string())
                .collect();
            affected.sort();
            json!({
                "location": broken.location,
                "kind": broken.kind.map(|k| k.to_string()),
                "scope": broken.scope(root),
                "consequence": broken.consequence(),
                "error": broken.error,
                "workloads": affected,
            })
        })
        .collect()
}

/// Serve the admin endpoints on `listener` forever.
pub async fn serve_admin(listener: TcpListener, state: Arc<AdminState>) {
    serve(listener, "admin", move |request| {
        let state = state.clone();
        async move { admin_response(&state, request).await }
    })
    .await
}

/// Serve `/healthz/ready` on `listener` forever.
pub async fn serve_readiness(listener: TcpListener, readiness: Arc<Readiness>) {
    serve(listener, "readiness", move |request| {
        let readiness = readiness.clone();
        async move {
            match (request.method(), request.uri().path()) {
                (&Method::GET, "/healthz/ready") => match readiness.check() {
                    Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                },
                _ => text(
                    StatusCode::NOT_FOUND,
                    "not found; readiness is at GET /healthz/ready\n".to_owned(),
                ),
            }
        }
    })
    .await
}

async fn admin_response(
    state: &AdminState,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&state.config_dump())
                .unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"));
            let mut response = text(StatusCode::OK, body + "\n");
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        (Method::GET, "/logging") => match &state.logs {
            Some(logs) => text(StatusCode::OK, format!("{}\n", logs.current())),
            None => text(
                StatusCode::NOT_FOUND,
                "log control is not available\n".into(),
            ),
        },
        (Method::POST, "/logging") => {
            // The level may come as `?level=…` (Envoy's and ztunnel's form) or as the body.
            let from_query = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("level="))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="));
            let filter = match from_query {
                Some(filter) => filter,
                None => match request.into_body().collect().await {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
                    Err(err) => return text(StatusCode::BAD_REQUEST, format!("{err}\n")),
                },
            };
            match (&state.logs, filter.is_empty()) {
                (None, _) => text(
                    StatusCode::NOT_FOUND,
                    "log control is not available\n".into(),
                ),
                (Some(_), true) => text(
                    StatusCode::BAD_REQUEST,
                    "give the filter as ?level=<filter> (e.g. debug, or info,warren=trace)\n"
                        .into(),
                ),
                (Some(logs), false) => match logs.set(&filter) {
                    Ok(()) => text(StatusCode::OK, format!("{filter}\n")),
                    Err(err) => text(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "{filter:?} is not a valid log filter ({err}); the filter stays {}\n",
                            logs.current()
                        ),
                    ),
                },
            }
        }
        (_, "/config_dump" | "/logging") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /config_dump, GET or POST /logging\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /config_dump or /logging\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

/// Accept on `listener` forever, answering each HTTP/1 request with `respond`.
async fn serve<F, Fut>(listener: TcpListener, name: &'static str, respond: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(listener = name, error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let respond = respond.clone();
                async move { Ok::<_, Infallible>(respond(request).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(listener = name, error = %err, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{decode_file, testing::authz};

    fn workload(namespace: &str, name: &str, app: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            name: name.into(),
            service_account: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            node: "n1".into(),
            ips: vec![],
            netns: Default::default(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: None,
        }
    }

    #[test]
    fn documents_that_do_not_decode_name_the_workloads_they_close() {
        let text = authz(
            "demo",
            "typo",
            "  selector: {matchLabels: {app: server}}\n  rules: [{to: [{operation: {port: [80]}}]}]",
        );
        let decoded = decode_file(&text, Path::new("policies/bad.yaml"));
        let policy = PolicySet::decoded(Default::default(), decoded.policies, decoded.broken);
        let workloads = [
            workload("demo", "server", "server"),
            workload("demo", "client", "client"),
            workload("other", "server", "server"),
        ];
        let dump = not_decoding(&policy, workloads.iter());
        assert_eq!(dump.len(), 1);
        assert_eq!(dump[0]["location"], "policies/bad.yaml:1");
        assert_eq!(dump[0]["kind"], "AuthorizationPolicy");
        assert_eq!(dump[0]["workloads"], json!(["demo/server"]));
        assert_eq!(dump[0]["scope"], "workloads app=server of namespace demo");
        assert!(
            dump[0]["error"]
                .as_str()
                .unwrap()
                .contains("unknown field `port`"),
            "{dump:?}"
        );
    }
}
