//! The cases, run on one path of the lab: each load generator in `demo/client`, its
//! server in the destination pod, every case `plan.runs` times with the median kept.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use warren_lab::{AppMode, Family, Lab};

use super::{
    report::{Better, Figure, Unit},
    MeshPath, Plan,
};

const CLIENT: &str = "demo/client";
const IPERF_PORT: u16 = 5201;
/// How long held connections may take to open, and iperf3 to start.
const HOLD_TIMEOUT: Duration = Duration::from_secs(180);
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A destination: across nodes or on the client's node.
struct Pair {
    name: &'static str,
    to: &'static str,
}

const PAIRS: [Pair; 2] = [
    Pair {
        name: "cross-node",
        to: "demo/server",
    },
    Pair {
        name: "same-node",
        to: "demo/peer",
    },
];

/// Every figure of `path`.
pub fn path(lab: &Lab, path: MeshPath, plan: &Plan) -> Result<Vec<Figure>> {
    allow_many_short_connections(lab)?;
    let mut figures = Vec::new();
    for pair in &PAIRS {
        let echo = lab.serve(pair.to, 0, AppMode::Echo)?;
        let dst = lab.pod(pair.to).addr(Family::V4, echo.port()).to_string();
        eprintln!("bench: {} {}: latency", path.name(), pair.name);
        for case in ["rr", "connect"] {
            let mut args = vec![
                case.to_owned(),
                "--addr".into(),
                dst.clone(),
                "--duration".into(),
                millis(plan.case_length),
            ];
            if case == "rr" {
                args.extend(["--size".into(), "64".into()]);
            }
            let runs = repeat(plan.runs, || lab_app_bench(lab, &args))?;
            let what = if case == "rr" {
                "request/response, warm connection"
            } else {
                "connect + first byte"
            };
            for percentile in ["p50", "p90", "p99"] {
                figures.push(Figure::new(
                    format!("{} {what} {percentile}", pair.name),
                    Unit::Micros,
                    Better::Lower,
                    median_of(&runs, &format!("{percentile}_us"))?,
                ));
            }
        }

        eprintln!("bench: {} {}: throughput", path.name(), pair.name);
        let _iperf = IperfServer::start(lab, pair.to)?;
        let ip = lab.pod(pair.to).ip(Family::V4).to_string();
        let single = repeat(plan.runs, || {
            iperf(
                lab,
                &ip,
                &["-n", &plan.stream_bytes.to_string(), "-l", "128K"],
            )
        })?;
        figures.push(Figure::new(
            format!(
                "{} single stream ({})",
                pair.name,
                human_bytes(plan.stream_bytes)
            ),
            Unit::GbitPerSec,
            Better::Higher,
            median(single),
        ));
        let parallel = repeat(plan.runs, || {
            iperf(
                lab,
                &ip,
                &[
                    "-P",
                    &plan.parallel_streams.to_string(),
                    "-t",
                    &plan.parallel_length.as_secs().max(1).to_string(),
                    "-l",
                    "128K",
                ],
            )
        })?;
        figures.push(Figure::new(
            format!("{} {} parallel streams", pair.name, plan.parallel_streams),
            Unit::GbitPerSec,
            Better::Higher,
            median(parallel),
        ));
    }

    // Connection rate and held connections: across nodes, where both agents work.
    let cross = &PAIRS[0];
    let echo = lab.serve(cross.to, 0, AppMode::Echo)?;
    let dst = lab.pod(cross.to).addr(Family::V4, echo.port()).to_string();
    eprintln!("bench: {} connection rate", path.name());
    let mut best: Option<(usize, f64)> = None;
    for &concurrency in &plan.rate_concurrency {
        let args = [
            "rate".to_owned(),
            "--addr".into(),
            dst.clone(),
            "--duration".into(),
            millis(plan.case_length),
            "--concurrency".into(),
            concurrency.to_string(),
        ];
        let runs = repeat(plan.runs, || lab_app_bench(lab, &args))?;
        let rate = median_of(&runs, "per_second")?;
        if best.is_none_or(|(_, r)| rate > r) {
            best = Some((concurrency, rate));
        }
    }
    // The same case name on every path, so that the rates line up and get a ratio; the
    // concurrency that reached it goes to stderr.
    if let Some((concurrency, rate)) = best {
        eprintln!("bench: {} peaked at concurrency {concurrency}", path.name());
        figures.push(Figure::new(
            format!(
                "cross-node new connections/s (best of concurrency {})",
                plan.rate_concurrency
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            ),
            Unit::PerSec,
            Better::Higher,
            rate,
        ));
    }

    if path != MeshPath::Direct {
        eprintln!(
            "bench: {} holding {} connections",
            path.name(),
            plan.held_connections
        );
        figures.extend(held_connections(lab, &dst, plan.held_connections)?);
    }
    Ok(figures)
}

/// The connection-rate case closes tens of thousands of connections from the client's
/// side, each leaving a TIME_WAIT socket for a minute: let the pods (their own netns; the
/// lab removes them) reuse those ports and use a wider range, as load generators do.
fn allow_many_short_connections(lab: &Lab) -> Result<()> {
    for pod in [CLIENT, PAIRS[0].to, PAIRS[1].to] {
        let status = lab
            .command(pod, "sysctl")?
            .args([
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ])
            .status()
            .with_context(|| format!("running sysctl in {pod}"))?;
        if !status.success() {
            bail!("sysctl in {pod} failed ({status})");
        }
    }
    Ok(())
}

/// Both agents' resident memory and CPU time, idle and with `count` tunnelled
/// connections held open.
fn held_connections(lab: &Lab, dst: &str, count: usize) -> Result<Vec<Figure>> {
    let agents = ["n1", "n2"].map(|node| {
        lab.agent_pid(node)
            .with_context(|| format!("no agent runs on {node}"))
    });
    let [n1, n2] = agents;
    let pids = [n1?, n2?];
    let idle = AgentUsage::read(&pids)?;

    let mut cmd = lab.lab_app(CLIENT)?;
    cmd.args([
        "bench",
        "hold",
        "--addr",
        dst,
        "--count",
        &count.to_string(),
    ]);
    let mut hold = Held::start(cmd)?;
    let report = hold.wait_report(HOLD_TIMEOUT)?;
    let held = report["held"].as_u64().unwrap_or(0) as usize;
    if held != count {
        bail!("held {held} of {count} connections: {report}");
    }
    // Let the agents settle (buffers released after the handshakes) before reading.
    thread::sleep(Duration::from_secs(1));
    let loaded = AgentUsage::read(&pids)?;
    hold.release()?;

    let thousands = count as f64 / 1000.0;
    Ok(vec![
        Figure::new(
            "agent RSS, idle (n1 + n2)".into(),
            Unit::MiB,
            Better::Lower,
            idle.rss_mib,
        ),
        Figure::new(
            format!("agent RSS with {count} open connections (n1 + n2)"),
            Unit::MiB,
            Better::Lower,
            loaded.rss_mib,
        ),
        Figure::new(
            "agent RSS per 1,000 open connections (n1 + n2)".into(),
            Unit::MiB,
            Better::Lower,
            (loaded.rss_mib - idle.rss_mib) / thousands,
        ),
        Figure::new(
            "agent CPU to open 1,000 connections (n1 + n2)".into(),
            Unit::Seconds,
            Better::Lower,
            (loaded.cpu_seconds - idle.cpu_seconds) / thousands,
        ),
    ])
}

/// Resident memory and CPU time of processes, summed.
struct AgentUsage {
    rss_mib: f64,
    cpu_seconds: f64,
}

impl AgentUsage {
    fn read(pids: &[u32]) -> Result<Self> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let mut usage = AgentUsage {
            rss_mib: 0.0,
            cpu_seconds: 0.0,
        };
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("reading /proc/{pid}/status"))?;
            let rss_kib: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
            usage.rss_mib += rss_kib / 1024.0;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat"))?;
            // Fields after the command name (which may hold spaces): utime is the 12th,
            // stime the 13th.
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            let cpu: f64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
                .sum();
            usage.cpu_seconds += cpu / ticks;
        }
        Ok(usage)
    }
}

/// `lab-app bench hold`, running: its report once every connection is open, then
/// holding them until its stdin closes.
struct Held {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Held {
    fn start(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting lab-app bench hold")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Held { child, lines })
    }

    fn wait_report(&mut self, within: Duration) -> Result<Value> {
        let line = self
            .lines
            .recv_timeout(within)
            .with_context(|| format!("lab-app bench hold reported nothing within {within:?}"))?;
        serde_json::from_str(&line)
            .with_context(|| format!("lab-app bench hold printed {line:?}, not JSON"))
    }

    /// Close its stdin: it closes the connections and exits.
    fn release(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self
            .child
            .wait()
            .context("waiting for lab-app bench hold")?;
        if !status.success() {
            bail!("lab-app bench hold failed ({status})");
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `iperf3 -s` in a pod, killed on drop.
struct IperfServer(Child);

impl IperfServer {
    fn start(lab: &Lab, target: &str) -> Result<Self> {
        let mut child = lab
            .command(target, "iperf3")?
            .args(["-s", "-p", &IPERF_PORT.to_string(), "--forceflush"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting iperf3 -s in {target}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Server listening") {
                    let _ = tx.send(());
                }
            }
        });
        let server = IperfServer(child);
        rx.recv_timeout(START_TIMEOUT)
            .with_context(|| format!("iperf3 -s in {target} did not start listening"))?;
        Ok(server)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 client run from `demo/client` to `ip`: received Gbit/s.
fn iperf(lab: &Lab, ip: &str, args: &[&str]) -> Result<f64> {
    let out = lab
        .command(CLIENT, "iperf3")?
        .args(["-c", ip, "-p", &IPERF_PORT.to_string(), "-J"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running iperf3 -c")?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -c {ip} printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3 -c {ip} {}: {error}", args.join(" "));
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3's JSON has no end.sum_received: {json}"))
}

/// One `lab-app bench …` run in `demo/client`: its JSON report.
fn lab_app_bench(lab: &Lab, args: &[String]) -> Result<Value> {
    let out = lab
        .lab_app(CLIENT)?
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running lab-app bench")?;
    if !out.status.success() {
        bail!(
            "lab-app bench {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("lab-app bench {} printed {text:?}", args.join(" ")))
}

fn repeat<T>(runs: usize, mut once: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    (0..runs.max(1)).map(|_| once()).collect()
}

/// The median of `field` over the runs' reports.
fn median_of(runs: &[Value], field: &str) -> Result<f64> {
    let values = runs
        .iter()
        .map(|r| {
            r[field]
                .as_f64()
                .with_context(|| format!("no {field} in {r}"))
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(median(values))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_runs() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
