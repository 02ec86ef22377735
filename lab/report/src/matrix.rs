//! The matrix report: kernels x scenarios and kernels x Weir features, with throughput, and what
//! changed since the previous run. `weir-lab matrix` produces it; this module compares it with
//! the last one and renders it for the terminal, as JSON and (through [`crate::html`]) as HTML.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use weir_kernels::ModuleSet;
use weir_lab_core::features::Feature;
use weir_node_image::proto::Features;

use crate::throughput::{self, Measurement, Ratio};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One scenario on one kernel.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub scenario: String,
    pub status: Status,
    pub reason: Option<String>,
    pub duration_s: f64,
    pub checks_passed: usize,
    pub checks_failed: usize,
    pub checks_not_run: usize,
    pub checks: Vec<CheckResult>,
}

/// One check of a cell.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub title: String,
    pub passed: bool,
    /// What was seen, or why it failed.
    pub detail: String,
    /// The Weir features it proves.
    pub features: BTreeSet<Feature>,
}

/// Whether a Weir feature works on one kernel, by the checks that prove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStatus {
    /// Every check proving it that ran passed.
    Works,
    /// A check proving it failed.
    Fails,
    /// No check proving it ran here (its scenarios were skipped, or the kernel was
    /// unavailable).
    NotShown,
}

/// One Weir feature on one kernel, with the evidence.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureResult {
    pub feature: Feature,
    pub status: FeatureStatus,
    /// Checks that passed proving it, as `scenario: check`.
    pub passed: Vec<String>,
    /// Checks that failed proving it, with why.
    pub failed: Vec<String>,
    /// Why the scenarios that would have shown it did not run here.
    pub skipped: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub name: String,
    pub version: String,
    pub source: String,
    pub default: bool,
    /// "ran", or "unavailable" with the reason.
    pub status: String,
    pub reason: Option<String>,
    pub backend: Option<String>,
    pub release: Option<String>,
    pub provenance: Option<String>,
    pub accel: Option<String>,
    pub prepare_s: Option<f64>,
    /// One VM, QEMU start to the init's first answer.
    pub boot_s: Option<f64>,
    pub wall_s: f64,
    /// Required config options the kernel does not have.
    pub missing_config: Vec<String>,
    pub features: Option<Features>,
    /// TCX or clsact: how the agent attaches its programs here.
    pub attach_mode: Option<String>,
    /// Features Weir's programs need that this kernel lacks, by name, with why.
    pub missing_features: Vec<String>,
    pub modules: Option<ModuleSet>,
    pub cells: Vec<Cell>,
    /// Every Weir feature: works, fails or not shown on this kernel (from `cells`).
    pub weir_features: Vec<FeatureResult>,
    pub throughput: Vec<Measurement>,
    pub ratios: Vec<Ratio>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MatrixReport {
    pub weir_lab_version: &'static str,
    pub started_unix_s: u64,
    pub duration_s: f64,
    /// No scenario failed on a kernel that ran (skips and unavailable kernels do not fail it).
    pub passed: bool,
    pub suite: String,
    pub scenarios: Vec<String>,
    pub kernels: Vec<KernelReport>,
    /// Per Weir feature, the lowest kernel release it was shown to work on (and on every
    /// newer kernel that showed it), if any.
    pub lowest_kernel: Vec<(Feature, Option<String>)>,
    /// Against the previous report in the same directory (see [`compare_with_previous`]).
    pub since_last_run: SinceLastRun,
}

/// What changed since the previous matrix run: the nightly reader's first minute.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SinceLastRun {
    /// When the previous report started (unix seconds); `None` when there was none to read.
    pub previous_started_unix_s: Option<u64>,
    /// "kernel: feature works -> FAILS" (or "-> not shown"), "kernel: scenario pass -> FAIL".
    pub regressions: Vec<String>,
    /// "kernel: feature not shown -> works", "kernel: scenario FAIL -> pass".
    pub improvements: Vec<String>,
}

/// Compares `report` with the previous run's report.json text (read before this run
/// overwrites it): a feature or scenario that worked on a kernel and no longer does is a
/// regression, the reverse an improvement. Kernels or features the previous report did not
/// have are new, not changes. A previous report that does not parse is an error, and `report`
/// is left uncompared.
pub fn compare_with_previous(
    report: &mut MatrixReport,
    previous: Option<&str>,
) -> Result<(), serde_json::Error> {
    let Some(text) = previous else {
        return Ok(());
    };
    let previous: serde_json::Value = serde_json::from_str(text)?;
    let mut since = SinceLastRun {
        previous_started_unix_s: previous["started_unix_s"].as_u64(),
        ..SinceLastRun::default()
    };
    let empty = Vec::new();
    for kernel in &report.kernels {
        let Some(before) = previous["kernels"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .find(|k| k["name"].as_str() == Some(kernel.name.as_str()))
        else {
            continue;
        };
        for now in &kernel.weir_features {
            let key = serde_json::to_value(now.feature).unwrap_or_default();
            let was = before["weir_features"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|f| f["feature"] == key)
                .and_then(|f| f["status"].as_str());
            let now_word = serde_json::to_value(now.status).unwrap_or_default();
            let now_word = now_word.as_str().unwrap_or("");
            let line = format!(
                "{}: {} {} -> {now_word}",
                kernel.name,
                now.feature.name(),
                was.unwrap_or("")
            );
            match (was, now.status) {
                (Some("works"), FeatureStatus::Works) | (None, _) => {}
                (Some("works"), _) => since.regressions.push(line),
                (Some(_), FeatureStatus::Works) => since.improvements.push(line),
                _ => {}
            }
        }
        for cell in &kernel.cells {
            let was = before["cells"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|c| c["scenario"].as_str() == Some(cell.scenario.as_str()))
                .and_then(|c| c["status"].as_str());
            let line = |now: &str| {
                format!(
                    "{}: scenario {} {} -> {now}",
                    kernel.name,
                    cell.scenario,
                    was.unwrap_or("")
                )
            };
            match (was, cell.status) {
                (Some("pass"), Status::Fail) => since.regressions.push(line("fail")),
                (Some("fail"), Status::Pass) => since.improvements.push(line("pass")),
                _ => {}
            }
        }
    }
    report.since_last_run = since;
    Ok(())
}

/// Writes report.json and report.html into `dir`; returns their paths.
pub fn write(report: &MatrixReport, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("report.json");
    let html = dir.join("report.html");
    let text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    weir_lab_core::files::write_atomically(&json, text.as_bytes())?;
    weir_lab_core::files::write_atomically(&html, crate::html::render(report).as_bytes())?;
    Ok((json, html))
}

/// A terminal summary: one line per kernel, one column per scenario.
/// Weir features x kernels, with each feature's lowest kernel proven: the report's first read.
pub fn feature_table(report: &MatrixReport) -> String {
    let mut out = format!("\n{:<28}", "feature");
    for k in &report.kernels {
        out.push_str(&format!(" {:>12}", k.name));
    }
    out.push_str("  lowest proven\n");
    for (feature, lowest) in &report.lowest_kernel {
        out.push_str(&format!("{:<28}", feature.name()));
        for k in &report.kernels {
            let word = match k.weir_features.iter().find(|r| r.feature == *feature) {
                Some(r) if r.status == FeatureStatus::Works => "works",
                Some(r) if r.status == FeatureStatus::Fails => "FAILS",
                _ => "-",
            };
            out.push_str(&format!(" {word:>12}"));
        }
        out.push_str(&format!("  {}\n", lowest.as_deref().unwrap_or("-")));
    }
    out
}

pub fn summary(report: &MatrixReport) -> String {
    let mut out = String::new();
    let since = &report.since_last_run;
    if since.previous_started_unix_s.is_some() {
        out.push_str(&format!(
            "since the last run: {} regression(s), {} improvement(s)\n",
            since.regressions.len(),
            since.improvements.len()
        ));
        for line in &since.regressions {
            out.push_str(&format!("  REGRESSION {line}\n"));
        }
        for line in &since.improvements {
            out.push_str(&format!("  improved   {line}\n"));
        }
    }
    let width = report
        .kernels
        .iter()
        .map(|k| k.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!("{:width$}  {:<28}", "kernel", "release"));
    for s in &report.scenarios {
        out.push_str(&format!(" {s:>10}"));
    }
    out.push_str("  boot\n");
    for k in &report.kernels {
        out.push_str(&format!(
            "{:width$}  {:<28}",
            k.name,
            k.release.as_deref().unwrap_or("-")
        ));
        for c in &k.cells {
            let s = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            out.push_str(&format!(" {s:>10}"));
        }
        out.push_str(&format!(
            "  {}\n",
            k.boot_s.map_or("-".into(), |b| format!("{b:.1}s"))
        ));
    }
    out.push_str(&feature_table(report));
    for k in report.kernels.iter().filter(|k| !k.throughput.is_empty()) {
        out.push_str(&format!(
            "\nthroughput on {}:\n{}",
            k.name,
            throughput::table(&k.throughput, &k.ratios)
        ));
    }
    out.push_str(&format!(
        "{} in {:.0} s",
        if report.passed { "passed" } else { "FAILED" },
        report.duration_s
    ));
    out
}
