//! Prometheus metrics on `:15020/metrics` (Istio's port), in the agent's own netns.
//!
//! A start: the gauges the data path already knows. Istio's `istio_tcp_*` families come
//! with the observability work; they will register here too.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::proxy::hbone;

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
    enrolled_pods: IntGauge,
    pool_connections: IntGauge,
    policy_refusals: IntCounterVec,
    pool: hbone::Pool,
}

impl Metrics {
    pub fn new(pool: hbone::Pool) -> Result<Self, MetricsError> {
        let registry = Registry::new();
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
        registry.register(Box::new(enrolled_pods.clone()))?;
        registry.register(Box::new(pool_connections.clone()))?;
        Ok(Self {
            registry,
            enrolled_pods,
            pool_connections,
            policy_refusals,
            pool,
        })
    }

    /// Count a connection refused by `policy`.
    pub fn count_refusal(&self, policy: &crate::policy::PolicyRef) {
        let kind = format!("{:?}", policy.kind());
        self.policy_refusals
            .with_label_values(&[kind.as_str(), policy.to_string().as_str()])
            .inc();
    }

    pub fn set_enrolled_pods(&self, pods: usize) {
        self.enrolled_pods.set(pods as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.pool_connections.set(self.pool.connections() as i64);
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
