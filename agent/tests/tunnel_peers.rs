//! The tunnel accepts packets from the cluster's nodes only, and takes back the ICMP errors about
//! the flows it brought. A real collect-metadata VXLAN device in a network namespace of the
//! test's own, real VXLAN datagrams from two local addresses: one a Node's, one a forger's. The
//! forger's packet, shaped as a reply of a flow another node translated, would otherwise plant a
//! conntrack entry that sends that flow's packets to it.
//! On the same device: two ingress nodes sending one translated tuple (a tuple collision at the
//! backend's node): a connection whose ingress moved follows, a second connection moves. And a
//! DSR datagram whose first fragment the underlay delivers last: held, replayed, translated.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use nix::sched::CloneFlags;
use weir_agent::compile::CompileOptions;
use weir_agent::dataplane::Hook;
use weir_agent::node::tunnel_peers;
use weir_common::{ct_kind, Addr, CtKey, CtValue, NodeConfig, FAMILY_V4, PROTO_TCP, PROTO_UDP};

const THIS_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const FORGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const THIRD_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const POD: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const VXLAN_PORT: u16 = 4789;

fn nodes_yaml() -> String {
    node_objects(&[("node1", THIS_NODE.into()), ("node2", OTHER_NODE.into())])
}

/// A VXLAN datagram's payload: the header with `vni`, then the inner frame.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(inner);
    out
}

fn send_from(source: Ipv4Addr, payload: &[u8]) {
    let socket = UdpSocket::bind(SocketAddr::from((source, 0))).expect("bind the sender");
    socket
        .send_to(payload, SocketAddr::from((THIS_NODE, VXLAN_PORT)))
        .expect("send the VXLAN datagram");
}

/// Waits (at most two seconds) for the counter to reach `at_least`; returns its value.
fn await_counter(h: &Harness, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let value = h.counter(name);
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This node (node1) with a collect-metadata VXLAN device in the test's own network namespace,
/// the program attached to it, and every address in `senders` on a veth to send from.
fn tunnel_node(yaml: &str, senders: &[Ipv4Addr]) -> Harness {
    ip(&["link", "set", "lo", "up"]);
    // A veth, not a dummy device: the host kernel may lack the dummy module.
    ip(&["link", "add", "wd0", "type", "veth", "peer", "name", "wd1"]);
    for address in [THIS_NODE].iter().chain(senders) {
        ip(&["addr", "add", &format!("{address}/24"), "dev", "wd0"]);
    }
    ip(&["link", "set", "wd0", "up"]);
    ip(&["link", "set", "wd1", "up"]);
    ip(&[
        "link",
        "add",
        "weir-vxlan",
        "type",
        "vxlan",
        "external",
        "dstport",
        &VXLAN_PORT.to_string(),
    ]);
    ip(&["link", "set", "weir-vxlan", "up"]);
    // Asked of this thread's namespace (sysfs still shows the host's).
    let ifindex = nix::net::if_::if_nametoindex("weir-vxlan").expect("ifindex");
    let mut h = Harness::for_node(
        yaml,
        CompileOptions {
            node_name: "node1".into(),
            maglev: false,
            ..CompileOptions::default()
        },
        NodeConfig {
            tunnel_ifindex: ifindex,
            ..NodeConfig::default()
        },
        &[THIS_NODE.into()],
    );
    let peers = tunnel_peers(h.reconciler.intent().nodes.values());
    h.dataplane.node.set_tunnel_peers(&peers).expect("peers");
    h.dataplane
        .attach("weir-vxlan", Hook::Ingress)
        .expect("attach to the tunnel device");
    h
}

#[test]
fn a_connection_whose_ingress_node_changes_keeps_its_way_back() {
    let _bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let yaml = node_objects(&[
        ("node1", THIS_NODE.into()),
        ("node2", OTHER_NODE.into()),
        ("node3", THIRD_NODE.into()),
    ]);
    let h = tunnel_node(&yaml, &[OTHER_NODE, THIRD_NODE]);
    // A connection node2 translated to this node's pod (VNI 1: translated at ingress)...
    send_from(OTHER_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "S")));
    assert_eq!(await_counter(&h, "ct_new_from_tunnel", 1), 1);
    // ...now reaches node3 (an ECMP router moved the client's route), which picks the same
    // backend (Maglev) and sends it on. Its replies keep going back through node2, which still
    // holds the translation: the connection survives. (A segment without SYN belongs to an open
    // connection; a SYN would open another, see the next test.)
    send_from(THIRD_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "A")));
    assert_eq!(await_counter(&h, "ct_from_tunnel_hit", 1), 1);
    let entries = h.dataplane.conntrack.entries().expect("conntrack");
    assert_eq!(entries.len(), 1);
    assert!(
        entries
            .values()
            .all(|e| e.tunnel_peer == weir_common::Addr::from_v4(OTHER_NODE.octets())),
        "replies still go to the first ingress node: {entries:?}"
    );
    assert_eq!(h.counter("drop_ct_collision"), 0);
}

/// The entry of `key` (either table).
fn entry(h: &Harness, key: &CtKey) -> Option<CtValue> {
    h.dataplane
        .conntrack
        .entries()
        .expect("conntrack")
        .get(key)
        .copied()
}

fn v4_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: Addr::from_v4(src.octets()),
        daddr: Addr::from_v4(dst.octets()),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family: FAMILY_V4,
        _pad: 0,
    }
}

#[test]
fn one_client_port_through_two_ingress_nodes_gets_two_ports_at_the_backend() {
    let _bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let yaml = node_objects(&[
        ("node1", THIS_NODE.into()),
        ("node2", OTHER_NODE.into()),
        ("node3", THIRD_NODE.into()),
    ]);
    let mut h = tunnel_node(&yaml, &[OTHER_NODE, THIRD_NODE]);
    // The pod is this node's: the inner packets are delivered here, to a socket of the test.
    ip(&["addr", "add", &format!("{POD}/32"), "dev", "wd0"]);
    let other = Addr::from_v4(OTHER_NODE.octets());
    let third = Addr::from_v4(THIRD_NODE.octets());

    // A load balancer's connection from port 40000 through node2's NodePort, then another one
    // from the same port through node3's NodePort of a Service sharing the pod.
    send_from(OTHER_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "S")));
    assert_eq!(await_counter(&h, "ct_new_from_tunnel", 1), 1);
    send_from(THIRD_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "S")));
    assert_eq!(await_counter(&h, "ct_collision_resolved", 1), 1);
    assert_eq!(h.counter("ct_new_from_tunnel"), 2);
    let moves = h.dataplane.conntrack.moved_arrivals().expect("moves");
    assert_eq!(moves.len(), 1, "{moves:?}");
    let (moved_from, &moved_be) = moves.iter().next().expect("one move");
    assert_eq!(
        (moved_from.flow, moved_from.peer),
        (v4_key(CLIENT, 40000, POD, 8080, PROTO_TCP), third)
    );
    let moved = u16::from_be(moved_be);
    assert_ne!(moved, 40000);
    let first = entry(&h, &v4_key(POD, 8080, CLIENT, 40000, PROTO_TCP)).expect("first");
    assert_eq!((first.tunnel_peer, first.client_port_be), (other, 0));
    let second = entry(&h, &v4_key(POD, 8080, CLIENT, moved, PROTO_TCP)).expect("second");
    assert_eq!((second.kind, second.tunnel_peer), (ct_kind::ENCAP, third));
    assert_eq!(second.client_port_be, 40000u16.to_be());

    // Replies: each into the tunnel (to its own node, as its entry says), the second with the
    // client's own port back.
    let reply = tcp(POD, 8080, CLIENT, 40000, "SA");
    assert_eq!(h.run(&reply), (TC_ACT_REDIRECT, reply.clone()));
    let moved_reply = tcp(POD, 8080, CLIENT, moved, "SA");
    assert_eq!(h.run(&moved_reply), (TC_ACT_REDIRECT, reply));
    assert_eq!(h.counter("ct_encap_hit"), 2);

    // node3's connection goes on (its SYN retried, then its ACK): the same moved port; node2's
    // keeps its own.
    send_from(THIRD_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "S")));
    send_from(THIRD_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "A")));
    send_from(OTHER_NODE, &vxlan(1, &tcp(CLIENT, 40000, POD, 8080, "A")));
    assert_eq!(await_counter(&h, "ct_from_tunnel_hit", 3), 3);
    assert_eq!(h.counter("ct_collision_resolved"), 1);
    assert_eq!(h.dataplane.conntrack.entries().expect("conntrack").len(), 2);
    assert_eq!(
        h.dataplane.conntrack.moved_arrivals().expect("moves").len(),
        1
    );
    // Both answered: promoted, still under their own keys.
    assert_eq!(h.counter("ct_promoted"), 2);

    // UDP as the pod's socket sees it: one client port through two nodes is two peers.
    let pod = UdpSocket::bind(SocketAddr::from((POD, 8080))).expect("bind the pod");
    pod.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    send_from(OTHER_NODE, &vxlan(1, &udp(CLIENT, 40001, POD, 8080)));
    send_from(THIRD_NODE, &vxlan(1, &udp(CLIENT, 40001, POD, 8080)));
    let mut sources = Vec::new();
    for _ in 0..2 {
        let mut buf = [0u8; 64];
        let (_, from) = pod.recv_from(&mut buf).expect("a datagram at the pod");
        sources.push(from);
    }
    assert_eq!(h.counter("ct_collision_resolved"), 2);
    let moves = h.dataplane.conntrack.moved_arrivals().expect("moves");
    let udp_moved = moves
        .iter()
        .find(|(k, _)| k.flow.proto == PROTO_UDP)
        .map(|(_, port)| u16::from_be(*port))
        .expect("the UDP flow through node3 moved");
    assert_eq!(
        sources,
        vec![
            SocketAddr::from((CLIENT, 40001)),
            SocketAddr::from((CLIENT, udp_moved))
        ]
    );

    // The pod's ICMP error about the moved flow (say, nothing listens): into the tunnel, its
    // quote naming the client's own port, the one node3's translation knows.
    let error = icmp_error(POD, CLIENT, 3, 3, l3(&udp(CLIENT, udp_moved, POD, 8080)));
    let restored = icmp_error(POD, CLIENT, 3, 3, l3(&udp(CLIENT, 40001, POD, 8080)));
    assert_eq!(h.run(&error), (TC_ACT_REDIRECT, restored));
    assert_eq!(h.counter("icmp_error_tunnelled"), 1);
    assert_eq!(h.counter("drop_ct_collision"), 0);
}

#[test]
fn only_the_clusters_nodes_can_use_the_tunnel() {
    let _bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let mut h = tunnel_node(&nodes_yaml(), &[OTHER_NODE, FORGER]);
    assert_eq!(tunnel_peers(h.reconciler.intent().nodes.values()).len(), 2);

    // A pod's reply to a client, as a node that translated the client's flow would receive it
    // (VNI 1: translated at ingress). Accepted, it would make this node send the flow's later
    // packets back through the tunnel to whoever sent it.
    let reply = vxlan(1, &tcp(POD, 8080, CLIENT, 40000, "SA"));
    send_from(FORGER, &reply);
    assert_eq!(await_counter(&h, "drop_tunnel_untrusted", 1), 1);
    assert!(
        h.dataplane
            .conntrack
            .entries()
            .expect("conntrack")
            .is_empty(),
        "the forger planted nothing"
    );

    send_from(OTHER_NODE, &reply);
    assert_eq!(
        await_counter(&h, "ct_new_from_tunnel", 1),
        1,
        "a node's packet is taken"
    );
    assert_eq!(h.dataplane.conntrack.entries().expect("conntrack").len(), 1);

    // This node as a backend's: a client's packet another node translated arrives, and the pod
    // answers it with an ICMP error (say, nothing listens on that port). The error goes back
    // through the tunnel to the translating node, which alone can name the frontend in it.
    let request = tcp(CLIENT, 40002, POD, 8080, "S");
    send_from(OTHER_NODE, &vxlan(1, &request));
    assert_eq!(await_counter(&h, "ct_new_from_tunnel", 2), 2);
    let error = icmp_error(POD, CLIENT, 3, 3, l3(&request));
    assert_eq!(
        h.run(&error),
        (TC_ACT_REDIRECT, error),
        "unchanged, into the tunnel"
    );
    assert_eq!(h.counter("icmp_error_tunnelled"), 1);

    // A node that leaves the cluster loses the tunnel with its Node object.
    h.apply("");
    let peers = tunnel_peers(h.reconciler.intent().nodes.values());
    assert!(peers.is_empty());
    h.dataplane.node.set_tunnel_peers(&peers).expect("peers");
    send_from(OTHER_NODE, &vxlan(1, &tcp(POD, 8080, CLIENT, 40001, "SA")));
    assert_eq!(await_counter(&h, "drop_tunnel_untrusted", 2), 2);
}

/// A NodePort Service (UDP 30054 -> 5353) whose endpoint is this node's pod.
fn node_port_yaml() -> String {
    format!(
        r#"{}---
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: default}}
spec:
  type: NodePort
  clusterIP: 198.18.100.20
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30054}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: default
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: ["{POD}"]
  nodeName: node1
"#,
        nodes_yaml()
    )
}

#[test]
fn dsr_fragments_reordered_inside_the_tunnel_are_held_and_translated_as_tunnel_arrivals() {
    let _bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let h = tunnel_node(&node_port_yaml(), &[OTHER_NODE]);
    // The pod is this node's: the translated datagram is reassembled and delivered here.
    ip(&["addr", "add", &format!("{POD}/32"), "dev", "wd0"]);
    let pod = UdpSocket::bind(SocketAddr::from((POD, 5353))).expect("bind the pod's socket");
    pod.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // node2 forwards a client's datagram to its NodePort untranslated (VNI 2: DSR), and the
    // underlay delivers its first fragment last.
    let mut datagram = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT.octets(), OTHER_NODE.octets(), 64)
        .udp(40000, 30054)
        .write(&mut datagram, &[7u8; 100])
        .unwrap();
    let fragments = fragments4(&datagram, 0x5151, &[16, 64]);
    for later in &fragments[1..] {
        send_from(OTHER_NODE, &vxlan(2, later));
    }
    assert_eq!(await_counter(&h, "fragment_held", 2), 2);
    send_from(OTHER_NODE, &vxlan(2, &fragments[0]));
    assert_eq!(await_counter(&h, "fragment_replayed", 1), 1);
    // Replayed without tunnel metadata, marked: the first starts the DSR flow to the local
    // endpoint, the later ones follow it, and the pod gets the whole datagram from the client.
    let mut buf = [0u8; 200];
    let (len, from) = pod
        .recv_from(&mut buf)
        .expect("the datagram reaches the pod");
    assert_eq!((len, from), (100, SocketAddr::from((CLIENT, 40000))));
    assert_eq!(h.counter("ct_new_flow"), 1);
    assert_eq!(h.counter("ct_forward_hit"), 2);
    assert_eq!(h.counter("fragment_replay_failed"), 0);
    assert_eq!(h.counter("drop_tunnel_untrusted"), 0);
}
