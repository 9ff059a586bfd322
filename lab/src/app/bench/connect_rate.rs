//! `lab-app bench rate`: how many connections concurrent clients complete per second.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::connect_and_probe;

/// A client pauses this long after a failed attempt, so that a server refusing at once
/// (or a client out of local ports) does not turn the run into a busy loop that
/// starves the path being measured of CPU.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(1);

/// Options of `lab-app bench rate`.
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectRateOptions {
    /// Echo server, e.g. `10.77.2.10:8080` or `[fd00:77:2::10]:8080`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// How long the clients keep starting connections (e.g. 5s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Clients, each a thread with one connection at a time.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

/// The report of `rate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateReport {
    /// Clients that ran at once.
    pub concurrency: u32,
    /// Connections that completed (connect, 1-byte echo, close).
    pub connections: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// `connections` per second of the whole run, from the first client's start to the
    /// last one's end (attempts under way at the deadline are finished and counted).
    pub per_second: f64,
    /// The first failure, when there was one (e.g. "connect to 10.77.2.10:8080:
    /// Connection reset by peer (os error 104)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Run `rate`: `concurrency` threads each loop connect / write 1 byte / read its echo /
/// close until the deadline. Failures are counted, not fatal: a few resets under
/// overload are a result. It fails only when no connection completed at all.
pub fn connect_rate(options: &ConnectRateOptions) -> Result<RateReport> {
    let addr = options.addr;
    let first_error = OnceLock::new();
    let started = Instant::now();
    let end = started + options.duration;
    let client = || {
        let (mut connections, mut errors) = (0u64, 0u64);
        while Instant::now() < end {
            match connect_and_probe(addr) {
                Ok(_closed_on_drop) => connections += 1,
                Err(e) => {
                    errors += 1;
                    // Only the first one is kept; later ones lose the race, as meant.
                    let _ = first_error.set(format!("{e:#}"));
                    thread::sleep(PAUSE_AFTER_FAILURE);
                }
            }
        }
        (connections, errors)
    };
    let counts: Vec<(u64, u64)> = thread::scope(|scope| {
        let clients: Vec<_> = (0..options.concurrency)
            .map(|index| {
                thread::Builder::new()
                    .name(format!("rate-{index}"))
                    .spawn_scoped(scope, client)
                    .map_err(|e| anyhow!("starting client thread {index}: {e}"))
            })
            .collect();
        clients
            .into_iter()
            .map(|client| {
                client?
                    .join()
                    .map_err(|_| anyhow!("a client thread panicked"))
            })
            .collect::<Result<_>>()
    })?;
    let elapsed = started.elapsed();
    let connections: u64 = counts.iter().map(|(c, _)| c).sum();
    let errors: u64 = counts.iter().map(|(_, e)| e).sum();
    let first_error = first_error.into_inner();
    if connections == 0 {
        match &first_error {
            Some(first) => bail!("all {errors} connection attempts failed; the first: {first}"),
            None => bail!("no connection was attempted in {:?}", options.duration),
        }
    }
    Ok(RateReport {
        concurrency: options.concurrency,
        connections,
        errors,
        per_second: connections as f64 / elapsed.as_secs_f64(),
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::test_helpers::start_server;
    use crate::app::AppMode;
    use std::io;
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    #[test]
    fn concurrent_clients_count_their_connections() {
        let port = start_server(AppMode::Echo, false);
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let duration = Duration::from_millis(100);
            let report = connect_rate(&ConnectRateOptions {
                addr: SocketAddr::new(ip, port),
                duration,
                concurrency: 4,
            })
            .unwrap();
            assert_eq!(report.concurrency, 4);
            assert!(report.connections >= 4, "{ip}: {report:?}");
            assert_eq!((report.errors, &report.first_error), (0, &None), "{ip}");
            // The run lasts at least its duration, so the rate cannot exceed this.
            let ceiling = report.connections as f64 / duration.as_secs_f64();
            assert!(
                report.per_second > 0.0 && report.per_second <= ceiling,
                "{ip}: {report:?}"
            );
        }
    }

    #[test]
    fn failures_amid_successes_are_counted_not_fatal() {
        // Echoes on every other connection and closes the rest unanswered.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for (index, stream) in listener.incoming().enumerate() {
                if let (Ok(stream), 0) = (stream, index % 2) {
                    let _ = io::copy(&mut &stream, &mut &stream);
                }
            }
        });
        let report = connect_rate(&ConnectRateOptions {
            addr,
            duration: Duration::from_millis(300),
            concurrency: 2,
        })
        .unwrap();
        assert!(report.connections > 0 && report.errors > 0, "{report:?}");
        let first = report.first_error.unwrap();
        assert!(first.contains("reading the echo of 1 byte"), "{first}");
    }

    #[test]
    fn only_a_run_where_every_attempt_fails_is_an_error() {
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let error = connect_rate(&ConnectRateOptions {
            addr: free,
            duration: Duration::from_millis(100),
            concurrency: 2,
        })
        .unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.starts_with("all ")
                && text.contains("the first: connect to")
                && text.contains("refused"),
            "{text}"
        );
    }
}
