//! The figures of a bench run: a table with ratios to direct on stdout, and JSON under
//! `target/bench/` (`bench-<unix time>.json` and `latest.json`).
use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::SystemTime};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{MeshPath, Plan};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Micros,
    GbitPerSec,
    PerSec,
    MiB,
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::GbitPerSec => "Gbit/s",
            Unit::PerSec => "/s",
            Unit::MiB => "MiB",
            Unit::Seconds => "s",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Unit::Micros | Unit::PerSec => format!("{value:.0}"),
            Unit::GbitPerSec => format!("{value:.2}"),
            Unit::MiB => format!("{value:.1}"),
            Unit::Seconds => format!("{value:.3}"),
        }
    }
}

/// Which way is better, so a reader knows what a ratio above 1 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One measured value of one path.
#[derive(Debug, Clone)]
pub struct Figure {
    pub case: String,
    pub unit: Unit,
    pub better: Better,
    pub value: f64,
}

impl Figure {
    pub fn new(case: String, unit: Unit, better: Better, value: f64) -> Self {
        Self {
            case,
            unit,
            better,
            value,
        }
    }
}

/// A case across the paths.
struct Row {
    case: String,
    unit: Unit,
    better: Better,
    values: BTreeMap<MeshPath, f64>,
}

impl Row {
    /// `path`'s value over direct's, when both exist.
    fn ratio(&self, path: MeshPath) -> Option<f64> {
        let direct = *self.values.get(&MeshPath::Direct)?;
        let value = *self.values.get(&path)?;
        (direct > 0.0).then(|| value / direct)
    }
}

pub struct Report {
    plan: Plan,
    paths: Vec<MeshPath>,
    rows: Vec<Row>,
    cores: usize,
    kernel: String,
    cpu: String,
    at: SystemTime,
}

impl Report {
    pub fn new(plan: &Plan, measured: Vec<(MeshPath, Vec<Figure>)>) -> Self {
        let paths: Vec<MeshPath> = measured.iter().map(|(p, _)| *p).collect();
        let mut rows: Vec<Row> = Vec::new();
        for (path, figures) in measured {
            for figure in figures {
                match rows.iter_mut().find(|r| r.case == figure.case) {
                    Some(row) => {
                        row.values.insert(path, figure.value);
                    }
                    None => rows.push(Row {
                        case: figure.case,
                        unit: figure.unit,
                        better: figure.better,
                        values: BTreeMap::from([(path, figure.value)]),
                    }),
                }
            }
        }
        Self {
            plan: plan.clone(),
            paths,
            rows,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("model name"))
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                })
                .unwrap_or_default(),
            at: SystemTime::now(),
        }
    }

    /// The table, as Markdown (it goes into `docs/performance.md` as it is).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nwarren bench{}, {}, {} cores ({}), Linux {}; {}; median of {} run(s); ratio = path / direct",
            if self.plan.quick { " --quick" } else { "" },
            humantime::format_rfc3339_seconds(self.at),
            self.cores,
            self.cpu,
            self.kernel,
            if self.plan.cpus_awake {
                "CPUs kept out of idle states"
            } else {
                "CPUs allowed to idle"
            },
            self.plan.runs
        );
        let mut header = "| case | unit | better |".to_owned();
        let mut rule = "|---|---|---|".to_owned();
        for path in &self.paths {
            header.push_str(&format!(" {} |", path.name()));
            rule.push_str("---:|");
            if *path != MeshPath::Direct {
                header.push_str(" ratio |");
                rule.push_str("---:|");
            }
        }
        let _ = writeln!(out, "\n{header}\n{rule}");
        for row in &self.rows {
            let mut line = format!(
                "| {} | {} | {} |",
                row.case,
                row.unit.as_str(),
                match row.better {
                    Better::Lower => "lower",
                    Better::Higher => "higher",
                }
            );
            for path in &self.paths {
                let value = row
                    .values
                    .get(path)
                    .map_or("—".to_owned(), |v| row.unit.format(*v));
                line.push_str(&format!(" {value} |"));
                if *path != MeshPath::Direct {
                    let ratio = row
                        .ratio(*path)
                        .map_or("—".to_owned(), |r| format!("{r:.2}×"));
                    line.push_str(&format!(" {ratio} |"));
                }
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }

    fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let mut entry = json!({
                    "case": row.case,
                    "unit": row.unit.as_str(),
                    "better": match row.better { Better::Lower => "lower", Better::Higher => "higher" },
                });
                for path in &self.paths {
                    entry[path.name()] = json!(row.values.get(path));
                    if *path != MeshPath::Direct {
                        entry[format!("{}_ratio", path.name())] = json!(row.ratio(*path));
                    }
                }
                entry
            })
            .collect();
        json!({
            "date": humantime::format_rfc3339_seconds(self.at).to_string(),
            "quick": self.plan.quick,
            "runs": self.plan.runs,
            "cores": self.cores,
            "cpu": self.cpu,
            "kernel": self.kernel,
            "paths": self.paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "held_connections": self.plan.held_connections,
            "cpus_awake": self.plan.cpus_awake,
            "figures": rows,
        })
    }

    /// Write `target/bench/bench-<unix time>.json` and `latest.json`; returns the first.
    pub fn write_json(&self) -> Result<PathBuf> {
        let dir = warren_lab::cargo::workspace_root()
            .join("target")
            .join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let secs = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let text = serde_json::to_string_pretty(&self.to_json())? + "\n";
        let path = dir.join(format!("bench-{secs}.json"));
        for file in [&path, &dir.join("latest.json")] {
            std::fs::write(file, &text).with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_against_direct_and_missing_values_show_a_dash() {
        let plan = super::super::Plan::new(&super::super::BenchArgs {
            quick: true,
            paths: vec![MeshPath::Ebpf],
            runs: None,
            allow_cpu_idle: false,
        });
        let latency = |value| Figure::new("rr p50".into(), Unit::Micros, Better::Lower, value);
        let report = Report::new(
            &plan,
            vec![
                (MeshPath::Direct, vec![latency(50.0)]),
                (
                    MeshPath::Ebpf,
                    vec![
                        latency(75.0),
                        Figure::new("agent RSS".into(), Unit::MiB, Better::Lower, 12.0),
                    ],
                ),
            ],
        );
        let table = report.table();
        assert!(
            table.contains("| rr p50 | µs | lower | 50 | 75 | 1.50× |"),
            "{table}"
        );
        assert!(
            table.contains("| agent RSS | MiB | lower | — | 12.0 | — |"),
            "{table}"
        );
        let json = report.to_json();
        assert_eq!(json["figures"][0]["ebpf_ratio"], 1.5);
        assert_eq!(json["figures"][1]["direct"], Value::Null);
    }
}
