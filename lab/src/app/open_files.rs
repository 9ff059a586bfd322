//! The open-files limit (`RLIMIT_NOFILE`) of processes that hold thousands of
//! connections: the echo server and `lab-app bench hold`.

use anyhow::{Context as _, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raise the soft open-files limit to the hard one and return it. The usual soft limit
/// (1024) stops a server or client at about a thousand connections; the hard limit is
/// as far as a process may go without privileges, and as far as the lab goes without
/// changing the machine. The kernel caps the hard limit at `fs.nr_open`, so it is never
/// "unlimited" for this resource.
pub(crate) fn raise_open_files_limit() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).with_context(|| {
            format!("raising the soft RLIMIT_NOFILE from {soft} to the hard limit {hard}")
        })?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        let hard = raise_open_files_limit().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        // Idempotent: a second call finds nothing to raise.
        assert_eq!(raise_open_files_limit().unwrap(), hard);
    }
}
