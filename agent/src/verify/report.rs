//! What `warren verify` says: flows summed per pair of addresses (ports aggregated) and
//! verdict, what is flagged, and the result line.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use super::flows::{ClearReason, Flow, Verdict};
use crate::policy::model::IpBlock;

/// Where the packets came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A live capture with tcpdump.
    Live {
        interface: String,
        elapsed: Duration,
        /// Stopped early by Ctrl-C.
        interrupted: bool,
    },
    /// A pcap file; `span` from its first packet to its last.
    File { path: PathBuf, span: Duration },
}

/// Where a pair's two addresses are with respect to `--mesh-cidr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// No `--mesh-cidr`: every pair counts.
    Everything,
    /// Both addresses are in a mesh CIDR: "between enrolled workloads".
    BothInMesh,
    /// These addresses of the pair are outside every mesh CIDR.
    Outside(Vec<IpAddr>),
}

/// The flows between two addresses that got the same verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The pair, the side that opened most of the flows first.
    pub ends: [IpAddr; 2],
    pub verdict: Verdict,
    pub flows: usize,
    /// TCP payload bytes, both ways.
    pub bytes: u64,
    /// The servers' ports.
    pub ports: BTreeSet<u16>,
    pub scope: Scope,
    /// Clear-text flows that began before the capture and showed no TLS record.
    pub mid_stream_without_record: usize,
}

impl Row {
    /// Clear text where it must not be.
    pub fn flagged(&self) -> bool {
        self.verdict == Verdict::ClearText
            && matches!(self.scope, Scope::Everything | Scope::BothInMesh)
    }
}

/// What it all means for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Payload was seen (between mesh workloads, with `--mesh-cidr`) and all of it was
    /// TLS.
    Encrypted,
    /// Some of it was clear text.
    ClearText,
    /// No payload was seen where it counts: nothing was proved.
    NoTraffic,
}

/// Everything `warren verify` prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub source: Source,
    pub packets: u64,
    /// TCP flows, with or without payload.
    pub flows: usize,
    /// By pair, then verdict (TLS, clear text, no data).
    pub rows: Vec<Row>,
    pub mesh: Vec<IpBlock>,
    /// Things that qualify the result (packets dropped, a capture cut short, …).
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(
        source: Source,
        packets: u64,
        flows: &[Flow],
        mesh: &[IpBlock],
        mut notes: Vec<String>,
    ) -> Self {
        #[derive(Default)]
        struct Sum {
            flows: usize,
            bytes: u64,
            ports: BTreeSet<u16>,
            /// Flows opened by the lower address, and by the higher.
            opened_by: [usize; 2],
            mid_stream_without_record: usize,
        }
        let mut sums: BTreeMap<([IpAddr; 2], Verdict), Sum> = BTreeMap::new();
        for flow in flows {
            let (client, server) = flow.client_server();
            let (client_ip, server_ip) = (client.ip().to_canonical(), server.ip().to_canonical());
            let ends = if client_ip <= server_ip {
                [client_ip, server_ip]
            } else {
                [server_ip, client_ip]
            };
            let verdict = flow.verdict();
            let sum = sums.entry((ends, verdict)).or_default();
            sum.flows += 1;
            sum.bytes += flow.bytes();
            sum.ports.insert(server.port());
            sum.opened_by[usize::from(client_ip != ends[0])] += 1;
            if flow.joined_mid_stream() && flow.clear_reason() == Some(ClearReason::NoRecord) {
                sum.mid_stream_without_record += 1;
            }
        }
        let in_mesh = |ip: &IpAddr| mesh.iter().any(|block| block.contains(*ip));
        let rows: Vec<Row> = sums
            .into_iter()
            .map(|((ends, verdict), sum)| {
                let scope = if mesh.is_empty() {
                    Scope::Everything
                } else {
                    let mut outside: Vec<IpAddr> =
                        ends.iter().copied().filter(|ip| !in_mesh(ip)).collect();
                    outside.dedup();
                    if outside.is_empty() {
                        Scope::BothInMesh
                    } else {
                        Scope::Outside(outside)
                    }
                };
                let ends = if sum.opened_by[1] > sum.opened_by[0] {
                    [ends[1], ends[0]]
                } else {
                    ends
                };
                Row {
                    ends,
                    verdict,
                    flows: sum.flows,
                    bytes: sum.bytes,
                    ports: sum.ports,
                    scope,
                    mid_stream_without_record: sum.mid_stream_without_record,
                }
            })
            .collect();
        let unsure: usize = rows
            .iter()
            .filter(|row| row.flagged())
            .map(|row| row.mid_stream_without_record)
            .sum();
        if unsure > 0 {
            let (flows, they_are) = if unsure == 1 {
                (
                    "1 flagged flow".to_owned(),
                    "it is a long-lived TLS connection",
                )
            } else {
                (
                    format!("{unsure} flagged flows"),
                    "they are long-lived TLS connections",
                )
            };
            notes.push(format!(
                "{flows} began before the capture and showed no TLS record header: if \
                 {they_are}, capture again while new connections are made"
            ));
        }
        Self {
            source,
            packets,
            flows: flows.len(),
            rows,
            mesh: mesh.to_vec(),
            notes,
        }
    }

    /// Clear-text flows where none may be.
    pub fn flagged_flows(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.flagged())
            .map(|r| r.flows)
            .sum()
    }

    /// Flows with payload that count for the result (between mesh workloads, or all
    /// without `--mesh-cidr`).
    pub fn checked_flows(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict != Verdict::NoData)
            .filter(|r| matches!(r.scope, Scope::Everything | Scope::BothInMesh))
            .map(|r| r.flows)
            .sum()
    }

    pub fn outcome(&self) -> Outcome {
        if self.flagged_flows() > 0 {
            Outcome::ClearText
        } else if self.checked_flows() == 0 {
            Outcome::NoTraffic
        } else {
            Outcome::Encrypted
        }
    }

    fn mesh_list(&self) -> String {
        let blocks: Vec<String> = self.mesh.iter().map(IpBlock::to_string).collect();
        blocks.join(", ")
    }
}

/// "1 flow", "3 flows".
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// 512 B, 1.2 KiB, 1.0 MiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

fn ports(ports: &BTreeSet<u16>) -> String {
    const SHOWN: usize = 6;
    let mut shown: Vec<String> = ports.iter().take(SHOWN).map(u16::to_string).collect();
    if ports.len() > SHOWN {
        shown.push(format!("… ({} more)", ports.len() - SHOWN));
    }
    shown.join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (place, during) = match &self.source {
            Source::Live {
                interface,
                elapsed,
                interrupted,
            } => {
                let stopped = if *interrupted {
                    " (stopped by Ctrl-C)"
                } else {
                    ""
                };
                writeln!(
                    f,
                    "warren verify: {} on {interface}{stopped}, {}, {}",
                    seconds(*elapsed),
                    count(self.packets as usize, "packet"),
                    count(self.flows, "TCP flow"),
                )?;
                (
                    format!("on {interface}"),
                    format!(" in {}", seconds(*elapsed)),
                )
            }
            Source::File { path, span } => {
                writeln!(
                    f,
                    "warren verify: {} in {}, {}, {}",
                    seconds(*span),
                    path.display(),
                    count(self.packets as usize, "packet"),
                    count(self.flows, "TCP flow"),
                )?;
                (format!("in {}", path.display()), String::new())
            }
        };
        let cells: Vec<[String; 4]> = self
            .rows
            .iter()
            .map(|row| {
                [
                    format!("{} ↔ {}", row.ends[0], row.ends[1]),
                    count(row.flows, "flow"),
                    human_bytes(row.bytes),
                    match row.verdict {
                        Verdict::Tls => "TLS",
                        Verdict::ClearText => "CLEAR TEXT",
                        Verdict::NoData => "no data",
                    }
                    .to_owned(),
                ]
            })
            .collect();
        let width = |i: usize| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (pair_w, flows_w, bytes_w) = (width(0), width(1), width(2));
        for (row, [pair, flows, bytes, verdict]) in self.rows.iter().zip(&cells) {
            let mark = match (&row.scope, row.flagged()) {
                (Scope::BothInMesh, true) => "   ! both ends in the mesh".to_owned(),
                (Scope::Everything, true) => "   ! clear text".to_owned(),
                (Scope::Outside(outside), _) if row.verdict == Verdict::ClearText => {
                    if outside.len() == 2 {
                        "   (both ends outside the mesh)".to_owned()
                    } else {
                        format!("   ({} is outside the mesh)", outside[0])
                    }
                }
                _ => String::new(),
            };
            writeln!(
                f,
                "  {pair:<pair_w$}  {flows:<flows_w$}  {bytes:>bytes_w$}  {verdict:<10} ports {}{mark}",
                ports(&row.ports)
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        let mesh = !self.mesh.is_empty();
        match self.outcome() {
            Outcome::ClearText => {
                let flows = count(self.flagged_flows(), "clear-text flow");
                if mesh {
                    writeln!(f, "result: {flows} between mesh workloads")
                } else {
                    writeln!(
                        f,
                        "result: {flows} (without --mesh-cidr, all clear text is flagged)"
                    )
                }
            }
            Outcome::Encrypted => {
                let flows = self.checked_flows();
                let all = if flows == 1 {
                    "the 1 flow".to_owned()
                } else {
                    format!("all {flows} flows")
                };
                if mesh {
                    writeln!(
                        f,
                        "result: encrypted: {all} carrying data between mesh workloads used TLS"
                    )
                } else {
                    writeln!(f, "result: encrypted: {all} carrying data used TLS")
                }
            }
            Outcome::NoTraffic => {
                let between = if mesh {
                    format!(" between mesh workloads ({})", self.mesh_list())
                } else {
                    String::new()
                };
                let hint = match &self.source {
                    Source::Live { .. } => "is traffic flowing, is this the right interface?",
                    Source::File { .. } => "nothing was proved encrypted",
                };
                writeln!(
                    f,
                    "result: no TCP payload{between} seen {place}{during}: {hint}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_258_291), "1.2 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn many_ports_are_cut() {
        let many: BTreeSet<u16> = (8000..8010).collect();
        assert_eq!(
            ports(&many),
            "8000, 8001, 8002, 8003, 8004, 8005, … (4 more)"
        );
    }
}
