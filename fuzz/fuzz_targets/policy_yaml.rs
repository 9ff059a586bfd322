//! A policy file (`--policy`, `warren check`, `warren policy validate`): Istio YAML as an
//! operator, a tool, or a half-finished write leaves it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let decoded = warren::policy::decode::decode_file(&text, std::path::Path::new("fuzz.yaml"));
    let _ = warren::policy::PolicySet::decoded(
        warren::policy::PolicyConfig::default(),
        decoded.policies,
        decoded.broken,
    );
});
