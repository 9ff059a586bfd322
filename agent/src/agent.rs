//! The node agent: validate, choose a redirect mechanism, enroll the node's pods, serve;
//! then [`crate::enrollment`] follows the config as pods join and leave the mesh.
//!
//! Start-up is ordered so that a bad input fails before anything is changed: the config,
//! the metrics port, the CA, the pods' network namespaces, listener ports and
//! certificates come first; the kernel is touched last. Nothing before that leaves state
//! behind (sockets close when the agent exits).
use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::io::unix::AsyncFd;

use crate::{
    admin::{self, AdminError, AdminState, LogControl, Readiness},
    cni::server::{self as cni_server, CniServerError},
    config::{CaSource, Config, Control},
    control::{
        kubernetes::KubernetesControl,
        local::{LocalConfig, LocalConfigError},
    },
    enrollment::{self, cluster::ClusterSource, prepare, Enrollment, PreparedPod, Redirection},
    identity::{
        remote::RemoteCa, CaClient, CaError, CertificateAuthority, IdentityError, SecretManager,
    },
    metrics::{self, Metrics},
    netns::{Netns, NetnsError},
    policy::{self, PolicyConfig, PolicyError, PolicyFiles, PolicySet, SharedPolicy},
    proxy::{accept::AcceptErrors, hbone, limits::ListenerAdmission, ProxyContext},
    redirect::{
        self,
        ebpf::{EbpfRedirect, PodRedirect},
        iptables::{self, Backend, IptablesRedirect},
        KernelSupport, Mechanism, OriginalDst, RedirectError, RedirectMode,
    },
    socket::SocketError,
    tls,
    workload::{SharedWorkloads, Workload},
};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("warren agent must run as root: it enters pods' network namespaces and loads eBPF programs (run it as root; in Kubernetes, as a privileged DaemonSet)")]
    NotRoot,
    #[error(transparent)]
    Config(#[from] LocalConfigError),
    #[error(transparent)]
    Cni(#[from] CniServerError),
    #[error("cannot make a Kubernetes client: {0}; in a pod the agent uses its service account (is the DaemonSet's serviceAccountName set?), outside one KUBECONFIG or ~/.kube/config")]
    Kubernetes(kube::Error),
    #[error(
        "workload {workload}: {source}; check its `netns` in the config file (is the pod running?)"
    )]
    PodNetns {
        workload: String,
        source: NetnsError,
    },
    #[error("workload {workload}: cgroup {path} does not exist; fix its `cgroup` in the config file or leave it out")]
    PodCgroup { workload: String, path: PathBuf },
    #[error("workload {workload}: {source}")]
    Listener {
        workload: String,
        source: SocketError,
    },
    #[error("no cgroup v2 mount found; mount cgroup2 or pass --cgroup-root")]
    NoCgroup2,
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("workload {workload} has no valid identity: {source}")]
    Identity {
        workload: String,
        source: IdentityError,
    },
    #[error("cannot get a certificate for {identity}: {source}")]
    Certificate {
        identity: String,
        source: IdentityError,
    },
    #[error("cannot set up TLS for {identity}: {source}")]
    Tls {
        identity: String,
        source: tls::TlsError,
    },
    #[error("cannot read the agent's own network namespace: {0}")]
    Home(NetnsError),
}

/// Run the agent until SIGTERM or SIGINT. `logs` lets the admin endpoint change the log
/// filter.
pub async fn run(config: Config, logs: Option<LogControl>) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    Netns::init_home().map_err(AgentError::Home)?;
    raise_open_file_limit();
    let policy_config = PolicyConfig {
        root_namespace: config.root_namespace.clone(),
        trust_domain: config.trust_domain.clone(),
        trust_domain_aliases: config.trust_domain_aliases.clone(),
    };
    let Start {
        local,
        workloads,
        policy,
        policy_files,
        followed,
    } = match &config.control {
        Control::Local { config_file } => start_local(config_file, &config, &policy_config)?,
        Control::Kubernetes {
            cni_socket,
            proc_root,
        } => start_cluster(&config.node, cni_socket, proc_root, policy_config.clone()).await?,
    };
    policy.log_warnings();
    policy.log_broken();
    let shared_policy = SharedPolicy::new(policy);
    let metrics_listener = metrics::bind(config.metrics_addr).await?;
    let admin_listener = admin::bind_admin(config.admin_addr).await?;
    // Readiness answers from now on: 503 until every pod is captured.
    let readiness = Readiness::new();
    tokio::spawn(admin::serve_readiness(
        admin::bind_readiness(config.readiness_addr).await?,
        readiness.clone(),
    ));

    // Identity: the CA must be usable and every local identity gets its certificate
    // before any pod is captured (a captured pod without one could not talk).
    let ca: Arc<dyn CaClient> = match &config.ca {
        CaSource::Local(dir) => Arc::new(CertificateAuthority::load(dir)?),
        CaSource::Remote {
            address,
            root_cert,
            token_file,
        } => Arc::new(RemoteCa::new(address, root_cert, token_file.clone())?),
    };
    let secrets = SecretManager::new(ca, config.cert_lifetime);

    // Pods: every enrolled pod's netns must exist, its ports must be free, and its
    // identity must get a certificate.
    let mut prepared = Vec::with_capacity(workloads.len());
    for workload in &workloads {
        match prepare(workload, &config.trust_domain, &secrets).await {
            Ok(pod) => prepared.push(pod),
            // A cluster's pod can go away while the agent starts; the follow loop tries
            // again. A config file naming a pod that is not there is a mistake to fix.
            Err(err) if matches!(followed, Followed::Cluster(_)) => {
                tracing::warn!(pod = %workload, "cannot enroll the pod yet; trying again once serving: {err}")
            }
            Err(err) => return Err(err),
        }
    }

    // Then the kernel.
    let support = KernelSupport::probe(&config.bpffs, &config.probe_pretend_missing);
    // eBPF with a missing feature (bpffs included, with the command that mounts it)
    // stops here; auto falls back to iptables.
    let chosen = redirect::choose(config.redirect, &support)?;
    let not_enrolled: Vec<&Path> = local
        .workloads
        .iter()
        .filter(|w| w.node == config.node && !w.in_mesh)
        .map(|w| w.netns.as_path())
        .collect();
    let installed = match chosen {
        Mechanism::Ebpf => match install_ebpf(&config, &support, &prepared) {
            Ok(installed) => Ok(installed),
            // The probe saw the features, yet loading failed (a verifier or helper this
            // kernel lacks): auto still has a way to protect the pods.
            Err(err) if config.redirect == RedirectMode::Auto => {
                tracing::warn!("redirect mode: iptables, because eBPF redirection could not be installed: {err}");
                install_iptables(&config, &prepared)
            }
            Err(err) => Err(err),
        },
        Mechanism::Iptables => install_iptables(&config, &prepared),
    };
    let (mechanism, redirection, original_dst) = installed?;
    // A node switched from the other mode keeps nothing of it; pods that left the mesh
    // while no agent ran lose their rules.
    match mechanism {
        Mechanism::Ebpf => {
            remove_iptables_rules(prepared.iter().map(|p| p.pod.netns.path()));
        }
        Mechanism::Iptables => match redirect::remove_ebpf_pins(&config.pin_dir) {
            Ok(0) => {}
            Ok(pins) => {
                tracing::info!(pin_dir = %config.pin_dir.display(), pins, "removed the eBPF redirection of an earlier run")
            }
            Err(err) => {
                tracing::warn!(pin_dir = %config.pin_dir.display(), error = %err, "cannot remove the eBPF redirection of an earlier run")
            }
        },
    }
    remove_iptables_rules(not_enrolled.into_iter());

    let pool = hbone::Pool::new(hbone::PoolConfig::default());
    let metrics = Arc::new(Metrics::with_limits(pool.clone(), config.metric_limits)?);
    metrics.set_redirect_mode(mechanism.as_str());
    metrics.watch_certificates(secrets.clone());
    tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));
    metrics.watch_policy(shared_policy.clone());
    if let (Some(path), Some(files)) = (&config.policy, policy_files) {
        tokio::spawn(policy::watch::watch(
            path.clone(),
            policy_config,
            shared_policy.clone(),
            files,
        ));
    }
    let ctx = Arc::new(ProxyContext {
        workloads: SharedWorkloads::new(local.index()),
        original_dst,
        trust_domain: config.trust_domain.clone(),
        secrets: secrets.clone(),
        pool,
        policy: shared_policy.clone(),
        node_ips: node_addresses(),
        admission: ListenerAdmission::new(
            config.tunnel_limits,
            config.plaintext_limits,
            metrics.clone(),
        ),
        accept_errors: AcceptErrors::new(metrics.clone()),
        idle_timeout: config.idle_timeout,
        metrics,
        refusals: Default::default(),
    });
    tokio::spawn(admin::serve_admin(
        admin_listener,
        Arc::new(AdminState {
            node: config.node.clone(),
            redirect_mode: mechanism.to_string(),
            ctx: ctx.clone(),
            readiness: readiness.clone(),
            logs,
        }),
    ));
    let mut enrollment = Enrollment::new(
        config.node.clone(),
        config.trust_domain.clone(),
        secrets,
        redirection,
        ctx,
        readiness.clone(),
    );
    for pod in prepared {
        enrollment.serve(pod);
    }
    let names = enrollment.names();
    readiness.started();
    // From here on, pods join and leave the mesh as the config file or the cluster says.
    match followed {
        Followed::File { path, text } => {
            tokio::spawn(enrollment::watch_config(
                path,
                text.into_bytes(),
                enrollment,
            ));
        }
        Followed::Cluster(source) => {
            tokio::spawn(enrollment::cluster::follow(
                *source,
                enrollment,
                shared_policy,
            ));
        }
    }
    tracing::info!(node = %config.node, pods = ?names, mode = %mechanism, "agent ready");

    wait_for_shutdown().await;
    tracing::info!("shutting down; redirection stays in place, so captured pods fail closed until an agent returns (`warren uninstall` removes it)");
    Ok(())
}

/// What the agent starts from: the node's view of workloads and services, this node's
/// pods to capture, the policies, and what to follow afterwards.
struct Start {
    local: LocalConfig,
    workloads: Vec<Arc<Workload>>,
    policy: PolicySet,
    /// The policy files `policy` was read from (local mode with `--policy`).
    policy_files: Option<PolicyFiles>,
    followed: Followed,
}

enum Followed {
    /// The config file, and the text it had at start-up (what the watch compares).
    File { path: PathBuf, text: String },
    /// The cluster's watches and the CNI socket, listening since before the first state.
    Cluster(Box<ClusterSource>),
}

fn start_local(
    config_file: &Path,
    config: &Config,
    policy_config: &PolicyConfig,
) -> Result<Start, AgentError> {
    // The text read here is what the config watch compares against, so a change made
    // while the agent starts is not missed.
    let text = std::fs::read_to_string(config_file).map_err(|source| LocalConfigError::Read {
        path: config_file.to_owned(),
        source,
    })?;
    let local = LocalConfig::parse(&text, config_file)?;
    // Documents that do not decode fail closed in the set; only an unreadable path stops
    // the start.
    let (policy_files, policy) = match &config.policy {
        Some(path) => {
            let (files, policy) = policy::watch::load(policy_config.clone(), path)?;
            (Some(files), policy)
        }
        None => (None, PolicySet::new(policy_config.clone(), [])),
    };
    Ok(Start {
        workloads: local.enrolled_on(&config.node),
        local,
        policy,
        policy_files,
        followed: Followed::File {
            path: config_file.to_owned(),
            text,
        },
    })
}

/// Listen for the CNI plugin first (its requests wait until the agent serves), then
/// wait for the API server's first lists, then find the netns of pods already running.
async fn start_cluster(
    node: &str,
    cni_socket: &Path,
    proc_root: &Path,
    policy_config: PolicyConfig,
) -> Result<Start, AgentError> {
    let listener = cni_server::bind(cni_socket)?;
    let (events, cni) = mpsc::channel(64);
    tokio::spawn(cni_server::serve(listener, events));
    tracing::info!(socket = %cni_socket.display(), "listening for warren-cni");
    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::Kubernetes)?;
    let started = KubernetesControl::start(client, policy_config);
    let mut started = std::pin::pin!(started);
    let control = loop {
        tokio::select! {
            control = &mut started => break control,
            () = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
                tracing::warn!("still waiting for the Kubernetes API server's first lists (see the watch errors above); pods are not captured until then");
            }
        }
    };
    let mut source = ClusterSource::new(
        node.to_owned(),
        control,
        cni,
        cni_socket.to_owned(),
        proc_root.to_owned(),
    );
    // Every pod of this node, in the mesh or not: one that left the mesh while no agent
    // ran may still hold an earlier agent's iptables rules, removed below.
    let state = source.state();
    let running: Vec<Arc<Workload>> = state
        .config
        .workloads
        .iter()
        .filter(|w| w.node == node && !w.ips.is_empty())
        .cloned()
        .collect();
    source.find_running(&running).await;
    let local = source.node_config(&state);
    Ok(Start {
        workloads: source.servable(&local),
        local,
        policy: state.policies.clone(),
        policy_files: None,
        followed: Followed::Cluster(Box::new(source)),
    })
}

/// A redirection installed for the prepared pods, and how the proxy reads original
/// destinations under it.
type Installed = (Mechanism, Redirection, OriginalDst);

/// Load the eBPF programs and enroll the prepared pods; pods that left are released.
fn install_ebpf(
    config: &Config,
    support: &KernelSupport,
    prepared: &[PreparedPod],
) -> Result<Installed, AgentError> {
    let cgroup_root = config
        .cgroup_root
        .clone()
        .or(support.cgroup2_root.clone())
        .ok_or(AgentError::NoCgroup2)?;
    let (mut ebpf, original_dst) =
        EbpfRedirect::install(&config.pin_dir, &cgroup_root).map_err(RedirectError::from)?;
    tracing::info!(pin_dir = %config.pin_dir.display(), cgroup_root = %cgroup_root.display(), "eBPF programs attached");
    match ebpf.take_logger() {
        Ok(logger) => {
            tokio::spawn(forward_kernel_logs(logger));
        }
        Err(err) => tracing::warn!(error = %err, "kernel program logs will not be shown"),
    }
    let enrolled: Vec<PodRedirect<'_>> = prepared
        .iter()
        .map(|p| PodRedirect {
            netns: &p.pod.netns,
            netns_cookie: p.pod.netns_cookie,
            ips: &p.pod.workload.ips,
            inbound_listener: std::os::fd::AsRawFd::as_raw_fd(&p.inbound_plaintext),
        })
        .collect();
    for pod in &enrolled {
        ebpf.enroll(pod).map_err(RedirectError::from)?;
    }
    ebpf.retain(&enrolled).map_err(RedirectError::from)?;
    Ok((
        Mechanism::Ebpf,
        Redirection::Ebpf(Box::new(ebpf)),
        OriginalDst::Ebpf(original_dst),
    ))
}

/// Write the iptables rules of every prepared pod, with the node's backend.
fn install_iptables(config: &Config, prepared: &[PreparedPod]) -> Result<Installed, AgentError> {
    let backend = Backend::choose(config.iptables_backend).map_err(RedirectError::from)?;
    let rules = IptablesRedirect::new(backend);
    for p in prepared {
        rules.enroll(&p.pod.netns).map_err(RedirectError::from)?;
    }
    tracing::info!(%backend, pods = prepared.len(), "iptables rules written in the pods' network namespaces");
    Ok((
        Mechanism::Iptables,
        Redirection::Iptables(rules),
        OriginalDst::Conntrack,
    ))
}

/// Remove warren's iptables rules from these pods' netns, if any are there: pods that
/// left the mesh, or a node that changed mode. Pods whose netns is gone are skipped; a
/// failure is logged, not fatal (the rules of a pod not enrolled cannot capture
/// anything the agent would miss: they redirect to ports nobody serves).
fn remove_iptables_rules<'a>(netns_paths: impl Iterator<Item = &'a Path>) {
    for path in netns_paths {
        let Ok(netns) = Netns::open(path) else {
            continue;
        };
        match iptables::remove(&netns) {
            Ok(0) => {}
            Ok(removed) => {
                tracing::info!(netns = %path.display(), removed, "removed warren's iptables rules")
            }
            Err(err) => {
                tracing::warn!(netns = %path.display(), error = %err, "cannot remove warren's iptables rules")
            }
        }
    }
}

/// The node's own addresses (the agent runs in the node's netns). Connections from them
/// to a pod are the node's — kubelet's health probes — and are let through whatever the
/// pod's mTLS mode, without rewriting any address.
fn node_addresses() -> HashSet<IpAddr> {
    match crate::netns::interface_addresses() {
        Ok(addresses) => addresses.into_iter().collect(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot list the node's addresses; health probes from the node will be treated as any other plaintext client");
            HashSet::new()
        }
    }
}

/// Relay log records of the kernel programs (aya-log) into the agent's log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and AsyncFd owns the logger, so the fd
    // stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(error = %err, "cannot poll kernel program logs");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => {
                tracing::warn!(error = %err, "kernel program log reader stopped");
                return;
            }
        }
    }
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Every proxied connection holds two descriptors on one agent or the other, and a node
/// carries thousands: raise the soft limit on open files to the hard limit, as ztunnel
/// does. A failure is logged, not fatal: the agent works, with fewer connections.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(err) => {
                tracing::warn!(soft, hard, error = %err, "cannot raise the open-file limit; connections beyond it will fail")
            }
        },
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "cannot read the open-file limit"),
    }
}
