//! Agent configuration: a TOML file, with durations in humantime form ("30s", "6h").

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
