//! [`Lab`]: bringing the simulated cluster up and down, running things in it, and
//! controlling its agents.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sha2::{Digest as _, Sha256};

use crate::agent::{self, Control, Launch, RemoteCa};
use crate::app::{self, AppClient, AppMode, AppServer, ConnectOptions, ConnectReport, LoadOptions};
use crate::config::AgentConfig;
use crate::enter::{self, EnterOptions};
use crate::options::{LabMode, RedirectMode, UpOptions};
use crate::state::{AgentBinary, AgentRecord, LabLock, RuntimeDir, State};
use crate::teardown::{self, RuntimeDirRemoval};
use crate::topology::{Family, Node, Pod, Target, Topology};
use crate::{cargo, cgroup, create, mounts, netns, prereq, process};

/// How long [`Lab::kill_agent`] waits for the agent to exit.
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running lab. Cheap to share between test threads: every method takes `&self`,
/// and changes to the agents are serialised by the lab lock (also across
/// processes), so one test's `kill_agent` cannot race another's `start_agent`.
#[derive(Debug)]
pub struct Lab {
    dir: RuntimeDir,
    topology: Topology,
    mode: LabMode,
    cert_lifetime: Option<Duration>,
    /// Last state read or written, for when `state.json` cannot be read.
    cached: Mutex<State>,
}

/// How [`Lab::start_agent_locked`] starts an agent.
enum StartControl<'a> {
    /// The lab's `lab.yaml`, or a node's own config.
    Local(Option<&'a Path>),
    Kubernetes {
        kubeconfig: &'a Path,
        cni_socket: &'a Path,
        remote_ca: Option<&'a RemoteCa>,
    },
}

/// What one `warren-cni` call did.
#[derive(Debug)]
pub struct CniRun {
    /// Exit status 0.
    pub ok: bool,
    /// The result (ADD) or the CNI error object.
    pub stdout: String,
    /// What the plugin logged.
    pub stderr: String,
    /// The previous plugin's result that was passed in, which ADD must print unchanged.
    pub prev_result: serde_json::Value,
}

impl Lab {
    /// Bring the lab up, or return the one that is already up.
    ///
    /// Creates the namespaces, links, addresses, routes and cgroups, writes
    /// `lab.yaml`, and with `agents` builds `warren` (`cargo build -p warren`) and
    /// starts one agent per node, waiting until each logs "agent ready".
    ///
    /// Idempotent: when a lab is up in the same mode, dead agents are restarted (all
    /// of them if the `warren` binary was rebuilt) and the lab is returned. A lab in
    /// another mode, or whose agents were given another certificate lifetime, is an
    /// error. Leftovers without `state.json` are removed first. If creating fails
    /// midway, everything is removed again before the error returns.
    pub fn up(options: &UpOptions) -> Result<Lab> {
        let mode = options.mode();
        let cert_lifetime = options.agent_cert_lifetime();
        if let Some(lifetime) = cert_lifetime {
            // X.509 validity has one-second resolution: anything shorter is expired
            // when it arrives.
            if lifetime < Duration::from_secs(1) {
                bail!("a certificate lifetime of {lifetime:?} is too short: certificates need at least 1s");
            }
        }
        let mut missing = prereq::check_lab();
        if options.agents {
            missing.extend(prereq::check_toolchain());
        }
        if !missing.is_empty() {
            bail!(
                "the lab cannot start; missing:\n{}run `cargo xtask setup` (as root) to install what can be installed",
                prereq::describe(&missing)
            );
        }
        let dir = RuntimeDir::default();
        let lock = dir.lock()?;
        let cacerts = options.agent_cacerts();
        match dir.read_state()? {
            Some(state) => Lab::reuse(dir, &lock, state, mode, cert_lifetime, cacerts),
            None => Lab::create(dir, &lock, mode, cert_lifetime, cacerts),
        }
    }

    /// The lab that is up, from `state.json`.
    pub fn load() -> Result<Lab> {
        let dir = RuntimeDir::default();
        let state = dir.read_state()?.with_context(|| {
            format!(
                "no lab is up ({} does not exist); start one with `cargo xtask lab up`",
                dir.state().display()
            )
        })?;
        Ok(Lab::from_state(dir, state))
    }

    /// Whether a lab is recorded as up.
    pub fn is_up() -> bool {
        RuntimeDir::default().state().exists()
    }

    /// Remove the lab and everything it created, from any state (also without
    /// `state.json`, by name patterns): agents (SIGTERM, 5 s, SIGKILL), processes
    /// left in lab cgroups and namespaces, every `warren-*` netns, the lab cgroups,
    /// the agents' pins under `/sys/fs/bpf/warren/<node>`, and `/run/warren-lab`.
    /// Doing it twice is fine.
    pub fn down() -> Result<()> {
        let dir = RuntimeDir::default();
        let lock = dir.lock()?;
        teardown::down(&dir, &lock, RuntimeDirRemoval::All)
    }

    /// Everything of a lab that exists on the machine: `warren-*` namespace handles,
    /// the lab cgroup, the agents' pin directory and the runtime directory. Empty
    /// after a successful [`Lab::down`].
    pub fn leftovers() -> Result<Vec<PathBuf>> {
        let mut found: Vec<PathBuf> = netns::list_lab()?
            .into_iter()
            .map(|name| Path::new(crate::topology::NETNS_DIR).join(name))
            .collect();
        if let Ok(cgroup2) = mounts::cgroup2_mount() {
            found.push(cgroup2.join(crate::topology::LAB_CGROUP));
        }
        found.push(PathBuf::from(agent::BPF_PIN_ROOT));
        found.push(RuntimeDir::default().root().to_path_buf());
        found.retain(|p| p.exists());
        Ok(found)
    }

    fn from_state(dir: RuntimeDir, state: State) -> Lab {
        Lab {
            dir,
            topology: state.topology.clone(),
            mode: state.mode,
            cert_lifetime: state.cert_lifetime,
            cached: Mutex::new(state),
        }
    }

    fn create(
        dir: RuntimeDir,
        lock: &LabLock,
        mode: LabMode,
        cert_lifetime: Option<Duration>,
        cacerts: Option<&Path>,
    ) -> Result<Lab> {
        let cgroup2 = mounts::cgroup2_mount()?;
        let topology = Topology::standard(&cgroup2);
        if leftovers_exist(&topology)? {
            eprintln!("lab: removing leftovers of an earlier lab");
            teardown::down(&dir, lock, RuntimeDirRemoval::KeepLock)
                .context("removing leftovers of an earlier lab before creating a new one")?;
        }
        // Build before touching the system: a compile error then leaves nothing behind.
        let prepared = (|| -> Result<Option<AgentBinary>> {
            let binary = match mode {
                LabMode::Agents(_) => Some(build_agent()?),
                LabMode::NoAgents => None,
            };
            if let (Some(binary), Some(cacerts)) = (&binary, cacerts) {
                agent::check_ca(&binary.path, cacerts)?;
            }
            Ok(binary)
        })();
        let binary = match prepared {
            Ok(binary) => binary,
            Err(err) => {
                // Nothing was created but the runtime directory holding the lock.
                let _ = teardown::down(&dir, lock, RuntimeDirRemoval::All);
                return Err(err);
            }
        };
        let created = (|| -> Result<Lab> {
            eprintln!("lab: creating namespaces, links and cgroups");
            create::create(&topology)?;
            fs::write(
                dir.config(),
                AgentConfig::for_topology(&topology).to_yaml()?,
            )
            .with_context(|| format!("writing {}", dir.config().display()))?;
            let mut state = State::new(mode, topology.clone());
            state.agent_binary = binary;
            state.cert_lifetime = cert_lifetime;
            state.cacerts = cacerts.map(Path::to_path_buf);
            dir.write_state(lock, &state)?;
            let lab = Lab::from_state(dir.clone(), state);
            if let LabMode::Agents(redirect) = mode {
                if let Some(binary) = &lab.state_or_cached().agent_binary {
                    match cacerts {
                        Some(cacerts) => agent::install_ca(cacerts, &dir.ca())?,
                        None => agent::init_ca(&binary.path, &dir.ca())?,
                    }
                }
                fs::create_dir_all(dir.policies())
                    .with_context(|| format!("creating {}", dir.policies().display()))?;
                if mounts::ensure_bpffs()? {
                    eprintln!("lab: mounted bpffs at {}", mounts::BPFFS);
                }
                for node in &topology.nodes {
                    lab.start_agent_locked(lock, &node.name, redirect, StartControl::Local(None))?;
                }
            }
            Ok(lab)
        })();
        created.map_err(|e| {
            eprintln!("lab: bringing the lab up failed; removing what was created");
            match teardown::down(&dir, lock, RuntimeDirRemoval::KeepLockAndLogs) {
                Ok(()) => e.context(format!(
                    "bringing the lab up failed; what was created has been removed, except the agent \
                     logs in {} (`cargo xtask lab down` removes them)",
                    dir.root().display()
                )),
                Err(cleanup) => e.context(format!(
                    "bringing the lab up failed, and so did removing what was created: {cleanup:#}"
                )),
            }
        })
    }

    fn reuse(
        dir: RuntimeDir,
        lock: &LabLock,
        state: State,
        mode: LabMode,
        cert_lifetime: Option<Duration>,
        cacerts: Option<&Path>,
    ) -> Result<Lab> {
        if state.mode != mode {
            bail!(
                "lab is up in mode {}; run `cargo xtask lab down` first (asked for mode {mode})",
                state.mode
            );
        }
        if state.cert_lifetime != cert_lifetime {
            bail!(
                "lab is up with agent certificate lifetime {}; run `cargo xtask lab down` first (asked for {})",
                describe_lifetime(state.cert_lifetime),
                describe_lifetime(cert_lifetime)
            );
        }
        if state.cacerts.as_deref() != cacerts {
            let describe = |dir: Option<&Path>| match dir {
                Some(dir) => format!("the plug-in CA from {}", dir.display()),
                None => "a CA of its own".to_owned(),
            };
            bail!(
                "lab is up with {}; run `cargo xtask lab down` first (asked for {})",
                describe(state.cacerts.as_deref()),
                describe(cacerts)
            );
        }
        for path in state
            .topology
            .netns_names()
            .iter()
            .map(|name| Path::new(crate::topology::NETNS_DIR).join(name))
            .chain(state.topology.pods.iter().map(|p| p.cgroup.clone()))
        {
            if !path.exists() {
                bail!(
                    "the lab is recorded as up but {} is missing; run `cargo xtask lab down` and bring it up again",
                    path.display()
                );
            }
        }
        let lab = Lab::from_state(dir, state.clone());
        if let LabMode::Agents(redirect) = mode {
            mounts::ensure_bpffs()?;
            let binary = build_agent()?;
            let rebuilt = state.agent_binary.as_ref() != Some(&binary);
            if rebuilt {
                eprintln!("lab: the warren binary changed; restarting the agents");
                let mut fresh = lab.read_state()?;
                fresh.agent_binary = Some(binary);
                lab.write(lock, fresh)?;
            }
            for node in &state.topology.nodes {
                let running = lab.agent_pid(&node.name);
                match running {
                    Some(pid) if rebuilt => {
                        lab.stop_agent_locked(
                            lock,
                            &node.name,
                            Pid::from_raw(pid as i32),
                            Signal::SIGTERM,
                        )?;
                        lab.start_agent_locked(
                            lock,
                            &node.name,
                            redirect,
                            StartControl::Local(None),
                        )?;
                    }
                    Some(_) => {}
                    None => {
                        eprintln!(
                            "lab: the agent of {} is not running; starting it",
                            node.name
                        );
                        lab.start_agent_locked(
                            lock,
                            &node.name,
                            redirect,
                            StartControl::Local(None),
                        )?;
                    }
                }
            }
        }
        Ok(lab)
    }

    fn read_state(&self) -> Result<State> {
        let state = self
            .dir
            .read_state()?
            .context("the lab was taken down meanwhile (state.json is gone); bring it up again")?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
        Ok(state)
    }

    fn write(&self, lock: &LabLock, state: State) -> Result<()> {
        self.dir.write_state(lock, &state)?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(())
    }

    fn state_or_cached(&self) -> State {
        self.read_state().unwrap_or_else(|_| {
            self.cached
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    // ---- topology ----------------------------------------------------------

    /// The whole topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// How the lab was brought up.
    pub fn mode(&self) -> LabMode {
        self.mode
    }

    /// The pod `<namespace>/<name>`. Panics, listing the pods, if there is none: the
    /// topology is fixed, so a wrong name is a bug in the caller.
    pub fn pod(&self, id: &str) -> &Pod {
        self.try_pod(id).unwrap_or_else(|| {
            let ids: Vec<String> = self.topology.pods.iter().map(Pod::id).collect();
            panic!("the lab has no pod {id:?}; it has {}", ids.join(", "))
        })
    }

    /// The pod `<namespace>/<name>`, if any.
    pub fn try_pod(&self, id: &str) -> Option<&Pod> {
        self.topology.pod(id)
    }

    /// Every pod.
    pub fn pods(&self) -> &[Pod] {
        &self.topology.pods
    }

    /// Every node.
    pub fn nodes(&self) -> &[Node] {
        &self.topology.nodes
    }

    /// The node called `name`. Panics if there is none (the topology is fixed).
    pub fn node(&self, name: &str) -> &Node {
        self.topology
            .node(name)
            .unwrap_or_else(|| panic!("the lab has no node {name:?}"))
    }

    /// A node's IP (its `eth0` on the wire).
    pub fn node_ip(&self, node: &str, family: Family) -> IpAddr {
        self.node(node).ip(family)
    }

    /// The outside host's IP.
    pub fn outside_ip(&self, family: Family) -> IpAddr {
        self.topology.outside.ip(family)
    }

    // ---- running things ----------------------------------------------------

    /// A command that runs `program` in `target`: `<ns>/<pod>` (the pod's netns
    /// and cgroup, like a container process), `node/<name>`, `outside` or `wire`.
    /// Add arguments, stdio and so on as usual before spawning.
    pub fn command(&self, target: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        self.command_in(&target.parse()?, program)
    }

    /// Like [`Self::command`], with a parsed target.
    pub fn command_in(&self, target: &Target, program: impl AsRef<OsStr>) -> Result<Command> {
        let placement = self.topology.resolve(target)?;
        let mut cmd = Command::new(program);
        enter::place(&mut cmd, &placement, EnterOptions::default())
            .with_context(|| format!("preparing a command for {target}"))?;
        Ok(cmd)
    }

    /// Run `f` on a thread inside `target`'s network namespace (not its cgroup) and
    /// return what it returns; sockets made there stay in that namespace.
    pub fn run_in<F, R>(&self, target: &str, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let placement = self.topology.resolve(&target.parse()?)?;
        netns::run_in(&placement.netns_path, f)
    }

    /// A `lab-app` command in `target` (built on first use with
    /// `cargo build -p warren-lab --bin lab-app`).
    pub fn lab_app(&self, target: &str) -> Result<Command> {
        let binary = cargo::build_bin("warren-lab", "lab-app")?;
        self.command(target, binary)
    }

    /// Start `lab-app serve --port <port> --mode <mode>` in `target` and wait until
    /// it listens. Port 0 picks a free port ([`AppServer::port`] tells which).
    pub fn serve(&self, target: &str, port: u16, mode: AppMode) -> Result<AppServer> {
        let mut cmd = self.lab_app(target)?;
        cmd.args([
            "serve",
            "--port",
            &port.to_string(),
            "--mode",
            mode.as_str(),
        ]);
        AppServer::start(cmd, target.to_string())
    }

    /// Start a UDP echo server (`lab-app serve --udp`) in `target`.
    pub fn serve_udp(&self, target: &str, port: u16) -> Result<AppServer> {
        let mut cmd = self.lab_app(target)?;
        cmd.args(["serve", "--udp", "--port", &port.to_string()]);
        AppServer::start(cmd, target.to_string())
    }

    /// Run `lab-app connect` from `target` to `addr` and return its report. An
    /// exchange that fails is `Ok` with `report.ok == false`; `Err` means the client
    /// could not be run at all.
    pub fn connect(
        &self,
        target: &str,
        addr: SocketAddr,
        mode: AppMode,
        bytes: u64,
    ) -> Result<ConnectReport> {
        self.connect_with(target, &ConnectOptions::tcp(addr, mode, bytes))
    }

    /// Run `lab-app connect` with every option.
    pub fn connect_with(&self, target: &str, options: &ConnectOptions) -> Result<ConnectReport> {
        self.connect_load(target, options, &LoadOptions::default())
    }

    /// Run `lab-app connect` with every option, and several connections or a paced
    /// stream as `load` says. A client told to hold ([`LoadOptions::hold`]) goes on at
    /// once here (its standard input is empty): to look at held connections, use
    /// [`Self::start_connect`].
    pub fn connect_load(
        &self,
        target: &str,
        options: &ConnectOptions,
        load: &LoadOptions,
    ) -> Result<ConnectReport> {
        let out = self
            .connect_command(target, options, load)?
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running lab-app connect in {target}"))?;
        app::parse_report(target, &out)
    }

    /// Start `lab-app connect` in `target` in the background; [`AppClient::wait`] gives
    /// its report. With [`LoadOptions::hold`] its connections stay open and idle until
    /// [`AppClient::release`].
    pub fn start_connect(
        &self,
        target: &str,
        options: &ConnectOptions,
        load: &LoadOptions,
    ) -> Result<AppClient> {
        let cmd = self.connect_command(target, options, load)?;
        AppClient::start(cmd, target.to_string())
    }

    fn connect_command(
        &self,
        target: &str,
        options: &ConnectOptions,
        load: &LoadOptions,
    ) -> Result<Command> {
        let mut cmd = self.lab_app(target)?;
        cmd.args(["connect", "--addr", &options.addr.to_string()])
            .args(["--mode", options.mode.as_str()])
            .args(["--bytes", &options.bytes.to_string()])
            .args([
                "--timeout-secs",
                &options.timeout.as_secs().max(1).to_string(),
            ]);
        if options.udp {
            cmd.arg("--udp");
        }
        if let Some(port) = options.source_port {
            cmd.args(["--source-port", &port.to_string()]);
        }
        if let Some(marker) = &options.marker {
            cmd.args(["--marker", marker]);
        }
        if load.parallel != 1 {
            cmd.args(["--parallel", &load.parallel.to_string()]);
        }
        if load.hold {
            cmd.arg("--hold");
        }
        if let Some(duration) = load.duration {
            cmd.args(["--duration-secs", &duration.as_secs_f64().to_string()]);
        }
        Ok(cmd)
    }

    // ---- agents --------------------------------------------------------------

    /// The pid of `node`'s agent, if it is running.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let state = self.state_or_cached();
        let pid = state.agents.get(node)?.pid.map(Pid::from_raw)?;
        process::is_agent(pid, node).then_some(pid.as_raw() as u32)
    }

    /// The `warren` binary the agents run; a fresh build when the lab runs none.
    pub fn warren_binary(&self) -> Result<PathBuf> {
        match self.read_state()?.agent_binary {
            Some(binary) => Ok(binary.path),
            None => crate::cargo::build_bin("warren", "warren"),
        }
    }

    /// Start capturing on the wire between the nodes (bridge `br0` in `wire`) with a
    /// tcpdump `filter` (e.g. `"tcp"`); stop it with [`Capture::stop`].
    pub fn capture(&self, filter: &str) -> Result<crate::Capture> {
        let cmd = self.command("wire", "tcpdump")?;
        crate::Capture::start(
            cmd,
            &self.dir.root().join("captures"),
            &self.topology.wire.bridge,
            filter,
        )
    }

    /// Enroll (`enrolled: true`) or remove a namespace from the mesh while the agents
    /// run, as labelling a namespace would in a cluster: `lab.yaml` is rewritten
    /// atomically and the agents reconcile within a couple of seconds. Returns whether
    /// anything changed. `state.json` follows (so `lab status` shows it); the
    /// [`Topology`] this `Lab` was loaded with does not.
    pub fn set_namespace_enrolled(&self, namespace: &str, enrolled: bool) -> Result<bool> {
        let lock = self.dir.lock()?;
        let mut state = self.read_state()?;
        let topology = &mut state.topology;
        if !topology.pods.iter().any(|p| p.namespace == namespace) {
            let mut known: Vec<&str> = topology.pods.iter().map(|p| p.namespace.as_str()).collect();
            known.sort_unstable();
            known.dedup();
            bail!(
                "the lab has no namespace {namespace:?}; namespaces: {}",
                known.join(", ")
            );
        }
        let already = topology.mesh_namespaces.iter().any(|n| n == namespace);
        if already == enrolled {
            return Ok(false);
        }
        if enrolled {
            topology.mesh_namespaces.push(namespace.to_owned());
        } else {
            topology.mesh_namespaces.retain(|n| n != namespace);
        }
        for pod in topology
            .pods
            .iter_mut()
            .filter(|p| p.namespace == namespace)
        {
            pod.enrolled = enrolled;
        }
        self.rewrite_config(&lock, state)?;
        Ok(true)
    }

    /// Declare `outside` a foreign HBONE workload (identity
    /// `spiffe://cluster.local/ns/outside/sa/default`), or take that back, while the agents
    /// run: enrolled pods then reach it through its port 15008 — whatever HBONE node
    /// runs there — and accept its tunnels as that identity. Returns whether anything
    /// changed.
    pub fn set_foreign_hbone(&self, foreign: bool) -> Result<bool> {
        let lock = self.dir.lock()?;
        let mut state = self.read_state()?;
        if state.topology.foreign_hbone == foreign {
            return Ok(false);
        }
        state.topology.foreign_hbone = foreign;
        self.rewrite_config(&lock, state)?;
        Ok(true)
    }

    /// Write `lab.yaml` for `state`'s topology atomically (the agents reconcile), then
    /// the state itself.
    fn rewrite_config(&self, lock: &LabLock, state: State) -> Result<()> {
        let topology = &state.topology;
        let path = self.dir.config();
        let tmp = path.with_extension("yaml.tmp");
        fs::write(&tmp, AgentConfig::for_topology(topology).to_yaml()?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        self.write(lock, state)
    }

    /// The directory of Istio policy YAML (PeerAuthentication, AuthorizationPolicy) every
    /// agent reads at start-up.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.policies()
    }

    /// Put the policy documents of `file` where every agent reads them (under the file's
    /// name, replacing an earlier apply of the same file), like `kubectl apply -f`: the
    /// file is decoded first with the agent's own decoder ([`crate::policy::validate`]),
    /// and one that does not decode is refused — with its file, line, column and reason
    /// — and nothing is placed. The agents reload within a couple of seconds.
    pub fn apply_policy(&self, file: &Path) -> Result<PathBuf> {
        let warren = self.warren_binary()?;
        crate::policy::apply(&warren, file, &self.dir.policies())
    }

    /// Put `file` where every agent reads them *without* decoding it first — as an
    /// editor or a configuration tool that bypasses `apply` would: for tests of the
    /// agents' own handling of a file that does not decode (logged with file and line;
    /// what it targets fails closed).
    pub fn place_policy_unchecked(&self, file: &Path) -> Result<PathBuf> {
        let target = crate::policy::target(&self.dir.policies(), file)?;
        crate::policy::place(file, &target)?;
        Ok(target)
    }

    /// Remove what [`Self::apply_policy`] put in place for `file`, like `kubectl delete -f`.
    pub fn delete_policy(&self, file: &Path) -> Result<PathBuf> {
        let target = crate::policy::target(&self.dir.policies(), file)?;
        fs::remove_file(&target).with_context(|| {
            format!(
                "{} was not applied ({} does not exist)",
                file.display(),
                target.display()
            )
        })?;
        Ok(target)
    }

    /// The lab's CA directory (Istio's plug-in CA layout), which signs the agents'
    /// workload certificates.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.ca()
    }

    /// The agent log of `node` (appended across restarts).
    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.dir.agent_log(node)
    }

    /// The current length of `node`'s agent log: remember it before an action, then
    /// read what the action logged with [`Self::agent_log_since`].
    pub fn agent_log_len(&self, node: &str) -> u64 {
        agent::log_len(&self.agent_log_path(node))
    }

    /// What `node`'s agent logged from byte `offset` on.
    pub fn agent_log_since(&self, node: &str, offset: u64) -> Result<String> {
        agent::read_from(&self.agent_log_path(node), offset)
    }

    /// Send `signal` to `node`'s agent and wait (up to 30 s) until it has exited; use
    /// a signal that ends it (SIGTERM for a clean stop, SIGKILL for a crash).
    pub fn kill_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let lock = self.dir.lock()?;
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("the agent of {node} is not running"))?;
        self.stop_agent_locked(&lock, node, Pid::from_raw(pid as i32), signal)
    }

    /// Start `node`'s agent (after [`Self::kill_agent`]) and wait until it is ready;
    /// returns its pid.
    pub fn start_agent(&self, node: &str) -> Result<u32> {
        self.start_stopped_agent(node, None, StartControl::Local(None))
    }

    /// Start the agent of `node` with `redirect` instead of the lab's own mode (to switch
    /// a node between modes); [`Self::start_agent`] goes back to the lab's mode.
    pub fn start_agent_with_redirect(&self, node: &str, redirect: RedirectMode) -> Result<u32> {
        self.start_stopped_agent(node, Some(redirect), StartControl::Local(None))
    }

    /// Start the agent of `node` in the lab's mode with its own `config` instead of
    /// `lab.yaml` (which every agent watches), to give one node a view of its own;
    /// [`Self::start_agent`] goes back to the lab's config.
    pub fn start_agent_with_config(&self, node: &str, config: &Path) -> Result<u32> {
        self.start_stopped_agent(node, None, StartControl::Local(Some(config)))
    }

    /// Start the agent of `node` in the lab's mode with `--control kubernetes`, against
    /// the API server that `kubeconfig` names, listening for `warren-cni` on
    /// [`Self::cni_socket`], with certificates from `remote_ca` when given (else the
    /// lab's CA); [`Self::start_agent`] goes back to the lab's config. Ready once it has
    /// listed the cluster and enrolled the pods it found.
    pub fn start_agent_kubernetes(
        &self,
        node: &str,
        kubeconfig: &Path,
        remote_ca: Option<&RemoteCa>,
    ) -> Result<u32> {
        let socket = self.cni_socket(node);
        self.start_stopped_agent(
            node,
            None,
            StartControl::Kubernetes {
                kubeconfig,
                cni_socket: &socket,
                remote_ca,
            },
        )
    }

    /// Start a node's agent that is not running: in `redirect` mode, else the lab's.
    /// Start the agent of `node` in the lab's mode with its stdout — the access log — into
    /// a pipe nobody reads: the returned read end, which the caller holds (and may drain)
    /// — a log shipper that stalled. Diagnostics still go to the agent's log file.
    /// [`Self::start_agent`] goes back to the usual log.
    pub fn start_agent_with_stalled_stdout(
        &self,
        node: &str,
    ) -> Result<(u32, std::os::fd::OwnedFd)> {
        let (read, write) = nix::unistd::pipe().context("making the stdout pipe")?;
        let pid =
            self.start_stopped_agent_with(node, None, StartControl::Local(None), Some(write))?;
        Ok((pid, read))
    }

    fn start_stopped_agent(
        &self,
        node: &str,
        redirect: Option<RedirectMode>,
        control: StartControl<'_>,
    ) -> Result<u32> {
        self.start_stopped_agent_with(node, redirect, control, None)
    }

    fn start_stopped_agent_with(
        &self,
        node: &str,
        redirect: Option<RedirectMode>,
        control: StartControl<'_>,
        stdout: Option<std::os::fd::OwnedFd>,
    ) -> Result<u32> {
        let LabMode::Agents(lab_redirect) = self.mode else {
            bail!("the lab is up without agents (mode no-agents); bring it up with agents to start one");
        };
        let lock = self.dir.lock()?;
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is already running (pid {pid}); kill it first");
        }
        self.start_agent_locked_with(
            &lock,
            node,
            redirect.unwrap_or(lab_redirect),
            control,
            stdout,
        )
    }

    /// Where `node`'s Kubernetes-mode agent listens for `warren-cni`.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.dir.cni_dir(node).join("cni.sock")
    }

    /// Call `warren-cni` for `pod` as a container runtime would when it makes
    /// (`ADD`) or removes (`DEL`) the pod's sandbox: `CNI_*` variables, and on stdin the
    /// plugin's config (talking to the socket of the pod's node) with the previous
    /// plugin's result holding the pod's addresses.
    pub fn cni(&self, command: &str, pod: &str) -> Result<CniRun> {
        let pod = self.pod(pod);
        let binary = crate::cargo::build_bin("warren", "warren-cni")?;
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "warren-cni",
            "socket": self.cni_socket(&pod.node),
            "excludeNamespaces": ["kube-system"],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
                "ips": [
                    {"address": format!("{}/24", pod.ipv4), "interface": 0},
                    {"address": format!("{}/64", pod.ipv6), "interface": 0},
                ],
            },
        });
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .env(
                "CNI_CONTAINERID",
                format!("lab-{}-{}", pod.namespace, pod.name),
            )
            .env("CNI_NETNS", &pod.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", binary.parent().unwrap_or(Path::new("/")))
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=lab-{}",
                    pod.namespace, pod.name, pod.name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        child
            .stdin
            .take()
            .context("warren-cni's stdin")?
            .write_all(config.to_string().as_bytes())
            .context("writing warren-cni's config")?;
        let output = child.wait_with_output().context("waiting for warren-cni")?;
        Ok(CniRun {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            prev_result: config["prevResult"].clone(),
        })
    }

    fn start_agent_locked(
        &self,
        lock: &LabLock,
        node_name: &str,
        redirect: RedirectMode,
        control: StartControl<'_>,
    ) -> Result<u32> {
        self.start_agent_locked_with(lock, node_name, redirect, control, None)
    }

    fn start_agent_locked_with(
        &self,
        lock: &LabLock,
        node_name: &str,
        redirect: RedirectMode,
        control: StartControl<'_>,
        stdout: Option<std::os::fd::OwnedFd>,
    ) -> Result<u32> {
        if !matches!(self.mode, LabMode::Agents(_)) {
            bail!("the lab is up without agents (mode no-agents); bring it up with agents to start one");
        }
        let node = self
            .topology
            .node(node_name)
            .with_context(|| format!("the lab has no node {node_name}"))?;
        let mut state = self.read_state()?;
        let binary = state.agent_binary.clone().context(
            "state.json records no agent binary; run `cargo xtask lab down` and up again",
        )?;
        let log = self.dir.agent_log(node_name);
        let (lab_config, policy_dir) = (self.dir.config(), self.dir.policies());
        eprintln!("lab: starting the agent of {node_name} (redirect {redirect})");
        let pid = agent::start(&Launch {
            binary: &binary.path,
            node,
            control: match control {
                StartControl::Local(config) => Control::Local {
                    config: config.unwrap_or(&lab_config),
                    policy_dir: &policy_dir,
                },
                StartControl::Kubernetes {
                    kubeconfig,
                    cni_socket,
                    remote_ca,
                } => Control::Kubernetes {
                    kubeconfig,
                    cni_socket,
                    remote_ca,
                },
            },
            redirect,
            ca_dir: &self.dir.ca(),
            log: &log,
            cert_lifetime: state.cert_lifetime,
            stdout: stdout.as_ref().map(std::os::fd::AsFd::as_fd),
        })?;
        eprintln!(
            "lab: the agent of {node_name} is ready (pid {pid}, log {})",
            log.display()
        );
        state.agents.insert(
            node_name.to_string(),
            AgentRecord {
                pid: Some(pid.as_raw()),
                log,
            },
        );
        self.write(lock, state)?;
        Ok(pid.as_raw() as u32)
    }

    fn stop_agent_locked(
        &self,
        lock: &LabLock,
        node: &str,
        pid: Pid,
        signal: Signal,
    ) -> Result<()> {
        process::signal(pid, signal)
            .with_context(|| format!("sending {signal} to the agent of {node} (pid {pid})"))?;
        if !process::wait_exit(pid, AGENT_EXIT_TIMEOUT) {
            bail!(
                "the agent of {node} (pid {pid}) still runs {}s after {signal}; see {}",
                AGENT_EXIT_TIMEOUT.as_secs(),
                self.agent_log_path(node).display()
            );
        }
        let mut state = self.read_state()?;
        if let Some(record) = state.agents.get_mut(node) {
            record.pid = None;
        }
        self.write(lock, state)
    }

    // ---- reporting -------------------------------------------------------------

    /// A human-readable account: mode, nodes, pods with addresses, agents.
    pub fn status(&self) -> String {
        let t = &self.topology;
        let state = self.state_or_cached();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lab is up, mode {} (runtime dir {})",
            self.mode,
            self.dir.root().display()
        );
        let _ = writeln!(
            s,
            "wire: netns {}, bridge {}",
            t.wire.netns_name, t.wire.bridge
        );
        let _ = writeln!(s, "nodes:");
        for n in &t.nodes {
            let _ = writeln!(
                s,
                "  {:<8} {:<15} {:<14} pods {} / {}  netns {}",
                n.name, n.ipv4, n.ipv6, n.pod_cidr_v4, n.pod_cidr_v6, n.netns_name
            );
        }
        let _ = writeln!(
            s,
            "  {:<8} {:<15} {:<14} (not in the mesh)  netns {}",
            "outside", t.outside.ipv4, t.outside.ipv6, t.outside.netns_name
        );
        let _ = writeln!(s, "pods:");
        for p in &t.pods {
            let _ = writeln!(
                s,
                "  {:<15} node {}  sa {:<8} {:<11} {:<15} {:<15} cgroup {}",
                p.id(),
                p.node,
                p.service_account,
                if p.enrolled { "mesh" } else { "not-in-mesh" },
                p.ipv4,
                p.ipv6,
                p.cgroup.display()
            );
        }
        let _ = writeln!(s, "agents:");
        if let LabMode::NoAgents = self.mode {
            let _ = writeln!(s, "  none (mode no-agents)");
        } else {
            for n in &t.nodes {
                let pid = state.agents.get(&n.name).and_then(|r| r.pid);
                let running = self.agent_pid(&n.name);
                let what = match (pid, running) {
                    (_, Some(pid)) => format!("pid {pid}, alive"),
                    (Some(pid), None) => format!("pid {pid}, NOT running"),
                    (None, None) => "not running".to_string(),
                };
                let _ = writeln!(
                    s,
                    "  {:<8} {what:<22} log {}",
                    n.name,
                    self.agent_log_path(&n.name).display()
                );
            }
            if let Some(binary) = &state.agent_binary {
                let _ = writeln!(s, "  binary {}", binary.path.display());
            }
            let _ = writeln!(
                s,
                "  certificate lifetime {}",
                describe_lifetime(state.cert_lifetime)
            );
        }
        let _ = write!(s, "agent config: {}", self.dir.config().display());
        s
    }

    /// `/run/warren-lab`.
    pub fn runtime_dir(&self) -> &Path {
        self.dir.root()
    }

    /// `lab.yaml`, the agents' config.
    pub fn config_path(&self) -> PathBuf {
        self.dir.config()
    }

    /// The agents' certificate lifetime (`--cert-lifetime`), when the lab was brought
    /// up with one; `None` means the agent's default (24 h), or no agents.
    pub fn cert_lifetime(&self) -> Option<Duration> {
        self.cert_lifetime
    }

    /// The redirect mode of the agents, if the lab has agents.
    pub fn redirect(&self) -> Option<RedirectMode> {
        match self.mode {
            LabMode::Agents(mode) => Some(mode),
            LabMode::NoAgents => None,
        }
    }
}

/// A certificate lifetime for messages.
fn describe_lifetime(lifetime: Option<Duration>) -> String {
    match lifetime {
        Some(lifetime) => format!("{lifetime:?}"),
        None => "the agent's default (24h)".to_string(),
    }
}

/// Whether anything of a lab exists although no `state.json` says so.
fn leftovers_exist(topology: &Topology) -> Result<bool> {
    Ok(!netns::list_lab()?.is_empty()
        || topology.lab_cgroup.exists()
        || cgroup::populated(&topology.lab_cgroup))
}

/// Build the agent and identify the binary (once per process: test threads that
/// each call [`Lab::up`] should not each hash it).
fn build_agent() -> Result<AgentBinary> {
    static BUILT: Mutex<Option<AgentBinary>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(binary) = built.as_ref() {
        return Ok(binary.clone());
    }
    eprintln!("lab: building the warren agent (cargo build -p warren)");
    let path = cargo::build_bin("warren", "warren").context(
        "building the warren agent failed; to use the lab without agents, bring it up with --no-agents",
    )?;
    let sha256 = sha256_file(&path)?;
    let binary = AgentBinary { path, sha256 };
    *built = Some(binary.clone());
    Ok(binary)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(app::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_can_be_shared_between_test_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Lab>();
        shareable::<AppServer>();
    }
}
