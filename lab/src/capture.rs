//! Packet captures on the wire between the lab's nodes — the operator's proof that pod
//! traffic crosses encrypted. `tcpdump` runs in the `wire` netns on the bridge every
//! node-to-node packet crosses, and writes a pcap file under the lab's runtime dir.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long tcpdump may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running capture; [`Capture::stop`] ends it and returns what it saw. Dropping it
/// without stopping kills tcpdump.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

/// A finished capture.
#[derive(Debug)]
pub struct Captured {
    /// The pcap file (kept under the lab's runtime dir until `lab down`).
    pub file: PathBuf,
    /// Its bytes.
    pub pcap: Vec<u8>,
}

impl Capture {
    /// Start `tcpdump -i <interface> -U -w <file> <filter>`; `cmd` is a `tcpdump`
    /// command already placed in the capturing netns. Returns once tcpdump listens.
    pub(crate) fn start(
        mut cmd: Command,
        dir: &Path,
        interface: &str,
        filter: &str,
    ) -> Result<Capture> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join(format!(
            "capture-{}-{}.pcap",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // --immediate-mode: without it the kernel hands packets over in blocks, once a
        // second, and a capture stopped right after the traffic misses the last block.
        cmd.args([
            "-i",
            interface,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .args(filter.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("starting tcpdump (installed by `cargo xtask setup`)")?;
        // tcpdump says "listening on <if>" on stderr once the capture is armed.
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
            let first = lines.next().unwrap_or_default();
            let _ = tx.send(first);
            lines.for_each(drop);
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut capture = Capture {
            child: Some(child),
            file,
        };
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("listening on") => Ok(capture),
            Ok(line) => {
                capture.kill();
                bail!("tcpdump did not start: {line}")
            }
            Err(_) => {
                capture.kill();
                bail!("tcpdump did not start listening within {START_TIMEOUT:?}")
            }
        }
    }

    /// Stop the capture (SIGINT, so tcpdump flushes) and read the file.
    pub fn stop(mut self) -> Result<Captured> {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            child.wait().context("waiting for tcpdump")?;
        }
        let pcap = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        Ok(Captured {
            file: self.file.clone(),
            pcap,
        })
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Captured {
    /// Whether `needle` occurs anywhere in the captured bytes (a payload marker sent in
    /// clear text shows up verbatim).
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.pcap.windows(needle.len()).any(|w| w == needle)
    }

    /// How many captured packets match a tcpdump `filter` (`tcpdump -r`).
    pub fn count(&self, filter: &str) -> Result<usize> {
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .args(filter.split_whitespace())
            .stderr(Stdio::null())
            .output()
            .context("running tcpdump -r")?;
        if !out.status.success() {
            bail!(
                "tcpdump -r {} {filter} failed ({})",
                self.file.display(),
                out.status
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    /// Packets carrying TLS application-data records to or from the tunnel port
    /// (IPv4: the first payload byte is 0x17, the TLS record type).
    pub fn tls_records(&self) -> Result<usize> {
        self.count("ip and tcp port 15008 and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x17")
    }
}
