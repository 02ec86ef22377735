//! The Kubernetes manifests in images/kubernetes, checked without a cluster: every document
//! deserializes into its k8s-openapi type (the API's own schema in Rust), no field is unknown to
//! that schema, and the DaemonSet, RBAC and ConfigMap say what Weir needs and nothing more.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde::Serialize;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubernetes")
}

/// Every object of every `*.yaml` file, in file and document order, with where it came from.
fn documents() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        manifests_dir().display()
    );
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_json::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} document {i}: not YAML: {e}", file.display()));
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let name = file.file_name().unwrap().to_string_lossy();
            out.push((format!("{name}#{i}"), value));
        }
    }
    out
}

/// Deserializes into `T`, naming the failing field's path, then requires the object to survive a
/// round trip unchanged: a field `T` does not know (a typo, a wrong level) would be dropped.
fn check<T: DeserializeOwned + Serialize>(
    origin: &str,
    value: &serde_json::Value,
) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("{origin}: {} at {}", e.inner(), e.path()))?;
    let round_trip = serde_json::to_value(&typed).unwrap();
    match first_difference(value, &round_trip, "") {
        Some(difference) => Err(format!(
            "{origin}: {difference} (a field the schema does not know, or a wrong type?)"
        )),
        None => Ok(typed),
    }
}

fn strict<T: DeserializeOwned + Serialize>(origin: &str, value: &serde_json::Value) -> T {
    check(origin, value).unwrap_or_else(|e| panic!("{e}"))
}

fn first_difference(
    written: &serde_json::Value,
    typed: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (written, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, a_value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    None => return Some(format!("{here} is not in the schema")),
                    Some(b_value) => {
                        if let Some(d) = first_difference(a_value, b_value, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys()
                .find(|key| !a.contains_key(*key))
                .map(|key| format!("{path}.{key} appeared in the round trip"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if written == typed => None,
        _ => Some(format!("{path}: wrote {written}, the schema reads {typed}")),
    }
}

struct Manifests {
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
    daemon_set_json: serde_json::Value,
    deny_list_crd: CustomResourceDefinition,
}

fn load() -> Manifests {
    let (mut service_account, mut cluster_role, mut binding, mut config_map, mut daemon_set) =
        (None, None, None, None, None);
    let mut daemon_set_json = None;
    let mut deny_list_crd = None;
    for (origin, value) in documents() {
        let kind = (
            value["apiVersion"].as_str().unwrap_or_default().to_owned(),
            value["kind"].as_str().unwrap_or_default().to_owned(),
        );
        match (kind.0.as_str(), kind.1.as_str()) {
            ("v1", "ServiceAccount") => service_account = Some(strict(&origin, &value)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                cluster_role = Some(strict(&origin, &value))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                binding = Some(strict(&origin, &value))
            }
            ("v1", "ConfigMap") => config_map = Some(strict(&origin, &value)),
            ("apps/v1", "DaemonSet") => {
                daemon_set = Some(strict(&origin, &value));
                daemon_set_json = Some(value);
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                deny_list_crd = Some(strict(&origin, &value))
            }
            other => panic!("{origin}: no check for {other:?}: add one here"),
        }
    }
    Manifests {
        service_account: service_account.expect("a ServiceAccount"),
        cluster_role: cluster_role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        config_map: config_map.expect("a ConfigMap"),
        daemon_set: daemon_set.expect("a DaemonSet"),
        daemon_set_json: daemon_set_json.unwrap(),
        deny_list_crd: deny_list_crd.expect("the PrefilterDenyList CustomResourceDefinition"),
    }
}

fn agent_container(daemon_set: &DaemonSet) -> &Container {
    let pod = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

#[test]
fn every_manifest_matches_the_kubernetes_schema() {
    let documents = documents();
    for (origin, value) in &documents {
        println!("{origin}: {} {}", value["kind"], value["metadata"]["name"]);
    }
    load();
}

#[test]
fn the_strict_check_catches_unknown_and_misplaced_fields() {
    let mut value = load().daemon_set_json;
    value["spec"]["template"]["spec"]["hostNetwrok"] = serde_json::Value::Bool(true);
    let error = check::<DaemonSet>("typo", &value).unwrap_err();
    assert!(
        error.contains(".spec.template.spec.hostNetwrok is not in the schema"),
        "{error}"
    );

    let mut value = load().daemon_set_json;
    value["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
        serde_json::json!("9464");
    let error = check::<DaemonSet>("wrong type", &value).unwrap_err();
    assert!(
        error.contains("spec.template.spec.containers[0].ports[0].containerPort"),
        "{error}"
    );
}

#[test]
fn daemon_set_runs_on_the_host_network_with_capabilities_not_privileged() {
    let m = load();
    let pod = m
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.service_account_name.as_deref(),
        m.service_account.metadata.name.as_deref()
    );
    let security = agent_container(&m.daemon_set)
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // The selector selects the pods the template makes.
    let spec = m.daemon_set.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (key, value) in selector {
        assert_eq!(labels.get(key), Some(value), "selector {key}");
    }
}

#[test]
fn daemon_set_mounts_bpffs_cgroup_and_its_config() {
    let m = load();
    let pod = m
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let container = agent_container(&m.daemon_set);
    let mount = |path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    assert_eq!(
        host_path_mounted_at(&m.daemon_set, "/sys/fs/bpf").as_deref(),
        Some("/sys/fs/bpf")
    );
    assert_eq!(
        host_path_mounted_at(&m.daemon_set, "/run/weir/cgroupv2").as_deref(),
        Some("/sys/fs/cgroup")
    );
    let config_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount("/etc/weir").name)
        .unwrap();
    assert_eq!(
        config_volume.config_map.as_ref().unwrap().name,
        m.config_map.metadata.name.clone().unwrap()
    );
    assert_eq!(
        container.args.as_deref(),
        Some(&["run", "--config", "/etc/weir/config.toml"].map(str::to_owned)[..])
    );
    // The node name comes from the downward API, not from the shared ConfigMap.
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEIR_NODE_NAME")
        .expect("WEIR_NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn probes_hit_healthz_and_readyz_on_the_loopback_metrics_port_of_the_config() {
    let m = load();
    let container = agent_container(&m.daemon_set);
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(port.container_port, 9464);
    // With hostNetwork the host port is the container port.
    assert_eq!(port.host_port, Some(9464));
    // The kubelet probes from the node: on a hostNetwork pod, 127.0.0.1 is the agent's loopback.
    let host_path_and_port = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        (
            get.host.clone(),
            get.path.clone().unwrap(),
            get.port.clone(),
        )
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let metrics = IntOrString::String("metrics".into());
    let loopback = Some("127.0.0.1".to_owned());
    assert_eq!(
        host_path_and_port(&container.readiness_probe),
        (loopback.clone(), "/readyz".to_owned(), metrics.clone())
    );
    assert_eq!(
        host_path_and_port(&container.liveness_probe),
        (loopback, "/healthz".to_owned(), metrics)
    );

    let config = agent_config_toml(&m.config_map);
    let listen: std::net::SocketAddr = config["metrics_listen"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        listen.port(),
        9464,
        "the probes' port is the agent's metrics_listen"
    );
    assert!(
        listen.ip().is_loopback() || listen.ip().is_unspecified(),
        "the probes reach 127.0.0.1: metrics_listen {listen} must include it"
    );
    let healthz: std::net::SocketAddr = config["healthz_listen"].as_str().unwrap().parse().unwrap();
    let declared = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("healthz"))
        .expect("a port named healthz");
    assert_eq!(
        (declared.container_port, declared.host_port),
        (i32::from(healthz.port()), Some(i32::from(healthz.port()))),
        "the declared healthz port is the agent's healthz_listen"
    );
    assert!(
        config["pin_dir"]
            .as_str()
            .unwrap()
            .starts_with("/sys/fs/bpf/"),
        "maps must be pinned on the bpffs mount"
    );
    assert_eq!(config["source"].as_str(), Some("kubernetes"));
}

#[test]
fn config_map_is_a_valid_agent_config_once_the_node_name_is_added() {
    use weir_agent::config::SourceKind;
    let config = shipped_agent_config(&load());
    assert_eq!(config.source, SourceKind::Kubernetes);
    assert_eq!(config.metrics_listen.port(), 9464);
    assert!(config.metrics_listen.ip().is_loopback());
    assert_eq!(config.healthz_listen.port(), 10256);
    assert!(config.is_reserved_health_check_port(10250));
    assert!(config.pin_dir.starts_with("/sys/fs/bpf"));
}

/// Without kube-proxy, host-network processes reach ClusterIPs only through host services: the
/// shipped configuration turns them on, on the cgroup v2 root the DaemonSet mounts from the host.
#[test]
fn host_network_processes_reach_cluster_ips_by_default() {
    let m = load();
    let config = shipped_agent_config(&m);
    assert!(config.host_services.enabled, "host services on by default");
    assert!(config.policy.enabled, "NetworkPolicy on, with its RBAC");
    let cgroup = config.host_services.cgroup.to_str().unwrap();
    assert_eq!(
        host_path_mounted_at(&m.daemon_set, cgroup).as_deref(),
        Some("/sys/fs/cgroup"),
        "the host's cgroup v2 root"
    );
}

/// The tunnel device's sysctls are written through the host's /proc/sys/net, mounted writable:
/// the container's own /proc/sys is read-only, and the agent would not start.
#[test]
fn tunnel_sysctls_go_through_a_writable_mount_of_the_hosts_proc_sys_net() {
    let m = load();
    let config = shipped_agent_config(&m);
    let dir = config.tunnel.proc_sys_net.to_str().unwrap();
    assert_eq!(
        host_path_mounted_at(&m.daemon_set, dir).as_deref(),
        Some("/proc/sys/net")
    );
    let mount = agent_container(&m.daemon_set)
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == dir)
        .unwrap();
    assert_ne!(mount.read_only, Some(true), "written, not only read");
}

/// The ConfigMap's config.toml as the agent resolves it in a pod, where WEIR_NODE_NAME (the
/// downward API) adds the node name; read by the agent's own parser, so unknown keys fail here.
fn shipped_agent_config(m: &Manifests) -> weir_agent::config::AgentConfig {
    use weir_agent::config::ConfigLayer;
    let text = m
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get("config.toml"))
        .unwrap();
    let file: ConfigLayer = toml::from_str(text).unwrap_or_else(|e| panic!("config.toml: {e}"));
    let from_environment = ConfigLayer {
        node_name: Some("node-1".into()),
        ..Default::default()
    };
    from_environment.over(file).finish().unwrap()
}

/// The host path of the volume the agent container mounts at `path`, if it is a hostPath one.
fn host_path_mounted_at(daemon_set: &DaemonSet, path: &str) -> Option<String> {
    let pod = daemon_set.spec.as_ref()?.template.spec.as_ref()?;
    let mount = agent_container(daemon_set)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)?;
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone())
}

fn agent_config_toml(config_map: &ConfigMap) -> toml::Table {
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get("config.toml"))
        .expect("config.toml in the ConfigMap");
    toml::from_str(text).unwrap_or_else(|e| panic!("config.toml: {e}"))
}

/// The CRD names the kind the agent asks for (group, version, plural, cluster scope), and its
/// schema takes the agent's object.
#[test]
fn the_deny_list_crd_serves_the_kind_the_agent_watches() {
    use weir_agent::prefilter::{GROUP, KIND, PLURAL, VERSION};
    let crd = load().deny_list_crd;
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some(format!("{PLURAL}.{GROUP}").as_str())
    );
    assert_eq!(
        (crd.spec.group.as_str(), crd.spec.names.kind.as_str()),
        (GROUP, KIND)
    );
    assert_eq!(crd.spec.names.plural, PLURAL);
    assert_eq!(crd.spec.scope, "Cluster");
    let version = &crd.spec.versions[0];
    assert!(version.name == VERSION && version.served && version.storage);
    let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref();
    let spec = &schema.unwrap().properties.as_ref().unwrap()["spec"];
    let properties = spec.properties.as_ref().unwrap();
    assert_eq!(properties["cidrs"].type_.as_deref(), Some("array"));
    assert_eq!(
        properties["cidrs"].max_items,
        Some(weir_agent::prefilter::MAX_PREFIXES_PER_OBJECT as i64)
    );
    assert_eq!(properties["description"].type_.as_deref(), Some("string"));
}

#[test]
fn rbac_only_reads_what_the_agent_watches() {
    let m = load();
    let mut granted = BTreeSet::new();
    for rule in m.cluster_role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        // NetworkPolicy enforcement, on in the shipped configuration.
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
        // Deny-list objects, read with [prefilter] enabled.
        ("weir.dev", "prefilterdenylists"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    assert_eq!(granted, wanted);

    assert_eq!(m.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.cluster_role.metadata.name.as_ref()
    );
    let subject = &m.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        m.service_account.metadata.name.as_ref()
    );
    assert_eq!(subject.namespace, m.service_account.metadata.namespace);
}

#[test]
fn the_privileged_fallback_patch_gives_a_valid_privileged_daemon_set() {
    let m = load();
    let patch: json_patch::Patch = serde_json::from_str(
        &std::fs::read_to_string(manifests_dir().join("privileged-fallback.json")).unwrap(),
    )
    .unwrap();
    let mut patched = m.daemon_set_json.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    let daemon_set: DaemonSet = strict("privileged-fallback.json applied", &patched);
    let security = agent_container(&daemon_set)
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(security.privileged, Some(true));
    assert!(security.capabilities.is_none());
}
