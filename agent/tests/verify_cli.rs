//! `warren verify --pcap` as an operator runs it: the built binary on capture files, its
//! output and exit status (0 all encrypted, 1 clear text flagged or nothing seen, 2
//! nothing could be read). No live capture here: that needs root and traffic (the lab).
use std::{
    path::Path,
    process::{Command, Output},
};

#[allow(dead_code)]
#[path = "../src/verify/testing.rs"]
mod testing;

use testing::{http_get, http_response, tls_conversation, Connection, Pcap, LINKTYPE_ETHERNET};

fn warren_verify(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("verify")
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("warren runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// demo/client → demo/server over HBONE, twice.
fn tls_only() -> Vec<u8> {
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    for port in [40000, 40001] {
        let (request, response) = tls_conversation(100_000, 2_000);
        let client = format!("10.77.1.10:{port}");
        pcap.ips(Connection::new(&client, "10.77.2.10:15008").exchange(&request, &response));
    }
    pcap.into_bytes()
}

/// The same, and legacy/client → demo/server in plain text.
fn with_legacy_client() -> Vec<u8> {
    let mut bytes = tls_only();
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    pcap.ips(
        Connection::new("10.77.1.12:41000", "10.77.2.10:8080")
            .exchange(http_get(), &http_response(100_000)),
    );
    bytes.extend_from_slice(&pcap.into_bytes()[24..]);
    bytes
}

#[test]
fn only_tls_between_mesh_workloads_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.pcap"), tls_only()).unwrap();
    let out = warren_verify(
        &["--pcap", "tls.pcap", "--mesh-cidr", "10.77.0.0/16"],
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("warren verify: "), "{stdout}");
    assert!(stdout.contains(" in tls.pcap, "), "{stdout}");
    assert!(
        stdout.contains("  10.77.1.10 ↔ 10.77.2.10  2 flows  ")
            && stdout.contains("TLS        ports 15008\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(
            "result: encrypted: all 2 flows carrying data between mesh workloads used TLS\n"
        ),
        "{stdout}"
    );
}

#[test]
fn clear_text_between_mesh_workloads_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wire.pcap"), with_legacy_client()).unwrap();
    // Repeated or comma-separated CIDRs.
    for cidrs in [
        &["--mesh-cidr", "10.77.1.0/24", "--mesh-cidr", "10.77.2.0/24"][..],
        &["--mesh-cidr", "10.77.1.0/24,10.77.2.0/24,fd00:77::/32"][..],
    ] {
        let mut args = vec!["--pcap", "wire.pcap"];
        args.extend_from_slice(cidrs);
        let out = warren_verify(&args, dir.path());
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
        assert!(stdout.contains("TLS        ports 15008\n"), "{stdout}");
        assert!(
            stdout.contains("  10.77.1.12 ↔ 10.77.2.10  1 flow   ")
                && stdout.contains("CLEAR TEXT ports 8080   ! both ends in the mesh\n"),
            "{stdout}"
        );
        assert!(
            stdout.ends_with("result: 1 clear-text flow between mesh workloads\n"),
            "{stdout}"
        );
    }

    // The legacy client outside the CIDRs: reported, not flagged.
    let out = warren_verify(
        &[
            "--pcap",
            "wire.pcap",
            "--mesh-cidr",
            "10.77.1.10/32,10.77.2.0/24",
        ],
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("(10.77.1.12 is outside the mesh)"),
        "{stdout}"
    );

    // No CIDR: all clear text is flagged.
    let out = warren_verify(&["--pcap", "wire.pcap"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
}

#[test]
fn no_payload_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    pcap.ips(Connection::new("10.77.1.10:40000", "10.77.2.10:15008").handshake());
    std::fs::write(dir.path().join("quiet.pcap"), pcap.into_bytes()).unwrap();
    let out = warren_verify(&["--pcap", "quiet.pcap"], dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("no data    ports 15008\n"), "{stdout}");
    assert!(
        stdout
            .ends_with("result: no TCP payload seen in quiet.pcap: nothing was proved encrypted\n"),
        "{stdout}"
    );
}

#[test]
fn unreadable_input_exits_2_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("garbage.pcap"), b"this is not a capture\n").unwrap();
    std::fs::write(
        dir.path().join("new.pcapng"),
        [0x0a, 0x0d, 0x0d, 0x0a, 0x1c, 0, 0, 0],
    )
    .unwrap();
    let mut cut = tls_only();
    cut.truncate(20);
    std::fs::write(dir.path().join("cut.pcap"), cut).unwrap();

    for (args, expected) in [
        (
            &["--pcap", "garbage.pcap"][..],
            "error: cannot read garbage.pcap: it is not a pcap capture: it starts with 74 68 69 73",
        ),
        (
            &["--pcap", "new.pcapng"][..],
            "error: cannot read new.pcapng: it is a pcapng capture",
        ),
        (
            &["--pcap", "cut.pcap"][..],
            "error: cannot read cut.pcap: it ends after 20 bytes, inside the 24-byte pcap header",
        ),
        (
            &["--pcap", "missing.pcap"][..],
            "error: cannot open missing.pcap: ",
        ),
        (
            &["--interface", "warren-nope0"][..],
            "error: no network interface \"warren-nope0\" here",
        ),
        (
            &["--pcap", "x", "--mesh-cidr", "10.77.0.0/33"][..],
            "prefix length of 33",
        ),
        (
            &["--pcap", "x", "--duration", "5s"][..],
            "cannot be used with",
        ),
        (
            &["--duration", "5s"][..],
            "--interface <IFACE>|--pcap <FILE>",
        ),
    ] {
        let out = warren_verify(args, dir.path());
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {stderr}{}",
            text(&out.stdout)
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            out.stdout.is_empty() || !text(&out.stdout).contains("result:"),
            "{args:?}"
        );
    }
}
