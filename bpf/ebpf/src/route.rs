//! Forwarding by FIB lookup: Weir sends translated packets to their next hop itself.
//!
//! With forwarding on (`node_flags::FORWARD`), a translated packet does not go back to the
//! stack to be routed: a FIB lookup finds its egress interface and next hop, the program
//! decrements the TTL (hop limit) and writes the MAC addresses, and redirects it there, into a
//! local pod's namespace directly (`bpf_redirect_peer`, the pod's end of its veth) or out of a
//! host interface. The stack's routing, netfilter and a second pass through the host side of a
//! pod's veth are skipped. Where the neighbour is not resolved yet, `bpf_redirect_neigh`
//! resolves it. Whatever the FIB cannot answer for (no route, a local destination, forwarding
//! disabled, a packet bigger than the route's MTU, a TTL about to expire) goes to the stack,
//! which answers it as it always did (ICMP errors included), counted as `forward_to_stack`.
//!
//! Some packets are forwarded here whatever the setting: a NodePort reply un-NATed on this node
//! leaves with one of the node's own addresses as its source, and handed to the stack IPv4
//! drops it as a martian (a packet arriving from outside cannot come from a local address).

use core::ptr::{addr_of, read_unaligned, write_unaligned};

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode, bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_RECOMPUTE_CSUM,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_change_head,
    },
    programs::TcContext,
};
use weir_common::{counter, FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::maps::{count, POD_INTERFACES, SCRATCH};
use crate::packet::{
    load, read_words_16, store, zero_words, Ipv4Header, Ipv6Header, ETH_HLEN, ETH_P_IP, ETH_P_IPV6,
    IPV4_CSUM, IPV4_MIN_HLEN, IPV4_TTL, IPV6_HLEN, IPV6_HOP_LIMIT, OLD_IPIP_INNER_OFF,
    TCP_MIN_HLEN, UDP_HLEN,
};
use crate::Verdict;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `bpf_fib_lookup`'s parameters on an 8-byte boundary (zeroing them costs word stores), kept
/// in the per-CPU scratch slot (`Scratch::fib`).
#[repr(C, align(8))]
pub struct FibParams(bpf_fib_lookup);

/// Sends the translated packet, whose IP header starts at `l3`, out of the interface the FIB
/// picks for its destination; hands it to the stack when the FIB has no forwarding answer.
/// `forwarding`: the packet is forwarded (it entered the node at tc ingress), so its TTL is
/// decremented and a local pod may take it straight into its namespace; a packet of the node's
/// own (tc egress) keeps its TTL and is only redirected.
#[inline(never)]
pub fn forward(ctx: &TcContext, family: u8, l3: usize, outcome: u32, forwarding: bool) -> Verdict {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return to_stack(outcome);
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU; its `fib` field is
    // only ever borrowed here. bpf_fib_lookup is plain data; all-zero is its "no hints" state.
    let params = unsafe {
        let fib = &mut (*scratch).fib;
        zero_words(fib as *mut FibParams);
        &mut fib.0
    };
    if !describe(ctx, family, l3, forwarding, params) {
        return to_stack(outcome);
    }
    // SAFETY: the helper reads and fills `params`, whose size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return to_stack(outcome);
    }
    if l3 != ETH_HLEN && to_ethernet_frame(ctx, family, l3).is_err() {
        return Verdict::drop(counter::DROP_REWRITE_FAILED);
    }
    if forwarding && !decrement_ttl(ctx, family) {
        return Verdict::drop(counter::DROP_REWRITE_FAILED);
    }
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        if !write_macs(ctx, params) {
            return Verdict::drop(counter::DROP_REWRITE_FAILED);
        }
        if forwarding && POD_INTERFACES.get_ptr(&params.ifindex).is_some() {
            // SAFETY: a helper taking plain integers.
            unsafe { bpf_redirect_peer(params.ifindex, 0) as i32 }
        } else {
            // SAFETY: a helper taking plain integers.
            unsafe { bpf_redirect(params.ifindex, 0) as i32 }
        }
    } else {
        // SAFETY: a helper taking an interface index; no neighbour hints (NULL, 0).
        unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    };
    count(counter::FORWARDED);
    Verdict::redirect(outcome, action)
}

#[inline(always)]
fn to_stack(outcome: u32) -> Verdict {
    count(counter::FORWARD_TO_STACK);
    Verdict::pass(outcome)
}

/// Fills the lookup's parameters from the packet's IP header at `l3` (0, the Ethernet
/// header's length, or an old kernel's IPIP offset): false when the packet is not one to
/// forward here (a TTL about to expire, a header out of reach). `tot_len` asks the FIB to
/// check the route's MTU: the packet's length, or for a GSO packet the length of each segment
/// it will be cut into, as the stack checks it.
#[inline(always)]
fn describe(
    ctx: &TcContext,
    family: u8,
    l3: usize,
    forwarding: bool,
    params: &mut bpf_fib_lookup,
) -> bool {
    if l3 > OLD_IPIP_INNER_OFF {
        return false;
    }
    // SAFETY: reading fields of the program's own context.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    params.ifindex = ifindex;
    let data = ctx.data();
    let end = ctx.data_end();
    if family == FAMILY_V4 {
        if data + l3 + IPV4_MIN_HLEN > end {
            return false;
        }
        let h = (data + l3) as *const Ipv4Header;
        // SAFETY: the fixed header is within the packet (checked above); unaligned reads of
        // single fields, not a copy of the header on the stack (the frame is in the deepest
        // call chain).
        let (version_ihl, ttl, proto, tos, total_len_be, saddr, daddr) = unsafe {
            (
                (*h).version_ihl,
                (*h).ttl,
                (*h).proto,
                (*h).tos,
                read_unaligned(addr_of!((*h).total_len_be)),
                read_unaligned(addr_of!((*h).saddr) as *const u32),
                read_unaligned(addr_of!((*h).daddr) as *const u32),
            )
        };
        if forwarding && ttl <= 1 {
            return false;
        }
        let header_len = ((version_ihl & 0x0f) as usize) * 4;
        let Some(tot_len) = segment_len(data, end, l3 + header_len, proto, gso_size) else {
            return false;
        };
        params.family = AF_INET;
        params.l4_protocol = proto;
        params.__bindgen_anon_1.tot_len = if gso_size == 0 {
            u16::from_be(total_len_be)
        } else {
            (header_len as u32 + tot_len) as u16
        };
        params.__bindgen_anon_2.tos = tos;
        params.__bindgen_anon_3.ipv4_src = saddr;
        params.__bindgen_anon_4.ipv4_dst = daddr;
    } else {
        if data + l3 + IPV6_HLEN > end {
            return false;
        }
        let h = (data + l3) as *const Ipv6Header;
        // SAFETY: as above.
        let (hop_limit, next_header, payload_len_be) = unsafe {
            (
                (*h).hop_limit,
                (*h).next_header,
                read_unaligned(addr_of!((*h).payload_len_be)),
            )
        };
        if forwarding && hop_limit <= 1 {
            return false;
        }
        let Some(tot_len) = segment_len(data, end, l3 + IPV6_HLEN, next_header, gso_size) else {
            return false;
        };
        params.family = AF_INET6;
        params.l4_protocol = next_header;
        params.__bindgen_anon_1.tot_len = if gso_size == 0 {
            (IPV6_HLEN as u16).wrapping_add(u16::from_be(payload_len_be))
        } else {
            (IPV6_HLEN as u32 + tot_len) as u16
        };
        // SAFETY: as above; the addresses are 16 bytes each within the header.
        unsafe {
            params.__bindgen_anon_3.ipv6_src = read_words_16(addr_of!((*h).saddr) as usize);
            params.__bindgen_anon_4.ipv6_dst = read_words_16(addr_of!((*h).daddr) as usize);
        }
    }
    true
}

/// For a GSO packet, the L4 header's length plus the segment size: what each segment carries
/// behind the IP header. None when that cannot be told (a GSO packet of another protocol, or
/// with IPv6 extension headers); 0 for a packet that is not GSO.
#[inline(always)]
fn segment_len(data: usize, end: usize, l4: usize, proto: u8, gso_size: u32) -> Option<u32> {
    if gso_size == 0 {
        return Some(0);
    }
    let header_len = match proto {
        PROTO_UDP => UDP_HLEN as u32,
        PROTO_TCP => {
            if l4 > OLD_IPIP_INNER_OFF + 60 || data + l4 + TCP_MIN_HLEN > end {
                return None;
            }
            // SAFETY: the TCP header's fixed part is within the packet (checked above).
            let offset = unsafe { *((data + l4 + 12) as *const u8) };
            ((offset >> 4) as u32) * 4
        }
        _ => return None,
    };
    Some(header_len + gso_size)
}

/// As the stack decrements it when it forwards; the IPv4 header checksum by arithmetic, as
/// `ip_decrease_ttl` does (the header's sum is always complete).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    if family == FAMILY_V4 {
        if data + ETH_HLEN + IPV4_MIN_HLEN > end {
            return false;
        }
        // SAFETY: the header is within the packet (checked above); unaligned accesses.
        unsafe {
            let ttl = (data + ETH_HLEN + IPV4_TTL) as *mut u8;
            *ttl = (*ttl).wrapping_sub(1);
            let csum = (data + ETH_HLEN + IPV4_CSUM) as *mut u16;
            let sum = read_unaligned(csum) as u32 + 0x0100u16.to_be() as u32;
            write_unaligned(csum, (sum + (sum >= 0xffff) as u32) as u16);
        }
    } else {
        if data + ETH_HLEN + IPV6_HLEN > end {
            return false;
        }
        // SAFETY: as above.
        unsafe {
            let hop_limit = (data + ETH_HLEN + IPV6_HOP_LIMIT) as *mut u8;
            *hop_limit = (*hop_limit).wrapping_sub(1);
        }
    }
    true
}

#[inline(always)]
fn write_macs(ctx: &TcContext, params: &bpf_fib_lookup) -> bool {
    let data = ctx.data();
    if data + ETH_HLEN > ctx.data_end() {
        return false;
    }
    let (d, m) = (&params.dmac, &params.smac);
    // SAFETY: the Ethernet header is within the packet (checked above). Word writes: a 6-byte
    // copy compiles to a `memmove` call.
    unsafe {
        write_unaligned(
            data as *mut u32,
            u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        );
        write_unaligned((data + 4) as *mut u16, u16::from_ne_bytes([d[4], d[5]]));
        write_unaligned(
            (data + 6) as *mut u32,
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]),
        );
        write_unaligned((data + 10) as *mut u16, u16::from_ne_bytes([m[4], m[5]]));
    }
    true
}

/// A packet from the IPIP device becomes an Ethernet frame to go out of an Ethernet interface:
/// both redirect helpers refuse a packet without one. Its addresses are filled in after, by the
/// caller or the neighbour layer.
#[inline(always)]
fn to_ethernet_frame(ctx: &TcContext, family: u8, l3: usize) -> Result<(), u32> {
    if l3 == OLD_IPIP_INNER_OFF {
        return drop_outer_ipv4(ctx);
    }
    // SAFETY: the context pointer is the program's own skb; the helper validates the length.
    let ret = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) };
    if ret != 0 {
        return Err(counter::DROP_REWRITE_FAILED);
    }
    let ethertype = if family == FAMILY_V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    store(ctx, 12, &ethertype.to_be_bytes())
}

/// An old kernel's `[outer Ethernet | outer IPv4 | inner IPv4]` becomes `[Ethernet | inner IPv4]`.
/// The kernel takes its MAC header to be 34 bytes long here, so the 20 bytes `adjust_room`
/// removes behind it are the inner header's: the inner header is saved first and then
/// overwrites the outer one. Only its options would not fit; the ethertype is already IPv4.
/// The stack's idea of the header offsets is stale afterwards, which a redirect does not mind.
#[inline(always)]
fn drop_outer_ipv4(ctx: &TcContext) -> Result<(), u32> {
    let failed = counter::DROP_REWRITE_FAILED;
    let inner: Ipv4Header = load(ctx, OLD_IPIP_INNER_OFF)?;
    if inner.version_ihl != 0x45 {
        return Err(failed);
    }
    // The segment size stays: only an encapsulation header goes.
    ctx.adjust_room(
        -(IPV4_MIN_HLEN as i32),
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64,
    )
    .map_err(|_| failed)?;
    ctx.store(ETH_HLEN, &inner, BPF_F_RECOMPUTE_CSUM as u64)
        .map_err(|_| failed)
}
