//! `warren ca serve` and the agents' client, end to end: real TLS and HTTP/2, Istio's
//! gRPC messages, TokenReviews and pod lookups answered by the test API server.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::{json, Value};
use warren_test_apiserver::TestApiServer;

use super::*;
use crate::identity::{remote::RemoteCa, SecretManager};

const AUDIENCE: &str = "warren-ca";

/// The tokens the test API server's TokenReview knows, and whose they are.
fn users() -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        (
            "agent-n1",
            json!({"username": "system:serviceaccount:warren-system:warren-agent",
                   "extra": {"authentication.kubernetes.io/node-name": ["n1"],
                             "authentication.kubernetes.io/pod-name": ["warren-agent-a"]}}),
        ),
        // An older cluster: the token names the agent's pod, not its node.
        (
            "agent-n2-pod-only",
            json!({"username": "system:serviceaccount:warren-system:warren-agent",
                   "extra": {"authentication.kubernetes.io/pod-name": ["warren-agent-b"]}}),
        ),
        (
            "client",
            json!({"username": "system:serviceaccount:demo:client"}),
        ),
        ("a-person", json!({"username": "alice@example.com"})),
    ])
}

/// Tokens for which the test API server behaves like one that ignores `spec.audiences`:
/// authenticated, for the audiences it answers (`None`: no `audiences` field at all).
fn audience_ignored(token: &str) -> Option<Option<Value>> {
    match token {
        // A token minted for the API server (or another service), accepted as such.
        "client-for-the-api" => Some(Some(json!(["https://kubernetes.default.svc"]))),
        // An old API server: no audiences in its answer.
        "client-old-apiserver" => Some(None),
        _ => None,
    }
}

fn pod(namespace: &str, name: &str, service_account: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"nodeName": node, "serviceAccountName": service_account, "containers": [{"name": "c"}]},
        "status": {"phase": "Running"}
    })
}

struct Fixture {
    api: TestApiServer,
    args: CaServeArgs,
    dir: tempfile::TempDir,
    address: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    service: Arc<CaService>,
    tls: Arc<rustls::ServerConfig>,
}

impl Fixture {
    async fn start() -> Self {
        let api = TestApiServer::start().await.unwrap();
        api.on_create("authentication.k8s.io", "tokenreviews", |mut review: Value| {
            let token = review["spec"]["token"].as_str().unwrap_or_default().to_owned();
            let audience_ok = review["spec"]["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
            if let Some(audiences) = audience_ignored(&token) {
                let user = json!({"username": "system:serviceaccount:demo:client"});
                review["status"] = match audiences {
                    Some(audiences) => {
                        json!({"authenticated": true, "user": user, "audiences": audiences})
                    }
                    None => json!({"authenticated": true, "user": user}),
                };
                return Ok(review);
            }
            review["status"] = match users().get(token.as_str()) {
                Some(user) if audience_ok => {
                    json!({"authenticated": true, "user": user, "audiences": [AUDIENCE]})
                }
                Some(_) => json!({"authenticated": false, "error": "token audiences [\"api\"] do not match [\"warren-ca\"]"}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            Ok(review)
        });
        api.apply(pod("demo", "client-1", "client", "n1"));
        api.apply(pod("demo", "server-1", "server", "n2"));
        api.apply(pod("warren-system", "warren-agent-a", "warren-agent", "n1"));
        api.apply(pod("warren-system", "warren-agent-b", "warren-agent", "n2"));
        let dir = tempfile::tempdir().unwrap();
        let args = CaServeArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            secret_namespace: "warren-system".into(),
            secret_name: "warren-ca".into(),
            root_configmap: "warren-ca-root".into(),
            trust_domain: "cluster.local".into(),
            dns_names: vec!["localhost".into()],
            trusted_agents: vec!["warren-system/warren-agent".into()],
            token_audience: AUDIENCE.into(),
            max_lifetime: Duration::from_secs(3600),
            work_dir: dir.path().join("ca"),
            readiness_addr: "127.0.0.1:0".parse().unwrap(),
        };
        let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
        let ca = load_or_create(&client, &args).await.unwrap();
        publish_root(&client, &args, &ca).await.unwrap();
        let service = Arc::new(CaService::new(
            ca,
            Authorizer::new(
                client,
                vec![AUDIENCE.into()],
                args.trusted_agents.clone(),
                args.trust_domain.clone(),
            ),
            args.max_lifetime,
        ));
        let tls = service.tls_config(&args.dns_names).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, tls.clone(), service.clone()));
        let root = api
            .get("v1", "ConfigMap", Some("warren-system"), "warren-ca-root")
            .expect("the root is published");
        std::fs::write(
            dir.path().join("root-cert.pem"),
            root["data"]["root-cert.pem"].as_str().unwrap(),
        )
        .unwrap();
        Self {
            api,
            args,
            dir,
            address,
            server,
            service,
            tls,
        }
    }

    fn token_file(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("token-{token}"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path
    }

    fn root_cert(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    fn client(&self, token: &str) -> Arc<SecretManager> {
        self.client_with_lifetime(token, Duration::from_secs(3600))
    }

    fn client_with_lifetime(&self, token: &str, lifetime: Duration) -> Arc<SecretManager> {
        let ca = RemoteCa::new(
            &format!("https://localhost:{}", self.address.port()),
            &self.root_cert(),
            Some(self.token_file(token)),
        )
        .unwrap();
        SecretManager::new(Arc::new(ca), lifetime)
    }
}

fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity::new("cluster.local", namespace, service_account).unwrap()
}

async fn fetch(manager: &SecretManager, identity: &Identity) -> Result<String, String> {
    match tokio::time::timeout(Duration::from_secs(20), manager.fetch(identity)).await {
        Ok(Ok(key)) => Ok(Identity::from_certificate(&key.cert[0])
            .unwrap()
            .to_string()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_the_identities_of_its_nodes_pods_and_no_others() {
    let fixture = Fixture::start().await;
    let on_n1 = fixture.client("agent-n1");
    let client = identity("demo", "client");
    assert_eq!(fetch(&on_n1, &client).await, Ok(client.to_string()));
    let server = identity("demo", "server");
    let refused = fetch(&on_n1, &server).await.unwrap_err();
    assert!(
        refused.contains("PermissionDenied")
            && refused.contains("no pod of that identity is scheduled on n1"),
        "{refused}"
    );
    // The node from the agent's pod, when the token names only the pod.
    let on_n2 = fixture.client("agent-n2-pod-only");
    assert_eq!(fetch(&on_n2, &server).await, Ok(server.to_string()));
    assert!(fetch(&on_n2, &client)
        .await
        .unwrap_err()
        .contains("scheduled on n2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reviewed_and_workloads_get_only_themselves() {
    let fixture = Fixture::start().await;
    let unknown = fetch(&fixture.client("forged"), &identity("demo", "client"))
        .await
        .unwrap_err();
    assert!(
        unknown.contains("Unauthenticated") && unknown.contains("invalid bearer token"),
        "{unknown}"
    );
    let person = fetch(&fixture.client("a-person"), &identity("demo", "client"))
        .await
        .unwrap_err();
    assert!(person.contains("not a service account"), "{person}");

    let workload = fixture.client("client");
    let client = identity("demo", "client");
    assert_eq!(fetch(&workload, &client).await, Ok(client.to_string()));
    let other = fetch(&workload, &identity("demo", "server"))
        .await
        .unwrap_err();
    assert!(other.contains("may have only its own identity"), "{other}");
    let foreign = fetch(
        &fixture.client("agent-n1"),
        &Identity::new("other.domain", "demo", "client").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(foreign.contains("trust domain"), "{foreign}");
}

/// An API server that says authenticated without saying it is for the CA's audience
/// (it ignored `spec.audiences`, or is too old to know them) is not believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_audience_is_refused_even_when_authenticated() {
    let fixture = Fixture::start().await;
    let client = identity("demo", "client");
    let other = fetch(&fixture.client("client-for-the-api"), &client)
        .await
        .unwrap_err();
    assert!(
        other.contains("Unauthenticated")
            && other.contains("audiences [https://kubernetes.default.svc]")
            && other.contains("[warren-ca]"),
        "{other}"
    );
    let none = fetch(&fixture.client("client-old-apiserver"), &client)
        .await
        .unwrap_err();
    assert!(
        none.contains("Unauthenticated") && none.contains("audiences []"),
        "{none}"
    );
    // The same service account with a token for the CA's audience.
    assert_eq!(
        fetch(&fixture.client("client"), &client).await,
        Ok(client.to_string())
    );
}

/// The CA lives in its Secret: a second start (another replica, a restart) signs with
/// the same root, and the published root is that root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_is_kept_in_its_secret_and_its_root_published() {
    let fixture = Fixture::start().await;
    let client =
        kube::Client::try_from(kube::Config::new(fixture.api.url().parse().unwrap())).unwrap();
    let again = load_or_create(&client, &fixture.args).await.unwrap();
    assert_eq!(again.roots(), fixture.service.ca.roots());
    let published = std::fs::read_to_string(fixture.root_cert()).unwrap();
    assert_eq!(published, to_pem(&again.roots()[0]));
    let secret = fixture
        .api
        .get("v1", "Secret", Some("warren-system"), "warren-ca")
        .unwrap();
    for key in CA_FILES {
        assert!(secret["data"][key].is_string(), "the Secret holds {key}");
    }
}

/// Certificates of 4 s are renewed at half-life; the CA goes away for a while, the
/// current certificate keeps being served, and once the CA is back it is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_waits_out_a_ca_that_is_down() {
    let mut fixture = Fixture::start().await;
    let manager = fixture.client_with_lifetime("agent-n1", Duration::from_secs(4));
    let client = identity("demo", "client");
    fetch(&manager, &client).await.unwrap();
    let first = manager.current(&client).unwrap();

    fixture.server.abort();
    let _ = (&mut fixture.server).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = manager
        .current(&client)
        .expect("still a certificate while the CA is down");
    assert_eq!(during.cert[0], first.cert[0], "nothing new could be signed");

    let listener = tokio::net::TcpListener::bind(fixture.address)
        .await
        .unwrap();
    fixture.server = tokio::spawn(serve(
        listener,
        fixture.tls.clone(),
        fixture.service.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while manager.current(&client).unwrap().cert[0] == first.cert[0] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not renewed once the CA was back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_token_file_path_is_what_the_client_reads() {
    // RemoteCa refuses what it cannot use, with the reason.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let err = RemoteCa::new("http://ca:15012", Path::new("/nonexistent"), None).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    let err =
        RemoteCa::new("https://ca:15012", Path::new("/nonexistent/root.pem"), None).unwrap_err();
    assert!(err.to_string().contains("root certificates"), "{err}");
}
