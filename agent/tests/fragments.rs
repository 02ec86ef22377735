//! Fragmented datagrams, IPv6 extension headers and untranslated frontend traffic, packet by
//! packet through BPF_PROG_TEST_RUN. A datagram's fragments are cut from a whole frame, and the
//! expected ones from the translated whole frame cut the same way: the first fragment's L4
//! checksum, updated incrementally, must be the whole translated datagram's.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use common::*;
use weir_agent::compile::CompileOptions;
use weir_common::{
    map_names, node_flags, tunnel_id, FragKey, HeldFragment, HeldFragmentKey, NodeConfig,
    REPLAY_MARK,
};

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 201);
const POD_N2: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 21);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, 0x10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x10);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 2, 0, 0, 0, 0, 0x11);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 2, 0, 0, 0, 0, 0x12);
const NODE_PORT: u16 = 30053;
const REMOTE_NODE_PORT: u16 = 30054;
/// The loopback device stands in for the tunnel device (see `services.rs`).
const TUNNEL_IFINDEX: u32 = 1;

/// `echo`: a dual-stack NodePort service (UDP 53 -> 5353, NodePort 30053; TCP 80 -> 8080) with
/// one local endpoint per family; `remote`: a NodePort service (UDP 30054) whose endpoint runs
/// on node2.
fn cluster() -> String {
    let nodes = node_objects(&[("node1", NODE1.into()), ("node2", NODE2.into())]);
    format!(
        r#"{nodes}---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  type: NodePort
  clusterIPs: ["{VIP}", "{VIP6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {NODE_PORT}}}
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v4
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: 5353}}
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: ["{BACKEND}"]
  nodeName: node1
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v6
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv6
ports:
- {{name: dns, protocol: UDP, port: 5353}}
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: ["{BACKEND6}"]
  nodeName: node1
---
apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: default}}
spec:
  type: NodePort
  clusterIP: 198.18.100.20
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {REMOTE_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: default
  labels: {{kubernetes.io/service-name: remote}}
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: ["{POD_N2}"]
  nodeName: node2
"#
    )
}

fn node1(flags: u32) -> Harness {
    let config = NodeConfig {
        tunnel_ifindex: TUNNEL_IFINDEX,
        flags,
        ..NodeConfig::default()
    };
    let mut h = Harness::for_node(
        &cluster(),
        CompileOptions {
            node_name: "node1".into(),
            ..CompileOptions::default()
        },
        config,
        &[NODE1.into()],
    );
    let peers = [NODE1, NODE2]
        .iter()
        .map(|n| weir_agent::compile::addr_key((*n).into()))
        .collect();
    h.dataplane.node.set_tunnel_peers(&peers).unwrap();
    h
}

/// 100 bytes of payload: with the 8-byte UDP header, cut at 16 and 64 into three fragments.
const PAYLOAD: [u8; 100] = {
    let mut p = [0u8; 100];
    let mut i = 0;
    while i < 100 {
        p[i] = i as u8;
        i += 1;
    }
    p
};
const CUTS: [usize; 2] = [16, 64];

fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut out, &PAYLOAD)
        .unwrap();
    out
}

fn udp6_big(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut out, &PAYLOAD)
        .unwrap();
    out
}

/// The fragments of an IPv6 frame (no extension headers), each with a fragment header.
fn fragments6(frame: &[u8], id: u32, cuts: &[usize]) -> Vec<Vec<u8>> {
    const FIXED: usize = 14 + 40;
    let upper = frame[14 + 6];
    let payload = &frame[FIXED..];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(payload.len());
    bounds
        .windows(2)
        .map(|w| {
            let mut out = frame[..FIXED].to_vec();
            out[14 + 6] = 44;
            out[14 + 4..14 + 6].copy_from_slice(&((8 + w[1] - w[0]) as u16).to_be_bytes());
            let more = u16::from(w[1] < payload.len());
            let offset = ((w[0] / 8) as u16) << 3 | more;
            out.extend_from_slice(&[upper, 0]);
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&payload[w[0]..w[1]]);
            out
        })
        .collect()
}

/// Runs `sent` in the given order and checks each against `expected` (same order).
fn run_all(h: &mut Harness, sent: &[Vec<u8>], expected: &[Vec<u8>], verdict: u32, what: &str) {
    for (i, (packet, want)) in sent.iter().zip(expected).enumerate() {
        let (got_verdict, out) = h.run(packet);
        assert_eq!(got_verdict, verdict, "{what}: fragment {i}");
        assert_eq!(&out, want, "{what}: fragment {i}");
    }
}

/// Indexes 0, 2, 1: the last fragment overtakes the middle one.
fn reordered(fragments: &[Vec<u8>]) -> Vec<Vec<u8>> {
    vec![
        fragments[0].clone(),
        fragments[2].clone(),
        fragments[1].clone(),
    ]
}

#[test]
fn ipv4_fragments_are_translated_like_their_flow_both_ways() {
    let mut h = node1(0);
    let request = fragments4(&udp4(CLIENT, 33000, VIP, 53), 0x1234, &CUTS);
    let translated = fragments4(&udp4(CLIENT, 33000, BACKEND, 5353), 0x1234, &CUTS);
    run_all(
        &mut h,
        &reordered(&request),
        &reordered(&translated),
        TC_ACT_OK,
        "request",
    );
    assert_eq!(
        h.counter("ct_new_flow"),
        1,
        "the first fragment starts the flow"
    );
    assert_eq!(h.counter("ct_forward_hit"), 2, "later ones follow it");
    // A 3,000-byte reply is fragmented by the backend itself.
    let reply = fragments4(&udp4(BACKEND, 5353, CLIENT, 33000), 0x9876, &CUTS);
    let untranslated = fragments4(&udp4(VIP, 53, CLIENT, 33000), 0x9876, &CUTS);
    run_all(&mut h, &reply, &untranslated, TC_ACT_OK, "reply");
    assert_eq!(h.counter("ct_reverse_hit"), 3);
    // Through the NodePort as well.
    let request = fragments4(&udp4(EXTERNAL_CLIENT, 33001, NODE1, NODE_PORT), 7, &CUTS);
    let translated = fragments4(&udp4(EXTERNAL_CLIENT, 33001, BACKEND, 5353), 7, &CUTS);
    run_all(&mut h, &request, &translated, TC_ACT_OK, "node port");
}

#[test]
fn ipv6_fragments_are_translated_like_their_flow_both_ways() {
    let mut h = node1(0);
    let request = fragments6(&udp6_big(CLIENT6, 33100, VIP6, 53), 0xdead_beef, &CUTS);
    let translated = fragments6(
        &udp6_big(CLIENT6, 33100, BACKEND6, 5353),
        0xdead_beef,
        &CUTS,
    );
    run_all(
        &mut h,
        &reordered(&request),
        &reordered(&translated),
        TC_ACT_OK,
        "request",
    );
    let reply = fragments6(&udp6_big(BACKEND6, 5353, CLIENT6, 33100), 42, &CUTS);
    let untranslated = fragments6(&udp6_big(VIP6, 53, CLIENT6, 33100), 42, &CUTS);
    run_all(&mut h, &reply, &untranslated, TC_ACT_OK, "reply");
    assert_eq!(h.counter("ct_new_flow"), 1);
    assert_eq!(h.counter("ct_forward_hit"), 2);
    assert_eq!(h.counter("ct_reverse_hit"), 3);
    assert_eq!(h.counter("pass_ipv6_extension"), 0);
}

/// Held frames as ((datagram id, slot), frame).
type HeldFrames = Vec<((u32, u32), Vec<u8>)>;

/// The held fragments of the data plane, and the ids of the datagrams marked as holding some.
fn held(h: &Harness) -> (HeldFrames, Vec<u32>) {
    let frames: aya::maps::HashMap<_, HeldFragmentKey, HeldFragment> =
        aya::maps::HashMap::try_from(h.dataplane.map(map_names::HELD_FRAGMENTS).unwrap()).unwrap();
    let mut frames: Vec<_> = frames
        .iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            let frame = value.frame[..value.len as usize].to_vec();
            ((key.datagram.id, key.slot), frame)
        })
        .collect();
    frames.sort();
    let marks: aya::maps::HashMap<_, FragKey, u32> =
        aya::maps::HashMap::try_from(h.dataplane.map(map_names::FRAGMENTS_HELD).unwrap()).unwrap();
    let mut marks: Vec<u32> = marks.keys().map(|key| key.unwrap().id).collect();
    marks.sort();
    (frames, marks)
}

/// The id as `FragKey` holds it: IPv4's 16 bits in network order in the low bytes.
fn id4(id: u16) -> u32 {
    u32::from_ne_bytes([(id >> 8) as u8, id as u8, 0, 0])
}

#[test]
fn a_later_fragment_before_its_first_is_held_at_a_frontend_and_replayed_behind_it() {
    let mut h = node1(0);
    let v4 = fragments4(&udp4(CLIENT, 33200, VIP, 53), 99, &CUTS);
    let v6 = fragments6(&udp6_big(CLIENT6, 33200, VIP6, 53), 99, &CUTS);
    for early in [&v4[2], &v4[1], &v6[2]] {
        assert_eq!(h.run(early).0, TC_ACT_SHOT);
    }
    assert_eq!(h.counter("fragment_held"), 3);
    assert_eq!(h.counter("drop_fragment_unknown"), 0);
    // Whole frames, in the order they came, one slot each; the datagrams marked.
    let (frames, marks) = held(&h);
    assert_eq!(
        frames,
        vec![
            ((id4(99), 0), v4[2].clone()),
            ((id4(99), 1), v4[1].clone()),
            ((99u32.to_be(), 0), v6[2].clone()),
        ]
    );
    assert_eq!(marks, {
        let mut m = vec![id4(99), 99u32.to_be()];
        m.sort();
        m
    });
    // The first fragment finds them: it and they are sent into the ingress again (here the
    // loopback device's, where nothing runs), and it is dropped, their vessel.
    assert_eq!(h.run(&v4[0]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_replayed"), 1);
    assert_eq!(h.counter("fragment_replay_failed"), 0);
    let (frames, marks) = held(&h);
    assert_eq!(frames.len(), 1, "the IPv6 datagram's stays: {frames:?}");
    assert_eq!(marks, vec![99u32.to_be()]);
    // Its copy comes back unmarked: translated, and so are the later ones behind it.
    let translated = fragments4(&udp4(CLIENT, 33200, BACKEND, 5353), 99, &CUTS);
    run_all(&mut h, &v4, &translated, TC_ACT_OK, "replayed");
    assert_eq!(h.run(&v6[0]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_replayed"), 2);
    assert_eq!(held(&h), (vec![], vec![]));
    // Fragments of traffic that is no service's pass untouched, in any order.
    let pod_to_pod = fragments4(&udp4(CLIENT, 33201, OTHER, 53), 5, &CUTS);
    let pod_to_pod6 = fragments6(&udp6_big(CLIENT6, 33201, OTHER6, 53), 5, &CUTS);
    for packet in reordered(&pod_to_pod).iter().chain(&pod_to_pod6) {
        assert_eq!(h.run(packet), (TC_ACT_OK, packet.clone()));
    }
    assert_eq!(h.counter("pass_fragment"), 4, "later fragments of no flow");
    assert_eq!(h.counter("pass_no_service"), 2, "their first fragments");
    assert_eq!(h.counter("fragment_held"), 3);
    // To a Node's address (a NodePort's, which a later fragment cannot show): held too.
    let node_port = fragments4(&udp4(EXTERNAL_CLIENT, 33202, NODE1, NODE_PORT), 11, &CUTS);
    assert_eq!(h.run(&node_port[2]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_held"), 4);
    assert_eq!(h.run(&node_port[0]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_replayed"), 3);
    let translated = fragments4(&udp4(EXTERNAL_CLIENT, 33202, BACKEND, 5353), 11, &CUTS);
    run_all(
        &mut h,
        &node_port,
        &translated,
        TC_ACT_OK,
        "NodePort replayed",
    );
    // In order to a port of the node no Service has (VXLAN's, its outer packets fragmented):
    // the first passes and leaves its datagram known, so the later ones pass, not held.
    let host = fragments4(&udp4(NODE2, 33203, NODE1, 4789), 12, &CUTS);
    for packet in &host {
        assert_eq!(h.run(packet), (TC_ACT_OK, packet.clone()));
    }
    assert_eq!(h.counter("fragment_held"), 4);
}

#[test]
fn held_fragments_are_bounded_per_datagram_and_in_size() {
    let mut h = node1(0);
    // 8 slots per datagram: a ninth later fragment is dropped, and counted.
    let cuts: Vec<usize> = (1..=9).map(|i| i * 8).collect();
    let many = fragments4(&udp4(CLIENT, 33210, VIP, 53), 7, &cuts);
    for later in &many[1..] {
        assert_eq!(h.run(later).0, TC_ACT_SHOT);
    }
    assert_eq!(h.counter("fragment_held"), 8);
    assert_eq!(h.counter("drop_fragment_not_held"), 1);
    // A frame larger than a slot holds is dropped, and counted.
    let mut big = udp4(CLIENT, 33211, VIP, 53);
    big.extend_from_slice(&[0xab; 2100]);
    let total_len = (big.len() - 14) as u16;
    big[16..18].copy_from_slice(&total_len.to_be_bytes());
    fix_ip_checksum(&mut big);
    let big = fragments4(&big, 8, &[16]);
    assert!(big[1].len() > weir_common::HELD_FRAME_BYTES);
    assert_eq!(h.run(&big[1]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_fragment_not_held"), 2);
    assert_eq!(h.counter("fragment_held"), 8);
    // The first replays the eight it has and is dropped; its copy is translated as usual.
    assert_eq!(h.run(&many[0]).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_replayed"), 1);
    assert_eq!(held(&h), (vec![], vec![]));
    assert_eq!(h.run(&many[0]).0, TC_ACT_OK);
    assert_eq!(h.counter("ct_new_flow"), 1);
}

#[test]
fn fragments_to_a_remote_backend_enter_the_tunnel_like_their_flow() {
    for (flags, mode) in [(0, "translated at ingress"), (node_flags::DSR, "dsr")] {
        let mut h = node1(flags);
        let request = fragments4(
            &udp4(EXTERNAL_CLIENT, 33300, NODE1, REMOTE_NODE_PORT),
            3,
            &CUTS,
        );
        let expected = if flags & node_flags::DSR != 0 {
            request.clone()
        } else {
            fragments4(&udp4(EXTERNAL_CLIENT, 33300, POD_N2, 5353), 3, &CUTS)
        };
        run_all(
            &mut h,
            &reordered(&request),
            &reordered(&expected),
            TC_ACT_REDIRECT,
            mode,
        );
        assert_eq!(h.counter("ct_new_tunnel"), 1, "{mode}");
        let hits = h.counter("ct_forward_hit") + h.counter("ct_encap_hit");
        assert_eq!(hits, 2, "{mode}: every later fragment into the tunnel");
    }
}

/// node2 of [`cluster`] in DSR mode: the node of the `remote` service's endpoint, which
/// translates what node1 sends it untranslated through the tunnel.
fn node2_dsr() -> Harness {
    let config = NodeConfig {
        tunnel_ifindex: TUNNEL_IFINDEX,
        flags: node_flags::DSR,
        ..NodeConfig::default()
    };
    let mut h = Harness::for_node(
        &cluster(),
        CompileOptions {
            node_name: "node2".into(),
            ..CompileOptions::default()
        },
        config,
        &[NODE2.into()],
    );
    let peers = [NODE1, NODE2]
        .iter()
        .map(|n| weir_agent::compile::addr_key((*n).into()))
        .collect();
    h.dataplane.node.set_tunnel_peers(&peers).unwrap();
    h
}

/// A mark some other software set, which Weir's must leave alone.
const OTHER_MARK: u32 = 0x4000;

/// The arrival kinds of the held frames, by slot.
fn held_arrivals(h: &Harness) -> Vec<(u32, u32)> {
    let frames: aya::maps::HashMap<_, HeldFragmentKey, HeldFragment> =
        aya::maps::HashMap::try_from(h.dataplane.map(map_names::HELD_FRAGMENTS).unwrap()).unwrap();
    let mut arrivals: Vec<_> = frames
        .iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.slot, value.arrival_id)
        })
        .collect();
    arrivals.sort();
    arrivals
}

// A test run attaches no tunnel metadata, so a live tunnel arrival cannot be made here (without
// metadata the loopback device, standing in for the tunnel device, delivers local packets); a
// replayed one, which carries the mark instead, can. Live arrivals through a real VXLAN device:
// `tunnel_peers.rs`.
#[test]
fn dsr_fragments_replayed_on_the_tunnel_device_are_translated_as_tunnel_arrivals() {
    let mut h = node2_dsr();
    let request = fragments4(
        &udp4(EXTERNAL_CLIENT, 33600, NODE1, REMOTE_NODE_PORT),
        21,
        &CUTS,
    );
    let translated = fragments4(&udp4(EXTERNAL_CLIENT, 33600, POD_N2, 5353), 21, &CUTS);
    // As `frag::replay` sends them round, first fragment first: each is taken for a DSR
    // arrival and translated to the local endpoint; the bit is cleared, other marks kept.
    for (i, (sent, want)) in request.iter().zip(&translated).enumerate() {
        let (verdict, out, mark) = h.run_marked(sent, REPLAY_MARK | OTHER_MARK);
        assert_eq!((verdict, mark), (TC_ACT_OK, OTHER_MARK), "fragment {i}");
        assert_eq!(&out, want, "fragment {i}");
    }
    assert_eq!(h.counter("ct_new_flow"), 1);
    assert_eq!(h.counter("ct_forward_hit"), 2);
    // Without the mark, a packet on the tunnel device without metadata is no tunnel arrival:
    // another node's address has no NodePort here, and it passes untouched.
    let local = udp4(EXTERNAL_CLIENT, 33601, NODE1, REMOTE_NODE_PORT);
    assert_eq!(
        h.run_marked(&local, OTHER_MARK),
        (TC_ACT_OK, local.clone(), OTHER_MARK)
    );
    // The mark counts only on the tunnel device: elsewhere it is left as it is, and the packet
    // is no tunnel arrival.
    h.dataplane
        .node
        .set_config(&NodeConfig {
            tunnel_ifindex: TUNNEL_IFINDEX + 100,
            flags: node_flags::DSR,
            ..NodeConfig::default()
        })
        .unwrap();
    let forged = udp4(EXTERNAL_CLIENT, 33602, NODE1, REMOTE_NODE_PORT);
    assert_eq!(
        h.run_marked(&forged, REPLAY_MARK),
        (TC_ACT_OK, forged.clone(), REPLAY_MARK)
    );
    assert_eq!(h.counter("pass_no_service"), 2);
    assert_eq!(h.counter("ct_new_flow"), 1);
}

#[test]
fn a_dsr_tunnel_arrivals_held_fragments_are_replayed_only_behind_a_first_that_came_so() {
    let mut h = node2_dsr();
    let request = fragments4(
        &udp4(EXTERNAL_CLIENT, 33610, NODE1, REMOTE_NODE_PORT),
        22,
        &CUTS,
    );
    // A later fragment replayed from the tunnel before its first (another replay's, or its
    // first lost): held again, as a DSR arrival. One of the same datagram that arrived
    // otherwise is held too, as a local one.
    assert_eq!(h.run_marked(&request[2], REPLAY_MARK).0, TC_ACT_SHOT);
    assert_eq!(h.run_marked(&request[1], 0).0, TC_ACT_SHOT);
    assert_eq!(h.counter("fragment_held"), 2);
    assert_eq!(held_arrivals(&h), vec![(0, tunnel_id::DSR), (1, 0)]);
    // A first fragment arriving as DSR through the tunnel replays the frame that came the same
    // way, marked as it is (the mark stays on the vessel, whose clones carry it), and not the
    // other: a frame from elsewhere must not pass for a tunnel arrival.
    let (verdict, _, mark) = h.run_marked(&request[0], REPLAY_MARK | OTHER_MARK);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(mark, REPLAY_MARK | OTHER_MARK);
    assert_eq!(h.counter("fragment_replayed"), 1);
    assert_eq!(h.counter("fragment_replay_failed"), 1);
    assert_eq!(held_arrivals(&h), vec![]);
}

/// The same IPv6 frame with extension headers `headers` (each a (next-header value, bytes)
/// pair, bytes[0] filled in) between the fixed header and the upper layer.
fn with_ipv6_headers(frame: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    const ETH: usize = 14;
    let mut next = frame[ETH + 6];
    let mut chain: Vec<u8> = Vec::new();
    for (kind, bytes) in headers.iter().rev() {
        let mut header = bytes.clone();
        header[0] = next;
        header.extend_from_slice(&chain);
        chain = header;
        next = *kind;
    }
    let mut out = frame[..ETH + 40].to_vec();
    out[ETH + 6] = next;
    out.extend_from_slice(&chain);
    out.extend_from_slice(&frame[ETH + 40..]);
    let payload = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]) + chain.len() as u16;
    out[ETH + 4..ETH + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// A routing header (type 4, no segments listed) with `segments_left`.
fn routing(segments_left: u8) -> (u8, Vec<u8>) {
    (43, vec![0, 0, 4, segments_left, 0, 0, 0, 0])
}

fn destination_options() -> (u8, Vec<u8>) {
    (60, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

#[test]
fn ipv6_destination_options_and_a_finished_routing_header_are_walked() {
    let mut h = node1(0);
    let headers = [destination_options(), routing(0), destination_options()];
    let (verdict, out) = h.run(&with_ipv6_headers(
        &udp6(CLIENT6, 33400, VIP6, 53),
        &headers,
    ));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        with_ipv6_headers(&udp6(CLIENT6, 33400, BACKEND6, 5353), &headers)
    );
    let (_, reply) = h.run(&with_ipv6_headers(
        &udp6(BACKEND6, 5353, CLIENT6, 33400),
        &headers,
    ));
    assert_eq!(
        reply,
        with_ipv6_headers(&udp6(VIP6, 53, CLIENT6, 33400), &headers)
    );
    // Segments left: the fixed header's destination is a waypoint, not the final one.
    // Untranslated, and not routed on when it names a frontend.
    let waypoint = with_ipv6_headers(&udp6(CLIENT6, 33401, VIP6, 53), &[routing(1)]);
    assert_eq!(h.run(&waypoint).0, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_frontend_untranslated"), 1);
    let elsewhere = with_ipv6_headers(&udp6(CLIENT6, 33401, OTHER6, 53), &[routing(1)]);
    assert_eq!(h.run(&elsewhere), (TC_ACT_OK, elsewhere.clone()));
    assert_eq!(h.counter("pass_ipv6_extension"), 1);
}

fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut out, b"abcdefgh")
        .unwrap();
    out
}

fn gre(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = udp(src, 1, dst, 53);
    p[23] = 47;
    fix_ip_checksum(&mut p);
    p
}

#[test]
fn untranslated_traffic_to_a_frontend_is_dropped_and_the_nodes_own_passes() {
    let mut h = node1(0);
    let dropped = [
        (
            "tcp to a port the service lacks",
            tcp(CLIENT, 33500, VIP, 81, "S"),
        ),
        (
            "udp to a port the service lacks",
            udp(CLIENT, 33501, VIP, 54),
        ),
        ("icmp echo to the cluster ip", icmp_echo(CLIENT, VIP)),
        ("gre to the cluster ip", gre(CLIENT, VIP)),
        ("icmpv6 echo to the cluster ip", icmp6_echo(CLIENT6, VIP6)),
        (
            "udp6 to a port the service lacks",
            udp6(CLIENT6, 33502, VIP6, 54),
        ),
    ];
    for (i, (what, packet)) in dropped.iter().enumerate() {
        assert_eq!(h.run(packet).0, TC_ACT_SHOT, "{what}");
        assert_eq!(
            h.counter("drop_frontend_untranslated"),
            i as u64 + 1,
            "{what}"
        );
    }
    let passed = [
        (
            "ssh to the node",
            tcp(EXTERNAL_CLIENT, 33503, NODE1, 22, "S"),
            "pass_no_service",
        ),
        (
            "a NodePort's number on another protocol",
            tcp(EXTERNAL_CLIENT, 33504, NODE1, NODE_PORT, "S"),
            "pass_no_service",
        ),
        (
            "icmp echo to the node",
            icmp_echo(EXTERNAL_CLIENT, NODE1),
            "pass_icmp_unrelated",
        ),
        (
            "icmp echo to a pod",
            icmp_echo(CLIENT, BACKEND),
            "pass_icmp_unrelated",
        ),
    ];
    for (what, packet, counter) in passed {
        let before = h.counter(counter);
        assert_eq!(h.run(&packet), (TC_ACT_OK, packet.clone()), "{what}");
        assert_eq!(h.counter(counter), before + 1, "{what}");
    }
    // Related ICMP errors are still translated.
    let (_, forwarded) = h.run(&udp(CLIENT, 33505, VIP, 53));
    let error = icmp_error(BACKEND, CLIENT, 3, 3, l3(&forwarded));
    let (verdict, out) = h.run(&error);
    assert_eq!(verdict, TC_ACT_OK);
    let original = udp(CLIENT, 33505, VIP, 53);
    assert_eq!(out, icmp_error(VIP, CLIENT, 3, 3, l3(&original)));
}

#[test]
fn a_frontend_address_stops_being_one_with_its_service() {
    let mut h = node1(0);
    assert_eq!(h.run(&icmp_echo(CLIENT, VIP)).0, TC_ACT_SHOT);
    let gone = cluster()
        .replace(&format!("\"{VIP}\", "), "")
        .replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv6]");
    h.apply(&gone);
    let echo = icmp_echo(CLIENT, VIP);
    assert_eq!(h.run(&echo), (TC_ACT_OK, echo.clone()));
}
