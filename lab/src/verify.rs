//! `warren verify` on the lab's wire: the operator's proof of encryption, run on the
//! bridge between the nodes (`br0` in `warren-wire`) while traffic flows.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::Stdio,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{AppMode, Family, Lab};

/// How long `warren verify` may take to start capturing.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What a `warren verify` run said.
#[derive(Debug)]
pub struct WireVerify {
    /// Its exit status (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// The report (stdout).
    pub report: String,
    /// Progress and errors (stderr).
    pub log: String,
}

impl Lab {
    /// The addresses of the pods in the mesh, as `/32` and `/128` CIDRs: what an operator
    /// passes to `warren verify --mesh-cidr` to check exactly the enrolled workloads.
    pub fn mesh_cidrs(&self) -> Vec<String> {
        self.pods()
            .iter()
            .filter(|pod| pod.enrolled)
            .flat_map(|pod| {
                [
                    format!("{}/32", pod.ip(Family::V4)),
                    format!("{}/128", pod.ip(Family::V6)),
                ]
            })
            .collect()
    }

    /// The traffic `cargo xtask lab verify` captures: `demo/client` → `demo/server` over
    /// IPv4 and IPv6 (across nodes; in the mesh when `demo` is enrolled), and
    /// `legacy/client` → `demo/server`, the clear-text control. Each exchange is checked.
    pub fn wire_traffic(&self) -> Result<()> {
        const BYTES: u64 = 64 * 1024;
        let server = self.serve("demo/server", 0, AppMode::Sha)?;
        for (from, family) in [
            ("demo/client", Family::V4),
            ("demo/client", Family::V6),
            ("legacy/client", Family::V4),
        ] {
            let dst = self.pod("demo/server").addr(family, server.port());
            let report = self.connect(from, dst, AppMode::Sha, BYTES)?;
            if !report.ok {
                bail!("{from} → demo/server {dst} failed: {}", report.detail);
            }
        }
        Ok(())
    }

    /// Run `warren verify` on the wire for `duration` with `mesh_cidrs`, and `traffic`
    /// once it captures. A failing `traffic` is reported after the capture ended.
    pub fn verify_wire(
        &self,
        duration: Duration,
        mesh_cidrs: &[String],
        traffic: impl FnOnce() -> Result<()>,
    ) -> Result<WireVerify> {
        let binary = self.warren_binary()?;
        let mut cmd = self.command("wire", &binary)?;
        cmd.args(["verify", "--interface", &self.topology().wire.bridge])
            .arg("--duration")
            .arg(format!("{}ms", duration.as_millis()));
        for cidr in mesh_cidrs {
            cmd.args(["--mesh-cidr", cidr]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} verify in wire", binary.display()))?;

        // stderr: wait for the line that says the capture runs, keep the rest.
        let stderr = child.stderr.take().expect("stderr is piped");
        let (started_tx, started_rx) = mpsc::channel();
        let log_reader = thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("capturing") {
                    let _ = started_tx.send(());
                }
                log.push_str(&line);
                log.push('\n');
            }
            log
        });
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let report_reader = thread::spawn(move || {
            let mut report = String::new();
            let _ = stdout.read_to_string(&mut report);
            report
        });

        let sent = match started_rx.recv_timeout(START_TIMEOUT) {
            Ok(()) => Some(traffic()),
            // It ended (or hangs) before capturing: its log says why.
            Err(_) => None,
        };
        if sent.is_none() {
            let _ = child.kill();
        }
        let status = child.wait().context("waiting for warren verify")?;
        let run = WireVerify {
            exit_code: status.code(),
            report: report_reader.join().unwrap_or_default(),
            log: log_reader.join().unwrap_or_default(),
        };
        match sent {
            None => bail!(
                "warren verify did not start capturing within {START_TIMEOUT:?} (exit {:?}):\n{}{}",
                run.exit_code,
                run.log,
                run.report
            ),
            Some(Err(err)) => Err(err.context(format!(
                "the traffic during warren verify failed; warren verify said:\n{}",
                run.report
            ))),
            Some(Ok(())) => Ok(run),
        }
    }
}
