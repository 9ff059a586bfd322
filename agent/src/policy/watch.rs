//! Local mode: the policy file (or directory) is re-read when it changes, and the new set
//! replaces the old one atomically. A file that does not decode is refused with its error
//! (file, line, column) and the previous policy stays in force — a typo never opens or
//! closes the mesh by accident.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use super::{PolicyConfig, PolicySet};

/// How often the policy path is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The policy in force, shared by every connection handler and replaced on reload.
#[derive(Debug, Default)]
pub struct SharedPolicy {
    current: RwLock<PolicySet>,
}

impl SharedPolicy {
    pub fn new(policy: PolicySet) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(policy),
        })
    }

    /// The set in force now (a cheap clone: one Arc).
    pub fn current(&self) -> PolicySet {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, policy: PolicySet) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = policy;
    }
}

/// Watch `path` and reload `shared` whenever what it holds changes. Runs forever.
pub async fn watch(path: PathBuf, config: PolicyConfig, shared: Arc<SharedPolicy>) {
    let mut seen = fingerprint(&path);
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match PolicySet::load(config.clone(), &path) {
            Ok(policy) => {
                tracing::info!(
                    path = %path.display(),
                    peer_authentications = policy.peer_authentications().len(),
                    authorization_policies = policy.authorization_policies().len(),
                    "policy reloaded"
                );
                policy.log_warnings();
                shared.replace(policy);
            }
            Err(err) => tracing::error!(
                path = %path.display(),
                "policy not reloaded, the previous policy stays in force: {err}"
            ),
        }
    }
}

/// What the policy path holds: every candidate file's name and contents (the files are
/// small; comparing contents also catches edits within the same second).
fn fingerprint(path: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .into_iter()
        .map(|file| {
            let contents = std::fs::read(&file).unwrap_or_default();
            (file, contents)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

    #[tokio::test(start_paused = true)]
    async fn reloads_on_change_and_keeps_the_old_set_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedPolicy::new(PolicySet::default());
        tokio::spawn(watch(
            dir.path().to_owned(),
            PolicyConfig::default(),
            shared.clone(),
        ));
        tokio::time::sleep(POLL_INTERVAL / 2).await;

        std::fs::write(dir.path().join("strict.yaml"), STRICT).unwrap();
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert_eq!(shared.current().peer_authentications().len(), 1);

        std::fs::write(
            dir.path().join("bad.yaml"),
            "kind: PeerAuthentication\nspec: {mtls: {mod: STRICT}}\n",
        )
        .unwrap();
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert_eq!(
            shared.current().peer_authentications().len(),
            1,
            "a bad file must not replace the policy"
        );

        std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("strict.yaml")).unwrap();
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert!(shared.current().peer_authentications().is_empty());
    }
}
