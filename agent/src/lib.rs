//! warren: a sidecarless service-mesh data plane. One agent per node captures the TCP
//! traffic of every pod of an enrolled namespace (eBPF, or iptables as a fallback) and
//! carries it through userspace proxies that live inside each pod's network namespace.
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod agent;
pub mod blocking;
pub mod ca_service;
pub mod check;
pub mod cni;
pub mod config;
pub mod control;
pub mod enrollment;
pub mod host_sockets;
pub mod identity;
pub mod log_limit;
pub mod log_output;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod socket;
pub mod status;
pub mod tls;
pub mod uninstall;
pub mod verify;
pub mod workload;
