//! `weir-lab bench churn`: the seeds' experiment. N services x E endpoints programmed, then a
//! quiet phase, one service's endpoints churned for a while, and another quiet phase, with the
//! CPU of what keeps the data plane in sync sampled every second: the Weir agent, and kube-proxy's
//! iptables proxier as [`crate::kube_proxy`] emulates it, each on a fresh node of its own, plus
//! the whole node's CPU.
//!
//! The emulated kube-proxy syncs as its iptables proxier does with its defaults: at most once
//! per `--min-sync-period` (1 s) when something changed, a partial sync (KUBE-SERVICES and the
//! top-level chains in full, the changed service's chains only); a sync every
//! `--sync-period` (30 s) even when nothing changed; a full sync every `--full-sync-period`
//! (kube-proxy's is an hour, so none within the default phases). Its CPU is that of the
//! `iptables-restore` (and `iptables-save`) runs it makes, measured with `weir-lab probe
//! measure`; kube-proxy's own Go process (informers, rule generation) comes on top and is not
//! counted, which flatters it. Weir's is the agent process's, informers and compilation
//! included. The node's CPU is every CPU's busy time from `/proc/stat`: on the namespace lab
//! that is the whole machine, the lab's own sampling included, so read it as a ceiling.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::iptables::MeasuredKubeProxy;
use crate::kube_proxy::{self, Flavor};
use crate::sync::{
    node_only_plan, start_on_dir, state_files, wait_for_log, weir_full, StateFormat,
};
use crate::weir::stop_and_tear_down;
use crate::Synthetic;
use crate::{
    churn, host_info, iptables_restore, iptables_save, table, unix_now, write_json, BenchCommon,
    BenchEnv, BenchError, RunRoot,
};
use weir_lab_core::backend::{BackendKind, Cmd, Lab};
use weir_lab_core::scenario::{AgentSpec, Scenario};
use weir_lab_core::topology::{HostId, Plan};

const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnOptions {
    #[arg(long, default_value_t = 5000)]
    pub services: usize,
    #[arg(long, default_value_t = 5)]
    pub endpoints: u8,
    /// Quiet before the churn.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub quiet: Duration,
    /// How long one service's endpoints are churned.
    #[arg(long, default_value = "100s", value_parser = humantime::parse_duration)]
    pub churn: Duration,
    /// Quiet after the churn.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub quiet_after: Duration,
    /// Time between two endpoint changes of the churned service.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub churn_interval: Duration,
    /// A quick run: 1,000 services, 20 s / 30 s / 20 s (phase lengths given explicitly win).
    #[arg(long)]
    pub short: bool,
    /// kube-proxy's `--iptables-min-sync-period`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,
    /// kube-proxy's `--iptables-sync-period`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
    /// How often kube-proxy forces a full sync (an hour in its code).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub full_sync_period: Duration,
    #[arg(long, value_enum, default_value_t = Flavor::Legacy)]
    pub iptables: Flavor,
    #[arg(long)]
    pub no_iptables: bool,
    #[arg(long)]
    pub no_weir: bool,
    /// How the agent's state files hold the objects.
    #[arg(long, value_enum, default_value_t = StateFormat::Json)]
    pub state_format: StateFormat,
    #[command(flatten)]
    pub common: BenchCommon,
}

impl ChurnOptions {
    /// The phases as asked, `--short` filling in what was left at its default.
    fn phases(&self) -> (usize, [(Phase, Duration); 3]) {
        let default = |d: Duration, long: u64, short: u64| {
            if self.short && d == Duration::from_secs(long) {
                Duration::from_secs(short)
            } else {
                d
            }
        };
        let services = if self.short && self.services == 5000 {
            1000
        } else {
            self.services
        };
        (
            services,
            [
                (Phase::Quiet, default(self.quiet, 90, 20)),
                (Phase::Churn, default(self.churn, 100, 30)),
                (Phase::QuietAfter, default(self.quiet_after, 90, 20)),
            ],
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Quiet,
    Churn,
    QuietAfter,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Quiet => "quiet",
            Phase::Churn => "churn",
            Phase::QuietAfter => "quiet after",
        }
    }
}

/// One second of one side.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the first phase began.
    pub t_s: f64,
    pub phase: Phase,
    /// How long this sample really covered: a second, or more when a sync ran over.
    pub wall_s: f64,
    /// CPU seconds of what keeps the data plane in sync, over the sample.
    pub sync_cpu_s: f64,
    /// Busy CPU seconds of the whole node over the sample (every core).
    pub node_cpu_s: f64,
    /// Endpoint changes made in this second.
    pub changes: u32,
    /// kube-proxy: iptables-restore runs in this second.
    pub syncs: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct SideResult {
    /// "iptables-legacy" / "iptables-nft" (kube-proxy's proxier, emulated) or "weir".
    pub side: String,
    /// The initial full sync (not part of the phases): wall and CPU seconds.
    pub initial_sync_s: f64,
    pub initial_sync_cpu_s: f64,
    pub samples: Vec<Sample>,
}

impl SideResult {
    fn phase_totals(&self, phase: Phase) -> (f64, f64, f64, u32) {
        let of_phase = || self.samples.iter().filter(move |s| s.phase == phase);
        let seconds = of_phase().map(|s| s.wall_s).sum();
        let sync: f64 = of_phase().map(|s| s.sync_cpu_s).sum();
        let node: f64 = of_phase().map(|s| s.node_cpu_s).sum();
        let changes = of_phase().map(|s| s.changes).sum();
        (seconds, sync, node, changes)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ChurnResults {
    pub bench: &'static str,
    pub started_unix: f64,
    pub host: serde_json::Value,
    pub services: usize,
    pub endpoints: u8,
    pub churn_interval_s: f64,
    pub sides: Vec<SideResult>,
    pub table: String,
}

pub fn run(o: &ChurnOptions, env: &BenchEnv) -> Result<ChurnResults, BenchError> {
    let (services, phases) = o.phases();
    let synth = Synthetic::new(services, o.endpoints)?;
    let total: Duration = phases.iter().map(|(_, d)| *d).sum();
    if total > Duration::from_secs(3600) || o.churn_interval < Duration::from_millis(100) {
        return Err(BenchError::Setup(
            "the phases may last an hour together at most, and --churn-interval must be 100ms or more".into(),
        ));
    }
    if o.min_sync_period.is_zero() || o.sync_period < o.min_sync_period {
        return Err(BenchError::Setup(
            "--min-sync-period must be positive and --sync-period at least as long".into(),
        ));
    }
    let started_unix = unix_now();
    let run_root = RunRoot::create(env, "churn")?;
    let scenario = synth.scenario("bench-churn")?;
    let plan = synth.plan();
    let churned = services / 2;

    let mut sides = Vec::new();
    if !o.no_iptables {
        let restore = iptables_restore(o.iptables)?;
        let save = iptables_save(o.iptables)?;
        let dir = run_root.0.join(o.iptables.name());
        println!(
            "bench churn: kube-proxy ({}), {services} services x {}, {:.0} s",
            o.iptables.name(),
            o.endpoints,
            total.as_secs_f64()
        );
        let binaries = (restore.as_path(), save.as_path());
        sides.push(kube_proxy_side(
            o, env, &scenario, &plan, &dir, binaries, &phases, churned,
        )?);
    }
    if !o.no_weir {
        let dir = run_root.0.join("weir");
        println!(
            "bench churn: weir, {services} services x {}, {:.0} s",
            o.endpoints,
            total.as_secs_f64()
        );
        sides.push(weir_side(o, env, &scenario, &plan, &dir, &phases, churned)?);
    }
    run_root.finish();
    let results = ChurnResults {
        bench: "churn",
        started_unix,
        host: host_info(),
        services,
        endpoints: o.endpoints,
        churn_interval_s: o.churn_interval.as_secs_f64(),
        table: render(&sides),
        sides,
    };
    print!("{}", results.table);
    let json = env.report_dir.join("bench-churn.json");
    write_json(&json, &results)?;
    let html = env.report_dir.join("bench-churn.html");
    std::fs::write(&html, render_html(&results))
        .map_err(BenchError::io(format!("writing {}", html.display())))?;
    println!("results: {}\nchart: {}", json.display(), html.display());
    Ok(results)
}

/// Where the node's busy CPU time is read: the namespace lab's node is this machine, read
/// directly (an `exec` per second would add its own cost); a VM's is read in the VM.
struct NodeCpu {
    node: HostId,
    local: bool,
}

impl NodeCpu {
    fn busy_s(&self, lab: &mut dyn Lab) -> Result<f64, BenchError> {
        let stat = if self.local {
            std::fs::read_to_string("/proc/stat").map_err(BenchError::io("reading /proc/stat"))?
        } else {
            let cat = Cmd::new("cat").arg("/proc/stat");
            lab.exec_ok(self.node, &cat, Duration::from_secs(10))?
                .stdout
        };
        busy_seconds(&stat).ok_or_else(|| BenchError::Setup("unreadable /proc/stat".into()))
    }
}

/// Busy CPU seconds of every core since boot, from /proc/stat's first line (user, nice,
/// system, irq, softirq, steal; idle and iowait are not busy). USER_HZ is 100 on Linux.
fn busy_seconds(stat: &str) -> Option<f64> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    Some(busy as f64 / 100.0)
}

/// The phase second `t` (from the start) falls in.
fn phase_at(phases: &[(Phase, Duration); 3], t: Duration) -> Option<Phase> {
    let mut end = Duration::ZERO;
    for (phase, length) in phases {
        end += *length;
        if t < end {
            return Some(*phase);
        }
    }
    None
}

/// The second-by-second loop both sides share: each tick, the churn step if one is due (the
/// side applies it its own way, returning the CPU seconds it measured, if any, and the syncs
/// made), then the samples.
fn sample_phases(
    lab: &mut dyn Lab,
    node_cpu: &NodeCpu,
    phases: &[(Phase, Duration); 3],
    churn_interval: Duration,
    mut sync_cpu_total: impl FnMut(&mut dyn Lab) -> Result<f64, BenchError>,
    mut tick: impl FnMut(&mut dyn Lab, Duration, Option<u32>) -> Result<u32, BenchError>,
) -> Result<Vec<Sample>, BenchError> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_change = Duration::ZERO;
    let mut step = 0u32;
    let mut sync_before = sync_cpu_total(lab)?;
    let mut node_before = node_cpu.busy_s(lab)?;
    let mut sampled_at = start.elapsed();
    let mut second = 0u32;
    loop {
        let t = Duration::from_secs(second as u64);
        let Some(phase) = phase_at(phases, t) else {
            break;
        };
        let mut changes = 0;
        let mut syncs = 0;
        // Every change due within this second, at its time.
        let tick_end = t + TICK;
        loop {
            let now = start.elapsed();
            if now >= tick_end {
                break;
            }
            let change = if phase == Phase::Churn && now >= next_change {
                step += 1;
                changes += 1;
                next_change = now + churn_interval;
                Some(step)
            } else {
                None
            };
            syncs += tick(lab, now, change)?;
            let until = next_change.min(tick_end);
            let now = start.elapsed();
            if until > now {
                std::thread::sleep((until - now).min(Duration::from_millis(100)));
            }
        }
        let sync_now = sync_cpu_total(lab)?;
        let node_now = node_cpu.busy_s(lab)?;
        let now = start.elapsed();
        samples.push(Sample {
            t_s: t.as_secs_f64(),
            phase,
            wall_s: (now - sampled_at).as_secs_f64(),
            sync_cpu_s: (sync_now - sync_before).max(0.0),
            node_cpu_s: (node_now - node_before).max(0.0),
            changes,
            syncs,
        });
        (sync_before, node_before, sampled_at) = (sync_now, node_now, now);
        // A sample that ran over skips the seconds it covered.
        second = (now.as_secs() as u32).max(second + 1);
    }
    Ok(samples)
}

#[allow(clippy::too_many_arguments)]
fn kube_proxy_side(
    o: &ChurnOptions,
    env: &BenchEnv,
    scenario: &Scenario,
    plan: &Plan,
    dir: &Path,
    (restore, save): (&Path, &Path),
    phases: &[(Phase, Duration); 3],
    churned: usize,
) -> Result<SideResult, BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let mut lab = weir_lab_backends::instantiate(env.backend).create(&node_only_plan(), dir)?;
    let result = (|| -> Result<SideResult, BenchError> {
        let lab = lab.as_mut();
        let node = lab.plan().nodes[0].id;
        let node_cpu = NodeCpu {
            node,
            local: env.backend == BackendKind::Netns,
        };
        let mut proxy = MeasuredKubeProxy::start(lab, env, node, restore, Some(save), dir)?;
        let mut scenario = scenario.clone();
        let initial = Instant::now();
        let sync = proxy
            .proxier
            .full_sync(&kube_proxy::from_scenario(&scenario, plan));
        let initial_cpu = proxy.apply(lab, &sync, "sync")?.cpu_s();
        let initial_sync_s = initial.elapsed().as_secs_f64();

        let cpu_total = std::cell::Cell::new(0.0);
        let mut pending = false;
        let mut last_sync = Duration::ZERO;
        let mut last_full_sync = Duration::ZERO;
        let samples = sample_phases(
            lab,
            &node_cpu,
            phases,
            o.churn_interval,
            |_| Ok(cpu_total.get()),
            |lab, now, change| {
                if let Some(step) = change {
                    churn(&mut scenario, churned, step);
                    pending = true;
                }
                let since_sync = now.saturating_sub(last_sync);
                let full = now.saturating_sub(last_full_sync) >= o.full_sync_period;
                let due = (pending && since_sync >= o.min_sync_period)
                    || since_sync >= o.sync_period
                    || full;
                if !due {
                    return Ok(0);
                }
                let ports = kube_proxy::from_scenario(&scenario, plan);
                let sync = if full {
                    last_full_sync = now;
                    proxy.proxier.full_sync(&ports)
                } else {
                    proxy.proxier.sync(&ports)
                };
                cpu_total.set(cpu_total.get() + proxy.apply(lab, &sync, "sync")?.cpu_s());
                pending = false;
                last_sync = now;
                Ok(1)
            },
        )?;
        Ok(SideResult {
            side: format!("kube-proxy ({})", o.iptables.name()),
            initial_sync_s,
            initial_sync_cpu_s: initial_cpu,
            samples,
        })
    })();
    let teardown = lab.teardown();
    let side = result?;
    teardown?;
    Ok(side)
}

fn weir_side(
    o: &ChurnOptions,
    env: &BenchEnv,
    scenario: &Scenario,
    plan: &Plan,
    dir: &Path,
    phases: &[(Phase, Duration); 3],
    churned: usize,
) -> Result<SideResult, BenchError> {
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let mut lab = weir_lab_backends::instantiate(env.backend).create(plan, dir)?;
    let mut agent = None;
    let result = (|| -> Result<SideResult, BenchError> {
        let lab = lab.as_mut();
        let spec = AgentSpec {
            ..scenario.agent.clone()
        };
        let state_dir = dir.join("state.d");
        let run_id = format!("bench-churn-{}", std::process::id());
        let a = agent.insert(start_on_dir(
            lab, &env.agent, dir, &state_dir, &run_id, &spec,
        )?);
        wait_for_log(a, "data plane loaded", APPLY_TIMEOUT)?;
        let node = a.agents.nodes[0].node;
        let node_cpu = NodeCpu {
            node,
            local: env.backend == BackendKind::Netns,
        };
        let mut scenario = scenario.clone();
        let mut files = state_files(
            &weir_lab_core::k8s::cluster_state(&scenario, plan),
            o.state_format,
        )?;
        let initial = weir_full(lab, a, dir, &files, scenario.services.len())?;
        a.wait_programmed(lab, &scenario, plan, APPLY_TIMEOUT)?;
        let staging = dir.join("staging");
        let samples = sample_phases(
            lab,
            &node_cpu,
            phases,
            o.churn_interval,
            |lab| Ok(a.process(lab)?.cpu_s),
            |lab, _, change| {
                let Some(step) = change else {
                    return Ok(0);
                };
                churn(&mut scenario, churned, step);
                let next = state_files(
                    &weir_lab_core::k8s::cluster_state(&scenario, plan),
                    o.state_format,
                )?;
                // The changed file lands by rename, as an atomic writer's would.
                for (name, text) in next.iter().filter(|(n, t)| files.get(*n) != Some(*t)) {
                    lab.write_file(node, &staging.join(name), text.as_bytes())?;
                    let mv = Cmd::new("mv")
                        .arg(staging.join(name).display().to_string())
                        .arg(a.state_path.join(name).display().to_string());
                    lab.exec_ok(node, &mv, Duration::from_secs(10))?;
                }
                files = next;
                Ok(0)
            },
        )?;
        Ok(SideResult {
            side: "weir".into(),
            initial_sync_s: initial.wall_s,
            initial_sync_cpu_s: initial.cpu_s,
            samples,
        })
    })();
    let teardown = stop_and_tear_down(agent.as_ref(), lab.as_mut());
    let side = result?;
    teardown?;
    Ok(side)
}

/// Per side and phase: seconds, CPU seconds of the sync, its mean share of a core, the node's
/// mean CPU, and changes; then the initial full syncs.
fn render(sides: &[SideResult]) -> String {
    let mut rows = Vec::new();
    for side in sides {
        for phase in [Phase::Quiet, Phase::Churn, Phase::QuietAfter] {
            let (seconds, sync, node, changes) = side.phase_totals(phase);
            if seconds == 0.0 {
                continue;
            }
            rows.push(vec![
                side.side.clone(),
                phase.name().into(),
                format!("{seconds:.0}"),
                format!("{sync:.2}"),
                format!("{:.2}%", 100.0 * sync / seconds),
                format!("{:.1}%", 100.0 * node / seconds),
                changes.to_string(),
            ]);
        }
    }
    let mut out = table(
        &[
            "side",
            "phase",
            "seconds",
            "sync CPU s",
            "of a core",
            "node CPU",
            "changes",
        ],
        &rows,
    );
    let initial: Vec<Vec<String>> = sides
        .iter()
        .map(|s| {
            vec![
                s.side.clone(),
                format!("{:.2}", s.initial_sync_s),
                format!("{:.2}", s.initial_sync_cpu_s),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["initial full sync", "wall s", "CPU s"], &initial));
    let churn_cpu = |name: &str| {
        sides
            .iter()
            .find(|s| s.side.starts_with(name))
            .map(|s| s.phase_totals(Phase::Churn).1)
    };
    if let (Some(weir), Some(kube_proxy)) = (churn_cpu("weir"), churn_cpu("kube-proxy")) {
        if kube_proxy > 0.0 {
            out.push_str(&format!(
                "\nchurn phase: Weir's agent used {:.2}x the CPU of kube-proxy's iptables-restore runs (its Go process not counted)\n",
                weir / kube_proxy
            ));
        }
    }
    out
}

/// A self-contained page: the CPU of each side's sync over time (the seeds' chart), the node's,
/// and the phase table.
fn render_html(results: &ChurnResults) -> String {
    use std::fmt::Write as _;
    let (width, height, pad) = (900.0, 300.0, 40.0);
    let seconds = results
        .sides
        .iter()
        .map(|s| s.samples.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let peak = results
        .sides
        .iter()
        .flat_map(|s| &s.samples)
        .map(|s| s.sync_cpu_s.max(s.node_cpu_s) / s.wall_s.max(0.001))
        .fold(0.01, f64::max);
    let x = |t: f64| pad + (width - 2.0 * pad) * t / seconds;
    let y = |v: f64| height - pad - (height - 2.0 * pad) * v / peak;
    let colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">\
         <line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#999\"/>\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"#999\"/>\
         <text x=\"{pad}\" y=\"{2}\" font-size=\"11\">{peak:.2} CPU s per s</text>\
         <text x=\"{3}\" y=\"{4}\" font-size=\"11\">{seconds:.0} s</text>",
        height - pad,
        width - pad,
        pad - 8.0,
        width - pad - 30.0,
        height - pad + 15.0,
    );
    let mut legend = String::new();
    let mut series = Vec::new();
    for side in &results.sides {
        series.push((format!("{} sync", side.side), side, false));
        series.push((format!("node ({} run)", side.side), side, true));
    }
    for (i, (name, side, node)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let points: Vec<String> = side
            .samples
            .iter()
            .map(|s| {
                let cpu = if *node { s.node_cpu_s } else { s.sync_cpu_s };
                let v = cpu / s.wall_s.max(0.001);
                format!("{:.1},{:.1}", x(s.t_s), y(v))
            })
            .collect();
        let dash = if *node {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\"{dash} points=\"{}\"/>",
            points.join(" ")
        );
        let _ = write!(
            legend,
            "<li style=\"color:{colour}\">{}</li>",
            weir_lab_report::html::esc(name)
        );
    }
    svg.push_str("</svg>");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Weir churn bench</title></head><body>\
         <h1>Keeping the data plane in sync: {} services x {} endpoints</h1>\
         <p>CPU seconds per second: quiet, one service churned every {:.1} s, quiet. Solid: what \
         syncs the data plane (Weir's agent; kube-proxy's iptables-restore runs, its own process \
         not counted); dashed: the whole node.</p>{svg}<ul>{legend}</ul><pre>{}</pre></body></html>\n",
        results.services,
        results.endpoints,
        results.churn_interval_s,
        weir_lab_report::html::esc(&results.table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_comes_from_the_first_line() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        // user + nice + system + irq + softirq + steal, in USER_HZ.
        assert_eq!(busy_seconds(stat), Some(1.61));
        assert_eq!(busy_seconds("nonsense"), None);
    }

    #[test]
    fn phases_follow_each_other_and_short_shrinks_the_defaults() {
        let phases = [
            (Phase::Quiet, Duration::from_secs(2)),
            (Phase::Churn, Duration::from_secs(3)),
            (Phase::QuietAfter, Duration::from_secs(1)),
        ];
        assert_eq!(
            phase_at(&phases, Duration::from_secs(0)),
            Some(Phase::Quiet)
        );
        assert_eq!(
            phase_at(&phases, Duration::from_secs(2)),
            Some(Phase::Churn)
        );
        assert_eq!(
            phase_at(&phases, Duration::from_secs(5)),
            Some(Phase::QuietAfter)
        );
        assert_eq!(phase_at(&phases, Duration::from_secs(6)), None);
    }
}
