//! The reachability check: every source tries every destination at once with a real connection
//! (`weir-lab probe reach`, one run per source row, its targets in parallel), and the table of
//! what connected is compared with the expected one. A failure shows both tables, the cells
//! that differ marked, and why each differing cell did not connect.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use std::path::PathBuf;
use weir_lab_bench::probe::REACHED;

use weir_lab_core::backend::{tail, Cmd, ProcId, Signal};
use weir_lab_core::scenario::{Family, Protocol, ReachTarget, ReachabilityCheck};

use crate::checks::CheckCtx;

/// How long one cell waits for its connection: a policy drop shows as this timeout.
const CELL_TIMEOUT: Duration = Duration::from_secs(1);
const ROW_EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// The agents apply a policy change within a pass: a table that differs is probed again, up
/// to this often, before it fails.
const ATTEMPTS: usize = 3;

pub fn run(ctx: &mut CheckCtx<'_>, r: &ReachabilityCheck) -> Result<String, String> {
    let targets =
        r.to.iter()
            .map(|to| address(ctx, r, to))
            .collect::<Result<Vec<_>, _>>()?;
    let watching = match &r.monitor {
        Some(node) => Some(Monitor::start(ctx, node)?),
        None => None,
    };
    let probed = probe_until_expected(ctx, r, &targets);
    let Some(watching) = watching else {
        return probed;
    };
    let events = watching.finish(ctx)?;
    let summary = probed?;
    Ok(format!("{summary}; {}", judge_events(ctx, r, &events)?))
}

fn probe_until_expected(
    ctx: &mut CheckCtx<'_>,
    r: &ReachabilityCheck,
    targets: &[SocketAddr],
) -> Result<String, String> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let observed = probe(ctx, r, targets)?;
        let wrong = differing(r, &observed);
        if wrong == 0 {
            return Ok(format!(
                "{}x{} table as expected ({} connected){}",
                r.from.len(),
                r.to.len(),
                observed.iter().flatten().filter(|c| c.0).count(),
                if attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                }
            ));
        }
        last = format!("{wrong} cell(s) differ\n{}", table(r, &observed));
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

/// `weir-agent monitor --verdict denied --json` on one node while a table is probed.
struct Monitor {
    proc: ProcId,
    log: PathBuf,
    node: String,
}

/// How long the monitor is given to take its lease before the first probe, and to say its
/// last events once told to stop (times the lab's slowdown).
const MONITOR_SETTLE: Duration = Duration::from_secs(1);
/// The monitor's own bound, should the check never stop it.
const MONITOR_LIMIT: &str = "120s";

impl Monitor {
    fn start(ctx: &mut CheckCtx<'_>, node: &str) -> Result<Monitor, String> {
        let agents = ctx
            .agents
            .ok_or("the agent is not running in this scenario")?;
        let host = ctx.plan.host(node).ok_or("unknown node")?;
        let agent = (agents.nodes.iter())
            .find(|a| a.node == host)
            .ok_or_else(|| format!("no agent on {node}"))?;
        let log = agent.log.with_file_name(format!("monitor-{node}.log"));
        let cmd = Cmd::new(agents.binary.display().to_string())
            .args(["monitor", "--verdict", "denied", "--json", "--duration"])
            .arg(MONITOR_LIMIT)
            .arg("--pin-dir")
            .arg(agent.pin_dir.display().to_string());
        let proc = ctx.lab.spawn(host, &cmd, &log).map_err(|e| e.to_string())?;
        std::thread::sleep(MONITOR_SETTLE * ctx.lab.slowdown());
        if let Some(status) = ctx.lab.exited(proc).map_err(|e| e.to_string())? {
            return Err(format!(
                "weir-agent monitor on {node} ended at once ({status}): {}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default(), 3)
            ));
        }
        Ok(Monitor {
            proc,
            log,
            node: node.to_owned(),
        })
    }

    /// Stops the monitor (SIGINT: it releases its lease) and returns the events it printed.
    fn finish(self, ctx: &mut CheckCtx<'_>) -> Result<Vec<serde_json::Value>, String> {
        ctx.lab
            .signal(self.proc, Signal::SIGINT)
            .map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + MONITOR_SETTLE * 5 * ctx.lab.slowdown();
        while ctx
            .lab
            .exited(self.proc)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            if std::time::Instant::now() > deadline {
                let _ = ctx.lab.stop(self.proc);
                return Err(format!("weir-agent monitor on {} did not stop", self.node));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        // The log holds the agent's stderr too: its closing line and any warnings.
        Ok(text
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// The monitor's denied flows against the table: at least one, each from the own address of
/// a source whose row expects a denial.
fn judge_events(
    ctx: &CheckCtx<'_>,
    r: &ReachabilityCheck,
    events: &[serde_json::Value],
) -> Result<String, String> {
    let node = r.monitor.as_deref().unwrap_or_default();
    let mut denied_sources = Vec::new();
    for (from, row) in r.from.iter().zip(&r.expect) {
        if row.contains(ReachabilityCheck::DENIED) {
            denied_sources.push((from.as_str(), source_address(ctx, from, r.family)?));
        }
    }
    if events.is_empty() {
        return Err(format!(
            "weir-agent monitor on {node} showed no denied flow"
        ));
    }
    let mut named = std::collections::BTreeSet::new();
    for event in events {
        let source: SocketAddr = (event["source"].as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("monitor event without a source: {event}"))?;
        match denied_sources.iter().find(|(_, ip)| *ip == source.ip()) {
            Some((from, _)) => {
                named.insert(*from);
            }
            None => {
                return Err(format!(
                    "weir-agent monitor on {node} showed a denied flow from {source}, no source \
                     expected denied: {event}"
                ))
            }
        }
    }
    let sample = &events[0];
    Ok(format!(
        "monitor on {node}: {} denied flow(s) from {} (e.g. {} {} -> {})",
        events.len(),
        named.into_iter().collect::<Vec<_>>().join(", "),
        sample["direction"].as_str().unwrap_or("?"),
        sample["source"].as_str().unwrap_or("?"),
        sample["destination"].as_str().unwrap_or("?"),
    ))
}

/// A source host's own address of the family.
fn source_address(ctx: &CheckCtx<'_>, from: &str, family: Family) -> Result<IpAddr, String> {
    let host = ctx.plan.host(from).ok_or("unknown host")?;
    match family {
        Family::Ipv6 => ctx.plan.ip6(host).map(IpAddr::V6),
        _ => ctx.plan.ip_on(host, 1).map(IpAddr::V4),
    }
    .ok_or_else(|| format!("{from} has no address of the family"))
}

/// A column's socket address.
fn address(ctx: &CheckCtx<'_>, r: &ReachabilityCheck, to: &str) -> Result<SocketAddr, String> {
    let plan = ctx.plan;
    let v6 = r.family == Family::Ipv6;
    let target = ctx.scenario.reachability_target(to, plan)?;
    Ok(match target {
        ReachTarget::Pod(name) => {
            let pod = plan.pod(&name).ok_or("unknown pod")?;
            let ip = if v6 {
                IpAddr::V6(
                    pod.ip6
                        .ok_or_else(|| format!("{name} has no IPv6 address"))?,
                )
            } else {
                IpAddr::V4(pod.ip)
            };
            SocketAddr::new(ip, r.port)
        }
        ReachTarget::Service(name) => {
            let svc = ctx.scenario.service(&name).ok_or("unknown service")?;
            let ip = svc
                .cluster_ip_of(r.family)
                .ok_or_else(|| format!("{name} has no cluster IP of the family"))?;
            SocketAddr::new(ip, r.port)
        }
        ReachTarget::NodePort(name, node) => {
            let svc = ctx.scenario.service(&name).ok_or("unknown service")?;
            let port = svc
                .ports
                .iter()
                .find(|p| p.port == r.port)
                .and_then(|p| p.node_port)
                .ok_or_else(|| format!("{name} has no nodePort for port {}", r.port))?;
            let node = plan.host(&node).ok_or("unknown node")?;
            let ip = if v6 {
                plan.ip6(node).map(IpAddr::V6)
            } else {
                plan.ip_on(node, 1).map(IpAddr::V4)
            }
            .ok_or("node without an address of the family")?;
            SocketAddr::new(ip, port)
        }
    })
}

/// Each row's cells: connected, and what the probe said.
fn probe(
    ctx: &mut CheckCtx<'_>,
    r: &ReachabilityCheck,
    targets: &[SocketAddr],
) -> Result<Vec<Vec<(bool, String)>>, String> {
    let lab_binary =
        std::env::current_exe().map_or_else(|_| "weir-lab".into(), |p| p.display().to_string());
    let mut rows = Vec::new();
    for from in &r.from {
        let host = ctx.plan.host(from).ok_or("unknown host")?;
        let mut cmd = Cmd::new(lab_binary.clone())
            .args(["probe", "reach", "--timeout"])
            .arg(format!("{}ms", CELL_TIMEOUT.as_millis()));
        if r.protocol == Protocol::Udp {
            cmd = cmd.arg("--udp");
        }
        for target in targets {
            cmd = cmd.arg(target.to_string());
        }
        let out = ctx
            .lab
            .exec(host, &cmd, ROW_EXEC_TIMEOUT * ctx.lab.slowdown())
            .map_err(|e| e.to_string())?;
        if !out.success() {
            return Err(format!("{from}: probe reach: {}", out.stderr.trim()));
        }
        let cells: Vec<(bool, String)> = out
            .stdout
            .lines()
            .map(|l| (l == REACHED, l.to_owned()))
            .collect();
        if cells.len() != targets.len() {
            return Err(format!("{from}: probe reach answered {:?}", out.stdout));
        }
        rows.push(cells);
    }
    Ok(rows)
}

fn differing(r: &ReachabilityCheck, observed: &[Vec<(bool, String)>]) -> usize {
    r.expect
        .iter()
        .zip(observed)
        .map(|(want, got)| {
            want.chars()
                .zip(got)
                .filter(|(w, (connected, _))| (*w == ReachabilityCheck::ALLOWED) != *connected)
                .count()
        })
        .sum()
}

/// Expected and observed side by side, differing cells marked with `!`, then why each
/// differing cell that should have connected did not.
fn table(r: &ReachabilityCheck, observed: &[Vec<(bool, String)>]) -> String {
    let width = r.from.iter().map(String::len).max().unwrap_or(0);
    let mut out = format!(
        "{:width$}  expected  observed   (columns: {})\n",
        "",
        r.to.join(", ")
    );
    let mut why = Vec::new();
    for ((from, want), got) in r.from.iter().zip(&r.expect).zip(observed) {
        let seen: String = got
            .iter()
            .map(|(c, _)| {
                if *c {
                    ReachabilityCheck::ALLOWED
                } else {
                    ReachabilityCheck::DENIED
                }
            })
            .collect();
        let marks: String = want
            .chars()
            .zip(seen.chars())
            .map(|(w, s)| if w == s { ' ' } else { '!' })
            .collect();
        out.push_str(&format!("{from:width$}  {want:8}  {seen:8}  {marks}\n"));
        for ((w, (connected, said)), to) in want.chars().zip(got).zip(&r.to) {
            if (w == ReachabilityCheck::ALLOWED) && !connected {
                why.push(format!("{from} -> {to}: {said}"));
            }
        }
    }
    for line in why.iter().take(6) {
        out.push_str(&format!("  {line}\n"));
    }
    out
}
