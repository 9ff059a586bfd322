//! Enrollment without a start-up race: `warren-cni`, a chained CNI plugin, and the
//! agent's side of it.
//!
//! The container runtime calls CNI plugins when it makes a pod's sandbox, before any of
//! the pod's containers start. `warren-cni` runs last in the node's chain (after the
//! plugin that gave the pod its addresses): on ADD it hands the pod's network namespace
//! and addresses to its node's agent over a unix socket and waits; the agent captures
//! the pod (when it is in the mesh) before it answers. So the first packet of the
//! pod's first container is already in the mesh — no init container, no restart.
//!
//! When the agent does not answer, the plugin fails the ADD (the kubelet retries the
//! sandbox) for pods of mesh namespaces: a mesh pod never starts uncaptured. It lets the
//! others through, judged from the namespaces the agent last wrote to its cache file,
//! and always lets through namespaces its config excludes (`kube-system`).
//!
//! [`protocol`] is what goes over the socket, [`plugin`] the binary's logic, [`server`]
//! the agent's listener and the record of the pods' network namespaces, [`install`]
//! what puts the plugin into the node's CNI chain, and [`procfs`] finds the network
//! namespaces of pods that were running before the agent started.
pub mod install;
pub mod plugin;
pub mod procfs;
pub mod protocol;
pub mod server;
