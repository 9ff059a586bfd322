//! `lab-app`: the test application that runs inside lab pods.
//!
//! `lab-app serve --port P [--mode echo|sha|greet] [--udp]` listens on `[::]:P`
//! (dual-stack), prints `READY <port>` and serves forever.
//! `lab-app connect --addr IP:PORT [--mode …] [--bytes N] [--udp] [--timeout-secs S]`
//! runs one checked exchange, prints one JSON line and exits 0 iff it passed;
//! `--parallel N [--hold]` runs N at once (all connected before any exchanges; with
//! `--hold`, idle until standard input ends), `--duration-secs S` spreads sending over S
//! seconds.
//! `lab-app bench rr|connect|rate|hold --addr IP:PORT …` measures the path to an echo
//! server and prints one JSON line (`warren_lab::app::bench`); `hold` then keeps its
//! connections open until standard input ends.
//! The behaviour of each mode is documented in `warren_lab::app`.
#![deny(rust_2018_idioms)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use warren_lab::app::bench::{self, BenchCase};
use warren_lab::app::{self, AppMode, ConnectOptions, LoadOptions, ServeOptions};

#[derive(Parser)]
#[command(name = "lab-app", about = "Test server and client for the warren lab")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen on [::]:PORT (IPv4 and IPv6), print `READY <port>`, serve forever.
    Serve {
        /// Port to listen on; 0 picks a free one.
        #[arg(long)]
        port: u16,
        /// What to do with each TCP connection.
        #[arg(long, value_enum, default_value_t = AppMode::Echo)]
        mode: AppMode,
        /// Echo UDP datagrams instead of serving TCP.
        #[arg(long)]
        udp: bool,
    },
    /// Run one exchange with a server and print a JSON report.
    Connect {
        /// Server address, e.g. 10.77.2.10:8080 or [fd00:77:2::10]:8080.
        #[arg(long)]
        addr: SocketAddr,
        /// The exchange to run (the server must be in the same mode).
        #[arg(long, value_enum, default_value_t = AppMode::Echo)]
        mode: AppMode,
        /// Payload size [default: 65536 for TCP, 1024 for UDP].
        #[arg(long)]
        bytes: Option<u64>,
        /// Send one UDP datagram and await its echo.
        #[arg(long)]
        udp: bool,
        /// Timeout for connecting and for each read.
        #[arg(long, default_value_t = app::DEFAULT_TIMEOUT.as_secs())]
        timeout_secs: u64,
        /// TCP: bind this local port before connecting.
        #[arg(long)]
        source_port: Option<u16>,
        /// Send this text repeated instead of pseudo-random bytes (to find it on the wire).
        #[arg(long)]
        marker: Option<String>,
        /// Run N connections at once, each with its own payload; all are connected
        /// before any exchanges. The report adds them up.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "udp")]
        parallel: u32,
        /// Once every connection is up, print `HOLDING <n>` on stderr and keep them open
        /// and idle until standard input ends (close it, or Ctrl-D), then exchange.
        #[arg(long, conflicts_with = "udp")]
        hold: bool,
        /// Send the payload in small pieces spread over this many seconds (fractions
        /// allowed), keeping the connection busy that long.
        #[arg(long, value_parser = parse_secs, conflicts_with = "udp")]
        duration_secs: Option<Duration>,
    },
    /// Measure the path to an echo server (`serve --mode echo`); print one JSON line.
    Bench {
        #[command(subcommand)]
        case: BenchCase,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Serve { port, mode, udp } => match serve(ServeOptions { port, mode, udp }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab-app serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Connect {
            addr,
            mode,
            bytes,
            udp,
            timeout_secs,
            source_port,
            marker,
            parallel,
            hold,
            duration_secs,
        } => {
            let default_bytes = if udp {
                app::DEFAULT_UDP_BYTES
            } else {
                app::DEFAULT_TCP_BYTES
            };
            let options = ConnectOptions {
                addr,
                mode,
                bytes: bytes.unwrap_or(default_bytes),
                udp,
                timeout: Duration::from_secs(timeout_secs),
                source_port,
                marker,
            };
            let load = LoadOptions {
                parallel: parallel as usize,
                hold,
                duration: duration_secs,
            };
            let report = app::connect_load(&options, &load, |connected| {
                // Whoever started us may wait for this line before looking.
                eprintln!("HOLDING {connected}");
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            });
            println!("{}", report.to_json());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Bench { case } => match bench::run(&case, &mut std::io::stdout(), std::io::stdin()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab-app bench {}: {e:#}", case.name());
                ExitCode::FAILURE
            }
        },
    }
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|e| format!("{text:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

fn serve(options: ServeOptions) -> Result<()> {
    app::serve(options, |port| {
        let mut out = std::io::stdout().lock();
        // Whoever started us waits for this line before connecting.
        let _ = writeln!(out, "{}{port}", app::READY_PREFIX);
        let _ = out.flush();
    })
    .context("serving")
}
