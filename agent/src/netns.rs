//! Network namespaces: entering a pod's netns just long enough to create a socket there.
//!
//! A socket belongs for life to the netns it was created in, so the agent serves every pod
//! from one process: it switches the *current thread* into the pod's netns, creates the
//! socket, and switches back before doing anything else (ztunnel's `InpodNetns::run`).
//! `setns` moves the calling thread only, so that has to happen on one thread in one go:
//! the closure cannot await, and on a data-path worker it must not block either (work
//! that does, like reading a netns's addresses for the /proc search, runs on a blocking
//! thread: [`crate::blocking`]).
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{setns, CloneFlags};

/// The agent's own netns, captured once at start-up, to return to after each switch.
static HOME: OnceLock<File> = OnceLock::new();

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h); not exported by libc yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist or cannot be opened: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Remember the calling thread's netns as the agent's home. Call once, early, from the
    /// main thread.
    pub fn init_home() -> Result<(), NetnsError> {
        let home = Self::open("/proc/thread-self/ns/net")?;
        let _ = HOME.set(home.file);
        Ok(())
    }

    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        match File::open(&path) {
            Ok(file) => Ok(Self { file, path }),
            Err(source) => Err(NetnsError::Open { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the current thread while it is inside this netns. The thread returns to
    /// the agent's netns when `f` ends, even by a panic: tokio keeps a thread whose task
    /// panicked, and the next task on it must not open its sockets in this pod.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = HOME
            .get()
            .expect("Netns::init_home must be called at start-up");
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let _home = ReturnHome(home);
        Ok(f())
    }

    /// The kernel's cookie for this netns: what `bpf_get_netns_cookie()` returns for
    /// sockets inside it.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let err = |source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        };
        let socket = self
            .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))?
            .map_err(err)?;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd, and a u64-sized out buffer with its length.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(cookie)
    }
}

/// Takes the current thread back to the agent's netns when dropped.
struct ReturnHome(&'static File);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(err) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread stranded in a pod's netns would open later sockets in the wrong
            // place; there is no safe way to continue.
            eprintln!("fatal: cannot return to the agent's network namespace: {err}");
            std::process::abort();
        }
    }
}

/// The non-loopback addresses of the interfaces of the calling thread's netns (run it in
/// a pod's with [`Netns::run`]).
pub fn interface_addresses() -> nix::Result<Vec<std::net::IpAddr>> {
    use std::net::IpAddr;
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            let ip = match address.as_sockaddr_in() {
                Some(v4) => IpAddr::V4(v4.ip()),
                None => IpAddr::V6(address.as_sockaddr_in6()?.ip()),
            };
            (!ip.is_loopback()).then_some(ip.to_canonical())
        })
        .collect())
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn current_netns() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    /// Needs root (a network namespace of the test's own, gone when its file closes).
    #[test]
    fn the_thread_returns_home_even_when_the_closure_panics() {
        Netns::init_home().unwrap();
        let home = current_netns();
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (run as root)");
            Netns::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let other_inode = other.file.metadata().unwrap().ino();
        assert_ne!(other_inode, home);

        assert_eq!(other.run(current_netns).unwrap(), other_inode);
        assert_eq!(current_netns(), home);
        let panicked = std::panic::catch_unwind(|| other.run(|| panic!("inside the pod")));
        assert!(panicked.is_err());
        assert_eq!(current_netns(), home, "back home after the panic");
    }
}
