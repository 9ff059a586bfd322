//! The warren lab: a Kubernetes cluster simulated with network namespaces and
//! cgroups, for the demo and the end-to-end tests.
//!
//! ```text
//!                      netns warren-wire (bridge br0)
//!        ┌──────────────────────┼───────────────────────┐
//!   warren-n1 .11          warren-n2 .12          warren-outside .100
//!   cni0 10.77.1.1         cni0 10.77.2.1         (not in the mesh)
//!   ├ demo/client   .10    └ demo/server .10
//!   ├ demo/peer     .11
//!   └ legacy/client .12    wire 192.168.77.0/24 + fd00:77::/64,
//!                          pods 10.77.<n>.0/24 + fd00:77:<n>::/64
//! ```
//! Namespace `demo` is in the mesh, `legacy` is not. Each pod has its own netns and
//! cgroup; each node runs one `warren agent` in its netns and its own cgroup.
//!
//! A test typically does:
//! ```no_run
//! use warren_lab::{AppMode, Family, Lab, RedirectMode, UpOptions};
//!
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::up(&UpOptions::with_agents(RedirectMode::Ebpf))?;
//! let server = lab.serve("demo/server", 8080, AppMode::Sha)?;
//! let addr = lab.pod("demo/server").addr(Family::V6, server.port());
//! let report = lab.connect("demo/client", addr, AppMode::Sha, 1 << 20)?;
//! assert!(report.ok, "{}", report.detail);
//! # Ok(()) }
//! ```
//! `Lab::up` is idempotent, so every test may call it; `cargo xtask test` takes the
//! lab down after the run. Everything lives in `warren-*` namespaces, under
//! `<cgroup2>/warren-lab/`, `/sys/fs/bpf/warren/<node>` and `/run/warren-lab/`;
//! the root namespace's interfaces, routes and firewall are never changed.
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod agent;
pub mod app;
pub mod capture;
pub mod cargo;
mod cgroup;
pub mod config;
mod create;
mod enter;
mod lab;
pub mod mounts;
mod netns;
pub mod options;
pub mod policy;
pub mod prereq;
mod process;
mod state;
mod teardown;
pub mod topology;
mod verify;

pub use agent::RemoteCa;
pub use app::{AppClient, AppMode, AppServer, ConnectOptions, ConnectReport, LoadOptions};
pub use capture::{Capture, Captured};
pub use lab::{CniRun, Lab};
/// Signals for [`Lab::kill_agent`], re-exported so tests need not depend on nix.
pub use nix::sys::signal::Signal;
pub use options::{LabMode, RedirectMode, UpOptions};
pub use topology::{Family, Node, Outside, Pod, Target, Topology};
pub use verify::WireVerify;
