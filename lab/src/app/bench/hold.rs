//! `lab-app bench hold`: many connections open at once, each proven end to end.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{await_probe, connect, send_probe};
use crate::app::open_files::raise_open_files_limit;

/// Options of `lab-app bench hold`.
#[derive(Clone, Debug, clap::Args)]
pub struct HoldOptions {
    /// Echo server, e.g. `10.77.2.10:8080` or `[fd00:77:2::10]:8080`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections to open and keep open.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Connections opened before their 1-byte echoes are sent and awaited together.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), default_value_t = 200)]
    pub batch: u32,
}

/// The report of `hold`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Connections open and confirmed by an echo.
    pub held: u64,
    /// Time to open and confirm them, in ms.
    pub open_ms: u64,
    /// Why the next connection could not be held, when fewer than asked were (e.g.
    /// "connection 1021: connect to …: Too many open files (os error 24) (the
    /// open-files limit is 1024)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Connections kept open, each confirmed by an echo; closed on drop.
#[derive(Debug)]
pub struct HeldConnections {
    report: HoldReport,
    streams: Vec<TcpStream>,
}

impl HeldConnections {
    /// How many were held and how long that took.
    pub fn report(&self) -> &HoldReport {
        &self.report
    }

    /// Keep every connection open (idle) until `release` reaches EOF, then close them.
    /// `release` is standard input in `lab-app`, so whoever started it ends the hold
    /// by closing the pipe, and a killed orchestrator ends it too.
    pub fn keep_until_eof(self, mut release: impl Read) -> io::Result<()> {
        io::copy(&mut release, &mut io::sink())?;
        drop(self.streams);
        Ok(())
    }
}

/// Run `hold`: raise the open-files limit, then open `count` connections, `batch` at a
/// time: connect each, send the probe byte on each, then await each echo, so that the
/// round trips of a batch overlap instead of adding up. The first failure stops it;
/// the report then says how many were held and why the next one was not. Fails only
/// when the open-files limit cannot be raised.
pub fn hold(options: &HoldOptions) -> Result<HeldConnections> {
    raise_open_files_limit().context("raising the open-files limit")?;
    let count = options.count as usize;
    let started = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut first_error = None;
    while streams.len() < count && first_error.is_none() {
        let size = (options.batch as usize).min(count - streams.len());
        let (confirmed, error) = open_batch(options.addr, streams.len(), size);
        streams.extend(confirmed);
        first_error = error;
    }
    Ok(HeldConnections {
        report: HoldReport {
            held: streams.len() as u64,
            open_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            first_error,
        },
        streams,
    })
}

/// Open `size` connections numbered from `first` and confirm them. Returns those
/// confirmed, which are the first ones of the batch, and the failure of the one after
/// them if any (each step works on what the step before confirmed, so a later step's
/// failure is always on an earlier connection and replaces the earlier step's).
fn open_batch(addr: SocketAddr, first: usize, size: usize) -> (Vec<TcpStream>, Option<String>) {
    let mut batch = Vec::with_capacity(size);
    let mut failure = None;
    for index in first..first + size {
        match connect(addr) {
            Ok(stream) => batch.push(stream),
            Err(e) => {
                failure = Some(format!("connection {index}: {e:#}"));
                break;
            }
        }
    }
    for step in [send_probe, await_probe] {
        let failed = batch
            .iter()
            .enumerate()
            .find_map(|(offset, stream)| step(stream).err().map(|e| (offset, e)));
        if let Some((offset, e)) = failed {
            failure = Some(format!("connection {}: {e:#}", first + offset));
            batch.truncate(offset);
        }
    }
    (batch, failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::bench::{run, BenchCase, BenchReport};
    use crate::app::test_helpers::start_server;
    use crate::app::AppMode;
    use std::io::{BufRead as _, BufReader};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
    use std::thread;
    use std::time::Duration;

    #[test]
    fn holds_every_connection_until_released() {
        let port = start_server(AppMode::Echo, false);
        let options = HoldOptions {
            addr: (Ipv6Addr::LOCALHOST, port).into(),
            count: 500,
            // Not a divisor of the count: the last batch is smaller.
            batch: 64,
        };
        let (mut report_reader, mut report_writer) = io::pipe().unwrap();
        let (release_reader, mut release_writer) = io::pipe().unwrap();
        let holder = thread::spawn(move || {
            run(
                &BenchCase::Hold(options),
                &mut report_writer,
                release_reader,
            )
        });
        let mut line = String::new();
        BufReader::new(&mut report_reader)
            .read_line(&mut line)
            .unwrap();
        let BenchReport::Hold(report) = serde_json::from_str(&line).unwrap() else {
            panic!("not a hold report: {line}")
        };
        assert_eq!((report.held, report.first_error), (500, None), "{line}");
        thread::sleep(Duration::from_millis(100));
        assert!(!holder.is_finished(), "released before its release ended");
        // Anything written to the release is ignored; only its end counts.
        io::Write::write_all(&mut release_writer, b"ignored\n").unwrap();
        drop(release_writer);
        holder.join().unwrap().unwrap();
        let mut rest = String::new();
        report_reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "one JSON line, nothing after it");
    }

    #[test]
    fn reports_how_many_were_held_before_the_first_failure() {
        // Echoes on its first three connections and closes the others unanswered.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for (index, stream) in listener.incoming().enumerate() {
                if let (Ok(stream), true) = (stream, index < 3) {
                    thread::spawn(move || io::copy(&mut &stream, &mut &stream));
                }
            }
        });
        let held = hold(&HoldOptions {
            addr,
            count: 6,
            batch: 2,
        })
        .unwrap();
        let report = held.report();
        assert_eq!(report.held, 3, "{report:?}");
        let error = report.first_error.as_deref().unwrap();
        assert!(error.starts_with("connection 3: "), "{error}");
        // Through `run`: the report is written, then the run fails saying why.
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let mut out = Vec::new();
        let case = BenchCase::Hold(HoldOptions {
            addr: free,
            count: 10,
            batch: 4,
        });
        let error = run(&case, &mut out, io::empty()).unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.starts_with(&format!(
                "held 0 of 10 connections to {free}: connection 0: connect to"
            )) && text.contains("refused"),
            "{text}"
        );
        let BenchReport::Hold(report) = serde_json::from_slice(&out).unwrap() else {
            panic!("not a hold report")
        };
        assert_eq!(report.held, 0);
        assert!(report.first_error.unwrap().contains("refused"));
    }
}
