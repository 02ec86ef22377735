//! The lab plays the Kubernetes control plane: it labels pods, selects endpoints and writes the
//! Service and EndpointSlice objects the agent watches, shaped as `kubectl get -o yaml` prints
//! them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::scenario::{glob_match, Scenario, ServiceSpec};
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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: ServiceSpecYaml,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecYaml {
    #[serde(rename = "clusterIP")]
    cluster_ip: Ipv4Addr,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Vec<Ipv4Addr>,
    ip_families: Vec<&'static str>,
    ip_family_policy: &'static str,
    ports: Vec<ServicePortYaml>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    selector: BTreeMap<String, String>,
    session_affinity: &'static str,
    #[serde(rename = "type")]
    type_: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortYaml {
    name: String,
    port: u16,
    protocol: &'static str,
    target_port: u16,
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
    addresses: Vec<Ipv4Addr>,
    conditions: Conditions,
    node_name: String,
    target_ref: TargetRef,
}

#[derive(Serialize)]
struct Conditions {
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

/// The cluster state for every node's agent: a multi-document YAML stream of Services and their
/// EndpointSlices.
pub fn cluster_state(scenario: &Scenario, plan: &Plan) -> String {
    let labels = pod_labels(scenario, plan);
    let mut docs = Vec::new();
    for svc in &scenario.services {
        let service = Service {
            api_version: "v1",
            kind: "Service",
            metadata: Metadata {
                name: svc.name.clone(),
                namespace: NAMESPACE.to_owned(),
                labels: BTreeMap::new(),
            },
            spec: ServiceSpecYaml {
                cluster_ip: svc.cluster_ip,
                cluster_ips: vec![svc.cluster_ip],
                ip_families: vec!["IPv4"],
                ip_family_policy: "SingleStack",
                ports: svc
                    .ports
                    .iter()
                    .map(|p| ServicePortYaml {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: protocol(p.protocol),
                        target_port: p.target(),
                    })
                    .collect(),
                selector: svc.selector.clone(),
                session_affinity: "None",
                type_: "ClusterIP",
            },
        };
        let slice = EndpointSlice {
            api_version: "discovery.k8s.io/v1",
            kind: "EndpointSlice",
            metadata: Metadata {
                name: slice_name(&svc.name),
                namespace: NAMESPACE.to_owned(),
                labels: BTreeMap::from([
                    (
                        "endpointslice.kubernetes.io/managed-by".to_owned(),
                        "weir-lab".to_owned(),
                    ),
                    ("kubernetes.io/service-name".to_owned(), svc.name.clone()),
                ]),
            },
            address_type: "IPv4",
            endpoints: endpoints(svc, plan, &labels)
                .into_iter()
                .map(|pod| Endpoint {
                    addresses: vec![pod.ip],
                    conditions: Conditions {
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    node_name: format!("node{}", pod.node),
                    target_ref: TargetRef {
                        kind: "Pod",
                        name: pod.name.clone(),
                        namespace: NAMESPACE.to_owned(),
                    },
                })
                .collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| EndpointPort {
                    name: p.name.clone(),
                    port: p.target(),
                    protocol: protocol(p.protocol),
                })
                .collect(),
        };
        // These types only hold strings, numbers and maps with string keys: they always serialize.
        docs.push(serde_yaml::to_string(&service).expect("service serializes"));
        // Kubernetes' endpoints controller only manages slices of services with a selector.
        if !svc.selector.is_empty() {
            docs.push(serde_yaml::to_string(&slice).expect("slice serializes"));
        }
    }
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
    fn slice_names_are_stable() {
        assert_eq!(slice_name("echo"), slice_name("echo"));
        assert_ne!(slice_name("echo"), slice_name("echo2"));
        assert_eq!(slice_name("echo").len(), "echo-".len() + 5);
    }
}
