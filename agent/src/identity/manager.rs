//! Certificates per identity, made on first use and renewed at half-life (ztunnel's
//! `SecretManager`).
//!
//! Each identity in use has a worker task: it makes an ECDSA P-256 key on this node, sends
//! the CA a CSR for the identity's SPIFFE ID, publishes the certificate, sleeps until half
//! the certificate's remaining life, and starts again. A failed attempt is retried with
//! backoff (0.5 s doubling to 30 s) while the current certificate keeps being served.
//!
//! Publishing a new certificate swaps an `Arc`: TLS sessions already established keep
//! the keys they negotiated and are not disturbed; the next handshake reads the new one
//! through [`SecretManager::current`].
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{sign::CertifiedKey, InconsistentKeys, RootCertStore};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{sync::watch, task::AbortHandle};
use x509_parser::prelude::FromDer;

use super::{format_time, system_time, CaClient, Identity, IdentityError};

/// First retry delay after a failed signing; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The certificates of the identities this node's pods run as.
///
/// Shared as `Arc<SecretManager>` by the proxies and the TLS resolvers. Needs a tokio
/// runtime: the first [`fetch`](Self::fetch) of an identity spawns its worker there.
/// Dropping the last `Arc` stops every worker.
pub struct SecretManager {
    me: Weak<SecretManager>,
    ca: Arc<dyn CaClient>,
    lifetime: Duration,
    trust_bundle: Arc<RootCertStore>,
    slots: Mutex<HashMap<Identity, Slot>>,
}

/// One identity: what its worker last published, and the worker.
struct Slot {
    status: watch::Receiver<Status>,
    /// `None` only for certificates installed by tests.
    worker: Option<AbortHandle>,
}

#[derive(Clone, Default)]
struct Status {
    issued: Option<Issued>,
    /// Why the last attempt failed, until one succeeds.
    last_error: Option<IdentityError>,
}

#[derive(Clone)]
struct Issued {
    key: Arc<CertifiedKey>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

/// What the manager holds for one identity, for config dumps. Never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub identity: Identity,
    /// The leaf's serial number, hex bytes separated by `:`.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the worker will ask for the next certificate.
    pub renew_at: SystemTime,
    /// Why the last renewal failed, while it keeps failing.
    pub last_error: Option<String>,
}

impl SecretManager {
    /// A manager whose certificates come from `ca` and live `lifetime` (24 h in
    /// production). The trust bundle is read from `ca` once, here.
    pub fn new(ca: Arc<dyn CaClient>, lifetime: Duration) -> Arc<Self> {
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(ca.roots());
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "{ignored} certificates of the trust bundle cannot be used as roots and were skipped"
            );
        }
        if added == 0 {
            tracing::warn!(
                "the trust bundle is empty: every mTLS handshake will fail; check root-cert.pem"
            );
        }
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ca,
            lifetime,
            trust_bundle: Arc::new(roots),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate and key for `identity`. The first call for an identity waits for
    /// the CA (a key, a CSR, a signature: about a millisecond with the local CA, done on
    /// the blocking pool) and starts renewing it in the background; later calls return
    /// the cached certificate at the cost of a mutex lock. Concurrent first calls share
    /// one signing.
    ///
    /// Fails with the CA's reason when there is no valid certificate; the worker keeps
    /// retrying meanwhile, so a later call may succeed. Waits as long as the CA takes to
    /// answer the first time: wrap it in a timeout if the CA can hang.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<CertifiedKey>, IdentityError> {
        let mut status = self.subscribe(identity);
        loop {
            if let Some(outcome) = status.borrow_and_update().outcome(identity) {
                return outcome;
            }
            if status.changed().await.is_err() {
                return Err(IdentityError::Stopped {
                    identity: identity.clone(),
                });
            }
        }
    }

    /// The latest certificate for `identity`, without I/O: what TLS resolvers present at
    /// each handshake. `None` until the first [`fetch`](Self::fetch) has succeeded.
    ///
    /// It may have expired when renewal kept failing: presenting it anyway lets the peer
    /// refuse it with "certificate expired at …", which says more than no certificate.
    pub fn current(&self, identity: &Identity) -> Option<Arc<CertifiedKey>> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.get(identity)?;
        let status = slot.status.borrow();
        status.issued.as_ref().map(|issued| issued.key.clone())
    }

    /// The roots peers' certificates must chain to.
    pub fn trust_bundle(&self) -> Arc<RootCertStore> {
        self.trust_bundle.clone()
    }

    /// Every identity with a certificate, sorted, for config dumps. Keys are never shown.
    pub fn certificates(&self) -> Vec<CertificateInfo> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut infos: Vec<CertificateInfo> = slots
            .iter()
            .filter_map(|(identity, slot)| {
                let status = slot.status.borrow();
                let issued = status.issued.as_ref()?;
                Some(CertificateInfo {
                    identity: identity.clone(),
                    serial: issued.serial.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    renew_at: issued.renew_at,
                    last_error: status.last_error.as_ref().map(ToString::to_string),
                })
            })
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// Stop renewing `identity` and drop its certificate, when no local pod runs as it
    /// any more. Open connections keep their sessions. Returns whether it was known.
    pub fn forget(&self, identity: &Identity) -> bool {
        let removed = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(identity);
        match removed {
            Some(slot) => {
                if let Some(worker) = slot.worker {
                    worker.abort();
                }
                tracing::info!(identity = %identity, "stopped renewing the certificate: no local workload uses it");
                true
            }
            None => false,
        }
    }

    /// The status channel of `identity`, starting its worker if it has none.
    fn subscribe(&self, identity: &Identity) -> watch::Receiver<Status> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(identity) {
            return slot.status.clone();
        }
        let (tx, rx) = watch::channel(Status::default());
        let worker = tokio::spawn(keep_renewed(self.me.clone(), identity.clone(), tx));
        slots.insert(
            identity.clone(),
            Slot {
                status: rx.clone(),
                worker: Some(worker.abort_handle()),
            },
        );
        rx
    }

    /// Serve `key` for `identity` as if the CA had issued it, with no worker: lets TLS
    /// tests present certificates the CA would never sign (expired, wrong usage).
    #[cfg(test)]
    pub(crate) fn install(&self, identity: Identity, key: CertifiedKey) {
        let leaf = key.cert.first().expect("a chain with a leaf");
        let (_, parsed) =
            x509_parser::certificate::X509Certificate::from_der(leaf).expect("a valid leaf");
        let not_after = system_time(parsed.validity().not_after.timestamp());
        let not_before = system_time(parsed.validity().not_before.timestamp());
        let serial = parsed.raw_serial_as_string();
        let issued = Issued {
            key: Arc::new(key),
            serial,
            not_before,
            not_after,
            renew_at: not_after,
        };
        let (_tx, rx) = watch::channel(Status {
            issued: Some(issued),
            last_error: None,
        });
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                identity,
                Slot {
                    status: rx,
                    worker: None,
                },
            );
    }
}

impl Drop for SecretManager {
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(PoisonError::into_inner);
        for slot in slots.values() {
            if let Some(worker) = &slot.worker {
                worker.abort();
            }
        }
    }
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let identities = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("SecretManager")
            .field("lifetime", &self.lifetime)
            .field("identities", &identities)
            .field("roots", &self.trust_bundle.len())
            .finish_non_exhaustive()
    }
}

impl Status {
    /// What `fetch` answers now, or `None` to wait for the worker.
    fn outcome(&self, identity: &Identity) -> Option<Result<Arc<CertifiedKey>, IdentityError>> {
        match (&self.issued, &self.last_error) {
            (Some(issued), _) if SystemTime::now() < issued.not_after => {
                Some(Ok(issued.key.clone()))
            }
            (Some(issued), Some(error)) => Some(Err(IdentityError::Expired {
                identity: identity.clone(),
                not_after: format_time(issued.not_after),
                last_error: error.to_string(),
            })),
            (None, Some(error)) => Some(Err(error.clone())),
            // First issuance, or a renewal under way for an expired certificate.
            (_, None) => None,
        }
    }
}

/// The worker of one identity: issue, sleep to half-life, issue again; back off on
/// failure. Holds only a weak reference so that it ends with the manager.
async fn keep_renewed(
    manager: Weak<SecretManager>,
    identity: Identity,
    status: watch::Sender<Status>,
) {
    let mut failures: u32 = 0;
    loop {
        let Some((ca, lifetime)) = manager.upgrade().map(|m| (m.ca.clone(), m.lifetime)) else {
            return;
        };
        let id = identity.clone();
        // The CA call may block (a network CA): keep it off the runtime's workers.
        let attempt = tokio::task::spawn_blocking(move || issue(ca.as_ref(), &id, lifetime))
            .await
            .unwrap_or_else(|e| {
                Err(IdentityError::Csr {
                    identity: identity.clone(),
                    reason: format!("the signing task failed: {e}"),
                })
            });
        let wait = match attempt {
            Ok(issued) => {
                failures = 0;
                let renewed = status.borrow().issued.is_some();
                tracing::info!(
                    identity = %identity,
                    expiry = %format_time(issued.not_after),
                    serial = %issued.serial,
                    "{}",
                    if renewed { "renewed certificate" } else { "issued certificate" }
                );
                let wait = issued
                    .renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                status.send_replace(Status {
                    issued: Some(issued),
                    last_error: None,
                });
                wait
            }
            Err(error) => {
                let delay = retry_delay(failures);
                failures = failures.saturating_add(1);
                let valid_until = status
                    .borrow()
                    .issued
                    .as_ref()
                    .map(|issued| issued.not_after)
                    .filter(|not_after| SystemTime::now() < *not_after);
                match valid_until {
                    Some(not_after) => tracing::warn!(
                        identity = %identity,
                        retry_in = ?delay,
                        "certificate renewal failed: {error}; still serving the current certificate, valid until {}",
                        format_time(not_after)
                    ),
                    None => tracing::warn!(
                        identity = %identity,
                        retry_in = ?delay,
                        "no certificate: {error}"
                    ),
                }
                status.send_modify(|s| s.last_error = Some(error));
                delay
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn retry_delay(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(MAX_RETRY)
}

/// One issuance: a fresh key, a CSR for `identity`, the CA's signature, and checks that
/// what came back is a usable certificate for that identity and key.
fn issue(
    ca: &dyn CaClient,
    identity: &Identity,
    lifetime: Duration,
) -> Result<Issued, IdentityError> {
    let csr_error = |reason: String| IdentityError::Csr {
        identity: identity.clone(),
        reason,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| csr_error(format!("key generation failed: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|e| csr_error(format!("{e}")))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| csr_error(e.to_string()))?;

    let chain = ca
        .sign(csr.der(), identity, lifetime)
        .map_err(|e| IdentityError::Ca {
            identity: identity.clone(),
            source: Arc::new(e),
        })?;

    let bad = |reason: String| IdentityError::BadIssuedCertificate {
        identity: identity.clone(),
        reason,
    };
    let leaf = chain
        .first()
        .ok_or_else(|| bad("the chain is empty".to_owned()))?;
    let issued_for = Identity::from_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    if &issued_for != identity {
        return Err(bad(format!("it is for {issued_for}")));
    }
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| bad(format!("cannot parse it: {e}")))?;
    let not_before = system_time(parsed.validity().not_before.timestamp());
    let not_after = system_time(parsed.validity().not_after.timestamp());
    let serial = parsed.raw_serial_as_string();
    let now = SystemTime::now();
    let remaining = not_after.duration_since(now).map_err(|_| {
        bad(format!(
            "it expired at {}, before it arrived; check the clocks of this node and of the CA",
            format_time(not_after)
        ))
    })?;

    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&private)
        .map_err(|e| csr_error(format!("rustls cannot use the key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(bad(format!("it does not carry the key of our CSR ({e})"))),
    }
    Ok(Issued {
        key: Arc::new(certified),
        serial,
        not_before,
        not_after,
        renew_at: now + remaining / 2,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::identity::{CaError, CertificateAuthority};

    /// A local CA that counts its signings and can be made to fail, or to sign for
    /// another identity than asked.
    pub(crate) struct TestCa {
        pub ca: CertificateAuthority,
        pub signed: AtomicUsize,
        pub failing: AtomicBool,
        pub impostor: Mutex<Option<Identity>>,
        _dir: tempfile::TempDir,
    }

    impl TestCa {
        pub(crate) fn new() -> Arc<Self> {
            let dir = tempfile::tempdir().unwrap();
            CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
            Arc::new(Self {
                ca: CertificateAuthority::load(dir.path()).unwrap(),
                signed: AtomicUsize::new(0),
                failing: AtomicBool::new(false),
                impostor: Mutex::new(None),
                _dir: dir,
            })
        }
    }

    impl CaClient for TestCa {
        fn sign(
            &self,
            csr_der: &[u8],
            identity: &Identity,
            lifetime: Duration,
        ) -> Result<Vec<CertificateDer<'static>>, CaError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(CaError::Unavailable("test CA is down".to_owned()));
            }
            self.signed.fetch_add(1, Ordering::SeqCst);
            if let Some(other) = self.impostor.lock().unwrap().clone() {
                // Sign a CSR of our own for the other identity.
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::default();
                params.subject_alt_names =
                    vec![SanType::URI(other.to_string().try_into().unwrap())];
                let csr = params.serialize_request(&key).unwrap();
                return self.ca.sign_csr(csr.der(), &other, lifetime);
            }
            self.ca.sign_csr(csr_der, identity, lifetime)
        }

        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.ca.roots()
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "demo", sa).unwrap()
    }

    fn serial(key: &CertifiedKey) -> String {
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        cert.raw_serial_as_string()
    }

    #[tokio::test]
    async fn fetch_issues_once_and_caches() {
        let ca = TestCa::new();
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        assert_eq!(manager.trust_bundle().len(), 1);
        let server = id("server");
        assert!(manager.current(&server).is_none());

        let (a, b) = tokio::join!(manager.fetch(&server), manager.fetch(&server));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            Arc::ptr_eq(&a, &b),
            "concurrent first fetches share one signing"
        );
        assert_eq!(ca.signed.load(Ordering::SeqCst), 1);
        assert!(Arc::ptr_eq(&manager.fetch(&server).await.unwrap(), &a));
        assert!(Arc::ptr_eq(&manager.current(&server).unwrap(), &a));
        assert_eq!(ca.signed.load(Ordering::SeqCst), 1);
        assert_eq!(Identity::from_certificate(&a.cert[0]).unwrap(), server);
        a.keys_match().unwrap();

        manager.fetch(&id("client")).await.unwrap();
        let infos = manager.certificates();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].identity, id("client"));
        assert_eq!(infos[1].identity, server);
        assert_eq!(infos[1].serial, serial(&a));
        let life = infos[1]
            .not_after
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(life > Duration::from_secs(3590), "{life:?}");
        assert!(infos[1].renew_at < infos[1].not_after);
        assert!(infos[1].last_error.is_none());
    }

    #[tokio::test]
    async fn first_failure_is_reported_then_retried() {
        let ca = TestCa::new();
        ca.failing.store(true, Ordering::SeqCst);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let server = id("server");
        let err = manager.fetch(&server).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot get a certificate for spiffe://cluster.local/ns/demo/sa/server")
                && err.contains("test CA is down"),
            "{err}"
        );
        assert!(manager.current(&server).is_none());

        ca.failing.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if manager.fetch(&server).await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker did not retry"
            );
        }
    }

    #[tokio::test]
    async fn refuses_a_certificate_for_another_identity() {
        let ca = TestCa::new();
        *ca.impostor.lock().unwrap() = Some(id("admin"));
        let manager = SecretManager::new(ca, Duration::from_secs(3600));
        let err = manager.fetch(&id("server")).await.unwrap_err().to_string();
        assert!(
            err.contains("unusable certificate for spiffe://cluster.local/ns/demo/sa/server")
                && err.contains("it is for spiffe://cluster.local/ns/demo/sa/admin"),
            "{err}"
        );
    }

    /// Lifetime 2 s: renewal at about 1 s gives a new serial; when the CA then goes down
    /// the old certificate is kept until it expires, and `fetch` then says why.
    #[tokio::test]
    async fn renews_at_half_life_and_keeps_serving_while_the_ca_is_down() {
        let ca = TestCa::new();
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(2));
        let server = id("server");
        let first = manager.fetch(&server).await.unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let second = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let current = manager.current(&server).unwrap();
            if !Arc::ptr_eq(&current, &first) {
                break current;
            }
            assert!(tokio::time::Instant::now() < deadline, "no renewal");
        };
        assert_ne!(serial(&first), serial(&second));

        ca.failing.store(true, Ordering::SeqCst);
        let info = manager.certificates().remove(0);
        // Until it expires, the last good certificate is still served.
        while SystemTime::now() < info.not_after {
            let current = manager.current(&server).unwrap();
            if !Arc::ptr_eq(&current, &second) {
                panic!("a renewal happened while the CA was down");
            }
            assert!(Arc::ptr_eq(&manager.fetch(&server).await.unwrap(), &second));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = manager.fetch(&server).await.unwrap_err().to_string();
        assert!(
            err.contains("expired at") && err.contains("test CA is down"),
            "{err}"
        );
        assert!(manager.certificates()[0].last_error.is_some());
        // Still presented: peers refuse it with "expired", which names the problem.
        assert!(manager.current(&server).is_some());
    }

    #[tokio::test]
    async fn forget_stops_renewing() {
        let ca = TestCa::new();
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(2));
        let server = id("server");
        manager.fetch(&server).await.unwrap();
        assert!(manager.forget(&server));
        assert!(!manager.forget(&server));
        assert!(manager.current(&server).is_none());
        assert!(manager.certificates().is_empty());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            ca.signed.load(Ordering::SeqCst),
            1,
            "no renewal after forget"
        );
    }

    /// The proxy spawns connection tasks that await `fetch`: its future must be `Send`.
    #[test]
    fn shareable_across_threads() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SecretManager>();
        let manager = SecretManager::new(TestCa::new(), Duration::from_secs(60));
        let server = id("server");
        send(&manager.fetch(&server));
    }

    #[test]
    fn retry_delay_backs_off_to_a_cap() {
        assert_eq!(retry_delay(0), Duration::from_millis(500));
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(10), MAX_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
    }
}
