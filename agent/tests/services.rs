//! Service handling beyond ClusterIP, packet by packet through BPF_PROG_TEST_RUN: NodePorts on
//! every host address, external IPs, traffic policies, session affinity, hairpin, the tunnel
//! towards remote backends (both return modes), Maglev agreement between nodes, and IPv6.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use weir_agent::compile::{addr_of, CompileOptions};
use weir_agent::node::tunnel_peers;
use weir_common::{node_flags, NodeConfig};

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE1_SECOND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 201);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 1);
const POD_N1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const POD_N2: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);
const POD_N2_B: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 12);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
const NODE_PORT: u16 = 30080;

/// A LoadBalancer service `web` (80 -> 8080, NodePort 30080, an external IP and a load-balancer
/// IP) with the given endpoints as (address, node), plus the two Node objects.
fn web(endpoints: &[(Ipv4Addr, &str)], extra_spec: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, node)| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n")
        })
        .collect();
    let nodes = node_objects(&[("node1", NODE1.into()), ("node2", NODE2.into())]);
    format!(
        r#"{nodes}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
  externalIPs: ["{EXTERNAL_IP}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
{extra_spec}status:
  loadBalancer: {{ingress: [{{ip: "{LB_IP}"}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
{endpoints}"#
    )
}

fn node1(yaml: &str, flags: u32, tunnel_ifindex: u32, maglev: bool) -> Harness {
    node1_with_mtu(yaml, flags, tunnel_ifindex, maglev, 0)
}

fn node1_with_mtu(
    yaml: &str,
    flags: u32,
    tunnel_ifindex: u32,
    maglev: bool,
    underlay_mtu: u32,
) -> Harness {
    let config = NodeConfig {
        hairpin_v4: addr_of(HAIRPIN.into()).0,
        tunnel_ifindex,
        flags,
        underlay_mtu,
        ..NodeConfig::default()
    };
    Harness::for_node(
        yaml,
        CompileOptions {
            node_name: "node1".into(),
            maglev,
            ..CompileOptions::default()
        },
        config,
        &[NODE1.into(), NODE1_SECOND.into()],
    )
}

#[test]
fn node_port_answers_on_every_host_address_and_replies_from_the_one_used() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    for (i, addr) in [NODE1, NODE1_SECOND].into_iter().enumerate() {
        let sport = 41000 + i as u16;
        let (verdict, out) = h.run(&tcp(EXTERNAL_CLIENT, sport, addr, NODE_PORT, "S"));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            tcp(EXTERNAL_CLIENT, sport, POD_N1, 8080, "S"),
            "via {addr}"
        );
        let (_, reply) = h.run(&tcp(POD_N1, 8080, EXTERNAL_CLIENT, sport, "A"));
        assert_eq!(reply, tcp(addr, NODE_PORT, EXTERNAL_CLIENT, sport, "A"));
    }
    // The same port on an address that is not the node's is someone else's traffic.
    let elsewhere = tcp(EXTERNAL_CLIENT, 41010, NODE2, NODE_PORT, "S");
    assert_eq!(h.run(&elsewhere), (TC_ACT_OK, elsewhere));
}

#[test]
fn external_and_load_balancer_ips_are_frontends() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    for (i, frontend) in [EXTERNAL_IP, LB_IP, VIP].into_iter().enumerate() {
        let sport = 41100 + i as u16;
        let (_, out) = h.run(&tcp(EXTERNAL_CLIENT, sport, frontend, 80, "S"));
        assert_eq!(
            out,
            tcp(EXTERNAL_CLIENT, sport, POD_N1, 8080, "S"),
            "{frontend}"
        );
    }
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_or_drops() {
    let local = "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n";
    // Only a remote endpoint: node1 drops external traffic, while the ClusterIP still works.
    let mut h = node1(&web(&[(POD_N2, "node2")], local), 0, 0, false);
    let (verdict, _) = h.run(&tcp(EXTERNAL_CLIENT, 41200, NODE1, NODE_PORT, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_no_local_backend"), 1);
    let (_, out) = h.run(&tcp(CLIENT, 41201, VIP, 80, "S"));
    assert_eq!(out, tcp(CLIENT, 41201, POD_N2, 8080, "S"));

    // With a local endpoint beside remote ones, external traffic stays on the node.
    h.apply(&web(
        &[(POD_N1, "node1"), (POD_N2, "node2"), (POD_N2_B, "node2")],
        local,
    ));
    for sport in 41210..41240 {
        let (_, out) = h.run(&tcp(EXTERNAL_CLIENT, sport, LB_IP, 80, "S"));
        assert_eq!(out, tcp(EXTERNAL_CLIENT, sport, POD_N1, 8080, "S"));
    }
}

#[test]
fn this_nodes_pods_reach_an_external_traffic_policy_local_frontend_with_every_endpoint() {
    let local = "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n";
    let mut h = node1(&web(&[(POD_N2, "node2")], local), 0, 0, false);
    // The same packets from outside the cluster, then from one of this node's pods: a test run
    // enters on loopback, which here stands for a pod interface.
    let from_outside = h.run(&tcp(CLIENT, 41250, LB_IP, 80, "S")).0;
    assert_eq!(
        from_outside, TC_ACT_SHOT,
        "outside: no local endpoint, dropped"
    );
    h.dataplane
        .node
        .set_pod_interfaces(&[1].into_iter().collect())
        .unwrap();
    let (_, out) = h.run(&tcp(CLIENT, 41251, LB_IP, 80, "S"));
    assert_eq!(
        out,
        tcp(CLIENT, 41251, POD_N2, 8080, "S"),
        "a pod of this node: every endpoint, as kube-proxy short-circuits it"
    );
    let (_, out) = h.run(&tcp(CLIENT, 41252, NODE1, NODE_PORT, "S"));
    assert_eq!(
        out,
        tcp(CLIENT, 41252, POD_N2, 8080, "S"),
        "its NodePort too"
    );
    // internalTrafficPolicy: Local binds pods as well: the ClusterIP has no local endpoint.
    let (verdict, _) = h.run(&tcp(CLIENT, 41253, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_no_local_backend"), 2);
}

/// Makes the harness know the cluster's Nodes (as the agent does after each pass).
fn learn_nodes(h: &mut Harness) {
    let peers = tunnel_peers(h.reconciler.intent().nodes.values());
    h.dataplane.node.set_tunnel_peers(&peers).expect("peers");
}

#[test]
fn a_pod_reaching_another_nodes_node_port_is_translated_at_its_own_node() {
    for flags in [0, node_flags::DSR] {
        let mut h = node1(&web(&[(POD_N2, "node2")], ""), flags, TUNNEL_IFINDEX, false);
        learn_nodes(&mut h);
        // Traffic from outside the cluster to another node is that node's business.
        let syn = tcp(EXTERNAL_CLIENT, 42000, NODE2, NODE_PORT, "S");
        assert_eq!(h.run(&syn), (TC_ACT_OK, syn.clone()), "untouched");
        assert_eq!(h.counter("pass_no_service"), 1);

        // A pod of this node (loopback stands for its interface): translated here, and routed
        // like a ClusterIP flow, not tunnelled, in either return mode.
        h.dataplane
            .node
            .set_pod_interfaces(&[1].into_iter().collect())
            .unwrap();
        for (sport, frontend) in [(42001, NODE2), (42002, NODE1)] {
            let (verdict, out) = h.run(&tcp(CLIENT, sport, frontend, NODE_PORT, "S"));
            assert_eq!(verdict, TC_ACT_OK, "routed, flags {flags}");
            assert_eq!(out, tcp(CLIENT, sport, POD_N2, 8080, "S"));
            let (_, reply) = h.run(&tcp(POD_N2, 8080, CLIENT, sport, "A"));
            assert_eq!(
                reply,
                tcp(frontend, NODE_PORT, CLIENT, sport, "A"),
                "the reply comes from the NodePort the pod used"
            );
        }
        assert_eq!(h.counter("ct_new_tunnel"), 0);
    }
}

#[test]
fn a_cluster_nodes_traffic_to_an_external_traffic_policy_local_frontend_gets_every_endpoint() {
    let local = "  externalTrafficPolicy: Local\n";
    let mut h = node1(&web(&[(POD_N2, "node2")], local), 0, 0, false);
    let (verdict, _) = h.run(&tcp(NODE2, 42100, NODE1, NODE_PORT, "S"));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a source not known as a Node is from outside: no local endpoint, dropped"
    );
    learn_nodes(&mut h);
    let (_, out) = h.run(&tcp(NODE2, 42101, NODE1, NODE_PORT, "S"));
    assert_eq!(
        out,
        tcp(NODE2, 42101, POD_N2, 8080, "S"),
        "node2's own process is inside the cluster: every endpoint"
    );
    let (_, out) = h.run(&tcp(NODE2, 42102, LB_IP, 80, "S"));
    assert_eq!(out, tcp(NODE2, 42102, POD_N2, 8080, "S"), "its LB IP too");
    let (verdict, _) = h.run(&tcp(EXTERNAL_CLIENT, 42103, NODE1, NODE_PORT, "S"));
    assert_eq!(verdict, TC_ACT_SHOT, "outside is still restricted");
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let local = "  internalTrafficPolicy: Local\n";
    let mut h = node1(
        &web(&[(POD_N1, "node1"), (POD_N2, "node2")], local),
        0,
        0,
        false,
    );
    for sport in 41300..41330 {
        let (_, out) = h.run(&tcp(CLIENT, sport, VIP, 80, "S"));
        assert_eq!(out, tcp(CLIENT, sport, POD_N1, 8080, "S"));
    }
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    let mut h = node1(
        &web(
            &[(POD_N1, "node1"), (POD_N2, "node1"), (POD_N2_B, "node1")],
            affinity,
        ),
        0,
        0,
        false,
    );
    let backend_of = |out: &[u8]| Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let (_, first) = h.run(&tcp(CLIENT, 41400, VIP, 80, "S"));
    let chosen = backend_of(&first);
    for sport in 41401..41440 {
        let (_, out) = h.run(&tcp(CLIENT, sport, VIP, 80, "S"));
        assert_eq!(backend_of(&out), chosen, "connection from port {sport}");
    }
    // Other clients still spread over all backends.
    let mut seen = BTreeSet::new();
    for i in 0..60u8 {
        let other = Ipv4Addr::new(198, 19, 3, 10 + i);
        let (_, out) = h.run(&tcp(other, 41500, VIP, 80, "S"));
        seen.insert(backend_of(&out));
    }
    assert_eq!(seen.len(), 3, "other clients use every backend: {seen:?}");
}

#[test]
fn hairpin_rewrites_the_source_so_the_pod_can_answer_itself() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    let syn = tcp(POD_N1, 41600, VIP, 80, "S");
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight back into the pod");
    assert_eq!(
        out,
        swapped_macs(&tcp(HAIRPIN, 41600, POD_N1, 8080, "S")),
        "the pod sees the hairpin address, not itself"
    );
    let (verdict, reply) = h.run(&tcp(POD_N1, 8080, HAIRPIN, 41600, "A"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        reply,
        swapped_macs(&tcp(VIP, 80, POD_N1, 41600, "A")),
        "the reply comes from the service"
    );
}

/// The two halves of a hairpin flow pair up through the hairpin address, and move together.
#[test]
fn a_hairpin_flow_is_promoted_as_a_pair() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    h.run(&tcp(POD_N1, 41610, VIP, 80, "S"));
    h.run(&tcp(POD_N1, 8080, HAIRPIN, 41610, "SA"));
    assert_eq!(h.counter("ct_promoted"), 0);
    let (_, out) = h.run(&tcp(POD_N1, 41610, VIP, 80, "A"));
    assert_eq!(out, swapped_macs(&tcp(HAIRPIN, 41610, POD_N1, 8080, "A")));
    assert_eq!(h.counter("ct_promoted"), 1);
    let tables = h.dataplane.conntrack.tables().unwrap();
    assert_eq!((tables.established.len(), tables.new.len()), (2, 0));
    let (_, reply) = h.run(&tcp(POD_N1, 8080, HAIRPIN, 41610, "A"));
    assert_eq!(reply, swapped_macs(&tcp(VIP, 80, POD_N1, 41610, "A")));
}

/// The loopback device stands in for the tunnel device: BPF_PROG_TEST_RUN cannot transmit, so
/// the test sees the redirect verdict and the packet as it would enter the tunnel.
const TUNNEL_IFINDEX: u32 = 1;

#[test]
fn remote_backend_is_reached_through_the_tunnel_translated_at_ingress() {
    let mut h = node1(&web(&[(POD_N2, "node2")], ""), 0, TUNNEL_IFINDEX, false);
    let (verdict, out) = h.run(&tcp(EXTERNAL_CLIENT, 41700, NODE1, NODE_PORT, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel");
    assert_eq!(
        out,
        tcp(EXTERNAL_CLIENT, 41700, POD_N2, 8080, "S"),
        "only the destination changes: the backend sees the client"
    );
    assert_eq!(h.counter("ct_new_tunnel"), 1);
    // Pod-to-ClusterIP traffic is routed natively, never tunnelled.
    let (verdict, _) = h.run(&tcp(CLIENT, 41701, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
}

#[test]
fn remote_backend_in_dsr_mode_gets_the_packet_untranslated() {
    let mut h = node1(
        &web(&[(POD_N2, "node2")], ""),
        node_flags::DSR,
        TUNNEL_IFINDEX,
        false,
    );
    let syn = tcp(EXTERNAL_CLIENT, 41800, LB_IP, 80, "S");
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, syn, "the backend's node translates");
    let ack = tcp(EXTERNAL_CLIENT, 41800, LB_IP, 80, "A");
    let (verdict, out) = h.run(&ack);
    assert_eq!(
        (verdict, out),
        (TC_ACT_REDIRECT, ack),
        "the flow stays on its node"
    );
    assert_eq!(h.counter("ct_encap_hit"), 1);
    // This node keeps no reverse entry: replies never pass through it.
    let entries = h.dataplane.conntrack.entries().unwrap();
    assert_eq!(entries.len(), 1, "one forwarding entry, no translation");
    // It sees the client's side only: the client's ACK says the handshake is done.
    assert_eq!(h.counter("ct_promoted"), 1);
    let tables = h.dataplane.conntrack.tables().unwrap();
    assert_eq!((tables.established.len(), tables.new.len()), (1, 0));
}

#[test]
fn an_icmp_error_about_a_dsr_reply_goes_into_the_tunnel_to_the_backends_node() {
    let mut h = node1(
        &web(&[(POD_N2, "node2")], ""),
        node_flags::DSR,
        TUNNEL_IFINDEX,
        false,
    );
    h.run(&tcp(EXTERNAL_CLIENT, 41820, LB_IP, 80, "S"));
    // node2 replied straight to the client from the LB IP; a router on the way could not pass
    // the reply on, and its error comes to the LB IP, which routes to this node.
    let router = Ipv4Addr::new(198, 18, 0, 254);
    let reply = tcp(LB_IP, 80, EXTERNAL_CLIENT, 41820, "SA");
    let error = icmp_error(router, LB_IP, 3, 4, &l3(&reply)[..28]);
    let (verdict, out) = h.run(&error);
    assert_eq!(
        (verdict, out),
        (TC_ACT_REDIRECT, error),
        "unchanged, into the tunnel: node2 translates the flow"
    );
    assert_eq!(h.counter("icmp_error_tunnelled"), 1);
}

#[test]
fn a_local_backends_icmp_error_about_a_node_port_flow_names_the_node_port() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    let syn = tcp(EXTERNAL_CLIENT, 41830, NODE1_SECOND, NODE_PORT, "S");
    let (_, forwarded) = h.run(&syn);
    let (_, out) = h.run(&icmp_error(POD_N1, EXTERNAL_CLIENT, 3, 3, l3(&forwarded)));
    assert_eq!(
        out,
        icmp_error(NODE1_SECOND, EXTERNAL_CLIENT, 3, 3, l3(&syn)),
        "from the node address the client used, quoting its own packet"
    );
    assert_eq!(h.counter("icmp_error_nat"), 1);
}

#[test]
fn a_dsr_forwarding_entry_waits_for_the_clients_ack() {
    let mut h = node1(
        &web(&[(POD_N2, "node2")], ""),
        node_flags::DSR,
        TUNNEL_IFINDEX,
        false,
    );
    for _ in 0..3 {
        h.run(&tcp(EXTERNAL_CLIENT, 41810, LB_IP, 80, "S"));
    }
    h.run(&tcp(EXTERNAL_CLIENT, 41810, LB_IP, 80, "RA"));
    assert_eq!(
        h.counter("ct_promoted"),
        0,
        "retried SYNs and a reset are no handshake"
    );
    let tables = h.dataplane.conntrack.tables().unwrap();
    assert_eq!((tables.established.len(), tables.new.len()), (0, 1));
}

/// A full-sized TCP segment of `ip_len` bytes from the external client, with DF as asked.
fn big_segment(dst: Ipv4Addr, dport: u16, ip_len: usize, dont_fragment: bool) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb])
        .ipv4(EXTERNAL_CLIENT.octets(), dst.octets(), 64)
        .tcp(41900, dport, 1000, 64240)
        .ack(2000)
        .write(&mut out, &vec![0x5a; ip_len - 40])
        .unwrap();
    let flags = if dont_fragment { 0x40 } else { 0 };
    out[14 + 6] = flags;
    out[14 + 7] = 0;
    fix_ip_checksum(&mut out);
    out
}

/// Asserts `out` is an ICMP "fragmentation needed" from `from` to the client announcing
/// `mtu`, quoting `sent` as the client sent it.
fn assert_frag_needed(out: &[u8], sent: &[u8], from: Ipv4Addr, mtu: u16) {
    use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
    let packet = SlicedPacket::from_ethernet(out).expect("a well-formed answer");
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        panic!("IPv4 answer");
    };
    assert_eq!(
        (ip.header().source_addr(), ip.header().destination_addr()),
        (from, EXTERNAL_CLIENT),
        "from the address the client used"
    );
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else {
        panic!("ICMP answer");
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }
        )
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload())
    );
    assert_eq!(
        icmp.payload(),
        &sent[14..14 + 40],
        "the client's own header, untranslated"
    );
    assert_eq!(out[..6], sent[6..12], "back to where it came from");
}

#[test]
fn packets_too_big_for_the_tunnel_get_fragmentation_needed_from_the_frontend() {
    // VXLAN over IPv4 takes 50 bytes of a 1500-byte underlay.
    let mut h = node1_with_mtu(
        &web(&[(POD_N2, "node2")], ""),
        0,
        TUNNEL_IFINDEX,
        false,
        1500,
    );
    let (verdict, _) = h.run(&tcp(EXTERNAL_CLIENT, 41900, NODE1, NODE_PORT, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the handshake enters the tunnel");
    let fits = big_segment(NODE1, NODE_PORT, 1450, true);
    let (verdict, out) = h.run(&fits);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &out[30..34],
        &POD_N2.octets(),
        "1450 bytes fit: translated and tunnelled"
    );

    let too_big = big_segment(NODE1, NODE_PORT, 1451, true);
    let (verdict, out) = h.run(&too_big);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out");
    assert_frag_needed(&out, &too_big, NODE1, 1450);
    assert_eq!(h.counter("icmp_too_big"), 1);

    // Without DF the packet may go: the encapsulated packet is fragmented on the way.
    let (verdict, out) = h.run(&big_segment(NODE1, NODE_PORT, 1451, false));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &POD_N2.octets());
    assert_eq!(h.counter("icmp_too_big"), 1);
}

#[test]
fn in_dsr_mode_too_big_packets_are_answered_by_the_ingress_node_too() {
    // IPIP over IPv4 takes 20 bytes. Not loopback here: test runs enter on loopback, and on
    // the IPIP device a packet starts with its IP header. Redirecting needs no real device.
    let mut h = node1_with_mtu(
        &web(&[(POD_N2, "node2")], ""),
        node_flags::DSR | node_flags::TUNNEL_IPIP,
        4242,
        false,
        1500,
    );
    let (verdict, _) = h.run(&tcp(EXTERNAL_CLIENT, 41900, LB_IP, 80, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, out) = h.run(&big_segment(LB_IP, 80, 1480, true));
    assert_eq!(
        (verdict, &out[30..34]),
        (TC_ACT_REDIRECT, &LB_IP.octets()[..]),
        "fits, untranslated"
    );
    let too_big = big_segment(LB_IP, 80, 1481, true);
    let (verdict, out) = h.run(&too_big);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_frag_needed(&out, &too_big, LB_IP, 1480);
}

/// `inner` (an Ethernet frame) as an old kernel's IPIP device shows it: the outer Ethernet and
/// IPv4 headers (protocol 4) still in front of the inner IPv4 packet.
fn old_ipip_layout(inner: &[u8], outer_src: Ipv4Addr, outer_dst: Ipv4Addr) -> Vec<u8> {
    let inner_ip = &inner[14..];
    let mut outer = etherparse::Ipv4Header::new(
        inner_ip.len() as u16,
        64,
        etherparse::IpNumber::IPV4,
        outer_src.octets(),
        outer_dst.octets(),
    )
    .unwrap();
    outer.header_checksum = outer.calc_header_checksum();
    let mut out = inner[..14].to_vec();
    outer.write(&mut out).unwrap();
    out.extend_from_slice(inner_ip);
    out
}

#[test]
fn an_old_kernels_ipip_layout_is_unwrapped_before_the_reply_is_forwarded() {
    // Its own network namespace: a veth with the client as a known neighbour makes the FIB
    // lookup of the reply succeed, whatever the host's routes. A FIB lookup also wants
    // forwarding on, as on any node.
    let _bpffs = private_bpffs(nix::sched::CloneFlags::CLONE_NEWNET);
    run_ok("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]);
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "wt0", "type", "veth", "peer", "name", "wt1"]);
    ip(&["addr", "add", &format!("{NODE1}/24"), "dev", "wt0"]);
    ip(&["link", "set", "wt0", "up"]);
    ip(&["link", "set", "wt1", "up"]);
    let client_mac = "02:00:00:00:00:c1";
    ip(&[
        "neigh",
        "replace",
        &EXTERNAL_CLIENT.to_string(),
        "lladdr",
        client_mac,
        "dev",
        "wt0",
        "nud",
        "permanent",
    ]);

    let mut h = node1(
        &web(&[(POD_N2, "node2")], ""),
        node_flags::TUNNEL_IPIP,
        4242,
        false,
    );
    let (verdict, _) = h.run(&tcp(EXTERNAL_CLIENT, 42000, NODE1, NODE_PORT, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the tunnel, translated here");

    // The reply comes back through the IPIP device: loopback in a test run.
    let config = NodeConfig {
        hairpin_v4: addr_of(HAIRPIN.into()).0,
        tunnel_ifindex: 1,
        flags: node_flags::TUNNEL_IPIP,
        ..NodeConfig::default()
    };
    h.dataplane.node.set_config(&config).unwrap();
    let reply = tcp(POD_N2, 8080, EXTERNAL_CLIENT, 42000, "SA");
    let (verdict, out) = h.run(&old_ipip_layout(&reply, NODE2, NODE1));
    assert_eq!(verdict, TC_ACT_REDIRECT, "forwarded to the client");
    let expected = forwarded(&tcp(NODE1, NODE_PORT, EXTERNAL_CLIENT, 42000, "SA"));
    assert_eq!(
        &out[12..],
        &expected[12..],
        "the outer IPv4 header is gone, the reply un-NATed (and its TTL one less: forwarded)"
    );
    assert_eq!(
        &out[..6],
        &[2, 0, 0, 0, 0, 0xc1],
        "to the client's neighbour"
    );

    // A packet that is neither layout is dropped as malformed, not guessed at.
    let mut garbled = old_ipip_layout(&reply, NODE2, NODE1);
    garbled[34] = 0x65;
    let (verdict, _) = h.run(&garbled);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_malformed"), 1);
}

#[test]
fn maglev_makes_every_node_pick_the_same_backend() {
    let endpoints: Vec<(Ipv4Addr, &str)> = (0..6)
        .map(|i| (Ipv4Addr::new(198, 19, 1, 20 + i), "node1"))
        .collect();
    let yaml = web(&endpoints, "");
    let mut a = node1(&yaml, 0, 0, true);
    // A second node with a different history: its backend ids differ, its choices must not.
    let mut b = node1(&web(&endpoints[..3], ""), 0, 0, true);
    b.apply(&yaml);
    for i in 0..200u16 {
        let client = Ipv4Addr::new(198, 18, 7, (i % 250) as u8);
        let (_, via_a) = a.run(&tcp(client, 42000 + i, NODE1, NODE_PORT, "S"));
        let (_, via_b) = b.run(&tcp(client, 42000 + i, NODE1_SECOND, NODE_PORT, "S"));
        assert_eq!(via_a[30..34], via_b[30..34], "flow {i}");
    }
}

/// A service of 1,000 endpoints gets a Maglev table of 131,071 entries (32 chunks): two nodes
/// with different histories (and so different backend ids) pick the same endpoint for every
/// flow, and removing one endpoint moves the flows it had and under 1% of the others.
#[test]
fn maglev_at_a_thousand_backends_sizes_its_table_and_agrees_between_nodes() {
    let endpoint = |i: u16| {
        (
            Ipv4Addr::new(198, 19, 4 + (i / 250) as u8, (i % 250) as u8 + 1),
            "node1",
        )
    };
    let all: Vec<(Ipv4Addr, &str)> = (0..1000).map(endpoint).collect();
    let yaml = web(&all, "");
    let mut a = node1(&yaml, 0, 0, true);
    let mut b = node1(&web(&all[..500], ""), 0, 0, true);
    b.apply(&yaml);
    let state = a.dataplane.services.read().unwrap();
    let node_port = state
        .services
        .iter()
        .find(|(k, _)| {
            k.addr == weir_common::Addr::UNSPECIFIED && u16::from_be(k.port_be) == NODE_PORT
        })
        .map(|(_, v)| *v)
        .expect("NodePort frontend");
    assert_eq!(node_port.maglev_size, 131_071);
    let chunks = state
        .maglev
        .keys()
        .filter(|k| k.service_id == node_port.service_id)
        .count();
    assert_eq!(chunks, 32);

    let flows: Vec<(Ipv4Addr, u16)> = (0..2000u16)
        .map(|i| {
            (
                Ipv4Addr::new(198, 18, 8 + (i / 250) as u8, (i % 250) as u8 + 1),
                40000 + i,
            )
        })
        .collect();
    let pick = |h: &mut Harness, (client, sport): (Ipv4Addr, u16), via: Ipv4Addr| {
        let (_, out) = h.run(&tcp(client, sport, via, NODE_PORT, "S"));
        Ipv4Addr::new(out[30], out[31], out[32], out[33])
    };
    let before: Vec<Ipv4Addr> = flows.iter().map(|f| pick(&mut a, *f, NODE1)).collect();
    for (flow, chosen) in flows.iter().zip(&before) {
        assert_eq!(pick(&mut b, *flow, NODE1), *chosen, "flow {flow:?}");
    }

    // One endpoint goes. The same flows through the node's other address: the hash leaves the
    // node address out, so they hash alike, while conntrack sees new flows and asks the table.
    let removed = before[0];
    let fewer: Vec<(Ipv4Addr, &str)> = all
        .iter()
        .copied()
        .filter(|(ip, _)| *ip != removed)
        .collect();
    a.apply(&web(&fewer, ""));
    let (mut own, mut others_moved) = (0, 0);
    for ((client, sport), chosen) in flows.iter().zip(&before) {
        let now = pick(&mut a, (*client, *sport), NODE1_SECOND);
        if *chosen == removed {
            own += 1;
            assert_ne!(now, removed);
        } else if now != *chosen {
            others_moved += 1;
        }
    }
    assert!(own >= 1);
    assert!(
        others_moved * 100 < flows.len(),
        "{others_moved} of {} flows on other endpoints moved",
        flows.len()
    );
}

/// `loadBalancerSourceRanges`: only listed sources start flows at the load-balancer IP and the
/// NodePort (counted in `drop_source_range` otherwise); the external IP and the ClusterIP are
/// not bound by them, nor are established flows' packets. The legacy annotation works alike when
/// the field is empty; removing the ranges lifts the restriction.
#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    let allowed = Ipv4Addr::new(198, 18, 0, 201); // EXTERNAL_CLIENT, in 198.18.0.128/25
    let denied = Ipv4Addr::new(198, 18, 0, 20);
    let ranges = "  loadBalancerSourceRanges: [\"198.18.0.128/25\", \"198.18.9.0/24\"]\n";
    let mut h = node1(&web(&[(POD_N1, "node1")], ranges), 0, 0, false);
    assert_eq!(EXTERNAL_CLIENT, allowed);
    let mut sport = 44000;
    let mut try_from = |h: &mut Harness, client: Ipv4Addr, frontend: Ipv4Addr, port: u16| {
        sport += 1;
        let (verdict, out) = h.run(&tcp(client, sport, frontend, port, "S"));
        verdict != TC_ACT_SHOT && out == tcp(client, sport, POD_N1, 8080, "S")
    };
    assert!(try_from(&mut h, allowed, LB_IP, 80));
    assert!(try_from(&mut h, allowed, NODE1, NODE_PORT));
    assert!(!try_from(&mut h, denied, LB_IP, 80));
    assert!(!try_from(&mut h, denied, NODE1, NODE_PORT));
    assert_eq!(h.counter("drop_source_range"), 2);
    // Not bound by the ranges, as kube-proxy applies them.
    assert!(try_from(&mut h, denied, EXTERNAL_IP, 80));
    assert!(try_from(&mut h, denied, VIP, 80));

    // A restarted agent reads the ranges back from the trie and has nothing to write.
    h.reconciler =
        weir_agent::reconcile::Reconciler::default().with_compile_options(CompileOptions {
            node_name: "node1".into(),
            ..CompileOptions::default()
        });
    let report = h.apply(&web(&[(POD_N1, "node1")], ranges));
    assert_eq!(report.writes, 0, "{report:?}");
    assert!(!try_from(&mut h, denied, LB_IP, 80));

    // The legacy annotation, when the field is empty.
    let annotated = web(&[(POD_N1, "node1")], "").replace(
        "metadata: {name: web, namespace: default}",
        "metadata: {name: web, namespace: default, annotations: \
         {service.beta.kubernetes.io/load-balancer-source-ranges: \"198.18.0.128/25\"}}",
    );
    h.apply(&annotated);
    assert!(!try_from(&mut h, denied, LB_IP, 80));
    assert!(try_from(&mut h, allowed, LB_IP, 80));

    // Without ranges, everyone again; the trie is emptied.
    h.apply(&web(&[(POD_N1, "node1")], ""));
    assert!(try_from(&mut h, denied, LB_IP, 80));
    assert!(h
        .dataplane
        .services
        .read()
        .unwrap()
        .source_ranges
        .is_empty());
}

/// A range that is no CIDR makes the Service bad input: refused, last good version kept.
#[test]
fn an_invalid_source_range_is_refused_and_the_last_good_version_kept() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    let report = h.apply(&web(
        &[(POD_N1, "node1")],
        "  loadBalancerSourceRanges: [\"198.18.0.0/33\"]\n",
    ));
    assert_eq!(report.rejected_objects, 1);
    let (_, out) = h.run(&tcp(Ipv4Addr::new(198, 18, 0, 20), 44100, LB_IP, 80, "S"));
    assert_eq!(
        out,
        tcp(Ipv4Addr::new(198, 18, 0, 20), 44100, POD_N1, 8080, "S")
    );
}

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, 0x10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x10);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 2, 0, 0, 0, 0, 0x11);

fn dual_stack() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: six, namespace: default}}
spec:
  clusterIPs: ["{VIP}", "{VIP6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: six-v6
  namespace: default
  labels: {{kubernetes.io/service-name: six}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: ["{BACKEND6}"]
---
apiVersion: v1
kind: Service
metadata: {{name: none6, namespace: default}}
spec:
  clusterIPs: ["fd00:18:100::11"]
  ports:
  - {{name: http, protocol: TCP, port: 81, targetPort: 8081}}
"#
    )
}

#[test]
fn ipv6_cluster_ip_is_translated_both_ways() {
    let mut h = node1(&dual_stack(), 0, 0, false);
    let (verdict, out) = h.run(&tcp6(CLIENT6, 43000, VIP6, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp6(CLIENT6, 43000, BACKEND6, 8080, "S"));
    let (_, reply) = h.run(&tcp6(BACKEND6, 8080, CLIENT6, 43000, "A"));
    assert_eq!(reply, tcp6(VIP6, 80, CLIENT6, 43000, "A"));
    let (_, out) = h.run(&udp6(CLIENT6, 43001, VIP6, 53));
    assert_eq!(out, udp6(CLIENT6, 43001, BACKEND6, 5353));
    let (_, reply) = h.run(&udp6(BACKEND6, 5353, CLIENT6, 43001));
    assert_eq!(reply, udp6(VIP6, 53, CLIENT6, 43001));
}

/// The same IPv6 frame with options headers (hop-by-hop, then destination options, each 8 bytes
/// of padding) between the fixed header and the upper layer.
fn with_ipv6_options(frame: &[u8]) -> Vec<u8> {
    const ETH: usize = 14;
    let upper = frame[ETH + 6];
    let mut out = frame[..ETH + 40].to_vec();
    out[ETH + 6] = 0; // hop-by-hop
    out.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]); // then destination options; PadN
    out.extend_from_slice(&[upper, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[ETH + 40..]);
    let payload = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]) + 16;
    out[ETH + 4..ETH + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

#[test]
fn ipv6_options_headers_are_stepped_over_to_the_upper_layer() {
    let mut h = node1(&dual_stack(), 0, 0, false);
    // The upper-layer checksum does not cover options headers: the frames stay valid.
    let (verdict, out) = h.run(&with_ipv6_options(&udp6(CLIENT6, 43010, VIP6, 53)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        with_ipv6_options(&udp6(CLIENT6, 43010, BACKEND6, 5353))
    );
    let (_, reply) = h.run(&with_ipv6_options(&udp6(BACKEND6, 5353, CLIENT6, 43010)));
    assert_eq!(reply, with_ipv6_options(&udp6(VIP6, 53, CLIENT6, 43010)));
    let (_, out) = h.run(&with_ipv6_options(&tcp6(CLIENT6, 43011, VIP6, 80, "S")));
    assert_eq!(
        out,
        with_ipv6_options(&tcp6(CLIENT6, 43011, BACKEND6, 8080, "S"))
    );
    assert_eq!(h.counter("pass_ipv6_extension"), 0);

    // Options that claim more than the payload holds: truncated, dropped.
    let mut lying = with_ipv6_options(&udp6(CLIENT6, 43012, VIP6, 53));
    lying[14 + 40 + 1] = 200;
    let (verdict, _) = h.run(&lying);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_truncated"), 1);
}

#[test]
fn ipv6_service_without_endpoints_refuses_a_syn_with_a_reset() {
    use etherparse::PacketBuilder;
    let mut h = node1(&dual_stack(), 0, 0, false);
    let none6: Ipv6Addr = "fd00:18:100::11".parse().unwrap();
    let (verdict, out) = h.run(&tcp6(CLIENT6, 43100, none6, 81, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let ip = PacketBuilder::ethernet2(MAC_B, MAC_A).ipv6(none6.octets(), CLIENT6.octets(), 64);
    assert_eq!(
        out,
        refusal(ip, 81, 43100),
        "RST+ACK from the frontend: refused as promptly as over IPv4"
    );
    assert_eq!(h.counter("reject_no_backend"), 1);
}

#[test]
fn node_port_follows_the_host_addresses_it_is_given() {
    let mut h = node1(&web(&[(POD_N1, "node1")], ""), 0, 0, false);
    let added: IpAddr = Ipv4Addr::new(198, 18, 2, 1).into();
    let mut addrs = h.dataplane.node.host_addrs().unwrap();
    addrs.insert(weir_agent::compile::addr_key(added));
    assert_eq!(
        h.dataplane.node.set_host_addrs(&addrs).unwrap(),
        1,
        "one write"
    );
    let (_, out) = h.run(&tcp(
        EXTERNAL_CLIENT,
        43200,
        Ipv4Addr::new(198, 18, 2, 1),
        NODE_PORT,
        "S",
    ));
    assert_eq!(out, tcp(EXTERNAL_CLIENT, 43200, POD_N1, 8080, "S"));
}
