//! What the kernel offers for eBPF redirection, probed once at start-up.
use std::path::{Path, PathBuf};

use aya::programs::ProgramType;

/// A kernel feature eBPF redirection depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelFeature {
    /// The bpf() system call.
    Bpf,
    /// A mounted cgroup v2 hierarchy (the connect hooks attach at its root).
    CgroupV2,
    /// bpffs, to pin programs and maps so they outlive an agent restart.
    Bpffs,
    /// Kernel BTF (/sys/kernel/btf/vmlinux).
    Btf,
    /// cgroup sock_addr programs (connect4/connect6).
    CgroupSockAddr,
    /// sock_ops programs.
    SockOps,
    /// sk_lookup programs (Linux ≥ 5.9).
    SkLookup,
}

impl KernelFeature {
    fn name(self) -> &'static str {
        match self {
            Self::Bpf => "the bpf() syscall",
            Self::CgroupV2 => "a cgroup v2 mount",
            Self::Bpffs => "bpffs at /sys/fs/bpf",
            Self::Btf => "kernel BTF",
            Self::CgroupSockAddr => "cgroup sock_addr programs",
            Self::SockOps => "sock_ops programs",
            Self::SkLookup => "sk_lookup programs",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Missing {
    pub feature: KernelFeature,
    pub reason: String,
}

/// The result of probing.
#[derive(Debug, Clone, Default)]
pub struct KernelSupport {
    /// Where cgroup v2 is mounted, if it is.
    pub cgroup2_root: Option<PathBuf>,
    pub missing: Vec<Missing>,
}

impl KernelSupport {
    /// Probe the running kernel. `pretend_missing` is a diagnostic switch
    /// (`--probe-pretend-missing`) that reports features as absent, to exercise fallbacks.
    pub fn probe(bpffs: &Path, pretend_missing: &[KernelFeature]) -> Self {
        let mut support = KernelSupport {
            cgroup2_root: cgroup2_mount(),
            missing: Vec::new(),
        };
        let mut check = |feature: KernelFeature, result: Result<(), String>| {
            let result = if pretend_missing.contains(&feature) {
                Err("reported missing by --probe-pretend-missing".to_owned())
            } else {
                result
            };
            if let Err(reason) = result {
                support.missing.push(Missing { feature, reason });
            }
        };
        let program = |ty: ProgramType| match aya::sys::is_program_supported(ty) {
            Ok(true) => Ok(()),
            Ok(false) => Err("not supported by this kernel".to_owned()),
            Err(err) => Err(format!("probe failed: {err}")),
        };
        let bpf = program(ProgramType::SocketFilter);
        let bpf_ok = bpf.is_ok();
        check(KernelFeature::Bpf, bpf);
        check(
            KernelFeature::CgroupV2,
            cgroup2_mount()
                .map(|_| ())
                .ok_or_else(|| "no cgroup2 filesystem in /proc/self/mountinfo".to_owned()),
        );
        check(KernelFeature::Bpffs, is_bpffs(bpffs));
        check(
            KernelFeature::Btf,
            Path::new("/sys/kernel/btf/vmlinux")
                .exists()
                .then_some(())
                .ok_or_else(|| {
                    "/sys/kernel/btf/vmlinux is absent (CONFIG_DEBUG_INFO_BTF)".to_owned()
                }),
        );
        // Without the syscall the program probes only repeat the same failure.
        if bpf_ok {
            check(
                KernelFeature::CgroupSockAddr,
                program(ProgramType::CgroupSockAddr),
            );
            check(KernelFeature::SockOps, program(ProgramType::SockOps));
            check(KernelFeature::SkLookup, program(ProgramType::SkLookup));
        }
        support
    }

    /// "sk_lookup programs (not supported by this kernel), …", or None when complete.
    pub fn missing_summary(&self) -> Option<String> {
        if self.missing.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .missing
            .iter()
            .map(|m| format!("{} ({})", m.feature.name(), m.reason))
            .collect();
        Some(parts.join(", "))
    }
}

/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> Result<(), String> {
    match nix::sys::statfs::statfs(path) {
        Ok(fs) if fs.filesystem_type().0 == BPF_FS_MAGIC => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a bpffs mount (`mount -t bpf bpf {}`)",
            path.display(),
            path.display()
        )),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

/// The first cgroup2 mount point in /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&mountinfo)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // "36 25 0:31 / /sys/fs/cgroup/unified rw,nosuid,... shared:9 - cgroup2 cgroup2 rw"
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_hierarchy() {
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn pretend_missing_is_reported() {
        let support = KernelSupport::probe(Path::new("/sys/fs/bpf"), &[KernelFeature::SkLookup]);
        let summary = support
            .missing_summary()
            .expect("sk_lookup reported missing");
        assert!(
            summary.contains("sk_lookup programs (reported missing by --probe-pretend-missing)"),
            "{summary}"
        );
    }
}
