//! End-to-end tests on the lab: real eBPF programs in the kernel, real network
//! namespaces, real agents.
//!
//! Every scenario runs in both redirect modes, as `ebpf::<scenario>` and
//! `iptables::<scenario>`: the same behaviour is expected of both. One lab per mode is
//! brought up when the first scenario of that mode runs and torn down when the other
//! mode's lab replaces it, or at the end — also when tests fail or panic. Scenarios run
//! one at a time: some restart agents.
//! These tests need root. Without it they fail — a skipped privileged test looks like a
//! pass.
mod abuse;
mod bad_input;
mod bypass;
mod capture;
mod encryption;
mod enrollment;
mod interop;
mod kubernetes;
mod observability;
mod plug_in_ca;
mod policy;
mod support;
mod traffic;
mod tunnel;
mod tunnel_refusals;
mod uninstall;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

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
    all.extend(interop::SCENARIOS);
    all.extend(policy::SCENARIOS);
    all.extend(bypass::SCENARIOS);
    all.extend(abuse::SCENARIOS);
    all.extend(observability::SCENARIOS);
    all.extend(enrollment::SCENARIOS);
    all.extend(kubernetes::SCENARIOS);
    all.extend(uninstall::SCENARIOS);
    all.extend(bad_input::SCENARIOS);
    all
}

/// The redirect modes the suite runs in, in order.
const MODES: [RedirectMode; 2] = [RedirectMode::Ebpf, RedirectMode::Iptables];

fn trial_name(mode: RedirectMode, scenario: &str) -> String {
    format!("{mode}::{scenario}")
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let names: Vec<(RedirectMode, &'static str, Scenario)> = MODES
        .into_iter()
        .flat_map(|mode| {
            scenarios()
                .into_iter()
                .map(move |(name, scenario)| (mode, name, scenario))
        })
        .collect();

    // --list and filters that select nothing must not build a lab.
    let selected = names.iter().any(|(mode, name, _)| {
        !args.is_filtered_out(&Trial::test(trial_name(*mode, name), || Ok(())))
    });
    if args.list || !selected {
        let trials = names
            .iter()
            .map(|(mode, name, _)| Trial::test(trial_name(*mode, name), || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    if !nix::unistd::geteuid().is_root() {
        let trials = names
            .iter()
            .map(|(mode, name, _)| {
                Trial::test(trial_name(*mode, name), || {
                    Err(Failed::from(
                        "the end-to-end tests need root (network namespaces, eBPF, iptables); run `sudo -E cargo xtask test`",
                    ))
                })
            })
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let _teardown = support::Teardown;
    let ca = match plug_in_ca::PlugInCa::create() {
        Ok(ca) => ca,
        Err(err) => {
            eprintln!("error: cannot make the suite's plug-in CA: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let labs = Arc::new(Labs {
        cacerts: ca.cacerts(),
        current: Mutex::default(),
    });
    let trials = names
        .into_iter()
        .map(|(mode, name, scenario)| {
            let labs = labs.clone();
            Trial::test(trial_name(mode, name), move || {
                let lab = labs.get(mode).map_err(Failed::from)?;
                scenario(&lab).map_err(|err| {
                    Failed::from(format!("{err:#}\n{}", support::agent_log_tails(&lab)))
                })
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// The lab of the mode the running scenarios need: brought up on first use, replaced
/// (the old one torn down first) when a scenario of the other mode comes.
struct Labs {
    /// The suite's plug-in CA (`plug_in_ca`), which every lab's agents use.
    cacerts: std::path::PathBuf,
    current: Mutex<Option<(RedirectMode, LabOrError)>>,
}

/// A lab that came up, or why it did not (so the mode's other scenarios fail fast).
type LabOrError = Result<Arc<Lab>, String>;

impl Labs {
    fn get(&self, mode: RedirectMode) -> LabOrError {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((up_mode, lab)) = current.as_ref() {
            if *up_mode == mode {
                return lab.clone();
            }
        }
        if current.take().is_some() {
            Lab::down().map_err(|err| format!("cannot tear the previous lab down: {err:#}"))?;
        }
        let options = UpOptions::with_agents(mode)
            .cert_lifetime(CERT_LIFETIME)
            .cacerts(&self.cacerts);
        let lab = Lab::up(&options).map(Arc::new).map_err(|err| {
            let _ = Lab::down();
            format!("cannot bring the lab up in {mode} mode: {err:#}")
        });
        *current = Some((mode, lab.clone()));
        lab
    }
}
