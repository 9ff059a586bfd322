//! From a captured frame to a TCP segment: the link-layer header ([`LinkType`]), 802.1Q
//! tags, IPv4 or IPv6 (extension headers skipped), TCP.
//!
//! Lengths come from the IP header, not from the frame: Ethernet pads short frames to 60
//! bytes, and that padding is not payload.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::pcap::LinkType;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const IPPROTO_TCP: u8 = 6;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment as captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    /// The TCP flags byte ([`TCP_SYN`], …).
    pub flags: u8,
    /// The payload bytes that were captured (fewer than [`Self::payload_len`] when the
    /// capture's snapshot length cut the packet).
    pub payload: &'a [u8],
    /// The payload's length on the wire, from the IP header.
    pub payload_len: u32,
}

impl Segment<'_> {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// What a frame holds, as far as warren verify is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Tcp(Segment<'a>),
    /// Not IP, not TCP, or a non-first IP fragment: ignored.
    Other,
    /// Headers that do not add up (cut by the snapshot length, or corrupt): counted.
    Malformed,
}

/// Decode one captured frame.
pub fn decode(link_type: LinkType, frame: &[u8]) -> Packet<'_> {
    let (ethertype, ip) = match link_type {
        LinkType::Ethernet => match frame.get(12..14) {
            Some(t) => (u16::from_be_bytes([t[0], t[1]]), &frame[14..]),
            None => return Packet::Malformed,
        },
        LinkType::LinuxSll => match frame.get(14..16) {
            Some(t) => (u16::from_be_bytes([t[0], t[1]]), &frame[16..]),
            None => return Packet::Malformed,
        },
        LinkType::LinuxSll2 => match (frame.get(0..2), frame.get(20..)) {
            (Some(t), Some(rest)) => (u16::from_be_bytes([t[0], t[1]]), rest),
            _ => return Packet::Malformed,
        },
        // The IP version nibble says which.
        LinkType::Raw => (0, frame),
        LinkType::Null | LinkType::Loop => match frame.get(4..) {
            Some(rest) => (0, rest),
            None => return Packet::Malformed,
        },
    };
    let (ethertype, ip) = match skip_vlan_tags(ethertype, ip) {
        Some(inner) => inner,
        None => return Packet::Malformed,
    };
    let version = match ethertype {
        ETHERTYPE_IPV4 => 4,
        ETHERTYPE_IPV6 => 6,
        0 => match ip.first() {
            Some(b) => b >> 4,
            None => return Packet::Malformed,
        },
        _ => return Packet::Other,
    };
    match version {
        4 => ipv4(ip),
        6 => ipv6(ip),
        _ => Packet::Other,
    }
}

fn skip_vlan_tags(mut ethertype: u16, mut rest: &[u8]) -> Option<(u16, &[u8])> {
    while ETHERTYPE_VLAN.contains(&ethertype) {
        let tag = rest.get(..4)?;
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        rest = &rest[4..];
    }
    Some((ethertype, rest))
}

fn ipv4(ip: &[u8]) -> Packet<'_> {
    let Some(header) = ip.get(..20) else {
        return Packet::Malformed;
    };
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    // 0 with TCP segmentation offload: the captured length is all there is to go by.
    let total_len = if total_len == 0 { ip.len() } else { total_len };
    if header[0] >> 4 != 4 || header_len < 20 || total_len < header_len || ip.len() < header_len {
        return Packet::Malformed;
    }
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if header[9] != IPPROTO_TCP || fragment_offset != 0 {
        return Packet::Other;
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let captured = &ip[header_len..ip.len().min(total_len)];
    tcp(src.into(), dst.into(), captured, total_len - header_len)
}

fn ipv6(ip: &[u8]) -> Packet<'_> {
    let Some(header) = ip.get(..40) else {
        return Packet::Malformed;
    };
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    // 0 for a jumbogram (or with segmentation offload).
    let payload_len = if payload_len == 0 {
        ip.len() - 40
    } else {
        payload_len
    };
    let src = ipv6_at(&header[8..24]);
    let dst = ipv6_at(&header[24..40]);
    let mut next = header[6];
    let mut offset = 40;
    let end = 40 + payload_len;
    loop {
        match next {
            IPPROTO_TCP => break,
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6.
            0 | 43 | 60 | 135 | 139 | 140 => {
                let Some(ext) = ip.get(offset..offset + 2) else {
                    return Packet::Malformed;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            // Fragment: only the first fragment holds the TCP header.
            44 => {
                let Some(ext) = ip.get(offset..offset + 8) else {
                    return Packet::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    return Packet::Other;
                }
                next = ext[0];
                offset += 8;
            }
            // Authentication header: its length is in 4-byte units, minus 2.
            51 => {
                let Some(ext) = ip.get(offset..offset + 2) else {
                    return Packet::Malformed;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            _ => return Packet::Other,
        }
        if offset > end {
            return Packet::Malformed;
        }
    }
    if offset > ip.len() {
        return Packet::Malformed;
    }
    let captured = &ip[offset..ip.len().min(end)];
    tcp(src.into(), dst.into(), captured, end - offset)
}

fn ipv6_at(bytes: &[u8]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(bytes);
    Ipv6Addr::from(octets)
}

/// `captured`: the TCP bytes in the frame; `wire_len`: the TCP length per the IP header.
fn tcp(src: IpAddr, dst: IpAddr, captured: &[u8], wire_len: usize) -> Packet<'_> {
    let Some(header) = captured.get(..20) else {
        return Packet::Malformed;
    };
    let header_len = usize::from(header[12] >> 4) * 4;
    if header_len < 20 || header_len > wire_len || header_len > captured.len() {
        return Packet::Malformed;
    }
    Packet::Tcp(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([header[0], header[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([header[2], header[3]])),
        seq: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
        flags: header[13],
        payload: &captured[header_len..],
        payload_len: u32::try_from(wire_len - header_len).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::testing::{
        ethernet, ethernet_vlan, ip_tcp, sll, sll2, with_ipv6_hop_by_hop,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn segment(packet: Packet<'_>) -> Segment<'_> {
        match packet {
            Packet::Tcp(segment) => segment,
            other => panic!("not a TCP segment: {other:?}"),
        }
    }

    #[test]
    fn decodes_tcp_over_every_link_type_and_both_ip_versions() {
        for (src, dst) in [
            ("10.77.1.10:40000", "10.77.2.10:15008"),
            ("[fd00:77::1:10]:40000", "[fd00:77::2:10]:15008"),
        ] {
            let ip = ip_tcp(addr(src), addr(dst), 1000, TCP_ACK, b"hello");
            for (link, frame) in [
                (LinkType::Ethernet, ethernet(&ip)),
                (LinkType::Ethernet, ethernet_vlan(&ip)),
                (LinkType::LinuxSll, sll(&ip)),
                (LinkType::LinuxSll2, sll2(&ip)),
                (LinkType::Raw, ip.clone()),
            ] {
                let seg = segment(decode(link, &frame));
                assert_eq!(
                    (
                        seg.src,
                        seg.dst,
                        seg.seq,
                        seg.flags,
                        seg.payload,
                        seg.payload_len
                    ),
                    (addr(src), addr(dst), 1000, TCP_ACK, &b"hello"[..], 5),
                    "{link:?} {src}"
                );
            }
        }
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let ip = ip_tcp(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 1, TCP_ACK, b"");
        let frame = ethernet(&ip);
        assert_eq!(frame.len(), 60, "the helper pads like a NIC");
        let seg = segment(decode(LinkType::Ethernet, &frame));
        assert_eq!((seg.payload, seg.payload_len), (&b""[..], 0));
    }

    #[test]
    fn skips_ipv6_extension_headers() {
        let ip = with_ipv6_hop_by_hop(&ip_tcp(
            addr("[fd00::1]:5000"),
            addr("[fd00::2]:80"),
            7,
            TCP_ACK,
            b"GET",
        ));
        let seg = segment(decode(LinkType::Raw, &ip));
        assert_eq!((seg.dst.port(), seg.payload), (80, &b"GET"[..]));
    }

    #[test]
    fn a_snapshot_length_cut_keeps_the_wire_length() {
        let ip = ip_tcp(
            addr("10.0.0.1:1"),
            addr("10.0.0.2:2"),
            1,
            TCP_ACK,
            &[0x17; 100],
        );
        let frame = ethernet(&ip);
        let seg = segment(decode(LinkType::Ethernet, &frame[..14 + 40 + 10]));
        assert_eq!((seg.payload.len(), seg.payload_len), (10, 100));
    }

    #[test]
    fn other_protocols_and_broken_headers() {
        let mut udp = ip_tcp(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 1, 0, b"x");
        udp[9] = 17;
        assert_eq!(decode(LinkType::Raw, &udp), Packet::Other);
        let mut arp = ethernet(&ip_tcp(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 1, 0, b""));
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decode(LinkType::Ethernet, &arp), Packet::Other);
        let ip = ip_tcp(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 1, 0, b"");
        assert_eq!(decode(LinkType::Raw, &ip[..30]), Packet::Malformed);
        assert_eq!(decode(LinkType::Ethernet, &[0; 10]), Packet::Malformed);
    }
}
