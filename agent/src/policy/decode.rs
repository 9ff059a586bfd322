//! Kubernetes-style YAML → [`Policy`]: `apiVersion: security.istio.io/v1` (or `v1beta1`,
//! the same schema), kinds `PeerAuthentication` and `AuthorizationPolicy`, several
//! documents per file (`---`), or a directory of `*.yaml`/`*.yml` files read in file-name
//! order (hidden files skipped, subdirectories not entered). Other kinds are skipped
//! (debug log), so a file may also hold the Deployments the policies are about.
//!
//! Strict where a slip could weaken policy: an unknown field in `spec` (`principal:` for
//! `principals:`), an unknown `when` key, a bad CIDR or port, a mode or action in the
//! wrong case, an `AuthorizationPolicy` under another API group — each is an error that
//! names the file, line and column, the document, and the field:
//!
//! ```text
//! policies/authz.yaml:14:9 (document 2): spec.rules[0].from[0].source: unknown field `principal`, expected one of `principals`, ...
//! ```
//!
//! `metadata` is lenient (Kubernetes adds many fields): `name` is required, `namespace`
//! defaults to `default`, `creationTimestamp` is optional (RFC 3339), and the
//! `istio.io/dry-run` annotation is noted. Decoding any text returns an error or
//! policies, never panics; serde_yaml bounds recursion and alias expansion.
use std::{
    collections::{BTreeMap, HashMap},
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::{
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor},
    Deserialize, Deserializer,
};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::{
    model::{
        Action, AuthorizationPolicy, BrokenPolicy, Condition, IpBlock, Match, Operation,
        PeerAuthentication, PeerAuthenticationMode, Policy, PolicyMeta, Rule, ServiceAccountMatch,
        Source, StringMatch, WorkloadSelector,
    },
    PolicyKind,
};

/// The API group of both kinds.
pub const API_GROUP: &str = "security.istio.io";
/// The versions read (one schema).
pub const API_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list policy directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(InvalidDocument),
    #[error("{kind} {namespace}/{name} is defined twice: in {first} and in {second}")]
    Duplicate {
        kind: PolicyKind,
        namespace: String,
        name: String,
        first: String,
        second: String,
    },
}

/// A document that is not valid: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDocument {
    pub path: PathBuf,
    /// 1-based, in the file.
    pub document: usize,
    /// 1-based, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong, prefixed with the field's path (`spec.rules[0].from[0].source: ...`).
    pub message: String,
}

impl fmt::Display for InvalidDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "{path}:{line}:{column}")?,
            (Some(line), None) => write!(f, "{path}:{line}")?,
            _ => write!(f, "{path}")?,
        }
        write!(f, " (document {}): {}", self.document, self.message)
    }
}

/// What a policy path (or one file) decodes to: the policies of the documents that
/// decode, and what could be read of those that do not ([`BrokenPolicy`]: they fail
/// closed for what they target). One document that does not decode spoils neither the
/// other documents of its file nor the other files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    pub policies: Vec<Policy>,
    pub broken: Vec<BrokenPolicy>,
}

/// The policy files of a path and their contents, read once: what the policy watch
/// compares from one poll to the next, and what it decodes — so what was seen stable is
/// exactly what is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFiles {
    /// In file-name order; a file that could not be read has the error.
    files: Vec<(PathBuf, FileContents)>,
}

/// A file's bytes, or why it could not be read (comparable, unlike `io::Error`).
type FileContents = Result<Vec<u8>, (io::ErrorKind, String)>;

impl PolicyFiles {
    /// Read a policy file, or every `*.yaml`/`*.yml` file of a directory. Only the path
    /// itself (or listing the directory) failing is an error; a file of the directory
    /// that cannot be read is kept as such (it fails closed when decoded), and one that
    /// vanished since the listing is left out.
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let metadata = fs::metadata(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let paths = if metadata.is_dir() {
            policy_files(path)?
        } else {
            vec![path.to_owned()]
        };
        let mut files = Vec::with_capacity(paths.len());
        for file in paths {
            match fs::read(&file) {
                Ok(bytes) => files.push((file, Ok(bytes))),
                Err(err) if err.kind() == io::ErrorKind::NotFound && file != path => {}
                Err(err) => files.push((file, Err((err.kind(), err.to_string())))),
            }
        }
        Ok(Self { files })
    }

    /// Decode every file, document by document ([`Decoded`]). A policy defined twice
    /// (same kind, namespace and name): the first is read, the second is broken.
    pub fn decode(&self) -> Decoded {
        let mut decoded = Decoded::default();
        for (file, contents) in &self.files {
            let text = match contents {
                Ok(bytes) => match utf8(bytes, file) {
                    Ok(text) => text,
                    Err(invalid) => {
                        decoded.broken.push(BrokenPolicy {
                            location: file.display().to_string(),
                            kind: None,
                            namespace: None,
                            selector: None,
                            error: invalid.to_string(),
                        });
                        continue;
                    }
                },
                Err((_, message)) => {
                    decoded.broken.push(BrokenPolicy {
                        location: file.display().to_string(),
                        kind: None,
                        namespace: None,
                        selector: None,
                        error: format!("cannot read policy file {}: {message}", file.display()),
                    });
                    continue;
                }
            };
            for outcome in documents(text, file) {
                match outcome {
                    Ok(policy) => decoded.policies.push(policy),
                    Err(broken) => decoded.broken.push(broken.broken),
                }
            }
        }
        let mut seen: HashMap<(PolicyKind, String, String), String> = HashMap::new();
        let mut policies = Vec::with_capacity(decoded.policies.len());
        for policy in std::mem::take(&mut decoded.policies) {
            let meta = policy.meta();
            let key = (policy.kind(), meta.namespace.clone(), meta.name.clone());
            match seen.get(&key) {
                Some(first) => decoded.broken.push(BrokenPolicy {
                    location: meta.origin.clone(),
                    kind: Some(policy.kind()),
                    namespace: Some(meta.namespace.clone()),
                    selector: match &policy {
                        Policy::PeerAuthentication(p) => p.selector.clone(),
                        Policy::AuthorizationPolicy(p) => p.selector.clone(),
                    },
                    error: format!(
                        "{} {}/{} is defined twice: in {first} and in {}; only the first is read",
                        policy.kind(),
                        meta.namespace,
                        meta.name,
                        meta.origin
                    ),
                }),
                None => {
                    seen.insert(key, meta.origin.clone());
                    policies.push(policy);
                }
            }
        }
        decoded.policies = policies;
        decoded
    }
}

/// Read a policy file or directory and decode it document by document ([`Decoded`]):
/// what the agent and `warren check` read. Only an unreadable path is an error.
pub fn load_documents(path: &Path) -> Result<Decoded, PolicyError> {
    Ok(PolicyFiles::read(path)?.decode())
}

/// Read a policy file, or every `*.yaml`/`*.yml` file of a directory in file-name order,
/// strictly: the first document that does not decode, and a name defined twice (same
/// kind, namespace and name), is an error. ([`load_documents`] is the lenient reading
/// the agent uses.)
pub fn load_path(path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let files = PolicyFiles::read(path)?;
    let mut policies = Vec::new();
    for (file, contents) in &files.files {
        let bytes = contents
            .as_ref()
            .map_err(|(kind, message)| PolicyError::Read {
                path: file.clone(),
                source: io::Error::new(*kind, message.clone()),
            })?;
        let text = utf8(bytes, file).map_err(PolicyError::Invalid)?;
        policies.extend(decode_documents(text, file)?);
    }
    check_duplicates(&policies)?;
    Ok(policies)
}

fn utf8<'a>(bytes: &'a [u8], file: &Path) -> Result<&'a str, InvalidDocument> {
    std::str::from_utf8(bytes).map_err(|err| InvalidDocument {
        path: file.to_owned(),
        document: 1,
        line: None,
        column: None,
        message: format!("the file is not UTF-8 text ({err})"),
    })
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_dir_error = |source| PolicyError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !is_yaml {
            continue;
        }
        let path = entry.path();
        // Follows symlinks (a mounted ConfigMap's files are symlinks). A file that
        // vanished since the listing is not one; one that cannot be inspected is kept,
        // so that reading it fails (closed).
        match fs::metadata(&path) {
            Ok(metadata) if !metadata.is_file() => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            _ => files.push(path),
        }
    }
    files.sort();
    Ok(files)
}

/// Decode the documents of one file (`path` is for messages), in order, strictly: the
/// first document that does not decode, or a name defined twice, is an error.
pub fn decode_str(text: &str, path: &Path) -> Result<Vec<Policy>, PolicyError> {
    let policies = decode_documents(text, path)?;
    check_duplicates(&policies)?;
    Ok(policies)
}

/// Decode the documents of one file leniently, as the agent does ([`Decoded`]).
pub fn decode_file(text: &str, path: &Path) -> Decoded {
    let mut decoded = Decoded::default();
    for outcome in documents(text, path) {
        match outcome {
            Ok(policy) => decoded.policies.push(policy),
            Err(broken) => decoded.broken.push(broken.broken),
        }
    }
    decoded
}

fn decode_documents(text: &str, path: &Path) -> Result<Vec<Policy>, PolicyError> {
    documents(text, path)
        .into_iter()
        .map(|outcome| outcome.map_err(|broken| PolicyError::Invalid(broken.invalid)))
        .collect()
}

/// A document that does not decode: the error, and what could be read of it.
struct Failed {
    invalid: InvalidDocument,
    broken: BrokenPolicy,
}

/// The policies of a file's documents, and its documents that do not decode, in order.
/// Each document is parsed on its own ([`split_documents`]), so a syntax error in one
/// leaves the next ones readable.
fn documents(text: &str, path: &Path) -> Vec<Result<Policy, Failed>> {
    let mut outcomes = Vec::new();
    let mut number = 0;
    for (first_line, chunk) in split_documents(text) {
        let fail = |invalid: InvalidDocument| {
            let salvaged = salvage(chunk);
            Failed {
                broken: BrokenPolicy {
                    location: format!("{}:{first_line}", path.display()),
                    kind: salvaged.kind,
                    namespace: salvaged.namespace,
                    selector: salvaged.selector,
                    error: invalid.to_string(),
                },
                invalid,
            }
        };
        let before = number;
        for document in serde_yaml::Deserializer::from_str(chunk) {
            number += 1;
            let origin = format!("{}, document {number}", path.display());
            match (DocumentSeed { origin: &origin }).deserialize(document) {
                Ok(Outcome::Empty) => {}
                Ok(Outcome::Ignored { api_version, kind }) => {
                    tracing::debug!(file = %path.display(), document = number, %api_version, %kind, "skipping a document that is neither a PeerAuthentication nor an AuthorizationPolicy");
                }
                Ok(Outcome::Policy(policy)) => outcomes.push(Ok(policy)),
                Err(err) => {
                    let mut invalid = invalid_document(path, number, &err);
                    invalid.line = invalid.line.map(|line| line + first_line - 1);
                    outcomes.push(Err(fail(invalid)));
                    break;
                }
            }
        }
        // A parser that yields nothing for text that is not empty must not make it
        // "no policy".
        if number == before && has_content(chunk) {
            if let Err(err) = serde_yaml::from_str::<serde_yaml::Value>(chunk) {
                number += 1;
                let mut invalid = invalid_document(path, number, &err);
                invalid.line = invalid.line.map(|line| line + first_line - 1);
                outcomes.push(Err(fail(invalid)));
            }
        }
    }
    outcomes
}

/// Whether a line holds YAML content (not blank, a comment or a directive).
fn is_content(line: &str) -> bool {
    let line = line.trim_start_matches('\u{feff}').trim();
    !(line.is_empty() || line.starts_with('#') || line.starts_with('%'))
}

fn has_content(text: &str) -> bool {
    text.lines().any(is_content)
}

/// The documents of a file, each with its first line (1-based): split before every line
/// that starts with the document marker `---` (which YAML never allows inside a
/// document at column 0). What precedes the first marker is a document of its own only
/// if it holds content; comments and directives there go with the next one.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let is_marker = |line: &str| {
        line.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    let mut starts = vec![(1, 0)];
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if offset > 0 && is_marker(line) {
            starts.push((index + 1, offset));
        }
        offset += line.len();
    }
    if starts.len() > 1 && !has_content(&text[..starts[1].1]) {
        starts.remove(1);
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &(line, start))| {
            let end = starts.get(i + 1).map_or(text.len(), |&(_, end)| end);
            (line, &text[start..end])
        })
        .collect()
}

/// What can be read of a document that does not decode.
#[derive(Default)]
struct Salvaged {
    kind: Option<PolicyKind>,
    namespace: Option<String>,
    selector: Option<WorkloadSelector>,
}

/// Read the kind, namespace and selector of a document that does not decode, as far as
/// it parses as YAML at all; whatever cannot be read is left `None` (the widest scope).
fn salvage(chunk: &str) -> Salvaged {
    use serde_yaml::Value;
    let Ok(document) = serde_yaml::from_str::<Value>(chunk) else {
        return Salvaged::default();
    };
    let kind = match document.get("kind").and_then(Value::as_str) {
        Some("PeerAuthentication") => Some(PolicyKind::PeerAuthentication),
        Some("AuthorizationPolicy") => Some(PolicyKind::AuthorizationPolicy),
        _ => None,
    };
    let namespace = match document.get("metadata") {
        Some(Value::Mapping(metadata)) => match metadata.get("namespace") {
            None | Some(Value::Null) => Some("default".to_owned()),
            Some(Value::String(ns)) if ns.is_empty() => Some("default".to_owned()),
            Some(Value::String(ns)) => Some(ns.clone()),
            Some(_) => None,
        },
        _ => None,
    };
    let selector = document
        .get("spec")
        .and_then(|spec| spec.get("selector"))
        .and_then(|selector| selector.get("matchLabels"))
        .and_then(Value::as_mapping)
        .and_then(|labels| {
            labels
                .iter()
                .map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect::<Option<BTreeMap<String, String>>>()
        })
        .filter(|labels| !labels.is_empty())
        .map(|match_labels| WorkloadSelector { match_labels });
    Salvaged {
        kind,
        namespace,
        selector,
    }
}

fn invalid_document(path: &Path, document: usize, err: &serde_yaml::Error) -> InvalidDocument {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(location) = &location {
        let suffix = format!(" at line {} column {}", location.line(), location.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    InvalidDocument {
        path: path.to_owned(),
        document,
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

fn check_duplicates(policies: &[Policy]) -> Result<(), PolicyError> {
    let mut seen: HashMap<(PolicyKind, &str, &str), &str> = HashMap::new();
    for policy in policies {
        let meta = policy.meta();
        let key = (policy.kind(), meta.namespace.as_str(), meta.name.as_str());
        if let Some(first) = seen.insert(key, &meta.origin) {
            return Err(PolicyError::Duplicate {
                kind: policy.kind(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                first: first.to_owned(),
                second: meta.origin.clone(),
            });
        }
    }
    Ok(())
}

// ---- one document ------------------------------------------------------------------

enum Outcome {
    /// An empty document (`---` followed by nothing, or only comments).
    Empty,
    Ignored {
        api_version: String,
        kind: String,
    },
    Policy(Policy),
}

/// Decodes one document in a single pass, so that errors inside `spec` keep their line
/// and column: `spec` is decoded into the kind's types when `apiVersion` and `kind` come
/// first (as `kubectl` writes them), and buffered otherwise.
struct DocumentSeed<'a> {
    origin: &'a str,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Outcome;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Outcome, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Outcome;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object (a mapping with apiVersion, kind, metadata and spec)")
    }

    fn visit_none<E: de::Error>(self) -> Result<Outcome, E> {
        Ok(Outcome::Empty)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Outcome, E> {
        Ok(Outcome::Empty)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Outcome, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Outcome, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<String> = None;
        let mut metadata: Slot<Metadata> = Slot::Absent;
        let mut spec: Slot<Spec> = Slot::Absent;
        while let Some(key) = map.next_key::<String>()? {
            let duplicate = || de::Error::custom(format!("`{key}` appears twice"));
            match key.as_str() {
                "apiVersion" | "kind" => {
                    let slot = if key == "kind" {
                        &mut kind
                    } else {
                        &mut api_version
                    };
                    if slot.is_some() {
                        return Err(duplicate());
                    }
                    *slot = Some(map.next_value()?);
                }
                "metadata" => {
                    if !matches!(metadata, Slot::Absent) {
                        return Err(duplicate());
                    }
                    metadata = match classify(api_version.as_deref(), kind.as_deref())
                        .map_err(de::Error::custom)?
                    {
                        Class::Policy(_) => Slot::Typed(map.next_value()?),
                        Class::Other => {
                            map.next_value::<IgnoredAny>()?;
                            Slot::Skipped
                        }
                        Class::NotYetKnown => Slot::Buffered(map.next_value()?),
                    };
                }
                "spec" => {
                    if !matches!(spec, Slot::Absent) {
                        return Err(duplicate());
                    }
                    spec = match classify(api_version.as_deref(), kind.as_deref())
                        .map_err(de::Error::custom)?
                    {
                        Class::Policy(PolicyKind::PeerAuthentication) => {
                            Slot::Typed(Spec::Peer(map.next_value()?))
                        }
                        Class::Policy(PolicyKind::AuthorizationPolicy) => {
                            Slot::Typed(Spec::Authz(map.next_value()?))
                        }
                        Class::Other => {
                            map.next_value::<IgnoredAny>()?;
                            Slot::Skipped
                        }
                        Class::NotYetKnown => Slot::Buffered(map.next_value()?),
                    };
                }
                // status, and anything else Kubernetes adds.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        finish(api_version, kind, metadata, spec, self.origin).map_err(de::Error::custom)
    }
}

enum Slot<T> {
    Absent,
    Typed(T),
    /// Read before `apiVersion` and `kind`: decoded at the end (without line numbers).
    Buffered(serde_yaml::Value),
    Skipped,
}

enum Spec {
    Peer(Option<PeerSpec>),
    Authz(Option<AuthzSpec>),
}

enum Class {
    Policy(PolicyKind),
    Other,
    NotYetKnown,
}

fn classify(api_version: Option<&str>, kind: Option<&str>) -> Result<Class, String> {
    let policy_kind = match kind {
        Some("PeerAuthentication") => PolicyKind::PeerAuthentication,
        Some("AuthorizationPolicy") => PolicyKind::AuthorizationPolicy,
        Some(list @ ("List" | "PeerAuthenticationList" | "AuthorizationPolicyList")) => {
            return Err(format!(
                "kind {list} is not supported: put each object in a document of its own (separated by ---)"
            ))
        }
        Some(_) => return Ok(Class::Other),
        None => return Ok(Class::NotYetKnown),
    };
    let Some(api_version) = api_version else {
        return Ok(Class::NotYetKnown);
    };
    match api_version.split_once('/') {
        Some((API_GROUP, version)) if API_VERSIONS.contains(&version) => {
            Ok(Class::Policy(policy_kind))
        }
        _ => Err(format!(
            "apiVersion {api_version:?} is not supported for {policy_kind}: use {API_GROUP}/v1 or {API_GROUP}/v1beta1"
        )),
    }
}

fn finish(
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Slot<Metadata>,
    spec: Slot<Spec>,
    origin: &str,
) -> Result<Outcome, String> {
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err(
            "the document needs `apiVersion` and `kind` (e.g. apiVersion: security.istio.io/v1, kind: AuthorizationPolicy)"
                .to_owned(),
        );
    };
    let policy_kind = match classify(Some(&api_version), Some(&kind))? {
        Class::Policy(policy_kind) => policy_kind,
        Class::Other | Class::NotYetKnown => return Ok(Outcome::Ignored { api_version, kind }),
    };
    let metadata = match metadata {
        Slot::Typed(metadata) => metadata,
        Slot::Buffered(value) => {
            serde_yaml::from_value(value).map_err(|err| format!("metadata: {err}"))?
        }
        Slot::Absent | Slot::Skipped => {
            return Err(format!(
                "{kind} has no `metadata` (metadata.name is required)"
            ))
        }
    };
    let meta = metadata.into_meta(origin);
    let policy = match (policy_kind, spec) {
        (PolicyKind::PeerAuthentication, Slot::Typed(Spec::Peer(spec))) => {
            peer_authentication(meta, spec.unwrap_or_default())
        }
        (PolicyKind::AuthorizationPolicy, Slot::Typed(Spec::Authz(spec))) => {
            authorization_policy(meta, spec.unwrap_or_default())
        }
        (PolicyKind::PeerAuthentication, Slot::Buffered(value)) => {
            let spec: Option<PeerSpec> =
                serde_yaml::from_value(value).map_err(|err| format!("spec: {err}"))?;
            peer_authentication(meta, spec.unwrap_or_default())
        }
        (PolicyKind::AuthorizationPolicy, Slot::Buffered(value)) => {
            let spec: Option<AuthzSpec> =
                serde_yaml::from_value(value).map_err(|err| format!("spec: {err}"))?;
            authorization_policy(meta, spec.unwrap_or_default())
        }
        // No spec: Istio reads it as an empty one (for an AuthorizationPolicy: allow nothing).
        (PolicyKind::PeerAuthentication, _) => peer_authentication(meta, PeerSpec::default()),
        (PolicyKind::AuthorizationPolicy, _) => authorization_policy(meta, AuthzSpec::default()),
    };
    Ok(Outcome::Policy(policy))
}

fn peer_authentication(meta: PolicyMeta, spec: PeerSpec) -> Policy {
    Policy::PeerAuthentication(PeerAuthentication {
        meta,
        selector: selector(spec.selector),
        mode: spec.mtls.map(Mtls::mode).unwrap_or_default(),
        port_level_mtls: spec
            .port_level_mtls
            .unwrap_or_default()
            .into_iter()
            .map(|(port, mtls)| (port.0, mtls.mode()))
            .collect(),
    })
}

fn authorization_policy(meta: PolicyMeta, spec: AuthzSpec) -> Policy {
    let mut rules: Vec<Rule> = spec.rules;
    // `serviceAccounts: [sa]` means `sa` in the policy's namespace.
    for rule in &mut rules {
        for source in &mut rule.from {
            let accounts = &mut source.service_accounts;
            for account in accounts
                .values
                .iter_mut()
                .chain(accounts.not_values.iter_mut())
            {
                if account.namespace.is_empty() {
                    account.namespace = meta.namespace.clone();
                }
            }
        }
    }
    Policy::AuthorizationPolicy(AuthorizationPolicy {
        meta,
        selector: spec.selector,
        target_refs: spec.target_refs,
        action: spec.action,
        rules,
    })
}

// ---- metadata ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<Timestamp>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, serde_yaml::Value>>,
}

/// `metadata`, checked: the parts a policy needs.
struct Metadata {
    name: String,
    namespace: String,
    creation_timestamp: Option<OffsetDateTime>,
    dry_run: bool,
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(
            deserializer,
            "object metadata (name, namespace...)",
            Self::check,
        )
    }
}

impl Metadata {
    fn check(raw: RawMetadata) -> Result<Self, String> {
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or("`name` is missing")?;
        let namespace = raw
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        // Go's strconv.ParseBool, as Istio reads the annotation.
        let dry_run = match raw
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        {
            Some(serde_yaml::Value::Bool(b)) => *b,
            Some(serde_yaml::Value::String(s)) => {
                matches!(s.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True")
            }
            _ => false,
        };
        Ok(Self {
            name,
            namespace,
            creation_timestamp: raw.creation_timestamp.map(|t| t.0),
            dry_run,
        })
    }

    fn into_meta(self, origin: &str) -> PolicyMeta {
        PolicyMeta {
            namespace: self.namespace,
            name: self.name,
            creation_timestamp: self.creation_timestamp,
            origin: origin.to_owned(),
            dry_run: self.dry_run,
        }
    }
}

struct Timestamp(OffsetDateTime);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        fn parse(text: &str) -> Result<Timestamp, String> {
            OffsetDateTime::parse(text, &Rfc3339)
                .map(Timestamp)
                .map_err(|err| {
                    format!("{text:?} is not an RFC 3339 time such as 2024-05-01T12:00:00Z ({err})")
                })
        }
        deserializer.deserialize_str(ParsedStr {
            expecting: "an RFC 3339 time",
            parse,
        })
    }
}

/// Parses a string inside serde_yaml's `deserialize_str`, so that an error carries the
/// value's own line, column and path (an error raised after it returns would get the
/// enclosing node's).
struct ParsedStr<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for ParsedStr<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(E::custom)
    }
}

// ---- shared pieces -----------------------------------------------------------------

/// Decodes `Raw` from a mapping and checks it with `check` *inside* serde_yaml's
/// `deserialize_map`, so that an error from `check` carries this mapping's line, column
/// and path (serde's `try_from` would report the enclosing node's).
fn checked_map<'de, D, Raw, T>(
    deserializer: D,
    expecting: &'static str,
    check: fn(Raw) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    Raw: Deserialize<'de>,
{
    struct CheckedVisitor<Raw, T> {
        expecting: &'static str,
        check: fn(Raw) -> Result<T, String>,
    }
    impl<'de, Raw: Deserialize<'de>, T> Visitor<'de> for CheckedVisitor<Raw, T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = Raw::deserialize(de::value::MapAccessDeserializer::new(map))?;
            (self.check)(raw).map_err(de::Error::custom)
        }
    }
    deserializer.deserialize_map(CheckedVisitor { expecting, check })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
}

fn selector(selector: Option<Selector>) -> Option<WorkloadSelector> {
    let match_labels = selector?.match_labels.unwrap_or_default();
    (!match_labels.is_empty()).then_some(WorkloadSelector { match_labels })
}

/// A port: a number or a string of digits (Istio writes `ports: ["8080"]`).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Port<const MIN: u16>(u16);

impl<'de, const MIN: u16> Deserialize<'de> for Port<MIN> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor<const MIN: u16>;
        impl<const MIN: u16> PortVisitor<MIN> {
            fn check<E: de::Error>(value: u64, text: &dyn fmt::Display) -> Result<Port<MIN>, E> {
                match u16::try_from(value) {
                    Ok(port) if port >= MIN => Ok(Port(port)),
                    _ => Err(E::custom(format!(
                        "port {text} is out of range ({MIN} to 65535)"
                    ))),
                }
            }
        }
        impl<const MIN: u16> Visitor<'_> for PortVisitor<MIN> {
            type Value = Port<MIN>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a port number ({MIN} to 65535)")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Port<MIN>, E> {
                Self::check(value, &value)
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Port<MIN>, E> {
                u64::try_from(value)
                    .map_err(|_| {
                        E::custom(format!("port {value} is out of range ({MIN} to 65535)"))
                    })
                    .and_then(|v| Self::check(v, &value))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Port<MIN>, E> {
                if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::custom(format!(
                        "{text:?} is not a port number ({MIN} to 65535)"
                    )));
                }
                let value: u64 = text
                    .parse()
                    .map_err(|_| E::custom(format!("{text:?} is not a port number")))?;
                Self::check(value, &text)
            }
        }
        deserializer.deserialize_any(PortVisitor::<MIN>)
    }
}

/// AuthorizationPolicy ports: Istio accepts 0 to 65535.
type AnyPort = Port<0>;
/// PeerAuthentication `portLevelMtls` keys: 1 to 65535.
type WorkloadPort = Port<1>;

struct Cidr(IpBlock);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParsedStr {
            expecting: "an IP address or CIDR block",
            parse: |text| text.parse().map(Cidr),
        })
    }
}

fn cidrs(values: Option<Vec<Cidr>>) -> Vec<IpBlock> {
    values
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.0)
        .collect()
}

fn ports(values: Option<Vec<AnyPort>>) -> Vec<u16> {
    values
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.0)
        .collect()
}

/// Istio refuses empty strings in these lists.
fn strings(field: &str, values: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let values = values.unwrap_or_default();
    if values.iter().any(String::is_empty) {
        return Err(format!("`{field}` contains an empty string"));
    }
    Ok(values)
}

fn string_matches(field: &str, values: Option<Vec<String>>) -> Result<Vec<StringMatch>, String> {
    Ok(strings(field, values)?
        .iter()
        .map(|v| StringMatch::parse(v))
        .collect())
}

// ---- PeerAuthentication ------------------------------------------------------------

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default, deserialize_with = "not_null")]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<WorkloadPort, Mtls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    #[serde(default, deserialize_with = "not_null")]
    mode: Option<Mode>,
}

/// A field that, when written, must not be null: `mtls:` or `mode:` with nothing after
/// them is what a file cut short looks like, and would read as UNSET.
fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(deserializer)? {
        Some(value) => Ok(Some(value)),
        None => Err(de::Error::custom(
            "is null (leave the field out to inherit, or write a mode such as STRICT)",
        )),
    }
}

#[derive(Deserialize)]
enum Mode {
    #[serde(rename = "UNSET")]
    Unset,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
}

impl Mtls {
    fn mode(self) -> PeerAuthenticationMode {
        match self.mode {
            None | Some(Mode::Unset) => PeerAuthenticationMode::Unset,
            Some(Mode::Disable) => PeerAuthenticationMode::Disable,
            Some(Mode::Permissive) => PeerAuthenticationMode::Permissive,
            Some(Mode::Strict) => PeerAuthenticationMode::Strict,
        }
    }
}

// ---- AuthorizationPolicy -----------------------------------------------------------

#[derive(Default)]
struct AuthzSpec {
    selector: Option<WorkloadSelector>,
    target_refs: Vec<String>,
    action: Action,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthzSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_ref: Option<TargetRef>,
    #[serde(default)]
    target_refs: Option<Vec<TargetRef>>,
    #[serde(default)]
    action: Option<RawAction>,
    #[serde(default)]
    provider: Option<Provider>,
    /// `rules:` or `- ` with nothing after them is refused (see [`CheckedRule::check`]).
    #[serde(default, deserialize_with = "present")]
    rules: Option<Option<Vec<Option<CheckedRule>>>>,
}

#[derive(Deserialize)]
enum RawAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "AUDIT")]
    Audit,
    #[serde(rename = "CUSTOM")]
    Custom,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRef {
    #[serde(default)]
    #[allow(dead_code)]
    group: Option<String>,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl<'de> Deserialize<'de> for AuthzSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "an AuthorizationPolicy spec", Self::check)
    }
}

impl AuthzSpec {
    fn check(raw: RawAuthzSpec) -> Result<Self, String> {
        let target_refs: Vec<String> = raw
            .target_ref
            .into_iter()
            .chain(raw.target_refs.unwrap_or_default())
            .map(|t| match t.namespace {
                Some(namespace) => format!("{}/{namespace}/{}", t.kind, t.name),
                None => format!("{}/{}", t.kind, t.name),
            })
            .collect();
        if raw.selector.is_some() && !target_refs.is_empty() {
            return Err("set `selector` or `targetRef`/`targetRefs`, not both".to_owned());
        }
        let action = match (raw.action.unwrap_or(RawAction::Allow), raw.provider) {
            (RawAction::Custom, Some(provider)) if !provider.name.is_empty() => Action::Custom {
                provider: provider.name,
            },
            (RawAction::Custom, _) => {
                return Err("action CUSTOM needs `provider.name`".to_owned());
            }
            (_, Some(_)) => return Err("`provider` is only valid with action CUSTOM".to_owned()),
            (RawAction::Allow, None) => Action::Allow,
            (RawAction::Deny, None) => Action::Deny,
            (RawAction::Audit, None) => Action::Audit,
        };
        let rules = match raw.rules {
            None => Vec::new(),
            Some(None) => {
                return Err(
                    "`rules` is null (leave it out, or write `rules: []`, for no rules)".to_owned(),
                )
            }
            Some(Some(rules)) => rules,
        };
        let rules = rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                rule.map(|r| r.0).ok_or_else(|| {
                    format!(
                        "`rules[{i}]` is null (write `{{}}` for a rule that matches everything)"
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            selector: selector(raw.selector),
            target_refs,
            action,
            rules,
        })
    }
}

struct CheckedRule(Rule);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// `None`: absent; `Some(None)`: written and null (`from:` and nothing).
    #[serde(default, deserialize_with = "present")]
    from: Option<Option<Vec<CheckedFrom>>>,
    #[serde(default, deserialize_with = "present")]
    to: Option<Option<Vec<CheckedTo>>>,
    #[serde(default, deserialize_with = "present")]
    when: Option<Option<Vec<CheckedCondition>>>,
}

/// A field that is there, maybe null (absent is `#[serde(default)]`'s `None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

impl<'de> Deserialize<'de> for CheckedRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "a rule (from, to, when)", Self::check)
    }
}

impl CheckedRule {
    fn check(raw: RawRule) -> Result<Self, String> {
        // `- from:` with nothing after it is what a file cut short looks like; read as
        // absent, it would match any source.
        for (field, null) in [
            ("from", matches!(raw.from, Some(None))),
            ("to", matches!(raw.to, Some(None))),
            ("when", matches!(raw.when, Some(None))),
        ] {
            if null {
                return Err(format!(
                    "`{field}` is null (leave it out to match anything)"
                ));
            }
        }
        let (from, to, when) = (raw.from.flatten(), raw.to.flatten(), raw.when.flatten());
        for (field, empty) in [
            ("from", from.as_ref().is_some_and(Vec::is_empty)),
            ("to", to.as_ref().is_some_and(Vec::is_empty)),
        ] {
            if empty {
                return Err(format!(
                    "`{field}` must not be an empty list (leave it out to match anything)"
                ));
            }
        }
        Ok(CheckedRule(Rule {
            from: from.unwrap_or_default().into_iter().map(|f| f.0).collect(),
            to: to.unwrap_or_default().into_iter().map(|t| t.0).collect(),
            when: when.unwrap_or_default().into_iter().map(|c| c.0).collect(),
        }))
    }
}

struct CheckedFrom(Source);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    #[serde(default)]
    source: Option<RawSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    principals: Option<Vec<String>>,
    #[serde(default)]
    not_principals: Option<Vec<String>>,
    #[serde(default)]
    request_principals: Option<Vec<String>>,
    #[serde(default)]
    not_request_principals: Option<Vec<String>>,
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    not_namespaces: Option<Vec<String>>,
    #[serde(default)]
    service_accounts: Option<Vec<String>>,
    #[serde(default)]
    not_service_accounts: Option<Vec<String>>,
    #[serde(default)]
    ip_blocks: Option<Vec<Cidr>>,
    #[serde(default)]
    not_ip_blocks: Option<Vec<Cidr>>,
    #[serde(default)]
    remote_ip_blocks: Option<Vec<Cidr>>,
    #[serde(default)]
    not_remote_ip_blocks: Option<Vec<Cidr>>,
}

/// `ns/sa` or `sa`; an empty namespace is filled in with the policy's once it is known.
fn service_accounts(
    field: &str,
    values: Option<Vec<String>>,
) -> Result<Vec<ServiceAccountMatch>, String> {
    strings(field, values)?
        .iter()
        .map(|value| {
            let parts: Vec<&str> = value.split('/').collect();
            match parts[..] {
                [sa] => Ok(ServiceAccountMatch::parse(sa, "")),
                [ns, sa] if !ns.is_empty() && !sa.is_empty() => Ok(ServiceAccountMatch::parse(value, "")),
                _ => Err(format!(
                    "`{field}`: {value:?} is not a service account (write `name` or `namespace/name`)"
                )),
            }
        })
        .collect()
}

impl<'de> Deserialize<'de> for CheckedFrom {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "`source: {...}`", Self::check)
    }
}

impl CheckedFrom {
    fn check(raw: RawFrom) -> Result<Self, String> {
        let raw = raw
            .source
            .ok_or("`source` is missing (write `- source: {...}`)")?;
        let mut l7_fields = Vec::new();
        for (name, present) in [
            ("requestPrincipals", &raw.request_principals),
            ("notRequestPrincipals", &raw.not_request_principals),
        ] {
            if present.as_ref().is_some_and(|v| !v.is_empty()) {
                l7_fields.push(name);
            }
        }
        for (name, present) in [
            ("remoteIpBlocks", &raw.remote_ip_blocks),
            ("notRemoteIpBlocks", &raw.not_remote_ip_blocks),
        ] {
            if present.as_ref().is_some_and(|v| !v.is_empty()) {
                l7_fields.push(name);
            }
        }
        strings("requestPrincipals", raw.request_principals)?;
        strings("notRequestPrincipals", raw.not_request_principals)?;
        let source = Source {
            principals: Match::new(
                string_matches("principals", raw.principals)?,
                string_matches("notPrincipals", raw.not_principals)?,
            ),
            namespaces: Match::new(
                string_matches("namespaces", raw.namespaces)?,
                string_matches("notNamespaces", raw.not_namespaces)?,
            ),
            service_accounts: Match::new(
                service_accounts("serviceAccounts", raw.service_accounts)?,
                service_accounts("notServiceAccounts", raw.not_service_accounts)?,
            ),
            ip_blocks: Match::new(cidrs(raw.ip_blocks), cidrs(raw.not_ip_blocks)),
            l7_fields,
        };
        let empty = source.principals.is_empty()
            && source.namespaces.is_empty()
            && source.service_accounts.is_empty()
            && source.ip_blocks.is_empty()
            && source.l7_fields.is_empty();
        if empty {
            return Err("`source` is empty (leave `from` out to match any source)".to_owned());
        }
        Ok(CheckedFrom(source))
    }
}

struct CheckedTo(Operation);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    #[serde(default)]
    operation: Option<RawOperation>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOperation {
    #[serde(default)]
    hosts: Option<Vec<String>>,
    #[serde(default)]
    not_hosts: Option<Vec<String>>,
    #[serde(default)]
    ports: Option<Vec<AnyPort>>,
    #[serde(default)]
    not_ports: Option<Vec<AnyPort>>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    not_methods: Option<Vec<String>>,
    #[serde(default)]
    paths: Option<Vec<String>>,
    #[serde(default)]
    not_paths: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for CheckedTo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "`operation: {...}`", Self::check)
    }
}

impl CheckedTo {
    fn check(raw: RawTo) -> Result<Self, String> {
        let raw = raw
            .operation
            .ok_or("`operation` is missing (write `- operation: {...}`)")?;
        let mut l7_fields = Vec::new();
        for (name, values) in [
            ("hosts", raw.hosts),
            ("notHosts", raw.not_hosts),
            ("methods", raw.methods),
            ("notMethods", raw.not_methods),
            ("paths", raw.paths),
            ("notPaths", raw.not_paths),
        ] {
            if !strings(name, values)?.is_empty() {
                l7_fields.push(name);
            }
        }
        let operation = Operation {
            ports: Match::new(ports(raw.ports), ports(raw.not_ports)),
            l7_fields,
        };
        if operation.ports.is_empty() && operation.l7_fields.is_empty() {
            return Err("`operation` is empty (leave `to` out to match any operation)".to_owned());
        }
        Ok(CheckedTo(operation))
    }
}

struct CheckedCondition(Condition);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCondition {
    key: String,
    #[serde(default)]
    values: Option<Vec<String>>,
    #[serde(default)]
    not_values: Option<Vec<String>>,
}

enum ConditionKey {
    SourceIp,
    SourcePrincipal,
    SourceNamespace,
    DestinationIp,
    DestinationPort,
    L7,
}

/// The attributes Istio accepts in `when`; anything else is refused, as Istio does.
fn condition_key(key: &str) -> Result<ConditionKey, String> {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| !inner.is_empty())
    };
    Ok(match key {
        "source.ip" => ConditionKey::SourceIp,
        "source.principal" => ConditionKey::SourcePrincipal,
        "source.namespace" => ConditionKey::SourceNamespace,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "remote.ip" | "request.auth.principal" | "request.auth.audiences"
        | "request.auth.presenter" | "connection.sni" => ConditionKey::L7,
        _ if bracketed("request.headers[") || bracketed("request.auth.claims[") => {
            ConditionKey::L7
        }
        _ if key.starts_with("experimental.envoy.filters.") => ConditionKey::L7,
        _ => {
            return Err(format!(
                "unknown `when` key {key:?}; the L4 keys are source.ip, source.principal, source.namespace, destination.ip and destination.port (HTTP keys such as request.headers[...] are accepted but cannot be enforced at L4)"
            ))
        }
    })
}

impl<'de> Deserialize<'de> for CheckedCondition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(
            deserializer,
            "a condition (key, values, notValues)",
            Self::check,
        )
    }
}

impl CheckedCondition {
    fn check(raw: RawCondition) -> Result<Self, String> {
        let key = condition_key(&raw.key)?;
        let values = strings("values", raw.values)?;
        let not_values = strings("notValues", raw.not_values)?;
        if values.is_empty() && not_values.is_empty() {
            return Err(format!(
                "condition {:?} needs `values` or `notValues`",
                raw.key
            ));
        }
        let cidrs = |values: &[String]| -> Result<Vec<IpBlock>, String> {
            values.iter().map(|v| v.parse()).collect()
        };
        let ports = |values: &[String]| -> Result<Vec<u16>, String> {
            values
                .iter()
                .map(|v| {
                    AnyPort::deserialize(de::value::StrDeserializer::<de::value::Error>::new(v))
                        .map(|p| p.0)
                        .map_err(|e| e.to_string())
                })
                .collect()
        };
        let matches = |values: &[String]| -> Vec<StringMatch> {
            values.iter().map(|v| StringMatch::parse(v)).collect()
        };
        let condition = match key {
            ConditionKey::SourceIp => {
                Condition::SourceIp(Match::new(cidrs(&values)?, cidrs(&not_values)?))
            }
            ConditionKey::DestinationIp => {
                Condition::DestinationIp(Match::new(cidrs(&values)?, cidrs(&not_values)?))
            }
            ConditionKey::DestinationPort => {
                Condition::DestinationPort(Match::new(ports(&values)?, ports(&not_values)?))
            }
            ConditionKey::SourcePrincipal => {
                Condition::SourcePrincipal(Match::new(matches(&values), matches(&not_values)))
            }
            ConditionKey::SourceNamespace => {
                Condition::SourceNamespace(Match::new(matches(&values), matches(&not_values)))
            }
            ConditionKey::L7 => Condition::L7 { key: raw.key },
        };
        Ok(CheckedCondition(condition))
    }
}

#[cfg(test)]
mod tests;
