//! Running a scenario's timeline: probes started, steps applied to the cluster the agents read
//! (and to the pods' servers), then the probes stopped and their logs read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_lab_bench::probes::{self, ServingTimeline};
use weir_lab_cluster::agent::Agents;
use weir_lab_cluster::workloads::{self, PodPorts, Workloads};
use weir_lab_core::backend::{BackendError, Cmd, Lab, ProcId};
use weir_lab_core::scenario::{Protocol, Scenario, StopSignal};
use weir_lab_core::timeline::{ActionError, ClusterModel, ProbeSpec, SideEffect, StepSpec};
use weir_lab_core::topology::Plan;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a probe's first exchanges before the steps begin.
const PROBE_WARMUP: Duration = Duration::from_millis(500);

/// Why a step or a probe could not be carried out (not a check's verdict).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Action(#[from] ActionError),
    #[error("{context}: {source}")]
    Backend {
        context: String,
        source: BackendError,
    },
    #[error("{0}")]
    NotListening(String),
    #[error("probe {probe}: {why}")]
    Probe { probe: String, why: &'static str },
    #[error("restarting the agent on {node}: {why}")]
    Restart { node: String, why: String },
}

fn backend(context: impl Into<String>) -> impl FnOnce(BackendError) -> StepError {
    let context = context.into();
    move |source| StepError::Backend { context, source }
}

/// A probe's client, running in its pod.
pub struct RunningProbe {
    pub spec: ProbeSpec,
    pub proc: ProcId,
    pub log: PathBuf,
    /// Who served its Service from when.
    pub serving: ServingTimeline,
}

/// What the steps need of the run.
pub struct TimelineCtx<'a> {
    pub lab: &'a mut dyn Lab,
    pub plan: &'a Plan,
    pub agents: &'a mut Agents,
    pub workloads: &'a mut Workloads,
    pub ports: &'a BTreeMap<String, PodPorts>,
    pub run_dir: &'a Path,
    pub model: ClusterModel,
    pub probes: Vec<RunningProbe>,
}

impl TimelineCtx<'_> {
    /// Starts every probe's client (this very executable, `probe stream`) in its pod.
    pub fn start_probes(&mut self, scenario: &Scenario) -> Result<(), StepError> {
        if scenario.probes.is_empty() {
            return Ok(());
        }
        let exe = std::env::current_exe().map_err(|source| StepError::Backend {
            context: "locating weir-lab".into(),
            source: BackendError::Io {
                context: "current_exe".into(),
                source,
            },
        })?;
        for (i, spec) in scenario.probes.iter().enumerate() {
            // Validation vetted the names; these only guard against a model out of step.
            let bad = |why| StepError::Probe {
                probe: spec.title(),
                why,
            };
            let from = self
                .plan
                .host(&spec.from)
                .ok_or_else(|| bad("unknown client"))?;
            let svc = self
                .model
                .service(&spec.service)
                .ok_or_else(|| bad("unknown service"))?;
            let ip = svc
                .cluster_ip_of(spec.family)
                .ok_or_else(|| bad("no cluster IP of the family"))?;
            let mut cmd = Cmd::new(exe.display().to_string())
                .args(["probe", "stream"])
                .arg(std::net::SocketAddr::new(ip, spec.port).to_string())
                .arg("--interval")
                .arg(humantime::format_duration(spec.interval).to_string());
            if spec.kind == Protocol::Udp {
                cmd = cmd.arg("--udp");
            }
            if let Some(size) = spec.size {
                cmd = cmd.arg("--size").arg(size.to_string());
            }
            let log = self.run_dir.join(format!("probe-{}.log", i + 1));
            let proc = self
                .lab
                .spawn(from, &cmd, &log)
                .map_err(backend(format!("starting probe {}", spec.title())))?;
            self.probes.push(RunningProbe {
                spec: spec.clone(),
                proc,
                log,
                serving: Vec::new(),
            });
        }
        self.wait_started()?;
        self.note_state();
        std::thread::sleep(PROBE_WARMUP);
        Ok(())
    }

    /// Waits until every probe has logged its start: only then does it take the marks' signal
    /// (before, the signal would end it).
    fn wait_started(&mut self) -> Result<(), StepError> {
        let deadline = std::time::Instant::now() + PROBE_START_TIMEOUT * self.lab.slowdown();
        for probe in &self.probes {
            loop {
                let text = std::fs::read_to_string(&probe.log).unwrap_or_default();
                if text.lines().any(|l| l.ends_with(" start")) {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(StepError::Probe {
                        probe: probe.spec.title(),
                        why: "its client did not start",
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Records, for every probe, who serves its Service from now on, and marks the moment in
    /// the probe's own log (its first record is the state it starts with).
    fn note_state(&mut self) {
        let now = probes::now_ms();
        for probe in &mut self.probes {
            let pods = self
                .model
                .service(&probe.spec.service)
                .map(|svc| self.model.serving_pods(svc, self.plan))
                .unwrap_or_default();
            if !probe.serving.is_empty() {
                // A lost mark only costs the verdict its own clock: see `finish_probes`.
                if let Err(e) = self.lab.signal(probe.proc, probes::MARK_SIGNAL) {
                    tracing::warn!("marking probe {}: {e}", probe.spec.title());
                }
            }
            probe.serving.push((now, pods.into_iter().collect()));
        }
    }

    /// Writes the cluster state as the model has it, where every agent reads it (atomically).
    fn write_state(&mut self) -> Result<(), StepError> {
        let yaml = weir_lab_core::k8s::cluster_state_of(&self.model, self.plan);
        let first = self.plan.nodes[0].id;
        self.lab
            .write_file(first, &self.agents.state_path, yaml.as_bytes())
            .map_err(backend("writing the cluster state"))?;
        self.note_state();
        Ok(())
    }

    /// Does one step's actions, in order, then its wait.
    pub fn apply_step(&mut self, step: &StepSpec) -> Result<(), StepError> {
        for action in &step.actions {
            let effect = self.model.apply(action, self.plan)?;
            match effect {
                None => self.write_state()?,
                Some(SideEffect::Sleep(d)) => std::thread::sleep(d),
                Some(SideEffect::StopPods { pods, grace }) => {
                    // The endpoints go first; the servers keep running through the grace
                    // period, as a deleted pod's containers do.
                    self.write_state()?;
                    std::thread::sleep(grace);
                    for pod in &pods {
                        workloads::stop_pod(self.lab, pod, self.workloads)
                            .map_err(backend(format!("stopping {pod}")))?;
                    }
                }
                Some(SideEffect::StartPods(pods)) => {
                    // Servers first, endpoints once they listen, as readiness would have it.
                    for pod in &pods {
                        workloads::start_pod(
                            self.lab,
                            self.plan,
                            pod,
                            self.ports,
                            self.run_dir,
                            self.workloads,
                        )
                        .map_err(backend(format!("starting {pod}")))?;
                    }
                    let ports: BTreeMap<String, PodPorts> = self
                        .ports
                        .iter()
                        .filter(|(name, _)| pods.contains(name))
                        .map(|(n, p)| (n.clone(), p.clone()))
                        .collect();
                    let timeout = LISTEN_TIMEOUT * self.lab.slowdown();
                    workloads::wait_listening(self.lab, self.plan, &ports, timeout, self.run_dir)
                        .map_err(StepError::NotListening)?;
                    self.write_state()?;
                }
                Some(SideEffect::RestartAgent { node, signal }) => {
                    self.restart_agent(&node, signal)?
                }
            }
        }
        if let Some(wait) = step.wait {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    /// Stops the node's agent and starts it again; the step goes on once it is ready. The state
    /// it reads is the model's, as the last action left it.
    fn restart_agent(&mut self, node: &str, signal: StopSignal) -> Result<(), StepError> {
        let failed = |why: String| StepError::Restart {
            node: node.to_owned(),
            why,
        };
        let host = self
            .plan
            .host(node)
            .ok_or_else(|| failed("no such node".into()))?;
        let index = self
            .agents
            .nodes
            .iter()
            .position(|a| a.node == host)
            .ok_or_else(|| failed("no agent there".into()))?;
        crate::restart::stop_agent(self.lab, self.agents, index, signal).map_err(failed)?;
        crate::restart::start_again(self.lab, self.agents, index).map_err(failed)?;
        Ok(())
    }

    /// Stops every probe and judges its log.
    pub fn finish_probes(&mut self) -> Vec<(String, Result<String, String>)> {
        let stopped = probes::now_ms();
        let mut out = Vec::new();
        for probe in std::mem::take(&mut self.probes) {
            let exited = self.lab.exited(probe.proc).ok().flatten();
            let _ = self.lab.stop(probe.proc);
            let verdict = match std::fs::read_to_string(&probe.log) {
                Err(e) => Err(format!("reading {}: {e}", probe.log.display())),
                Ok(text) => {
                    let events = probes::parse_log(&text);
                    // The probe's own clock when its marks are all there; the runner's (the
                    // same one on namespaces) otherwise.
                    let verdict = match probes::on_probe_clock(&events, &probe.serving) {
                        Some(timeline) => {
                            let last = events.last().map_or(0, probes::ProbeEvent::at);
                            probes::judge(&probe.spec, &events, &timeline, last)
                        }
                        None => probes::judge(&probe.spec, &events, &probe.serving, stopped),
                    };
                    match (verdict, exited) {
                        // A UDP probe runs until stopped; one that exited early failed.
                        (Ok(_), Some(how)) if probe.spec.kind == Protocol::Udp => Err(format!(
                            "the probe client {how} early; see {}",
                            probe.log.display()
                        )),
                        (v, _) => v,
                    }
                }
            };
            out.push((probe.spec.title(), verdict));
        }
        out
    }
}
