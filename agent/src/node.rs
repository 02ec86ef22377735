//! The node's own part of the data plane: the addresses NodePorts answer on, the tunnel device
//! that carries external traffic to remote backends, and the configuration the programs read.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt as _;
use tracing::info;
use weir_common::{node_flags, HostAddrKey, NodeConfig};

use crate::compile::addr_of;
use crate::config::{AgentConfig, ExternalReturn, TunnelConfig, TunnelMode};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("listing addresses: {0}")]
    Addresses(#[from] nix::Error),
    #[error("tunnel device {0} vanished right after it was created")]
    TunnelVanished(String),
}

/// Every address of the host interfaces except IPv6 link-local ones, which a client on another
/// link cannot address. kube-proxy's default `--nodeport-addresses` is the same: all of them.
pub fn host_addresses(host_interfaces: &[String]) -> Result<BTreeSet<HostAddrKey>, NodeError> {
    let mut out = BTreeSet::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        if !host_interfaces.contains(&ifaddr.interface_name) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            if v6.ip().segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let (addr, family) = addr_of(ip);
        out.insert(HostAddrKey {
            addr,
            family,
            _pad: [0; 3],
        });
    }
    Ok(out)
}

/// What the programs are told about this node.
pub fn node_config(config: &AgentConfig, tunnel_ifindex: Option<u32>) -> NodeConfig {
    let (hairpin_v4, _) = addr_of(config.services.hairpin_ipv4.into());
    let (hairpin_v6, _) = addr_of(config.services.hairpin_ipv6.into());
    NodeConfig {
        hairpin_v4,
        hairpin_v6,
        tunnel_ifindex: tunnel_ifindex.unwrap_or(0),
        flags: if config.services.external_return == ExternalReturn::Dsr {
            node_flags::DSR
        } else {
            0
        },
    }
}

/// Creates the collect-metadata VXLAN device unless it exists, brings it up, and returns its
/// index. The programs choose each packet's remote end, so the device needs no peers, no
/// learning and no VNI of its own.
pub async fn ensure_tunnel(config: &TunnelConfig) -> Result<Option<u32>, NodeError> {
    if config.mode == TunnelMode::None {
        return Ok(None);
    }
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = async {
        let index = match link_index(&handle, &config.interface).await? {
            Some(index) => index,
            None => {
                handle
                    .link()
                    .add()
                    .vxlan(config.interface.clone(), 0)
                    .port(config.vxlan_port)
                    .learning(false)
                    .collect_metadata(true)
                    .execute()
                    .await?;
                info!(interface = %config.interface, port = config.vxlan_port, "created tunnel device");
                link_index(&handle, &config.interface)
                    .await?
                    .ok_or_else(|| NodeError::TunnelVanished(config.interface.clone()))?
            }
        };
        handle.link().set(index).up().execute().await?;
        Ok(Some(index))
    }
    .await;
    connection.abort();
    result
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NodeError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}
