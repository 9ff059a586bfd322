//! The plugin ↔ agent messages: one JSON request per connection, one JSON reply, each
//! a single line.
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How long the plugin waits for the agent's answer to an ADD: capture includes making
/// the pod's certificate, which waits on the CA.
pub const ADD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The file, beside the socket, where the agent lists the mesh's namespaces (one a
/// line) each time they change: the plugin's guide when the agent does not answer.
pub const MESH_NAMESPACES_FILE: &str = "mesh-namespaces";

/// A pod's sandbox, as the runtime told the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSandbox {
    pub container_id: String,
    /// `CNI_NETNS`: the path of the pod's network namespace, on the node.
    pub netns: PathBuf,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// A sandbox was made: capture it if its pod is in the mesh, then answer.
    Add(PodSandbox),
    /// A sandbox is going away.
    Del {
        #[serde(rename = "containerId")]
        container_id: String,
        namespace: String,
        name: String,
    },
    /// Is the agent there? (CNI `STATUS`.)
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the pod is captured (ADD of a mesh pod) or nothing was needed.
    pub ok: bool,
    /// What the agent did, or why it could not: shown by the runtime in the pod's events.
    #[serde(default)]
    pub message: String,
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_tagged_json_line() {
        let add = Request::Add(PodSandbox {
            container_id: "abc".into(),
            netns: "/var/run/netns/cni-1".into(),
            namespace: "demo".into(),
            name: "client".into(),
            uid: "u1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        let text = serde_json::to_string(&add).unwrap();
        assert!(!text.contains('\n'));
        assert!(text.contains(r#""command":"ADD""#), "{text}");
        assert!(text.contains(r#""containerId":"abc""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), add);
        let del: Request = serde_json::from_str(
            r#"{"command":"DEL","containerId":"abc","namespace":"demo","name":"client"}"#,
        )
        .unwrap();
        assert!(matches!(del, Request::Del { .. }));
    }
}
