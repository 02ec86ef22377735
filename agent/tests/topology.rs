//! Topology-aware routing as kube-proxy does it (`pkg/proxy/topology.go`): the EndpointSlice
//! controller writes zone (and node) hints for a Service with `trafficDistribution:
//! PreferClose` or `topology-mode: Auto`, and cluster-wide traffic on a node uses the endpoints
//! hinted for its zone (its Node's `topology.kubernetes.io/zone`), unless a ready endpoint has no
//! hint or none names the zone. Checked on the compiled maps of node1 and by a packet.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::*;
use weir_agent::compile::{addr_of, CompileOptions};
use weir_common::{NodeConfig, LOCAL_SLOT};

const IN_ZONE: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const OTHER_ZONE: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);
const OTHER_ZONE_B: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 12);

/// Node1 in zone a, node2 in zone b, and `web` with one endpoint per entry: (address, node,
/// zone hint or "" for none, ready).
fn cluster(endpoints: &[(Ipv4Addr, &str, &str, bool)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, node, hint, ready)| {
            let hints = if hint.is_empty() {
                String::new()
            } else {
                format!("  hints: {{forZones: [{{name: {hint}}}]}}\n")
            };
            format!(
                "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}}}\n{hints}"
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1, labels: {{topology.kubernetes.io/zone: a}}}}
status: {{addresses: [{{type: InternalIP, address: "198.18.0.1"}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node2, labels: {{topology.kubernetes.io/zone: b}}}}
status: {{addresses: [{{type: InternalIP, address: "198.18.0.2"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  trafficDistribution: PreferClose
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
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

fn node1(yaml: &str) -> Harness {
    Harness::for_node(
        yaml,
        CompileOptions {
            node_name: "node1".into(),
            maglev: false,
            ..CompileOptions::default()
        },
        NodeConfig::default(),
        &["198.18.0.1".parse().unwrap()],
    )
}

/// The endpoints cluster-wide traffic to `VIP:80` is spread over.
fn cluster_endpoints(h: &Harness) -> BTreeSet<Ipv4Addr> {
    let state = h.dataplane.services.read().unwrap();
    let (addr, family) = addr_of(VIP.into());
    let service = state
        .services
        .iter()
        .find(|(k, _)| k.addr == addr && k.family == family)
        .map(|(_, v)| *v)
        .expect("frontend");
    state
        .slots
        .iter()
        .filter(|(k, _)| k.service_id == service.service_id && k.slot < LOCAL_SLOT)
        .map(|(_, id)| {
            let b = state.backends[id].addr.v4_octets();
            Ipv4Addr::from(b)
        })
        .collect()
}

#[test]
fn zone_hints_keep_cluster_traffic_in_the_nodes_zone() {
    let mut h = node1(&cluster(&[
        (IN_ZONE, "node1", "a", true),
        (OTHER_ZONE, "node2", "b", true),
        (OTHER_ZONE_B, "node2", "b", true),
    ]));
    assert_eq!(cluster_endpoints(&h), BTreeSet::from([IN_ZONE]));
    for sport in 42000..42016 {
        let (_, out) = h.run(&tcp(CLIENT, sport, VIP, 80, "S"));
        assert_eq!(out, tcp(CLIENT, sport, IN_ZONE, 8080, "S"));
    }
}

#[test]
fn hints_are_ignored_unless_every_ready_endpoint_has_one_and_one_names_the_zone() {
    // One ready endpoint without a hint: the hints are not trusted.
    let h = node1(&cluster(&[
        (IN_ZONE, "node1", "a", true),
        (OTHER_ZONE, "node2", "", true),
    ]));
    assert_eq!(cluster_endpoints(&h), BTreeSet::from([IN_ZONE, OTHER_ZONE]));

    // No endpoint for zone a: every endpoint.
    let h = node1(&cluster(&[
        (OTHER_ZONE, "node2", "b", true),
        (OTHER_ZONE_B, "node2", "b", true),
    ]));
    assert_eq!(
        cluster_endpoints(&h),
        BTreeSet::from([OTHER_ZONE, OTHER_ZONE_B])
    );

    // A not-ready endpoint without a hint does not count; the zone's one is not ready either,
    // so the ready ones elsewhere serve.
    let h = node1(&cluster(&[
        (IN_ZONE, "node1", "a", false),
        (OTHER_ZONE, "node2", "b", true),
        (OTHER_ZONE_B, "node2", "", false),
    ]));
    assert_eq!(cluster_endpoints(&h), BTreeSet::from([OTHER_ZONE]));
}

/// A Node without a zone label follows no zone hints.
#[test]
fn a_node_without_a_zone_uses_every_endpoint() {
    let yaml = cluster(&[
        (IN_ZONE, "node1", "a", true),
        (OTHER_ZONE, "node2", "b", true),
    ])
    .replace("labels: {topology.kubernetes.io/zone: a}", "labels: {}");
    let h = node1(&yaml);
    assert_eq!(cluster_endpoints(&h), BTreeSet::from([IN_ZONE, OTHER_ZONE]));
}

/// Node hints (`trafficDistribution: PreferSameNode`) come before zone hints: when every ready
/// endpoint has one and one names this node, cluster traffic stays on it.
#[test]
fn node_hints_keep_cluster_traffic_on_the_node() {
    let yaml = cluster(&[
        (IN_ZONE, "node1", "b", true),
        (OTHER_ZONE, "node2", "b", true),
    ]);
    // Zone hints alone name no endpoint for node1's zone (a): every endpoint.
    assert_eq!(
        cluster_endpoints(&node1(&yaml)),
        BTreeSet::from([IN_ZONE, OTHER_ZONE])
    );
    let with_nodes = yaml
        .replacen(
            "hints: {forZones: [{name: b}]}",
            "hints: {forZones: [{name: b}], forNodes: [{name: node1}]}",
            1,
        )
        .replacen(
            "hints: {forZones: [{name: b}]}\n",
            "hints: {forZones: [{name: b}], forNodes: [{name: node2}]}\n",
            1,
        );
    assert_eq!(
        cluster_endpoints(&node1(&with_nodes)),
        BTreeSet::from([IN_ZONE])
    );
}
