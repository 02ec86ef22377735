//! The throughput scenario: qperf `tcp_bw` and `tcp_lat` from a pod on node 1 to a pod on
//! node 2, directly (pod to pod) and through a ClusterIP, with plain routing (no agent) and with
//! Weir, at each MTU asked for, on whatever backend the caller gives. CPU cost per GB sent is
//! what the lab's VMs cost the host (their QEMU processes' CPU time) where the backend can
//! tell ([`Lab::cpu_time`]), else the nodes' busy time from /proc/stat (machine-wide on the
//! namespace backend, so other load on the machine counts too).
//!
//! Absolute numbers under TCG mean little; what the report shows are ratios of measurements
//! taken in the same lab, one after the other: Weir against plain routing on the same path.
//! An iptables kube-proxy emulation joins through [`ProxyHook`] once it lands.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent;
use crate::backend::{Backend, Cmd, Lab};
use crate::k8s;
use crate::scenario::Scenario;
use crate::topology::{HostId, Plan};

pub const CLUSTER_IP: &str = "198.18.100.20";
const CONTROL_PORT: u16 = 19765;
const DATA_PORT: u16 = 19766;
const CLIENT: HostId = HostId::Pod { node: 1, index: 0 };
const SERVER: HostId = HostId::Pod { node: 2, index: 0 };

/// How service traffic is handled in a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No agent: the pods' routes only (the ClusterIP path does not exist here).
    Routing,
    Weir,
    /// An iptables kube-proxy emulation (see [`ProxyHook`]).
    KubeProxyIptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    PodToPod,
    ClusterIp,
}

/// One measurement, or why it was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub route: Route,
    pub mode: Mode,
    pub mtu: u32,
    pub bandwidth_gbps: Option<f64>,
    pub latency_us: Option<f64>,
    /// CPU seconds per GB sent during tcp_bw: the VMs' QEMU processes on the host, or the
    /// nodes' busy time where the backend cannot tell its own work apart.
    pub cpu_s_per_gb: Option<f64>,
    pub skipped: Option<String>,
}

/// Installs an alternative service proxy on every node for the ClusterIP, or says why it
/// cannot. The iptables kube-proxy emulation (lab/src/kube_proxy.rs, being written on the
/// scale-bench branch) plugs in here: it gets the lab, the plan, the ClusterIP and the
/// (port, endpoint ip, target port) triples.
pub type ProxyHook = fn(&mut dyn Lab, &Plan, &str, &[(u16, String, u16)]) -> Result<(), String>;

/// The hook until the emulation lands: every kube-proxy measurement is skipped with this.
pub fn kube_proxy_not_available(
    _: &mut dyn Lab,
    _: &Plan,
    _: &str,
    _: &[(u16, String, u16)],
) -> Result<(), String> {
    Err("the iptables kube-proxy emulation has not landed yet (branch scale-bench)".into())
}

#[derive(Clone, Debug)]
pub struct ThroughputOptions {
    pub mtus: Vec<u32>,
    /// qperf's -t per test.
    pub seconds: u32,
    /// Alternating routing/Weir rounds; the median of each series is reported.
    pub rounds: u32,
    pub agent: std::path::PathBuf,
    pub kube_proxy: ProxyHook,
}

fn scenario_text(mtu: u32) -> String {
    format!(
        r#"name = "throughput-{mtu}"
description = "qperf pod to pod and through a ClusterIP"
[topology]
nodes = 2
pods_per_node = 1
mtu = {mtu}
[[pods]]
match = "n2p0"
labels = {{ app = "qperf" }}
[[services]]
name = "qperf"
cluster_ip = "{CLUSTER_IP}"
selector = {{ app = "qperf" }}
ports = [
  {{ name = "control", protocol = "TCP", port = {CONTROL_PORT}, target_port = {CONTROL_PORT} }},
  {{ name = "data", protocol = "TCP", port = {DATA_PORT}, target_port = {DATA_PORT} }},
]
"#
    )
}

/// Runs the measurements for every MTU on `backend`; one lab per MTU.
pub fn run(
    backend: &dyn Backend,
    opts: &ThroughputOptions,
    work_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Vec<Measurement> {
    let mut out = Vec::new();
    for &mtu in &opts.mtus {
        let dir = work_dir.join(format!("throughput-{mtu}"));
        match run_mtu(backend, opts, mtu, &dir, progress) {
            Ok(m) => out.extend(m),
            Err(why) => {
                progress(&format!("throughput at mtu {mtu}: {why}"));
                for (route, mode) in [
                    (Route::PodToPod, Mode::Routing),
                    (Route::PodToPod, Mode::Weir),
                    (Route::ClusterIp, Mode::Weir),
                    (Route::ClusterIp, Mode::KubeProxyIptables),
                ] {
                    out.push(skipped(route, mode, mtu, &why));
                }
            }
        }
    }
    out
}

fn skipped(route: Route, mode: Mode, mtu: u32, why: &str) -> Measurement {
    Measurement {
        route,
        mode,
        mtu,
        bandwidth_gbps: None,
        latency_us: None,
        cpu_s_per_gb: None,
        skipped: Some(why.to_owned()),
    }
}

fn run_mtu(
    backend: &dyn Backend,
    opts: &ThroughputOptions,
    mtu: u32,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Measurement>, String> {
    let scenario = Scenario::parse(&scenario_text(mtu), Path::new("throughput.toml"))
        .map_err(|e| e.to_string())?;
    let plan = scenario.plan();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let started = Instant::now();
    let mut lab = backend.create(&plan, dir).map_err(|e| e.to_string())?;
    progress(&format!(
        "throughput mtu {mtu}: lab up in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let result = measure_all(lab.as_mut(), &scenario, &plan, opts, mtu, dir, progress);
    let _ = lab.teardown();
    result
}

fn measure_all(
    lab: &mut dyn Lab,
    scenario: &Scenario,
    plan: &Plan,
    opts: &ThroughputOptions,
    mtu: u32,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Measurement>, String> {
    let server_ip = plan.ip(SERVER).ok_or("no server pod")?.to_string();
    lab.spawn(SERVER, &Cmd::new("qperf"), &dir.join("qperf-server.log"))
        .map_err(|e| e.to_string())?;
    // First contact resolves neighbours and wakes the server: not part of any measurement.
    measure(lab, plan, &server_ip, &mut |_| {}, "warm-up", 1)?;

    let labels = k8s::pod_labels(scenario, plan);
    let endpoints: BTreeMap<String, Vec<String>> = scenario
        .services
        .iter()
        .map(|s| {
            let pods = k8s::endpoints(s, plan, &labels);
            (
                s.name.clone(),
                pods.iter().map(|p| p.name.clone()).collect(),
            )
        })
        .collect();
    let expected = agent::expected_frontends(scenario, &endpoints);
    let run_id = format!("throughput-{mtu}-{}", std::process::id());
    let ready = scenario.agent.ready_timeout * lab.slowdown();

    // Rounds alternate plain routing and Weir in the same lab (stopping the agent detaches its
    // programs; the next one adopts the pinned maps), so drift on a busy host hits both; the
    // median of each series is reported.
    let mut series: BTreeMap<(Route, Mode), Vec<Measurement>> = BTreeMap::new();
    let mut pin_root = None;
    for round in 1..=opts.rounds.max(1) {
        let tag = format!("round {round}/{}", opts.rounds.max(1));
        let mut m = measure(
            lab,
            plan,
            &server_ip,
            progress,
            &format!("routing pod-to-pod, {tag}"),
            opts.seconds,
        )?;
        m.route = Route::PodToPod;
        m.mode = Mode::Routing;
        series.entry((m.route, m.mode)).or_default().push(m);

        let agents = agent::start(lab, scenario, plan, &opts.agent, dir, &run_id)
            .map_err(|e| e.to_string())?;
        pin_root = Some(agents.pin_root.clone());
        let measured = (|| {
            agent::wait_ready(lab, &agents, &expected, ready)?;
            let mut out = Vec::new();
            for (route, target, label) in [
                (Route::PodToPod, server_ip.as_str(), "weir pod-to-pod"),
                (Route::ClusterIp, CLUSTER_IP, "weir clusterip"),
            ] {
                let mut m = measure(
                    lab,
                    plan,
                    target,
                    progress,
                    &format!("{label}, {tag}"),
                    opts.seconds,
                )?;
                m.route = route;
                m.mode = Mode::Weir;
                out.push(m);
            }
            Ok::<_, String>(out)
        })();
        for a in &agents.nodes {
            let _ = lab.stop(a.proc);
        }
        for m in measured? {
            series.entry((m.route, m.mode)).or_default().push(m);
        }
    }
    // On the namespace backend the pins live in the lab's own bpffs; VMs take theirs along.
    if let Some(root) = pin_root {
        let _ = std::fs::remove_dir_all(root);
    }
    let mut out: Vec<Measurement> = series
        .into_values()
        .map(|ms| {
            let mut m = median(&ms);
            m.mtu = mtu;
            m
        })
        .collect();

    let triples = [
        (CONTROL_PORT, server_ip.clone(), CONTROL_PORT),
        (DATA_PORT, server_ip.clone(), DATA_PORT),
    ];
    match (opts.kube_proxy)(lab, plan, CLUSTER_IP, &triples) {
        Ok(()) => {
            let mut m = measure(
                lab,
                plan,
                CLUSTER_IP,
                progress,
                "kube-proxy clusterip",
                opts.seconds,
            )?;
            m.route = Route::ClusterIp;
            m.mode = Mode::KubeProxyIptables;
            m.mtu = mtu;
            out.push(m);
        }
        Err(why) => out.push(skipped(
            Route::ClusterIp,
            Mode::KubeProxyIptables,
            mtu,
            &why,
        )),
    }
    Ok(out)
}

/// The per-field median of a series of measurements of one route and mode.
fn median(ms: &[Measurement]) -> Measurement {
    let med = |f: &dyn Fn(&Measurement) -> Option<f64>| {
        let mut v: Vec<f64> = ms.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    };
    Measurement {
        bandwidth_gbps: med(&|m| m.bandwidth_gbps),
        latency_us: med(&|m| m.latency_us),
        cpu_s_per_gb: med(&|m| m.cpu_s_per_gb),
        ..ms[0].clone()
    }
}

/// Busy jiffies (USER_HZ) of a host's kernel, all CPUs, from /proc/stat's first line.
fn busy_jiffies(lab: &mut dyn Lab, host: HostId) -> Result<u64, String> {
    let out = lab
        .exec_ok(
            host,
            &Cmd::new("cat").arg("/proc/stat"),
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
    parse_busy(&out.stdout).ok_or_else(|| "unreadable /proc/stat".into())
}

fn parse_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4).copied().unwrap_or(0))
}

fn measure(
    lab: &mut dyn Lab,
    plan: &Plan,
    target: &str,
    progress: &mut dyn FnMut(&str),
    label: &str,
    seconds: u32,
) -> Result<Measurement, String> {
    let nodes: Vec<HostId> = plan.nodes.iter().map(|n| n.id).collect();
    let timeout = Duration::from_secs(u64::from(seconds) * 2 + 60) * lab.slowdown();
    let qperf = |test: &str| {
        Cmd::new("qperf")
            .arg("-t")
            .arg(seconds.to_string())
            .arg("-to")
            .arg("30")
            .arg("-ip")
            .arg(DATA_PORT.to_string())
            .arg("-vvs")
            .arg(target)
            .arg(test)
    };
    // The server may still be starting: retry the first contact for a while.
    let deadline = Instant::now() + Duration::from_secs(20) * lab.slowdown();
    let host_before = lab.cpu_time();
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| busy_jiffies(lab, *n))
        .collect::<Result<_, _>>()?;
    let bw_started = Instant::now();
    let bw_out = loop {
        let out = lab
            .exec(CLIENT, &qperf("tcp_bw"), timeout)
            .map_err(|e| e.to_string())?;
        if out.success() && out.stdout.contains("bw") {
            break out;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{label}: qperf tcp_bw failed ({}): {}",
                out.status(),
                crate::backend::tail(&format!("{}{}", out.stdout, out.stderr), 4)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let after: Vec<u64> = nodes
        .iter()
        .map(|n| busy_jiffies(lab, *n))
        .collect::<Result<_, _>>()?;
    let wall_s = bw_started.elapsed().as_secs_f64();
    let host_after = lab.cpu_time();
    let lat_out = lab
        .exec_ok(CLIENT, &qperf("tcp_lat"), timeout)
        .map_err(|e| format!("{label}: qperf tcp_lat: {e}"))?;
    let report = parse_qperf(&bw_out.stdout);
    let lat = parse_qperf(&lat_out.stdout);
    let bw = report.get("bw").copied();
    // Bytes moved: the measured rate over the test's length. (qperf's send_bytes sometimes
    // counts a single message when the client is starved, which would make the cost absurd.)
    let sent = bw.map(|rate| rate * f64::from(seconds));
    let busy: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / 100.0)
        .collect();
    // VMs: what their QEMU processes cost the host, which the host accounts reliably.
    // Elsewhere the hosts' own busy time; a guest whose ticks went missing or whose clock
    // jumped reports none or more than the wall clock allows, and such a sample is dropped.
    let busy_s = match (host_before, host_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b).as_secs_f64()),
        _ => {
            let plausible = busy.iter().all(|b| *b > 0.0 && *b <= wall_s * 1.5 + 1.0);
            plausible.then(|| busy.iter().sum())
        }
    };
    let cpu_s_per_gb = match (sent, busy_s) {
        (Some(s), Some(b)) if s > 0.0 && b > 0.0 => Some(b / (s / 1e9)),
        _ => None,
    };
    let m = Measurement {
        route: Route::PodToPod,
        mode: Mode::Routing,
        mtu: plan.mtu,
        bandwidth_gbps: bw.map(|b| b * 8.0 / 1e9),
        latency_us: lat.get("latency").map(|s| s * 1e6),
        cpu_s_per_gb,
        skipped: None,
    };
    progress(&format!(
        "{label} mtu {}: {:.2} Gb/s, {:.0} us, {:.1} CPU s/GB",
        plan.mtu,
        m.bandwidth_gbps.unwrap_or(0.0),
        m.latency_us.unwrap_or(0.0),
        m.cpu_s_per_gb.unwrap_or(0.0)
    ));
    Ok(m)
}

/// qperf's `-vvs` output as numbers in base units: bytes/s for rates, bytes, seconds.
pub fn parse_qperf(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let Some(number) = words
            .next()
            .and_then(|n| n.replace(',', "").parse::<f64>().ok())
        else {
            continue;
        };
        let unit = words.next().unwrap_or("");
        let scale = match unit.split('/').next().unwrap_or("") {
            "GB" => 1e9,
            "MB" => 1e6,
            "KB" => 1e3,
            "K" => 1e3,
            "M" => 1e6,
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            _ => 1.0,
        };
        out.insert(key.trim().to_owned(), number * scale);
    }
    out
}

/// Weir against plain routing (bandwidth and latency) for every path and MTU measured.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub route: Route,
    pub mode: Mode,
    pub mtu: u32,
    /// Bandwidth of this mode over routing pod-to-pod (1.0 = as fast).
    pub bandwidth: Option<f64>,
    /// Latency of this mode over routing pod-to-pod (1.0 = as quick).
    pub latency: Option<f64>,
    pub cpu_per_gb: Option<f64>,
}

pub fn ratios(ms: &[Measurement]) -> Vec<Ratio> {
    let base = |mtu: u32| {
        ms.iter()
            .find(|m| m.mtu == mtu && m.mode == Mode::Routing && m.skipped.is_none())
    };
    ms.iter()
        .filter(|m| m.mode != Mode::Routing && m.skipped.is_none())
        .filter_map(|m| {
            let b = base(m.mtu)?;
            let div = |x: Option<f64>, y: Option<f64>| match (x, y) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            };
            Some(Ratio {
                route: m.route,
                mode: m.mode,
                mtu: m.mtu,
                bandwidth: div(m.bandwidth_gbps, b.bandwidth_gbps),
                latency: div(m.latency_us, b.latency_us),
                cpu_per_gb: div(m.cpu_s_per_gb, b.cpu_s_per_gb),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qperf_output() {
        let text = "tcp_bw:\n    bw          =    2.16 GB/sec\n    msg_rate    =      33 K/sec\n    send_bytes  =    4.33 GB\n    send_msgs   =  66,079 \ntcp_lat:\n    latency   =  14.5 us\n";
        let v = parse_qperf(text);
        assert_eq!(v["bw"], 2.16e9);
        assert_eq!(v["send_bytes"], 4.33e9);
        assert_eq!(v["send_msgs"], 66079.0);
        assert!((v["latency"] - 14.5e-6).abs() < 1e-12);
        let v = parse_qperf("    bw  =  310 MB/sec\n    latency = 1.2 ms\n");
        assert_eq!(v["bw"], 310e6);
        assert!((v["latency"] - 1.2e-3).abs() < 1e-12);
    }

    #[test]
    fn proc_stat_busy_time() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 100 5 50 1000 20 3 2 0 0 0\n";
        assert_eq!(parse_busy(stat), Some(160));
    }

    #[test]
    fn the_throughput_scenario_is_valid() {
        let s = Scenario::parse(&scenario_text(1440), Path::new("t.toml")).unwrap();
        assert_eq!(s.plan().mtu, 1440);
        assert_eq!(s.services.len(), 1);
    }

    #[test]
    fn medians_per_field() {
        let m = |bw| Measurement {
            route: Route::PodToPod,
            mode: Mode::Weir,
            mtu: 1440,
            bandwidth_gbps: Some(bw),
            latency_us: None,
            cpu_s_per_gb: Some(bw * 2.0),
            skipped: None,
        };
        let med = median(&[m(3.0), m(1.0), m(2.0)]);
        assert_eq!(med.bandwidth_gbps, Some(2.0));
        assert_eq!(med.cpu_s_per_gb, Some(4.0));
        assert_eq!(med.latency_us, None);
        assert_eq!(median(&[m(1.0), m(2.0)]).bandwidth_gbps, Some(1.5));
    }

    #[test]
    fn ratios_against_routing() {
        let m = |route, mode, bw, lat| Measurement {
            route,
            mode,
            mtu: 1440,
            bandwidth_gbps: Some(bw),
            latency_us: Some(lat),
            cpu_s_per_gb: Some(2.0),
            skipped: None,
        };
        let ms = vec![
            m(Route::PodToPod, Mode::Routing, 2.0, 100.0),
            m(Route::ClusterIp, Mode::Weir, 1.8, 110.0),
        ];
        let r = ratios(&ms);
        assert_eq!(r.len(), 1);
        assert!((r[0].bandwidth.unwrap() - 0.9).abs() < 1e-9);
        assert!((r[0].latency.unwrap() - 1.1).abs() < 1e-9);
    }
}
