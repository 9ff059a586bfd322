//! The `warren-cni` binary's logic, by the CNI specification: the command and the
//! pod in environment variables (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_ARGS` with Kubernetes' `K8S_POD_NAMESPACE`/`K8S_POD_NAME`/`K8S_POD_UID`), the
//! network config on stdin with the previous plugin's result (`prevResult`), the result
//! or an error object on stdout.
//!
//! A chained plugin that changes no interface: ADD passes `prevResult` on unchanged once
//! the agent has answered. The transport is a parameter so the decisions are tested
//! without an agent.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{PodSandbox, Reply, Request, ADD_TIMEOUT, MESH_NAMESPACES_FILE};
use crate::config::DEFAULT_CNI_SOCKET;

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI's well-known error codes (spec, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: the agent refused to capture the pod.
    pub const CAPTURE_FAILED: u32 = 100;
}

/// A CNI error object: what the runtime shows in the pod's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// This plugin's entry in a conflist (`"type": "warren-cni"`), with the runtime's
/// `prevResult` added.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The agent's socket; default [`DEFAULT_CNI_SOCKET`].
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Namespaces whose pods start even when the agent does not answer (the cluster's
    /// own, which the agent may depend on).
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_CNI_SOCKET))
    }
}

/// What the runtime asked, from the `CNI_*` variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = var("CNI_COMMAND").filter(|c| !c.is_empty()).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
                "warren-cni is a CNI plugin: the container runtime runs it, with CNI_COMMAND=ADD|DEL|CHECK|VERSION|STATUS|GC",
            )
        })?;
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(Self {
            command,
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS")
                .filter(|n| !n.is_empty())
                .map(PathBuf::from),
            args,
        })
    }

    fn pod(&self) -> Option<(&str, &str)> {
        Some((
            self.args.get("K8S_POD_NAMESPACE")?.as_str(),
            self.args.get("K8S_POD_NAME")?.as_str(),
        ))
    }
}

/// Sends a request to the agent's socket and reads its reply.
pub type Transport<'a> = dyn Fn(&Path, &Request) -> std::io::Result<Reply> + 'a;

/// Run one invocation: the JSON to print on success (none for DEL, CHECK, STATUS, GC),
/// or the error to print.
pub fn run(
    invocation: &Invocation,
    stdin: &[u8],
    transport: &Transport<'_>,
) -> Result<Option<Value>, CniError> {
    if invocation.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|err| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode the network config on stdin",
            err.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("warren-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    match invocation.command.as_str() {
        "ADD" => add(invocation, &conf, transport).map(Some),
        "DEL" => {
            del(invocation, &conf, transport);
            Ok(None)
        }
        // Nothing of the interface is ours to check; GC has nothing of ours to collect
        // (the agent forgets pods the API server deletes).
        "CHECK" | "GC" => Ok(None),
        "STATUS" => match transport(conf.socket(), &Request::Status) {
            Ok(_) => Ok(None),
            Err(err) => Err(CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                format!(
                    "the warren agent does not answer at {}",
                    conf.socket().display()
                ),
                err.to_string(),
            )),
        },
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

fn add(
    invocation: &Invocation,
    conf: &NetConf,
    transport: &Transport<'_>,
) -> Result<Value, CniError> {
    let Some(mut result) = conf.prev_result.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "warren-cni has no prevResult: it is a chained plugin",
            "put it after the plugin that gives pods their addresses, in the plugins list of the node's .conflist",
        ));
    };
    result["cniVersion"] = json!(conf.cni_version);
    // Not a Kubernetes pod (no K8S_POD_* args): not ours to capture.
    let Some((namespace, name)) = invocation.pod() else {
        return Ok(result);
    };
    let Some(netns) = invocation.netns.clone() else {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set for ADD",
            format!("pod {namespace}/{name}"),
        ));
    };
    let request = Request::Add(PodSandbox {
        container_id: invocation.container_id.clone(),
        netns,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: invocation
            .args
            .get("K8S_POD_UID")
            .cloned()
            .unwrap_or_default(),
        ips: result_ips(&result),
    });
    match transport(conf.socket(), &request) {
        Ok(reply) if reply.ok => Ok(result),
        Ok(reply) => Err(CniError::new(
            code::CAPTURE_FAILED,
            format!("warren could not put pod {namespace}/{name} in the mesh"),
            reply.message,
        )),
        Err(err) => {
            if conf.exclude_namespaces.iter().any(|n| n == namespace)
                || known_outside_mesh(conf.socket(), namespace)
            {
                return Ok(result);
            }
            Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the warren agent on this node does not answer at {}; pod {namespace}/{name} may be in the mesh, so it waits for the agent (the kubelet retries)",
                    conf.socket().display()
                ),
                format!("{err}; check this node's agent: kubectl -n warren-system get pods -o wide"),
            ))
        }
    }
}

/// Tell the agent, if it listens; a DEL never fails (the spec asks plugins to clean up
/// what they can and succeed): the agent also forgets pods the API server deletes.
fn del(invocation: &Invocation, conf: &NetConf, transport: &Transport<'_>) {
    let Some((namespace, name)) = invocation.pod() else {
        return;
    };
    let request = Request::Del {
        container_id: invocation.container_id.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    if let Err(err) = transport(conf.socket(), &request) {
        eprintln!("warren-cni: DEL of {namespace}/{name}: the agent did not answer ({err}); it will forget the pod when the API server deletes it");
    }
}

/// The pod's addresses in a CNI result (`ips[].address`, CIDR notation).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// Whether the agent's last word was that `namespace` is not in the mesh. No word (no
/// cache yet) is not that.
fn known_outside_mesh(socket: &Path, namespace: &str) -> bool {
    let cache = socket.with_file_name(MESH_NAMESPACES_FILE);
    match std::fs::read_to_string(cache) {
        Ok(text) => !text.lines().any(|line| line.trim() == namespace),
        Err(_) => false,
    }
}

/// Talk to the agent over its unix socket: one request line, one reply line.
pub fn unix_transport(socket: &Path, request: &Request) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ADD_TIMEOUT))?;
    stream.set_write_timeout(Some(ADD_TIMEOUT))?;
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|err| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the agent's reply {reply:?}: {err}"),
        )
    })
}

/// The binary: read the environment and stdin, print the result or the error.
pub fn main() -> ExitCode {
    let invocation = match Invocation::from_env(|name| std::env::var(name).ok()) {
        Ok(invocation) => invocation,
        Err(err) => return fail(&err, "1.0.0"),
    };
    let mut stdin = Vec::new();
    if invocation.command != "VERSION" {
        if let Err(err) = std::io::stdin().read_to_end(&mut stdin) {
            let err = CniError::new(code::IO_FAILURE, "cannot read stdin", err.to_string());
            return fail(&err, "1.0.0");
        }
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|conf| conf["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match run(&invocation, &stdin, &unix_transport) {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => fail(&err, &version),
    }
}

fn fail(err: &CniError, version: &str) -> ExitCode {
    println!("{}", err.to_json(version));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn invocation(command: &str) -> Invocation {
        Invocation::from_env(|name| {
            match name {
                "CNI_COMMAND" => Some(command),
                "CNI_CONTAINERID" => Some("c0ffee"),
                "CNI_NETNS" => Some("/var/run/netns/cni-1234"),
                "CNI_ARGS" => Some(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=u-1",
                ),
                _ => None,
            }
            .map(str::to_owned)
        })
        .unwrap()
    }

    fn conf(socket: &Path, exclude: &[&str]) -> Vec<u8> {
        json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "warren-cni",
            "socket": socket, "excludeNamespaces": exclude,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
                "ips": [{"address": "10.244.1.7/24", "interface": 0}, {"address": "fd00:10:244:1::7/64", "interface": 0}]
            }
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn add_hands_the_pod_to_the_agent_and_passes_the_previous_result_on() {
        let sent = RefCell::new(Vec::new());
        let agent = |_: &Path, request: &Request| {
            sent.borrow_mut().push(request.clone());
            Ok(Reply::ok("captured"))
        };
        let stdin = conf(Path::new("/run/w/cni.sock"), &[]);
        let result = run(&invocation("ADD"), &stdin, &agent).unwrap().unwrap();
        let prev: Value = serde_json::from_slice::<Value>(&stdin).unwrap()["prevResult"].clone();
        assert_eq!(
            result, prev,
            "the interfaces and addresses are not ours to change"
        );
        let sent = sent.into_inner();
        let [Request::Add(sandbox)] = sent.as_slice() else {
            panic!("{sent:?}")
        };
        assert_eq!(
            (sandbox.namespace.as_str(), sandbox.name.as_str()),
            ("demo", "client")
        );
        assert_eq!(sandbox.uid, "u-1");
        assert_eq!(sandbox.netns, Path::new("/var/run/netns/cni-1234"));
        assert_eq!(
            sandbox.ips,
            [
                "10.244.1.7".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_refusal_fails_the_add_with_the_agents_reason() {
        let agent = |_: &Path, _: &Request| Ok(Reply::refused("no certificate: the CA is down"));
        let err = run(&invocation("ADD"), &conf(Path::new("/s"), &[]), &agent).unwrap_err();
        assert_eq!(err.code, code::CAPTURE_FAILED);
        assert!(
            err.msg.contains("demo/client") && err.details.contains("CA is down"),
            "{err:?}"
        );
    }

    /// Agent down: a pod that may be in the mesh waits; excluded namespaces and the ones
    /// the agent last said are outside the mesh start.
    #[test]
    fn with_the_agent_down_mesh_pods_wait_and_others_start() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let down = |_: &Path, _: &Request| -> std::io::Result<Reply> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        };
        let err = run(&invocation("ADD"), &conf(&socket, &[]), &down).unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER, "no cache: fail closed");
        assert!(err.msg.contains(&socket.display().to_string()), "{err:?}");

        assert!(
            run(&invocation("ADD"), &conf(&socket, &["demo"]), &down).is_ok(),
            "excluded"
        );

        std::fs::write(dir.path().join(MESH_NAMESPACES_FILE), "shop\n").unwrap();
        assert!(
            run(&invocation("ADD"), &conf(&socket, &[]), &down).is_ok(),
            "demo is not in the mesh"
        );
        std::fs::write(dir.path().join(MESH_NAMESPACES_FILE), "shop\ndemo\n").unwrap();
        assert_eq!(
            run(&invocation("ADD"), &conf(&socket, &[]), &down)
                .unwrap_err()
                .code,
            code::TRY_AGAIN_LATER
        );
        // DEL never fails.
        assert_eq!(
            run(&invocation("DEL"), &conf(&socket, &[]), &down),
            Ok(None)
        );
    }

    #[test]
    fn misuse_is_named() {
        let agent = |_: &Path, _: &Request| Ok(Reply::ok(""));
        let mut standalone: Value = serde_json::from_slice(&conf(Path::new("/s"), &[])).unwrap();
        standalone.as_object_mut().unwrap().remove("prevResult");
        let err = run(
            &invocation("ADD"),
            standalone.to_string().as_bytes(),
            &agent,
        )
        .unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("chained"), "{err:?}");

        let err = run(&invocation("ADD"), b"{not json", &agent).unwrap_err();
        assert_eq!(err.code, code::DECODE_FAILURE);
        let old = br#"{"cniVersion": "0.2.0", "name": "n", "type": "warren-cni"}"#;
        assert_eq!(
            run(&invocation("ADD"), old, &agent).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let err = Invocation::from_env(|_| None).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        assert!(err.details.contains("container runtime"));

        let version = run(&invocation("VERSION"), b"", &agent).unwrap().unwrap();
        assert!(version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
    }
}
