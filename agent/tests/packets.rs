//! Packet-level tests of the ingress program through BPF_PROG_TEST_RUN: crafted packets in,
//! exact bytes out. Expected packets are built from scratch with the rewritten fields, so every
//! checksum the program updated incrementally is checked against a full recomputation.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr};
use weir_agent::compile::addr_of;
use weir_agent::conntrack::view;
use weir_common::{collision, ct_kind, program_names, CtKey, CtValue};

fn backend_of(out: &[u8]) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

#[test]
fn tcp_syn_to_service_is_dnated_with_valid_checksums() {
    let mut h = Harness::new(&[BACKEND]);
    let (verdict, out) = h.run(&tcp(CLIENT, 40000, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(CLIENT, 40000, BACKEND, 8080, "S"));
    assert_eq!(h.counter("ct_new_flow"), 1);

    let tables = h.dataplane.conntrack.tables().unwrap();
    let flows = view(&tables, weir_agent::conntrack::monotonic_now_ns());
    assert_eq!(flows.len(), 2, "forward and reverse entries: {flows:?}");
    assert!(flows.iter().all(|f| f.paired && f.state == "syn_sent"));
}

#[test]
fn established_flow_keeps_its_backend_and_skips_service_lookup() {
    let backends = [BACKEND, OTHER, std::net::Ipv4Addr::new(198, 19, 1, 12)];
    let mut h = Harness::new(&backends);
    let (_, first) = h.run(&tcp(CLIENT, 40001, VIP, 80, "S"));
    let chosen = backend_of(&first);
    assert!(backends.contains(&chosen));
    for _ in 0..20 {
        let (verdict, out) = h.run(&tcp(CLIENT, 40001, VIP, 80, "A"));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, tcp(CLIENT, 40001, chosen, 8080, "A"));
    }
    assert_eq!(h.counter("ct_new_flow"), 1);
    assert_eq!(h.counter("ct_forward_hit"), 20);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let backends = [BACKEND, OTHER, std::net::Ipv4Addr::new(198, 19, 1, 12)];
    let mut h = Harness::new(&backends);
    let mut used = std::collections::BTreeSet::new();
    for port in 0..60 {
        let (_, out) = h.run(&tcp(CLIENT, 41000 + port, VIP, 80, "S"));
        used.insert(backend_of(&out));
    }
    assert_eq!(used.len(), 3, "60 flows over 3 backends used {used:?}");
}

#[test]
fn replies_are_reverse_nated_and_tcp_state_is_tracked() {
    let mut h = Harness::new(&[BACKEND]);
    h.run(&tcp(CLIENT, 40002, VIP, 80, "S"));
    let (verdict, out) = h.run(&tcp(BACKEND, 8080, CLIENT, 40002, "SA"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(VIP, 80, CLIENT, 40002, "SA"));
    assert_eq!(h.counter("ct_reverse_hit"), 1);

    let state = |h: &Harness| {
        let tables = h.dataplane.conntrack.tables().unwrap();
        let flows = view(&tables, weir_agent::conntrack::monotonic_now_ns());
        assert!(flows.iter().all(|f| f.state == flows[0].state));
        flows[0].state
    };
    // Answered, not yet established: the client's ACK completes the handshake (as
    // nf_conntrack's SYN_RECV); until then the flow is in the new-flow table.
    assert_eq!(state(&h), "syn_sent");
    h.run(&tcp(CLIENT, 40002, VIP, 80, "A"));
    assert_eq!(state(&h), "established");
    h.run(&tcp(CLIENT, 40002, VIP, 80, "FA"));
    assert_eq!(state(&h), "established", "half-closed is still established");
    h.run(&tcp(BACKEND, 8080, CLIENT, 40002, "FA"));
    assert_eq!(state(&h), "closing");
}

#[test]
fn rst_closes_a_flow() {
    let mut h = Harness::new(&[BACKEND]);
    h.run(&tcp(CLIENT, 40003, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, 40003, "R"));
    let tables = h.dataplane.conntrack.tables().unwrap();
    let flows = view(&tables, weir_agent::conntrack::monotonic_now_ns());
    assert!(flows.iter().all(|f| f.state == "closing"), "{flows:?}");
}

#[test]
fn udp_is_nated_both_ways() {
    let mut h = Harness::new(&[BACKEND]);
    let (verdict, out) = h.run(&udp(CLIENT, 33000, VIP, 53));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp(CLIENT, 33000, BACKEND, 5353));
    let (_, reply) = h.run(&udp(BACKEND, 5353, CLIENT, 33000));
    assert_eq!(reply, udp(VIP, 53, CLIENT, 33000));
}

#[test]
fn udp_without_checksum_keeps_it_zero() {
    let mut h = Harness::new(&[BACKEND]);
    let zero_csum = |mut p: Vec<u8>| {
        p[40] = 0;
        p[41] = 0;
        p
    };
    let (_, out) = h.run(&zero_csum(udp(CLIENT, 33001, VIP, 53)));
    assert_eq!(out, zero_csum(udp(CLIENT, 33001, BACKEND, 5353)));
}

#[test]
fn ip_options_move_the_l4_header_and_are_kept() {
    let mut h = Harness::new(&[BACKEND]);
    let with_options = |p: Vec<u8>| {
        // Four NOP option bytes after the 20-byte header: IHL 6, total length + 4.
        let mut out = p[..34].to_vec();
        out.extend_from_slice(&[1, 1, 1, 1]);
        out.extend_from_slice(&p[34..]);
        out[14] = 0x46;
        let total = u16::from_be_bytes([out[16], out[17]]) + 4;
        out[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ip_checksum(&mut out);
        out
    };
    let (verdict, out) = h.run(&with_options(tcp(CLIENT, 40004, VIP, 80, "S")));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, with_options(tcp(CLIENT, 40004, BACKEND, 8080, "S")));
}

#[test]
fn icmp_error_from_backend_is_un_nated() {
    let mut h = Harness::new(&[BACKEND]);
    let (_, forwarded) = h.run(&udp(CLIENT, 33002, VIP, 53));
    // The backend answers the DNATed datagram with port unreachable, quoting what it got.
    let error = icmp_error(BACKEND, CLIENT, 3, 3, l3(&forwarded));
    let (verdict, out) = h.run(&error);
    assert_eq!(verdict, TC_ACT_OK);
    let original = udp(CLIENT, 33002, VIP, 53);
    assert_eq!(out, icmp_error(VIP, CLIENT, 3, 3, l3(&original)));
    assert_eq!(h.counter("icmp_error_nat"), 1);
}

#[test]
fn icmp_error_from_a_router_keeps_its_source() {
    let mut h = Harness::new(&[BACKEND]);
    let (_, forwarded) = h.run(&tcp(CLIENT, 40005, VIP, 80, "S"));
    let router = std::net::Ipv4Addr::new(198, 18, 0, 254);
    // Fragmentation needed, from a router between the nodes.
    let (verdict, out) = h.run(&icmp_error(router, CLIENT, 3, 4, &l3(&forwarded)[..28]));
    assert_eq!(verdict, TC_ACT_OK);
    let original = tcp(CLIENT, 40005, VIP, 80, "S");
    assert_eq!(out, icmp_error(router, CLIENT, 3, 4, &l3(&original)[..28]));
}

/// The node's own stack cannot forward the translated segment (the backend's link is smaller)
/// and answers the client itself, quoting the segment as translated: the egress program names
/// the frontend in the quote, so the client's socket learns its path MTU.
#[test]
fn the_nodes_own_fragmentation_needed_is_un_nated_on_its_way_out() {
    let mut h = Harness::new(&[BACKEND]);
    let (_, forwarded) = h.run(&tcp(CLIENT, 40015, VIP, 80, "S"));
    let node = std::net::Ipv4Addr::new(198, 18, 0, 1);
    let error = icmp_error(node, CLIENT, 3, 4, &l3(&forwarded)[..28]);
    let (verdict, out) = h.run_program(program_names::EGRESS, &error);
    assert_eq!(verdict, TC_ACT_OK);
    let original = tcp(CLIENT, 40015, VIP, 80, "S");
    assert_eq!(out, icmp_error(node, CLIENT, 3, 4, &l3(&original)[..28]));
    assert_eq!(h.counter("icmp_error_nat"), 1);
}

/// Everything else leaving the node passes the egress program untouched and uncounted: the
/// counters account for packets entering the node.
#[test]
fn the_egress_program_passes_everything_else_byte_for_byte() {
    let mut h = Harness::new(&[BACKEND]);
    let (_, forwarded) = h.run(&tcp(CLIENT, 40016, VIP, 80, "S"));
    let before = h.counter_values();
    let unknown_flow = tcp(CLIENT, 40017, BACKEND, 8080, "S");
    let cases = [
        forwarded.clone(),
        udp(CLIENT, 33020, VIP, 53),
        icmp_echo(CLIENT, VIP),
        // An error about a flow Weir does not know.
        icmp_error(BACKEND, CLIENT, 3, 4, &l3(&unknown_flow)[..28]),
    ];
    for packet in cases {
        let (verdict, out) = h.run_program(program_names::EGRESS, &packet);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, packet);
    }
    assert_eq!(h.counter_values(), before);
}

#[test]
fn unrelated_packets_pass_byte_for_byte() {
    let mut h = Harness::new(&[BACKEND]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tcp to no service",
            tcp(CLIENT, 40006, OTHER, 80, "S"),
            "pass_no_service",
        ),
        (
            "icmp echo to a pod",
            icmp_echo(CLIENT, OTHER),
            "pass_icmp_unrelated",
        ),
        (
            "icmp error about no flow",
            icmp_error(OTHER, CLIENT, 3, 3, l3(&udp(CLIENT, 1, OTHER, 2))),
            "pass_icmp_unrelated",
        ),
        ("arp", arp(), "pass_not_ip"),
        ("ipv6 to no service", ipv6_udp(), "pass_no_service"),
        ("gre", other_proto(), "pass_other_proto"),
        (
            "a later fragment of no flow",
            later_fragment(tcp(CLIENT, 40007, OTHER, 80, "S")),
            "pass_fragment",
        ),
    ];
    for (what, packet, counter) in cases {
        let before = h.counter(counter);
        let (verdict, out) = h.run(&packet);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(out, packet, "{what} must pass unmodified");
        assert_eq!(
            h.counter(counter),
            before + 1,
            "{what} counted as {counter}"
        );
    }
}

#[test]
fn broken_packets_are_dropped() {
    let mut h = Harness::new(&[BACKEND]);
    let good = tcp(CLIENT, 40008, VIP, 80, "S");
    let mut ihl_too_small = good.clone();
    ihl_too_small[14] = 0x44;
    let mut wrong_version = good.clone();
    wrong_version[14] = 0x55;
    let mut claims_more = good.clone();
    claims_more[16..18].copy_from_slice(&2000u16.to_be_bytes());
    fix_ip_checksum(&mut claims_more);
    // An IP header whose payload is too short for a TCP header.
    let mut short_l4 = good[..14 + 20 + 10].to_vec();
    short_l4[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ip_checksum(&mut short_l4);
    let cases = [
        ("ihl below 5", ihl_too_small, "drop_malformed"),
        ("ip version 5", wrong_version, "drop_malformed"),
        (
            "total length beyond the frame",
            claims_more,
            "drop_truncated",
        ),
        ("tcp header cut short", short_l4, "drop_truncated"),
        // A frame cut inside the IPv4 header cannot be fed through BPF_PROG_TEST_RUN: the kernel
        // parses it before the program runs and refuses it with EINVAL.
    ];
    for (what, packet, counter) in cases {
        let before = h.counter(counter);
        let (verdict, _) = h.run(&packet);
        assert_eq!(verdict, TC_ACT_SHOT, "{what}");
        assert_eq!(
            h.counter(counter),
            before + 1,
            "{what} counted as {counter}"
        );
    }
    assert!(
        h.dataplane.conntrack.entries().unwrap().is_empty(),
        "no flow from broken packets"
    );
}

#[test]
fn service_without_endpoints_refuses_a_syn_with_a_reset() {
    use etherparse::PacketBuilder;
    let mut h = Harness::new(&[BACKEND]);
    let empty: Ipv4Addr = "198.18.100.11".parse().unwrap();
    let (verdict, out) = h.run(&tcp(CLIENT, 40008, empty, 81, "S"));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    let ip = PacketBuilder::ethernet2(MAC_B, MAC_A).ipv4(empty.octets(), CLIENT.octets(), 64);
    assert_eq!(out, refusal(ip, 81, 40008), "RST+ACK from the frontend");
    assert_eq!(h.counter("reject_no_backend"), 1, "counted as a refusal");
    assert_eq!(h.counter("reset_no_backend"), 0);
    // A reset gets no answer at all.
    let (verdict, _) = h.run(&tcp(CLIENT, 40008, empty, 81, "RA"));
    assert_eq!(verdict, TC_ACT_SHOT, "a reset is not answered");
    assert_eq!(h.counter("drop_reset_no_backend"), 1);
}

#[test]
fn service_without_endpoints_answers_a_datagram_with_port_unreachable() {
    use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
    let mut h = Harness::new(&[BACKEND]);
    let empty: Ipv4Addr = "198.18.100.11".parse().unwrap();
    let datagram = udp(CLIENT, 40009, empty, 81);
    let (verdict, out) = h.run(&datagram);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    assert_eq!(h.counter("reject_no_backend"), 1);
    assert_eq!(&out[..6], &datagram[6..12], "back to the client's MAC");
    let packet = SlicedPacket::from_ethernet(&out).expect("a well-formed reply");
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        panic!("IPv4 reply");
    };
    assert_eq!(ip.header().source_addr(), empty, "from the frontend");
    assert_eq!(ip.header().destination_addr(), CLIENT);
    let mut header = ip.header().to_header();
    let sent_csum = header.header_checksum;
    header.header_checksum = header.calc_header_checksum();
    assert_eq!(sent_csum, header.header_checksum, "IP header checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else {
        panic!("ICMP reply");
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    assert_eq!(
        icmp.payload(),
        &l3(&datagram)[..28],
        "quotes the IP header and the UDP header"
    );
}

#[test]
fn endpoint_changes_leave_established_flows_alone() {
    let mut h = Harness::new(&[BACKEND]);
    h.run(&tcp(CLIENT, 40010, VIP, 80, "S"));
    let report = h.apply(&cluster_yaml(&[OTHER]));
    assert!(report.writes > 0);
    let (_, out) = h.run(&tcp(CLIENT, 40010, VIP, 80, "A"));
    assert_eq!(
        out,
        tcp(CLIENT, 40010, BACKEND, 8080, "A"),
        "the open flow keeps its backend"
    );
    let (_, out) = h.run(&tcp(CLIENT, 40011, VIP, 80, "S"));
    assert_eq!(
        out,
        tcp(CLIENT, 40011, OTHER, 8080, "S"),
        "a new flow gets the new backend"
    );
    assert_eq!(
        h.apply(&cluster_yaml(&[OTHER])).writes,
        0,
        "a resync writes nothing"
    );
}

#[test]
fn a_bad_service_keeps_its_last_good_state_and_the_rest_applies() {
    let mut h = Harness::new(&[BACKEND]);
    let bad = cluster_yaml(&[OTHER])
        .replace("clusterIP: 198.18.100.11", "clusterIP: 198.18.100.300")
        .replace(
            &format!("clusterIPs: [\"{VIP}\"]"),
            "clusterIPs: [\"not-an-ip\"]",
        );
    let report = h.apply(&bad);
    assert_eq!(report.rejected_objects, 2);
    // The echo service kept its VIP; its endpoints (a valid slice) moved to OTHER.
    let (verdict, out) = h.run(&tcp(CLIENT, 40012, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(CLIENT, 40012, OTHER, 8080, "S"));
    // The empty service still rejects, as before.
    let (verdict, _) = h.run(&tcp(
        CLIENT,
        40013,
        "198.18.100.11".parse().unwrap(),
        81,
        "S",
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT);
}

fn arp() -> Vec<u8> {
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x06]);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a]);
    p.extend_from_slice(&CLIENT.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&VIP.octets());
    p
}

fn ipv6_udp() -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(1000, 53)
        .write(&mut out, b"x")
        .unwrap();
    out
}

fn other_proto() -> Vec<u8> {
    // To a pod: to a frontend it would be dropped (`fragments.rs`).
    let mut p = udp(CLIENT, 1, OTHER, 53);
    p[23] = 47;
    fix_ip_checksum(&mut p);
    p
}

fn later_fragment(mut p: Vec<u8>) -> Vec<u8> {
    // More Fragments set, offset 8 bytes: no ports here (`fragments.rs` has the datagrams).
    p[20] = 0x20;
    p[21] = 0x01;
    fix_ip_checksum(&mut p);
    p
}

// Tuple collisions: one client address and port reaching one backend through two frontends (a
// load balancer in front of the cluster reuses its source port across Services and nodes).

const PAIR_VIP6: &str = "fd00:18:100::20";
const PAIR_EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 20);
const PAIR_EXTERNAL6: &str = "fd00:18:200::20";
const PAIR_BACKEND6: &str = "fd00:19:2::11";
const PAIR_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
const CLIENT6: &str = "fd00:19:1::10";

/// A dual-stack Service `pair` (TCP 80 -> 8080, UDP 53 -> 5353) with two frontends per family,
/// its ClusterIP and an external IP, and one endpoint per family: two frontends, one backend.
fn pair_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: pair, namespace: default}}
spec:
  clusterIPs: ["{PAIR_VIP}", "{PAIR_VIP6}"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: ["{PAIR_EXTERNAL}", "{PAIR_EXTERNAL6}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: pair-v4
  namespace: default
  labels: {{kubernetes.io/service-name: pair}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: ["{BACKEND}"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: pair-v6
  namespace: default
  labels: {{kubernetes.io/service-name: pair}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: ["{PAIR_BACKEND6}"]
"#
    )
}

fn pair_harness() -> Harness {
    let mut h = Harness::new(&[BACKEND]);
    h.apply(&pair_yaml());
    h
}

/// One family's addresses of the colliding pair.
struct Pair {
    client: IpAddr,
    cluster_ip: IpAddr,
    external_ip: IpAddr,
    backend: IpAddr,
}

fn pairs() -> [Pair; 2] {
    let v6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    [
        Pair {
            client: CLIENT.into(),
            cluster_ip: PAIR_VIP.into(),
            external_ip: PAIR_EXTERNAL.into(),
            backend: BACKEND.into(),
        },
        Pair {
            client: v6(CLIENT6),
            cluster_ip: v6(PAIR_VIP6),
            external_ip: v6(PAIR_EXTERNAL6),
            backend: v6(PAIR_BACKEND6),
        },
    ]
}

/// A TCP segment (`proto` 6) or UDP datagram (17) of either family, as [`tcp`] / [`udp`] and
/// their IPv6 twins build them.
fn segment(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: &str) -> Vec<u8> {
    match (src, dst, proto) {
        (IpAddr::V4(s), IpAddr::V4(d), 6) => tcp(s, sport, d, dport, flags),
        (IpAddr::V4(s), IpAddr::V4(d), _) => udp(s, sport, d, dport),
        (IpAddr::V6(s), IpAddr::V6(d), 6) => tcp6(s, sport, d, dport, flags),
        (IpAddr::V6(s), IpAddr::V6(d), _) => udp6(s, sport, d, dport),
        _ => panic!("mixed families"),
    }
}

/// Port unreachable from `src` to `dst` quoting `quoted` (an IP packet without Ethernet).
fn port_unreachable(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => icmp_error(s, d, 3, 3, quoted),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut out = Vec::new();
            etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(s.octets(), d.octets(), 64)
                .icmpv6_raw(1, 4, [0; 4])
                .write(&mut out, quoted)
                .unwrap();
            out
        }
        _ => panic!("mixed families"),
    }
}

/// The client's key of a flow, as the data path keys it.
fn forward_key(proto: u8, client: IpAddr, sport: u16, frontend: IpAddr, dport: u16) -> CtKey {
    let (saddr, family) = addr_of(client);
    CtKey {
        saddr,
        daddr: addr_of(frontend).0,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family,
        _pad: 0,
    }
}

/// The source port of a TCP or UDP packet in an Ethernet frame.
fn source_port(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x86, 0xdd] {
        54
    } else {
        34
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

#[test]
fn colliding_flows_reach_the_backend_from_distinct_ports_and_get_their_own_replies() {
    let mut h = pair_harness();
    for (i, p) in pairs().iter().enumerate() {
        for (proto, fport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 5353)] {
            let what = format!("{} {}", p.client, if proto == 6 { "tcp" } else { "udp" });
            let sport = 40100 + i as u16;
            let resolved = h.counter("ct_collision_resolved");
            let seg = |src, sport, dst, dport, flags| segment(proto, src, sport, dst, dport, flags);

            // First flow, through the ClusterIP: the client's own port.
            let (verdict, out) = h.run(&seg(p.client, sport, p.cluster_ip, fport, "S"));
            assert_eq!(verdict, TC_ACT_OK, "{what}");
            assert_eq!(out, seg(p.client, sport, p.backend, bport, "S"), "{what}");

            // Second flow, same client address and port, through the external IP: its reply
            // key is taken, so the backend sees it from another port.
            let (verdict, out) = h.run(&seg(p.client, sport, p.external_ip, fport, "S"));
            assert_eq!(verdict, TC_ACT_OK, "{what}");
            let moved = source_port(&out);
            let key = forward_key(proto, p.client, sport, p.external_ip, fport);
            assert_eq!(
                moved.to_be(),
                collision::moved_port_be(&key, 1),
                "{what}: the flow's first moved port"
            );
            assert_ne!(moved, sport, "{what}");
            assert_eq!(out, seg(p.client, moved, p.backend, bport, "S"), "{what}");
            assert_eq!(h.counter("ct_collision_resolved"), resolved + 1, "{what}");

            // Each flow's replies go back from its own frontend to the client's own port,
            // before and after the handshake moves the flows to the established table.
            for round in ["new", "established"] {
                let (_, reply) = h.run(&seg(p.backend, bport, p.client, sport, "SA"));
                assert_eq!(
                    reply,
                    seg(p.cluster_ip, fport, p.client, sport, "SA"),
                    "{what}, {round}: the first flow's reply"
                );
                let (_, reply) = h.run(&seg(p.backend, bport, p.client, moved, "SA"));
                assert_eq!(
                    reply,
                    seg(p.external_ip, fport, p.client, sport, "SA"),
                    "{what}, {round}: the second flow's reply"
                );
                let (_, out) = h.run(&seg(p.client, sport, p.external_ip, fport, "A"));
                assert_eq!(out, seg(p.client, moved, p.backend, bport, "A"), "{what}");
                let (_, out) = h.run(&seg(p.client, sport, p.cluster_ip, fport, "A"));
                assert_eq!(out, seg(p.client, sport, p.backend, bport, "A"), "{what}");
            }

            // The backend's port unreachable about the second flow names its frontend and the
            // client's own port, as the client sent it.
            let (_, forwarded) = h.run(&seg(p.client, sport, p.external_ip, fport, "A"));
            let error = port_unreachable(p.backend, p.client, l3(&forwarded));
            let (verdict, out) = h.run(&error);
            assert_eq!(verdict, TC_ACT_OK, "{what}");
            let sent = seg(p.client, sport, p.external_ip, fport, "A");
            assert_eq!(
                out,
                port_unreachable(p.external_ip, p.client, l3(&sent)),
                "{what}: the ICMP error translated back"
            );
        }
    }
    assert_eq!(h.counter("drop_ct_collision"), 0);
    // Every flow was answered and moved to the established table as a pair.
    let tables = h.dataplane.conntrack.tables().unwrap();
    let flows = view(&tables, weir_agent::conntrack::monotonic_now_ns());
    assert_eq!(
        flows.len(),
        16,
        "2 families x 2 protocols x 2 flows x 2 entries"
    );
    assert!(
        flows.iter().all(|f| f.paired && f.table == "established"),
        "{flows:?}"
    );
}

#[test]
fn an_icmp_error_from_the_client_about_a_moved_flows_reply_reaches_the_backend() {
    let mut h = pair_harness();
    h.run(&udp(CLIENT, 40200, PAIR_VIP, 53));
    let (_, out) = h.run(&udp(CLIENT, 40200, PAIR_EXTERNAL, 53));
    let moved = source_port(&out);
    // The client refuses the second flow's reply (its socket is gone): the error quotes the
    // reply as it arrived, from the frontend to the client's own port.
    let (_, reply) = h.run(&udp(BACKEND, 5353, CLIENT, moved));
    assert_eq!(reply, udp(PAIR_EXTERNAL, 53, CLIENT, 40200));
    let (verdict, out) = h.run(&icmp_error(CLIENT, PAIR_EXTERNAL, 3, 3, l3(&reply)));
    assert_eq!(verdict, TC_ACT_OK);
    let as_sent = udp(BACKEND, 5353, CLIENT, moved);
    assert_eq!(
        out,
        icmp_error(CLIENT, BACKEND, 3, 3, l3(&as_sent)),
        "the backend gets it about its own datagram"
    );
}

#[test]
fn a_collision_without_a_free_port_is_dropped_not_misrouted() {
    let mut h = pair_harness();
    h.run(&tcp(CLIENT, 40300, PAIR_VIP, 80, "S"));
    // Every port the second flow would move to is held by another flow.
    let key = forward_key(6, CLIENT.into(), 40300, PAIR_EXTERNAL.into(), 80);
    for attempt in 1..collision::TRIES {
        let reply_key = CtKey {
            saddr: addr_of(BACKEND.into()).0,
            daddr: key.saddr,
            sport_be: 8080u16.to_be(),
            dport_be: collision::moved_port_be(&key, attempt),
            proto: 6,
            family: key.family,
            _pad: 0,
        };
        let other_flow = CtValue {
            kind: ct_kind::REVERSE,
            nat_addr: addr_of(PAIR_VIP.into()).0,
            nat_port_be: 80u16.to_be(),
            ..CtValue::default()
        };
        h.dataplane
            .conntrack
            .insert_new(&reply_key, &other_flow)
            .unwrap();
    }
    let before = h.dataplane.conntrack.entries().unwrap().len();
    let (verdict, _) = h.run(&tcp(CLIENT, 40300, PAIR_EXTERNAL, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_ct_collision"), 1);
    assert_eq!(h.counter("ct_collision_resolved"), 0);
    assert_eq!(
        h.dataplane.conntrack.entries().unwrap().len(),
        before,
        "nothing created"
    );
}

#[test]
fn a_retransmitted_syn_whose_entries_exist_is_no_collision() {
    let mut h = pair_harness();
    h.run(&tcp(CLIENT, 40400, PAIR_VIP, 80, "S"));
    let (_, first) = h.run(&tcp(CLIENT, 40400, PAIR_EXTERNAL, 80, "S"));
    let (_, again) = h.run(&tcp(CLIENT, 40400, PAIR_EXTERNAL, 80, "S"));
    assert_eq!(first, again, "the same moved port");
    // The flow's client entry gone (an endpoint retired, eviction): its reply entry is its own.
    let key = forward_key(6, CLIENT.into(), 40400, PAIR_EXTERNAL.into(), 80);
    h.dataplane.conntrack.remove(&key).unwrap();
    let (_, recreated) = h.run(&tcp(CLIENT, 40400, PAIR_EXTERNAL, 80, "S"));
    assert_eq!(
        recreated, first,
        "the same port again, its own entry followed"
    );
    assert_eq!(h.counter("ct_collision_resolved"), 2);
    assert_eq!(h.counter("drop_ct_collision"), 0);
}

/// An established flow's packets are read and rewritten in place (bpf/ebpf/src/fast.rs), not
/// by the full path's helpers: both must leave the same bytes. Every family and protocol, both
/// directions, a UDP datagram without checksum, and the same flow's packets again once the
/// entries are in the established table.
#[test]
fn established_flows_are_translated_in_place_as_on_the_full_path() {
    let mut h = pair_harness();
    for p in pairs() {
        for (proto, fport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 5353)] {
            let sport = 41000;
            let from_client = |flags| segment(proto, p.client, sport, p.cluster_ip, fport, flags);
            let to_backend = |flags| segment(proto, p.client, sport, p.backend, bport, flags);
            let from_backend = |flags| segment(proto, p.backend, bport, p.client, sport, flags);
            let to_client = |flags| segment(proto, p.cluster_ip, fport, p.client, sport, flags);
            // Opened and answered: the full path.
            assert_eq!(h.run(&from_client("S")).1, to_backend("S"));
            assert_eq!(h.run(&from_backend("SA")).1, to_client("SA"));
            assert_eq!(h.run(&from_client("A")).1, to_backend("A"));
            let key = forward_key(proto, p.client, sport, p.cluster_ip, fport);
            let tables = h.dataplane.conntrack.tables().unwrap();
            assert!(
                tables.established.contains_key(&key),
                "{proto} {:?}: established",
                p.client
            );
            // Established: the fast path.
            for flags in ["A", "PA", "FA"] {
                let (verdict, out) = h.run(&from_client(flags));
                assert_eq!(
                    (verdict, out),
                    (TC_ACT_OK, to_backend(flags)),
                    "{proto} {flags}"
                );
                let (verdict, out) = h.run(&from_backend(flags));
                assert_eq!(
                    (verdict, out),
                    (TC_ACT_OK, to_client(flags)),
                    "{proto} {flags}"
                );
            }
        }
    }
    // IPv4 UDP without a checksum keeps it zero.
    let zero_csum = |mut p: Vec<u8>| {
        p[40] = 0;
        p[41] = 0;
        p
    };
    let (_, out) = h.run(&zero_csum(udp(CLIENT, 41000, PAIR_VIP, 53)));
    assert_eq!(out, zero_csum(udp(CLIENT, 41000, BACKEND, 5353)));
    let (_, out) = h.run(&zero_csum(udp(BACKEND, 5353, CLIENT, 41000)));
    assert_eq!(out, zero_csum(udp(PAIR_VIP, 53, CLIENT, 41000)));
    // A packet of the same flow whose IP length claims more than the frame holds is the full
    // path's to judge (the fuzzer found the in-place path translating one): dropped as truncated.
    let mut cut = udp(CLIENT, 41000, PAIR_VIP, 53);
    cut.truncate(cut.len() - 3);
    let dropped = h.counter("drop_truncated");
    let (verdict, out) = h.run(&cut);
    assert_eq!((verdict, out), (TC_ACT_SHOT, cut));
    assert_eq!(h.counter("drop_truncated"), dropped + 1);
}

/// Weir's own forwarding (`route::forward`), both families, on both paths: a translated
/// packet to a backend with a route and a resolved neighbour leaves by redirect with its
/// TTL / hop limit one less and the next hop's MAC addresses, whether the full path (a flow's
/// first packet) or the in-place path (its established packets) translated it; one whose TTL
/// would expire goes to the stack, which answers it (`forward_to_stack`).
#[test]
fn translated_packets_are_forwarded_by_fib_lookup_in_both_families() {
    // Its own network namespace: a veth towards the backends with their neighbours known makes
    // the FIB lookups succeed, whatever the host's routes; forwarding on, as on any node.
    let _bpffs = private_bpffs(nix::sched::CloneFlags::CLONE_NEWNET);
    run_ok("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]);
    run_ok("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "wt0", "type", "veth", "peer", "name", "wt1"]);
    let (own_mac, backend_mac) = ([2u8, 0, 0, 0, 0, 0xf0], [2u8, 0, 0, 0, 0, 0xb1]);
    ip(&["link", "set", "wt0", "address", "02:00:00:00:00:f0"]);
    ip(&["addr", "add", "198.19.2.1/24", "dev", "wt0"]);
    ip(&["addr", "add", "fd00:19:2::1/64", "dev", "wt0", "nodad"]);
    ip(&["link", "set", "wt0", "up"]);
    ip(&["link", "set", "wt1", "up"]);
    for backend in [BACKEND.to_string(), PAIR_BACKEND6.to_string()] {
        ip(&[
            "neigh",
            "replace",
            &backend,
            "lladdr",
            "02:00:00:00:00:b1",
            "dev",
            "wt0",
            "nud",
            "permanent",
        ]);
    }
    let mut h = pair_harness();
    h.dataplane
        .node
        .set_config(&weir_common::NodeConfig {
            flags: weir_common::node_flags::FORWARD,
            ..Default::default()
        })
        .unwrap();
    // What a router makes of `frame`: TTL / hop limit one less, the next hop's addresses.
    let routed = |frame: Vec<u8>| {
        let mut out = if frame[12..14] == [0x86, 0xdd] {
            let mut out = frame;
            out[14 + 7] -= 1;
            out
        } else {
            forwarded(&frame)
        };
        out[..6].copy_from_slice(&backend_mac);
        out[6..12].copy_from_slice(&own_mac);
        out
    };
    for p in pairs() {
        let sport = 42000;
        let from_client = |flags| segment(6, p.client, sport, p.cluster_ip, 80, flags);
        let to_backend = |flags| segment(6, p.client, sport, p.backend, 8080, flags);
        let forwarded_before = h.counter("forwarded");
        // The full path: the first packet.
        let (verdict, out) = h.run(&from_client("S"));
        assert_eq!(
            (verdict, out),
            (TC_ACT_REDIRECT, routed(to_backend("S"))),
            "{:?}",
            p.client
        );
        h.run(&segment(6, p.backend, 8080, p.client, sport, "SA"));
        h.run(&from_client("A"));
        // The in-place path: an established packet.
        let (verdict, out) = h.run(&from_client("PA"));
        assert_eq!(
            (verdict, out),
            (TC_ACT_REDIRECT, routed(to_backend("PA"))),
            "{:?}",
            p.client
        );
        assert!(
            h.counter("forwarded") >= forwarded_before + 3,
            "{:?}",
            p.client
        );
        // A TTL / hop limit that would expire here: the stack's, untouched but translated.
        let mut expiring = from_client("PA");
        let to_stack = h.counter("forward_to_stack");
        if matches!(p.client, IpAddr::V4(_)) {
            expiring[22] = 1;
            fix_ip_checksum(&mut expiring);
        } else {
            expiring[14 + 7] = 1;
        }
        let (verdict, _) = h.run(&expiring);
        assert_eq!(verdict, TC_ACT_OK, "{:?}", p.client);
        assert_eq!(
            h.counter("forward_to_stack"),
            to_stack + 1,
            "{:?}",
            p.client
        );
    }
}
