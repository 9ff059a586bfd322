//! Verifying the peer: webpki for the chain (trust bundle, validity, signatures), then
//! what webpki leaves to us: the EKU must be *present* (webpki accepts a certificate with
//! no EKU extension at all), and the leaf must carry one SPIFFE ID, which for a server
//! must be the expected one (secure naming).
//!
//! Standard failures stay rustls `CertificateError`s so the peer receives the matching
//! alert (unknown CA, certificate expired); ours travel as `CertificateError::Other`
//! carrying a [`TlsError`], which `classify_handshake_error` unwraps.
use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, ExtendedKeyPurpose, OtherError,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::FromDer;

use super::{Role, TlsError};
use crate::identity::Identity;

/// Checks a server against the trust bundle and `expected` (secure naming).
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        expected: Identity,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // A dummy: servers are named by their SPIFFE ID, not a hostname.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = check_leaf(end_entity, Role::Server)?;
        if presented != self.expected {
            return Err(reject(TlsError::WrongServerIdentity {
                presented,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// rustls's webpki client verifier, plus the EKU presence and SPIFFE ID checks.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl SpiffeClientVerifier {
    pub(super) fn new(webpki: Arc<dyn ClientCertVerifier>) -> Self {
        Self { webpki }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        check_leaf(end_entity, Role::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The leaf's EKU must list the purpose of `role`, and the leaf must carry one SPIFFE ID,
/// which is returned. Runs after webpki has accepted the chain.
fn check_leaf(end_entity: &CertificateDer<'_>, role: Role) -> Result<Identity, rustls::Error> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(end_entity)
        .map_err(|_| CertificateError::BadEncoding)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|_| CertificateError::BadEncoding)?;
    let (required, allowed) = match role {
        Role::Server => (
            ExtendedKeyPurpose::ServerAuth,
            eku.as_ref().is_some_and(|e| e.value.server_auth),
        ),
        Role::Client | Role::Peer => (
            ExtendedKeyPurpose::ClientAuth,
            eku.as_ref().is_some_and(|e| e.value.client_auth),
        ),
    };
    if !allowed {
        let mut presented = Vec::new();
        if let Some(eku) = &eku {
            if eku.value.server_auth {
                presented.push(ExtendedKeyPurpose::ServerAuth);
            }
            if eku.value.client_auth {
                presented.push(ExtendedKeyPurpose::ClientAuth);
            }
        }
        return Err(CertificateError::InvalidPurposeContext {
            required,
            presented,
        }
        .into());
    }
    Identity::from_certificate(end_entity).map_err(|e| {
        reject(TlsError::NoSpiffeId {
            role,
            reason: e.to_string(),
        })
    })
}

/// A refusal of ours, carried through rustls to whoever drives the handshake.
fn reject(error: TlsError) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(error))).into()
}
