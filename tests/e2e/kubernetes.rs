//! Kubernetes mode on the lab: the agents watch an API server (the test-served one,
//! over real HTTP, in the lab's `outside` netns), and pods are announced by calling
//! `warren-cni` exactly as a container runtime would. Labelling the namespace enrolls
//! its pods, policy objects and Services from the API are in force, an agent that is
//! down makes mesh pods wait while others start, a restarted agent finds the running
//! pods through /proc, and unlabelling releases them.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use warren_lab::{config::SERVICES, AppMode, AppServer, Family, Lab, RemoteCa, Signal};
use warren_test_apiserver::TestApiServer;

use crate::support::{access_record, access_record_where, ensure_ok, field, wait_for_log_line};

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "kubernetes::pods_follow_the_api_server_and_the_cni_plugin",
        pods_follow_the_api_server_and_the_cni_plugin,
    ),
    (
        "kubernetes::agents_get_certificates_from_warren_ca_serve_and_outlast_its_outage",
        certificates_from_the_ca_service,
    ),
];

/// How long an agent may take to act on a change in the API server.
const RECONCILE: Duration = Duration::from_secs(20);
/// demo/server's application port: Service `demo/server` forwards port 80 to it.
const SERVER_PORT: u16 = 9080;

/// The test API server, reachable from the nodes, and the kubeconfig naming it.
struct Cluster {
    /// Each node agent's CA service, when the agents use one instead of the lab's CA.
    remote_ca: BTreeMap<&'static str, RemoteCa>,
    // Dropped before the runtime it runs on.
    server: TestApiServer,
    kubeconfig: PathBuf,
    _runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(lab: &Lab) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("a tokio runtime for the test API server")?;
        let address = SocketAddr::new(lab.outside_ip(Family::V4), 0);
        let listener = lab
            .run_in("outside", || std::net::TcpListener::bind(address))?
            .with_context(|| format!("binding the test API server to {address} in outside"))?;
        let server = runtime
            .block_on(TestApiServer::serve_on(listener))
            .context("starting the test API server")?;
        let kubeconfig = lab.runtime_dir().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {{server: \"{}\"}}\nusers:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: lab}}\ncurrent-context: lab\n",
                server.url()
            ),
        )
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
        Ok(Self {
            remote_ca: BTreeMap::new(),
            server,
            kubeconfig,
            _runtime: runtime,
        })
    }

    /// Start `node`'s agent in Kubernetes mode against this cluster.
    fn start_agent(&self, lab: &Lab, node: &str) -> Result<u32> {
        lab.start_agent_kubernetes(node, &self.kubeconfig, self.remote_ca.get(node))
    }

    /// The lab's namespaces and pods as the API server shows them: `demo` with
    /// `labelled`; pods scheduled but without addresses yet, as before the runtime made
    /// their sandboxes.
    fn apply_lab(&self, lab: &Lab, labelled: bool) {
        self.label_demo(labelled);
        self.server.apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}}),
        );
        for pod in lab.pods() {
            self.server.apply(pod_object(lab, &pod.id(), false));
        }
        let service = SERVICES[0];
        self.server.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": service.namespace, "name": service.name},
            "spec": {"clusterIP": service.vips[0], "clusterIPs": service.vips,
                     "ports": [{"name": "http", "port": service.port, "targetPort": service.target_port}]}
        }));
        let server = lab.pod("demo/server");
        for (family, address) in [
            ("IPv4", server.ipv4.to_string()),
            ("IPv6", server.ipv6.to_string()),
        ] {
            self.server.apply(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "demo", "name": format!("server-{}", family.to_lowercase()),
                             "labels": {"kubernetes.io/service-name": "server"}},
                "addressType": family,
                "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
                "ports": [{"name": "http", "port": service.target_port}]
            }));
        }
    }

    fn label_demo(&self, labelled: bool) {
        let labels = if labelled {
            json!({"warren.dev/mesh": "enabled"})
        } else {
            json!({})
        };
        self.server.apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": labels}}),
        );
    }
}

/// A lab pod as a Pod object; `running` adds the addresses the kubelet reports.
fn pod_object(lab: &Lab, id: &str, running: bool) -> Value {
    let pod = lab.pod(id);
    let status = if running {
        json!({"phase": "Running", "podIP": pod.ipv4.to_string(),
               "podIPs": [{"ip": pod.ipv4.to_string()}, {"ip": pod.ipv6.to_string()}]})
    } else {
        json!({"phase": "Pending"})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": pod.labels},
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                 "containers": [{"name": "app", "image": "lab-app"}]},
        "status": status
    })
}

/// Run `f` with both agents in Kubernetes mode (after `before` readied the cluster);
/// whatever happens, the agents go back to the lab's own config after.
fn with_kubernetes_agents(
    lab: &Lab,
    before: impl FnOnce(&mut Cluster) -> Result<()>,
    f: impl FnOnce(&Cluster) -> Result<()>,
) -> Result<()> {
    let mut cluster = Cluster::start(lab)?;
    cluster.apply_lab(lab, false);
    let outcome = (|| {
        before(&mut cluster)?;
        for node in ["n1", "n2"] {
            lab.kill_agent(node, Signal::SIGTERM)?;
            cluster.start_agent(lab, node)?;
        }
        f(&cluster)
    })();
    let mut restored = Ok(());
    for node in ["n1", "n2"] {
        if lab.agent_pid(node).is_some() {
            if let Err(err) = lab.kill_agent(node, Signal::SIGTERM) {
                restored = Err(err);
                continue;
            }
        }
        if let Err(err) = lab.start_agent(node) {
            restored = Err(err);
        }
    }
    outcome?;
    restored.context("putting the lab's agents back in local mode")
}

/// ADD through `warren-cni`: it must succeed and print the previous result unchanged.
fn cni_add(lab: &Lab, pod: &str) -> Result<()> {
    let run = lab.cni("ADD", pod)?;
    ensure!(run.ok, "warren-cni ADD {pod} failed: {run:?}");
    let printed: Value = serde_json::from_str(&run.stdout)
        .with_context(|| format!("warren-cni ADD {pod} printed no JSON: {run:?}"))?;
    ensure!(
        printed == run.prev_result,
        "warren-cni ADD {pod} must pass the previous result on unchanged: {printed}"
    );
    Ok(())
}

/// Wait until demo/client (n1) and demo/server (n2) have joined the mesh, after the log
/// offsets `n1` and `n2`.
fn wait_demo_joined(lab: &Lab, (n1, n2): (u64, u64)) -> Result<()> {
    wait_for_log_line(
        lab,
        "n1",
        n1,
        &["pod joined the mesh", "demo/client"],
        RECONCILE,
    )?;
    wait_for_log_line(
        lab,
        "n2",
        n2,
        &["pod joined the mesh", "demo/server"],
        RECONCILE,
    )?;
    Ok(())
}

/// demo/client → `to_server` must work and arrive at n2 through the tunnel with
/// demo/client's identity.
fn connect_through_the_tunnel(lab: &Lab, to_server: SocketAddr, what: &str) -> Result<()> {
    let n2 = lab.agent_log_len("n2");
    ensure_ok(
        &lab.connect("demo/client", to_server, AppMode::Echo, 4096)?,
        what,
    )?;
    let record = access_record(lab, "n2", n2, "inbound", to_server)?;
    ensure!(
        field(&record, "security") == "mutual_tls"
            && field(&record, "src_identity") == "spiffe://cluster.local/ns/demo/sa/client",
        "{what}: demo/client should arrive through the tunnel with its identity: {record}"
    );
    Ok(())
}

fn pods_follow_the_api_server_and_the_cni_plugin(lab: &Lab) -> Result<()> {
    // A process in every pod, as a pod's pause container: what /proc shows of it.
    let _pauses: Vec<AppServer> = ["demo/client", "demo/peer", "legacy/client"]
        .into_iter()
        .map(|pod| lab.serve(pod, 0, AppMode::Echo))
        .collect::<Result<_>>()?;
    let server = lab.serve("demo/server", SERVER_PORT, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    with_kubernetes_agents(
        lab,
        |_| Ok(()),
        |cluster| {
            // The runtime makes the sandboxes; then the kubelet reports the addresses.
            for pod in lab.pods() {
                cni_add(lab, &pod.id())?;
                cluster.server.apply(pod_object(lab, &pod.id(), true));
            }
            let n2 = lab.agent_log_len("n2");
            ensure_ok(
                &lab.connect("legacy/client", to_server, AppMode::Echo, 1024)?,
                "legacy/client → demo/server before demo is labelled",
            )?;

            // Label: the pods join, with the identities of their service accounts.
            let offsets = (lab.agent_log_len("n1"), n2.max(lab.agent_log_len("n2")));
            cluster.label_demo(true);
            wait_demo_joined(lab, offsets)?;
            connect_through_the_tunnel(
                lab,
                to_server,
                "demo/client → demo/server once demo is labelled",
            )?;

            // A Service from the API: its ClusterIP reaches the ready endpoint.
            let vip = SERVICES[0].addr(Family::V4);
            let n1 = lab.agent_log_len("n1");
            ensure_ok(
                &lab.connect("demo/client", vip, AppMode::Echo, 1024)?,
                "demo/client → Service demo/server's ClusterIP",
            )?;
            // Logged at the endpoint it reached, naming the Service (the 1024 bytes tell
            // it from the record of the tunnel check above, which may be written later).
            let record = access_record_where(lab, "n1", n1, to_server, "outbound", |r| {
                r["bytes_sent"] == 1024
            })?;
            ensure!(
                field(&record, "dst_service") == "server.demo.svc.cluster.local",
                "the outbound record should name the Service: {record}"
            );

            // Policy from the API: STRICT refuses plaintext, and is lifted again.
            let n2 = lab.agent_log_len("n2");
            cluster.server.apply(json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"namespace": "demo", "name": "strict"},
                "spec": {"mtls": {"mode": "STRICT"}}
            }));
            wait_for_log_line(
                lab,
                "n2",
                n2,
                &["cluster state", "peer_authentications=1"],
                RECONCILE,
            )?;
            let legacy = lab.connect("legacy/client", to_server, AppMode::Echo, 1024)?;
            ensure!(
                !legacy.ok,
                "plaintext got through under STRICT from the API: {legacy:?}"
            );
            let n2 = lab.agent_log_len("n2");
            ensure!(cluster.server.delete(
                "security.istio.io/v1",
                "PeerAuthentication",
                Some("demo"),
                "strict"
            ));
            wait_for_log_line(
                lab,
                "n2",
                n2,
                &["cluster state", "peer_authentications=0"],
                RECONCILE,
            )?;

            // n1's agent down: a pod of a mesh namespace waits (the kubelet retries), one
            // of another namespace starts.
            lab.kill_agent("n1", Signal::SIGTERM)?;
            let waiting = lab.cni("ADD", "demo/peer")?;
            ensure!(
            !waiting.ok && waiting.stdout.contains("\"code\":11"),
            "with the agent down, a mesh pod's ADD should fail with CNI's try-again-later: {waiting:?}"
        );
            cni_add(lab, "legacy/client")
                .context("a pod outside the mesh starts without the agent")?;

            // Restarted, the agent finds demo/client's running netns in /proc; the retried
            // ADD brings demo/peer in.
            let n1 = lab.agent_log_len("n1");
            cluster.start_agent(lab, "n1")?;
            wait_for_log_line(
                lab,
                "n1",
                n1,
                &[
                    "found the network namespace of a running pod",
                    "demo/client",
                ],
                RECONCILE,
            )?;
            cni_add(lab, "demo/peer")?;
            wait_for_log_line(
                lab,
                "n1",
                n1,
                &["pod joined the mesh", "demo/peer"],
                RECONCILE,
            )?;
            connect_through_the_tunnel(
                lab,
                to_server,
                "demo/client → demo/server after n1's agent restarted",
            )?;

            // A pod deleted from the API leaves the mesh (its sandbox is forgotten too).
            let n1 = lab.agent_log_len("n1");
            ensure!(cluster.server.delete("v1", "Pod", Some("demo"), "peer"));
            wait_for_log_line(
                lab,
                "n1",
                n1,
                &["pod left the mesh", "demo/peer"],
                RECONCILE,
            )?;

            // Unlabel: the pods leave; legacy/client reaches demo/server directly again.
            let (n1, n2) = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
            cluster.label_demo(false);
            wait_for_log_line(
                lab,
                "n1",
                n1,
                &["pod left the mesh", "demo/client"],
                RECONCILE,
            )?;
            wait_for_log_line(
                lab,
                "n2",
                n2,
                &["pod left the mesh", "demo/server"],
                RECONCILE,
            )?;
            ensure_ok(
                &lab.connect("legacy/client", to_server, AppMode::Echo, 1024)?,
                "legacy/client → demo/server after demo left the mesh",
            )?;

            // DEL is acknowledged.
            let del = lab.cni("DEL", "demo/client")?;
            if !del.ok {
                bail!("warren-cni DEL failed: {del:?}");
            }
            Ok(())
        },
    )
}

/// `warren ca serve` in the lab's `outside` netns, against the test API server; killed
/// when dropped.
struct CaService {
    child: Child,
    log: PathBuf,
}

impl Drop for CaService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the CA service listens (the outside host) and what its certificate names.
fn ca_address(lab: &Lab) -> std::net::IpAddr {
    lab.outside_ip(Family::V4)
}

impl CaService {
    fn start(lab: &Lab, cluster: &Cluster) -> Result<Self> {
        let ip = ca_address(lab);
        let log = lab.runtime_dir().join("ca-serve.log");
        let offset = std::fs::metadata(&log).map_or(0, |m| m.len());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = lab.command("outside", lab.warren_binary()?)?;
        cmd.args(["ca", "serve", "--listen", &format!("{ip}:15012")])
            .args(["--readiness-addr", &format!("{ip}:15021")])
            .args(["--dns-name", &ip.to_string()])
            .arg("--work-dir")
            .arg(lab.runtime_dir().join("ca-serve"))
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().context("starting warren ca serve")?;
        let mut ca = Self { child, log };
        let deadline = Instant::now() + RECONCILE;
        loop {
            let text = ca.log_since(offset);
            if text.contains("CA serving") {
                return Ok(ca);
            }
            if let Some(status) = ca.child.try_wait()? {
                bail!("warren ca serve exited ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("warren ca serve did not start within {RECONCILE:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned()
    }
}

/// The agents get every certificate from `warren ca serve` — over TLS and HTTP/2, their
/// tokens reviewed by the API server, each only for its node's pods — and traffic
/// between them is mTLS with those certificates. With certificates of a few seconds, the
/// CA goes away: the agents keep the current ones, fail to renew, and renew once it is
/// back; traffic flows throughout.
fn certificates_from_the_ca_service(lab: &Lab) -> Result<()> {
    let server = lab.serve("demo/server", SERVER_PORT, AppMode::Echo)?;
    let to_server = lab.pod("demo/server").addr(Family::V4, server.port());
    let ca: std::cell::RefCell<Option<CaService>> = Default::default();
    let before = |cluster: &mut Cluster| -> Result<()> {
        cluster.server.on_create(
            "authentication.k8s.io",
            "tokenreviews",
            |mut review: Value| {
                let token = review["spec"]["token"].as_str().unwrap_or_default();
                // An audience-aware API server answers the audiences it checked.
                let audiences = review["spec"]["audiences"].clone();
                review["status"] = match token.strip_prefix("lab-token-") {
                    Some(node) => json!({"authenticated": true, "audiences": audiences, "user": {
                    "username": "system:serviceaccount:warren-system:warren-agent",
                    "extra": {"authentication.kubernetes.io/node-name": [node]}}}),
                    None => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
                Ok(review)
            },
        );
        *ca.borrow_mut() = Some(CaService::start(lab, cluster)?);
        let root = cluster
            .server
            .get("v1", "ConfigMap", Some("warren-system"), "warren-ca-root")
            .context("warren ca serve published no root")?;
        let root_cert = lab.runtime_dir().join("ca-serve-root.pem");
        std::fs::write(
            &root_cert,
            root["data"]["root-cert.pem"].as_str().unwrap_or_default(),
        )?;
        for node in ["n1", "n2"] {
            let token_file = lab.runtime_dir().join(format!("token-{node}"));
            std::fs::write(&token_file, format!("lab-token-{node}"))?;
            cluster.remote_ca.insert(
                node,
                RemoteCa {
                    address: format!("https://{}:15012", ca_address(lab)),
                    root_cert: root_cert.clone(),
                    token_file,
                },
            );
        }
        cluster.label_demo(true);
        for pod in lab.pods() {
            cluster.server.apply(pod_object(lab, &pod.id(), true));
        }
        Ok(())
    };
    with_kubernetes_agents(lab, before, |cluster| {
        let offsets = (lab.agent_log_len("n1"), lab.agent_log_len("n2"));
        for pod in lab.pods() {
            cni_add(lab, &pod.id())?;
        }
        wait_demo_joined(lab, offsets)?;
        let signed = ca
            .borrow()
            .as_ref()
            .map(|c| c.log_since(0))
            .unwrap_or_default();
        for identity in [
            "spiffe://cluster.local/ns/demo/sa/client",
            "spiffe://cluster.local/ns/demo/sa/server",
        ] {
            ensure!(
                signed.lines().any(|l| l.contains("certificate signed")
                    && l.contains(identity)
                    && l.contains("warren-system/warren-agent")),
                "warren ca serve should have signed {identity} for an agent:\n{signed}"
            );
        }
        let connect = |what: &str| connect_through_the_tunnel(lab, to_server, what);
        connect("demo/client → demo/server with certificates from the CA service")?;

        // The CA goes away until an agent has failed to renew; traffic still flows.
        let n1 = lab.agent_log_len("n1");
        drop(ca.borrow_mut().take());
        wait_for_log_line(
            lab,
            "n1",
            n1,
            &[
                "certificate renewal failed",
                "still serving the current certificate",
            ],
            RECONCILE,
        )?;
        connect("demo/client → demo/server while the CA is down")?;
        let n1 = lab.agent_log_len("n1");
        *ca.borrow_mut() = Some(CaService::start(lab, cluster)?);
        wait_for_log_line(
            lab,
            "n1",
            n1,
            &["renewed certificate", "demo/sa/client"],
            RECONCILE,
        )?;
        connect("demo/client → demo/server once the CA is back")
    })
}
