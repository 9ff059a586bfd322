//! Workload identities (SPIFFE), the local CA, and certificates per service account.
//!
//! | concern | file |
//! |---------|------|
//! | a workload's SPIFFE ID, parsed strictly; reading it out of a certificate | [`spiffe`] |
//! | the CA: Istio plug-in CA files, signing CSRs for one SPIFFE ID each | [`ca`] |
//! | certificates per identity: keys made here, CSRs signed by the CA, renewed at half-life | [`manager`] |
//!
//! Keys never leave the node: the [`SecretManager`] makes an ECDSA P-256 key per
//! certificate and sends the CA only a CSR. Peers check the chain against the trust
//! bundle and the exact SPIFFE URI SAN (see `crate::tls`); nothing checks hostnames.
pub mod ca;
pub mod manager;
pub mod remote;
pub mod spiffe;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use ca::{CaClient, CaError, CertificateAuthority};
pub use manager::{CertificateInfo, SecretManager};
pub use spiffe::Identity;

/// Everything that can go wrong with an identity: parsing one, or getting a certificate
/// for it. `Clone` because one renewal failure is reported to every waiting caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("{input:?} is not a SPIFFE ID: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
    Malformed { input: String, reason: String },
    #[error("{part} {value:?} cannot be part of a SPIFFE ID: {reason}; fix the workload's {part} in the config")]
    InvalidPart {
        part: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot parse the certificate: {reason}")]
    UnreadableCertificate { reason: String },
    #[error("the certificate carries no SPIFFE ID (no URI subject alternative name); it was not issued for a mesh workload")]
    NoSpiffeId,
    #[error("the certificate carries {count} URI subject alternative names; a SPIFFE certificate carries exactly one")]
    SeveralUriSans { count: usize },
    #[error("cannot get a certificate for {identity}: {source}")]
    Ca {
        identity: Identity,
        #[source]
        source: Arc<CaError>,
    },
    #[error("cannot make a key and CSR for {identity}: {reason}")]
    Csr { identity: Identity, reason: String },
    #[error("the CA returned an unusable certificate for {identity}: {reason}")]
    BadIssuedCertificate { identity: Identity, reason: String },
    #[error("the certificate for {identity} expired at {not_after} and could not be renewed: {last_error}")]
    Expired {
        identity: Identity,
        not_after: String,
        last_error: String,
    },
    #[error("no certificate will come for {identity}: the identity was forgotten or the agent is shutting down")]
    Stopped { identity: Identity },
}

/// RFC 3339 in UTC, to the second: how expiries appear in logs and error messages.
pub(crate) fn format_time(at: SystemTime) -> String {
    let secs = match at.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (seconds since 1970)"))
}

/// An X.509 time (seconds since 1970) as a `SystemTime`.
pub(crate) fn system_time(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}
