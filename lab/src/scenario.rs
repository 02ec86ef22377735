//! The scenario file: a TOML description of a small cluster, its services and the checks to run.
//!
//! Services are Kubernetes-shaped on purpose: the lab turns them into the same Service and
//! EndpointSlice objects a real control plane would hand the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::{HostId, Plan};

/// Loops in checks are bounded by this, so a typo cannot make a run last for hours.
pub const MAX_REQUESTS: u32 = 1000;
pub const MAX_NODES: u8 = 50;
pub const MAX_PODS_PER_NODE: u8 = 200;
pub const MAX_EXTERNALS: u8 = 50;
/// Upper bound for every wait a scenario configures.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("scenario {scenario}: {message}")]
    Invalid { scenario: String, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Suites this scenario belongs to; `weir-lab suite` runs the "default" one.
    #[serde(default)]
    pub suite: Vec<String>,
    pub topology: TopologySpec,
    #[serde(default)]
    pub agent: AgentSpec,
    #[serde(default)]
    pub pods: Vec<PodRule>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// Agent stops and restarts under load, run after the checks.
    #[serde(default)]
    pub agent_restarts: Vec<AgentRestartSpec>,
}

/// Stops a node's agent (by each signal in turn) and starts it again while a long iperf3
/// transfer runs through a service on that node: the transfer must not fail, and new connections
/// must be answered while no agent runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRestartSpec {
    #[serde(default)]
    pub name: Option<String>,
    /// The node whose agent is stopped: the client's, where the service is translated.
    pub node: String,
    /// The iperf3 client pod...
    pub from: String,
    /// ...and the server pod, behind a service this action adds to the cluster state.
    pub to: String,
    pub cluster_ip: Ipv4Addr,
    #[serde(default = "default_bulk_port")]
    pub port: u16,
    /// Length of the transfer (iperf3 -t).
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Bounded rate (iperf3 -b, Mbit/s), so the transfer leaves the machine usable.
    #[serde(default = "default_rate_mbit")]
    pub rate_mbit: u32,
    /// Each stop in turn: "TERM" or "KILL".
    pub signals: Vec<StopSignal>,
    /// How long the node stays without an agent each time.
    #[serde(default = "default_down_for", with = "humantime_serde")]
    pub down_for: Duration,
    /// A scenario service to open fresh connections to while the agent is down.
    #[serde(default)]
    pub probe_service: Option<String>,
    #[serde(default)]
    pub probe_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum StopSignal {
    #[serde(rename = "TERM")]
    Term,
    #[serde(rename = "KILL")]
    Kill,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Kill => "KILL",
        }
    }
}

fn default_bulk_port() -> u16 {
    5201
}

fn default_rate_mbit() -> u32 {
    200
}

fn default_down_for() -> Duration {
    Duration::from_secs(1)
}

impl AgentRestartSpec {
    pub fn title(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let stops: Vec<&str> = self.signals.iter().map(|s| s.name()).collect();
            format!(
                "agent {} restart on {} under iperf3 {} -> {}",
                stops.join("+"),
                self.node,
                self.from,
                self.to
            )
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    pub nodes: u8,
    #[serde(default)]
    pub pods_per_node: u8,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Client machines outside the cluster, on the node network.
    #[serde(default)]
    pub externals: u8,
}

fn default_mtu() -> u32 {
    1500
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// A baseline scenario can run without any agent, to show the plumbing itself works.
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    /// How long every node's agent gets to program all expected frontends.
    #[serde(default = "default_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    #[serde(default)]
    pub conntrack: ConntrackSpec,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            enabled: true,
            poll_interval: None,
            ready_timeout: default_ready_timeout(),
            conntrack: ConntrackSpec::default(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(15)
}

/// Mirrors the agent's `[conntrack]` table key for key; unknown keys are rejected here already
/// because the agent would reject them too, and a scenario error is easier to read.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConntrackSpec {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub gc_interval: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tcp_syn_timeout: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tcp_established_timeout: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tcp_closing_timeout: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub udp_timeout: Option<Duration>,
}

/// Labels and extra servers for the pods whose name matches `match` (`*` is a wildcard).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRule {
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports served by nginx even when no service targets them (pod-to-pod checks).
    #[serde(default)]
    pub http_ports: Vec<u16>,
    #[serde(default)]
    pub udp_ports: Vec<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// Like Kubernetes, an empty selector selects nothing: such a service has no endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    /// Defaults to `port`, as in Kubernetes.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    #[serde(rename = "UDP", alias = "udp")]
    Udp,
}

impl Protocol {
    /// The spelling the agent's dumps use.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckSpec {
    /// HTTP requests with curl; nginx answers with its pod name and the client address it saw.
    Http(TrafficCheck),
    /// One datagram per request with socat; the echo server answers like nginx.
    Udp(TrafficCheck),
    /// The agent's connection tracking table on one node: entries exist for fresh flows and are
    /// reclaimed once those flows are over.
    Conntrack(ConntrackCheck),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficCheck {
    #[serde(default)]
    pub name: Option<String>,
    /// The client host: a pod (`n1p0`), node (`node1`) or external client (`x1`).
    pub from: String,
    /// Target a service's cluster IP and service port...
    #[serde(default)]
    pub service: Option<String>,
    /// ...or a pod's own IP and a port it serves.
    #[serde(default)]
    pub pod: Option<String>,
    pub port: u16,
    #[serde(default = "default_requests")]
    pub requests: u32,
    #[serde(default)]
    pub expect: TrafficExpect,
}

fn default_requests() -> u32 {
    10
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficExpect {
    pub all_answered: bool,
    /// Every endpoint of the service answered at least once.
    pub all_backends_used: bool,
    /// Every answer shows the client's own address: no SNAT on the way. Answers from the client
    /// pod itself (hairpin) are exempt, as kube-proxy masquerades those too.
    pub client_ip_preserved: bool,
}

impl Default for TrafficExpect {
    fn default() -> Self {
        TrafficExpect {
            all_answered: true,
            all_backends_used: false,
            client_ip_preserved: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackCheck {
    #[serde(default)]
    pub name: Option<String>,
    /// The pod whose flows are tracked; the check opens one flow per service port itself so the
    /// entries are fresh whatever ran before.
    pub from: String,
    pub service: String,
    /// Whose table to read; defaults to the client's node, where the service translation happens.
    #[serde(default)]
    pub node: Option<String>,
    /// If set, the entries of these finished flows must be gone within this time.
    #[serde(default, with = "humantime_serde")]
    pub reclaimed_within: Option<Duration>,
}

impl CheckSpec {
    /// A readable one-line name for reports.
    pub fn title(&self) -> String {
        match self {
            CheckSpec::Http(t) | CheckSpec::Udp(t) => {
                if let Some(name) = &t.name {
                    return name.clone();
                }
                let kind = if matches!(self, CheckSpec::Http(_)) {
                    "http"
                } else {
                    "udp"
                };
                let target = t.service.as_deref().or(t.pod.as_deref()).unwrap_or("?");
                format!("{kind} {} -> {target}:{} x{}", t.from, t.port, t.requests)
            }
            CheckSpec::Conntrack(c) => c.name.clone().unwrap_or_else(|| {
                let node = c.node.as_deref().unwrap_or("client node");
                match c.reclaimed_within {
                    Some(within) => format!(
                        "conntrack {} -> {} on {node}, reclaimed within {}",
                        c.from,
                        c.service,
                        humantime::format_duration(within)
                    ),
                    None => format!("conntrack {} -> {} on {node}", c.from, c.service),
                }
            }),
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Scenario::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn plan(&self) -> Plan {
        Plan::new(
            self.topology.nodes,
            self.topology.pods_per_node,
            self.topology.externals,
            self.topology.mtu,
        )
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    fn invalid(&self, message: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            scenario: self.name.clone(),
            message: message.into(),
        }
    }

    /// Catches every dangling reference before anything is built, so a typo costs milliseconds.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.invalid("name must be non-empty and only letters, digits, - and _"));
        }
        let t = &self.topology;
        if t.nodes == 0 || t.nodes > MAX_NODES {
            return Err(self.invalid(format!("topology.nodes must be 1..={MAX_NODES}")));
        }
        if t.pods_per_node > MAX_PODS_PER_NODE {
            return Err(self.invalid(format!(
                "topology.pods_per_node must be at most {MAX_PODS_PER_NODE}"
            )));
        }
        if t.externals > MAX_EXTERNALS {
            return Err(self.invalid(format!(
                "topology.externals must be at most {MAX_EXTERNALS}"
            )));
        }
        if !(576..=65535).contains(&t.mtu) {
            return Err(self.invalid("topology.mtu must be 576..=65535"));
        }
        if self.agent.ready_timeout > MAX_WAIT {
            return Err(self.invalid("agent.ready_timeout must be at most 10m"));
        }
        let plan = self.plan();

        for rule in &self.pods {
            if !plan.pods.iter().any(|p| glob_match(&rule.pattern, &p.name)) {
                return Err(
                    self.invalid(format!("[[pods]] match {:?} matches no pod", rule.pattern))
                );
            }
            if rule
                .http_ports
                .iter()
                .chain(&rule.udp_ports)
                .any(|p| *p == 0)
            {
                return Err(self.invalid("[[pods]] ports must be non-zero"));
            }
        }

        let mut names = BTreeSet::new();
        let mut frontends = BTreeSet::new();
        for svc in &self.services {
            if !names.insert(svc.name.as_str()) {
                return Err(self.invalid(format!("service {} defined twice", svc.name)));
            }
            if !crate::topology::is_test_address(svc.cluster_ip) {
                return Err(self.invalid(format!(
                    "service {}: cluster_ip {} is outside 198.18.0.0/15, the only range lab traffic may use",
                    svc.name, svc.cluster_ip
                )));
            }
            if svc.ports.is_empty() {
                return Err(self.invalid(format!("service {} has no ports", svc.name)));
            }
            let mut port_names = BTreeSet::new();
            for p in &svc.ports {
                if p.port == 0 || p.target() == 0 {
                    return Err(
                        self.invalid(format!("service {}: ports must be non-zero", svc.name))
                    );
                }
                // Kubernetes matches EndpointSlice ports to service ports by name.
                if svc.ports.len() > 1 && p.name.is_empty() {
                    return Err(self.invalid(format!(
                        "service {}: every port needs a name when there are several",
                        svc.name
                    )));
                }
                if !port_names.insert(p.name.as_str()) {
                    return Err(self.invalid(format!(
                        "service {}: port name {:?} used twice",
                        svc.name, p.name
                    )));
                }
                if !frontends.insert((svc.cluster_ip, p.port, p.protocol)) {
                    return Err(self.invalid(format!(
                        "service {}: {}:{}/{} is already another service's frontend",
                        svc.name,
                        svc.cluster_ip,
                        p.port,
                        p.protocol.lower()
                    )));
                }
            }
        }

        for check in &self.checks {
            self.validate_check(check, &plan)?;
        }
        for restart in &self.agent_restarts {
            self.validate_restart(restart, &plan, &frontends)?;
        }
        Ok(())
    }

    fn validate_restart(
        &self,
        r: &AgentRestartSpec,
        plan: &Plan,
        frontends: &BTreeSet<(Ipv4Addr, u16, Protocol)>,
    ) -> Result<(), ScenarioError> {
        let title = r.title();
        let bad = |m: String| self.invalid(format!("agent restart {title:?}: {m}"));
        if !self.agent.enabled {
            return Err(bad("needs the agent, which is disabled".into()));
        }
        if !matches!(plan.host(&r.node), Some(HostId::Node(_))) {
            return Err(bad(format!("{:?} is not a node", r.node)));
        }
        for pod in [&r.from, &r.to] {
            if !matches!(plan.host(pod), Some(HostId::Pod { .. })) {
                return Err(bad(format!("{pod:?} is not a pod")));
            }
        }
        if !crate::topology::is_test_address(r.cluster_ip) {
            return Err(bad("cluster_ip must be in 198.18.0.0/15".into()));
        }
        if r.port == 0 || frontends.contains(&(r.cluster_ip, r.port, Protocol::Tcp)) {
            return Err(bad("port must be non-zero and not another service's".into()));
        }
        if r.signals.is_empty() {
            return Err(bad("give at least one signal".into()));
        }
        if r.duration.is_zero() || r.duration > MAX_WAIT || r.down_for > MAX_WAIT {
            return Err(bad("duration and down_for must be at most 10m".into()));
        }
        if r.rate_mbit == 0 {
            return Err(bad("rate_mbit must be positive".into()));
        }
        if let Some(svc) = &r.probe_service {
            let svc = self
                .service(svc)
                .ok_or_else(|| bad(format!("no service {svc:?}")))?;
            let port = r
                .probe_port
                .ok_or_else(|| bad("probe_port missing".into()))?;
            if !svc
                .ports
                .iter()
                .any(|p| p.port == port && p.protocol == Protocol::Tcp)
            {
                return Err(bad(format!("service {} has no TCP port {port}", svc.name)));
            }
        }
        Ok(())
    }

    fn validate_check(&self, check: &CheckSpec, plan: &Plan) -> Result<(), ScenarioError> {
        let title = check.title();
        let host = |name: &str| -> Result<HostId, ScenarioError> {
            plan.host(name)
                .ok_or_else(|| self.invalid(format!("check {title:?}: no host named {name:?}")))
        };
        match check {
            CheckSpec::Http(t) | CheckSpec::Udp(t) => {
                let proto = if matches!(check, CheckSpec::Http(_)) {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                host(&t.from)?;
                if t.requests == 0 || t.requests > MAX_REQUESTS {
                    return Err(self.invalid(format!(
                        "check {title:?}: requests must be 1..={MAX_REQUESTS}"
                    )));
                }
                match (&t.service, &t.pod) {
                    (Some(svc), None) => {
                        let svc = self.service(svc).ok_or_else(|| {
                            self.invalid(format!("check {title:?}: no service {svc:?}"))
                        })?;
                        if !svc
                            .ports
                            .iter()
                            .any(|p| p.port == t.port && p.protocol == proto)
                        {
                            return Err(self.invalid(format!(
                                "check {title:?}: service {} has no {} port {}",
                                svc.name,
                                proto.lower(),
                                t.port
                            )));
                        }
                    }
                    (None, Some(pod)) => {
                        if !matches!(host(pod)?, HostId::Pod { .. }) {
                            return Err(
                                self.invalid(format!("check {title:?}: {pod:?} is not a pod"))
                            );
                        }
                    }
                    _ => {
                        return Err(self.invalid(format!(
                            "check {title:?}: give exactly one of `service` and `pod`"
                        )))
                    }
                }
            }
            CheckSpec::Conntrack(c) => {
                if !self.agent.enabled {
                    return Err(self.invalid(format!(
                        "check {title:?}: needs the agent, which is disabled"
                    )));
                }
                if !matches!(host(&c.from)?, HostId::Pod { .. }) {
                    return Err(self.invalid(format!("check {title:?}: from must be a pod")));
                }
                if let Some(node) = &c.node {
                    if !matches!(host(node)?, HostId::Node(_)) {
                        return Err(
                            self.invalid(format!("check {title:?}: {node:?} is not a node"))
                        );
                    }
                }
                if c.reclaimed_within.is_some_and(|w| w > MAX_WAIT) {
                    return Err(self.invalid(format!(
                        "check {title:?}: reclaimed_within must be at most 10m"
                    )));
                }
                if self.service(&c.service).is_none() {
                    return Err(
                        self.invalid(format!("check {title:?}: no service {:?}", c.service))
                    );
                }
            }
        }
        Ok(())
    }
}

/// Shell-style matching with `*` only: enough to say "every pod" or "every pod on node 2".
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOKE: &str = r#"
name = "smoke"
description = "test"
suite = ["default"]

[topology]
nodes = 2
pods_per_node = 2

[agent]
conntrack = { gc_interval = "1s", udp_timeout = "3s", tcp_closing_timeout = "2s" }

[[pods]]
match = "n2*"
labels = { app = "echo" }

[[pods]]
match = "n1p1"
labels = { app = "echo" }

[[services]]
name = "echo"
cluster_ip = "198.18.100.10"
selector = { app = "echo" }
ports = [
  { name = "http", protocol = "TCP", port = 80, target_port = 8080 },
  { name = "dns", protocol = "UDP", port = 53, target_port = 5353 },
]

[[checks]]
kind = "http"
from = "n1p0"
service = "echo"
port = 80
requests = 30
expect = { all_answered = true, all_backends_used = true, client_ip_preserved = true }

[[checks]]
kind = "udp"
from = "n1p0"
service = "echo"
port = 53

[[checks]]
kind = "conntrack"
from = "n1p0"
service = "echo"
reclaimed_within = "15s"
"#;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn parses_a_full_scenario() {
        let s = parse(SMOKE).unwrap();
        assert_eq!(s.topology.mtu, 1500);
        assert!(s.agent.enabled);
        assert_eq!(s.agent.conntrack.udp_timeout, Some(Duration::from_secs(3)));
        assert_eq!(s.agent.conntrack.tcp_syn_timeout, None);
        assert_eq!(s.services[0].ports[1].protocol, Protocol::Udp);
        assert_eq!(s.services[0].ports[1].target(), 5353);
        assert_eq!(s.checks.len(), 3);
        match &s.checks[1] {
            CheckSpec::Udp(t) => {
                assert_eq!(t.requests, 10);
                assert!(t.expect.all_answered);
                assert!(!t.expect.client_ip_preserved);
            }
            other => panic!("unexpected {other:?}"),
        }
        match &s.checks[2] {
            CheckSpec::Conntrack(c) => {
                assert_eq!(c.reclaimed_within, Some(Duration::from_secs(15)))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(s.checks[0].title(), "http n1p0 -> echo:80 x30");
    }

    #[test]
    fn rejects_unknown_keys() {
        let bad = SMOKE.replace("requests = 30", "requets = 30");
        assert!(matches!(parse(&bad), Err(ScenarioError::Parse { .. })));
        let bad = SMOKE.replace("gc_interval", "gc_intervall");
        assert!(matches!(parse(&bad), Err(ScenarioError::Parse { .. })));
    }

    #[test]
    fn rejects_dangling_references() {
        for (from, to) in [
            (
                "from = \"n1p0\"\nservice = \"echo\"\nport = 80",
                "from = \"n3p0\"\nservice = \"echo\"\nport = 80",
            ),
            (
                "service = \"echo\"\nport = 53",
                "service = \"ech\"\nport = 53",
            ),
            (
                "service = \"echo\"\nport = 53",
                "service = \"echo\"\nport = 54",
            ),
            ("match = \"n1p1\"", "match = \"n9p1\""),
        ] {
            let bad = SMOKE.replacen(from, to, 1);
            assert_ne!(bad, SMOKE, "replacement {from:?} did not apply");
            assert!(
                matches!(parse(&bad), Err(ScenarioError::Invalid { .. })),
                "{to:?} was accepted"
            );
        }
    }

    #[test]
    fn rejects_private_ranges() {
        let bad = SMOKE.replace("198.18.100.10", "203.0.113.10");
        assert!(matches!(parse(&bad), Err(ScenarioError::Invalid { .. })));
    }

    #[test]
    fn rejects_unbounded_loops() {
        let bad = SMOKE.replace("requests = 30", "requests = 100000");
        assert!(matches!(parse(&bad), Err(ScenarioError::Invalid { .. })));
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    Some(s.name.as_str()),
                    path.file_stem().and_then(|f| f.to_str())
                );
                seen += 1;
            }
        }
        assert!(seen >= 2, "no scenarios found in {}", dir.display());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "n1p0"));
        assert!(glob_match("n2*", "n2p1"));
        assert!(!glob_match("n2*", "n1p1"));
        assert!(glob_match("n*p1", "n12p1"));
        assert!(glob_match("n1p0", "n1p0"));
        assert!(!glob_match("n1p", "n1p0"));
    }
}
