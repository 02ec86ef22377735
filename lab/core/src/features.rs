//! The Weir features a check proves, for the kernel compatibility report: which features work
//! on which kernel, rather than which scenarios passed.
//!
//! Derived from what the check does and what its scenario configures, never written by hand
//! beside it (a hand list drifts from the checks it describes): an HTTP check through a
//! NodePort over IPv6 from an external client of a VXLAN scenario in DSR mode proves TCP,
//! NodePort, IPv6 and DSR over VXLAN. A check proves a feature only where it exercises it:
//! counters and object checks prove none by themselves. Pure: no lab, no processes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::scenario::{
    CheckSpec, ExternalReturn, Family, LoadBalancing, Scenario, ServiceSpec, TrafficCheck,
    TrafficPolicy, TunnelModeSpec, Via,
};
use crate::topology::HostId;

/// A Weir feature, as the report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    ClusterIpTcp,
    ClusterIpUdp,
    NodePort,
    ExternalIp,
    LoadBalancerIp,
    Ipv6,
    /// External traffic to a remote endpoint through VXLAN, replies back through the ingress
    /// node.
    VxlanIngressReturn,
    VxlanDsr,
    IpipIngressReturn,
    IpipDsr,
    /// `externalTrafficPolicy` / `internalTrafficPolicy: Local`.
    TrafficPolicyLocal,
    SessionAffinity,
    Maglev,
    /// Connect-time balancing for the nodes' own processes (cgroup sock_addr hooks).
    HostServices,
    /// "Fragmentation needed" / "packet too big" for packets too big for the tunnel.
    IcmpTooBig,
    /// The node's own ICMP errors about translated flows (`weir_egress`).
    NodeIcmpErrors,
    /// A Service without endpoints refuses at once (reset or port unreachable).
    RejectWithoutEndpoints,
    /// Datagrams larger than the MTU, fragmented.
    Fragments,
    /// One client port towards several frontends sharing a backend.
    TupleCollisions,
    /// Conntrack entries made and reclaimed.
    Conntrack,
    HealthCheckNodePort,
    /// Services and endpoints changed while traffic flows (scenario steps).
    EndpointChurn,
    /// The agent restarted (or upgraded) without dropping flows.
    AgentRestart,
    /// Weir forwarded translated packets itself (FIB lookup, redirect into a pod or out of the
    /// node): shown by its `forwarded` counter moving while the scenario's traffic passed.
    Forwarding,
    /// Kubernetes NetworkPolicy: a reachability table of real connections matched.
    NetworkPolicy,
    /// The XDP pre-filter: deny-listed sources dropped before the stack, failsafe ports kept
    /// open (a reachability table in a scenario that configures it).
    XdpPrefilter,
}

impl Feature {
    pub const ALL: [Feature; 26] = [
        Feature::ClusterIpTcp,
        Feature::ClusterIpUdp,
        Feature::NodePort,
        Feature::ExternalIp,
        Feature::LoadBalancerIp,
        Feature::Ipv6,
        Feature::VxlanIngressReturn,
        Feature::VxlanDsr,
        Feature::IpipIngressReturn,
        Feature::IpipDsr,
        Feature::TrafficPolicyLocal,
        Feature::SessionAffinity,
        Feature::Maglev,
        Feature::HostServices,
        Feature::IcmpTooBig,
        Feature::NodeIcmpErrors,
        Feature::RejectWithoutEndpoints,
        Feature::Fragments,
        Feature::TupleCollisions,
        Feature::Conntrack,
        Feature::HealthCheckNodePort,
        Feature::EndpointChurn,
        Feature::AgentRestart,
        Feature::Forwarding,
        Feature::NetworkPolicy,
        Feature::XdpPrefilter,
    ];

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ClusterIpTcp => "ClusterIP TCP",
            Feature::ClusterIpUdp => "ClusterIP UDP",
            Feature::NodePort => "NodePort",
            Feature::ExternalIp => "external IP",
            Feature::LoadBalancerIp => "load-balancer IP",
            Feature::Ipv6 => "IPv6",
            Feature::VxlanIngressReturn => "VXLAN, ingress return",
            Feature::VxlanDsr => "VXLAN, DSR",
            Feature::IpipIngressReturn => "IPIP, ingress return",
            Feature::IpipDsr => "IPIP, DSR",
            Feature::TrafficPolicyLocal => "traffic policy Local",
            Feature::SessionAffinity => "session affinity",
            Feature::Maglev => "Maglev",
            Feature::HostServices => "host services",
            Feature::IcmpTooBig => "ICMP too big (tunnel)",
            Feature::NodeIcmpErrors => "node's own ICMP errors",
            Feature::RejectWithoutEndpoints => "refusal without endpoints",
            Feature::Fragments => "fragments",
            Feature::TupleCollisions => "tuple collisions",
            Feature::Conntrack => "conntrack reclaim",
            Feature::HealthCheckNodePort => "healthCheckNodePort",
            Feature::EndpointChurn => "endpoint churn",
            Feature::AgentRestart => "agent restart",
            Feature::Forwarding => "Weir's own forwarding",
            Feature::NetworkPolicy => "NetworkPolicy",
            Feature::XdpPrefilter => "XDP pre-filter",
        }
    }
}

/// What `check` proves in `scenario` (`in_step`: it runs after a timeline step changed the
/// cluster).
pub fn proven_by(scenario: &Scenario, check: &CheckSpec, in_step: bool) -> BTreeSet<Feature> {
    let mut proven = match check {
        CheckSpec::Http(t) => traffic(scenario, t, true),
        CheckSpec::Udp(t) => traffic(scenario, t, false),
        CheckSpec::Conntrack(_) => BTreeSet::from([Feature::Conntrack]),
        CheckSpec::HealthCheck(_) => BTreeSet::from([Feature::HealthCheckNodePort]),
        CheckSpec::Counter(c) if c.counter == "forwarded" && !c.unchanged => {
            BTreeSet::from([Feature::Forwarding])
        }
        CheckSpec::Reachability(_) => {
            let mut proven = BTreeSet::new();
            if !scenario.network_policies.is_empty() {
                proven.insert(Feature::NetworkPolicy);
            }
            if scenario.agent.prefilter.is_some() {
                proven.insert(Feature::XdpPrefilter);
            }
            proven
        }
        CheckSpec::Frontend(_) | CheckSpec::Rejected(_) | CheckSpec::Counter(_) => BTreeSet::new(),
    };
    if in_step && !proven.is_empty() {
        proven.insert(Feature::EndpointChurn);
    }
    proven
}

/// What a probe proves: traffic that kept flowing (or ended as it should) across a scenario's
/// steps.
pub fn proven_by_probe() -> BTreeSet<Feature> {
    BTreeSet::from([Feature::EndpointChurn])
}

/// What an agent restart proves.
pub fn proven_by_restart() -> BTreeSet<Feature> {
    BTreeSet::from([Feature::AgentRestart])
}

fn traffic(scenario: &Scenario, t: &TrafficCheck, tcp: bool) -> BTreeSet<Feature> {
    let mut proven = BTreeSet::new();
    let service = t.service.as_deref().and_then(|s| scenario.service(s));
    // A check straight to a pod proves plumbing, not Weir.
    let Some(service) = service else {
        return proven;
    };
    proven.insert(match (t.via, tcp) {
        (Via::ClusterIp, true) => Feature::ClusterIpTcp,
        (Via::ClusterIp, false) => Feature::ClusterIpUdp,
        (Via::NodePort, _) => Feature::NodePort,
        (Via::ExternalIp, _) => Feature::ExternalIp,
        (Via::LoadBalancer, _) => Feature::LoadBalancerIp,
    });
    if t.family == Family::Ipv6 {
        proven.insert(Feature::Ipv6);
    }
    let external_client = matches!(HostId::parse(&t.from), Some(HostId::External(_)));
    if external_client && t.via != Via::ClusterIp {
        proven.extend(tunnel(scenario, t));
    }
    if is_local(service, t.via, external_client) {
        proven.insert(Feature::TrafficPolicyLocal);
    }
    if service.affinity_timeout.is_some() && t.expect.same_backend {
        proven.insert(Feature::SessionAffinity);
    }
    let maglev = scenario.agent.services.external_load_balancing == Some(LoadBalancing::Maglev);
    if maglev && (t.switch_ingress_to.is_some() || (external_client && t.via != Via::ClusterIp)) {
        proven.insert(Feature::Maglev);
    }
    if scenario.agent.host_services
        && matches!(HostId::parse(&t.from), Some(HostId::Node(_)))
        && t.via == Via::ClusterIp
    {
        proven.insert(Feature::HostServices);
    }
    if t.learned_mtu.is_some() {
        let node_side = scenario.pods.iter().any(|p| p.node_side_mtu.is_some());
        proven.insert(if node_side {
            Feature::NodeIcmpErrors
        } else {
            Feature::IcmpTooBig
        });
    }
    if t.expect.refusal() {
        proven.insert(Feature::RejectWithoutEndpoints);
    }
    if t.size.is_some_and(|size| size > scenario.topology.mtu) {
        proven.insert(Feature::Fragments);
    }
    if t.source_port.is_some() {
        proven.insert(Feature::TupleCollisions);
    }
    proven
}

/// The tunnel feature an external client's check exercises when its endpoints may be on
/// another node.
fn tunnel(scenario: &Scenario, t: &TrafficCheck) -> Option<Feature> {
    if scenario.topology.nodes < 2 {
        return None;
    }
    let dsr = match (&t.tunnel_replies, scenario.agent.services.external_return) {
        (Some(replies), _) => !replies.seen,
        (None, Some(ExternalReturn::Dsr)) => true,
        (None, _) => false,
    };
    match (scenario.agent.tunnel.mode, dsr) {
        (Some(TunnelModeSpec::None), _) => None,
        (Some(TunnelModeSpec::Ipip), false) => Some(Feature::IpipIngressReturn),
        (Some(TunnelModeSpec::Ipip), true) => Some(Feature::IpipDsr),
        // VXLAN is the agent's default.
        (_, false) => Some(Feature::VxlanIngressReturn),
        (_, true) => Some(Feature::VxlanDsr),
    }
}

/// Whether a `Local` policy applies to the check's traffic.
fn is_local(service: &ServiceSpec, via: Via, external_client: bool) -> bool {
    match via {
        Via::ClusterIp => service.internal_traffic_policy == TrafficPolicy::Local,
        _ => external_client && service.external_traffic_policy == TrafficPolicy::Local,
    }
}

/// Kernel modules a scenario needs, from what it configures: the tunnel device of its mode
/// (VXLAN by default) when it has several nodes.
pub fn required_modules(scenario: &Scenario) -> Vec<&'static str> {
    if scenario.topology.nodes < 2 || !scenario.agent.enabled {
        return Vec::new();
    }
    match scenario.agent.tunnel.mode {
        Some(TunnelModeSpec::None) => Vec::new(),
        Some(TunnelModeSpec::Ipip) => vec!["ipip"],
        _ => vec!["vxlan"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(file: &str) -> Scenario {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scenarios")
            .join(file);
        Scenario::load(&path).expect("valid scenario")
    }

    fn union(s: &Scenario) -> BTreeSet<Feature> {
        s.checks
            .iter()
            .flat_map(|c| proven_by(s, c, false))
            .collect()
    }

    #[test]
    fn checks_prove_what_they_exercise() {
        let smoke = union(&scenario("smoke.toml"));
        assert!(smoke.contains(&Feature::ClusterIpTcp));
        assert!(smoke.contains(&Feature::ClusterIpUdp));
        assert!(smoke.contains(&Feature::Conntrack));
        assert!(!smoke.contains(&Feature::NodePort));
        assert!(smoke.contains(&Feature::Forwarding));

        let dsr = union(&scenario("vxlan-dsr.toml"));
        assert!(dsr.contains(&Feature::VxlanDsr), "{dsr:?}");
        assert!(!dsr.contains(&Feature::VxlanIngressReturn), "{dsr:?}");
        assert!(dsr.contains(&Feature::Ipv6));

        let node_icmp = union(&scenario("node-icmp.toml"));
        assert!(node_icmp.contains(&Feature::NodeIcmpErrors));
        assert!(!node_icmp.contains(&Feature::IcmpTooBig));
        let ingress = union(&scenario("vxlan-ingress.toml"));
        assert!(ingress.contains(&Feature::IcmpTooBig));
        assert!(ingress.contains(&Feature::RejectWithoutEndpoints));
    }

    #[test]
    fn modules_come_from_the_configuration_not_the_name() {
        assert_eq!(required_modules(&scenario("maglev.toml")), vec!["vxlan"]);
        assert_eq!(required_modules(&scenario("ipip-dsr.toml")), vec!["ipip"]);
        assert_eq!(required_modules(&scenario("node-icmp.toml")), vec!["vxlan"]);
    }

    #[test]
    fn every_feature_is_listed_once() {
        let set: BTreeSet<Feature> = Feature::ALL.into_iter().collect();
        assert_eq!(set.len(), Feature::ALL.len());
    }
}
