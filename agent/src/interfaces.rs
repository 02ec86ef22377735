//! Which interfaces of this network namespace carry the ingress program, and which of them are
//! pods'.

use std::collections::BTreeSet;

/// The interfaces that exist now and concern the data plane.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Present {
    /// Named in the config or matching the pod prefix: they get the ingress program.
    pub wanted: BTreeSet<String>,
    /// The ifindexes of the pod interfaces among them: what enters there comes from a pod of
    /// this node, which the programs treat as traffic from inside the cluster.
    pub pods: BTreeSet<u32>,
}

pub fn present(host_interfaces: &[String], pod_prefix: &str) -> std::io::Result<Present> {
    // if_nameindex asks the kernel about the current network namespace; /sys/class/net would
    // show whichever namespace sysfs was mounted from.
    let listed = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    let mut out = Present::default();
    for interface in listed.iter() {
        let Ok(name) = interface.name().to_str() else {
            continue;
        };
        let host = host_interfaces.iter().any(|h| h == name);
        let pod = !host && name.starts_with(pod_prefix);
        if host || pod {
            out.wanted.insert(name.to_owned());
        }
        if pod {
            out.pods.insert(interface.index());
        }
    }
    Ok(out)
}
