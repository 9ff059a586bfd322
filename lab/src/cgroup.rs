//! The lab's cgroup v2 directories: one per pod (so the agent's cgroup eBPF hooks see
//! pods as in a real cluster) and one per agent (so the agent can exempt its own
//! sockets), all under `<cgroup2>/warren-lab/`.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::unistd::Pid;

/// Create a cgroup directory (and its parents).
pub fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// The processes in one cgroup (not its descendants). Empty if it does not exist.
pub fn procs(path: &Path) -> Vec<Pid> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether any process is in the cgroup or its descendants (`cgroup.events`).
pub fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|text| text.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// SIGKILL every process in the cgroup subtree (`cgroup.kill`, Linux ≥ 5.14) and
/// wait until the subtree is empty, so that it can be removed.
pub fn kill_all(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() || !populated(path) {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    fs::write(&kill, "1").with_context(|| {
        format!(
            "writing 1 to {} (cgroup.kill needs Linux 5.14 or newer)",
            kill.display()
        )
    })?;
    let deadline = Instant::now() + timeout;
    while populated(path) {
        if Instant::now() > deadline {
            bail!(
                "processes in {} survived SIGKILL for {:?} (stuck in uninterruptible sleep?); \
                 see `cat {}/cgroup.procs`",
                path.display(),
                timeout,
                path.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Remove a cgroup directory tree bottom-up (cgroup directories can only be removed
/// with `rmdir`, children first). Missing directories are fine.
pub fn remove_tree(path: &Path) -> Result<()> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    collect_dirs(path, &mut dirs)?;
    // Deepest first: a parent comes before its children in `dirs`.
    for dir in dirs.iter().rev() {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (is a process still in it? see its cgroup.procs)",
                        dir.display()
                    )
                })
            }
        }
    }
    Ok(())
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
    };
    out.push(path.to_path_buf());
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", path.display()))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_dirs(&entry.path(), out)?;
        }
    }
    Ok(())
}
