//! The lab plays the Kubernetes control plane: it labels pods, selects endpoints and writes the
//! Service and EndpointSlice objects the agent watches, shaped as `kubectl get -o yaml` prints
//! them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::scenario::{glob_match, Family, Scenario, ServiceSpec, ServiceType, TrafficPolicy};
use crate::timeline::{ClusterModel, Conditions, ManualSlice};
use crate::topology::{Plan, PodPlan};

pub const NAMESPACE: &str = "default";

/// Every pod's labels: `app=<pod name>` unless a `[[pods]]` rule says otherwise; rules apply in
/// file order, later ones winning.
pub fn pod_labels(scenario: &Scenario, plan: &Plan) -> BTreeMap<String, BTreeMap<String, String>> {
    plan.pods
        .iter()
        .map(|pod| {
            let mut labels = BTreeMap::from([("app".to_owned(), pod.name.clone())]);
            for rule in scenario
                .pods
                .iter()
                .filter(|r| glob_match(&r.pattern, &pod.name))
            {
                labels.extend(rule.labels.clone());
            }
            (pod.name.clone(), labels)
        })
        .collect()
}

/// The pods a service selects, in plan order. An empty selector selects nothing.
pub fn endpoints<'a>(
    service: &ServiceSpec,
    plan: &'a Plan,
    labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<&'a PodPlan> {
    if service.selector.is_empty() {
        return Vec::new();
    }
    plan.pods
        .iter()
        .filter(|pod| {
            let l = &labels[&pod.name];
            service.selector.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
    namespace: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: ServiceSpecYaml,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<ServiceStatus>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecYaml {
    #[serde(rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    cluster_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ip_families: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_family_policy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_name: Option<String>,
    ports: Vec<ServicePortYaml>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    selector: BTreeMap<String, String>,
    session_affinity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(rename = "type")]
    type_: &'static str,
    #[serde(rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    external_ips: Vec<IpAddr>,
    /// Kubernetes defaults it to Cluster for services that reach outside, and leaves it unset
    /// on ClusterIP services.
    #[serde(skip_serializing_if = "Option::is_none")]
    external_traffic_policy: Option<&'static str>,
    internal_traffic_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check_node_port: Option<u16>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: ClientIpConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpConfig {
    timeout_seconds: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceStatus {
    load_balancer: LoadBalancerStatus,
}

#[derive(Serialize)]
struct LoadBalancerStatus {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ingress: Vec<LoadBalancerIngress>,
}

#[derive(Serialize)]
struct LoadBalancerIngress {
    ip: IpAddr,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortYaml {
    name: String,
    port: u16,
    protocol: &'static str,
    /// A number, or the name of the pods' port.
    target_port: TargetPort,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_port: Option<u16>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Node {
    api_version: &'static str,
    kind: &'static str,
    metadata: NodeMetadata,
    spec: NodeSpec,
    status: NodeStatus,
}

#[derive(Serialize)]
struct NodeMetadata {
    name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: String,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
}

#[derive(Serialize)]
struct NodeStatus {
    addresses: Vec<NodeAddress>,
}

#[derive(Serialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    type_: &'static str,
    address: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSlice {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    address_type: &'static str,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    addresses: Vec<IpAddr>,
    conditions: ConditionsYaml,
    node_name: String,
    target_ref: TargetRef,
}

#[derive(Serialize)]
struct ConditionsYaml {
    ready: bool,
    serving: bool,
    terminating: bool,
}

#[derive(Serialize)]
struct TargetRef {
    kind: &'static str,
    name: String,
    namespace: String,
}

#[derive(Serialize)]
struct EndpointPort {
    name: String,
    port: u16,
    protocol: &'static str,
}

fn protocol(p: crate::scenario::Protocol) -> &'static str {
    match p {
        crate::scenario::Protocol::Tcp => "TCP",
        crate::scenario::Protocol::Udp => "UDP",
    }
}

/// Kubernetes names slices `<service>-<5 random characters>`; a hash keeps the look and makes
/// the file reproducible.
fn slice_name(service: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in service.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let suffix: String = (0..5)
        .map(|i| ALPHABET[((h >> (i * 8)) % ALPHABET.len() as u64) as usize] as char)
        .collect();
    format!("{service}-{suffix}")
}

fn policy(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn service_object(svc: &ServiceSpec) -> Service {
    let ips = svc.cluster_ips();
    let family = |ip: &IpAddr| if ip.is_ipv6() { "IPv6" } else { "IPv4" };
    // A headless Service says "None" where the address would be, in the family Kubernetes
    // defaults to; an ExternalName one has neither.
    let (cluster_ip, cluster_ips, families) = if svc.kind == ServiceType::ExternalName {
        (None, Vec::new(), Vec::new())
    } else if svc.headless {
        (
            Some("None".to_owned()),
            vec!["None".to_owned()],
            vec!["IPv4"],
        )
    } else {
        (
            ips.first().map(IpAddr::to_string),
            ips.iter().map(IpAddr::to_string).collect(),
            ips.iter().map(family).collect(),
        )
    };
    let dual = families.len() > 1;
    let type_ = match svc.kind {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::ExternalName => "ExternalName",
    };
    Service {
        api_version: "v1",
        kind: "Service",
        metadata: Metadata {
            name: svc.name.clone(),
            namespace: NAMESPACE.to_owned(),
            labels: svc.labels.clone(),
            annotations: svc.annotations.clone(),
        },
        spec: ServiceSpecYaml {
            cluster_ip,
            cluster_ips,
            ip_families: families,
            ip_family_policy: (svc.kind != ServiceType::ExternalName).then_some(if dual {
                "RequireDualStack"
            } else {
                "SingleStack"
            }),
            external_name: svc.external_name.clone(),
            ports: svc
                .ports
                .iter()
                .map(|p| ServicePortYaml {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol(p.protocol),
                    target_port: match &p.target_port_name {
                        Some(name) => TargetPort::Name(name.clone()),
                        None => TargetPort::Number(p.target()),
                    },
                    node_port: p.node_port,
                })
                .collect(),
            selector: svc.selector.clone(),
            session_affinity: if svc.affinity_timeout.is_some() {
                "ClientIP"
            } else {
                "None"
            },
            session_affinity_config: svc.affinity_timeout.map(|t| SessionAffinityConfig {
                client_ip: ClientIpConfig {
                    timeout_seconds: t.as_secs().max(1),
                },
            }),
            type_,
            external_ips: svc.external_ips.clone(),
            external_traffic_policy: (matches!(
                svc.kind,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) || !svc.external_ips.is_empty())
            .then(|| policy(svc.external_traffic_policy)),
            internal_traffic_policy: policy(svc.internal_traffic_policy),
            health_check_node_port: svc.health_check_node_port,
        },
        status: (!svc.load_balancer_ips.is_empty()).then(|| ServiceStatus {
            load_balancer: LoadBalancerStatus {
                ingress: svc
                    .load_balancer_ips
                    .iter()
                    .map(|ip| LoadBalancerIngress { ip: *ip })
                    .collect(),
            },
        }),
    }
}

/// One EndpointSlice the endpoint slice controller would write for a Service: a chunk of its
/// endpoints of one family.
pub struct SlicePlan<'p> {
    /// Its place in the Service's slices: IPv4 ones first, then IPv6.
    pub index: usize,
    pub v6: bool,
    pub endpoints: Vec<(&'p PodPlan, Conditions)>,
}

/// Kubernetes' `--max-endpoints-per-slice` default.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Every slice a Service has in `model`, deleted ones included (their index stays theirs): its
/// endpoints in chunks of `max_endpoints_per_slice`, one IPv4 slice even when it has none (as the
/// controller keeps one), IPv6 ones for a dual-stack Service's pods with IPv6 addresses. None for a
/// Service without a selector, which the controller leaves alone.
pub fn slice_plans<'p>(
    model: &ClusterModel,
    svc: &ServiceSpec,
    plan: &'p Plan,
) -> Vec<SlicePlan<'p>> {
    if svc.selector.is_empty() {
        return Vec::new();
    }
    let per_slice = svc
        .max_endpoints_per_slice
        .unwrap_or(MAX_ENDPOINTS_PER_SLICE)
        .max(1);
    let all = model.endpoints(svc, plan);
    let mut slices = Vec::new();
    for v6 in svc.families_with_pods() {
        let eps: Vec<(&PodPlan, Conditions)> = all
            .iter()
            .filter(|(pod, _)| !v6 || pod.ip6.is_some())
            .copied()
            .collect();
        if eps.is_empty() {
            if !v6 {
                slices.push(SlicePlan {
                    index: slices.len(),
                    v6,
                    endpoints: Vec::new(),
                });
            }
            continue;
        }
        for chunk in eps.chunks(per_slice) {
            slices.push(SlicePlan {
                index: slices.len(),
                v6,
                endpoints: chunk.to_vec(),
            });
        }
    }
    slices
}

/// How many slices a Service has, deleted ones included.
pub fn slice_count(model: &ClusterModel, svc: &ServiceSpec, plan: &Plan) -> usize {
    slice_plans(model, svc, plan).len()
}

/// The endpoints listed in a Service's slices that exist, with their conditions, by pod name.
pub fn listed_endpoints(
    model: &ClusterModel,
    svc: &ServiceSpec,
    plan: &Plan,
) -> Vec<(String, Conditions)> {
    let mut out: Vec<(String, Conditions)> = Vec::new();
    for slice in slice_plans(model, svc, plan) {
        if model
            .deleted_slices
            .contains(&(svc.name.clone(), slice.index))
        {
            continue;
        }
        for (pod, c) in slice.endpoints {
            if !out.iter().any(|(p, _)| *p == pod.name) {
                out.push((pod.name.clone(), c));
            }
        }
    }
    for slice in model.live_manual_slices().filter(|s| s.service == svc.name) {
        for e in &slice.endpoints {
            if !out.iter().any(|(p, _)| *p == e.pod) {
                let c = Conditions {
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                };
                out.push((e.pod.clone(), c));
            }
        }
    }
    out
}

/// A pod as an endpoint of a slice of one family (None: the pod has no address of it).
fn pod_endpoint(pod: &PodPlan, v6: bool, conditions: ConditionsYaml) -> Option<Endpoint> {
    let address = if v6 {
        IpAddr::V6(pod.ip6?)
    } else {
        IpAddr::V4(pod.ip)
    };
    Some(Endpoint {
        addresses: vec![address],
        conditions,
        node_name: format!("node{}", pod.node),
        target_ref: TargetRef {
            kind: "Pod",
            name: pod.name.clone(),
            namespace: NAMESPACE.to_owned(),
        },
    })
}

/// A `[[endpoint_slices]]` entry as the object it stands for.
fn manual_slice_object(slice: &ManualSlice, plan: &Plan) -> EndpointSlice {
    let v6 = slice.family == Family::Ipv6;
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|e| {
            let conditions = ConditionsYaml {
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
            };
            pod_endpoint(plan.pod(&e.pod)?, v6, conditions)
        })
        .collect();
    let mut labels = slice.labels.clone();
    labels.insert(
        "kubernetes.io/service-name".to_owned(),
        slice.service.clone(),
    );
    EndpointSlice {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        metadata: Metadata {
            name: slice.name.clone(),
            namespace: NAMESPACE.to_owned(),
            labels,
            annotations: BTreeMap::new(),
        },
        address_type: if v6 { "IPv6" } else { "IPv4" },
        endpoints,
        ports: slice
            .ports
            .iter()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: p.port,
                protocol: protocol(p.protocol),
            })
            .collect(),
    }
}

fn slice_object(svc: &ServiceSpec, slice: &SlicePlan<'_>) -> EndpointSlice {
    let endpoints: Vec<Endpoint> = slice
        .endpoints
        .iter()
        .filter_map(|(pod, c)| {
            let conditions = ConditionsYaml {
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
            };
            pod_endpoint(pod, slice.v6, conditions)
        })
        .collect();
    // The first slice of each family keeps the name earlier versions of the lab gave it.
    let seed = match (slice.v6, slice.index) {
        (false, 0) => svc.name.clone(),
        (true, _) if slice.endpoints.is_empty() => format!("{}/ipv6", svc.name),
        (true, i) => format!("{}/ipv6/{i}", svc.name),
        (false, i) => format!("{}/{i}", svc.name),
    };
    let name = slice_name(&seed);
    let mut labels = BTreeMap::from([
        (
            "endpointslice.kubernetes.io/managed-by".to_owned(),
            "weir-lab".to_owned(),
        ),
        ("kubernetes.io/service-name".to_owned(), svc.name.clone()),
    ]);
    // The controller copies the Service's labels, and marks a headless Service's slices.
    labels.extend(svc.labels.clone());
    if svc.headless {
        labels.insert("service.kubernetes.io/headless".to_owned(), String::new());
    }
    EndpointSlice {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        metadata: Metadata {
            // Named after the service, whatever the hash was fed.
            name: format!("{}-{}", svc.name, &name[name.len() - 5..]),
            namespace: NAMESPACE.to_owned(),
            labels,
            annotations: BTreeMap::new(),
        },
        address_type: if slice.v6 { "IPv6" } else { "IPv4" },
        endpoints,
        ports: svc
            .ports
            .iter()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: p.target(),
                protocol: protocol(p.protocol),
            })
            .collect(),
    }
}

fn node_object(node: &crate::topology::NodePlan) -> Node {
    let mut addresses: Vec<NodeAddress> = node
        .ips
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP",
            address: ip.to_string(),
        })
        .collect();
    let mut pod_cidrs = vec![format!("{}/24", node.pod_cidr)];
    if let (Some(ip6), Some(cidr6)) = (node.ip6, node.pod_cidr6) {
        addresses.push(NodeAddress {
            type_: "InternalIP",
            address: ip6.to_string(),
        });
        pod_cidrs.push(format!("{cidr6}/64"));
    }
    addresses.push(NodeAddress {
        type_: "Hostname",
        address: node.name.clone(),
    });
    Node {
        api_version: "v1",
        kind: "Node",
        metadata: NodeMetadata {
            name: node.name.clone(),
        },
        spec: NodeSpec {
            pod_cidr: pod_cidrs[0].clone(),
            pod_cidrs,
        },
        status: NodeStatus { addresses },
    }
}

/// The cluster state for every node's agent at the start: a multi-document YAML stream of
/// Nodes, Services and their EndpointSlices.
pub fn cluster_state(scenario: &Scenario, plan: &Plan) -> String {
    let model = ClusterModel::new(scenario, pod_labels(scenario, plan));
    cluster_state_of(&model, plan)
}

/// The cluster state as `model` has it (a point of the timeline).
pub fn cluster_state_of(model: &ClusterModel, plan: &Plan) -> String {
    let mut docs = Vec::new();
    // These types only hold strings, numbers and maps with string keys: they always serialize.
    for node in &plan.nodes {
        docs.push(serde_yaml::to_string(&node_object(node)).expect("node serializes"));
    }
    for svc in model.live_services() {
        docs.push(serde_yaml::to_string(&service_object(svc)).expect("service serializes"));
        for slice in slice_plans(model, svc, plan) {
            if model
                .deleted_slices
                .contains(&(svc.name.clone(), slice.index))
            {
                continue;
            }
            docs.push(serde_yaml::to_string(&slice_object(svc, &slice)).expect("slice serializes"));
        }
    }
    for slice in model.live_manual_slices() {
        docs.push(
            serde_yaml::to_string(&manual_slice_object(slice, plan)).expect("slice serializes"),
        );
    }
    docs.extend(
        model
            .policy
            .documents(plan, &model.labels, &model.gone_pods),
    );
    docs.extend(model.objects.iter().cloned());
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&doc);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde::Deserialize;

    use super::*;

    fn scenario() -> Scenario {
        Scenario::parse(
            r#"
name = "t"
[topology]
nodes = 2
pods_per_node = 2
[[pods]]
match = "*"
labels = { app = "echo" }
[[pods]]
match = "n1p0"
labels = { app = "client" }
[[services]]
name = "echo"
cluster_ip = "198.18.100.10"
selector = { app = "echo" }
ports = [
  { name = "http", protocol = "TCP", port = 80, target_port = 8080 },
  { name = "dns", protocol = "UDP", port = 53, target_port = 5353 },
]
[[services]]
name = "headless-ish"
cluster_ip = "198.18.100.11"
ports = [ { port = 81 } ]
"#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn labels_and_selection() {
        let s = scenario();
        let plan = s.plan();
        let labels = pod_labels(&s, &plan);
        assert_eq!(labels["n1p0"]["app"], "client");
        assert_eq!(labels["n2p1"]["app"], "echo");
        let eps: Vec<&str> = endpoints(&s.services[0], &plan, &labels)
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(eps, ["n1p1", "n2p0", "n2p1"]);
        assert!(endpoints(&s.services[1], &plan, &labels).is_empty());
    }

    #[test]
    fn default_label_is_the_pod_name() {
        let s = Scenario::parse(
            "name = \"t\"\n[topology]\nnodes = 1\npods_per_node = 1\n",
            Path::new("t"),
        )
        .unwrap();
        let labels = pod_labels(&s, &s.plan());
        assert_eq!(labels["n1p0"]["app"], "n1p0");
    }

    #[test]
    fn state_is_kubernetes_yaml() {
        let s = scenario();
        let yaml = cluster_state(&s, &s.plan());
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let (nodes, docs): (Vec<_>, Vec<_>) = docs.into_iter().partition(|d| d["kind"] == "Node");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1]["metadata"]["name"], "node2");
        assert_eq!(nodes[1]["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(nodes[1]["status"]["addresses"][0]["address"], "198.18.0.2");
        assert_eq!(nodes[1]["spec"]["podCIDRs"][0], "198.19.2.0/24");
        assert_eq!(docs.len(), 3);

        let svc = &docs[0];
        assert_eq!(svc["apiVersion"], "v1");
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["metadata"]["name"], "echo");
        assert_eq!(svc["metadata"]["namespace"], "default");
        assert_eq!(svc["spec"]["clusterIP"], "198.18.100.10");
        assert_eq!(svc["spec"]["clusterIPs"][0], "198.18.100.10");
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(svc["spec"]["ports"][1]["port"], 53);
        assert_eq!(svc["spec"]["ports"][1]["targetPort"], 5353);
        assert_eq!(svc["spec"]["selector"]["app"], "echo");

        let slice = &docs[1];
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "echo"
        );
        assert!(slice["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("echo-"));
        assert_eq!(slice["addressType"], "IPv4");
        let eps = slice["endpoints"].as_sequence().unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0]["addresses"][0], "198.19.1.11");
        assert_eq!(eps[0]["nodeName"], "node1");
        assert_eq!(eps[0]["conditions"]["ready"], true);
        assert_eq!(eps[0]["conditions"]["terminating"], false);
        assert_eq!(eps[0]["targetRef"]["kind"], "Pod");
        assert_eq!(eps[0]["targetRef"]["name"], "n1p1");
        assert_eq!(eps[2]["nodeName"], "node2");
        assert_eq!(slice["ports"][0]["name"], "http");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["ports"][1]["protocol"], "UDP");
        assert_eq!(slice["ports"][1]["port"], 5353);

        // Like Kubernetes, no slice for a service without a selector.
        assert_eq!(docs[2]["kind"], "Service");
        assert_eq!(docs[2]["spec"]["ports"][0]["targetPort"], 81);
    }

    #[test]
    fn external_dual_stack_service() {
        let s = Scenario::parse(
            r#"
name = "t"
[topology]
nodes = 2
pods_per_node = 1
ipv6 = true
networks = 2
[[pods]]
match = "*"
labels = { app = "web" }
[[services]]
name = "web"
type = "LoadBalancer"
cluster_ip = "198.18.100.10"
cluster_ip6 = "fd00:100::10"
selector = { app = "web" }
external_ips = ["198.18.201.1"]
load_balancer_ips = ["198.18.200.1"]
external_traffic_policy = "Local"
health_check_node_port = 32000
affinity_timeout = "30s"
ports = [ { name = "http", port = 80, target_port = 8080, target_port_name = "web", node_port = 30080 } ]
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        let yaml = cluster_state(&s, &s.plan());
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["Node", "Node", "Service", "EndpointSlice", "EndpointSlice"]
        );
        assert_eq!(docs[0]["status"]["addresses"][1]["address"], "198.18.1.1");
        assert_eq!(docs[0]["status"]["addresses"][2]["address"], "fd00:18::1");
        let spec = &docs[2]["spec"];
        assert_eq!(spec["type"], "LoadBalancer");
        assert_eq!(spec["clusterIPs"][1], "fd00:100::10");
        assert_eq!(spec["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(spec["ports"][0]["targetPort"], "web");
        assert_eq!(spec["ports"][0]["nodePort"], 30080);
        assert_eq!(spec["externalIPs"][0], "198.18.201.1");
        assert_eq!(spec["externalTrafficPolicy"], "Local");
        assert_eq!(spec["healthCheckNodePort"], 32000);
        assert_eq!(spec["sessionAffinity"], "ClientIP");
        assert_eq!(
            spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            30
        );
        assert_eq!(
            docs[2]["status"]["loadBalancer"]["ingress"][0]["ip"],
            "198.18.200.1"
        );
        assert_eq!(docs[3]["addressType"], "IPv4");
        assert_eq!(docs[3]["ports"][0]["port"], 8080);
        assert_eq!(docs[4]["addressType"], "IPv6");
        assert_eq!(docs[4]["endpoints"][0]["addresses"][0], "fd00:19:1::a");
        assert_ne!(docs[3]["metadata"]["name"], docs[4]["metadata"]["name"]);
        assert!(docs[4]["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web-"));
    }

    #[test]
    fn slice_names_are_stable() {
        assert_eq!(slice_name("echo"), slice_name("echo"));
        assert_ne!(slice_name("echo"), slice_name("echo2"));
        assert_eq!(slice_name("echo").len(), "echo-".len() + 5);
    }
}
