//! The tunnel under load: pooled HBONE connections, certificate rotation.
use warren_lab::Lab;

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[];

#[allow(dead_code)]
fn unused(_: &Lab) {}
