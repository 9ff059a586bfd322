//! Building the workspace's binaries (the `warren` agent, `lab-app`) and finding
//! them, wherever the target directory is (`CARGO_TARGET_DIR`, `build.target-dir`):
//! cargo itself reports each executable's path in its JSON messages.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// The workspace this crate was built from (the parent of `lab/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lab/ has a parent directory")
        .to_path_buf()
}

/// A `cargo` command for this workspace: `$CARGO` when run under cargo (the same
/// toolchain), otherwise `cargo` from PATH, started in the workspace root.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    target: Option<MessageTarget>,
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct MessageTarget {
    name: String,
    kind: Vec<String>,
}

/// Find the executable of `bin` in cargo's `--message-format=json` output.
fn executable_from_messages(json_lines: &str, bin: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|line| serde_json::from_str::<Message>(line).ok())
        .filter(|m| m.reason == "compiler-artifact")
        .filter(|m| {
            m.target
                .as_ref()
                .is_some_and(|t| t.name == bin && t.kind.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m.executable)
}

static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Whether [`build_bin`] builds with `--release`: set once by a process that measures
/// speed (`cargo xtask bench`); tests and the lab build the debug profile.
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Build every binary of this process (the agent, lab-app) with `--release` from now on.
pub fn use_release_builds() {
    RELEASE.store(true, Ordering::SeqCst);
}

/// Build binary `bin` of `package` (debug profile, or release after
/// [`use_release_builds`]) and return its path. Compiler output goes to this process's
/// stderr. Each binary is built once per process.
pub fn build_bin(package: &str, bin: &str) -> Result<PathBuf> {
    let release = RELEASE.load(Ordering::SeqCst);
    let key = format!("{package}/{bin}/{release}");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(&key) {
        return Ok(path.clone());
    }
    let mut cmd = cargo();
    cmd.args(["build", "--package", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let shown = crate::netns::show(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running `{shown}` (is cargo installed?)"))?;
    let mut messages = String::new();
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        messages.push_str(&line.context("reading cargo's output")?);
        messages.push('\n');
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status}); the compiler output above says why");
    }
    let path = executable_from_messages(&messages, bin)
        .with_context(|| format!("`{shown}` succeeded but reported no executable for {bin}"))?;
    built
        .get_or_insert_with(HashMap::new)
        .insert(key, path.clone());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","package_id":"x","target":{"kind":["lib"],"name":"warren_lab"},"executable":null}
{"reason":"build-script-executed","package_id":"y"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"warren"},"executable":"/t/debug/warren"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"lab-app"},"executable":"/t/debug/lab-app"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages, "lab-app").unwrap(),
            Path::new("/t/debug/lab-app")
        );
        assert_eq!(
            executable_from_messages(messages, "warren").unwrap(),
            Path::new("/t/debug/warren")
        );
        assert_eq!(executable_from_messages(messages, "nope"), None);
    }

    #[test]
    fn knows_the_workspace() {
        assert!(workspace_root().join("Cargo.toml").exists());
        assert!(workspace_root().join("lab").is_dir());
    }
}
