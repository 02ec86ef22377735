//! The packets: valid ones of the installed services' flows in both directions (so earlier
//! packets of a run leave the conntrack entries later ones hit), ICMP errors about them, tunnel
//! shapes and random bytes; then mutations of every header field the program reads.
//!
//! Generation depends on the seed alone, never on what the program did with earlier packets
//! (its backend choice is random in the kernel): a run's packets are the same on every replay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weir_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use super::packet::{
    ethernet, frame_of, icmp_message, ip_packet, parse_ip_header, repair_checksums, tcp_header,
    udp_header, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, OLD_IPIP_INNER_OFF,
    PROTO_IPIP, PROTO_IPV6_IN_IP,
};
use super::rng::Rng;
use super::topology::{
    Frontend, Layout, CLIENTS_V4, CLIENTS_V6, HAIRPIN, HAIRPIN_V6, NODE1, NODE2,
};

/// Frames stay below what BPF_PROG_TEST_RUN accepts (a page, less the skb's head and tail
/// room).
const MAX_FRAME: usize = 3000;
/// Few source ports per client, so flows recur and later packets hit conntrack.
const CLIENT_PORTS: u16 = 16;
const VXLAN_PORT: u16 = 4789;
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);

/// One packet for a node of `layout`: a frame as it enters the program.
pub fn packet(rng: &mut Rng, layout: Layout, frontends: &[Frontend]) -> Vec<u8> {
    let (mut frame, l3) = if layout == Layout::IpipDevice && rng.percent(70) {
        (old_ipip_layout(&ip(rng, frontends)), OLD_IPIP_INNER_OFF)
    } else if rng.percent(92) {
        (frame_of(&ip(rng, frontends)), ETH_HLEN)
    } else {
        (random_frame(rng), ETH_HLEN)
    };
    if rng.percent(60) {
        mutate(rng, &mut frame, l3);
    }
    frame.truncate(MAX_FRAME);
    frame
}

/// A flow of an installed service as the client opens it.
struct Flow {
    client: IpAddr,
    client_port: u16,
    frontend: IpAddr,
    frontend_port: u16,
    proto: u8,
    /// One of the frontend's backends (none for a service without endpoints).
    backend: Option<(IpAddr, u16)>,
}

impl Flow {
    fn pick(rng: &mut Rng, frontends: &[Frontend]) -> Flow {
        let frontend = rng.pick(frontends);
        let client = match frontend.addr {
            IpAddr::V4(_) => IpAddr::V4(*rng.pick(&CLIENTS_V4)),
            IpAddr::V6(_) => IpAddr::V6(*rng.pick(&CLIENTS_V6)),
        };
        let backend = if frontend.backends.is_empty() {
            None
        } else {
            Some(*rng.pick(&frontend.backends))
        };
        Flow {
            client,
            client_port: 40000 + rng.below(CLIENT_PORTS as usize) as u16,
            frontend: frontend.addr,
            frontend_port: frontend.port,
            proto: frontend.proto,
            backend,
        }
    }

    /// Where the backend's replies go: the client, or the hairpin address when the client is
    /// the backend itself.
    fn reply_to(&self) -> IpAddr {
        match (self.backend, self.client) {
            (Some((backend, _)), IpAddr::V4(_)) if backend == self.client => HAIRPIN.into(),
            (Some((backend, _)), IpAddr::V6(_)) if backend == self.client => HAIRPIN_V6.into(),
            _ => self.client,
        }
    }
}

/// An IP packet (no Ethernet header) of one of the generated kinds.
fn ip(rng: &mut Rng, frontends: &[Frontend]) -> Vec<u8> {
    let flow = Flow::pick(rng, frontends);
    match rng.below(100) {
        0..=39 => client_to_frontend(rng, &flow),
        40..=59 => backend_reply(rng, &flow),
        60..=76 => icmp_error(rng, &flow),
        77..=81 => echo(rng, &flow),
        82..=89 => tunnel_shaped(rng, frontends),
        _ => random_upper_layer(rng, &flow),
    }
}

fn client_to_frontend(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let l4 = l4(rng, flow.proto, flow.client_port, flow.frontend_port);
    ip_packet(flow.client, flow.frontend, flow.proto, &l4, rng.percent(70))
}

fn backend_reply(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let Some((backend, port)) = flow.backend else {
        return client_to_frontend(rng, flow);
    };
    let l4 = l4(rng, flow.proto, port, flow.client_port);
    ip_packet(backend, flow.reply_to(), flow.proto, &l4, rng.percent(70))
}

/// TCP with any flags, or UDP, with a payload of a size that sometimes no longer fits the
/// tunnel.
fn l4(rng: &mut Rng, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let payload_len = match rng.below(10) {
        0..=5 => rng.below(32),
        6..=8 => rng.below(400),
        _ => 1380 + rng.below(140),
    };
    let payload = rng.bytes(payload_len);
    if proto == PROTO_TCP {
        let any = rng.byte();
        let flags = *rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x12, any]);
        tcp_header(sport, dport, flags, &payload)
    } else {
        udp_header(sport, dport, &payload)
    }
}

/// An ICMP error about the flow: from the backend or a router quoting the translated packet,
/// from the client quoting a reply, or quoting garbage; the quote whole or cut anywhere.
fn icmp_error(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let v4 = flow.client.is_ipv4();
    let translated = flow.backend.map(|(backend, port)| {
        let l4 = l4(rng, flow.proto, flow.client_port, port);
        ip_packet(flow.client, backend, flow.proto, &l4, true)
    });
    let router: IpAddr = if v4 {
        ROUTER_V4.into()
    } else {
        ROUTER_V6.into()
    };
    let (src, dst, mut quote) = match (rng.below(4), translated) {
        (0, Some(quote)) => (flow.backend.unwrap().0, flow.client, quote),
        (1, Some(quote)) => (router, flow.client, quote),
        (2, _) => {
            let l4 = l4(rng, flow.proto, flow.frontend_port, flow.client_port);
            let reply = ip_packet(flow.frontend, flow.client, flow.proto, &l4, true);
            (flow.client, flow.frontend, reply)
        }
        _ => (router, flow.client, garbage_quote(rng, v4)),
    };
    if rng.percent(50) {
        quote.truncate(rng.below(quote.len() + 1));
    }
    let (kind, code, rest) = icmp_error_kind(rng, v4);
    let proto = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    ip_packet(
        src,
        dst,
        proto,
        &icmp_message(kind, code, rest, &quote),
        false,
    )
}

fn garbage_quote(rng: &mut Rng, v4: bool) -> Vec<u8> {
    let header_len = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    let len = header_len + rng.below(40);
    let mut quote = rng.bytes(len);
    if rng.percent(70) {
        // The right version, so the program reads on into the garbage.
        quote[0] = if v4 { 0x45 } else { 0x60 };
    }
    quote
}

fn icmp_error_kind(rng: &mut Rng, v4: bool) -> (u8, u8, [u8; 4]) {
    let mtu = [0, 0, 0x05, 0xaa];
    if rng.percent(10) {
        return (rng.byte(), rng.byte(), [0; 4]);
    }
    let code = rng.below(16) as u8;
    if v4 {
        *rng.pick(&[(3, code, mtu), (11, code % 2, [0; 4]), (12, 0, [0; 4])])
    } else {
        *rng.pick(&[
            (1, code % 8, [0; 4]),
            (2, 0, mtu),
            (3, code % 2, [0; 4]),
            (4, code % 3, [0; 4]),
        ])
    }
}

fn echo(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let (proto, kind) = if flow.client.is_ipv4() {
        (PROTO_ICMP, *rng.pick(&[8, 0]))
    } else {
        (PROTO_ICMPV6, *rng.pick(&[128, 129]))
    };
    let len = rng.below(64);
    let body = rng.bytes(len);
    let message = icmp_message(kind, 0, [0, 1, 0, 1], &body);
    ip_packet(flow.client, flow.frontend, proto, &message, false)
}

/// What a tunnel carries, seen before decapsulation: VXLAN, IPIP and IPv6-in-IPv4 to this
/// node, around a packet of a flow.
fn tunnel_shaped(rng: &mut Rng, frontends: &[Frontend]) -> Vec<u8> {
    let flow = Flow::pick(rng, frontends);
    let inner = client_to_frontend(rng, &flow);
    let (node1, node2) = (IpAddr::V4(NODE1), IpAddr::V4(NODE2));
    match rng.below(3) {
        0 => {
            let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, rng.byte(), 0];
            vxlan.extend_from_slice(&frame_of(&inner));
            let udp = udp_header(rng.u16() | 0xc000, VXLAN_PORT, &vxlan);
            ip_packet(node2, node1, PROTO_UDP, &udp, false)
        }
        _ => {
            let proto = if flow.client.is_ipv4() {
                PROTO_IPIP
            } else {
                PROTO_IPV6_IN_IP
            };
            ip_packet(node2, node1, proto, &inner, false)
        }
    }
}

/// Any protocol number, any payload, behind a well-formed IP header.
fn random_upper_layer(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let any = rng.byte();
    let proto = *rng.pick(&[any, PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6]);
    let len = rng.below(80);
    let l4 = rng.bytes(len);
    ip_packet(flow.client, flow.frontend, proto, &l4, rng.percent(50))
}

fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let any = rng.u16();
    let ethertype = *rng.pick(&[ETH_P_IP, ETH_P_IPV6, 0x0806, 0x8100, any]);
    let mut frame = ethernet(ethertype);
    let len = rng.below(200);
    frame.extend_from_slice(&rng.bytes(len));
    frame
}

/// `inner` (an IP packet) as an old kernel's IPIP device shows it: behind the outer Ethernet
/// and IPv4 headers.
fn old_ipip_layout(inner: &[u8]) -> Vec<u8> {
    let outer = ip_packet(NODE2.into(), NODE1.into(), PROTO_IPIP, inner, false);
    frame_of(&outer)
}

/// One to three mutations of the frame whose IP header is at `l3`, checksums then recomputed
/// half of the time (so the program's checksum updates also meet valid inputs).
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, l3: usize) {
    for _ in 0..1 + rng.below(3) {
        match rng.below(13) {
            0 | 1 => truncate(rng, frame, l3),
            2 => lie_about_header_length(rng, frame, l3),
            3 => lie_about_length(rng, frame, l3),
            4 => ipv4_options(rng, frame, l3),
            5 => ipv6_extension_chain(rng, frame, l3),
            6 => fragment(rng, frame, l3),
            7 | 8 => flip_bits(rng, frame, l3),
            9 => {
                let at = rng.below(frame.len());
                frame[at] = rng.byte();
            }
            10 => {
                let any = rng.u16();
                let ethertype = *rng.pick(&[ETH_P_IP, ETH_P_IPV6, 0x0806, any]);
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
            11 => {
                let len = 1 + rng.below(64);
                let trailer = rng.bytes(len);
                frame.extend_from_slice(&trailer);
            }
            _ => scribble_over_upper_layer(rng, frame, l3),
        }
    }
    if rng.percent(50) {
        repair_checksums(frame, l3);
    }
}

/// Cut anywhere, though mostly within the headers.
fn truncate(rng: &mut Rng, frame: &mut Vec<u8>, l3: usize) {
    let room = frame.len().saturating_sub(ETH_HLEN);
    if room == 0 {
        return;
    }
    let within = if rng.percent(70) {
        room.min(l3 - ETH_HLEN + 100)
    } else {
        room
    };
    frame.truncate(ETH_HLEN + rng.below(within));
}

fn lie_about_header_length(rng: &mut Rng, frame: &mut [u8], l3: usize) {
    if let Some(first) = frame.get_mut(l3) {
        *first = (*first & 0xf0) | rng.below(16) as u8;
    }
}

/// IPv4's total length or IPv6's payload length: random, or a few bytes off.
fn lie_about_length(rng: &mut Rng, frame: &mut [u8], l3: usize) {
    let Some(ip) = parse_ip_header(frame, l3) else {
        return;
    };
    let (at, honest) = if ip.family == 4 {
        (l3 + 2, frame.len() - l3)
    } else {
        (l3 + 4, frame.len().saturating_sub(l3 + IPV6_HLEN))
    };
    let lie = match rng.below(3) {
        0 => rng.u16(),
        1 => (honest as u16)
            .wrapping_add(rng.below(16) as u16)
            .wrapping_sub(8),
        _ => (ip.header_len + rng.below(12)) as u16,
    };
    frame[at..at + 2].copy_from_slice(&lie.to_be_bytes());
}

fn ipv4_options(rng: &mut Rng, frame: &mut Vec<u8>, l3: usize) {
    let Some(ip) = parse_ip_header(frame, l3).filter(|ip| ip.family == 4 && ip.l4 <= frame.len())
    else {
        return;
    };
    let words = 1 + rng.below(10);
    let options: Vec<u8> = match rng.below(4) {
        0 => vec![1; words * 4],
        1 => vec![0; words * 4],
        // Record route, its length byte possibly a lie.
        2 => {
            let mut o = vec![7, rng.byte(), 4];
            o.resize(words * 4, 0);
            o
        }
        _ => rng.bytes(words * 4),
    };
    frame.splice(ip.l4..ip.l4, options);
    let ihl = (ip.header_len / 4 + words).min(15) as u8;
    frame[l3] = 0x40 | ihl;
    let total = (ip.l4_len + ip.header_len + words * 4) as u16;
    frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
}

/// A chain of IPv6 extension headers: any order, loops of one type, lengths that overrun.
fn ipv6_extension_chain(rng: &mut Rng, frame: &mut Vec<u8>, l3: usize) {
    // A frame an earlier mutation cut inside the header has nowhere to put the chain.
    let Some(ip) = parse_ip_header(frame, l3).filter(|ip| ip.family == 6 && ip.l4 <= frame.len())
    else {
        return;
    };
    let looping = rng.percent(20);
    let kinds: Vec<u8> = (0..1 + rng.below(6))
        .map(|_| {
            let any = rng.byte();
            *rng.pick(&[0, 60, 43, 44, 51, 135, any])
        })
        .collect();
    let mut chain = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let next = match kinds.get(i + 1) {
            _ if looping => kind,
            Some(&next) => next,
            None => ip.proto,
        };
        let length_field = if rng.percent(80) {
            rng.below(3) as u8
        } else {
            rng.byte()
        };
        // Never more than 64 bytes follow, whatever the length field claims.
        let body = match kind {
            44 => 6,
            51 => (usize::from(length_field) + 2) * 4 - 2,
            _ => (usize::from(length_field) + 1) * 8 - 2,
        };
        chain.extend_from_slice(&[next, length_field]);
        chain.extend_from_slice(&rng.bytes(body.min(64)));
    }
    let inserted = chain.len();
    frame.splice(ip.l4..ip.l4, chain);
    frame[l3 + 6] = kinds[0];
    if rng.percent(80) {
        let payload = (ip.l4_len + inserted) as u16;
        frame[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
    }
}

/// IPv4 More Fragments and offsets, or an IPv6 fragment header.
fn fragment(rng: &mut Rng, frame: &mut Vec<u8>, l3: usize) {
    let Some(ip) = parse_ip_header(frame, l3).filter(|ip| ip.l4 <= frame.len()) else {
        return;
    };
    let offset = rng.below(0x2000) as u16;
    let more = if rng.percent(60) { 0x2000 } else { 0 };
    let dont = if rng.percent(20) { 0x4000 } else { 0 };
    if ip.family == 4 {
        let field = dont | more | if rng.percent(50) { offset } else { 0 };
        frame[l3 + 6..l3 + 8].copy_from_slice(&field.to_be_bytes());
    } else {
        let mut header = vec![ip.proto, 0];
        header.extend_from_slice(&((offset << 3) | (more >> 13)).to_be_bytes());
        header.extend_from_slice(&rng.bytes(4));
        frame.splice(ip.l4..ip.l4, header);
        frame[l3 + 6] = 44;
        let payload = (ip.l4_len + 8) as u16;
        frame[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
    }
}

/// Flips one to eight bits, mostly within the headers.
fn flip_bits(rng: &mut Rng, frame: &mut [u8], l3: usize) {
    let headers = frame.len().min(l3 + 80);
    for _ in 0..1 + rng.below(8) {
        let at = if rng.percent(70) {
            rng.below(headers)
        } else {
            rng.below(frame.len())
        };
        frame[at] ^= 1 << rng.below(8);
    }
}

fn scribble_over_upper_layer(rng: &mut Rng, frame: &mut [u8], l3: usize) {
    let Some(ip) = parse_ip_header(frame, l3) else {
        return;
    };
    let end = frame.len().min(ip.l4 + 48);
    if end <= ip.l4 {
        return;
    }
    for _ in 0..1 + rng.below(6) {
        let at = ip.l4 + rng.below(end - ip.l4);
        frame[at] = rng.byte();
    }
}
