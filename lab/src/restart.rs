//! Agent restarts under load: a long iperf3 transfer runs through a service while the agent on
//! the client's node is stopped (SIGTERM, SIGKILL) and started again. The pinned maps and links
//! must keep the transfer going, and fresh connections must be answered while no agent runs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use weir_lab_cluster::agent::{self, Agents, DumpedService, METRICS_ADDR};
use weir_lab_core::backend::{tail, Cmd, Lab};
use weir_lab_core::scenario::{AgentRestartSpec, Scenario, StopSignal};
use weir_lab_core::topology::{HostId, Plan};

const EXEC_TIMEOUT: Duration = Duration::from_secs(8);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// For a restarted agent to be ready or to have programmed its frontend: times the lab's
/// slowdown, since a TCG guest verifies and loads the programs while the transfer keeps its
/// vCPU busy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(200);
/// Fresh connections tried while the agent is down, each time.
const PROBES: u32 = 5;
/// The transfer is let run this long before the first stop, and after the last restart.
const SETTLE: Duration = Duration::from_secs(2);

/// `state` is the cluster state as the scenario stands (after its steps, if any): the bulk
/// service is added to it.
pub fn run(
    lab: &mut dyn Lab,
    plan: &Plan,
    scenario: &Scenario,
    state: &str,
    agents: &mut Agents,
    spec: &AgentRestartSpec,
    run_dir: &Path,
) -> Result<String, String> {
    // Names were validated with the scenario.
    let node = plan.host(&spec.node).ok_or("unknown node")?;
    let client = plan.host(&spec.from).ok_or("unknown client")?;
    let server = plan.host(&spec.to).ok_or("unknown server")?;
    let server_ip = plan.ip(server).ok_or("server without an address")?;
    let index = agents
        .nodes
        .iter()
        .position(|a| a.node == node)
        .ok_or("no agent on that node")?;

    // The bulk service: the scenario's state plus one Service and its EndpointSlice.
    let state = format!("{state}{}", bulk_objects(spec, server_ip));
    lab.write_file(node, &agents.state_path, state.as_bytes())
        .map_err(|e| e.to_string())?;
    let server_log = run_dir.join(format!("iperf3-server-{}.log", spec.to));
    let iperf_server = lab
        .spawn(
            server,
            &Cmd::new("iperf3")
                .arg("-s")
                .arg("-p")
                .arg(spec.port.to_string()),
            &server_log,
        )
        .map_err(|e| e.to_string())?;
    let probe_target = match (&spec.probe_service, spec.probe_port) {
        (Some(service), Some(port)) => Some((
            scenario
                .service(service)
                .ok_or("unknown probe service")?
                .cluster_ip
                .ok_or("the probe service has no IPv4 cluster IP")?,
            port,
        )),
        _ => None,
    };
    let outcome = transfer_across_restarts(lab, agents, index, spec, client, probe_target, run_dir);
    let _ = lab.stop(iperf_server);
    outcome
}

fn transfer_across_restarts(
    lab: &mut dyn Lab,
    agents: &mut Agents,
    index: usize,
    spec: &AgentRestartSpec,
    client: HostId,
    probe_target: Option<(Ipv4Addr, u16)>,
    run_dir: &Path,
) -> Result<String, String> {
    wait_programmed(lab, agents, index, spec)?;

    let client_log = run_dir.join(format!("iperf3-client-{}.json", spec.from));
    let secs = spec.duration.as_secs().max(1);
    let started = Instant::now();
    let iperf_client = lab
        .spawn(
            client,
            &Cmd::new("iperf3")
                .arg("-c")
                .arg(spec.cluster_ip.to_string())
                .arg("-p")
                .arg(spec.port.to_string())
                .arg("-t")
                .arg(secs.to_string())
                .arg("-b")
                .arg(format!("{}M", spec.rate_mbit))
                .arg("-i")
                .arg("0.5")
                .arg("--connect-timeout")
                .arg("3000")
                .arg("--json"),
            &client_log,
        )
        .map_err(|e| e.to_string())?;
    std::thread::sleep(SETTLE);

    let mut probes_answered = 0;
    let mut probes_sent = 0;
    let mut adopted = 0;
    for signal in &spec.signals {
        stop_agent(lab, agents, index, *signal)?;

        if let Some((ip, port)) = probe_target {
            for _ in 0..PROBES {
                probes_sent += 1;
                if probe(lab, client, ip, port) {
                    probes_answered += 1;
                }
            }
        }
        std::thread::sleep(spec.down_for);

        if start_again(lab, agents, index)? {
            adopted += 1;
        }
        std::thread::sleep(SETTLE);
    }

    let deadline = started + spec.duration + Duration::from_secs(15);
    let exit = loop {
        match lab.exited(iperf_client).map_err(|e| e.to_string())? {
            Some(how) => break how,
            None if Instant::now() > deadline => {
                let _ = lab.stop(iperf_client);
                return Err(format!(
                    "iperf3 still running {} after it should have ended",
                    humantime::format_duration(Duration::from_secs(15))
                ));
            }
            None => std::thread::sleep(POLL),
        }
    };
    let _ = lab.stop(iperf_client);
    let output = std::fs::read_to_string(&client_log).unwrap_or_default();
    let report = parse_iperf(&output)?;

    let stops: Vec<&str> = spec.signals.iter().map(|s| s.name()).collect();
    let mut problems = Vec::new();
    if !exit.contains("status 0") {
        problems.push(format!("iperf3 {exit}"));
    }
    if let Some(error) = &report.error {
        problems.push(format!("iperf3: {error}"));
    }
    if report.stalled_intervals > 0 {
        problems.push(format!(
            "{} half-second interval(s) moved no data",
            report.stalled_intervals
        ));
    }
    if probes_answered < probes_sent {
        problems.push(format!(
            "{probes_answered}/{probes_sent} new connections answered while the agent was down"
        ));
    }
    if adopted < spec.signals.len() {
        problems.push(format!(
            "the restarted agent adopted the attached programs {adopted} of {} times",
            spec.signals.len()
        ));
    }
    let account = format!(
        "iperf3 {:.1} s through {}:{}: {:.1} MB, slowest half-second {:.0} Mbit/s; agent \
         stopped by {} and restarted, {adopted} adoption(s) of attached programs; {probes_answered}/{probes_sent} \
         new connections answered with no agent",
        report.seconds,
        spec.cluster_ip,
        spec.port,
        report.bytes as f64 / 1e6,
        report.slowest_bps / 1e6,
        stops.join(", then "),
    );
    if problems.is_empty() {
        Ok(format!("{account}; 0 failed connections"))
    } else {
        Err(format!("{}; {account}", problems.join("; ")))
    }
}

/// Stops the node's agent by `signal` and waits for it to exit.
pub fn stop_agent(
    lab: &mut dyn Lab,
    agents: &Agents,
    index: usize,
    signal: StopSignal,
) -> Result<(), String> {
    // The backend knows the agent's own PID, on the host or inside a guest.
    lab.signal(agents.nodes[index].proc, signal.signal())
        .map_err(|e| e.to_string())?;
    wait_exit(lab, agents, index)?;
    let _ = lab.stop(agents.nodes[index].proc);
    Ok(())
}

/// Starts a stopped agent again with its own command line and waits until it is ready; true
/// if it adopted the programs its predecessor attached.
pub fn start_again(lab: &mut dyn Lab, agents: &mut Agents, index: usize) -> Result<bool, String> {
    let agent = &agents.nodes[index];
    let log_len = std::fs::metadata(&agent.log).map_or(0, |m| m.len() as usize);
    let proc = lab
        .spawn(agent.node, &agent.cmd, &agent.log)
        .map_err(|e| e.to_string())?;
    agents.nodes[index].proc = proc;
    wait_ready(lab, agents, index)?;
    let log = std::fs::read_to_string(&agents.nodes[index].log).unwrap_or_default();
    let fresh = log.get(log_len..).unwrap_or("");
    // TCX kernels (6.6+) keep the programs on pinned links; older ones on clsact filters,
    // which outlive the agent by themselves and get their program replaced in place.
    Ok(ADOPTION_LINES.iter().any(|line| fresh.contains(line)))
}

/// One fresh HTTP connection through a service; true if answered.
fn probe(lab: &mut dyn Lab, from: HostId, ip: Ipv4Addr, port: u16) -> bool {
    let cmd = Cmd::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("3")
        .arg(format!("http://{ip}:{port}/"));
    lab.exec(from, &cmd, EXEC_TIMEOUT)
        .is_ok_and(|out| out.success() && out.stdout.starts_with("pod="))
}

fn wait_programmed(
    lab: &mut dyn Lab,
    agents: &Agents,
    index: usize,
    spec: &AgentRestartSpec,
) -> Result<(), String> {
    let frontend = format!("{}:{}", spec.cluster_ip, spec.port);
    let deadline = Instant::now() + READY_TIMEOUT * lab.slowdown();
    loop {
        let json = agent::dump(lab, &agents.binary, &agents.nodes[index], "services")?;
        let programmed = serde_json::from_str::<Vec<DumpedService>>(&json)
            .map_err(|e| e.to_string())?
            .iter()
            .any(|d| d.frontend == frontend && d.backend_count.unwrap_or(d.backends.len()) == 1);
        if programmed {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{frontend} was not programmed in time"));
        }
        std::thread::sleep(POLL);
    }
}

/// What the agent logs when it takes over programs a previous agent attached.
const ADOPTION_LINES: [&str; 2] = [
    "adopted pinned link",
    "replaced the program of the existing clsact filter",
];

fn wait_exit(lab: &mut dyn Lab, agents: &Agents, index: usize) -> Result<(), String> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if lab
            .exited(agents.nodes[index].proc)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the agent did not exit on its signal".into());
        }
        std::thread::sleep(POLL);
    }
}

/// Polls the restarted agent's `/readyz` in its node until 200.
fn wait_ready(lab: &mut dyn Lab, agents: &Agents, index: usize) -> Result<(), String> {
    let agent = &agents.nodes[index];
    let cmd = Cmd::new("curl")
        .arg("-s")
        .arg("-o")
        .arg("/dev/null")
        .arg("-w")
        .arg("%{http_code}")
        .arg("--max-time")
        .arg("1")
        .arg(format!("http://{METRICS_ADDR}/readyz"));
    let deadline = Instant::now() + READY_TIMEOUT * lab.slowdown();
    let mut last: String;
    loop {
        if let Some(how) = lab.exited(agent.proc).map_err(|e| e.to_string())? {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            return Err(format!("the restarted agent {how}: {}", tail(&log, 5)));
        }
        match lab.exec(agent.node, &cmd, EXEC_TIMEOUT) {
            Ok(out) if out.stdout.trim() == "200" => return Ok(()),
            Ok(out) => last = out.stdout,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the restarted agent was not ready in time (last /readyz: {last})"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// What the iperf3 client's JSON report says.
#[derive(Debug, Default, PartialEq)]
pub struct IperfReport {
    pub seconds: f64,
    pub bytes: u64,
    pub slowest_bps: f64,
    pub stalled_intervals: usize,
    pub error: Option<String>,
}

pub fn parse_iperf(output: &str) -> Result<IperfReport, String> {
    let start = output
        .find('{')
        .ok_or_else(|| format!("no iperf3 report: {}", tail(output, 3)))?;
    let json: serde_json::Value = serde_json::from_str(&output[start..])
        .map_err(|e| format!("unreadable iperf3 report ({e}): {}", tail(output, 3)))?;
    let intervals = json["intervals"].as_array().cloned().unwrap_or_default();
    let rates: Vec<(f64, f64)> = intervals
        .iter()
        .map(|i| {
            (
                i["sum"]["seconds"].as_f64().unwrap_or(0.0),
                i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0),
            )
        })
        // iperf3 may end with a sliver of an interval; judge full ones only.
        .filter(|(secs, _)| *secs > 0.25)
        .collect();
    Ok(IperfReport {
        seconds: json["end"]["sum_received"]["seconds"]
            .as_f64()
            .unwrap_or(0.0),
        bytes: json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0),
        slowest_bps: rates.iter().map(|r| r.1).fold(f64::INFINITY, f64::min),
        stalled_intervals: rates.iter().filter(|r| r.1 == 0.0).count(),
        error: json["error"].as_str().map(str::to_owned),
    })
}

/// A Service and its EndpointSlice for the bulk transfer, as YAML documents.
fn bulk_objects(spec: &AgentRestartSpec, server_ip: Ipv4Addr) -> String {
    let name = "weir-lab-bulk";
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {ip}\n  clusterIPs: [\"{ip}\"]\n  ports:\n  \
         - {{name: iperf, protocol: TCP, port: {port}, targetPort: {port}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports:\n- {{name: iperf, protocol: TCP, port: {port}}}\n\
         endpoints:\n- addresses: [\"{server_ip}\"]\n  conditions: {{ready: true}}\n",
        ip = spec.cluster_ip,
        port = spec.port,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf3_reports() {
        let report = parse_iperf(
            r#"{"start":{},"intervals":[
                {"sum":{"seconds":0.5,"bits_per_second":2.0e8}},
                {"sum":{"seconds":0.5,"bits_per_second":1.0e8}},
                {"sum":{"seconds":0.01,"bits_per_second":0}}],
              "end":{"sum_received":{"seconds":1.0,"bytes":18750000}}}"#,
        )
        .unwrap();
        assert_eq!(report.bytes, 18_750_000);
        assert_eq!(report.slowest_bps, 1.0e8);
        assert_eq!(report.stalled_intervals, 0);
        assert_eq!(report.error, None);
        let failed = parse_iperf(
            r#"{"intervals":[],"end":{},"error":"control socket has closed unexpectedly"}"#,
        )
        .unwrap();
        assert!(failed.error.unwrap().contains("closed"));
        assert!(parse_iperf("iperf3: error").is_err());
    }

    #[test]
    fn the_bulk_service_is_kubernetes_yaml() {
        let spec: AgentRestartSpec = toml::from_str(
            "node = \"node1\"\nfrom = \"n1p0\"\nto = \"n2p0\"\ncluster_ip = \"198.18.100.20\"\nduration = \"10s\"\nsignals = [\"TERM\", \"KILL\"]\n",
        )
        .unwrap();
        let yaml = bulk_objects(&spec, "198.19.2.10".parse().unwrap());
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_yaml::Value| !v.is_null())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["spec"]["clusterIP"].as_str(), Some("198.18.100.20"));
        assert_eq!(
            docs[1]["endpoints"][0]["addresses"][0].as_str(),
            Some("198.19.2.10")
        );
        assert_eq!(spec.port, 5201);
    }
}
