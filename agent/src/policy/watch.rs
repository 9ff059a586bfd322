//! Local mode: the policy file (or directory) is re-read every [`POLL_INTERVAL`], and
//! when what it holds changes the new set replaces the old one atomically.
//!
//! - **Per document, fail closed.** Every file is decoded document by document: good
//!   documents are in force as written, and one that does not decode is in the set as a
//!   [`super::BrokenPolicy`] — the workloads it may target are refused (AuthorizationPolicy)
//!   or STRICT (PeerAuthentication), never left open, and it is logged with its file,
//!   line and field. A bad file therefore freezes nothing: deleting or changing the other
//!   files takes effect as usual.
//! - **Only stable contents are applied.** A change is applied once the path reads the
//!   same (every file name and byte) on two consecutive polls, so a file caught empty or
//!   half-written by an editor or `cp` is never read as "no policy". A change therefore
//!   takes effect between one and two poll intervals (1–2 s) after it is written; a
//!   file that stays empty or broken for a whole interval is applied as such (empty: its
//!   policies are gone; broken: it fails closed).
//! - **An unreadable path** (the directory itself gone or not listable) keeps the policy
//!   in force, with an error logged.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use super::{PolicyConfig, PolicyError, PolicyFiles, PolicySet};

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

/// Read `path` and build the set: the start-up load. Also returns the files read, which
/// [`watch`] starts from.
pub fn load(config: PolicyConfig, path: &Path) -> Result<(PolicyFiles, PolicySet), PolicyError> {
    let files = PolicyFiles::read(path)?;
    let decoded = files.decode();
    Ok((
        files,
        PolicySet::decoded(config, decoded.policies, decoded.broken),
    ))
}

/// Watch `path` and reload `shared` whenever what it holds changes and has been stable
/// for one poll; `applied` is what `shared` was built from. Runs forever.
pub async fn watch(
    path: PathBuf,
    config: PolicyConfig,
    shared: Arc<SharedPolicy>,
    mut applied: PolicyFiles,
) {
    let mut pending: Option<PolicyFiles> = None;
    let mut read_failed = false;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        // A read of every file of the path: on a blocking thread, off the data path.
        let read = {
            let path = path.clone();
            crate::blocking::run(move || PolicyFiles::read(&path)).await
        };
        let now = match read {
            Ok(files) => files,
            Err(err) => {
                if !read_failed {
                    tracing::error!(path = %path.display(), "policy not reloaded, the policy in force stays: {err}");
                }
                read_failed = true;
                pending = None;
                continue;
            }
        };
        read_failed = false;
        if now == applied {
            pending = None;
            continue;
        }
        // Changed: applied only once it reads the same at the next poll.
        if pending.as_ref() != Some(&now) {
            pending = Some(now);
            continue;
        }
        pending = None;
        let decoded = now.decode();
        let policy = PolicySet::decoded(config.clone(), decoded.policies, decoded.broken);
        tracing::info!(
            path = %path.display(),
            peer_authentications = policy.peer_authentications().len(),
            authorization_policies = policy.authorization_policies().len(),
            not_decoding = policy.broken().len(),
            "policy reloaded"
        );
        policy.log_warnings();
        policy.log_broken();
        shared.replace(policy);
        applied = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        testing::{authz, peer_auth},
        ConnectionInfo, Decision, MtlsMode, PolicyKind,
    };
    use crate::workload::Workload;

    const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

    fn workload(namespace: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            name: "server".into(),
            service_account: "server".into(),
            labels: Default::default(),
            node: "n1".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            netns: PathBuf::new(),
            cgroup: None,
            in_mesh: true,
            foreign_hbone: false,
            owner: None,
        }
    }

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            source_ip: "10.0.0.1".parse().unwrap(),
            source_identity: None,
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8080,
        }
    }

    /// Watch a new directory, starting from what it holds.
    async fn watched() -> (tempfile::TempDir, Arc<SharedPolicy>) {
        let dir = tempfile::tempdir().unwrap();
        let (files, policy) = load(PolicyConfig::default(), dir.path()).unwrap();
        let shared = SharedPolicy::new(policy);
        tokio::spawn(watch(
            dir.path().to_owned(),
            PolicyConfig::default(),
            shared.clone(),
            files,
        ));
        // Polls happen at whole intervals; the test acts between them.
        tokio::time::sleep(POLL_INTERVAL / 2).await;
        (dir, shared)
    }

    /// Long enough for a change to be seen twice and applied.
    async fn settle() {
        tokio::time::sleep(POLL_INTERVAL * 2).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_file_fails_closed_and_freezes_nothing() {
        let (dir, shared) = watched().await;
        std::fs::write(dir.path().join("strict.yaml"), STRICT).unwrap();
        std::fs::write(
            dir.path().join("allow.yaml"),
            authz("other", "allow-all", "  rules: [{}]"),
        )
        .unwrap();
        settle().await;
        assert_eq!(shared.current().peer_authentications().len(), 1);
        assert_eq!(shared.current().authorization_policies().len(), 1);

        // A bad AuthorizationPolicy for namespace other: other is refused, demo is not.
        std::fs::write(
            dir.path().join("bad.yaml"),
            authz(
                "other",
                "typo",
                "  rules: [{from: [{source: {principal: [x]}}]}]",
            ),
        )
        .unwrap();
        settle().await;
        let policy = shared.current();
        assert_eq!(policy.broken().len(), 1);
        assert_eq!(
            policy.broken()[0].kind,
            Some(PolicyKind::AuthorizationPolicy)
        );
        assert_eq!(
            policy.authorization_policies().len(),
            1,
            "the good files stay"
        );
        let denied = policy.authorize(&workload("other"), &connection());
        assert!(
            matches!(&denied, Decision::Deny { policy, reason } if policy.is_unreadable() && reason.contains("principal")),
            "{denied:?}"
        );
        assert!(policy
            .authorize(&workload("demo"), &connection())
            .is_allow());

        // The bad file stays; the good files still change what is in force.
        std::fs::remove_file(dir.path().join("strict.yaml")).unwrap();
        settle().await;
        let policy = shared.current();
        assert!(
            policy.peer_authentications().is_empty(),
            "the deletion applies"
        );
        assert_eq!(
            policy.mtls_mode(&workload("demo"), 8080).0,
            MtlsMode::Permissive
        );
        assert_eq!(policy.broken().len(), 1);
        std::fs::write(
            dir.path().join("allow.yaml"),
            peer_auth("demo", "strict-again", "  mtls: {mode: STRICT}"),
        )
        .unwrap();
        settle().await;
        let policy = shared.current();
        assert!(policy.authorization_policies().is_empty());
        assert_eq!(
            policy.mtls_mode(&workload("demo"), 8080).0,
            MtlsMode::Strict
        );
        assert!(!policy
            .authorize(&workload("other"), &connection())
            .is_allow());

        // Fixed: the namespace is open again.
        std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
        settle().await;
        let policy = shared.current();
        assert!(policy.broken().is_empty());
        assert!(policy
            .authorize(&workload("other"), &connection())
            .is_allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_caught_empty_or_half_written_is_not_applied() {
        let (dir, shared) = watched().await;
        let file = dir.path().join("strict.yaml");
        std::fs::write(&file, STRICT).unwrap();
        settle().await;
        assert_eq!(shared.current().peer_authentications().len(), 1);

        // Truncated, then half written, then whole again — each seen by one poll only.
        let half = &STRICT[..STRICT.len() / 2];
        for contents in ["", half, STRICT] {
            std::fs::write(&file, contents).unwrap();
            tokio::time::sleep(POLL_INTERVAL).await;
            let policy = shared.current();
            assert_eq!(
                policy.peer_authentications().len(),
                1,
                "{contents:?} seen once is not applied"
            );
            assert!(policy.broken().is_empty(), "{contents:?}");
        }

        // Half written and left so: it fails closed for what it can be read to target.
        std::fs::write(&file, half).unwrap();
        settle().await;
        let policy = shared.current();
        assert!(policy.peer_authentications().is_empty());
        assert_eq!(policy.broken().len(), 1, "{:?}", policy.broken());
        assert_eq!(
            policy.mtls_mode(&workload("demo"), 8080).0,
            MtlsMode::Strict
        );

        // Emptied on purpose (stable): no policy.
        std::fs::write(&file, "").unwrap();
        settle().await;
        let policy = shared.current();
        assert!(policy.peer_authentications().is_empty() && policy.broken().is_empty());
        assert_eq!(
            policy.mtls_mode(&workload("demo"), 8080).0,
            MtlsMode::Permissive
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_path_keeps_the_policy_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("strict.yaml"), STRICT).unwrap();
        let (files, policy) = load(PolicyConfig::default(), &path).unwrap();
        let shared = SharedPolicy::new(policy);
        tokio::spawn(watch(
            path.clone(),
            PolicyConfig::default(),
            shared.clone(),
            files,
        ));
        tokio::time::sleep(POLL_INTERVAL / 2).await;
        std::fs::remove_dir_all(&path).unwrap();
        settle().await;
        assert_eq!(shared.current().peer_authentications().len(), 1);
    }

    /// A policy path whose read blocks (a FIFO here; a hung network mount in life) holds
    /// a blocking thread, not a worker: on a runtime of one worker, other tasks still run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_read_that_blocks_does_not_hold_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let shared = SharedPolicy::new(PolicySet::new(PolicyConfig::default(), []));
        // The first poll is at once: it opens the FIFO and waits for a writer.
        let watching = tokio::spawn(watch(
            path.clone(),
            PolicyConfig::default(),
            shared.clone(),
            PolicyFiles::default(),
        ));
        std::thread::sleep(Duration::from_millis(200));
        let (ran, other_task) = std::sync::mpsc::channel();
        tokio::spawn(async move { ran.send(()).unwrap() });
        let other_task_ran = other_task.recv_timeout(Duration::from_secs(2)).is_ok();

        // Unblock the read, and leave a plain file for the polls to come.
        std::fs::write(&path, STRICT).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, STRICT).unwrap();
        assert!(other_task_ran, "a task waited for the policy read");
        watching.abort();
    }
}
