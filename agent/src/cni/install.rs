//! `warren cni install` / `uninstall`: put `warren-cni` at the end of the node's CNI
//! chain, and take it out again.
//!
//! The runtime uses the first network config in its conf dir (lexical order). A
//! `.conflist` gets warren's entry appended to its `plugins`; a single-plugin `.conf` is
//! rewritten as a `.conflist` holding it and warren's entry (the `.conf` is removed, as
//! istio-cni does). Each write goes to a temporary file that is renamed over the old
//! one, so the runtime never reads half a file. Installing twice changes nothing.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "warren-cni";

/// Namespaces whose pods start without the agent unless told otherwise: the cluster's
/// own, and warren's.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "warren-system"];

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The node's CNI plugin directory (mounted into the container).
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI config directory (mounted into the container).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's socket, as a path on the node.
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_CNI_SOCKET)]
    pub socket: PathBuf,
    /// Namespaces whose pods start even when the agent does not answer.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EXCLUDED_NAMESPACES.map(String::from))]
    pub exclude_namespaces: Vec<String>,
    /// The `warren-cni` binary to copy (default: beside this `warren`).
    #[arg(long, value_name = "FILE")]
    pub plugin: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network config in {0}: install the cluster's network plugin first (warren-cni chains after it)")]
    NoNetwork(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CNI config warren can chain to: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the warren-cni binary at {path}: {source} (pass --plugin FILE)")]
    Plugin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The network config the runtime would use: the first `.conflist`/`.conf`/`.json`.
fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let entries = std::fs::read_dir(conf_dir).map_err(|source| InstallError::Read {
        path: conf_dir.to_owned(),
        source,
    })?;
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    configs.sort();
    configs
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoNetwork(conf_dir.to_owned()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read_to_string(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| InstallError::Invalid {
        path: path.to_owned(),
        reason: err.to_string(),
    })
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("warren-tmp");
    std::fs::write(&temporary, contents).map_err(err)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&temporary, path).map_err(err)
}

/// Copy the plugin and chain it; returns the config file written.
pub fn install(args: &InstallArgs) -> Result<PathBuf, InstallError> {
    let plugin = match &args.plugin {
        Some(plugin) => plugin.clone(),
        None => std::env::current_exe()
            .map_err(|source| InstallError::Plugin {
                path: PathBuf::from(PLUGIN_TYPE),
                source,
            })?
            .with_file_name(PLUGIN_TYPE),
    };
    let binary = std::fs::read(&plugin).map_err(|source| InstallError::Plugin {
        path: plugin.clone(),
        source,
    })?;
    write_atomically(&args.bin_dir.join(PLUGIN_TYPE), &binary, 0o755)?;

    let path = primary_config(&args.conf_dir)?;
    let config = read_json(&path)?;
    let entry = json!({
        "type": PLUGIN_TYPE,
        "socket": args.socket,
        "excludeNamespaces": args.exclude_namespaces,
    });
    let (target, chained) = chain(&path, config, entry)?;
    write_atomically(&target, format!("{chained:#}\n").as_bytes(), 0o644)?;
    if target != path {
        let _ = std::fs::remove_file(&path);
    }
    Ok(target)
}

/// The config with warren's entry last in its plugins (a `.conf` becomes a `.conflist`).
fn chain(path: &Path, mut config: Value, entry: Value) -> Result<(PathBuf, Value), InstallError> {
    let invalid = |reason: &str| InstallError::Invalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if config.get("plugins").is_none() {
        // A single plugin: lift it into a list.
        let Some(object) = config.as_object_mut() else {
            return Err(invalid("not a JSON object"));
        };
        let version = object.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        let name = object
            .get("name")
            .cloned()
            .unwrap_or(json!("k8s-pod-network"));
        object.remove("cniVersion");
        object.remove("name");
        config = json!({"cniVersion": version, "name": name, "plugins": [Value::Object(object.clone())]});
    }
    let Some(plugins) = config["plugins"].as_array_mut() else {
        return Err(invalid("\"plugins\" is not a list"));
    };
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(entry);
    Ok((path.with_extension("conflist"), config))
}

/// Take warren out of the chain and remove the plugin; returns what was changed.
pub fn uninstall(args: &UninstallArgs) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    if let Ok(path) = primary_config(&args.conf_dir) {
        let mut config = read_json(&path)?;
        if let Some(plugins) = config["plugins"].as_array_mut() {
            let before = plugins.len();
            plugins.retain(|p| p["type"] != PLUGIN_TYPE);
            if plugins.len() != before {
                write_atomically(&path, format!("{config:#}\n").as_bytes(), 0o644)?;
                changed.push(path);
            }
        }
    }
    let binary = args.bin_dir.join(PLUGIN_TYPE);
    if std::fs::remove_file(&binary).is_ok() {
        changed.push(binary);
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::write(dir.join("warren-cni"), b"#!plugin").unwrap();
        InstallArgs {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            socket: "/var/run/warren/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            plugin: Some(dir.join("warren-cni")),
        }
    }

    #[test]
    fn chains_after_the_first_conflist_once_and_uninstalls() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let conflist = args.conf_dir.join("10-calico.conflist");
        std::fs::write(
            &conflist,
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(args.conf_dir.join("99-other.conflist"), "{}").unwrap();
        assert_eq!(install(&args).unwrap(), conflist);
        install(&args).unwrap();
        let config = read_json(&conflist).unwrap();
        let types: Vec<&str> = config["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["calico", "portmap", "warren-cni"], "once, last");
        assert_eq!(config["plugins"][2]["socket"], "/var/run/warren/cni.sock");
        assert_eq!(
            std::fs::read(args.bin_dir.join("warren-cni")).unwrap(),
            b"#!plugin"
        );

        let removed = uninstall(&UninstallArgs {
            bin_dir: args.bin_dir.clone(),
            conf_dir: args.conf_dir.clone(),
        })
        .unwrap();
        assert_eq!(removed.len(), 2);
        let config = read_json(&conflist).unwrap();
        assert_eq!(config["plugins"].as_array().unwrap().len(), 2);
        assert!(!args.bin_dir.join("warren-cni").exists());
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let conf = args.conf_dir.join("10-bridge.conf");
        std::fs::write(
            &conf,
            r#"{"cniVersion":"0.4.0","name":"bridge","type":"bridge","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        let written = install(&args).unwrap();
        assert_eq!(written, args.conf_dir.join("10-bridge.conflist"));
        assert!(!conf.exists());
        let config = read_json(&written).unwrap();
        assert_eq!(config["cniVersion"], "0.4.0");
        assert_eq!(config["plugins"][0]["ipam"]["type"], "host-local");
        assert_eq!(config["plugins"][1]["type"], "warren-cni");
    }

    #[test]
    fn no_network_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = install(&args(dir.path())).unwrap_err();
        assert!(matches!(err, InstallError::NoNetwork(_)), "{err}");
        assert!(err.to_string().contains("network plugin first"));
    }
}
