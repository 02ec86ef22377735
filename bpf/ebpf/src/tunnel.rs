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
    counter, ct_flags, ct_kind, ct_seen, node_flags, tunnel_overhead, Addr, CtKey, CtValue,
    HostAddrKey, MovedArrivalKey, NodeConfig, FAMILY_V4, FAMILY_V6, PROTO_TCP,
};

use crate::maps::{count, CONNTRACK, CT_MOVED_ARRIVALS, CT_NEW, SCRATCH, TUNNEL_PEERS};
use crate::packet::{load, rewrite_port, Ip, Side, ETH_P_IP, UDP_HLEN};
use crate::{Flow, Verdict};

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
/// device always attaches it): a fragment [`tag_replay`] marked is a DSR arrival sent round
/// again (see [`replayed`]); any other is treated as local, as test runs need.
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
    replayed(ctx)
}

/// Marks the packet (before it is cloned for a replay) as a DSR tunnel arrival for [`arrival`]
/// ([`weir_common::REPLAY_MARK`]). Honoured only on the tunnel device and only without
/// metadata, and cleared there: such a packet can only come from a redirect into the device's
/// ingress, which only the replay makes (a pod's packets enter at its own interface, and
/// leaving its namespace clears their mark; a host process's packets to the device leave
/// through it, they do not enter). So no sender can pass for a tunnel peer with it, and the
/// bit never reaches the stack or another user of marks. Returns the mark before, for a packet
/// that goes on after all (`frag::replay` failed) to leave with.
#[inline(always)]
pub fn tag_replay(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | weir_common::REPLAY_MARK);
    mark
}

/// The arrival of a packet on the tunnel device without metadata: a DSR arrival replayed
/// (marked by [`tag_replay`], and the mark cleared), or none. Its peer is not known and not
/// needed: a DSR arrival is translated here and answered straight to the client, and its
/// sender passed the peer check when it first arrived.
#[inline(always)]
fn replayed(ctx: &TcContext) -> Arrival {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & weir_common::REPLAY_MARK == 0 {
        return Arrival::default();
    }
    ctx.set_mark(mark & !weir_common::REPLAY_MARK);
    Arrival {
        id: weir_common::tunnel_id::DSR,
        ..Arrival::default()
    }
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
///
/// The reply key (backend -> client) may be held already, by an entry that does not send
/// replies back to this arrival's node: another ingress node's connection of the same client
/// address and port (a load balancer reuses its source port towards two nodes' NodePorts of
/// Services sharing this backend), or this very connection, whose ingress moved (an ECMP
/// router's reshuffle, the `maglev` scenario). This node cannot tell the two apart from the
/// tuple; the TCP flags can:
/// - a SYN without ACK opens a connection (a SYN retried through another node during a move
///   simply becomes a fresh one), and a UDP datagram may always take another port, since its
///   replies then go to the node it came through: the flow's client port, as the backend sees
///   it, moves (as `ct::claim_reply_key` moves it at an ingress node), its return entry is kept
///   under the moved reply key with the client's own port, and the move is recorded by client
///   tuple and ingress node ([`CT_MOVED_ARRIVALS`]) for the connection's later packets;
/// - any other TCP segment belongs to an open connection: unless that node's connection was
///   moved, it follows the holder, so a connection whose ingress moved keeps its backend and
///   its way back.
///
/// Misrouting is so excluded for every connection opened through two nodes; the one left is a
/// connection that opened through one node and continues through another while a second one
/// of its tuple runs (both ingress changes and a reused port at once). The moves map is read
/// only when the holder does not send back to the arrival's node, or when there is no holder
/// (a new flow, or a moved one that outlived the flow it collided with): an established flow's
/// packets pay nothing for it.
#[inline(never)]
pub fn remember_return(ctx: &TcContext, ip: &Ip, flow: &Flow, arrival: &Arrival) -> Verdict {
    Verdict::from_result(remember_return_inner(ctx, ip, flow, arrival))
}

#[inline(always)]
fn remember_return_inner(
    ctx: &TcContext,
    ip: &Ip,
    flow: &Flow,
    arrival: &Arrival,
) -> Result<Verdict, u32> {
    let (key, seen, now) = (&flow.key, flow.seen, flow.now);
    // The entry is built in the per-CPU scratch slot's new-flow entry, off the stack (old
    // verifiers count the call chain's frames whole): a tunnel arrival makes no new flow of
    // its own. `arrive_moved` writes that entry only when it answers for the packet, and then
    // nothing here reads it again.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(counter::DROP_CT_FULL);
    };
    // SAFETY: the per-CPU slot of this run (see `process`); the reference ends before
    // `arrive_moved` takes its own.
    let reply_key = unsafe { &mut (*scratch).new.key };
    *reply_key = key.reversed();
    let reply_key: &CtKey = reply_key;
    let established = CONNTRACK.get_ptr_mut(reply_key);
    let found = match established {
        Some(entry) => Some(entry),
        None => CT_NEW.get_ptr_mut(reply_key),
    };
    // SAFETY: the pointer comes from a successful lookup; only read here.
    let holder = found.map(|entry| returns_to(unsafe { &*entry }, arrival, 0));
    // One call site: the verifier walks an inlined body once per site. Without a holder, a
    // moved flow keeps its port when the flow it collided with is gone.
    if holder != Some(true) {
        let moved = arrive_moved(ctx, ip, flow, arrival, holder.is_some());
        if moved.counter() != NOT_MOVED {
            return Ok(moved);
        }
    }
    if let Some(entry) = found {
        // SAFETY: the pointer comes from a successful lookup; racing updates of these two
        // fields are harmless. Promotion deletes the entry only after its last use here.
        let entry = unsafe { &mut *entry };
        // SAFETY: as above; `arrive_moved` left the slot alone.
        let reply_key = unsafe { &(*scratch).new.key };
        touch_return(entry, reply_key, established.is_none(), seen, now);
        return Ok(Verdict::pass(counter::CT_FROM_TUNNEL_HIT));
    }
    // SAFETY: as above.
    let new = unsafe { &mut (*scratch).new };
    new.value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        kind: ct_kind::ENCAP,
        seen: seen << 4,
        tunnel_peer: arrival.peer,
        tunnel_family: arrival.peer_family,
        ..CtValue::default()
    };
    if CT_NEW
        .insert(&new.key, &new.value, BPF_NOEXIST as u64)
        .is_err()
        && CT_NEW.get_ptr(&new.key).is_none()
    {
        return Err(counter::DROP_CT_FULL);
    }
    Ok(Verdict::pass(counter::CT_NEW_FROM_TUNNEL))
}

/// Not an outcome: [`arrive_moved`] left the packet alone, the caller goes on.
const NOT_MOVED: u32 = u32::MAX;

/// Whether `entry`, found under a reply key, sends replies back to the arrival's node with the
/// client port `client_port_be` restored (0: the port was not moved).
#[inline(always)]
fn returns_to(entry: &CtValue, arrival: &Arrival, client_port_be: u16) -> bool {
    (entry.kind == ct_kind::ENCAP)
        & (entry.tunnel_family == arrival.peer_family)
        & (entry.client_port_be == client_port_be)
        & (entry.tunnel_peer == arrival.peer)
}

/// A client's packet through the tunnel refreshes the return entry it matched (under the
/// reply's key, `in_new_table` when found in the new-flow table), and may promote it.
#[inline(always)]
fn touch_return(entry: &mut CtValue, reply_key: &CtKey, in_new_table: bool, seen: u8, now: u64) {
    // The other direction's flags go in the high nibble: user space needs both to tell when
    // the connection closed.
    let client_seen = seen;
    let seen = seen << 4;
    if entry.seen | seen != entry.seen
        || now.wrapping_sub(entry.last_seen_ns) > weir_common::CT_REFRESH_NS
    {
        entry.seen |= seen;
        entry.last_seen_ns = now;
    }
    if in_new_table && crate::ct::answers_return(entry, reply_key.proto, client_seen) {
        crate::ct::promote(reply_key);
    }
}

/// Moves the arrival's client port, as the backend sees it, when its node's flow was moved
/// before, or (`may_move`) when it opens a flow whose reply key another flow holds; see
/// [`remember_return`]. Returns a verdict counted [`NOT_MOVED`] when the packet keeps its port,
/// and then has not touched the scratch slot. The new-flow scratch entry (unused on the tunnel
/// arrival path) holds the moved return entry, off the stack. Inlined: as a frame of its own it
/// took the call chain (entry, `flow`, `remember_return`, this, `promote`) past the 512 bytes
/// old verifiers allow.
#[inline(always)]
fn arrive_moved(
    ctx: &TcContext,
    ip: &Ip,
    flow: &Flow,
    arrival: &Arrival,
    may_move: bool,
) -> Verdict {
    Verdict::from_result(arrive_moved_inner(ctx, ip, flow, arrival, may_move))
}

#[inline(always)]
fn arrive_moved_inner(
    ctx: &TcContext,
    ip: &Ip,
    flow: &Flow,
    arrival: &Arrival,
    may_move: bool,
) -> Result<Verdict, u32> {
    let (key, seen, now) = (&flow.key, flow.seen, flow.now);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(counter::DROP_CT_FULL);
    };
    // SAFETY: the per-CPU slot of this run (see `process`); nothing else on the tunnel arrival
    // path uses this field.
    let moves = unsafe { &mut (*scratch).moves };
    *moves = MovedArrivalKey {
        flow: *key,
        peer: arrival.peer,
        peer_family: arrival.peer_family,
        _pad: [0; 3],
    };
    let moves: &MovedArrivalKey = moves;
    // SAFETY: copied out at once; a racing writer stores the same port (a function of the key).
    let recorded = CT_MOVED_ARRIVALS
        .get_ptr(moves)
        .map(|port| unsafe { *port });
    let opens = key.proto != PROTO_TCP || seen & (ct_seen::SYN | ct_seen::ACK) == ct_seen::SYN;
    let port_be = match recorded {
        Some(port_be) => port_be,
        None if may_move && opens => moved_port_be(moves),
        None => return Ok(Verdict::pass(NOT_MOVED)),
    };
    // SAFETY: as above; a tunnel arrival makes no new flow of its own, and `remember_return`
    // holds no reference into its new-flow entry across this call.
    let new = unsafe { &mut (*scratch).new };
    new.key = moves.moved_reply_key(port_be);
    new.value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        kind: ct_kind::ENCAP,
        seen: seen << 4,
        tunnel_peer: arrival.peer,
        tunnel_family: arrival.peer_family,
        client_port_be: key.sport_be,
        ..CtValue::default()
    };
    let established = CONNTRACK.get_ptr_mut(&new.key);
    let found = match established {
        Some(entry) => Some(entry),
        None => CT_NEW.get_ptr_mut(&new.key),
    };
    let outcome = if let Some(entry) = found {
        // SAFETY: as in `remember_return`.
        let entry = unsafe { &mut *entry };
        // The moved port is some other flow's: dropped rather than misrouted.
        if !returns_to(entry, arrival, key.sport_be) {
            return Err(counter::DROP_CT_COLLISION);
        }
        touch_return(entry, &new.key, established.is_none(), seen, now);
        counter::CT_FROM_TUNNEL_HIT
    } else {
        if CT_NEW
            .insert(&new.key, &new.value, BPF_NOEXIST as u64)
            .is_err()
        {
            // Another CPU's packet of the same flow made it, or another flow took the port.
            match CT_NEW.get_ptr(&new.key) {
                // SAFETY: as above; only read.
                Some(entry) if returns_to(unsafe { &*entry }, arrival, key.sport_be) => {}
                Some(_) => return Err(counter::DROP_CT_COLLISION),
                None => return Err(counter::DROP_CT_FULL),
            }
        }
        counter::CT_NEW_FROM_TUNNEL
    };
    if recorded.is_none() {
        // A lost race stored the same port: fine. Evicted, the connection's later packets
        // follow the holder (a TCP segment without SYN): sized so that only a flood of
        // colliding flows evicts.
        if CT_MOVED_ARRIVALS.insert(moves, &port_be, 0).is_err() {
            return Err(counter::DROP_CT_FULL);
        }
        count(counter::CT_COLLISION_RESOLVED);
    }
    rewrite_port(ctx, ip, Side::Source, port_be)?;
    Ok(Verdict::pass(outcome))
}

/// The port a flow arriving from `moves.peer` moves to: a function of the flow and of the
/// ingress node, so that CPUs racing its first packets meet at one entry, and flows of one
/// client tuple through several ingress nodes move to different ports. Inlined: a frame of its
/// own would be the fifth of the call chain.
#[inline(always)]
fn moved_port_be(moves: &MovedArrivalKey) -> u16 {
    let word = |i: usize| {
        let b = &moves.peer.bytes[i * 4..i * 4 + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    };
    let peer = word(0) ^ word(1) ^ word(2) ^ word(3);
    // Never 0: the ingress node's own claim tries the port it was given at 0.
    let attempt = (peer ^ (peer >> 16)) | 1;
    weir_common::collision::moved_port_be(&moves.flow, attempt)
}
