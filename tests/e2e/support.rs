//! Helpers shared by the scenarios.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use warren_lab::{ConnectReport, Lab};

/// How long to wait for an agent to write a connection's access-log line after the
/// client is done (the line is written when both directions have closed).
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Tears the lab down when dropped, so the lab goes even when a test panics.
pub struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(err) = Lab::down() {
            eprintln!("error: lab teardown failed: {err:#}");
        }
    }
}

/// The access-log records (JSON lines) `node`'s agent wrote after `offset`.
pub fn access_records(lab: &Lab, node: &str, offset: u64) -> Result<Vec<Value>> {
    Ok(lab
        .agent_log_since(node, offset)?
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Access records of `node`'s agent after `offset` for connections to `dst` (no waiting).
pub fn access_records_for(
    lab: &Lab,
    node: &str,
    offset: u64,
    dst: SocketAddr,
) -> Result<Vec<Value>> {
    let dst = dst.to_string();
    Ok(access_records(lab, node, offset)?
        .into_iter()
        .filter(|r| r["dst_addr"] == dst.as_str())
        .collect())
}

/// The access record of `node`'s agent, written after `offset`, for a connection in
/// `direction` ("outbound"/"inbound") to `dst`. Waits for it to appear.
pub fn access_record(
    lab: &Lab,
    node: &str,
    offset: u64,
    direction: &str,
    dst: SocketAddr,
) -> Result<Value> {
    access_record_where(lab, node, offset, dst, direction, |_| true)
}

/// The first access record of `node`'s agent after `offset`, in `direction`, to `dst`, that
/// `matches` (several connections to one destination: tell them apart by their bytes or
/// source). Waits for it: an agent writes the record when the connection has ended on
/// both sides, which may be after the client saw its end.
pub fn access_record_where(
    lab: &Lab,
    node: &str,
    offset: u64,
    dst: SocketAddr,
    direction: &str,
    matches: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let records = access_records_for(lab, node, offset, dst)?;
        if let Some(record) = records
            .into_iter()
            .find(|r| r["direction"] == direction && matches(r))
        {
            return Ok(record);
        }
        if Instant::now() > deadline {
            bail!(
                "agent of {node} logged no matching {direction} access record for {dst} within {LOG_WAIT:?}; it logged:\n{}",
                lab.agent_log_since(node, offset)?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `record[key]` as a string ("" when absent or not a string).
pub fn field<'a>(record: &'a Value, key: &str) -> &'a str {
    record[key].as_str().unwrap_or_default()
}

pub fn ensure_ok(report: &ConnectReport, what: &str) -> Result<()> {
    ensure!(report.ok, "{what} failed: {report:?}");
    Ok(())
}

/// The last lines of every agent log, attached to a failure.
pub fn agent_log_tails(lab: &Lab) -> String {
    let mut out = String::new();
    for node in lab.nodes() {
        let path = lab.agent_log_path(&node.name);
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        out.push_str(&format!(
            "--- last lines of {} ---\n{}\n",
            path.display(),
            tail.join("\n")
        ));
    }
    out
}

/// `node`'s agent's Prometheus page (`:15020/metrics`, in the node's netns): the whole
/// HTTP response.
pub fn metrics_page(lab: &Lab, node: &str) -> Result<String> {
    http(lab, node, "GET", "127.0.0.1:15020", "/metrics")
}

/// `node`'s metrics page, parsed by a Prometheus text-format parser.
pub fn scrape(lab: &Lab, node: &str) -> Result<prometheus_parse::Scrape> {
    let page = metrics_page(lab, node)?;
    let body = page
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("the metrics response has no body")?;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .with_context(|| format!("{node}'s metrics page is not valid Prometheus text"))
}

/// The sum of `metric`'s samples whose labels include `labels`.
pub fn sample_sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// One HTTP/1.1 request from inside `node`'s netns to `addr` (the agent's own ports);
/// the whole response, status line included.
pub fn http(lab: &Lab, node: &str, method: &str, addr: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = addr.parse()?;
    lab.run_in(&format!("node/{node}"), || -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?
}

/// The value of `series` (a name, with its labels as Prometheus prints them) on `page`.
pub fn metric_value(page: &str, series: &str) -> Option<u64> {
    page.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Wait (up to `within`) until `node`'s agent logged, after `offset`, a line containing
/// every one of `needles`; returns that line.
pub fn wait_for_log_line(
    lab: &Lab,
    node: &str,
    offset: u64,
    needles: &[&str],
    within: Duration,
) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let log = lab.agent_log_since(node, offset)?;
        if let Some(line) = log
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
        {
            return Ok(line.to_owned());
        }
        if Instant::now() > deadline {
            bail!("{node}'s agent logged no line with {needles:?} within {within:?}; it logged:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rules (`-A …` lines) of the `nat` table in `target`'s netns, as the nft and the
/// legacy iptables tools show them, for both address families; each prefixed with the
/// tool that showed it.
pub fn nat_rules(lab: &Lab, target: &str) -> Result<Vec<String>> {
    let mut rules = Vec::new();
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        let out = lab.command(target, tool)?.args(["-t", "nat"]).output()?;
        ensure!(
            out.status.success(),
            "{tool} in {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    Ok(rules)
}

/// What a node's redirection consists of, in both modes: its eBPF pins, the kernel's BPF
/// links (all nodes'), and the iptables rules (`nat`, both backends) in the node's pods.
#[derive(Debug, PartialEq, Eq)]
pub struct RedirectState {
    pub pins: BTreeSet<String>,
    pub bpf_links: usize,
    pub rules: Vec<String>,
}

impl RedirectState {
    pub fn of(lab: &Lab, node: &str) -> Result<Self> {
        let pin_dir = Path::new("/sys/fs/bpf/warren").join(node);
        let pins = if pin_dir.exists() {
            list_dir(&pin_dir)?
        } else {
            BTreeSet::new()
        };
        let mut rules = Vec::new();
        for pod in lab.pods().iter().filter(|p| p.node == node) {
            let id = format!("{}/{}", pod.namespace, pod.name);
            rules.extend(
                nat_rules(lab, &id)?
                    .into_iter()
                    .map(|rule| format!("{id}: {rule}")),
            );
        }
        Ok(Self {
            pins,
            bpf_links: bpf_links()?,
            rules,
        })
    }

    /// What `later` has that `self` has not, and the reverse, in a few lines (the whole
    /// state is long).
    pub fn diff(&self, later: &RedirectState) -> String {
        let rules_before: BTreeSet<&String> = self.rules.iter().collect();
        let rules_after: BTreeSet<&String> = later.rules.iter().collect();
        format!(
            "pins added {:?}, removed {:?}; rules added {:?}, removed {:?}; BPF links {} → {}",
            later.pins.difference(&self.pins).collect::<Vec<_>>(),
            self.pins.difference(&later.pins).collect::<Vec<_>>(),
            rules_after.difference(&rules_before).collect::<Vec<_>>(),
            rules_before.difference(&rules_after).collect::<Vec<_>>(),
            self.bpf_links,
            later.bpf_links,
        )
    }
}

fn list_dir(dir: &Path) -> Result<BTreeSet<String>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

/// Number of BPF links in the kernel (`bpftool link list`).
fn bpf_links() -> Result<usize> {
    let out = Command::new("bpftool")
        .args(["link", "list"])
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "bpftool link list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| {
            l.split(':')
                .next()
                .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
        })
        .count())
}

/// Key and certificate for SPIFFE ID `identity` (URI SAN, clientAuth + serverAuth), signed
/// by the CA in `ca` (Istio's layout) for `days` days, made with the openssl command line
/// — independently of warren's own CA code.
pub fn client_certificate(
    dir: &Path,
    ca: &Path,
    identity: &str,
    days: u32,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (key, csr, cert, ext) = (
        dir.join("key.pem"),
        dir.join("req.csr"),
        dir.join("cert.pem"),
        dir.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=URI:{identity}\nextendedKeyUsage=clientAuth,serverAuth\nkeyUsage=digitalSignature\n"),
    )?;
    let openssl = |args: &[&str]| openssl(dir, args);
    let s = |p: &Path| p.display().to_string();
    p256_key(dir, &key)?;
    openssl(&[
        "req",
        "-new",
        "-key",
        &s(&key),
        "-subj",
        "/O=warren-e2e",
        "-out",
        &s(&csr),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca.join("ca-cert.pem")),
        "-CAkey",
        &s(&ca.join("ca-key.pem")),
        "-days",
        &days.to_string(),
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ])?;
    // Sent with its chain up to the root, as a mesh peer sends it; a CA directory
    // without cert-chain.pem (a root that signs directly) gives a leaf that travels alone.
    if let Ok(chain) = std::fs::read(ca.join("cert-chain.pem")) {
        let mut pem = std::fs::read(&cert)?;
        pem.extend(chain);
        std::fs::write(&cert, pem)?;
    }
    Ok((cert, key))
}

/// A new ECDSA P-256 key at `out`, in SEC1 form (`openssl ecparam -genkey`).
pub fn p256_key(dir: &Path, out: &Path) -> Result<()> {
    let out = out.display().to_string();
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &out,
        ],
    )
}

/// `openssl <args>` in `dir`, its error output in the error.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA the mesh does not trust (`warren ca init` in `dir/rogue-ca`), for certificates
/// with real identities that must be refused.
pub fn rogue_ca(dir: &Path) -> Result<std::path::PathBuf> {
    let rogue = dir.join("rogue-ca");
    let out = Command::new(warren_lab::cargo::build_bin("warren", "warren")?)
        .args(["ca", "init", "--dir"])
        .arg(&rogue)
        .output()
        .context("running warren ca init")?;
    ensure!(
        out.status.success(),
        "warren ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(rogue)
}
