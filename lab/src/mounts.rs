//! Reading `/proc/self/mountinfo`: where cgroup2 is mounted, whether bpffs is.
//!
//! The cgroup2 mount point differs between hosts (`/sys/fs/cgroup/unified` on hybrid
//! v1+v2 hosts like this one, `/sys/fs/cgroup` on pure v2 hosts), so the lab looks it
//! up instead of assuming.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// Where bpffs must be mounted for the agent's pins.
pub const BPFFS: &str = "/sys/fs/bpf";

/// One line of mountinfo (only the fields the lab needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Root of the mount within its filesystem (field 4).
    pub root: String,
    /// Mount point (field 5), unescaped.
    pub mount_point: PathBuf,
    /// Filesystem type (first field after the `-` separator).
    pub fs_type: String,
}

/// Parse the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let fs_type = right.split(' ').next()?;
            if left.len() < 5 || fs_type.is_empty() {
                return None;
            }
            Some(Mount {
                root: unescape(left[3]),
                mount_point: PathBuf::from(unescape(left[4])),
                fs_type: fs_type.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pick the cgroup2 mount from parsed mountinfo: a mount of the hierarchy's root,
/// preferring the conventional locations.
pub fn find_cgroup2(mounts: &[Mount]) -> Option<PathBuf> {
    let candidates: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2" && m.root == "/")
        .collect();
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = candidates
            .iter()
            .find(|m| m.mount_point == Path::new(preferred))
        {
            return Some(m.mount_point.clone());
        }
    }
    candidates.first().map(|m| m.mount_point.clone())
}

/// Read this process's mount table.
pub fn read() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
    Ok(parse_mountinfo(&text))
}

/// The mount point of the cgroup v2 hierarchy, which pods and agents are placed in
/// (the agent's eBPF cgroup programs attach there).
pub fn cgroup2_mount() -> Result<PathBuf> {
    match find_cgroup2(&read()?) {
        Some(path) => Ok(path),
        None => bail!(
            "no cgroup2 filesystem is mounted; the lab needs cgroup v2 for pod cgroups. \
             Mount it with `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
        ),
    }
}

/// Whether bpffs is mounted at [`BPFFS`].
pub fn bpffs_mounted() -> Result<bool> {
    Ok(read()?
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == Path::new(BPFFS)))
}

/// Mount bpffs at [`BPFFS`] unless it already is: the agent pins its eBPF programs
/// and maps there so they survive agent restarts. Returns whether it mounted.
pub fn ensure_bpffs() -> Result<bool> {
    if bpffs_mounted()? {
        return Ok(false);
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {BPFFS} (`mount -t bpf bpf {BPFFS}`)"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
40 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            find_cgroup2(&mounts).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        assert!(mounts
            .iter()
            .any(|m| m.fs_type == "bpf" && m.mount_point == Path::new(BPFFS)));
    }

    #[test]
    fn prefers_pure_v2_location_and_whole_hierarchy() {
        let text = "\
50 1 0:40 /some/sub /mnt/nested rw - cgroup2 cgroup2 rw
51 1 0:40 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw
52 1 0:40 / /mnt/other rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(&parse_mountinfo(text)).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
        let only_sub = "50 1 0:40 /some/sub /mnt/nested rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(&parse_mountinfo(only_sub)), None);
        assert_eq!(find_cgroup2(&parse_mountinfo("")), None);
    }

    #[test]
    fn unescapes_mount_points_and_skips_garbage() {
        let text = "60 1 0:50 / /mnt/with\\040space rw master:3 shared:5 - cgroup2 none rw\nnot a mountinfo line\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(find_cgroup2(&mounts).unwrap(), Path::new("/mnt/with space"));
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}
