//! `/run/warren-lab/`: the lab's record of itself (`state.json`), the agent config,
//! the agent logs, and the lock that keeps concurrent `up`/`down`/agent changes from
//! different threads or processes apart.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::options::LabMode;
use crate::topology::Topology;

/// The lab's runtime directory.
pub const RUNTIME_DIR: &str = "/run/warren-lab";
/// Bumped when `state.json`'s shape changes incompatibly.
const STATE_VERSION: u32 = 1;

/// Paths inside the runtime directory.
#[derive(Clone, Debug)]
pub struct RuntimeDir {
    root: PathBuf,
}

impl Default for RuntimeDir {
    fn default() -> Self {
        RuntimeDir {
            root: PathBuf::from(RUNTIME_DIR),
        }
    }
}

impl RuntimeDir {
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `state.json`.
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    /// `lab.yaml`, the agent config.
    pub fn config(&self) -> PathBuf {
        self.root.join("lab.yaml")
    }
    /// The directory of Istio policy YAML the agents read (`--policy`).
    pub fn policies(&self) -> PathBuf {
        self.root.join("policies")
    }
    /// The lab's certificate authority (`warren ca init`), shared by the agents.
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca")
    }
    /// `cni-<node>/`: the node's CNI socket (`cni.sock`) and the agent's cache beside it.
    pub fn cni_dir(&self, node: &str) -> PathBuf {
        self.root.join(format!("cni-{node}"))
    }
    /// `<node>.log`, the agent's stdout and stderr, appended across restarts.
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.log"))
    }
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.root.join("lab.lock")
    }

    /// Take the lab lock, creating the directory if needed. Held until the guard
    /// drops. `down` removes the directory (lock file included) while holding it, so
    /// a waiter re-checks that it locked the file that is still at the path.
    pub fn lock(&self) -> Result<LabLock> {
        loop {
            fs::create_dir_all(&self.root)
                .with_context(|| format!("creating {}", self.root.display()))?;
            let path = self.lock_file();
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening lock {}", path.display()))?;
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
            let locked = file.metadata().context("stat of the lab lock")?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {
                    return Ok(LabLock { _file: file })
                }
                // Removed (by `down`) while we waited: lock the new one.
                _ => continue,
            }
        }
    }

    /// Read `state.json`; `None` when no lab is recorded.
    pub fn read_state(&self) -> Result<Option<State>> {
        let path = self.state();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: State = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a lab state this version understands; run `cargo xtask lab down` and try again",
                path.display()
            )
        })?;
        if state.version != STATE_VERSION {
            bail!(
                "{} has version {} but this warren-lab writes {STATE_VERSION}; run `cargo xtask lab down` first",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Write `state.json` atomically (readers never see half a file). Call with the
    /// lock held.
    pub fn write_state(&self, _lock: &LabLock, state: &State) -> Result<()> {
        let path = self.state();
        let tmp = self.root.join("state.json.tmp");
        let text = serde_json::to_string_pretty(state).context("serialising lab state")?;
        fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }
}

/// Proof that the lab lock is held.
#[derive(Debug)]
pub struct LabLock {
    _file: File,
}

/// What `state.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// How the lab was brought up.
    pub mode: LabMode,
    /// The topology that was created.
    pub topology: Topology,
    /// The agents' `--cert-lifetime`; `None` for the agent's default (and without
    /// agents). Absent in the state of labs made before it was recorded, which ran
    /// with the default.
    #[serde(default)]
    pub cert_lifetime: Option<Duration>,
    /// The plug-in CA directory the lab's CA was copied from (`--cacerts`); `None` when
    /// the lab made its own.
    #[serde(default)]
    pub cacerts: Option<PathBuf>,
    /// The agent binary the agents run, to notice when it is rebuilt.
    pub agent_binary: Option<AgentBinary>,
    /// Agents by node name.
    pub agents: BTreeMap<String, AgentRecord>,
}

impl State {
    /// A fresh state for a lab being created.
    pub fn new(mode: LabMode, topology: Topology) -> State {
        State {
            version: STATE_VERSION,
            mode,
            topology,
            cert_lifetime: None,
            cacerts: None,
            agent_binary: None,
            agents: BTreeMap::new(),
        }
    }
}

/// Identity of a built agent binary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentBinary {
    /// Where it is.
    pub path: PathBuf,
    /// sha256 of its contents when the agents were started.
    pub sha256: String,
}

/// One node's agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRecord {
    /// Process id while it runs (as far as the lab knows).
    pub pid: Option<i32>,
    /// Its log file.
    pub log: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::RedirectMode;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("warren-lab-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn state_round_trips_and_lock_survives_removal() {
        let root = tempdir("state");
        let dir = RuntimeDir { root: root.clone() };
        assert!(dir.read_state().unwrap().is_none());
        let lock = dir.lock().unwrap();
        let mut state = State::new(
            LabMode::Agents(RedirectMode::Ebpf),
            Topology::standard(Path::new("/sys/fs/cgroup")),
        );
        state.cert_lifetime = Some(Duration::from_secs(6));
        state.agents.insert(
            "n1".into(),
            AgentRecord {
                pid: Some(42),
                log: dir.agent_log("n1"),
            },
        );
        dir.write_state(&lock, &state).unwrap();
        assert_eq!(dir.read_state().unwrap().unwrap(), state);
        // Removing the directory under the lock, as `down` does, lets the next
        // locker start afresh.
        fs::remove_dir_all(&root).unwrap();
        drop(lock);
        let again = dir.lock().unwrap();
        assert!(root.join("lab.lock").exists());
        drop(again);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn state_without_cert_lifetime_means_the_default() {
        let root = tempdir("no-lifetime");
        let dir = RuntimeDir { root: root.clone() };
        let lock = dir.lock().unwrap();
        let state = State::new(
            LabMode::Agents(RedirectMode::Ebpf),
            Topology::standard(Path::new("/sys/fs/cgroup")),
        );
        dir.write_state(&lock, &state).unwrap();
        // As written before the field existed.
        let mut json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.state()).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("cert_lifetime");
        fs::write(dir.state(), json.to_string()).unwrap();
        assert_eq!(dir.read_state().unwrap().unwrap().cert_lifetime, None);
        drop(lock);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn rejects_foreign_state() {
        let root = tempdir("foreign");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("state.json"), "{\"version\": 99}").unwrap();
        let err = RuntimeDir { root: root.clone() }.read_state().unwrap_err();
        assert!(format!("{err:#}").contains("lab down"), "{err:#}");
        fs::remove_dir_all(&root).unwrap();
    }
}
