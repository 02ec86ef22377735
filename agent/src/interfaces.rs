//! Which interfaces of this network namespace carry the ingress program.

use std::collections::BTreeSet;

/// Interfaces that exist now, named in the config or matching the pod prefix.
pub fn wanted(host_interfaces: &[String], pod_prefix: &str) -> std::io::Result<BTreeSet<String>> {
    // if_nameindex asks the kernel about the current network namespace; /sys/class/net would
    // show whichever namespace sysfs was mounted from.
    let present = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    Ok(present
        .iter()
        .filter_map(|i| i.name().to_str().ok())
        .filter(|name| host_interfaces.iter().any(|h| h == name) || name.starts_with(pod_prefix))
        .map(str::to_owned)
        .collect())
}
