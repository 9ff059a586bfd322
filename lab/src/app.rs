//! `lab-app`, the test application that runs inside pods: a server (`serve`) and a
//! client (`connect`) that checks every byte came back intact.
//!
//! The protocol types live in the library so that tests can parse the client's JSON
//! report ([`ConnectReport`]) and drive servers ([`AppServer`]) without re-declaring
//! them; `src/bin/lab-app.rs` is only the command line.
//!
//! Modes:
//! - `echo`: the server copies input to output until EOF, then shuts down its write
//!   side (so half-close through the mesh is testable).
//! - `sha`: the server reads to EOF and answers `<hex sha256> <byte count>\n`.
//! - `greet`: the server speaks first (`HELLO warren\n`), then echoes; this catches
//!   proxies that wait for client bytes before connecting upstream.
//! - UDP (`--udp`): the server echoes each datagram.
//!
//! `bench` holds the benchmark clients (`lab-app bench …`), run against an `echo`
//! server.

pub mod bench;
mod connect;
mod harness;
mod open_files;
mod payload;
mod serve;
#[cfg(test)]
mod test_helpers;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use connect::{
    connect, connect_load, ConnectOptions, LoadOptions, DEFAULT_TCP_BYTES, DEFAULT_TIMEOUT,
    DEFAULT_UDP_BYTES,
};
pub(crate) use harness::parse_report;
pub use harness::{AppClient, AppServer};
pub use payload::Payload;
pub(crate) use serve::hex;
pub use serve::{serve, ServeOptions};

/// The greeting a `greet` server sends first.
pub const GREETING: &str = "HELLO warren\n";
/// The line a server prints on stdout once it listens: `READY <port>`.
pub const READY_PREFIX: &str = "READY ";

/// What a TCP server does with a connection (see the module docs).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AppMode {
    /// Echo until EOF, then half-close.
    #[default]
    Echo,
    /// Answer with the sha256 and length of everything received.
    Sha,
    /// Send a greeting first, then echo.
    Greet,
}

impl AppMode {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            AppMode::Echo => "echo",
            AppMode::Sha => "sha",
            AppMode::Greet => "greet",
        }
    }
}

impl fmt::Display for AppMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON line `lab-app connect` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Whether the exchange completed and every check passed.
    pub ok: bool,
    /// `echo`, `sha`, `greet`, or `udp`.
    pub mode: String,
    /// Payload bytes the client sent.
    pub sent: u64,
    /// Echo and greet: payload bytes echoed back (the greeting not counted). Sha: the
    /// byte count the server reported. UDP: size of the echoed datagram.
    pub received: u64,
    /// The client socket's local address (`ip:port`), once connected: shows which
    /// source address the connection left the pod with.
    pub local_addr: Option<String>,
    /// What happened, or what went wrong (including the OS error text, e.g.
    /// "Connection reset by peer (os error 104)").
    pub detail: String,
}

impl ConnectReport {
    /// The report as one JSON line (without newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ConnectReport always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::test_helpers::start_server;
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn run(mode: AppMode, udp: bool, addr: SocketAddr, bytes: u64) -> ConnectReport {
        connect(&ConnectOptions {
            udp,
            timeout: Duration::from_secs(5),
            ..ConnectOptions::tcp(addr, mode, bytes)
        })
    }

    #[test]
    fn every_mode_round_trips_on_both_families() {
        for mode in [AppMode::Echo, AppMode::Sha, AppMode::Greet] {
            let port = start_server(mode, false);
            for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
                for bytes in [0, 1, 3 * 1024 * 1024 + 7] {
                    let report = run(mode, false, SocketAddr::new(ip, port), bytes);
                    assert!(report.ok, "{mode} {ip} {bytes}: {report:?}");
                    assert_eq!((report.sent, report.received), (bytes, bytes));
                    assert_eq!(report.mode, mode.as_str());
                    assert!(report.local_addr.is_some());
                }
            }
        }
        let port = start_server(AppMode::Echo, true);
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let report = run(AppMode::Echo, true, SocketAddr::new(ip, port), 1000);
            assert!(report.ok, "udp {ip}: {report:?}");
            assert_eq!(report.mode, "udp");
        }
    }

    #[test]
    fn echo_server_passes_half_close_on() {
        let port = start_server(AppMode::Echo, false);
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        s.write_all(b"abc").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, "abc");
    }

    #[test]
    fn mismatches_and_failures_are_reported_not_hidden() {
        // An echo client against a sha server sees the wrong bytes.
        let port = start_server(AppMode::Sha, false);
        let report = run(
            AppMode::Echo,
            false,
            (Ipv4Addr::LOCALHOST, port).into(),
            1000,
        );
        assert!(!report.ok);
        assert!(report.detail.contains("differs"), "{report:?}");
        // A greet client against an echo server times out waiting for the greeting.
        let port = start_server(AppMode::Echo, false);
        let report = connect(&ConnectOptions {
            timeout: Duration::from_millis(300),
            ..ConnectOptions::tcp((Ipv4Addr::LOCALHOST, port).into(), AppMode::Greet, 10)
        });
        assert!(
            !report.ok && report.detail.contains("timed out"),
            "{report:?}"
        );
        // Nothing listening.
        let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let report = run(AppMode::Echo, false, free, 10);
        assert!(
            !report.ok && report.detail.contains("refused"),
            "{report:?}"
        );
        assert!(report.local_addr.is_none());
        // The JSON line parses back.
        let parsed: ConnectReport = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(parsed, report);
    }

    fn options(addr: SocketAddr, mode: AppMode, bytes: u64) -> ConnectOptions {
        ConnectOptions {
            timeout: Duration::from_secs(10),
            ..ConnectOptions::tcp(addr, mode, bytes)
        }
    }

    /// An echo server that counts the connections it has accepted and finished.
    fn counting_echo() -> (SocketAddr, Arc<(AtomicUsize, AtomicUsize)>) {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let shared = Arc::clone(&counts);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                shared.0.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &stream, &mut &stream);
                    let _ = stream.shutdown(Shutdown::Write);
                    shared.1.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, counts)
    }

    #[test]
    fn parallel_connections_are_all_open_before_any_exchanges() {
        let (addr, counts) = counting_echo();
        let n = 40;
        let mut held = None;
        let report = connect_load(
            &options(addr, AppMode::Echo, 100_000),
            &LoadOptions {
                parallel: n,
                hold: true,
                duration: None,
            },
            |connected| {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while counts.0.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                held = Some((
                    connected,
                    counts.0.load(Ordering::SeqCst),
                    counts.1.load(Ordering::SeqCst),
                ));
            },
        );
        assert_eq!(held, Some((n, n, 0)), "connected, accepted, finished");
        assert!(report.ok, "{report:?}");
        assert_eq!(
            (report.sent, report.received),
            (n as u64 * 100_000, n as u64 * 100_000)
        );
        assert!(report.detail.starts_with("40 connections"), "{report:?}");
        assert_eq!(counts.1.load(Ordering::SeqCst), n);
    }

    #[test]
    fn parallel_failures_are_counted_and_grouped() {
        let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let mut called = false;
        let report = connect_load(
            &options(free, AppMode::Echo, 10),
            &LoadOptions {
                parallel: 5,
                hold: true,
                duration: None,
            },
            |connected| {
                assert_eq!(connected, 0);
                called = true;
            },
        );
        assert!(called);
        assert!(!report.ok);
        assert!(
            report
                .detail
                .starts_with("5 of 5 connections failed: 5× connect to")
                && report.detail.contains("refused")
                && report.detail.ends_with("(connection 0, …)"),
            "{report:?}"
        );
        // Without holding, the callback is not called.
        let (addr, _) = counting_echo();
        let report = connect_load(
            &options(addr, AppMode::Echo, 10),
            &LoadOptions {
                parallel: 3,
                hold: false,
                duration: None,
            },
            |_| panic!("not holding"),
        );
        assert!(report.ok, "{report:?}");
        // UDP has no parallel mode.
        let mut udp = options(addr, AppMode::Echo, 10);
        udp.udp = true;
        let report = connect_load(
            &udp,
            &LoadOptions {
                parallel: 2,
                ..LoadOptions::default()
            },
            |_| {},
        );
        assert!(
            !report.ok && report.detail.contains("TCP only"),
            "{report:?}"
        );
    }

    #[test]
    fn paced_stream_lasts_its_duration_and_is_checked() {
        for mode in [AppMode::Echo, AppMode::Sha] {
            let port = start_server(mode, false);
            let started = std::time::Instant::now();
            let report = connect_load(
                &options((Ipv4Addr::LOCALHOST, port).into(), mode, 10_007),
                &LoadOptions {
                    duration: Some(Duration::from_millis(450)),
                    ..LoadOptions::default()
                },
                |_| {},
            );
            assert!(report.ok, "{report:?}");
            assert_eq!((report.sent, report.received), (10_007, 10_007));
            assert!(report.detail.contains("paced over 450ms"), "{report:?}");
            // A lower bound only: the stream cannot end before its pacing does.
            assert!(started.elapsed() >= Duration::from_millis(450));
        }
    }
}
