//! `cargo xtask setup`: install what is missing, say what cannot be installed.
//!
//! The checks themselves live in `warren_lab::prereq`, so that `Lab::up` refuses
//! with the same words when something is missing.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use warren_lab::prereq::{self, Fix, Missing};

/// What a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The command-line tools (ip, iptables, nft, tcpdump, bpftool).
    Tools,
    /// The tools and the toolchain that builds the agent's eBPF programs.
    Everything,
    /// All of that, and what the tests use besides (the Python `h2` package of the
    /// HBONE interop tests, cargo-fuzz for the short fuzz runs).
    Tests,
    /// The toolchain and cargo-fuzz, for `cargo xtask fuzz`.
    Fuzz,
}

/// What `scope` needs and this machine lacks.
fn lacking(scope: Scope) -> Vec<Missing> {
    let mut missing = prereq::check_tools();
    if matches!(scope, Scope::Everything | Scope::Tests | Scope::Fuzz) {
        missing.extend(prereq::check_toolchain());
    }
    if scope == Scope::Tests {
        missing.extend(prereq::check_python());
    }
    if matches!(scope, Scope::Tests | Scope::Fuzz) {
        missing.extend(prereq::check_fuzz());
    }
    missing
}

/// Check, install what can be installed (printing each thing), and fail with the
/// commands to run by hand for the rest. Prints nothing when all is present.
pub fn ensure(scope: Scope) -> Result<()> {
    let missing = lacking(scope);
    if missing.is_empty() {
        return Ok(());
    }
    let root = nix::unistd::geteuid().is_root();
    let has_apt = prereq::find_program("apt-get").is_some();
    let mut cannot: Vec<Missing> = Vec::new();

    let packages: Vec<&str> = missing
        .iter()
        .filter_map(|m| match &m.fix {
            Fix::Apt(pkg) => Some(pkg.as_str()),
            _ => None,
        })
        .collect();
    if !packages.is_empty() {
        if root && has_apt {
            install_apt(&packages)?;
        } else {
            cannot.extend(
                missing
                    .iter()
                    .filter(|m| matches!(m.fix, Fix::Apt(_)))
                    .cloned(),
            );
        }
    }
    for item in missing.iter().filter(|m| !matches!(m.fix, Fix::Apt(_))) {
        let cmd = match &item.fix {
            Fix::RustupToolchain(toolchain) => {
                let mut c = Command::new("rustup");
                c.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
                c
            }
            Fix::RustupComponent {
                component,
                toolchain,
            } => {
                let mut c = Command::new("rustup");
                c.args(["component", "add", component, "--toolchain", toolchain]);
                c
            }
            Fix::CargoInstall { krate, version } => {
                // `cargo +nightly install`, spelled so that it works without the
                // rustup proxy on PATH: bpf-linker builds against nightly's LLVM.
                let mut c = Command::new("rustup");
                c.args([
                    "run",
                    "nightly",
                    "cargo",
                    "install",
                    &format!("{krate}@{version}"),
                    "--locked",
                ]);
                c
            }
            Fix::Pip { package, version } => {
                let mut c = Command::new("python3");
                c.args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--root-user-action=ignore",
                    &format!("{package}=={version}"),
                ]);
                c
            }
            Fix::Apt(_) => continue,
            Fix::Manual(_) => {
                cannot.push(item.clone());
                continue;
            }
        };
        install(&item.what, cmd, &item.fix.command())?;
    }
    if !cannot.is_empty() {
        let why = if !root {
            "not running as root"
        } else if !has_apt {
            "apt-get is not available"
        } else {
            "these need doing by hand"
        };
        bail!(
            "prerequisites missing ({why}):\n{}",
            prereq::describe(&cannot)
        );
    }
    // Whatever was installed must now be found, or the next build fails obscurely.
    let still = lacking(scope);
    if !still.is_empty() {
        bail!(
            "still missing after installing:\n{}",
            prereq::describe(&still)
        );
    }
    Ok(())
}

fn install_apt(packages: &[&str]) -> Result<()> {
    println!("setup: installing Debian packages: {}", packages.join(" "));
    let mut update = Command::new("apt-get");
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    install("the package lists", update, "apt-get update")?;
    let mut get = Command::new("apt-get");
    get.args(["install", "-y"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    install(
        &packages.join(" "),
        get,
        &format!("apt-get install -y {}", packages.join(" ")),
    )
}

/// Run an install command with its output shown; on failure, say how to retry.
fn install(what: &str, mut cmd: Command, shown: &str) -> Result<()> {
    println!("setup: installing {what}: {shown}");
    let status = cmd.status().with_context(|| format!("running `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status}) while installing {what}; check the network and run it yourself");
    }
    Ok(())
}
