//! Network namespaces: entering a pod's netns just long enough to create a socket there.
//!
//! A socket belongs for life to the netns it was created in, so the agent serves every pod
//! from one process: it switches the *current thread* into the pod's netns, creates the
//! socket, and switches back before doing anything else (ztunnel's `InpodNetns::run`).
//! The closure must not block or await.
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

    /// Run `f` on the current thread while it is inside this netns.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = HOME
            .get()
            .expect("Netns::init_home must be called at start-up");
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        if let Err(err) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stranded in a pod's netns would open later sockets in the
            // wrong place; there is no safe way to continue.
            eprintln!("fatal: cannot return to the agent's network namespace: {err}");
            std::process::abort();
        }
        Ok(out)
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
