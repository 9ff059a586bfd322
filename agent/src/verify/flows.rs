//! TCP flows and whether each carried TLS.
//!
//! A flow is one TCP connection: segments grouped by the unordered pair of (ip, port)
//! endpoints; a new SYN on a pair already seen starts a new flow (the 4-tuple was
//! reused). Each direction of a flow is a [`Stream`], whose payload is followed through
//! TLS record headers (content type, version, length: 5 bytes) by sequence number:
//!
//! - when the SYN was captured, the first payload byte must start a TLS record (the
//!   rule: "the first bytes of each direction look like a TLS record");
//! - when the capture joined a connection in the middle (an HBONE connection from the
//!   agent's pool, opened before the capture), a segment that starts with a TLS record
//!   header synchronises, and the following headers must be where the lengths say;
//! - a header missing where one must be is clear text; a stream with payload but no TLS
//!   record header anywhere is clear text too: TLS needs positive evidence.
//!
//! Retransmitted and duplicated segments (`tcpdump -i any` sees a packet on each
//! interface it crosses) are counted once in the bytes.
use std::{collections::HashMap, net::SocketAddr};

use super::packet::{Segment, TCP_ACK, TCP_SYN};

/// The largest TLS record: 2^14 bytes of plaintext plus 2048 of expansion (TLS 1.2; 1.3
/// allows 256).
const MAX_TLS_RECORD: u16 = 16_384 + 2_048;

/// Do these 5 bytes look like a TLS record header: content type change_cipher_spec (0x14),
/// alert, handshake or application_data (0x17), version 3.1 to 3.4, and a length no
/// record exceeds (0 only for application data).
pub fn is_tls_record_header(header: &[u8; 5]) -> bool {
    let length = u16::from_be_bytes([header[3], header[4]]);
    (0x14..=0x17).contains(&header[0])
        && header[1] == 0x03
        && (0x01..=0x04).contains(&header[2])
        && length <= MAX_TLS_RECORD
        && (length > 0 || header[0] == 0x17)
}

/// `a` comes after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Following TLS record headers through one direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Not at a known record boundary: the next segment that starts with a record header
    /// synchronises.
    Unsynced,
    /// A record header starts at sequence number `start`; `have` of its bytes are in
    /// `header` already.
    Expect {
        start: u32,
        header: [u8; 5],
        have: u8,
        /// The position is known (the stream's start, or the end of the previous
        /// record): something else there is not TLS.
        known: bool,
    },
    /// Something else was found where a header had to be.
    Broken,
}

/// Why a direction's payload is not TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearReason {
    /// The first payload byte after the SYN starts no TLS record.
    FirstBytes,
    /// A TLS record ended and no record header followed.
    Framing,
    /// No TLS record header anywhere: the capture joined the connection in the middle
    /// (or missed its first bytes) and found none since.
    NoRecord,
}

/// What one direction carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamVerdict {
    NoData,
    Tls,
    Clear(ClearReason),
}

/// One direction of a flow.
#[derive(Debug, Clone)]
pub struct Stream {
    /// Payload bytes, each counted once.
    pub bytes: u64,
    /// Segments with payload (duplicates included).
    pub segments: u64,
    /// The sequence number of the SYN, when it was captured.
    pub isn: Option<u32>,
    /// Just past the highest payload byte seen.
    high: Option<u32>,
    walk: Walk,
    /// Record headers found where the previous record (or the SYN) said one starts.
    records_at_known_places: u32,
    /// Record headers found at the start of a segment, before synchronising.
    records_found: u32,
    clear: Option<ClearReason>,
}

impl Stream {
    fn new() -> Self {
        Self {
            bytes: 0,
            segments: 0,
            isn: None,
            high: None,
            walk: Walk::Unsynced,
            records_at_known_places: 0,
            records_found: 0,
            clear: None,
        }
    }

    fn on_segment(&mut self, segment: &Segment<'_>) {
        if segment.has(TCP_SYN) && self.isn.is_none() {
            self.isn = Some(segment.seq);
            if self.high.is_none() {
                self.walk = Walk::Expect {
                    start: segment.seq.wrapping_add(1),
                    header: [0; 5],
                    have: 0,
                    known: true,
                };
            }
        }
        if segment.payload_len == 0 {
            return;
        }
        // Data in a SYN (TCP Fast Open) starts after the SYN's own sequence number.
        let seq = segment.seq.wrapping_add(u32::from(segment.has(TCP_SYN)));
        let end = seq.wrapping_add(segment.payload_len);
        self.segments += 1;
        match self.high {
            None => {
                self.bytes += u64::from(segment.payload_len);
                self.high = Some(end);
            }
            Some(high) if seq_after(end, high) => {
                let new = if seq_after(seq, high) {
                    segment.payload_len
                } else {
                    end.wrapping_sub(high)
                };
                self.bytes += u64::from(new);
                self.high = Some(end);
            }
            Some(_) => {}
        }
        self.walk(seq, segment.payload, segment.payload_len);
    }

    /// Check every record header that falls in this segment's captured bytes.
    fn walk(&mut self, seq: u32, data: &[u8], wire_len: u32) {
        loop {
            match self.walk {
                Walk::Broken => return,
                Walk::Unsynced => {
                    let starts_a_record = data.first_chunk::<5>().is_some_and(is_tls_record_header);
                    if !starts_a_record {
                        return;
                    }
                    self.walk = Walk::Expect {
                        start: seq,
                        header: [0; 5],
                        have: 0,
                        known: false,
                    };
                }
                Walk::Expect {
                    start,
                    mut header,
                    mut have,
                    known,
                } => {
                    let at = start.wrapping_add(u32::from(have));
                    let offset = at.wrapping_sub(seq);
                    if (offset as i32) < 0 {
                        // This segment starts past the header: the bytes before it were
                        // not captured (or come later, out of order). Start over here.
                        self.walk = Walk::Unsynced;
                        continue;
                    }
                    if offset >= wire_len {
                        // Inside a record, or a retransmission of bytes already walked.
                        return;
                    }
                    let offset = offset as usize;
                    if offset >= data.len() {
                        // The header is in bytes the snapshot length cut off.
                        self.walk = Walk::Unsynced;
                        return;
                    }
                    let take = (5 - usize::from(have)).min(data.len() - offset);
                    header[usize::from(have)..usize::from(have) + take]
                        .copy_from_slice(&data[offset..offset + take]);
                    have += take as u8;
                    if have < 5 {
                        // The header continues in the next segment.
                        self.walk = Walk::Expect {
                            start,
                            header,
                            have,
                            known,
                        };
                        return;
                    }
                    if !is_tls_record_header(&header) {
                        if known {
                            self.clear = Some(if Some(start.wrapping_sub(1)) == self.isn {
                                ClearReason::FirstBytes
                            } else {
                                ClearReason::Framing
                            });
                            self.walk = Walk::Broken;
                            return;
                        }
                        self.walk = Walk::Unsynced;
                        return;
                    }
                    if known {
                        self.records_at_known_places += 1;
                    } else {
                        self.records_found += 1;
                    }
                    let length = u16::from_be_bytes([header[3], header[4]]);
                    self.walk = Walk::Expect {
                        start: start.wrapping_add(5 + u32::from(length)),
                        header: [0; 5],
                        have: 0,
                        known: true,
                    };
                }
            }
        }
    }

    pub fn verdict(&self) -> StreamVerdict {
        if self.bytes == 0 {
            StreamVerdict::NoData
        } else if let Some(reason) = self.clear {
            StreamVerdict::Clear(reason)
        } else if self.records_at_known_places + self.records_found > 0 {
            StreamVerdict::Tls
        } else {
            StreamVerdict::Clear(ClearReason::NoRecord)
        }
    }
}

/// What a whole flow carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Every direction that carried payload carried TLS.
    Tls,
    /// Some direction carried payload that is not TLS.
    ClearText,
    /// No payload either way (a handshake only, a refused connection).
    NoData,
}

/// One TCP connection.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The endpoints, lower first; `streams[0]` goes from `ends[0]` to `ends[1]`.
    pub ends: [SocketAddr; 2],
    pub streams: [Stream; 2],
    /// Index in `ends` of the side that sent the SYN (or did not send the SYN-ACK).
    client: Option<usize>,
}

impl Flow {
    fn new(ends: [SocketAddr; 2]) -> Self {
        Self {
            ends,
            streams: [Stream::new(), Stream::new()],
            client: None,
        }
    }

    pub fn verdict(&self) -> Verdict {
        let verdicts = self.streams.each_ref().map(Stream::verdict);
        if verdicts
            .iter()
            .any(|v| matches!(v, StreamVerdict::Clear(_)))
        {
            Verdict::ClearText
        } else if verdicts.contains(&StreamVerdict::Tls) {
            Verdict::Tls
        } else {
            Verdict::NoData
        }
    }

    /// Why the flow is clear text (the first direction that is).
    pub fn clear_reason(&self) -> Option<ClearReason> {
        self.streams.iter().find_map(|s| match s.verdict() {
            StreamVerdict::Clear(reason) => Some(reason),
            _ => None,
        })
    }

    /// The client's end and the server's, by the SYN; without one, the lower port is
    /// taken for the server's (services listen on low ports, clients get ephemeral ones).
    pub fn client_server(&self) -> (SocketAddr, SocketAddr) {
        let client = self.client.unwrap_or({
            if self.ends[0].port() < self.ends[1].port() {
                1
            } else {
                0
            }
        });
        (self.ends[client], self.ends[1 - client])
    }

    /// The capture began after the connection did.
    pub fn joined_mid_stream(&self) -> bool {
        self.streams.iter().all(|s| s.isn.is_none())
    }

    pub fn bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }
}

/// Groups segments into flows.
#[derive(Debug, Default)]
pub struct FlowTable {
    open: HashMap<[SocketAddr; 2], Flow>,
    closed: Vec<Flow>,
}

impl FlowTable {
    pub fn add(&mut self, segment: &Segment<'_>) {
        let forward = segment.src <= segment.dst;
        let ends = if forward {
            [segment.src, segment.dst]
        } else {
            [segment.dst, segment.src]
        };
        let from = usize::from(!forward);
        let opening = segment.has(TCP_SYN) && !segment.has(TCP_ACK);
        if opening {
            // A SYN other than a retransmission of this flow's own: the 4-tuple is reused
            // by a new connection.
            if let Some(flow) = self.open.get(&ends) {
                if flow.streams[from].isn != Some(segment.seq) {
                    let old = self.open.remove(&ends).expect("present");
                    self.closed.push(old);
                }
            }
        }
        let flow = self.open.entry(ends).or_insert_with(|| Flow::new(ends));
        if segment.has(TCP_SYN) && flow.client.is_none() {
            flow.client = Some(if opening { from } else { 1 - from });
        }
        flow.streams[from].on_segment(segment);
    }

    /// Every flow, in the order they began.
    pub fn into_flows(self) -> Vec<Flow> {
        let mut flows = self.closed;
        let mut open: Vec<Flow> = self.open.into_values().collect();
        // HashMap order is random; the report sorts anyway, tests like stable input.
        open.sort_by_key(|f| f.ends);
        flows.extend(open);
        flows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::testing::{
        client_hello, http_get, server_hello, tls_records, FIN as TCP_FIN,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn seg<'a>(src: &str, dst: &str, seq: u32, flags: u8, payload: &'a [u8]) -> Segment<'a> {
        Segment {
            src: addr(src),
            dst: addr(dst),
            seq,
            flags,
            payload,
            payload_len: payload.len() as u32,
        }
    }

    const C: &str = "10.77.1.10:40000";
    const S: &str = "10.77.2.10:15008";

    /// SYN, SYN-ACK; the client's data starts at 101, the server's at 5001.
    fn handshake(table: &mut FlowTable) {
        table.add(&seg(C, S, 100, TCP_SYN, b""));
        table.add(&seg(S, C, 5000, TCP_SYN | TCP_ACK, b""));
    }

    fn only_flow(table: FlowTable) -> Flow {
        let mut flows = table.into_flows();
        assert_eq!(flows.len(), 1);
        flows.pop().unwrap()
    }

    #[test]
    fn record_headers() {
        assert!(is_tls_record_header(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(is_tls_record_header(&[0x17, 0x03, 0x03, 0x40, 0x11]));
        assert!(is_tls_record_header(&[0x15, 0x03, 0x03, 0x00, 0x02]));
        assert!(!is_tls_record_header(b"GET /"));
        assert!(
            !is_tls_record_header(&[0x16, 0x03, 0x00, 0x00, 0x10]),
            "SSL 3.0"
        );
        assert!(!is_tls_record_header(&[0x18, 0x03, 0x03, 0x00, 0x10]));
        assert!(
            !is_tls_record_header(&[0x17, 0x03, 0x03, 0x48, 0x01]),
            "too long"
        );
        assert!(
            !is_tls_record_header(&[0x16, 0x03, 0x03, 0x00, 0x00]),
            "empty handshake"
        );
    }

    #[test]
    fn a_tls_connection_is_tls_and_its_ends_are_known() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        let hello = client_hello();
        table.add(&seg(C, S, 101, TCP_ACK, &hello));
        let reply = server_hello();
        table.add(&seg(S, C, 5001, TCP_ACK, &reply));
        let data = tls_records(&[3000, 3000]);
        // A record split across segments, with a header split too.
        let cut = 3000 + 5 + 2;
        table.add(&seg(C, S, 101 + hello.len() as u32, TCP_ACK, &data[..cut]));
        table.add(&seg(
            C,
            S,
            101 + (hello.len() + cut) as u32,
            TCP_ACK,
            &data[cut..],
        ));
        let flow = only_flow(table);
        assert_eq!(flow.verdict(), Verdict::Tls);
        assert_eq!(flow.streams[0].records_at_known_places, 3);
        assert_eq!(flow.client_server(), (addr(C), addr(S)));
        assert_eq!(
            flow.bytes(),
            (hello.len() + reply.len() + data.len()) as u64
        );
        assert!(!flow.joined_mid_stream());
    }

    #[test]
    fn plain_http_is_clear_text() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        table.add(&seg(C, S, 101, TCP_ACK, http_get()));
        let flow = only_flow(table);
        assert_eq!(flow.verdict(), Verdict::ClearText);
        assert_eq!(flow.clear_reason(), Some(ClearReason::FirstBytes));
    }

    #[test]
    fn tls_one_way_and_clear_the_other_is_clear_text() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        table.add(&seg(C, S, 101, TCP_ACK, &client_hello()));
        table.add(&seg(
            S,
            C,
            5001,
            TCP_ACK,
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
        ));
        assert_eq!(only_flow(table).verdict(), Verdict::ClearText);
    }

    #[test]
    fn a_record_header_followed_by_no_header_is_clear_text() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        let mut bytes = tls_records(&[10]);
        bytes.extend_from_slice(b"plain text after a record");
        table.add(&seg(C, S, 101, TCP_ACK, &bytes));
        let flow = only_flow(table);
        assert_eq!(flow.clear_reason(), Some(ClearReason::Framing));
    }

    #[test]
    fn a_handshake_alone_is_no_data() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        table.add(&seg(C, S, 101, TCP_ACK | TCP_FIN, b""));
        assert_eq!(only_flow(table).verdict(), Verdict::NoData);
    }

    #[test]
    fn joining_a_tls_connection_midway_synchronises_on_a_record() {
        let mut table = FlowTable::default();
        let data = tls_records(&[16_000, 200, 16_000]);
        // The first segment starts inside a record: no verdict from it.
        table.add(&seg(C, S, 9_000_000, TCP_ACK, &[0x42; 1000]));
        let mut seq = 9_001_000u32;
        for chunk in data.chunks(1448) {
            table.add(&seg(C, S, seq, TCP_ACK, chunk));
            seq = seq.wrapping_add(chunk.len() as u32);
        }
        let flow = only_flow(table);
        assert!(flow.joined_mid_stream());
        assert_eq!(flow.verdict(), Verdict::Tls);
        assert_eq!(flow.streams[0].records_found, 1);
        assert_eq!(flow.streams[0].records_at_known_places, 2);
        // Ports decide the server without a SYN.
        assert_eq!(flow.client_server().1, addr(S));
    }

    #[test]
    fn joining_a_clear_connection_midway_is_clear_text() {
        let mut table = FlowTable::default();
        table.add(&seg(C, S, 7, TCP_ACK, b"more of the body, in plain text"));
        let flow = only_flow(table);
        assert_eq!(flow.verdict(), Verdict::ClearText);
        assert_eq!(flow.clear_reason(), Some(ClearReason::NoRecord));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut table = FlowTable::default();
        table.add(&seg(C, S, u32::MAX - 2, TCP_SYN, b""));
        let data = tls_records(&[100, 100]);
        table.add(&seg(C, S, u32::MAX - 1, TCP_ACK, &data[..50]));
        table.add(&seg(C, S, 48, TCP_ACK, &data[50..]));
        let flow = only_flow(table);
        assert_eq!(flow.verdict(), Verdict::Tls);
        assert_eq!(flow.streams[0].records_at_known_places, 2);
        assert_eq!(flow.bytes(), data.len() as u64);
    }

    #[test]
    fn retransmissions_and_duplicates_count_once() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        let data = tls_records(&[500]);
        for _ in 0..3 {
            table.add(&seg(C, S, 101, TCP_ACK, &data));
        }
        let flow = only_flow(table);
        assert_eq!(flow.verdict(), Verdict::Tls);
        assert_eq!(flow.bytes(), data.len() as u64);
        assert_eq!(flow.streams[0].segments, 3);
    }

    #[test]
    fn a_reused_four_tuple_is_a_new_flow() {
        let mut table = FlowTable::default();
        handshake(&mut table);
        table.add(&seg(C, S, 101, TCP_ACK, &client_hello()));
        table.add(&seg(C, S, 100, TCP_SYN, b"")); // retransmitted SYN: same flow
        table.add(&seg(C, S, 900_000, TCP_SYN, b""));
        table.add(&seg(C, S, 900_001, TCP_ACK, http_get()));
        let flows = table.into_flows();
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].verdict(), Verdict::Tls);
        assert_eq!(flows[1].verdict(), Verdict::ClearText);
    }
}
