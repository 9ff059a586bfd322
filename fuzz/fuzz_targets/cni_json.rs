//! JSON on the CNI path: a request on the agent's socket (from warren-cni), and the
//! network config a runtime hands warren-cni on stdin.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<warren::cni::protocol::Request>(data);
    let _ = serde_json::from_slice::<warren::cni::protocol::Reply>(data);
    let _ = serde_json::from_slice::<warren::cni::plugin::NetConf>(data);
});
