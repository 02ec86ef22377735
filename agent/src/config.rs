//! Agent configuration: a TOML file, with durations in humantime form ("30s", "6h").

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name, as in the Kubernetes Node object.
    pub node_name: String,
    /// Directory on a bpffs mount where this node's maps are pinned (one per node, so several
    /// agents can share a host in the namespace lab). A layout-version subdirectory is added.
    pub pin_dir: PathBuf,
    /// Desired state: a file or directory of Kubernetes YAML (Service and EndpointSlice objects,
    /// multi-document or `kind: List`), reloaded when it changes.
    pub state_path: PathBuf,
    /// Host-facing interfaces (the node's uplinks). They get the ingress program.
    #[serde(default)]
    pub host_interfaces: Vec<String>,
    /// Pod-facing interfaces are found by this name prefix (like Calico's `cali`), in the agent's
    /// network namespace, as they come and go.
    #[serde(default = "default_pod_prefix")]
    pub pod_interface_prefix: String,
    /// How often the state file and the interface list are checked for changes.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    #[serde(default)]
    pub services: ServicesConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
}

/// How external traffic (NodePort, load-balancer and external IPs) reaches a backend on
/// another node, and how that backend's replies return.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalReturn {
    /// The ingress node translates and tunnels; replies come back through it.
    #[default]
    Ingress,
    /// Direct server return: the backend's node translates and replies to the client itself.
    Dsr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancing {
    #[default]
    Random,
    /// Consistent hashing: every node picks the same backend for a flow.
    Maglev,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub external_return: ExternalReturn,
    /// Backend choice for external traffic (ClusterIP traffic always picks at random).
    pub external_load_balancing: LoadBalancing,
    /// Source address a pod sees when its own service sends it its own connection (hairpin):
    /// an address nothing else uses, routed back through the node.
    pub hairpin_ipv4: Ipv4Addr,
    pub hairpin_ipv6: Ipv6Addr,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            external_return: ExternalReturn::Ingress,
            external_load_balancing: LoadBalancing::Random,
            // Link-local, like Cilium's hairpin address: never a real peer's.
            hairpin_ipv4: Ipv4Addr::new(169, 254, 42, 1),
            hairpin_ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0xa9fe, 0x2a, 1),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// External traffic for remote backends is routed natively: replies must come back through
    /// the ingress node by the network's own routing.
    None,
    #[default]
    Vxlan,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub mode: TunnelMode,
    /// The collect-metadata device the agent creates (or adopts) in its network namespace.
    pub interface: String,
    pub vxlan_port: u16,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            mode: TunnelMode::Vxlan,
            interface: "weir-vxlan".to_owned(),
            vxlan_port: 4789,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// How often expired entries are reclaimed.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// TCP connection whose SYN got no answer yet.
    #[serde(with = "humantime_serde")]
    pub tcp_syn_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_established_timeout: Duration,
    /// After FIN in both directions or any RST.
    #[serde(with = "humantime_serde")]
    pub tcp_closing_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub udp_timeout: Duration,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        // The kernel's nf_conntrack defaults for the same states, so behaviour matches kube-proxy.
        ConntrackConfig {
            gc_interval: Duration::from_secs(10),
            tcp_syn_timeout: Duration::from_secs(60),
            tcp_established_timeout: Duration::from_secs(5 * 24 * 3600),
            tcp_closing_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(30),
        }
    }
}

fn default_pod_prefix() -> String {
    "wp".to_owned()
}

fn default_poll() -> Duration {
    Duration::from_millis(500)
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: AgentConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid("node_name is empty".into()));
        }
        if self.pod_interface_prefix.is_empty() {
            return Err(ConfigError::Invalid(
                "pod_interface_prefix is empty: it would match every interface".into(),
            ));
        }
        if self.tunnel.mode != TunnelMode::None
            && (self.tunnel.interface.is_empty() || self.tunnel.interface.len() > 15)
        {
            return Err(ConfigError::Invalid(
                "tunnel.interface must be 1-15 characters (a Linux interface name)".into(),
            ));
        }
        if self.conntrack.gc_interval.is_zero() || self.poll_interval.is_zero() {
            return Err(ConfigError::Invalid("intervals must be positive".into()));
        }
        Ok(())
    }

    /// Where this agent's maps live: `pin_dir/v<layout>`.
    pub fn versioned_pin_dir(&self) -> PathBuf {
        versioned_pin_dir(&self.pin_dir)
    }
}

pub fn versioned_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{}", weir_common::MAP_LAYOUT_VERSION))
}
