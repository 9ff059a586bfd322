//! `cargo xtask lab apply -f`: Istio policy files placed where every agent reads them —
//! checked first, as `kubectl apply` validates against the schema before anything is
//! stored. The check is the agent's own decoder, run through the `warren` binary
//! (`warren policy validate`: it reads a policy exactly as the agent does and fails, with
//! file, line, column and reason, when a document does not decode), since the lab does
//! not link the agent's library: that would build the eBPF programs into every xtask
//! command.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Where `file` goes in `dir` (under its own name; `.yaml` added when it has neither
/// `.yaml` nor `.yml`, the only files the agents read).
pub fn target(dir: &Path, file: &Path) -> Result<PathBuf> {
    let name = file
        .file_name()
        .with_context(|| format!("{} is not a file name", file.display()))?;
    let mut name = PathBuf::from(name);
    if !matches!(
        name.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    ) {
        name.set_extension("yaml");
    }
    Ok(dir.join(name))
}

/// Whether the agents would accept `file`: decoded by `warren` (the binary at `warren`).
/// The error names the file, line, column and reason, as the agent would log them.
pub fn validate(warren: &Path, file: &Path) -> Result<()> {
    let out = Command::new(warren)
        .args(["policy", "validate"])
        .arg(file)
        .output()
        .with_context(|| format!("running {} policy validate", warren.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr.trim().trim_start_matches("error: ");
        bail!("{reason}\nthe agents would refuse this file; nothing was applied")
    }
    Ok(())
}

/// [`validate`] `file`, then copy it into `dir` (see [`target`]); a file that does not
/// decode is refused and nothing is placed. Returns where it was placed.
pub fn apply(warren: &Path, file: &Path, dir: &Path) -> Result<PathBuf> {
    let target = target(dir, file)?;
    validate(warren, file)?;
    place(file, &target)?;
    Ok(target)
}

/// Copy `file` to `target` atomically (a temporary file renamed), so an agent never
/// reads half of it.
pub fn place(file: &Path, target: &Path) -> Result<()> {
    let tmp = target.with_extension("tmp");
    fs::copy(file, &tmp)
        .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))?;
    fs::rename(&tmp, target)
        .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls:
    mode: STRICT
";

    /// The agent's binary, built as the lab builds it.
    fn warren() -> PathBuf {
        crate::cargo::build_bin("warren", "warren").expect("building warren")
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("warren-lab-policy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("policies")).unwrap();
        dir
    }

    #[test]
    fn a_file_that_does_not_decode_is_refused_with_its_place_and_nothing_is_placed() {
        let warren = warren();
        let dir = scratch("refused");
        let broken = dir.join("broken.yaml");
        // `mod` for `mode`, on line 8.
        fs::write(&broken, STRICT.replace("mode: STRICT", "mod: STRICT")).unwrap();
        let policies = dir.join("policies");
        let err = apply(&warren, &broken, &policies).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:8:", broken.display())),
            "file:line:column first: {err}"
        );
        assert!(err.contains("mod"), "the unknown field: {err}");
        assert!(err.contains("nothing was applied"), "{err}");
        assert_eq!(
            fs::read_dir(&policies).unwrap().count(),
            0,
            "nothing placed in the policy directory"
        );

        // A file that decodes goes in, under its own name.
        let good = dir.join("strict.yml");
        fs::write(&good, STRICT).unwrap();
        let placed = apply(&warren, &good, &policies).unwrap();
        assert_eq!(placed, policies.join("strict.yml"));
        assert_eq!(fs::read_to_string(&placed).unwrap(), STRICT);
        assert_eq!(fs::read_dir(&policies).unwrap().count(), 1);

        // A broken new version of an applied file leaves the applied one in place.
        fs::write(&good, STRICT.replace("STRICT", "strict")).unwrap();
        assert!(apply(&warren, &good, &policies).is_err());
        assert_eq!(fs::read_to_string(&placed).unwrap(), STRICT);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_without_a_yaml_extension_get_one() {
        let dir = Path::new("/run/warren-lab/policies");
        assert_eq!(
            target(dir, Path::new("/tmp/strict")).unwrap(),
            dir.join("strict.yaml")
        );
        assert_eq!(
            target(dir, Path::new("a/b.yml")).unwrap(),
            dir.join("b.yml")
        );
    }
}
