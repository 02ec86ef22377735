//! ICMP: errors about translated flows are translated back; services without endpoints answer
//! with "port unreachable" instead of swallowing packets (or, to a segment of a connection that
//! lost its last endpoint, with a TCP reset), and packets too big for the tunnel with
//! "fragmentation needed" / "packet too big" from the address the client used.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_PSEUDO_HDR},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use weir_common::{counter, ct_flags, ct_kind, Addr, CtKey, FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::packet::{
    addr_offsets, csum_add_bytes, csum_diff, csum_fold, load, store, Ip, Ipv4Header, Ipv6Header,
    IPV4_MIN_HLEN, IPV6_FRAGMENT_HLEN, IPV6_HLEN, IP_OFF, TCP_CSUM, TCP_MIN_HLEN, UDP_CSUM,
};
use crate::{Verdict, ACTION_ICMP_ROUTE, ACTION_ICMP_TUNNEL};

const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;
/// An ICMP error quotes the offending packet's IP header and at least 8 bytes of its payload:
/// enough for both ports of TCP and UDP.
const ICMP_QUOTED_L4: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// The quoted packet inside an ICMP error.
struct Quote {
    ip_off: usize,
    l4_off: usize,
    proto: u8,
    saddr: Addr,
    daddr: Addr,
    sport_be: u16,
    dport_be: u16,
}

#[inline(always)]
fn quote(ctx: &TcContext, ip: &Ip) -> Result<Option<Quote>, u32> {
    let ip_off = ip.l4_off + ICMP_HLEN;
    let (proto, saddr, daddr, l4_off) = if ip.family == FAMILY_V4 {
        if ip.payload_len < ICMP_HLEN + IPV4_MIN_HLEN + ICMP_QUOTED_L4 {
            return Ok(None);
        }
        let inner: Ipv4Header = load(ctx, ip_off)?;
        let ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
        if inner.version_ihl >> 4 != 4
            || ihl < IPV4_MIN_HLEN
            || ip.payload_len < ICMP_HLEN + ihl + ICMP_QUOTED_L4
        {
            return Ok(None);
        }
        let (s, d) = (Addr::from_v4(inner.saddr), Addr::from_v4(inner.daddr));
        (inner.proto, s, d, ip_off + ihl)
    } else {
        if ip.payload_len < ICMP_HLEN + IPV6_HLEN + ICMP_QUOTED_L4 {
            return Ok(None);
        }
        let inner: Ipv6Header = load(ctx, ip_off)?;
        if inner.version_class_flow[0] >> 4 != 6 {
            return Ok(None);
        }
        let (s, d) = (Addr::from_v6(inner.saddr), Addr::from_v6(inner.daddr));
        (inner.next_header, s, d, ip_off + IPV6_HLEN)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let [sport_be, dport_be]: [u16; 2] = load(ctx, l4_off)?;
    Ok(Some(Quote {
        ip_off,
        l4_off,
        proto,
        saddr,
        daddr,
        sport_be,
        dport_be,
    }))
}

/// Whether the ICMP packet is an error quoting a TCP or UDP packet; if so, `key` is the quoted
/// packet's tuple (the flow the error is about, in the direction it was sent).
#[inline(always)]
pub fn quoted_flow(ctx: &TcContext, ip: &Ip, key: &mut CtKey) -> bool {
    if ip.payload_len < ICMP_HLEN {
        return false;
    }
    let Ok(icmp_type) = load::<u8>(ctx, ip.l4_off) else {
        return false;
    };
    if !is_error(ip.family, icmp_type) {
        return false;
    }
    let Ok(Some(q)) = quote(ctx, ip) else {
        return false;
    };
    *key = CtKey {
        saddr: q.saddr,
        daddr: q.daddr,
        sport_be: q.sport_be,
        dport_be: q.dport_be,
        proto: q.proto,
        family: ip.family,
        _pad: 0,
    };
    true
}

#[inline(always)]
fn is_error(family: u8, icmp_type: u8) -> bool {
    if family == FAMILY_V4 {
        matches!(
            icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
    } else {
        matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
        )
    }
}

/// ICMP errors about a translated flow quote the packet as the other side sent it: translate
/// the quote and the outer header back, as the conntrack entry of the error's own direction
/// says, so that (for example) a client's "fragmentation needed" or "packet too big" names the
/// service, not the backend. Everything else ICMP passes untouched.
#[inline(never)]
pub fn icmp_error(ctx: &TcContext, ip: &Ip) -> Verdict {
    Verdict::from_result(icmp_error_inner(ctx, ip))
}

#[inline(always)]
fn icmp_error_inner(ctx: &TcContext, ip: &Ip) -> Result<Verdict, u32> {
    if ip.payload_len < ICMP_HLEN {
        return Err(counter::DROP_TRUNCATED);
    }
    let icmp_type: u8 = load(ctx, ip.l4_off)?;
    if !is_error(ip.family, icmp_type) {
        return Ok(Verdict::pass(counter::PASS_ICMP_UNRELATED));
    }
    let q = match quote(ctx, ip)? {
        Some(q) => q,
        None => return Ok(Verdict::pass(counter::PASS_ICMP_UNRELATED)),
    };
    // The error travels against the quoted packet: look up the error's own direction.
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport_be: q.dport_be,
        dport_be: q.sport_be,
        proto: q.proto,
        family: ip.family,
        _pad: 0,
    };
    let Some(entry) = crate::ct::lookup(&key) else {
        return Ok(Verdict::pass(counter::PASS_ICMP_UNRELATED));
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this run.
    let entry = unsafe { &*entry };
    // The flow is translated on another node (this one only carries it through the tunnel):
    // so is the error, unchanged. Routed from here it would reach the client naming the
    // backend, or the backend naming the frontend, and match no socket.
    if entry.kind == ct_kind::ENCAP {
        // A return entry of a flow whose client port this (the backend's) node moved: the
        // quote, sent to the backend, names the moved port as its source; the ingress node
        // knows the client's own (see `tunnel::remember_return`).
        if entry.client_port_be != 0 {
            let port = quoted_port(ctx, ip, &q, q.l4_off, entry.client_port_be)?;
            restore_quoted_port(ctx, &port)?;
        }
        return Ok(Verdict::send_as_entry(entry, ACTION_ICMP_TUNNEL));
    }
    let (q_saddr_off, q_daddr_off) = addr_offsets(q.ip_off, ip.family);
    let (outer_saddr_off, outer_daddr_off) = addr_offsets(ip.l3(), ip.family);
    // A reverse entry means the quote was sent to the backend: name the frontend instead. A
    // forward entry means the quote came from the frontend: name the backend.
    let (q_addr_off, q_port_off, old_addr, old_port, outer_off, outer_old) =
        if entry.kind == ct_kind::REVERSE {
            (
                q_daddr_off,
                q.l4_off + 2,
                q.daddr,
                q.dport_be,
                outer_saddr_off,
                ip.saddr,
            )
        } else {
            (
                q_saddr_off,
                q.l4_off,
                q.saddr,
                q.sport_be,
                outer_daddr_off,
                ip.daddr,
            )
        };
    let new_addr = entry.nat_addr;
    let new_port = entry.nat_port_be;
    let failed = counter::DROP_REWRITE_FAILED;
    let icmp_csum = ip.l4_off + ICMP_CSUM;
    let q_csum_rel = if q.proto == PROTO_TCP {
        TCP_CSUM
    } else {
        UDP_CSUM
    };
    let q_csum = q.l4_off + q_csum_rel;
    let quoted_csum = ip.payload_len >= q_csum - ip.l4_off + 2;

    if ip.family == FAMILY_V4 {
        let (old, new) = (
            u32::from_ne_bytes(old_addr.v4_octets()),
            u32::from_ne_bytes(new_addr.v4_octets()),
        );
        // The quoted header's own checksum moves by exactly the opposite of its address, so
        // the ICMP checksum need not follow the address.
        ctx.l3_csum_replace(q.ip_off + 10, old as u64, new as u64, 4)
            .map_err(|_| failed)?;
        store(ctx, q_addr_off, &new)?;
        // The quoted L4 checksum covers the pseudo header and the port: restore it when the
        // quote reaches it, and carry its change into the ICMP checksum.
        if quoted_csum {
            let old_csum: u16 = load(ctx, q_csum)?;
            if q.proto == PROTO_TCP || old_csum != 0 {
                ctx.l4_csum_replace(q_csum, old as u64, new as u64, 4)
                    .map_err(|_| failed)?;
                ctx.l4_csum_replace(q_csum, old_port as u64, new_port as u64, 2)
                    .map_err(|_| failed)?;
                let new_csum: u16 = load(ctx, q_csum)?;
                ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
                    .map_err(|_| failed)?;
            }
        }
        ctx.l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
            .map_err(|_| failed)?;
        store(ctx, q_port_off, &new_port)?;
        // The outer address is the flow's own only when the error came from the endpoint
        // itself, not from a router on the way.
        if outer_old == old_addr {
            ctx.l3_csum_replace(ip.csum_off(), old as u64, new as u64, 4)
                .map_err(|_| failed)?;
            store(ctx, outer_off, &new)?;
        }
    } else {
        // IPv6 has no header checksum: the ICMPv6 checksum covers the quote byte for byte, and
        // the outer addresses through its pseudo header.
        let diff = csum_diff(&old_addr.bytes, &new_addr.bytes, 0)?;
        store(ctx, q_addr_off, &new_addr.bytes)?;
        ctx.l4_csum_replace(icmp_csum, 0, diff as u64, 0)
            .map_err(|_| failed)?;
        if quoted_csum {
            let old_csum: u16 = load(ctx, q_csum)?;
            ctx.l4_csum_replace(q_csum, 0, diff as u64, 0)
                .map_err(|_| failed)?;
            ctx.l4_csum_replace(q_csum, old_port as u64, new_port as u64, 2)
                .map_err(|_| failed)?;
            let new_csum: u16 = load(ctx, q_csum)?;
            ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
                .map_err(|_| failed)?;
        }
        ctx.l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
            .map_err(|_| failed)?;
        store(ctx, q_port_off, &new_port)?;
        if outer_old == old_addr {
            ctx.l4_csum_replace(icmp_csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
                .map_err(|_| failed)?;
            store(ctx, outer_off, &new_addr.bytes)?;
        }
    }
    // A tuple collision moved the client's port as the backend sees it: the quote's client
    // port (its source when the quote went to the backend, else its destination) is the
    // client's own again, or the client's stack would not know the flow.
    if entry.client_port_be != 0 {
        let client_port_off = if entry.kind == ct_kind::REVERSE {
            q.l4_off
        } else {
            q.l4_off + 2
        };
        let port = quoted_port(ctx, ip, &q, client_port_off, entry.client_port_be)?;
        restore_quoted_port(ctx, &port)?;
    }
    // A backend's own error about a NodePort flow now comes from one of this node's addresses,
    // which the input path drops as a martian: route it here, as the flow's replies are.
    if entry.kind == ct_kind::REVERSE
        && entry.flags & ct_flags::HOST_FRONTEND != 0
        && outer_old == old_addr
    {
        return Ok(Verdict::send_as_entry(entry, ACTION_ICMP_ROUTE));
    }
    Ok(Verdict::pass(counter::ICMP_ERROR_NAT))
}

/// A port to rewrite in an ICMP error's quote: BPF calls take five arguments at most, counting
/// the hidden one a `Result` returns through.
#[derive(Clone, Copy)]
struct QuotedPort {
    /// Offset of the ICMP checksum, which covers the quote byte for byte.
    icmp_csum: usize,
    /// Offset of the quote's L4 checksum; 0 when the quote has none or does not reach it.
    q_csum: usize,
    port_off: usize,
    new_port_be: u16,
}

/// The quote's port at `port_off` to become `new_port_be`, with the checksums that follow it.
#[inline(always)]
fn quoted_port(
    ctx: &TcContext,
    ip: &Ip,
    q: &Quote,
    port_off: usize,
    new_port_be: u16,
) -> Result<QuotedPort, u32> {
    let q_csum = q.l4_off
        + if q.proto == PROTO_TCP {
            TCP_CSUM
        } else {
            UDP_CSUM
        };
    let quoted_csum = ip.payload_len >= q_csum - ip.l4_off + 2;
    // A UDP checksum of zero over IPv4 is none, and stays so.
    let fix_quoted_csum = quoted_csum
        && (q.proto == PROTO_TCP || ip.family != FAMILY_V4 || load::<u16>(ctx, q_csum)? != 0);
    Ok(QuotedPort {
        icmp_csum: ip.l4_off + ICMP_CSUM,
        q_csum: if fix_quoted_csum { q_csum } else { 0 },
        port_off,
        new_port_be,
    })
}

/// Writes the port in the quote, and follows it in both checksums.
#[inline(never)]
fn restore_quoted_port(ctx: &TcContext, port: &QuotedPort) -> Result<(), u32> {
    let QuotedPort {
        icmp_csum,
        q_csum,
        port_off,
        new_port_be,
    } = *port;
    let failed = counter::DROP_REWRITE_FAILED;
    let old_port_be: u16 = load(ctx, port_off)?;
    if q_csum != 0 {
        let old_csum: u16 = load(ctx, q_csum)?;
        ctx.l4_csum_replace(q_csum, old_port_be as u64, new_port_be as u64, 2)
            .map_err(|_| failed)?;
        let new_csum: u16 = load(ctx, q_csum)?;
        ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
            .map_err(|_| failed)?;
    }
    ctx.l4_csum_replace(icmp_csum, old_port_be as u64, new_port_be as u64, 2)
        .map_err(|_| failed)?;
    store(ctx, port_off, &new_port_be)
}

/// What an ICMP answer says: type and code, and the header's second word (the next-hop MTU of
/// "fragmentation needed" and "packet too big", zero otherwise) as it goes on the wire.
pub struct Answer {
    kind: [u8; 2],
    rest: [u8; 4],
}

impl Answer {
    /// A service without endpoints, as kube-proxy's REJECT answers: a TCP client sees
    /// "connection refused" at once.
    #[inline(always)]
    pub fn port_unreachable(family: u8) -> Answer {
        Answer {
            kind: if family == FAMILY_V4 {
                [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]
            } else {
                [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH]
            },
            rest: [0; 4],
        }
    }

    /// The packet does not fit the path (the tunnel) and may not be fragmented.
    #[inline(always)]
    pub fn too_big(family: u8, mtu: u32) -> Answer {
        if family == FAMILY_V4 {
            let mtu = (mtu as u16).to_be_bytes();
            Answer {
                kind: [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED],
                rest: [0, 0, mtu[0], mtu[1]],
            }
        } else {
            Answer {
                kind: [ICMPV6_PKT_TOOBIG, 0],
                rest: mtu.to_be_bytes(),
            }
        }
    }
}

/// Turns the packet into the ICMP error `answer`, from the address the client sent it to back
/// to the client, and sends it out of the interface it came in on.
#[inline(always)]
pub fn answer(ctx: &TcContext, ip: &Ip, answer: &Answer) -> Result<i32, u32> {
    // Only Ethernet interfaces can take the answer straight back: a packet on the IPIP device
    // came from another node, which has no use for it.
    if ip.l3() != IP_OFF {
        return Err(counter::DROP_REJECT_FAILED);
    }
    match (ip.family == FAMILY_V4, ip.proto == PROTO_TCP) {
        (true, true) => answer_v4::<V4_QUOTE_TCP, { ICMP_HLEN + V4_QUOTE_TCP }>(ctx, ip, answer),
        (true, false) => answer_v4::<V4_QUOTE_UDP, { ICMP_HLEN + V4_QUOTE_UDP }>(ctx, ip, answer),
        // As for IPv4 options: a quote cut inside extension headers would name no socket.
        (false, true) if ip.l4_off == IP_OFF + IPV6_HLEN => {
            answer_v6::<V6_QUOTE_TCP, { ICMP_HLEN + V6_QUOTE_TCP }>(ctx, ip, answer)
        }
        (false, false) if ip.l4_off == IP_OFF + IPV6_HLEN => {
            answer_v6::<V6_QUOTE_UDP, { ICMP_HLEN + V6_QUOTE_UDP }>(ctx, ip, answer)
        }
        // The first fragment of a datagram too big for the tunnel: its fragment header quoted
        // too, so that the "packet too big" still names the socket and the sender learns.
        (false, false) if ip.l4_off == IP_OFF + IPV6_HLEN + IPV6_FRAGMENT_HLEN => {
            answer_v6::<V6_QUOTE_UDP_FRAGMENT, { ICMP_HLEN + V6_QUOTE_UDP_FRAGMENT }>(
                ctx, ip, answer,
            )
        }
        (false, _) => Err(counter::DROP_REJECT_FAILED),
    }
}

/// L4 bytes an answer quotes: the 8 RFC 792 asks for, but TCP's whole fixed header. A
/// segment a pod has just sent can still be CHECKSUM_PARTIAL, and the kernel refuses to trim a
/// packet short of the checksum field it has yet to fill (pskb_trim_rcsum), which sits 16
/// bytes into the TCP header.
const REJECT_QUOTED_UDP: usize = ICMP_QUOTED_L4;
const REJECT_QUOTED_TCP: usize = TCP_MIN_HLEN;
const V4_QUOTE_UDP: usize = IPV4_MIN_HLEN + REJECT_QUOTED_UDP;
const V4_QUOTE_TCP: usize = IPV4_MIN_HLEN + REJECT_QUOTED_TCP;
const V6_QUOTE_UDP: usize = IPV6_HLEN + REJECT_QUOTED_UDP;
const V6_QUOTE_TCP: usize = IPV6_HLEN + REJECT_QUOTED_TCP;
const V6_QUOTE_UDP_FRAGMENT: usize = IPV6_HLEN + IPV6_FRAGMENT_HLEN + REJECT_QUOTED_UDP;

/// `QUOTE` bytes of the original packet from its IP header on; `MSG` = ICMP header + quote.
#[inline(never)]
fn answer_v4<const QUOTE: usize, const MSG: usize>(
    ctx: &TcContext,
    ip: &Ip,
    answer: &Answer,
) -> Result<i32, u32> {
    let failed = counter::DROP_REJECT_FAILED;
    // Quoting options would need a variable-length copy; such clients get a plain drop.
    if ip.l4_off != IP_OFF + IPV4_MIN_HLEN {
        return Err(failed);
    }
    let quoted: [u8; QUOTE] = load(ctx, IP_OFF)?;
    let mut msg = [0u8; MSG];
    msg[..2].copy_from_slice(&answer.kind);
    msg[4..ICMP_HLEN].copy_from_slice(&answer.rest);
    msg[ICMP_HLEN..].copy_from_slice(&quoted);
    let csum = csum_fold(csum_add_bytes(&msg, 0)?);
    msg[2..4].copy_from_slice(&csum.to_ne_bytes());

    let mut header = [0u8; IPV4_MIN_HLEN];
    let total_len = (IPV4_MIN_HLEN + MSG) as u16;
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total_len.to_be_bytes());
    header[8] = 64;
    header[9] = weir_common::PROTO_ICMP;
    header[12..16].copy_from_slice(&ip.daddr.v4_octets());
    header[16..20].copy_from_slice(&ip.saddr.v4_octets());
    let csum = csum_fold(csum_add_bytes(&header, 0)?);
    header[10..12].copy_from_slice(&csum.to_ne_bytes());

    // Room for the new IP and ICMP headers in front of the old IP header, which becomes the
    // quote; then cut the packet after the quoted bytes of L4.
    let grow = (IPV4_MIN_HLEN + ICMP_HLEN) as i32;
    ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| failed)?;
    resize(ctx, IP_OFF + IPV4_MIN_HLEN + MSG)?;
    store(ctx, IP_OFF, &header).map_err(|_| failed)?;
    store(ctx, IP_OFF + IPV4_MIN_HLEN, &msg).map_err(|_| failed)?;
    send_back(ctx)
}

#[inline(never)]
fn answer_v6<const QUOTE: usize, const MSG: usize>(
    ctx: &TcContext,
    ip: &Ip,
    answer: &Answer,
) -> Result<i32, u32> {
    let failed = counter::DROP_REJECT_FAILED;
    let quoted: [u8; QUOTE] = load(ctx, IP_OFF)?;
    let mut msg = [0u8; MSG];
    msg[..2].copy_from_slice(&answer.kind);
    msg[4..ICMP_HLEN].copy_from_slice(&answer.rest);
    msg[ICMP_HLEN..].copy_from_slice(&quoted);
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&ip.daddr.bytes);
    pseudo[16..32].copy_from_slice(&ip.saddr.bytes);
    pseudo[32..36].copy_from_slice(&(MSG as u32).to_be_bytes());
    pseudo[39] = weir_common::PROTO_ICMPV6;
    let sum = csum_add_bytes(&pseudo, 0)?;
    let csum = csum_fold(csum_add_bytes(&msg, sum)?);
    msg[2..4].copy_from_slice(&csum.to_ne_bytes());

    let mut header = [0u8; IPV6_HLEN];
    header[0] = 0x60;
    header[4..6].copy_from_slice(&(MSG as u16).to_be_bytes());
    header[6] = weir_common::PROTO_ICMPV6;
    header[7] = 64;
    header[8..24].copy_from_slice(&ip.daddr.bytes);
    header[24..40].copy_from_slice(&ip.saddr.bytes);

    let grow = (IPV6_HLEN + ICMP_HLEN) as i32;
    ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| failed)?;
    resize(ctx, IP_OFF + IPV6_HLEN + MSG)?;
    store(ctx, IP_OFF, &header).map_err(|_| failed)?;
    store(ctx, IP_OFF + IPV6_HLEN, &msg).map_err(|_| failed)?;
    send_back(ctx)
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), u32> {
    // SAFETY: the context pointer is the program's own skb; the helper validates the length.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret < 0 {
        Err(counter::DROP_REJECT_FAILED)
    } else {
        Ok(())
    }
}

/// Out of the interface the packet came in on, Ethernet addresses swapped.
#[inline(always)]
fn send_back(ctx: &TcContext) -> Result<i32, u32> {
    crate::packet::swap_macs(ctx).map_err(|_| counter::DROP_REJECT_FAILED)?;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper taking plain integers.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Whether a TCP segment to a frontend without endpoints (and of no flow Weir knows) is answered
/// with a reset from the frontend rather than ICMP "port unreachable":
/// - a SYN: a reset (with ACK) refuses the connection as a closed port does. ICMP refuses it
///   too, but the lab measured an IPv6 pod's connect refused only after its SYN's retransmission
///   (1 s; IPv4 at once), and a reset in 7 ms. The likely cause: Linux takes an ICMP error for a
///   socket whose owner holds its lock as a soft error, and a connecting socket's owner does
///   while a pod's SYN crosses veth and is answered within the sender's own softirq; a reset is
///   queued to the socket's backlog instead and handled when the lock is released.
/// - a segment with ACK: its connection was ended (its last endpoint went, or the agent ended
///   its flow); the reset's sequence number is the segment's acknowledgement (what the client
///   expects next, so it is accepted at once): an ICMP error would be a soft error an
///   established connection ignores until its own timeout.
/// Never a reset for a reset, nor for a SYN-ACK (not a client's segment).
#[inline(always)]
pub fn resets(ctx: &TcContext, ip: &Ip) -> bool {
    ip.proto == PROTO_TCP
        && ip.l3() == IP_OFF
        && load::<u8>(ctx, ip.l4_off + 13).is_ok_and(|flags| {
            flags & TCP_RST == 0 && matches!(flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK_ONLY)
        })
}

/// A TCP reset to a frontend without endpoints: answered with nothing at all (RFC 9293), as a
/// closed port's host does.
#[inline(always)]
pub fn is_reset(ctx: &TcContext, ip: &Ip) -> bool {
    ip.proto == PROTO_TCP && load::<u8>(ctx, ip.l4_off + 13).is_ok_and(|f| f & TCP_RST != 0)
}

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// A pattern for `flags & (SYN | ACK)`: ACK without SYN.
const TCP_ACK_ONLY: u8 = TCP_ACK;

/// Turns the packet into that reset (see [`resets`]) and sends it back out of the interface.
/// Counted as a refusal (`reject_no_backend`) for a SYN, as an ended connection
/// (`reset_no_backend`) otherwise.
#[inline(never)]
pub fn reset(ctx: &TcContext, ip: &Ip) -> Result<Verdict, u32> {
    let failed = counter::DROP_REJECT_FAILED;
    let ip_len = if ip.family == FAMILY_V4 {
        IPV4_MIN_HLEN
    } else {
        IPV6_HLEN
    };
    // As for ICMP answers: no IP options or extension headers to carry over.
    if ip.l4_off != IP_OFF + ip_len {
        return Err(failed);
    }
    let incoming: [u8; TCP_MIN_HLEN] = load(ctx, ip.l4_off)?;
    let outcome = if incoming[13] & TCP_SYN != 0 {
        counter::REJECT_NO_BACKEND
    } else {
        counter::RESET_NO_BACKEND
    };
    let mut tcp = [0u8; TCP_MIN_HLEN];
    tcp[0..2].copy_from_slice(&incoming[2..4]);
    tcp[2..4].copy_from_slice(&incoming[0..2]);
    if incoming[13] & TCP_SYN != 0 {
        // RST with ACK, sequence 0, acknowledging the SYN and any data it carried (RFC 9293).
        let seq = u32::from_be_bytes([incoming[4], incoming[5], incoming[6], incoming[7]]);
        let data_len = (ip.payload_len as u32).saturating_sub(u32::from(incoming[12] >> 4) * 4);
        let ack = seq.wrapping_add(1).wrapping_add(data_len);
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[13] = TCP_RST | TCP_ACK;
    } else {
        // RST, sequence number the segment's acknowledgement.
        tcp[4..8].copy_from_slice(&incoming[8..12]);
        tcp[13] = TCP_RST;
    }
    tcp[12] = (TCP_MIN_HLEN as u8 / 4) << 4;
    let sum = if ip.family == FAMILY_V4 {
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&ip.daddr.v4_octets());
        pseudo[4..8].copy_from_slice(&ip.saddr.v4_octets());
        pseudo[9] = PROTO_TCP;
        pseudo[10..12].copy_from_slice(&(TCP_MIN_HLEN as u16).to_be_bytes());
        csum_add_bytes(&pseudo, 0)?
    } else {
        let mut pseudo = [0u8; 40];
        pseudo[..16].copy_from_slice(&ip.daddr.bytes);
        pseudo[16..32].copy_from_slice(&ip.saddr.bytes);
        pseudo[32..36].copy_from_slice(&(TCP_MIN_HLEN as u32).to_be_bytes());
        pseudo[39] = PROTO_TCP;
        csum_add_bytes(&pseudo, 0)?
    };
    let csum = csum_fold(csum_add_bytes(&tcp, sum)?);
    tcp[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&csum.to_ne_bytes());

    resize(ctx, IP_OFF + ip_len + TCP_MIN_HLEN)?;
    if ip.family == FAMILY_V4 {
        let mut header = [0u8; IPV4_MIN_HLEN];
        header[0] = 0x45;
        header[2..4].copy_from_slice(&((IPV4_MIN_HLEN + TCP_MIN_HLEN) as u16).to_be_bytes());
        header[6] = 0x40; // DF, as Linux's own resets
        header[8] = 64;
        header[9] = PROTO_TCP;
        header[12..16].copy_from_slice(&ip.daddr.v4_octets());
        header[16..20].copy_from_slice(&ip.saddr.v4_octets());
        let csum = csum_fold(csum_add_bytes(&header, 0)?);
        header[10..12].copy_from_slice(&csum.to_ne_bytes());
        store(ctx, IP_OFF, &header).map_err(|_| failed)?;
    } else {
        let mut header = [0u8; IPV6_HLEN];
        header[0] = 0x60;
        header[4..6].copy_from_slice(&(TCP_MIN_HLEN as u16).to_be_bytes());
        header[6] = PROTO_TCP;
        header[7] = 64;
        header[8..24].copy_from_slice(&ip.daddr.bytes);
        header[24..40].copy_from_slice(&ip.saddr.bytes);
        store(ctx, IP_OFF, &header).map_err(|_| failed)?;
    }
    store(ctx, IP_OFF + ip_len, &tcp).map_err(|_| failed)?;
    Ok(Verdict::redirect(outcome, send_back(ctx)?))
}
