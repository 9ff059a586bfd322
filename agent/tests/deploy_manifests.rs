//! The manifests in `deploy/` as the API server and the agent will read them: every
//! document decodes into its typed Kubernetes object without losing a field (so a typo'd
//! field name fails here, not silently on the cluster), and the pieces that must agree
//! do — the kustomization's file list, the names objects refer to, the agent's flags
//! against its real argument parser, ports, mounts, the CA's address, least privilege.
//! No cluster needed.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume, VolumeMount,
        },
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
    Resource,
};
use serde_json::Value;

/// The node name the kubelet would put into `WARREN_NODE_NAME` (`fieldRef: spec.nodeName`).
const NODE: &str = "node-a";
const AGENT_CONTAINER: &str = "agent";
const INSTALL_CNI_CONTAINER: &str = "install-cni";
const IMAGE: &str = "ghcr.io/warren-mesh/warren";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

// ---------------------------------------------------------------------------------------
// Loading: every document of every file, decoded by kind.

macro_rules! kinds {
    ($($kind:ident),* $(,)?) => {
        /// A decoded document.
        #[derive(Debug)]
        enum Object {
            $($kind(Box<$kind>),)*
        }

        /// Decode `json` as the type its `apiVersion` and `kind` name; `None` for a kind
        /// this test does not know.
        fn decode(api_version: &str, kind: &str, json: &Value) -> Option<Result<Object, String>> {
            $(
                if api_version == <$kind as Resource>::API_VERSION && kind == <$kind as Resource>::KIND {
                    return Some(round_trip::<$kind>(json).map(|o| Object::$kind(Box::new(o))));
                }
            )*
            None
        }

        /// Picks the objects of one type out of the documents.
        trait Pick: Sized {
            fn pick(object: &Object) -> Option<&Self>;
        }
        $(
            impl Pick for $kind {
                fn pick(object: &Object) -> Option<&Self> {
                    match object {
                        Object::$kind(o) => Some(o.as_ref()),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*
    };
}

kinds!(
    Namespace,
    ServiceAccount,
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
    Service,
    Deployment,
    DaemonSet,
    ConfigMap,
    CustomResourceDefinition,
    PodDisruptionBudget,
);

/// Decode into `T`, serialize back, and fail if the typed object dropped a key of the
/// document: k8s-openapi ignores unknown fields, so this is what catches a misspelt one.
fn round_trip<T>(json: &Value) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_dropped(json, &back, String::new()) {
        Some(path) => Err(format!(
            "field `{path}` is not a field of {} (misspelt, or misplaced?)",
            json["kind"].as_str().unwrap_or("?")
        )),
        None => Ok(typed),
    }
}

/// The path of the first key of `original` missing from `back` (null values aside: an
/// explicit `null` is the same as no value).
fn first_dropped(original: &Value, back: &Value, path: String) -> Option<String> {
    match (original, back) {
        (Value::Object(orig), Value::Object(back)) => orig.iter().find_map(|(key, value)| {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match back.get(key) {
                _ if value.is_null() => None,
                None => Some(here),
                Some(b) => first_dropped(value, b, here),
            }
        }),
        (Value::Array(orig), Value::Array(back)) => orig
            .iter()
            .zip(back)
            .enumerate()
            .find_map(|(i, (o, b))| first_dropped(o, b, format!("{path}[{i}]"))),
        _ => None,
    }
}

#[derive(Debug)]
struct Doc {
    file: String,
    /// 0-based position in its file.
    index: usize,
    object: Object,
}

/// kustomization.yaml, the fields this test reads.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
}

/// kustomize's top-level fields (kustomize v5), to catch a misspelt one.
const KUSTOMIZE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "openapi",
    "namePrefix",
    "nameSuffix",
    "namespace",
    "commonLabels",
    "labels",
    "commonAnnotations",
    "patchesStrategicMerge",
    "patchesJson6902",
    "patches",
    "images",
    "imageTags",
    "replacements",
    "replicas",
    "vars",
    "sortOptions",
    "resources",
    "components",
    "crds",
    "bases",
    "configMapGenerator",
    "secretGenerator",
    "helmGlobals",
    "helmCharts",
    "helmChartInflationGenerator",
    "generatorOptions",
    "configurations",
    "generators",
    "transformers",
    "validators",
    "buildMetadata",
];

const KUSTOMIZATION: &str = "kustomization.yaml";

#[derive(Debug)]
struct Manifests {
    /// The yaml files of deploy/ other than kustomization.yaml, by name.
    files: Vec<String>,
    kustomization: Kustomization,
    docs: Vec<Doc>,
}

impl Manifests {
    fn all<T: Pick>(&self) -> Vec<(&Doc, &T)> {
        self.docs
            .iter()
            .filter_map(|doc| T::pick(&doc.object).map(|o| (doc, o)))
            .collect()
    }

    /// The namespace a namespaced object lands in: kustomize's `namespace:` wins.
    fn namespace_of(&self, meta_namespace: Option<&String>) -> Option<String> {
        self.kustomization
            .namespace
            .clone()
            .or_else(|| meta_namespace.cloned())
    }

    /// The one object of a type for which `pred` holds, or a panic saying what is missing.
    fn one<T: Pick>(&self, what: &str, pred: impl Fn(&T) -> bool) -> (&Doc, &T) {
        let found: Vec<_> = self
            .all::<T>()
            .into_iter()
            .filter(|(_, o)| pred(o))
            .collect();
        match found.as_slice() {
            [one] => *one,
            [] => panic!("deploy/: no {what} found"),
            many => panic!(
                "deploy/: {} {what}s found ({}), expected one",
                many.len(),
                many.iter()
                    .map(|(d, _)| format!("{}#{}", d.file, d.index))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn agent_daemonset(&self) -> (&Doc, &DaemonSet) {
        self.one::<DaemonSet>("DaemonSet warren-agent", |ds| {
            ds.metadata.name.as_deref() == Some("warren-agent")
        })
    }

    fn ca_deployment(&self) -> (&Doc, &Deployment) {
        self.one::<Deployment>("Deployment warren-ca", |d| {
            d.metadata.name.as_deref() == Some("warren-ca")
        })
    }
}

fn load() -> Manifests {
    let dir = deploy_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    names.sort();

    let mut errors = Vec::new();
    let mut docs = Vec::new();
    let mut kustomization = None;
    for name in &names {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = format!("deploy/{name}, document {}", index + 1);
            let yaml = match <serde_yaml::Value as serde::Deserialize>::deserialize(document) {
                Ok(yaml) => yaml,
                Err(e) => {
                    errors.push(format!("{at}: not YAML: {e}"));
                    continue;
                }
            };
            if yaml.is_null() {
                continue; // only comments, or an empty document between `---`
            }
            let json: Value = match serde_json::to_value(&yaml) {
                Ok(json) => json,
                Err(e) => {
                    errors.push(format!("{at}: not representable as JSON: {e}"));
                    continue;
                }
            };
            let api_version = json["apiVersion"].as_str().unwrap_or_default();
            let kind = json["kind"].as_str().unwrap_or_default();
            if name == KUSTOMIZATION {
                match read_kustomization(&json) {
                    Ok(k) => kustomization = Some(k),
                    Err(e) => errors.push(format!("{at}: {e}")),
                }
                continue;
            }
            match decode(api_version, kind, &json) {
                None => errors.push(format!(
                    "{at}: kind {kind:?} (apiVersion {api_version:?}) is not one this test decodes; \
                     add it to `kinds!` in agent/tests/deploy_manifests.rs"
                )),
                Some(Err(e)) => errors.push(format!(
                    "{at} ({kind} {}): {e}",
                    json["metadata"]["name"].as_str().unwrap_or("without a name")
                )),
                Some(Ok(object)) => docs.push(Doc {
                    file: name.clone(),
                    index,
                    object,
                }),
            }
        }
    }
    let kustomization = kustomization.unwrap_or_else(|| {
        errors.push(format!("deploy/{KUSTOMIZATION} is missing or empty"));
        Kustomization::default()
    });
    assert!(
        errors.is_empty(),
        "deploy/ does not decode:\n  {}",
        errors.join("\n  ")
    );
    Manifests {
        files: names.into_iter().filter(|n| n != KUSTOMIZATION).collect(),
        kustomization,
        docs,
    }
}

fn read_kustomization(json: &Value) -> Result<Kustomization, String> {
    if json["kind"] != "Kustomization" {
        return Err(format!("kind is {}, expected Kustomization", json["kind"]));
    }
    if let Some(unknown) = json
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| !KUSTOMIZE_FIELDS.contains(&k.as_str()))
    {
        return Err(format!("`{unknown}` is not a kustomization field"));
    }
    serde_json::from_value(json.clone()).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Helpers on pod specs.

fn pod_spec_of_ds(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template spec")
}

fn pod_spec_of_deploy(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the Deployment has a pod template spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str, file: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("deploy/{file}: no container named {name}"))
}

fn init_container<'a>(spec: &'a PodSpec, name: &str, file: &str) -> &'a Container {
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("deploy/{file}: no initContainer named {name}"))
}

/// A container's environment as the kubelet would set it, for the variables whose value
/// this test can know.
fn container_env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|var| {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => match from.field_ref.as_ref()?.field_path.as_str() {
                    "spec.nodeName" => NODE.to_owned(),
                    _ => return None,
                },
                (None, None) => String::new(),
            };
            Some((var.name.clone(), value))
        })
        .collect()
}

/// Expand `$(VAR)` as the kubelet does in `command` and `args` (`$$` escapes).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail
            .strip_prefix("$(")
            .and_then(|t| t.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `argv` plus a `--flag=value` for each flag of `cmd` whose variable (`env = …`) is in
/// the container's environment and that `argv` does not give: what clap does with the
/// real environment, without changing this process's.
fn with_env(
    cmd: &clap::Command,
    mut argv: Vec<String>,
    env: &BTreeMap<String, String>,
) -> Vec<String> {
    for arg in cmd.get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(value) = var.to_str().and_then(|v| env.get(v)) else {
            continue;
        };
        let flag = format!("--{long}");
        let given = argv
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        if !given {
            argv.push(format!("{flag}={value}"));
        }
    }
    argv
}

#[derive(Debug, clap::Parser)]
#[command(name = "warren-agent")]
struct Agent {
    #[command(flatten)]
    args: warren::config::AgentArgs,
}

#[derive(Debug, clap::Parser)]
#[command(name = "warren-ca-serve")]
struct CaServe {
    #[command(flatten)]
    args: warren::ca_service::CaServeArgs,
}

#[derive(Debug, clap::Parser)]
#[command(name = "warren-uninstall")]
struct Uninstall {
    #[command(flatten)]
    args: warren::uninstall::UninstallArgs,
}

/// The agent container's flags, parsed by the agent's own parser with the container's
/// environment.
fn agent_args(m: &Manifests) -> (String, &Container, warren::config::AgentArgs) {
    let (doc, ds) = m.agent_daemonset();
    let agent = container(pod_spec_of_ds(ds), AGENT_CONTAINER, &doc.file);
    let command = agent.command.clone().unwrap_or_default();
    assert_eq!(
        command,
        ["warren", "agent"],
        "deploy/{}: the agent container's command",
        doc.file
    );
    let env = container_env(agent);
    let argv: Vec<String> = std::iter::once("warren-agent".to_owned())
        .chain(agent.args.iter().flatten().map(|a| expand(a, &env)))
        .collect();
    let argv = with_env(&Agent::command(), argv, &env);
    let parsed = Agent::try_parse_from(&argv).unwrap_or_else(|e| {
        panic!(
            "deploy/{}: `warren agent` refuses the agent container's args {:?}:\n{}",
            doc.file,
            &argv[1..],
            e.render()
        )
    });
    (doc.file.clone(), agent, parsed.args)
}

/// The flag's value in a list of args (`--flag value` or `--flag=value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag).and_then(|v| v.strip_prefix('='))
        }
    })
}

fn named_port(c: &Container, name: &str) -> Option<i32> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// A probe's or Service's port, by number or by the container port's name.
fn resolve_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => named_port(c, name),
    }
}

/// The deepest of the container's mounts that holds `path`, with its volume.
fn mount_of<'a>(
    c: &'a Container,
    spec: &'a PodSpec,
    path: &Path,
) -> Option<(&'a VolumeMount, &'a Volume)> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| Path::new(&m.mount_path).components().count())?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    Some((mount, volume))
}

/// Where `path` (inside the container) is on the node, if it is on a hostPath volume.
fn host_path_of(c: &Container, spec: &PodSpec, path: &Path) -> Option<PathBuf> {
    let (mount, volume) = mount_of(c, spec, path)?;
    let host = volume.host_path.as_ref()?;
    let rel = path.strip_prefix(&mount.mount_path).ok()?;
    Some(Path::new(&host.path).join(rel))
}

fn describe_mounts(c: &Container) -> String {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| format!("{} ({})", m.mount_path, m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn every_document_decodes_without_losing_a_field() {
    let m = load();
    assert!(!m.docs.is_empty(), "deploy/ holds no Kubernetes objects");
}

#[test]
fn the_round_trip_catches_a_misspelt_field() {
    // The check the other tests rely on, shown to work.
    let typo: Value = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {
            "serviceAcountName": "warren-agent", "containers": []}}}
    });
    let err = round_trip::<DaemonSet>(&typo).unwrap_err();
    assert!(
        err.contains("spec.template.spec.serviceAcountName"),
        "{err}"
    );
    let fine = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "annotations": null}});
    round_trip::<ServiceAccount>(&fine).unwrap();
}

#[test]
fn kustomization_lists_exactly_the_files_of_deploy() {
    let m = load();
    let dir = deploy_dir();
    for entry in m
        .kustomization
        .resources
        .iter()
        .chain(&m.kustomization.components)
    {
        assert!(
            dir.join(entry).exists(),
            "deploy/{KUSTOMIZATION}: resource {entry} does not exist in deploy/"
        );
    }
    let listed: BTreeSet<&str> = m
        .kustomization
        .resources
        .iter()
        .map(|r| r.trim_start_matches("./"))
        .collect();
    for file in &m.files {
        assert!(
            listed.contains(file.as_str()),
            "deploy/{file} is not listed in deploy/{KUSTOMIZATION} `resources:` (`kubectl apply -k` would skip it)"
        );
    }
    assert_eq!(
        m.kustomization.namespace.as_deref(),
        Some("warren-system"),
        "deploy/{KUSTOMIZATION}: namespace"
    );
    // Every namespaced object names the same namespace, so `kubectl apply -f deploy/`
    // and `-k` agree, and the namespace itself is part of the install.
    let mut namespaced: Vec<(&Doc, Option<&String>)> = Vec::new();
    for (d, o) in m.all::<ServiceAccount>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<Role>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<RoleBinding>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<Service>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<Deployment>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<DaemonSet>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<ConfigMap>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (d, o) in m.all::<PodDisruptionBudget>() {
        namespaced.push((d, o.metadata.namespace.as_ref()));
    }
    for (doc, ns) in namespaced {
        if let Some(ns) = ns {
            assert_eq!(
                Some(ns),
                m.kustomization.namespace.as_ref(),
                "deploy/{}#{}: metadata.namespace differs from the kustomization's",
                doc.file,
                doc.index
            );
        }
    }
    let ns = m.kustomization.namespace.clone().unwrap_or_default();
    m.one::<Namespace>(&format!("Namespace {ns}"), |n| {
        n.metadata.name.as_deref() == Some(ns.as_str())
    });
    // The image override reaches every container.
    let image_names: BTreeSet<&str> = m
        .kustomization
        .images
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert!(
        image_names.contains(IMAGE),
        "deploy/{KUSTOMIZATION}: no `images:` entry for {IMAGE}"
    );
    let mut pods: Vec<(&Doc, &PodSpec)> = Vec::new();
    for (d, ds) in m.all::<DaemonSet>() {
        pods.push((d, pod_spec_of_ds(ds)));
    }
    for (d, dep) in m.all::<Deployment>() {
        pods.push((d, pod_spec_of_deploy(dep)));
    }
    for (doc, spec) in pods {
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let image = c.image.as_deref().unwrap_or_default();
            let name = image.split(['@', ':']).next().unwrap_or_default();
            // A registry port (host:5000/…) would confuse the split; none is used here.
            assert!(
                image_names.contains(name),
                "deploy/{}: container {} uses image {image}, which kustomization.yaml `images:` does not override",
                doc.file,
                c.name
            );
        }
    }
}

#[test]
fn service_accounts_and_bindings_point_at_objects_that_exist() {
    let m = load();
    let accounts: BTreeSet<(String, String)> = m
        .all::<ServiceAccount>()
        .into_iter()
        .map(|(_, sa)| {
            (
                m.namespace_of(sa.metadata.namespace.as_ref())
                    .unwrap_or_default(),
                sa.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();

    let mut pods: Vec<(&Doc, String, Option<String>)> = Vec::new();
    for (d, ds) in m.all::<DaemonSet>() {
        pods.push((
            d,
            m.namespace_of(ds.metadata.namespace.as_ref())
                .unwrap_or_default(),
            pod_spec_of_ds(ds).service_account_name.clone(),
        ));
    }
    for (d, dep) in m.all::<Deployment>() {
        pods.push((
            d,
            m.namespace_of(dep.metadata.namespace.as_ref())
                .unwrap_or_default(),
            pod_spec_of_deploy(dep).service_account_name.clone(),
        ));
    }
    assert!(!pods.is_empty(), "deploy/: no DaemonSet or Deployment");
    for (doc, ns, sa) in pods {
        let sa = sa.unwrap_or_else(|| {
            panic!(
                "deploy/{}: no serviceAccountName (the pod would run as `default`)",
                doc.file
            )
        });
        assert!(
            accounts.contains(&(ns.clone(), sa.clone())),
            "deploy/{}: serviceAccountName {sa} is not a ServiceAccount of namespace {ns} in deploy/",
            doc.file
        );
    }

    let cluster_roles: BTreeSet<String> = m
        .all::<ClusterRole>()
        .into_iter()
        .filter_map(|(_, r)| r.metadata.name.clone())
        .collect();
    let roles: BTreeSet<(String, String)> = m
        .all::<Role>()
        .into_iter()
        .map(|(_, r)| {
            (
                m.namespace_of(r.metadata.namespace.as_ref())
                    .unwrap_or_default(),
                r.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let check_subjects = |doc: &Doc, subjects: &[Subject]| {
        assert!(
            !subjects.is_empty(),
            "deploy/{}#{}: a binding without subjects",
            doc.file,
            doc.index
        );
        for s in subjects {
            assert_eq!(
                s.kind, "ServiceAccount",
                "deploy/{}: subject {} is a {}",
                doc.file, s.name, s.kind
            );
            let ns = s.namespace.clone().unwrap_or_default();
            assert!(
                accounts.contains(&(ns.clone(), s.name.clone())),
                "deploy/{}: subject ServiceAccount {ns}/{} does not exist in deploy/",
                doc.file,
                s.name
            );
        }
    };
    let bindings = m.all::<ClusterRoleBinding>();
    assert!(!bindings.is_empty(), "deploy/: no ClusterRoleBinding");
    for (doc, b) in bindings {
        let r = &b.role_ref;
        assert!(
            r.api_group == "rbac.authorization.k8s.io" && r.kind == "ClusterRole" && cluster_roles.contains(&r.name),
            "deploy/{}: ClusterRoleBinding {:?} refers to {} {} ({}), which is not a ClusterRole in deploy/",
            doc.file, b.metadata.name, r.kind, r.name, r.api_group
        );
        check_subjects(doc, b.subjects.as_deref().unwrap_or_default());
    }
    for (doc, b) in m.all::<RoleBinding>() {
        let ns = m
            .namespace_of(b.metadata.namespace.as_ref())
            .unwrap_or_default();
        let r = &b.role_ref;
        let exists = match r.kind.as_str() {
            "Role" => roles.contains(&(ns.clone(), r.name.clone())),
            "ClusterRole" => cluster_roles.contains(&r.name),
            _ => false,
        };
        assert!(
            r.api_group == "rbac.authorization.k8s.io" && exists,
            "deploy/{}: RoleBinding {ns}/{:?} refers to {} {}, which is not in deploy/ (a Role must be in the binding's namespace)",
            doc.file, b.metadata.name, r.kind, r.name
        );
        check_subjects(doc, b.subjects.as_deref().unwrap_or_default());
    }
}

#[test]
fn agent_args_parse_with_the_agents_flags_and_match_ports_and_mounts() {
    let m = load();
    let (file, agent, args) = agent_args(&m);
    let (_, ds) = m.agent_daemonset();
    let spec = pod_spec_of_ds(ds);

    assert_eq!(
        args.node, NODE,
        "deploy/{file}: --node comes from WARREN_NODE_NAME (spec.nodeName)"
    );
    assert!(
        format!("{:?}", args.control).eq_ignore_ascii_case("kubernetes"),
        "deploy/{file}: the agent runs with --control {:?}, expected kubernetes",
        args.control
    );

    // Ports: the flags, the named container ports, the probes.
    let metrics = named_port(agent, "http-metrics").unwrap_or_else(|| {
        panic!("deploy/{file}: the agent has no containerPort named http-metrics")
    });
    let ready = named_port(agent, "http-ready").unwrap_or_else(|| {
        panic!("deploy/{file}: the agent has no containerPort named http-ready")
    });
    assert_eq!(
        i32::from(args.metrics_addr.port()),
        metrics,
        "deploy/{file}: --metrics-addr {} against containerPort http-metrics {metrics}",
        args.metrics_addr
    );
    assert_eq!(
        i32::from(args.readiness_addr.port()),
        ready,
        "deploy/{file}: --readiness-addr {} against containerPort http-ready {ready}",
        args.readiness_addr
    );
    for (which, probe) in [
        ("readinessProbe", agent.readiness_probe.as_ref()),
        ("livenessProbe", agent.liveness_probe.as_ref()),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("deploy/{file}: the agent has no {which} httpGet"));
        assert_eq!(
            resolve_port(agent, &get.port),
            Some(ready),
            "deploy/{file}: the agent's {which} port {:?} is not the readiness port {ready}",
            get.port
        );
        assert_eq!(
            get.path.as_deref(),
            Some("/healthz/ready"),
            "deploy/{file}: the agent's {which} path"
        );
    }
    // Under hostNetwork the container ports are the node's.
    for p in agent.ports.iter().flatten() {
        if let Some(host) = p.host_port {
            assert_eq!(
                host, p.container_port,
                "deploy/{file}: hostNetwork wants hostPort == containerPort ({:?})",
                p.name
            );
        }
    }

    // Paths: each on a mount of the agent container, and of the right volume.
    let must_be_mounted = |what: &str, path: &Path| -> (&VolumeMount, &Volume) {
        mount_of(agent, spec, path).unwrap_or_else(|| {
            panic!(
                "deploy/{file}: {what} {} is on none of the agent's volumeMounts ({})",
                path.display(),
                describe_mounts(agent)
            )
        })
    };
    let socket_dir = args
        .cni_socket
        .parent()
        .expect("--cni-socket has a directory");
    must_be_mounted("the directory of --cni-socket", socket_dir);
    let (_, proc_volume) = must_be_mounted("--proc-root", &args.proc_root);
    assert_eq!(
        proc_volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/proc"),
        "deploy/{file}: --proc-root {} is not the node's /proc (volume {})",
        args.proc_root.display(),
        proc_volume.name
    );
    let root_cert = args
        .ca_root_cert
        .as_ref()
        .unwrap_or_else(|| panic!("deploy/{file}: the agent has no --ca-root-cert"));
    let (_, root_volume) = must_be_mounted(
        "the directory of --ca-root-cert",
        root_cert.parent().expect("--ca-root-cert has a directory"),
    );
    let cert_name = root_cert.file_name().unwrap().to_string_lossy();
    let cm = root_volume.config_map.as_ref().unwrap_or_else(|| {
        panic!(
            "deploy/{file}: --ca-root-cert is not on a ConfigMap volume (volume {})",
            root_volume.name
        )
    });
    let cm_files: Vec<&str> = cm.items.iter().flatten().map(|i| i.path.as_str()).collect();
    assert!(
        cm_files.is_empty() || cm_files.contains(&cert_name.as_ref()),
        "deploy/{file}: the ConfigMap volume {} does not project {cert_name} (items: {cm_files:?})",
        root_volume.name
    );
    assert_eq!(
        cm.name, "warren-ca-root",
        "deploy/{file}: the CA root ConfigMap"
    );

    let token = args
        .ca_token_file
        .as_ref()
        .unwrap_or_else(|| panic!("deploy/{file}: the agent has no --ca-token-file"));
    let (_, token_volume) = must_be_mounted(
        "the directory of --ca-token-file",
        token.parent().expect("--ca-token-file has a directory"),
    );
    let token_name = token.file_name().unwrap().to_string_lossy();
    let projection = token_volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| t.path == token_name)
        .unwrap_or_else(|| {
            panic!(
                "deploy/{file}: volume {} projects no service account token at {token_name} (--ca-token-file {})",
                token_volume.name,
                token.display()
            )
        });
    assert_eq!(
        projection.audience.as_deref(),
        Some("warren-ca"),
        "deploy/{file}: the CA token's audience"
    );

    // The CNI plugin, on the node, dials the socket that install-cni wrote into its
    // configuration: that must be the agent's socket, on a hostPath both containers mount.
    let install = init_container(spec, INSTALL_CNI_CONTAINER, &file);
    assert_eq!(
        install.command.as_deref().unwrap_or_default(),
        ["warren", "cni", "install"],
        "deploy/{file}: the install-cni command"
    );
    let install_args = install.args.clone().unwrap_or_default();
    let install_socket = flag_value(&install_args, "--socket")
        .unwrap_or_else(|| panic!("deploy/{file}: install-cni has no --socket"));
    assert_eq!(
        Path::new(install_socket),
        args.cni_socket,
        "deploy/{file}: install-cni --socket and the agent's --cni-socket differ"
    );
    let (install_mount, _) = mount_of(install, spec, socket_dir).unwrap_or_else(|| {
        panic!(
            "deploy/{file}: install-cni does not mount the socket's directory {} (its mounts: {})",
            socket_dir.display(),
            describe_mounts(install)
        )
    });
    let (agent_mount, _) = mount_of(agent, spec, socket_dir).unwrap();
    assert_eq!(
        install_mount.name, agent_mount.name,
        "deploy/{file}: the agent and install-cni see the socket's directory through different volumes"
    );
    assert_eq!(
        host_path_of(agent, spec, &args.cni_socket).as_deref(),
        Some(args.cni_socket.as_path()),
        "deploy/{file}: the agent's socket {} is not at the same path on the node (a hostPath mounted at its own path), where the CNI plugin dials it",
        args.cni_socket.display()
    );
}

#[test]
fn agent_host_paths_are_mounted_and_bpf_root_is_on_bpffs() {
    let m = load();
    let (doc, ds) = m.agent_daemonset();
    let spec = pod_spec_of_ds(ds);
    let host_paths: BTreeMap<&str, &str> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| (h.path.as_str(), v.name.as_str()))
        })
        .collect();
    for needed in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/proc",
        "/var/run/warren",
        "/opt/cni/bin",
        "/etc/cni/net.d",
    ] {
        assert!(
            host_paths.contains_key(needed),
            "deploy/{}: no hostPath volume for {needed} (hostPaths: {:?})",
            doc.file,
            host_paths.keys()
        );
    }
    let agent = container(spec, AGENT_CONTAINER, &doc.file);
    let bpffs = host_paths["/sys/fs/bpf"];
    let bpf_mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|mnt| mnt.name == bpffs)
        .unwrap_or_else(|| {
            panic!(
                "deploy/{}: the agent does not mount volume {bpffs} (/sys/fs/bpf)",
                doc.file
            )
        });
    let default_parent = Path::new(warren::config::DEFAULT_BPF_ROOT)
        .parent()
        .unwrap();
    assert_eq!(
        Path::new(&bpf_mount.mount_path),
        default_parent,
        "deploy/{}: bpffs is mounted at {}, but the agent pins under {}",
        doc.file,
        bpf_mount.mount_path,
        warren::config::DEFAULT_BPF_ROOT
    );
    let (_, _, args) = agent_args(&m);
    assert!(
        args.bpf_root.starts_with(&bpf_mount.mount_path),
        "deploy/{}: --bpf-root {} is not on the bpffs mount {}",
        doc.file,
        args.bpf_root.display(),
        bpf_mount.mount_path
    );
    // Mounts of the agent and install-cni all name volumes that exist.
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for mnt in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(mnt.name.as_str()),
                "deploy/{}: container {} mounts volume {}, which the pod does not have",
                doc.file,
                c.name,
                mnt.name
            );
        }
    }
}

#[test]
fn ca_service_matches_the_ca_container_and_the_agents_ca_addr() {
    let m = load();
    let (ca_doc, ca) = m.ca_deployment();
    let ca_spec = pod_spec_of_deploy(ca);
    let ca_container = container(ca_spec, "ca", &ca_doc.file);

    let (agent_file, _, args) = agent_args(&m);
    let addr = args
        .ca_addr
        .as_deref()
        .unwrap_or_else(|| panic!("deploy/{agent_file}: the agent has no --ca-addr"));
    let authority = addr
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("deploy/{agent_file}: --ca-addr {addr} is not https://"))
        .trim_end_matches('/');
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("deploy/{agent_file}: --ca-addr {addr} has no port"));
    let port: i32 = port
        .parse()
        .unwrap_or_else(|_| panic!("deploy/{agent_file}: --ca-addr {addr}: bad port"));
    let (svc_name, svc_ns) = host
        .strip_suffix(".svc")
        .and_then(|h| h.split_once('.'))
        .unwrap_or_else(|| {
            panic!("deploy/{agent_file}: --ca-addr host {host} is not <service>.<namespace>.svc")
        });

    let (svc_doc, svc) = m.one::<Service>(&format!("Service {svc_name}"), |s| {
        s.metadata.name.as_deref() == Some(svc_name)
    });
    let actual_ns = m.namespace_of(svc.metadata.namespace.as_ref());
    assert_eq!(
        actual_ns.as_deref(),
        Some(svc_ns),
        "deploy/{}: Service {svc_name} is in namespace {actual_ns:?}, --ca-addr says {svc_ns}",
        svc_doc.file
    );
    let svc_spec = svc.spec.as_ref().expect("the Service has a spec");
    let svc_port = svc_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port)
        .unwrap_or_else(|| {
            panic!(
                "deploy/{}: Service {svc_name} has no port {port} (--ca-addr {addr})",
                svc_doc.file
            )
        });
    let target = svc_port
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(svc_port.port));
    let container_port = resolve_port(ca_container, &target).unwrap_or_else(|| {
        panic!(
            "deploy/{}: Service {svc_name} targetPort {target:?} is not a port of the CA container in deploy/{}",
            svc_doc.file, ca_doc.file
        )
    });
    assert!(
        ca_container
            .ports
            .iter()
            .flatten()
            .any(|p| p.container_port == container_port),
        "deploy/{}: targetPort {target:?} ({container_port}) is not a containerPort of the CA",
        svc_doc.file
    );
    if let Some(IntOrString::String(name)) = &svc_port.target_port {
        assert_eq!(
            named_port(ca_container, name),
            Some(container_port),
            "deploy/{}: targetPort {name}",
            svc_doc.file
        );
    }
    // The Service selects the CA's pods.
    let selector = svc_spec.selector.clone().unwrap_or_default();
    let pod_labels = ca
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "deploy/{}: Service {svc_name} selector {selector:?} does not select the CA pods (labels {pod_labels:?} in deploy/{})",
        svc_doc.file,
        ca_doc.file
    );
    // The CA listens where its container port says.
    let ca_args = ca_container.args.clone().unwrap_or_default();
    let listen = flag_value(&ca_args, "--listen")
        .unwrap_or_else(|| panic!("deploy/{}: the CA has no --listen", ca_doc.file));
    let listen: std::net::SocketAddr = listen
        .parse()
        .unwrap_or_else(|e| panic!("deploy/{}: --listen {listen}: {e}", ca_doc.file));
    assert_eq!(
        i32::from(listen.port()),
        container_port,
        "deploy/{}: the CA's --listen {listen} against its containerPort {container_port}",
        ca_doc.file
    );
    // The CA keeps its root where the agents mount it from.
    assert_eq!(
        flag_value(&ca_args, "--root-configmap"),
        Some("warren-ca-root"),
        "deploy/{}: --root-configmap against the agents' ConfigMap volume",
        ca_doc.file
    );
    assert_eq!(
        flag_value(&ca_args, "--secret-namespace"),
        m.namespace_of(ca.metadata.namespace.as_ref()).as_deref(),
        "deploy/{}: --secret-namespace against the CA's own namespace (its Role is there)",
        ca_doc.file
    );
    assert_eq!(
        flag_value(&ca_args, "--trust-domain"),
        Some(args.trust_domain.as_str()),
        "deploy/{}: the CA's --trust-domain against the agent's",
        ca_doc.file
    );
    // The same, through the CA's own parser: its certificate names the host agents dial,
    // the agents' token audience is the one it checks, and its files go to a writable
    // volume (the root filesystem is read-only).
    let argv = std::iter::once("warren-ca-serve".to_owned()).chain(ca_args.iter().cloned());
    let parsed = CaServe::try_parse_from(argv).unwrap_or_else(|e| {
        panic!(
            "deploy/{}: `warren ca serve` refuses its args:\n{}",
            ca_doc.file,
            e.render()
        )
    });
    assert!(
        parsed.args.dns_names.iter().any(|name| name == host),
        "deploy/{}: the CA's certificate names {:?}, the agents dial {host}",
        ca_doc.file,
        parsed.args.dns_names
    );
    let (agent_doc, ds) = m.agent_daemonset();
    let audience = pod_spec_of_ds(ds)
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|source| source.service_account_token.as_ref())
        .and_then(|token| token.audience.clone());
    assert_eq!(
        audience.as_deref(),
        Some(parsed.args.token_audience.as_str()),
        "deploy/{}: the agents' projected token audience against the CA's --token-audience",
        agent_doc.file
    );
    let (mount, volume) =
        mount_of(ca_container, ca_spec, &parsed.args.work_dir).unwrap_or_else(|| {
            panic!(
                "deploy/{}: the CA's --work-dir {} is on no volume ({})",
                ca_doc.file,
                parsed.args.work_dir.display(),
                describe_mounts(ca_container)
            )
        });
    assert!(
        volume.empty_dir.is_some() && mount.read_only != Some(true),
        "deploy/{}: the CA's --work-dir must be a writable emptyDir (it holds the CA key)",
        ca_doc.file
    );
    assert_eq!(
        i32::from(parsed.args.readiness_addr.port()),
        named_port(ca_container, "http-ready").unwrap_or_default(),
        "deploy/{}: the CA serves readiness where its probe looks",
        ca_doc.file
    );
}

/// The CA runs two replicas (they share its Secret: the first to start creates it, the
/// other reads it), and a PodDisruptionBudget selecting exactly its pods keeps one up
/// through drains. Its limits are flags its parser takes.
#[test]
fn ca_has_two_replicas_and_a_disruption_budget() {
    let m = load();
    let (ca_doc, ca) = m.ca_deployment();
    let spec = ca.spec.as_ref().expect("the CA Deployment has a spec");
    assert_eq!(
        spec.replicas,
        Some(2),
        "deploy/{}: the CA runs two replicas",
        ca_doc.file
    );
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    let (pdb_doc, pdb) = m.one::<PodDisruptionBudget>("PodDisruptionBudget of the CA", |pdb| {
        pdb.metadata.name.as_deref() == Some("warren-ca")
    });
    assert_eq!(
        m.namespace_of(pdb.metadata.namespace.as_ref()),
        m.namespace_of(ca.metadata.namespace.as_ref()),
        "deploy/{}: the PodDisruptionBudget is in the CA's namespace",
        pdb_doc.file
    );
    let pdb_spec = pdb
        .spec
        .as_ref()
        .expect("the PodDisruptionBudget has a spec");
    assert_eq!(
        pdb_spec.min_available,
        Some(IntOrString::Int(1)),
        "deploy/{}: minAvailable",
        pdb_doc.file
    );
    assert!(
        pdb_spec.max_unavailable.is_none(),
        "deploy/{}: minAvailable or maxUnavailable, not both",
        pdb_doc.file
    );
    let selector = pdb_spec.selector.clone().unwrap_or_default();
    assert!(
        selector.match_expressions.is_none(),
        "deploy/{}: the selector is matchLabels only",
        pdb_doc.file
    );
    let match_labels = selector.match_labels.unwrap_or_default();
    assert!(
        !match_labels.is_empty() && match_labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "deploy/{}: the PodDisruptionBudget's selector {match_labels:?} does not select the CA pods (labels {pod_labels:?} in deploy/{})",
        pdb_doc.file,
        ca_doc.file
    );
    // It selects the CA's pods only (the Deployment's own selector is the same labels).
    let deployment_selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert_eq!(
        match_labels, deployment_selector,
        "deploy/{}: the PodDisruptionBudget selects what the Deployment selects",
        pdb_doc.file
    );
    for (d, ds) in m.all::<DaemonSet>() {
        let ds_labels = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|meta| meta.labels.clone())
            .unwrap_or_default();
        assert!(
            !match_labels
                .iter()
                .all(|(k, v)| ds_labels.get(k) == Some(v)),
            "deploy/{}: the CA's PodDisruptionBudget also selects the agent pods of deploy/{}",
            pdb_doc.file,
            d.file
        );
    }

    // The limits in the CA's args parse, and are the ones meant.
    let ca_container = container(pod_spec_of_deploy(ca), "ca", &ca_doc.file);
    let argv = std::iter::once("warren-ca-serve".to_owned())
        .chain(ca_container.args.clone().unwrap_or_default());
    let parsed = CaServe::try_parse_from(argv).unwrap_or_else(|e| {
        panic!(
            "deploy/{}: `warren ca serve` refuses its args:\n{}",
            ca_doc.file,
            e.render()
        )
    });
    assert_eq!(parsed.args.max_concurrent_requests, 64);
    assert_eq!(parsed.args.max_connections, 1024);
}

/// Every rule granted to a ServiceAccount by the bindings in deploy/.
fn rules_of<'a>(m: &'a Manifests, ns: &str, sa: &str) -> Vec<(&'a Doc, &'a PolicyRule)> {
    let is_sa = |s: &Subject| {
        s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(ns)
    };
    let mut refs: Vec<(String, Option<String>)> = Vec::new();
    for (_, b) in m.all::<ClusterRoleBinding>() {
        if b.subjects.iter().flatten().any(is_sa) {
            refs.push((b.role_ref.name.clone(), None));
        }
    }
    for (_, b) in m.all::<RoleBinding>() {
        if b.subjects.iter().flatten().any(is_sa) {
            let kind_ns = (b.role_ref.kind == "Role").then(|| {
                m.namespace_of(b.metadata.namespace.as_ref())
                    .unwrap_or_default()
            });
            refs.push((b.role_ref.name.clone(), kind_ns));
        }
    }
    let mut rules = Vec::new();
    for (name, role_ns) in refs {
        match role_ns {
            None => {
                for (doc, r) in m.all::<ClusterRole>() {
                    if r.metadata.name.as_deref() == Some(name.as_str()) {
                        rules.extend(r.rules.iter().flatten().map(|rule| (doc, rule)));
                    }
                }
            }
            Some(role_ns) => {
                for (doc, r) in m.all::<Role>() {
                    if r.metadata.name.as_deref() == Some(name.as_str())
                        && m.namespace_of(r.metadata.namespace.as_ref()).as_deref()
                            == Some(role_ns.as_str())
                    {
                        rules.extend(r.rules.iter().flatten().map(|rule| (doc, rule)));
                    }
                }
            }
        }
    }
    rules
}

#[test]
fn agent_rbac_is_read_only_and_crds_are_the_ones_the_agent_watches() {
    let m = load();
    let (doc, ds) = m.agent_daemonset();
    let ns = m
        .namespace_of(ds.metadata.namespace.as_ref())
        .unwrap_or_default();
    let sa = pod_spec_of_ds(ds)
        .service_account_name
        .clone()
        .unwrap_or_default();
    let rules = rules_of(&m, &ns, &sa);
    assert!(
        !rules.is_empty(),
        "deploy/{}: ServiceAccount {ns}/{sa} is bound to no rules",
        doc.file
    );

    const READ: [&str; 3] = ["get", "list", "watch"];
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for (rule_doc, rule) in &rules {
        let at = format!("deploy/{} (rules of {ns}/{sa})", rule_doc.file);
        for verb in &rule.verbs {
            assert!(
                READ.contains(&verb.as_str()),
                "{at}: verb {verb} is not read-only (agent may only get/list/watch)"
            );
        }
        assert!(
            rule.non_resource_urls.is_none(),
            "{at}: nonResourceURLs granted"
        );
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for g in &groups {
            assert_ne!(g, "*", "{at}: every API group granted");
        }
        for r in &resources {
            assert!(
                r != "*" && !r.starts_with("*/"),
                "{at}: every resource granted ({r})"
            );
            assert!(
                r != "secrets" && !r.starts_with("secrets/"),
                "{at}: the agent may read Secrets; it must not"
            );
        }
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    // What the agent watches (agent/src/control/kubernetes.rs).
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "authorizationpolicies"),
    ] {
        for verb in READ {
            assert!(
                granted.contains(&(group.to_owned(), resource.to_owned(), verb.to_owned())),
                "deploy/: ServiceAccount {ns}/{sa} may not {verb} {resource} (group {group:?}), which the agent watches"
            );
        }
    }

    for (kind, plural) in [
        ("PeerAuthentication", "peerauthentications"),
        ("AuthorizationPolicy", "authorizationpolicies"),
    ] {
        let name = format!("{plural}.security.istio.io");
        let (crd_doc, crd) = m
            .one::<CustomResourceDefinition>(&format!("CustomResourceDefinition {name}"), |c| {
                c.metadata.name.as_deref() == Some(name.as_str())
            });
        let at = format!("deploy/{}: CRD {name}", crd_doc.file);
        let spec = &crd.spec;
        assert_eq!(spec.group, "security.istio.io", "{at}: group");
        assert_eq!(spec.names.plural, plural, "{at}: plural");
        assert_eq!(spec.names.kind, kind, "{at}: kind");
        assert_eq!(spec.scope, "Namespaced", "{at}: scope");
        for version in ["v1", "v1beta1"] {
            assert!(
                spec.versions.iter().any(|v| v.name == version && v.served),
                "{at}: {version} is not served (the agent reads v1, else v1beta1; Istio's clients use both)"
            );
        }
        let storage: Vec<&str> = spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            storage.len(),
            1,
            "{at}: storage versions {storage:?}, the API server wants exactly one"
        );
    }
}

#[test]
fn agent_pre_stop_hook_is_a_valid_warren_uninstall() {
    let m = load();
    let (doc, ds) = m.agent_daemonset();
    let agent = container(pod_spec_of_ds(ds), AGENT_CONTAINER, &doc.file);
    let command = agent
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap_or_else(|| panic!("deploy/{}: the agent has no preStop exec hook", doc.file));
    assert!(
        command.iter().all(|a| !a.contains("$(")),
        "deploy/{}: preStop {command:?}: Kubernetes does not expand $(VAR) in lifecycle hooks; \
         the hook inherits the container's env, so let the flag come from its variable",
        doc.file
    );
    assert_eq!(
        command.get(..2).unwrap_or_default(),
        ["warren", "uninstall"],
        "deploy/{}: preStop command",
        doc.file
    );
    // The hook runs in the container, with its environment.
    let env = container_env(agent);
    let argv: Vec<String> = std::iter::once("warren-uninstall".to_owned())
        .chain(command[2..].iter().cloned())
        .collect();
    let argv = with_env(&Uninstall::command(), argv, &env);
    let parsed = Uninstall::try_parse_from(&argv).unwrap_or_else(|e| {
        panic!(
            "deploy/{}: `warren uninstall` refuses the preStop hook {command:?} (with the container's env):\n{}",
            doc.file,
            e.render()
        )
    });
    assert_eq!(
        parsed.args.node, NODE,
        "deploy/{}: preStop uninstall's node",
        doc.file
    );
    let (_, _, agent_args) = agent_args(&m);
    assert_eq!(
        parsed.args.bpf_root, agent_args.bpf_root,
        "deploy/{}: the hook cleans a different bpf root than the agent pins under",
        doc.file
    );
    // The hook cleans the node: the node's /proc, and the CNI dirs the plugin was
    // installed to, all mounted in the agent's container.
    let spec = pod_spec_of_ds(ds);
    let install = init_container(spec, "install-cni", &doc.file);
    let install_args = install.args.clone().unwrap_or_default();
    let on_node = |c: &Container, path: &Path, what: &str| {
        host_path_of(c, spec, path).unwrap_or_else(|| {
            panic!(
                "deploy/{}: {what} {} is on no hostPath mount of {} ({})",
                doc.file,
                path.display(),
                c.name,
                describe_mounts(c)
            )
        })
    };
    assert_eq!(
        on_node(agent, &parsed.args.proc_root, "the hook's --proc-root"),
        Path::new("/proc"),
        "deploy/{}: the hook must see the node's /proc",
        doc.file
    );
    for (hook_dir, install_flag) in [
        (&parsed.args.cni_conf_dir, "--conf-dir"),
        (&parsed.args.cni_bin_dir, "--bin-dir"),
    ] {
        let hook_dir = hook_dir.as_ref().unwrap_or_else(|| {
            panic!(
                "deploy/{}: the hook must take warren-cni out of the chain ({install_flag})",
                doc.file
            )
        });
        let installed = flag_value(&install_args, install_flag)
            .unwrap_or_else(|| panic!("deploy/{}: install-cni has no {install_flag}", doc.file));
        assert_eq!(
            on_node(agent, hook_dir, "the hook's CNI dir"),
            on_node(install, Path::new(installed), "install-cni's dir"),
            "deploy/{}: the hook removes warren-cni from another dir than install-cni put it in",
            doc.file
        );
    }
    assert_eq!(
        parsed.args.unless_daemonset_remains.as_deref(),
        Some(
            format!(
                "{}/{}",
                m.namespace_of(ds.metadata.namespace.as_ref())
                    .unwrap_or_default(),
                ds.metadata.name.clone().unwrap_or_default()
            )
            .as_str()
        ),
        "deploy/{}: the hook must do nothing during a rollout of its own DaemonSet",
        doc.file
    );
}

/// `warren <subcommand…> --help` from the built binary.
fn help(subcommand: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(subcommand)
        .arg("--help")
        .env_remove("RUST_LOG")
        .output()
        .expect("warren runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn ca_and_install_cni_flags_are_the_binarys() {
    let m = load();
    let (ca_doc, ca) = m.ca_deployment();
    let ca_container = container(pod_spec_of_deploy(ca), "ca", &ca_doc.file);
    let (ds_doc, ds) = m.agent_daemonset();
    let install = init_container(pod_spec_of_ds(ds), INSTALL_CNI_CONTAINER, &ds_doc.file);
    for (file, c) in [(&ca_doc.file, ca_container), (&ds_doc.file, install)] {
        let command = c.command.clone().unwrap_or_default();
        assert_eq!(
            command.first().map(String::as_str),
            Some("warren"),
            "deploy/{file}: {}",
            c.name
        );
        let sub: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        let text = help(&sub).unwrap_or_else(|e| {
            panic!(
                "deploy/{file}: container {} runs `{}`, which the binary does not know:\n{e}",
                c.name,
                command.join(" ")
            )
        });
        for flag in c.args.iter().flatten().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            let known = text
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-'))
                .any(|word| word == flag);
            assert!(
                known,
                "deploy/{file}: container {} passes {flag}, which `{} --help` does not list",
                c.name,
                command.join(" ")
            );
        }
    }
}
