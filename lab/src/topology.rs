//! The address plan: which hosts exist and what addresses they get, whatever backend builds them.
//!
//! Lab traffic uses only 198.18.0.0/15 (RFC 2544 benchmarking space), so a lab can never be
//! confused with, or route into, a real private network.

use std::fmt;
use std::net::Ipv4Addr;

/// Node N's host-facing address is 198.18.0.N/24.
pub const NODE_PREFIX_LEN: u8 = 24;
/// The node network's gateway; nodes route their default through it, which (as on a real node)
/// is also what lets proxy ARP answer pods asking for 169.254.1.1.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Calico-style link-local next hop every pod routes its default through.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_INTERFACE_PREFIX: &str = "wp";
const FIRST_POD_HOST: u8 = 10;
const FIRST_EXTERNAL_HOST: u8 = 200;

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
}

#[derive(Clone, Debug)]
pub struct ExternalPlan {
    pub id: HostId,
    pub index: u8,
    pub name: String,
    pub ip: Ipv4Addr,
}

/// Every host and address of one lab.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: Vec<NodePlan>,
    pub pods: Vec<PodPlan>,
    pub externals: Vec<ExternalPlan>,
    pub mtu: u32,
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
            })
            .collect();
        Plan {
            nodes: nodes_v,
            pods,
            externals,
            mtu,
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
    fn test_range() {
        assert!(is_test_address(Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!is_test_address(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!is_test_address(Ipv4Addr::new(198, 17, 0, 1)));
    }
}
