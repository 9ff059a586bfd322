//! Proving a CA directory works before anything depends on it: a throwaway leaf is signed
//! with it and verified the way peers will verify leaves (webpki, against `root-cert.pem`,
//! with the intermediates of `cert-chain.pem`). A plug-in CA whose chain does not reach
//! its trust bundle would otherwise fail every handshake; this way it fails once, when
//! the CA is loaded, naming the file to fix. `warren ca check` prints what was found.
use std::{fmt, time::Duration};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{client::verify_server_cert_signed_by_trust_anchor, server::ParsedCertificate};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::{prelude::FromDer, public_key::PublicKey};

use super::{CaError, CertificateAuthority, CERT_CHAIN_FILE, ROOT_CERT_FILE};
use crate::identity::Identity;

/// The identity of the throwaway leaf; any would do, the CA signs whatever it is asked.
const CHECK_IDENTITY: (&str, &str, &str) = ("cluster.local", "warren-system", "ca-check");

impl CertificateAuthority {
    /// Sign a throwaway leaf and verify it against the trust bundle, as a peer would.
    pub(super) fn verify_issued_leaf(&self) -> Result<(), CaError> {
        let chain_file = self.dir.join(CERT_CHAIN_FILE);
        let unusable = |reason: String| CaError::BadFile {
            path: chain_file.clone(),
            reason,
        };
        let (trust_domain, namespace, account) = CHECK_IDENTITY;
        let identity = Identity::new(trust_domain, namespace, account)
            .map_err(|e| unusable(format!("cannot name the test leaf: {e}")))?;
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(CaError::Generate)?,
        )];
        let csr = params.serialize_request(&key).map_err(CaError::Generate)?;
        let chain = self.sign_csr(csr.der(), &identity, Duration::from_secs(300))?;

        let mut roots = rustls::RootCertStore::empty();
        for (n, root) in self.roots.iter().enumerate() {
            roots.add(root.clone()).map_err(|e| CaError::BadFile {
                path: self.dir.join(ROOT_CERT_FILE),
                reason: format!("certificate {} cannot be a trust anchor: {e}", n + 1),
            })?;
        }
        let leaf = ParsedCertificate::try_from(&chain[0])
            .map_err(|e| unusable(format!("the test leaf cannot be parsed: {e}")))?;
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &chain[1..],
            UnixTime::now(),
            algorithms,
        )
        .map_err(|e| {
            unusable(format!(
                "a certificate signed by this CA does not verify against {ROOT_CERT_FILE} ({e}); \
                 {CERT_CHAIN_FILE} must hold ca-cert.pem and every intermediate up to a root that \
                 {ROOT_CERT_FILE} holds"
            ))
        })
    }

    /// What this CA is made of, for `warren ca check`.
    pub fn summary(&self) -> CaSummary {
        CaSummary {
            dir: self.dir.display().to_string(),
            signing_ca: describe(&self.ca_cert),
            intermediates: self.intermediates.len(),
            roots: self.roots.iter().map(describe).collect(),
        }
    }
}

/// A CA directory as `warren ca check` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSummary {
    pub dir: String,
    pub signing_ca: String,
    /// Certificates sent after each leaf (besides the leaf).
    pub intermediates: usize,
    pub roots: Vec<String>,
}

impl fmt::Display for CaSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the CA in {} can sign workload certificates:", self.dir)?;
        writeln!(f, "  signing CA:   {}", self.signing_ca)?;
        writeln!(
            f,
            "  sent with each leaf: {} intermediate certificate(s)",
            self.intermediates
        )?;
        writeln!(f, "  trust bundle: {} root(s)", self.roots.len())?;
        for root in &self.roots {
            writeln!(f, "    - {root}")?;
        }
        writeln!(
            f,
            "  a test leaf it signed verifies against the trust bundle"
        )
    }
}

/// `subject (key), valid until …` of a certificate.
fn describe(cert: &CertificateDer<'_>) -> String {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(cert) else {
        return "(a certificate that cannot be parsed)".to_owned();
    };
    let subject = cert.subject().to_string();
    let subject = if subject.is_empty() {
        "(no subject)".to_owned()
    } else {
        subject
    };
    let spki = cert.public_key();
    let key = match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA-{}", rsa.key_size()),
        Ok(PublicKey::EC(point)) => match point.key_size() {
            256 => "ECDSA P-256".to_owned(),
            384 => "ECDSA P-384".to_owned(),
            bits => format!("ECDSA {bits}-bit"),
        },
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".to_owned(),
        _ => format!("key {}", spki.algorithm.algorithm.to_id_string()),
    };
    let until = crate::identity::format_time(cert.validity().not_after.to_datetime().into());
    format!("{subject} ({key}), valid until {until}")
}
