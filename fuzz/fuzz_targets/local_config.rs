//! The local-mode config file (`--config`): workloads, services, mesh namespaces.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) =
        warren::control::local::LocalConfig::parse(&text, std::path::Path::new("fuzz.yaml"))
    {
        let _ = config.index();
    }
});
