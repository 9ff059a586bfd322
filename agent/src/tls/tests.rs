//! Real handshakes over in-memory pipes, with certificates made per test.
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{sign::CertifiedKey, ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::{ca, CaClient, CaError, CertificateAuthority};

const HOUR: Duration = Duration::from_secs(3600);

fn id(trust_domain: &str, service_account: &str) -> Identity {
    Identity::new(trust_domain, "demo", service_account).unwrap()
}

fn server_id() -> Identity {
    id("cluster.local", "server")
}

fn client_id() -> Identity {
    id("cluster.local", "client")
}

/// A CA made with `warren`'s own code, in a temporary directory.
fn local_ca() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
    let ca = CertificateAuthority::load(dir.path()).unwrap();
    (dir, Arc::new(ca))
}

/// A CA that signs with one CA and hands out another's roots: a client whose certificate
/// comes from a CA the server does not trust, while it trusts the server.
struct SignsWithOneTrustsAnother {
    signer: Arc<CertificateAuthority>,
    trusted: Arc<CertificateAuthority>,
}

impl CaClient for SignsWithOneTrustsAnother {
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.signer.sign_csr(csr_der, identity, lifetime)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.trusted.roots()
    }
}

/// A test PKI that makes leaves the real CA never would (expired, wrong usage, no
/// SPIFFE ID); managers built on it serve them through `SecretManager::install`.
struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl TestPki {
    fn new(name: &str) -> Arc<Self> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap().der().clone();
        Arc::new(Self {
            issuer: Issuer::new(params, key),
            root,
        })
    }

    /// A mesh leaf for `identity`, valid for an hour, after `tweak`.
    fn leaf(
        &self,
        identity: &Identity,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> CertifiedKey {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        CertifiedKey::from_der(vec![cert.der().clone()], private, &provider()).unwrap()
    }

    /// A manager that trusts this PKI and serves `leaf` as `identity`.
    fn manager_with(
        self: &Arc<Self>,
        identity: &Identity,
        leaf: CertifiedKey,
    ) -> Arc<SecretManager> {
        let manager = SecretManager::new(self.clone(), HOUR);
        manager.install(identity.clone(), leaf);
        manager
    }

    /// A manager that trusts this PKI and serves a normal leaf as `identity`.
    fn manager(self: &Arc<Self>, identity: &Identity) -> Arc<SecretManager> {
        self.manager_with(identity, self.leaf(identity, |_| {}))
    }
}

impl CaClient for TestPki {
    fn sign(
        &self,
        _: &[u8],
        _: &Identity,
        _: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        Err(CaError::Unavailable(
            "the test PKI only serves installed certificates".to_owned(),
        ))
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }
}

type ServerStream = server::TlsStream<DuplexStream>;
type ClientStream = client::TlsStream<DuplexStream>;

/// Both ends of one handshake, run concurrently over an in-memory pipe. The server name
/// is a dummy IP, as the proxy will pass.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<ServerStream>, io::Result<ClientStream>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 77, 2, 10)).into());
    tokio::join!(
        TlsAcceptor::from(server).accept(server_io),
        TlsConnector::from(client).connect(name, client_io),
    )
}

/// A handshake that must fail: each side's reason. A client learns that the server
/// refused its certificate on its first read (TLS 1.3).
async fn refused(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (TlsError, TlsError) {
    let (server, client) = handshake(server, client).await;
    let server_error = match server {
        Ok(_) => panic!("the server accepted the handshake"),
        Err(e) => e,
    };
    let client_error = match client {
        Err(e) => e,
        Ok(mut stream) => {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Err(e) => e,
                Ok(n) => panic!("the client read {n} bytes from a server that refused it"),
            }
        }
    };
    let (server_error, client_error) = (
        classify_handshake_error(&server_error),
        classify_handshake_error(&client_error),
    );
    // What the proxy would log on each side; shown when a test fails.
    eprintln!("server: {server_error}\nclient: {client_error}");
    (server_error, client_error)
}

/// Bytes go both ways on an established pair.
async fn exchange(server: &mut ServerStream, client: &mut ClientStream, round: u8) {
    let mut buf = [0u8; 4];
    client.write_all(&[round, 1, 2, 3]).await.unwrap();
    client.flush().await.unwrap();
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, [round, 1, 2, 3]);
    server.write_all(&[round, 3, 2, 1]).await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, [round, 3, 2, 1]);
}

fn leaf_of(certs: Option<&[CertificateDer<'static>]>) -> CertificateDer<'static> {
    certs
        .and_then(|c| c.first())
        .expect("a peer certificate")
        .clone()
}

#[tokio::test]
async fn mutual_tls_both_ways_with_peer_identities() {
    let (_dir, ca) = local_ca();
    // One manager per node, one CA for the mesh.
    let node1 = SecretManager::new(ca.clone(), HOUR);
    let node2 = SecretManager::new(ca, HOUR);
    for (a, b) in [(client_id(), server_id()), (server_id(), client_id())] {
        node1.fetch(&a).await.unwrap();
        node2.fetch(&b).await.unwrap();
        let server = server_config(node2.clone(), b.clone()).unwrap();
        let client = client_config(node1.clone(), a.clone(), b.clone()).unwrap();
        let (s, c) = handshake(server, client).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert_eq!(peer_identity(s.get_ref().1).unwrap(), a);
        assert_eq!(peer_identity(c.get_ref().1).unwrap(), b);
        let conn = c.get_ref().1;
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let suite = conn.negotiated_cipher_suite().unwrap().suite();
        assert!(matches!(
            suite,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        ));
        exchange(&mut s, &mut c, 1).await;
    }
}

#[tokio::test]
async fn intermediate_ca_chain_is_sent_and_verified() {
    let (_dir, ca, intermediate) = ca::plugged_in_ca();
    let manager = SecretManager::new(Arc::new(ca), HOUR);
    manager.fetch(&client_id()).await.unwrap();
    manager.fetch(&server_id()).await.unwrap();
    let server = server_config(manager.clone(), server_id()).unwrap();
    let client = client_config(manager.clone(), client_id(), server_id()).unwrap();
    let (s, c) = handshake(server, client).await;
    let (s, c) = (s.unwrap(), c.unwrap());
    assert_eq!(c.get_ref().1.peer_certificates().unwrap()[1], intermediate);
    assert_eq!(peer_identity(s.get_ref().1).unwrap(), client_id());
}

#[tokio::test]
async fn secure_naming_refuses_another_service_account() {
    let pki = TestPki::new("mesh");
    let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
    let expected = id("cluster.local", "other");
    let client = client_config(pki.manager(&client_id()), client_id(), expected).unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(matches!(client_error, TlsError::WrongServerIdentity { .. }));
    assert!(
        client_error.to_string().starts_with(
            "server presented spiffe://cluster.local/ns/demo/sa/server, expected spiffe://cluster.local/ns/demo/sa/other"
        ),
        "{client_error}"
    );
    assert!(
        matches!(server_error, TlsError::RefusedByPeer { .. }),
        "{server_error}"
    );
}

#[tokio::test]
async fn secure_naming_refuses_another_trust_domain() {
    let pki = TestPki::new("mesh");
    let foreign = id("other.domain", "server");
    let server = server_config(pki.manager(&foreign), foreign).unwrap();
    let client = client_config(pki.manager(&client_id()), client_id(), server_id()).unwrap();
    let (_, client_error) = refused(server, client).await;
    assert!(
        client_error
            .to_string()
            .contains("server presented spiffe://other.domain/ns/demo/sa/server, expected spiffe://cluster.local/ns/demo/sa/server"),
        "{client_error}"
    );
}

/// The same SPIFFE ID under another CA: the client refuses that server.
#[tokio::test]
async fn client_refuses_a_server_of_another_ca() {
    let (_a, ca) = local_ca();
    let (_b, other_ca) = local_ca();
    let client_node = SecretManager::new(ca, HOUR);
    let server_node = SecretManager::new(other_ca, HOUR);
    client_node.fetch(&client_id()).await.unwrap();
    server_node.fetch(&server_id()).await.unwrap();
    let server = server_config(server_node, server_id()).unwrap();
    let client = client_config(client_node, client_id(), server_id()).unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(client_error, TlsError::UnknownCa),
        "{client_error}"
    );
    assert!(client_error
        .to_string()
        .starts_with("certificate signed by an unknown CA"));
    assert!(
        server_error
            .to_string()
            .contains("it does not trust the CA that signed our certificate"),
        "{server_error}"
    );
}

/// The same SPIFFE ID under another CA: the server refuses that client.
#[tokio::test]
async fn server_refuses_a_client_of_another_ca() {
    let (_a, ca) = local_ca();
    let (_b, other_ca) = local_ca();
    let server_node = SecretManager::new(ca.clone(), HOUR);
    let client_node = SecretManager::new(
        Arc::new(SignsWithOneTrustsAnother {
            signer: other_ca,
            trusted: ca,
        }),
        HOUR,
    );
    client_node.fetch(&client_id()).await.unwrap();
    server_node.fetch(&server_id()).await.unwrap();
    let server = server_config(server_node, server_id()).unwrap();
    let client = client_config(client_node, client_id(), server_id()).unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(server_error, TlsError::UnknownCa),
        "{server_error}"
    );
    assert!(
        client_error
            .to_string()
            .contains("does not trust the CA that signed our certificate"),
        "{client_error}"
    );
}

/// Two CAs with one name (e.g. two `init`s by hand with the same subject): webpki finds
/// the trusted namesake and reports a bad signature; we still say "unknown CA".
#[tokio::test]
async fn another_ca_with_the_same_name_is_an_unknown_ca() {
    let trusted = TestPki::new("mesh");
    let namesake = TestPki::new("mesh");
    let server = server_config(namesake.manager(&server_id()), server_id()).unwrap();
    let client = client_config(trusted.manager(&client_id()), client_id(), server_id()).unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(client_error, TlsError::CaMismatch),
        "{client_error}"
    );
    assert!(client_error
        .to_string()
        .starts_with("certificate signed by an unknown CA"));
    assert!(
        server_error
            .to_string()
            .contains("two CAs created with the same name"),
        "{server_error}"
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let pki = TestPki::new("mesh");
    let expired = pki.leaf(&server_id(), |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now - time::Duration::hours(1);
    });
    let server = server_config(pki.manager_with(&server_id(), expired), server_id()).unwrap();
    let client = client_config(pki.manager(&client_id()), client_id(), server_id()).unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(client_error, TlsError::Expired { .. }),
        "{client_error}"
    );
    assert!(
        client_error
            .to_string()
            .starts_with("certificate expired at "),
        "{client_error}"
    );
    assert!(
        server_error.to_string().contains("expired"),
        "{server_error}"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = TestPki::new("mesh");
    let expired = pki.leaf(&client_id(), |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_after = now - time::Duration::seconds(5);
    });
    let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
    let client = client_config(
        pki.manager_with(&client_id(), expired),
        client_id(),
        server_id(),
    )
    .unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(server_error, TlsError::Expired { .. }),
        "{server_error}"
    );
    assert!(
        client_error
            .to_string()
            .contains("expired or not yet valid"),
        "{client_error}"
    );
}

#[tokio::test]
async fn not_yet_valid_certificates_are_refused() {
    let pki = TestPki::new("mesh");
    let future = |p: &mut CertificateParams| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::hours(1);
        p.not_after = now + time::Duration::hours(2);
    };
    let server = server_config(
        pki.manager_with(&server_id(), pki.leaf(&server_id(), future)),
        server_id(),
    )
    .unwrap();
    let client = client_config(pki.manager(&client_id()), client_id(), server_id()).unwrap();
    let (_, client_error) = refused(server, client).await;
    assert!(
        matches!(client_error, TlsError::NotYetValid { .. }),
        "{client_error}"
    );
    assert!(
        client_error.to_string().contains("not valid before"),
        "{client_error}"
    );

    let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
    let client = client_config(
        pki.manager_with(&client_id(), pki.leaf(&client_id(), future)),
        client_id(),
        server_id(),
    )
    .unwrap();
    let (server_error, _) = refused(server, client).await;
    assert!(
        matches!(server_error, TlsError::NotYetValid { .. }),
        "{server_error}"
    );
}

#[tokio::test]
async fn client_certificate_needs_client_auth() {
    let pki = TestPki::new("mesh");
    for (what, ekus) in [
        ("serverAuth only", vec![ExtendedKeyUsagePurpose::ServerAuth]),
        // webpki alone would accept a certificate without the EKU extension.
        ("no EKU extension", vec![]),
    ] {
        let leaf = pki.leaf(&client_id(), |p| p.extended_key_usages = ekus);
        let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
        let client = client_config(
            pki.manager_with(&client_id(), leaf),
            client_id(),
            server_id(),
        )
        .unwrap();
        let (server_error, client_error) = refused(server, client).await;
        assert!(
            matches!(
                server_error,
                TlsError::WrongKeyUsage {
                    role: Role::Client,
                    eku: "clientAuth"
                }
            ),
            "{what}: {server_error}"
        );
        assert!(
            server_error
                .to_string()
                .starts_with("client certificate is not valid for client authentication"),
            "{server_error}"
        );
        assert!(
            client_error.to_string().contains("extended key usage"),
            "{what}: {client_error}"
        );
    }
}

#[tokio::test]
async fn server_certificate_needs_server_auth() {
    let pki = TestPki::new("mesh");
    for ekus in [vec![ExtendedKeyUsagePurpose::ClientAuth], vec![]] {
        let leaf = pki.leaf(&server_id(), |p| p.extended_key_usages = ekus);
        let server = server_config(pki.manager_with(&server_id(), leaf), server_id()).unwrap();
        let client = client_config(pki.manager(&client_id()), client_id(), server_id()).unwrap();
        let (_, client_error) = refused(server, client).await;
        assert!(
            matches!(
                client_error,
                TlsError::WrongKeyUsage {
                    role: Role::Server,
                    eku: "serverAuth"
                }
            ),
            "{client_error}"
        );
    }
}

#[tokio::test]
async fn client_certificate_needs_a_spiffe_id() {
    let pki = TestPki::new("mesh");
    let leaf = pki.leaf(&client_id(), |p| {
        p.subject_alt_names = vec![SanType::DnsName("client.demo".try_into().unwrap())];
    });
    let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
    let client = client_config(
        pki.manager_with(&client_id(), leaf),
        client_id(),
        server_id(),
    )
    .unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        server_error
            .to_string()
            .starts_with("client certificate lacks a SPIFFE ID"),
        "{server_error}"
    );
    assert!(
        matches!(client_error, TlsError::RefusedByPeer { .. }),
        "{client_error}"
    );
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let pki = TestPki::new("mesh");
    let server = server_config(pki.manager(&server_id()), server_id()).unwrap();
    // A manager that has never fetched the client identity: nothing to present.
    let client = client_config(
        SecretManager::new(pki.clone(), HOUR),
        client_id(),
        server_id(),
    )
    .unwrap();
    let (server_error, client_error) = refused(server, client).await;
    assert!(
        matches!(server_error, TlsError::NoPeerCertificate),
        "{server_error}"
    );
    assert!(
        client_error
            .to_string()
            .contains("requires a client certificate"),
        "{client_error}"
    );
}

#[tokio::test]
async fn a_peer_that_does_not_speak_tls() {
    let pki = TestPki::new("mesh");
    let client = client_config(pki.manager(&client_id()), client_id(), server_id()).unwrap();
    let (client_io, mut plain) = tokio::io::duplex(4096);
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let peer = async {
        let mut hello = [0u8; 5];
        plain.read_exact(&mut hello).await.unwrap();
        plain
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
    };
    let (result, ()) = tokio::join!(
        TlsConnector::from(client.clone()).connect(name.clone(), client_io),
        peer
    );
    let message = describe_handshake_error(&result.err().unwrap());
    assert!(message.contains("is it a mesh mTLS endpoint?"), "{message}");

    let (client_io, plain) = tokio::io::duplex(4096);
    drop(plain);
    let err = TlsConnector::from(client)
        .connect(name, client_io)
        .await
        .err()
        .unwrap();
    assert!(
        describe_handshake_error(&err).contains("closed the connection"),
        "{err}"
    );
}

/// Lifetime 2 s: the managers renew both certificates; a connection opened before keeps
/// exchanging data (even past the old certificates' expiry), and a new handshake gets
/// the new certificates.
#[tokio::test]
async fn renewal_keeps_open_connections_and_serves_new_handshakes() {
    let (_dir, ca) = local_ca();
    let lifetime = Duration::from_secs(2);
    let client_node = SecretManager::new(ca.clone(), lifetime);
    let server_node = SecretManager::new(ca, lifetime);
    let old_client = client_node.fetch(&client_id()).await.unwrap();
    let old_server = server_node.fetch(&server_id()).await.unwrap();
    let server = server_config(server_node.clone(), server_id()).unwrap();
    let client = client_config(client_node.clone(), client_id(), server_id()).unwrap();

    let (s, c) = handshake(server.clone(), client.clone()).await;
    let (mut old_s, mut old_c) = (s.unwrap(), c.unwrap());
    assert_eq!(
        leaf_of(old_c.get_ref().1.peer_certificates()),
        old_server.cert[0]
    );
    exchange(&mut old_s, &mut old_c, 1).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let renewed = |m: &SecretManager, id: &Identity, old: &Arc<CertifiedKey>| {
            m.current(id).is_some_and(|now| now.cert[0] != old.cert[0])
        };
        if renewed(&client_node, &client_id(), &old_client)
            && renewed(&server_node, &server_id(), &old_server)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exchange(&mut old_s, &mut old_c, 2).await;

    // Past the old certificates' expiry, the old session still carries data.
    let old_expiry = {
        let (_, cert) = x509_parser::parse_x509_certificate(&old_client.cert[0]).unwrap();
        crate::identity::system_time(cert.validity().not_after.timestamp())
    };
    if let Ok(wait) = old_expiry.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait + Duration::from_millis(100)).await;
    }
    exchange(&mut old_s, &mut old_c, 3).await;

    let (s, c) = handshake(server, client).await;
    let (mut new_s, mut new_c) = (s.unwrap(), c.unwrap());
    let new_server_leaf = leaf_of(new_c.get_ref().1.peer_certificates());
    let new_client_leaf = leaf_of(new_s.get_ref().1.peer_certificates());
    assert_ne!(new_server_leaf, old_server.cert[0]);
    assert_ne!(new_client_leaf, old_client.cert[0]);
    assert_eq!(
        Identity::from_certificate(&new_server_leaf).unwrap(),
        server_id()
    );
    assert_eq!(
        Identity::from_certificate(&new_client_leaf).unwrap(),
        client_id()
    );
    exchange(&mut new_s, &mut new_c, 4).await;
    exchange(&mut old_s, &mut old_c, 5).await;
}

/// `--trust-domain-aliases` widens what a policy principal names, not who may connect:
/// a client of another (aliased) trust domain is accepted with its identity when its
/// certificate chains to the trust bundle, and refused as of an unknown CA otherwise.
#[tokio::test]
async fn a_client_of_an_aliased_trust_domain_needs_the_trust_bundle() {
    let mesh = TestPki::new("mesh");
    let aliased = id("old.example", "client");
    let server = server_config(mesh.manager(&server_id()), server_id()).unwrap();

    let client = client_config(mesh.manager(&aliased), aliased.clone(), server_id()).unwrap();
    let (s, c) = handshake(server.clone(), client).await;
    let (s, _c) = (s.unwrap(), c.unwrap());
    assert_eq!(peer_identity(s.get_ref().1).unwrap(), aliased);

    // The same identity from a CA outside the bundle (the client trusts the mesh, so
    // only its own certificate is wrong).
    let outside = TestPki::new("old mesh");
    let client = client_config(
        mesh.manager_with(&aliased, outside.leaf(&aliased, |_| {})),
        aliased.clone(),
        server_id(),
    )
    .unwrap();
    let (server_error, _) = refused(server, client).await;
    assert!(
        matches!(server_error, TlsError::UnknownCa),
        "{server_error}"
    );
}
