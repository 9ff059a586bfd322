//! Bad input to `warren agent`: each gets one clear error naming the cause and the fix,
//! and leaves nothing behind (no pin directory, the running agents undisturbed).
use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use warren_lab::{AppMode, Family, Lab};

use crate::support::ensure_ok;

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    ("bad_input::unknown_flag", unknown_flag),
    (
        "bad_input::config_with_unknown_field",
        config_with_unknown_field,
    ),
    ("bad_input::config_names_missing_netns", missing_netns),
    ("bad_input::config_names_missing_cgroup", missing_cgroup),
    ("bad_input::not_root", not_root),
    ("bad_input::ca_dir_without_a_ca", ca_dir_without_a_ca),
    ("bad_input::kernel_without_bpf", kernel_without_bpf),
    (
        "bad_input::auto_without_sk_lookup_picks_iptables",
        auto_without_sk_lookup_picks_iptables,
    ),
    ("bad_input::ebpf_attach_failure", ebpf_attach_failure),
    (
        "bad_input::second_agent_for_a_node_is_refused",
        second_agent_for_a_node,
    ),
];

/// Where the failing agents would pin: must not exist afterwards.
const BAD_BPF_ROOT: &str = "/sys/fs/bpf/warren-e2e-bad";
const NODE: &str = "e2e-bad";

fn warren() -> Result<PathBuf> {
    warren_lab::cargo::build_bin("warren", "warren")
}

/// Run `warren agent` with `args` (plus a throwaway bpf root) and expect it to fail
/// with `code`, mentioning every one of `needles`, and leave no pin directory.
fn expect_failure(mut cmd: Command, code: i32, needles: &[&str]) -> Result<String> {
    let _ = std::fs::remove_dir_all(BAD_BPF_ROOT);
    let out: Output = cmd.output().context("running warren")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let leftover = Path::new(BAD_BPF_ROOT).exists();
    let _ = std::fs::remove_dir_all(BAD_BPF_ROOT);
    ensure!(
        out.status.code() == Some(code),
        "expected exit {code}, got {}; stderr:\n{stderr}",
        out.status
    );
    for needle in needles {
        ensure!(
            stderr.contains(needle),
            "the error should mention {needle:?}; stderr:\n{stderr}"
        );
    }
    ensure!(!leftover, "a failed start left {BAD_BPF_ROOT} behind");
    ensure!(!stderr.contains("panicked"), "warren panicked:\n{stderr}");
    Ok(stderr)
}

fn agent(lab: &Lab, config: &Path, extra: &[&str]) -> Result<Command> {
    let mut cmd = agent_args(Command::new(warren()?), NODE, config, extra);
    cmd.arg("--ca-dir").arg(lab.ca_dir());
    Ok(cmd)
}

/// `cmd` (a warren binary) + `agent --node <node> --bpf-root <BAD_BPF_ROOT> --config <config> <extra…>`,
/// with metrics, admin and readiness on ephemeral loopback ports (never a fixed port of
/// the host).
fn agent_args(mut cmd: Command, node: &str, config: &Path, extra: &[&str]) -> Command {
    cmd.args([
        "agent",
        "--node",
        node,
        "--bpf-root",
        BAD_BPF_ROOT,
        "--config",
    ])
    .arg(config)
    .args(extra)
    .env("RUST_LOG", "info");
    for flag in ["--metrics-addr", "--admin-addr", "--readiness-addr"] {
        if !extra.contains(&flag) {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    cmd
}

/// A config file in a directory anyone may read (for the not-root case).
fn config_file(yaml: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let path = dir.path().join("workloads.yaml");
    std::fs::write(&path, yaml)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok((dir, path))
}

fn workload_yaml(netns: &str, cgroup: Option<&str>) -> String {
    let cgroup = cgroup
        .map(|c| format!("\n  cgroup: {c}"))
        .unwrap_or_default();
    format!(
        "meshNamespaces: [demo]\nworkloads:\n- name: ghost\n  namespace: demo\n  node: {NODE}\n  ips: [\"10.77.9.9\"]\n  netns: {netns}{cgroup}\n"
    )
}

/// A config with no pod on this node: start-up reaches the kernel checks.
const EMPTY: &str = "meshNamespaces: [demo]\nworkloads: []\n";

fn unknown_flag(lab: &Lab) -> Result<()> {
    let (_dir, config) = config_file(EMPTY)?;
    expect_failure(
        agent(lab, &config, &["--bogus-flag"])?,
        2,
        &["--bogus-flag"],
    )?;
    Ok(())
}

fn config_with_unknown_field(lab: &Lab) -> Result<()> {
    let (_dir, config) = config_file("meshNamespace: [demo]\n")?;
    expect_failure(
        agent(lab, &config, &[])?,
        1,
        &["meshNamespace", &config.display().to_string()],
    )?;
    Ok(())
}

fn missing_netns(lab: &Lab) -> Result<()> {
    let (_dir, config) = config_file(&workload_yaml("/run/netns/warren-e2e-no-such-netns", None))?;
    expect_failure(
        agent(lab, &config, &[])?,
        1,
        &[
            "demo/ghost",
            "/run/netns/warren-e2e-no-such-netns",
            "does not exist",
            "netns",
        ],
    )?;
    Ok(())
}

fn missing_cgroup(lab: &Lab) -> Result<()> {
    let netns = lab.pod("demo/client").netns_path.display().to_string();
    let (_dir, config) = config_file(&workload_yaml(
        &netns,
        Some("/sys/fs/cgroup/warren-e2e-no-such-cgroup"),
    ))?;
    expect_failure(
        agent(lab, &config, &[])?,
        1,
        &[
            "demo/ghost",
            "/sys/fs/cgroup/warren-e2e-no-such-cgroup",
            "cgroup",
        ],
    )?;
    Ok(())
}

fn not_root(_: &Lab) -> Result<()> {
    // A copy of the binary anyone may run (the target directory may be private).
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let binary = dir.path().join("warren");
    std::fs::copy(warren()?, &binary)?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    let (_cfg_dir, config) = config_file(EMPTY)?;
    let mut cmd = agent_args(
        Command::new(&binary),
        NODE,
        &config,
        &["--ca-dir", "/nonexistent"],
    );
    cmd.uid(65534).gid(65534);
    expect_failure(cmd, 1, &["must run as root"])?;
    Ok(())
}

fn ca_dir_without_a_ca(_: &Lab) -> Result<()> {
    let (dir, config) = config_file(EMPTY)?;
    let mut cmd = agent_args(Command::new(warren()?), NODE, &config, &[]);
    cmd.arg("--ca-dir").arg(dir.path());
    expect_failure(
        cmd,
        1,
        &[&dir.path().display().to_string(), "warren ca init"],
    )?;
    Ok(())
}

/// eBPF mode on a kernel without the bpf() syscall stops with the missing feature and
/// the way out.
fn kernel_without_bpf(lab: &Lab) -> Result<()> {
    let (_dir, config) = config_file(EMPTY)?;
    expect_failure(
        agent(
            lab,
            &config,
            &["--redirect", "ebpf", "--probe-pretend-missing", "bpf"],
        )?,
        1,
        &["the bpf() syscall", "kernel", "--redirect iptables"],
    )?;
    Ok(())
}

/// `auto` on a kernel without sk_lookup runs with iptables, says so in one line naming
/// the missing feature, and pins nothing.
fn auto_without_sk_lookup_picks_iptables(lab: &Lab) -> Result<()> {
    let (_dir, config) = config_file(EMPTY)?;
    expect_iptables_fallback(
        agent(
            lab,
            &config,
            &["--redirect", "auto", "--probe-pretend-missing", "sk-lookup"],
        )?,
        "sk_lookup",
    )
}

/// The probe finds every feature, yet the programs cannot be attached (here: the cgroup
/// root given is no cgroup): `ebpf` stops with the reason and leaves no pin behind;
/// `auto` falls back to iptables and says why.
fn ebpf_attach_failure(lab: &Lab) -> Result<()> {
    let (dir, config) = config_file(EMPTY)?;
    let not_a_cgroup = dir.path().to_str().context("temp dir path")?.to_owned();
    expect_failure(
        agent(
            lab,
            &config,
            &["--redirect", "ebpf", "--cgroup-root", &not_a_cgroup],
        )?,
        1,
        &["eBPF program", "warren_connect4"],
    )?;
    expect_iptables_fallback(
        agent(
            lab,
            &config,
            &["--redirect", "auto", "--cgroup-root", &not_a_cgroup],
        )?,
        "could not be installed",
    )
}

/// Run the agent until it is ready; it must have chosen iptables with a log line
/// containing `because`, and pinned nothing.
fn expect_iptables_fallback(mut cmd: Command, because: &str) -> Result<()> {
    let _ = std::fs::remove_dir_all(BAD_BPF_ROOT);
    let seen = run_until_ready(&mut cmd)?;
    let log = seen.join("\n");
    ensure!(
        seen.iter()
            .any(|l| l.contains("redirect mode: iptables") && l.contains(because)),
        "a line should say the mode is iptables because of {because:?}:\n{log}"
    );
    ensure!(
        seen.iter()
            .any(|l| l.contains("mode=iptables") && l.contains("agent ready")),
        "the agent should report running in iptables mode:\n{log}"
    );
    let leftover = Path::new(BAD_BPF_ROOT).exists();
    let _ = std::fs::remove_dir_all(BAD_BPF_ROOT);
    ensure!(
        !leftover,
        "iptables mode left something under {BAD_BPF_ROOT}"
    );
    Ok(())
}

/// Start `cmd` (an agent), collect its stderr lines until it logs "agent ready" (20 s at
/// most), stop it, and return the lines.
fn run_until_ready(cmd: &mut Command) -> Result<Vec<String>> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting warren")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let ready = line.contains("agent ready");
                seen.push(line);
                if ready {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    ensure!(
        ready,
        "the agent did not get ready within 20 s; stderr:\n{}",
        seen.join("\n")
    );
    Ok(seen)
}

/// Starting a second agent for n1 fails on the busy ports before touching the kernel,
/// and n1's agent keeps serving.
fn second_agent_for_a_node(lab: &Lab) -> Result<()> {
    let in_node = lab.command("node/n1", warren()?)?;
    let mut cmd = agent_args(in_node, "n1", &lab.config_path(), &[]);
    cmd.arg("--ca-dir").arg(lab.ca_dir());
    expect_failure(
        cmd,
        1,
        &["port 15001 is already in use", "another warren agent"],
    )?;
    // With the node's metrics port (the first agent's) the busy port is that one.
    let in_node = lab.command("node/n1", warren()?)?;
    let mut cmd = agent_args(
        in_node,
        "n1",
        &lab.config_path(),
        &["--metrics-addr", "[::]:15020"],
    );
    cmd.arg("--ca-dir").arg(lab.ca_dir());
    expect_failure(
        cmd,
        1,
        &["cannot listen for metrics on [::]:15020", "another agent"],
    )?;
    let app = lab.serve("demo/server", 0, AppMode::Echo)?;
    let dst = lab.pod("demo/server").addr(Family::V4, app.port());
    ensure_ok(
        &lab.connect("demo/client", dst, AppMode::Echo, 1024)?,
        "n1 after a refused second agent",
    )
}
