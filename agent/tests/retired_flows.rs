//! Flows to endpoints that went away do not stay stuck on them: once an endpoint stops serving
//! (deleted, or neither ready nor serving), its flows end, so a UDP sender's next datagram goes
//! to a live endpoint and a TCP client's next segment meets one (whose reset ends the
//! connection at once). Endpoints that are terminating but still serving keep their
//! connections, as kube-proxy's do, and other Services using the same endpoint are untouched.

mod common;

use std::net::Ipv4Addr;

use common::*;
use weir_agent::conntrack::end_retired_flows;

/// The backend a translated client packet was sent to.
fn backend_of(out: &[u8]) -> Ipv4Addr {
    let ip = l3(out);
    Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
}

fn end_retired(h: &mut Harness) -> usize {
    let retired = h.reconciler.take_retired();
    end_retired_flows(&mut h.dataplane.conntrack, &retired).expect("conntrack")
}

/// `echo` with its endpoints given as (address, ready, serving, terminating).
fn echo_with(endpoints: &[(Ipv4Addr, bool, bool, bool)]) -> String {
    let mut yaml = cluster_yaml(&[]);
    let listed: String = endpoints
        .iter()
        .map(|(ip, ready, serving, terminating)| {
            format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {serving}, \
                 terminating: {terminating}}}\n"
            )
        })
        .collect();
    yaml = yaml.replacen("endpoints:\n---", &format!("endpoints:\n{listed}---"), 1);
    yaml
}

#[test]
fn a_udp_flow_moves_when_its_endpoint_goes_and_a_tcp_flow_is_ended() {
    let mut h = Harness::new(&[BACKEND, OTHER]);
    // Find a client port of each protocol that lands on BACKEND.
    let udp_port = (40000..40100)
        .find(|p| {
            let (_, out) = h.run(&udp(CLIENT, *p, VIP, 53));
            backend_of(&out) == BACKEND
        })
        .expect("some flow picks BACKEND");
    let tcp_port = (41000..41100)
        .find(|p| {
            let (_, out) = h.run(&tcp(CLIENT, *p, VIP, 80, "S"));
            backend_of(&out) == BACKEND
        })
        .expect("some flow picks BACKEND");
    // The UDP flow is answered, so it is in the established table; the TCP flow is still in
    // the new-flow table. Retirement finds both.
    h.run(&udp(BACKEND, 5353, CLIENT, udp_port));
    assert_eq!(h.counter("ct_promoted"), 1);

    // BACKEND leaves the Service.
    h.apply(&cluster_yaml(&[OTHER]));
    let ended = end_retired(&mut h);
    assert_eq!(
        ended, 2,
        "both flows' client entries end; their reply entries wait"
    );

    // An answer the old endpoint had in flight is still translated back.
    let (_, late) = h.run(&udp(BACKEND, 5353, CLIENT, udp_port));
    assert_eq!(late, udp(VIP, 53, CLIENT, udp_port), "in-flight answer");

    let (_, out) = h.run(&udp(CLIENT, udp_port, VIP, 53));
    assert_eq!(
        backend_of(&out),
        OTHER,
        "the UDP sender's next datagram goes to a live endpoint"
    );
    let new_flows = h.counter("ct_new_flow");
    let (_, out) = h.run(&tcp(CLIENT, tcp_port, VIP, 80, "A"));
    assert_eq!(
        backend_of(&out),
        OTHER,
        "the TCP client's next segment meets a live endpoint, which resets it"
    );
    assert_eq!(h.counter("ct_new_flow"), new_flows + 1);

    // Nothing retired: nothing more ends.
    h.apply(&cluster_yaml(&[OTHER]));
    assert_eq!(end_retired(&mut h), 0);
}

#[test]
fn terminating_endpoints_that_still_serve_keep_their_connections() {
    let mut h = Harness::new(&[]);
    h.apply(&echo_with(&[
        (BACKEND, true, true, false),
        (OTHER, true, true, false),
    ]));
    let port = (42000..42100)
        .find(|p| {
            let (_, out) = h.run(&tcp(CLIENT, *p, VIP, 80, "S"));
            backend_of(&out) == BACKEND
        })
        .expect("some flow picks BACKEND");

    // Terminating, still serving: new flows go elsewhere, this one drains.
    h.apply(&echo_with(&[
        (BACKEND, false, true, true),
        (OTHER, true, true, false),
    ]));
    assert_eq!(end_retired(&mut h), 0);
    let (_, out) = h.run(&tcp(CLIENT, port, VIP, 80, "A"));
    assert_eq!(backend_of(&out), BACKEND, "the draining connection stays");

    // No longer serving: it ends.
    h.apply(&echo_with(&[
        (BACKEND, false, false, true),
        (OTHER, true, true, false),
    ]));
    assert_eq!(end_retired(&mut h), 1);
    let (_, out) = h.run(&tcp(CLIENT, port, VIP, 80, "A"));
    assert_eq!(backend_of(&out), OTHER);
}

#[test]
fn only_the_services_own_flows_end() {
    // A second Service with the same endpoint.
    let twin = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: twin, namespace: default}}\n\
         spec: {{clusterIP: 198.18.100.12, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: twin-1, namespace: default, labels: {{kubernetes.io/service-name: twin}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [\"{BACKEND}\"]}}]\n"
    );
    let mut h = Harness::new(&[]);
    h.apply(&(cluster_yaml(&[BACKEND]) + &twin));
    let twin_vip: Ipv4Addr = "198.18.100.12".parse().unwrap();
    let (_, out) = h.run(&tcp(CLIENT, 43000, VIP, 80, "S"));
    assert_eq!(backend_of(&out), BACKEND);
    let (_, out) = h.run(&tcp(CLIENT, 43001, twin_vip, 80, "S"));
    assert_eq!(backend_of(&out), BACKEND);

    // echo is deleted; twin keeps the same endpoint.
    h.apply(&twin);
    assert_eq!(end_retired(&mut h), 1, "echo's flow ends with echo");
    let entries = h.dataplane.conntrack.entries().unwrap();
    assert_eq!(
        entries.len(),
        3,
        "twin's flow stays, and echo's reply entry until it expires: {entries:?}"
    );
    let (verdict, out) = h.run(&tcp(CLIENT, 43001, twin_vip, 80, "A"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(backend_of(&out), BACKEND);
}

/// A TCP connection whose Service loses its last endpoint: the agent ends the flow, and the
/// client's next segment, now of no flow and to a frontend without endpoints, is answered with
/// a reset from the frontend whose sequence number is what the client expects (an ICMP error
/// would be a soft error the established socket ignores until its own timeout). A SYN is
/// refused, with a reset too.
#[test]
fn a_connection_that_lost_its_last_endpoint_is_reset() {
    use etherparse::PacketBuilder;
    let mut h = Harness::new(&[BACKEND]);
    let port = 44000;
    h.run(&tcp(CLIENT, port, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, port, "SA"));
    h.run(&tcp(CLIENT, port, VIP, 80, "A"));
    h.apply(&cluster_yaml(&[]));
    assert_eq!(end_retired(&mut h), 1);

    let (verdict, out) = h.run(&tcp(CLIENT, port, VIP, 80, "A"));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    let reset = reset_from(
        PacketBuilder::ethernet2(MAC_B, MAC_A).ipv4(VIP.octets(), CLIENT.octets(), 64),
        port,
    );
    assert_eq!(out, reset);
    assert_eq!(h.counter("reset_no_backend"), 1);

    // A new connection is refused, and counted so.
    let (_, out) = h.run(&tcp(CLIENT, port + 1, VIP, 80, "S"));
    let ip = PacketBuilder::ethernet2(MAC_B, MAC_A).ipv4(VIP.octets(), CLIENT.octets(), 64);
    assert_eq!(out, refusal(ip, 80, port + 1));
    assert_eq!(h.counter("reject_no_backend"), 1);
}

#[test]
fn an_ipv6_connection_that_lost_its_last_endpoint_is_reset() {
    use etherparse::PacketBuilder;
    use std::net::Ipv6Addr;
    let vip6: Ipv6Addr = "fd00:18:100::10".parse().unwrap();
    let backend6: Ipv6Addr = "fd00:19:2::11".parse().unwrap();
    let client6: Ipv6Addr = "fd00:19:1::10".parse().unwrap();
    let six = |endpoints: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: six, namespace: default}}\n\
             spec: {{clusterIPs: [\"{vip6}\"], ipFamilies: [IPv6], \
             ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: six-1, namespace: default, labels: {{kubernetes.io/service-name: six}}}}\n\
             addressType: IPv6\nports: [{{name: http, protocol: TCP, port: 8080}}]\n\
             endpoints: [{endpoints}]\n"
        )
    };
    let mut h = Harness::new(&[]);
    h.apply(&six(&format!("{{addresses: [\"{backend6}\"]}}")));
    let port = 44100;
    let (_, out) = h.run(&tcp6(client6, port, vip6, 80, "S"));
    assert_eq!(out, tcp6(client6, port, backend6, 8080, "S"));
    h.apply(&six(""));
    assert_eq!(end_retired(&mut h), 1);

    let (verdict, out) = h.run(&tcp6(client6, port, vip6, 80, "A"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let reset = reset_from(
        PacketBuilder::ethernet2(MAC_B, MAC_A).ipv6(vip6.octets(), client6.octets(), 64),
        port,
    );
    assert_eq!(out, reset);
    assert_eq!(h.counter("reset_no_backend"), 1);
}

/// The reset port 80 of the frontend sends the client's `port`: the client's segment
/// acknowledged 2000, and the reset carries that sequence number.
fn reset_from(ip: etherparse::PacketBuilderStep<etherparse::IpHeaders>, port: u16) -> Vec<u8> {
    let mut reset = Vec::new();
    ip.tcp(80, port, 2000, 0)
        .rst()
        .write(&mut reset, &[])
        .unwrap();
    reset
}
