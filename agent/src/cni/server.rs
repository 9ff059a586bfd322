//! The agent's end of the CNI socket, and what it remembers of the pods' sandboxes.
//!
//! Each connection carries one [`Request`]; it is handed, with a one-shot reply channel,
//! to the task that owns enrollment (ADD is answered only once the pod is captured, or
//! known to need nothing), and the reply is written back.
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::protocol::{PodSandbox, Reply, Request, ADD_TIMEOUT, MESH_NAMESPACES_FILE};

/// A plugin that connects and says nothing is dropped after this long.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the plugin and where its answer goes.
#[derive(Debug)]
pub struct CniEvent {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("cannot create the CNI socket's directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on the CNI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Listen on `path`, replacing the socket of an earlier agent; only root may connect.
pub fn bind(path: &Path) -> Result<UnixListener, CniServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CniServerError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    // An earlier agent's socket file stays behind; nobody listens on it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| CniServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        CniServerError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Accept plugin connections until the receiver of `events` is gone.
pub async fn serve(listener: UnixListener, events: mpsc::Sender<CniEvent>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "CNI socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(err) = answer(stream, events).await {
                tracing::warn!(error = %err, "CNI socket: a request was not answered");
            }
        });
    }
}

async fn answer(stream: UnixStream, events: mpsc::Sender<CniEvent>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(READ_TIMEOUT, BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Reply::ok("agent running"),
        Ok(request) => {
            let (reply, answered) = oneshot::channel();
            let described = describe(&request);
            if events.send(CniEvent { request, reply }).await.is_err() {
                Reply::refused("the agent is shutting down")
            } else {
                match tokio::time::timeout(ADD_TIMEOUT, answered).await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(_)) => Reply::refused("the agent dropped the request"),
                    Err(_) => {
                        Reply::refused(format!("{described}: no answer within {ADD_TIMEOUT:?}"))
                    }
                }
            }
        }
        Err(err) => Reply::refused(format!("cannot decode the request {line:?}: {err}")),
    };
    let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

fn describe(request: &Request) -> String {
    match request {
        Request::Add(sandbox) => format!("ADD {}/{}", sandbox.namespace, sandbox.name),
        Request::Del {
            namespace, name, ..
        } => format!("DEL {namespace}/{name}"),
        Request::Status => "STATUS".to_owned(),
    }
}

/// The sandboxes of this node's pods, by `namespace/name`: from the plugin, or found in
/// /proc at start-up.
#[derive(Debug, Default)]
pub struct Sandboxes {
    by_pod: BTreeMap<String, PodSandbox>,
}

impl Sandboxes {
    pub fn record(&mut self, sandbox: PodSandbox) {
        self.by_pod
            .insert(format!("{}/{}", sandbox.namespace, sandbox.name), sandbox);
    }

    /// Forget a pod's sandbox, unless a newer sandbox (another container id) replaced it;
    /// an empty `container_id` forgets whichever sandbox it has.
    pub fn forget(&mut self, pod: &str, container_id: &str) {
        if self
            .by_pod
            .get(pod)
            .is_some_and(|s| container_id.is_empty() || s.container_id == container_id)
        {
            self.by_pod.remove(pod);
        }
    }

    pub fn get(&self, pod: &str) -> Option<&PodSandbox> {
        self.by_pod.get(pod)
    }

    /// Every sandbox recorded.
    pub fn iter(&self) -> impl Iterator<Item = &PodSandbox> {
        self.by_pod.values()
    }
}

/// Write the mesh's namespaces beside the socket, for the plugin to read when the agent
/// does not answer. Written to a temporary file and renamed, so it is never half there.
pub fn write_mesh_namespaces(socket: &Path, namespaces: &HashSet<String>) -> std::io::Result<()> {
    let path = socket.with_file_name(MESH_NAMESPACES_FILE);
    let mut sorted: Vec<&String> = namespaces.iter().collect();
    sorted.sort();
    let text: String = sorted.iter().map(|ns| format!("{ns}\n")).collect();
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, &path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::plugin::unix_transport;

    fn sandbox(name: &str, container: &str) -> PodSandbox {
        PodSandbox {
            container_id: container.into(),
            netns: format!("/var/run/netns/{container}").into(),
            namespace: "demo".into(),
            name: name.into(),
            uid: String::new(),
            ips: vec![],
        }
    }

    /// The plugin's blocking client against the agent's socket: the request reaches the
    /// owner of enrollment and its reply comes back; STATUS needs no owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_plugin_client_and_the_agent_socket_talk() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/cni.sock");
        let listener = bind(&socket).unwrap();
        let (events, mut received) = mpsc::channel(4);
        tokio::spawn(serve(listener, events));
        tokio::spawn(async move {
            while let Some(event) = received.recv().await {
                let CniEvent { request, reply } = event;
                let answer = match request {
                    Request::Add(s) => Reply::ok(format!("captured {}", s.name)),
                    _ => Reply::refused("unexpected"),
                };
                let _ = reply.send(answer);
            }
        });
        let path = socket.clone();
        let reply = tokio::task::spawn_blocking(move || {
            unix_transport(&path, &Request::Add(sandbox("client", "c1")))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(reply, Reply::ok("captured client"));
        let status = tokio::task::spawn_blocking(move || unix_transport(&socket, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert!(status.ok);
    }

    #[test]
    fn a_newer_sandbox_is_not_forgotten_by_the_older_ones_del() {
        let mut sandboxes = Sandboxes::default();
        sandboxes.record(sandbox("client", "old"));
        sandboxes.record(sandbox("client", "new"));
        sandboxes.forget("demo/client", "old");
        assert_eq!(sandboxes.get("demo/client").unwrap().container_id, "new");
        sandboxes.forget("demo/client", "new");
        assert!(sandboxes.get("demo/client").is_none());
    }

    #[test]
    fn the_mesh_namespaces_file_lists_one_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let namespaces: HashSet<String> = ["shop".to_owned(), "demo".to_owned()].into();
        write_mesh_namespaces(&socket, &namespaces).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MESH_NAMESPACES_FILE)).unwrap();
        assert_eq!(text, "demo\nshop\n");
    }
}
