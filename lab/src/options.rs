//! How a lab is brought up: with or without agents, and which redirection the agents
//! use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// The agent's `--redirect` mode.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// Let the agent probe the kernel and choose.
    #[default]
    Auto,
    /// eBPF cgroup hooks and sk_lookup.
    Ebpf,
    /// iptables rules in each pod's netns.
    Iptables,
}

impl RedirectMode {
    /// The value given to `warren agent --redirect`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectMode::Auto => "auto",
            RedirectMode::Ebpf => "ebpf",
            RedirectMode::Iptables => "iptables",
        }
    }
}

impl fmt::Display for RedirectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RedirectMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(RedirectMode::Auto),
            "ebpf" => Ok(RedirectMode::Ebpf),
            "iptables" => Ok(RedirectMode::Iptables),
            _ => bail!("unknown redirect mode {s:?}: expected auto, ebpf or iptables"),
        }
    }
}

/// What a running lab is: the mesh on (agents with a redirect mode) or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabMode {
    /// Topology only: no agents, traffic flows in plaintext (the "mesh off" baseline).
    NoAgents,
    /// One agent per node with this redirect mode.
    Agents(RedirectMode),
}

impl fmt::Display for LabMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabMode::NoAgents => f.write_str("no-agents"),
            LabMode::Agents(mode) => write!(f, "{mode}"),
        }
    }
}

/// Options for [`crate::Lab::up`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpOptions {
    /// Redirect mode for the agents (ignored without agents).
    pub redirect: RedirectMode,
    /// Build and start one `warren agent` per node.
    pub agents: bool,
    /// The agents' `--cert-lifetime`; `None` leaves the agent's default (24 h). Tests of
    /// certificate renewal need seconds, not hours (ignored without agents).
    pub cert_lifetime: Option<Duration>,
    /// An existing CA in Istio's plug-in layout (`cacerts`: root-cert.pem, ca-cert.pem,
    /// ca-key.pem, cert-chain.pem) for every agent, copied into the lab; `None` makes a
    /// new one with `warren ca init` (ignored without agents).
    pub cacerts: Option<PathBuf>,
}

impl Default for UpOptions {
    /// Agents on, redirect mode `auto`, the agent's default certificate lifetime.
    fn default() -> Self {
        UpOptions {
            redirect: RedirectMode::Auto,
            agents: true,
            cert_lifetime: None,
            cacerts: None,
        }
    }
}

impl UpOptions {
    /// Agents on, with the given redirect mode.
    pub fn with_agents(redirect: RedirectMode) -> Self {
        UpOptions {
            redirect,
            agents: true,
            cert_lifetime: None,
            cacerts: None,
        }
    }

    /// The topology alone, no agents.
    pub fn no_agents() -> Self {
        UpOptions {
            redirect: RedirectMode::Auto,
            agents: false,
            cert_lifetime: None,
            cacerts: None,
        }
    }

    /// The same options with the agents' certificates living `lifetime`.
    pub fn cert_lifetime(self, lifetime: Duration) -> Self {
        UpOptions {
            cert_lifetime: Some(lifetime),
            ..self
        }
    }

    /// The same options with the agents' CA copied from `dir` (Istio's `cacerts` layout).
    pub fn cacerts(self, dir: impl Into<PathBuf>) -> Self {
        UpOptions {
            cacerts: Some(dir.into()),
            ..self
        }
    }

    /// The plug-in CA the agents get: `None` without agents.
    pub fn agent_cacerts(&self) -> Option<&Path> {
        self.cacerts.as_deref().filter(|_| self.agents)
    }

    /// The certificate lifetime the agents get: `None` without agents, where there is
    /// nothing to give it to (so a no-agents lab matches whatever was asked).
    pub fn agent_cert_lifetime(&self) -> Option<Duration> {
        self.cert_lifetime.filter(|_| self.agents)
    }

    /// The lab mode these options produce.
    pub fn mode(&self) -> LabMode {
        if self.agents {
            LabMode::Agents(self.redirect)
        } else {
            LabMode::NoAgents
        }
    }
}
