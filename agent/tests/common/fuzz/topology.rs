//! What the fuzzed nodes hold: a cluster of services covering every kind of frontend, and the
//! node configurations the packets meet them under.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weir_agent::compile::{addr_of, CompileOptions};
use weir_common::{node_flags, NodeConfig, PROTO_TCP, PROTO_UDP};

pub const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const HAIRPIN: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
pub const HAIRPIN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0xff, 0, 0, 0, 0, 1);

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x11);
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 12);
const SOLO_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 13);
const SIX_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
const SIX_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 1);

/// Pods on this node (node1) and on node2.
pub const POD_N1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const POD_N2: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);
const SIX_POD_N1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 21);
pub const POD6_N1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, 0x11);
const POD6_N2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 2, 0, 0, 0, 0, 0x11);

/// Clients: outside the cluster, a pod of this node, and pods that are also backends (their
/// connections to their own service hairpin).
pub const CLIENTS_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 201),
    Ipv4Addr::new(198, 18, 0, 202),
    Ipv4Addr::new(198, 19, 1, 10),
    POD_N1,
];
pub const CLIENTS_V6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x201),
    Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, 0x10),
    POD6_N1,
];

/// One frontend of the installed services as a client addresses it, and the backends (address,
/// port) its packets may be translated to.
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub backends: Vec<(IpAddr, u16)>,
}

fn frontend(addr: impl Into<IpAddr>, port: u16, proto: u8, backends: &[(IpAddr, u16)]) -> Frontend {
    Frontend {
        addr: addr.into(),
        port,
        proto,
        backends: backends.to_vec(),
    }
}

/// Every frontend of [`cluster_yaml`] (kept in step with it by hand: the checker does not use
/// this list, only the generator, so a slip here costs coverage, never a false verdict).
pub fn frontends() -> Vec<Frontend> {
    let (pod_n1, pod_n2) = (IpAddr::V4(POD_N1), IpAddr::V4(POD_N2));
    let (six_n1, six6_n1, six6_n2) = (
        IpAddr::V4(SIX_POD_N1),
        IpAddr::V6(POD6_N1),
        IpAddr::V6(POD6_N2),
    );
    let web_tcp = [(pod_n1, 8080), (pod_n2, 8080)];
    let web_udp = [(pod_n1, 5353), (pod_n2, 5353)];
    let six_tcp = [(six_n1, 8080)];
    let six_udp = [(six_n1, 5353)];
    let six6_tcp = [(six6_n1, 8080), (six6_n2, 8080)];
    let six6_udp = [(six6_n1, 5353), (six6_n2, 5353)];
    let local = [(pod_n2, 8082)];
    let mut all = Vec::new();
    for addr in [WEB_VIP, EXTERNAL_IP, LB_IP] {
        all.push(frontend(addr, 80, PROTO_TCP, &web_tcp));
        all.push(frontend(addr, 53, PROTO_UDP, &web_udp));
    }
    all.extend([
        frontend(NODE1, 30080, PROTO_TCP, &web_tcp),
        frontend(NODE1, 30053, PROTO_UDP, &web_udp),
        frontend(SIX_VIP, 80, PROTO_TCP, &six_tcp),
        frontend(SIX_VIP, 53, PROTO_UDP, &six_udp),
        frontend(NODE1, 30081, PROTO_TCP, &six_tcp),
        frontend(SIX_VIP6, 80, PROTO_TCP, &six6_tcp),
        frontend(SIX_VIP6, 53, PROTO_UDP, &six6_udp),
        frontend(NODE1_V6, 30081, PROTO_TCP, &six6_tcp),
        frontend(NODE1_V6, 30054, PROTO_UDP, &six6_udp),
        frontend(EMPTY_VIP, 81, PROTO_TCP, &[]),
        frontend(EMPTY_VIP6, 81, PROTO_TCP, &[]),
        frontend(LOCAL_VIP, 82, PROTO_TCP, &local),
        frontend(NODE1, 30082, PROTO_TCP, &local),
        frontend(SOLO_VIP, 80, PROTO_TCP, &[(pod_n1, 8080)]),
        frontend(SOLO_VIP, 53, PROTO_UDP, &[(pod_n1, 5353)]),
    ]);
    all
}

fn slice(
    name: &str,
    service: &str,
    family: &str,
    ports: &str,
    endpoints: &[(IpAddr, &str)],
) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, node)| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: \
         {family}\nports: {ports}\nendpoints:\n{endpoints}"
    )
}

/// Node objects and five services: `web` (LoadBalancer: ClusterIP, external IP, load-balancer
/// IP and NodePorts; TCP and UDP; a local and a remote endpoint), `six` (dual-stack NodePort),
/// `empty` (dual-stack, no endpoints: rejects), `local` (externalTrafficPolicy Local with only
/// a remote endpoint: drops external traffic) and `solo` (its one endpoint is a client here,
/// so its own connections hairpin).
pub fn cluster_yaml() -> String {
    let web_ports =
        "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]";
    let nodes = format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
status: {{addresses: [{{type: InternalIP, address: "{NODE1}"}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node2}}
status: {{addresses: [{{type: InternalIP, address: "{NODE2}"}}]}}
"#
    );
    let services = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {WEB_VIP}
  externalIPs: ["{EXTERNAL_IP}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
status:
  loadBalancer: {{ingress: [{{ip: "{LB_IP}"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: six, namespace: default}}
spec:
  type: NodePort
  clusterIPs: ["{SIX_VIP}", "{SIX_VIP6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30054}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIPs: ["{EMPTY_VIP}", "{EMPTY_VIP6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: http, protocol: TCP, port: 81, targetPort: 8081}}
---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: NodePort
  clusterIP: {LOCAL_VIP}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports:
  - {{name: http, protocol: TCP, port: 82, targetPort: 8082, nodePort: 30082}}
---
apiVersion: v1
kind: Service
metadata: {{name: solo, namespace: default}}
spec:
  clusterIP: {SOLO_VIP}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
"#
    );
    let (pod_n1, pod_n2) = (IpAddr::V4(POD_N1), IpAddr::V4(POD_N2));
    [
        nodes,
        services,
        slice(
            "web-1",
            "web",
            "IPv4",
            web_ports,
            &[(pod_n1, "node1"), (pod_n2, "node2")],
        ),
        slice(
            "six-v4",
            "six",
            "IPv4",
            web_ports,
            &[(IpAddr::V4(SIX_POD_N1), "node1")],
        ),
        slice(
            "six-v6",
            "six",
            "IPv6",
            web_ports,
            &[
                (IpAddr::V6(POD6_N1), "node1"),
                (IpAddr::V6(POD6_N2), "node2"),
            ],
        ),
        slice(
            "local-1",
            "local",
            "IPv4",
            "[{name: http, protocol: TCP, port: 8082}]",
            &[(pod_n2, "node2")],
        ),
        slice("solo-1", "solo", "IPv4", web_ports, &[(pod_n1, "node1")]),
    ]
    .concat()
}

/// How a fuzzed node runs, and where its packets start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Behind an Ethernet header, as on host and pod interfaces.
    Ethernet,
    /// As the IPIP tunnel device shows them: bare IPv4, or on old kernels behind the outer
    /// Ethernet and IPv4 headers.
    IpipDevice,
}

pub struct Profile {
    pub name: &'static str,
    pub layout: Layout,
    pub node: NodeConfig,
    pub options: CompileOptions,
}

/// Not a real device: a redirect needs none in a test run, and test runs enter on loopback,
/// so this keeps packets from looking as if they came out of the tunnel.
const TUNNEL_IFINDEX: u32 = 4242;
/// Loopback, where test runs enter: the IPIP profile's packets arrive "on the tunnel device".
const LOOPBACK_IFINDEX: u32 = 1;
const UNDERLAY_MTU: u32 = 1500;

fn node_config(tunnel_ifindex: u32, flags: u32) -> NodeConfig {
    NodeConfig {
        hairpin_v4: addr_of(HAIRPIN.into()).0,
        hairpin_v6: addr_of(HAIRPIN_V6.into()).0,
        tunnel_ifindex,
        flags,
        underlay_mtu: UNDERLAY_MTU,
    }
}

fn options(maglev: bool) -> CompileOptions {
    CompileOptions {
        node_name: "node1".into(),
        maglev,
        ..CompileOptions::default()
    }
}

/// Three nodes' worth of configuration: translation at the ingress node (VXLAN), direct server
/// return with Maglev, and the IPIP device's own view of packets.
pub fn profiles() -> Vec<Profile> {
    vec![
        Profile {
            name: "nat",
            layout: Layout::Ethernet,
            node: node_config(TUNNEL_IFINDEX, 0),
            options: options(false),
        },
        Profile {
            name: "dsr-maglev",
            layout: Layout::Ethernet,
            node: node_config(TUNNEL_IFINDEX, node_flags::DSR),
            options: options(true),
        },
        Profile {
            name: "ipip-device",
            layout: Layout::IpipDevice,
            node: node_config(LOOPBACK_IFINDEX, node_flags::TUNNEL_IPIP),
            options: options(false),
        },
    ]
}

pub fn host_addrs() -> Vec<IpAddr> {
    vec![NODE1.into(), NODE1_V6.into()]
}
