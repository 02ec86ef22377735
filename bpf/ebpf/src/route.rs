//! Forwarding by FIB lookup, for translated packets the node's input path would refuse.
//!
//! A NodePort reply un-NATed on this node leaves with one of the node's own addresses as its
//! source. Handed to the stack, IPv4 drops it as a martian (a packet arriving from outside
//! cannot come from a local address). So such packets are routed here: a FIB lookup for the
//! client, the next hop's MAC addresses written, and a redirect to the egress interface. Where
//! the neighbour is not resolved yet, `bpf_redirect_neigh` (5.10+) resolves it; it also adds
//! the neighbour of a packet from the IPIP device, which first becomes an Ethernet frame.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode, bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_RECOMPUTE_CSUM,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head,
    },
    programs::TcContext,
};
use weir_common::{counter, Addr, FAMILY_V4};

use crate::packet::{
    load, store, Ip, Ipv4Header, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, OLD_IPIP_INNER_OFF,
};
use crate::Verdict;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Sends the packet (already translated, from `source` to `ip.daddr`) out of the interface
/// the FIB picks; falls back to the stack when the FIB has no forwarding answer.
#[inline(never)]
pub fn forward(ctx: &TcContext, source: &Addr, ip: &Ip, outcome: u32) -> Verdict {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its "no hints" state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.l4_protocol = ip.proto;
    // SAFETY: reading a field of the program's own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ip.family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(source.v4_octets());
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.daddr.v4_octets());
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(source);
        params.__bindgen_anon_4.ipv6_dst = words(&ip.daddr);
    }
    // SAFETY: the helper reads and fills `params`, whose size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let found = rc as u32 == BPF_FIB_LKUP_RET_SUCCESS || rc as u32 == BPF_FIB_LKUP_RET_NO_NEIGH;
    if found && ip.l3() != ETH_HLEN && to_ethernet_frame(ctx, ip).is_err() {
        return Verdict::drop(counter::DROP_REWRITE_FAILED);
    }
    let action = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if store(ctx, 0, &params.dmac).is_err() || store(ctx, 6, &params.smac).is_err() {
                return Verdict::pass(outcome);
            }
            // SAFETY: a helper taking plain integers.
            unsafe { bpf_redirect(params.ifindex, 0) as i32 }
        }
        // SAFETY: a helper taking an interface index; no neighbour hints (NULL, 0).
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe {
            bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        _ => return Verdict::pass(outcome),
    };
    Verdict::redirect(outcome, action)
}

/// A packet from the IPIP device becomes an Ethernet frame to go out of an Ethernet interface:
/// both redirect helpers refuse a packet without one. Its addresses are filled in after, by the
/// caller or the neighbour layer.
#[inline(always)]
fn to_ethernet_frame(ctx: &TcContext, ip: &Ip) -> Result<(), u32> {
    if ip.l3() == OLD_IPIP_INNER_OFF {
        return drop_outer_ipv4(ctx);
    }
    // SAFETY: the context pointer is the program's own skb; the helper validates the length.
    let ret = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) };
    if ret != 0 {
        return Err(counter::DROP_REWRITE_FAILED);
    }
    let ethertype = if ip.family == FAMILY_V4 {
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

#[inline(always)]
fn words(addr: &Addr) -> [u32; 4] {
    let b = &addr.bytes;
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
