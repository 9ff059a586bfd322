//! Where the agent learns workloads and mesh membership from.
//!
//! Only the local file source exists so far; the Kubernetes source will feed the same model.
pub mod local;
