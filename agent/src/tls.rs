//! rustls configurations for the mTLS tunnel: SPIFFE-aware verification both ways.
//!
//! TLS 1.3 only, AES-128-GCM and AES-256-GCM (what ztunnel offers), ALPN `h2`, the `ring`
//! provider built explicitly (no process-wide default is read or installed). Session
//! resumption is off on both sides: a resumed session would skip certificate checks and
//! outlive a renewal, and HBONE keeps its few connections open anyway.
//!
//! | side | presents | checks |
//! |------|----------|--------|
//! | [`server_config`] (15008) | `local`'s current certificate | client chain to the trust bundle, clientAuth EKU, a SPIFFE ID |
//! | [`client_config`] | `source`'s current certificate | server chain to the trust bundle, serverAuth EKU, SPIFFE ID == `expected_server` |
//!
//! No hostname is checked anywhere: the server name given to `connect` is a dummy (use the
//! destination IP, which also keeps SNI out of the ClientHello). Certificates are read
//! from the [`SecretManager`] at each handshake, so renewals need no new config.
//!
//! | concern | file |
//! |---------|------|
//! | the certificate each side presents | `resolve` |
//! | verifying the peer: chain, EKU, SPIFFE ID, secure naming | `verify` |
mod resolve;
mod verify;

#[cfg(test)]
mod tests;

use std::{
    fmt, io,
    sync::{Arc, OnceLock},
};

use rustls::{
    client::Resumption,
    crypto::CryptoProvider,
    server::{NoServerSessionStorage, WebPkiClientVerifier},
    AlertDescription, CertificateError, ClientConfig, CommonState, ServerConfig,
};

use crate::identity::{format_time, Identity, SecretManager};

/// The only application protocol spoken in the tunnel: HTTP/2 (HBONE).
pub const ALPN_H2: &[u8] = b"h2";

/// Which end of the handshake a certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
    /// Either: when only the other end's certificate is known, not its role.
    Peer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Peer => "peer",
        })
    }
}

/// Why a handshake or a configuration failed, in words for the operator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("server presented {presented}, expected {expected}: the destination pod does not run as the service account this node expects for it (stale workload information, or the address now belongs to another pod)")]
    WrongServerIdentity {
        presented: Identity,
        expected: Identity,
    },
    #[error("{role} certificate lacks a SPIFFE ID: {reason}")]
    NoSpiffeId { role: Role, reason: String },
    #[error("{role} certificate is not valid for {role} authentication: its extended key usage lacks {eku} (mesh certificates carry serverAuth and clientAuth)")]
    WrongKeyUsage { role: Role, eku: &'static str },
    #[error("certificate signed by an unknown CA: its chain does not lead to a root of this node's trust bundle (do both agents use the same root-cert.pem?)")]
    UnknownCa,
    #[error("certificate signed by an unknown CA: its issuer has the name of a trusted CA but not its key (two CAs created with the same name?); give both agents the same root-cert.pem")]
    CaMismatch,
    #[error("certificate expired at {not_after}: the peer's agent has not renewed it (is its CA reachable?), or the clocks disagree")]
    Expired { not_after: String },
    #[error("certificate is not valid before {not_before}: the clocks of the two nodes disagree")]
    NotYetValid { not_before: String },
    #[error("certificate rejected: {reason}")]
    BadCertificate { reason: String },
    #[error("the peer presented no certificate; mesh connections need one on both sides (has the peer's agent got a certificate for that workload yet?)")]
    NoPeerCertificate,
    #[error("the peer refused the connection: {reason}")]
    RefusedByPeer { reason: String },
    #[error("TLS handshake failed: {reason}")]
    Handshake { reason: String },
    #[error("cannot build the TLS configuration: {reason}")]
    Config { reason: String },
}

impl TlsError {
    /// A short, bounded name for metrics (`reason` of `warren_tls_handshake_errors_total`).
    pub fn reason_label(&self) -> &'static str {
        match self {
            TlsError::WrongServerIdentity { .. } => "wrong_identity",
            TlsError::NoSpiffeId { .. } => "no_spiffe_id",
            TlsError::WrongKeyUsage { .. } => "wrong_key_usage",
            TlsError::UnknownCa => "unknown_ca",
            TlsError::CaMismatch => "ca_mismatch",
            TlsError::Expired { .. } => "expired",
            TlsError::NotYetValid { .. } => "not_yet_valid",
            TlsError::BadCertificate { .. } => "bad_certificate",
            TlsError::NoPeerCertificate => "no_peer_certificate",
            TlsError::RefusedByPeer { .. } => "refused_by_peer",
            TlsError::Handshake { .. } => "protocol",
            TlsError::Config { .. } => "config",
        }
    }
}

/// The ring provider restricted to TLS 1.3's AES-GCM suites. Built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{cipher_suite, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// The config of the inbound tunnel (15008) of pods running as `local`.
///
/// Presents `manager.current(&local)` at each handshake (fetch it once first, or
/// handshakes fail until it exists). Requires a client certificate that chains to the
/// manager's trust bundle (read now: rebuild the config if the bundle changes), is valid
/// now, carries the clientAuth EKU and one SPIFFE ID. *Which* client identities are
/// allowed is policy, decided after the handshake with [`peer_identity`].
pub fn server_config(
    manager: Arc<SecretManager>,
    local: Identity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki =
        WebPkiClientVerifier::builder_with_provider(manager.trust_bundle(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config {
                reason: format!("client certificate verifier: {e} (is root-cert.pem empty?)"),
            })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(Arc::new(verify::SpiffeClientVerifier::new(webpki)))
        .with_cert_resolver(Arc::new(resolve::ServerCert::new(manager, local)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The config for connections of pods running as `source` to a server that must be
/// `expected_server` (secure naming).
///
/// Presents `manager.current(&source)`; accepts the server only if its chain leads to the
/// trust bundle, it is valid now, carries serverAuth, and its one SPIFFE ID equals
/// `expected_server`. The `ServerName` given to `TlsConnector::connect` is not checked:
/// pass the destination IP (`ServerName::IpAddress`), which sends no SNI. Build one config
/// per (source, expected server) pair and reuse it.
pub fn client_config(
    manager: Arc<SecretManager>,
    source: Identity,
    expected_server: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(
        manager.trust_bundle(),
        expected_server,
        provider.clone(),
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolve::ClientCert::new(manager, source)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer's leaf certificate, once the handshake is done. Pass the
/// connection of a tokio-rustls stream: `peer_identity(stream.get_ref().1)`.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    Identity::from_certificate(leaf).map_err(|e| TlsError::NoSpiffeId {
        role: Role::Peer,
        reason: e.to_string(),
    })
}

/// Why a TLS handshake (or the first read after it) failed, classified; `err` is what
/// tokio-rustls returned. TLS 1.3 clients send their certificate after they consider the
/// handshake done, so the server's refusal of it reaches the client on its first read.
pub fn classify_handshake_error(err: &io::Error) -> TlsError {
    let Some(inner) = err.get_ref() else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => TlsError::Handshake {
                reason: "the peer closed the connection during the handshake (is it an mTLS endpoint? did it refuse us without saying why?)".to_owned(),
            },
            _ => TlsError::Handshake {
                reason: err.to_string(),
            },
        };
    };
    if let Some(tls) = inner.downcast_ref::<TlsError>() {
        return tls.clone();
    }
    let Some(rustls_error) = inner.downcast_ref::<rustls::Error>() else {
        return TlsError::Handshake {
            reason: err.to_string(),
        };
    };
    match rustls_error {
        rustls::Error::InvalidCertificate(cert) => certificate_error(cert),
        rustls::Error::NoCertificatesPresented => TlsError::NoPeerCertificate,
        rustls::Error::AlertReceived(alert) => TlsError::RefusedByPeer {
            reason: alert_reason(*alert),
        },
        rustls::Error::NoApplicationProtocol => TlsError::Handshake {
            reason: "the peer does not speak ALPN h2 (is it an HBONE endpoint?)".to_owned(),
        },
        rustls::Error::PeerIncompatible(why) => TlsError::Handshake {
            reason: format!(
                "the peer is not compatible ({why:?}); warren speaks only TLS 1.3 with AES-GCM"
            ),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            TlsError::Handshake {
                reason: format!(
                    "the peer does not speak TLS as expected ({rustls_error}); is it a mesh mTLS endpoint?"
                ),
            }
        }
        rustls::Error::General(reason) if reason.contains("no server certificate") => {
            TlsError::Handshake {
                reason: "this agent has no certificate for the local identity yet (fetch it from the SecretManager first)".to_owned(),
            }
        }
        other => TlsError::Handshake {
            reason: other.to_string(),
        },
    }
}

/// [`classify_handshake_error`] as a log line.
pub fn describe_handshake_error(err: &io::Error) -> String {
    classify_handshake_error(err).to_string()
}

/// Our reading of a certificate error rustls or our verifiers produced.
fn certificate_error(err: &CertificateError) -> TlsError {
    let at = |t: &rustls_pki_types::UnixTime| {
        format_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()))
    };
    match err {
        CertificateError::UnknownIssuer => TlsError::UnknownCa,
        CertificateError::ExpiredContext { not_after, .. } => TlsError::Expired {
            not_after: at(not_after),
        },
        CertificateError::Expired => TlsError::Expired {
            not_after: "an earlier time".to_owned(),
        },
        CertificateError::NotValidYetContext { not_before, .. } => TlsError::NotYetValid {
            not_before: at(not_before),
        },
        CertificateError::NotValidYet => TlsError::NotYetValid {
            not_before: "a later time".to_owned(),
        },
        CertificateError::InvalidPurposeContext { required, .. } => match required {
            rustls::ExtendedKeyPurpose::ClientAuth => TlsError::WrongKeyUsage {
                role: Role::Client,
                eku: "clientAuth",
            },
            rustls::ExtendedKeyPurpose::ServerAuth => TlsError::WrongKeyUsage {
                role: Role::Server,
                eku: "serverAuth",
            },
            other => TlsError::BadCertificate {
                reason: format!("its extended key usage does not allow {other}"),
            },
        },
        // webpki reports this when a trusted CA has the issuer's name but another key,
        // which in a mesh means two CAs made with the same name far more often than forgery.
        CertificateError::BadSignature => TlsError::CaMismatch,
        CertificateError::Other(other) => match other.0.downcast_ref::<TlsError>() {
            Some(tls) => tls.clone(),
            None => TlsError::BadCertificate {
                reason: other.to_string(),
            },
        },
        other => TlsError::BadCertificate {
            reason: other.to_string(),
        },
    }
}

/// What an alert from the peer means for us: mostly, which check our certificate failed.
fn alert_reason(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::UnknownCA => {
            "it does not trust the CA that signed our certificate (do both agents use the same root-cert.pem?)".to_owned()
        }
        AlertDescription::CertificateExpired => {
            "it finds our certificate expired or not yet valid (is renewal failing? are the clocks right?)".to_owned()
        }
        AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
            "it rejected our certificate (for instance, not the SPIFFE ID it expected); its log says why".to_owned()
        }
        AlertDescription::UnsupportedCertificate => {
            "our certificate's extended key usage does not allow this use".to_owned()
        }
        AlertDescription::CertificateRequired => {
            "it requires a client certificate and we sent none (no certificate for our identity yet?)".to_owned()
        }
        AlertDescription::DecryptError => {
            "a signature did not verify: it trusts a CA with our CA's name but another key (two CAs created with the same name?)".to_owned()
        }
        AlertDescription::ProtocolVersion => "it does not speak TLS 1.3".to_owned(),
        AlertDescription::NoApplicationProtocol => "it does not speak ALPN h2".to_owned(),
        AlertDescription::HandshakeFailure => {
            "no common cipher suite, key exchange group or signature scheme".to_owned()
        }
        other => format!("alert {other:?}"),
    }
}

fn config_error(err: rustls::Error) -> TlsError {
    TlsError::Config {
        reason: err.to_string(),
    }
}
