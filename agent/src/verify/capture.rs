//! A live capture: `tcpdump -i IFACE -w - -U -s 0 --immediate-mode tcp`, its pcap
//! output read as it comes, stopped with SIGTERM when the duration is up (SIGKILL if it
//! does not go). Ctrl-C stops it early and the report is still printed: SIGINT reaches
//! tcpdump (same process group), and this process takes it with `sigwait` instead of
//! dying.
use std::{
    io::{self, BufReader, Read},
    process::{ChildStderr, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, SigSet, SigmaskHow, Signal},
    unistd::Pid,
};

use super::{pcap::PcapError, VerifyError};

/// How long tcpdump has to exit after SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

/// What happened around the packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCapture {
    pub elapsed: Duration,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
    /// tcpdump's "N packets dropped by kernel".
    pub dropped_by_kernel: Option<u64>,
}

enum Stop {
    Interrupted,
    OutputEnded,
}

/// tcpdump's standard output, calling back when its first bytes come.
pub struct OnFirstBytes<F> {
    inner: ChildStdout,
    callback: Option<F>,
}

impl<F: FnOnce()> Read for OnFirstBytes<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(callback) = self.callback.take() {
                callback();
            }
        }
        Ok(n)
    }
}

/// Capture on `interface` for `duration`, handing tcpdump's output to `analyse`, which
/// reads it to its end; `started` is called once tcpdump captures.
pub fn live<T, F: FnOnce()>(
    interface: &str,
    duration: Duration,
    started: F,
    analyse: impl FnOnce(BufReader<OnFirstBytes<F>>) -> Result<T, PcapError>,
) -> Result<(T, LiveCapture), VerifyError> {
    // `any`, and tcpdump's interface numbers (`tcpdump -D`), are tcpdump's to check.
    let tcpdump_name = interface == "any" || interface.bytes().all(|b| b.is_ascii_digit());
    if !tcpdump_name && nix::net::if_::if_nametoindex(interface).is_err() {
        return Err(VerifyError::NoInterface {
            interface: interface.to_owned(),
        });
    }
    let mut child = Command::new("tcpdump")
        .args([
            "-i",
            interface,
            "-w",
            "-",
            "-U",
            "-s",
            "0",
            "--immediate-mode",
            "tcp",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => VerifyError::TcpdumpMissing,
            _ => VerifyError::Spawn(err),
        })?;
    let start = Instant::now();
    let pid = Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    // Block SIGINT in this thread, and so in the threads started below, after tcpdump
    // was spawned: a child inherits the signal mask, and tcpdump must get Ctrl-C.
    let sigint = SigSet::from_iter([Signal::SIGINT]);
    let previous_mask = sigint.thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
    let (stop, stops) = mpsc::channel();
    let on_signal = stop.clone();
    thread::spawn(move || {
        while sigint.wait().is_ok() {
            if on_signal.send(Stop::Interrupted).is_err() {
                break;
            }
        }
    });
    let errors = thread::spawn(move || read_all(stderr));
    let stopper = thread::spawn(move || stop_after(pid, duration, stops));

    // tcpdump writes the pcap header once it has opened the interface.
    let analysed = analyse(BufReader::new(OnFirstBytes {
        inner: stdout,
        callback: Some(started),
    }));
    let elapsed = start.elapsed();
    let _ = stop.send(Stop::OutputEnded);
    let interrupted = stopper.join().unwrap_or(false);
    let status = child.wait();
    let said = errors.join().unwrap_or_default();
    if let Some(mask) = previous_mask {
        let _ = mask.thread_set_mask();
    }

    match analysed {
        Ok(value) => Ok((
            value,
            LiveCapture {
                elapsed,
                interrupted,
                dropped_by_kernel: dropped_by_kernel(&said),
            },
        )),
        Err(err) => Err(match status {
            Ok(status) if status.success() && !matches!(err, PcapError::Empty) => {
                VerifyError::Stream(err)
            }
            Ok(status) => tcpdump_failure(status, &said),
            Err(wait) => VerifyError::Spawn(wait),
        }),
    }
}

/// Wait for the duration (or Ctrl-C, or the end of the output), then SIGTERM, then
/// SIGKILL if tcpdump is still there after [`GRACE`]. Whether Ctrl-C stopped it.
fn stop_after(pid: Pid, duration: Duration, stops: mpsc::Receiver<Stop>) -> bool {
    // tcpdump is not waited for until this returns, so `pid` cannot be reused meanwhile.
    let mut interrupted = false;
    match stops.recv_timeout(duration) {
        Ok(Stop::OutputEnded) | Err(RecvTimeoutError::Disconnected) => {
            // It closed its output (it failed, or a read error ended the analysis).
            let _ = kill(pid, Signal::SIGTERM);
            return false;
        }
        Ok(Stop::Interrupted) => interrupted = true,
        Err(RecvTimeoutError::Timeout) => {}
    }
    let _ = kill(pid, Signal::SIGTERM);
    loop {
        match stops.recv_timeout(GRACE) {
            Ok(Stop::OutputEnded) | Err(RecvTimeoutError::Disconnected) => return interrupted,
            // A second Ctrl-C: no more waiting.
            Ok(Stop::Interrupted) => {
                interrupted = true;
                let _ = kill(pid, Signal::SIGKILL);
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = kill(pid, Signal::SIGKILL);
                return interrupted;
            }
        }
    }
}

fn read_all(mut stderr: ChildStderr) -> String {
    let mut bytes = Vec::new();
    let _ = stderr.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What tcpdump said, without its chatter.
fn tcpdump_said(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .filter(|line| !line.starts_with("tcpdump: listening on"))
        .filter(|line| !line.contains(" packets ") && !line.contains(" packet "))
        .collect();
    lines.join("; ")
}

/// tcpdump exited without giving a capture: say why in terms of what to do.
fn tcpdump_failure(status: ExitStatus, stderr: &str) -> VerifyError {
    let said = tcpdump_said(stderr);
    if said.contains("ermission") || said.contains("Operation not permitted") {
        VerifyError::NotRoot { tcpdump: said }
    } else if said.contains("No such device") || said.contains("doesn't exist") {
        VerifyError::TcpdumpNoInterface { tcpdump: said }
    } else {
        VerifyError::Tcpdump {
            status: status.to_string(),
            tcpdump: if said.is_empty() {
                "(it said nothing)".to_owned()
            } else {
                said
            },
        }
    }
}

/// The count in tcpdump's "N packets dropped by kernel" line.
fn dropped_by_kernel(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let count = line.trim().strip_suffix("dropped by kernel")?;
        let count = count
            .trim_end()
            .strip_suffix("packets")
            .or_else(|| count.trim_end().strip_suffix("packet"))?;
        count.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    const STATS: &str =
        "tcpdump: listening on br0, link-type EN10MB (Ethernet), snapshot length 262144 bytes\n\
        1234 packets captured\n1240 packets received by filter\n6 packets dropped by kernel\n";

    #[test]
    fn reads_the_packets_dropped_by_the_kernel() {
        assert_eq!(dropped_by_kernel(STATS), Some(6));
        assert_eq!(dropped_by_kernel("1 packet dropped by kernel\n"), Some(1));
        assert_eq!(dropped_by_kernel("tcpdump: something else\n"), None);
    }

    #[test]
    fn says_why_tcpdump_failed() {
        let failed = ExitStatus::from_raw(1 << 8);
        let not_root =
            "tcpdump: br0: You don't have permission to perform this capture on that device\n\
            (socket: Operation not permitted)\n";
        let err = tcpdump_failure(failed, not_root);
        assert!(matches!(err, VerifyError::NotRoot { .. }), "{err:?}");
        assert!(err.to_string().contains("needs root"), "{err}");

        let no_device = "tcpdump: br9: No such device exists\n(No such device exists)\n";
        let err = tcpdump_failure(failed, no_device);
        assert!(
            matches!(err, VerifyError::TcpdumpNoInterface { .. }),
            "{err:?}"
        );

        let other = tcpdump_failure(failed, "tcpdump: br0: That device is not up\n");
        assert_eq!(
            other.to_string(),
            "tcpdump failed (exit status: 1): tcpdump: br0: That device is not up"
        );
        assert!(tcpdump_failure(failed, STATS)
            .to_string()
            .contains("(it said nothing)"));
    }
}
