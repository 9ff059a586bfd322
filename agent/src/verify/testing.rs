//! Captures built byte by byte, for the tests of `warren verify`: a pcap container, link
//! layers (Ethernet, 802.1Q, Linux cooked v1 and v2), IPv4/IPv6 and TCP headers, whole
//! connections, and payloads (TLS records, a ClientHello, plain HTTP).
//!
//! Self-contained (std only, nothing from the crate) so that `tests/verify_cli.rs` can
//! include the same file with `#[path]`.
use std::net::SocketAddr;

pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_LINUX_SLL: u32 = 113;
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

pub const SYN: u8 = 0x02;
pub const FIN: u8 = 0x01;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;

/// The first record's time: 2023-11-14T22:13:20Z.
pub const START_SECONDS: u32 = 1_700_000_000;

/// A pcap capture being written.
pub struct Pcap {
    bytes: Vec<u8>,
    link_type: u32,
    big_endian: bool,
    nanoseconds: bool,
    /// Time of the next [`Pcap::record`], in microseconds after [`START_SECONDS`].
    next_us: u64,
}

impl Pcap {
    /// Little endian, microseconds: what tcpdump writes on x86.
    pub fn new(link_type: u32) -> Self {
        Self::with_format(link_type, false, false)
    }

    pub fn with_format(link_type: u32, big_endian: bool, nanoseconds: bool) -> Self {
        let mut pcap = Self {
            bytes: Vec::new(),
            link_type,
            big_endian,
            nanoseconds,
            next_us: 0,
        };
        let magic: u32 = if nanoseconds {
            0xa1b2_3c4d
        } else {
            0xa1b2_c3d4
        };
        pcap.u32(magic);
        pcap.u16(2);
        pcap.u16(4);
        pcap.u32(0); // thiszone
        pcap.u32(0); // sigfigs
        pcap.u32(262_144); // snaplen
        pcap.u32(link_type);
        pcap
    }

    fn u16(&mut self, value: u16) {
        let bytes = if self.big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        };
        self.bytes.extend_from_slice(&bytes);
    }

    fn u32(&mut self, value: u32) {
        let bytes = if self.big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        };
        self.bytes.extend_from_slice(&bytes);
    }

    /// A record at an explicit time.
    pub fn record_at(&mut self, seconds: u32, fraction_ns: u32, frame: &[u8]) {
        self.u32(seconds);
        self.u32(if self.nanoseconds {
            fraction_ns
        } else {
            fraction_ns / 1_000
        });
        self.u32(frame.len() as u32);
        self.u32(frame.len() as u32);
        self.bytes.extend_from_slice(frame);
    }

    /// A record 1 ms after the previous one.
    pub fn record(&mut self, frame: &[u8]) {
        let at = self.next_us;
        self.next_us += 1_000;
        self.record_at(
            START_SECONDS + (at / 1_000_000) as u32,
            ((at % 1_000_000) * 1_000) as u32,
            frame,
        );
    }

    /// Let `us` microseconds pass before the next [`Pcap::record`].
    pub fn wait_us(&mut self, us: u64) {
        self.next_us += us;
    }

    /// A record of this IP packet in the capture's link layer.
    pub fn ip(&mut self, ip: &[u8]) {
        let frame = match self.link_type {
            LINKTYPE_ETHERNET => ethernet(ip),
            LINKTYPE_LINUX_SLL => sll(ip),
            LINKTYPE_LINUX_SLL2 => sll2(ip),
            LINKTYPE_RAW => ip.to_vec(),
            other => panic!("the test helper does not frame link type {other}"),
        };
        self.record(&frame);
    }

    pub fn ips(&mut self, packets: impl IntoIterator<Item = Vec<u8>>) {
        for packet in packets {
            self.ip(&packet);
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

fn ethertype(ip: &[u8]) -> [u8; 2] {
    if ip[0] >> 4 == 6 {
        [0x86, 0xdd]
    } else {
        [0x08, 0x00]
    }
}

/// An Ethernet frame, padded to 60 bytes as a NIC would.
pub fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ethertype(ip));
    frame.extend_from_slice(ip);
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

/// An Ethernet frame with an 802.1Q tag (VLAN 77).
pub fn ethernet_vlan(ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![
        0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x81, 0x00, 0, 77,
    ];
    frame.extend_from_slice(&ethertype(ip));
    frame.extend_from_slice(ip);
    frame
}

/// Linux cooked capture v1 (`tcpdump -i any`).
pub fn sll(ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![0, 4, 0, 1, 0, 6, 0x02, 0, 0, 0, 0, 0x01, 0, 0];
    frame.extend_from_slice(&ethertype(ip));
    frame.extend_from_slice(ip);
    frame
}

/// Linux cooked capture v2.
pub fn sll2(ip: &[u8]) -> Vec<u8> {
    let mut frame = ethertype(ip).to_vec();
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 1, 4, 6, 0x02, 0, 0, 0, 0, 0x01, 0, 0]);
    frame.extend_from_slice(ip);
    frame
}

/// An IPv4 or IPv6 packet (by the addresses) holding one TCP segment. Checksums are left
/// at zero.
pub fn ip_tcp(src: SocketAddr, dst: SocketAddr, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => {
            let total = (20 + tcp.len()) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            ip.extend_from_slice(&src.ip().octets());
            ip.extend_from_slice(&dst.ip().octets());
            ip.extend_from_slice(&tcp);
            ip
        }
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[6, 64]);
            ip.extend_from_slice(&src.ip().octets());
            ip.extend_from_slice(&dst.ip().octets());
            ip.extend_from_slice(&tcp);
            ip
        }
        _ => panic!("{src} and {dst} are not of the same IP version"),
    }
}

/// The same IPv6 packet with an 8-byte hop-by-hop options header in front of TCP.
pub fn with_ipv6_hop_by_hop(ip: &[u8]) -> Vec<u8> {
    let mut out = ip[..40].to_vec();
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) + 8;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out[6] = 0; // next header: hop-by-hop
    out.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // then TCP; PadN
    out.extend_from_slice(&ip[40..]);
    out
}

/// One TCP connection, tracking both sides' sequence numbers.
pub struct Connection {
    pub client: SocketAddr,
    pub server: SocketAddr,
    client_seq: u32,
    server_seq: u32,
}

/// Payload per segment, as on a 1500-byte MTU.
pub const MSS: usize = 1448;

impl Connection {
    pub fn new(client: &str, server: &str) -> Self {
        Self {
            client: client.parse().expect("client address"),
            server: server.parse().expect("server address"),
            client_seq: 1_000,
            server_seq: 3_000_000_000,
        }
    }

    /// SYN, SYN-ACK, ACK.
    pub fn handshake(&mut self) -> Vec<Vec<u8>> {
        let packets = vec![
            ip_tcp(self.client, self.server, self.client_seq, SYN, b""),
            ip_tcp(self.server, self.client, self.server_seq, SYN | ACK, b""),
            ip_tcp(self.client, self.server, self.client_seq + 1, ACK, b""),
        ];
        self.client_seq += 1;
        self.server_seq += 1;
        packets
    }

    /// The client's bytes, in segments of at most [`MSS`].
    pub fn client_sends(&mut self, payload: &[u8]) -> Vec<Vec<u8>> {
        let (src, dst) = (self.client, self.server);
        segments(src, dst, &mut self.client_seq, payload)
    }

    /// The server's bytes, in segments of at most [`MSS`].
    pub fn server_sends(&mut self, payload: &[u8]) -> Vec<Vec<u8>> {
        let (src, dst) = (self.server, self.client);
        segments(src, dst, &mut self.server_seq, payload)
    }

    /// FIN from each side.
    pub fn close(&mut self) -> Vec<Vec<u8>> {
        vec![
            ip_tcp(self.client, self.server, self.client_seq, FIN | ACK, b""),
            ip_tcp(self.server, self.client, self.server_seq, FIN | ACK, b""),
        ]
    }

    /// A whole connection: handshake, request, response, close.
    pub fn exchange(mut self, request: &[u8], response: &[u8]) -> Vec<Vec<u8>> {
        let mut packets = self.handshake();
        packets.extend(self.client_sends(request));
        packets.extend(self.server_sends(response));
        packets.extend(self.close());
        packets
    }
}

fn segments(src: SocketAddr, dst: SocketAddr, seq: &mut u32, payload: &[u8]) -> Vec<Vec<u8>> {
    payload
        .chunks(MSS)
        .map(|chunk| {
            let packet = ip_tcp(src, dst, *seq, ACK | PSH, chunk);
            *seq = seq.wrapping_add(chunk.len() as u32);
            packet
        })
        .collect()
}

/// Bytes that look random (ciphertext), from a fixed seed.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

fn record(content_type: u8, version: [u8; 2], body: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, version[0], version[1]];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A TLS 1.3 ClientHello record, as a client's first flight (record version 3.1).
pub fn client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03]; // legacy_version
    hello.extend_from_slice(&noise(32, 1)); // random
    hello.push(32); // legacy_session_id
    hello.extend_from_slice(&noise(32, 2));
    hello.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    hello.extend_from_slice(&[1, 0]); // compression: null
    hello.extend_from_slice(&[0, 6, 0, 0x2b, 0, 2, 0x03, 0x04]); // supported_versions: 1.3
    let mut handshake = vec![0x01, 0, 0, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    record(0x16, [0x03, 0x01], &handshake)
}

/// A server's first flight in TLS 1.3: ServerHello, change_cipher_spec, then encrypted
/// handshake messages.
pub fn server_hello() -> Vec<u8> {
    let mut hello = vec![0x02, 0, 0, 38, 0x03, 0x03];
    hello.extend_from_slice(&noise(32, 3));
    hello.extend_from_slice(&[0, 0x13, 0x01, 0]);
    let mut flight = record(0x16, [0x03, 0x03], &hello);
    flight.extend_from_slice(&record(0x14, [0x03, 0x03], &[1]));
    flight.extend_from_slice(&record(0x17, [0x03, 0x03], &noise(1200, 4)));
    flight
}

/// TLS 1.3 application_data records with bodies of these lengths.
pub fn tls_records(lengths: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, len) in lengths.iter().enumerate() {
        out.extend_from_slice(&record(0x17, [0x03, 0x03], &noise(*len, 10 + i as u32)));
    }
    out
}

/// A whole TLS 1.3 conversation's bytes: the client's, then the server's.
pub fn tls_conversation(request_len: usize, response_len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut request = client_hello();
    request.extend_from_slice(&tls_records(&[52]));
    request.extend_from_slice(&tls_records(&vec![16_401; request_len / 16_384 + 1]));
    let mut response = server_hello();
    response.extend_from_slice(&tls_records(&vec![16_401; response_len / 16_384 + 1]));
    (request, response)
}

/// A plain HTTP/1.1 request with a marker in it.
pub fn http_get() -> &'static [u8] {
    b"GET /sha HTTP/1.1\r\nhost: 10.77.2.10:8080\r\nx-marker: PLAIN-MARKER\r\n\r\n"
}

/// A plain HTTP/1.1 response with a body of `len` bytes.
pub fn http_response(len: usize) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
    out.extend(std::iter::repeat_n(b'a', len));
    out
}
