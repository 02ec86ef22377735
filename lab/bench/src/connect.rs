//! `weir-lab bench connect`: does first-packet latency grow with the number of services?
//!
//! One lab per measured path, all built before the first measurement and measured round by
//! round in rotating order, so whatever the shared machine does meanwhile hits every path alike:
//!
//! - `direct`: the client connects to a backend pod's own address (plain routing, no service);
//! - `weir` at each size: the real agent with N Services and EndpointSlices in its state file;
//! - `iptables-legacy` (and `iptables-nft` on request) at each size: the rules kube-proxy would
//!   write for the same services, loaded with iptables-restore, no agent.
//!
//! Every lab is one node with a client pod and E endpoint pods. The client connects to the LAST
//! service's ClusterIP (the end of kube-proxy's KUBE-SERVICES list) from a probe pinned to one
//! CPU; the endpoints listen with TCP_DEFER_ACCEPT and never wake up, so a connect times the
//! network path alone: SYN out, service translation, SYN-ACK back.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use crate::iptables::MeasuredKubeProxy;
use crate::kube_proxy::{self, Flavor};
use crate::probe::{ConnectReport, LISTENING};
use crate::weir::BenchAgent;
use crate::{
    host_info, median, percentile, table, unix_now, BenchCommon, BenchEnv, BenchError, Synthetic,
};
use weir_lab_core::backend::{Cmd, Lab};
use weir_lab_core::topology::HostId;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// The probe stops itself after two minutes; this only catches a hung probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectOptions {
    /// Numbers of services installed, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    pub sizes: Vec<usize>,
    /// iptables back ends for the kube-proxy baseline. iptables-nft loads 10,000 services in
    /// about 15 minutes on a 2-vCPU machine.
    #[arg(long, value_delimiter = ',', default_value = "legacy")]
    pub iptables: Vec<Flavor>,
    /// Leave the iptables baseline out (Weir and direct only).
    #[arg(long)]
    pub no_iptables: bool,
    /// Measurement rounds; every path is measured once per round. Many short rounds beat a few
    /// long ones here: a shared vCPU flips between a fast and a slow mode (5-15 us apart) for
    /// stretches of about a round, and more rounds give every path the same mix of both.
    #[arg(long, default_value_t = 21)]
    pub rounds: u32,
    /// Timed connects per path and round.
    #[arg(long, default_value_t = 1000)]
    pub connects: u32,
    /// Untimed connects before each round's timed ones.
    #[arg(long, default_value_t = 100)]
    pub warmup: u32,
    /// Endpoints per service.
    #[arg(long, default_value_t = 5)]
    pub endpoints: u8,
    /// The CPU the client probe is pinned to [default: the last one].
    #[arg(long)]
    pub cpu: Option<usize>,
    #[command(flatten)]
    pub common: BenchCommon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Weir,
    Iptables(Flavor),
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Weir => "weir".into(),
            Kind::Iptables(f) => f.name().into(),
        }
    }
}

/// One path's figures in one round.
pub(crate) struct Round {
    p50_ns: u64,
    p99_ns: u64,
    samples: usize,
    failures: u32,
}

/// How every path is measured in each round.
pub(crate) struct RoundPlan {
    pub rounds: u32,
    pub connects: u32,
    pub warmup: u32,
    /// The CPU the client probe is pinned to.
    pub cpu: usize,
}

impl RoundPlan {
    /// One round of connects from `client` to `target`; fails when every connect failed.
    pub(crate) fn measure(
        &self,
        lab: &mut dyn Lab,
        env: &BenchEnv,
        client: HostId,
        target: SocketAddrV4,
        name: &str,
    ) -> Result<Round, BenchError> {
        let report = probe_connect(
            lab,
            env,
            client,
            target,
            self.connects,
            self.warmup,
            self.cpu,
        )?;
        let mut samples = report.samples_ns;
        samples.sort_unstable();
        if samples.is_empty() {
            return Err(BenchError::Setup(format!(
                "{name}: every connect to {target} failed: {}",
                report.first_error.unwrap_or_default()
            )));
        }
        Ok(Round {
            p50_ns: percentile(&samples, 50.0),
            p99_ns: percentile(&samples, 99.0),
            samples: samples.len(),
            failures: report.failures,
        })
    }
}

/// Measures every path once per round, each round starting one path later, so whatever the
/// shared machine does meanwhile hits every path alike.
pub(crate) fn rotate<P>(
    paths: &mut [P],
    rounds: u32,
    bench: &str,
    mut measure: impl FnMut(&mut P) -> Result<(), BenchError>,
) -> Result<(), BenchError> {
    let n = paths.len();
    for round in 0..rounds as usize {
        for k in 0..n {
            measure(&mut paths[(round + k) % n])?;
        }
        info!(round, "bench {bench}: round done");
    }
    Ok(())
}

/// The rounds of one path, summarized.
pub(crate) struct RoundSummary {
    /// Median over rounds of each round's median.
    pub p50_us: f64,
    /// Median over rounds of each round's 99th percentile.
    pub p99_us: f64,
    pub round_p50_us: Vec<f64>,
    pub round_p99_us: Vec<f64>,
    pub samples: usize,
    pub failures: u32,
}

impl RoundSummary {
    pub(crate) fn of(rounds: &[Round]) -> RoundSummary {
        let p50s: Vec<f64> = rounds.iter().map(|r| us(r.p50_ns)).collect();
        let p99s: Vec<f64> = rounds.iter().map(|r| us(r.p99_ns)).collect();
        RoundSummary {
            p50_us: median(&p50s),
            p99_us: median(&p99s),
            round_p50_us: p50s,
            round_p99_us: p99s,
            samples: rounds.iter().map(|r| r.samples).sum(),
            failures: rounds.iter().map(|r| r.failures).sum(),
        }
    }
}

/// The lowest and highest round p50, as the tables print it.
pub(crate) fn p50_range(round_p50_us: &[f64]) -> String {
    let lo = round_p50_us.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = round_p50_us.iter().copied().fold(0.0, f64::max);
    format!("{lo:.1}-{hi:.1}")
}

pub(crate) fn check_rounds(rounds: u32, connects: u32, warmup: u32) -> Result<(), BenchError> {
    if !(1..=100).contains(&rounds) || !(1..=100_000).contains(&connects) || warmup > 10_000 {
        return Err(BenchError::Setup(
            "--rounds must be 1..=100, --connects 1..=100000, --warmup at most 10000".into(),
        ));
    }
    Ok(())
}

/// The CPU the client probe is pinned to: `--cpu`, else the last one.
pub(crate) fn probe_cpu(cpu: Option<usize>) -> Result<usize, BenchError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpu.unwrap_or(cpus - 1);
    if cpu >= cpus {
        return Err(BenchError::Setup(format!(
            "--cpu {cpu}: this machine has {cpus} CPUs"
        )));
    }
    Ok(cpu)
}

/// A ratio of two paths' p50s and p99s.
pub(crate) fn ratio(name: String, a: (f64, f64), b: (f64, f64)) -> Ratio {
    Ratio {
        name,
        p50: a.0 / b.0,
        p99: a.1 / b.1,
    }
}

/// The ratios as a table.
pub(crate) fn ratio_table(ratios: &[Ratio]) -> String {
    let rows: Vec<Vec<String>> = ratios
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                format!("{:.3}", r.p50),
                format!("{:.3}", r.p99),
            ]
        })
        .collect();
    table(&["ratio", "p50", "p99"], &rows)
}

/// One measured path: its own lab, programmed and listening.
struct PathUnderTest {
    kind: Kind,
    services: usize,
    lab: Box<dyn Lab>,
    client: HostId,
    target: SocketAddrV4,
    agent: Option<BenchAgent>,
    /// How long installing the services took (restore wall time; agent start to programmed).
    program_s: f64,
    rounds: Vec<Round>,
}

impl PathUnderTest {
    fn name(&self) -> String {
        match self.kind {
            Kind::Direct => "direct".into(),
            _ => format!("{}@{}", self.kind.label(), self.services),
        }
    }

    fn teardown(mut self) -> Result<(), BenchError> {
        let result = self.lab.teardown();
        if let Some(agent) = &self.agent {
            agent.remove_pins();
        }
        Ok(result?)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: String,
    /// Services installed; 0 for the direct path.
    pub services: usize,
    pub target: String,
    /// Median over rounds of each round's median.
    pub p50_us: f64,
    /// Median over rounds of each round's 99th percentile.
    pub p99_us: f64,
    pub round_p50_us: Vec<f64>,
    pub round_p99_us: Vec<f64>,
    pub samples: usize,
    pub failures: u32,
    pub program_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectResults {
    pub bench: &'static str,
    pub started_unix: f64,
    pub host: serde_json::Value,
    pub rounds: u32,
    pub connects: u32,
    pub warmup: u32,
    pub cpu: usize,
    pub endpoints: u8,
    pub results: Vec<PathResult>,
    pub ratios: Vec<Ratio>,
    /// Issue 3's target: Weir at the largest size within 10% of Weir at the smallest (p50).
    pub weir_flat_within_10_percent: Option<bool>,
    pub table: String,
}

pub fn run(o: &ConnectOptions, env: &BenchEnv) -> Result<ConnectResults, BenchError> {
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        return Err(BenchError::Setup("--sizes is empty".into()));
    }
    for s in &sizes {
        Synthetic::new(*s, o.endpoints)?;
    }
    check_rounds(o.rounds, o.connects, o.warmup)?;
    let flavors: Vec<Flavor> = if o.no_iptables {
        Vec::new()
    } else {
        let mut f = o.iptables.clone();
        f.sort_unstable();
        f.dedup();
        f
    };
    let mut restore_bins = Vec::new();
    for f in &flavors {
        restore_bins.push((*f, crate::iptables_restore(*f)?));
    }
    let cpu = probe_cpu(o.cpu)?;

    let started_unix = unix_now();
    let run_root = crate::RunRoot::create(env, "connect")?;

    let mut wanted = vec![(Kind::Direct, 1)];
    for &size in &sizes {
        wanted.push((Kind::Weir, size));
        for (f, _) in &restore_bins {
            wanted.push((Kind::Iptables(*f), size));
        }
    }
    let mut paths: Vec<PathUnderTest> = Vec::new();
    let outcome = (|| -> Result<ConnectResults, BenchError> {
        for (kind, size) in wanted {
            let t = Instant::now();
            let path = build_path(
                kind,
                size,
                o.endpoints,
                cpu,
                env,
                &run_root.0,
                &restore_bins,
            )?;
            println!(
                "bench connect: {} ready in {:.1}s (installing took {:.2}s)",
                path.name(),
                t.elapsed().as_secs_f64(),
                path.program_s
            );
            paths.push(path);
        }
        println!(
            "bench connect: {} paths, {} rounds x {} connects (+{} warm-up), client pinned to cpu {cpu}",
            paths.len(),
            o.rounds,
            o.connects,
            o.warmup
        );
        let rounds = RoundPlan {
            rounds: o.rounds,
            connects: o.connects,
            warmup: o.warmup,
            cpu,
        };
        rotate(&mut paths, o.rounds, "connect", |path| {
            let name = path.name();
            let round = rounds.measure(path.lab.as_mut(), env, path.client, path.target, &name)?;
            path.rounds.push(round);
            Ok(())
        })?;
        Ok(summarize(&paths, o, cpu, started_unix))
    })();
    crate::conclude(
        outcome,
        paths.into_iter().map(|path| path.teardown()),
        run_root,
        env,
        "bench-connect.json",
        |r| &r.table,
    )
}

fn build_path(
    kind: Kind,
    services: usize,
    endpoints: u8,
    cpu: usize,
    env: &BenchEnv,
    run_root: &Path,
    restore_bins: &[(Flavor, PathBuf)],
) -> Result<PathUnderTest, BenchError> {
    let synth = Synthetic::new(services, endpoints)?;
    let plan = synth.plan();
    let id = match kind {
        Kind::Direct => "direct".to_owned(),
        _ => format!("{}-{services}", kind.label()),
    };
    let run_dir = run_root.join(&id);
    std::fs::create_dir_all(&run_dir)
        .map_err(BenchError::io(format!("creating {}", run_dir.display())))?;
    let lab = weir_lab_backends::instantiate(env.backend).create(&plan, &run_dir)?;
    let mut path = PathUnderTest {
        kind,
        services: if kind == Kind::Direct { 0 } else { services },
        lab,
        client: synth.client(),
        target: synth.last_frontend(),
        agent: None,
        program_s: 0.0,
        rounds: Vec::new(),
    };
    match prepare(&mut path, &synth, cpu, env, &run_dir, &id, restore_bins) {
        Ok(()) => Ok(path),
        Err(e) => {
            // The lab would go with `path` anyway; the agent's pins need telling.
            if let Err(t) = path.teardown() {
                tracing::warn!("tearing down after a failed setup: {t}");
            }
            Err(e)
        }
    }
}

/// Starts the listeners, installs the services the path's way and checks that connects work.
fn prepare(
    path: &mut PathUnderTest,
    synth: &Synthetic,
    cpu: usize,
    env: &BenchEnv,
    run_dir: &Path,
    id: &str,
    restore_bins: &[(Flavor, PathBuf)],
) -> Result<(), BenchError> {
    let kind = path.kind;
    let plan = synth.plan();
    let lab = path.lab.as_mut();
    let port = synth.last_target_port();
    start_listeners(lab, env, run_dir, synth.backends(), port)?;

    let node = plan.nodes[0].id;
    match kind {
        Kind::Direct => {
            let backend = synth.backends().next().expect("at least one endpoint");
            let ip = plan.ip(backend).expect("backend in plan");
            path.target = SocketAddrV4::new(ip, port);
        }
        Kind::Weir => {
            let scenario = synth.scenario(&format!("bench-connect-{id}"))?;
            let state = weir_lab_core::k8s::cluster_state(&scenario, &plan);
            let t = Instant::now();
            let run_id = format!("bench-{}-{id}", std::process::id());
            let agent =
                BenchAgent::start(lab, &env.agent, run_dir, &run_id, &scenario.agent, &state)?;
            // Stored before waiting, so a failed wait still removes the pins.
            let agent = path.agent.insert(agent);
            agent.wait_programmed(lab, &scenario, &plan, READY_TIMEOUT)?;
            path.program_s = t.elapsed().as_secs_f64();
        }
        Kind::Iptables(flavor) => {
            let scenario = synth.scenario(&format!("bench-connect-{id}"))?;
            let ports = kube_proxy::from_scenario(&scenario, &plan);
            let restore = restore_bins
                .iter()
                .find(|(f, _)| *f == flavor)
                .map(|(_, b)| b.clone())
                .expect("flavor was resolved");
            let mut proxy = MeasuredKubeProxy::start(lab, env, node, &restore, None, run_dir)?;
            let sync = proxy.proxier.sync(&ports);
            path.program_s = proxy.apply(lab, &sync, "full-sync")?.restored.wall_s;
        }
    }

    // One short probe proves the path works before any round counts.
    let name = path.name();
    check_connects(path.lab.as_mut(), env, path.client, path.target, cpu, &name)
}

/// Five connects from `client` to `target` that must all succeed.
pub(crate) fn check_connects(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    client: HostId,
    target: SocketAddrV4,
    cpu: usize,
    name: &str,
) -> Result<(), BenchError> {
    let check = probe_connect(lab, env, client, target, 5, 0, cpu)?;
    if check.failures > 0 {
        return Err(BenchError::Setup(format!(
            "{name}: connects to {target} fail: {}",
            check.first_error.unwrap_or_default()
        )));
    }
    Ok(())
}

/// A deferred-accept listener on `port` in every endpoint pod; waits until all listen.
pub(crate) fn start_listeners(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    run_dir: &Path,
    backends: impl Iterator<Item = HostId>,
    port: u16,
) -> Result<(), BenchError> {
    let mut started = Vec::new();
    for pod in backends {
        let log = run_dir.join(format!("listen-{pod}.log"));
        let cmd = Cmd::new(env.exe.display().to_string())
            .args(["probe", "listen", "--port"])
            .arg(port.to_string());
        let proc = lab.spawn(pod, &cmd, &log)?;
        started.push((pod, proc, log));
    }
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    for (pod, proc, log) in started {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(LISTENING) {
                break;
            }
            if let Some(how) = lab.exited(proc)? {
                return Err(BenchError::Setup(format!(
                    "listener on {pod} {how}: {}",
                    text.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "listener on {pod} not listening after {}s",
                    LISTEN_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// `count` timed connects (after `warmup` untimed ones) from `client` to `target`, the probe
/// pinned to `cpu`.
pub(crate) fn probe_connect(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    client: HostId,
    target: SocketAddrV4,
    count: u32,
    warmup: u32,
    cpu: usize,
) -> Result<ConnectReport, BenchError> {
    let cmd = Cmd::new(env.exe.display().to_string())
        .args(["probe", "connect"])
        .arg(target.to_string())
        .arg("--count")
        .arg(count.to_string())
        .arg("--warmup")
        .arg(warmup.to_string())
        .arg("--cpu")
        .arg(cpu.to_string());
    let out = lab.exec_ok(client, &cmd, PROBE_TIMEOUT)?;
    serde_json::from_str(out.stdout.trim()).map_err(|e| {
        BenchError::Setup(format!(
            "unreadable connect probe report ({e}): {}",
            out.stdout
        ))
    })
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn summarize(
    paths: &[PathUnderTest],
    o: &ConnectOptions,
    cpu: usize,
    started_unix: f64,
) -> ConnectResults {
    let results: Vec<PathResult> = paths
        .iter()
        .map(|p| {
            let r = RoundSummary::of(&p.rounds);
            PathResult {
                path: p.kind.label(),
                services: p.services,
                target: p.target.to_string(),
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                round_p50_us: r.round_p50_us,
                round_p99_us: r.round_p99_us,
                samples: r.samples,
                failures: r.failures,
                program_s: p.program_s,
            }
        })
        .collect();
    let find = |path: &str, services: usize| {
        results
            .iter()
            .find(|r| r.path == path && r.services == services)
    };
    let ratio = |name: String, a: &PathResult, b: &PathResult| {
        ratio(name, (a.p50_us, a.p99_us), (b.p50_us, b.p99_us))
    };
    let direct = find("direct", 0);
    let mut sizes: Vec<usize> = results
        .iter()
        .filter(|r| r.path == "weir")
        .map(|r| r.services)
        .collect();
    sizes.sort_unstable();
    let mut ratios = Vec::new();
    let mut weir_flat = None;
    if let (Some(&lo), Some(&hi)) = (sizes.first(), sizes.last()) {
        if lo != hi {
            if let (Some(a), Some(b)) = (find("weir", hi), find("weir", lo)) {
                let r = ratio(format!("weir@{hi} / weir@{lo}"), a, b);
                weir_flat = Some(r.p50 <= 1.10);
                ratios.push(r);
            }
        }
    }
    let flavors: Vec<String> = results
        .iter()
        .filter(|r| r.path.starts_with("iptables"))
        .map(|r| r.path.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for flavor in &flavors {
        let mut fsizes: Vec<usize> = results
            .iter()
            .filter(|r| &r.path == flavor)
            .map(|r| r.services)
            .collect();
        fsizes.sort_unstable();
        if let (Some(&lo), Some(&hi)) = (fsizes.first(), fsizes.last()) {
            if lo != hi {
                if let (Some(a), Some(b)) = (find(flavor, hi), find(flavor, lo)) {
                    ratios.push(ratio(format!("{flavor}@{hi} / {flavor}@{lo}"), a, b));
                }
            }
        }
        for &size in &sizes {
            if let (Some(w), Some(i)) = (find("weir", size), find(flavor, size)) {
                ratios.push(ratio(format!("weir@{size} / {flavor}@{size}"), w, i));
            }
        }
    }

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let vs_direct =
                direct.map_or("-".to_owned(), |d| format!("{:.2}", r.p50_us / d.p50_us));
            let spread = p50_range(&r.round_p50_us);
            vec![
                r.path.clone(),
                if r.services == 0 {
                    "-".to_owned()
                } else {
                    r.services.to_string()
                },
                format!("{:.1}", r.p50_us),
                format!("{:.1}", r.p99_us),
                vs_direct,
                spread,
                r.failures.to_string(),
                format!("{:.2}", r.program_s),
            ]
        })
        .collect();
    let mut text = format!(
        "\nTCP connect latency to the last ClusterIP ({} endpoints per service, deferred-accept \
         server, client pinned to cpu {cpu})\n{} rounds x {} connects; p50/p99 = median over \
         rounds of each round's p50/p99\n\n",
        o.endpoints, o.rounds, o.connects
    );
    text.push_str(&table(
        &[
            "path",
            "services",
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
        "\ninstall s: iptables = iptables-restore of the full ruleset; weir = agent start (program \
         load included) until `dump services` shows every service\n",
    );
    if let Some(flat) = weir_flat {
        text.push_str(&format!(
            "\ntarget (issue 3): Weir at {} services within 10% of Weir at {} (p50): {}\n",
            sizes.last().copied().unwrap_or(0),
            sizes.first().copied().unwrap_or(0),
            if flat { "met" } else { "NOT met" }
        ));
    }
    ConnectResults {
        bench: "connect",
        started_unix,
        host: host_info(),
        rounds: o.rounds,
        connects: o.connects,
        warmup: o.warmup,
        cpu,
        endpoints: o.endpoints,
        results,
        ratios,
        weir_flat_within_10_percent: weir_flat,
        table: text,
    }
}
