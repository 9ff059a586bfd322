//! Types and constants shared by the kernel programs (`warren-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: these structs are map keys and
//! values, and a padding byte left uninitialised would make two equal keys differ.
#![no_std]

/// Mark set (`SO_MARK`) on every socket the agent opens inside a pod's netns, so the
/// redirection never captures the agent's own traffic. Same value as Istio ambient (1337).
pub const AGENT_SOCKET_MARK: u32 = 0x539;

/// Outbound capture: the agent's listener inside each enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture: the agent's listener inside each enrolled pod's netns.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound mTLS tunnel (HBONE) port, never redirected.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;

/// `AF_INET` and `AF_INET6` as the kernel's BPF contexts report them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;

/// Map names, shared so the loader and the programs cannot drift apart.
pub mod maps {
    /// netns cookie (u64) → [`super::EnrolledNetns`]: pods whose outbound TCP is captured.
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// socket cookie (u64) → [`super::PendingOriginalDst`], written at `connect()`.
    pub const PENDING_ORIGINAL_DST: &str = "PENDING_ORIGINAL_DST";
    /// [`super::ClientKey`] → [`super::SockAddr`]: original destination of a redirected
    /// connection, keyed by the client's address as the agent sees it when accepting.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// [`super::IpKey`] → u32 (unused): pod addresses whose inbound TCP is captured.
    pub const INBOUND_POD_IPS: &str = "INBOUND_POD_IPS";
    /// [`super::IpKey`] → socket: the agent's inbound-plaintext listener of that pod.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// [`super::OwnIpKey`] → u32 (unused): an enrolled pod's own addresses, so that a
    /// pod connecting to itself is not captured (it never leaves the pod).
    pub const POD_OWN_IPS: &str = "POD_OWN_IPS";
}

/// Program names (the functions' names in `warren-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "warren_connect4";
    pub const CONNECT6: &str = "warren_connect6";
    pub const SOCK_OPS: &str = "warren_sock_ops";
    pub const SK_LOOKUP: &str = "warren_sk_lookup";
}

/// An IPv4 or IPv6 address in the kernel's layout: four 32-bit words whose bytes are in
/// network order. IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type serves
/// both families and a v4 peer seen on a dual-stack socket keys the same as on a v4 one.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub words: [u32; 4],
}

impl IpKey {
    /// The third word of an IPv4-mapped address (`0000:ffff`), as stored in memory.
    pub const V4_MAPPED_MARKER: u32 = u32::from_be(0x0000_ffff);

    /// From an IPv4 address as BPF contexts hold it (network byte order in memory).
    #[inline(always)]
    pub const fn from_v4_raw(ip4: u32) -> Self {
        Self {
            words: [0, 0, Self::V4_MAPPED_MARKER, ip4],
        }
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::V4_MAPPED_MARKER
    }

    /// Loopback: 127.0.0.0/8 (also IPv4-mapped) or ::1.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4_mapped() {
            // First byte in memory is the first octet.
            (self.words[3].to_ne_bytes())[0] == 127
        } else {
            self.words[0] == 0
                && self.words[1] == 0
                && self.words[2] == 0
                && self.words[3] == u32::from_be(1)
        }
    }
}

/// An address and a port (host byte order). 20 bytes, no implicit padding.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub ip: IpKey,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `ENROLLED_NETNS`. Room for per-pod flags later.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct EnrolledNetns {
    pub flags: u32,
}

/// What `connect4/6` records about a redirected socket until its handshake completes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct PendingOriginalDst {
    pub netns_cookie: u64,
    pub original_dst: SockAddr,
    pub _pad: u32,
}

/// Key of `ORIGINAL_DST`: the pod's netns plus the client socket's local address, which is
/// exactly the peer address of the socket the agent accepts on its outbound listener. The
/// netns cookie keeps two pods with the same loopback 4-tuple apart.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub client: SockAddr,
    pub _pad: u32,
}

/// Key of `POD_OWN_IPS`: one address of the pod whose netns has this cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct OwnIpKey {
    pub netns_cookie: u64,
    pub ip: IpKey,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::PendingOriginalDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::OwnIpKey {}
}

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
mod convert {
    use super::{IpKey, SockAddr};
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    impl From<IpAddr> for IpKey {
        fn from(ip: IpAddr) -> Self {
            let octets = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let mut words = [0u32; 4];
            for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            IpKey { words }
        }
    }

    impl From<IpKey> for IpAddr {
        /// IPv4-mapped keys come back as IPv4.
        fn from(key: IpKey) -> Self {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(key.words) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ipv6Addr::from(octets).to_canonical()
        }
    }

    impl From<SocketAddr> for SockAddr {
        fn from(addr: SocketAddr) -> Self {
            SockAddr {
                ip: addr.ip().into(),
                port: addr.port(),
                _pad: 0,
            }
        }
    }

    impl From<SockAddr> for SocketAddr {
        fn from(addr: SockAddr) -> Self {
            SocketAddr::new(addr.ip.into(), addr.port)
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn v4_round_trips_as_mapped() {
        let ip: IpAddr = "10.77.1.10".parse().unwrap();
        let key = IpKey::from(ip);
        assert!(key.is_v4_mapped());
        assert_eq!(key, IpKey::from_v4_raw(u32::from_ne_bytes([10, 77, 1, 10])));
        assert_eq!(IpAddr::from(key), ip);
        // A v4 peer seen on a dual-stack socket keys identically.
        let mapped: IpAddr = "::ffff:10.77.1.10".parse().unwrap();
        assert_eq!(IpKey::from(mapped.to_canonical()), key);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "fd00:77:1::10".parse().unwrap();
        let key = IpKey::from(ip);
        assert!(!key.is_v4_mapped());
        assert_eq!(IpAddr::from(key), ip);
        let addr: SocketAddr = "[fd00:77:1::10]:8080".parse().unwrap();
        assert_eq!(SocketAddr::from(SockAddr::from(addr)), addr);
    }

    #[test]
    fn loopback_detection() {
        for lo in ["127.0.0.1", "127.3.2.1", "::1"] {
            assert!(
                IpKey::from(lo.parse::<IpAddr>().unwrap()).is_loopback(),
                "{lo}"
            );
        }
        for not_lo in ["10.0.0.1", "::2", "fd00::1", "128.0.0.1"] {
            assert!(
                !IpKey::from(not_lo.parse::<IpAddr>().unwrap()).is_loopback(),
                "{not_lo}"
            );
        }
    }

    #[test]
    fn key_sizes_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<SockAddr>(), 20);
        assert_eq!(core::mem::size_of::<PendingOriginalDst>(), 32);
        assert_eq!(core::mem::size_of::<ClientKey>(), 32);
        assert_eq!(core::mem::size_of::<OwnIpKey>(), 24);
    }
}
