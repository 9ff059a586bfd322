//! From capture bytes to the report, as `warren verify --pcap` prints it.
use std::{path::PathBuf, time::Duration};

use super::{
    read_capture,
    testing::{
        http_get, http_response, tls_conversation, Connection, Pcap, LINKTYPE_ETHERNET,
        LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
    },
    Outcome, Report, Source,
};
use crate::policy::model::IpBlock;

fn mesh(cidrs: &[&str]) -> Vec<IpBlock> {
    cidrs.iter().map(|c| c.parse().unwrap()).collect()
}

fn judge(bytes: &[u8], mesh: &[IpBlock]) -> Report {
    let capture = read_capture(bytes).expect("the capture reads");
    let source = Source::File {
        path: PathBuf::from("wire.pcap"),
        span: capture.span(),
    };
    capture.report(source, mesh, Vec::new())
}

/// The lab's demo: demo/client tunnels to demo/server three times (HBONE on 15008),
/// legacy/client calls demo/server in plain text.
fn lab_capture(link_type: u32) -> Vec<u8> {
    let mut pcap = Pcap::new(link_type);
    for port in [40000, 40001, 40002] {
        let (request, response) = tls_conversation(400_000, 1_000);
        let client = format!("10.77.1.10:{port}");
        pcap.ips(Connection::new(&client, "10.77.2.10:15008").exchange(&request, &response));
    }
    pcap.wait_us(9_000_000);
    pcap.ips(
        Connection::new("10.77.1.12:41000", "10.77.2.10:8080")
            .exchange(http_get(), &http_response(1 << 20)),
    );
    pcap.into_bytes()
}

#[test]
fn flags_clear_text_between_mesh_workloads() {
    let report = judge(&lab_capture(LINKTYPE_ETHERNET), &mesh(&["10.77.0.0/16"]));
    assert_eq!(report.outcome(), Outcome::ClearText);
    assert_eq!(report.flagged_flows(), 1);
    assert_eq!(
        report.to_string(),
        "warren verify: 10.6 s in wire.pcap, 1637 packets, 4 TCP flows\n\
         \x20 10.77.1.10 ↔ 10.77.2.10  3 flows  1.2 MiB  TLS        ports 15008\n\
         \x20 10.77.1.12 ↔ 10.77.2.10  1 flow   1.0 MiB  CLEAR TEXT ports 8080   ! both ends in the mesh\n\
         result: 1 clear-text flow between mesh workloads\n"
    );
}

#[test]
fn only_tls_between_mesh_workloads_is_encrypted() {
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    let (request, response) = tls_conversation(10_000, 10_000);
    pcap.ips(Connection::new("10.77.1.10:40000", "10.77.2.10:15008").exchange(&request, &response));
    // Clear text to a destination outside the mesh: reported, not flagged.
    pcap.ips(
        Connection::new("10.77.1.10:40001", "192.0.2.7:80")
            .exchange(http_get(), &http_response(10)),
    );
    // A refused connection: no data.
    pcap.ips(Connection::new("10.77.1.10:40002", "10.77.2.10:9999").handshake());
    let report = judge(&pcap.into_bytes(), &mesh(&["10.77.0.0/16"]));
    assert_eq!(report.outcome(), Outcome::Encrypted, "{report}");
    let text = report.to_string();
    assert!(
        text.contains("10.77.1.10 ↔ 192.0.2.7   1 flow  ")
            && text.contains("CLEAR TEXT ports 80   (192.0.2.7 is outside the mesh)\n"),
        "{text}"
    );
    assert!(text.contains("no data    ports 9999\n"), "{text}");
    assert!(
        text.ends_with(
            "result: encrypted: the 1 flow carrying data between mesh workloads used TLS\n"
        ),
        "{text}"
    );
}

#[test]
fn without_mesh_cidrs_all_clear_text_is_flagged() {
    let report = judge(&lab_capture(LINKTYPE_ETHERNET), &[]);
    assert_eq!(report.outcome(), Outcome::ClearText);
    let text = report.to_string();
    assert!(text.contains("ports 8080   ! clear text\n"), "{text}");
    assert!(
        text.ends_with(
            "result: 1 clear-text flow (without --mesh-cidr, all clear text is flagged)\n"
        ),
        "{text}"
    );
}

#[test]
fn ipv6_over_linux_cooked_captures() {
    for link_type in [LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2] {
        let mut pcap = Pcap::new(link_type);
        let (request, response) = tls_conversation(50_000, 50_000);
        pcap.ips(
            Connection::new("[fd00:77::1:10]:40000", "[fd00:77::2:10]:15008")
                .exchange(&request, &response),
        );
        let report = judge(&pcap.into_bytes(), &mesh(&["10.77.0.0/16", "fd00:77::/32"]));
        assert_eq!(report.outcome(), Outcome::Encrypted, "{report}");
        assert!(
            report
                .to_string()
                .contains("  fd00:77::1:10 ↔ fd00:77::2:10  1 flow  "),
            "{report}"
        );
    }
}

#[test]
fn no_payload_proves_nothing() {
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    pcap.ips(Connection::new("10.77.1.10:40000", "10.77.2.10:15008").handshake());
    let report = judge(&pcap.into_bytes(), &[]);
    assert_eq!(report.outcome(), Outcome::NoTraffic);
    assert!(
        report
            .to_string()
            .ends_with("result: no TCP payload seen in wire.pcap: nothing was proved encrypted\n"),
        "{report}"
    );

    // Payload, but none between mesh workloads.
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    let (request, response) = tls_conversation(100, 100);
    pcap.ips(Connection::new("192.0.2.1:40000", "192.0.2.2:443").exchange(&request, &response));
    let report = judge(&pcap.into_bytes(), &mesh(&["10.77.0.0/16"]));
    assert_eq!(report.outcome(), Outcome::NoTraffic);
    assert!(
        report.to_string().contains(
            "result: no TCP payload between mesh workloads (10.77.0.0/16) seen in wire.pcap"
        ),
        "{report}"
    );
}

#[test]
fn a_live_capture_names_its_interface_and_duration() {
    let capture = read_capture(&Pcap::new(LINKTYPE_ETHERNET).into_bytes()[..]).unwrap();
    let source = Source::Live {
        interface: "br0".into(),
        elapsed: Duration::from_millis(10_020),
        interrupted: false,
    };
    let text = capture.report(source, &[], Vec::new()).to_string();
    assert_eq!(
        text,
        "warren verify: 10.0 s on br0, 0 packets, 0 TCP flows\n\
         result: no TCP payload seen on br0 in 10.0 s: is traffic flowing, is this the right interface?\n"
    );
}

#[test]
fn notes_say_what_qualifies_the_result() {
    let mut pcap = Pcap::new(LINKTYPE_ETHERNET);
    // A connection the capture joined in the middle, in plain text.
    let mut conn = Connection::new("10.77.1.10:40000", "10.77.2.10:8080");
    pcap.ips(conn.client_sends(b"the middle of a body"));
    pcap.record(&[0u8; 8]); // not even an Ethernet header
    let mut bytes = pcap.into_bytes();
    let mut last = Pcap::new(LINKTYPE_ETHERNET);
    last.record(&[0u8; 100]);
    bytes.extend_from_slice(&last.into_bytes()[24..24 + 16 + 50]);
    let text = judge(&bytes, &mesh(&["10.77.0.0/16"])).to_string();
    for note in [
        "note: 1 flagged flow began before the capture and showed no TLS record header: if it is a long-lived TLS connection, capture again while new connections are made\n",
        "note: the capture ends inside packet 3 (66 of its 116 bytes): it was left out\n",
        "note: 1 packet(s) had headers that do not add up (cut short or corrupt) and were left out\n",
    ] {
        assert!(text.contains(note), "{note}\nnot in\n{text}");
    }
}
