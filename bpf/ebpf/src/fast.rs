//! The established flow's path: the packets of an answered, plainly translated flow (most of a
//! node's service traffic) are read and rewritten in place, with one conntrack lookup and no
//! helper call but the clock and the L4 checksum's, before the full path (`process`) is tried.
//!
//! What it takes: an Ethernet frame on any interface but the tunnel device, IPv4 without
//! options and not a fragment, or IPv6 whose next header is TCP or UDP, with its L4 header in
//! the linear part of the packet; a conntrack entry in the established table that translates
//! one side (a client's packet to its backend, or a backend's reply to its frontend) with no
//! tunnel, hairpin or moved port. Everything else, and every first packet, returns
//! [`NOT_HANDLED`] and goes the full way, which does the same to these packets at a higher price:
//! the two paths must agree, and the packet tests run both.
//!
//! Checksums: the IPv4 header's by arithmetic (its sum is always complete, never offloaded);
//! the L4 checksum through `bpf_l4_csum_replace`, because only the kernel knows whether the skb
//! carries a full checksum, a partial one a device will finish (a pod's veth), or a
//! `CHECKSUM_COMPLETE` sum to keep in step, and the arithmetic differs for each.

use core::ptr::{read_unaligned, write_unaligned};

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_l4_csum_replace,
    programs::TcContext,
};
use weir_common::{
    counter, ct_flags, ct_kind, node_flags, Addr, CtKey, CtValue, FAMILY_V4, FAMILY_V6, PROTO_TCP,
    PROTO_UDP,
};

use crate::maps::{count, node_config, CONNTRACK};
use crate::packet::{
    tcp_seen_bits, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, TCP_CSUM, TCP_FLAGS,
    TCP_MIN_HLEN, UDP_CSUM, UDP_HLEN,
};

/// Not a tc action: the packet is for the full path.
pub const NOT_HANDLED: i32 = i32::MIN;

const IPV4_PROTO_OFF: usize = 9;
const IPV4_CSUM_OFF: usize = 10;
const IPV4_SADDR_OFF: usize = 12;
const IPV4_FRAG_OFF: usize = 6;
const IPV6_NEXT_OFF: usize = 6;
const IPV6_SADDR_OFF: usize = 8;
/// Fragment offset and More Fragments; DF alone is not a fragment.
const IPV4_FRAG_MASK_BE: u16 = 0x3fffu16.to_be();

/// A conntrack key on an 8-byte boundary, so that building it costs word stores rather than
/// byte stores (`CtKey` itself only asks for two).
#[repr(C, align(8))]
struct AlignedKey(CtKey);

/// Where the translated side of the packet sits, and the entry that says what it becomes.
struct Site {
    l3: usize,
    l4: usize,
    family: u8,
    proto: u8,
}

/// Translates the packet in place if it belongs to an established, plainly translated flow,
/// and returns the tc action; [`NOT_HANDLED`] otherwise. A call of its own: every way out
/// returns the same constant, so the verifier meets the full path after it in one state.
#[inline(never)]
pub fn established(ctx: &TcContext) -> i32 {
    let config = node_config();
    // SAFETY: reading fields of the program's own context.
    let (ifindex, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    if ifindex == config.tunnel_ifindex {
        return NOT_HANDLED;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return NOT_HANDLED;
    }
    // SAFETY: bounds checked above; unaligned reads, as packet data has no alignment.
    let ethertype = unsafe { read_unaligned((data + 12) as *const u16) };
    if ethertype as u32 != protocol {
        return NOT_HANDLED;
    }
    let mut key = AlignedKey(CtKey {
        saddr: Addr::UNSPECIFIED,
        daddr: Addr::UNSPECIFIED,
        sport_be: 0,
        dport_be: 0,
        proto: 0,
        family: 0,
        _pad: 0,
    });
    let Some(site) = (if ethertype == ETH_P_IP.to_be() {
        key_v4(data, end, &mut key.0)
    } else if ethertype == ETH_P_IPV6.to_be() {
        key_v6(data, end, &mut key.0)
    } else {
        None
    }) else {
        return NOT_HANDLED;
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(&key.0) else {
        return NOT_HANDLED;
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run;
    // concurrent writers only touch last_seen/seen, where a lost update is harmless.
    let entry = unsafe { &mut *entry };
    let host_frontend = entry.flags == ct_flags::HOST_FRONTEND && entry.kind == ct_kind::REVERSE;
    if (entry.flags != 0 && !host_frontend)
        || entry.client_port_be != 0
        || (entry.kind != ct_kind::FORWARD && entry.kind != ct_kind::REVERSE)
    {
        return NOT_HANDLED;
    }
    let seen = if site.proto == PROTO_TCP {
        // SAFETY: `key_v*` checked that the TCP header is within the packet.
        tcp_seen_bits(unsafe { *((data + site.l4 + TCP_FLAGS) as *const u8) })
    } else {
        0
    };
    crate::ct::refresh(entry, seen, crate::ct::coarse_now());
    let (outcome, translated) = if entry.kind == ct_kind::FORWARD {
        (
            counter::CT_FORWARD_HIT,
            rewrite(ctx, &site, entry, Side::Destination),
        )
    } else {
        (
            counter::CT_REVERSE_HIT,
            rewrite(ctx, &site, entry, Side::Source),
        )
    };
    if !translated {
        count(counter::DROP_REWRITE_FAILED);
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    // A reply from a NodePort leaves from one of the node's own addresses, which the stack's
    // input path drops as a martian: it is always forwarded here.
    let verdict = if config.flags & node_flags::FORWARD != 0 || host_frontend {
        crate::route::forward(ctx, site.family, site.l3, outcome, true)
    } else {
        crate::Verdict::pass(outcome)
    };
    count(verdict.counter());
    verdict.action()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// The key of an IPv4 packet without options and not a fragment, whose L4 header is linear.
#[inline(always)]
fn key_v4(data: usize, end: usize, key: &mut CtKey) -> Option<Site> {
    let l3 = ETH_HLEN;
    let l4 = l3 + IPV4_MIN_HLEN;
    if data + l4 + UDP_HLEN > end {
        return None;
    }
    // SAFETY: the IPv4 header and 8 bytes behind it are within the packet (checked above).
    let (version_ihl, frag_be, proto, addrs) = unsafe {
        (
            *((data + l3) as *const u8),
            read_unaligned((data + l3 + IPV4_FRAG_OFF) as *const u16),
            *((data + l3 + IPV4_PROTO_OFF) as *const u8),
            read_unaligned((data + l3 + IPV4_SADDR_OFF) as *const [u32; 2]),
        )
    };
    if version_ihl != 0x45 || frag_be & IPV4_FRAG_MASK_BE != 0 {
        return None;
    }
    if !l4_linear(data, end, l4, proto) {
        return None;
    }
    // SAFETY: the key's addresses start on its 8-byte boundary (`AlignedKey`), so 4-byte
    // writes there are aligned; the ports were checked to be within the packet.
    unsafe {
        write_unaligned(key.saddr.bytes.as_mut_ptr() as *mut u32, addrs[0]);
        write_unaligned(key.daddr.bytes.as_mut_ptr() as *mut u32, addrs[1]);
        let ports = read_unaligned((data + l4) as *const [u16; 2]);
        key.sport_be = ports[0];
        key.dport_be = ports[1];
    }
    key.proto = proto;
    key.family = FAMILY_V4;
    Some(Site {
        l3,
        l4,
        family: FAMILY_V4,
        proto,
    })
}

/// The key of an IPv6 packet whose next header is TCP or UDP, with its L4 header linear.
#[inline(always)]
fn key_v6(data: usize, end: usize, key: &mut CtKey) -> Option<Site> {
    let l3 = ETH_HLEN;
    let l4 = l3 + IPV6_HLEN;
    if data + l4 + UDP_HLEN > end {
        return None;
    }
    // SAFETY: the IPv6 header and 8 bytes behind it are within the packet (checked above).
    let proto = unsafe { *((data + l3 + IPV6_NEXT_OFF) as *const u8) };
    if !l4_linear(data, end, l4, proto) {
        return None;
    }
    // SAFETY: as above; both addresses are within the header.
    unsafe {
        key.saddr.bytes = read_unaligned((data + l3 + IPV6_SADDR_OFF) as *const [u8; 16]);
        key.daddr.bytes = read_unaligned((data + l3 + IPV6_SADDR_OFF + 16) as *const [u8; 16]);
        let ports = read_unaligned((data + l4) as *const [u16; 2]);
        key.sport_be = ports[0];
        key.dport_be = ports[1];
    }
    key.proto = proto;
    key.family = FAMILY_V6;
    Some(Site {
        l3,
        l4,
        family: FAMILY_V6,
        proto,
    })
}

/// Whether `proto` is TCP or UDP and its header lies within the linear packet data.
#[inline(always)]
fn l4_linear(data: usize, end: usize, l4: usize, proto: u8) -> bool {
    match proto {
        PROTO_TCP => data + l4 + TCP_MIN_HLEN <= end,
        PROTO_UDP => data + l4 + UDP_HLEN <= end,
        _ => false,
    }
}

/// Writes the entry's address and port over one side of the packet, with the checksums.
/// False when a checksum helper refused (the packet is then half-rewritten and must be dropped).
#[inline(always)]
fn rewrite(ctx: &TcContext, site: &Site, entry: &CtValue, side: Side) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    let (csum_off, mangled) = if site.proto == PROTO_TCP {
        (site.l4 + TCP_CSUM, 0)
    } else {
        (site.l4 + UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64)
    };
    let addr_off = match (side, site.family) {
        (Side::Source, FAMILY_V4) => site.l3 + IPV4_SADDR_OFF,
        (Side::Destination, FAMILY_V4) => site.l3 + IPV4_SADDR_OFF + 4,
        (Side::Source, _) => site.l3 + IPV6_SADDR_OFF,
        (Side::Destination, _) => site.l3 + IPV6_SADDR_OFF + 16,
    };
    let port_off = match side {
        Side::Source => site.l4,
        Side::Destination => site.l4 + 2,
    };
    // The L4 header's checksum field lies within what `key_v*` checked (TCP: 20 bytes, UDP: 8).
    if data + site.l4 + UDP_HLEN > end || data + csum_off + 2 > end {
        return false;
    }
    // SAFETY: every offset below was checked against the packet's end by `key_v*` or above.
    let (old_port, l4_csum) = unsafe {
        (
            read_unaligned((data + port_off) as *const u16),
            read_unaligned((data + csum_off) as *const u16),
        )
    };
    // A zero UDP checksum (IPv4) means "none": it stays so, and no helper is needed.
    let has_l4_csum = site.proto == PROTO_TCP || l4_csum != 0;
    let pseudo_diff = if site.family == FAMILY_V4 {
        if data + site.l3 + IPV4_MIN_HLEN > end {
            return false;
        }
        // SAFETY: the IPv4 header is within the packet (checked above).
        unsafe {
            let addr = (data + addr_off) as *mut u32;
            let old = read_unaligned(addr);
            let new = read_unaligned(entry.nat_addr.bytes.as_ptr() as *const u32);
            write_unaligned(addr, new);
            let csum = (data + site.l3 + IPV4_CSUM_OFF) as *mut u16;
            write_unaligned(csum, csum_replace4(read_unaligned(csum), old, new));
            diff_words(&[old], &[new])
        }
    } else {
        if data + site.l3 + IPV6_HLEN > end {
            return false;
        }
        // SAFETY: the IPv6 header is within the packet (checked above).
        unsafe {
            let addr = (data + addr_off) as *mut [u32; 4];
            let old = read_unaligned(addr);
            let new = read_unaligned(entry.nat_addr.bytes.as_ptr() as *const [u32; 4]);
            write_unaligned(addr, new);
            diff_words(&old, &new)
        }
    };
    let new_port = entry.nat_port_be;
    if new_port != old_port {
        // SAFETY: within the L4 header (checked above).
        unsafe { write_unaligned((data + port_off) as *mut u16, new_port) };
    }
    if !has_l4_csum {
        return true;
    }
    let skb = ctx.skb.skb;
    // The addresses are covered through the pseudo header, the port directly: two updates,
    // since a partial checksum takes the first and not the second.
    // SAFETY: the helper checks the offset against the packet itself.
    let ret = unsafe {
        bpf_l4_csum_replace(
            skb,
            csum_off as u32,
            0,
            pseudo_diff as u64,
            mangled | BPF_F_PSEUDO_HDR as u64,
        )
    };
    if ret != 0 {
        return false;
    }
    if new_port == old_port {
        return true;
    }
    // SAFETY: as above.
    let ret = unsafe {
        bpf_l4_csum_replace(
            skb,
            csum_off as u32,
            old_port as u64,
            new_port as u64,
            mangled | 2,
        )
    };
    ret == 0
}

/// The one's-complement difference `new - old` of two equally long runs of 32-bit words, as
/// `bpf_l4_csum_replace` takes a difference (size 0).
#[inline(always)]
fn diff_words<const N: usize>(old: &[u32; N], new: &[u32; N]) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < N {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// An IPv4 header checksum after one 32-bit word changed from `old` to `new` (RFC 1624), all
/// three as they lie in memory: one's-complement arithmetic does not care for byte order.
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum) as u32 + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
