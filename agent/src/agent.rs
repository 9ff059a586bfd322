//! The node agent: validate, choose a redirect mechanism, enroll the node's pods, serve.
//!
//! Start-up is ordered so that a bad input fails before anything is changed: the config,
//! the pods' network namespaces and the listener ports are checked first; the kernel is
//! touched last.
use std::{path::PathBuf, sync::Arc};

use tokio::io::unix::AsyncFd;
use warren_common::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::{
    config::Config,
    control::local::{LocalConfig, LocalConfigError},
    netns::{Netns, NetnsError},
    proxy::{self, Pod, ProxyContext},
    redirect::{
        self,
        ebpf::{EbpfRedirect, PodRedirect},
        KernelSupport, Mechanism, RedirectError,
    },
    socket::{listen_in, SocketError},
    workload::WorkloadIndex,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("warren agent must run as root: it enters pods' network namespaces and loads eBPF programs (run it as root; in Kubernetes, as a privileged DaemonSet)")]
    NotRoot,
    #[error(transparent)]
    Config(#[from] LocalConfigError),
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
    #[error("cannot read the agent's own network namespace: {0}")]
    Home(NetnsError),
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    Netns::init_home().map_err(AgentError::Home)?;
    let local = LocalConfig::load(&config.config_file)?;
    let workloads = local.enrolled_on(&config.node);

    // Pods first: every enrolled pod's netns must exist and its ports must be free.
    let mut prepared = Vec::with_capacity(workloads.len());
    for workload in &workloads {
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
        let inbound = listener(INBOUND_PLAINTEXT_PORT)?;
        prepared.push((
            Pod {
                workload: workload.clone(),
                netns,
                netns_cookie,
            },
            outbound,
            inbound,
        ));
    }

    // Then the kernel.
    let support = KernelSupport::probe(&config.bpffs, &config.probe_pretend_missing);
    let Mechanism::Ebpf = redirect::choose(config.redirect, &support)?;
    if support
        .missing
        .iter()
        .any(|m| m.feature == redirect::KernelFeature::Bpffs)
    {
        return Err(RedirectError::BpffsMissing {
            path: config.bpffs.clone(),
        }
        .into());
    }
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
        .map(|(pod, _, inbound)| PodRedirect {
            netns: &pod.netns,
            netns_cookie: pod.netns_cookie,
            ips: &pod.workload.ips,
            inbound_listener: std::os::fd::AsRawFd::as_raw_fd(inbound),
        })
        .collect();
    for pod in &enrolled {
        ebpf.enroll(pod).map_err(RedirectError::from)?;
    }
    ebpf.retain(&enrolled).map_err(RedirectError::from)?;
    drop(enrolled);

    let ctx = Arc::new(ProxyContext {
        workloads: WorkloadIndex::new(local.workloads.iter().cloned()),
        original_dst,
    });
    let names: Vec<String> = prepared
        .iter()
        .map(|(pod, _, _)| pod.workload.to_string())
        .collect();
    for (pod, outbound, inbound) in prepared {
        let pod = Arc::new(pod);
        let c = ctx.clone();
        tokio::spawn(proxy::accept_loop(
            outbound,
            "outbound",
            pod.clone(),
            move |s, p, pod| proxy::outbound::handle(c.clone(), s, p, pod),
        ));
        let c = ctx.clone();
        tokio::spawn(proxy::accept_loop(
            inbound,
            "inbound",
            pod,
            move |s, p, pod| proxy::inbound_passthrough::handle(c.clone(), s, p, pod),
        ));
    }
    tracing::info!(node = %config.node, pods = ?names, mode = "ebpf", "agent ready");

    wait_for_shutdown().await;
    tracing::info!("shutting down; redirection stays pinned, so captured pods fail closed until an agent returns");
    drop(ebpf);
    Ok(())
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
