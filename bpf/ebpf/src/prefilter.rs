//! The XDP pre-filter on host interfaces: a packet from a deny-listed source prefix
//! (`WEIR_PREFILTER_DENY`, longest match, IPv4 and IPv6) is dropped in the driver (or, without
//! driver support, at the stack's generic XDP hook), before the stack or Weir's tc programs
//! spend anything on it. Everything else passes untouched after one lookup.
//!
//! A prefix's value is the counter its drops go to, which says where the prefix came from (the
//! configuration or a deny-list object). A deny-listed source still reaches the node's inbound
//! failsafe ports (`WEIR_FAILSAFE_PORTS`: SSH, the API server, ...) unless the operator turned
//! that off (`node_flags::PREFILTER_FAILSAFE`), so a deny-list cannot cut a node off; with
//! them, its neighbour discovery messages, without which the node cannot answer it over IPv6.
//!
//! Reads are direct packet accesses against `data_end`, no helper calls: this runs on every
//! packet a host interface receives. What it cannot read whole (runt frames, VLAN tags, other
//! ethertypes) passes: the stack and the tc programs judge it as before.

use aya_ebpf::{bindings::xdp_action, maps::lpm_trie::Key, programs::XdpContext};
use weir_common::{
    failsafe_direction, node_flags, Addr, FailsafeKey, PolicyCidrKey, FAMILY_V4, FAMILY_V6,
    POLICY_CIDR_FIXED_BITS, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::maps::{count, node_config, FAILSAFE_PORTS, PREFILTER_DENY};
use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Offsets from the start of the IP header.
const IPV4_PROTOCOL: usize = 9;
const IPV4_FRAGMENT: usize = 6;
const IPV4_SADDR: usize = 12;
const IPV6_NEXT_HEADER: usize = 6;
const IPV6_SADDR: usize = 8;
/// ICMPv6 neighbour discovery: router solicitation (133) to redirect (137).
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// The fragment offset bits of IPv4's flags-and-offset field (network order, as read).
const IPV4_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();

/// The verdict on one frame: `XDP_DROP` for a deny-listed source, else `XDP_PASS`.
#[inline(always)]
pub fn filter(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_HLEN > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header lies before `end` (checked above).
    let ethertype = u16::from_be(unsafe { *((start + 12) as *const u16) });
    let ip = start + ETH_HLEN;
    let mut key = Key::new(
        0,
        PolicyCidrKey {
            family: 0,
            _pad: [0; 3],
            addr: Addr::UNSPECIFIED,
        },
    );
    // Where the ports would be, and the protocol: 0 when the packet shows no ports.
    let (l4, proto) = match ethertype {
        ETH_P_IP => {
            if ip + IPV4_HLEN > end {
                return xdp_action::XDP_PASS;
            }
            // SAFETY: the fixed IPv4 header lies before `end` (checked above).
            let (saddr, ihl, proto, fragment) = unsafe {
                (
                    *((ip + IPV4_SADDR) as *const [u8; 4]),
                    (*(ip as *const u8) & 0x0f) as usize * 4,
                    *((ip + IPV4_PROTOCOL) as *const u8),
                    *((ip + IPV4_FRAGMENT) as *const u16),
                )
            };
            key.prefix_len = POLICY_CIDR_FIXED_BITS + 32;
            key.data.family = FAMILY_V4;
            key.data.addr = Addr::from_v4(saddr);
            // A later fragment carries no ports.
            let proto = if fragment & IPV4_OFFSET_MASK_BE != 0 {
                0
            } else {
                proto
            };
            (ip + ihl, proto)
        }
        ETH_P_IPV6 => {
            if ip + IPV6_HLEN > end {
                return xdp_action::XDP_PASS;
            }
            // SAFETY: the fixed IPv6 header lies before `end` (checked above).
            let (saddr, next) = unsafe {
                (
                    *((ip + IPV6_SADDR) as *const [u8; 16]),
                    *((ip + IPV6_NEXT_HEADER) as *const u8),
                )
            };
            key.prefix_len = POLICY_CIDR_FIXED_BITS + 128;
            key.data.family = FAMILY_V6;
            key.data.addr = Addr::from_v6(saddr);
            // Ports behind extension headers are not looked for: such a packet is no failsafe.
            (ip + IPV6_HLEN, next)
        }
        _ => return xdp_action::XDP_PASS,
    };
    let Some(&drop_counter) = PREFILTER_DENY.get(&key) else {
        return xdp_action::XDP_PASS;
    };
    let failsafe_exempt = node_config().flags & node_flags::PREFILTER_FAILSAFE != 0;
    if failsafe_exempt && proto == PROTO_ICMPV6 && l4 + 1 <= end {
        // Neighbour discovery: without the source's answers the node cannot reply to it over
        // IPv6, failsafe ports included.
        // SAFETY: the ICMPv6 type lies before `end` (checked above).
        let icmp_type = unsafe { *(l4 as *const u8) };
        if (ND_FIRST..=ND_LAST).contains(&icmp_type) {
            count(weir_common::counter::PREFILTER_PASS_FAILSAFE);
            return xdp_action::XDP_PASS;
        }
    }
    if failsafe_exempt && (proto == PROTO_TCP || proto == PROTO_UDP) && l4 + 4 <= end {
        // SAFETY: both ports lie before `end` (checked above).
        let dport_be = unsafe { *((l4 + 2) as *const u16) };
        let failsafe = FailsafeKey {
            port_be: dport_be,
            proto,
            direction: failsafe_direction::INBOUND,
        };
        if FAILSAFE_PORTS.get_ptr(&failsafe).is_some() {
            count(weir_common::counter::PREFILTER_PASS_FAILSAFE);
            return xdp_action::XDP_PASS;
        }
    }
    count(drop_counter);
    xdp_action::XDP_DROP
}
