//! Running weir-agent on every node and reading its state back through `weir-agent dump`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use weir_lab_core::backend::{tail, BackendError, Cmd, Lab, ProcId};
use weir_lab_core::scenario::{AgentSpec, ConntrackSpec, Scenario, ServicesSpec, TunnelSpec};
use weir_lab_core::topology::{HostId, NodePlan, Plan, POD_INTERFACE_PREFIX};

/// The lab's private bpffs; every run gets its own directory below it.
pub const BPFFS: &str = "/sys/fs/bpf";
const DEFAULT_POLL: Duration = Duration::from_millis(200);
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
const READY_POLL: Duration = Duration::from_millis(250);

/// The agent's configuration file, field for field (it rejects unknown keys).
#[derive(Serialize)]
struct AgentConfig<'a> {
    node_name: &'a str,
    pin_dir: &'a Path,
    state_path: &'a Path,
    host_interfaces: Vec<String>,
    pod_interface_prefix: &'a str,
    #[serde(with = "humantime_serde")]
    poll_interval: Duration,
    conntrack: &'a ConntrackSpec,
    services: &'a ServicesSpec,
    tunnel: &'a TunnelSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_services: Option<HostServices>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefilter: Option<&'a toml::Table>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failsafe: Option<&'a toml::Table>,
}

/// The agent's `[host_services]` table.
#[derive(Serialize)]
struct HostServices {
    enabled: bool,
    cgroup: PathBuf,
}

/// `networks`: how many uplinks (eth0, eth1, ...) the node has; NodePorts answer on all.
/// `cgroup`: where the node's processes run, for connect-time hooks (`spec.host_services`).
pub fn config_toml(
    node_name: &str,
    pin_dir: &Path,
    state_path: &Path,
    spec: &AgentSpec,
    networks: u8,
    cgroup: Option<&Path>,
) -> String {
    let config = AgentConfig {
        node_name,
        pin_dir,
        state_path,
        host_interfaces: (0..networks.max(1)).map(|i| format!("eth{i}")).collect(),
        pod_interface_prefix: POD_INTERFACE_PREFIX,
        poll_interval: spec.poll_interval.unwrap_or(DEFAULT_POLL),
        conntrack: &spec.conntrack,
        services: &spec.services,
        tunnel: &spec.tunnel,
        host_services: cgroup
            .filter(|_| spec.host_services)
            .map(|cgroup| HostServices {
                enabled: true,
                cgroup: cgroup.to_owned(),
            }),
        prefilter: spec.prefilter.as_ref(),
        failsafe: spec.failsafe.as_ref(),
    };
    // Paths are the lab's own (valid UTF-8) and every other field is a string or a table of them.
    toml::to_string(&config).expect("agent config serializes")
}

pub struct NodeAgent {
    pub node: HostId,
    pub proc: ProcId,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// How it was started, to start it again after a deliberate stop.
    pub cmd: Cmd,
}

/// Where every node's agent serves /metrics, /healthz and /readyz (the agent's default), each in
/// its own node namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9464";

pub struct Agents {
    pub binary: PathBuf,
    pub nodes: Vec<NodeAgent>,
    /// Everything this run pinned, removed after the run.
    pub pin_root: PathBuf,
    /// The cluster state every agent reads.
    pub state_path: PathBuf,
}

/// Writes the cluster state and one config per node, then starts an agent in every node.
pub fn start(
    lab: &mut dyn Lab,
    scenario: &Scenario,
    plan: &Plan,
    binary: &Path,
    run_dir: &Path,
    run_id: &str,
) -> Result<Agents, BackendError> {
    let state_path = run_dir.join("cluster.yaml");
    let first = plan.nodes[0].id;
    lab.write_file(
        first,
        &state_path,
        weir_lab_core::k8s::cluster_state(scenario, plan).as_bytes(),
    )?;
    let pin_root = Path::new(BPFFS).join("weir-lab").join(run_id);
    let mut agents = Agents {
        binary: binary.to_owned(),
        nodes: Vec::new(),
        pin_root,
        state_path: state_path.clone(),
    };
    for node in &plan.nodes {
        let agent = start_node(
            lab,
            node,
            binary,
            run_dir,
            &agents.pin_root,
            &state_path,
            &scenario.agent,
            plan.networks,
        )?;
        agents.nodes.push(agent);
    }
    Ok(agents)
}

/// Writes one node's agent config below `run_dir` (pins below `pin_root`, desired state at
/// `state_path`, a file or a directory) and starts the agent there.
#[allow(clippy::too_many_arguments)]
pub fn start_node(
    lab: &mut dyn Lab,
    node: &NodePlan,
    binary: &Path,
    run_dir: &Path,
    pin_root: &Path,
    state_path: &Path,
    spec: &AgentSpec,
    networks: u8,
) -> Result<NodeAgent, BackendError> {
    let pin_dir = pin_root.join(&node.name);
    lab.exec_ok(
        node.id,
        &Cmd::new("mkdir")
            .arg("-p")
            .arg(pin_dir.display().to_string()),
        DUMP_TIMEOUT,
    )?;
    let cgroup = lab.node_cgroup(node.index);
    if spec.host_services && cgroup.is_none() {
        return Err(BackendError::Io {
            context: format!("{}: host services", node.name),
            source: std::io::Error::other(
                "this backend gives nodes no cgroup of their own for connect-time hooks",
            ),
        });
    }
    let config_path = run_dir.join(format!("agent-{}.toml", node.name));
    let config = config_toml(
        &node.name,
        &pin_dir,
        state_path,
        spec,
        networks,
        cgroup.as_deref(),
    );
    lab.write_file(node.id, &config_path, config.as_bytes())?;
    let log = run_dir.join(format!("agent-{}.log", node.name));
    let cmd = Cmd::new(binary.display().to_string())
        .arg("run")
        .arg("--config")
        .arg(config_path.display().to_string())
        // Its log is a file meant for people: no terminal colour codes in it.
        .env("NO_COLOR", "1");
    let proc = lab.spawn(node.id, &cmd, &log)?;
    Ok(NodeAgent {
        node: node.id,
        proc,
        pin_dir,
        log,
        cmd,
    })
}

/// Runs `weir-agent dump <what> --json` against one node's pinned maps.
pub fn dump(
    lab: &mut dyn Lab,
    binary: &Path,
    agent: &NodeAgent,
    what: &str,
) -> Result<String, String> {
    let cmd = Cmd::new(binary.display().to_string())
        .arg("dump")
        .arg(what)
        .arg("--pin-dir")
        .arg(agent.pin_dir.display().to_string())
        .arg("--json");
    let timeout = DUMP_TIMEOUT * lab.slowdown();
    let out = lab
        .exec(agent.node, &cmd, timeout)
        .map_err(|e| e.to_string())?;
    if !out.success() {
        return Err(format!(
            "`{cmd}` on {}: {}: {}",
            agent.node,
            out.status(),
            tail(&out.stderr, 3)
        ));
    }
    Ok(out.stdout)
}

/// One row of `dump services --json`. Lenient on purpose: extra fields are fine.
#[derive(Debug, Deserialize)]
pub struct DumpedService {
    pub frontend: String,
    pub proto: String,
    #[serde(default)]
    pub backend_count: Option<usize>,
    #[serde(default)]
    pub backends: Vec<String>,
}

/// Every frontend ("ip:port", proto) the agents must program, with its number of endpoints.
/// Services without endpoints are left out: whether an agent lists them is its own business.
pub fn expected_frontends(
    scenario: &Scenario,
    endpoints: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<(String, &'static str), usize> {
    let mut out = BTreeMap::new();
    // Another proxy's, headless and ExternalName Services have no frontend to wait for.
    for svc in scenario.services.iter().filter(|s| s.served()) {
        let n = endpoints.get(&svc.name).map_or(0, Vec::len);
        if n == 0 {
            continue;
        }
        for ip in svc.cluster_ips() {
            for p in &svc.ports {
                let frontend = std::net::SocketAddr::new(ip, p.port).to_string();
                out.insert((frontend, p.protocol.lower()), n);
            }
        }
    }
    out
}

/// What is missing from one node's programmed services.
fn missing(
    expected: &BTreeMap<(String, &'static str), usize>,
    dumped: &[DumpedService],
) -> Vec<String> {
    let seen: BTreeMap<(&str, &str), usize> = dumped
        .iter()
        .map(|d| {
            let count = d.backend_count.unwrap_or(d.backends.len());
            ((d.frontend.as_str(), d.proto.as_str()), count)
        })
        .collect();
    expected
        .iter()
        .filter_map(
            |((frontend, proto), want)| match seen.get(&(frontend.as_str(), *proto)) {
                None => Some(format!("{frontend}/{proto} absent")),
                Some(got) if got != want => Some(format!(
                    "{frontend}/{proto} has {got} backends, want {want}"
                )),
                Some(_) => None,
            },
        )
        .collect()
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => {
            format!("; last lines of {}:\n{}", path.display(), tail(&text, 15))
        }
        _ => format!("; its log {} is empty", path.display()),
    }
}

/// Polls every node's `dump services` until all expected frontends are there; fails early, with
/// the log's tail, if an agent exits.
pub fn wait_ready(
    lab: &mut dyn Lab,
    agents: &Agents,
    expected: &BTreeMap<(String, &'static str), usize>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut waiting: BTreeSet<usize> = (0..agents.nodes.len()).collect();
    let mut last_problem: BTreeMap<usize, String> = BTreeMap::new();
    loop {
        for i in waiting.clone() {
            let agent = &agents.nodes[i];
            match lab.exited(agent.proc) {
                Ok(Some(how)) => {
                    return Err(format!(
                        "the agent on {} {how}{}",
                        agent.node,
                        log_tail(&agent.log)
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let problem = match dump(lab, &agents.binary, agent, "services") {
                Err(e) => e,
                Ok(json) => match serde_json::from_str::<Vec<DumpedService>>(&json) {
                    Err(e) => format!(
                        "unreadable `dump services` output ({e}): {}",
                        tail(&json, 3)
                    ),
                    Ok(dumped) => {
                        let m = missing(expected, &dumped);
                        if m.is_empty() {
                            waiting.remove(&i);
                            continue;
                        }
                        m.join(", ")
                    }
                },
            };
            last_problem.insert(i, problem);
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let details: Vec<String> = waiting
                .iter()
                .map(|i| {
                    let a = &agents.nodes[*i];
                    format!(
                        "{}: {} (log: {})",
                        a.node,
                        last_problem.get(i).map_or("no answer", String::as_str),
                        a.log.display()
                    )
                })
                .collect();
            return Err(format!(
                "agents not ready after {}: {}",
                humantime::format_duration(timeout),
                details.join("; ")
            ));
        }
        std::thread::sleep(READY_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_only_known_keys() {
        let spec = AgentSpec {
            conntrack: ConntrackSpec {
                gc_interval: Some(Duration::from_secs(1)),
                udp_timeout: Some(Duration::from_secs(3)),
                ..ConntrackSpec::default()
            },
            ..AgentSpec::default()
        };
        let text = config_toml(
            "node1",
            Path::new("/sys/fs/bpf/weir-lab/r/node1"),
            Path::new("/run/cluster.yaml"),
            &spec,
            2,
            Some(Path::new("/sys/fs/cgroup/weir-lab/x/node1")),
        );
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["node_name"].as_str(), Some("node1"));
        assert_eq!(v["pin_dir"].as_str(), Some("/sys/fs/bpf/weir-lab/r/node1"));
        assert_eq!(v["state_path"].as_str(), Some("/run/cluster.yaml"));
        let uplinks: Vec<&str> = v["host_interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap())
            .collect();
        assert_eq!(uplinks, ["eth0", "eth1"]);
        assert!(!v.contains_key("services") || v["services"].as_table().unwrap().is_empty());
        assert!(
            !v.contains_key("host_services"),
            "hooks only when the scenario asks"
        );
        assert_eq!(v["pod_interface_prefix"].as_str(), Some("wp"));
        assert_eq!(v["poll_interval"].as_str(), Some("200ms"));
        let ct = v["conntrack"].as_table().unwrap();
        assert_eq!(ct["gc_interval"].as_str(), Some("1s"));
        assert_eq!(ct["udp_timeout"].as_str(), Some("3s"));
        assert_eq!(
            ct.len(),
            2,
            "unset timeouts are left to the agent's defaults: {text}"
        );
    }

    #[test]
    fn readiness_compares_frontends_and_counts() {
        let expected = BTreeMap::from([
            (("198.18.100.10:80".to_owned(), "tcp"), 3),
            (("198.18.100.10:53".to_owned(), "udp"), 3),
        ]);
        let dumped: Vec<DumpedService> = serde_json::from_str(
            r#"[{"frontend":"198.18.100.10:80","proto":"tcp","service_id":1,"backend_count":3,"backends":[]},
                {"frontend":"198.18.100.10:53","proto":"udp","service_id":2,"backend_count":2}]"#,
        )
        .unwrap();
        assert_eq!(
            missing(&expected, &dumped),
            ["198.18.100.10:53/udp has 2 backends, want 3"]
        );
        assert_eq!(missing(&expected, &dumped[..0]).len(), 2);
    }
}
