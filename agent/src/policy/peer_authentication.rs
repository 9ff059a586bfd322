//! The effective mTLS mode of a workload's port, as Istio resolves PeerAuthentications:
//!
//! 1. mesh: a policy without selector in the root namespace;
//! 2. namespace: a policy without selector in the workload's namespace;
//! 3. workload: a policy with `selector.matchLabels` matching the workload, in its
//!    namespace (a selector policy in the root namespace is ignored);
//! 4. port: the workload policy's `portLevelMtls` entry for the port.
//!
//! Each level that says something other than UNSET overrides the levels before it; with
//! nothing said, the mode is PERMISSIVE. At each level only one policy counts: the
//! oldest (see [`super::PolicyMeta::creation_timestamp`]), even if it says UNSET.
use std::collections::{hash_map::Entry, BTreeMap, HashMap};

use super::{
    model::{PeerAuthentication, PeerAuthenticationMode, WorkloadSelector},
    MtlsMode, PolicyKind, PolicyRef, PolicyWarning,
};
use crate::workload::Workload;

struct Level {
    reference: PolicyRef,
    mode: PeerAuthenticationMode,
}

struct WorkloadLevel {
    reference: PolicyRef,
    selector: WorkloadSelector,
    mode: PeerAuthenticationMode,
    port_level: BTreeMap<u16, PeerAuthenticationMode>,
}

pub(super) struct PeerIndex {
    mesh: Option<Level>,
    /// The oldest namespace-wide policy of each namespace (the root namespace excluded).
    namespaces: HashMap<String, Level>,
    /// Workload policies by namespace, oldest first.
    workloads: HashMap<String, Vec<WorkloadLevel>>,
}

fn resolved(mode: PeerAuthenticationMode) -> Option<MtlsMode> {
    match mode {
        PeerAuthenticationMode::Unset => None,
        PeerAuthenticationMode::Disable => Some(MtlsMode::Disable),
        PeerAuthenticationMode::Permissive => Some(MtlsMode::Permissive),
        PeerAuthenticationMode::Strict => Some(MtlsMode::Strict),
    }
}

impl PeerIndex {
    /// `policies` oldest first.
    pub(super) fn new(
        root: &str,
        policies: &[PeerAuthentication],
        warnings: &mut Vec<PolicyWarning>,
    ) -> Self {
        let mut index = Self {
            mesh: None,
            namespaces: HashMap::new(),
            workloads: HashMap::new(),
        };
        for policy in policies {
            let reference = PolicyRef::of(PolicyKind::PeerAuthentication, &policy.meta);
            let mut warn = |message: String| {
                warnings.push(PolicyWarning {
                    policy: Some(reference.clone()),
                    message,
                })
            };
            if policy.meta.dry_run {
                warn(
                    "the istio.io/dry-run annotation is not supported; this policy is enforced"
                        .to_owned(),
                );
            }
            let uses_disable = policy.mode == PeerAuthenticationMode::Disable
                || policy
                    .port_level_mtls
                    .values()
                    .any(|m| *m == PeerAuthenticationMode::Disable);
            if uses_disable {
                warn("mode DISABLE: traffic between mesh workloads is always tunnelled in an ambient mesh, so for incoming connections DISABLE acts like PERMISSIVE".to_owned());
            }
            match &policy.selector {
                Some(selector) => {
                    if policy.meta.namespace == root {
                        warn(format!(
                            "a PeerAuthentication with a selector in the root namespace {root} is ignored (as in Istio); remove the selector for a mesh-wide policy, or move it to the workloads' namespace"
                        ));
                        continue;
                    }
                    index
                        .workloads
                        .entry(policy.meta.namespace.clone())
                        .or_default()
                        .push(WorkloadLevel {
                            reference,
                            selector: selector.clone(),
                            mode: policy.mode,
                            port_level: policy.port_level_mtls.clone(),
                        });
                }
                None => {
                    if !policy.port_level_mtls.is_empty() {
                        warn("portLevelMtls is ignored: it is only valid with a selector (Istio refuses it otherwise)".to_owned());
                    }
                    let level = Level {
                        reference: reference.clone(),
                        mode: policy.mode,
                    };
                    let namespace = &policy.meta.namespace;
                    let (older, scope) = if namespace == root {
                        let older = match &index.mesh {
                            Some(winner) => Some(winner.reference.clone()),
                            None => {
                                index.mesh = Some(level);
                                None
                            }
                        };
                        (older, "the whole mesh".to_owned())
                    } else {
                        let older = match index.namespaces.entry(namespace.clone()) {
                            Entry::Occupied(winner) => Some(winner.get().reference.clone()),
                            Entry::Vacant(slot) => {
                                slot.insert(level);
                                None
                            }
                        };
                        (older, format!("all of namespace {namespace}"))
                    };
                    if let Some(older) = older {
                        warn(format!(
                            "ignored: {older} is older and also applies to {scope}"
                        ));
                    }
                }
            }
        }
        index
    }

    pub(super) fn resolve(&self, workload: &Workload, port: u16) -> (MtlsMode, Option<PolicyRef>) {
        let mut mode = MtlsMode::Permissive;
        let mut decided_by: Option<&PolicyRef> = None;
        let levels = [self.mesh.as_ref(), self.namespaces.get(&workload.namespace)];
        for level in levels.into_iter().flatten() {
            if let Some(m) = resolved(level.mode) {
                mode = m;
                decided_by = Some(&level.reference);
            }
        }
        let workload_level = self
            .workloads
            .get(&workload.namespace)
            .and_then(|policies| {
                policies
                    .iter()
                    .find(|p| p.selector.selects(&workload.labels))
            });
        if let Some(policy) = workload_level {
            let port_mode = policy.port_level.get(&port).copied().and_then(resolved);
            if let Some(m) = port_mode.or_else(|| resolved(policy.mode)) {
                mode = m;
                decided_by = Some(&policy.reference);
            }
        }
        (mode, decided_by.cloned())
    }
}
