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

mod connect;
mod harness;
mod payload;
mod serve;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use connect::{connect, ConnectOptions, DEFAULT_TCP_BYTES, DEFAULT_TIMEOUT, DEFAULT_UDP_BYTES};
pub use harness::AppServer;
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
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Start a server on a free loopback port in a background thread (it serves
    /// until the test process exits) and return the port.
    fn start(mode: AppMode, udp: bool) -> u16 {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            serve(ServeOptions { port: 0, mode, udp }, |port| {
                tx.send(port).unwrap()
            })
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server ready")
    }

    fn run(mode: AppMode, udp: bool, addr: SocketAddr, bytes: u64) -> ConnectReport {
        connect(&ConnectOptions {
            addr,
            mode,
            bytes,
            udp,
            timeout: Duration::from_secs(5),
            source_port: None,
            marker: None,
        })
    }

    #[test]
    fn every_mode_round_trips_on_both_families() {
        for mode in [AppMode::Echo, AppMode::Sha, AppMode::Greet] {
            let port = start(mode, false);
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
        let port = start(AppMode::Echo, true);
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let report = run(AppMode::Echo, true, SocketAddr::new(ip, port), 1000);
            assert!(report.ok, "udp {ip}: {report:?}");
            assert_eq!(report.mode, "udp");
        }
    }

    #[test]
    fn echo_server_passes_half_close_on() {
        let port = start(AppMode::Echo, false);
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
        let port = start(AppMode::Sha, false);
        let report = run(
            AppMode::Echo,
            false,
            (Ipv4Addr::LOCALHOST, port).into(),
            1000,
        );
        assert!(!report.ok);
        assert!(report.detail.contains("differs"), "{report:?}");
        // A greet client against an echo server times out waiting for the greeting.
        let port = start(AppMode::Echo, false);
        let report = connect(&ConnectOptions {
            addr: (Ipv4Addr::LOCALHOST, port).into(),
            mode: AppMode::Greet,
            bytes: 10,
            udp: false,
            timeout: Duration::from_millis(300),
            source_port: None,
            marker: None,
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
}
