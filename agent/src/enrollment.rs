//! The node's enrolled pods, kept in step with the control plane while the agent runs.
//!
//! A pod that joins the mesh (its namespace is enrolled, or it appears) is **prepared**
//! (its netns opened, the three listeners bound in it, its certificate issued), then
//! **captured** (redirection added), then **served** (accept loops). A pod that leaves is
//! **released** in the opposite order: redirection removed first — new connections flow
//! directly again — then its listeners closed. Connections it already has run to their
//! end on their own tasks, and no other pod is touched either way.
//!
//! In local mode the control plane is the `--config` file, re-read when it changes
//! ([`watch_config`]); a file that does not decode is refused and the pods in the mesh
//! stay as they are.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use warren_common::{INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT};

use crate::{
    admin::Readiness,
    agent::AgentError,
    blocking,
    control::local::LocalConfig,
    identity::SecretManager,
    netns::Netns,
    proxy::{self, Pod, ProxyContext},
    redirect::{
        ebpf::{EbpfRedirect, PodRedirect},
        iptables::{self, IptablesRedirect},
        RedirectError,
    },
    socket::listen_in,
    tls,
    workload::{Workload, WorkloadIndex},
};

pub mod cluster;

/// How often the config file is checked for changes, and how soon a pod that could not
/// be enrolled is tried again.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// An enrolled pod whose listeners are bound but not yet served.
pub struct PreparedPod {
    pub pod: Pod,
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    pub tunnel: TcpListener,
}

/// Everything a pod needs before it can be captured: its netns must exist, its ports must
/// be free, and its identity must have a certificate (a captured pod without one could
/// not talk). Nothing is changed in the kernel yet; on error, nothing is left behind.
pub async fn prepare(
    workload: &Arc<Workload>,
    trust_domain: &str,
    secrets: &Arc<SecretManager>,
) -> Result<PreparedPod, AgentError> {
    let id = workload.to_string();
    if let Some(cgroup) = &workload.cgroup {
        if !cgroup.is_dir() {
            return Err(AgentError::PodCgroup {
                workload: id,
                path: cgroup.clone(),
            });
        }
    }
    let netns = Netns::open(&workload.netns).map_err(|source| AgentError::PodNetns {
        workload: id.clone(),
        source,
    })?;
    let netns_cookie = netns.cookie().map_err(|source| AgentError::PodNetns {
        workload: id.clone(),
        source,
    })?;
    let listener = |port| {
        listen_in(&netns, port).map_err(|source| AgentError::Listener {
            workload: id.clone(),
            source,
        })
    };
    let outbound = listener(OUTBOUND_PORT)?;
    let inbound_plaintext = listener(INBOUND_PLAINTEXT_PORT)?;
    let tunnel = listener(INBOUND_TUNNEL_PORT)?;
    let identity = workload
        .identity(trust_domain)
        .map_err(|source| AgentError::Identity {
            workload: id.clone(),
            source,
        })?;
    secrets
        .fetch(&identity)
        .await
        .map_err(|source| AgentError::Certificate {
            identity: identity.to_string(),
            source,
        })?;
    let tls_server = tls::server_config(secrets.clone(), identity.clone()).map_err(|source| {
        AgentError::Tls {
            identity: identity.to_string(),
            source,
        }
    })?;
    Ok(PreparedPod {
        pod: Pod::new(workload.clone(), identity, netns, netns_cookie, tls_server),
        outbound,
        inbound_plaintext,
        tunnel,
    })
}

/// The redirection in force. For eBPF it holds the loaded object, whose maps the data
/// path uses: it lives as long as the agent.
pub enum Redirection {
    Ebpf(Box<EbpfRedirect>),
    Iptables(IptablesRedirect),
}

impl Redirection {
    /// Capture a prepared pod (its listeners already listen); it is handed back once
    /// captured (on error it is dropped: its listeners close). iptables' tools run on a
    /// blocking thread ([`crate::blocking`]); eBPF's map updates take microseconds.
    pub async fn capture(&mut self, prepared: PreparedPod) -> Result<PreparedPod, RedirectError> {
        match self {
            Redirection::Ebpf(ebpf) => {
                let pod = &prepared.pod;
                ebpf.enroll(&PodRedirect {
                    netns: &pod.netns,
                    netns_cookie: pod.netns_cookie,
                    ips: &pod.workload.ips,
                    inbound_listener: std::os::fd::AsRawFd::as_raw_fd(&prepared.inbound_plaintext),
                })?;
                Ok(prepared)
            }
            Redirection::Iptables(rules) => {
                let rules = rules.clone();
                let enrolled =
                    blocking::run(move || rules.enroll(&prepared.pod.netns).map(|()| prepared))
                        .await?;
                Ok(enrolled)
            }
        }
    }

    /// Stop capturing `pod`: its new connections flow directly.
    pub async fn release(&mut self, pod: &Arc<Pod>) -> Result<(), RedirectError> {
        match self {
            Redirection::Ebpf(ebpf) => {
                let ips: Vec<_> = pod.workload.ips.iter().map(|&ip| ip.into()).collect();
                ebpf.unenroll(pod.netns_cookie, &ips)?;
            }
            Redirection::Iptables(_) => {
                let pod = pod.clone();
                blocking::run(move || iptables::remove(&pod.netns)).await?;
            }
        }
        Ok(())
    }
}

/// A pod being served: its accept loops stop (closing its listeners) when it is dropped.
struct ServedPod {
    pod: Arc<Pod>,
    accept_loops: Vec<JoinHandle<()>>,
}

impl ServedPod {
    /// Stop accepting and wait until the listeners are closed, so the pod's ports are
    /// free again (a pod that changed is enrolled anew right after).
    async fn stop(mut self) {
        for task in std::mem::take(&mut self.accept_loops) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ServedPod {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

/// The pods this agent serves, and how they are captured.
pub struct Enrollment {
    node: String,
    trust_domain: String,
    secrets: Arc<SecretManager>,
    redirection: Redirection,
    ctx: Arc<ProxyContext>,
    /// By `namespace/name`.
    served: BTreeMap<String, ServedPod>,
    /// Told which pods are served and which could not be enrolled yet.
    readiness: Arc<Readiness>,
}

impl Enrollment {
    pub fn new(
        node: String,
        trust_domain: String,
        secrets: Arc<SecretManager>,
        redirection: Redirection,
        ctx: Arc<ProxyContext>,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            node,
            trust_domain,
            secrets,
            redirection,
            ctx,
            served: BTreeMap::new(),
            readiness,
        }
    }

    /// Names of the pods served, sorted.
    pub fn names(&self) -> Vec<String> {
        self.served.keys().cloned().collect()
    }

    /// Serve a pod that is already captured: accept on its three listeners.
    pub fn serve(&mut self, prepared: PreparedPod) {
        let PreparedPod {
            pod,
            outbound,
            inbound_plaintext,
            tunnel,
        } = prepared;
        let pod = Arc::new(pod);
        let ctx = &self.ctx;
        let c = ctx.clone();
        let outbound = tokio::spawn(proxy::accept_loop(
            outbound,
            proxy::Listener::Outbound,
            pod.clone(),
            ctx.accept_errors.clone(),
            move |s, p, pod| proxy::outbound::handle(c.clone(), s, p, pod),
        ));
        let c = ctx.clone();
        let inbound_plaintext = tokio::spawn(proxy::accept_loop(
            inbound_plaintext,
            proxy::Listener::Plaintext,
            pod.clone(),
            ctx.accept_errors.clone(),
            move |s, p, pod| proxy::inbound_passthrough::handle(c.clone(), s, p, pod),
        ));
        let c = ctx.clone();
        let tunnel = tokio::spawn(proxy::accept_loop(
            tunnel,
            proxy::Listener::Tunnel,
            pod.clone(),
            ctx.accept_errors.clone(),
            move |s, p, pod| proxy::inbound::handle(c.clone(), s, p, pod),
        ));
        self.served.insert(
            pod.workload.to_string(),
            ServedPod {
                pod,
                accept_loops: vec![outbound, inbound_plaintext, tunnel],
            },
        );
        self.ctx.metrics.set_enrolled_pods(self.served.len());
        self.readiness.set_pods(self.names(), Vec::new());
    }

    /// Bring the served pods in line with `local`: release the pods that left the mesh
    /// (or changed), then enroll the ones that joined. Returns whether every pod that
    /// should be served is; the ones that failed are logged and tried again later.
    pub async fn reconcile(&mut self, local: &LocalConfig) -> bool {
        let failed = self
            .reconcile_to(local.enrolled_on(&self.node), local.index())
            .await;
        failed.is_empty()
    }

    /// Serve exactly `wanted` (this node's pods in the mesh), and judge destinations by
    /// `index` from then on. Returns the pods that could not be enrolled, with why; they
    /// are tried again at the next call.
    pub async fn reconcile_to(
        &mut self,
        wanted: Vec<Arc<Workload>>,
        index: WorkloadIndex,
    ) -> BTreeMap<String, String> {
        let wanted: BTreeMap<String, Arc<Workload>> =
            wanted.into_iter().map(|w| (w.to_string(), w)).collect();
        let leaving: Vec<String> = self
            .served
            .iter()
            .filter(|(name, served)| {
                wanted
                    .get(*name)
                    .is_none_or(|w| **w != *served.pod.workload)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in leaving {
            self.release(&name).await;
        }

        let mut failed = BTreeMap::new();
        for (name, workload) in wanted {
            if self.served.contains_key(&name) {
                continue;
            }
            match self.enroll(&workload).await {
                Ok(()) => tracing::info!(pod = %name, "pod joined the mesh: captured and served"),
                Err(err) => {
                    tracing::error!(pod = %name, "cannot enroll the pod; trying again in {POLL_INTERVAL:?}: {err}");
                    failed.insert(name, err.to_string());
                }
            }
        }
        self.readiness
            .set_pods(self.names(), failed.keys().cloned().collect());
        // Destinations are judged by the new index only once the pods joining here
        // listen on 15008.
        self.ctx.workloads.replace(index);
        failed
    }

    /// Make sure a pod that is not served is not captured either: remove warren's
    /// iptables rules from its netns, if an earlier agent left some (it crashed, or the
    /// pod left the mesh while no agent ran). Under eBPF the programs' maps are the
    /// agent's own, so there is nothing outside it to clear.
    pub async fn clear_stale(&mut self, pod: &str, netns: &std::path::Path) {
        if self.served.contains_key(pod) || !matches!(self.redirection, Redirection::Iptables(_)) {
            return;
        }
        let netns = netns.to_owned();
        let removed = blocking::run(move || {
            let netns = Netns::open(netns).ok()?;
            Some(iptables::remove(&netns))
        });
        match removed.await {
            // The pod's netns is gone: nothing to clear.
            None | Some(Ok(0)) => {}
            Some(Ok(removed)) => {
                tracing::info!(%pod, removed, "removed an earlier agent's iptables rules from a pod not in the mesh")
            }
            Some(Err(err)) => {
                tracing::warn!(%pod, error = %err, "cannot remove warren's iptables rules from a pod not in the mesh")
            }
        }
    }

    /// Whether `pod` (`namespace/name`) is served.
    pub fn serves(&self, pod: &str) -> bool {
        self.served.contains_key(pod)
    }

    async fn enroll(&mut self, workload: &Arc<Workload>) -> Result<(), AgentError> {
        let prepared = prepare(workload, &self.trust_domain, &self.secrets).await?;
        let captured = self.redirection.capture(prepared).await?;
        self.serve(captured);
        Ok(())
    }

    /// Redirection first, so no new connection meets a closed listener; then the
    /// listeners. Open connections keep running.
    async fn release(&mut self, name: &str) {
        let Some(served) = self.served.remove(name) else {
            return;
        };
        match self.redirection.release(&served.pod).await {
            Ok(()) => {
                tracing::info!(pod = %name, "pod left the mesh: redirection removed, listeners closed; its open connections run to their end")
            }
            Err(err) => {
                tracing::error!(pod = %name, "pod left the mesh, but its redirection could not be removed (its new connections will be reset until it is; `warren uninstall` removes it): {err}")
            }
        }
        // No pod left here runs as this identity: stop renewing its certificate.
        let identity = served.pod.identity.clone();
        served.pod.leave();
        served.stop().await;
        if !self.served.values().any(|s| s.pod.identity == identity) {
            self.secrets.forget(&identity);
        }
        self.ctx.metrics.set_enrolled_pods(self.served.len());
        self.readiness.set_pods(self.names(), Vec::new());
    }
}

/// Re-read the `--config` file when it changes from `loaded` (what the agent started
/// with) and reconcile; retry pods that could not be enrolled. Runs forever; owns the
/// enrollment.
pub async fn watch_config(path: PathBuf, loaded: Vec<u8>, mut enrollment: Enrollment) {
    let mut seen = Some(loaded);
    let mut complete = true;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let now = {
            let path = path.clone();
            blocking::run(move || std::fs::read(path).ok()).await
        };
        if now == seen && complete {
            continue;
        }
        let changed = now != seen;
        seen = now;
        let loaded = {
            let path = path.clone();
            blocking::run(move || LocalConfig::load(&path)).await
        };
        match loaded {
            Ok(local) => {
                if changed {
                    tracing::info!(path = %path.display(), "config reloaded");
                }
                complete = enrollment.reconcile(&local).await;
            }
            Err(err) if changed => {
                tracing::error!("config not reloaded, the pods in the mesh stay as they are: {err}")
            }
            Err(_) => {}
        }
    }
}
