//! Sockets the agent opens inside pods' network namespaces.
//!
//! Every one of them carries [`AGENT_SOCKET_MARK`] so the redirection never captures the
//! agent's own traffic.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use warren_common::AGENT_SOCKET_MARK;

use crate::netns::{Netns, NetnsError};

/// How long a dial to an upstream may take before the client connection is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("port {port} is already in use in network namespace {netns}; is another warren agent serving this pod?")]
    PortInUse { port: u16, netns: String },
    #[error("cannot listen on port {port} in network namespace {netns}: {source}")]
    Listen {
        port: u16,
        netns: String,
        source: io::Error,
    },
    #[error("cannot create a socket in network namespace {netns}: {source}")]
    Create { netns: String, source: io::Error },
    #[error("connecting to {dst} timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { dst: SocketAddr },
    #[error("connecting to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
}

/// A listener on `port` for every address of `netns`, IPv4 and IPv6 (one dual-stack socket;
/// IPv4 peers then show up as `::ffff:a.b.c.d`). Falls back to IPv4 only where the netns
/// has IPv6 disabled.
pub fn listen_in(netns: &Netns, port: u16) -> Result<TcpListener, SocketError> {
    let name = || netns.path().display().to_string();
    let listener = netns
        .run(|| bind_dual_stack(port))?
        .map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => SocketError::PortInUse {
                port,
                netns: name(),
            },
            _ => SocketError::Listen {
                port,
                netns: name(),
                source,
            },
        })?;
    TcpListener::from_std(listener.into()).map_err(|source| SocketError::Listen {
        port,
        netns: name(),
        source,
    })
}

fn bind_dual_stack(port: u16) -> io::Result<Socket> {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let socket = match new_socket(Domain::IPV6) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&v6.into())?;
            socket
        }
        Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let socket = new_socket(Domain::IPV4)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket
        }
        Err(err) => return Err(err),
    };
    socket.listen(1024)?;
    Ok(socket)
}

fn new_socket(domain: Domain) -> io::Result<Socket> {
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(AGENT_SOCKET_MARK)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// Connect to `dst` from inside `netns` (so the connection leaves with the pod's address),
/// with the agent's mark so it is not captured again.
pub async fn connect_from(netns: &Netns, dst: SocketAddr) -> Result<TcpStream, SocketError> {
    let domain = Domain::for_address(dst);
    let socket = netns
        .run(|| new_socket(domain))?
        .map_err(|source| SocketError::Create {
            netns: netns.path().display().to_string(),
            source,
        })?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Err(_) => Err(SocketError::ConnectTimeout { dst }),
        Ok(Err(source)) => Err(SocketError::Connect { dst, source }),
        Ok(Ok(stream)) => Ok(stream),
    }
}
