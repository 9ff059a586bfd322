//! Starting processes inside the lab: in a namespace's network and, for pods and
//! agents, in their cgroup — the way a container runtime places a container.
//!
//! This is done in the child between fork and exec (`pre_exec`) rather than with
//! `ip netns exec`, which also unshares the mount namespace and remounts `/sys`,
//! hiding `/sys/fs/bpf` and the cgroup tree from the agent.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::topology::Placement;

/// Options for [`place`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EnterOptions {
    /// Start a new session (`setsid`), detaching from the caller's terminal and
    /// process group, as a daemon does.
    pub setsid: bool,
}

/// Make `cmd` run in `placement`'s network namespace and cgroup.
///
/// Files are opened here, in the parent, so that the child only makes
/// async-signal-safe system calls between fork and exec. Errors for a missing
/// namespace or cgroup are reported now, naming the path.
pub fn place(cmd: &mut Command, placement: &Placement, options: EnterOptions) -> Result<()> {
    let netns = File::open(&placement.netns_path).with_context(|| {
        format!(
            "opening netns {} (is the lab up? `cargo xtask lab up`)",
            placement.netns_path.display()
        )
    })?;
    let cgroup_procs = match &placement.cgroup {
        Some(cgroup) => Some(open_procs(cgroup)?),
        None => None,
    };
    let setsid = options.setsid;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), setns(2) and pwrite(2) on descriptors opened above; it allocates
    // nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if setsid {
                nix::unistd::setsid().map_err(io::Error::from)?;
            }
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            if let Some(procs) = &cgroup_procs {
                // "0" moves the writing process itself.
                nix::sys::uio::pwrite(procs, b"0", 0).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    Ok(())
}

fn open_procs(cgroup: &Path) -> Result<File> {
    let path = cgroup.join("cgroup.procs");
    OpenOptions::new().write(true).open(&path).with_context(|| {
        format!(
            "opening {} (is the lab up? `cargo xtask lab up`)",
            path.display()
        )
    })
}
