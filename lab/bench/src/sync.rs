//! `weir-lab bench sync-baseline`: how long it takes to program N services x E endpoints, and
//! to apply a one-service change, with kube-proxy's iptables rules and with the Weir agent.
//!
//! The iptables side does what kube-proxy's iptables proxier does (see [`crate::kube_proxy`]):
//! `iptables-save -t nat` where kube-proxy lists stale chains, then
//! `iptables-restore -w 5 -W 100000 --noflush --counters` with the sync's input. Measured for a
//! full sync into an empty node, for one-service updates (partial syncs: KUBE-SERVICES in full,
//! the changed service's chains only) and for a full resync over the loaded rules. Each step
//! runs under `weir-lab probe measure` on the node: wall time, CPU seconds and peak RSS of the
//! iptables process itself (kube-proxy's own Go process comes on top and is not counted).
//!
//! The Weir side starts the real agent on an empty state directory (one YAML file per service:
//! its Service and EndpointSlice, as a GitOps tree or a control plane writing objects would lay
//! them out; Nodes and the rest in one more file). The agent watches the directory with inotify
//! and re-reads only a changed file. The full sync stages every file beside the directory, then
//! moves them in with one `mv` and times from just before the move to the agent's "applied
//! desired state" log line showing every frontend (written after the maps were updated; its
//! timestamp is the agent's own). Updates churn one service's endpoints at a fixed interval:
//! only that service's file is rewritten (atomically, by rename), and each is timed from the
//! moment the write returned (the rename is its last step, so the event is at most that early)
//! to the log line of the pass that wrote the maps: event to map written. Each step also reports
//! the agent's CPU seconds over its window and its peak RSS (VmHWM).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::iptables::{Applied, MeasuredKubeProxy};
use crate::kube_proxy::{self, Flavor};
use crate::weir::{applied_lines, stop_and_tear_down, BenchAgent, ProcessFigures};
use crate::{
    churn, host_info, iptables_restore, iptables_save, median, table, unix_now, write_json,
    BenchCommon, BenchEnv, BenchError, RunRoot, Synthetic,
};
use weir_lab_core::backend::Cmd;
use weir_lab_core::backend::Lab;
use weir_lab_core::scenario::Scenario;
use weir_lab_core::topology::Plan;

const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
const LOG_POLL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, clap::Args)]
pub struct SyncOptions {
    #[arg(long, default_value_t = 5000)]
    pub services: usize,
    #[arg(long, default_value_t = 5)]
    pub endpoints: u8,
    /// iptables back ends for the baseline. iptables-nft needs about 50 s for a 5,000-service
    /// full sync on a 2-vCPU machine.
    #[arg(long, value_delimiter = ',', default_value = "legacy")]
    pub iptables: Vec<Flavor>,
    #[arg(long)]
    pub no_iptables: bool,
    #[arg(long)]
    pub no_weir: bool,
    /// Full syncs from empty per side, each on a fresh node.
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// One-service updates per side (after the first full sync).
    #[arg(long, default_value_t = 20)]
    pub updates: u32,
    /// Time between updates (issue 4's churn: once a second).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub update_interval: Duration,
    /// How often the agent looks at its state file: a change waits up to this long to be seen.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub agent_poll: Duration,
    /// After the updates, how long the agent is left alone with every service programmed and
    /// its CPU measured (conntrack GC and drift checks included: at least two drift intervals,
    /// 30 s each, to be fair). 0 skips it.
    #[arg(long, default_value = "65s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
    /// How the agent's state files hold the objects.
    #[arg(long, value_enum, default_value_t = StateFormat::Json)]
    pub state_format: StateFormat,
    #[command(flatten)]
    pub common: BenchCommon,
}

/// One measured step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    /// iptables: of wall_s, the iptables-save kube-proxy runs first (0 when it does not).
    pub save_s: f64,
    /// Weir: map writes the agent reported.
    pub writes: u64,
}

impl Step {
    fn iptables(applied: &Applied) -> Step {
        let (save, restore) = (applied.saved.as_ref(), &applied.restored);
        let save_s = save.map_or(0.0, |s| s.wall_s);
        Step {
            wall_s: save_s + restore.wall_s,
            cpu_s: applied.cpu_s(),
            peak_rss_kib: save.map_or(0, |s| s.max_rss_kib).max(restore.max_rss_kib),
            save_s,
            writes: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SideResult {
    /// "iptables-legacy", "iptables-nft" or "weir".
    pub side: String,
    pub full: Vec<Step>,
    pub updates: Vec<Step>,
    /// iptables only: full resyncs with every rule already loaded.
    pub resync: Vec<Step>,
    /// Weir only: the agent left alone after the updates (`--idle`).
    pub idle: Option<Step>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncResults {
    pub bench: &'static str,
    pub started_unix: f64,
    pub host: serde_json::Value,
    pub services: usize,
    pub endpoints: u8,
    pub agent_poll_ms: f64,
    pub update_interval_s: f64,
    pub sides: Vec<SideResult>,
    pub table: String,
}

pub fn run(o: &SyncOptions, env: &BenchEnv) -> Result<SyncResults, BenchError> {
    let synth = Synthetic::new(o.services, o.endpoints)?;
    if !(1..=20).contains(&o.repeats) || o.updates > 1000 {
        return Err(BenchError::Setup(
            "--repeats must be 1..=20 and --updates at most 1000".into(),
        ));
    }
    if o.update_interval > Duration::from_secs(60) || o.agent_poll.is_zero() {
        return Err(BenchError::Setup(
            "--update-interval must be at most 60s and --agent-poll positive".into(),
        ));
    }
    let mut restore_bins = Vec::new();
    if !o.no_iptables {
        let mut flavors = o.iptables.clone();
        flavors.sort_unstable();
        flavors.dedup();
        for f in flavors {
            restore_bins.push((f, iptables_restore(f)?, iptables_save(f)?));
        }
    }
    let started_unix = unix_now();
    let run_root = RunRoot::create(env, "sync")?;
    let scenario = synth.scenario("bench-sync")?;
    let plan = synth.plan();

    let mut sides = Vec::new();
    for (flavor, restore, save) in &restore_bins {
        let mut side = SideResult {
            side: flavor.name().to_owned(),
            full: Vec::new(),
            updates: Vec::new(),
            resync: Vec::new(),
            idle: None,
        };
        for rep in 0..o.repeats {
            let dir = run_root.0.join(format!("{}-{rep}", flavor.name()));
            let with_updates = rep == 0;
            iptables_side(
                o,
                env,
                &scenario,
                &plan,
                &dir,
                restore,
                save,
                with_updates,
                &mut side,
            )?;
            println!(
                "bench sync-baseline: {} full sync {}/{}: {:.2}s",
                flavor.name(),
                rep + 1,
                o.repeats,
                side.full.last().map_or(0.0, |s| s.wall_s)
            );
        }
        sides.push(side);
    }
    if !o.no_weir {
        let mut side = SideResult {
            side: "weir".to_owned(),
            full: Vec::new(),
            updates: Vec::new(),
            resync: Vec::new(),
            idle: None,
        };
        for rep in 0..o.repeats {
            let dir = run_root.0.join(format!("weir-{rep}"));
            weir_side(o, env, &scenario, &plan, &dir, rep, rep == 0, &mut side)?;
            println!(
                "bench sync-baseline: weir full sync {}/{}: {:.2}s",
                rep + 1,
                o.repeats,
                side.full.last().map_or(0.0, |s| s.wall_s)
            );
        }
        sides.push(side);
    }
    run_root.finish();

    let results = SyncResults {
        bench: "sync-baseline",
        started_unix,
        host: host_info(),
        services: o.services,
        endpoints: o.endpoints,
        agent_poll_ms: o.agent_poll.as_secs_f64() * 1000.0,
        update_interval_s: o.update_interval.as_secs_f64(),
        table: render(o, &sides),
        sides,
    };
    print!("{}", results.table);
    let json = env.report_dir.join("bench-sync.json");
    write_json(&json, &results)?;
    println!("results: {}", json.display());
    Ok(results)
}

/// A node on its own: the iptables side needs no pods, the rules only name their addresses.
pub(super) fn node_only_plan() -> Plan {
    Plan::new(1, 0, 0, 1500)
}

#[allow(clippy::too_many_arguments)]
fn iptables_side(
    o: &SyncOptions,
    env: &BenchEnv,
    scenario: &Scenario,
    plan: &Plan,
    dir: &Path,
    restore: &Path,
    save: &Path,
    with_updates: bool,
    side: &mut SideResult,
) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let mut lab = weir_lab_backends::instantiate(env.backend).create(&node_only_plan(), dir)?;
    let result = (|| -> Result<(), BenchError> {
        let lab = lab.as_mut();
        let node = lab.plan().nodes[0].id;
        let mut proxy = MeasuredKubeProxy::start(lab, env, node, restore, Some(save), dir)?;
        let mut scenario = scenario.clone();

        let full = proxy
            .proxier
            .sync(&kube_proxy::from_scenario(&scenario, plan));
        side.full
            .push(Step::iptables(&proxy.apply(lab, &full, "full")?));
        if !with_updates {
            return Ok(());
        }
        let churned = o.services / 2;
        for step in 1..=o.updates {
            std::thread::sleep(o.update_interval);
            churn(&mut scenario, churned, step);
            let sync = proxy
                .proxier
                .sync(&kube_proxy::from_scenario(&scenario, plan));
            side.updates.push(Step::iptables(&proxy.apply(
                lab,
                &sync,
                &format!("update-{step}"),
            )?));
        }
        let resync = proxy
            .proxier
            .full_sync(&kube_proxy::from_scenario(&scenario, plan));
        side.resync
            .push(Step::iptables(&proxy.apply(lab, &resync, "resync")?));
        Ok(())
    })();
    let teardown = lab.teardown();
    result?;
    Ok(teardown?)
}

#[allow(clippy::too_many_arguments)]
fn weir_side(
    o: &SyncOptions,
    env: &BenchEnv,
    scenario: &Scenario,
    plan: &Plan,
    dir: &Path,
    rep: u32,
    with_updates: bool,
    side: &mut SideResult,
) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let mut lab = weir_lab_backends::instantiate(env.backend).create(plan, dir)?;
    let mut agent: Option<BenchAgent> = None;
    let result = (|| -> Result<(), BenchError> {
        let lab = lab.as_mut();
        let spec = weir_lab_core::scenario::AgentSpec {
            poll_interval: Some(o.agent_poll),
            ..scenario.agent.clone()
        };
        let run_id = format!("bench-sync-{}-{rep}", std::process::id());
        let state_dir = dir.join("state.d");
        let a = agent.insert(start_on_dir(
            lab, &env.agent, dir, &state_dir, &run_id, &spec,
        )?);
        wait_for_log(a, "data plane loaded", APPLY_TIMEOUT)?;
        // Let it attach to the pod interfaces and settle before the clock starts.
        std::thread::sleep(Duration::from_millis(500));

        let mut scenario = scenario.clone();
        let mut files = state_files(
            &weir_lab_core::k8s::cluster_state(&scenario, plan),
            o.state_format,
        )?;
        side.full.push(weir_full(lab, a, dir, &files, o.services)?);
        a.wait_programmed(lab, &scenario, plan, APPLY_TIMEOUT)?;
        if !with_updates {
            return Ok(());
        }
        let churned = o.services / 2;
        let phase_start = a.process(lab)?;
        for step in 1..=o.updates {
            std::thread::sleep(o.update_interval);
            churn(&mut scenario, churned, step);
            let next = state_files(
                &weir_lab_core::k8s::cluster_state(&scenario, plan),
                o.state_format,
            )?;
            let changed: Vec<(String, String)> = next
                .iter()
                .filter(|(name, text)| files.get(*name) != Some(*text))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            side.updates
                .push(weir_update(lab, a, dir, &changed, o.services)?);
            files = next;
        }
        let phase_cpu = a.process(lab)?.cpu_s - phase_start.cpu_s;
        for update in side.updates.iter_mut() {
            update.cpu_s = phase_cpu / o.updates.max(1) as f64;
        }
        a.wait_programmed(lab, &scenario, plan, APPLY_TIMEOUT)?;
        if !o.idle.is_zero() {
            let before = a.process(lab)?;
            std::thread::sleep(o.idle);
            let after = a.process(lab)?;
            side.idle = Some(Step {
                wall_s: o.idle.as_secs_f64(),
                cpu_s: after.cpu_s - before.cpu_s,
                peak_rss_kib: after.hwm_kib,
                save_s: 0.0,
                writes: 0,
            });
        }
        Ok(())
    })();
    let teardown = stop_and_tear_down(agent.as_ref(), lab.as_mut());
    result?;
    teardown
}

/// [`BenchAgent::start`], with a state directory instead of a state file.
pub(super) fn start_on_dir(
    lab: &mut dyn Lab,
    binary: &Path,
    run_dir: &Path,
    state_dir: &Path,
    run_id: &str,
    spec: &weir_lab_core::scenario::AgentSpec,
) -> Result<BenchAgent, BenchError> {
    let node = lab.plan().nodes[0].id;
    let mkdir = Cmd::new("mkdir")
        .arg("-p")
        .arg(state_dir.display().to_string());
    lab.exec_ok(node, &mkdir, Duration::from_secs(10))?;
    BenchAgent::launch(lab, binary, run_dir, run_id, spec, state_dir.to_owned())
}

/// How the bench lays the objects out for the agent's file source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateFormat {
    /// A `kind: List` of JSON per file, as the API server sends objects (and `kubectl get -o
    /// json` prints them): what an agent watching Kubernetes decodes.
    #[default]
    Json,
    /// Multi-document YAML per file, as a GitOps tree holds them.
    Yaml,
}

/// The cluster state as files: `svc-<name>.<ext>` with a Service and its EndpointSlices, and
/// `cluster.<ext>` with everything else (Nodes, Pods), in `format`.
pub(super) fn state_files(
    state: &str,
    format: StateFormat,
) -> Result<BTreeMap<String, String>, BenchError> {
    let ext = match format {
        StateFormat::Json => "json",
        StateFormat::Yaml => "yaml",
    };
    let mut files: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for doc in state
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
    {
        if doc.trim().is_empty() {
            continue;
        }
        let value: serde_yaml::Value = serde_yaml::from_str(doc)
            .map_err(|e| BenchError::Setup(format!("the lab's state does not parse: {e}")))?;
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str());
        let service = match kind {
            "Service" => name,
            "EndpointSlice" => meta
                .and_then(|m| m.get("labels"))
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .and_then(|n| n.as_str()),
            _ => None,
        };
        let file = service.map_or_else(|| format!("cluster.{ext}"), |s| format!("svc-{s}.{ext}"));
        files.entry(file).or_default().push(doc);
    }
    files
        .into_iter()
        .map(|(file, docs)| {
            let text = match format {
                StateFormat::Yaml => docs
                    .iter()
                    .map(|doc| format!("---\n{}\n", doc.trim_end_matches('\n')))
                    .collect(),
                StateFormat::Json => {
                    let items = docs
                        .iter()
                        .map(|doc| serde_yaml::from_str::<serde_json::Value>(doc))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| {
                            BenchError::Setup(format!("the lab's state does not convert: {e}"))
                        })?;
                    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
                        .to_string()
                }
            };
            Ok((file, text))
        })
        .collect()
}

/// The full sync: every file staged beside the state directory, then moved in at once.
pub(super) fn weir_full(
    lab: &mut dyn Lab,
    agent: &BenchAgent,
    run_dir: &Path,
    files: &BTreeMap<String, String>,
    frontends: usize,
) -> Result<Step, BenchError> {
    let node = agent.agents.nodes[0].node;
    let staging = run_dir.join("staging");
    for (name, text) in files {
        lab.write_file(node, &staging.join(name), text.as_bytes())?;
    }
    let seen = applied_lines(&agent.log_text()).len();
    let before: ProcessFigures = agent.process(lab)?;
    let started = SystemTime::now();
    let mv = Cmd::new("sh").arg("-c").arg(format!(
        "cd {} && mv -t {} -- *",
        staging.display(),
        agent.state_path.display()
    ));
    lab.exec_ok(node, &mv, APPLY_TIMEOUT)?;
    measure_until_applied(lab, agent, seen, frontends, started, before)
}

/// One change to the Weir agent's desired state: the changed files staged beside the state
/// directory and renamed into it, timed from just before the rename to the agent's log line of
/// the pass that wrote the maps (event to map written), with its peak RSS so far. CPU seconds of
/// one update are below /proc's 10 ms resolution: the caller replaces them by the agent's CPU
/// over the whole update phase divided by the number of updates.
pub fn weir_update(
    lab: &mut dyn Lab,
    agent: &BenchAgent,
    run_dir: &Path,
    changed: &[(String, String)],
    frontends: usize,
) -> Result<Step, BenchError> {
    let node = agent.agents.nodes[0].node;
    let staging = run_dir.join("staging");
    for (name, text) in changed {
        lab.write_file(node, &staging.join(name), text.as_bytes())?;
    }
    let seen = applied_lines(&agent.log_text()).len();
    let before: ProcessFigures = agent.process(lab)?;
    // The event is the rename that lands the new file, as an atomic writer's last step.
    let landed_at = SystemTime::now();
    for (name, _) in changed {
        let (from, to) = (staging.join(name), agent.state_path.join(name));
        if std::fs::rename(&from, &to).is_err() {
            // A lab whose hosts do not share this file system: move it there.
            let mv = Cmd::new("mv")
                .arg(from.display().to_string())
                .arg(to.display().to_string());
            lab.exec_ok(node, &mv, APPLY_TIMEOUT)?;
        }
    }
    measure_until_applied(lab, agent, seen, frontends, landed_at, before)
}

fn measure_until_applied(
    lab: &mut dyn Lab,
    agent: &BenchAgent,
    seen: usize,
    frontends: usize,
    since: SystemTime,
    before: ProcessFigures,
) -> Result<Step, BenchError> {
    let (line, writes) = wait_applied(agent, seen, frontends)?;
    let after = agent.process(lab)?;
    let wall = line
        .at
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    Ok(Step {
        wall_s: wall,
        cpu_s: after.cpu_s - before.cpu_s,
        peak_rss_kib: after.hwm_kib,
        save_s: 0.0,
        writes,
    })
}

/// The first applied line after `seen` showing every frontend, and the writes of all applied
/// lines up to it (a full sync lands in several passes as the files arrive).
fn wait_applied(
    agent: &BenchAgent,
    seen: usize,
    frontends: usize,
) -> Result<(crate::weir::AppliedLine, u64), BenchError> {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let lines = applied_lines(&agent.log_text());
        let new: Vec<_> = lines.into_iter().skip(seen).collect();
        if let Some(i) = new.iter().position(|l| l.frontends as usize == frontends) {
            let writes = new[..=i].iter().map(|l| l.writes).sum();
            return Ok((new[i].clone(), writes));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "the agent did not apply {frontends} frontends within {}s; see {}",
                APPLY_TIMEOUT.as_secs(),
                agent.log_path().display()
            )));
        }
        std::thread::sleep(LOG_POLL);
    }
}

pub(super) fn wait_for_log(
    agent: &BenchAgent,
    needle: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    while !agent.log_text().contains(needle) {
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "no {needle:?} in {} after {}s",
                agent.log_path().display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1000.0)
}

fn p99(values: &[f64]) -> f64 {
    let mut ns: Vec<u64> = values.iter().map(|v| (v * 1e9) as u64).collect();
    ns.sort_unstable();
    crate::percentile(&ns, 99.0) as f64 / 1e9
}

fn render(o: &SyncOptions, sides: &[SideResult]) -> String {
    let mut rows = Vec::new();
    let stat = |steps: &[Step]| {
        let wall: Vec<f64> = steps.iter().map(|s| s.wall_s).collect();
        let cpu: Vec<f64> = steps.iter().map(|s| s.cpu_s).collect();
        let save: Vec<f64> = steps.iter().map(|s| s.save_s).collect();
        let rss = steps.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0);
        (median(&wall), p99(&wall), median(&cpu), rss, median(&save))
    };
    for side in sides {
        for (what, steps) in [
            ("full sync from empty", &side.full),
            ("one-service update", &side.updates),
            ("full resync, rules loaded", &side.resync),
        ] {
            if steps.is_empty() {
                continue;
            }
            let (wall, wall_p99, cpu, rss, save) = stat(steps);
            rows.push(vec![
                side.side.clone(),
                what.to_owned(),
                steps.len().to_string(),
                ms(wall),
                ms(wall_p99),
                format!("{cpu:.3}"),
                format!("{:.1}", rss as f64 / 1024.0),
                if side.side == "weir" {
                    "-".to_owned()
                } else {
                    ms(save)
                },
            ]);
        }
    }
    let mut text = format!(
        "\nSync of {} services x {} endpoints (medians; iptables figures are the iptables \
         processes', Weir's the agent's; Weir's updates are event (state file written) to maps \
         written, seen through inotify)\n\n",
        o.services, o.endpoints,
    );
    text.push_str(&table(
        &[
            "side",
            "step",
            "n",
            "wall ms",
            "p99 ms",
            "cpu s",
            "peak RSS MiB",
            "of which save ms",
        ],
        &rows,
    ));
    // Medians of (wall, cpu) over a side's steps of one kind.
    let medians = |side: &str, pick: fn(&SideResult) -> &Vec<Step>| {
        sides
            .iter()
            .find(|s| s.side == side && !pick(s).is_empty())
            .map(|s| {
                let steps = pick(s);
                let wall: Vec<f64> = steps.iter().map(|x| x.wall_s).collect();
                let cpu: Vec<f64> = steps.iter().map(|x| x.cpu_s).collect();
                (median(&wall), median(&cpu))
            })
    };
    let mut ratios = Vec::new();
    for side in sides.iter().filter(|s| s.side != "weir") {
        for (what, pick) in [
            (
                "full",
                (|s: &SideResult| &s.full) as fn(&SideResult) -> &Vec<Step>,
            ),
            ("update", |s: &SideResult| &s.updates),
        ] {
            if let (Some(w), Some(i)) = (medians("weir", pick), medians(&side.side, pick)) {
                ratios.push(vec![
                    format!("weir {what} / {} {what}", side.side),
                    format!("{:.3}", w.0 / i.0),
                    format!("{:.3}", w.1 / i.1),
                ]);
            }
        }
    }
    if !ratios.is_empty() {
        text.push('\n');
        text.push_str(&table(&["ratio (medians)", "wall", "cpu"], &ratios));
    }
    // Issue 4's targets, judged on this run's numbers.
    if let Some(weir) = sides.iter().find(|s| s.side == "weir") {
        let mut targets = Vec::new();
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" }.to_owned();
        let weir_full = medians("weir", |s| &s.full);
        for side in sides.iter().filter(|s| s.side != "weir") {
            if let (Some(w), Some(i)) = (weir_full, medians(&side.side, |s| &s.full)) {
                targets.push(vec![
                    format!("full sync faster than {}", side.side),
                    format!("{} ms vs {} ms", ms(w.0), ms(i.0)),
                    verdict(w.0 < i.0),
                ]);
            }
        }
        if !weir.updates.is_empty() {
            let wall: Vec<f64> = weir.updates.iter().map(|s| s.wall_s).collect();
            let p = p99(&wall);
            targets.push(vec![
                "update p99 under 5 ms (event to map written)".to_owned(),
                format!("{} ms", ms(p)),
                verdict(p < 0.005),
            ]);
        }
        if let Some(idle) = &weir.idle {
            let share = idle.cpu_s / idle.wall_s;
            targets.push(vec![
                format!(
                    "idle under 0.5% of a core ({:.0} s, GC and drift checks included)",
                    idle.wall_s
                ),
                format!("{:.3}% ({:.3} cpu s)", share * 100.0, idle.cpu_s),
                verdict(share < 0.005),
            ]);
        }
        let rss = weir
            .full
            .iter()
            .chain(&weir.updates)
            .chain(&weir.idle)
            .map(|s| s.peak_rss_kib)
            .max()
            .unwrap_or(0);
        targets.push(vec![
            "peak RSS under 64 MiB".to_owned(),
            format!("{:.1} MiB", rss as f64 / 1024.0),
            verdict(rss < 64 * 1024),
        ]);
        text.push('\n');
        text.push_str(&table(&["target (issue 4)", "this run", ""], &targets));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{state_files, StateFormat};

    #[test]
    fn state_splits_into_one_file_per_service() {
        let state =
            "---\nkind: Service\nmetadata:\n  name: a\n---\nkind: EndpointSlice\nmetadata:\n  \
                     name: a-x\n  labels:\n    kubernetes.io/service-name: a\n---\nkind: Service\n\
                     metadata:\n  name: b\n---\nkind: Node\nmetadata:\n  name: node1\n";
        let files = state_files(state, StateFormat::Yaml).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["cluster.yaml", "svc-a.yaml", "svc-b.yaml"]
        );
        assert!(files["svc-a.yaml"].contains("kind: EndpointSlice"));
        assert_eq!(files["svc-a.yaml"].matches("---\n").count(), 2);
        assert!(files["cluster.yaml"].contains("kind: Node"));

        let json = state_files(state, StateFormat::Json).unwrap();
        assert_eq!(
            json.keys().collect::<Vec<_>>(),
            ["cluster.json", "svc-a.json", "svc-b.json"]
        );
        let list: serde_json::Value = serde_json::from_str(&json["svc-a.json"]).unwrap();
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][1]["kind"], "EndpointSlice");
    }
}
