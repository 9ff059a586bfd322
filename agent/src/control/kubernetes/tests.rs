//! The Kubernetes source against an API server the tests serve themselves
//! (`warren-test-apiserver`: real HTTP, list + watch with resource versions, bookmarks,
//! `410 Gone`, injected errors and delays), through a real kube-rs client.
use std::{sync::Arc, time::Duration};

use serde_json::json;
use warren_test_apiserver::TestApiServer;

use super::{ClusterState, KubernetesControl};
use crate::policy::{ConnectionInfo, MtlsMode, PolicyConfig};

/// Generous: a 2-core CI machine under load; states normally arrive in milliseconds.
const WAIT: Duration = Duration::from_secs(20);

async fn server() -> TestApiServer {
    TestApiServer::start()
        .await
        .expect("start the test API server")
}

fn client(server: &TestApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("server URL"));
    kube::Client::try_from(config).expect("kube client")
}

async fn control(server: &TestApiServer) -> KubernetesControl {
    let started = KubernetesControl::start(
        client(server),
        PolicyConfig {
            root_namespace: "istio-system".into(),
            ..PolicyConfig::default()
        },
    );
    tokio::time::timeout(WAIT, started)
        .await
        .expect("the first state within the wait")
}

/// Wait until the published state satisfies `ok`.
async fn until(
    control: &KubernetesControl,
    what: &str,
    ok: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let mut states = control.subscribe();
    let waited = tokio::time::timeout(WAIT, states.wait_for(|state| ok(state))).await;
    match waited {
        Ok(Ok(state)) => state.clone(),
        _ => panic!("{what}: not reached; last state: {:#?}", control.current()),
    }
}

fn namespace(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn in_mesh_on(state: &ClusterState, node: &str) -> Vec<String> {
    let mut names: Vec<String> = state
        .config
        .enrolled_on(node)
        .iter()
        .map(|w| w.to_string())
        .collect();
    names.sort();
    names
}

fn workload_names(state: &ClusterState) -> Vec<String> {
    let mut names: Vec<String> = state
        .config
        .workloads
        .iter()
        .map(|w| w.to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn labelling_a_namespace_enrolls_its_pods_and_removing_the_label_takes_them_out() {
    let server = server().await;
    server.apply(namespace("demo", json!({})));
    server.apply(pod("demo", "client", "n1", "10.77.1.10"));
    server.apply(pod("demo", "server", "n2", "10.77.2.10"));
    let control = control(&server).await;
    let state = control.current();
    assert_eq!(workload_names(&state), ["demo/client", "demo/server"]);
    assert!(in_mesh_on(&state, "n1").is_empty(), "not labelled yet");

    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    let state = until(&control, "demo enrolled", |s| {
        !in_mesh_on(s, "n1").is_empty()
    })
    .await;
    assert_eq!(
        in_mesh_on(&state, "n1"),
        ["demo/client"],
        "only n1's pods are n1's to capture"
    );
    assert_eq!(in_mesh_on(&state, "n2"), ["demo/server"]);
    let server_workload = state
        .config
        .workloads
        .iter()
        .find(|w| w.name == "server")
        .unwrap();
    assert_eq!(
        server_workload.service_account, "server",
        "identity from the pod's service account"
    );

    server.apply(namespace("demo", json!({})));
    let state = until(&control, "demo left", |s| in_mesh_on(s, "n1").is_empty()).await;
    assert_eq!(
        workload_names(&state),
        ["demo/client", "demo/server"],
        "still known, not in the mesh"
    );
}

#[tokio::test]
async fn istio_ambient_label_enrolls_and_a_pod_annotation_opts_out() {
    let server = server().await;
    server.apply(namespace(
        "shop",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    server.apply(pod("shop", "cart", "n1", "10.0.0.1"));
    let mut opted_out = pod("shop", "batch", "n1", "10.0.0.2");
    opted_out["metadata"]["annotations"] = json!({"warren.dev/mesh": "disabled"});
    server.apply(opted_out);
    let control = control(&server).await;
    assert_eq!(in_mesh_on(&control.current(), "n1"), ["shop/cart"]);
}

#[tokio::test]
async fn pods_added_and_deleted_are_followed() {
    let server = server().await;
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    let control = control(&server).await;
    assert!(control.current().config.workloads.is_empty());
    server.apply(pod("demo", "a", "n1", "10.0.0.1"));
    until(&control, "pod a added", |s| {
        in_mesh_on(s, "n1") == ["demo/a"]
    })
    .await;
    // An address arrives later than the pod (Pending without IP, then Running).
    let mut pending = pod("demo", "b", "n1", "10.0.0.2");
    pending["status"] = json!({"phase": "Pending"});
    server.apply(pending);
    server.apply(pod("demo", "b", "n1", "10.0.0.2"));
    until(&control, "pod b with its address", |s| {
        in_mesh_on(s, "n1") == ["demo/a", "demo/b"]
    })
    .await;
    assert!(server.delete("v1", "Pod", Some("demo"), "a"));
    until(&control, "pod a deleted", |s| {
        in_mesh_on(s, "n1") == ["demo/b"]
    })
    .await;
}

#[tokio::test]
async fn policy_objects_from_the_api_change_decisions() {
    let server = server().await;
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    server.apply(pod("demo", "server", "n1", "10.0.0.2"));
    let control = control(&server).await;
    let server_workload = |state: &ClusterState| {
        state
            .config
            .workloads
            .iter()
            .find(|w| w.name == "server")
            .cloned()
            .unwrap()
    };
    let state = control.current();
    assert_eq!(
        state.policies.mtls_mode(&server_workload(&state), 9000).0,
        MtlsMode::Permissive
    );

    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"namespace": "demo", "name": "strict"},
        "spec": {"mtls": {"mode": "STRICT"}}
    }));
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "demo", "name": "only-client"},
        "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}
    }));
    let state = until(&control, "both policies in force", |s| {
        s.policies.authorization_policies().len() == 1
            && s.policies.peer_authentications().len() == 1
    })
    .await;
    let workload = server_workload(&state);
    assert_eq!(
        state.policies.mtls_mode(&workload, 9000).0,
        MtlsMode::Strict
    );
    let from = |identity: &str| ConnectionInfo {
        source_ip: "10.0.0.1".parse().unwrap(),
        source_identity: Some(crate::identity::Identity::parse(identity).unwrap()),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 9000,
    };
    assert!(state
        .policies
        .authorize(&workload, &from("spiffe://cluster.local/ns/demo/sa/client"))
        .is_allow());
    assert!(!state
        .policies
        .authorize(&workload, &from("spiffe://cluster.local/ns/demo/sa/other"))
        .is_allow());

    // A broken update (a typo the decoder refuses) fails closed — STRICT for what it
    // may target, never the PERMISSIVE it might have meant — and says so.
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"namespace": "demo", "name": "strict"},
        "spec": {"mtls": {"mod": "PERMISSIVE"}}
    }));
    let state = until(&control, "the bad update reported", |s| {
        !s.policy_errors.is_empty()
    })
    .await;
    assert!(
        state.policy_errors[0].contains("PeerAuthentication/demo/strict"),
        "{:?}",
        state.policy_errors
    );
    let (mode, decided_by) = state.policies.mtls_mode(&server_workload(&state), 9000);
    assert_eq!(mode, MtlsMode::Strict);
    assert_eq!(
        decided_by.map(|p| format!("{p:?}")).as_deref(),
        Some("policy document kubernetes PeerAuthentication/demo/strict")
    );

    // A broken AuthorizationPolicy refuses everything to what it may target.
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "demo", "name": "only-client"},
        "spec": {"rules": [{"from": [{"source": {"principals": "not-a-list"}}]}]}
    }));
    let state = until(&control, "the bad AuthorizationPolicy in force", |s| {
        s.policies.broken().len() == 2
    })
    .await;
    assert!(!state
        .policies
        .authorize(
            &server_workload(&state),
            &from("spiffe://cluster.local/ns/demo/sa/client")
        )
        .is_allow());

    assert!(server.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("demo"),
        "only-client"
    ));
    let state = until(&control, "the authorization policy removed", |s| {
        s.policies.authorization_policies().is_empty() && s.policies.broken().len() == 1
    })
    .await;
    assert!(state
        .policies
        .authorize(
            &server_workload(&state),
            &from("spiffe://cluster.local/ns/demo/sa/other")
        )
        .is_allow());
}

/// The watch history is compacted and every watch broken while pods change: the
/// watchers get `410 Gone`, relist, and the state has exactly the server's pods —
/// none lost, none twice.
#[tokio::test]
async fn a_broken_watch_or_410_relists_without_losing_or_duplicating_workloads() {
    let server = server().await;
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    for i in 0..5 {
        server.apply(pod(
            "demo",
            &format!("p{i}"),
            "n1",
            &format!("10.0.0.{}", i + 1),
        ));
    }
    let control = control(&server).await;
    assert_eq!(control.current().config.workloads.len(), 5);
    let lists_before = pod_lists(&server);

    server.break_watches();
    server.compact();
    assert!(server.delete("v1", "Pod", Some("demo"), "p0"));
    server.apply(pod("demo", "p5", "n1", "10.0.0.6"));
    server.break_watches();
    server.compact();
    server.apply(pod("demo", "p6", "n1", "10.0.0.7"));
    let want: Vec<String> = (1..=6).map(|i| format!("demo/p{i}")).collect();
    let state = until(&control, "the server's pods after the relist", |s| {
        workload_names(s) == want
    })
    .await;
    assert_eq!(
        state.config.workloads.len(),
        want.len(),
        "no duplicates: {:?}",
        workload_names(&state)
    );
    assert!(
        pod_lists(&server) > lists_before,
        "a relist should have happened: {:?}",
        server.requests()
    );
}

#[tokio::test]
async fn errors_and_slow_answers_are_retried() {
    let server = server().await;
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    server.apply(pod("demo", "a", "n1", "10.0.0.1"));
    server.set_delay(Duration::from_millis(200));
    let control = control(&server).await;
    assert_eq!(in_mesh_on(&control.current(), "n1"), ["demo/a"]);
    server.set_delay(Duration::ZERO);
    // Watches fail and their reconnects are refused a few times: the watchers back off
    // and come back.
    server.fail_next(3, 500);
    server.break_watches();
    server.apply(pod("demo", "b", "n1", "10.0.0.2"));
    until(&control, "pod b after the errors", |s| {
        in_mesh_on(s, "n1") == ["demo/a", "demo/b"]
    })
    .await;
    assert!(
        server.requests().iter().any(|r| r.status == 500),
        "the injected errors should have been served"
    );
}

fn pod_lists(server: &TestApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.watch)
        .count()
}

/// A Service and its EndpointSlice from the API: the VIP resolves to the ready endpoint,
/// at the target port; an endpoint going unready is no longer picked.
#[tokio::test]
async fn a_service_vip_resolves_to_its_ready_endpoints() {
    let server = server().await;
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    server.apply(pod("demo", "server", "n2", "10.77.2.10"));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "demo", "name": "server"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
    }));
    let slice = |ready: bool| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "demo", "name": "server-abcde",
                         "labels": {"kubernetes.io/service-name": "server"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.77.2.10"], "conditions": {"ready": ready}}],
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]
        })
    };
    server.apply(slice(true));
    let control = control(&server).await;
    let vip: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let state = control.current();
    let index = state.config.index();
    let service = index
        .service_by_vip(vip.ip())
        .expect("the ClusterIP is a service");
    assert_eq!(service.hostname(), "server.demo.svc.cluster.local");
    assert_eq!(service.pick(vip), Some("10.77.2.10:9080".parse().unwrap()));

    server.apply(slice(false));
    let state = until(&control, "the endpoint unready", |s| {
        s.config
            .index()
            .service_by_vip(vip.ip())
            .is_some_and(|service| service.pick(vip).is_none())
    })
    .await;
    assert_eq!(state.config.services.len(), 1);
}

/// An older Istio serves its policies at v1beta1 only: they are read there. Without
/// Istio's CRDs there is no policy (and a warning), and pods are still enrolled.
#[tokio::test]
async fn policies_are_read_at_v1beta1_and_missing_crds_mean_no_policy() {
    let server = server().await;
    server.serve_versions("security.istio.io", "peerauthentications", &["v1beta1"]);
    server.serve_versions("security.istio.io", "authorizationpolicies", &[]);
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    server.apply(pod("demo", "server", "n1", "10.0.0.2"));
    server.apply(json!({
        "apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": {"namespace": "demo", "name": "strict"},
        "spec": {"mtls": {"mode": "STRICT"}}
    }));
    let control = control(&server).await;
    let state = control.current();
    assert_eq!(state.policies.peer_authentications().len(), 1);
    assert!(state.policies.authorization_policies().is_empty());
    assert_eq!(in_mesh_on(&state, "n1"), ["demo/server"]);
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.path.contains("/authorizationpolicies") && r.status == 200),
        "nothing to watch where nothing is served"
    );
}

/// Istio's CRDs installed after the agent started: the API server is asked again and
/// their objects come into force without a restart.
#[tokio::test]
async fn crds_installed_later_are_watched() {
    let server = server().await;
    server.serve_versions("security.istio.io", "peerauthentications", &[]);
    server.serve_versions("security.istio.io", "authorizationpolicies", &[]);
    server.apply(namespace("demo", json!({"warren.dev/mesh": "enabled"})));
    server.apply(pod("demo", "server", "n1", "10.0.0.2"));
    let control = control(&server).await;
    assert!(control.current().policies.peer_authentications().is_empty());

    server.serve_versions("security.istio.io", "peerauthentications", &["v1"]);
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"namespace": "demo", "name": "strict"},
        "spec": {"mtls": {"mode": "STRICT"}}
    }));
    let state = until(&control, "the PeerAuthentication CRD watched", |s| {
        s.policies.peer_authentications().len() == 1
    })
    .await;
    assert!(state.policies.authorization_policies().is_empty());

    server.serve_versions("security.istio.io", "authorizationpolicies", &["v1beta1"]);
    server.apply(json!({
        "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "demo", "name": "deny-all"},
        "spec": {"action": "DENY", "rules": [{}]}
    }));
    until(&control, "the AuthorizationPolicy CRD watched", |s| {
        s.policies.authorization_policies().len() == 1
    })
    .await;
}
