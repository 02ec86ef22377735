//! Which interfaces of this network namespace carry the ingress program, and which of them are
//! pods'.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

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

/// The kernel's notifications of link and address changes in this network namespace: the
/// interface sync (a dump of every link and address, which on a node with many pods costs
/// more than anything else the idle agent does) then runs after a change, not on every tick.
/// A subscribed netlink socket, read without blocking.
pub struct LinkEvents {
    socket: OwnedFd,
}

/// rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4 and IPv6 addresses.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

impl LinkEvents {
    pub fn subscribe() -> std::io::Result<LinkEvents> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &NetlinkAddr::new(0, groups),
        )?;
        Ok(LinkEvents { socket })
    }

    /// Whether anything changed since the last call: reads every pending notification. A full
    /// socket buffer (notifications lost, ENOBUFS) or any other error counts as a change, so
    /// the caller looks for itself.
    pub fn changed(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut changed = false;
        // Bounded: a storm of notifications is looked at on the next tick.
        for _ in 0..64 {
            match recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                &mut buf,
                MsgFlags::empty(),
            ) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(nix::errno::Errno::EAGAIN) => return changed,
                Err(_) => return true,
            }
        }
        true
    }
}
