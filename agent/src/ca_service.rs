//! `warren ca serve`: the cluster's CA as a service. Agents send a CSR per identity of
//! their node's pods, with their projected service-account token; the service reviews
//! the token with the API server, checks that the identity is one the caller may have
//! ([`authorize`]), and signs. It speaks Istio's certificate API ([`grpc`]), so its
//! clients could as well be pointed at istiod.
//!
//! The CA's key lives in a Secret (Istio's plug-in CA keys: `ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem`, `cert-chain.pem` — an Istio `cacerts` Secret works as is); the
//! first start creates a self-signed root there. The root is published in a ConfigMap
//! that agents mount to verify this service and their peers. The service's own TLS
//! certificate is issued by the CA at start-up for its Service's DNS names.
//!
//! Any pod can reach the service, so it is bounded under abuse: connections are capped
//! (`--max-connections`, reset at accept when over) and live at most
//! `--max-connection-age` (then GOAWAY, and closed [`CONNECTION_CLOSE_GRACE`] later);
//! HTTP/2 streams per connection, header lists and flow-control windows are small;
//! calls in flight are capped (`--max-concurrent-requests`, RESOURCE_EXHAUSTED at once
//! when over); the caller's token is reviewed from the headers alone, before any of the
//! body is read, and the body must arrive within `--request-read-timeout`; successful
//! TokenReviews are cached briefly ([`token_cache`]).
pub mod authorize;
pub mod grpc;
#[cfg(test)]
mod tests;
pub mod token_cache;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    ByteString,
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::Semaphore;

use self::{
    authorize::{Authorizer, Caller},
    grpc::{Code, IstioCertificateRequest, IstioCertificateResponse, Status},
    token_cache::TokenCache,
};
use crate::identity::{ca, CertificateAuthority, Identity};

/// The files of a CA, as keys of its Secret.
const CA_FILES: [&str; 4] = [
    ca::ROOT_CERT_FILE,
    ca::CA_CERT_FILE,
    ca::CA_KEY_FILE,
    ca::CERT_CHAIN_FILE,
];
/// The service's own certificate lives this long; it is issued anew at each start.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection past its age may finish the calls it has in flight (gRPC's
/// `MaxConnectionAgeGrace`); then it is closed whatever it is doing.
pub const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 streams (calls) a connection may have open at once; the agents send one.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Largest header list accepted: a bearer token is a kilobyte or two.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Largest request body read: a CSR and its metadata are a kilobyte or two (an RSA-4096
/// CSR in PEM under 2 KiB), far under gRPC's message limit.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// HTTP/2 flow-control windows (the protocol's default size): what a client can make
/// the service buffer per stream and per connection before it reads.
const FLOW_CONTROL_WINDOW: u32 = 65_535;

/// `warren ca serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CaServeArgs {
    /// Where to serve Istio's certificate API (gRPC over TLS).
    #[arg(long, env = "WARREN_CA_LISTEN", default_value = "[::]:15012")]
    pub listen: SocketAddr,
    /// Namespace of the CA's Secret and root ConfigMap.
    #[arg(
        long,
        env = "WARREN_CA_SECRET_NAMESPACE",
        default_value = "warren-system"
    )]
    pub secret_namespace: String,
    /// The Secret holding the CA (Istio's plug-in CA keys); created with a new root when
    /// missing.
    #[arg(long, env = "WARREN_CA_SECRET_NAME", default_value = "warren-ca")]
    pub secret_name: String,
    /// The ConfigMap the root certificate is published in (key `root-cert.pem`).
    #[arg(long, default_value = "warren-ca-root")]
    pub root_configmap: String,
    /// SPIFFE trust domain of the identities signed.
    #[arg(long, env = crate::config::ENV_TRUST_DOMAIN, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// DNS names of this service's own certificate (what agents dial).
    #[arg(
        long = "dns-name",
        value_delimiter = ',',
        default_value = "warren-ca.warren-system.svc,warren-ca.warren-system.svc.cluster.local"
    )]
    pub dns_names: Vec<String>,
    /// `namespace/service-account` of the node agents, which may ask for the identities
    /// of the pods on their node.
    #[arg(
        long = "trusted-agent",
        value_delimiter = ',',
        default_value = "warren-system/warren-agent"
    )]
    pub trusted_agents: Vec<String>,
    /// The audience callers' tokens must be for.
    #[arg(long, default_value = "warren-ca")]
    pub token_audience: String,
    /// Longest lifetime signed, whatever is asked.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub max_lifetime: Duration,
    /// A private directory for the CA's files while serving (an emptyDir).
    #[arg(long, value_name = "DIR", default_value = "/var/run/warren-ca")]
    pub work_dir: PathBuf,
    /// Where to serve `/healthz/ready`.
    #[arg(long, default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,
    /// Calls handled at once (token review, body, signing); more are answered
    /// RESOURCE_EXHAUSTED at once, and the agents retry with backoff.
    #[arg(
        long,
        env = "WARREN_CA_MAX_CONCURRENT_REQUESTS",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_concurrent_requests: u32,
    /// Connections open at once; more are reset as they are accepted.
    #[arg(
        long,
        env = "WARREN_CA_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,
    /// How long a connection may live (TLS handshake included); then it is asked to go
    /// away and closed 10 s later whatever it is doing.
    #[arg(long, env = "WARREN_CA_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration, default_value = "30s")]
    pub max_connection_age: Duration,
    /// How long a call's request body (the CSR) may take to arrive once its token was
    /// accepted.
    #[arg(long, env = "WARREN_CA_REQUEST_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub request_read_timeout: Duration,
    /// How long a successful TokenReview is remembered (by the token's SHA-256), so a
    /// burst of CSRs with one token costs one review; also how long a token the API
    /// server stops accepting is still accepted. 0 turns the cache off.
    #[arg(long, env = "WARREN_CA_TOKEN_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub token_cache_ttl: Duration,
    /// Tokens remembered at most; the oldest are forgotten first.
    #[arg(long, env = "WARREN_CA_TOKEN_CACHE_SIZE", default_value_t = 4096)]
    pub token_cache_size: usize,
    /// How long a call waits for the API server (its TokenReview, then its pod
    /// lookups); then it is answered UNAVAILABLE and its slot freed.
    #[arg(long, env = "WARREN_CA_API_SERVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub api_server_timeout: Duration,
}

/// How much a CA service gives any one caller, and all of them: see `CaServeArgs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent_requests: usize,
    pub max_connections: usize,
    pub max_connection_age: Duration,
    pub request_read_timeout: Duration,
    pub api_server_timeout: Duration,
}

impl From<&CaServeArgs> for Limits {
    fn from(args: &CaServeArgs) -> Self {
        Self {
            max_concurrent_requests: args.max_concurrent_requests as usize,
            max_connections: args.max_connections as usize,
            max_connection_age: args.max_connection_age,
            request_read_timeout: args.request_read_timeout,
            api_server_timeout: args.api_server_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaServeError {
    #[error("cannot make a Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("cannot read or write the CA Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("the CA Secret {namespace}/{name} has no key {key} (it needs {CA_FILES:?}, Istio's plug-in CA layout)")]
    SecretKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("cannot publish the root certificate in ConfigMap {namespace}/{name}: {source}")]
    ConfigMap {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot use {path} for the CA's files: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the service's TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Readiness(#[from] crate::admin::AdminError),
}

/// A CA's serving state: what signs, who may ask, and how much is given.
pub struct CaService {
    ca: CertificateAuthority,
    authorizer: Authorizer,
    max_lifetime: Duration,
    limits: Limits,
    /// A permit per call in flight.
    requests: Arc<Semaphore>,
    /// A permit per open connection.
    connections: Arc<Semaphore>,
    /// Refusals for a limit are logged at most once a second each.
    request_refusals: LogThrottle,
    connection_refusals: LogThrottle,
}

/// Start serving; runs until the process ends.
pub async fn run(args: CaServeArgs) -> Result<(), CaServeError> {
    let client = Client::try_default().await.map_err(CaServeError::Client)?;
    let ca = load_or_create(&client, &args).await?;
    publish_root(&client, &args, &ca).await?;
    let authorizer = Authorizer::new(
        client,
        vec![args.token_audience.clone()],
        args.trusted_agents.clone(),
        args.trust_domain.clone(),
    )
    .with_token_cache(TokenCache::new(args.token_cache_ttl, args.token_cache_size));
    let service = Arc::new(CaService::new(
        ca,
        authorizer,
        args.max_lifetime,
        Limits::from(&args),
    ));
    let tls = service.tls_config(&args.dns_names)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| CaServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let readiness = crate::admin::Readiness::new();
    tokio::spawn(crate::admin::serve_readiness(
        crate::admin::bind_readiness(args.readiness_addr).await?,
        readiness.clone(),
    ));
    readiness.started();
    tracing::info!(listen = %args.listen, dns_names = ?args.dns_names, trusted_agents = ?args.trusted_agents, limits = ?service.limits, "CA serving Istio's certificate API");
    serve(listener, tls, service).await;
    Ok(())
}

impl CaService {
    pub fn new(
        ca: CertificateAuthority,
        authorizer: Authorizer,
        max_lifetime: Duration,
        limits: Limits,
    ) -> Self {
        Self {
            ca,
            authorizer,
            max_lifetime,
            requests: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            request_refusals: LogThrottle::default(),
            connection_refusals: LogThrottle::default(),
        }
    }

    /// The service's TLS: a certificate from the CA for `dns_names`, ALPN h2.
    pub fn tls_config(
        &self,
        dns_names: &[String],
    ) -> Result<Arc<rustls::ServerConfig>, CaServeError> {
        let (chain, key) = self
            .ca
            .issue_server_certificate(dns_names, SERVING_CERT_LIFETIME)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| CaServeError::Tls(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| CaServeError::Tls(err.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Answer one call: the method and the token from the headers alone (a call over
    /// `--max-concurrent-requests` or whose token is refused is answered without
    /// reading its body), then the body within `--request-read-timeout`, then the CSR.
    pub async fn call<B>(
        &self,
        request: http::Request<B>,
    ) -> Result<IstioCertificateResponse, Status>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.uri().path() != grpc::CREATE_CERTIFICATE {
            return Err(Status::new(
                Code::InvalidArgument,
                format!("unknown method {}", request.uri().path()),
            ));
        }
        let Some(token) = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Err(Status::new(
                Code::Unauthenticated,
                "no bearer token: send the service-account token in the authorization header",
            ));
        };
        let Ok(_permit) = self.requests.clone().try_acquire_owned() else {
            let max = self.limits.max_concurrent_requests;
            if self.request_refusals.ready() {
                tracing::warn!(max, "CA: a call was refused: too many calls in flight (raise --max-concurrent-requests)");
            }
            return Err(Status::new(
                Code::ResourceExhausted,
                format!("the CA has {max} calls in flight, its most (--max-concurrent-requests); retry later"),
            ));
        };
        let caller = self
            .api_server_bounded(self.authorizer.authenticate(token))
            .await?;
        let body = read_body(request.into_body(), self.limits.request_read_timeout).await?;
        let message: IstioCertificateRequest = grpc::unframe(body)?;
        self.api_server_bounded(self.create_certificate(&caller, message))
            .await
    }

    /// `work`, which waits for the API server, within `--api-server-timeout`.
    async fn api_server_bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let timeout = self.limits.api_server_timeout;
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Status::new(
                    Code::Unavailable,
                    format!(
                        "the API server did not answer within {} (--api-server-timeout)",
                        humantime::format_duration(timeout)
                    ),
                ))
            })
    }

    /// Answer one CreateCertificate call of an authenticated caller.
    pub async fn create_certificate(
        &self,
        caller: &Caller,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let csr = csr_der(&request.csr).ok_or_else(|| {
            Status::new(
                Code::InvalidArgument,
                "csr is not a PEM certificate request",
            )
        })?;
        let requested = match request.impersonated_identity() {
            Some(identity) => Identity::parse(identity),
            None => csr_identity(&csr),
        }
        .map_err(|err| {
            Status::new(
                Code::InvalidArgument,
                format!("the requested identity: {err}"),
            )
        })?;
        if let Err(status) = self.authorizer.authorize(caller, &requested).await {
            tracing::warn!(%caller, identity = %requested, "certificate refused: {}", status.message);
            return Err(status);
        }
        let asked = Duration::from_secs(request.validity_duration.max(0) as u64);
        let lifetime = if asked.is_zero() {
            self.max_lifetime
        } else {
            asked.min(self.max_lifetime)
        };
        let chain = self
            .ca
            .sign_csr(&csr, &requested, lifetime)
            .map_err(|err| Status::new(Code::InvalidArgument, err.to_string()))?;
        tracing::info!(%caller, identity = %requested, ?lifetime, "certificate signed");
        let mut pems: Vec<String> = chain.iter().map(|c| to_pem(c)).collect();
        // Istio's chains end with the root.
        if let Some(root) = self.ca.roots().first() {
            pems.push(to_pem(root));
        }
        Ok(IstioCertificateResponse { cert_chain: pems })
    }
}

/// The CA from its Secret, or a new root stored there on the first start.
async fn load_or_create(
    client: &Client,
    args: &CaServeArgs,
) -> Result<CertificateAuthority, CaServeError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.secret_namespace);
    let secret_error = |source| CaServeError::Secret {
        namespace: args.secret_namespace.clone(),
        name: args.secret_name.clone(),
        source,
    };
    let dir = &args.work_dir;
    loop {
        clear_work_dir(dir)?;
        if let Some(secret) = secrets
            .get_opt(&args.secret_name)
            .await
            .map_err(secret_error)?
        {
            let data = secret.data.unwrap_or_default();
            for key in CA_FILES {
                let value = data.get(key).ok_or_else(|| CaServeError::SecretKey {
                    namespace: args.secret_namespace.clone(),
                    name: args.secret_name.clone(),
                    key,
                })?;
                write_private(&dir.join(key), &value.0)?;
            }
            let ca = CertificateAuthority::load(dir)?;
            tracing::info!(secret = %format!("{}/{}", args.secret_namespace, args.secret_name), "CA loaded from its Secret");
            return Ok(ca);
        }
        CertificateAuthority::init(dir, &args.trust_domain)?;
        let mut data = BTreeMap::new();
        for key in CA_FILES {
            let bytes = std::fs::read(dir.join(key)).map_err(|source| CaServeError::WorkDir {
                path: dir.join(key),
                source,
            })?;
            data.insert(key.to_owned(), ByteString(bytes));
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(args.secret_name.clone()),
                namespace: Some(args.secret_namespace.clone()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{}/{}", args.secret_namespace, args.secret_name), "created a new root CA and stored it in its Secret");
                return Ok(CertificateAuthority::load(dir)?);
            }
            // Another replica was first: use its CA.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => return Err(secret_error(err)),
        }
    }
}

/// Put `root-cert.pem` in the root ConfigMap, creating or updating it.
async fn publish_root(
    client: &Client,
    args: &CaServeArgs,
    ca: &CertificateAuthority,
) -> Result<(), CaServeError> {
    let root_pem: String = ca.roots().iter().map(|c| to_pem(c)).collect();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.secret_namespace);
    let error = |source| CaServeError::ConfigMap {
        namespace: args.secret_namespace.clone(),
        name: args.root_configmap.clone(),
        source,
    };
    let wanted = BTreeMap::from([(ca::ROOT_CERT_FILE.to_owned(), root_pem)]);
    loop {
        let written = match configmaps
            .get_opt(&args.root_configmap)
            .await
            .map_err(error)?
        {
            Some(existing) if existing.data.as_ref() == Some(&wanted) => return Ok(()),
            Some(mut existing) => {
                existing.data = Some(wanted.clone());
                configmaps
                    .replace(&args.root_configmap, &PostParams::default(), &existing)
                    .await
            }
            None => {
                let configmap = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(args.root_configmap.clone()),
                        namespace: Some(args.secret_namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    data: Some(wanted.clone()),
                    ..ConfigMap::default()
                };
                configmaps.create(&PostParams::default(), &configmap).await
            }
        };
        match written {
            Ok(_) => return Ok(()),
            // Another replica wrote it meanwhile (created it, or changed it under this
            // one's resourceVersion): look again.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(err) => return Err(error(err)),
        }
    }
}

fn clear_work_dir(dir: &Path) -> Result<(), CaServeError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let error = |source| CaServeError::WorkDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(error)?;
    for key in CA_FILES {
        match std::fs::remove_file(dir.join(key)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(error(err)),
            _ => {}
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaServeError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaServeError::WorkDir {
            path: path.to_owned(),
            source,
        })?;
    file.write_all(bytes)
        .map_err(|source| CaServeError::WorkDir {
            path: path.to_owned(),
            source,
        })
}

/// The identity a CSR asks for: its URI SAN.
pub fn csr_identity(csr: &[u8]) -> Result<Identity, crate::identity::IdentityError> {
    let params = rcgen::CertificateSigningRequestParams::from_der(
        &rustls_pki_types::CertificateSigningRequestDer::from(csr),
    );
    let uri = params.ok().and_then(|p| {
        p.params
            .subject_alt_names
            .into_iter()
            .find_map(|san| match san {
                rcgen::SanType::URI(uri) => Some(uri.as_str().to_owned()),
                _ => None,
            })
    });
    Identity::parse(uri.as_deref().unwrap_or_default())
}

/// The DER of a PEM `CERTIFICATE REQUEST`.
pub fn csr_der(text: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(text.as_bytes())
        .ok()
        .map(|der| der.as_ref().to_vec())
}

pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()))
}

/// Accept TLS connections and serve HTTP/2 on each, until the listener fails for good.
/// Connections over `--max-connections` are reset as they are accepted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<CaService>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "CA: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = service.connections.clone().try_acquire_owned() else {
            if service.connection_refusals.ready() {
                tracing::warn!(%peer, max = service.limits.max_connections, "CA: a connection was reset: too many connections open (raise --max-connections)");
            }
            reset(stream);
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let age = tokio::time::sleep(service.limits.max_connection_age);
            tokio::pin!(age);
            let stream = tokio::select! {
                accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => match accepted {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "CA: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
                () = &mut age => return,
            };
            let handler = hyper::service::service_fn({
                let service = service.clone();
                move |request| {
                    let service = service.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&service, request).await) }
                }
            });
            let mut http2 =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            http2
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .max_header_list_size(MAX_HEADER_LIST_SIZE)
                .initial_stream_window_size(FLOW_CONTROL_WINDOW)
                .initial_connection_window_size(FLOW_CONTROL_WINDOW)
                .adaptive_window(false);
            let connection = http2.serve_connection(hyper_util::rt::TokioIo::new(stream), handler);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = &mut age => {
                    // gRPC's max connection age: GOAWAY, a grace for the calls in flight,
                    // then closed.
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(CONNECTION_CLOSE_GRACE, connection.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            tracing::debug!(%peer, "CA: connection closed: it outlived --max-connection-age and its grace");
                            return;
                        }
                    }
                }
            };
            if let Err(err) = ended {
                tracing::debug!(%peer, error = %err, "CA: connection ended");
            }
        });
    }
}

/// Close `stream` with a reset (RST): a refused connection's client sees "connection
/// reset", not a clean end.
fn reset(stream: tokio::net::TcpStream) {
    if let Err(err) = stream.set_zero_linger() {
        tracing::debug!(error = %err, "cannot set SO_LINGER 0; the refused connection ends with FIN");
    }
    drop(stream);
}

/// Read a request's body, at most [`MAX_REQUEST_BODY`], within `timeout`.
async fn read_body<B>(body: B, timeout: Duration) -> Result<Bytes, Status>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limited = http_body_util::Limited::new(body, MAX_REQUEST_BODY);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) => Err(Status::new(
            Code::InvalidArgument,
            format!("cannot read the request (at most {MAX_REQUEST_BODY} bytes): {err}"),
        )),
        Err(_) => Err(Status::new(
            Code::DeadlineExceeded,
            format!(
                "the request's body did not arrive within {} (--request-read-timeout)",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

/// Says whether to log now: at most once a second.
#[derive(Default)]
struct LogThrottle {
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl LogThrottle {
    fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn answer(
    service: &CaService,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<GrpcBody> {
    let outcome = service.call(request).await;
    let (data, status) = match outcome {
        Ok(response) => (Some(grpc::frame(&response)), Status::new(Code::Ok, "")),
        Err(status) => (None, status),
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", (status.code as u32).into());
    if let Ok(message) = http::HeaderValue::from_str(&grpc::encode_message(&status.message)) {
        trailers.insert("grpc-message", message);
    }
    let frames = data
        .map(Frame::data)
        .into_iter()
        .chain(std::iter::once(Frame::trailers(trailers)))
        .map(Ok::<_, std::convert::Infallible>);
    http::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap_or_else(|_| http::Response::new(Full::new(Bytes::new()).boxed()))
}
