//! The test API server as a real kube-rs client sees it.
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ListParams, WatchEvent, WatchParams},
    runtime::watcher,
    Api, Client,
};
use serde_json::json;
use warren_test_apiserver::TestApiServer;

const WAIT: Duration = Duration::from_secs(20);

fn client(server: &TestApiServer) -> Client {
    Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap()
}

fn pod(namespace: &str, name: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]}
    })
}

fn names(pods: &[Pod]) -> Vec<String> {
    let mut names: Vec<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn lists_page_with_continue_and_filter_by_selectors() {
    let server = TestApiServer::start().await.unwrap();
    for (i, node) in ["n1", "n2", "n1", "n1", "n2"].iter().enumerate() {
        server.apply(pod("demo", &format!("p{i}"), node));
    }
    server.apply(pod("other", "q", "n1"));
    let pods: Api<Pod> = Api::namespaced(client(&server), "demo");

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(&first.items), ["p0", "p1"]);
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(&second.items), ["p2", "p3"]);
    let third = pods
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_ref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(&third.items), ["p4"]);
    assert!(third.metadata.continue_.is_none());

    let on_n1 = Api::<Pod>::all(client(&server))
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(names(&on_n1.items), ["p0", "p2", "p3", "q"]);
    let labelled = pods
        .list(&ListParams::default().labels("app=p3"))
        .await
        .unwrap();
    assert_eq!(names(&labelled.items), ["p3"]);

    // A continue token from before a compaction is expired, as etcd's are.
    let stale = pods.list(&ListParams::default().limit(1)).await.unwrap();
    server.apply(pod("demo", "p9", "n1"));
    server.compact();
    let err = pods
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(stale.metadata.continue_.as_ref().unwrap()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 410),
        "{err}"
    );
}

#[tokio::test]
async fn watches_replay_from_a_version_send_bookmarks_and_expire_after_compaction() {
    let server = TestApiServer::start().await.unwrap();
    server.apply(pod("demo", "a", "n1"));
    let pods: Api<Pod> = Api::namespaced(client(&server), "demo");
    let listed = pods.list(&ListParams::default()).await.unwrap();
    let version = listed.metadata.resource_version.clone().unwrap();
    server.apply(pod("demo", "b", "n1"));
    assert!(server.delete("v1", "Pod", Some("demo"), "a"));

    let params = WatchParams {
        bookmarks: true,
        ..WatchParams::default()
    };
    let mut events = pods.watch(&params, &version).await.unwrap().boxed();
    assert!(
        matches!(next(&mut events).await, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("b"))
    );
    assert!(
        matches!(next(&mut events).await, WatchEvent::Deleted(p) if p.metadata.name.as_deref() == Some("a"))
    );
    server.send_bookmarks();
    assert!(matches!(next(&mut events).await, WatchEvent::Bookmark(_)));
    server.apply(pod("demo", "c", "n1"));
    assert!(
        matches!(next(&mut events).await, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("c"))
    );

    server.compact();
    let mut expired = pods
        .watch(&WatchParams::default(), &version)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, expired.try_next())
        .await
        .unwrap()
    {
        Ok(Some(WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

async fn next(
    events: &mut (impl futures_util::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    tokio::time::timeout(WAIT, events.try_next())
        .await
        .expect("an event in time")
        .expect("no error")
        .expect("the stream goes on")
}

/// kube-runtime's watcher across a broken watch, a compaction and injected errors ends
/// with exactly the server's objects.
#[tokio::test]
async fn a_kube_watcher_recovers_from_breaks_410_and_errors() {
    let server = TestApiServer::start().await.unwrap();
    server.apply(pod("demo", "a", "n1"));
    let (reader, writer) = kube::runtime::reflector::store::<Pod>();
    let stream = kube::runtime::reflector(
        writer,
        watcher(Api::<Pod>::all(client(&server)), watcher::Config::default()),
    );
    let driver = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();

    // Once the watch is open: changes it misses (broken), whose history is then gone.
    while !server.requests().iter().any(|r| r.watch && r.status == 200) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.fail_next(2, 503);
    server.break_watches();
    server.apply(pod("demo", "b", "n1"));
    assert!(server.delete("v1", "Pod", Some("demo"), "a"));
    server.compact();
    server.apply(pod("demo", "c", "n1"));

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut now: Vec<String> = reader
            .state()
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        now.sort();
        if now == ["b", "c"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store {now:?}; requests {:#?}",
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.status == 503));
    assert!(
        requests
            .iter()
            .filter(|r| !r.watch && r.method == "GET")
            .count()
            >= 2,
        "the 410 should have made the watcher list again: {requests:#?}"
    );
    driver.abort();
}

#[tokio::test]
async fn creates_replaces_and_unserved_kinds() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server), "demo");
    let created = pods
        .create(
            &Default::default(),
            &serde_json::from_value(pod("demo", "a", "n1")).unwrap(),
        )
        .await
        .unwrap();
    let mut changed = created.clone();
    changed.metadata.labels = Some([("tier".to_owned(), "web".to_owned())].into());
    let replaced = pods
        .replace("a", &Default::default(), &changed)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    // A replace from a stale version conflicts.
    let err = pods
        .replace("a", &Default::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );
    assert_eq!(
        server.get("v1", "Pod", Some("demo"), "a").unwrap()["metadata"]["labels"]["tier"],
        "web"
    );

    server.serve_versions("security.istio.io", "peerauthentications", &["v1beta1"]);
    let resource = kube::api::ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "PeerAuthentication".into(),
        plural: "peerauthentications".into(),
    };
    let err = Api::<kube::api::DynamicObject>::all_with(client(&server), &resource)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err}"
    );
}
