//! Driving `lab-app` from tests and the demo: a server that is known to listen before
//! anyone connects, and stopped when dropped; a client running in the background.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use super::{ConnectReport, READY_PREFIX};

/// How long a server may take to print its READY line.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `lab-app serve`. Killed (and reaped) on drop.
#[derive(Debug)]
pub struct AppServer {
    child: Child,
    port: u16,
    target: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl AppServer {
    /// Spawn `cmd` (a `lab-app serve …` placed in `target`) and wait for its READY
    /// line. Its stderr — one line per connection — is collected for [`Self::log`].
    pub(crate) fn start(mut cmd: Command, target: String) -> Result<AppServer> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting lab-app serve in {target}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let first = rx.recv_timeout(READY_TIMEOUT);
        let failed = |why: String, child: &mut Child, log: &Mutex<Vec<String>>| {
            let _ = child.kill();
            let _ = child.wait();
            thread::sleep(Duration::from_millis(50));
            let stderr = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
            anyhow!("lab-app serve in {target} {why}; its stderr:\n{stderr}")
        };
        let line = match first {
            Ok(Some(Ok(line))) => line,
            Ok(_) => {
                return Err(failed(
                    "exited before printing READY".into(),
                    &mut child,
                    &log,
                ))
            }
            Err(_) => {
                return Err(failed(
                    format!("printed no READY line within {}s", READY_TIMEOUT.as_secs()),
                    &mut child,
                    &log,
                ))
            }
        };
        let port = match line
            .strip_prefix(READY_PREFIX)
            .and_then(|p| p.trim().parse::<u16>().ok())
        {
            Some(port) => port,
            None => {
                return Err(failed(
                    format!("printed {line:?} instead of `READY <port>`"),
                    &mut child,
                    &log,
                ))
            }
        };
        Ok(AppServer {
            child,
            port,
            target,
            log,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it runs (`demo/server`, …).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Its stderr so far. Per connection: `accept peer=<addr> local=<addr> mode=<m>`
    /// as soon as it is accepted, then `conn peer=<addr> local=<addr> mode=<m>
    /// received=<n> sent=<n>` (or `… error: …`) written just before the server's
    /// final half-close, so normally before the client has finished. Lines arrive
    /// through a pipe: to be certain, use [`Self::wait_for_log`].
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (up to `timeout`) until a line of [`Self::log`] contains `needle`, and
    /// return that line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "lab-app serve in {} logged no line containing {needle:?} within {:?}; its log:\n{}",
                    self.target,
                    timeout,
                    self.log().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop it now (dropping does the same).
    pub fn stop(mut self) -> Result<()> {
        self.kill()
    }

    fn kill(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!("lab-app serve in {} had already exited", self.target);
        }
        self.child.kill().context("killing lab-app serve")?;
        self.child.wait().context("reaping lab-app serve")?;
        Ok(())
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `lab-app connect` running in the background ([`crate::Lab::start_connect`]), to
/// look at its connections while they are open. Its standard input is a pipe kept open
/// until [`Self::release`], so a client started with
/// [`LoadOptions::hold`](super::LoadOptions::hold) keeps its connections open and idle
/// until then. Killed (and reaped) on drop.
#[derive(Debug)]
pub struct AppClient {
    /// Taken by [`Self::wait`].
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    target: String,
}

impl AppClient {
    /// Spawn `cmd` (a `lab-app connect …` placed in `target`).
    pub(crate) fn start(mut cmd: Command, target: String) -> Result<AppClient> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting lab-app connect in {target}"))?;
        let stdin = child.stdin.take();
        Ok(AppClient {
            child: Some(child),
            stdin,
            target,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited already (a holding client exits early only when something
    /// went wrong, e.g. a bad option).
    pub fn exited(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?.is_some()),
            None => Ok(true),
        }
    }

    /// Close its standard input: a holding client goes on with its exchanges.
    pub fn release(&mut self) {
        self.stdin.take();
    }

    /// Release it and wait for it to finish; its report. It ends by itself: every
    /// connect and read has the client's timeout.
    pub fn wait(mut self) -> Result<ConnectReport> {
        self.release();
        let child = self
            .child
            .take()
            .context("the client was already waited for")?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for lab-app connect in {}", self.target))?;
        parse_report(&self.target, &out)
    }
}

impl Drop for AppClient {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The report `lab-app connect` in `target` printed as its last line of stdout.
pub(crate) fn parse_report(target: &str, out: &Output) -> Result<ConnectReport> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "lab-app connect in {target} printed no report ({}); stdout: {stdout:?}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}
