//! `weir-lab bench policy`: does a flow's first packet cost more when NetworkPolicy has 10,000
//! rules than when it has 10, in Weir and in iptables with ipsets?
//!
//! The same machinery as `bench connect` (one lab per path, built first, then measured round by
//! round in rotating order; the probe pinned to one CPU; a TCP_DEFER_ACCEPT listener, so a
//! connect times SYN out and SYN-ACK back), to a pod's own address instead of a ClusterIP.
//! Every lab is one node with three pods: the client, the destination and an outsider. Paths:
//!
//! - `direct`: plain routing, no agent, no rules;
//! - `weir-no-policy`: the agent loaded, no policy (what Weir costs before any policy);
//! - `weir-N`: the agent with N ingress rules selecting the destination ([`netpol`]: half
//!   ipBlocks with an except, half namespace-and-pod selectors over synthetic peer pods, the
//!   client allowed by the last rule);
//! - `iptables-ipset-N`: the same policy as iptables-legacy filter rules with ipsets, the way
//!   iptables-based policy engines install them, no agent.
//!
//! Before a policy path is measured, the outsider's connect must fail (the policy is in force)
//! and the client's must succeed (its rule is in).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connect::{
    check_connects, check_rounds, p50_range, probe_connect, probe_cpu, ratio, ratio_table,
    start_listeners, Ratio, Round, RoundPlan, RoundSummary,
};
use crate::kube_proxy::{find_program, Flavor};
use crate::netpol::{self, IptablesPolicy, PolicyShape};
use crate::probe::MeasureReport;
use crate::weir::{stop_and_tear_down, BenchAgent};
use crate::{host_info, table, unix_now, BenchCommon, BenchEnv, BenchError};
use weir_lab_core::backend::Lab;
use weir_lab_core::scenario::Scenario;
use weir_lab_core::topology::{HostId, Plan};

/// The agent compiles 10,000 rules over 5,000 peer pods in seconds; this only catches a hang.
const ENFORCED_TIMEOUT: Duration = Duration::from_secs(600);
const CLIENT: HostId = HostId::Pod { node: 1, index: 0 };
const TARGET: HostId = HostId::Pod { node: 1, index: 1 };
const OUTSIDER: HostId = HostId::Pod { node: 1, index: 2 };

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyOptions {
    /// Numbers of ingress rules selecting the destination pod, comma-separated (even: half
    /// ipBlocks, half selectors).
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    pub rules: Vec<usize>,
    /// Leave the iptables + ipset baseline out (Weir and direct only).
    #[arg(long)]
    pub no_iptables: bool,
    /// Measurement rounds; every path is measured once per round (see `bench connect`).
    #[arg(long, default_value_t = 21)]
    pub rounds: u32,
    /// Timed connects per path and round.
    #[arg(long, default_value_t = 1000)]
    pub connects: u32,
    /// Untimed connects before each round's timed ones.
    #[arg(long, default_value_t = 100)]
    pub warmup: u32,
    /// The CPU the client probe is pinned to [default: the last one].
    #[arg(long)]
    pub cpu: Option<usize>,
    #[command(flatten)]
    pub common: BenchCommon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Direct,
    Weir,
    IptablesIpset,
}

impl Engine {
    fn label(self) -> &'static str {
        match self {
            Engine::Direct => "direct",
            Engine::Weir => "weir",
            Engine::IptablesIpset => "iptables-ipset",
        }
    }
}

/// The name a path goes by in the table and the ratios.
fn path_name(engine: Engine, rules: usize) -> String {
    match (engine, rules) {
        (Engine::Direct, _) => "direct".into(),
        (_, 0) => format!("{}-no-policy", engine.label()),
        _ => format!("{}-{rules}", engine.label()),
    }
}

/// One measured path: its own lab, its rules installed, the destination listening.
struct PolicyPath {
    engine: Engine,
    /// Ingress rules selecting the destination; 0: no policy.
    rules: usize,
    lab: Box<dyn Lab>,
    target: SocketAddrV4,
    agent: Option<BenchAgent>,
    /// How long installing the policy took (restores' wall time; agent start to enforced).
    install_s: f64,
    rounds: Vec<Round>,
}

impl PolicyPath {
    fn name(&self) -> String {
        path_name(self.engine, self.rules)
    }

    fn teardown(mut self) -> Result<(), BenchError> {
        stop_and_tear_down(self.agent.as_ref(), self.lab.as_mut())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyPathResult {
    pub path: String,
    pub engine: &'static str,
    /// Ingress rules selecting the destination pod; 0 for no policy.
    pub rules: usize,
    pub target: String,
    /// Median over rounds of each round's median.
    pub p50_us: f64,
    /// Median over rounds of each round's 99th percentile.
    pub p99_us: f64,
    pub round_p50_us: Vec<f64>,
    pub round_p99_us: Vec<f64>,
    pub samples: usize,
    pub failures: u32,
    pub install_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyResults {
    pub bench: &'static str,
    pub started_unix: f64,
    pub host: serde_json::Value,
    pub rounds: u32,
    pub connects: u32,
    pub warmup: u32,
    pub cpu: usize,
    pub results: Vec<PolicyPathResult>,
    pub ratios: Vec<Ratio>,
    /// Issue 17's target: Weir at the most rules within 10% of Weir at the fewest (p50).
    pub weir_flat_within_10_percent: Option<bool>,
    pub table: String,
}

pub fn run(o: &PolicyOptions, env: &BenchEnv) -> Result<PolicyResults, BenchError> {
    let mut sizes = o.rules.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        return Err(BenchError::Setup("--rules is empty".into()));
    }
    let plan = lab_plan();
    for &rules in &sizes {
        shape(&plan, rules)?;
    }
    check_rounds(o.rounds, o.connects, o.warmup)?;
    let tools = if o.no_iptables {
        None
    } else {
        Some(IptablesTools::find()?)
    };
    let cpu = probe_cpu(o.cpu)?;

    let started_unix = unix_now();
    let run_root = crate::RunRoot::create(env, "policy")?;
    let mut wanted = vec![(Engine::Direct, 0), (Engine::Weir, 0)];
    for &rules in &sizes {
        wanted.push((Engine::Weir, rules));
        if tools.is_some() {
            wanted.push((Engine::IptablesIpset, rules));
        }
    }
    let plan_rounds = RoundPlan {
        rounds: o.rounds,
        connects: o.connects,
        warmup: o.warmup,
        cpu,
    };
    let mut paths: Vec<PolicyPath> = Vec::new();
    let outcome = (|| -> Result<PolicyResults, BenchError> {
        for (engine, rules) in wanted {
            let t = Instant::now();
            let path = build_path(engine, rules, cpu, env, &run_root.0, tools.as_ref())?;
            println!(
                "bench policy: {} ready in {:.1}s (installing took {:.2}s)",
                path.name(),
                t.elapsed().as_secs_f64(),
                path.install_s
            );
            paths.push(path);
        }
        println!(
            "bench policy: {} paths, {} rounds x {} connects (+{} warm-up), client pinned to cpu {cpu}",
            paths.len(),
            o.rounds,
            o.connects,
            o.warmup
        );
        crate::connect::rotate(&mut paths, o.rounds, "policy", |path| {
            let name = path.name();
            let round = plan_rounds.measure(path.lab.as_mut(), env, CLIENT, path.target, &name)?;
            path.rounds.push(round);
            Ok(())
        })?;
        Ok(summarize(&paths, &plan_rounds, started_unix))
    })();
    crate::conclude(
        outcome,
        paths.into_iter().map(|path| path.teardown()),
        run_root,
        env,
        "bench-policy.json",
        |r| &r.table,
    )
}

/// One node: the client, the destination and the outsider.
fn lab_plan() -> Plan {
    Plan::new(1, 3, 0, 1500)
}

fn shape(plan: &Plan, rules: usize) -> Result<PolicyShape, BenchError> {
    let ip = |host: HostId| plan.ip(host).expect("the plan has three pods");
    let target_pod = plan
        .pods
        .iter()
        .find(|p| p.id == TARGET)
        .map(|p| p.name.clone())
        .expect("the plan has the destination pod");
    PolicyShape::new(rules, ip(CLIENT), ip(TARGET), &target_pod)
}

/// The lab's pods as a scenario: namespaces, labels and (with `shape`) the policy.
fn scenario(name: &str, shape: Option<&PolicyShape>) -> Result<Scenario, BenchError> {
    // Without a policy the client's label names no rule; it is written all the same.
    let client_peer = shape.map_or_else(|| "none".to_owned(), PolicyShape::client_peer);
    let toml = format!(
        "name = \"{name}\"\n[topology]\nnodes = 1\npods_per_node = 3\n\
         [agent]\nready_timeout = \"10m\"\n\
         [[namespaces]]\nname = \"{target_ns}\"\n\
         [[namespaces]]\nname = \"{peer_ns}\"\nlabels = {{ {nk} = \"{nv}\" }}\n\
         [[pods]]\nmatch = \"{client}\"\nnamespace = \"{peer_ns}\"\nlabels = {{ {pk} = \"{client_peer}\" }}\n\
         [[pods]]\nmatch = \"{target}\"\nnamespace = \"{target_ns}\"\nlabels = {{ {tk} = \"{tv}\" }}\n\
         [[pods]]\nmatch = \"{outsider}\"\nnamespace = \"{peer_ns}\"\nlabels = {{ {pk} = \"{out}\" }}\n",
        target_ns = netpol::TARGET_NAMESPACE,
        peer_ns = netpol::PEER_NAMESPACE,
        nk = netpol::PEER_NAMESPACE_LABEL.0,
        nv = netpol::PEER_NAMESPACE_LABEL.1,
        pk = netpol::PEER_KEY,
        tk = netpol::TARGET_LABEL.0,
        tv = netpol::TARGET_LABEL.1,
        out = netpol::OUTSIDER_PEER,
        client = CLIENT,
        target = TARGET,
        outsider = OUTSIDER,
    );
    let mut scenario = Scenario::parse(&toml, Path::new(name))?;
    scenario.network_policies = shape.map(PolicyShape::network_policies).unwrap_or_default();
    Ok(scenario)
}

/// `ipset` and `iptables-legacy-restore`, found before any lab is built.
struct IptablesTools {
    ipset: PathBuf,
    restore: PathBuf,
}

impl IptablesTools {
    fn find() -> Result<IptablesTools, BenchError> {
        let ipset = find_program("ipset").ok_or_else(|| {
            BenchError::Setup(
                "ipset not found: lab/setup.sh installs it, or pass --no-iptables".into(),
            )
        })?;
        Ok(IptablesTools {
            ipset,
            restore: crate::iptables_restore(Flavor::Legacy)?,
        })
    }

    /// `ipset restore`, then `iptables-restore` with kube-proxy's flags (the sets must exist
    /// before a rule names them); their wall seconds together.
    fn install(
        &self,
        lab: &mut dyn Lab,
        env: &BenchEnv,
        node: HostId,
        run_dir: &Path,
        policy: &IptablesPolicy,
    ) -> Result<f64, BenchError> {
        let ipset = restore(
            lab,
            env,
            node,
            &run_dir.join("ipset.input"),
            &policy.ipset_restore,
            &[self.ipset.display().to_string(), "restore".into()],
        )?;
        let mut command = vec![self.restore.display().to_string()];
        command.extend(Flavor::restore_args().map(String::from));
        let iptables = restore(
            lab,
            env,
            node,
            &run_dir.join("filter.rules"),
            &policy.iptables_restore,
            &command,
        )?;
        Ok(ipset.wall_s + iptables.wall_s)
    }
}

fn build_path(
    engine: Engine,
    rules: usize,
    cpu: usize,
    env: &BenchEnv,
    run_root: &Path,
    tools: Option<&IptablesTools>,
) -> Result<PolicyPath, BenchError> {
    let plan = lab_plan();
    let id = path_name(engine, rules);
    let run_dir = run_root.join(&id);
    std::fs::create_dir_all(&run_dir)
        .map_err(BenchError::io(format!("creating {}", run_dir.display())))?;
    let lab = weir_lab_backends::instantiate(env.backend).create(&plan, &run_dir)?;
    let target_ip = plan.ip(TARGET).expect("the plan has the destination pod");
    let mut path = PolicyPath {
        engine,
        rules,
        lab,
        target: SocketAddrV4::new(target_ip, netpol::POLICY_PORT),
        agent: None,
        install_s: 0.0,
        rounds: Vec::new(),
    };
    match prepare(&mut path, &plan, cpu, env, &run_dir, tools) {
        Ok(()) => Ok(path),
        Err(e) => {
            if let Err(t) = path.teardown() {
                tracing::warn!("tearing down after a failed setup: {t}");
            }
            Err(e)
        }
    }
}

/// Starts the listener, installs the policy the path's way, and checks it is in force.
fn prepare(
    path: &mut PolicyPath,
    plan: &Plan,
    cpu: usize,
    env: &BenchEnv,
    run_dir: &Path,
    tools: Option<&IptablesTools>,
) -> Result<(), BenchError> {
    let name = path.name();
    let shape = (path.rules > 0)
        .then(|| shape(plan, path.rules))
        .transpose()?;
    let lab = path.lab.as_mut();
    start_listeners(
        lab,
        env,
        run_dir,
        std::iter::once(TARGET),
        netpol::POLICY_PORT,
    )?;
    let t = Instant::now();
    match path.engine {
        Engine::Direct => {}
        Engine::Weir => {
            let scenario = scenario(&format!("bench-policy-{name}"), shape.as_ref())?;
            let mut state = weir_lab_core::k8s::cluster_state(&scenario, plan);
            if let Some(shape) = &shape {
                state.push_str(&shape.synthetic_pod_documents());
            }
            let run_id = format!("bench-{}-{name}", std::process::id());
            let agent =
                BenchAgent::start(lab, &env.agent, run_dir, &run_id, &scenario.agent, &state)?;
            // Stored before waiting, so a failed wait still removes the pins.
            let agent = path.agent.insert(agent);
            agent.wait_programmed(lab, &scenario, plan, ENFORCED_TIMEOUT)?;
        }
        Engine::IptablesIpset => {
            let shape = shape.as_ref().expect("an iptables path has rules");
            let tools = tools.expect("iptables paths only with the tools found");
            let node = plan.nodes[0].id;
            path.install_s = tools.install(lab, env, node, run_dir, &shape.iptables_ipset())?;
        }
    }
    if shape.is_some() {
        let refused_probe_started =
            wait_enforced(lab, env, path.target, cpu, &name, path.agent.as_ref())?;
        if path.engine == Engine::Weir {
            path.install_s = (refused_probe_started - t).as_secs_f64();
        }
    }
    check_connects(lab, env, CLIENT, path.target, cpu, &name)
}

/// Writes `input` to `file` and feeds it to `command` on `node`, measured.
fn restore(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    node: HostId,
    file: &Path,
    input: &str,
    command: &[String],
) -> Result<MeasureReport, BenchError> {
    lab.write_file(node, file, input.as_bytes())?;
    crate::iptables::measured(lab, env, node, command, Some(file))
}

/// Waits until the outsider's connect fails: the destination is isolated. (Weir writes a
/// pod's rules before it isolates the pod, and iptables-restore commits all at once, so the
/// client's rule is in by then too.) Returns when the refused probe started: its connect
/// timeout is no part of the install time.
fn wait_enforced(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    target: SocketAddrV4,
    cpu: usize,
    name: &str,
    agent: Option<&BenchAgent>,
) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + ENFORCED_TIMEOUT;
    loop {
        if let Some(line) = agent.and_then(|a| rejection(&a.log_text())) {
            return Err(BenchError::Setup(format!(
                "{name}: the agent refused an object: {line}"
            )));
        }
        let started = Instant::now();
        let report = probe_connect(lab, env, OUTSIDER, target, 1, 0, cpu)?;
        if report.failures > 0 {
            return Ok(started);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{name}: the outsider still reaches {target} after {}s: the policy is not in force",
                ENFORCED_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's first "rejected object" log line, if any.
fn rejection(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("rejected object"))
        .map(|l| l.trim().to_owned())
}

fn summarize(paths: &[PolicyPath], rounds: &RoundPlan, started_unix: f64) -> PolicyResults {
    let results: Vec<PolicyPathResult> = paths
        .iter()
        .map(|p| {
            let r = RoundSummary::of(&p.rounds);
            PolicyPathResult {
                path: p.name(),
                engine: p.engine.label(),
                rules: p.rules,
                target: p.target.to_string(),
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                round_p50_us: r.round_p50_us,
                round_p99_us: r.round_p99_us,
                samples: r.samples,
                failures: r.failures,
                install_s: p.install_s,
            }
        })
        .collect();
    let (ratios, weir_flat) = ratios(&results);
    let direct = results.iter().find(|r| r.engine == "direct");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.path.clone(),
                r.rules.to_string(),
                format!("{:.1}", r.p50_us),
                format!("{:.1}", r.p99_us),
                direct.map_or("-".to_owned(), |d| format!("{:.2}", r.p50_us / d.p50_us)),
                p50_range(&r.round_p50_us),
                r.failures.to_string(),
                format!("{:.2}", r.install_s),
            ]
        })
        .collect();
    let mut text = format!(
        "\nTCP connect latency to a pod isolated by NetworkPolicy (deferred-accept server, client \
         pinned to cpu {}, allowed by the last rule)\n{} rounds x {} connects; p50/p99 = median \
         over rounds of each round's p50/p99\n\n",
        rounds.cpu, rounds.rounds, rounds.connects
    );
    text.push_str(&table(
        &[
            "path",
            "rules",
            "p50 us",
            "p99 us",
            "p50 x direct",
            "round p50 range",
            "failed",
            "install s",
        ],
        &rows,
    ));
    if !ratios.is_empty() {
        text.push('\n');
        text.push_str(&ratio_table(&ratios));
    }
    text.push_str(
        "\ninstall s: iptables-ipset = ipset restore + iptables-restore; weir = agent start \
         (program load included) until a probe the outsider then starts is refused\n",
    );
    if let Some(flat) = weir_flat {
        text.push_str(&format!(
            "\ntarget (issue 17): Weir with the most rules within 10% of Weir with the fewest \
             (p50): {}\n",
            if flat { "met" } else { "NOT met" }
        ));
    }
    PolicyResults {
        bench: "policy",
        started_unix,
        host: host_info(),
        rounds: rounds.rounds,
        connects: rounds.connects,
        warmup: rounds.warmup,
        cpu: rounds.cpu,
        results,
        ratios,
        weir_flat_within_10_percent: weir_flat,
        table: text,
    }
}

/// Most rules against fewest for each engine, Weir against iptables at each size, the fewest
/// rules against no policy, and Weir without policy against direct; and whether Weir is flat.
fn ratios(results: &[PolicyPathResult]) -> (Vec<Ratio>, Option<bool>) {
    let find = |engine: Engine, rules: usize| {
        results
            .iter()
            .find(|r| r.engine == engine.label() && r.rules == rules)
            .map(|r| (r.p50_us, r.p99_us))
    };
    let sizes = |engine: Engine| -> Vec<usize> {
        let mut s: Vec<usize> = results
            .iter()
            .filter(|r| r.engine == engine.label() && r.rules > 0)
            .map(|r| r.rules)
            .collect();
        s.sort_unstable();
        s
    };
    let mut out = Vec::new();
    let mut weir_flat = None;
    for engine in [Engine::Weir, Engine::IptablesIpset] {
        let s = sizes(engine);
        if let (Some(&lo), Some(&hi)) = (s.first(), s.last()) {
            if let (true, Some(a), Some(b)) = (lo != hi, find(engine, hi), find(engine, lo)) {
                let r = ratio(
                    format!("{} / {}", path_name(engine, hi), path_name(engine, lo)),
                    a,
                    b,
                );
                if engine == Engine::Weir {
                    weir_flat = Some(r.p50 <= 1.10);
                }
                out.push(r);
            }
        }
    }
    for rules in sizes(Engine::Weir) {
        if let (Some(w), Some(i)) = (
            find(Engine::Weir, rules),
            find(Engine::IptablesIpset, rules),
        ) {
            out.push(ratio(
                format!(
                    "{} / {}",
                    path_name(Engine::Weir, rules),
                    path_name(Engine::IptablesIpset, rules)
                ),
                w,
                i,
            ));
        }
    }
    let none = find(Engine::Weir, 0);
    if let (Some(&lo), Some(none)) = (sizes(Engine::Weir).first(), none) {
        if let Some(w) = find(Engine::Weir, lo) {
            out.push(ratio(
                format!("{} / weir-no-policy", path_name(Engine::Weir, lo)),
                w,
                none,
            ));
        }
    }
    if let (Some(none), Some(direct)) = (none, find(Engine::Direct, 0)) {
        out.push(ratio("weir-no-policy / direct".into(), none, direct));
    }
    (out, weir_flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(engine: Engine, rules: usize, p50: f64) -> PolicyPathResult {
        PolicyPathResult {
            path: path_name(engine, rules),
            engine: engine.label(),
            rules,
            target: String::new(),
            p50_us: p50,
            p99_us: 2.0 * p50,
            round_p50_us: vec![p50],
            round_p99_us: vec![2.0 * p50],
            samples: 1,
            failures: 0,
            install_s: 0.0,
        }
    }

    #[test]
    fn a_refused_policy_is_found_in_the_log() {
        let log = "2026-12-07T23:41:32.384945Z  WARN apply_events: weir_agent::reconcile: rejected object kind=\"NetworkPolicy\" reason=\"too_many_items\"\n";
        assert!(rejection(log).unwrap().contains("too_many_items"));
        assert_eq!(rejection("INFO applied network policy\n"), None);
    }

    #[test]
    fn paths_are_named_as_the_table_prints_them() {
        assert_eq!(path_name(Engine::Direct, 0), "direct");
        assert_eq!(path_name(Engine::Weir, 0), "weir-no-policy");
        assert_eq!(path_name(Engine::Weir, 10), "weir-10");
        assert_eq!(
            path_name(Engine::IptablesIpset, 10000),
            "iptables-ipset-10000"
        );
    }

    #[test]
    fn ratios_compare_sizes_engines_and_no_policy() {
        let results = [
            result(Engine::Direct, 0, 10.0),
            result(Engine::Weir, 0, 12.0),
            result(Engine::Weir, 10, 15.0),
            result(Engine::IptablesIpset, 10, 12.0),
            result(Engine::Weir, 10000, 15.0),
            result(Engine::IptablesIpset, 10000, 120.0),
        ];
        let (ratios, flat) = ratios(&results);
        let names: Vec<&str> = ratios.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "weir-10000 / weir-10",
                "iptables-ipset-10000 / iptables-ipset-10",
                "weir-10 / iptables-ipset-10",
                "weir-10000 / iptables-ipset-10000",
                "weir-10 / weir-no-policy",
                "weir-no-policy / direct",
            ]
        );
        assert_eq!(ratios[1].p50, 10.0);
        assert_eq!(ratios[3].p50, 0.125);
        assert_eq!(ratios[5].p99, 1.2);
        assert_eq!(flat, Some(true));
        let (_, flat) = ratios_of_weir(15.0, 16.6);
        assert_eq!(flat, Some(false));
    }

    fn ratios_of_weir(lo: f64, hi: f64) -> (Vec<Ratio>, Option<bool>) {
        ratios(&[
            result(Engine::Weir, 10, lo),
            result(Engine::Weir, 10000, hi),
        ])
    }

    #[test]
    fn the_scenario_places_pods_as_the_policy_expects() {
        let plan = lab_plan();
        let shape = shape(&plan, 10).unwrap();
        assert!(scenario("t", None).unwrap().network_policies.is_empty());
        let scenario = scenario("t", Some(&shape)).unwrap();
        assert_eq!(scenario.network_policies.len(), 1);
        let labels = weir_lab_core::k8s::pod_labels(&scenario, &plan);
        let name = |h: HostId| plan.pods.iter().find(|p| p.id == h).unwrap().name.clone();
        assert_eq!(labels[&name(CLIENT)][netpol::PEER_KEY], shape.client_peer());
        assert_eq!(
            labels[&name(OUTSIDER)][netpol::PEER_KEY],
            netpol::OUTSIDER_PEER
        );
        assert_eq!(
            labels[&name(TARGET)][netpol::TARGET_LABEL.0],
            netpol::TARGET_LABEL.1
        );
        let state = weir_lab_core::k8s::cluster_state(&scenario, &plan);
        assert!(state.contains("kind: NetworkPolicy"));
        assert!(state.contains(&format!("namespace: {}", netpol::TARGET_NAMESPACE)));
    }
}
