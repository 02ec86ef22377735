//! The objects NetworkPolicy needs beside Services: Namespaces with their labels, a Pod object
//! for every pod (namespace, labels, node, addresses, named container ports), and the
//! scenario's NetworkPolicies as written. The agent computes peers and isolation from these, as
//! it does from the API server's.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::k8s::NAMESPACE;
use crate::scenario::{glob_match, Scenario};
use crate::topology::Plan;

/// What the policy objects are made of, fixed for a run.
#[derive(Clone, Debug, Default)]
pub struct PolicyObjects {
    /// Every namespace a pod or the scenario names, with its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Each pod's namespace and named ports (name -> TCP port).
    pub pods: BTreeMap<String, (String, BTreeMap<String, u16>)>,
    /// The NetworkPolicy documents, as the scenario gives them and the steps apply them.
    pub policies: Vec<String>,
    /// Whether the objects are written: the scenario has policies, at the start or from a
    /// step.
    wanted: bool,
}

/// Why a policy object change cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("not a NetworkPolicy with a name: {0}")]
    NotAPolicy(String),
    #[error("no namespace {0:?}")]
    NoNamespace(String),
    #[error("no policy {namespace}/{name} to delete")]
    NoPolicy { namespace: String, name: String },
    #[error("namespace {0}: the label {OWN_LABEL} is the API server's")]
    OwnLabel(String),
}

/// The label the API server puts on every namespace (immutable), as namespace selectors use it.
const OWN_LABEL: &str = "kubernetes.io/metadata.name";

/// A NetworkPolicy document's namespace (the default one when unset) and name.
pub fn policy_key(yaml: &str) -> Result<(String, String), PolicyError> {
    let not_a_policy = |why: &str| PolicyError::NotAPolicy(why.to_owned());
    let doc: serde_yaml::Value =
        serde_yaml::from_str(yaml).map_err(|e| PolicyError::NotAPolicy(e.to_string()))?;
    if doc["kind"].as_str() != Some("NetworkPolicy") {
        return Err(not_a_policy("kind is not NetworkPolicy"));
    }
    let name = doc["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| not_a_policy("metadata.name missing"))?;
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
    Ok((namespace.to_owned(), name.to_owned()))
}

impl PolicyObjects {
    /// From the scenario's `[[namespaces]]`, `[[pods]]` rules (later rules win) and
    /// `network_policies`; `pods` are the pod names.
    pub fn new<'a>(scenario: &Scenario, pods: impl Iterator<Item = &'a String>) -> PolicyObjects {
        let mut namespaces = BTreeMap::from([(NAMESPACE.to_owned(), own_labels(NAMESPACE))]);
        for ns in &scenario.namespaces {
            let mut labels = own_labels(&ns.name);
            labels.extend(ns.labels.clone());
            namespaces.insert(ns.name.clone(), labels);
        }
        let mut objects = BTreeMap::new();
        for pod in pods {
            let mut namespace = NAMESPACE.to_owned();
            let mut named = BTreeMap::new();
            for rule in scenario.pods.iter().filter(|r| glob_match(&r.pattern, pod)) {
                if let Some(ns) = &rule.namespace {
                    namespace = ns.clone();
                }
                named.extend(rule.named_ports.clone());
            }
            namespaces
                .entry(namespace.clone())
                .or_insert_with(|| own_labels(&namespace));
            objects.insert(pod.clone(), (namespace, named));
        }
        let applied_later = scenario
            .steps
            .iter()
            .flat_map(|s| &s.actions)
            .any(|a| matches!(a, crate::timeline::Action::ApplyPolicy { .. }));
        PolicyObjects {
            namespaces,
            pods: objects,
            policies: scenario.network_policies.clone(),
            wanted: !scenario.network_policies.is_empty() || applied_later,
        }
    }

    /// Whether the scenario asks for policy at all: without, no Pod or Namespace object is
    /// written and the cluster state stays what it was.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    /// Creates the policy, or replaces the one of the same namespace and name.
    pub fn apply_policy(&mut self, yaml: &str) -> Result<(), PolicyError> {
        let key = policy_key(yaml)?;
        if !self.namespaces.contains_key(&key.0) {
            return Err(PolicyError::NoNamespace(key.0));
        }
        match self
            .policies
            .iter_mut()
            .find(|p| policy_key(p).is_ok_and(|k| k == key))
        {
            Some(existing) => *existing = yaml.to_owned(),
            None => self.policies.push(yaml.to_owned()),
        }
        Ok(())
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Result<(), PolicyError> {
        let key = (namespace.to_owned(), name.to_owned());
        let before = self.policies.len();
        self.policies
            .retain(|p| policy_key(p).map_or(true, |k| k != key));
        if self.policies.len() == before {
            return Err(PolicyError::NoPolicy {
                namespace: key.0,
                name: key.1,
            });
        }
        Ok(())
    }

    /// `set` added or replaced, `remove` taken away; the API server's own label stays.
    pub fn label_namespace(
        &mut self,
        namespace: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), PolicyError> {
        if set.contains_key(OWN_LABEL) || remove.iter().any(|k| k == OWN_LABEL) {
            return Err(PolicyError::OwnLabel(namespace.to_owned()));
        }
        let labels = self
            .namespaces
            .get_mut(namespace)
            .ok_or_else(|| PolicyError::NoNamespace(namespace.to_owned()))?;
        labels.extend(set.clone());
        labels.retain(|k, _| !remove.contains(k));
        Ok(())
    }

    /// The YAML documents: Namespaces, Pods (those not `gone`), NetworkPolicies.
    pub fn documents(
        &self,
        plan: &Plan,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
        gone: &std::collections::BTreeSet<String>,
    ) -> Vec<String> {
        if !self.wanted() {
            return Vec::new();
        }
        let mut docs = Vec::new();
        for (name, labels) in &self.namespaces {
            let namespace = Namespace {
                api_version: "v1",
                kind: "Namespace",
                metadata: Metadata {
                    name: name.clone(),
                    namespace: None,
                    labels: labels.clone(),
                },
            };
            docs.push(serde_yaml::to_string(&namespace).expect("namespace serializes"));
        }
        for pod in plan.pods.iter().filter(|p| !gone.contains(&p.name)) {
            let (namespace, named) = self.pods.get(&pod.name).cloned().unwrap_or_default();
            let node = plan
                .nodes
                .iter()
                .find(|n| n.index == pod.node)
                .map_or_else(|| format!("node{}", pod.node), |n| n.name.clone());
            let mut ips = vec![PodIp {
                ip: pod.ip.to_string(),
            }];
            ips.extend(pod.ip6.map(|ip| PodIp { ip: ip.to_string() }));
            let object = Pod {
                api_version: "v1",
                kind: "Pod",
                metadata: Metadata {
                    name: pod.name.clone(),
                    namespace: Some(namespace),
                    labels: labels.get(&pod.name).cloned().unwrap_or_default(),
                },
                spec: PodSpec {
                    node_name: node,
                    containers: vec![Container {
                        name: "server",
                        image: "nginx",
                        ports: named
                            .iter()
                            .map(|(name, port)| ContainerPort {
                                name: name.clone(),
                                container_port: *port,
                                protocol: "TCP",
                            })
                            .collect(),
                    }],
                },
                status: PodStatus {
                    phase: "Running",
                    pod_ip: pod.ip.to_string(),
                    pod_ips: ips,
                },
            };
            docs.push(serde_yaml::to_string(&object).expect("pod serializes"));
        }
        docs.extend(self.policies.iter().cloned());
        docs
    }
}

/// A new namespace's labels: only the API server's own.
fn own_labels(namespace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(OWN_LABEL.to_owned(), namespace.to_owned())])
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Namespace {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
}

#[derive(Serialize)]
struct Metadata {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Pod {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: PodSpec,
    status: PodStatus,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: String,
    containers: Vec<Container>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: &'static str,
    image: &'static str,
    ports: Vec<ContainerPort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: String,
    container_port: u16,
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    phase: &'static str,
    #[serde(rename = "podIP")]
    pod_ip: String,
    #[serde(rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Serialize)]
struct PodIp {
    ip: String,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::k8s::{cluster_state, pod_labels};
    use crate::scenario::Scenario;

    const SCENARIO: &str = r#"
name = "t"
network_policies = ["""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}}
"""]
[topology]
nodes = 2
pods_per_node = 1
ipv6 = true
[[namespaces]]
name = "prod"
labels = { env = "prod" }
[[pods]]
match = "n2p0"
labels = { app = "db" }
namespace = "prod"
named_ports = { http = 8080 }
[[checks]]
kind = "reachability"
from = ["n1p0"]
to = ["n2p0", "service:none"]
port = 8080
expect = ["X."]
"#;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn pods_namespaces_and_policies_are_written_as_the_api_server_shows_them() {
        let s = parse(
            &SCENARIO
                .replace(", \"service:none\"", "")
                .replace("X.", "X"),
        )
        .expect("parses");
        let plan = s.plan();
        let state = cluster_state(&s, &plan);
        let docs: Vec<serde_yaml::Value> = state
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect();
        let of_kind = |kind: &str| -> Vec<&serde_yaml::Value> {
            docs.iter().filter(|d| d["kind"] == kind).collect()
        };
        let namespaces = of_kind("Namespace");
        assert_eq!(namespaces.len(), 2, "default and prod");
        let prod = namespaces
            .iter()
            .find(|n| n["metadata"]["name"] == "prod")
            .unwrap();
        assert_eq!(prod["metadata"]["labels"]["env"], "prod");
        assert_eq!(
            prod["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "prod"
        );
        let pods = of_kind("Pod");
        assert_eq!(pods.len(), 2);
        let db = pods
            .iter()
            .find(|p| p["metadata"]["name"] == "n2p0")
            .unwrap();
        assert_eq!(db["metadata"]["namespace"], "prod");
        assert_eq!(db["metadata"]["labels"]["app"], "db");
        assert_eq!(db["spec"]["nodeName"], "node2");
        assert_eq!(db["status"]["podIPs"].as_sequence().unwrap().len(), 2);
        assert_eq!(
            db["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert_eq!(db["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(of_kind("NetworkPolicy").len(), 1);
        assert_eq!(pod_labels(&s, &plan)["n2p0"]["app"], "db");
    }

    #[test]
    fn without_policies_no_pod_or_namespace_is_written() {
        let s = parse(
            &SCENARIO
                .replace(
                    &SCENARIO[SCENARIO.find("network_policies").unwrap()
                        ..SCENARIO.find("[topology]").unwrap()],
                    "",
                )
                .replace(", \"service:none\"", "")
                .replace("X.", "X"),
        )
        .expect("parses");
        let state = cluster_state(&s, &s.plan());
        assert!(!state.contains("kind: Pod") && !state.contains("kind: Namespace"));
    }

    #[test]
    fn a_reachability_table_names_what_exists_and_has_its_shape() {
        let err = parse(SCENARIO).unwrap_err();
        assert!(err.contains("no service \"none\""), "{err}");
        let err = parse(&SCENARIO.replace(", \"service:none\"", "")).unwrap_err();
        assert!(err.contains("one character per destination"), "{err}");
        let err = parse(
            &SCENARIO
                .replace(", \"service:none\"", "")
                .replace("X.", "?"),
        )
        .unwrap_err();
        assert!(err.contains("expect row"), "{err}");
    }
}
