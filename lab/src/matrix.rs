//! `weir-lab matrix`: a suite across the kernel matrix.
//!
//! For every kernel: fetch it (cached), check its config, boot one VM and probe what it offers
//! Weir, run the suite's scenarios on VMs of that kernel (the host kernel runs them on
//! namespaces), and measure throughput. The result is one [`MatrixReport`], written as
//! report.json and as a self-contained HTML page (see `weir_lab_report::html`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use weir_kernels::{KernelConfig, KernelEntry, Matrix, Source};
use weir_node_image::proto::Features;

use crate::runner::{self, RunOptions, ScenarioFile};
use weir_lab_backends::netns::NetnsBackend;
use weir_lab_backends::qemu::{self, QemuBackend, VmOptions, VmSetup};
use weir_lab_bench::throughput::{self, ThroughputOptions};
use weir_lab_core::backend::{Backend, BackendKind};
use weir_lab_core::events::{Event, Events, Recorder};
use weir_lab_core::features::{self, Feature};
use weir_lab_report::matrix::{
    Cell, CheckResult, FeatureResult, FeatureStatus, KernelReport, MatrixReport, SinceLastRun,
    Status,
};
use weir_lab_report::run::{JsonReporter, TerminalReporter};

#[derive(Clone, Debug)]
pub struct MatrixOptions {
    /// Kernels to run, by name; empty means the matrix's defaults.
    pub kernels: Vec<String>,
    pub report_dir: PathBuf,
    pub agent: PathBuf,
    /// The guest init (weir-node-init).
    pub init: PathBuf,
    pub cache: PathBuf,
    pub throughput: Option<ThroughputOptions>,
    /// virtio-net checksum/segmentation offloads for the scenario VMs.
    pub offloads: bool,
    pub keep: bool,
}

fn file_name(f: &ScenarioFile) -> String {
    match &f.scenario {
        Ok(s) => s.name.clone(),
        Err(_) => f
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn say(msg: &str) {
    println!("[matrix] {msg}");
}

/// Runs `files` on every kernel asked for and returns the report (not yet written).
pub fn run(
    matrix: &Matrix,
    files: &[ScenarioFile],
    suite: &str,
    opts: &MatrixOptions,
) -> Result<MatrixReport, String> {
    let started = Instant::now();
    let entries: Vec<KernelEntry> = if opts.kernels.is_empty() {
        matrix.defaults().cloned().collect()
    } else {
        opts.kernels
            .iter()
            .map(|k| matrix.get(k).cloned().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?
    };
    let names: Vec<String> = files.iter().map(file_name).collect();
    let mut kernels = Vec::new();
    for entry in &entries {
        say(&format!(
            "kernel {} ({}): starting",
            entry.name,
            source_text(&entry.source)
        ));
        let report = run_kernel(entry, files, opts);
        let (pass, fail, skip) =
            report
                .cells
                .iter()
                .fold((0, 0, 0), |(p, f, s), c| match c.status {
                    Status::Pass => (p + 1, f, s),
                    Status::Fail => (p, f + 1, s),
                    Status::Skip => (p, f, s + 1),
                });
        say(&format!(
            "kernel {}: {} in {:.0} s: {pass} passed, {fail} failed, {skip} skipped{}",
            entry.name,
            report.status,
            report.wall_s,
            report
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        kernels.push(report);
    }
    let passed = kernels
        .iter()
        .all(|k| k.cells.iter().all(|c| c.status != Status::Fail));
    let lowest_kernel = lowest_kernels(&kernels);
    Ok(MatrixReport {
        weir_lab_version: env!("CARGO_PKG_VERSION"),
        started_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(started.elapsed().as_secs()),
        duration_s: started.elapsed().as_secs_f64(),
        passed,
        suite: suite.to_owned(),
        scenarios: names,
        kernels,
        lowest_kernel,
        since_last_run: SinceLastRun::default(),
    })
}

fn source_text(s: &Source) -> String {
    match s {
        Source::Debian { suite, package } => format!("Debian {suite} {package}"),
        Source::Host => "the running host kernel".into(),
        Source::Local { image, .. } => format!("local {}", image.display()),
        Source::Nix { attr, .. } => format!("Nix flake {attr}"),
    }
}

fn empty_report(entry: &KernelEntry) -> KernelReport {
    KernelReport {
        name: entry.name.clone(),
        version: entry.version.clone(),
        source: source_text(&entry.source),
        default: entry.default,
        status: "ran".into(),
        reason: None,
        backend: None,
        release: None,
        provenance: None,
        accel: None,
        prepare_s: None,
        boot_s: None,
        wall_s: 0.0,
        missing_config: Vec::new(),
        features: None,
        attach_mode: None,
        missing_features: Vec::new(),
        modules: None,
        cells: Vec::new(),
        weir_features: Vec::new(),
        throughput: Vec::new(),
        ratios: Vec::new(),
    }
}

fn skip_all(files: &[ScenarioFile], why: &str) -> Vec<Cell> {
    files
        .iter()
        .map(|f| Cell {
            scenario: file_name(f),
            status: Status::Skip,
            reason: Some(why.to_owned()),
            duration_s: 0.0,
            checks_passed: 0,
            checks_failed: 0,
            checks_not_run: 0,
            checks: Vec::new(),
        })
        .collect()
}

fn run_kernel(entry: &KernelEntry, files: &[ScenarioFile], opts: &MatrixOptions) -> KernelReport {
    let started = Instant::now();
    let mut report = empty_report(entry);
    let dir = opts.report_dir.join("kernels").join(&entry.name);
    let _ = std::fs::create_dir_all(&dir);

    let (backend, setup): (Box<dyn Backend>, Option<Arc<VmSetup>>) = match &entry.source {
        Source::Host => {
            report.backend = Some(BackendKind::Netns.to_string());
            report.release = weir_kernels::host_release().ok();
            report.provenance = Some("the running kernel, on network namespaces".into());
            match probe_host(&opts.init) {
                Ok(f) => record_features(&mut report, f),
                Err(e) => report.missing_features.push(format!("probe failed: {e}")),
            }
            (Box::new(NetnsBackend::new()), None)
        }
        _ => {
            let mut vm = VmOptions::new(
                entry.clone(),
                opts.init.clone(),
                opts.agent.parent().unwrap_or(Path::new(".")).to_owned(),
            );
            vm.cache = opts.cache.clone();
            vm.offloads = opts.offloads;
            let setup = match vm.prepare() {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    report.status = "unavailable".into();
                    report.reason = Some(e.to_string());
                    report.cells = skip_all(files, &format!("kernel unavailable: {e}"));
                    report.weir_features = feature_results(&report.cells, files);
                    report.wall_s = started.elapsed().as_secs_f64();
                    return report;
                }
            };
            report.backend = Some(BackendKind::Qemu.to_string());
            report.release = Some(setup.kernel.release.clone());
            report.provenance = Some(setup.kernel.provenance.clone());
            report.accel = Some(format!("{:?} ({})", setup.accel, setup.accel_reason));
            report.prepare_s = Some(setup.prepare_time.as_secs_f64());
            report.modules = Some(setup.image.modules.clone());
            if let Some(cfg) = &setup.kernel.config {
                match KernelConfig::load(cfg) {
                    Ok(c) => {
                        report.missing_config = c
                            .missing(&entry.requires)
                            .into_iter()
                            .map(String::from)
                            .collect()
                    }
                    Err(e) => report
                        .missing_config
                        .push(format!("unreadable config: {e}")),
                }
            }
            match qemu::probe_kernel(setup.clone(), &dir.join("probe")) {
                Ok((features, boot)) => {
                    report.boot_s = Some(boot.as_secs_f64());
                    say(&format!(
                        "kernel {}: one VM booted in {:.1} s; programs attach with {}",
                        entry.name,
                        boot.as_secs_f64(),
                        features.attach_mode()
                    ));
                    record_features(&mut report, features);
                }
                Err(e) => report.missing_features.push(format!("probe failed: {e}")),
            }
            (Box::new(QemuBackend::new(setup.clone())), Some(setup))
        }
    };
    // Scenarios whose tunnel module this kernel lacks are skipped, the rest run.
    let mut runnable = Vec::new();
    let mut cells: Vec<Option<Cell>> = Vec::new();
    // Without a probe's answer the host kernel is still asked directly; a VM's is not.
    let lacks = |module: &str| match &report.features {
        Some(features) => !features.has_module(module),
        None => setup.is_none() && !runner::host_has_module(module),
    };
    for f in files {
        let needed = f
            .scenario
            .as_ref()
            .map(features::required_modules)
            .unwrap_or_default();
        let lacking: Vec<&str> = needed.into_iter().filter(|m| lacks(m)).collect();
        let multi_homed = f.scenario.as_ref().is_ok_and(|sc| sc.topology.networks > 1);
        if setup.is_some() && multi_homed {
            cells.push(
                skip_all(
                    std::slice::from_ref(f),
                    "multi-homed nodes need the namespace lab (one NIC per VM here)",
                )
                .pop(),
            );
        } else if lacking.is_empty() {
            runnable.push(ScenarioFile::load(&f.path));
            cells.push(None);
        } else {
            cells.push(
                skip_all(
                    std::slice::from_ref(f),
                    &format!("kernel lacks module {}", lacking.join(", ")),
                )
                .pop(),
            );
        }
    }
    let run_opts = RunOptions {
        backend: if setup.is_some() {
            BackendKind::Qemu
        } else {
            BackendKind::Netns
        },
        agent: opts.agent.clone(),
        report_dir: dir.clone(),
        keep: opts.keep,
    };
    let recorder = Recorder::default();
    let mut events = Events::new()
        .with(TerminalReporter::stdout())
        .with(JsonReporter::new(dir.join("report.json")))
        .with(recorder.clone());
    runner::run_all_with(&runnable, &run_opts, backend.as_ref(), &mut events);
    if let Err(e) = events.finish() {
        say(&format!(
            "writing {}: {e}",
            dir.join("report.json").display()
        ));
    }
    let mut ran = cells_from_events(&recorder.events.borrow()).into_iter();
    report.cells = cells
        .into_iter()
        .map(|c| c.or_else(|| ran.next()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default();
    report.weir_features = feature_results(&report.cells, files);

    if let Some(t) = &opts.throughput {
        let mut progress = |m: &str| say(&format!("kernel {}: {m}", entry.name));
        report.throughput = throughput::run(backend.as_ref(), t, &dir, &mut progress);
        if let Some(modules) = &report.modules {
            throughput::explain_kube_proxy_skips(&mut report.throughput, &modules.missing);
        }
        report.ratios = weir_lab_report::throughput::ratios(&report.throughput);
    }
    report.wall_s = started.elapsed().as_secs_f64();
    report
}

fn record_features(report: &mut KernelReport, f: Features) {
    report.attach_mode = Some(f.attach_mode().to_owned());
    report.missing_features = f
        .missing_required()
        .iter()
        .map(|m| format!("{}: {}", m.name, m.detail))
        .collect();
    report.features = Some(f);
}

/// The host kernel's features, probed by the guest init's probe code in a throwaway network
/// namespace (its TCX probe attaches to loopback for an instant).
fn probe_host(init: &Path) -> Result<Features, String> {
    let out = std::process::Command::new("unshare")
        .arg("--net")
        .arg(init)
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"{\"id\":1,\"op\":\"probe\"}\n")?;
            }
            child.wait_with_output()
        })
        .map_err(|e| format!("running {} --stdio: {e}", init.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let response: weir_node_image::proto::Response = serde_json::from_str(text.trim())
        .map_err(|e| format!("unreadable probe answer ({e}): {text}"))?;
    match response.reply {
        weir_node_image::proto::Reply::Probe { features } => {
            let mut features = *features;
            // bpf_jit_enable exists only in the initial network namespace, which the probe
            // left: read it here.
            if !features.jit.available {
                if let Ok(v) = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
                    features.jit.available = v.trim() != "0";
                    features.jit.detail = if features.jit.available {
                        String::new()
                    } else {
                        "bpf_jit_enable is 0".into()
                    };
                }
            }
            Ok(features)
        }
        other => Err(format!("unexpected probe answer: {other:?}")),
    }
}

/// One cell per finished scenario, in run order.
fn cells_from_events(events: &[Event]) -> Vec<Cell> {
    let mut cells = Vec::new();
    let mut checks: Vec<CheckResult> = Vec::new();
    for e in events {
        match e {
            Event::ScenarioStarted { .. } => checks.clear(),
            Event::CheckPassed {
                check,
                detail,
                features,
                ..
            } => checks.push(CheckResult {
                title: check.clone(),
                passed: true,
                detail: detail.clone(),
                features: features.clone(),
            }),
            Event::CheckFailed {
                check,
                reason,
                features,
                ..
            } => checks.push(CheckResult {
                title: check.clone(),
                passed: false,
                detail: reason.clone(),
                features: features.clone(),
            }),
            Event::ScenarioFinished {
                scenario,
                passed,
                error,
                not_run,
                duration,
                ..
            } => {
                let failed: Vec<&CheckResult> = checks.iter().filter(|c| !c.passed).collect();
                let reason = error
                    .clone()
                    .or_else(|| failed.first().map(|c| format!("{}: {}", c.title, c.detail)));
                cells.push(Cell {
                    scenario: scenario.clone(),
                    status: if *passed { Status::Pass } else { Status::Fail },
                    reason,
                    duration_s: duration.as_secs_f64(),
                    checks_passed: checks.iter().filter(|c| c.passed).count(),
                    checks_failed: failed.len(),
                    checks_not_run: *not_run,
                    checks: std::mem::take(&mut checks),
                });
            }
            _ => {}
        }
    }
    cells
}

/// Every Weir feature on one kernel, from its cells. A skipped scenario's checks would have
/// shown the features they prove: their skip reason is the evidence of "not shown".
fn feature_results(cells: &[Cell], files: &[ScenarioFile]) -> Vec<FeatureResult> {
    Feature::ALL
        .iter()
        .map(|&feature| {
            let mut result = FeatureResult {
                feature,
                status: FeatureStatus::NotShown,
                passed: Vec::new(),
                failed: Vec::new(),
                skipped: Vec::new(),
            };
            for cell in cells {
                for check in cell.checks.iter().filter(|c| c.features.contains(&feature)) {
                    let title = format!("{}: {}", cell.scenario, check.title);
                    if check.passed {
                        result.passed.push(title);
                    } else {
                        result.failed.push(format!("{title}: {}", check.detail));
                    }
                }
                let would_show = files
                    .iter()
                    .filter(|f| file_name(f) == cell.scenario)
                    .filter_map(|f| f.scenario.as_ref().ok())
                    .any(|s| scenario_proves(s, feature));
                if cell.status == Status::Skip && would_show {
                    let why = cell.reason.as_deref().unwrap_or("skipped");
                    result.skipped.push(format!("{}: {why}", cell.scenario));
                }
            }
            result.status = if !result.failed.is_empty() {
                FeatureStatus::Fails
            } else if !result.passed.is_empty() {
                FeatureStatus::Works
            } else {
                FeatureStatus::NotShown
            };
            result
        })
        .collect()
}

/// Whether any check of `scenario` proves `feature`.
fn scenario_proves(scenario: &weir_lab_core::scenario::Scenario, feature: Feature) -> bool {
    let top = scenario
        .checks
        .iter()
        .any(|c| features::proven_by(scenario, c, false).contains(&feature));
    let in_steps = scenario
        .steps
        .iter()
        .flat_map(|step| &step.checks)
        .any(|c| features::proven_by(scenario, c, true).contains(&feature));
    let restart = feature == Feature::AgentRestart && !scenario.agent_restarts.is_empty();
    let probes = feature == Feature::EndpointChurn && !scenario.probes.is_empty();
    top || in_steps || restart || probes
}

/// Per feature, the lowest kernel release it works on, counting only kernels from which on it
/// never failed.
fn lowest_kernels(kernels: &[KernelReport]) -> Vec<(Feature, Option<String>)> {
    let mut by_version: Vec<&KernelReport> = kernels.iter().collect();
    by_version.sort_by_key(|k| version_key(k.release.as_deref().unwrap_or(&k.version)));
    Feature::ALL
        .iter()
        .map(|&feature| {
            let status = |k: &KernelReport| {
                k.weir_features
                    .iter()
                    .find(|r| r.feature == feature)
                    .map_or(FeatureStatus::NotShown, |r| r.status)
            };
            // The newest failure bounds it from below.
            let after_failures = by_version
                .iter()
                .rposition(|k| status(k) == FeatureStatus::Fails)
                .map_or(0, |i| i + 1);
            let lowest = by_version[after_failures..]
                .iter()
                .find(|k| status(k) == FeatureStatus::Works)
                .map(|k| k.release.clone().unwrap_or_else(|| k.version.clone()));
            (feature, lowest)
        })
        .collect()
}

/// A kernel release's leading numbers, for ordering ("6.1.0-31-amd64" -> [6, 1, 0]).
fn version_key(release: &str) -> Vec<u32> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// The throughput defaults: MTU 1440 (a VXLAN-sized pod MTU on a 1500 wire) and 8940 (the same
/// on a 9000 wire), 5 s per qperf test, 2 alternating rounds.
pub fn default_throughput(agent: PathBuf) -> ThroughputOptions {
    ThroughputOptions {
        mtus: vec![1440, 8940],
        seconds: 5,
        rounds: 2,
        agent,
        kube_proxy: throughput::kube_proxy_iptables,
        veth_offloads: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Duration;
    use weir_lab_report::matrix::compare_with_previous;

    #[test]
    fn a_feature_that_stopped_working_is_a_regression() {
        let cell = |status| Cell {
            scenario: "smoke".into(),
            status,
            reason: None,
            duration_s: 1.0,
            checks_passed: 1,
            checks_failed: 0,
            checks_not_run: 0,
            checks: vec![CheckResult {
                title: "http".into(),
                passed: status == Status::Pass,
                detail: String::new(),
                features: BTreeSet::from([Feature::ClusterIpTcp]),
            }],
        };
        let report = |status| {
            let mut kernel = empty_report(&KernelEntry {
                name: "debian-6.1".into(),
                version: "6.1".into(),
                source: Source::Host,
                modules: vec![],
                requires: vec![],
                default: true,
            });
            kernel.cells = vec![cell(status)];
            kernel.weir_features = feature_results(&kernel.cells, &[]);
            MatrixReport {
                weir_lab_version: "0",
                started_unix_s: 7,
                duration_s: 1.0,
                passed: true,
                suite: "default".into(),
                scenarios: vec!["smoke".into()],
                lowest_kernel: lowest_kernels(std::slice::from_ref(&kernel)),
                kernels: vec![kernel],
                since_last_run: SinceLastRun::default(),
            }
        };
        let before = serde_json::to_string(&report(Status::Pass)).unwrap();
        let mut now = report(Status::Fail);
        compare_with_previous(&mut now, Some(&before)).unwrap();
        let since = &now.since_last_run;
        assert_eq!(since.previous_started_unix_s, Some(7));
        assert!(
            since
                .regressions
                .contains(&"debian-6.1: ClusterIP TCP works -> fails".to_owned()),
            "{since:?}"
        );
        assert!(since
            .regressions
            .contains(&"debian-6.1: scenario smoke pass -> fail".to_owned()));
        let mut again = report(Status::Pass);
        compare_with_previous(&mut again, Some(&serde_json::to_string(&now).unwrap())).unwrap();
        assert_eq!(again.since_last_run.improvements.len(), 2);
        assert!(again.since_last_run.regressions.is_empty());
    }

    #[test]
    fn kernels_order_by_release_numbers() {
        assert!(version_key("5.10.0-35-amd64") < version_key("6.1.0-31-amd64"));
        assert!(version_key("6.1.0") < version_key("6.12.1"));
        assert!(version_key("6.12.1") < version_key("6.18.0"));
    }

    #[test]
    fn cells_follow_events() {
        let events = vec![
            Event::ScenarioStarted {
                scenario: "a".into(),
                file: "a.toml".into(),
                description: String::new(),
                checks: 2,
            },
            Event::CheckPassed {
                scenario: "a".into(),
                check: "c1".into(),
                features: BTreeSet::from([Feature::ClusterIpTcp]),
                detail: "ok".into(),
                duration: Duration::ZERO,
            },
            Event::CheckFailed {
                scenario: "a".into(),
                check: "c2".into(),
                features: BTreeSet::from([Feature::ClusterIpUdp]),
                reason: "bad".into(),
                duration: Duration::ZERO,
            },
            Event::ScenarioFinished {
                scenario: "a".into(),
                passed: false,
                error: None,
                not_run: 0,
                artifacts: None,
                duration: Duration::from_secs(1),
            },
        ];
        let cells = cells_from_events(&events);
        assert_eq!(cells.len(), 1);
        assert_eq!(cells[0].status, Status::Fail);
        assert_eq!(cells[0].reason.as_deref(), Some("c2: bad"));
        assert_eq!(cells[0].checks_passed, 1);
        let results = feature_results(&cells, &[]);
        let status = |f| results.iter().find(|r| r.feature == f).unwrap().status;
        assert_eq!(status(Feature::ClusterIpTcp), FeatureStatus::Works);
        assert_eq!(status(Feature::ClusterIpUdp), FeatureStatus::Fails);
        assert_eq!(status(Feature::NodePort), FeatureStatus::NotShown);
    }
}
