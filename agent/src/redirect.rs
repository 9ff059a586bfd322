//! Redirection: steering an enrolled pod's TCP into the agent's listeners in that pod.
//!
//! Two mechanisms, one behaviour:
//! - **eBPF** (`ebpf`): cgroup connect4/6 + sock_ops for outbound, sk_lookup for inbound.
//!   The original destination of an outbound connection is in a map
//!   ([`ebpf::OriginalDstTable`]); inbound connections keep the address they were dialled
//!   on.
//! - **iptables** (`iptables`): `REDIRECT` rules in each pod's netns; conntrack remembers
//!   the original destination of both directions (`SO_ORIGINAL_DST`).
//!
//! The proxy asks [`OriginalDst`] either way. `--redirect auto` probes the kernel
//! ([`probe`]) and takes eBPF when everything it needs is there.
pub mod ebpf;
pub mod iptables;
pub mod probe;

use std::{io, net::SocketAddr, path::Path};

use tokio::net::TcpStream;

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
    Iptables,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ebpf => "ebpf",
            Mechanism::Iptables => "iptables",
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("eBPF redirection needs kernel support that is missing: {missing}. Use a kernel with these features (Linux ≥ 5.9 with cgroup v2, BTF and bpffs mounted), or --redirect iptables (or auto) to use iptables rules instead")]
    KernelUnsupported { missing: String },
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("iptables redirection: {0}")]
    Iptables(#[from] iptables::IptablesError),
}

/// Pick the mechanism for `mode` given what the kernel supports, and log one line saying
/// which and why.
pub fn choose(mode: RedirectMode, support: &KernelSupport) -> Result<Mechanism, RedirectError> {
    let missing = support.missing_summary();
    match (mode, missing) {
        (RedirectMode::Iptables, _) => {
            tracing::info!(requested = ?mode, "redirect mode: iptables (requested with --redirect iptables)");
            Ok(Mechanism::Iptables)
        }
        (RedirectMode::Ebpf | RedirectMode::Auto, None) => {
            tracing::info!(requested = ?mode, "redirect mode: ebpf (kernel supports cgroup sock_addr, sock_ops, sk_lookup, BTF, bpffs)");
            Ok(Mechanism::Ebpf)
        }
        (RedirectMode::Ebpf, Some(missing)) => Err(RedirectError::KernelUnsupported { missing }),
        (RedirectMode::Auto, Some(missing)) => {
            tracing::info!(requested = ?mode, "redirect mode: iptables, because the kernel lacks what eBPF redirection needs: {missing}");
            Ok(Mechanism::Iptables)
        }
    }
}

/// Where a captured connection was going, asked the way the mechanism records it.
pub enum OriginalDst {
    Ebpf(ebpf::OriginalDstTable),
    /// iptables `REDIRECT`: conntrack's original tuple.
    Conntrack,
}

impl OriginalDst {
    /// The destination of an outbound connection accepted on 15001 from `peer` in the pod
    /// with `netns_cookie`. Each connection is asked once.
    pub fn outbound(
        &self,
        stream: &TcpStream,
        netns_cookie: u64,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        match self {
            OriginalDst::Ebpf(table) => table.take(netns_cookie, peer),
            OriginalDst::Conntrack => conntrack_original_dst(stream, peer).ok(),
        }
    }

    /// The destination of a plaintext connection accepted on 15006: sk_lookup leaves the
    /// dialled address as the socket's local address; REDIRECT rewrites it to 15006 and
    /// conntrack remembers the original.
    pub fn inbound(&self, stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
        let dst = match self {
            OriginalDst::Ebpf(_) => stream.local_addr()?,
            OriginalDst::Conntrack => conntrack_original_dst(stream, peer)?,
        };
        Ok(SocketAddr::new(dst.ip().to_canonical(), dst.port()))
    }
}

/// `SO_ORIGINAL_DST` (IPv4, also for v4-mapped peers of a dual-stack socket) or
/// `IP6T_SO_ORIGINAL_DST` (IPv6).
fn conntrack_original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let addr = match peer.ip().to_canonical() {
        std::net::IpAddr::V4(_) => socket.original_dst_v4()?,
        std::net::IpAddr::V6(_) => socket.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// Remove every trace of eBPF redirection pinned for one node: its links (which detaches
/// the programs) and maps. Returns how many pins were removed (0: nothing was there).
pub fn remove_ebpf_pins(pin_dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let mut removed = 0;
    for entry in entries {
        std::fs::remove_file(entry?.path())?;
        removed += 1;
    }
    std::fs::remove_dir(pin_dir)?;
    Ok(removed + 1)
}
