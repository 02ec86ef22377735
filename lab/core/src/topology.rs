//! The address plan: which hosts exist and what addresses they get, whatever backend builds them.
//!
//! Lab traffic uses only 198.18.0.0/15 (RFC 2544 benchmarking space), so a lab can never be
//! confused with, or route into, a real private network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Node N's host-facing address is 198.18.0.N/24.
pub const NODE_PREFIX_LEN: u8 = 24;
/// The node network's gateway; nodes route their default through it, which (as on a real node)
/// is also what lets proxy ARP answer pods asking for 169.254.1.1.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Calico-style link-local next hop every pod routes its default through.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_INTERFACE_PREFIX: &str = "wp";
const FIRST_POD_HOST: u8 = 10;
/// Every node's pod CIDR (198.19.N.0/24) lies in it: a kube-proxy's `--cluster-cidr` in the lab.
pub const POD_CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
const FIRST_EXTERNAL_HOST: u8 = 200;
/// Node networks a lab may have: the first carries node-to-node traffic; the others make every
/// node (and every external client) multi-homed.
pub const MAX_NETWORKS: u8 = 4;
/// The node networks' IPv6 prefix length (network 1 only).
pub const NODE_PREFIX_LEN6: u8 = 64;
/// The IPv6 next hop every pod routes its default through: the node side of every pod's veth
/// carries it, as link-local addresses may repeat across links.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Network `k`'s (1-based) address of host `host` on it: 198.18.(k-1).host/24.
pub fn network_address(network: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, network - 1, host)
}

/// Network `k`'s gateway, where the lab's bridge for it has its address.
pub fn network_gateway(network: u8) -> Ipv4Addr {
    network_address(network, GATEWAY.octets()[3])
}

/// Node N's IPv6 address on network 1: fd00:18::N.
pub fn node_ip6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(node))
}

/// External client X's IPv6 address on network 1: fd00:18::1:X.
pub fn external_ip6(external: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 1, u16::from(external))
}

/// Node N's IPv6 pod prefix, fd00:19:N::/64; its pods are fd00:19:N::(10+i).
pub fn pod_cidr6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x19, u16::from(node), 0, 0, 0, 0, 0)
}

/// True for fd00::/8, the only IPv6 range lab traffic may use.
pub fn is_test_address6(ip: Ipv6Addr) -> bool {
    ip.octets()[0] == 0xfd && ip.octets()[1] == 0x00
}

/// Either family's lab range.
pub fn is_test_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_test_address(v4),
        IpAddr::V6(v6) => is_test_address6(v6),
    }
}

/// True for the ranges lab traffic may use: 198.18.0.0/15.
pub fn is_test_address(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] & 0xfe) == 18
}

/// A machine-like thing in the lab that can run commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostId {
    /// 1-based.
    Node(u8),
    /// Node 1-based, pod 0-based within the node.
    Pod { node: u8, index: u8 },
    /// 1-based.
    External(u8),
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostId::Node(n) => write!(f, "node{n}"),
            HostId::Pod { node, index } => write!(f, "n{node}p{index}"),
            HostId::External(n) => write!(f, "x{n}"),
        }
    }
}

impl HostId {
    /// Parses the names used in scenario files: `node1`, `n1p0`, `x1`.
    pub fn parse(name: &str) -> Option<HostId> {
        let num = |s: &str| -> Option<u8> {
            // Leading zeros would give two names for one host.
            if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
                return None;
            }
            s.parse().ok()
        };
        if let Some(rest) = name.strip_prefix("node") {
            return num(rest).map(HostId::Node);
        }
        if let Some(rest) = name.strip_prefix('x') {
            return num(rest).map(HostId::External);
        }
        let rest = name.strip_prefix('n')?;
        let (node, index) = rest.split_once('p')?;
        Some(HostId::Pod {
            node: num(node)?,
            index: num(index)?,
        })
    }

    /// The node whose network namespace (or VM) this host lives in or hangs off.
    pub fn node(&self) -> Option<u8> {
        match self {
            HostId::Node(n) | HostId::Pod { node: n, .. } => Some(*n),
            HostId::External(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodePlan {
    pub id: HostId,
    pub index: u8,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node's /24 pod CIDR, 198.19.N.0/24.
    pub pod_cidr: Ipv4Addr,
    /// One address per node network, `ip` first (interfaces eth0, eth1, ...).
    pub ips: Vec<Ipv4Addr>,
    /// Dual-stack labs: the node's address on network 1 and its /64 pod prefix.
    pub ip6: Option<Ipv6Addr>,
    pub pod_cidr6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct PodPlan {
    pub id: HostId,
    pub node: u8,
    pub index: u8,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node-side end of the pod's veth pair; the agent finds pods by the `wp` prefix.
    pub host_interface: String,
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct ExternalPlan {
    pub id: HostId,
    pub index: u8,
    pub name: String,
    pub ip: Ipv4Addr,
    /// One address per node network, `ip` first: an external client sits on every network.
    pub ips: Vec<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
}

/// A static route on one host, as a router in front of a cluster would have it (load-balancer
/// and external IPs are reached through a node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    pub host: HostId,
    /// Network address and prefix length.
    pub prefix: (IpAddr, u8),
    pub via: IpAddr,
}

/// Every host and address of one lab.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: Vec<NodePlan>,
    pub pods: Vec<PodPlan>,
    pub externals: Vec<ExternalPlan>,
    pub mtu: u32,
    /// How many node networks (1 + extra uplinks per node).
    pub networks: u8,
    pub ipv6: bool,
    pub routes: Vec<RoutePlan>,
    /// Segmentation offloads on the veths (see `TopologySpec::offloads`).
    pub offloads: bool,
}

impl Plan {
    /// Counts are validated by the scenario (nodes <= 50, pods <= 200, externals <= 50), which
    /// keeps every address below inside its octet.
    pub fn new(nodes: u8, pods_per_node: u8, externals: u8, mtu: u32) -> Plan {
        let nodes_v: Vec<NodePlan> = (1..=nodes)
            .map(|n| NodePlan {
                id: HostId::Node(n),
                index: n,
                name: HostId::Node(n).to_string(),
                ip: Ipv4Addr::new(198, 18, 0, n),
                pod_cidr: Ipv4Addr::new(198, 19, n, 0),
                ips: vec![Ipv4Addr::new(198, 18, 0, n)],
                ip6: None,
                pod_cidr6: None,
            })
            .collect();
        let pods = (1..=nodes)
            .flat_map(|n| {
                (0..pods_per_node).map(move |i| {
                    let id = HostId::Pod { node: n, index: i };
                    PodPlan {
                        id,
                        node: n,
                        index: i,
                        name: id.to_string(),
                        ip: Ipv4Addr::new(198, 19, n, FIRST_POD_HOST + i),
                        host_interface: format!("{POD_INTERFACE_PREFIX}{id}"),
                        ip6: None,
                    }
                })
            })
            .collect();
        let externals = (1..=externals)
            .map(|x| ExternalPlan {
                id: HostId::External(x),
                index: x,
                name: HostId::External(x).to_string(),
                ip: Ipv4Addr::new(198, 18, 0, FIRST_EXTERNAL_HOST + x),
                ips: vec![Ipv4Addr::new(198, 18, 0, FIRST_EXTERNAL_HOST + x)],
                ip6: None,
            })
            .collect();
        Plan {
            nodes: nodes_v,
            pods,
            externals,
            mtu,
            networks: 1,
            ipv6: false,
            routes: Vec::new(),
            offloads: true,
        }
    }

    /// Every node and external client gets an address on each of `networks` node networks
    /// (clamped to 1..=[`MAX_NETWORKS`]).
    pub fn with_networks(mut self, networks: u8) -> Plan {
        let networks = networks.clamp(1, MAX_NETWORKS);
        self.networks = networks;
        for node in &mut self.nodes {
            node.ips = (1..=networks)
                .map(|k| network_address(k, node.index))
                .collect();
        }
        for ext in &mut self.externals {
            ext.ips = (1..=networks)
                .map(|k| network_address(k, FIRST_EXTERNAL_HOST + ext.index))
                .collect();
        }
        self
    }

    /// Dual stack: IPv6 addresses for every node, pod and external client (network 1).
    pub fn with_ipv6(mut self) -> Plan {
        self.ipv6 = true;
        for node in &mut self.nodes {
            node.ip6 = Some(node_ip6(node.index));
            node.pod_cidr6 = Some(pod_cidr6(node.index));
        }
        for pod in &mut self.pods {
            let base = pod_cidr6(pod.node).segments();
            pod.ip6 = Some(Ipv6Addr::new(
                base[0],
                base[1],
                base[2],
                0,
                0,
                0,
                0,
                u16::from(FIRST_POD_HOST + pod.index),
            ));
        }
        for ext in &mut self.externals {
            ext.ip6 = Some(external_ip6(ext.index));
        }
        self
    }

    pub fn with_routes(mut self, routes: Vec<RoutePlan>) -> Plan {
        self.routes = routes;
        self
    }

    /// `host`'s IPv6 address, in a dual-stack lab.
    pub fn ip6(&self, id: HostId) -> Option<Ipv6Addr> {
        match id {
            HostId::Node(n) => self.node(n).and_then(|n| n.ip6),
            HostId::Pod { .. } => self.pods.iter().find(|p| p.id == id).and_then(|p| p.ip6),
            HostId::External(x) => self
                .externals
                .iter()
                .find(|e| e.index == x)
                .and_then(|e| e.ip6),
        }
    }

    /// `host`'s IPv4 address on node network `network` (1-based); pods have only network 1's.
    pub fn ip_on(&self, id: HostId, network: u8) -> Option<Ipv4Addr> {
        let index = usize::from(network.checked_sub(1)?);
        match id {
            HostId::Node(n) => self.node(n).and_then(|n| n.ips.get(index).copied()),
            HostId::Pod { .. } => (network == 1).then(|| self.ip(id)).flatten(),
            HostId::External(x) => self
                .externals
                .iter()
                .find(|e| e.index == x)
                .and_then(|e| e.ips.get(index).copied()),
        }
    }

    /// Resolves a scenario's host name, if that host exists in this plan.
    pub fn host(&self, name: &str) -> Option<HostId> {
        let id = HostId::parse(name)?;
        self.ip(id).map(|_| id)
    }

    pub fn ip(&self, id: HostId) -> Option<Ipv4Addr> {
        match id {
            HostId::Node(n) => self.node(n).map(|n| n.ip),
            HostId::Pod { .. } => self.pods.iter().find(|p| p.id == id).map(|p| p.ip),
            HostId::External(x) => self.externals.iter().find(|e| e.index == x).map(|e| e.ip),
        }
    }

    pub fn node(&self, n: u8) -> Option<&NodePlan> {
        self.nodes.iter().find(|node| node.index == n)
    }

    pub fn pod(&self, name: &str) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    pub fn hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.nodes
            .iter()
            .map(|n| n.id)
            .chain(self.pods.iter().map(|p| p.id))
            .chain(self.externals.iter().map(|e| e.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        let plan = Plan::new(2, 2, 1, 1500);
        assert_eq!(plan.nodes[0].ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(plan.pod("n2p1").unwrap().ip, Ipv4Addr::new(198, 19, 2, 11));
        assert_eq!(plan.pod("n2p1").unwrap().host_interface, "wpn2p1");
        assert_eq!(plan.externals[0].ip, Ipv4Addr::new(198, 18, 0, 201));
        assert!(plan.hosts().all(|h| is_test_address(plan.ip(h).unwrap())));
        assert!(is_test_address(GATEWAY));
    }

    #[test]
    fn host_names_round_trip() {
        let plan = Plan::new(12, 12, 2, 1500);
        for h in plan.hosts() {
            assert_eq!(plan.host(&h.to_string()), Some(h));
        }
        assert_eq!(plan.host("n13p0"), None);
        assert_eq!(plan.host("n1p12"), None);
        assert_eq!(plan.host("n01p0"), None);
        assert_eq!(plan.host("node0"), None);
        assert_eq!(plan.host("x3"), None);
        assert_eq!(plan.host("bogus"), None);
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let plan = Plan::new(50, 200, 0, 1500);
        assert!(plan.pods.iter().all(|p| p.host_interface.len() <= 15));
    }

    #[test]
    fn multi_homed_dual_stack_plan() {
        let plan = Plan::new(3, 2, 1, 1500).with_networks(2).with_ipv6();
        let n2 = HostId::Node(2);
        assert_eq!(plan.ip_on(n2, 1), Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(plan.ip_on(n2, 2), Some(Ipv4Addr::new(198, 18, 1, 2)));
        assert_eq!(plan.ip_on(n2, 3), None);
        assert_eq!(
            plan.ip_on(HostId::External(1), 2),
            Some(Ipv4Addr::new(198, 18, 1, 201))
        );
        assert_eq!(network_gateway(2), Ipv4Addr::new(198, 18, 1, 254));
        assert_eq!(plan.ip6(n2), Some("fd00:18::2".parse().unwrap()));
        assert_eq!(
            plan.ip6(HostId::Pod { node: 3, index: 1 }),
            Some("fd00:19:3::b".parse().unwrap())
        );
        assert_eq!(
            plan.ip6(HostId::External(1)),
            Some("fd00:18::1:1".parse().unwrap())
        );
        for h in plan.hosts() {
            assert!(is_test_address6(plan.ip6(h).unwrap()));
            for k in 1..=plan.networks {
                if let Some(ip) = plan.ip_on(h, k) {
                    assert!(is_test_address(ip));
                }
            }
        }
    }

    #[test]
    fn test_range() {
        assert!(is_test_address(Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!is_test_address(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!is_test_address(Ipv4Addr::new(198, 17, 0, 1)));
    }
}
