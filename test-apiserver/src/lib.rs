//! An in-memory Kubernetes API server for tests, over real HTTP/1.1.
//!
//! No Kubernetes API server runs on the machines warren is built and tested on, so its
//! Kubernetes code is tested against this one, through a real kube-rs client. It serves
//! what a controller's watch depends on and the failures it must survive:
//!
//! - list (`limit` + `continue`, label and field selectors) with the collection's
//!   `resourceVersion`;
//! - watch (`?watch=true`) as chunked JSON lines, replaying the history after the given
//!   `resourceVersion`, bookmarks when asked for, `timeoutSeconds`;
//! - `410 Gone` (an `ERROR` event with reason `Expired`, as the real server sends) for a
//!   watch or a continue token older than the compacted history — the client must relist;
//! - get, create (POST), replace (PUT), delete, and `/version`;
//! - fault injection: the next N requests fail with a status, every answer delayed,
//!   every open watch broken; a log of the requests served.
//!
//! Objects are kept as JSON, keyed by API group (not version: a `v1beta1` and a `v1`
//! client see the same objects, as with a CRD serving two versions), kind, namespace and
//! name. Lists are not snapshots: a continued list reads the objects as they are now
//! (enough for tests; a real server serves the list's resourceVersion).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request as HttpRequest, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// A request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// A watch (`?watch=true`), as opposed to a list or a get.
    pub watch: bool,
    pub status: u16,
}

/// A kind of object the server serves.
#[derive(Debug, Clone)]
struct ResourceType {
    /// Empty for the core group.
    group: &'static str,
    versions: Vec<&'static str>,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

impl ResourceType {
    fn new(
        group: &'static str,
        versions: &[&'static str],
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
    ) -> Self {
        Self {
            group,
            versions: versions.to_vec(),
            kind,
            plural,
            namespaced,
        }
    }

    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

/// The kinds served unless a test changes them: what warren's agent and CA read.
fn default_types() -> Vec<ResourceType> {
    vec![
        ResourceType::new("", &["v1"], "Namespace", "namespaces", false),
        ResourceType::new("", &["v1"], "Node", "nodes", false),
        ResourceType::new("", &["v1"], "Pod", "pods", true),
        ResourceType::new("", &["v1"], "Service", "services", true),
        ResourceType::new("", &["v1"], "ServiceAccount", "serviceaccounts", true),
        ResourceType::new("", &["v1"], "ConfigMap", "configmaps", true),
        ResourceType::new("", &["v1"], "Secret", "secrets", true),
        ResourceType::new("apps", &["v1"], "DaemonSet", "daemonsets", true),
        ResourceType::new(
            "discovery.k8s.io",
            &["v1"],
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        ResourceType::new(
            "authentication.k8s.io",
            &["v1"],
            "TokenReview",
            "tokenreviews",
            false,
        ),
        ResourceType::new(
            "security.istio.io",
            &["v1", "v1beta1"],
            "PeerAuthentication",
            "peerauthentications",
            true,
        ),
        ResourceType::new(
            "security.istio.io",
            &["v1", "v1beta1"],
            "AuthorizationPolicy",
            "authorizationpolicies",
            true,
        ),
    ]
}

/// Where an object lives: group, kind, namespace ("" when cluster-scoped), name.
type Key = (String, String, String, String);

#[derive(Debug, Clone)]
struct Event {
    resource_version: u64,
    kind: &'static str,
    /// The type's group and kind.
    group: String,
    object_kind: String,
    object: Value,
}

/// Answers a create (POST) of a kind instead of storing it, e.g. a TokenReview.
pub type CreateHandler = Box<dyn Fn(Value) -> Result<Value, (u16, String)> + Send + Sync>;

struct State {
    types: Vec<ResourceType>,
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    /// Watches and continue tokens from before this version get `410 Gone`.
    compacted: u64,
    fail_next: Vec<u16>,
    delay: Duration,
    requests: Vec<Request>,
    create_handlers: BTreeMap<(String, String), Arc<CreateHandler>>,
    next_uid: u64,
}

/// What wakes the open watches: a new version, a break, a bookmark request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Signal {
    resource_version: u64,
    breaks: u64,
    bookmarks: u64,
}

struct Shared {
    state: Mutex<State>,
    signal: watch::Sender<Signal>,
}

impl Shared {
    /// Wake the watches: there is a new resourceVersion.
    fn notify(&self) {
        let version = self.lock().resource_version;
        self.signal.send_modify(|s| s.resource_version = version);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock poisons it; the state is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The server; it stops (and every watch ends) when dropped.
pub struct TestApiServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.break_watches();
    }
}

impl TestApiServer {
    /// Serve on a free loopback port, on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        Self::serve_on(std::net::TcpListener::bind("127.0.0.1:0")?).await
    }

    /// Serve on a listener made elsewhere (e.g. in a lab network namespace that the
    /// agents reach), on the current tokio runtime.
    pub async fn serve_on(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                types: default_types(),
                resource_version: 1,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                fail_next: Vec::new(),
                delay: Duration::ZERO,
                requests: Vec::new(),
                create_handlers: BTreeMap::new(),
                next_uid: 1,
            }),
            signal: watch::Sender::new(Signal {
                resource_version: 1,
                ..Signal::default()
            }),
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accepting.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(serve(&shared, request).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(err) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        tracing::debug!(error = %err, "test API server connection ended");
                    }
                });
            }
        });
        Ok(Self {
            address,
            shared,
            accept,
        })
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Create or replace an object (by its apiVersion's group, kind, namespace and name),
    /// as `kubectl apply` would; returns it as stored, with its resourceVersion.
    ///
    /// Panics on an object of a kind the server does not serve: a mistake in the test.
    pub fn apply(&self, object: Value) -> Value {
        let mut state = self.shared.lock();
        let ty = state
            .type_of_object(&object)
            .unwrap_or_else(|| panic!("the test API server does not serve {object}"));
        let stored = state.store(&ty, object);
        drop(state);
        self.shared.notify();
        stored
    }

    /// Delete an object; false if there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let key = object_key(api_version, kind, namespace, name);
        let deleted = self.shared.lock().remove(&key).is_some();
        self.shared.notify();
        deleted
    }

    /// The object stored under this name, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = object_key(api_version, kind, namespace, name);
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Forget the watch history: every watch or continue token from an older
    /// resourceVersion now gets `410 Gone` (etcd compaction).
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.compacted = state.resource_version;
        state.history.clear();
    }

    /// End every open watch (the connection to the API server dropped).
    pub fn break_watches(&self) {
        self.shared.signal.send_modify(|s| s.breaks += 1);
    }

    /// Send a BOOKMARK with the current resourceVersion on every watch that allows them.
    pub fn send_bookmarks(&self) {
        self.shared.signal.send_modify(|s| s.bookmarks += 1);
    }

    /// The next `count` requests fail with `status` (e.g. 500, 503, 429).
    pub fn fail_next(&self, count: usize, status: u16) {
        self.shared
            .lock()
            .fail_next
            .extend(std::iter::repeat_n(status, count));
    }

    /// Delay every answer (not each watch event) by this much.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Serve a kind only at these versions (e.g. `security.istio.io` policies at
    /// `["v1beta1"]`, an older Istio), or not at all with `[]` (the CRD not installed).
    pub fn serve_versions(&self, group: &str, plural: &str, versions: &[&'static str]) {
        let mut state = self.shared.lock();
        for ty in &mut state.types {
            if ty.group == group && ty.plural == plural {
                ty.versions = versions.to_vec();
            }
        }
    }

    /// Answer creates (POST) of `group`/`plural` with `handler` instead of storing the
    /// object: a TokenReview, a SubjectAccessReview.
    pub fn on_create(
        &self,
        group: &str,
        plural: &str,
        handler: impl Fn(Value) -> Result<Value, (u16, String)> + Send + Sync + 'static,
    ) {
        self.shared.lock().create_handlers.insert(
            (group.to_owned(), plural.to_owned()),
            Arc::new(Box::new(handler)),
        );
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }
}

impl State {
    fn type_of_object(&self, object: &Value) -> Option<ResourceType> {
        let api_version = object["apiVersion"].as_str()?;
        let kind = object["kind"].as_str()?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.contains(&version))
            .cloned()
    }

    fn type_of_path(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.plural == plural && t.versions.contains(&version))
            .cloned()
    }

    /// Store `object` (create or replace), recording the event.
    fn store(&mut self, ty: &ResourceType, mut object: Value) -> Value {
        let namespace = if ty.namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (
            ty.group.to_owned(),
            ty.kind.to_owned(),
            namespace.clone(),
            name,
        );
        self.resource_version += 1;
        let version = self.resource_version;
        let previous = self.objects.get(&key).map(|o| o["metadata"].clone());
        let metadata = &mut object["metadata"];
        if ty.namespaced {
            metadata["namespace"] = json!(namespace);
        }
        metadata["resourceVersion"] = json!(version.to_string());
        match previous {
            Some(previous) => {
                metadata["uid"] = previous["uid"].clone();
                metadata["creationTimestamp"] = previous["creationTimestamp"].clone();
            }
            None => {
                metadata["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.next_uid));
                self.next_uid += 1;
                // Creation order is what Istio's "oldest wins" reads; one second apart
                // keeps it visible at the timestamp's resolution.
                metadata["creationTimestamp"] = json!(timestamp(version));
            }
        }
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, object.clone());
        self.history.push(Event {
            resource_version: version,
            kind,
            group: ty.group.to_owned(),
            object_kind: ty.kind.to_owned(),
            object: object.clone(),
        });
        object
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.history.push(Event {
            resource_version: self.resource_version,
            kind: "DELETED",
            group: key.0.clone(),
            object_kind: key.1.clone(),
            object: object.clone(),
        });
        Some(object)
    }
}

/// An RFC 3339 time `seconds` after 2026-01-01.
fn timestamp(seconds: u64) -> String {
    let (minutes, second) = (seconds / 60, seconds % 60);
    let (hours, minute) = (minutes / 60, minutes % 60);
    let (days, hour) = (hours / 24, hours % 24);
    format!(
        "2026-01-{:02}T{hour:02}:{minute:02}:{second:02}Z",
        1 + days.min(27)
    )
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("a valid response")
}

/// A `Status` object, as the API server answers errors.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

/// What a request's path names.
struct Target {
    ty: ResourceType,
    version: String,
    /// The namespace in the path, if any (none: every namespace, or cluster-scoped).
    namespace: Option<String>,
    name: Option<String>,
}

/// The target of a path, or why it names nothing served (a 404).
fn parse_target(state: &State, path: &str) -> Result<Target, String> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(format!("no route {path}")),
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return Err(format!("no route {path}")),
    };
    let Some(ty) = state.type_of_path(group, version, plural) else {
        return Err(format!(
            "the server could not find the requested resource ({group}/{version} {plural})"
        ));
    };
    Ok(Target {
        ty,
        version: version.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

/// The query's parameters that the server reads.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<u64>,
    label_selector: Vec<Requirement>,
    field_selector: Vec<Requirement>,
    limit: Option<usize>,
    continue_token: Option<String>,
    timeout: Option<Duration>,
    bookmarks: bool,
}

/// One term of a label or field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                Ok(Requirement::NotEquals(
                    key.trim().into(),
                    value.trim().into(),
                ))
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                Ok(Requirement::Equals(key.trim().into(), value.trim().into()))
            } else if term.contains(' ') || term.contains('(') {
                Err(format!(
                    "selector term {term:?}: only =, ==, !=, key and !key are served"
                ))
            } else if let Some(key) = term.strip_prefix('!') {
                Ok(Requirement::NotExists(key.into()))
            } else {
                Ok(Requirement::Exists(term.into()))
            }
        })
        .collect()
}

fn parse_query(query: &str) -> Result<Query, String> {
    let mut parsed = Query::default();
    for (key, value) in url_pairs(query) {
        match key.as_str() {
            "watch" => parsed.watch = value == "true" || value == "1",
            "resourceVersion" if !value.is_empty() => {
                parsed.resource_version = Some(
                    value
                        .parse()
                        .map_err(|_| format!("resourceVersion {value:?} is not a number"))?,
                )
            }
            "labelSelector" => parsed.label_selector = parse_selector(&value)?,
            "fieldSelector" => parsed.field_selector = parse_selector(&value)?,
            "limit" => parsed.limit = Some(value.parse().map_err(|_| format!("limit {value:?}"))?),
            "continue" if !value.is_empty() => parsed.continue_token = Some(value),
            "timeoutSeconds" => {
                parsed.timeout = Some(Duration::from_secs(
                    value
                        .parse()
                        .map_err(|_| format!("timeoutSeconds {value:?}"))?,
                ))
            }
            "allowWatchBookmarks" => parsed.bookmarks = value == "true",
            _ => {}
        }
    }
    Ok(parsed)
}

/// `a=b&c=d`, percent-decoded (`+` is a space).
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A dotted path into an object (`metadata.name`, `spec.nodeName`), as text.
fn field(object: &Value, path: &str) -> Option<String> {
    let mut value = object;
    for part in path.split('.') {
        value = value.get(part)?;
    }
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn matches(object: &Value, labels: &[Requirement], fields: &[Requirement]) -> bool {
    let label = |key: &str| {
        object["metadata"]["labels"][key]
            .as_str()
            .map(str::to_owned)
    };
    let ok = |requirement: &Requirement, get: &dyn Fn(&str) -> Option<String>| match requirement {
        Requirement::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
        // A field that is absent reads as "" in the API server's field selectors.
        Requirement::NotEquals(k, v) => get(k).as_deref().unwrap_or("") != v,
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    };
    labels.iter().all(|r| ok(r, &label)) && fields.iter().all(|r| ok(r, &|k| field(object, k)))
}

/// The object as a client of `version` sees it.
fn at_version(target: &Target, mut object: Value) -> Value {
    object["apiVersion"] = json!(target.ty.api_version(&target.version));
    object
}

fn in_scope(target: &Target, group: &str, kind: &str, object: &Value) -> bool {
    group == target.ty.group
        && kind == target.ty.kind
        && target
            .namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
}

async fn serve(shared: &Arc<Shared>, request: HttpRequest<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query_text = request.uri().query().unwrap_or_default().to_owned();
    let query = parse_query(&query_text);
    let watch = query.as_ref().is_ok_and(|q| q.watch);
    let (delay, injected) = {
        let mut state = shared.lock();
        let injected = (!state.fail_next.is_empty()).then(|| state.fail_next.remove(0));
        (state.delay, injected)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match (injected, query) {
        (Some(code), _) => status_response(code, "InternalError", "injected by the test"),
        (None, Err(message)) => status_response(400, "BadRequest", &message),
        (None, Ok(query)) => {
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => Bytes::from(err.to_string()),
            };
            route(shared, &method, &path, query, &body)
        }
    };
    shared.lock().requests.push(Request {
        method: method.to_string(),
        path,
        query: query_text,
        watch,
        status: response.status().as_u16(),
    });
    response
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Query,
    body: &[u8],
) -> Response<Body> {
    if path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-warren-test", "platform": "linux/amd64"}),
        );
    }
    let mut state = shared.lock();
    let target = match parse_target(&state, path) {
        Ok(target) => target,
        Err(message) => return status_response(404, "NotFound", &message),
    };
    match (method.clone(), &target.name) {
        (Method::GET, None) if query.watch => {
            drop(state);
            watch_response(shared, target, query)
        }
        (Method::GET, None) => list(&state, &target, &query),
        (Method::GET, Some(name)) => match state.objects.get(&key(&target, name)) {
            Some(object) => json_response(200, &at_version(&target, object.clone())),
            None => not_found(&target, name),
        },
        (Method::POST, None) => {
            let object: Value = match serde_json::from_slice(body) {
                Ok(object) => object,
                Err(err) => return status_response(400, "BadRequest", &format!("body: {err}")),
            };
            let handler = state
                .create_handlers
                .get(&(target.ty.group.to_owned(), target.ty.plural.to_owned()))
                .cloned();
            if let Some(handler) = handler {
                drop(state);
                return match handler(object) {
                    Ok(answer) => json_response(201, &answer),
                    Err((code, message)) => status_response(code, "Invalid", &message),
                };
            }
            let object = with_namespace(&target, object);
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if state.objects.contains_key(&key(&target, &name)) {
                return status_response(
                    409,
                    "AlreadyExists",
                    &format!("{} {name:?} already exists", target.ty.plural),
                );
            }
            let stored = state.store(&target.ty, object);
            drop(state);
            shared.notify();
            json_response(201, &at_version(&target, stored))
        }
        (Method::PUT, Some(name)) => {
            let object: Value = match serde_json::from_slice(body) {
                Ok(object) => object,
                Err(err) => return status_response(400, "BadRequest", &format!("body: {err}")),
            };
            let object = with_namespace(&target, object);
            let Some(current) = state.objects.get(&key(&target, name)) else {
                return not_found(&target, name);
            };
            let sent = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !sent.is_empty() && Some(sent) != current["metadata"]["resourceVersion"].as_str() {
                return status_response(
                    409,
                    "Conflict",
                    &format!(
                        "{} {name:?}: the object has been modified",
                        target.ty.plural
                    ),
                );
            }
            let stored = state.store(&target.ty, object);
            drop(state);
            shared.notify();
            json_response(200, &at_version(&target, stored))
        }
        (Method::DELETE, Some(name)) => match state.remove(&key(&target, name)) {
            Some(object) => {
                drop(state);
                shared.notify();
                json_response(200, &at_version(&target, object))
            }
            None => not_found(&target, name),
        },
        _ => status_response(
            405,
            "MethodNotAllowed",
            &format!("{method} {path} is not served"),
        ),
    }
}

/// Where the object `apiVersion`/`kind` `namespace`/`name` is kept.
fn object_key(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Key {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    (
        group.to_owned(),
        kind.to_owned(),
        namespace.unwrap_or_default().to_owned(),
        name.to_owned(),
    )
}

fn key(target: &Target, name: &str) -> Key {
    (
        target.ty.group.to_owned(),
        target.ty.kind.to_owned(),
        if target.ty.namespaced {
            target.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name.to_owned(),
    )
}

fn with_namespace(target: &Target, mut object: Value) -> Value {
    if let (true, Some(namespace)) = (target.ty.namespaced, &target.namespace) {
        object["metadata"]["namespace"] = json!(namespace);
    }
    object
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    status_response(
        404,
        "NotFound",
        &format!("{} {name:?} not found", target.ty.plural),
    )
}

fn list(state: &State, target: &Target, query: &Query) -> Response<Body> {
    // A continue token is "<list resourceVersion>/<last key>".
    let (list_version, after) = match &query.continue_token {
        Some(token) => {
            let Some((version, after)) = token.split_once('/') else {
                return status_response(400, "BadRequest", "malformed continue token");
            };
            let version: u64 = version.parse().unwrap_or(0);
            if version < state.compacted {
                return status_response(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
            }
            (version, Some(after.to_owned()))
        }
        None => (state.resource_version, None),
    };
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for ((group, kind, namespace, name), object) in &state.objects {
        let position = format!("{namespace}|{name}");
        if !in_scope(target, group, kind, object)
            || after.as_ref().is_some_and(|after| position <= *after)
            || !matches(object, &query.label_selector, &query.field_selector)
        {
            continue;
        }
        if query
            .limit
            .is_some_and(|limit| limit > 0 && items.len() == limit)
        {
            more = true;
            break;
        }
        items.push(at_version(target, object.clone()));
        last = Some(position);
    }
    let mut metadata = json!({"resourceVersion": list_version.to_string()});
    if more {
        metadata["continue"] = json!(format!("{list_version}/{}", last.unwrap_or_default()));
    }
    json_response(
        200,
        &json!({
            "kind": format!("{}List", target.ty.kind),
            "apiVersion": target.ty.api_version(&target.version),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// A watch: the events after the requested version, then each new one as it happens,
/// as JSON lines on a chunked 200 — until a break, the timeout, or the client leaves.
fn watch_response(shared: &Arc<Shared>, target: Target, query: Query) -> Response<Body> {
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut signals = shared.signal.subscribe();
        let breaks = signals.borrow().breaks;
        let mut bookmarks = signals.borrow().bookmarks;
        let deadline = query.timeout.map(|t| tokio::time::Instant::now() + t);
        let labels = query.label_selector.clone();
        let fields = query.field_selector.clone();
        // Without a version (or "0") the watch starts with the objects there are now.
        let mut sent = match query.resource_version {
            Some(version) if version > 0 => {
                let compacted = shared.lock().compacted;
                if version < compacted {
                    let expired = status(
                        410,
                        "Expired",
                        &format!("too old resource version: {version} ({compacted})"),
                    );
                    let _ = sender
                        .send(line(&json!({"type": "ERROR", "object": expired})))
                        .await;
                    return;
                }
                version
            }
            _ => {
                let (version, objects) = {
                    let state = shared.lock();
                    let objects: Vec<Value> = state
                        .objects
                        .iter()
                        .filter(|((g, k, _, _), o)| {
                            in_scope(&target, g, k, o) && matches(o, &labels, &fields)
                        })
                        .map(|(_, o)| at_version(&target, o.clone()))
                        .collect();
                    (state.resource_version, objects)
                };
                for object in objects {
                    if sender
                        .send(line(&json!({"type": "ADDED", "object": object})))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                version
            }
        };
        loop {
            let (events, version) = {
                let state = shared.lock();
                let events: Vec<Event> = state
                    .history
                    .iter()
                    .filter(|e| e.resource_version > sent)
                    .filter(|e| in_scope(&target, &e.group, &e.object_kind, &e.object))
                    .filter(|e| matches(&e.object, &labels, &fields))
                    .cloned()
                    .collect();
                (events, state.resource_version)
            };
            for event in events {
                let object = at_version(&target, event.object);
                if sender
                    .send(line(&json!({"type": event.kind, "object": object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            sent = version;
            let bookmark_requested = signals.borrow().bookmarks != bookmarks;
            if bookmark_requested {
                bookmarks = signals.borrow().bookmarks;
                if query.bookmarks {
                    let bookmark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": target.ty.kind,
                            "apiVersion": target.ty.api_version(&target.version),
                            "metadata": {"resourceVersion": sent.to_string()}
                        }
                    });
                    if sender.send(line(&bookmark)).await.is_err() {
                        return;
                    }
                }
            }
            let timeout = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = signals.changed() => {
                    if changed.is_err() || signals.borrow().breaks != breaks {
                        return;
                    }
                }
                () = timeout => return,
                () = sender.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(stream).boxed())
        .expect("a valid response")
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}
