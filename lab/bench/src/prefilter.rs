//! `weir-lab bench prefilter`: how fast a node drops a flood from a deny-listed source, the
//! XDP pre-filter against the same deny-list as an iptables `raw` rule with an ipset (what an
//! iptables-based data plane installs to drop early), and against no filter at all (the stack
//! takes every datagram to a closed port), measured round by round in rotating order.
//!
//! Every path is one node and one external client. The client sends 18-byte UDP datagrams to
//! the node from one thread pinned to a CPU, as fast as it can: on the namespace lab a veth
//! delivers a packet on the sender's own CPU, so the rate it reaches is the inverse of the
//! whole per-packet cost (send, bridge, and the node's drop), and a cheaper drop shows as more
//! packets per second. The deny-list holds `--prefixes` prefixes (IPv4 /24s to /32s and the
//! client's own /32). Each path's drops are read back (the pre-filter's counter, the rule's
//! packet count) so a path that drops nothing cannot pass for a fast one.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connect::{probe_cpu, rotate};
use crate::kube_proxy::find_program;
use crate::probe::FloodReport;
use crate::weir::{stop_and_tear_down, BenchAgent};
use crate::{host_info, median, table, unix_now, BenchCommon, BenchEnv, BenchError};
use weir_lab_core::backend::{Cmd, Lab};
use weir_lab_core::scenario::Scenario;
use weir_lab_core::topology::{HostId, Plan};

const CLIENT: HostId = HostId::External(1);
/// Where the flood goes: a UDP port nothing listens on.
const FLOOD_PORT: u16 = 9;
const IPSET_NAME: &str = "weir-bench-deny";
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Short floods tried, half a second apart, before a filter counts as not in force.
const ENFORCED_TRIES: u32 = 20;

#[derive(Debug, Clone, clap::Args)]
pub struct PrefilterOptions {
    /// Prefixes on the deny-list (the client's own among them).
    #[arg(long, default_value_t = 10_000)]
    pub prefixes: u32,
    /// Measurement rounds; every path is measured once per round.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// How long each flood lasts.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The CPU the sender is pinned to [default: the last one].
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Leave the iptables baseline out.
    #[arg(long)]
    pub no_iptables: bool,
    #[command(flatten)]
    pub common: BenchCommon,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// No filter: the stack receives every datagram and finds no socket.
    Stack,
    /// Weir's XDP pre-filter in the driver (`mode = "native"`; on the namespace lab, veth's).
    WeirXdpNative,
    /// Weir's XDP pre-filter at the stack's generic hook (`mode = "generic"`).
    WeirXdpGeneric,
    /// `-t raw -A PREROUTING -m set --match-set DENY src -j DROP`.
    IptablesRawIpset,
}

struct PrefilterPath {
    engine: Engine,
    lab: Box<dyn Lab>,
    agent: Option<BenchAgent>,
    target: SocketAddr,
    iptables: Option<std::path::PathBuf>,
    rounds: Vec<Round>,
}

#[derive(Debug, Clone, Serialize)]
struct Round {
    sent_pps: f64,
    /// The filter's drops per second of flood.
    dropped_pps: f64,
    /// Packets the path's filter counted as dropped during the flood.
    dropped: u64,
    sent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefilterPathResult {
    pub path: Engine,
    /// Median over rounds of packets per second the sender reached.
    pub pps: f64,
    pub round_pps: Vec<f64>,
    /// Median over rounds of the filter's drops per second: where the node runs on CPUs of
    /// its own (a VM), what it keeps up with, whatever the sender reaches.
    pub dropped_pps: f64,
    /// Dropped by the filter over sent, summed over rounds (1.0: every packet was dropped
    /// there; the stack path counts none).
    pub dropped_share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefilterResults {
    pub bench: &'static str,
    pub host: serde_json::Value,
    pub started_unix: f64,
    pub prefixes: u32,
    pub rounds: u32,
    pub duration_s: f64,
    pub paths: Vec<PrefilterPathResult>,
    #[serde(skip)]
    pub table: String,
}

pub fn run(o: &PrefilterOptions, env: &BenchEnv) -> Result<PrefilterResults, BenchError> {
    if o.rounds == 0 || o.prefixes == 0 {
        return Err(BenchError::Setup(
            "--rounds and --prefixes must be positive".into(),
        ));
    }
    let cpu = probe_cpu(o.cpu)?;
    let tools = if o.no_iptables {
        None
    } else {
        Some(IptablesTools::find()?)
    };
    let started_unix = unix_now();
    let run_root = crate::RunRoot::create(env, "prefilter")?;
    let mut engines = vec![Engine::Stack, Engine::WeirXdpNative, Engine::WeirXdpGeneric];
    if tools.is_some() {
        engines.push(Engine::IptablesRawIpset);
    }
    let mut paths: Vec<PrefilterPath> = Vec::new();
    let outcome = (|| -> Result<PrefilterResults, BenchError> {
        for engine in engines {
            let t = Instant::now();
            paths.push(build_path(engine, o, env, &run_root.0, tools.as_ref())?);
            println!(
                "bench prefilter: {engine:?} ready in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        rotate(&mut paths, o.rounds, "prefilter", |path| {
            let round = measure(path, env, o.duration, cpu)?;
            path.rounds.push(round);
            Ok(())
        })?;
        Ok(summarize(&paths, o, started_unix))
    })();
    crate::conclude(
        outcome,
        paths
            .into_iter()
            .map(|mut path| stop_and_tear_down(path.agent.as_ref(), path.lab.as_mut())),
        run_root,
        env,
        "bench-prefilter.json",
        |r| &r.table,
    )
}

/// One node, one external client.
fn lab_plan() -> Plan {
    Plan::new(1, 0, 1, 1500)
}

/// The deny-list: `count` prefixes, the client's own /32 first.
pub fn deny_list(client: Ipv4Addr, count: u32) -> Vec<String> {
    let mut list = vec![format!("{client}/32")];
    // 198.19.0.0/16 and up: never the lab's 198.18.0.0/16.
    let mut i = 0u32;
    while list.len() < count as usize {
        let len = 24 + i % 9;
        let host = i << (32 - len);
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (host & 0xffff));
        let text = format!("{addr}/{len}");
        // Prefixes that clear to one already listed are skipped.
        if !list.contains(&text) {
            list.push(text);
        }
        i += 1;
        if i > count * 4 {
            break;
        }
    }
    list
}

/// `ipset restore` input and the `raw` table for `iptables-restore`.
pub fn iptables_raw_ipset(list: &[String]) -> (String, String) {
    let mut ipset = format!(
        "create {IPSET_NAME} hash:net family inet hashsize 4096 maxelem {}\n",
        list.len().max(65_536)
    );
    for prefix in list {
        ipset.push_str(&format!("add {IPSET_NAME} {prefix}\n"));
    }
    let raw = format!(
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A PREROUTING -m set --match-set {IPSET_NAME} src -j DROP\nCOMMIT\n"
    );
    (ipset, raw)
}

struct IptablesTools {
    ipset: std::path::PathBuf,
    iptables: std::path::PathBuf,
    restore: std::path::PathBuf,
}

impl IptablesTools {
    fn find() -> Result<IptablesTools, BenchError> {
        let missing = |p: &str| {
            BenchError::Setup(format!(
                "{p} not found: lab/setup.sh installs it, or pass --no-iptables"
            ))
        };
        Ok(IptablesTools {
            ipset: find_program("ipset").ok_or_else(|| missing("ipset"))?,
            iptables: find_program("iptables-legacy").ok_or_else(|| missing("iptables-legacy"))?,
            restore: crate::iptables_restore(crate::kube_proxy::Flavor::Legacy)?,
        })
    }
}

fn build_path(
    engine: Engine,
    o: &PrefilterOptions,
    env: &BenchEnv,
    run_root: &Path,
    tools: Option<&IptablesTools>,
) -> Result<PrefilterPath, BenchError> {
    let plan = lab_plan();
    let run_dir = run_root.join(format!("{engine:?}").to_lowercase());
    std::fs::create_dir_all(&run_dir)
        .map_err(BenchError::io(format!("creating {}", run_dir.display())))?;
    let lab = weir_lab_backends::instantiate(env.backend).create(&plan, &run_dir)?;
    let node = plan.nodes[0].id;
    let node_ip = plan.ip_on(node, 1).expect("the node has an address");
    let client_ip = plan.ip_on(CLIENT, 1).expect("the client has an address");
    let mut path = PrefilterPath {
        engine,
        lab,
        agent: None,
        target: SocketAddr::new(node_ip.into(), FLOOD_PORT),
        iptables: None,
        rounds: Vec::new(),
    };
    let list = deny_list(client_ip, o.prefixes);
    let prepared = (|| -> Result<(), BenchError> {
        match engine {
            Engine::Stack => {}
            Engine::WeirXdpNative | Engine::WeirXdpGeneric => {
                let mode = if engine == Engine::WeirXdpNative {
                    "native"
                } else {
                    "generic"
                };
                let deny: Vec<String> = list.iter().map(|p| format!("{p:?}")).collect();
                let toml = format!(
                    "name = \"bench-prefilter\"\n[topology]\nnodes = 1\npods_per_node = 0\nexternals = 1\n\
                     [agent]\nready_timeout = \"10m\"\n\
                     prefilter = {{ enabled = true, mode = \"{mode}\", deny = [{}] }}\n",
                    deny.join(", ")
                );
                let scenario = Scenario::parse(&toml, Path::new("bench-prefilter"))?;
                let state = weir_lab_core::k8s::cluster_state(&scenario, &plan);
                // One pin directory per path: two agents must never share maps or links.
                let run_id = format!("bench-{}-prefilter-{mode}", std::process::id());
                let agent = BenchAgent::start(
                    path.lab.as_mut(),
                    &env.agent,
                    &run_dir,
                    &run_id,
                    &scenario.agent,
                    &state,
                )?;
                let agent = path.agent.insert(agent);
                agent.wait_programmed(path.lab.as_mut(), &scenario, &plan, READY_TIMEOUT)?;
            }
            Engine::IptablesRawIpset => {
                let tools = tools.expect("iptables paths only with the tools found");
                let (ipset, raw) = iptables_raw_ipset(&list);
                let lab = path.lab.as_mut();
                let ipset_file = run_dir.join("ipset.input");
                lab.write_file(node, &ipset_file, ipset.as_bytes())?;
                let cmd = Cmd::new(tools.ipset.display().to_string())
                    .args(["restore", "-file"])
                    .arg(ipset_file.display().to_string());
                lab.exec_ok(node, &cmd, READY_TIMEOUT)?;
                let raw_file = run_dir.join("raw.rules");
                lab.write_file(node, &raw_file, raw.as_bytes())?;
                let cmd = Cmd::new("sh").arg("-c").arg(format!(
                    "{} --noflush < {}",
                    tools.restore.display(),
                    raw_file.display()
                ));
                lab.exec_ok(node, &cmd, READY_TIMEOUT)?;
                path.iptables = Some(tools.iptables.clone());
            }
        }
        // The filter is in force once a short flood is dropped by it (the agent attaches the
        // pre-filter on its first interface pass, soon after it is ready).
        let tries = ENFORCED_TRIES * path.lab.slowdown();
        for _ in 0..tries {
            let probe = measure(&mut path, env, Duration::from_millis(200), 0)?;
            if engine == Engine::Stack || probe.dropped > 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(BenchError::Setup(format!(
            "{engine:?}: short floods, none dropped by the filter"
        )))
    })();
    match prepared {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = stop_and_tear_down(path.agent.as_ref(), path.lab.as_mut());
            Err(e)
        }
    }
}

/// One flood, and what the path's filter dropped meanwhile.
fn measure(
    path: &mut PrefilterPath,
    env: &BenchEnv,
    duration: Duration,
    cpu: usize,
) -> Result<Round, BenchError> {
    let before = dropped(path, env)?;
    let cmd = Cmd::new(env.exe.display().to_string())
        .args(["probe", "flood", "--duration"])
        .arg(format!("{}ms", duration.as_millis()))
        .arg("--cpu")
        .arg(cpu.to_string())
        .arg(path.target.to_string());
    let out = path
        .lab
        .exec_ok(CLIENT, &cmd, duration * 4 + Duration::from_secs(10))?;
    let report: FloodReport = serde_json::from_str(out.stdout.trim())
        .map_err(|e| BenchError::Setup(format!("probe flood said {:?}: {e}", out.stdout)))?;
    let after = dropped(path, env)?;
    let dropped = after.saturating_sub(before);
    Ok(Round {
        sent_pps: report.sent as f64 / report.seconds.max(1e-9),
        dropped_pps: dropped as f64 / report.seconds.max(1e-9),
        dropped,
        sent: report.sent,
    })
}

/// The path's drop count so far.
fn dropped(path: &mut PrefilterPath, env: &BenchEnv) -> Result<u64, BenchError> {
    let node = path.lab.plan().nodes[0].id;
    match path.engine {
        Engine::Stack => Ok(0),
        Engine::WeirXdpNative | Engine::WeirXdpGeneric => {
            let agent = path.agent.as_ref().expect("the XDP path runs the agent");
            let out = weir_lab_cluster::agent::dump(
                path.lab.as_mut(),
                &env.agent,
                agent.node(),
                "counters",
            )
            .map_err(BenchError::Setup)?;
            let counters: std::collections::BTreeMap<String, u64> = serde_json::from_str(&out)
                .map_err(|e| BenchError::Setup(format!("dump counters: {e}")))?;
            Ok(counters.get("prefilter_drop_config").copied().unwrap_or(0))
        }
        Engine::IptablesRawIpset => {
            let iptables = path
                .iptables
                .as_ref()
                .expect("found when the path was built");
            let cmd = Cmd::new(iptables.display().to_string()).args([
                "-t",
                "raw",
                "-L",
                "PREROUTING",
                "-v",
                "-x",
                "-n",
            ]);
            let out = path.lab.exec_ok(node, &cmd, Duration::from_secs(10))?;
            Ok(raw_rule_packets(&out.stdout))
        }
    }
}

/// The packet count of the ipset rule in `iptables -L -v -x -n` output.
pub fn raw_rule_packets(listing: &str) -> u64 {
    listing
        .lines()
        .find(|l| l.contains(IPSET_NAME))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn summarize(paths: &[PrefilterPath], o: &PrefilterOptions, started_unix: f64) -> PrefilterResults {
    let results: Vec<PrefilterPathResult> = paths
        .iter()
        .map(|p| {
            let round_pps: Vec<f64> = p.rounds.iter().map(|r| r.sent_pps).collect();
            let sent: u64 = p.rounds.iter().map(|r| r.sent).sum();
            let dropped: u64 = p.rounds.iter().map(|r| r.dropped).sum();
            PrefilterPathResult {
                path: p.engine,
                pps: median(&round_pps),
                round_pps,
                dropped_pps: median(&p.rounds.iter().map(|r| r.dropped_pps).collect::<Vec<_>>()),
                dropped_share: dropped as f64 / sent.max(1) as f64,
            }
        })
        .collect();
    let pps_of = |engine| results.iter().find(|r| r.path == engine).map(|r| r.pps);
    let stack = pps_of(Engine::Stack).unwrap_or(f64::NAN);
    let iptables = pps_of(Engine::IptablesRawIpset);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                format!("{:?}", r.path),
                format!("{:.0}", r.pps),
                format!("{:.2}x", r.pps / stack),
                iptables.map_or("-".into(), |i| format!("{:.2}x", r.pps / i)),
                format!("{:.0}", r.dropped_pps),
                format!("{:.2}", r.dropped_share),
            ]
        })
        .collect();
    let table = format!(
        "bench prefilter: a UDP flood from a deny-listed client ({} prefixes), median of {} rounds of {:?}\n{}",
        o.prefixes,
        o.rounds,
        o.duration,
        table(
            &["path", "packets/s", "vs stack", "vs iptables", "dropped/s", "dropped share"],
            &rows
        )
    );
    PrefilterResults {
        bench: "prefilter",
        host: host_info(),
        started_unix,
        prefixes: o.prefixes,
        rounds: o.rounds,
        duration_s: o.duration.as_secs_f64(),
        paths: results,
        table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_list_holds_the_client_and_distinct_prefixes_outside_the_lab() {
        let client = Ipv4Addr::new(198, 18, 0, 201);
        let list = deny_list(client, 10_000);
        assert_eq!(list.len(), 10_000);
        assert_eq!(list[0], "198.18.0.201/32");
        let distinct: std::collections::BTreeSet<&String> = list.iter().collect();
        assert_eq!(distinct.len(), list.len());
        assert!(list[1..].iter().all(|p| p.starts_with("198.19.")));
    }

    #[test]
    fn the_iptables_baseline_is_one_raw_rule_over_one_set() {
        let (ipset, raw) = iptables_raw_ipset(&["198.18.0.201/32".into(), "198.19.0.0/24".into()]);
        assert!(ipset.starts_with("create weir-bench-deny hash:net family inet"));
        assert_eq!(ipset.lines().filter(|l| l.starts_with("add ")).count(), 2);
        assert!(raw.contains("-A PREROUTING -m set --match-set weir-bench-deny src -j DROP"));
        let listing = "Chain PREROUTING (policy ACCEPT 5 packets, 300 bytes)\n    pkts      bytes target     prot opt in     out     source               destination\n  123456  8000000 DROP       all  --  *      *       0.0.0.0/0            0.0.0.0/0            match-set weir-bench-deny src\n";
        assert_eq!(raw_rule_packets(listing), 123_456);
    }
}
