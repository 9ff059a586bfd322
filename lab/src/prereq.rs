//! What the machine needs for the lab and for building the agent, and how to get
//! each missing piece. Checking lives here so that `Lab::up` can refuse early with a
//! precise message; installing lives in `cargo xtask setup`.

use std::env;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mounts;

/// The bpf-linker line that works with the Rust toolchain's LLVM here (newer
/// releases want LLVM 23 and fail).
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// Command-line tools the lab and the tests use, with the Debian package of each.
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("tcpdump", "tcpdump"),
    ("bpftool", "bpftool"),
    ("openssl", "openssl"),
    ("iperf3", "iperf3"),
];

/// How to get something that is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// A Debian package.
    Apt(String),
    /// A rustup toolchain, installed with the minimal profile.
    RustupToolchain(String),
    /// A rustup component of a toolchain.
    RustupComponent {
        /// The component (`rust-src`).
        component: String,
        /// The toolchain (`nightly`).
        toolchain: String,
    },
    /// A crate binary installed with the nightly toolchain's cargo.
    CargoInstall {
        /// Crate name.
        krate: String,
        /// Exact version.
        version: String,
    },
    /// A Python package from PyPI, installed with `python3 -m pip`.
    Pip {
        /// Package name.
        package: String,
        /// Exact version.
        version: String,
    },
    /// Something a person has to do.
    Manual(String),
}

impl Fix {
    /// The command that fixes it, as a person would type it.
    pub fn command(&self) -> String {
        match self {
            Fix::Apt(pkg) => format!("apt-get update && apt-get install -y {pkg}"),
            Fix::RustupToolchain(tc) => format!("rustup toolchain install {tc} --profile minimal"),
            Fix::RustupComponent {
                component,
                toolchain,
            } => {
                format!("rustup component add {component} --toolchain {toolchain}")
            }
            Fix::CargoInstall { krate, version } => {
                format!("cargo +nightly install {krate}@{version} --locked")
            }
            Fix::Pip { package, version } => {
                format!("python3 -m pip install {package}=={version}")
            }
            Fix::Manual(what) => what.clone(),
        }
    }
}

/// One missing prerequisite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// What is missing, e.g. "tcpdump".
    pub what: String,
    /// Why it counts as missing (not found, wrong version, …).
    pub detail: String,
    /// How to get it.
    pub fix: Fix,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fix {
            Fix::Manual(what) => write!(f, "{} ({}): {what}", self.what, self.detail),
            fix => write!(f, "{} ({}): `{}`", self.what, self.detail, fix.command()),
        }
    }
}

/// A bullet list of missing things, for error messages.
pub fn describe(missing: &[Missing]) -> String {
    missing.iter().map(|m| format!("  - {m}\n")).collect()
}

/// Find an executable on PATH, also looking in the sbin directories that a
/// non-login root shell may leave out of PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Run a program and return its stdout if it succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command-line tools of [`TOOLS`] that are missing.
pub fn check_tools() -> Vec<Missing> {
    TOOLS
        .iter()
        .filter(|(program, _)| find_program(program).is_none())
        .map(|(program, package)| Missing {
            what: program.to_string(),
            detail: "not found on PATH".into(),
            fix: Fix::Apt(package.to_string()),
        })
        .collect()
}

/// Python packages the interop tests use: `h2`, an HTTP/2 implementation independent of
/// warren's, for HBONE clients and servers written in Python.
pub const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[("h2", "h2", "4.3.0")];

/// The Python packages of [`PYTHON_PACKAGES`] that `python3` cannot import.
pub fn check_python() -> Vec<Missing> {
    if find_program("python3").is_none() {
        return vec![Missing {
            what: "python3".into(),
            detail: "not found on PATH".into(),
            fix: Fix::Apt("python3".into()),
        }];
    }
    PYTHON_PACKAGES
        .iter()
        .filter(|(module, _, _)| output("python3", &["-c", &format!("import {module}")]).is_none())
        .map(|(module, package, version)| Missing {
            what: format!("Python module {module}"),
            detail: "python3 cannot import it".into(),
            fix: Fix::Pip {
                package: package.to_string(),
                version: version.to_string(),
            },
        })
        .collect()
}

/// The cargo-fuzz release `cargo xtask fuzz` runs the fuzz targets with.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz (`cargo fuzz`), for `cargo xtask fuzz` and the short fuzz runs of the tests.
pub fn check_fuzz() -> Vec<Missing> {
    if output("cargo", &["fuzz", "--version"]).is_some() {
        return Vec::new();
    }
    vec![Missing {
        what: "cargo-fuzz".into(),
        detail: "needed to run the fuzz targets (nightly, libFuzzer)".into(),
        fix: Fix::CargoInstall {
            krate: "cargo-fuzz".into(),
            version: CARGO_FUZZ_VERSION.into(),
        },
    }]
}

/// Whether `bpf-linker --version` output is of the supported release line.
pub fn bpf_linker_version_ok(version_output: &str) -> bool {
    let wanted = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map_or(BPF_LINKER_VERSION, |(line, _)| line);
    version_output
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with(&format!("{wanted}.")))
}

/// What building the agent's eBPF programs needs: nightly with rust-src (for
/// `-Z build-std`) and bpf-linker 0.10.
pub fn check_toolchain() -> Vec<Missing> {
    let mut missing = Vec::new();
    let Some(toolchains) = output("rustup", &["toolchain", "list"]) else {
        missing.push(Missing {
            what: "rustup".into(),
            detail: "not found or not working".into(),
            fix: Fix::Manual("install rustup (Debian package `rustup`, or from rustup.rs)".into()),
        });
        return missing;
    };
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        missing.push(Missing {
            what: "nightly toolchain".into(),
            detail: "needed to build the eBPF programs".into(),
            fix: Fix::RustupToolchain("nightly".into()),
        });
        missing.push(rust_src_missing());
    } else {
        let components = output(
            "rustup",
            &["component", "list", "--toolchain", "nightly", "--installed"],
        )
        .unwrap_or_default();
        if !components.lines().any(|l| l.trim().starts_with("rust-src")) {
            missing.push(rust_src_missing());
        }
    }
    let linker = Missing {
        what: "bpf-linker".into(),
        detail: String::new(),
        fix: Fix::CargoInstall {
            krate: "bpf-linker".into(),
            version: BPF_LINKER_VERSION.into(),
        },
    };
    match output("bpf-linker", &["--version"]) {
        Some(v) if bpf_linker_version_ok(&v) => {}
        Some(v) => missing.push(Missing {
            detail: format!(
                "found {}, need {BPF_LINKER_VERSION} (newer ones need LLVM 23)",
                v.trim()
            ),
            ..linker
        }),
        None => {
            let cargo_bin = env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .map(|home| home.join("bin"));
            match cargo_bin.filter(|bin| is_executable(&bin.join("bpf-linker"))) {
                Some(bin) => missing.push(Missing {
                    what: "bpf-linker on PATH".into(),
                    detail: format!("installed in {} but that is not on PATH", bin.display()),
                    fix: Fix::Manual(format!("export PATH=\"{}:$PATH\"", bin.display())),
                }),
                None => missing.push(Missing {
                    detail: "not installed".into(),
                    ..linker
                }),
            }
        }
    }
    missing
}

fn rust_src_missing() -> Missing {
    Missing {
        what: "rust-src for nightly".into(),
        detail: "needed for -Z build-std".into(),
        fix: Fix::RustupComponent {
            component: "rust-src".into(),
            toolchain: "nightly".into(),
        },
    }
}

/// What creating the lab needs: root, iproute2 and a cgroup2 mount.
pub fn check_lab() -> Vec<Missing> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push(Missing {
            what: "root".into(),
            detail: "the lab creates network namespaces and cgroups".into(),
            fix: Fix::Manual("run as root, e.g. `sudo -E cargo xtask lab up`".into()),
        });
    }
    if find_program("ip").is_none() {
        missing.push(Missing {
            what: "ip".into(),
            detail: "not found on PATH".into(),
            fix: Fix::Apt("iproute2".into()),
        });
    }
    if let Err(e) = mounts::cgroup2_mount() {
        missing.push(Missing {
            what: "cgroup v2".into(),
            detail: format!("{e:#}"),
            fix: Fix::Manual("mount -t cgroup2 none /sys/fs/cgroup/unified".into()),
        });
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_0_10_line_of_bpf_linker() {
        assert!(bpf_linker_version_ok("bpf-linker 0.10.0\n"));
        assert!(bpf_linker_version_ok("bpf-linker 0.10.3"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.11.0"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.1.0"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.100.0"));
        assert!(!bpf_linker_version_ok(""));
    }

    #[test]
    fn fixes_read_as_commands() {
        let fix = Fix::CargoInstall {
            krate: "bpf-linker".into(),
            version: "0.10.0".into(),
        };
        assert_eq!(
            fix.command(),
            "cargo +nightly install bpf-linker@0.10.0 --locked"
        );
        assert_eq!(
            Fix::RustupComponent {
                component: "rust-src".into(),
                toolchain: "nightly".into()
            }
            .command(),
            "rustup component add rust-src --toolchain nightly"
        );
        assert!(find_program("sh").is_some());
        assert!(find_program("surely-not-a-program-xyz").is_none());
    }
}
