//! The invariants every packet is held to, computed from the bytes in and out alone.
//!
//! Checksums are compared as residuals (what the covered bytes sum to, the checksum field
//! included): an incremental update keeps a right checksum right and a wrong one exactly as
//! wrong, so a residual that moved means the program rewrote a covered field without its
//! checksum, whatever the packet looked like before.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use weir_common::{counter, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use super::packet::{
    ipv4_header_residual, l4_checksum_offset, l4_residual, parse_ip, parse_ip_header, IpView,
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, OLD_IPIP_INNER_OFF,
};
use super::topology::Layout;
use crate::common::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// An invariant a packet broke, said in words.
#[derive(Debug)]
pub struct Violation(pub String);

fn broken<T>(what: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(what.into()))
}

/// Outcomes whose packet the program takes over rather than loses: a later fragment held for
/// its first, a first fragment whose copies (and the held ones) were sent on. Their tc verdict is
/// a drop, as a drop's.
const TAKEN_OVER: [&str; 2] = ["fragment_held", "fragment_replayed"];

/// Invariant 1: exactly one outcome counter moved, by exactly one, and it agrees with the
/// verdict (a pass leaves the packet byte for byte, a drop is a drop). Returns the outcome.
pub fn outcome(
    delta: &[u64],
    verdict: u32,
    input: &[u8],
    output: &[u8],
) -> Result<usize, Violation> {
    let moved: Vec<(&str, u64)> = delta
        .iter()
        .enumerate()
        .filter(|(_, d)| **d != 0)
        .map(|(i, d)| (counter::NAMES[i], *d))
        .collect();
    let index = match moved.as_slice() {
        [(name, 1)] => counter::NAMES.iter().position(|n| n == name).unwrap(),
        _ => return broken(format!("counters moved {moved:?}: not exactly one by one")),
    };
    let name = counter::NAMES[index];
    if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict) {
        return broken(format!(
            "{name} with verdict {verdict}, no tc action the program uses"
        ));
    }
    if name.starts_with("pass_") && (verdict != TC_ACT_OK || output != input) {
        return broken(format!("{name}, yet verdict {verdict} or bytes changed"));
    }
    let shot = name.starts_with("drop_") || TAKEN_OVER.contains(&name);
    if shot != (verdict == TC_ACT_SHOT) {
        return broken(format!("{name} with verdict {verdict}"));
    }
    Ok(index)
}

/// Invariant 4, the hook for network policy (issue 14): no packet a deny rule covers may leave
/// with a pass or redirect verdict. The data path has no policy yet, so nothing is denied and
/// this holds trivially. When policy lands: build the installed rules into the fuzzed nodes,
/// generate packets on both sides of each rule, and look the input's 5-tuple up here.
pub fn policy(_input: &[u8], _verdict: u32) -> Result<(), Violation> {
    Ok(())
}

/// Every address the maps hold that a packet may be translated to: frontends (ClusterIPs,
/// external and load-balancer IPs), the node's own addresses (NodePorts), backends, and the
/// hairpin addresses. Sixteen bytes each, IPv4 in the first four, as the maps keep them.
pub struct Allowed(pub BTreeSet<[u8; 16]>);

/// Where the program finds the IP header of `frame`, by the same rules; None when it cannot.
pub fn l3_offset(layout: Layout, frame: &[u8]) -> Option<usize> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return None;
    }
    match layout {
        Layout::Ethernet => Some(ETH_HLEN),
        Layout::IpipDevice => [0, OLD_IPIP_INNER_OFF].into_iter().find(|&off| {
            frame.len() >= off + 4
                && frame[off] >> 4 == 4
                && off + usize::from(u16::from_be_bytes([frame[off + 2], frame[off + 3]]))
                    == frame.len()
        }),
    }
}

/// Invariants 2 and 3 for a packet the program let go changed: checksums of every header it
/// rewrote (the quote of an ICMP error included) still hold as they did, a UDP checksum of zero
/// stayed zero, and every address it wrote is one the maps hold (or one the packet had).
/// An ICMP answer built in place of the packet must be valid whole.
pub fn rewrite(
    layout: Layout,
    allowed: &Allowed,
    input: &[u8],
    verdict: u32,
    output: &[u8],
) -> Result<(), Violation> {
    if verdict == TC_ACT_SHOT || output == input {
        return Ok(());
    }
    let Some(before) = l3_offset(layout, input).and_then(|l3| parse_ip(input, l3)) else {
        return broken("changed a frame whose IP packet does not parse whole");
    };
    if let Some(after) = answer(&before, output) {
        return check_answer(input, &before, output, &after);
    }
    if let Some(after) = reset(&before, output) {
        return check_reset(input, &before, output, &after);
    }
    if output.len() != input.len() {
        return broken(format!(
            "length {} -> {}, and no ICMP answer",
            input.len(),
            output.len()
        ));
    }
    let Some(after) = parse_ip(output, before.l3) else {
        return broken("the rewritten packet no longer parses");
    };
    if (after.family, after.proto, after.header_len, after.l4_len)
        != (
            before.family,
            before.proto,
            before.header_len,
            before.l4_len,
        )
    {
        return broken("family, protocol or lengths of the IP header changed");
    }
    if before.family == 4 {
        same_residual(
            "IPv4 header",
            ipv4_header_residual(input, &before),
            ipv4_header_residual(output, &after),
        )?;
    }
    addresses(allowed, &before, &after, "")?;
    match before.proto {
        // Its addresses alone change; the checksum it does not carry was the first fragment's.
        PROTO_TCP | PROTO_UDP if before.later_fragment => Ok(()),
        PROTO_TCP | PROTO_UDP => transport_checksum(input, &before, output, &after, ""),
        PROTO_ICMP | PROTO_ICMPV6 => icmp_error(allowed, input, &before, output, &after),
        proto => broken(format!("rewrote a packet of protocol {proto}")),
    }
}

/// The output as an ICMP error built from a TCP or UDP packet (port unreachable, fragmentation
/// needed), which starts behind a fresh Ethernet header. Only packets right behind an Ethernet
/// header are answered: behind an outer header (the IPIP device on old kernels) the outer one
/// may well be ICMP while the packet it carries was merely translated.
fn answer(before: &IpView, output: &[u8]) -> Option<IpView> {
    if before.l3 != ETH_HLEN || (before.proto != PROTO_TCP && before.proto != PROTO_UDP) {
        return None;
    }
    parse_ip(output, ETH_HLEN)
        .filter(|after| after.proto == PROTO_ICMP || after.proto == PROTO_ICMPV6)
}

/// A TCP reset built in place of a TCP segment (a connection that lost its last endpoint).
fn reset(before: &IpView, output: &[u8]) -> Option<IpView> {
    if before.l3 != ETH_HLEN || before.proto != PROTO_TCP {
        return None;
    }
    parse_ip(output, ETH_HLEN).filter(|after| {
        after.proto == PROTO_TCP
            && after.l4_len == 20
            && matches!(output.get(after.l4 + 13), Some(&(TCP_RST | TCP_RST_ACK)))
            && (after.src, after.dst) == (before.dst, before.src)
    })
}

const TCP_RST: u8 = 0x04;
const TCP_RST_ACK: u8 = 0x14;

/// The reset goes from the address the client used back to the client, port for port, with
/// valid checksums and nothing behind it. A reset of a segment carries the sequence number the
/// client acknowledged; the refusal of a SYN (RST+ACK, RFC 9293 3.10.7.1) sequence number 0 and
/// acknowledges the SYN and its data.
fn check_reset(
    input: &[u8],
    before: &IpView,
    output: &[u8],
    after: &IpView,
) -> Result<(), Violation> {
    if after.end() != output.len() {
        return broken("bytes behind the TCP reset");
    }
    if after.family == 4 && ipv4_header_residual(output, after) != 0xffff {
        return broken("TCP reset: bad IPv4 header checksum");
    }
    if l4_residual(after, &output[after.l4..after.end()]) != 0xffff {
        return broken("TCP reset: bad TCP checksum");
    }
    let ports_in = input.get(before.l4..before.l4 + 4);
    let ports_out = &output[after.l4..after.l4 + 4];
    if ports_in.map(|p| [p[2], p[3], p[0], p[1]])
        != Some([ports_out[0], ports_out[1], ports_out[2], ports_out[3]])
    {
        return broken("TCP reset: ports not the segment's, swapped");
    }
    if output[after.l4 + 13] == TCP_RST_ACK {
        let seq = u32::from_be_bytes(input[before.l4 + 4..before.l4 + 8].try_into().unwrap());
        let data_offset = usize::from(input[before.l4 + 12] >> 4) * 4;
        let data = before.l4_len.saturating_sub(data_offset) as u32;
        let ack = seq.wrapping_add(1).wrapping_add(data);
        if output[after.l4 + 4..after.l4 + 12] != [[0; 4], ack.to_be_bytes()].concat()[..] {
            return broken("TCP refusal: not sequence 0 acknowledging the SYN and its data");
        }
        return Ok(());
    }
    if input.get(before.l4 + 8..before.l4 + 12) != Some(&output[after.l4 + 4..after.l4 + 8]) {
        return broken("TCP reset: sequence number not the segment's acknowledgement");
    }
    Ok(())
}

fn check_answer(
    input: &[u8],
    before: &IpView,
    output: &[u8],
    after: &IpView,
) -> Result<(), Violation> {
    if (after.family, after.src, after.dst) != (before.family, before.dst, before.src) {
        return broken("an ICMP answer not from the address the client used back to the client");
    }
    if after.end() != output.len() {
        return broken("bytes behind the ICMP answer");
    }
    if after.family == 4 && ipv4_header_residual(output, after) != 0xffff {
        return broken("ICMP answer: bad IPv4 header checksum");
    }
    if l4_residual(after, &output[after.l4..after.end()]) != 0xffff {
        return broken("ICMP answer: bad ICMP checksum");
    }
    let quote = &output[after.l4 + ICMP_HLEN..after.end()];
    if input.get(before.l3..before.l3 + quote.len()) != Some(quote) {
        return broken("ICMP answer: the quote is not the start of the packet as it came");
    }
    Ok(())
}

fn same_residual(what: &str, before: u16, after: u16) -> Result<(), Violation> {
    if before == after {
        Ok(())
    } else {
        broken(format!(
            "{what} checksum residual {before:#06x} -> {after:#06x} (0xffff is right): a covered \
             field changed without its checksum"
        ))
    }
}

/// Invariant 3 for one IP header (the packet's own, or a quote's).
fn addresses(
    allowed: &Allowed,
    before: &IpView,
    after: &IpView,
    what: &str,
) -> Result<(), Violation> {
    for (side, old, new) in [
        ("source", before.src, after.src),
        ("destination", before.dst, after.dst),
    ] {
        let known = new == before.src || new == before.dst || allowed.0.contains(&new);
        if new != old && !known {
            return broken(format!(
                "{what}{side} rewritten to {}, an address no map holds",
                display_addr(before.family, &new)
            ));
        }
    }
    Ok(())
}

fn display_addr(family: u8, addr: &[u8; 16]) -> String {
    if family == 4 {
        Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    } else {
        Ipv6Addr::from(*addr).to_string()
    }
}

/// TCP's or UDP's checksum, over the upper-layer bytes present up to `end` of the header at
/// `before.l4` (all of them for the packet itself, what the quote holds for a quote).
fn transport_checksum(
    input: &[u8],
    before: &IpView,
    output: &[u8],
    after: &IpView,
    what: &str,
) -> Result<(), Violation> {
    let csum_at = before.l4 + l4_checksum_offset(before.proto).unwrap();
    let end = input.len().min(before.end());
    if csum_at + 2 > end {
        return broken(format!("rewrote {what}TCP/UDP too short for its checksum"));
    }
    let field = |data: &[u8]| u16::from_be_bytes([data[csum_at], data[csum_at + 1]]);
    let name = if before.proto == PROTO_TCP {
        "TCP"
    } else {
        "UDP"
    };
    if before.proto == PROTO_UDP && field(input) == 0 {
        // IPv6 quotes aside (see the caller), zero means "no checksum" and must stay so.
        if field(output) != 0 {
            return broken(format!(
                "{what}UDP checksum 0 (none) became {:#06x}",
                field(output)
            ));
        }
        return Ok(());
    }
    if before.proto == PROTO_UDP && field(output) == 0 {
        return broken(format!("{what}UDP checksum became 0, which means none"));
    }
    same_residual(
        &format!("{what}{name}"),
        l4_residual(before, &input[before.l4..end]),
        l4_residual(after, &output[after.l4..end]),
    )
}

/// An ICMP error the program translated: the message's checksum, and inside the quote the IPv4
/// header checksum, the addresses and the quoted transport checksum where the quote holds it.
fn icmp_error(
    allowed: &Allowed,
    input: &[u8],
    before: &IpView,
    output: &[u8],
    after: &IpView,
) -> Result<(), Violation> {
    let end = before.end();
    same_residual(
        "ICMP",
        l4_residual(before, &input[before.l4..end]),
        l4_residual(after, &output[after.l4..end]),
    )?;
    let quote_at = before.l4 + ICMP_HLEN;
    let (Some(qb), Some(qa)) = (
        parse_ip_header(&input[..end], quote_at),
        parse_ip_header(&output[..end], quote_at),
    ) else {
        return broken("changed an ICMP message whose quote has no IP header");
    };
    if qb.family != before.family {
        return broken("translated a quote of the other IP family");
    }
    addresses(allowed, &qb, &qa, "quoted ")?;
    if qb.family == 4 {
        same_residual(
            "quoted IPv4 header",
            ipv4_header_residual(input, &qb),
            ipv4_header_residual(output, &qa),
        )?;
    }
    let Some(csum_off) =
        l4_checksum_offset(qb.proto).filter(|_| qb.proto == PROTO_TCP || qb.proto == PROTO_UDP)
    else {
        return broken(format!("translated a quote of protocol {}", qb.proto));
    };
    if qb.l4 + csum_off + 2 > end {
        return Ok(());
    }
    if qb.family == 6 && qb.proto == PROTO_UDP {
        // Zero is no valid UDP checksum in IPv6: updated like any other, it must just add up.
        return same_residual(
            "quoted UDP",
            l4_residual(&qb, &input[qb.l4..end]),
            l4_residual(&qa, &output[qa.l4..end]),
        );
    }
    let quote_end = IpView {
        l4_len: end - qb.l4,
        ..qb
    };
    transport_checksum(
        input,
        &quote_end,
        output,
        &IpView {
            l4_len: end - qa.l4,
            ..qa
        },
        "quoted ",
    )
}
