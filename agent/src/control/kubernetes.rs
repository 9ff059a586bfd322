//! Kubernetes mode: the cluster's Namespaces, Pods, Services with their EndpointSlices,
//! and Istio security policies, watched with kube-rs reflectors, turned into the same
//! model local mode reads from a file — a [`LocalConfig`] (enrolled namespaces, every
//! workload, services) and a [`PolicySet`].
//!
//! Each resource has a watcher (list, then watch from the list's resourceVersion;
//! bookmarks; a `410 Gone` relists; errors back off and retry — all kube-runtime's
//! `watcher`) feeding a reflector store. Every change wakes one builder, which rebuilds
//! the whole [`ClusterState`] from the stores and publishes it; consumers see whole
//! states, never a half-applied relist (the store swaps a relist in at once).
//!
//! Pods are watched cluster-wide, not just this node's: a connection to a pod on another
//! node is tunnelled only to the identity of *that* pod's service account (secure
//! naming), so every pod's address and identity must be known — what ztunnel learns from
//! istiod, warren reads from the API server. Which pods this node captures is then
//! [`LocalConfig::enrolled_on`].
//!
//! Istio's CRDs are read at `security.istio.io/v1`, else `v1beta1` (older Istio); when
//! neither is served the policies of that kind are empty, with a warning saying how to
//! install them, and the API server is asked again (backing off from 0.5 s to 30 s)
//! until it serves them: CRDs installed after the agent are then watched like the others.
//!
//! A policy object that does not decode fails closed for what it may target, as a local
//! file's document does ([`crate::policy::BrokenPolicy`]; see [`policy`]).
pub mod membership;
pub mod policy;
pub mod services;
#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject, ListParams},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client,
};
use tokio::sync::{watch, Notify};

use super::local::LocalConfig;
use crate::policy::{PolicyConfig, PolicySet};

/// Istio's security API group and the versions tried, newest first.
const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// The policy kinds read, with their plural resource names.
const POLICY_KINDS: [(&str, &str); 2] = [
    ("PeerAuthentication", "peerauthentications"),
    ("AuthorizationPolicy", "authorizationpolicies"),
];
/// Changes arriving this close together are built into one state (a relist, a
/// namespace labelled together with its pods' updates).
const COALESCE: Duration = Duration::from_millis(20);
/// Longest pause between attempts to learn which policy versions are served.
const MAX_DISCOVERY_BACKOFF: Duration = Duration::from_secs(30);

/// What the cluster says, as the workload and policy model.
#[derive(Debug)]
pub struct ClusterState {
    /// Enrolled namespaces and every pod of the cluster that has an address.
    pub config: LocalConfig,
    pub policies: PolicySet,
    /// Policy objects that could not be read (named, with the reason); each is also in
    /// `policies` as a [`crate::policy::BrokenPolicy`], failing closed.
    pub policy_errors: Vec<String>,
}

/// The watches and the latest [`ClusterState`]; the watches stop when this is dropped.
pub struct KubernetesControl {
    state: watch::Receiver<Arc<ClusterState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubernetesControl {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The reflector stores the builder reads.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<KubeService>,
    endpoint_slices: Store<EndpointSlice>,
    /// One store per policy kind served; a kind whose CRD appears later is added.
    policies: PolicyStores,
}

type PolicyStores = Arc<RwLock<Vec<(&'static str, Store<DynamicObject>)>>>;

impl KubernetesControl {
    /// Start watching; returns once every watch has listed once, with the first state.
    /// Until the API server answers, the watches retry with backoff (logging why), so
    /// callers bound the wait themselves.
    pub async fn start(client: Client, policy_config: PolicyConfig) -> Self {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();

        let (namespaces, writer) = reflector::store();
        let stream = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer);
        tasks.push(tokio::spawn(drive("namespaces", stream, changed.clone())));

        let (pods, writer) = reflector::store();
        let stream = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        tasks.push(tokio::spawn(drive("pods", stream, changed.clone())));

        let (services, writer) = reflector::store();
        let stream = watcher(
            Api::<KubeService>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer);
        tasks.push(tokio::spawn(drive("services", stream, changed.clone())));

        let (endpoint_slices, writer) = reflector::store();
        let stream = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer);
        tasks.push(tokio::spawn(drive(
            "endpointslices",
            stream,
            changed.clone(),
        )));

        let policies: PolicyStores = Arc::default();
        for (kind, plural) in POLICY_KINDS {
            match served_version(&client, kind, plural).await {
                Some(resource) => tasks.push(tokio::spawn(drive(
                    kind,
                    policy_watch(client.clone(), kind, &resource, &policies),
                    changed.clone(),
                ))),
                None => {
                    tracing::warn!(
                        kind,
                        "the API server serves no {kind} ({ISTIO_SECURITY_GROUP}/v1 or v1beta1): Istio's CRDs are not installed, so no {kind} is in force until they are; `kubectl apply -k deploy/` installs them"
                    );
                    tasks.push(tokio::spawn(await_served(
                        client.clone(),
                        kind,
                        plural,
                        policies.clone(),
                        changed.clone(),
                    )));
                }
            }
        }
        let stores = Stores {
            namespaces,
            pods,
            services,
            endpoint_slices,
            policies,
        };
        // Nothing is published before every store has listed once: a state built from a
        // half-listed cluster would take pods out of the mesh that are in it.
        stores.namespaces.wait_until_ready().await.ok();
        stores.pods.wait_until_ready().await.ok();
        stores.services.wait_until_ready().await.ok();
        stores.endpoint_slices.wait_until_ready().await.ok();
        let listing: Vec<Store<DynamicObject>> = read(&stores.policies)
            .iter()
            .map(|(_, store)| store.clone())
            .collect();
        for store in listing {
            store.wait_until_ready().await.ok();
        }

        let mut objects = policy::PolicyObjects::default();
        let first = build(&stores, &mut objects, &policy_config);
        let mut logged = log_state(&first, None);
        let (publish, state) = watch::channel(Arc::new(first));
        tasks.push(tokio::spawn(async move {
            loop {
                changed.notified().await;
                tokio::time::sleep(COALESCE).await;
                let next = build(&stores, &mut objects, &policy_config);
                logged = log_state(&next, Some(&logged));
                if publish.send(Arc::new(next)).is_err() {
                    return;
                }
            }
        }));
        Self { state, tasks }
    }

    /// The state now.
    pub fn current(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// Every new state from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }
}

/// Run one reflector's watch until the control is dropped, waking the builder at each
/// change. Errors (the API server down, 5xx, a broken stream) are logged; the watcher's
/// backoff retries and a 410 relists, so the loop never ends on its own.
async fn drive<K>(
    resource: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    changed: Arc<Notify>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            // A relist is swapped into the store at InitDone: rebuilding earlier would
            // see the old list.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => changed.notify_one(),
            Err(err) => {
                tracing::warn!(resource, error = %err, "Kubernetes watch failed; retrying with backoff")
            }
        }
    }
}

fn read(
    stores: &PolicyStores,
) -> std::sync::RwLockReadGuard<'_, Vec<(&'static str, Store<DynamicObject>)>> {
    stores
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Add a store for the objects of a policy kind at `resource` to `stores` (at once, so
/// that start-up waits for its list), and return the watch that fills it.
fn policy_watch(
    client: Client,
    kind: &'static str,
    resource: &ApiResource,
    stores: &PolicyStores,
) -> impl Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send + 'static {
    let writer = reflector::store::Writer::new(resource.clone());
    stores
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((kind, writer.as_reader()));
    watcher(
        Api::<DynamicObject>::all_with(client, resource),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
}

/// Ask again, backing off, until the API server serves a policy kind it did not serve
/// at start-up (Istio's CRDs installed after the agent); then watch it. Its store is
/// empty until its first list is in (the reflector swaps a list in whole), so no state
/// shows it half-listed.
async fn await_served(
    client: Client,
    kind: &'static str,
    plural: &'static str,
    stores: PolicyStores,
    changed: Arc<Notify>,
) {
    let mut pause = Duration::from_millis(500);
    let resource = loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_DISCOVERY_BACKOFF);
        if let Some(resource) = served_version(&client, kind, plural).await {
            break resource;
        }
    };
    tracing::info!(kind, api_version = %resource.api_version, "the API server now serves {kind}: watching it");
    drive(
        kind,
        policy_watch(client, kind, &resource, &stores),
        changed,
    )
    .await;
}

/// The newest served version of an Istio policy kind, or `None` if none is served.
/// Other failures (the API server not answering yet, 5xx) are retried with backoff, as
/// the watches retry theirs.
async fn served_version(client: &Client, kind: &'static str, plural: &str) -> Option<ApiResource> {
    let mut backoff = Duration::from_millis(500);
    'retry: loop {
        for version in ISTIO_SECURITY_VERSIONS {
            let resource = ApiResource {
                group: ISTIO_SECURITY_GROUP.to_owned(),
                version: version.to_owned(),
                api_version: format!("{ISTIO_SECURITY_GROUP}/{version}"),
                kind: kind.to_owned(),
                plural: plural.to_owned(),
            };
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => return Some(resource),
                Err(kube::Error::Api(status)) if status.code == 404 => continue,
                Err(err) => {
                    tracing::warn!(kind, error = %err, "cannot ask the Kubernetes API server which {kind} versions it serves; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_DISCOVERY_BACKOFF);
                    continue 'retry;
                }
            }
        }
        return None;
    }
}

fn build(
    stores: &Stores,
    objects: &mut policy::PolicyObjects,
    config: &PolicyConfig,
) -> ClusterState {
    let namespaces = stores.namespaces.state();
    let mesh_namespaces = membership::enrolled_namespaces(namespaces.iter().map(|ns| ns.as_ref()));
    let pods = stores.pods.state();
    let workloads = membership::workloads(pods.iter().map(|pod| pod.as_ref()), &mesh_namespaces);
    let slices = stores.endpoint_slices.state();
    let slices: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
    let kube_services = stores.services.state();
    let services = services::services(kube_services.iter().map(|s| s.as_ref()), &slices);
    // Store order is arbitrary; policies of equal age must keep one order.
    let mut policy_objects: Vec<(&str, Arc<DynamicObject>)> = read(&stores.policies)
        .iter()
        .flat_map(|(kind, store)| store.state().into_iter().map(move |o| (*kind, o)))
        .collect();
    policy_objects.sort_by(|(ka, a), (kb, b)| {
        (ka, &a.metadata.namespace, &a.metadata.name).cmp(&(
            kb,
            &b.metadata.namespace,
            &b.metadata.name,
        ))
    });
    let decoded = objects.decode(
        policy_objects.iter().map(|(kind, o)| (*kind, o.as_ref())),
        &config.root_namespace,
    );
    ClusterState {
        config: LocalConfig {
            mesh_namespaces,
            workloads,
            services,
        },
        policies: PolicySet::decoded(config.clone(), decoded.policies, decoded.broken),
        policy_errors: decoded.errors,
    }
}

/// Log a state: at info (and its policy errors as warnings) when its summary differs
/// from the `previous` one logged — a namespace enrolled, a pod joined, a policy
/// applied or refused — else at debug: every pod change in the cluster makes a state.
/// Returns the summary.
fn log_state(state: &ClusterState, previous: Option<&str>) -> String {
    let mut enrolled: Vec<&String> = state.config.mesh_namespaces.iter().collect();
    enrolled.sort();
    let in_mesh = state.config.workloads.iter().filter(|w| w.in_mesh).count();
    let peer_authentications = state.policies.peer_authentications().len();
    let authorization_policies = state.policies.authorization_policies().len();
    let summary = format!(
        "{enrolled:?} {in_mesh} {} {peer_authentications} {authorization_policies} {:?}",
        state.config.services.len(),
        state.policy_errors
    );
    let changed = previous != Some(summary.as_str());
    if changed {
        for error in &state.policy_errors {
            tracing::warn!("policy from the cluster not read: {error}");
        }
    }
    macro_rules! log_at {
        ($level:ident) => {
            tracing::$level!(
                namespaces = ?enrolled,
                workloads = state.config.workloads.len(),
                services = state.config.services.len(),
                in_mesh,
                peer_authentications,
                authorization_policies,
                "cluster state"
            )
        };
    }
    if changed {
        log_at!(info);
    } else {
        log_at!(debug);
    }
    summary
}
