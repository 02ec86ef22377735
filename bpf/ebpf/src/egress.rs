//! `weir_egress`: ICMP errors the node's own stack sends about translated flows.
//!
//! The node forwards translated packets (a client's to a backend, a backend's replies), and
//! when one cannot go on (the next link's MTU is smaller and DF is set, the hop limit ran out,
//! no neighbour answers) the node's stack itself answers with an ICMP error quoting the packet
//! as it was translated. Such an error never enters the node, so `weir_ingress` never sees it:
//! it leaves by the interface towards the sender, where this program translates it as
//! `weir_ingress` translates errors from elsewhere (`icmp::icmp_error`): the quote names the
//! frontend the client used, not the backend, so the client's socket learns its path MTU or
//! its error; an error about a flow translated on another node (a return entry) goes back
//! through the tunnel to that node. kube-proxy gets the same from netfilter, which translates
//! the node's own errors as RELATED to the flow's conntrack entry.
//!
//! Everything else passes at the cost of one load, uncounted: the counters account for the
//! packets entering the node, and this program only adds the errors it translates.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use weir_common::{counter, PROTO_ICMP, PROTO_ICMPV6};

use crate::maps::{count, SCRATCH};
use crate::packet::{load, parse, Ip, ETH_P_IP, ETH_P_IPV6, IP_OFF, NOT_FRAGMENT, PARSED};
use crate::{send_icmp_as_entry, Verdict, ACTION_ICMP_ROUTE, ACTION_ICMP_TUNNEL};

/// Where the protocol byte of an IPv4 header, and the next-header byte of an IPv6 header, sit
/// behind the Ethernet header. The node's own errors carry no IPv6 extension headers.
const IPV4_PROTO_OFF: usize = IP_OFF + 9;
const IPV6_NEXT_HEADER_OFF: usize = IP_OFF + 6;

#[classifier]
pub fn weir_egress(ctx: TcContext) -> i32 {
    // At a pod's door, NetworkPolicy decides what reaches the pod without having passed
    // `weir_ingress`'s decision (see `policy::at_pod_door`).
    if crate::policy::enforced() && crate::policy::towards_selected_pod(&ctx) {
        let decided = crate::policy::at_pod_door(&ctx);
        if decided != crate::policy::ALLOWED {
            count(decided);
            return TC_ACT_SHOT as i32;
        }
    }
    if !is_icmp(&ctx) {
        return TC_ACT_OK as i32;
    }
    let verdict = match process(&ctx) {
        Ok(verdict) => verdict,
        Err(c) => Verdict::drop(c),
    };
    if verdict.counter() != counter::PASS_ICMP_UNRELATED {
        count(verdict.counter());
    }
    verdict.action()
}

/// Whether the frame carries ICMP or ICMPv6 right behind its IP header: the only packets this
/// program has business with.
#[inline(always)]
fn is_icmp(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the program's own context.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    match protocol {
        ETH_P_IP => load::<u8>(ctx, IPV4_PROTO_OFF) == Ok(PROTO_ICMP),
        ETH_P_IPV6 => load::<u8>(ctx, IPV6_NEXT_HEADER_OFF) == Ok(PROTO_ICMPV6),
        _ => false,
    }
}

fn process(ctx: &TcContext) -> Result<Verdict, u32> {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Ok(Verdict::pass(counter::PASS_ICMP_UNRELATED));
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU: tc programs do not
    // nest (this one calls no helper that would run another synchronously).
    let ip = unsafe { &mut (*scratch).ip };
    *ip = Ip::EMPTY;
    if parse(ctx, false, ip) != PARSED
        || (ip.proto != PROTO_ICMP && ip.proto != PROTO_ICMPV6)
        || ip.fragment != NOT_FRAGMENT
    {
        return Ok(Verdict::pass(counter::PASS_ICMP_UNRELATED));
    }
    let verdict = crate::icmp::icmp_error(ctx, ip);
    if verdict.action() == ACTION_ICMP_TUNNEL || verdict.action() == ACTION_ICMP_ROUTE {
        // SAFETY: as above; `send_as_entry` filled the entry field.
        let entry = unsafe { &(*scratch).entry };
        return send_icmp_as_entry(ctx, ip, entry, verdict, false);
    }
    Ok(verdict)
}
