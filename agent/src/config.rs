//! Agent configuration, from three layers: command-line flags, then `WEIR_*` environment
//! variables, then a TOML file, then built-in defaults (the first that sets a key wins).
//! Durations are in humantime form ("30s", "6h") in all three.
//!
//! Nested tables (`[conntrack]`) exist only in the file: a DaemonSet passes node-specific values
//! (the node name, the listen address) by flag or environment, and shared tuning by file.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where desired state comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A file or directory of Kubernetes YAML (`state_path`), polled for changes.
    #[default]
    File,
    /// The Kubernetes API: watchers on Services, EndpointSlices, Nodes, Pods, Namespaces and
    /// NetworkPolicies (in-cluster config, or `kubeconfig`).
    Kubernetes,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Loopback, like kube-proxy's metrics: a scraper on the node (or a port-forward) reaches it, the
/// network does not. The DaemonSet's probes ask for 127.0.0.1 (the pod is hostNetwork).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// kube-proxy's `healthzBindAddress`: cloud load balancers probe every node's port 10256.
pub const DEFAULT_HEALTHZ_LISTEN: &str = "0.0.0.0:10256";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weir";

/// The resolved configuration the agent runs with.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// This node's name, as in the Kubernetes Node object.
    pub node_name: String,
    /// Directory on a bpffs mount where this node's maps and program links are pinned (one per
    /// node, so several agents can share a host in the namespace lab).
    pub pin_dir: PathBuf,
    pub source: SourceKind,
    /// Desired state for the file source: a file or directory of Kubernetes YAML (Service and
    /// EndpointSlice objects, multi-document or `kind: List`), reloaded when it changes.
    pub state_path: Option<PathBuf>,
    /// For the Kubernetes source: a kubeconfig file. Unset: in-cluster config when running in a
    /// pod, else `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Host-facing interfaces (the node's uplinks). They get the ingress program.
    pub host_interfaces: Vec<String>,
    /// Pod-facing interfaces are found by this name prefix (like Calico's `cali`), in the agent's
    /// network namespace, as they come and go.
    pub pod_interface_prefix: String,
    /// How often the state file and the interface list are checked for changes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often the service maps are compared with what the agent wrote, and entries changed
    /// outside it written back (on a thread of its own: the loop never waits for the scan).
    #[serde(with = "humantime_serde")]
    pub drift_check_interval: Duration,
    /// `/metrics`, `/healthz` and `/readyz` are served here.
    pub metrics_listen: SocketAddr,
    /// kube-proxy's healthz server: `/healthz` and `/livez` with kube-proxy's semantics, for
    /// load balancers that probe it. A port that is taken (kube-proxy still running) is retried.
    pub healthz_listen: SocketAddr,
    /// Detach the programs when stopped by SIGTERM/SIGINT. Off by default: the pinned links keep
    /// the data plane forwarding while the agent restarts or upgrades.
    pub detach_on_exit: bool,
    /// A Service with more ready endpoints than this is rejected as bad input (keeping its last
    /// good version), so one runaway Service cannot use up the shared slot table.
    pub max_endpoints_per_service: u32,
    pub log_format: LogFormat,
    pub conntrack: ConntrackConfig,
    pub services: ServicesConfig,
    pub tunnel: TunnelConfig,
    pub host_services: HostServicesConfig,
    pub policy: PolicyConfig,
    pub prefilter: PrefilterConfig,
    pub failsafe: FailsafeConfig,
    pub http: HttpConfig,
    pub health_check: HealthCheckConfig,
    pub maps: MapsConfig,
}

/// How many entries each map whose size matters holds (`[maps]`). Maps are created with these
/// capacities, and admission accounts every Service against the same numbers, so a Service
/// that is admitted always fits. Changing one on a running node takes effect at the agent's
/// next start: the pinned map of the old size is replaced (conntrack and affinity entries are
/// carried over, see `agent/src/pin_layout.rs`; service and node maps are rewritten).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MapsConfig {
    /// `WEIR_CONNTRACK`: two entries per translated flow (one per direction), one for a flow
    /// that only passes through the tunnel. LRU: when full, the least recently used is evicted.
    pub conntrack: u32,
    /// `WEIR_CT_NEW`: conntrack entries of flows not answered yet (a SYN flood churns only
    /// these). LRU.
    pub ct_new: u32,
    /// `WEIR_CT_MOVED_ARRIVALS`: one per flow arriving through the tunnel whose client port
    /// this (the backend's) node moved, since another node's flow of the same tuple held its
    /// reply key. LRU: an evicted move leaves the connection's later segments to the holder
    /// (and a resize starts it empty, as if every move was evicted).
    pub ct_moved_arrivals: u32,
    /// `WEIR_AFFINITY`: one per (client, Service) under `sessionAffinity: ClientIP`. LRU.
    pub affinity: u32,
    /// `WEIR_SERVICES`: one per frontend (address or NodePort, port, protocol).
    pub services: u32,
    /// `WEIR_BACKEND_SLOTS`: per Service port and family, one per eligible endpoint (and again
    /// for this node's own).
    pub backend_slots: u32,
    /// `WEIR_BACKENDS`: one per (endpoint address, target port).
    pub backends: u32,
    /// `WEIR_MAGLEV`: 16 KiB chunks of Maglev tables, per Service port and family with external
    /// frontends when Maglev is on: one for a table of up to 4,093 entries, 32 for the largest.
    pub maglev: u32,
    /// `WEIR_SOURCE_RANGES`: `loadBalancerSourceRanges`, one per range per Service port and
    /// family.
    pub source_ranges: u32,
    /// `WEIR_SOCK_REVERSE`: host sockets translated at connect time (host services). LRU.
    pub sock_reverse: u32,
    /// `WEIR_HOST_ADDRS`: this node's addresses (where NodePorts answer).
    pub host_addrs: u32,
    /// `WEIR_TUNNEL_PEERS`: every address of every Node (the tunnel's only accepted senders).
    pub tunnel_peers: u32,
    /// `WEIR_POD_INTERFACES`: pod interfaces on this node.
    pub pod_interfaces: u32,
}

/// One configurable map: its key under `[maps]`, its name in the object (and pin), the entries
/// configured and the most that may be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    pub key: &'static str,
    pub map: &'static str,
    pub entries: u32,
    pub max: u32,
}

/// The largest capacity any map may have: Cilium's limit for its own tables (2^24). A
/// preallocated LRU map of conntrack entries that size takes about 2.5 GiB of kernel memory.
const MAX_MAP_ENTRIES: u32 = 1 << 24;
/// Maglev chunks are 16 KiB each: 2^17 of them would be 2 GiB.
const MAX_MAGLEV_CHUNKS: u32 = 1 << 17;

impl MapsConfig {
    /// The defaults, as the eBPF object declares them (`weir_common::capacity`).
    pub const DEFAULT: MapsConfig = {
        use weir_common::capacity;
        MapsConfig {
            conntrack: capacity::CONNTRACK,
            ct_new: capacity::CT_NEW,
            ct_moved_arrivals: capacity::CT_MOVED_ARRIVALS,
            affinity: capacity::AFFINITY,
            services: capacity::SERVICES,
            backend_slots: capacity::BACKEND_SLOTS,
            backends: capacity::BACKENDS,
            maglev: capacity::MAGLEV,
            source_ranges: capacity::SOURCE_RANGES,
            sock_reverse: capacity::SOCK_REVERSE,
            host_addrs: capacity::HOST_ADDRS,
            tunnel_peers: capacity::TUNNEL_PEERS,
            pod_interfaces: capacity::POD_INTERFACES,
        }
    };

    /// Every configurable map with its capacity: the one place that says which key sizes which
    /// map. Loading, admission and the capacity metrics all read it.
    pub fn capacities(&self) -> [MapCapacity; 13] {
        use weir_common::map_names;
        let row = |key, map, entries, max| MapCapacity {
            key,
            map,
            entries,
            max,
        };
        [
            row(
                "conntrack",
                map_names::CONNTRACK,
                self.conntrack,
                MAX_MAP_ENTRIES,
            ),
            row("ct_new", map_names::CT_NEW, self.ct_new, MAX_MAP_ENTRIES),
            row(
                "ct_moved_arrivals",
                map_names::CT_MOVED_ARRIVALS,
                self.ct_moved_arrivals,
                MAX_MAP_ENTRIES,
            ),
            row(
                "affinity",
                map_names::AFFINITY,
                self.affinity,
                MAX_MAP_ENTRIES,
            ),
            row(
                "services",
                map_names::SERVICES,
                self.services,
                MAX_MAP_ENTRIES,
            ),
            row(
                "backend_slots",
                map_names::BACKEND_SLOTS,
                self.backend_slots,
                MAX_MAP_ENTRIES,
            ),
            row(
                "backends",
                map_names::BACKENDS,
                self.backends,
                MAX_MAP_ENTRIES,
            ),
            row("maglev", map_names::MAGLEV, self.maglev, MAX_MAGLEV_CHUNKS),
            row(
                "source_ranges",
                map_names::SOURCE_RANGES,
                self.source_ranges,
                MAX_MAP_ENTRIES,
            ),
            row(
                "sock_reverse",
                map_names::SOCK_REVERSE,
                self.sock_reverse,
                MAX_MAP_ENTRIES,
            ),
            row(
                "host_addrs",
                map_names::HOST_ADDRS,
                self.host_addrs,
                MAX_MAP_ENTRIES,
            ),
            row(
                "tunnel_peers",
                map_names::TUNNEL_PEERS,
                self.tunnel_peers,
                MAX_MAP_ENTRIES,
            ),
            row(
                "pod_interfaces",
                map_names::POD_INTERFACES,
                self.pod_interfaces,
                MAX_MAP_ENTRIES,
            ),
        ]
    }

    /// The capacity of map `name` (as pinned), if it is configurable.
    pub fn capacity_of(&self, name: &str) -> Option<u32> {
        self.capacities()
            .into_iter()
            .find(|c| c.map == name)
            .map(|c| c.entries)
    }

    /// Capacities by map name, as [`crate::dataplane::LoadOptions::max_entries`] takes them.
    pub fn max_entries(&self) -> Vec<(&'static str, u32)> {
        self.capacities()
            .into_iter()
            .map(|c| (c.map, c.entries))
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for c in self.capacities() {
            if c.entries == 0 || c.entries > c.max {
                return Err(ConfigError::Invalid(format!(
                    "maps.{} = {}: must be between 1 and {} entries",
                    c.key, c.entries, c.max
                )));
            }
        }
        Ok(())
    }
}

impl Default for MapsConfig {
    fn default() -> Self {
        MapsConfig::DEFAULT
    }
}

/// Limits every HTTP listener of the agent applies (the operations endpoint, healthz, and the
/// healthCheckNodePorts, which share one budget), so idle or slow clients cannot hold its file
/// descriptors. See `agent/src/fd_budget.rs` for how the caps fit the descriptor limit.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Connections one listener holds open at once. A new connection over the cap closes the
    /// oldest one waiting for a request (or, when every one is mid-request, is closed itself).
    pub max_connections: usize,
    /// A client must send a complete request head within this, on a new connection and between
    /// requests of a kept-alive one (slowloris, idle connections).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The longest a connection stays open, whatever it does (a client that never reads).
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            // Probes and scrapes open one connection at a time: 64 is plenty, and small next to
            // any descriptor limit (three listeners use at most 192).
            max_connections: 64,
            // A kubelet probe's or a load balancer's request arrives within milliseconds.
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// healthCheckNodePort listeners.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Ports a Service's healthCheckNodePort may not take, because the node needs them: the
    /// agent refuses them (logged, and counted in `weir_rejected_objects_total`). The agent's own
    /// `metrics_listen` and `healthz_listen` ports are always refused too.
    pub reserved_ports: Vec<PortRange>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            reserved_ports: NODE_CONTROL_PORTS.to_vec(),
        }
    }
}

/// The TCP ports a node's operation depends on: no Service may take them
/// ([`HealthCheckConfig`]) and no deny-list or host policy may close them
/// ([`FailsafeConfig`]).
const NODE_CONTROL_PORTS: [PortRange; 4] = [
    // sshd: losing it locks the operator out of the node.
    PortRange::one(22),
    // etcd's client and peer ports, on control-plane nodes.
    PortRange::new(2379, 2380),
    // The API server's secure port.
    PortRange::one(6443),
    // The kubelet (10248 healthz, 10250 API, 10255 read-only), kube-proxy (10249 metrics,
    // 10256 healthz), the scheduler (10259) and controller manager (10257).
    PortRange::new(10248, 10259),
];

/// Ports that stay open whatever a deny-list (the XDP pre-filter) or host policy says
/// (`[failsafe]`), as Calico's failsafe ports: so neither can cut a node off. The agent's own
/// `metrics_listen` and `healthz_listen` ports are inbound failsafe ports too.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FailsafeConfig {
    /// The node's own ports, open to any source: `"tcp:22"`, `"tcp:2379-2380"`, `"udp:68"`.
    pub inbound: Vec<FailsafePorts>,
    /// Remote ports the node's processes may always reach.
    pub outbound: Vec<FailsafePorts>,
}

impl Default for FailsafeConfig {
    fn default() -> Self {
        let tcp = |ports| FailsafePorts {
            protocol: FailsafeProtocol::Tcp,
            ports,
        };
        let udp = |port| FailsafePorts {
            protocol: FailsafeProtocol::Udp,
            ports: PortRange::one(port),
        };
        let mut inbound: Vec<FailsafePorts> = NODE_CONTROL_PORTS.into_iter().map(tcp).collect();
        // BGP (a routing daemon peering with the fabric) and DHCP's replies to the node.
        inbound.extend([tcp(PortRange::one(179)), udp(68)]);
        let outbound = vec![
            // DNS, DHCP, BGP, etcd and the API server, as Calico's defaults.
            udp(53),
            tcp(PortRange::one(53)),
            udp(67),
            tcp(PortRange::one(179)),
            tcp(PortRange::new(2379, 2380)),
            tcp(PortRange::one(6443)),
        ];
        FailsafeConfig { inbound, outbound }
    }
}

/// A protocol and a range of ports, written `"tcp:22"` or `"udp:53"` or `"tcp:2379-2380"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FailsafePorts {
    pub protocol: FailsafeProtocol,
    pub ports: PortRange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailsafeProtocol {
    Tcp,
    Udp,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a failsafe port like \"tcp:22\", \"udp:53\" or \"tcp:2379-2380\"")]
pub struct FailsafePortsError(String);

impl TryFrom<String> for FailsafePorts {
    type Error = FailsafePortsError;

    fn try_from(text: String) -> Result<Self, FailsafePortsError> {
        let bad = || FailsafePortsError(text.clone());
        let (protocol, ports) = text.split_once(':').ok_or_else(bad)?;
        let protocol = match protocol.trim().to_ascii_lowercase().as_str() {
            "tcp" => FailsafeProtocol::Tcp,
            "udp" => FailsafeProtocol::Udp,
            _ => return Err(bad()),
        };
        let ports =
            PortRange::try_from(PortRangeText::Range(ports.to_owned())).map_err(|_| bad())?;
        Ok(FailsafePorts { protocol, ports })
    }
}

impl From<FailsafePorts> for String {
    fn from(f: FailsafePorts) -> String {
        let protocol = match f.protocol {
            FailsafeProtocol::Tcp => "tcp",
            FailsafeProtocol::Udp => "udp",
        };
        match PortRangeText::from(f.ports) {
            PortRangeText::One(port) => format!("{protocol}:{port}"),
            PortRangeText::Range(range) => format!("{protocol}:{range}"),
        }
    }
}

/// The XDP pre-filter on the host interfaces (`[prefilter]`): packets from deny-listed source
/// prefixes are dropped before the stack sees them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PrefilterConfig {
    /// Attach the pre-filter to every host interface. Off by default: an XDP program sees every
    /// packet of the node's uplinks, so it is the operator's choice.
    pub enabled: bool,
    /// Source prefixes to drop, IPv4 and IPv6 (`"203.0.113.0/24"`, `"2001:db8::/32"`; a bare
    /// address is one host).
    pub deny: Vec<String>,
    /// Native XDP (in the driver), generic (in the stack, any driver), or native where the
    /// driver has it and generic elsewhere.
    pub mode: XdpMode,
    /// A deny-listed source still reaches the inbound failsafe ports (`[failsafe]`). Turn off
    /// only when a deny-listed address must not reach even those.
    pub failsafe_exempt: bool,
}

impl Default for PrefilterConfig {
    fn default() -> Self {
        PrefilterConfig {
            enabled: false,
            deny: Vec::new(),
            mode: XdpMode::Auto,
            failsafe_exempt: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Generic,
}

/// An inclusive range of ports, written `22` or `"10248-10259"` in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PortRangeText", into = "PortRangeText")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn one(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub const fn new(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a port or a range of ports like \"10248-10259\"")]
pub struct PortRangeError(String);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PortRangeText {
    One(u16),
    Range(String),
}

impl TryFrom<PortRangeText> for PortRange {
    type Error = PortRangeError;

    fn try_from(text: PortRangeText) -> Result<Self, PortRangeError> {
        let range = match text {
            PortRangeText::One(port) => return Ok(PortRange::one(port)),
            PortRangeText::Range(range) => range,
        };
        let bad = || PortRangeError(range.clone());
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first.trim(), last.trim()),
            None => (range.trim(), range.trim()),
        };
        let first: u16 = first.parse().map_err(|_| bad())?;
        let last: u16 = last.parse().map_err(|_| bad())?;
        if first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl From<PortRange> for PortRangeText {
    fn from(range: PortRange) -> Self {
        if range.first == range.last {
            PortRangeText::One(range.first)
        } else {
            PortRangeText::Range(format!("{}-{}", range.first, range.last))
        }
    }
}

/// Connect-time load balancing for the node's own sockets (cgroup sock_addr hooks), so host
/// processes (kubelet, hostNetwork pods, a shell on the node) reach ClusterIPs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostServicesConfig {
    pub enabled: bool,
    /// A cgroup v2 directory: processes in it and below are served. The root of the unified
    /// hierarchy covers every process of the node.
    pub cgroup: PathBuf,
}

impl Default for HostServicesConfig {
    fn default() -> Self {
        HostServicesConfig {
            // Off until asked for: the hooks act on every process of the cgroup.
            enabled: false,
            cgroup: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// NetworkPolicy enforcement (`[policy]`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Watch Pods, Namespaces and NetworkPolicies and enforce the policies. On by default (the
    /// shipped RBAC grants the watches); off, the Kubernetes source neither watches nor waits
    /// for those kinds and the policy maps are emptied.
    pub enabled: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { enabled: true }
    }
}

/// How external traffic (NodePort, load-balancer and external IPs) reaches a backend on
/// another node, and how that backend's replies return.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalReturn {
    /// The ingress node translates and tunnels; replies come back through it.
    #[default]
    Ingress,
    /// Direct server return: the backend's node translates and replies to the client itself.
    Dsr,
}

/// Who sends a translated packet on its way to its next hop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Weir itself: a FIB lookup, then a redirect straight into a local pod's namespace or out
    /// of a host interface. What the FIB cannot answer goes to the stack.
    #[default]
    Redirect,
    /// The kernel's routing stack, netfilter's FORWARD hooks included, as kube-proxy leaves it.
    Stack,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancing {
    #[default]
    Random,
    /// Consistent hashing: every node picks the same backend for a flow.
    Maglev,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub external_return: ExternalReturn,
    /// Who forwards translated packets: Weir (`redirect`) or the stack.
    pub forwarding: Forwarding,
    /// Backend choice for external traffic (ClusterIP traffic always picks at random).
    pub external_load_balancing: LoadBalancing,
    /// Source address a pod sees when its own service sends it its own connection (hairpin):
    /// an address nothing else uses, routed back through the node.
    pub hairpin_ipv4: Ipv4Addr,
    pub hairpin_ipv6: Ipv6Addr,
    /// The API server's `--service-node-port-range`: NodePorts outside it are refused, and so
    /// is any port outside it on an external or load-balancer IP that is a node's address, so
    /// no Service can capture the node's own ports (SSH, the kubelet, the agent's listeners).
    pub node_port_range: NodePortRange,
    /// The smallest Maglev table, in entries (one of 251, 509, 1021, 2039, 4093, 8191, 16381,
    /// 32749, 65521, 131071): a service gets the smallest of these that is at least this and
    /// gives each of its endpoints 100 entries.
    pub maglev_table_size: u32,
}

/// An inclusive port range, written `"30000-32767"` as the API server's flag takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl NodePortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Default for NodePortRange {
    /// Kubernetes' default.
    fn default() -> Self {
        NodePortRange {
            first: 30000,
            last: 32767,
        }
    }
}

impl TryFrom<String> for NodePortRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let parsed = text.split_once('-').and_then(|(first, last)| {
            Some((
                first.trim().parse::<u16>().ok()?,
                last.trim().parse::<u16>().ok()?,
            ))
        });
        match parsed {
            Some((first, last)) if first >= 1 && first <= last => Ok(NodePortRange { first, last }),
            _ => Err(format!(
                "node_port_range {text:?}: expected FIRST-LAST, 1 <= FIRST <= LAST <= 65535"
            )),
        }
    }
}

impl From<NodePortRange> for String {
    fn from(range: NodePortRange) -> String {
        format!("{}-{}", range.first, range.last)
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            external_return: ExternalReturn::Ingress,
            forwarding: Forwarding::Redirect,
            external_load_balancing: LoadBalancing::Random,
            // Link-local, like Cilium's hairpin address: never a real peer's.
            hairpin_ipv4: Ipv4Addr::new(169, 254, 42, 1),
            hairpin_ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0xa9fe, 0x2a, 1),
            node_port_range: NodePortRange::default(),
            maglev_table_size: crate::compile::DEFAULT_MAGLEV_MIN_SIZE,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// External traffic for remote backends is routed natively: replies must come back through
    /// the ingress node by the network's own routing.
    None,
    /// VXLAN over UDP: both families inside, either family outside, and a tunnel id that says
    /// what each packet asks of the receiving node.
    #[default]
    Vxlan,
    /// IPIP: IPv4 inside IPv4 only, 30 bytes less overhead than VXLAN; every node of the
    /// cluster must use the same `services.external_return`, which IPIP cannot carry.
    Ipip,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub mode: TunnelMode,
    /// The collect-metadata device the agent creates (or adopts) in its network namespace;
    /// empty for the mode's own name (`weir-vxlan`, `weir-ipip`).
    pub interface: String,
    pub vxlan_port: u16,
    /// Where the node's `/proc/sys/net` can be written: the tunnel device's sysctls go there.
    /// A container's own `/proc/sys` is read-only; the DaemonSet mounts the host's at
    /// `/host/proc/sys/net` (what is read and written there is the network namespace of the
    /// process that writes, the node's for a hostNetwork pod).
    pub proc_sys_net: PathBuf,
}

impl TunnelConfig {
    pub fn device(&self) -> &str {
        match (self.interface.is_empty(), self.mode) {
            (false, _) => &self.interface,
            (true, TunnelMode::Ipip) => "weir-ipip",
            (true, _) => "weir-vxlan",
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            mode: TunnelMode::Vxlan,
            interface: String::new(),
            vxlan_port: 4789,
            proc_sys_net: PathBuf::from("/proc/sys/net"),
        }
    }
}

/// One layer of configuration: every key optional. The file is parsed into this; flags and
/// environment fill one from the command line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub node_name: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub source: Option<SourceKind>,
    pub state_path: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub host_interfaces: Option<Vec<String>>,
    pub pod_interface_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub drift_check_interval: Option<Duration>,
    pub metrics_listen: Option<SocketAddr>,
    pub healthz_listen: Option<SocketAddr>,
    pub detach_on_exit: Option<bool>,
    pub max_endpoints_per_service: Option<u32>,
    pub log_format: Option<LogFormat>,
    pub conntrack: Option<ConntrackConfig>,
    pub services: Option<ServicesConfig>,
    pub tunnel: Option<TunnelConfig>,
    pub host_services: Option<HostServicesConfig>,
    pub policy: Option<PolicyConfig>,
    pub prefilter: Option<PrefilterConfig>,
    pub failsafe: Option<FailsafeConfig>,
    pub http: Option<HttpConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub maps: Option<MapsConfig>,
}

/// The flag and environment layer, as `weir-agent run` takes it.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file; flags and environment override its keys.
    #[arg(long, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (in a DaemonSet: from the downward API, spec.nodeName).
    #[arg(long, env = "WEIR_NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/weir].
    #[arg(long, env = "WEIR_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Where desired state comes from [default: file].
    #[arg(long, env = "WEIR_SOURCE", value_enum)]
    pub source: Option<SourceKind>,
    /// The YAML file or directory of the file source.
    #[arg(long, env = "WEIR_STATE_PATH")]
    pub state_path: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes source [default: in-cluster, $KUBECONFIG, ~/.kube/config].
    #[arg(long, env = "WEIR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Host-facing interface; repeat the flag, or separate by commas in the environment.
    #[arg(
        long = "host-interface",
        env = "WEIR_HOST_INTERFACES",
        value_delimiter = ','
    )]
    pub host_interfaces: Option<Vec<String>>,
    /// Name prefix of pod-facing interfaces [default: wp].
    #[arg(long, env = "WEIR_POD_INTERFACE_PREFIX")]
    pub pod_interface_prefix: Option<String>,
    /// How often files and interfaces are checked, e.g. 500ms [default: 500ms].
    #[arg(long, env = "WEIR_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Listen address of /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "WEIR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Listen address of kube-proxy's /healthz and /livez, for load balancers
    /// [default: 0.0.0.0:10256].
    #[arg(long, env = "WEIR_HEALTHZ_LISTEN")]
    pub healthz_listen: Option<SocketAddr>,
    /// Detach the programs on SIGTERM/SIGINT instead of leaving them forwarding.
    #[arg(long, env = "WEIR_DETACH_ON_EXIT", num_args = 0..=1, default_missing_value = "true")]
    pub detach_on_exit: Option<bool>,
    /// Services with more endpoints than this are rejected [default: 4096].
    #[arg(long, env = "WEIR_MAX_ENDPOINTS_PER_SERVICE")]
    pub max_endpoints_per_service: Option<u32>,
}

impl ConfigArgs {
    fn layer(&self, log_format: Option<LogFormat>) -> ConfigLayer {
        ConfigLayer {
            node_name: self.node_name.clone(),
            pin_dir: self.pin_dir.clone(),
            source: self.source,
            state_path: self.state_path.clone(),
            kubeconfig: self.kubeconfig.clone(),
            host_interfaces: self.host_interfaces.clone(),
            pod_interface_prefix: self.pod_interface_prefix.clone(),
            poll_interval: self.poll_interval,
            drift_check_interval: None,
            metrics_listen: self.metrics_listen,
            healthz_listen: self.healthz_listen,
            detach_on_exit: self.detach_on_exit,
            max_endpoints_per_service: self.max_endpoints_per_service,
            log_format,
            conntrack: None,
            services: None,
            tunnel: None,
            host_services: None,
            policy: None,
            prefilter: None,
            failsafe: None,
            http: None,
            health_check: None,
            maps: None,
        }
    }
}

impl ConfigLayer {
    /// Reads a TOML file; unknown keys are an error, so a typo is never silently ignored.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Keys set here win; the rest come from `lower`.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        ConfigLayer {
            node_name: self.node_name.or(lower.node_name),
            pin_dir: self.pin_dir.or(lower.pin_dir),
            source: self.source.or(lower.source),
            state_path: self.state_path.or(lower.state_path),
            kubeconfig: self.kubeconfig.or(lower.kubeconfig),
            host_interfaces: self.host_interfaces.or(lower.host_interfaces),
            pod_interface_prefix: self.pod_interface_prefix.or(lower.pod_interface_prefix),
            poll_interval: self.poll_interval.or(lower.poll_interval),
            drift_check_interval: self.drift_check_interval.or(lower.drift_check_interval),
            metrics_listen: self.metrics_listen.or(lower.metrics_listen),
            healthz_listen: self.healthz_listen.or(lower.healthz_listen),
            detach_on_exit: self.detach_on_exit.or(lower.detach_on_exit),
            max_endpoints_per_service: self
                .max_endpoints_per_service
                .or(lower.max_endpoints_per_service),
            log_format: self.log_format.or(lower.log_format),
            conntrack: self.conntrack.or(lower.conntrack),
            services: self.services.or(lower.services),
            tunnel: self.tunnel.or(lower.tunnel),
            host_services: self.host_services.or(lower.host_services),
            policy: self.policy.or(lower.policy),
            prefilter: self.prefilter.or(lower.prefilter),
            failsafe: self.failsafe.or(lower.failsafe),
            http: self.http.or(lower.http),
            health_check: self.health_check.or(lower.health_check),
            maps: self.maps.or(lower.maps),
        }
    }

    /// Fills defaults and validates.
    pub fn finish(self) -> Result<AgentConfig, ConfigError> {
        let config = self.with_defaults()?;
        config.validate()?;
        Ok(config)
    }

    /// Fills defaults; only a missing node name is an error.
    fn with_defaults(self) -> Result<AgentConfig, ConfigError> {
        Ok(AgentConfig {
            node_name: self
                .node_name
                .ok_or_else(|| ConfigError::Invalid("node_name is not set".into()))?,
            pin_dir: self.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            source: self.source.unwrap_or_default(),
            state_path: self.state_path,
            kubeconfig: self.kubeconfig,
            host_interfaces: self.host_interfaces.unwrap_or_default(),
            pod_interface_prefix: self.pod_interface_prefix.unwrap_or_else(default_pod_prefix),
            poll_interval: self.poll_interval.unwrap_or(DEFAULT_POLL),
            drift_check_interval: self
                .drift_check_interval
                .unwrap_or(DEFAULT_DRIFT_CHECK_INTERVAL),
            metrics_listen: self
                .metrics_listen
                .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            healthz_listen: self
                .healthz_listen
                .unwrap_or_else(|| DEFAULT_HEALTHZ_LISTEN.parse().expect("valid default")),
            detach_on_exit: self.detach_on_exit.unwrap_or(false),
            max_endpoints_per_service: self
                .max_endpoints_per_service
                .unwrap_or(DEFAULT_MAX_ENDPOINTS_PER_SERVICE),
            log_format: self.log_format.unwrap_or_default(),
            conntrack: self.conntrack.unwrap_or_default(),
            services: self.services.unwrap_or_default(),
            tunnel: self.tunnel.unwrap_or_default(),
            host_services: self.host_services.unwrap_or_default(),
            policy: self.policy.unwrap_or_default(),
            prefilter: self.prefilter.unwrap_or_default(),
            failsafe: self.failsafe.unwrap_or_default(),
            http: self.http.unwrap_or_default(),
            health_check: self.health_check.unwrap_or_default(),
            maps: self.maps.unwrap_or_default(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// How often expired entries are reclaimed.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// TCP connection whose SYN got no answer yet.
    #[serde(with = "humantime_serde")]
    pub tcp_syn_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_established_timeout: Duration,
    /// After FIN in both directions or any RST.
    #[serde(with = "humantime_serde")]
    pub tcp_closing_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub udp_timeout: Duration,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        // The kernel's nf_conntrack defaults for the same states, so behaviour matches kube-proxy.
        ConntrackConfig {
            gc_interval: Duration::from_secs(10),
            tcp_syn_timeout: Duration::from_secs(60),
            tcp_established_timeout: Duration::from_secs(5 * 24 * 3600),
            tcp_closing_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(30),
        }
    }
}

fn default_pod_prefix() -> String {
    "wp".to_owned()
}

const DEFAULT_POLL: Duration = Duration::from_millis(500);
const DEFAULT_DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_ENDPOINTS_PER_SERVICE: u32 = 4096;

impl AgentConfig {
    /// The file layer alone (plus defaults).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        ConfigLayer::from_file(path)?.finish()
    }

    /// Flags and environment (as clap parsed them, flag over variable) over the file named by
    /// `--config`/`WEIR_CONFIG`, over defaults. `log_format` is the global flag's value.
    pub fn resolve(args: &ConfigArgs, log_format: Option<LogFormat>) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        args.layer(log_format).over(file).finish()
    }

    /// As [`AgentConfig::resolve`], for the tools that read a node's state (`status`, `dump`):
    /// they need its pin directory and listen addresses, not its name, which defaults to the
    /// host name.
    pub fn resolve_for_tools(
        args: &ConfigArgs,
        log_format: Option<LogFormat>,
    ) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|n| n.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let mut layer = args.layer(log_format).over(file);
        layer.node_name.get_or_insert(host_name);
        // Not validated: a tool reading a node's pins needs none of what `run` checks.
        layer.with_defaults()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid("node_name is empty".into()));
        }
        if !weir_common::MAGLEV_SIZES.contains(&self.services.maglev_table_size) {
            return Err(ConfigError::Invalid(format!(
                "services.maglev_table_size = {}: must be one of {:?}",
                self.services.maglev_table_size,
                weir_common::MAGLEV_SIZES
            )));
        }
        if self.pod_interface_prefix.is_empty() {
            return Err(ConfigError::Invalid(
                "pod_interface_prefix is empty: it would match every interface".into(),
            ));
        }
        if self.tunnel.mode != TunnelMode::None && self.tunnel.interface.len() > 15 {
            return Err(ConfigError::Invalid(
                "tunnel.interface must be at most 15 characters (a Linux interface name)".into(),
            ));
        }
        if self.conntrack.gc_interval.is_zero()
            || self.poll_interval.is_zero()
            || self.drift_check_interval.is_zero()
        {
            return Err(ConfigError::Invalid("intervals must be positive".into()));
        }
        if self.source == SourceKind::File && self.state_path.is_none() {
            return Err(ConfigError::Invalid(
                "source = \"file\" needs state_path (--state-path, WEIR_STATE_PATH)".into(),
            ));
        }
        if self.host_services.enabled && !self.host_services.cgroup.is_absolute() {
            return Err(ConfigError::Invalid(
                "host_services.cgroup must be an absolute path (a cgroup v2 directory)".into(),
            ));
        }
        if self.max_endpoints_per_service == 0 {
            return Err(ConfigError::Invalid(
                "max_endpoints_per_service must be positive".into(),
            ));
        }
        if self.http.max_connections == 0
            || self.http.header_timeout.is_zero()
            || self.http.connection_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "http.max_connections and the http timeouts must be positive".into(),
            ));
        }
        self.maps.validate()?;
        for (i, prefix) in self.prefilter.deny.iter().enumerate() {
            crate::prefilter::parse_prefix(prefix).map_err(|e| {
                ConfigError::Invalid(format!("prefilter.deny[{i}] = {prefix:?}: {e}"))
            })?;
        }
        if overlaps(self.metrics_listen, self.healthz_listen) {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen {} and healthz_listen {} cannot both be bound",
                self.metrics_listen, self.healthz_listen
            )));
        }
        Ok(())
    }

    /// Ports no healthCheckNodePort may take: the configured ones and the agent's own.
    pub fn reserved_health_check_ports(&self) -> Vec<PortRange> {
        let mut reserved = self.health_check.reserved_ports.clone();
        reserved.extend(self.own_tcp_ports().map(PortRange::one));
        reserved
    }

    /// The TCP ports the agent itself listens on (`metrics_listen`, `healthz_listen`; 0, a
    /// port the kernel picks, left out): no Service may take them and no deny-list closes them.
    pub fn own_tcp_ports(&self) -> impl Iterator<Item = u16> {
        [self.metrics_listen.port(), self.healthz_listen.port()]
            .into_iter()
            .filter(|port| *port != 0)
    }

    pub fn is_reserved_health_check_port(&self, port: u16) -> bool {
        self.reserved_health_check_ports()
            .iter()
            .any(|r| r.contains(port))
    }

    /// Where this agent's maps live: `pin_dir/v<layout>`.
    pub fn versioned_pin_dir(&self) -> PathBuf {
        versioned_pin_dir(&self.pin_dir)
    }

    /// Older layouts' map directories beside [`AgentConfig::versioned_pin_dir`], newest first.
    pub fn older_versioned_pin_dirs(&self) -> Vec<(u32, PathBuf)> {
        older_versioned_pin_dirs(&self.pin_dir)
    }

    /// Where the program links live: outside the versioned map directory, because a new agent
    /// with a new map layout still takes over the same links (replacing their programs).
    pub fn link_pin_dir(&self) -> PathBuf {
        link_pin_dir(&self.pin_dir)
    }
}

/// Two listen addresses that would take the same socket (same port, and the same address or
/// either unspecified).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

pub fn versioned_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{}", weir_common::MAP_LAYOUT_VERSION))
}

pub fn link_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The map directories older layouts left beside this one (`pin_dir/v<N>`, N below
/// [`weir_common::MAP_LAYOUT_VERSION`]), newest first: where a new agent finds the flows an
/// older one tracked. Newer layouts' directories (a downgrade) are not this agent's to touch.
pub fn older_versioned_pin_dirs(pin_dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut older: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version: u32 = name.to_str()?.strip_prefix('v')?.parse().ok()?;
            (version < weir_common::MAP_LAYOUT_VERSION && entry.path().is_dir())
                .then(|| (version, entry.path()))
        })
        .collect();
    older.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    older
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConfigArgs,
    }

    fn parse(argv: &[&str]) -> ConfigArgs {
        Cli::try_parse_from(std::iter::once("weir-agent").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    const FILE: &str = r#"
node_name = "from-file"
pin_dir = "/sys/fs/bpf/file"
state_path = "/run/cluster.yaml"
metrics_listen = "127.0.0.1:1111"
poll_interval = "2s"
host_interfaces = ["eth0"]
[conntrack]
udp_timeout = "3s"
[host_services]
enabled = true
cgroup = "/sys/fs/cgroup/unified"
"#;

    #[test]
    fn defaults_fill_what_no_layer_sets() {
        let config = ConfigLayer {
            node_name: Some("n".into()),
            state_path: Some("/s".into()),
            ..Default::default()
        }
        .finish()
        .unwrap();
        assert_eq!(config.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(config.pin_dir, Path::new(DEFAULT_PIN_DIR));
        assert_eq!(config.source, SourceKind::File);
        assert!(!config.detach_on_exit);
        assert_eq!(config.poll_interval, DEFAULT_POLL);
        assert!(!config.host_services.enabled, "host services are opt-in");
        assert!(
            config.policy.enabled,
            "NetworkPolicy is enforced by default"
        );
        assert!(
            config.metrics_listen.ip().is_loopback(),
            "metrics stay on the node by default"
        );
        assert_eq!(config.healthz_listen.to_string(), DEFAULT_HEALTHZ_LISTEN);
        assert_eq!(config.http, HttpConfig::default());
        for port in [22, 2379, 2380, 6443, 10248, 10250, 10256, 10259, 9464] {
            assert!(config.is_reserved_health_check_port(port), "{port}");
        }
        for port in [30000, 32767, 10247, 10260] {
            assert!(!config.is_reserved_health_check_port(port), "{port}");
        }
    }

    #[test]
    fn reserved_ports_are_ports_or_ranges_and_listeners_must_not_collide() {
        let layer: ConfigLayer = toml::from_str(
            "node_name = \"n\"\nsource = \"kubernetes\"\n\
             [health_check]\nreserved_ports = [22, \"30000-30002\"]\n\
             [http]\nmax_connections = 8\nheader_timeout = \"1s\"\n",
        )
        .unwrap();
        let config = layer.finish().unwrap();
        assert!(config.is_reserved_health_check_port(30001));
        assert!(
            !config.is_reserved_health_check_port(10250),
            "a list replaces the defaults"
        );
        assert_eq!(config.http.max_connections, 8);
        assert_eq!(
            config.http.connection_timeout,
            HttpConfig::default().connection_timeout
        );
        for bad in ["[\"9-1\"]", "[\"x\"]", "[70000]"] {
            let text = format!("[health_check]\nreserved_ports = {bad}\n");
            assert!(toml::from_str::<ConfigLayer>(&text).is_err(), "{bad}");
        }
        let text = toml::to_string(&config.health_check).unwrap();
        assert_eq!(text, "reserved_ports = [22, \"30000-30002\"]\n");

        let clash = ConfigLayer {
            node_name: Some("n".into()),
            source: Some(SourceKind::Kubernetes),
            metrics_listen: Some("127.0.0.1:10256".parse().unwrap()),
            ..Default::default()
        };
        assert!(
            clash.finish().is_err(),
            "0.0.0.0:10256 covers 127.0.0.1:10256"
        );
        let zero = ConfigLayer {
            node_name: Some("n".into()),
            source: Some(SourceKind::Kubernetes),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            healthz_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        assert!(zero.finish().is_ok(), "two ephemeral ports never collide");
    }

    #[test]
    fn the_file_parses_with_humantime_and_rejects_unknown_keys() {
        let layer: ConfigLayer = toml::from_str(FILE).unwrap();
        let config = layer.finish().unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(2));
        assert_eq!(config.conntrack.udp_timeout, Duration::from_secs(3));
        assert_eq!(
            config.conntrack.gc_interval,
            ConntrackConfig::default().gc_interval
        );
        assert!(toml::from_str::<ConfigLayer>("metrics_listn = \"1.2.3.4:5\"").is_err());
        assert!(config.host_services.enabled);
        assert_eq!(
            config.host_services.cgroup,
            Path::new("/sys/fs/cgroup/unified")
        );
        let relative: ConfigLayer =
            toml::from_str(&FILE.replace("/sys/fs/cgroup/unified", "cg")).unwrap();
        assert!(
            relative.finish().is_err(),
            "a relative cgroup path is refused"
        );
    }

    #[test]
    fn policy_can_be_turned_off() {
        let layer: ConfigLayer = toml::from_str(
            "node_name = \"n1\"\nstate_path = \"/s.yaml\"\n[policy]\nenabled = false\n",
        )
        .unwrap();
        assert!(!layer.finish().unwrap().policy.enabled);
        assert!(toml::from_str::<ConfigLayer>("[policy]\nenable = false\n").is_err());
    }

    /// Flag over environment over file over default, in one test because the environment is
    /// process-wide and tests run on parallel threads; no other test reads these variables.
    #[test]
    fn flags_beat_environment_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, FILE).unwrap();
        let config = path.to_str().unwrap();

        let from_file = AgentConfig::resolve(&parse(&["--config", config]), None).unwrap();
        assert_eq!(from_file.node_name, "from-file");
        assert_eq!(from_file.metrics_listen.to_string(), "127.0.0.1:1111");

        // Only this test reads these variables, so setting them cannot disturb another thread.
        std::env::set_var("WEIR_METRICS_LISTEN", "127.0.0.1:2222");
        std::env::set_var("WEIR_POLL_INTERVAL", "750ms");
        std::env::set_var("WEIR_HOST_INTERFACES", "eth1,eth2");
        let from_env = AgentConfig::resolve(&parse(&["--config", config]), None).unwrap();
        assert_eq!(from_env.metrics_listen.to_string(), "127.0.0.1:2222");
        assert_eq!(from_env.poll_interval, Duration::from_millis(750));
        assert_eq!(from_env.host_interfaces, ["eth1", "eth2"]);
        assert_eq!(from_env.node_name, "from-file", "unset in env: the file's");

        let from_flags = AgentConfig::resolve(
            &parse(&[
                "--config",
                config,
                "--metrics-listen",
                "127.0.0.1:3333",
                "--node-name",
                "from-flag",
                "--detach-on-exit",
                "--host-interface",
                "eth9",
            ]),
            Some(LogFormat::Json),
        )
        .unwrap();
        std::env::remove_var("WEIR_METRICS_LISTEN");
        std::env::remove_var("WEIR_POLL_INTERVAL");
        std::env::remove_var("WEIR_HOST_INTERFACES");
        assert_eq!(from_flags.metrics_listen.to_string(), "127.0.0.1:3333");
        assert_eq!(from_flags.node_name, "from-flag");
        assert!(from_flags.detach_on_exit);
        assert_eq!(from_flags.host_interfaces, ["eth9"]);
        assert_eq!(from_flags.poll_interval, Duration::from_millis(750));
        assert_eq!(from_flags.log_format, LogFormat::Json);
    }

    #[test]
    fn map_sizes_are_validated_by_key_and_feed_loading_by_map_name() {
        let layer: ConfigLayer = toml::from_str(
            "node_name = \"n\"\nsource = \"kubernetes\"\n[maps]\nconntrack = 1048576\nct_moved_arrivals = 4096\n",
        )
        .unwrap();
        let config = layer.finish().unwrap();
        assert_eq!(config.maps.conntrack, 1 << 20);
        assert_eq!(
            config
                .maps
                .capacity_of(weir_common::map_names::CT_MOVED_ARRIVALS),
            Some(4096)
        );
        assert_eq!(
            config.maps.affinity,
            weir_common::capacity::AFFINITY,
            "unset keys keep the object's default"
        );
        let entries = config.maps.max_entries();
        assert!(entries.contains(&(weir_common::map_names::CONNTRACK, 1 << 20)));
        assert_eq!(
            config.maps.capacity_of(weir_common::map_names::MAGLEV),
            Some(weir_common::capacity::MAGLEV)
        );
        for (bad, key) in [
            ("conntrack = 0", "maps.conntrack = 0"),
            ("maglev = 1000000", "maps.maglev = 1000000"),
            ("tunnel_peers = 4294967295", "maps.tunnel_peers"),
        ] {
            let text = format!("node_name = \"n\"\nsource = \"kubernetes\"\n[maps]\n{bad}\n");
            let error = toml::from_str::<ConfigLayer>(&text)
                .unwrap()
                .finish()
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{bad}: {error}");
        }
        assert!(
            toml::from_str::<ConfigLayer>("[maps]\nconntrak = 5\n").is_err(),
            "a misspelt map is an error, not a default"
        );
        assert!(toml::from_str::<ConfigLayer>("[maps]\nconntrack = -1\n").is_err());
    }

    #[test]
    fn older_layouts_pin_directories_are_found_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let current = weir_common::MAP_LAYOUT_VERSION;
        for name in [
            "v1",
            "v2",
            "links",
            "vx",
            &format!("v{current}"),
            &format!("v{}", current + 1),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("v0"), "a file, not a directory").unwrap();
        let older = older_versioned_pin_dirs(dir.path());
        assert_eq!(
            older,
            [(2, dir.path().join("v2")), (1, dir.path().join("v1"))]
        );
    }

    #[test]
    fn a_file_source_needs_a_state_path_and_kubernetes_does_not() {
        let layer = ConfigLayer {
            node_name: Some("n".into()),
            ..Default::default()
        };
        assert!(layer.clone().finish().is_err());
        let config = ConfigLayer {
            source: Some(SourceKind::Kubernetes),
            ..layer
        }
        .finish()
        .unwrap();
        assert_eq!(config.source, SourceKind::Kubernetes);
    }
}
