//! Running a node's `warren agent`: in the node's netns and its own cgroup, detached
//! (`setsid`), logging to `/run/warren-lab/<node>.log`, and ready once it logs
//! [`READY_TEXT`].

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::unistd::Pid;

use crate::enter::{self, EnterOptions};
use crate::options::RedirectMode;
use crate::topology::{Node, Placement};

/// The agent logs a line containing this once its pods are enrolled.
pub const READY_TEXT: &str = "agent ready";
/// How long an agent may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's pin root (`--bpf-root`); each node pins under `<root>/<node>`.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/warren";
/// How many log lines an error about a failed start shows.
const TAIL_LINES: usize = 40;

/// Everything needed to start one node's agent.
#[derive(Clone, Debug)]
pub struct Launch<'a> {
    /// The `warren` executable.
    pub binary: &'a Path,
    /// The node to serve.
    pub node: &'a Node,
    /// Where the agent learns workloads and policy.
    pub control: Control<'a>,
    /// `--redirect` mode.
    pub redirect: RedirectMode,
    /// `--ca-dir`: the lab's CA.
    pub ca_dir: &'a Path,
    /// `--cert-lifetime`, when not the agent's default.
    pub cert_lifetime: Option<Duration>,
    /// Log file, appended to.
    pub log: &'a Path,
    /// Where stdout (the access log) goes instead of the log file: the write end of a
    /// pipe, for tests of a stalled log reader.
    pub stdout: Option<std::os::fd::BorrowedFd<'a>>,
}

/// Where an agent learns workloads and policy.
#[derive(Clone, Copy, Debug)]
pub enum Control<'a> {
    /// `--config lab.yaml --policy <dir>`.
    Local {
        /// `lab.yaml`, or a node's own view.
        config: &'a Path,
        /// The directory of Istio policy documents.
        policy_dir: &'a Path,
    },
    /// `--control kubernetes` against the API server named in `kubeconfig`, with
    /// `warren-cni` talking to `cni_socket`.
    Kubernetes {
        /// A kubeconfig file (`KUBECONFIG`).
        kubeconfig: &'a Path,
        /// `--cni-socket`.
        cni_socket: &'a Path,
        /// Certificates from a CA service instead of the lab's CA directory.
        remote_ca: Option<&'a RemoteCa>,
    },
}

/// A `warren ca serve` for the agents (`--ca-addr`, `--ca-root-cert`, `--ca-token-file`).
#[derive(Clone, Debug)]
pub struct RemoteCa {
    /// `https://host:port`.
    pub address: String,
    /// The CA's published root.
    pub root_cert: std::path::PathBuf,
    /// The agent's service-account token.
    pub token_file: std::path::PathBuf,
}

impl Launch<'_> {
    /// The agent's command line (without placement).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.binary);
        cmd.arg("agent")
            .args(["--node", &self.node.name])
            .args(["--redirect", self.redirect.as_str()])
            .args(["--bpf-root", BPF_PIN_ROOT]);
        match self.control {
            Control::Kubernetes {
                remote_ca: Some(ca),
                ..
            } => {
                cmd.args(["--ca-addr", &ca.address])
                    .arg("--ca-root-cert")
                    .arg(&ca.root_cert)
                    .arg("--ca-token-file")
                    .arg(&ca.token_file);
            }
            _ => {
                cmd.arg("--ca-dir").arg(self.ca_dir);
            }
        }
        match self.control {
            Control::Local { config, policy_dir } => {
                cmd.arg("--config")
                    .arg(config)
                    .arg("--policy")
                    .arg(policy_dir);
            }
            Control::Kubernetes {
                kubeconfig,
                cni_socket,
                ..
            } => {
                cmd.args(["--control", "kubernetes"])
                    .arg("--cni-socket")
                    .arg(cni_socket)
                    .env("KUBECONFIG", kubeconfig);
            }
        }
        if let Some(lifetime) = self.cert_lifetime {
            cmd.args(["--cert-lifetime", &cert_lifetime_arg(lifetime)]);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }
}

/// `lifetime` as the agent parses it (humantime), in milliseconds so that nothing is
/// rounded away.
pub fn cert_lifetime_arg(lifetime: Duration) -> String {
    format!("{}ms", lifetime.as_millis())
}

/// Create the lab's CA with `warren ca init` (the agents sign workload certificates
/// with it).
pub fn init_ca(binary: &Path, dir: &Path) -> Result<()> {
    let out = Command::new(binary)
        .args(["ca", "init", "--dir"])
        .arg(dir)
        .output()
        .with_context(|| format!("running {} ca init", binary.display()))?;
    if !out.status.success() {
        bail!(
            "`warren ca init --dir {}` failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The files of Istio's plug-in CA layout, which `--cacerts` copies.
const CACERTS_FILES: [&str; 4] = [
    "root-cert.pem",
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
];

/// Whether `warren ca check` accepts the CA in `cacerts` (read only): run before the lab
/// touches the system, so a CA the agents cannot use stops `lab up` with the agent's own
/// reason, naming the operator's file.
pub fn check_ca(binary: &Path, cacerts: &Path) -> Result<()> {
    let out = Command::new(binary)
        .args(["ca", "check", "--dir"])
        .arg(cacerts)
        .output()
        .with_context(|| format!("running {} ca check", binary.display()))?;
    if !out.status.success() {
        bail!(
            "--cacerts {}: warren cannot use this CA: {}",
            cacerts.display(),
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .trim_start_matches("error: ")
        );
    }
    eprint!("lab: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// Give the lab's agents an existing CA (Istio's `cacerts`, checked with [`check_ca`]):
/// its four files are copied into `dir`, the key mode 0600. The operator's directory is
/// never touched, and `lab down` removes the copy.
pub fn install_ca(cacerts: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for file in CACERTS_FILES {
        let (from, to) = (cacerts.join(file), dir.join(file));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        let mode = if file == "ca-key.pem" { 0o600 } else { 0o644 };
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", to.display()))?;
    }
    Ok(())
}

/// Start the agent and wait until it is ready; returns its pid. If it exits or
/// does not become ready in time, it is killed and the error carries its log tail.
pub fn start(launch: &Launch<'_>) -> Result<Pid> {
    let node = &launch.node.name;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(launch.log)
        .with_context(|| format!("opening agent log {}", launch.log.display()))?;
    // Logs are appended across restarts: only what this start writes counts.
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = launch.command();
    let stdout = match launch.stdout {
        Some(fd) => Stdio::from(
            fd.try_clone_to_owned()
                .context("duplicating the stdout pipe")?,
        ),
        None => Stdio::from(log.try_clone().context("duplicating the log file handle")?),
    };
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(log);
    enter::place(
        &mut cmd,
        &Placement {
            netns_path: launch.node.netns_path.clone(),
            cgroup: Some(launch.node.agent_cgroup.clone()),
        },
        EnterOptions { setsid: true },
    )?;
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "starting the agent of {node} ({}) in {}",
            launch.binary.display(),
            launch.node.netns_path.display()
        )
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    match wait_ready(&mut child, node, launch.log, offset, READY_TIMEOUT) {
        Ok(()) => {
            // Reap it when it exits so that it never lingers as a zombie of this
            // process (tests kill and restart agents and wait for them to be gone).
            let _ = thread::Builder::new()
                .name(format!("reap-agent-{node}"))
                .spawn(move || child.wait());
            Ok(pid)
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn wait_ready(
    child: &mut Child,
    node: &str,
    log: &Path,
    offset: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if read_from(log, offset)?.contains(READY_TEXT) {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("checking on the agent")? {
            bail!(
                "the agent of {node} exited ({status}) before logging {READY_TEXT:?}; last lines of {}:\n{}",
                log.display(),
                tail(log, offset, TAIL_LINES)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent of {node} did not log {READY_TEXT:?} within {}s; last lines of {}:\n{}",
                timeout.as_secs(),
                log.display(),
                tail(log, offset, TAIL_LINES)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The log's text from byte `offset` on.
pub fn read_from(log: &Path, offset: u64) -> Result<String> {
    let mut file = File::open(log).with_context(|| format!("opening {}", log.display()))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("seeking in {}", log.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", log.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `lines` lines written after `offset`, indented, for error messages.
pub fn tail(log: &Path, offset: u64, lines: usize) -> String {
    let text = read_from(log, offset).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let shown = &all[all.len().saturating_sub(lines)..];
    if shown.is_empty() {
        "    (the log is empty)".to_string()
    } else {
        shown
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Current size of a log file (0 if it does not exist): an offset to read from
/// later.
pub fn log_len(log: &Path) -> u64 {
    fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::topology::Topology;

    fn args(cert_lifetime: Option<Duration>) -> Vec<String> {
        let topology = Topology::standard(Path::new("/sys/fs/cgroup"));
        let path = PathBuf::from("/x");
        let launch = Launch {
            binary: &path,
            node: &topology.nodes[0],
            control: Control::Local {
                config: &path,
                policy_dir: &path,
            },
            redirect: RedirectMode::Ebpf,
            ca_dir: &path,
            log: &path,
            cert_lifetime,
            stdout: None,
        };
        launch
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn cert_lifetime_is_passed_only_when_set() {
        assert!(!args(None).iter().any(|a| a == "--cert-lifetime"));
        let with = args(Some(Duration::from_millis(6500)));
        let at = with
            .iter()
            .position(|a| a == "--cert-lifetime")
            .expect("--cert-lifetime is passed");
        assert_eq!(with[at + 1], "6500ms");
    }
}
