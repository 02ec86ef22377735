//! Runs scenarios: build the lab, start workloads and agents, run the checks, tear down, and
//! tell the reporters about each step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::checks::{self, CheckCtx};
use crate::steps::TimelineCtx;
use weir_lab_cluster::agent::{self, Agents};
use weir_lab_cluster::workloads;
use weir_lab_core::backend::{Backend, BackendError, BackendKind, Cmd, Lab};
use weir_lab_core::events::{Event, Events};
use weir_lab_core::features::{self, Feature};
use weir_lab_core::k8s;
use weir_lab_core::scenario::{Scenario, ScenarioError};
use weir_lab_core::timeline::ClusterModel;
use weir_lab_core::topology::Plan;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Per diagnostic command after a failure; the guests of a TCG VM are slow.
const DIAGNOSTIC_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub backend: BackendKind,
    /// The weir-agent binary; only needed by scenarios that run the agent.
    pub agent: PathBuf,
    /// report.json goes here, and the run directories of failed scenarios under runs/.
    pub report_dir: PathBuf,
    /// Keep run directories of passing scenarios too.
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Setup(String),
}

/// A scenario file as loaded: a broken file still takes part, as a failed scenario.
pub struct ScenarioFile {
    pub path: PathBuf,
    pub scenario: Result<Scenario, ScenarioError>,
}

impl ScenarioFile {
    pub fn load(path: &Path) -> ScenarioFile {
        ScenarioFile {
            path: path.to_owned(),
            scenario: Scenario::load(path),
        }
    }

    fn name(&self) -> String {
        match &self.scenario {
            Ok(s) => s.name.clone(),
            Err(_) => self.path.file_stem().map_or_else(
                || self.path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            ),
        }
    }
}

/// Every `*.toml` in `dir` whose `suite` list has `suite`, sorted by file name. Files that do not
/// parse are included, so a broken scenario fails the suite instead of vanishing from it.
pub fn discover(dir: &Path, suite: &str) -> std::io::Result<Vec<ScenarioFile>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    Ok(paths
        .iter()
        .map(|p| ScenarioFile::load(p))
        .filter(|f| match &f.scenario {
            Ok(s) => s.suite.iter().any(|name| name == suite),
            Err(_) => true,
        })
        .collect())
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub checks_passed: usize,
    pub checks_failed: usize,
    pub checks_not_run: usize,
    pub scenarios_passed: usize,
    pub scenarios_failed: usize,
}

impl Tally {
    pub fn ok(&self) -> bool {
        self.checks_failed == 0 && self.scenarios_failed == 0
    }
}

/// Runs the scenarios one after another; true if all passed.
/// The scenarios the host kernel can run: one that needs a tunnel module the host lacks (this
/// machine's kernel has no IPIP) is left out, and said so; the VM lab runs it on kernels that
/// have it.
pub fn without_missing_host_modules(files: Vec<ScenarioFile>) -> Vec<ScenarioFile> {
    files
        .into_iter()
        .filter(|file| {
            let Ok(scenario) = &file.scenario else {
                return true;
            };
            let missing: Vec<&str> = features::required_modules(scenario)
                .into_iter()
                .filter(|m| !host_has_module(m))
                .collect();
            if !missing.is_empty() {
                println!(
                    "skipped {}: the host kernel has no {} module (the VM lab runs it)",
                    scenario.name,
                    missing.join(", ")
                );
            }
            missing.is_empty()
        })
        .collect()
}

/// Loaded or built in (/sys/module), or loadable.
pub fn host_has_module(module: &str) -> bool {
    Path::new("/sys/module").join(module).exists()
        || std::process::Command::new("modprobe")
            .args(["--dry-run", "--quiet", module])
            .status()
            .is_ok_and(|s| s.success())
}

pub fn run_all(files: &[ScenarioFile], opts: &RunOptions, events: &mut Events) -> Tally {
    let backend = weir_lab_backends::instantiate(opts.backend);
    run_all_with(files, opts, backend.as_ref(), events)
}

/// [`run_all`] on a backend built by the caller (the kernel matrix gives each kernel its own).
pub fn run_all_with(
    files: &[ScenarioFile],
    opts: &RunOptions,
    backend: &dyn Backend,
    events: &mut Events,
) -> Tally {
    let started = Instant::now();
    events.emit(Event::SuiteStarted {
        backend: opts.backend.to_string(),
        scenarios: files.len(),
    });
    let mut tally = Tally::default();
    for file in files {
        run_file(file, opts, backend, events, &mut tally);
    }
    events.emit(Event::SuiteFinished {
        checks_passed: tally.checks_passed,
        checks_failed: tally.checks_failed,
        checks_not_run: tally.checks_not_run,
        scenarios_passed: tally.scenarios_passed,
        scenarios_failed: tally.scenarios_failed,
        duration: started.elapsed(),
    });
    tally
}

static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

fn run_file(
    file: &ScenarioFile,
    opts: &RunOptions,
    backend: &dyn Backend,
    events: &mut Events,
    tally: &mut Tally,
) {
    let started = Instant::now();
    let name = file.name();
    let scenario = match &file.scenario {
        Ok(s) => s,
        Err(e) => {
            events.emit(Event::ScenarioStarted {
                scenario: name.clone(),
                file: file.path.clone(),
                description: String::new(),
                checks: 0,
            });
            tally.scenarios_failed += 1;
            events.emit(Event::ScenarioFinished {
                scenario: name,
                passed: false,
                error: Some(e.to_string()),
                not_run: 0,
                artifacts: None,
                duration: started.elapsed(),
            });
            return;
        }
    };
    events.emit(Event::ScenarioStarted {
        scenario: name.clone(),
        file: file.path.clone(),
        description: scenario.description.clone(),
        checks: scenario.check_count(),
    });

    let run_id = format!(
        "{}-{}-{}",
        scenario.name,
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let run_dir = opts.report_dir.join("runs").join(&run_id);
    let mut run = ScenarioRun {
        scenario,
        opts,
        backend,
        run_id,
        run_dir: run_dir.clone(),
        events,
        lab: None,
        agents: None,
        cluster_after_steps: None,
        passed: 0,
        failed: 0,
    };
    let mut error = run.execute().err().map(|e| e.to_string());
    let ran = run.passed + run.failed;
    let (passed_checks, failed_checks) = (run.passed, run.failed);
    if let Err(e) = run.teardown() {
        error.get_or_insert(format!("teardown: {e}"));
    }
    drop(run);

    let passed = error.is_none() && failed_checks == 0;
    let not_run = (scenario.check_count()).saturating_sub(ran);
    tally.checks_passed += passed_checks;
    tally.checks_failed += failed_checks;
    tally.checks_not_run += not_run;
    if passed {
        tally.scenarios_passed += 1;
    } else {
        tally.scenarios_failed += 1;
    }
    let artifacts = if passed && !opts.keep {
        if let Err(e) = std::fs::remove_dir_all(&run_dir) {
            warn!("removing {}: {e}", run_dir.display());
        }
        None
    } else {
        Some(run_dir)
    };
    events.emit(Event::ScenarioFinished {
        scenario: name,
        passed,
        error,
        not_run,
        artifacts,
        duration: started.elapsed(),
    });
}

struct ScenarioRun<'a> {
    scenario: &'a Scenario,
    opts: &'a RunOptions,
    backend: &'a dyn Backend,
    run_id: String,
    run_dir: PathBuf,
    events: &'a mut Events,
    lab: Option<Box<dyn Lab>>,
    agents: Option<Agents>,
    /// The cluster as the steps left it: what agent restarts after them write.
    cluster_after_steps: Option<ClusterModel>,
    passed: usize,
    failed: usize,
}

impl ScenarioRun<'_> {
    fn step(&mut self, step: String, since: Instant) {
        info!(scenario = %self.scenario.name, "{step}");
        self.events.emit(Event::Step {
            scenario: self.scenario.name.clone(),
            step,
            duration: since.elapsed(),
        });
    }

    /// Counts a check's outcome and tells the reporters.
    fn record(
        &mut self,
        check: String,
        features: BTreeSet<Feature>,
        outcome: Result<String, String>,
        since: Instant,
    ) {
        let scenario = self.scenario.name.clone();
        let event = match outcome {
            Ok(detail) => {
                self.passed += 1;
                Event::CheckPassed {
                    scenario,
                    check,
                    features,
                    detail,
                    duration: since.elapsed(),
                }
            }
            Err(reason) => {
                self.failed += 1;
                Event::CheckFailed {
                    scenario,
                    check,
                    features,
                    reason,
                    duration: since.elapsed(),
                }
            }
        };
        self.events.emit(event);
    }

    /// Probes started, steps in order (each: actions, wait, checks), probes judged.
    fn run_timeline(
        &mut self,
        plan: &Plan,
        pod_servers: &mut workloads::Workloads,
        ports: &BTreeMap<String, workloads::PodPorts>,
    ) -> Result<(), RunError> {
        let scenario = self.scenario;
        let model = ClusterModel::new(scenario, k8s::pod_labels(scenario, plan));
        let mut lab = self.lab.take().expect("lab built above");
        let mut agents = self
            .agents
            .take()
            .ok_or_else(|| RunError::Setup("steps and probes need the agents".into()))?;
        let run_dir = self.run_dir.clone();
        let result = (|| {
            let mut tl = TimelineCtx {
                lab: lab.as_mut(),
                plan,
                agents: &mut agents,
                workloads: pod_servers,
                ports,
                run_dir: &run_dir,
                model,
                probes: Vec::new(),
            };
            let t = Instant::now();
            tl.start_probes(scenario)
                .map_err(|e| RunError::Setup(e.to_string()))?;
            if !scenario.probes.is_empty() {
                self.step(format!("{} probe(s) started", scenario.probes.len()), t);
            }
            for (i, step) in scenario.steps.iter().enumerate() {
                let title = step.title(i);
                let t = Instant::now();
                let marks = checks::counter_marks(tl.lab, Some(&*tl.agents), &step.checks);
                if let Err(e) = tl.apply_step(step) {
                    // Later steps build on this one: the timeline stops here.
                    self.record(title, BTreeSet::new(), Err(e.to_string()), t);
                    break;
                }
                self.step(title.clone(), t);
                let at_step = scenario.at(&tl.model);
                let endpoints = tl.model.serving_map(plan);
                for check in &step.checks {
                    let t = Instant::now();
                    let outcome = {
                        let mut ctx = CheckCtx {
                            lab: &mut *tl.lab,
                            plan,
                            scenario: &at_step,
                            endpoints: &endpoints,
                            agents: Some(&*tl.agents),
                            counter_marks: marks.as_ref(),
                        };
                        checks::run(&mut ctx, check)
                    };
                    let features = features::proven_by(scenario, check, true);
                    self.record(format!("{title}: {}", check.title()), features, outcome, t);
                }
            }
            let t = Instant::now();
            for (title, verdict) in tl.finish_probes() {
                self.record(title, features::proven_by_probe(), verdict, t);
            }
            self.cluster_after_steps = Some(tl.model);
            Ok(())
        })();
        self.lab = Some(lab);
        self.agents = Some(agents);
        result
    }

    fn execute(&mut self) -> Result<(), RunError> {
        let scenario = self.scenario;
        let plan = scenario.plan();
        std::fs::create_dir_all(&self.run_dir)
            .map_err(|e| RunError::Setup(format!("creating {}: {e}", self.run_dir.display())))?;

        if scenario.agent.enabled && !self.opts.agent.is_file() {
            return Err(RunError::Setup(format!(
                "weir-agent not found at {} (build it with `cargo build -p weir-agent` or pass --agent)",
                self.opts.agent.display()
            )));
        }

        let t = Instant::now();
        let backend = self.backend;
        self.lab = Some(backend.create(&plan, &self.run_dir)?);
        self.step(
            format!(
                "{} topology: {} node(s), {} pod(s), {} external client(s), mtu {}",
                backend.name(),
                plan.nodes.len(),
                plan.pods.len(),
                plan.externals.len(),
                plan.mtu
            ),
            t,
        );

        let t = Instant::now();
        let ports = workloads::pod_ports(scenario, &plan);
        let lab = self.lab.as_deref_mut().expect("lab built above");
        workloads::set_node_side_mtus(lab, scenario, &plan)?;
        let mut pod_servers = workloads::start(lab, &plan, &ports, &self.run_dir)?;
        let (nginx, udp) = (pod_servers.nginx, pod_servers.udp);
        let listen_timeout = LISTEN_TIMEOUT * lab.slowdown();
        workloads::wait_listening(lab, &plan, &ports, listen_timeout, &self.run_dir)
            .map_err(RunError::Setup)?;
        self.step(
            format!("workloads listening: {nginx} nginx, {udp} udp echo"),
            t,
        );

        // Who answers each Service: its ready endpoints, in generated and hand-written slices.
        let endpoints: BTreeMap<String, Vec<String>> =
            ClusterModel::new(scenario, k8s::pod_labels(scenario, &plan)).serving_map(&plan);

        if scenario.agent.enabled {
            let t = Instant::now();
            let lab = self.lab.as_deref_mut().expect("lab built above");
            let agents = agent::start(
                lab,
                scenario,
                &plan,
                &self.opts.agent,
                &self.run_dir,
                &self.run_id,
            )?;
            let agents = self.agents.insert(agents);
            let expected = agent::expected_frontends(scenario, &endpoints);
            let ready_timeout = scenario.agent.ready_timeout * lab.slowdown();
            agent::wait_ready(lab, agents, &expected, ready_timeout).map_err(RunError::Setup)?;
            self.step(
                format!(
                    "agents ready on {} node(s): {} frontend(s) programmed",
                    plan.nodes.len(),
                    expected.len()
                ),
                t,
            );
        }

        let marks = checks::counter_marks(
            self.lab.as_deref_mut().expect("lab built above"),
            self.agents.as_ref(),
            &scenario.checks,
        );
        for check in &scenario.checks {
            let t = Instant::now();
            let outcome = {
                let mut ctx = CheckCtx {
                    lab: self.lab.as_deref_mut().expect("lab built above"),
                    plan: &plan,
                    scenario,
                    endpoints: &endpoints,
                    agents: self.agents.as_ref(),
                    counter_marks: marks.as_ref(),
                };
                checks::run(&mut ctx, check)
            };
            let features = features::proven_by(scenario, check, false);
            self.record(check.title(), features, outcome, t);
        }

        if !scenario.steps.is_empty() || !scenario.probes.is_empty() {
            self.run_timeline(&plan, &mut pod_servers, &ports)?;
        }

        for restart in &scenario.agent_restarts {
            let t = Instant::now();
            let lab = self.lab.as_deref_mut().expect("lab built above");
            let Some(agents) = self.agents.as_mut() else {
                return Err(RunError::Setup("agent restarts need the agents".into()));
            };
            let state = match &self.cluster_after_steps {
                Some(model) => k8s::cluster_state_of(model, &plan),
                None => k8s::cluster_state(scenario, &plan),
            };
            let outcome =
                crate::restart::run(lab, &plan, scenario, &state, agents, restart, &self.run_dir);
            let event = match outcome {
                Ok(detail) => {
                    self.passed += 1;
                    Event::CheckPassed {
                        scenario: scenario.name.clone(),
                        check: restart.title(),
                        features: features::proven_by_restart(),
                        detail,
                        duration: t.elapsed(),
                    }
                }
                Err(reason) => {
                    self.failed += 1;
                    Event::CheckFailed {
                        scenario: scenario.name.clone(),
                        check: restart.title(),
                        features: features::proven_by_restart(),
                        reason,
                        duration: t.elapsed(),
                    }
                }
            };
            self.events.emit(event);
        }
        if self.failed > 0 {
            self.save_diagnostics();
        }
        Ok(())
    }

    /// After a failed check, what each node's data plane holds and counted, its links (with
    /// packet counts) and routes, into `diag-nodeN.txt` beside the agent logs: a VM is gone once
    /// the run ends, and these are what tells a dropped packet from one never sent.
    fn save_diagnostics(&mut self) {
        let (Some(lab), Some(agents)) = (self.lab.as_deref_mut(), self.agents.as_ref()) else {
            return;
        };
        for node in &agents.nodes {
            let mut text = String::new();
            let pin_dir = node.pin_dir.display().to_string();
            let dump = |what: &str| {
                Cmd::new(agents.binary.display().to_string()).args([
                    "dump",
                    what,
                    "--pin-dir",
                    &pin_dir,
                ])
            };
            let commands = [
                dump("counters"),
                dump("conntrack"),
                Cmd::new("ip").args(["-s", "-d", "link", "show"]),
                Cmd::new("ip").args(["addr", "show"]),
                Cmd::new("ip").args(["route", "show", "table", "all"]),
                Cmd::new("ip").args(["-6", "route", "show"]),
            ];
            for cmd in &commands {
                text.push_str(&format!("$ {cmd}\n"));
                match lab.exec(node.node, cmd, DIAGNOSTIC_TIMEOUT) {
                    Ok(out) => {
                        text.push_str(&out.stdout);
                        if !out.success() {
                            text.push_str(&format!("[{}] {}\n", out.status(), out.stderr));
                        }
                    }
                    Err(e) => text.push_str(&format!("[not run: {e}]\n")),
                }
                text.push('\n');
            }
            let file = self.run_dir.join(format!("diag-{}.txt", node.node));
            if let Err(e) = std::fs::write(&file, text) {
                warn!("writing {}: {e}", file.display());
            }
        }
    }

    /// Stops agents and workloads, removes the hosts and this run's pinned maps.
    fn teardown(&mut self) -> Result<(), RunError> {
        let mut result = Ok(());
        if let Some(mut lab) = self.lab.take() {
            result = lab.teardown().map_err(RunError::from);
        }
        if let Some(agents) = self.agents.take() {
            match std::fs::remove_dir_all(&agents.pin_root) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("removing {}: {e}", agents.pin_root.display()),
            }
        }
        result
    }
}

impl Drop for ScenarioRun<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!("{e}");
        }
    }
}
