//! The tunnel between nodes: a collect-metadata VXLAN (or IPIP) device the agent creates. The
//! program sets the outer destination per packet and redirects into the device; on the other
//! side the device decapsulates and the program, attached to the device's ingress, sees the
//! inner packet with the outer source and the tunnel id as metadata.
//!
//! IPIP carries no tunnel id and no Ethernet header: its device delivers bare IPv4 packets, and
//! the node's own return mode (DSR or not) says what they ask, so every node of a cluster must
//! share it. It also carries IPv4 only, over IPv4; VXLAN carries both families.

use aya_ebpf::{
    bindings::{bpf_tunnel_key, BPF_F_TUNINFO_IPV6, BPF_NOEXIST},
    helpers::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use weir_common::{
    counter, ct_flags, ct_kind, node_flags, tunnel_overhead, Addr, CtKey, CtValue, HostAddrKey,
    NodeConfig, FAMILY_V4, FAMILY_V6, PROTO_TCP,
};

use crate::maps::{CONNTRACK, CT_NEW, TUNNEL_PEERS};
use crate::packet::{load, Ip, ETH_P_IP, UDP_HLEN};
use crate::Verdict;

/// The leading fields of `struct bpf_tunnel_key` every kernel since 4.x accepts: passing this
/// size keeps the helpers working on kernels that predate the later fields.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TunnelKey {
    tunnel_id: u32,
    /// Host byte order for IPv4 (in the first word), network order words for IPv6.
    remote: [u32; 4],
    tos: u8,
    ttl: u8,
    ext: u16,
    label: u32,
}

const TUNNEL_KEY_SIZE: u32 = core::mem::size_of::<TunnelKey>() as u32;
const PACKET_HOST: u32 = 0;
const TUNNEL_TTL: u8 = 64;

/// A packet the tunnel delivered: who sent it and what it asks of this node. Always fully
/// initialised (an `Option` would carry undefined bytes the verifier refuses to copy).
#[derive(Default)]
pub struct Arrival {
    pub peer: Addr,
    pub peer_family: u8,
    /// A `tunnel_id` value; 0 when the packet did not come through the tunnel, [`UNTRUSTED`]
    /// when it came from an address that is no node's.
    pub id: u32,
}

/// Not a tunnel id on the wire: marks an arrival from a sender the tunnel must not accept.
pub const UNTRUSTED: u32 = u32::MAX;

impl Arrival {
    #[inline(always)]
    pub fn is_some(&self) -> bool {
        self.id != 0
    }

    #[inline(always)]
    pub fn is_none(&self) -> bool {
        self.id == 0
    }
}

#[inline(always)]
fn on_tunnel_device(ctx: &TcContext, config: &NodeConfig) -> bool {
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    config.tunnel_ifindex != 0 && ifindex == config.tunnel_ifindex
}

#[inline(always)]
fn is_ipip(config: &NodeConfig) -> bool {
    config.flags & node_flags::TUNNEL_IPIP != 0
}

/// Packets on an IPIP device start with their IP header.
#[inline(always)]
pub fn is_bare_ip(ctx: &TcContext, config: &NodeConfig) -> bool {
    is_ipip(config) && on_tunnel_device(ctx, config)
}

/// The tunnel metadata, for packets entering through the tunnel device. A sender that is not in
/// [`TUNNEL_PEERS`] gets [`UNTRUSTED`]: anyone who can reach the node's VXLAN port could
/// otherwise plant conntrack entries (and so steal replies) or reach pods through the device.
/// A packet on the device without metadata never came from the network (a collect-metadata
/// device always attaches it), so it is treated as local, as test runs need.
#[inline(never)]
pub fn arrival(ctx: &TcContext, config: &NodeConfig) -> Arrival {
    if !on_tunnel_device(ctx, config) {
        return Arrival::default();
    }
    let ipip_id = if config.flags & node_flags::DSR != 0 {
        weir_common::tunnel_id::DSR
    } else {
        weir_common::tunnel_id::NAT_AT_INGRESS
    };
    let mut key = TunnelKey::default();
    for (flags, family) in [(0u64, FAMILY_V4), (BPF_F_TUNINFO_IPV6 as u64, FAMILY_V6)] {
        // SAFETY: `key` is a stack buffer of TUNNEL_KEY_SIZE bytes the helper fills.
        let ret = unsafe {
            bpf_skb_get_tunnel_key(
                ctx.skb.skb,
                &mut key as *mut TunnelKey as *mut bpf_tunnel_key,
                TUNNEL_KEY_SIZE,
                flags,
            )
        };
        if ret == 0 {
            let peer = if family == FAMILY_V4 {
                Addr::from_v4(key.remote[0].to_be_bytes())
            } else {
                let mut bytes = [0u8; 16];
                for (i, word) in key.remote.iter().enumerate() {
                    bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                }
                Addr::from_v6(bytes)
            };
            let sender = HostAddrKey {
                addr: peer,
                family,
                _pad: [0; 3],
            };
            if TUNNEL_PEERS.get_ptr(&sender).is_none() {
                return Arrival {
                    peer,
                    peer_family: family,
                    id: UNTRUSTED,
                };
            }
            return Arrival {
                peer,
                peer_family: family,
                // A tunnel packet of an unknown kind is treated as translated elsewhere.
                id: if is_ipip(config) {
                    ipip_id
                } else if key.tunnel_id == 0 {
                    weir_common::tunnel_id::NAT_AT_INGRESS
                } else {
                    key.tunnel_id
                },
            };
        }
    }
    Arrival::default()
}

/// The tunnel id a packet following an ENCAP entry carries: DSR traffic is translated at the
/// other end, everything else (replies, and errors about them) was translated here or at the
/// ingress node.
#[inline(always)]
pub fn encap_id(entry: &CtValue) -> u32 {
    if entry.flags & ct_flags::DSR != 0 {
        weir_common::tunnel_id::DSR
    } else {
        weir_common::tunnel_id::NAT_AT_INGRESS
    }
}

/// Sets the outer destination and sends the packet into the tunnel device.
#[inline(never)]
pub fn encap(ctx: &TcContext, peer: &Addr, peer_family: u8, id: u32) -> Result<i32, u32> {
    let config = crate::maps::node_config();
    let failed = counter::DROP_TUNNEL_FAILED;
    if config.tunnel_ifindex == 0 {
        return Err(failed);
    }
    if is_ipip(config) {
        // SAFETY: reading a field of the program's own context.
        let protocol = unsafe { (*ctx.skb.skb).protocol };
        if peer_family != FAMILY_V4 || u16::from_be(protocol as u16) != ETH_P_IP {
            return Err(failed);
        }
    }
    let mut key = TunnelKey {
        tunnel_id: id,
        ttl: TUNNEL_TTL,
        ..TunnelKey::default()
    };
    let flags = if peer_family == FAMILY_V4 {
        key.remote[0] = u32::from_be_bytes(peer.v4_octets());
        0
    } else {
        for i in 0..4 {
            let b = &peer.bytes[i * 4..i * 4 + 4];
            key.remote[i] = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        BPF_F_TUNINFO_IPV6 as u64
    };
    // SAFETY: `key` is a stack buffer of TUNNEL_KEY_SIZE bytes the helper reads.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key as *mut TunnelKey as *mut bpf_tunnel_key,
            TUNNEL_KEY_SIZE,
            flags,
        )
    };
    if ret != 0 {
        return Err(failed);
    }
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect(config.tunnel_ifindex, 0) } as i32)
}

/// The MTU to announce when the packet, once encapsulated towards a peer of `peer_family`,
/// would not fit the underlay and may not be fragmented; 0 when it may go. A segmentation
/// offload packet is judged by the segments the kernel will cut from it.
#[inline(never)]
pub fn exceeded_mtu(ctx: &TcContext, ip: &Ip, peer_family: u8) -> u32 {
    let config = crate::maps::node_config();
    if config.underlay_mtu == 0 {
        return 0;
    }
    let mtu = config
        .underlay_mtu
        .saturating_sub(tunnel_overhead(is_ipip(config), peer_family));
    // SAFETY: reading a field of the program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    let len = if gso_size != 0 {
        let l4_hlen = if ip.proto == PROTO_TCP {
            match load::<u8>(ctx, ip.l4_off + 12) {
                Ok(data_offset) => ((data_offset >> 4) as usize) * 4,
                Err(_) => return 0,
            }
        } else {
            UDP_HLEN
        };
        ip.l4_off - ip.l3() + l4_hlen + gso_size
    } else {
        ctx.len() as usize - ip.l3()
    };
    if len <= mtu as usize {
        return 0;
    }
    // Without DF an IPv4 packet may still go: the encapsulated packet is fragmented instead.
    match ip.may_not_fragment(ctx) {
        Ok(true) => mtu,
        _ => 0,
    }
}

/// The decapsulated frame still carries the sending node's Ethernet addresses, which the IP
/// layer would take for someone else's traffic: claim it for this host.
#[inline(always)]
pub fn accept_inner(ctx: &TcContext) {
    let _ = ctx.change_type(PACKET_HOST);
}

/// A flow the ingress node already translated: remember that its replies must go back through
/// the tunnel to that node, which holds the translation. A call of its own, to keep the entry
/// it builds off the flow path's stack.
#[inline(never)]
pub fn remember_return(key: &CtKey, arrival: &Arrival, seen: u8, now: u64) -> Verdict {
    Verdict::from_result(remember_return_inner(key, arrival, seen, now))
}

#[inline(always)]
fn remember_return_inner(
    key: &CtKey,
    arrival: &Arrival,
    seen: u8,
    now: u64,
) -> Result<Verdict, u32> {
    let reply_key = key.reversed();
    let established = CONNTRACK.get_ptr_mut(&reply_key);
    let found = match established {
        Some(entry) => Some(entry),
        None => CT_NEW.get_ptr_mut(&reply_key),
    };
    if let Some(entry) = found {
        // SAFETY: the pointer comes from a successful lookup; racing updates of these two
        // fields are harmless. Promotion deletes the entry only after its last use here.
        let entry = unsafe { &mut *entry };
        // The entry may be another node's (a return entry) or this node's own translation:
        // the connection moved its ingress (an ECMP router's reshuffle, see `ct::follows`),
        // and its replies keep the way they had, through a node that still holds the flow.
        // The other direction's flags go in the high nibble: user space needs both to tell
        // when the connection closed.
        let client_seen = seen;
        let seen = seen << 4;
        if entry.seen | seen != entry.seen
            || now.wrapping_sub(entry.last_seen_ns) > weir_common::CT_REFRESH_NS
        {
            entry.seen |= seen;
            entry.last_seen_ns = now;
        }
        if established.is_none() && crate::ct::answers_return(entry, key.proto, client_seen) {
            crate::ct::promote(&reply_key);
        }
        return Ok(Verdict::pass(counter::CT_FROM_TUNNEL_HIT));
    }
    let value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        kind: ct_kind::ENCAP,
        seen: seen << 4,
        tunnel_peer: arrival.peer,
        tunnel_family: arrival.peer_family,
        ..CtValue::default()
    };
    if CT_NEW
        .insert(&reply_key, &value, BPF_NOEXIST as u64)
        .is_err()
        && CT_NEW.get_ptr(&reply_key).is_none()
    {
        return Err(counter::DROP_CT_FULL);
    }
    Ok(Verdict::pass(counter::CT_NEW_FROM_TUNNEL))
}
