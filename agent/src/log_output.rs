//! Where the agent's two output streams go — the access log (stdout, one JSON line per
//! connection) and diagnostics (stderr) — without the data path ever waiting on them.
//!
//! A write to stdout blocks when nobody reads the pipe: a paused log shipper, a full
//! container log, a `kubectl logs -f` stopped with ^Z. With a plain `write` that stall
//! stops the two data-path workers, and with them every connection of the node. So each
//! line goes to a writer thread through a bounded queue (tracing-appender's non-blocking
//! writer, lossy): a full queue drops the line instead of waiting, and the drop is counted
//! (`warren_log_lines_dropped_total{stream}`). Losing log lines under pressure is the
//! trade ztunnel and Envoy make too; losing traffic is not.
//!
//! Invariants:
//! - one line is one queue message, so lines are never interleaved or cut;
//! - the queue holds at most [`QUEUE_LINES`] lines per stream (a few MiB);
//! - the writer threads are flushed when the [`Outputs`] guard is dropped, at the end of
//!   `main`.
use std::{
    io::{self, Write as _},
    sync::OnceLock,
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines each stream may have waiting for its writer thread (~8 MiB of access log).
pub const QUEUE_LINES: usize = 16 * 1024;

/// The access log's writer, once [`install`]ed; before that (tools, unit tests) lines go
/// straight to stdout.
static ACCESS: OnceLock<NonBlocking> = OnceLock::new();
/// Drop counters of both streams, for the metrics.
static DROPPED: OnceLock<(ErrorCounter, ErrorCounter)> = OnceLock::new();

/// Keeps the writer threads alive; dropping it flushes what is queued.
pub struct Outputs {
    /// The diagnostics writer, for `tracing_subscriber::fmt::layer().with_writer`.
    pub diagnostics: NonBlocking,
    _guards: [WorkerGuard; 2],
}

/// Start the writer threads of stdout (access log) and stderr (diagnostics).
pub fn install() -> Outputs {
    let (access, access_guard) = writer(io::stdout(), "warren-access-log", QUEUE_LINES);
    let (diagnostics, diagnostics_guard) = writer(io::stderr(), "warren-log", QUEUE_LINES);
    let _ = DROPPED.set((access.error_counter(), diagnostics.error_counter()));
    let _ = ACCESS.set(access);
    Outputs {
        diagnostics,
        _guards: [access_guard, diagnostics_guard],
    }
}

fn writer<W: io::Write + Send + 'static>(
    out: W,
    thread: &str,
    lines: usize,
) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines)
        .thread_name(thread)
        .finish(out)
}

/// Write one access-log line (with its newline); never blocks once [`install`]ed.
pub fn access_line(line: &str) {
    match ACCESS.get() {
        Some(access) => {
            let _ = access.clone().write_all(line.as_bytes());
        }
        None => {
            let _ = io::stdout().lock().write_all(line.as_bytes());
        }
    }
}

/// Lines dropped so far because a stream's queue was full: (access log, diagnostics).
pub fn dropped_lines() -> (u64, u64) {
    DROPPED.get().map_or((0, 0), |(access, diagnostics)| {
        (
            access.dropped_lines() as u64,
            diagnostics.dropped_lines() as u64,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            atomic::{AtomicBool, Ordering},
            mpsc, Arc,
        },
        time::Duration,
    };

    /// A sink whose writes do not return while `stalled` is set: a pipe nobody reads.
    struct Stalled(Arc<AtomicBool>);

    impl io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while self.0.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// With its reader stalled, ten thousand lines are written without waiting: the
    /// queue takes what it can hold, the rest is dropped and counted.
    #[test]
    fn a_stalled_stream_drops_and_counts_instead_of_blocking() {
        let stalled = Arc::new(AtomicBool::new(true));
        let (out, guard) = writer(Stalled(stalled.clone()), "test-stalled", 8);
        let counter = out.error_counter();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = out;
            for i in 0..10_000 {
                out.write_all(format!("line {i}\n").as_bytes()).unwrap();
            }
            let _ = done.send(());
        });
        // Not a measure of speed: a writer that waited for the sink would never finish.
        let wrote = finished.recv_timeout(Duration::from_secs(60));
        stalled.store(false, Ordering::Relaxed);
        wrote.expect("writing blocked on a stalled sink");
        // At most the queue (8) and the line being written (1) got through.
        let dropped = counter.dropped_lines();
        assert!(dropped >= 10_000 - 9, "dropped {dropped}");
        drop(guard);
    }
}
