//! The operator's proof, with tcpdump on the wire between the nodes: traffic between
//! enrolled pods crosses inside TLS, never in clear text — and, as a control (Cilium's
//! "this check might be broken" lesson), the same marker from a pod outside the mesh is
//! seen, so a capture that sees nothing cannot pass for encryption.
use anyhow::{ensure, Result};
use warren_lab::{AppMode, ConnectOptions, Family, Lab};

use crate::support::ensure_ok;

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[
    (
        "encryption::enrolled_pods_cross_the_wire_in_tls_ipv4",
        |lab| enrolled_is_encrypted(lab, Family::V4),
    ),
    (
        "encryption::enrolled_pods_cross_the_wire_in_tls_ipv6",
        |lab| enrolled_is_encrypted(lab, Family::V6),
    ),
    (
        "encryption::legacy_control_is_seen_in_clear_text",
        legacy_control,
    ),
];

fn send_marker(
    lab: &Lab,
    from: &str,
    family: Family,
    marker: &str,
) -> Result<(warren_lab::Captured, u16)> {
    let app = lab.serve("demo/server", 0, AppMode::Sha)?;
    let addr = lab.pod("demo/server").addr(family, app.port());
    let capture = lab.capture("tcp")?;
    let report = lab.connect_with(
        from,
        &ConnectOptions::tcp(addr, AppMode::Sha, 256 * 1024).with_marker(marker),
    )?;
    ensure_ok(&report, &format!("{from} → {addr} with a marker"))?;
    Ok((capture.stop()?, app.port()))
}

fn enrolled_is_encrypted(lab: &Lab, family: Family) -> Result<()> {
    let marker = format!("WARREN-E2E-MARKER-{family}-ENROLLED");
    let (captured, app_port) = send_marker(lab, "demo/client", family, &marker)?;
    ensure!(
        !captured.contains(marker.as_bytes()),
        "the marker crossed the wire in clear text ({})",
        captured.file.display()
    );
    let tunnel = captured.count(&format!("{} and tcp port 15008", ip(family)))?;
    ensure!(
        tunnel > 0,
        "no packets on the tunnel port 15008 ({})",
        captured.file.display()
    );
    let plain = captured.count(&format!("tcp port {app_port}"))?;
    ensure!(
        plain == 0,
        "{plain} packets to the app port {app_port} crossed the wire outside the tunnel"
    );
    if family == Family::V4 {
        ensure!(
            captured.tls_records()? > 0,
            "no TLS application-data records on port 15008"
        );
    }
    Ok(())
}

fn legacy_control(lab: &Lab) -> Result<()> {
    let marker = "WARREN-E2E-MARKER-LEGACY-CONTROL";
    let (captured, _) = send_marker(lab, "legacy/client", Family::V4, marker)?;
    ensure!(
        captured.contains(marker.as_bytes()),
        "the control's marker was not seen on the wire: the capture is broken, so the encryption checks prove nothing ({})",
        captured.file.display()
    );
    Ok(())
}

fn ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}
