//! Bad peers on the tunnel port 15008.
use warren_lab::Lab;

pub const SCENARIOS: &[(&str, crate::Scenario)] = &[];

#[allow(dead_code)]
fn unused(_: &Lab) {}
