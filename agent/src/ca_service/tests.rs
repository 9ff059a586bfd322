//! `warren ca serve` and the agents' client, end to end: real TLS and HTTP/2, Istio's
//! gRPC messages, TokenReviews and pod lookups answered by the test API server.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::Parser as _;
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

/// `warren ca serve`'s defaults, with local addresses and a short max lifetime.
fn default_args() -> CaServeArgs {
    let mut args = CaServe::try_parse_from(["ca-serve"]).unwrap().args;
    args.listen = "127.0.0.1:0".parse().unwrap();
    args.readiness_addr = "127.0.0.1:0".parse().unwrap();
    args.dns_names = vec!["localhost".into()];
    args.token_audience = AUDIENCE.into();
    args.max_lifetime = Duration::from_secs(3600);
    args
}

#[derive(clap::Parser)]
struct CaServe {
    #[command(flatten)]
    args: CaServeArgs,
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
        Self::start_with(|_| {}).await
    }

    /// Start with the flags `configure` changes from `warren ca serve`'s defaults.
    async fn start_with(configure: impl FnOnce(&mut CaServeArgs)) -> Self {
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
        let mut args = CaServeArgs {
            work_dir: dir.path().join("ca"),
            ..default_args()
        };
        configure(&mut args);
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
            )
            .with_token_cache(TokenCache::new(args.token_cache_ttl, args.token_cache_size)),
            args.max_lifetime,
            Limits::from(&args),
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

// ---------------------------------------------------------------------------------------
// Bounded under abuse: calls made by hand, with bodies the agents would never send.

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
type Sender = hyper::client::conn::http2::SendRequest<TestBody>;

impl Fixture {
    /// An HTTP/2 connection over TLS to the service, and the task driving it.
    async fn connect(&self) -> (Sender, tokio::task::JoinHandle<()>) {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.root_cert()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.address).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        (sender, driver)
    }

    /// TokenReviews the API server has answered so far.
    fn token_reviews(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews"))
            .count()
    }

    /// Wait until `permits` of `semaphore` are free (a call or connection got in, or
    /// was done with).
    async fn wait_for_permits(&self, semaphore: &Semaphore, permits: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while semaphore.available_permits() != permits {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A body that starts a message of 100 bytes and never sends them.
fn never_ending_body() -> TestBody {
    let start =
        futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 100])))]);
    let never = futures_util::stream::pending();
    StreamBody::new(futures_util::StreamExt::chain(start, never)).boxed()
}

/// One CreateCertificate call: its gRPC status and message.
async fn call(sender: &mut Sender, token: Option<&str>, body: TestBody) -> (Code, String) {
    let mut request = http::Request::post(format!("https://localhost{}", grpc::CREATE_CERTIFICATE))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let answer = async {
        sender.ready().await.unwrap();
        let response = sender
            .send_request(request.body(body).unwrap())
            .await
            .unwrap();
        let trailers = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .trailers()
            .cloned()
            .unwrap_or_default();
        let field = |name| {
            trailers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        (
            Code::from_number(field("grpc-status").parse().unwrap()).unwrap(),
            grpc::decode_message(&field("grpc-message")),
        )
    };
    tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("an answer")
}

/// The token is reviewed from the headers alone: a call without a good token is refused
/// at once, though its body never ends (reading it would wait for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_good_token_is_refused_before_its_body_is_read() {
    let fixture = Fixture::start_with(|args| {
        args.request_read_timeout = Duration::from_secs(3600);
    })
    .await;
    let (mut sender, _driver) = fixture.connect().await;
    let (code, message) = call(&mut sender, None, never_ending_body()).await;
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("no bearer token"), "{message}");
    let (code, message) = call(&mut sender, Some("forged"), never_ending_body()).await;
    assert_eq!(code, Code::Unauthenticated, "{message}");
    assert!(message.contains("invalid bearer token"), "{message}");
    assert_eq!(fixture.token_reviews(), 1);
    // Nothing is held by the refused calls.
    assert_eq!(
        fixture.service.requests.available_permits(),
        fixture.service.limits.max_concurrent_requests
    );
}

/// An authenticated caller's body must arrive within --request-read-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_refused() {
    let fixture = Fixture::start_with(|args| {
        args.request_read_timeout = Duration::from_millis(200);
    })
    .await;
    let (mut sender, _driver) = fixture.connect().await;
    let (code, message) = call(&mut sender, Some("client"), never_ending_body()).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("--request-read-timeout"), "{message}");
    assert_eq!(
        fixture.service.requests.available_permits(),
        fixture.service.limits.max_concurrent_requests
    );
}

/// `read_body` on tokio's paused clock: the timeout, a body in time, a body too long.
#[tokio::test(start_paused = true)]
async fn read_body_waits_its_timeout_and_no_more() {
    let timeout = Duration::from_secs(10);
    let status = read_body(never_ending_body(), timeout).await.unwrap_err();
    assert_eq!(status.code, Code::DeadlineExceeded);
    assert!(status.message.contains("within 10s"), "{}", status.message);

    let late = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_secs(9)).await;
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"csr")))
    });
    assert_eq!(
        read_body(StreamBody::new(late), timeout).await.unwrap(),
        Bytes::from_static(b"csr")
    );

    let too_long = Full::new(Bytes::from(vec![0; MAX_REQUEST_BODY + 1]));
    let status = read_body(too_long, timeout).await.unwrap_err();
    assert_eq!(status.code, Code::InvalidArgument, "{}", status.message);
}

/// Over --max-concurrent-requests a call is answered RESOURCE_EXHAUSTED at once; the
/// slot is free again when the call holding it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_cap_are_answered_resource_exhausted() {
    let fixture = Fixture::start_with(|args| {
        args.max_concurrent_requests = 1;
        args.request_read_timeout = Duration::from_secs(3600);
    })
    .await;
    // An authenticated call whose body never comes holds the one slot.
    let (mut sender, driver) = fixture.connect().await;
    let holding =
        tokio::spawn(async move { call(&mut sender, Some("client"), never_ending_body()).await });
    fixture
        .wait_for_permits(&fixture.service.requests, 0, "the first call never got in")
        .await;

    let client = identity("demo", "client");
    let refused = fetch(&fixture.client("client"), &client).await.unwrap_err();
    assert!(
        refused.contains("ResourceExhausted") && refused.contains("--max-concurrent-requests"),
        "{refused}"
    );

    // The holder goes away: its slot is free again.
    driver.abort();
    holding.abort();
    fixture
        .wait_for_permits(&fixture.service.requests, 1, "the slot was not freed")
        .await;
    assert_eq!(
        fetch(&fixture.client("client"), &client).await,
        Ok(client.to_string())
    );
}

/// A burst of CSRs with one token (an agent fetching its node's identities) costs one
/// TokenReview; a refused token is reviewed at every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_with_one_token_costs_one_token_review() {
    let fixture = Fixture::start().await;
    assert_eq!(fixture.token_reviews(), 0);
    let client = identity("demo", "client");
    let managers: Vec<_> = (0..4).map(|_| fixture.client("agent-n1")).collect();
    let fetched = futures_util::future::join_all(managers.iter().map(|m| fetch(m, &client))).await;
    assert!(
        fetched.iter().all(|f| f == &Ok(client.to_string())),
        "{fetched:?}"
    );
    assert_eq!(fixture.token_reviews(), 1);
    // Later calls within the cache's time: no new review.
    assert_eq!(
        fetch(&fixture.client("agent-n1"), &client).await,
        Ok(client.to_string())
    );
    assert_eq!(fixture.token_reviews(), 1);
    // What the agent may have is still decided at every call.
    assert!(
        fetch(&fixture.client("agent-n1"), &identity("demo", "server"))
            .await
            .unwrap_err()
            .contains("no pod of that identity is scheduled on n1")
    );

    for _ in 0..3 {
        let refused = fetch(&fixture.client("forged"), &client).await.unwrap_err();
        assert!(refused.contains("Unauthenticated"), "{refused}");
    }
    assert_eq!(
        fixture.token_reviews(),
        4,
        "a refused token is reviewed every time"
    );
}

/// Over --max-connections a connection is reset as it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_reset() {
    use tokio::io::AsyncReadExt as _;
    let fixture = Fixture::start_with(|args| args.max_connections = 1).await;
    // A connection that never starts its TLS handshake holds the one slot.
    let first = tokio::net::TcpStream::connect(fixture.address)
        .await
        .unwrap();
    fixture
        .wait_for_permits(
            &fixture.service.connections,
            0,
            "the first connection was not accepted",
        )
        .await;
    // On loopback the reset may come before connect() has returned.
    let second = async {
        let mut second = tokio::net::TcpStream::connect(fixture.address).await?;
        second.read(&mut [0; 1]).await
    };
    let read = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the connection over the cap is ended");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "reset, not closed"
    );

    drop(first);
    fixture
        .wait_for_permits(&fixture.service.connections, 1, "the slot was not freed")
        .await;
    let client = identity("demo", "client");
    assert_eq!(
        fetch(&fixture.client("client"), &client).await,
        Ok(client.to_string())
    );
}

/// A connection lives at most --max-connection-age (and its grace): one that never
/// says anything, and one that finished its handshakes and stays idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lives_at_most_its_age() {
    use tokio::io::AsyncReadExt as _;
    let fixture = Fixture::start_with(|args| {
        args.max_connection_age = Duration::from_millis(300);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(fixture.address)
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut [0; 1]))
        .await
        .expect("a silent connection is closed at its age");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let (_sender, driver) = fixture.connect().await;
    tokio::time::timeout(Duration::from_secs(20), driver)
        .await
        .expect("an idle HTTP/2 connection is sent away at its age")
        .unwrap();
    fixture
        .wait_for_permits(
            &fixture.service.connections,
            fixture.service.limits.max_connections,
            "the connections' slots were not freed",
        )
        .await;
}

/// Two replicas starting at once on a new cluster: both find no Secret, one creates
/// it, the other loses the race (409 AlreadyExists) and uses the winner's CA; both
/// publish the same root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_at_once_share_one_ca() {
    let api = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |replica: &str| {
        let args = CaServeArgs {
            work_dir: dir.path().join(replica),
            ..default_args()
        };
        let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
        tokio::spawn(async move {
            let ca = load_or_create(&client, &args).await.unwrap();
            publish_root(&client, &args, &ca).await.unwrap();
            ca.roots()
        })
    };
    // Slow answers, so that both replicas' first reads are answered (no Secret) before
    // either creates it.
    api.set_delay(Duration::from_millis(300));
    let (a, b) = tokio::join!(start("a"), start("b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "both replicas sign with the same root");
    let creates = |plural: &str| {
        let mut statuses: Vec<u16> = api
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with(plural))
            .map(|r| r.status)
            .collect();
        statuses.sort();
        statuses
    };
    assert_eq!(
        creates("/secrets"),
        [201, 409],
        "the loser's create was refused"
    );
    let published = api
        .get("v1", "ConfigMap", Some("warren-system"), "warren-ca-root")
        .unwrap();
    assert_eq!(
        published["data"]["root-cert.pem"].as_str(),
        Some(to_pem(&a[0]).as_str())
    );
}

/// Two replicas publishing the root at once: the loser of the ConfigMap's creation
/// (409) finds the winner's, the same, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publish_the_root_at_once() {
    let fixture = Fixture::start().await;
    assert!(fixture
        .api
        .delete("v1", "ConfigMap", Some("warren-system"), "warren-ca-root"));
    let client =
        kube::Client::try_from(kube::Config::new(fixture.api.url().parse().unwrap())).unwrap();
    // Slow answers: both replicas read (no ConfigMap) before either creates it.
    fixture.api.set_delay(Duration::from_millis(300));
    let ca = &fixture.service.ca;
    let (a, b) = tokio::join!(
        publish_root(&client, &fixture.args, ca),
        publish_root(&client, &fixture.args, ca)
    );
    a.unwrap();
    b.unwrap();
    let mut creates: Vec<u16> = fixture
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/configmaps"))
        .map(|r| r.status)
        .collect();
    creates.sort();
    assert_eq!(
        creates,
        [201, 201, 409],
        "the first start's, then the race's"
    );
}

/// A call waits for the API server at most --api-server-timeout, then is answered
/// UNAVAILABLE and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_server_answers_unavailable_and_frees_the_slot() {
    let fixture = Fixture::start_with(|args| {
        args.api_server_timeout = Duration::from_millis(200);
    })
    .await;
    fixture.api.set_delay(Duration::from_secs(3600));
    let refused = fetch(&fixture.client("client"), &identity("demo", "client"))
        .await
        .unwrap_err();
    assert!(
        refused.contains("Unavailable") && refused.contains("--api-server-timeout"),
        "{refused}"
    );
    assert_eq!(
        fixture.service.requests.available_permits(),
        fixture.service.limits.max_concurrent_requests
    );
    assert!(fixture.service.authorizer.token_cache_is_empty());
}
