//! A kernel's build configuration (`/boot/config-<release>`), to tell what it offers before
//! booting it.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{KernelError, Result};

#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    options: BTreeMap<String, String>,
}

impl KernelConfig {
    pub fn load(path: &Path) -> Result<KernelConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| KernelError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(KernelConfig::parse(&text))
    }

    pub fn parse(text: &str) -> KernelConfig {
        let options = text
            .lines()
            .filter(|l| l.starts_with("CONFIG_"))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        KernelConfig { options }
    }

    /// "y", "m", a value, or None when unset.
    pub fn get(&self, option: &str) -> Option<&str> {
        self.options.get(option).map(String::as_str)
    }

    pub fn enabled(&self, option: &str) -> bool {
        matches!(self.get(option), Some("y") | Some("m"))
    }

    /// The options of `required` this kernel does not have (neither built in nor a module).
    pub fn missing<'a>(&self, required: &'a [String]) -> Vec<&'a str> {
        required
            .iter()
            .filter(|o| !self.enabled(o))
            .map(String::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let c = KernelConfig::parse(
            "# comment\nCONFIG_BPF=y\nCONFIG_VXLAN=m\n# CONFIG_NET_IPIP is not set\nCONFIG_X=\"s\"\n",
        );
        assert!(c.enabled("CONFIG_BPF"));
        assert!(c.enabled("CONFIG_VXLAN"));
        assert!(!c.enabled("CONFIG_NET_IPIP"));
        assert_eq!(c.get("CONFIG_X"), Some("s"));
        let req = vec!["CONFIG_BPF".to_owned(), "CONFIG_NET_IPIP".to_owned()];
        assert_eq!(c.missing(&req), ["CONFIG_NET_IPIP"]);
    }
}
