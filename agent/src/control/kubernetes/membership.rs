//! Which pods are in the mesh, and what the workload model knows of each: Kubernetes
//! Namespaces and Pods in, [`Workload`]s out. Pure functions, so the rules can be tested
//! without an API server.
//!
//! A pod is in the mesh when its namespace is enrolled — labelled
//! `warren.dev/mesh=enabled`, or Istio's `istio.io/dataplane-mode=ambient` (so a
//! namespace moved from Istio ambient needs no relabelling) — unless the pod opts out:
//! annotation `warren.dev/mesh: disabled`, or Istio's pod label
//! `istio.io/dataplane-mode: none`. Never in the mesh: host-network pods (they share the
//! node's network namespace) and pods with an Istio sidecar (their own proxy already
//! terminates mTLS). A pod that istio-cni redirected to a ztunnel (annotation
//! `ambient.istio.io/redirection: enabled`) is a *foreign HBONE* workload: tunnelled to on
//! its 15008, captured by nobody here.
use std::{collections::HashSet, net::IpAddr, path::PathBuf, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::workload::{Owner, Workload};

/// Namespace label that enrolls a namespace.
pub const MESH_LABEL: &str = "warren.dev/mesh";
pub const MESH_LABEL_ENABLED: &str = "enabled";
/// Pod annotation that opts one pod out.
pub const MESH_ANNOTATION: &str = "warren.dev/mesh";
pub const MESH_ANNOTATION_DISABLED: &str = "disabled";
/// Istio's namespace label (`ambient`) and pod label (`none` opts a pod out).
pub const ISTIO_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Set by Istio's sidecar injector on pods that run an Envoy sidecar.
const ISTIO_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Set by istio-cni on pods whose traffic it redirected to a ztunnel.
const ISTIO_AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// Istio's pod label that names the pod's workload outright.
const ISTIO_WORKLOAD_NAME: &str = "service.istio.io/workload-name";

/// Whether a namespace's labels enroll it.
pub fn namespace_enrolled(namespace: &Namespace) -> bool {
    let Some(labels) = namespace.metadata.labels.as_ref() else {
        return false;
    };
    labels.get(MESH_LABEL).map(String::as_str) == Some(MESH_LABEL_ENABLED)
        || labels.get(ISTIO_DATAPLANE_MODE).map(String::as_str) == Some("ambient")
}

/// The names of the enrolled namespaces.
pub fn enrolled_namespaces<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> HashSet<String> {
    namespaces
        .into_iter()
        .filter(|ns| namespace_enrolled(ns))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect()
}

/// The workload for `pod`, or `None` for a pod the model leaves out: not scheduled,
/// finished, or on the host network. A pod without an address yet is kept (its node's
/// CNI plugin brings the address), but nothing can reach it until it has one.
pub fn workload(pod: &Pod, enrolled: &HashSet<String>) -> Option<Workload> {
    let meta = &pod.metadata;
    let (namespace, name) = (meta.namespace.clone()?, meta.name.clone()?);
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    // Empty while the pod's sandbox is being made: the CNI plugin tells its node's agent
    // the addresses before the kubelet writes them here.
    let ips = pod_ips(pod);
    let labels = meta.labels.clone().unwrap_or_default();
    let annotation = |key: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let opted_out = annotation(MESH_ANNOTATION) == Some(MESH_ANNOTATION_DISABLED)
        || labels.get(ISTIO_DATAPLANE_MODE).map(String::as_str) == Some("none")
        || annotation(ISTIO_SIDECAR_STATUS).is_some();
    let foreign_hbone = annotation(ISTIO_AMBIENT_REDIRECTION) == Some("enabled");
    let in_mesh = !opted_out && (foreign_hbone || enrolled.contains(&namespace));
    Some(Workload {
        namespace,
        name,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        labels: labels.into_iter().collect(),
        node,
        ips,
        // Known only on the pod's own node, from the CNI plugin or /proc.
        netns: PathBuf::new(),
        cgroup: None,
        in_mesh,
        foreign_hbone: foreign_hbone && !opted_out,
        owner: owner(pod),
    })
}

/// The workload `pod` belongs to, as Istio names it (`kube.GetWorkloadMetaFromPod`), or
/// `None` when the pod is its own workload. Only a pod whose name was generated
/// (`metadata.generateName`) is looked into: its controlling owner reference names the
/// workload — a ReplicaSet `name-<pod-template-hash>` is Deployment `name` (likewise an
/// Argo Rollout's), a Job `name-<8 to 10 digits>` is CronJob `name`, an OpenShift
/// ReplicationController is its `deploymentconfig` label; StatefulSet, DaemonSet, Job and
/// any other kind as named. The label `service.istio.io/workload-name` overrides the name.
pub fn owner(pod: &Pod) -> Option<Owner> {
    let meta = &pod.metadata;
    let label = |key: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let generated = meta.generate_name.as_deref().is_some_and(|g| !g.is_empty());
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && !r.name.is_empty())
        .filter(|_| generated);
    let mut owner = controller.map(|r| {
        let trimmed = |hash_label: &str| {
            let hash = label(hash_label)?;
            r.name.ends_with(hash).then(|| {
                r.name
                    .strip_suffix(&format!("-{hash}"))
                    .unwrap_or(&r.name)
                    .to_owned()
            })
        };
        let (kind, name) = match r.kind.as_str() {
            "ReplicaSet" => {
                if let Some(name) = trimmed("pod-template-hash") {
                    ("Deployment", name)
                } else if let Some(name) = trimmed("rollouts-pod-template-hash") {
                    ("Rollout", name)
                } else {
                    ("ReplicaSet", r.name.clone())
                }
            }
            "ReplicationController" if label("deploymentconfig").is_some() => (
                "DeploymentConfig",
                label("deploymentconfig").unwrap_or_default().to_owned(),
            ),
            "Job" => match cron_job_name(&r.name) {
                Some(name) => ("CronJob", name.to_owned()),
                None => ("Job", r.name.clone()),
            },
            kind => (kind, r.name.clone()),
        };
        Owner {
            kind: kind.to_owned(),
            name,
        }
    });
    if let Some(name) = label(ISTIO_WORKLOAD_NAME) {
        owner = Some(Owner {
            kind: owner.map_or_else(|| "Pod".to_owned(), |o| o.kind),
            name: name.to_owned(),
        });
    }
    owner.filter(|o| !(o.kind == "Pod" && Some(&o.name) == meta.name.as_ref()))
}

/// The CronJob of a Job its controller named `<cronjob>-<8 to 10 digits>` (the scheduled
/// time), as Istio tells them.
fn cron_job_name(job: &str) -> Option<&str> {
    let (name, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !name.is_empty()).then_some(name)
}

/// `status.podIPs`, else `status.podIP`; unparsable entries are skipped.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let mut ips: Vec<IpAddr> = listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    let mut seen = HashSet::new();
    ips.retain(|ip| seen.insert(*ip));
    ips
}

/// Every workload of `pods`. Two pods claiming one address (a pod that was replaced
/// and whose old object is still terminating) keep the address for the one that is
/// not terminating, else the newest.
pub fn workloads<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    enrolled: &HashSet<String>,
) -> Vec<Arc<Workload>> {
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    // Terminating pods first, then oldest first: later entries win an address.
    pods.sort_by_key(|pod| {
        (
            pod.metadata.deletion_timestamp.is_none(),
            pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
        )
    });
    let mut owners: std::collections::HashMap<IpAddr, usize> = Default::default();
    let mut out: Vec<(Workload, bool)> = Vec::new();
    for pod in pods {
        let Some(workload) = workload(pod, enrolled) else {
            continue;
        };
        for ip in &workload.ips {
            if let Some(previous) = owners.insert(*ip, out.len()) {
                out[previous].0.ips.retain(|owned| owned != ip);
            }
        }
        let had_addresses = !workload.ips.is_empty();
        out.push((workload, had_addresses));
    }
    // A pod whose every address went to another is left out; one that has none yet
    // (its sandbox is being made) stays.
    out.into_iter()
        .filter(|(w, had_addresses)| !(*had_addresses && w.ips.is_empty()))
        .map(|(w, _)| Arc::new(w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}
        }))
        .unwrap()
    }

    fn pod(ns: &str, name: &str, extra: serde_json::Value) -> Pod {
        let mut base = serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"app": name},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "serviceAccountName": name, "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(base), serde_json::Value::Object(extra)) => {
                for (k, v) in extra {
                    merge(base.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (base, extra) => *base = extra,
        }
    }

    fn enrolled(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn namespaces_enroll_by_warren_or_istio_ambient_label() {
        let all = [
            namespace("a", &[(MESH_LABEL, "enabled")]),
            namespace("b", &[(ISTIO_DATAPLANE_MODE, "ambient")]),
            namespace("c", &[(MESH_LABEL, "disabled")]),
            namespace("d", &[("istio-injection", "enabled")]),
            namespace("e", &[]),
        ];
        assert_eq!(enrolled_namespaces(&all), enrolled(&["a", "b"]));
    }

    #[test]
    fn a_pod_becomes_a_workload_with_its_identity_and_addresses() {
        let w = workload(
            &pod("demo", "server", serde_json::json!({})),
            &enrolled(&["demo"]),
        )
        .unwrap();
        assert_eq!((w.namespace.as_str(), w.name.as_str()), ("demo", "server"));
        assert_eq!(w.service_account, "server");
        assert_eq!(w.node, "n1");
        assert_eq!(
            w.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(w.labels.get("app").map(String::as_str), Some("server"));
        assert!(w.in_mesh && !w.foreign_hbone);
        // Not enrolled: known (its identity and addresses), but not in the mesh.
        let w = workload(
            &pod("legacy", "x", serde_json::json!({})),
            &enrolled(&["demo"]),
        )
        .unwrap();
        assert!(!w.in_mesh);
        // No service account named: `default`.
        let w = workload(
            &pod(
                "demo",
                "y",
                serde_json::json!({"spec": {"serviceAccountName": ""}}),
            ),
            &enrolled(&["demo"]),
        )
        .unwrap();
        assert_eq!(w.service_account, "default");
    }

    #[test]
    fn pods_opt_out_or_are_left_out() {
        let demo = enrolled(&["demo"]);
        for (why, extra) in [
            (
                "annotation",
                serde_json::json!({"metadata": {"annotations": {MESH_ANNOTATION: "disabled"}}}),
            ),
            (
                "istio label",
                serde_json::json!({"metadata": {"labels": {ISTIO_DATAPLANE_MODE: "none"}}}),
            ),
            (
                "sidecar",
                serde_json::json!({"metadata": {"annotations": {ISTIO_SIDECAR_STATUS: "{}"}}}),
            ),
        ] {
            let w = workload(&pod("demo", "p", extra), &demo).unwrap();
            assert!(!w.in_mesh, "{why}");
        }
        for (why, extra) in [
            (
                "host network",
                serde_json::json!({"spec": {"hostNetwork": true}}),
            ),
            (
                "not scheduled",
                serde_json::json!({"spec": {"nodeName": null}}),
            ),
            (
                "finished",
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
            ("failed", serde_json::json!({"status": {"phase": "Failed"}})),
        ] {
            assert!(workload(&pod("demo", "p", extra), &demo).is_none(), "{why}");
        }
        let starting = pod(
            "demo",
            "p",
            serde_json::json!({"status": {"podIP": null, "podIPs": null}}),
        );
        let w = workload(&starting, &demo).expect("a scheduled pod without an address yet");
        assert!(w.ips.is_empty() && w.in_mesh);
    }

    #[test]
    fn the_workload_is_the_owner_as_istio_names_it() {
        let owned = |kind: &str, owner: &str, labels: serde_json::Value| {
            serde_json::json!({"metadata": {
                "generateName": "x-",
                "labels": labels,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Other", "name": "not-the-controller", "uid": "0"},
                    {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "1", "controller": true},
                ],
            }})
        };
        let hash = serde_json::json!({"pod-template-hash": "7f9c4d5b8"});
        for (why, extra, kind, name) in [
            (
                "a Deployment's ReplicaSet, minus its hash",
                owned("ReplicaSet", "server-7f9c4d5b8", hash.clone()),
                "Deployment",
                "server",
            ),
            (
                "an Argo Rollout's ReplicaSet",
                owned(
                    "ReplicaSet",
                    "web-6d8f",
                    serde_json::json!({"rollouts-pod-template-hash": "6d8f"}),
                ),
                "Rollout",
                "web",
            ),
            (
                "a ReplicaSet of its own (no hash label)",
                owned("ReplicaSet", "plain", serde_json::json!({})),
                "ReplicaSet",
                "plain",
            ),
            (
                "a StatefulSet",
                owned("StatefulSet", "db", serde_json::json!({})),
                "StatefulSet",
                "db",
            ),
            (
                "a DaemonSet",
                owned("DaemonSet", "agent", serde_json::json!({})),
                "DaemonSet",
                "agent",
            ),
            (
                "a Job",
                owned("Job", "migrate", serde_json::json!({})),
                "Job",
                "migrate",
            ),
            (
                "a CronJob's Job",
                owned("Job", "backup-28999320", serde_json::json!({})),
                "CronJob",
                "backup",
            ),
            (
                "a Job whose suffix is not a schedule",
                owned("Job", "backup-123", serde_json::json!({})),
                "Job",
                "backup-123",
            ),
            (
                "an OpenShift DeploymentConfig",
                owned(
                    "ReplicationController",
                    "shop-3",
                    serde_json::json!({"deploymentconfig": "shop"}),
                ),
                "DeploymentConfig",
                "shop",
            ),
            (
                "Istio's label names it",
                owned(
                    "ReplicaSet",
                    "server-7f9c4d5b8",
                    serde_json::json!({"pod-template-hash": "7f9c4d5b8", ISTIO_WORKLOAD_NAME: "named"}),
                ),
                "Deployment",
                "named",
            ),
            (
                "Istio's label on a bare pod",
                serde_json::json!({"metadata": {"labels": {ISTIO_WORKLOAD_NAME: "named"}}}),
                "Pod",
                "named",
            ),
        ] {
            let w = workload(&pod("demo", "x-abcde", extra), &enrolled(&["demo"])).unwrap();
            assert_eq!(
                (w.workload_kind(), w.workload_name()),
                (kind, name),
                "{why}"
            );
            assert_eq!(w.name, "x-abcde", "{why}: the pod keeps its name");
        }
        for (why, extra) in [
            ("a bare pod", serde_json::json!({})),
            (
                "an owner that is not the controller",
                serde_json::json!({"metadata": {"generateName": "x-", "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs-1", "uid": "1"}]}}),
            ),
            (
                "a name not generated (as Istio, the owner is not looked at)",
                serde_json::json!({"metadata": {"ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "1", "controller": true}]}}),
            ),
        ] {
            let w = workload(&pod("demo", "x-abcde", extra), &enrolled(&["demo"])).unwrap();
            assert_eq!(w.owner, None, "{why}");
            assert_eq!(
                (w.workload_kind(), w.workload_name()),
                ("Pod", "x-abcde"),
                "{why}"
            );
        }
    }

    #[test]
    fn a_pod_redirected_to_ztunnel_is_foreign_hbone() {
        let extra = serde_json::json!({"metadata": {"annotations": {ISTIO_AMBIENT_REDIRECTION: "enabled"}}});
        let w = workload(&pod("shop", "cart", extra), &enrolled(&[])).unwrap();
        assert!(w.in_mesh && w.foreign_hbone);
    }

    #[test]
    fn an_address_goes_to_the_live_pod_not_the_terminating_one() {
        let old = pod(
            "demo",
            "old",
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-02T00:00:00Z",
                                             "creationTimestamp": "2026-01-03T00:00:00Z"}}),
        );
        let new = pod(
            "demo",
            "new",
            serde_json::json!({"status": {"podIPs": [{"ip": "10.0.0.1"}]}}),
        );
        let all = workloads([&new, &old], &enrolled(&["demo"]));
        let names: Vec<_> = all
            .iter()
            .map(|w| (w.name.as_str(), w.ips.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("old", vec!["fd00::1".parse::<IpAddr>().unwrap()]),
                ("new", vec!["10.0.0.1".parse().unwrap()]),
            ]
        );
    }
}
