//! The node's own part of the data plane: the addresses NodePorts answer on, the tunnel device
//! that carries external traffic to remote backends, and the configuration the programs read.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt as _;
use netlink_packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo};
use tracing::info;
use weir_common::{node_flags, tunnel_overhead, HostAddrKey, NodeConfig, FAMILY_V4};

use crate::compile::{addr_key, addr_of};
use crate::config::{AgentConfig, ExternalReturn, Forwarding, TunnelConfig, TunnelMode};
use crate::intent::NodeIntent;

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
    #[error(
        "setting {}: {source} (a container's /proc/sys is read-only: mount the host's \
         /proc/sys/net and name it in [tunnel] proc_sys_net)",
        path.display()
    )]
    Sysctl {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
        out.insert(addr_key(ip));
    }
    Ok(out)
}

/// The senders the tunnel accepts: every address of every Node object, so a packet from any
/// other host that reaches the tunnel's port is dropped (`drop_tunnel_untrusted`).
pub fn tunnel_peers<'a>(nodes: impl IntoIterator<Item = &'a NodeIntent>) -> BTreeSet<HostAddrKey> {
    nodes
        .into_iter()
        .flat_map(|node| node.addresses.iter())
        .map(|ip| addr_key(*ip))
        .collect()
}

/// The tunnel device as the programs need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub ifindex: u32,
    pub mode: TunnelMode,
    /// The smallest MTU of the host interfaces; 0 when none could be read.
    pub underlay_mtu: u32,
}

/// What the programs are told about this node.
pub fn node_config(config: &AgentConfig, tunnel: Option<&Tunnel>) -> NodeConfig {
    let (hairpin_v4, _) = addr_of(config.services.hairpin_ipv4.into());
    let (hairpin_v6, _) = addr_of(config.services.hairpin_ipv6.into());
    let mut flags = 0;
    if config.services.external_return == ExternalReturn::Dsr {
        flags |= node_flags::DSR;
    }
    if config.services.forwarding == Forwarding::Redirect {
        flags |= node_flags::FORWARD;
    }
    if tunnel.is_some_and(|t| t.mode == TunnelMode::Ipip) {
        flags |= node_flags::TUNNEL_IPIP;
    }
    if config.prefilter.failsafe_exempt {
        flags |= node_flags::PREFILTER_FAILSAFE;
    }
    NodeConfig {
        hairpin_v4,
        hairpin_v6,
        tunnel_ifindex: tunnel.map_or(0, |t| t.ifindex),
        flags,
        underlay_mtu: tunnel.map_or(0, |t| t.underlay_mtu),
    }
}

/// IFLA_IPTUN_COLLECT_METADATA, a flag attribute the netlink crate has no builder for.
const IFLA_IPTUN_COLLECT_METADATA: u16 = 19;

/// Creates the collect-metadata tunnel device unless it exists, brings it up with an MTU that
/// leaves room for the encapsulation, and returns it. The programs choose each packet's remote
/// end, so the device needs no peers, no learning and no id of its own.
pub async fn ensure_tunnel(
    config: &TunnelConfig,
    host_interfaces: &[String],
) -> Result<Option<Tunnel>, NodeError> {
    if config.mode == TunnelMode::None {
        return Ok(None);
    }
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = async {
        let name = config.device();
        let index = match link_index(&handle, name).await? {
            Some(index) => index,
            None => {
                let request = handle.link().add();
                if config.mode == TunnelMode::Ipip {
                    let mut request = request;
                    let message = request.message_mut();
                    message
                        .attributes
                        .push(LinkAttribute::IfName(name.to_owned()));
                    let collect_metadata = [4, 0, IFLA_IPTUN_COLLECT_METADATA as u8, 0];
                    message.attributes.push(LinkAttribute::LinkInfo(vec![
                        LinkInfo::Kind(InfoKind::Other("ipip".to_owned())),
                        LinkInfo::Data(InfoData::Other(collect_metadata.to_vec())),
                    ]));
                    request.execute().await?;
                } else {
                    request
                        .vxlan(name.to_owned(), 0)
                        .port(config.vxlan_port)
                        .learning(false)
                        .collect_metadata(true)
                        .execute()
                        .await?;
                }
                info!(interface = name, mode = ?config.mode, "created tunnel device");
                link_index(&handle, name)
                    .await?
                    .ok_or_else(|| NodeError::TunnelVanished(name.to_owned()))?
            }
        };
        let mut underlay_mtu = u32::MAX;
        for interface in host_interfaces {
            if let Some(mtu) = link_mtu(&handle, interface).await? {
                underlay_mtu = underlay_mtu.min(mtu);
            }
        }
        let underlay_mtu = if underlay_mtu == u32::MAX {
            0
        } else {
            underlay_mtu
        };
        let mut set = handle.link().set(index).up();
        if underlay_mtu != 0 {
            // The node's own traffic through the device (none of Weir's needs it) gets the
            // same room the programs allow, over an IPv4 underlay.
            let ipip = config.mode == TunnelMode::Ipip;
            set = set.mtu(underlay_mtu - tunnel_overhead(ipip, FAMILY_V4));
        }
        set.execute().await?;
        accept_own_addresses(&config.proc_sys_net, name)?;
        Ok(Some(Tunnel {
            ifindex: index,
            mode: config.mode,
            underlay_mtu,
        }))
    }
    .await;
    connection.abort();
    result
}

/// A node's own process reaching another node's NodePort without host services leaves this
/// node untranslated; when the endpoint chosen there is one of this node's pods, the packet
/// comes back through the tunnel with this node's own address as its source, which IPv4 drops
/// as a martian unless the device accepts local sources. (kube-proxy masquerades such traffic
/// instead; Weir keeps the client's address.) Only the tunnel device is changed: it takes packets
/// from the cluster's Nodes only (`WEIR_TUNNEL_PEERS`). The reverse-path filter is the larger of
/// the device's and `all`'s, so a node with `all.rp_filter = 1` still drops them.
fn accept_own_addresses(proc_sys_net: &Path, device: &str) -> Result<(), NodeError> {
    for (key, value) in [("accept_local", "1"), ("rp_filter", "0")] {
        let path = proc_sys_net.join(format!("ipv4/conf/{device}/{key}"));
        std::fs::write(&path, value).map_err(|source| NodeError::Sysctl { path, source })?;
    }
    Ok(())
}

async fn link_mtu(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NodeError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
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
