//! Where the agent learns workloads and mesh membership from.
//!
//! Two sources feed one model (workloads, enrolled namespaces, policies): a local YAML
//! file ([`local`]) and the Kubernetes API server ([`kubernetes`]).
pub mod kubernetes;
pub mod local;
