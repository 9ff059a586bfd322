//! The CA that signs workload certificates, and the trait the [`SecretManager`] asks it
//! through.
//!
//! The local CA keeps its files in **Istio's plug-in CA layout**, so an operator can give
//! warren the same root (or an intermediate under it) as an Istio mesh:
//!
//! | file             | holds                                                          |
//! |------------------|----------------------------------------------------------------|
//! | `root-cert.pem`  | the trust bundle: every root peers may chain to               |
//! | `ca-cert.pem`    | the signing CA's certificate (the root itself after `init`)   |
//! | `ca-key.pem`     | the signing CA's private key, PKCS#8, mode 0600               |
//! | `cert-chain.pem` | `ca-cert.pem` then its intermediates up to the root           |
//!
//! Signing keys may be ECDSA (P-256, P-384), Ed25519 or RSA, in PKCS#8 or the older
//! PKCS#1 (RSA) and SEC1 (EC) forms Istio's `cacerts` often hold; `init` makes ECDSA
//! P-256. Loading signs a throwaway leaf and verifies it against `root-cert.pem`, so a
//! chain that does not reach the trust bundle is refused at once (`check`). The CA signs whatever identity it is asked for, provided the CSR asks for exactly
//! that identity: deciding *who may have* an identity (Kubernetes TokenReview, pods on the
//! caller's node) belongs to the `warren ca` service in front of it.
//!
//! [`SecretManager`]: super::SecretManager
use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use super::{spiffe::check_trust_domain, Identity};

mod check;
mod key;
pub use check::CaSummary;

/// The trust bundle: every root certificate peers may chain to.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing CA's certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing CA's private key (PKCS#8 PEM).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The signing CA's certificate followed by its intermediates, up to the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
const ALL_FILES: [&str; 4] = [ROOT_CERT_FILE, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE];

/// How long a root made by [`CertificateAuthority::init`] lives: 10 years.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How far back `notBefore` is set, so that a peer whose clock is a little behind the
/// CA's still accepts a certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What the identity manager needs from a CA.
///
/// Synchronous: the local CA signs in about a millisecond. A CA reached over the network
/// may block in `sign`; the [`SecretManager`](super::SecretManager) always calls it from
/// tokio's blocking pool, never on a runtime worker, so blocking here is allowed.
pub trait CaClient: Send + Sync {
    /// Sign `csr_der` (PKCS#10, DER) for `identity`, valid from now for `lifetime`.
    /// Returns the chain leaf first, without the root.
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError>;

    /// The trust bundle: the roots that certificates of this mesh chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{dir} already holds a CA ({file} exists); remove it or use another --dir")]
    AlreadyExists { dir: PathBuf, file: &'static str },
    #[error("trust domain {trust_domain:?} is not valid: {reason}")]
    TrustDomain {
        trust_domain: String,
        reason: String,
    },
    #[error("cannot create the CA directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}; a CA directory holds root-cert.pem, ca-cert.pem, ca-key.pem and cert-chain.pem (Istio's plug-in CA layout); create one with `warren ca init --dir DIR`, or point --ca-dir at an existing one")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("cannot make the CA's key or certificate: {0}")]
    Generate(rcgen::Error),
    #[error("the system random number generator failed; cannot make a certificate serial number")]
    Random,
    #[error("refusing to sign a certificate with a lifetime of {lifetime:?}: {reason}")]
    Lifetime { lifetime: Duration, reason: String },
    #[error("refusing to sign for {identity}: the CSR {reason}")]
    BadCsr { identity: Identity, reason: String },
    #[error("refusing to sign for {identity}: the CSR asks for {requested}; it must ask for exactly that SPIFFE ID as its only subject alternative name")]
    WrongIdentity {
        identity: Identity,
        requested: String,
    },
    #[error("cannot sign the certificate for {identity}: {source}")]
    Sign {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("cannot reach the CA: {0}")]
    Unavailable(String),
}

/// A CA whose key is on this machine, read from a directory in Istio's plug-in CA layout.
pub struct CertificateAuthority {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// `ca-cert.pem`, for describing the CA.
    ca_cert: CertificateDer<'static>,
    /// When `ca-cert.pem` expires: no leaf outlives it.
    not_after: OffsetDateTime,
    /// Sent after the leaf: `cert-chain.pem` without the roots.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Create a new self-signed root for `trust_domain` in `dir` (created if missing, mode
    /// 0700): ECDSA P-256, 10 years, CA:true. The root is also the signing CA, so
    /// `ca-cert.pem` and `cert-chain.pem` repeat `root-cert.pem`. Refuses to touch a
    /// directory that already holds any of the four files.
    pub fn init(dir: impl AsRef<Path>, trust_domain: &str) -> Result<(), CaError> {
        let dir = dir.as_ref();
        check_trust_domain(trust_domain).map_err(|reason| CaError::TrustDomain {
            trust_domain: trust_domain.to_owned(),
            reason,
        })?;
        for file in ALL_FILES {
            // symlink_metadata: a dangling symlink counts as "exists" too.
            if fs::symlink_metadata(dir.join(file)).is_ok() {
                return Err(CaError::AlreadyExists {
                    dir: dir.to_owned(),
                    file,
                });
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::CreateDir {
                dir: dir.to_owned(),
                source,
            })?;

        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // A name of its own: webpki picks trust anchors by name, and a peer trusting
        // another root of the same name would report a bad signature, not an unknown CA.
        let serial = random_serial()?;
        let short_id: String = serial.to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("warren root CA {short_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert_pem = cert.pem();

        let files = [
            (CA_KEY_FILE, key.serialize_pem(), 0o600),
            (ROOT_CERT_FILE, cert_pem.clone(), 0o644),
            (CA_CERT_FILE, cert_pem.clone(), 0o644),
            (CERT_CHAIN_FILE, cert_pem, 0o644),
        ];
        let mut written = Vec::with_capacity(files.len());
        for (file, contents, mode) in files {
            let path = dir.join(file);
            if let Err(source) = write_new(&path, contents.as_bytes(), mode) {
                // Leave no half-made CA behind: a second `init` would refuse it.
                for done in written {
                    let _ = fs::remove_file(done);
                }
                return Err(CaError::Write { path, source });
            }
            written.push(path);
        }
        Ok(())
    }

    /// Read the CA in `dir`. Checks that the key belongs to `ca-cert.pem`, that it is a CA
    /// certificate valid now, that `cert-chain.pem` starts with it, and that a leaf it
    /// signs verifies against `root-cert.pem` as peers will verify it.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, CaError> {
        let dir = dir.as_ref();
        let roots = read_certificates(&dir.join(ROOT_CERT_FILE))?;
        let ca_path = dir.join(CA_CERT_FILE);
        let ca_certs = read_certificates(&ca_path)?;
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let chain = read_certificates(&chain_path)?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = key::read_key(&key_path)?;

        let bad = |path: &Path, reason: String| CaError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let [ca_cert] = &ca_certs[..] else {
            return Err(bad(
                &ca_path,
                format!(
                    "holds {} certificates; it must hold only the signing CA's own certificate (intermediates go in {CERT_CHAIN_FILE})",
                    ca_certs.len()
                ),
            ));
        };
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(ca_cert)
            .map_err(|e| bad(&ca_path, format!("cannot parse the certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad(
                &ca_path,
                "is not a CA certificate (basicConstraints CA:TRUE is missing)".to_owned(),
            ));
        }
        if let Ok(Some(usage)) = parsed.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(bad(
                    &ca_path,
                    "may not sign certificates (its key usage lacks keyCertSign)".to_owned(),
                ));
            }
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(bad(
                &key_path,
                format!("this key does not belong to the certificate in {CA_CERT_FILE}; put the matching pair in the directory"),
            ));
        }
        let not_before = parsed.validity().not_before.to_datetime();
        let not_after = parsed.validity().not_after.to_datetime();
        let now = OffsetDateTime::now_utc();
        if now > not_after {
            return Err(bad(
                &ca_path,
                format!(
                    "the CA certificate expired at {}; install a new CA",
                    super::format_time(not_after.into())
                ),
            ));
        }
        if now < not_before {
            return Err(bad(
                &ca_path,
                format!(
                    "the CA certificate is not valid before {}; check this machine's clock",
                    super::format_time(not_before.into())
                ),
            ));
        }
        if chain.first() != Some(ca_cert) {
            return Err(bad(
                &chain_path,
                format!("must start with the certificate in {CA_CERT_FILE}"),
            ));
        }
        let intermediates = chain
            .iter()
            .filter(|cert| !roots.contains(cert))
            .cloned()
            .collect();
        let issuer = Issuer::from_ca_cert_der(ca_cert, key)
            .map_err(|e| bad(&ca_path, format!("cannot use it to sign: {e}")))?;
        let ca = Self {
            dir: dir.to_owned(),
            issuer,
            ca_cert: ca_cert.clone(),
            not_after,
            intermediates,
            roots,
        };
        ca.verify_issued_leaf()?;
        Ok(ca)
    }

    /// The directory this CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust bundle: every certificate in `root-cert.pem`.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    /// Sign a CSR for `identity`; the chain comes back leaf first, then the intermediates
    /// of `cert-chain.pem` (nothing more when the signing CA is the root).
    ///
    /// The CSR must be validly self-signed and ask for exactly one subject alternative
    /// name, the URI of `identity`. Nothing else is taken from it: the leaf has no
    /// subject, that URI SAN, serverAuth + clientAuth, digitalSignature, and is valid from
    /// one minute ago (clock skew) until `lifetime` from now, capped at the CA's expiry.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if lifetime.is_zero() {
            return Err(CaError::Lifetime {
                lifetime,
                reason: "it must be positive".to_owned(),
            });
        }
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::BadCsr {
                    identity: identity.clone(),
                    reason: match e {
                        rcgen::Error::InvalidCertificationRequestSignature => {
                            "signature does not verify with the key it carries".to_owned()
                        }
                        rcgen::Error::UnsupportedExtension => {
                            "requests an extension warren does not sign (only a URI subject alternative name is accepted)"
                                .to_owned()
                        }
                        other => format!("cannot be parsed: {other}"),
                    },
                })?;
        let wanted = identity.to_string();
        match &csr.params.subject_alt_names[..] {
            [SanType::URI(uri)] if uri.as_str() == wanted => {}
            [] => {
                return Err(CaError::WrongIdentity {
                    identity: identity.clone(),
                    requested: "no subject alternative name".to_owned(),
                })
            }
            requested => {
                return Err(CaError::WrongIdentity {
                    identity: identity.clone(),
                    requested: requested
                        .iter()
                        .map(describe_san)
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        }

        let now = OffsetDateTime::now_utc();
        let not_after = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|lifetime| now.checked_add(lifetime))
            .map_or(self.not_after, |end| end.min(self.not_after));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(wanted.try_into().map_err(|e| {
            CaError::Sign {
                identity: identity.clone(),
                source: e,
            }
        })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|source| CaError::Sign {
                identity: identity.clone(),
                source,
            })?;

        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(leaf.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        Ok(chain)
    }

    /// A TLS server certificate for `dns_names` (a service of the mesh's control plane,
    /// such as `warren ca serve` itself), with a new P-256 key: the chain leaf first
    /// (then the intermediates), and the key.
    pub fn issue_server_certificate(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        CaError,
    > {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(CaError::Generate)?;
        let now = OffsetDateTime::now_utc();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|lifetime| now.checked_add(lifetime))
            .map_or(self.not_after, |end| end.min(self.not_after));
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().clone());
        chain.extend(self.intermediates.iter().cloned());
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((chain, key))
    }
}

impl CaClient for CertificateAuthority {
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.sign_csr(csr_der, identity, lifetime)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// 128 random bits, positive and minimally encoded (first byte 0x40..=0x7f).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => uri.as_str().to_owned(),
        SanType::DnsName(name) => format!("DNS name {}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP address {ip}"),
        SanType::Rfc822Name(mail) => format!("email {}", mail.as_str()),
        other => format!("{other:?}"),
    }
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadFile {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_owned(),
            reason: "holds no PEM certificate".to_owned(),
        });
    }
    Ok(certs)
}

/// A CA as an operator would plug in from Istio: an ECDSA P-384 root kept elsewhere, and
/// an RSA intermediate (a fixed test key: ring cannot generate RSA keys) that signs.
/// Returns the directory, the loaded CA and the intermediate's certificate.
#[cfg(test)]
pub(crate) fn plugged_in_ca() -> (
    tempfile::TempDir,
    CertificateAuthority,
    CertificateDer<'static>,
) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = DistinguishedName::new();
    root_params
        .distinguished_name
        .push(DnType::OrganizationName, "cluster.local");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, &root_key);

    let ca_key = KeyPair::from_pem(include_str!("testdata/rsa-2048-test-only.pem")).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "intermediate");
    let ca_cert = ca_params.signed_by(&ca_key, &root_issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, contents: String| fs::write(dir.path().join(file), contents).unwrap();
    write(ROOT_CERT_FILE, root.pem());
    write(CA_CERT_FILE, ca_cert.pem());
    write(CERT_CHAIN_FILE, format!("{}{}", ca_cert.pem(), root.pem()));
    write(CA_KEY_FILE, ca_key.serialize_pem());
    let ca = CertificateAuthority::load(dir.path()).unwrap();
    (dir, ca, ca_cert.der().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(super) fn identity(sa: &str) -> Identity {
        Identity::new("cluster.local", "demo", sa).unwrap()
    }

    pub(super) fn csr_for(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    pub(super) fn uri(id: &Identity) -> SanType {
        SanType::URI(id.to_string().try_into().unwrap())
    }

    fn new_ca() -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        (dir, ca)
    }

    #[test]
    fn init_writes_istio_layout() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("nested/ca");
        CertificateAuthority::init(&ca_dir, "cluster.local").unwrap();
        let read = |f: &str| fs::read_to_string(ca_dir.join(f)).unwrap();
        assert_eq!(read(ROOT_CERT_FILE), read(CA_CERT_FILE));
        assert_eq!(read(CERT_CHAIN_FILE), read(CA_CERT_FILE));
        assert!(read(CA_KEY_FILE).starts_with("-----BEGIN PRIVATE KEY-----"));
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let ca = CertificateAuthority::load(&ca_dir).unwrap();
        let roots = ca.roots();
        assert_eq!(roots.len(), 1);
        let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
        assert!(root.is_ca());
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        let lifetime =
            root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(lifetime >= ROOT_LIFETIME.as_secs() as i64);
        assert!(root.subject().to_string().contains("O=cluster.local"));
    }

    #[test]
    fn init_refuses_existing_ca_and_bad_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::init(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(err, CaError::AlreadyExists { .. }));
        let message = err.to_string();
        assert!(
            message.contains("already holds a CA")
                && message.contains("remove it or use another --dir"),
            "{message}"
        );
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);

        let other = tempfile::tempdir().unwrap();
        let err = CertificateAuthority::init(other.path(), "Bad/Domain").unwrap_err();
        assert!(matches!(err, CaError::TrustDomain { .. }), "{err}");
        assert!(fs::read_dir(other.path()).unwrap().next().is_none());
    }

    #[test]
    fn load_names_the_missing_or_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nothing-here");
        let err = CertificateAuthority::load(&missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing-here/root-cert.pem"), "{err}");

        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca-key.pem"), "{err}");

        // A key that is not the CA certificate's.
        let stranger = KeyPair::generate().unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), stranger.serialize_pem()).unwrap();
        let err = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca-key.pem") && err.contains("does not belong"),
            "{err}"
        );

        fs::write(dir.path().join(CERT_CHAIN_FILE), "garbage").unwrap();
        let err = CertificateAuthority::load(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert-chain.pem"), "{err}");
    }

    #[test]
    fn sign_csr_issues_a_spiffe_leaf() {
        let (_dir, ca) = new_ca();
        let id = identity("server");
        let chain = ca
            .sign_csr(&csr_for(vec![uri(&id)]), &id, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            chain.len(),
            1,
            "the root is the signing CA: no intermediates"
        );
        assert_eq!(Identity::from_certificate(&chain[0]).unwrap(), id);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert!(!leaf.is_ca());
        assert!(leaf.subject().as_raw().len() <= 2, "empty subject");
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        assert!(
            (now - 62..=now - 58).contains(&not_before),
            "{not_before} vs {now}"
        );
        assert!(
            (now + 3598..=now + 3601).contains(&not_after),
            "{not_after} vs {now}"
        );
        let roots = ca.roots();
        let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
        assert_eq!(leaf.issuer(), root.subject());

        // As short as one second, for tests of expiry and renewal.
        let chain = ca
            .sign_csr(&csr_for(vec![uri(&id)]), &id, Duration::from_secs(1))
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert!(leaf.validity().not_after.timestamp() <= now + 2);
    }

    #[test]
    fn sign_csr_refuses_another_identity() {
        let (_dir, ca) = new_ca();
        let id = identity("server");
        let other = identity("admin");
        let err = ca
            .sign_csr(&csr_for(vec![uri(&other)]), &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::WrongIdentity { .. }));
        let message = err.to_string();
        assert!(
            message.contains("spiffe://cluster.local/ns/demo/sa/admin")
                && message
                    .contains("refusing to sign for spiffe://cluster.local/ns/demo/sa/server"),
            "{message}"
        );

        let extra = SanType::DnsName("server.demo".try_into().unwrap());
        let err = ca
            .sign_csr(
                &csr_for(vec![uri(&id), extra]),
                &id,
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(err.to_string().contains("DNS name server.demo"), "{err}");

        let err = ca
            .sign_csr(&csr_for(vec![]), &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string().contains("no subject alternative name"),
            "{err}"
        );

        let err = ca
            .sign_csr(b"not a csr", &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr { .. }), "{err}");

        let err = ca
            .sign_csr(&csr_for(vec![uri(&id)]), &id, Duration::ZERO)
            .unwrap_err();
        assert!(matches!(err, CaError::Lifetime { .. }), "{err}");
    }

    #[test]
    fn sign_csr_rejects_a_forged_signature() {
        let (_dir, ca) = new_ca();
        let id = identity("server");
        let mut csr = csr_for(vec![uri(&id)]);
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        let err = ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, CaError::BadCsr { .. }), "{err}");
    }

    #[test]
    fn intermediate_ca_with_rsa_key() {
        let (_dir, ca, intermediate) = plugged_in_ca();
        let id = identity("server");
        let chain = ca
            .sign_csr(&csr_for(vec![uri(&id)]), &id, Duration::from_secs(60))
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf then the intermediate, never the root");
        assert_eq!(chain[1], intermediate);
        assert_eq!(ca.roots().len(), 1);
        assert_ne!(ca.roots()[0], intermediate);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA
        );
    }
}
