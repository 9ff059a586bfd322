//! End-to-end tests on the lab: real eBPF programs in the kernel, real network
//! namespaces, real agents.
//!
//! One lab (eBPF mode) is brought up for the whole run and torn down at the end, even when
//! tests fail or panic. Scenarios run one at a time: some restart agents.
//! These tests need root. Without it they fail — a skipped privileged test looks like a
//! pass.
mod bad_input;
mod capture;
mod encryption;
mod policy;
mod support;
mod traffic;
mod tunnel;
mod tunnel_refusals;

use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use warren_lab::{Lab, RedirectMode, UpOptions};

/// The agents' certificate lifetime for the whole run (`--cert-lifetime`). Renewed at
/// half-life, a 6 s certificate is replaced every ~3 s, so
/// `tunnel::long_stream_survives_certificate_renewals` sees three or four renewals per
/// identity during its 12 s stream without a lab of its own. Not shorter: each new
/// handshake anywhere in the suite gets a certificate with ~3 s of life left, which is
/// the time an agent on a loaded 2-core machine has to renew before handshakes would
/// fail as expired; and each renewal logs a line, which crowds the agent log tails
/// attached to failures. Not longer: the renewal scenario would need a longer stream.
const CERT_LIFETIME: Duration = Duration::from_secs(6);

type Scenario = fn(&Lab) -> anyhow::Result<()>;

fn scenarios() -> Vec<(&'static str, Scenario)> {
    let mut all = Vec::new();
    all.extend(traffic::SCENARIOS);
    all.extend(capture::SCENARIOS);
    all.extend(encryption::SCENARIOS);
    all.extend(tunnel::SCENARIOS);
    all.extend(tunnel_refusals::SCENARIOS);
    all.extend(policy::SCENARIOS);
    all.extend(bad_input::SCENARIOS);
    all
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let scenarios = scenarios();

    // --list and filters that select nothing must not build a lab.
    let selected = scenarios
        .iter()
        .any(|(name, _)| !args.is_filtered_out(&Trial::test(*name, || Ok(()))));
    if args.list || !selected {
        let trials = scenarios
            .iter()
            .map(|(name, _)| Trial::test(*name, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    if !nix::unistd::geteuid().is_root() {
        let trials = scenarios
            .iter()
            .map(|(name, _)| {
                Trial::test(*name, || {
                    Err(Failed::from(
                        "the end-to-end tests need root (network namespaces, eBPF); run `sudo -E cargo xtask test`",
                    ))
                })
            })
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let options = UpOptions::with_agents(RedirectMode::Ebpf).cert_lifetime(CERT_LIFETIME);
    let lab = match Lab::up(&options) {
        Ok(lab) => lab,
        Err(err) => {
            eprintln!("error: cannot bring the lab up: {err:#}");
            let _ = Lab::down();
            return std::process::ExitCode::FAILURE;
        }
    };
    let _teardown = support::Teardown;
    let lab: &'static Lab = Box::leak(Box::new(lab));
    let trials = scenarios
        .into_iter()
        .map(|(name, scenario)| {
            Trial::test(name, move || {
                scenario(lab).map_err(|err| {
                    Failed::from(format!("{err:#}\n{}", support::agent_log_tails(lab)))
                })
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
