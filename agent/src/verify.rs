//! `warren verify`: prove that traffic between enrolled workloads is encrypted, without
//! knowing tcpdump's flags. It captures TCP on an interface for a while (tcpdump), or reads
//! a pcap file, groups segments into flows, decides for each whether its payload was TLS,
//! and prints one line per pair of addresses and verdict. Clear text between two
//! addresses of `--mesh-cidr` (any clear text, without it) is flagged.
//!
//! | concern | file |
//! |---------|------|
//! | flags, errors, exit status, reading a capture into flows | here |
//! | the pcap container (classic libpcap, both byte orders, µs and ns) | `pcap` |
//! | link layer (Ethernet, 802.1Q, Linux cooked v1/v2, raw), IPv4/IPv6, TCP | `packet` |
//! | flows, and following TLS record headers through each direction | `flows` |
//! | per-pair rows, what is flagged, the text | `report` |
//! | running tcpdump, stopping it, reading why it failed | `capture` |
//!
//! TLS means TLS framing: the first payload bytes of each direction are a TLS record
//! header (content type 0x14 to 0x17, version 3.1 to 3.4, a length no record exceeds),
//! and, as far as the capture shows, each record is followed by the next. It says the
//! bytes were encrypted, not by whom: an application's own TLS counts too.
//!
//! Exit status: [`EXIT_ENCRYPTED`] when payload was seen where it counts and none of it
//! was clear text; [`EXIT_CLEAR_TEXT`] when something was flagged **or when no payload
//! was seen at all** (nothing was proved: the report asks whether traffic flows and
//! whether the interface is the right one); [`EXIT_CANNOT_READ`] when nothing could be
//! captured or read.
mod capture;
mod flows;
mod packet;
mod pcap;
mod report;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::{
    fs::File,
    io::{BufReader, Read},
    path::PathBuf,
    time::Duration,
};

pub use capture::LiveCapture;
pub use flows::{Flow, Verdict};
pub use pcap::{PcapError, TruncatedTail};
pub use report::{Outcome, Report, Row, Scope, Source};

use crate::policy::model::IpBlock;

/// Exit status: payload was seen and all of it was TLS.
pub const EXIT_ENCRYPTED: u8 = 0;
/// Exit status: clear text was flagged, or no payload was seen (nothing proved).
pub const EXIT_CLEAR_TEXT: u8 = 1;
/// Exit status: nothing could be captured or read.
pub const EXIT_CANNOT_READ: u8 = 2;

/// `warren verify` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("packets")
        .required(true)
        .args(["interface", "pcap"])
))]
pub struct VerifyArgs {
    /// Capture on this interface (with tcpdump, as root), e.g. the bridge or the node's
    /// uplink; `any` for all of them.
    #[arg(long, short = 'i', value_name = "IFACE")]
    pub interface: Option<String>,

    /// How long to capture (`10s`, `1m`). Ctrl-C stops earlier and still reports.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Addresses of enrolled workloads (repeatable, or comma-separated), e.g.
    /// 10.77.0.0/16, fd00:77::/32. Only clear text with both ends inside is flagged;
    /// without it, all clear text is.
    #[arg(long = "mesh-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub mesh_cidrs: Vec<IpBlock>,

    /// Read this pcap file (`tcpdump -w FILE`) instead of capturing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["interface", "duration"])]
    pub pcap: Option<PathBuf>,
}

fn parse_duration(input: &str) -> Result<Duration, String> {
    match humantime::parse_duration(input) {
        Ok(duration) if duration.is_zero() => Err("the capture needs a duration above 0".into()),
        Ok(duration) => Ok(duration),
        Err(err) => Err(format!("{err} (e.g. 10s, 1m)")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Pcap { path: PathBuf, source: PcapError },
    #[error("no network interface {interface:?} here: `ip link` lists the interfaces of this network namespace")]
    NoInterface { interface: String },
    #[error("tcpdump is not installed (not found on PATH): install it with `apt install tcpdump`, or capture elsewhere and pass the file with --pcap")]
    TcpdumpMissing,
    #[error("cannot run tcpdump: {0}")]
    Spawn(std::io::Error),
    #[error("a live capture needs root (tcpdump opens a raw socket): run warren verify as root, or capture elsewhere and pass the file with --pcap; tcpdump said: {tcpdump}")]
    NotRoot { tcpdump: String },
    #[error("tcpdump cannot capture on that interface: {tcpdump}")]
    TcpdumpNoInterface { tcpdump: String },
    #[error("tcpdump failed ({status}): {tcpdump}")]
    Tcpdump { status: String, tcpdump: String },
    #[error("tcpdump's output cannot be read: {0}")]
    Stream(PcapError),
}

/// The exit status for an outcome of [`run`].
pub fn exit_code(outcome: &Result<Report, VerifyError>) -> u8 {
    match outcome {
        Ok(report) => match report.outcome() {
            Outcome::Encrypted => EXIT_ENCRYPTED,
            Outcome::ClearText | Outcome::NoTraffic => EXIT_CLEAR_TEXT,
        },
        Err(_) => EXIT_CANNOT_READ,
    }
}

/// Capture (or read the file) and judge: what `warren verify` prints. `progress` hears
/// once tcpdump has started, for the operator who waits.
pub fn run(args: &VerifyArgs, progress: impl FnOnce(&str)) -> Result<Report, VerifyError> {
    if let Some(path) = &args.pcap {
        let file = File::open(path).map_err(|source| VerifyError::Open {
            path: path.clone(),
            source,
        })?;
        let capture = read_capture(BufReader::new(file)).map_err(|source| VerifyError::Pcap {
            path: path.clone(),
            source,
        })?;
        let source = Source::File {
            path: path.clone(),
            span: capture.span(),
        };
        return Ok(capture.report(source, &args.mesh_cidrs, Vec::new()));
    }
    let interface = args
        .interface
        .as_deref()
        .expect("clap requires --interface or --pcap");
    let started = || {
        progress(&format!(
            "capturing TCP on {interface} for {} with tcpdump (Ctrl-C stops earlier)…",
            humantime::format_duration(args.duration)
        ))
    };
    let (capture, live) = capture::live(interface, args.duration, started, read_capture)?;
    let mut notes = Vec::new();
    if let Some(dropped) = live.dropped_by_kernel.filter(|n| *n > 0) {
        notes.push(format!(
            "tcpdump says the kernel dropped {dropped} packet(s): some flows may be incomplete"
        ));
    }
    let source = Source::Live {
        interface: interface.to_owned(),
        elapsed: live.elapsed,
        interrupted: live.interrupted,
    };
    Ok(capture.report(source, &args.mesh_cidrs, notes))
}

/// A capture read into flows.
#[derive(Debug)]
pub struct Capture {
    /// Records read.
    pub packets: u64,
    /// Packets whose headers did not add up (cut short or corrupt).
    pub malformed: u64,
    pub flows: Vec<Flow>,
    /// Times of the first and the last record, in ns since the epoch.
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
    pub truncated_tail: Option<TruncatedTail>,
}

impl Capture {
    /// From the first record to the last.
    pub fn span(&self) -> Duration {
        match (self.first_ns, self.last_ns) {
            (Some(first), Some(last)) => Duration::from_nanos(last.saturating_sub(first)),
            _ => Duration::ZERO,
        }
    }

    /// The report on these flows; `notes` come first.
    pub fn report(&self, source: Source, mesh: &[IpBlock], mut notes: Vec<String>) -> Report {
        if let Some(tail) = self.truncated_tail {
            notes.push(format!(
                "the capture ends inside packet {} ({} of its {} bytes): it was left out",
                tail.record, tail.have, tail.want
            ));
        }
        if self.malformed > 0 {
            notes.push(format!(
                "{} packet(s) had headers that do not add up (cut short or corrupt) and were left out",
                self.malformed
            ));
        }
        Report::new(source, self.packets, &self.flows, mesh, notes)
    }
}

/// Read a pcap stream to its end into flows.
pub fn read_capture(reader: impl Read) -> Result<Capture, PcapError> {
    let mut reader = pcap::PcapReader::new(reader)?;
    let link_type = reader.link_type();
    let mut table = flows::FlowTable::default();
    let mut capture = Capture {
        packets: 0,
        malformed: 0,
        flows: Vec::new(),
        first_ns: None,
        last_ns: None,
        truncated_tail: None,
    };
    while let Some(record) = reader.next_record()? {
        capture.packets += 1;
        capture.first_ns.get_or_insert(record.timestamp_ns);
        capture.last_ns = Some(record.timestamp_ns);
        match packet::decode(link_type, record.data) {
            packet::Packet::Tcp(segment) => table.add(&segment),
            packet::Packet::Other => {}
            packet::Packet::Malformed => capture.malformed += 1,
        }
    }
    capture.truncated_tail = reader.truncated_tail();
    capture.flows = table.into_flows();
    Ok(capture)
}
