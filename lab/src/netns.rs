//! Network namespaces: creating and deleting them with iproute2, running `ip`
//! commands inside them, and running code on a thread that entered one.
//!
//! Everything here addresses a namespace by name or by its `/run/netns` handle; the
//! root namespace's links, routes and firewall are never touched (links are created
//! directly inside lab namespaces with `ip -n`).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sched::{setns, CloneFlags};
use nix::unistd::Pid;

use crate::topology::{NETNS_DIR, NETNS_PREFIX};

/// Run `ip [-n <netns>] <args…>`; on failure the error shows the command and ip's
/// stderr.
pub fn ip<I, S>(netns: Option<&str>, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run(&mut cmd)
}

/// Run a command to completion, returning its stdout, or an error naming the command
/// and carrying its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("running `{shown}` (is it installed? `cargo xtask setup` installs iproute2)")
    })?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a shell user would type it, for messages.
pub(crate) fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Create a named network namespace (`ip netns add`).
pub fn add(name: &str) -> Result<()> {
    ip(None, ["netns", "add", name]).map(drop)
}

/// Delete a named network namespace. The kernel frees it (and its veths, whose peers
/// go with them) once no process is left inside.
pub fn delete(name: &str) -> Result<()> {
    let handle = Path::new(NETNS_DIR).join(name);
    if ip(None, ["netns", "delete", name]).is_ok() {
        return Ok(());
    }
    // A handle left by an interrupted `ip netns add` may not be a mount: unmount what
    // is there, then remove the file.
    let _ = nix::mount::umount2(&handle, nix::mount::MntFlags::MNT_DETACH);
    match fs::remove_file(&handle) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing netns handle {}", handle.display())),
    }
}

/// Names of the existing network namespaces that belong to the lab (`warren-*`).
pub fn list_lab() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect();
    names.sort();
    Ok(names)
}

/// Processes whose (main thread's) network namespace is `name` (`ip netns pids`).
pub fn pids(name: &str) -> Vec<Pid> {
    ip(None, ["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .map(Pid::from_raw)
                .collect()
        })
        .unwrap_or_default()
}

/// Run `f` on a new thread that has entered the network namespace at `netns_path`,
/// and return its result. Sockets created inside `f` belong to that namespace for
/// life, so a test can build a socket in a pod and use it from anywhere.
pub fn run_in<F, R>(netns_path: &Path, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let handle = File::open(netns_path)
        .with_context(|| format!("opening netns {} (is the lab up?)", netns_path.display()))?;
    thread::scope(|scope| {
        scope
            .spawn(move || -> Result<R> {
                // Network namespaces are per thread: only this short-lived thread moves.
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering netns {}", netns_path.display()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread running in netns {} panicked", netns_path.display()))?
    })
}

/// Set a sysctl of the namespace at `netns_path`, e.g. `net/ipv4/ip_forward`.
/// `/proc/sys/net` shows the namespace of the thread that opens it, so this writes
/// from a thread inside the namespace.
pub fn sysctl(netns_path: &Path, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key);
    run_in(netns_path, || fs::write(&file, value))?.with_context(|| {
        format!(
            "setting {} = {value} in {}",
            file.display(),
            netns_path.display()
        )
    })
}
