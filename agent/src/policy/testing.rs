//! Policy YAML for tests: one document of each kind, built from a spec.

/// A `security.istio.io/v1` document of `kind` (preceded by `---`, so documents can be
/// concatenated into one file).
pub fn doc(kind: &str, namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}\n"
    )
}

pub fn authz(namespace: &str, name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", namespace, name, spec)
}

pub fn peer_auth(namespace: &str, name: &str, spec: &str) -> String {
    doc("PeerAuthentication", namespace, name, spec)
}
