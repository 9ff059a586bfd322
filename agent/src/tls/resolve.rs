//! The certificate each side presents, read from the [`SecretManager`] at every handshake
//! so that a renewal is picked up by the next handshake without a new config.
use std::sync::Arc;

use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    SignatureScheme,
};

use crate::identity::{Identity, SecretManager};

/// Presents `identity`'s certificate whatever the ClientHello says (peers send no SNI).
#[derive(Debug)]
pub(super) struct ServerCert {
    manager: Arc<SecretManager>,
    identity: Identity,
}

impl ServerCert {
    pub(super) fn new(manager: Arc<SecretManager>, identity: Identity) -> Self {
        Self { manager, identity }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.manager.current(&self.identity);
        if key.is_none() {
            tracing::warn!(identity = %self.identity, "refusing an mTLS handshake: no certificate for this identity yet");
        }
        key
    }
}

/// Presents `identity`'s certificate to servers that ask for one (mesh servers always do).
#[derive(Debug)]
pub(super) struct ClientCert {
    manager: Arc<SecretManager>,
    identity: Identity,
}

impl ClientCert {
    pub(super) fn new(manager: Arc<SecretManager>, identity: Identity) -> Self {
        Self { manager, identity }
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.manager.current(&self.identity);
        if key.is_none() {
            tracing::warn!(identity = %self.identity, "no certificate for this identity yet: the server will refuse the connection");
        }
        key
    }

    fn has_certs(&self) -> bool {
        true
    }
}
