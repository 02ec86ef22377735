//! How a pod is wired to its node and a node routes to the other nodes' pods, written once as
//! a list of commands and rendered by each backend: `ip` calls into namespaces by the netns
//! backend, lines of a guest's setup script by the QEMU backend (where a node is a VM and its
//! own namespace the root one).

use weir_lab_core::topology::{NodePlan, Plan, PodPlan, POD_GATEWAY, POD_GATEWAY6};

/// Where a wiring command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// In the pod's network namespace.
    Pod,
    /// In its node's own network namespace.
    Node,
}

/// One wiring command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `ip` with these arguments, on one side.
    Ip(Side, Vec<String>),
    /// `sysctl` settings (`key=value`) on the node.
    NodeSysctl(Vec<String>),
}

fn ip(side: Side, args: &[&str]) -> Step {
    Step::Ip(side, args.iter().map(|a| (*a).to_owned()).collect())
}

/// A pod's wiring, once its namespace (named `pod_ns` as its node sees it) exists: a veth pair
/// (its node's end `pod.host_interface`, its own `eth0`), its address, and Calico-style routing
/// through a link-local gateway its node answers for (proxy ARP; in IPv6 the node's end holds
/// the gateway address).
pub fn pod_steps(pod: &PodPlan, pod_ns: &str, mtu: u32) -> Vec<Step> {
    let mtu = mtu.to_string();
    let hif = pod.host_interface.as_str();
    let addr = format!("{}/32", pod.ip);
    let gateway = POD_GATEWAY.to_string();
    let mut steps = vec![
        ip(
            Side::Node,
            &[
                "link", "add", hif, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
                pod_ns, "mtu", &mtu,
            ],
        ),
        ip(Side::Pod, &["link", "set", "lo", "up"]),
        ip(Side::Pod, &["addr", "add", &addr, "dev", "eth0"]),
        ip(Side::Pod, &["link", "set", "eth0", "up"]),
        ip(
            Side::Pod,
            &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
        ),
        ip(
            Side::Pod,
            &["route", "add", "default", "via", &gateway, "dev", "eth0"],
        ),
        // proxy_delay=0: otherwise the kernel answers broadcast ARP for the pod gateway after a
        // random delay of up to 0.8 s, which makes first packets slow.
        Step::NodeSysctl(vec![
            format!("net.ipv4.conf.{hif}.proxy_arp=1"),
            format!("net.ipv4.conf.{hif}.rp_filter=0"),
            format!("net.ipv4.neigh.{hif}.proxy_delay=0"),
        ]),
        ip(Side::Node, &["link", "set", hif, "up"]),
        ip(Side::Node, &["route", "add", &addr, "dev", hif]),
    ];
    if let Some(ip6) = pod.ip6 {
        let addr6 = format!("{ip6}/128");
        let gateway6 = POD_GATEWAY6.to_string();
        let node_end6 = format!("{POD_GATEWAY6}/64");
        steps.extend([
            ip(Side::Pod, &["addr", "add", &addr6, "dev", "eth0", "nodad"]),
            ip(
                Side::Node,
                &["addr", "add", &node_end6, "dev", hif, "nodad"],
            ),
            ip(
                Side::Pod,
                &[
                    "-6", "route", "add", "default", "via", &gateway6, "dev", "eth0",
                ],
            ),
            ip(Side::Node, &["-6", "route", "add", &addr6, "dev", hif]),
        ]);
    }
    steps
}

/// Direct routing on the shared L2: `ip` arguments (run on `node`) routing every other node's
/// pod CIDRs via that node.
pub fn pod_routes(plan: &Plan, node: &NodePlan) -> Vec<Vec<String>> {
    let mut routes = Vec::new();
    for other in plan.nodes.iter().filter(|o| o.index != node.index) {
        routes.push(vec![
            "route".to_owned(),
            "add".to_owned(),
            format!("{}/24", other.pod_cidr),
            "via".to_owned(),
            other.ip.to_string(),
        ]);
        if let (Some(cidr6), Some(via6)) = (other.pod_cidr6, other.ip6) {
            routes.push(vec![
                "-6".to_owned(),
                "route".to_owned(),
                "add".to_owned(),
                format!("{cidr6}/64"),
                "via".to_owned(),
                via6.to_string(),
            ]);
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use weir_lab_core::scenario::Scenario;

    fn plan() -> Plan {
        Scenario::parse(
            "name = \"t\"\n[topology]\nnodes = 2\npods_per_node = 1\nipv6 = true\n",
            Path::new("t"),
        )
        .unwrap()
        .plan()
    }

    #[test]
    fn a_pod_is_wired_from_its_node_then_inside() {
        let plan = plan();
        let pod = plan.pod("n1p0").unwrap();
        let steps = pod_steps(pod, "lab-n1p0", 1500);
        let Step::Ip(Side::Node, veth) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(veth[..3], ["link", "add", pod.host_interface.as_str()]);
        assert!(veth.windows(2).any(|w| w == ["netns", "lab-n1p0"]));
        assert!(steps.contains(&Step::Ip(
            Side::Pod,
            vec![
                "route".into(),
                "add".into(),
                "default".into(),
                "via".into(),
                "169.254.1.1".into(),
                "dev".into(),
                "eth0".into()
            ]
        )));
        // Dual stack: the node's end holds the IPv6 gateway, the pod routes through it.
        assert_eq!(
            steps
                .iter()
                .filter(|s| matches!(s, Step::Ip(_, a) if a.iter().any(|w| w.contains("fe80::1"))))
                .count(),
            2
        );
    }

    #[test]
    fn nodes_route_to_the_other_nodes_pods() {
        let plan = plan();
        let routes = pod_routes(&plan, &plan.nodes[0]);
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert_eq!(routes[0][2], "198.19.2.0/24");
        assert_eq!(routes[1][0], "-6");
    }
}
