//! `lab-app bench rr`: request/response latency on one warm connection.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::latency::{LatencyRecorder, LatencyReport};
use super::{connect, read_echo};

/// Largest request: the client writes all of it before reading, so the echo must fit
/// in the buffers on the way back (the client's receive buffer starts at 128 KiB).
const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// Options of `lab-app bench rr`.
#[derive(Clone, Debug, clap::Args)]
pub struct RoundTripOptions {
    /// Echo server, e.g. `10.77.2.10:8080` or `[fd00:77:2::10]:8080`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// How long to time round trips, after the warmup (e.g. 5s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Bytes per request; the echo is as long (at most 65536).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REQUEST_BYTES)))]
    pub size: u32,
    /// Round trips run untimed first, so that connection setup, slow start and cold
    /// caches on the path stay out of the numbers.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub warmup: Duration,
}

/// Run `rr`. Any failure ends it: one connection has no failures worth counting.
/// Every echo is checked against its request, and consecutive requests differ, so a
/// server that answers anything but the echo of this very request is caught.
pub fn round_trip(options: &RoundTripOptions) -> Result<LatencyReport> {
    let stream = connect(options.addr)?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let size = options.size as usize;
    let mut request = vec![0u8; size];
    let mut echo = vec![0u8; size];
    let mut latency = LatencyRecorder::new();
    let timed_from = Instant::now() + options.warmup;
    let end = timed_from + options.duration;
    let mut round: u64 = 0;
    loop {
        request.fill(round as u8);
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        (&stream)
            .write_all(&request)
            .with_context(|| format!("round trip {round}: sending {size} bytes"))?;
        read_echo(&stream, &mut echo)
            .with_context(|| format!("round trip {round}: reading the {size}-byte echo"))?;
        let took = sent.elapsed();
        if echo != request {
            bail!(
                "round trip {round}: the server's answer differs from the request \
                 (is it `lab-app serve --mode echo`?)"
            );
        }
        if sent >= timed_from {
            latency.record(took);
        }
        round += 1;
    }
    latency.report().with_context(|| {
        format!(
            "no round trip was timed in {:?} (after {round} in the warmup)",
            options.duration
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::test_helpers::start_server;
    use crate::app::AppMode;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn options(addr: SocketAddr, size: u32) -> RoundTripOptions {
        RoundTripOptions {
            addr,
            duration: Duration::from_millis(300),
            size,
            warmup: Duration::from_millis(50),
        }
    }

    #[test]
    fn percentiles_are_plausible_on_both_families() {
        let port = start_server(AppMode::Echo, false);
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            // A size above one read of the server's copy loop checks that large echoes
            // come back whole and without delay.
            for size in [64, 64 * 1024] {
                let report = round_trip(&options(SocketAddr::new(ip, port), size)).unwrap();
                assert!(report.count > 0, "{ip} {size}: {report:?}");
                assert!(
                    report.p50_us <= report.p90_us
                        && report.p90_us <= report.p99_us
                        && report.p99_us <= report.max_us,
                    "{ip} {size}: {report:?}"
                );
                assert!(
                    report.mean_us > 0.0 && report.mean_us <= report.max_us as f64 + 1.0,
                    "{ip} {size}: {report:?}"
                );
                // On loopback a round trip takes microseconds: a median in the tens
                // of milliseconds would be Nagle meeting delayed ACKs.
                assert!(report.p50_us < 10_000, "{ip} {size}: {report:?}");
            }
        }
    }

    #[test]
    fn anything_but_the_echo_fails() {
        // A greet server sends its greeting first, so the first answer is wrong.
        let port = start_server(AppMode::Greet, false);
        let error = round_trip(&options((Ipv4Addr::LOCALHOST, port).into(), 64)).unwrap_err();
        assert!(format!("{error:#}").contains("differs"), "{error:#}");
        let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let error = round_trip(&options(free, 64)).unwrap_err();
        assert!(format!("{error:#}").contains("refused"), "{error:#}");
    }
}
