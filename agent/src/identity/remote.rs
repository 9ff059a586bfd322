//! A CA over the network: `warren ca serve` (or anything speaking Istio's certificate
//! API) at `--ca-addr`, verified against `--ca-root-cert`, authenticated with the
//! agent's projected service-account token (`--ca-token-file`, re-read at every call:
//! the kubelet rotates it). Each CSR goes with the pod identity it is for
//! (`ImpersonatedIdentity`), which the CA grants only for pods on this agent's node.
//!
//! The [`SecretManager`](super::SecretManager) renews at half-life and keeps the
//! current certificate while the CA cannot be reached, so a CA that is briefly down
//! costs nothing.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};

use super::{ca::CaError, CaClient, Identity};
use crate::ca_service::grpc::{self, Code, IstioCertificateRequest, IstioCertificateResponse};

/// The longest a signing may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's CA port, when `--ca-addr` names none.
const DEFAULT_PORT: u16 = 15012;

pub struct RemoteCa {
    /// `https://host:port`, as given.
    address: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token_file: Option<PathBuf>,
    roots: Vec<CertificateDer<'static>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCa")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RemoteCa {
    /// A client for the CA at `address` (`https://host[:port]`), whose certificate must
    /// chain to a root in `root_cert` (also the mesh's trust bundle). Call from within a
    /// tokio runtime: signing runs on it.
    pub fn new(
        address: &str,
        root_cert: &Path,
        token_file: Option<PathBuf>,
    ) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadFile {
            path: PathBuf::from(address),
            reason,
        };
        let uri: http::Uri = address
            .parse()
            .map_err(|err| bad(format!("--ca-addr is not a URL: {err}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "--ca-addr must be an https:// URL (the CA is reached over TLS)".to_owned(),
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("--ca-addr has no host".to_owned()))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|err| bad(format!("--ca-addr's host {host:?}: {err}")))?;
        let roots = CertificateDer::pem_file_iter(root_cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| CaError::BadFile {
                path: root_cert.to_owned(),
                reason: format!("cannot read the CA's root certificates: {err}"),
            })?;
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 {
            return Err(CaError::BadFile {
                path: root_cert.to_owned(),
                reason: "holds no usable root certificate".to_owned(),
            });
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| bad(err.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            address: address.to_owned(),
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            token_file,
            roots,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    async fn create_certificate(
        &self,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| format!("cannot connect: {err}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|err| format!("TLS handshake failed: {err}"))?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|err| format!("HTTP/2 handshake failed: {err}"))?;
        tokio::spawn(connection);
        let mut builder = http::Request::post(format!(
            "https://{}:{}{}",
            self.server_name.to_str(),
            self.port,
            grpc::CREATE_CERTIFICATE
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|err| format!("cannot read the token {}: {err}", path.display()))?;
            builder = builder.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let request = builder
            .body(Full::new(grpc::frame(&request)))
            .map_err(|err| err.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("the call failed: {err}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("the answer broke off: {err}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let body: Bytes = collected.to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP status {status} (is --ca-addr a gRPC CA?)"));
        }
        let field = |name: &str| {
            trailers
                .get(name)
                .or_else(|| headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let code = field("grpc-status")
            .and_then(|c| c.parse::<u32>().ok())
            .ok_or("the answer has no grpc-status")?;
        if code != Code::Ok as u32 {
            let message = grpc::decode_message(&field("grpc-message").unwrap_or_default());
            let code = Code::from_number(code).map_or(format!("{code}"), |c| format!("{c:?}"));
            return Err(format!("refused ({code}): {message}"));
        }
        grpc::unframe(body).map_err(|status| status.message)
    }
}

impl CaClient for RemoteCa {
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let request = IstioCertificateRequest {
            csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr_der.to_vec())),
            validity_duration: lifetime.as_secs().max(1) as i64,
            metadata: None,
        }
        .with_impersonated_identity(identity.as_str());
        let unavailable =
            |reason: String| CaError::Unavailable(format!("{}: {reason}", self.address));
        let response = self
            .runtime
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, self.create_certificate(request)).await
            })
            .map_err(|_| unavailable(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(unavailable)?;
        let mut chain = Vec::new();
        for text in &response.cert_chain {
            let cert = CertificateDer::from_pem_slice(text.as_bytes()).map_err(|err| {
                unavailable(format!(
                    "the CA answered a certificate that is not PEM: {err}"
                ))
            })?;
            // The chain ends with the root, which peers have already.
            if !self.roots.contains(&cert) {
                chain.push(cert);
            }
        }
        if chain.is_empty() {
            return Err(unavailable("the CA answered no certificate".to_owned()));
        }
        Ok(chain)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}
