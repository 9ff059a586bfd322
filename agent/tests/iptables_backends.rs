//! iptables redirection with both backends, in a network namespace of the test's own:
//! the rules warren writes, that writing them twice changes nothing, and that removal
//! leaves nothing — with iptables-nft and with iptables-legacy. (Traffic through the
//! rules is exercised on the lab by the end-to-end suite in iptables mode.)
//!
//! Needs root, like the end-to-end tests; without it the test fails saying so.
use std::process::Command;

use warren::{
    netns::Netns,
    redirect::iptables::{self, Backend, IptablesRedirect},
};

/// A netns that exists for the test and is deleted when dropped, even on panic.
struct TestNetns(String);

impl TestNetns {
    fn create(tag: &str) -> Self {
        let name = format!("warren-test-{tag}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(status.success(), "ip netns add {name} failed");
        Self(name)
    }

    fn open(&self) -> Netns {
        Netns::open(format!("/run/netns/{}", self.0)).expect("opening the test netns")
    }

    /// The `-A` rules of the nat table, for both families, as `backend`'s tools show them.
    fn rules(&self, backend: &str) -> Vec<String> {
        let mut rules = Vec::new();
        for tool in ["iptables", "ip6tables"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.0])
                .arg(format!("{tool}-{backend}-save"))
                .args(["-t", "nat"])
                .output()
                .expect("running iptables-save");
            assert!(out.status.success(), "{tool}-{backend}-save failed");
            rules.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(|l| format!("{tool}: {l}")),
            );
        }
        rules
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test writes iptables rules in a network namespace it creates: run it as root (`sudo -E cargo xtask test`)"
    );
}

fn writes_and_removes(backend: Backend, name: &str, other: &str) {
    require_root();
    let ns = TestNetns::create(name);
    let netns = ns.open();
    let redirect = IptablesRedirect::new(backend);

    redirect.enroll(&netns).expect("writing the rules");
    let rules = ns.rules(name);
    for expected in [
        "iptables: -A OUTPUT -p tcp -j WARREN_OUTPUT",
        "iptables: -A PREROUTING -p tcp -j WARREN_PREROUTING",
        "iptables: -A WARREN_OUTPUT -m mark --mark 0x539 -j RETURN",
        "iptables: -A WARREN_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "iptables: -A WARREN_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        "ip6tables: -A WARREN_PREROUTING -p tcp -j REDIRECT --to-ports 15006",
        "ip6tables: -A WARREN_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(
            rules.iter().any(|r| r == expected),
            "missing {expected:?} in {rules:#?}"
        );
    }
    assert!(
        ns.rules(other).is_empty(),
        "the {other} backend got rules too"
    );
    assert!(iptables::has_rules(&netns).unwrap());

    // A restarted agent writes the pod again: the same rules, no duplicated jumps.
    redirect.enroll(&netns).expect("writing the rules again");
    assert_eq!(ns.rules(name), rules, "writing twice changed the rules");

    assert!(iptables::remove(&netns).expect("removing the rules") > 0);
    assert!(
        ns.rules(name).is_empty(),
        "rules left: {:#?}",
        ns.rules(name)
    );
    assert!(!iptables::has_rules(&netns).unwrap());
    assert_eq!(
        iptables::remove(&netns).expect("removing again"),
        0,
        "a second removal should find nothing"
    );
}

#[test]
fn nft_backend_writes_and_removes_rules() {
    writes_and_removes(Backend::Nft, "nft", "legacy");
}

#[test]
fn legacy_backend_writes_and_removes_rules() {
    writes_and_removes(Backend::Legacy, "legacy", "nft");
}
