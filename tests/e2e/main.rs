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
mod support;
mod traffic;
mod tunnel;
mod tunnel_refusals;

use libtest_mimic::{Arguments, Failed, Trial};
use warren_lab::{Lab, RedirectMode, UpOptions};

type Scenario = fn(&Lab) -> anyhow::Result<()>;

fn scenarios() -> Vec<(&'static str, Scenario)> {
    let mut all = Vec::new();
    all.extend(traffic::SCENARIOS);
    all.extend(capture::SCENARIOS);
    all.extend(encryption::SCENARIOS);
    all.extend(tunnel::SCENARIOS);
    all.extend(tunnel_refusals::SCENARIOS);
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

    let lab = match Lab::up(&UpOptions::with_agents(RedirectMode::Ebpf)) {
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
