//! The throughput scenario: qperf `tcp_bw` and `tcp_lat` to a pod on node 2: from a pod on
//! node 1 directly (pod to pod) and through a ClusterIP, and from an external client through
//! node 1's NodePort (so the backend is remote: Weir carries the flow through its VXLAN tunnel
//! and replies return through node 1; kube-proxy masquerades and routes), with plain routing
//! (no agent) and with Weir, at each MTU asked for, on whatever backend the caller gives. The
//! qperf ports are the same on every path (service port = target port = nodePort), so one qperf
//! server serves them all. CPU cost per GB sent is
//! what the lab's VMs cost the host (their QEMU processes' CPU time) where the backend can
//! tell ([`Lab::cpu_time`]), else the nodes' busy time from /proc/stat (machine-wide on the
//! namespace backend, so other load on the machine counts too).
//!
//! Absolute numbers under TCG mean little; what the report shows are ratios of measurements
//! taken in the same lab, one after the other: Weir and kube-proxy against plain routing.
//!
//! kube-proxy is the iptables emulation of lab/src/kube_proxy.rs ([`kube_proxy_iptables`]):
//! every node gets kube-proxy's jump rules and a full sync for the service, loaded with
//! iptables-legacy-restore (iptables-nft-restore where legacy fails), no agent running. It is
//! measured after the routing/Weir rounds, not between them: once a netns has a nat table, the
//! kernel keeps its hooks (and conntrack) for the netns' lifetime even after the rules are
//! removed, which would tax every later routing and Weir round. The rules are removed after
//! its rounds all the same, and the lab is torn down after each MTU.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::kube_proxy::{self, Flavor, Proxier, ProxierConfig};
use weir_lab_cluster::agent;
use weir_lab_core::backend::{Backend, Cmd, Lab};
use weir_lab_core::k8s;
use weir_lab_core::scenario::Scenario;
use weir_lab_core::topology::{HostId, Plan};
use weir_lab_report::throughput::{Measurement, Mode, Route};
use weir_node_image::image::{ON_DEMAND_MODULES, ON_DEMAND_ORDER};

pub const CLUSTER_IP: &str = "198.18.100.20";
/// qperf's control and data ports, inside the NodePort range: the service maps each to itself.
const CONTROL_PORT: u16 = 30765;
const DATA_PORT: u16 = 30766;
const CLIENT: HostId = HostId::Pod { node: 1, index: 0 };
const EXTERNAL_CLIENT: HostId = HostId::External(1);
/// The node whose NodePort the external client uses; the server pod is on the other one.
const INGRESS_NODE: HostId = HostId::Node(1);
const SERVER: HostId = HostId::Pod { node: 2, index: 0 };

/// An alternative service proxy installed on a lab's nodes, and how to take it out again.
#[derive(Clone, Debug)]
pub struct ProxyInstalled {
    /// What went in, for the report ("iptables-legacy, 29 rules per node").
    pub detail: String,
    /// Commands that undo it, per host, run once its measurements are done.
    pub removal: Vec<(HostId, Cmd)>,
    /// A command per host whose stdout must not contain [`ProxyInstalled::gone_unless`] once
    /// the removal ran (the proof that it did).
    pub verify: Vec<(HostId, Cmd)>,
    pub gone_unless: String,
}

/// Installs an alternative service proxy on every node for the scenario's services, or says
/// exactly why it cannot (then that measurement is skipped with the reason).
pub type ProxyHook = fn(&mut dyn Lab, &Scenario, &Plan) -> Result<ProxyInstalled, String>;

/// The iptables kube-proxy emulation as a [`ProxyHook`]: kube-proxy's jump rules and a full
/// sync of the scenario's services on every node, with `iptables-legacy-restore` and kube-proxy's
/// flags; where legacy fails on any node (missing binary, table or extension), everything it
/// put in is taken out and `iptables-nft-restore` gets its turn. The error names, per flavour,
/// the node and iptables' own complaint.
pub fn kube_proxy_iptables(
    lab: &mut dyn Lab,
    scenario: &Scenario,
    plan: &Plan,
) -> Result<ProxyInstalled, String> {
    let ports = kube_proxy::from_scenario(scenario, plan);
    if ports.is_empty() {
        return Err("the scenario has no services for kube-proxy".into());
    }
    let mut proxier = Proxier::new(ProxierConfig::lab());
    let sync = proxier.full_sync(&ports);
    let jumps = kube_proxy::jump_rules_input();
    let inputs = [jumps.as_str(), sync.restore_input.as_str()];
    let jump_rules = jumps.lines().filter(|l| l.starts_with("-I ")).count();
    let nodes: Vec<HostId> = plan.nodes.iter().map(|n| n.id).collect();
    let timeout = Duration::from_secs(30) * lab.slowdown();
    let mut module_trouble = Vec::new();
    for node in &nodes {
        if let Some(why) = load_on_demand_modules(lab, *node, timeout) {
            module_trouble.push(format!("{node}: {why}"));
        }
    }
    let mut failures = Vec::new();
    for flavor in Flavor::ALL {
        match install_flavor(lab, flavor, &nodes, &inputs, timeout) {
            Ok(()) => {
                let removal = kube_proxy::removal_input(&inputs);
                return Ok(ProxyInstalled {
                    detail: format!(
                        "{flavor}, {} rules + {jump_rules} jumps per node",
                        sync.rules
                    ),
                    removal: nodes
                        .iter()
                        .map(|n| (*n, restore_cmd(flavor, &removal)))
                        .collect(),
                    verify: nodes
                        .iter()
                        .map(|n| (*n, Cmd::new(flavor.save_binary())))
                        .collect(),
                    gone_unless: "KUBE-".into(),
                });
            }
            Err(why) => failures.push(why),
        }
    }
    if !module_trouble.is_empty() {
        failures.push(format!("loading modules: {}", module_trouble.join("; ")));
    }
    Err(failures.join("; "))
}

/// On a VM node, loads the modules its image keeps for on demand ([`ON_DEMAND_ORDER`]), in
/// order; ones already loaded are fine. Returns what failed, if anything. Elsewhere (the
/// namespace backend, where nodes share the host's files and kernel) there is no such list and
/// the kernel loads what iptables asks for itself.
fn load_on_demand_modules(lab: &mut dyn Lab, node: HostId, timeout: Duration) -> Option<String> {
    let script = format!(
        "[ -f {ON_DEMAND_ORDER} ] || exit 0; while read -r m; do insmod \"$m\" 2>&1 | grep -v 'File exists' | sed \"s|^|$m: |\"; done < {ON_DEMAND_ORDER}"
    );
    match lab.exec(node, &Cmd::new("sh").arg("-c").arg(script), timeout) {
        Ok(out) if out.stdout.trim().is_empty() => None,
        Ok(out) => Some(weir_lab_core::backend::tail(out.stdout.trim(), 4)),
        Err(e) => Some(e.to_string()),
    }
}

/// `iptables-*-restore` with kube-proxy's flags and `input` on stdin.
fn restore_cmd(flavor: Flavor, input: &str) -> Cmd {
    Cmd::new(flavor.restore_binary())
        .args(Flavor::restore_args())
        .stdin(input)
}

/// Applies `inputs` in order on every node with one flavour; on the first failure takes out
/// again whatever went in (table by table, as restore commits them) and says why.
fn install_flavor(
    lab: &mut dyn Lab,
    flavor: Flavor,
    nodes: &[HostId],
    inputs: &[&str],
    timeout: Duration,
) -> Result<(), String> {
    for (i, node) in nodes.iter().enumerate() {
        for (j, input) in inputs.iter().enumerate() {
            let why = match lab.exec(*node, &restore_cmd(flavor, input), timeout) {
                Ok(out) if out.success() => continue,
                Ok(out) => restore_complaint(&out.stderr, &out.status()),
                Err(e) => e.to_string(),
            };
            // This node may hold part of input j (restore commits table by table), the
            // nodes before it all of them.
            for (k, done) in nodes[..=i].iter().enumerate() {
                let applied = if k == i { &inputs[..=j] } else { inputs };
                remove_by_table(lab, flavor, *done, applied, timeout);
            }
            return Err(format!("{} on {node}: {why}", flavor.restore_binary()));
        }
    }
    Ok(())
}

/// Best effort: each table's part of the removal on its own, so a table that never made it in
/// does not keep the other's from going.
fn remove_by_table(
    lab: &mut dyn Lab,
    flavor: Flavor,
    host: HostId,
    applied: &[&str],
    timeout: Duration,
) {
    let removal = kube_proxy::removal_input(applied);
    for table in split_tables(&removal) {
        let _ = lab.exec(host, &restore_cmd(flavor, &table), timeout);
    }
}

/// Restore input split into one input per table (`*table` ... `COMMIT`).
fn split_tables(input: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in input.lines() {
        if line.starts_with('*') {
            out.push(String::new());
        }
        if let Some(t) = out.last_mut() {
            t.push_str(line);
            t.push('\n');
        }
    }
    out
}

/// iptables-restore's complaint in one line: its error lines (it prints usage help after some),
/// or the exit status when it said nothing.
fn restore_complaint(stderr: &str, status: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.starts_with("Try `") && !l.starts_with("Perhaps iptables"))
        .take(3)
        .collect();
    if lines.is_empty() {
        format!("{status} without a message")
    } else {
        format!("{status}: {}", lines.join(" / "))
    }
}

/// Adds to a skipped kube-proxy measurement's reason the netfilter modules the node image could
/// not carry because this kernel does not build them (`missing` from the image's module set).
pub fn explain_kube_proxy_skips(ms: &mut [Measurement], missing_modules: &[String]) {
    let lacking: Vec<&str> = missing_modules
        .iter()
        .map(String::as_str)
        .filter(|m| ON_DEMAND_MODULES.contains(m))
        .collect();
    if lacking.is_empty() {
        return;
    }
    for m in ms.iter_mut().filter(|m| m.mode == Mode::KubeProxyIptables) {
        if let Some(why) = &mut m.skipped {
            why.push_str(&format!(
                " (this kernel has no module {})",
                lacking.join(", ")
            ));
        }
    }
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
    /// Segmentation offloads on the namespace lab's veths (`TopologySpec::offloads`).
    pub veth_offloads: bool,
}

fn scenario_text(mtu: u32, veth_offloads: bool) -> String {
    format!(
        r#"name = "throughput-{mtu}"
description = "qperf pod to pod, through a ClusterIP and through a NodePort"
[topology]
nodes = 2
pods_per_node = 1
externals = 1
mtu = {mtu}
offloads = {veth_offloads}
[agent]
services = {{ external_return = "ingress" }}
tunnel = {{ mode = "vxlan" }}
[[pods]]
match = "n2p0"
labels = {{ app = "qperf" }}
[[services]]
name = "qperf"
type = "NodePort"
cluster_ip = "{CLUSTER_IP}"
selector = {{ app = "qperf" }}
ports = [
  {{ name = "control", protocol = "TCP", port = {CONTROL_PORT}, target_port = {CONTROL_PORT}, node_port = {CONTROL_PORT} }},
  {{ name = "data", protocol = "TCP", port = {DATA_PORT}, target_port = {DATA_PORT}, node_port = {DATA_PORT} }},
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
                    (Route::NodePort, Mode::Weir),
                    (Route::ClusterIp, Mode::KubeProxyIptables),
                    (Route::NodePort, Mode::KubeProxyIptables),
                ] {
                    out.push(Measurement::skipped(route, mode, mtu, &why));
                }
            }
        }
    }
    out
}

fn run_mtu(
    backend: &dyn Backend,
    opts: &ThroughputOptions,
    mtu: u32,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Measurement>, String> {
    let scenario = Scenario::parse(
        &scenario_text(mtu, opts.veth_offloads),
        Path::new("throughput.toml"),
    )
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
    let node_port_ip = plan.ip(INGRESS_NODE).ok_or("no ingress node")?.to_string();
    lab.spawn(
        SERVER,
        &Cmd::new("qperf").args(["-lp", &CONTROL_PORT.to_string()]),
        &dir.join("qperf-server.log"),
    )
    .map_err(|e| e.to_string())?;
    // First contact resolves neighbours and wakes the server: not part of any measurement.
    measure(lab, plan, CLIENT, &server_ip, &mut |_| {}, "warm-up", 1)?;

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

    // Rounds alternate plain routing and Weir in the same lab (after each Weir round the agents
    // are stopped and Weir uninstalled from every node), so drift on a busy host hits both; the
    // median of each series is reported.
    let mut series: BTreeMap<(Route, Mode), Vec<Measurement>> = BTreeMap::new();
    let mut pin_root = None;
    for round in 1..=opts.rounds.max(1) {
        let tag = format!("round {round}/{}", opts.rounds.max(1));
        let mut m = measure(
            lab,
            plan,
            CLIENT,
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
            for (route, client, target, label) in [
                (
                    Route::PodToPod,
                    CLIENT,
                    server_ip.as_str(),
                    "weir pod-to-pod",
                ),
                (Route::ClusterIp, CLIENT, CLUSTER_IP, "weir clusterip"),
                (
                    Route::NodePort,
                    EXTERNAL_CLIENT,
                    node_port_ip.as_str(),
                    "weir nodeport",
                ),
            ] {
                let mut m = measure(
                    lab,
                    plan,
                    client,
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
        // A stopped agent leaves its programs forwarding (on purpose, for restarts): take Weir
        // off every node, or the next routing round and kube-proxy would still go through it.
        let uninstalled = uninstall_weir(lab, &agents);
        let measured = measured.and_then(|m| uninstalled.map(|()| m));
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
            let mut m = Measurement::median(&ms);
            m.mtu = mtu;
            m
        })
        .collect();

    let targets = [
        (Route::ClusterIp, CLIENT, CLUSTER_IP.to_owned()),
        (Route::NodePort, EXTERNAL_CLIENT, node_port_ip),
    ];
    out.extend(measure_kube_proxy(
        lab, scenario, plan, opts, mtu, &targets, progress,
    ));
    Ok(out)
}

/// kube-proxy's turn: install through the hook, `rounds` measurements of each of `targets`
/// (route, client, address), their medians, then the removal and its proof. Anything going
/// wrong skips the measurements concerned with the reason and leaves the others standing.
fn measure_kube_proxy(
    lab: &mut dyn Lab,
    scenario: &Scenario,
    plan: &Plan,
    opts: &ThroughputOptions,
    mtu: u32,
    targets: &[(Route, HostId, String)],
    progress: &mut dyn FnMut(&str),
) -> Vec<Measurement> {
    let mode = Mode::KubeProxyIptables;
    let installed = match (opts.kube_proxy)(lab, scenario, plan) {
        Ok(i) => i,
        Err(why) => {
            progress(&format!("kube-proxy mtu {mtu}: skipped: {why}"));
            return targets
                .iter()
                .map(|(route, _, _)| Measurement::skipped(*route, mode, mtu, &why))
                .collect();
        }
    };
    progress(&format!("kube-proxy mtu {mtu}: {}", installed.detail));
    let rounds = opts.rounds.max(1);
    let mut results = Vec::new();
    for (route, client, target) in targets {
        let mut series = Vec::new();
        let mut failed = None;
        for round in 1..=rounds {
            match measure(
                lab,
                plan,
                *client,
                target,
                progress,
                &format!("kube-proxy {}, round {round}/{rounds}", route.label()),
                opts.seconds,
            ) {
                Ok(m) => series.push(m),
                Err(why) => {
                    failed = Some(why);
                    break;
                }
            }
        }
        results.push((*route, failed, series));
    }
    let removed = remove_proxy(lab, &installed);
    if let Err(why) = &removed {
        progress(&format!("kube-proxy mtu {mtu}: {why}"));
    }
    results
        .into_iter()
        .map(|(route, failed, series)| {
            let mut m = match failed {
                Some(why) => Measurement::skipped(route, mode, mtu, &why),
                None => Measurement::median(&series),
            };
            m.route = route;
            m.mode = mode;
            m.mtu = mtu;
            m.detail = Some(match &removed {
                Ok(()) => installed.detail.clone(),
                Err(why) => format!("{}; {why}", installed.detail),
            });
            m
        })
        .collect()
}

/// Runs the proxy's removal on every host and checks it left nothing behind.
fn remove_proxy(lab: &mut dyn Lab, installed: &ProxyInstalled) -> Result<(), String> {
    let timeout = Duration::from_secs(30) * lab.slowdown();
    let mut problems = Vec::new();
    for (host, cmd) in &installed.removal {
        match lab.exec(*host, cmd, timeout) {
            Ok(out) if out.success() => {}
            Ok(out) => problems.push(format!(
                "removal on {host}: {}",
                restore_complaint(&out.stderr, &out.status())
            )),
            Err(e) => problems.push(format!("removal on {host}: {e}")),
        }
    }
    for (host, cmd) in &installed.verify {
        match lab.exec_ok(*host, cmd, timeout) {
            Ok(out) => {
                let left = out
                    .stdout
                    .lines()
                    .filter(|l| l.contains(&installed.gone_unless))
                    .count();
                if left > 0 {
                    problems.push(format!(
                        "{left} line(s) with {} left on {host} after the removal",
                        installed.gone_unless
                    ));
                }
            }
            Err(e) => problems.push(format!("checking the removal: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("rules not removed: {}", problems.join("; ")))
    }
}

/// `weir-agent uninstall` on every node of `agents` (stopped): unpins its links, deletes its
/// clsact filters, removes its maps.
fn uninstall_weir(lab: &mut dyn Lab, agents: &agent::Agents) -> Result<(), String> {
    let timeout = Duration::from_secs(60) * lab.slowdown();
    for a in &agents.nodes {
        let cmd = Cmd::new(agents.binary.display().to_string())
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(a.pin_dir.display().to_string());
        lab.exec_ok(a.node, &cmd, timeout)
            .map_err(|e| format!("taking Weir off {}: {e}", a.node))?;
    }
    Ok(())
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
    client: HostId,
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
            .arg("-lp")
            .arg(CONTROL_PORT.to_string())
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
            .exec(client, &qperf("tcp_bw"), timeout)
            .map_err(|e| e.to_string())?;
        if out.success() && out.stdout.contains("bw") {
            break out;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{label}: qperf tcp_bw failed ({}): {}",
                out.status(),
                weir_lab_core::backend::tail(&format!("{}{}", out.stdout, out.stderr), 4)
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
        .exec_ok(client, &qperf("tcp_lat"), timeout)
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
        detail: None,
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
        let s = Scenario::parse(&scenario_text(1440, false), Path::new("t.toml")).unwrap();
        assert_eq!(s.plan().mtu, 1440);
        assert_eq!(s.services.len(), 1);
    }

    #[test]
    fn restore_input_splits_by_table() {
        let text = kube_proxy::removal_input(&[&kube_proxy::jump_rules_input()]);
        let tables = split_tables(&text);
        assert_eq!(tables.len(), 2);
        assert!(tables[0].starts_with("*filter\n") && tables[0].ends_with("COMMIT\n"));
        assert!(tables[1].starts_with("*nat\n") && tables[1].ends_with("COMMIT\n"));
        assert_eq!(tables.concat(), text);
    }

    #[test]
    fn iptables_complaints_in_one_line() {
        let stderr = "iptables-restore v1.8.9 (legacy): Couldn't load match `statistic':No such file or directory\n\nError occurred at line: 12\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n";
        assert_eq!(
            restore_complaint(stderr, "exit 2"),
            "exit 2: iptables-restore v1.8.9 (legacy): Couldn't load match `statistic':No such file or directory / Error occurred at line: 12"
        );
        assert_eq!(
            restore_complaint("\n", "exit 1"),
            "exit 1 without a message"
        );
    }

    #[test]
    fn kube_proxy_skips_name_the_missing_modules() {
        let mut ms = vec![
            Measurement::skipped(
                Route::ClusterIp,
                Mode::KubeProxyIptables,
                1440,
                "iptables-legacy-restore on n1: exit 2",
            ),
            Measurement::skipped(Route::ClusterIp, Mode::Weir, 1440, "lab down"),
        ];
        explain_kube_proxy_skips(&mut ms, &["vxlan".into(), "xt_statistic".into()]);
        assert_eq!(
            ms[0].skipped.as_deref(),
            Some("iptables-legacy-restore on n1: exit 2 (this kernel has no module xt_statistic)")
        );
        assert_eq!(ms[1].skipped.as_deref(), Some("lab down"));
        explain_kube_proxy_skips(&mut ms, &["vxlan".into()]);
        assert!(!ms[0].skipped.as_deref().unwrap().contains("vxlan"));
    }
}
