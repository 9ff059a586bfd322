//! Redirection: steering an enrolled pod's TCP into the agent's listeners in that pod.
//!
//! Built: eBPF (`ebpf`). The proxy learns where a captured outbound connection was going
//! from [`ebpf::OriginalDstTable`]; the iptables fallback (not built yet) will answer the
//! same question from `SO_ORIGINAL_DST`, behind the same call.
pub mod ebpf;
pub mod probe;

pub use probe::{KernelFeature, KernelSupport};

/// `--redirect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// eBPF when the kernel supports it, iptables otherwise.
    Auto,
    /// cgroup connect4/6 + sock_ops for outbound, sk_lookup for inbound.
    Ebpf,
    /// iptables rules inside each pod's netns.
    Iptables,
}

/// The mechanism actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Ebpf,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("eBPF redirection needs kernel support that is missing: {missing}. Use a kernel with these features (Linux ≥ 5.9 with cgroup v2, BTF and bpffs mounted), or --redirect iptables once it is available")]
    KernelUnsupported { missing: String },
    #[error("--redirect iptables is not yet supported by this build of warren; use --redirect ebpf (or auto)")]
    IptablesNotYetSupported,
    #[error("the kernel lacks {missing}, so eBPF redirection is impossible, and the iptables fallback is not yet supported by this build of warren; run on a kernel with these features")]
    NoMechanism { missing: String },
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
}

/// Pick the mechanism for `mode` given what the kernel supports; log why.
pub fn choose(mode: RedirectMode, support: &KernelSupport) -> Result<Mechanism, RedirectError> {
    let missing = support.missing_summary();
    match (mode, missing) {
        (RedirectMode::Iptables, _) => Err(RedirectError::IptablesNotYetSupported),
        (RedirectMode::Ebpf | RedirectMode::Auto, None) => {
            tracing::info!(requested = ?mode, "redirect mode: ebpf (kernel supports cgroup sock_addr, sock_ops, sk_lookup, BTF, bpffs)");
            Ok(Mechanism::Ebpf)
        }
        (RedirectMode::Ebpf, Some(missing)) => Err(RedirectError::KernelUnsupported { missing }),
        (RedirectMode::Auto, Some(missing)) => Err(RedirectError::NoMechanism { missing }),
    }
}
