//! `lab-app bench`: clients that measure the path to an echo server (`lab-app serve
//! --mode echo`), for `cargo xtask bench`. Each case ends with one report that
//! [`run`] writes as one JSON line; the report types live here so that whoever reads
//! the line parses the same structs ([`BenchReport`]).
//!
//! - `rr`: request/response latency on one warm connection.
//! - `connect`: latency of a new connection up to its first echoed byte, one at a time.
//! - `rate`: how many such connections N concurrent clients complete per second.
//! - `hold`: open many connections, confirm each end to end, keep them open until
//!   released.
//!
//! Plain threads and blocking sockets: each client thread does one thing at a time,
//! so what is timed is the path and not a scheduler's queue.

mod connect_latency;
mod connect_rate;
mod hold;
mod latency;
mod round_trip;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use nix::errno::Errno;
use nix::sys::resource::{getrlimit, Resource};
use serde::{Deserialize, Serialize};

pub use connect_latency::{connect_latency, ConnectLatencyOptions};
pub use connect_rate::{connect_rate, ConnectRateOptions, RateReport};
pub use hold::{hold, HeldConnections, HoldOptions, HoldReport};
pub use latency::LatencyReport;
pub use round_trip::{round_trip, RoundTripOptions};

/// Timeout for each connect, write and read. Far above any latency worth measuring,
/// it only keeps a lost connection from hanging a benchmark forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The byte a connection sends to prove that it reaches the echo server.
const PROBE: u8 = b'w';

/// A benchmark case with its options: the `lab-app bench` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum BenchCase {
    /// Request/response latency: one connection (TCP_NODELAY) writes SIZE bytes and
    /// reads their echo, again and again; every round trip after the warmup is timed.
    Rr(RoundTripOptions),
    /// Connection latency: connect, write 1 byte, read its echo, close; one at a time,
    /// each timed from connect to echo.
    Connect(ConnectLatencyOptions),
    /// Connection rate: CONCURRENCY clients each loop connect, 1-byte echo, close.
    /// Failed attempts are counted, not fatal, unless all of them fail.
    Rate(ConnectRateOptions),
    /// Open COUNT connections, confirm each with a 1-byte echo, print the report, then
    /// keep them all open until standard input ends.
    Hold(HoldOptions),
}

impl BenchCase {
    /// The name on the command line and in the report's `case` field.
    pub fn name(&self) -> &'static str {
        match self {
            BenchCase::Rr(_) => "rr",
            BenchCase::Connect(_) => "connect",
            BenchCase::Rate(_) => "rate",
            BenchCase::Hold(_) => "hold",
        }
    }
}

/// The JSON line of a case: its fields, after `"case":"<name>"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "case", rename_all = "lowercase")]
pub enum BenchReport {
    /// `lab-app bench rr`.
    Rr(LatencyReport),
    /// `lab-app bench connect`.
    Connect(LatencyReport),
    /// `lab-app bench rate`.
    Rate(RateReport),
    /// `lab-app bench hold`.
    Hold(HoldReport),
}

impl BenchReport {
    /// The report as one JSON line (without newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a BenchReport always serialises")
    }
}

/// Run `case` and write its report to `out` as one JSON line. `hold` then keeps its
/// connections open until `release` reaches EOF (in `lab-app`, standard input); the
/// other cases never read it. A `hold` that could not open every connection writes its
/// report, with how many it held and the first error, and then fails.
pub fn run(case: &BenchCase, out: &mut dyn Write, release: impl Read) -> Result<()> {
    let report = match case {
        BenchCase::Rr(options) => BenchReport::Rr(round_trip(options)?),
        BenchCase::Connect(options) => BenchReport::Connect(connect_latency(options)?),
        BenchCase::Rate(options) => BenchReport::Rate(connect_rate(options)?),
        BenchCase::Hold(options) => {
            let held = hold(options)?;
            write_line(out, &BenchReport::Hold(held.report().clone()))?;
            if let Some(error) = &held.report().first_error {
                bail!(
                    "held {} of {} connections to {}: {error}",
                    held.report().held,
                    options.count,
                    options.addr
                );
            }
            return held
                .keep_until_eof(release)
                .context("waiting for the release (end of standard input)");
        }
    };
    write_line(out, &report)
}

/// Write the report and flush it at once: whoever started us may be waiting for it.
fn write_line(out: &mut dyn Write, report: &BenchReport) -> Result<()> {
    writeln!(out, "{}", report.to_json())
        .and_then(|()| out.flush())
        .context("writing the report")
}

/// Connect with [`IO_TIMEOUT`] on the connect and on every later read and write. The
/// two local limits a benchmark runs into are named in the error.
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| {
        let hint = match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EMFILE) => match getrlimit(Resource::RLIMIT_NOFILE) {
                Ok((soft, _)) => format!(" (the open-files limit is {soft})"),
                Err(_) => String::new(),
            },
            Some(Errno::EADDRNOTAVAIL) => " (no local port left for this destination: \
                connections this client closed wait in TIME_WAIT for a minute; \
                see net.ipv4.ip_local_port_range)"
                .to_string(),
            _ => String::new(),
        };
        anyhow!("connect to {addr}: {e}{hint}")
    })?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .context("setting socket timeouts")?;
    Ok(stream)
}

/// Connect, write [`PROBE`] and read its echo: a connection proven end to end.
fn connect_and_probe(addr: SocketAddr) -> Result<TcpStream> {
    let stream = connect(addr)?;
    send_probe(&stream)?;
    await_probe(&stream)?;
    Ok(stream)
}

fn send_probe(mut stream: &TcpStream) -> Result<()> {
    stream.write_all(&[PROBE]).context("sending 1 byte")
}

fn await_probe(stream: &TcpStream) -> Result<()> {
    let mut echo = [0u8];
    read_echo(stream, &mut echo).context("reading the echo of 1 byte")?;
    if echo[0] != PROBE {
        bail!(
            "the server answered {:?} instead of echoing {:?} (is it `lab-app serve --mode echo`?)",
            char::from(echo[0]),
            char::from(PROBE)
        );
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes, with errors that say what happened: the OS reports
/// a read timeout as "Resource temporarily unavailable", and `read_exact` an early
/// end as "failed to fill whole buffer".
fn read_echo(mut stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no echo within {IO_TIMEOUT:?}"),
        ),
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection before echoing everything",
        ),
        _ => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        case: BenchCase,
    }

    fn parse(args: &[&str]) -> Result<BenchCase, clap::Error> {
        Cli::try_parse_from(["lab-app-bench"].iter().chain(args)).map(|cli| cli.case)
    }

    #[test]
    fn command_line_takes_durations_with_units_and_documented_defaults() {
        let addr = "127.0.0.1:8080";
        let BenchCase::Rr(rr) =
            parse(&["rr", "--addr", addr, "--duration", "5s", "--size", "64"]).unwrap()
        else {
            panic!("not rr")
        };
        assert_eq!(
            (rr.duration, rr.warmup, rr.size),
            (Duration::from_secs(5), Duration::from_secs(1), 64)
        );
        let BenchCase::Rr(rr) = parse(&[
            "rr",
            "--addr",
            addr,
            "--duration",
            "500ms",
            "--size",
            "1",
            "--warmup",
            "0s",
        ])
        .unwrap() else {
            panic!("not rr")
        };
        assert_eq!(
            (rr.duration, rr.warmup),
            (Duration::from_millis(500), Duration::ZERO)
        );
        let BenchCase::Hold(hold) = parse(&["hold", "--addr", addr, "--count", "10000"]).unwrap()
        else {
            panic!("not hold")
        };
        assert_eq!((hold.count, hold.batch), (10_000, 200));
        let BenchCase::Rate(rate) = parse(&[
            "rate",
            "--addr",
            "[::1]:8080",
            "--duration",
            "2s",
            "--concurrency",
            "8",
        ])
        .unwrap() else {
            panic!("not rate")
        };
        assert_eq!(rate.concurrency, 8);
        // A bare number is ambiguous; zero clients, sizes or connections make no run;
        // an rr request past 64 KiB could fill both ends' buffers.
        for wrong in [
            &["connect", "--addr", addr, "--duration", "5"][..],
            &[
                "rate",
                "--addr",
                addr,
                "--duration",
                "1s",
                "--concurrency",
                "0",
            ],
            &["rr", "--addr", addr, "--duration", "1s", "--size", "0"],
            &["rr", "--addr", addr, "--duration", "1s", "--size", "65537"],
            &["hold", "--addr", addr, "--count", "0"],
            &["hold", "--addr", addr, "--count", "5", "--batch", "0"],
        ] {
            assert!(parse(wrong).is_err(), "{wrong:?} parsed");
        }
    }

    #[test]
    fn reports_are_one_json_line_tagged_with_the_case() {
        let report = BenchReport::Rr(LatencyReport {
            count: 3,
            p50_us: 20,
            p90_us: 30,
            p99_us: 40,
            max_us: 41,
            mean_us: 25.5,
        });
        let line = report.to_json();
        assert_eq!(
            line,
            r#"{"case":"rr","count":3,"p50_us":20,"p90_us":30,"p99_us":40,"max_us":41,"mean_us":25.5}"#
        );
        assert_eq!(serde_json::from_str::<BenchReport>(&line).unwrap(), report);
        let held = BenchReport::Hold(HoldReport {
            held: 10,
            open_ms: 7,
            first_error: None,
        });
        assert_eq!(held.to_json(), r#"{"case":"hold","held":10,"open_ms":7}"#);
        let rate = BenchReport::Rate(RateReport {
            concurrency: 2,
            connections: 10,
            errors: 1,
            per_second: 5.0,
            first_error: Some("reset".into()),
        });
        assert_eq!(
            rate.to_json(),
            r#"{"case":"rate","concurrency":2,"connections":10,"errors":1,"per_second":5.0,"first_error":"reset"}"#
        );
        assert_eq!(
            serde_json::from_str::<BenchReport>(&rate.to_json()).unwrap(),
            rate
        );
    }
}
