//! Packet-level tests of the ingress program through BPF_PROG_TEST_RUN: crafted packets in,
//! exact bytes out. Expected packets are built from scratch with the rewritten fields, so every
//! checksum the program updated incrementally is checked against a full recomputation.

mod common;

use common::*;
use std::net::Ipv4Addr;
use weir_agent::conntrack::view;

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
