//! What a Service may claim, against the real maps and the real program: it may not capture the
//! node (its SSH, its kubelet, every address at once), nor use addresses no Service may use, and
//! the Service conventions kube-proxy follows (another proxy's label, headless, `ipMode: Proxy`,
//! SCTP ports) are followed too.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::*;
use weir_agent::admission::Limits;
use weir_agent::compile::CompileOptions;
use weir_agent::metrics::Metrics;
use weir_agent::reconcile::Reconciler;
use weir_common::NodeConfig;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);

fn node_yaml() -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\n\
         status: {{addresses: [{{type: InternalIP, address: \"{NODE}\"}}]}}\n"
    )
}

/// A Service with one TCP port, its other fields given as flow-style YAML, and one ready
/// endpoint.
fn service(name: &str, spec: &str, port: u16, endpoint: &str) -> String {
    let spec = format!("{spec}, ports: [{{name: p, port: {port}, targetPort: 8080}}]");
    service_with_ports(name, &spec, endpoint)
}

/// The same with the ports in `spec`.
fn service_with_ports(name: &str, spec: &str, endpoint: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{{spec}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{{addresses: [\"{endpoint}\"]}}]\n"
    )
}

fn harness(metrics: &Arc<Metrics>) -> Harness {
    let mut h = Harness::for_node(
        "",
        CompileOptions {
            node_name: "node1".into(),
            maglev: false,
            ..CompileOptions::default()
        },
        NodeConfig::default(),
        &[IpAddr::V4(NODE)],
    );
    h.reconciler = Reconciler::new(Limits::default(), Some(metrics.clone())).with_compile_options(
        CompileOptions {
            node_name: "node1".into(),
            maglev: false,
            ..CompileOptions::default()
        },
    );
    h
}

fn rejected(metrics: &Metrics, kind: &str, reason: &str) -> f64 {
    let series = format!("weir_rejected_objects_total{{kind=\"{kind}\",reason=\"{reason}\"}} ");
    metrics
        .encode()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn frontends(h: &Harness) -> Vec<String> {
    let state = h.dataplane.services.read().unwrap();
    state
        .services
        .keys()
        .map(|k| {
            weir_agent::compile::socket_addr(&k.addr, k.family, k.port_be)
                + if k.proto == weir_common::PROTO_UDP {
                    "/udp"
                } else {
                    "/tcp"
                }
        })
        .collect()
}

#[test]
fn services_cannot_capture_the_nodes_own_ports() {
    let metrics = Arc::new(Metrics::new());
    let mut h = harness(&metrics);
    let mut yaml = node_yaml();
    // The node's SSH through an external IP that is the node's address.
    yaml += &service(
        "ssh-grab",
        &format!("clusterIP: 198.18.100.40, externalIPs: [\"{NODE}\"]"),
        22,
        "198.19.2.11",
    );
    // The same through a NodePort outside the node-port range.
    yaml += &service_with_ports(
        "nodeport-22",
        "type: NodePort, clusterIP: 198.18.100.41, \
         ports: [{name: p, port: 80, targetPort: 8080, nodePort: 22}]",
        "198.19.2.11",
    );
    // A ClusterIP that is the node's address.
    yaml += &service(
        "node-vip",
        &format!("clusterIP: \"{NODE}\""),
        80,
        "198.19.2.11",
    );
    // Allowed: an external IP on the node's address with a port inside the node-port range.
    yaml += &service(
        "in-range",
        &format!("clusterIP: 198.18.100.42, externalIPs: [\"{NODE}\"]"),
        30500,
        "198.19.2.11",
    );
    h.apply(&yaml);

    assert_eq!(rejected(&metrics, "Service", "node_address_capture"), 2.0);
    assert_eq!(rejected(&metrics, "Service", "node_port_out_of_range"), 1.0);
    let installed = frontends(&h);
    assert!(
        installed.contains(&"198.18.0.1:30500/tcp".to_owned()),
        "{installed:?}"
    );
    for captured in ["198.18.0.1:22/tcp", "0.0.0.0:22/tcp", "198.18.0.1:80/tcp"] {
        assert!(!installed.contains(&captured.to_owned()), "{installed:?}");
    }
    // SSH to the node passes the program untouched.
    let ssh = tcp(EXTERNAL, 40000, NODE, 22, "S");
    let (verdict, out) = h.run(&ssh);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, ssh, "not translated");
    assert_eq!(h.counter("pass_no_service"), 1);
    // The allowed one is served.
    let (_, out) = h.run(&tcp(EXTERNAL, 40001, NODE, 30500, "S"));
    assert_eq!(&l3(&out)[16..20], &[198, 19, 2, 11], "translated");
}

#[test]
fn addresses_no_service_may_use_are_refused() {
    let metrics = Arc::new(Metrics::new());
    let mut h = harness(&metrics);
    let mut yaml = node_yaml();
    for (name, spec) in [
        (
            "wildcard",
            "clusterIP: 198.18.100.50, externalIPs: [\"0.0.0.0\"]",
        ),
        ("loopback", "clusterIP: 127.0.0.53"),
        (
            "metadata",
            "clusterIP: 198.18.100.51, externalIPs: [\"169.254.169.254\"]",
        ),
        (
            "multicast",
            "clusterIP: 198.18.100.52, externalIPs: [\"224.0.0.251\"]",
        ),
        (
            "broadcast",
            "clusterIP: 198.18.100.53, externalIPs: [\"255.255.255.255\"]",
        ),
        (
            "v6-unspecified",
            "clusterIP: 198.18.100.54, externalIPs: [\"::\"]",
        ),
        (
            "v6-link-local",
            "clusterIP: 198.18.100.55, externalIPs: [\"fe80::1\"]",
        ),
        (
            "v4-mapped",
            "clusterIP: 198.18.100.56, externalIPs: [\"::ffff:198.18.0.9\"]",
        ),
    ] {
        yaml += &service(name, spec, 80, "198.19.2.11");
    }
    // Endpoints: the node's loopback and the metadata service are no backends.
    yaml += &service("to-loopback", "clusterIP: 198.18.100.57", 80, "127.0.0.1");
    yaml += &service(
        "to-metadata",
        "clusterIP: 198.18.100.58",
        80,
        "169.254.169.254",
    );
    yaml += &service("fine", "clusterIP: 198.18.100.59", 80, "198.19.2.11");
    h.apply(&yaml);

    assert_eq!(rejected(&metrics, "Service", "reserved_address"), 8.0);
    assert_eq!(rejected(&metrics, "EndpointSlice", "reserved_address"), 2.0);
    let installed = frontends(&h);
    assert_eq!(
        installed,
        vec![
            "198.18.100.57:80/tcp",
            "198.18.100.58:80/tcp",
            "198.18.100.59:80/tcp"
        ],
        "only the valid Services, the two without their refused endpoints"
    );
    let (verdict, _) = h.run(&tcp(
        EXTERNAL,
        40002,
        "198.18.100.57".parse().unwrap(),
        80,
        "S",
    ));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "no endpoint: refused, not sent to loopback"
    );
}

#[test]
fn kube_proxy_conventions_are_followed() {
    let metrics = Arc::new(Metrics::new());
    let mut h = harness(&metrics);
    let mut yaml = node_yaml();
    // Another proxy's Service, and a headless one (the label the endpoints controller sets).
    yaml += &service("other-proxy", "clusterIP: 198.18.100.60", 80, "198.19.2.11").replacen(
        "metadata: {name: other-proxy, namespace: default}",
        "metadata: {name: other-proxy, namespace: default, labels: {service.kubernetes.io/service-proxy-name: ipvs-lb}}",
        1,
    );
    yaml += &service("headless", "clusterIP: 198.18.100.61", 80, "198.19.2.11").replacen(
        "labels: {kubernetes.io/service-name: headless}",
        "labels: {kubernetes.io/service-name: headless, service.kubernetes.io/headless: \"\"}",
        1,
    );
    // A load balancer in proxy mode keeps its IP to itself; a VIP-mode one is served.
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: default}\n\
             spec: {type: LoadBalancer, clusterIP: 198.18.100.62, ports: [{name: p, port: 80, targetPort: 8080, nodePort: 30080}]}\n\
             status: {loadBalancer: {ingress: [{ip: 198.18.101.1, ipMode: Proxy}, {ip: 198.18.101.2, ipMode: VIP}]}}\n";
    // SCTP beside TCP: the TCP port is served, the SCTP one reported.
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: diameter, namespace: default}\n\
             spec: {clusterIP: 198.18.100.63, ports: [{name: tcp, port: 3868}, {name: sctp, protocol: SCTP, port: 3868}]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: diameter-1, namespace: default, labels: {kubernetes.io/service-name: diameter}}\n\
             addressType: IPv4\nports: [{name: tcp, port: 3868}, {name: sctp, protocol: SCTP, port: 3868}]\n\
             endpoints: [{addresses: [\"198.19.2.12\"]}]\n";
    h.apply(&yaml);

    let installed = frontends(&h);
    assert!(
        !installed.iter().any(|f| f.starts_with("198.18.100.60")),
        "another proxy's Service is left alone: {installed:?}"
    );
    assert!(
        installed.contains(&"198.18.100.61:80/tcp".to_owned()),
        "the headless-labelled slice gives no endpoint, the Service still rejects: {installed:?}"
    );
    assert!(!installed.contains(&"198.18.101.1:80/tcp".to_owned()));
    assert!(installed.contains(&"198.18.101.2:80/tcp".to_owned()));
    assert!(installed.contains(&"198.18.100.63:3868/tcp".to_owned()));
    assert_eq!(rejected(&metrics, "Service", "unsupported_protocol"), 1.0);
    let (_, out) = h.run(&tcp(
        EXTERNAL,
        40003,
        "198.18.100.63".parse().unwrap(),
        3868,
        "S",
    ));
    assert_eq!(
        &l3(&out)[16..20],
        &[198, 19, 2, 12],
        "the TCP port is served"
    );
    let (verdict, _) = h.run(&tcp(
        EXTERNAL,
        40004,
        "198.18.100.61".parse().unwrap(),
        80,
        "S",
    ));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "headless slice: no endpoint, refused"
    );

    // Taking the other proxy's label off hands the Service to Weir.
    let relabelled = yaml.replacen(
        ", labels: {service.kubernetes.io/service-proxy-name: ipvs-lb}",
        "",
        1,
    );
    h.apply(&relabelled);
    assert!(frontends(&h).contains(&"198.18.100.60:80/tcp".to_owned()));
}
