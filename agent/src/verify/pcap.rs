//! The classic libpcap container, read as a stream (tcpdump's `-w -` output, or a file):
//! a 24-byte global header, then records of a 16-byte header and the captured bytes.
//! pcapng is recognised and refused with a way out.
//!
//! Records are read one at a time into one buffer, so a long capture costs no memory.
use std::io::{self, Read};

/// The snapshot length tcpdump uses for `-s 0`; a record may be as long as the larger of
/// this and the file's own snapshot length, up to [`MAX_RECORD_CAP`].
const MAX_RECORD: u32 = 262_144;
/// However large a file says its snapshot length is (the header is the file's say, and
/// `0xffffffff` is four bytes away), no record is taken longer than this: 64 times the
/// largest frame any capture here writes.
const MAX_RECORD_CAP: u32 = 16 * 1024 * 1024;

/// Link-layer header types (<https://www.tcpdump.org/linktypes.html>) warren reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// `LINKTYPE_NULL` (0): a 4-byte address family in the writer's byte order (BSD
    /// loopback).
    Null,
    /// `LINKTYPE_ETHERNET` (1).
    Ethernet,
    /// `LINKTYPE_RAW` (101), and `LINKTYPE_IPV4`/`LINKTYPE_IPV6` (228, 229): the IP
    /// packet itself (tun, WireGuard interfaces).
    Raw,
    /// `LINKTYPE_LOOP` (108): like `Null`, in network byte order (OpenBSD loopback).
    Loop,
    /// `LINKTYPE_LINUX_SLL` (113): Linux cooked capture v1, what `tcpdump -i any` writes.
    LinuxSll,
    /// `LINKTYPE_LINUX_SLL2` (276): Linux cooked capture v2 (`tcpdump -i any -y
    /// LINUX_SLL2`, and the default of recent libpcap).
    LinuxSll2,
}

impl LinkType {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Null,
            1 => Self::Ethernet,
            101 | 228 | 229 => Self::Raw,
            108 => Self::Loop,
            113 => Self::LinuxSll,
            276 => Self::LinuxSll2,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("it is empty (a pcap capture starts with a 24-byte header)")]
    Empty,
    #[error("it ends after {0} bytes, inside the 24-byte pcap header")]
    ShortHeader(usize),
    #[error("it is a pcapng capture, which warren verify does not read: convert it with `tcpdump -r FILE -w FILE.pcap` (or `editcap -F pcap`), or capture with `tcpdump -w`")]
    Pcapng,
    #[error("it is not a pcap capture: it starts with {0}, where a pcap capture starts with d4 c3 b2 a1 or a1 b2 c3 d4")]
    NotPcap(String),
    #[error("its pcap format version is {major}.{minor}; warren verify reads version 2.4 (what tcpdump -w writes)")]
    Version { major: u16, minor: u16 },
    #[error("its link-layer type is {0}, which warren verify does not read (it reads Ethernet 1, Linux cooked 113 and 276, raw IP 101): capture on another interface, or with -i any")]
    LinkType(u32),
    #[error("record {record} (at byte {offset}) claims {len} captured bytes, more than the snapshot length allows ({max}): the capture is corrupt")]
    RecordTooLong {
        record: u64,
        offset: u64,
        len: u32,
        max: u32,
    },
    #[error("reading it failed: {0}")]
    Io(#[from] io::Error),
}

/// One captured packet.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Capture time, in nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// The captured bytes (at most the snapshot length).
    pub data: &'a [u8],
}

/// The last record was cut short: the writer was stopped (or the file truncated) in the
/// middle of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruncatedTail {
    /// 1-based number of the record.
    pub record: u64,
    /// Bytes of the record (header included) that were there.
    pub have: usize,
    /// Bytes the record needed.
    pub want: usize,
}

/// Reads records one after the other from a pcap stream.
pub struct PcapReader<R> {
    inner: R,
    big_endian: bool,
    nanoseconds: bool,
    link_type: LinkType,
    max_record: u32,
    /// Bytes consumed so far.
    offset: u64,
    /// Records returned so far.
    records: u64,
    buf: Vec<u8>,
    truncated_tail: Option<TruncatedTail>,
}

impl<R: Read> PcapReader<R> {
    /// Read and check the global header.
    pub fn new(mut inner: R) -> Result<Self, PcapError> {
        let mut header = [0u8; 24];
        let got = read_full(&mut inner, &mut header)?;
        if got == 0 {
            return Err(PcapError::Empty);
        }
        if got >= 4 && header[..4] == [0x0a, 0x0d, 0x0d, 0x0a] {
            return Err(PcapError::Pcapng);
        }
        let (big_endian, nanoseconds) = match header[..got.min(4)] {
            [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
            [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
            [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
            [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
            ref start => {
                let shown: Vec<String> = start.iter().map(|b| format!("{b:02x}")).collect();
                return Err(PcapError::NotPcap(shown.join(" ")));
            }
        };
        if got < header.len() {
            return Err(PcapError::ShortHeader(got));
        }
        let u16_at = |at: usize| {
            let bytes = [header[at], header[at + 1]];
            if big_endian {
                u16::from_be_bytes(bytes)
            } else {
                u16::from_le_bytes(bytes)
            }
        };
        let u32_at = |at: usize| u32_from(&header[at..at + 4], big_endian);
        let (major, minor) = (u16_at(4), u16_at(6));
        if major != 2 {
            return Err(PcapError::Version { major, minor });
        }
        let snaplen = u32_at(16);
        // The link type is the low 16 bits; the upper ones may carry FCS information.
        let code = u32_at(20) & 0xffff;
        let link_type = LinkType::from_code(code).ok_or(PcapError::LinkType(code))?;
        Ok(Self {
            inner,
            big_endian,
            nanoseconds,
            link_type,
            max_record: snaplen.clamp(MAX_RECORD, MAX_RECORD_CAP),
            offset: header.len() as u64,
            records: 0,
            buf: Vec::new(),
            truncated_tail: None,
        })
    }

    pub fn link_type(&self) -> LinkType {
        self.link_type
    }

    /// The next record, or `None` at the end of the stream (see [`Self::truncated_tail`]).
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, PcapError> {
        if self.truncated_tail.is_some() {
            return Ok(None);
        }
        let mut header = [0u8; 16];
        let got = read_full(&mut self.inner, &mut header)?;
        let number = self.records + 1;
        if got == 0 {
            return Ok(None);
        }
        if got < header.len() {
            self.truncated_tail = Some(TruncatedTail {
                record: number,
                have: got,
                want: header.len(),
            });
            return Ok(None);
        }
        let seconds = u32_from(&header[0..4], self.big_endian);
        let fraction = u32_from(&header[4..8], self.big_endian);
        let len = u32_from(&header[8..12], self.big_endian);
        if len > self.max_record {
            return Err(PcapError::RecordTooLong {
                record: number,
                offset: self.offset,
                len,
                max: self.max_record,
            });
        }
        // Read what is there rather than allocate what the header claims: a record cut
        // short costs the bytes it has, not its announced length.
        self.buf.clear();
        let got = (&mut self.inner)
            .take(u64::from(len))
            .read_to_end(&mut self.buf)?;
        if got < len as usize {
            self.truncated_tail = Some(TruncatedTail {
                record: number,
                have: header.len() + got,
                want: header.len() + len as usize,
            });
            return Ok(None);
        }
        self.records = number;
        self.offset += (header.len() + self.buf.len()) as u64;
        let fraction_ns = if self.nanoseconds {
            u64::from(fraction)
        } else {
            u64::from(fraction) * 1_000
        };
        Ok(Some(Record {
            timestamp_ns: u64::from(seconds) * 1_000_000_000 + fraction_ns,
            data: &self.buf,
        }))
    }

    /// Set once the stream ended in the middle of a record.
    pub fn truncated_tail(&self) -> Option<TruncatedTail> {
        self.truncated_tail
    }
}

fn u32_from(bytes: &[u8], big_endian: bool) -> u32 {
    let bytes = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    }
}

/// Fill `buf` unless the stream ends first; the number of bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::testing::{Pcap, LINKTYPE_ETHERNET};

    fn records(bytes: &[u8]) -> (Vec<(u64, Vec<u8>)>, Option<TruncatedTail>) {
        let mut reader = PcapReader::new(bytes).unwrap();
        let mut out = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            out.push((record.timestamp_ns, record.data.to_vec()));
        }
        (out, reader.truncated_tail())
    }

    /// 40 bytes that claim a 4 GiB record (and a 4 GiB snapshot length to allow it): refused
    /// by the cap, not allocated. A record claiming the cap's worth with 10 bytes present
    /// is a truncated tail that cost 10 bytes.
    #[test]
    fn a_record_length_is_never_taken_on_the_files_word() {
        let mut header = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        header.extend([0; 8]); // thiszone, sigfigs
        header.extend(u32::MAX.to_le_bytes()); // snaplen
        header.extend(1u32.to_le_bytes()); // Ethernet
        let record = |len: u32| {
            let mut bytes = header.clone();
            bytes.extend([0; 8]); // timestamp
            bytes.extend(len.to_le_bytes()); // incl_len
            bytes.extend(len.to_le_bytes()); // orig_len
            bytes
        };
        let huge = record(u32::MAX);
        assert_eq!(huge.len(), 40);
        let mut reader = PcapReader::new(&huge[..]).unwrap();
        assert!(matches!(
            reader.next_record(),
            Err(PcapError::RecordTooLong {
                len: u32::MAX,
                max: MAX_RECORD_CAP,
                ..
            })
        ));

        let mut short = record(MAX_RECORD_CAP);
        short.extend([7; 10]);
        let mut reader = PcapReader::new(&short[..]).unwrap();
        assert!(reader.next_record().unwrap().is_none());
        assert_eq!(
            reader.truncated_tail(),
            Some(TruncatedTail {
                record: 1,
                have: 16 + 10,
                want: 16 + MAX_RECORD_CAP as usize
            })
        );
        assert!(
            reader.buf.capacity() < 1024 * 1024,
            "{}",
            reader.buf.capacity()
        );
    }

    #[test]
    fn reads_both_byte_orders_and_resolutions() {
        for (big_endian, nanoseconds) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let mut pcap = Pcap::with_format(LINKTYPE_ETHERNET, big_endian, nanoseconds);
            pcap.record_at(1_700_000_000, 250_000_000, &[1, 2, 3]);
            pcap.record_at(1_700_000_001, 0, &[4]);
            let (got, tail) = records(&pcap.into_bytes());
            assert_eq!(tail, None);
            assert_eq!(
                got,
                vec![
                    (1_700_000_000_250_000_000, vec![1, 2, 3]),
                    (1_700_000_001_000_000_000, vec![4])
                ],
                "big endian {big_endian}, ns {nanoseconds}"
            );
        }
    }

    #[test]
    fn a_record_cut_short_ends_the_stream_and_is_reported() {
        let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
        pcap.record(&[1; 10]);
        pcap.record(&[2; 10]);
        let mut bytes = pcap.into_bytes();
        bytes.truncate(bytes.len() - 4);
        let (got, tail) = records(&bytes);
        assert_eq!(got.len(), 1);
        assert_eq!(
            tail,
            Some(TruncatedTail {
                record: 2,
                have: 22,
                want: 26
            })
        );
    }

    #[test]
    fn says_what_is_wrong_with_a_file_that_is_not_pcap() {
        let err = |bytes: &[u8]| PcapReader::new(bytes).err().unwrap().to_string();
        assert!(err(b"").contains("empty"), "{}", err(b""));
        assert!(err(b"GET / HTTP/1.1\r\n\r\n").contains("starts with 47 45 54 20"));
        assert!(err(&[0x0a, 0x0d, 0x0d, 0x0a, 0, 0]).contains("pcapng"));
        let header = Pcap::new(LINKTYPE_ETHERNET).into_bytes();
        assert!(err(&header[..10]).contains("ends after 10 bytes"));
        let mut other_link = header.clone();
        other_link[20] = 147;
        assert!(err(&other_link).contains("link-layer type is 147"));
        let mut version = header;
        version[4] = 1;
        assert!(err(&version).contains("version is 1.4"));
    }

    #[test]
    fn a_record_longer_than_any_snapshot_is_corruption() {
        let mut bytes = Pcap::new(LINKTYPE_ETHERNET).into_bytes();
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        let err = reader.next_record().err().unwrap().to_string();
        assert!(
            err.contains("record 1 (at byte 24) claims 4294967295 captured bytes"),
            "{err}"
        );
    }
}
