//! The scenario file: a TOML description of a small cluster, its services and the checks to run.
//!
//! Services are Kubernetes-shaped on purpose: the lab turns them into the same Service and
//! EndpointSlice objects a real control plane would hand the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::{HostId, Plan};

pub use crate::state_checks::{CounterCheck, FrontendCheck, RejectedCheck};

/// Loops in checks are bounded by this, so a typo cannot make a run last for hours.
pub const MAX_REQUESTS: u32 = 1000;
pub const MAX_NODES: u8 = 50;
pub const MAX_PODS_PER_NODE: u8 = 200;
pub const MAX_EXTERNALS: u8 = 50;
/// The largest UDP datagram a check or probe sends (the servers' buffer).
pub const MAX_DATAGRAM: u32 = 65_000;
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
    /// Static routes on hosts, as the router in front of a cluster has them: external clients
    /// reach load-balancer and external IPs through a node of the scenario's choice.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Hand-written EndpointSlices, written as given.
    #[serde(default)]
    pub endpoint_slices: Vec<crate::timeline::ManualSlice>,
    /// Traffic started before the steps, judged after them.
    #[serde(default)]
    pub probes: Vec<crate::timeline::ProbeSpec>,
    /// Changes while the scenario runs, after the checks (and before agent restarts).
    #[serde(default)]
    pub steps: Vec<crate::timeline::StepSpec>,
    /// Namespaces besides `default`, with their labels (pods go into them by `[[pods]]
    /// namespace`).
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// NetworkPolicy objects as users write them (YAML, one per entry), written with the
    /// cluster state as given.
    #[serde(default)]
    pub network_policies: Vec<String>,
    /// Other objects the agents read (YAML, one per entry; a `PrefilterDenyList`, say),
    /// written with the cluster state as given: the agent judges them.
    #[serde(default)]
    pub objects: Vec<String>,
}

/// A reachability table's column, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReachTarget {
    Pod(String),
    Service(String),
    NodePort(String, String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The host that gets the route, usually an external client (`x1`).
    pub host: String,
    /// A prefix in the lab's ranges: "198.18.200.0/24" or "fd00:200::/64".
    pub to: String,
    /// The node the route points at (its network-1 address of the prefix's family).
    pub via: String,
}

impl RouteSpec {
    /// The prefix, if it parses and lies in the lab's ranges.
    pub fn prefix(&self) -> Result<(IpAddr, u8), String> {
        let (ip, len) = self
            .to
            .split_once('/')
            .ok_or_else(|| format!("route to {:?}: give a prefix like 198.18.200.0/24", self.to))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|e| format!("route to {:?}: {e}", self.to))?;
        let len: u8 = len
            .parse()
            .map_err(|e| format!("route to {:?}: {e}", self.to))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("route to {:?}: prefix longer than {max}", self.to));
        }
        if !crate::topology::is_test_ip(ip) {
            return Err(format!(
                "route to {:?}: outside 198.18.0.0/15 and fd00::/8, the only ranges lab traffic may use",
                self.to
            ));
        }
        Ok((ip, len))
    }
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

    pub fn signal(self) -> crate::backend::Signal {
        match self {
            StopSignal::Term => crate::backend::Signal::SIGTERM,
            StopSignal::Kill => crate::backend::Signal::SIGKILL,
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
    /// Node networks: more than one makes every node multi-homed (eth0, eth1, ...), with an
    /// address on each; external clients sit on all of them.
    #[serde(default = "default_networks")]
    pub networks: u8,
    /// Dual stack: IPv6 addresses (fd00::/8) on nodes, pods and external clients too.
    #[serde(default)]
    pub ipv6: bool,
    /// Segmentation offloads (TSO, GSO, GRO) on the lab's veths. Off, every packet is one of
    /// the MTU under test, the per-packet regime of many real NICs, rather than a 64 KB
    /// segment. The namespace lab only: a VM's NICs follow the matrix's `--offloads`.
    #[serde(default = "default_offloads")]
    pub offloads: bool,
}

fn default_networks() -> u8 {
    1
}

fn default_offloads() -> bool {
    true
}

/// The smallest link MTU IPv6 allows (RFC 8200), and so the smallest a dual-stack pod may have.
const MIN_IPV6_MTU: u32 = 1280;

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
    /// The agent's `[services]` table.
    #[serde(default)]
    pub services: ServicesSpec,
    /// The agent's `[tunnel]` table.
    #[serde(default)]
    pub tunnel: TunnelSpec,
    /// Connect-time load balancing for the nodes' own processes: each agent attaches its
    /// cgroup hooks to its node's cgroup (a backend that gives nodes one).
    #[serde(default)]
    pub host_services: bool,
    /// The agent's `[prefilter]` table (the XDP pre-filter), as written; the agent checks it.
    #[serde(default)]
    pub prefilter: Option<toml::Table>,
    /// The agent's `[failsafe]` table, as written.
    #[serde(default)]
    pub failsafe: Option<toml::Table>,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            enabled: true,
            poll_interval: None,
            ready_timeout: default_ready_timeout(),
            conntrack: ConntrackSpec::default(),
            services: ServicesSpec::default(),
            tunnel: TunnelSpec::default(),
            host_services: false,
            prefilter: None,
            failsafe: None,
        }
    }
}

/// Mirrors the agent's `[services]` keys the lab varies; unset ones keep the agent's defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServicesSpec {
    /// "ingress": replies return through the ingress node; "dsr": straight from the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_return: Option<ExternalReturn>,
    /// "random" or "maglev".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_load_balancing: Option<LoadBalancing>,
    /// "redirect": Weir forwards translated packets itself; "stack": the kernel routes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Redirect,
    Stack,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExternalReturn {
    Ingress,
    Dsr,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancing {
    Random,
    Maglev,
}

/// Mirrors the agent's `[tunnel]` keys the lab varies.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TunnelSpec {
    /// "vxlan" (the agent's default), "ipip" or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TunnelModeSpec>,
}

impl TunnelSpec {
    /// The device the agent creates for the mode (its default `[tunnel] interface`).
    pub fn device(&self) -> &'static str {
        match self.mode {
            Some(TunnelModeSpec::Ipip) => "weir-ipip",
            _ => "weir-vxlan",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TunnelModeSpec {
    None,
    Vxlan,
    Ipip,
}

fn default_true() -> bool {
    true
}

/// Long enough for the verifier on a TCG-emulated VM (times the backend's slowdown: two
/// minutes there), where loading the data path alone takes 20 to 40 s on a busy machine.
fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
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
    /// UDP ports the matched pods do not serve even though a Service targets them: their
    /// kernel answers "port unreachable", an ICMP error about the flow (the tunnel scenarios).
    #[serde(default)]
    pub closed_udp_ports: Vec<u16>,
    /// The MTU of the node's end of the matched pods' veth, below the network's: the pods
    /// keep the network's MTU (and so their TCP MSS), but the node cannot forward a
    /// full-sized packet into them and answers "fragmentation needed" / "packet too big"
    /// itself, an ICMP error of the node's own about a translated flow. A stand-in for any
    /// smaller link on a backend's path. (The pods' own packets must fit it too.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_side_mtu: Option<u32>,
    /// The namespace of the matched pods' Pod objects (`default` unless a rule says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Named container ports of the matched pods (name -> TCP port), as NetworkPolicy rules
    /// name them.
    #[serde(default)]
    pub named_ports: BTreeMap<String, u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
    /// The IPv4 cluster IP; a Service with only `cluster_ip6` is IPv6-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv4Addr>,
    /// Makes the service dual-stack (IPv4 first, unless `ipv6_first`), with IPv6 endpoint
    /// slices too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip6: Option<Ipv6Addr>,
    /// A dual-stack Service whose `ipFamilies` (and `clusterIPs`) list IPv6 first.
    #[serde(default)]
    pub ipv6_first: bool,
    /// `clusterIP: None`: no frontend anywhere; its slices carry the headless label.
    #[serde(default)]
    pub headless: bool,
    /// `type = "ExternalName"`: the name it aliases (DNS only; no frontend, no selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    /// `metadata.labels` (copied to its slices, as the controller does) and annotations.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Endpoints per EndpointSlice before another is started (Kubernetes: 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_endpoints_per_slice: Option<usize>,
    /// Like Kubernetes, an empty selector selects nothing: such a service has no endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (LoadBalancer services).
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// Kubernetes allocates one for LoadBalancer services with externalTrafficPolicy Local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` with this timeout.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub affinity_timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// The labels that hand a Service to another proxy, as kube-proxy (and Weir) read them.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

impl ServiceSpec {
    /// The service's address of one family: its cluster IP (or, for IPv6, its second one).
    pub fn cluster_ip_of(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::Ipv4 => self.cluster_ip.map(IpAddr::V4),
            Family::Ipv6 => self.cluster_ip6.map(IpAddr::V6),
        }
    }

    /// Its cluster IPs in `clusterIPs` order.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .cluster_ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.cluster_ip6.map(IpAddr::V6))
            .collect();
        if self.ipv6_first {
            ips.reverse();
        }
        ips
    }

    /// The address families its endpoint slices are written for, IPv4 first (slice order):
    /// `true` for IPv6.
    pub fn families_with_pods(&self) -> Vec<bool> {
        match (
            self.cluster_ip.is_some() || self.headless,
            self.cluster_ip6.is_some(),
        ) {
            (_, false) => vec![false],
            (false, true) => vec![true],
            (true, true) => vec![false, true],
        }
    }

    /// Whether Weir serves it: not another proxy's (the service-proxy-name label), not headless,
    /// not an alias.
    pub fn served(&self) -> bool {
        !self.headless
            && self.kind != ServiceType::ExternalName
            && !self.labels.contains_key(SERVICE_PROXY_NAME_LABEL)
            && !self.labels.contains_key(HEADLESS_LABEL)
    }
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
    /// A named targetPort: the Service refers to the pods' port by this name and the endpoint
    /// slices carry the number (`target_port`) it resolves to, as the endpoints controller
    /// writes them.
    #[serde(default)]
    pub target_port_name: Option<String>,
    /// NodePort and LoadBalancer services: the port on every node address.
    #[serde(default)]
    pub node_port: Option<u16>,
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
    /// A service's healthCheckNodePort on one node, as a cloud load balancer probes it.
    HealthCheck(HealthCheckSpec),
    /// A frontend present on (or absent from) nodes' data planes, from `weir-agent dump
    /// services`.
    Frontend(FrontendCheck),
    /// Objects the agents refused, by kind and reason, from `weir_rejected_objects_current`.
    Rejected(RejectedCheck),
    /// A data-path counter that moved since the checks (or the step) began.
    Counter(CounterCheck),
    /// Which sources reach which destinations (NetworkPolicy), every cell probed with a real
    /// connection, compared with an expected table.
    Reachability(ReachabilityCheck),
}

/// A reachability table in the spirit of the upstream netpol e2e tests: rows are sources,
/// columns destinations; `expect` has one string per row, one character per column: `.` the
/// connection is made, `X` it is not.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReachabilityCheck {
    #[serde(default)]
    pub name: Option<String>,
    /// Hosts: pods (`n1p0`), nodes (`node1`), external clients (`x1`).
    pub from: Vec<String>,
    /// Pods by name (their own address), `service:NAME` (its cluster IP) or
    /// `node_port:NAME@NODE` (the service's nodePort on that node's address).
    pub to: Vec<String>,
    /// The destination port: the pod's own port, or the service port.
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub family: Family,
    pub expect: Vec<String>,
    /// A node where `weir-agent monitor` watches denied flows while the table is probed: it
    /// must show at least one, each from the own address of a source whose row expects a
    /// denial (the monitor sees what the data path decided, by the client's real address).
    #[serde(default)]
    pub monitor: Option<String>,
}

impl ReachabilityCheck {
    pub const ALLOWED: char = '.';
    pub const DENIED: char = 'X';
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub from: String,
    pub service: String,
    /// The node probed, on its network-1 address.
    pub node: String,
    /// 200 with local endpoints, 503 without.
    pub status: u16,
    pub local_endpoints: u32,
}

/// How a traffic check addresses a service.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Its cluster IP of the check's family.
    #[default]
    ClusterIp,
    /// A node address (`node`, on `network`) and the port's nodePort.
    NodePort,
    /// Its first external IP.
    ExternalIp,
    /// Its first load-balancer ingress IP.
    LoadBalancer,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

/// Whether a node's tunnel device receives the replies of the check's flows: through the
/// ingress node they do (ingress return), with direct server return they must not.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelReplies {
    pub node: String,
    pub seen: bool,
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
    pub via: Via,
    #[serde(default)]
    pub family: Family,
    /// `via = "node_port"`: the node whose address is used...
    #[serde(default)]
    pub node: Option<String>,
    /// ...on this of its networks (1-based; IPv4 only beyond the first).
    #[serde(default = "default_networks")]
    pub network: u8,
    #[serde(default)]
    pub tunnel_replies: Option<TunnelReplies>,
    /// HTTP only: each request uploads this many bytes (a POST), so full-sized segments travel
    /// from the client.
    #[serde(default)]
    pub upload_bytes: Option<u32>,
    /// After the requests, the client's route to the target must carry this path MTU: it
    /// learnt it from an ICMP "fragmentation needed" / "packet too big".
    #[serde(default)]
    pub learned_mtu: Option<u32>,
    /// HTTP via a load-balancer or external IP only: the requests share one keep-alive
    /// connection, paced, and half-way through the client's route to the IP moves from the node
    /// of its `[[routes]]` entry to this one, as when an ECMP router reshuffles. The connection
    /// must survive on the same backend: with Maglev every node picks the same one.
    #[serde(default)]
    pub switch_ingress_to: Option<String>,
    /// UDP only: each datagram is this many bytes.
    #[serde(default)]
    pub size: Option<u32>,
    /// Every request leaves from this client port (a load balancer in front of the cluster
    /// reusing one port towards several frontends); TCP requests are then HTTP/1.0 by socat.
    #[serde(default)]
    pub source_port: Option<u16>,
    /// UDP only, with a `size` beyond the path MTU: the client sends each datagram's fragments
    /// itself, the first one last (`weir-lab probe first-fragment-last`), as a network that
    /// reorders them delivers them.
    #[serde(default)]
    pub first_fragment_last: bool,
    /// UDP only, with a `size` beyond the path MTU, through the VXLAN tunnel: the underlay
    /// delivers each datagram tunnelled to this node first fragment last (the lab delays first
    /// fragments on its fabric, see `frame_delay`), as a multipath underlay may. The client's
    /// own reordering (`first_fragment_last`) does not get that far: the ingress node restores
    /// the order before the tunnel.
    #[serde(default)]
    pub tunnel_first_fragment_last: Option<String>,
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
    /// Not one request is answered (traffic a node must drop, like externalTrafficPolicy Local
    /// on a node without a local endpoint).
    pub none_answered: bool,
    /// Every answer comes from one endpoint (session affinity).
    pub same_backend: bool,
    /// Every request is refused at once (TCP connection refused, ICMP port unreachable for
    /// UDP): what a service without endpoints answers, rather than silence.
    pub refused: bool,
    /// Every request is refused, each within this time (implies `refused`).
    #[serde(with = "humantime_serde")]
    pub refused_within: Option<Duration>,
    /// Only these pods may answer (and, with `all_backends_used`, all of them must); defaults
    /// to every endpoint of the service.
    pub backends: Vec<String>,
}

impl TrafficExpect {
    /// Every request must be refused.
    pub fn refusal(&self) -> bool {
        self.refused || self.refused_within.is_some()
    }
}

impl Default for TrafficExpect {
    fn default() -> Self {
        TrafficExpect {
            all_answered: true,
            all_backends_used: false,
            client_ip_preserved: false,
            none_answered: false,
            same_backend: false,
            refused: false,
            refused_within: None,
            backends: Vec::new(),
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
                let via = match (t.via, &t.node) {
                    (Via::NodePort, Some(node)) if t.network > 1 => {
                        format!(" via {node} network {} nodePort", t.network)
                    }
                    (Via::NodePort, Some(node)) => format!(" via {node} nodePort"),
                    (Via::NodePort, None) => " via nodePort".to_owned(),
                    (Via::ExternalIp, _) => " via external IP".to_owned(),
                    (Via::LoadBalancer, _) => " via load-balancer IP".to_owned(),
                    (Via::ClusterIp, _) => String::new(),
                };
                let family = if t.family == Family::Ipv6 {
                    " (IPv6)"
                } else {
                    ""
                };
                format!(
                    "{kind} {} -> {target}:{}{via}{family} x{}",
                    t.from, t.port, t.requests
                )
            }
            CheckSpec::Frontend(f) => f.name.clone().unwrap_or_else(|| {
                let node = f.node.as_deref().unwrap_or("every node");
                let what = match (&f.service, f.address) {
                    (Some(svc), _) => format!("{svc}:{}", f.port),
                    (None, Some(ip)) => std::net::SocketAddr::new(ip, f.port).to_string(),
                    (None, None) => format!("any address:{}", f.port),
                };
                let state = if f.present { "present" } else { "absent" };
                format!("frontend {what}/{} {state} on {node}", f.protocol.lower())
            }),
            CheckSpec::Rejected(r) => r.name.clone().unwrap_or_else(|| {
                let node = r.node.as_deref().unwrap_or("every node");
                format!(
                    "{} {} rejected ({}) on {node}",
                    r.count, r.object_kind, r.reason
                )
            }),
            CheckSpec::Reachability(r) => r.name.clone().unwrap_or_else(|| {
                format!(
                    "reachability {}x{} on {}/{}",
                    r.from.len(),
                    r.to.len(),
                    r.port,
                    r.protocol.lower()
                )
            }),
            CheckSpec::Counter(c) => c.name.clone().unwrap_or_else(|| {
                if c.unchanged {
                    format!("counter {} unchanged on {}", c.counter, c.node)
                } else {
                    format!("counter {} +{} on {}", c.counter, c.at_least, c.node)
                }
            }),
            CheckSpec::HealthCheck(h) => h.name.clone().unwrap_or_else(|| {
                format!(
                    "health check {} -> {} on {}: {} with {} local",
                    h.from, h.service, h.node, h.status, h.local_endpoints
                )
            }),
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
        let mut plan = Plan::new(
            self.topology.nodes,
            self.topology.pods_per_node,
            self.topology.externals,
            self.topology.mtu,
        )
        .with_networks(self.topology.networks);
        plan.offloads = self.topology.offloads;
        if self.topology.ipv6 {
            plan = plan.with_ipv6();
        }
        // Validation has vetted every route; one that does not resolve is left out.
        let routes = self
            .routes
            .iter()
            .filter_map(|r| {
                let host = plan.host(&r.host)?;
                let prefix = r.prefix().ok()?;
                let via = plan.host(&r.via)?;
                let via = match prefix.0 {
                    IpAddr::V4(_) => IpAddr::V4(plan.ip(via)?),
                    IpAddr::V6(_) => IpAddr::V6(plan.ip6(via)?),
                };
                Some(crate::topology::RoutePlan { host, prefix, via })
            })
            .collect();
        plan.with_routes(routes)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    pub(crate) fn invalid(&self, message: impl Into<String>) -> ScenarioError {
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
        if t.networks == 0 || t.networks > crate::topology::MAX_NETWORKS {
            return Err(self.invalid(format!(
                "topology.networks must be 1..={}",
                crate::topology::MAX_NETWORKS
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
                .chain(&rule.closed_udp_ports)
                .any(|p| *p == 0)
            {
                return Err(self.invalid("[[pods]] ports must be non-zero"));
            }
            if rule
                .node_side_mtu
                .is_some_and(|mtu| !(MIN_IPV6_MTU..=self.topology.mtu).contains(&mtu))
            {
                return Err(self.invalid(format!(
                    "[[pods]] node_side_mtu must be {MIN_IPV6_MTU}..={} (the topology's)",
                    self.topology.mtu
                )));
            }
        }

        let frontends = self.validate_services(self.services.iter())?;
        for route in &self.routes {
            let prefix = route.prefix().map_err(|m| self.invalid(m))?;
            if plan.host(&route.host).is_none() {
                return Err(self.invalid(format!("route: no host named {:?}", route.host)));
            }
            if !matches!(plan.host(&route.via), Some(HostId::Node(_))) {
                return Err(self.invalid(format!("route: {:?} is not a node", route.via)));
            }
            if prefix.0.is_ipv6() && !t.ipv6 {
                return Err(
                    self.invalid(format!("route to {}: IPv6 needs topology.ipv6", route.to))
                );
            }
        }
        for check in &self.checks {
            self.validate_check(check, &plan)?;
        }
        for restart in &self.agent_restarts {
            self.validate_restart(restart, &plan, &frontends)?;
        }
        self.validate_timeline(&plan)?;
        Ok(())
    }

    /// Every Service of one point of the timeline, alone and together; returns the frontends
    /// (cluster IP, port, protocol) they claim.
    pub(crate) fn validate_services<'s>(
        &self,
        services: impl Iterator<Item = &'s ServiceSpec>,
    ) -> Result<BTreeSet<(IpAddr, u16, Protocol)>, ScenarioError> {
        let mut names = BTreeSet::new();
        let mut frontends = BTreeSet::new();
        let mut node_ports = BTreeSet::new();
        for svc in services {
            if !names.insert(svc.name.as_str()) {
                return Err(self.invalid(format!("service {} defined twice", svc.name)));
            }
            self.validate_service_shape(svc)?;
            if let Some(ip) = svc.cluster_ip {
                if !crate::topology::is_test_address(ip) {
                    return Err(self.invalid(format!(
                        "service {}: cluster_ip {ip} is outside 198.18.0.0/15, the only range lab traffic may use",
                        svc.name
                    )));
                }
            }
            if svc.ports.is_empty() && svc.kind != ServiceType::ExternalName {
                return Err(self.invalid(format!("service {} has no ports", svc.name)));
            }
            self.validate_service_addresses(svc)?;
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
                if p.node_port.is_some()
                    && matches!(svc.kind, ServiceType::ClusterIP | ServiceType::ExternalName)
                {
                    return Err(self.invalid(format!(
                        "service {}: a {:?} service has no node ports",
                        svc.name, svc.kind
                    )));
                }
                if p.node_port == Some(0) {
                    return Err(
                        self.invalid(format!("service {}: node_port must be non-zero", svc.name))
                    );
                }
                if let Some(np) = p.node_port {
                    if !node_ports.insert((np, p.protocol)) {
                        return Err(self.invalid(format!(
                            "service {}: node port {np}/{} is already taken",
                            svc.name,
                            p.protocol.lower()
                        )));
                    }
                }
                if p.target_port_name.as_deref() == Some("") {
                    return Err(self.invalid(format!(
                        "service {}: target_port_name must not be empty",
                        svc.name
                    )));
                }
                for ip in svc.cluster_ips() {
                    if !frontends.insert((ip, p.port, p.protocol)) {
                        return Err(self.invalid(format!(
                            "service {}: {} /{} is already another service's frontend",
                            svc.name,
                            std::net::SocketAddr::new(ip, p.port),
                            p.protocol.lower()
                        )));
                    }
                }
            }
        }
        Ok(frontends)
    }

    /// Headless, ExternalName, IPv6-only and IPv6-first Services and slice sizes.
    fn validate_service_shape(&self, svc: &ServiceSpec) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(self.invalid(format!("service {}: {m}", svc.name)));
        let has_ip = svc.cluster_ip.is_some() || svc.cluster_ip6.is_some();
        match (svc.kind, svc.headless) {
            (ServiceType::ExternalName, _) => {
                if svc.external_name.as_deref().is_none_or(str::is_empty) {
                    return bad("type ExternalName needs external_name");
                }
                if has_ip || svc.headless || !svc.selector.is_empty() {
                    return bad(
                        "an ExternalName service has no cluster IP, headless flag or selector",
                    );
                }
            }
            (_, true) => {
                if has_ip || svc.kind != ServiceType::ClusterIP {
                    return bad("a headless service is a ClusterIP service without cluster IPs");
                }
            }
            (_, false) => {
                if !has_ip {
                    return bad("give cluster_ip, cluster_ip6 or both (or headless = true)");
                }
            }
        }
        if svc.external_name.is_some() && svc.kind != ServiceType::ExternalName {
            return bad("external_name needs type = \"ExternalName\"");
        }
        if svc.ipv6_first && (svc.cluster_ip.is_none() || svc.cluster_ip6.is_none()) {
            return bad("ipv6_first is for dual-stack services (cluster_ip and cluster_ip6)");
        }
        if svc.max_endpoints_per_slice == Some(0) || svc.max_endpoints_per_slice > Some(1000) {
            return bad("max_endpoints_per_slice must be 1..=1000");
        }
        Ok(())
    }

    fn validate_service_addresses(&self, svc: &ServiceSpec) -> Result<(), ScenarioError> {
        let bad = |m: String| self.invalid(format!("service {}: {m}", svc.name));
        if let Some(ip6) = svc.cluster_ip6 {
            if !crate::topology::is_test_address6(ip6) {
                return Err(bad(format!(
                    "cluster_ip6 {ip6} is outside fd00::/8, the only IPv6 range lab traffic may use"
                )));
            }
            if !self.topology.ipv6 {
                return Err(bad("cluster_ip6 needs topology.ipv6".into()));
            }
        }
        for ip in svc.external_ips.iter().chain(&svc.load_balancer_ips) {
            if !crate::topology::is_test_ip(*ip) {
                return Err(bad(format!(
                    "{ip} is outside 198.18.0.0/15 and fd00::/8, the only ranges lab traffic may use"
                )));
            }
        }
        if !svc.load_balancer_ips.is_empty() && svc.kind != ServiceType::LoadBalancer {
            return Err(bad("load_balancer_ips need type = \"LoadBalancer\"".into()));
        }
        if svc.health_check_node_port.is_some()
            && (svc.kind != ServiceType::LoadBalancer
                || svc.external_traffic_policy != TrafficPolicy::Local)
        {
            return Err(bad(
                "health_check_node_port is for LoadBalancer services with externalTrafficPolicy Local"
                    .into(),
            ));
        }
        if svc.health_check_node_port == Some(0) {
            return Err(bad("health_check_node_port must be non-zero".into()));
        }
        if svc
            .affinity_timeout
            .is_some_and(|t| t.is_zero() || t > Duration::from_secs(86_400))
        {
            return Err(bad("affinity_timeout must be 1s..=1d".into()));
        }
        Ok(())
    }

    fn validate_restart(
        &self,
        r: &AgentRestartSpec,
        plan: &Plan,
        frontends: &BTreeSet<(IpAddr, u16, Protocol)>,
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
        if r.port == 0 || frontends.contains(&(IpAddr::V4(r.cluster_ip), r.port, Protocol::Tcp)) {
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
            if svc.cluster_ip.is_none() {
                return Err(bad(format!("service {} has no IPv4 cluster IP", svc.name)));
            }
        }
        Ok(())
    }

    fn validate_traffic_target(
        &self,
        title: &str,
        t: &TrafficCheck,
        from: HostId,
        plan: &Plan,
        http: bool,
    ) -> Result<(), ScenarioError> {
        let bad = |m: String| self.invalid(format!("check {title:?}: {m}"));
        if t.family == Family::Ipv6 && !self.topology.ipv6 {
            return Err(bad("IPv6 needs topology.ipv6".into()));
        }
        if t.network == 0 || t.network > self.topology.networks {
            return Err(bad(format!(
                "network must be 1..={}",
                self.topology.networks
            )));
        }
        if t.network > 1 && (t.family == Family::Ipv6 || t.via != Via::NodePort) {
            return Err(bad(
                "networks beyond the first are for IPv4 node ports only".into(),
            ));
        }
        if t.network > 1 && matches!(from, HostId::Pod { .. }) {
            return Err(bad("pods are on network 1 only".into()));
        }
        if (t.upload_bytes.is_some() || t.switch_ingress_to.is_some()) && !http {
            return Err(bad(
                "upload_bytes and switch_ingress_to are for HTTP checks".into(),
            ));
        }
        if let Some(node) = &t.switch_ingress_to {
            if !matches!(plan.host(node), Some(HostId::Node(_))) {
                return Err(bad(format!("switch_ingress_to: {node:?} is not a node")));
            }
            if !matches!(t.via, Via::LoadBalancer | Via::ExternalIp) {
                return Err(bad(
                    "switch_ingress_to moves the route to a load-balancer or external IP".into(),
                ));
            }
            if !matches!(from, HostId::External(_)) {
                return Err(bad("switch_ingress_to is for external clients".into()));
            }
        }
        if let Some(tr) = &t.tunnel_replies {
            if !matches!(plan.host(&tr.node), Some(HostId::Node(_))) {
                return Err(bad(format!("tunnel_replies: {:?} is not a node", tr.node)));
            }
            if !self.agent.enabled {
                return Err(bad("tunnel_replies needs the agent".into()));
            }
        }
        if (t.expect.none_answered || t.expect.refusal())
            && (t.expect.all_answered || t.expect.all_backends_used)
        {
            return Err(bad(
                "none_answered and refused contradict all_answered (set it false) and all_backends_used"
                    .into(),
            ));
        }
        for pod in &t.expect.backends {
            if !matches!(plan.host(pod), Some(HostId::Pod { .. })) {
                return Err(bad(format!("expect.backends: {pod:?} is not a pod")));
            }
        }
        let Some(svc) = t.service.as_deref().and_then(|s| self.service(s)) else {
            if t.via != Via::ClusterIp {
                return Err(bad("via needs a service".into()));
            }
            return Ok(());
        };
        match t.via {
            Via::ClusterIp => {
                if svc.cluster_ip_of(t.family).is_none() {
                    return Err(bad(format!(
                        "service {} has no cluster IP of the check's family",
                        svc.name
                    )));
                }
                if t.node.is_some() {
                    return Err(bad("node is for via = \"node_port\"".into()));
                }
            }
            Via::NodePort => {
                let node = t
                    .node
                    .as_deref()
                    .ok_or_else(|| bad("via = \"node_port\" needs a node".into()))?;
                if !matches!(plan.host(node), Some(HostId::Node(_))) {
                    return Err(bad(format!("{node:?} is not a node")));
                }
                if !svc
                    .ports
                    .iter()
                    .any(|p| p.port == t.port && p.node_port.is_some())
                {
                    return Err(bad(format!(
                        "service {} port {} has no node_port",
                        svc.name, t.port
                    )));
                }
            }
            Via::ExternalIp | Via::LoadBalancer => {
                let ips = if t.via == Via::ExternalIp {
                    &svc.external_ips
                } else {
                    &svc.load_balancer_ips
                };
                let want_v6 = t.family == Family::Ipv6;
                if !ips.iter().any(|ip| ip.is_ipv6() == want_v6) {
                    return Err(bad(format!(
                        "service {} has no such address of the check's family",
                        svc.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// What a reachability column names: a pod, a service's cluster IP, or a service's
    /// nodePort on a node.
    pub fn reachability_target(&self, to: &str, plan: &Plan) -> Result<ReachTarget, String> {
        if let Some(name) = to.strip_prefix("service:") {
            self.service(name)
                .ok_or_else(|| format!("{to}: no service {name:?}"))?;
            return Ok(ReachTarget::Service(name.to_owned()));
        }
        if let Some(rest) = to.strip_prefix("node_port:") {
            let (name, node) = rest
                .split_once('@')
                .ok_or_else(|| format!("{to}: write node_port:SERVICE@NODE"))?;
            self.service(name)
                .ok_or_else(|| format!("{to}: no service {name:?}"))?;
            if !matches!(plan.host(node), Some(HostId::Node(_))) {
                return Err(format!("{to}: {node:?} is not a node"));
            }
            return Ok(ReachTarget::NodePort(name.to_owned(), node.to_owned()));
        }
        match plan.host(to) {
            Some(HostId::Pod { .. }) => Ok(ReachTarget::Pod(to.to_owned())),
            _ => Err(format!(
                "{to}: not a pod, service:NAME or node_port:NAME@NODE"
            )),
        }
    }

    pub(crate) fn validate_check(
        &self,
        check: &CheckSpec,
        plan: &Plan,
    ) -> Result<(), ScenarioError> {
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
                let from = host(&t.from)?;
                self.validate_traffic_target(&title, t, from, plan, proto == Protocol::Tcp)?;
                if t.size.is_some() && proto != Protocol::Udp {
                    return Err(self.invalid(format!("check {title:?}: size is for UDP checks")));
                }
                if t.first_fragment_last && (proto != Protocol::Udp || t.size.is_none()) {
                    return Err(self.invalid(format!(
                        "check {title:?}: first_fragment_last is for UDP checks with a size"
                    )));
                }
                if let Some(node) = &t.tunnel_first_fragment_last {
                    if proto != Protocol::Udp || t.size.is_none() {
                        return Err(self.invalid(format!(
                            "check {title:?}: tunnel_first_fragment_last is for UDP checks with a size"
                        )));
                    }
                    if !matches!(plan.host(node), Some(HostId::Node(_))) {
                        return Err(self.invalid(format!(
                            "check {title:?}: tunnel_first_fragment_last: {node:?} is not a node"
                        )));
                    }
                    if !self.agent.enabled
                        || self
                            .agent
                            .tunnel
                            .mode
                            .is_some_and(|m| m != TunnelModeSpec::Vxlan)
                    {
                        return Err(self.invalid(format!(
                            "check {title:?}: tunnel_first_fragment_last needs the agent's VXLAN tunnel"
                        )));
                    }
                }
                if t.first_fragment_last && t.source_port.is_some() {
                    return Err(self.invalid(format!(
                        "check {title:?}: first_fragment_last picks its own source port"
                    )));
                }
                if t.source_port == Some(0) {
                    return Err(
                        self.invalid(format!("check {title:?}: source_port must be non-zero"))
                    );
                }
                if t.size.is_some_and(|n| !(8..=MAX_DATAGRAM).contains(&n)) {
                    return Err(
                        self.invalid(format!("check {title:?}: size must be 8..={MAX_DATAGRAM}"))
                    );
                }
                if t.expect.refused_within.is_some_and(|w| w > MAX_WAIT) {
                    return Err(self.invalid(format!(
                        "check {title:?}: refused_within must be at most 10m"
                    )));
                }
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
                        // A port the service no longer has may be checked for silence or
                        // refusal on its cluster IP (after a step dropped it).
                        let gone_port_ok = (t.expect.none_answered || t.expect.refusal())
                            && t.via == Via::ClusterIp;
                        if !gone_port_ok
                            && !svc
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
            CheckSpec::HealthCheck(h) => {
                host(&h.from)?;
                if !matches!(host(&h.node)?, HostId::Node(_)) {
                    return Err(
                        self.invalid(format!("check {title:?}: {:?} is not a node", h.node))
                    );
                }
                let svc = self.service(&h.service).ok_or_else(|| {
                    self.invalid(format!("check {title:?}: no service {:?}", h.service))
                })?;
                if svc.health_check_node_port.is_none() {
                    return Err(self.invalid(format!(
                        "check {title:?}: service {} has no health_check_node_port",
                        svc.name
                    )));
                }
                if !self.agent.enabled {
                    return Err(self.invalid(format!(
                        "check {title:?}: needs the agent, which is disabled"
                    )));
                }
            }
            CheckSpec::Frontend(_)
            | CheckSpec::Rejected(_)
            | CheckSpec::Counter(_)
            | CheckSpec::Reachability(_) => {
                self.validate_agent_check(check, plan)?;
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
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
