//! Istio's `PeerAuthentication` and `AuthorizationPolicy` objects from the API server,
//! decoded by the same decoder as local files ([`crate::policy::decode_str`]; an object's
//! JSON is valid YAML), so a policy means the same wherever it comes from.
//!
//! An object that does not decode (the API server's schema validation normally stops
//! those) keeps its last good version in force; one that never decoded is left out. Each
//! is reported with the object's name and the decoder's reason.
use std::{collections::HashMap, path::Path};

use kube::api::DynamicObject;

use crate::policy::Policy;

/// The objects' last good decodings, by `kind/namespace/name`.
#[derive(Debug, Default)]
pub struct PolicyObjects {
    last_good: HashMap<String, (String, Vec<Policy>)>,
}

/// The policies of a set of objects, and what could not be read.
#[derive(Debug, Default)]
pub struct Decoded {
    pub policies: Vec<Policy>,
    pub errors: Vec<String>,
}

impl PolicyObjects {
    /// Decode `objects` (each `(kind, object)`); objects that went away are forgotten.
    pub fn decode<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (&'a str, &'a DynamicObject)>,
    ) -> Decoded {
        let mut decoded = Decoded::default();
        let mut seen = HashMap::new();
        for (kind, object) in objects {
            let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
            let name = object.metadata.name.as_deref().unwrap_or("");
            let key = format!("{kind}/{namespace}/{name}");
            let version = object.metadata.resource_version.clone().unwrap_or_default();
            if let Some((good_version, policies)) = self.last_good.get(&key) {
                if *good_version == version {
                    decoded.policies.extend(policies.iter().cloned());
                    seen.insert(key, ());
                    continue;
                }
            }
            match decode_object(kind, object, &key) {
                Ok(policies) => {
                    decoded.policies.extend(policies.iter().cloned());
                    self.last_good.insert(key.clone(), (version, policies));
                }
                Err(reason) => {
                    let kept = self.last_good.get(&key).map(|(_, p)| p.clone());
                    let consequence = if kept.is_some() {
                        "its previous version stays in force"
                    } else {
                        "it is not in force"
                    };
                    decoded
                        .errors
                        .push(format!("{key}: {reason}; {consequence}"));
                    decoded.policies.extend(kept.into_iter().flatten());
                }
            }
            seen.insert(key, ());
        }
        self.last_good.retain(|key, _| seen.contains_key(key));
        decoded
    }
}

/// One object through the file decoder; the object is named in place of a file.
fn decode_object(kind: &str, object: &DynamicObject, key: &str) -> Result<Vec<Policy>, String> {
    let mut document = serde_json::to_value(object).map_err(|e| e.to_string())?;
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
    let text = serde_json::to_string(&document).map_err(|e| e.to_string())?;
    let origin = format!("kubernetes {key}");
    crate::policy::decode_str(&text, Path::new(&origin)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let decoded = objects.decode([
            ("PeerAuthentication", &strict),
            ("AuthorizationPolicy", &allow),
        ]);
        assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
        assert_eq!(decoded.policies.len(), 2);
        assert_eq!(decoded.policies[0].meta().name, "strict");
        assert!(decoded.policies[1]
            .meta()
            .origin
            .contains("AuthorizationPolicy/demo/allow"));
    }

    #[test]
    fn a_bad_version_keeps_the_last_good_one() {
        let good = object(
            "PeerAuthentication",
            "p",
            "1",
            serde_json::json!({"mtls": {"mode": "STRICT"}}),
        );
        let bad = object(
            "PeerAuthentication",
            "p",
            "2",
            serde_json::json!({"mtls": {"mod": "STRICT"}}),
        );
        let mut objects = PolicyObjects::default();
        assert_eq!(
            objects
                .decode([("PeerAuthentication", &good)])
                .policies
                .len(),
            1
        );
        let decoded = objects.decode([("PeerAuthentication", &bad)]);
        assert_eq!(decoded.policies.len(), 1, "the good version stays");
        assert!(
            decoded.errors[0].contains("PeerAuthentication/demo/p")
                && decoded.errors[0].contains("mod")
                && decoded.errors[0].contains("previous version stays"),
            "{:?}",
            decoded.errors
        );
        // Gone from the cluster: forgotten, also its last good version.
        assert!(objects.decode([]).policies.is_empty());
        let decoded = objects.decode([("PeerAuthentication", &bad)]);
        assert!(decoded.policies.is_empty() && decoded.errors[0].contains("not in force"));
    }
}
