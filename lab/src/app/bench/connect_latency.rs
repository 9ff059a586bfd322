//! `lab-app bench connect`: latency of a new connection up to its first echoed byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::connect_and_probe;
use super::latency::{LatencyRecorder, LatencyReport};

/// Options of `lab-app bench connect`.
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectLatencyOptions {
    /// Echo server, e.g. `10.77.2.10:8080` or `[fd00:77:2::10]:8080`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// How long to keep opening connections (e.g. 5s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Run `connect`: one connection at a time, each timed from `connect()` to the echo of
/// its first byte, which is what a new connection costs an application (a proxy that
/// accepts at once but reaches the server late shows up here, not in the handshake).
/// Any failure ends the run: one at a time, nothing overloads the path, so a failure
/// is a fault to look at.
pub fn connect_latency(options: &ConnectLatencyOptions) -> Result<LatencyReport> {
    let mut latency = LatencyRecorder::new();
    let end = Instant::now() + options.duration;
    let mut made: u64 = 0;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let stream = connect_and_probe(options.addr)
            .with_context(|| format!("connection {made} (after {made} that worked)"))?;
        latency.record(started.elapsed());
        drop(stream);
        made += 1;
    }
    latency
        .report()
        .with_context(|| format!("no connection was made in {:?}", options.duration))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::test_helpers::start_server;
    use crate::app::AppMode;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn connections_are_timed_on_both_families() {
        let port = start_server(AppMode::Echo, false);
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let report = connect_latency(&ConnectLatencyOptions {
                addr: SocketAddr::new(ip, port),
                duration: Duration::from_millis(100),
            })
            .unwrap();
            assert!(report.count > 0, "{ip}: {report:?}");
            assert!(
                report.p50_us <= report.p90_us
                    && report.p90_us <= report.p99_us
                    && report.p99_us <= report.max_us,
                "{ip}: {report:?}"
            );
        }
    }

    #[test]
    fn a_refused_connection_ends_the_run() {
        let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let error = connect_latency(&ConnectLatencyOptions {
            addr: free,
            duration: Duration::from_secs(5),
        })
        .unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.starts_with("connection 0 (after 0 that worked): connect to")
                && text.contains("refused"),
            "{text}"
        );
    }
}
