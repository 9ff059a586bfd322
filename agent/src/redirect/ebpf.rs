//! eBPF redirection: loads warren's kernel programs, attaches them, and keeps their maps.
//!
//! Layout under the pin directory (`<bpf-root>/<node>/`), so that a restarted agent
//! finds — and pods keep — everything while no agent runs:
//! - the maps, pinned by name (aya reuses a pinned map when it exists);
//! - `link_connect4`, `link_connect6`, `link_sock_ops`: the links at the cgroup v2 root;
//! - `link_sk_lookup_<netns cookie>`: one link per enrolled pod netns.
//!
//! A restarted (or upgraded) agent attaches fresh links first and only then replaces the
//! pinned ones, so there is no instant without redirection.
use std::{
    collections::HashSet,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, RawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{HashMap, MapData, MapError, SockHash},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
    },
    Ebpf, EbpfError as AyaLoadError, EbpfLoader,
};
use warren_common::{maps, programs, ClientKey, EnrolledNetns, IpKey, OwnIpKey, SockAddr};

/// The kernel programs, built by build.rs from the `warren-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warren-ebpf"));

const SK_LOOKUP_LINK_PREFIX: &str = "link_sk_lookup_";

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading warren's eBPF object failed: {0}")]
    Load(#[from] AyaLoadError),
    #[error("the eBPF object has no {kind} named {name} (build mismatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cannot open the cgroup v2 root {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("cannot pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("cannot start the eBPF log reader: {0}")]
    Logger(String),
}

/// What the agent needs to know to enroll one pod.
pub struct PodRedirect<'a> {
    pub netns: &'a crate::netns::Netns,
    pub netns_cookie: u64,
    pub ips: &'a [IpAddr],
    /// The pod's inbound-plaintext listener, already listening.
    pub inbound_listener: RawFd,
}

/// The loaded programs and the maps the control side writes.
pub struct EbpfRedirect {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledNetns>,
    pod_ips: HashMap<MapData, IpKey, u32>,
    listeners: SockHash<MapData, IpKey>,
    own_ips: HashMap<MapData, OwnIpKey, u32>,
}

/// The original-destination table, read by the outbound proxy on every accepted connection.
pub struct OriginalDstTable {
    map: Mutex<HashMap<MapData, ClientKey, SockAddr>>,
}

impl OriginalDstTable {
    /// Where the client at `peer` (as seen by `accept()` in the pod with `netns_cookie`)
    /// meant to connect. The entry is removed: each connection is looked up once.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ClientKey {
            netns_cookie,
            client: SockAddr::from(SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            _pad: 0,
        };
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found.into())
    }
}

impl EbpfRedirect {
    /// Load and attach the programs, reusing pinned maps and replacing pinned links.
    /// When this run created the pin directory (and the root above it) and fails, it
    /// removes them again, so a failed first start leaves nothing behind.
    pub fn install(
        pin_dir: &Path,
        cgroup_root: &Path,
    ) -> Result<(Self, OriginalDstTable), EbpfError> {
        // The directories this run creates (the node's, and the root above it on a
        // node's first start), innermost first.
        let created: Vec<PathBuf> = pin_dir
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let result = Self::load_and_attach(pin_dir, cgroup_root);
        if result.is_err() {
            if let Some(node_dir) = created.first() {
                let _ = std::fs::remove_dir_all(node_dir);
            }
            for parent in created.iter().skip(1) {
                let _ = std::fs::remove_dir(parent);
            }
        }
        result
    }

    fn load_and_attach(
        pin_dir: &Path,
        cgroup_root: &Path,
    ) -> Result<(Self, OriginalDstTable), EbpfError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)?;
        let cgroup = File::open(cgroup_root).map_err(|source| EbpfError::Cgroup {
            path: cgroup_root.to_owned(),
            source,
        })?;

        for name in [programs::CONNECT4, programs::CONNECT6] {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
            let id = program
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = program
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
            replace_pinned_link(link, &pin_dir.join(link_file_name(name)))?;
        }
        {
            let name = programs::SOCK_OPS;
            let program: &mut SockOps = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
            let id = program
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = program
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?;
            replace_pinned_link(link, &pin_dir.join(link_file_name(name)))?;
        }
        let name = programs::SK_LOOKUP;
        let sk_lookup: &mut SkLookup = program_mut(&mut ebpf, name)?;
        sk_lookup
            .load()
            .map_err(|source| EbpfError::Program { name, source })?;

        let original_dst = OriginalDstTable {
            map: Mutex::new(take_map(&mut ebpf, maps::ORIGINAL_DST)?),
        };
        let redirect = Self {
            pin_dir: pin_dir.to_owned(),
            enrolled: take_map(&mut ebpf, maps::ENROLLED_NETNS)?,
            pod_ips: take_map(&mut ebpf, maps::INBOUND_POD_IPS)?,
            listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            own_ips: take_map(&mut ebpf, maps::POD_OWN_IPS)?,
            ebpf,
        };
        Ok((redirect, original_dst))
    }

    /// The reader of the kernel programs' log messages (aya-log). Keep it alive: dropping it
    /// closes the log map.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, EbpfError> {
        aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|err| EbpfError::Logger(err.to_string()))
    }

    /// Capture `pod`: inbound first (listener, addresses, sk_lookup link), outbound last,
    /// so a pod never sends through the agent before it can receive through it.
    pub fn enroll(&mut self, pod: &PodRedirect<'_>) -> Result<(), EbpfError> {
        for ip in pod.ips {
            let key = IpKey::from(*ip);
            self.listeners
                .insert(key, pod.inbound_listener, 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::INBOUND_LISTENERS,
                    source,
                })?;
            self.pod_ips
                .insert(key, 0, 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::INBOUND_POD_IPS,
                    source,
                })?;
        }
        for ip in pod.ips {
            let key = OwnIpKey {
                netns_cookie: pod.netns_cookie,
                ip: IpKey::from(*ip),
            };
            self.own_ips
                .insert(key, 0, 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::POD_OWN_IPS,
                    source,
                })?;
        }
        let name = programs::SK_LOOKUP;
        let program: &mut SkLookup = program_mut(&mut self.ebpf, name)?;
        let id = program
            .attach(pod.netns.as_fd())
            .map_err(|source| EbpfError::Program { name, source })?;
        let link: FdLink = program
            .take_link(id)
            .map(FdLink::from)
            .map_err(|source| EbpfError::Program { name, source })?;
        replace_pinned_link(link, &self.sk_lookup_link_path(pod.netns_cookie))?;
        self.enrolled
            .insert(pod.netns_cookie, EnrolledNetns::default(), 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED_NETNS,
                source,
            })
    }

    /// Release a pod: outbound first, then inbound. Missing entries are not an error.
    pub fn unenroll(&mut self, netns_cookie: u64, ips: &[IpKey]) -> Result<(), EbpfError> {
        ignore_missing(self.enrolled.remove(&netns_cookie), maps::ENROLLED_NETNS)?;
        let own: Vec<OwnIpKey> = self
            .own_ips
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.netns_cookie == netns_cookie)
            .collect();
        for key in &own {
            ignore_missing(self.own_ips.remove(key), maps::POD_OWN_IPS)?;
        }
        let link = self.sk_lookup_link_path(netns_cookie);
        if link.exists() {
            std::fs::remove_file(&link).map_err(|err| EbpfError::Pin {
                path: link.clone(),
                reason: err.to_string(),
            })?;
        }
        for ip in ips {
            ignore_missing(self.pod_ips.remove(ip), maps::INBOUND_POD_IPS)?;
            ignore_missing(self.listeners.remove(ip), maps::INBOUND_LISTENERS)?;
        }
        Ok(())
    }

    /// Remove every trace of pods not in `keep` (pods that left while no agent ran).
    pub fn retain(&mut self, keep: &[PodRedirect<'_>]) -> Result<(), EbpfError> {
        let keep_cookies: HashSet<u64> = keep.iter().map(|p| p.netns_cookie).collect();
        let keep_ips: HashSet<IpKey> = keep
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| IpKey::from(*ip)))
            .collect();

        let mut stale_cookies: HashSet<u64> = self.enrolled.keys().filter_map(Result::ok).collect();
        stale_cookies.extend(
            self.own_ips
                .keys()
                .filter_map(Result::ok)
                .map(|key| key.netns_cookie),
        );
        for entry in std::fs::read_dir(&self.pin_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if let Some(cookie) = name
                .to_str()
                .and_then(|n| n.strip_prefix(SK_LOOKUP_LINK_PREFIX))
            {
                if let Ok(cookie) = cookie.parse() {
                    stale_cookies.insert(cookie);
                }
            }
        }
        stale_cookies.retain(|c| !keep_cookies.contains(c));
        let stale_ips: Vec<IpKey> = self
            .pod_ips
            .keys()
            .filter_map(Result::ok)
            .filter(|ip| !keep_ips.contains(ip))
            .collect();
        for cookie in &stale_cookies {
            tracing::info!(
                netns_cookie = cookie,
                "removing redirection of a pod that is gone"
            );
            self.unenroll(*cookie, &[])?;
        }
        self.unenroll(0, &stale_ips)
    }

    fn sk_lookup_link_path(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir
            .join(format!("{SK_LOOKUP_LINK_PREFIX}{netns_cookie}"))
    }
}

fn link_file_name(program: &str) -> String {
    format!("link_{}", program.trim_start_matches("warren_"))
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Pin `link` at `path`, replacing (and so detaching) a link pinned there before. The new
/// link is already attached, so the hook is never empty.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    let pin_error = |reason: String| EbpfError::Pin {
        path: path.to_owned(),
        reason,
    };
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => drop(old.unpin().map_err(|err| pin_error(err.to_string()))?),
            Err(_) => std::fs::remove_file(path).map_err(|err| pin_error(err.to_string()))?,
        }
    }
    link.pin(path)
        .map(drop)
        .map_err(|err| pin_error(err.to_string()))
}

fn ignore_missing(result: Result<(), MapError>, name: &'static str) -> Result<(), EbpfError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(source) => Err(EbpfError::Map { name, source }),
    }
}
