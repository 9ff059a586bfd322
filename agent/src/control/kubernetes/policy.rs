//! Istio's `PeerAuthentication` and `AuthorizationPolicy` objects from the API server,
//! decoded by the same decoder as local files ([`crate::policy::decode_file`]; an object's
//! JSON is valid YAML), so a policy means the same wherever it comes from.
//!
//! An object that does not decode (the API server's schema validation normally stops
//! those) **fails closed** for what it may target, as a local document does: it is a
//! [`BrokenPolicy`] named `kubernetes Kind/namespace/name`, its namespace the object's,
//! its selector read if it can be — its workloads are refused (AuthorizationPolicy) or
//! STRICT (PeerAuthentication) until it is fixed or deleted. It is also reported, with
//! the decoder's reason, in [`Decoded::errors`].
use std::{collections::HashMap, path::Path};

use kube::api::DynamicObject;

use crate::policy::{BrokenPolicy, Policy, PolicyKind};

/// The objects' decodings, by `kind/namespace/name`, with the resource version decoded
/// (an unchanged object is not decoded again).
#[derive(Debug, Default)]
pub struct PolicyObjects {
    decoded: HashMap<String, (String, Result<Vec<Policy>, BrokenPolicy>)>,
}

/// The policies of a set of objects, and what could not be read.
#[derive(Debug, Default)]
pub struct Decoded {
    pub policies: Vec<Policy>,
    /// Objects that do not decode, failing closed.
    pub broken: Vec<BrokenPolicy>,
    /// The same, in words for the log: the object, the reason, the consequence.
    pub errors: Vec<String>,
}

impl PolicyObjects {
    /// Decode `objects` (each `(kind, object)`); objects that went away are forgotten.
    pub fn decode<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (&'a str, &'a DynamicObject)>,
        root: &str,
    ) -> Decoded {
        let mut decoded = Decoded::default();
        let mut seen = HashMap::new();
        for (kind, object) in objects {
            let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
            let name = object.metadata.name.as_deref().unwrap_or("");
            let key = format!("{kind}/{namespace}/{name}");
            let version = object.metadata.resource_version.clone().unwrap_or_default();
            let outcome = match self.decoded.get(&key) {
                Some((decoded_version, outcome)) if *decoded_version == version => outcome.clone(),
                _ => {
                    let outcome = decode_object(kind, object, &key);
                    self.decoded.insert(key.clone(), (version, outcome.clone()));
                    outcome
                }
            };
            match outcome {
                Ok(policies) => decoded.policies.extend(policies),
                Err(broken) => {
                    decoded.errors.push(format!(
                        "{key}: {}; failing closed for {}: {}",
                        broken.error,
                        broken.scope(root),
                        broken.consequence()
                    ));
                    decoded.broken.push(broken);
                }
            }
            seen.insert(key, ());
        }
        self.decoded.retain(|key, _| seen.contains_key(key));
        decoded
    }
}

/// One object through the file decoder; the object is named in place of a file. What
/// does not decode is bounded by what the API server says for sure (kind, namespace).
fn decode_object(
    kind: &str,
    object: &DynamicObject,
    key: &str,
) -> Result<Vec<Policy>, BrokenPolicy> {
    let policy_kind = match kind {
        "PeerAuthentication" => Some(PolicyKind::PeerAuthentication),
        "AuthorizationPolicy" => Some(PolicyKind::AuthorizationPolicy),
        _ => None,
    };
    let broken = |error: String, salvaged: Option<&BrokenPolicy>| BrokenPolicy {
        location: format!("kubernetes {key}"),
        kind: policy_kind,
        namespace: Some(
            object
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        ),
        selector: salvaged.and_then(|s| s.selector.clone()),
        error,
    };
    let mut document = serde_json::to_value(object).map_err(|e| broken(e.to_string(), None))?;
    // The watch carries no apiVersion/kind on DynamicObjects' inner types in every
    // client version; the decoder needs both.
    if let Some(fields) = document.as_object_mut() {
        if let Some(types) = &object.types {
            fields.insert("apiVersion".into(), types.api_version.clone().into());
            fields.insert("kind".into(), types.kind.clone().into());
        } else {
            fields.insert("kind".into(), kind.into());
        }
    }
    let text = serde_json::to_string(&document).map_err(|e| broken(e.to_string(), None))?;
    let origin = format!("kubernetes {key}");
    let mut decoded = crate::policy::decode_file(&text, Path::new(&origin));
    match decoded.broken.pop() {
        None => Ok(decoded.policies),
        Some(salvaged) => Err(broken(salvaged.error.clone(), Some(&salvaged))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "istio-system";

    fn object(kind: &str, name: &str, version: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {"namespace": "demo", "name": name, "resourceVersion": version,
                         "creationTimestamp": "2026-01-01T00:00:00Z",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn objects_decode_as_files_do() {
        let strict = object(
            "PeerAuthentication",
            "strict",
            "1",
            serde_json::json!({"mtls": {"mode": "STRICT"}}),
        );
        let allow = object(
            "AuthorizationPolicy",
            "allow",
            "2",
            serde_json::json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}),
        );
        let mut objects = PolicyObjects::default();
        let decoded = objects.decode(
            [
                ("PeerAuthentication", &strict),
                ("AuthorizationPolicy", &allow),
            ],
            ROOT,
        );
        assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
        assert_eq!(decoded.policies.len(), 2);
        assert_eq!(decoded.policies[0].meta().name, "strict");
        assert!(decoded.policies[1]
            .meta()
            .origin
            .contains("AuthorizationPolicy/demo/allow"));
    }

    #[test]
    fn a_bad_version_fails_closed_for_what_it_targets() {
        let good = object(
            "PeerAuthentication",
            "p",
            "1",
            serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        let bad = object(
            "AuthorizationPolicy",
            "p",
            "2",
            serde_json::json!({"selector": {"matchLabels": {"app": "server"}}, "rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
        );
        let mut objects = PolicyObjects::default();
        let decoded = objects.decode(
            [("PeerAuthentication", &good), ("AuthorizationPolicy", &bad)],
            ROOT,
        );
        assert_eq!(decoded.policies.len(), 1, "the good object is read");
        assert_eq!(decoded.broken.len(), 1);
        let broken = &decoded.broken[0];
        assert_eq!(broken.location, "kubernetes AuthorizationPolicy/demo/p");
        assert_eq!(broken.kind, Some(PolicyKind::AuthorizationPolicy));
        assert_eq!(broken.namespace.as_deref(), Some("demo"));
        assert_eq!(
            broken.selector.as_ref().map(|s| s.to_string()).as_deref(),
            Some("app=server")
        );
        assert!(
            decoded.errors[0].contains("AuthorizationPolicy/demo/p")
                && decoded.errors[0].contains("principal")
                && decoded.errors[0]
                    .contains("failing closed for workloads app=server of namespace demo"),
            "{:?}",
            decoded.errors
        );
        // Decoded once per version; gone from the cluster: forgotten.
        let again = objects.decode([("AuthorizationPolicy", &bad)], ROOT);
        assert_eq!(again.broken, decoded.broken);
        assert!(objects.decode([], ROOT).broken.is_empty());
        assert!(objects.decoded.is_empty());
    }
}
