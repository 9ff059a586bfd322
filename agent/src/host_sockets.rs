//! Which connections the node itself originated: a kernel fact, not an address.
//!
//! A plaintext connection whose source is one of the node's addresses may be the
//! kubelet's health probe — which must reach the pod whatever the mTLS mode, as Istio
//! lets its probe SNAT address through — or traffic the node merely *forwards* and
//! masquerades: a NodePort, a LoadBalancer, a hostPort. Both arrive with the same source
//! address. Only the first has a socket in the node's network namespace that owns the
//! exact 4-tuple; a forwarded packet has a conntrack entry there, no socket. So the
//! agent asks the kernel (`NETLINK_SOCK_DIAG`, an exact `inet_diag` lookup, as
//! `ss -K`/`ss src … dst …` do) in its own network namespace, which is the node's.
//!
//! A hostNetwork pod's sockets are the node's sockets too: like Istio, warren cannot
//! tell them from the kubelet's, and treats them as the node.
use std::{io, net::SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// `INET_DIAG_NOCOOKIE`: match the socket by its addresses alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// Whether a TCP socket of the calling thread's network namespace has `local` as its own
/// address and `remote` as its peer — i.e. this namespace originated (or accepted) that
/// connection. Call it on a thread in the agent's own netns (the node's): the data-path
/// workers always are, outside `Netns::run`.
///
/// It runs on the data-path worker that accepted the connection, for each plaintext
/// connection from a node address: the kernel runs the lookup within the `send`, in the
/// caller's context, and queues the answer before `send` returns, so the answer is read
/// without waiting (`MSG_DONTWAIT`) — a few microseconds in all, never a stalled worker.
///
/// An error means the kernel could not be asked (or gave no answer); callers treat that
/// as "not the node" (fail closed: policy applies).
pub fn owns_connection(local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let (local, remote) = (canonical(local), canonical(remote));
    let family = match (local, remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => return Ok(false),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut answer = Vec::with_capacity(8192);
    socket.recv(&mut answer, libc::MSG_DONTWAIT)?;
    let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&answer).map_err(|err| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag answer does not decode: {err}"),
        )
    })?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(_)) => Ok(true),
        // The exact lookup answers ENOENT when no socket owns the 4-tuple.
        NetlinkPayload::Error(err) => match err.code {
            Some(code) if -code.get() == libc::ENOENT => Ok(false),
            None => Ok(false),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag answer: {other:?}"),
        )),
    }
}

/// IPv4 peers of a dual-stack socket appear as `::ffff:a.b.c.d`; the node's socket is
/// looked up by its IPv4 addresses.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Both ends of a loopback connection are sockets of this namespace; a 4-tuple with
    /// no socket is not. Needs no privilege: sock_diag lookups are open to any user.
    #[test]
    fn finds_the_sockets_of_this_namespace_and_nothing_else() {
        for loopback in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(loopback) else {
                continue; // no IPv6 on this machine
            };
            let server = listener.local_addr().unwrap();
            let client = TcpStream::connect(server).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            let client_addr = client.local_addr().unwrap();
            assert!(owns_connection(client_addr, server).unwrap(), "client side");
            assert!(
                owns_connection(accepted.local_addr().unwrap(), client_addr).unwrap(),
                "server side"
            );
            let other = SocketAddr::new(client_addr.ip(), client_addr.port().wrapping_add(1));
            assert!(!owns_connection(other, server).unwrap(), "no such socket");
        }
    }

    #[test]
    fn a_v4_mapped_address_is_looked_up_as_ipv4() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let mapped = |addr: SocketAddr| match addr {
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        };
        assert!(owns_connection(mapped(client.local_addr().unwrap()), mapped(server)).unwrap());
    }

    #[test]
    fn mixed_families_are_never_one_connection() {
        let v4: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert!(!owns_connection(v4, v6).unwrap());
    }
}
