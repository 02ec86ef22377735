//! Packets built and read byte by byte, independently of the program under test and of any
//! parsing library: the checker must not share a parser's mistakes with what it checks.

use std::net::IpAddr;

use weir_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::common::{fold, ones_sum, MAC_A, MAC_B};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const ICMP_HLEN: usize = 8;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6_IN_IP: u8 = 41;
/// Where an old kernel's IPIP device shows the inner IPv4 header: behind the outer Ethernet and
/// IPv4 headers.
pub const OLD_IPIP_INNER_OFF: usize = ETH_HLEN + IPV4_HLEN;

pub fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(1600);
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// Where a protocol keeps its checksum, from the start of its header.
pub fn l4_checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// An IP packet (no Ethernet header) from `src` to `dst` carrying `l4`, every checksum
/// computed. Both addresses must be of one family.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], dont_fragment: bool) -> Vec<u8> {
    let mut packet = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
            h[2..4].copy_from_slice(&((IPV4_HLEN + l4.len()) as u16).to_be_bytes());
            if dont_fragment {
                h[6] = 0x40;
            }
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => panic!("{src} and {dst} are of different families"),
    };
    packet.extend_from_slice(l4);
    repair_checksums(&mut packet, 0);
    packet
}

/// `ip` behind an Ethernet header of its family.
pub fn frame_of(ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip.first().is_some_and(|b| b >> 4 == 6) {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    let mut frame = ethernet(ethertype);
    frame.extend_from_slice(ip);
    frame
}

pub fn tcp_header(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    h.extend_from_slice(&2000u32.to_be_bytes());
    h.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

pub fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    m
}

/// An IP header as the checker reads it: addresses as 16 bytes (IPv4 in the first four, as the
/// maps keep them), and the upper layer the header itself names (IPv6 extension headers are not
/// walked: the program passes such packets untouched).
#[derive(Clone, Copy, Debug)]
pub struct IpView {
    pub family: u8,
    pub l3: usize,
    pub header_len: usize,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Where the upper layer starts and how many bytes the header says it has.
    pub l4: usize,
    pub l4_len: usize,
    /// A fragment past the first: what lies at `l4` is payload, not the upper layer's header.
    pub later_fragment: bool,
}

impl IpView {
    pub fn end(&self) -> usize {
        self.l4 + self.l4_len
    }

    /// Offsets of the source and destination addresses.
    pub fn addr_offsets(&self) -> (usize, usize) {
        if self.family == 4 {
            (self.l3 + 12, self.l3 + 16)
        } else {
            (self.l3 + 8, self.l3 + 24)
        }
    }

    fn addr_len(&self) -> usize {
        if self.family == 4 {
            4
        } else {
            16
        }
    }
}

/// The IP header at `l3` when its fixed part and its own length lie within `data`; the upper
/// layer it declares may run past the end (see [`parse_ip`] for a whole packet).
pub fn parse_ip_header(data: &[u8], l3: usize) -> Option<IpView> {
    let first = *data.get(l3)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            if header_len < IPV4_HLEN || data.len() < l3 + header_len {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([data[l3 + 2], data[l3 + 3]]));
            let fragment_offset = u16::from_be_bytes([data[l3 + 6], data[l3 + 7]]) & 0x1fff;
            src[..4].copy_from_slice(&data[l3 + 12..l3 + 16]);
            dst[..4].copy_from_slice(&data[l3 + 16..l3 + 20]);
            Some(IpView {
                family: 4,
                l3,
                header_len,
                proto: data[l3 + 9],
                src,
                dst,
                l4: l3 + header_len,
                // A total length below the header's own is malformed; as a quote it is still
                // read (the program does not look at a quote's lengths).
                l4_len: total.saturating_sub(header_len),
                later_fragment: fragment_offset != 0,
            })
        }
        6 => {
            if data.len() < l3 + IPV6_HLEN {
                return None;
            }
            src.copy_from_slice(&data[l3 + 8..l3 + 24]);
            dst.copy_from_slice(&data[l3 + 24..l3 + 40]);
            let payload_len = usize::from(u16::from_be_bytes([data[l3 + 4], data[l3 + 5]]));
            let (proto, options_len, later_fragment) = ipv6_extensions(data, l3, payload_len);
            Some(IpView {
                family: 6,
                l3,
                header_len: IPV6_HLEN + options_len,
                proto,
                src,
                dst,
                l4: l3 + IPV6_HLEN + options_len,
                l4_len: payload_len - options_len,
                later_fragment,
            })
        }
        _ => None,
    }
}

/// Steps over extension headers as the program does (at most six, each whole within the
/// payload: hop-by-hop and destination options, a routing header without segments left, a
/// fragment header, after which a later fragment holds payload): the upper-layer protocol, the
/// headers' length, and whether it is a later fragment. Headers that do not fit are left in
/// place, as the program then drops or passes the packet.
fn ipv6_extensions(data: &[u8], l3: usize, payload_len: usize) -> (u8, usize, bool) {
    let mut next = data[l3 + 6];
    let mut len = 0;
    for _ in 0..6 {
        if next != 0 && next != 60 && next != 43 && next != 44 {
            break;
        }
        let at = l3 + IPV6_HLEN + len;
        let Some(header) = data.get(at..at + 8) else {
            break;
        };
        if next == 43 && header[3] != 0 {
            break;
        }
        let grown = len
            + if next == 44 {
                8
            } else {
                (usize::from(header[1]) + 1) * 8
            };
        if grown > payload_len {
            break;
        }
        let later = next == 44 && u16::from_be_bytes([header[2], header[3]]) >> 3 != 0;
        next = header[0];
        len = grown;
        if later {
            return (next, len, true);
        }
    }
    (next, len, false)
}

/// The IP packet at `l3`, when everything its header declares lies within `data`.
pub fn parse_ip(data: &[u8], l3: usize) -> Option<IpView> {
    parse_ip_header(data, l3).filter(|ip| ip.end() <= data.len())
}

/// The sum of the pseudo header TCP, UDP and ICMPv6 checksums cover.
pub fn pseudo_header_sum(ip: &IpView, l4_len: usize) -> u64 {
    let addr_len = ip.addr_len();
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&ip.src[..addr_len]);
    pseudo.extend_from_slice(&ip.dst[..addr_len]);
    pseudo.extend_from_slice(&(l4_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ip.proto]);
    ones_sum(&pseudo)
}

/// What a checksum's coverage sums to, the checksum field included, with one's complement's
/// two zeros made one: 0xffff when the checksum is right. `l4_bytes` is the part of the upper
/// layer present (a quote may be cut short); it must start at an even offset of the packet.
pub fn l4_residual(ip: &IpView, l4_bytes: &[u8]) -> u16 {
    let pseudo = match ip.proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => pseudo_header_sum(ip, ip.l4_len),
        _ => 0,
    };
    normalise(fold(pseudo + ones_sum(l4_bytes)))
}

/// IPv4's header checksum residual (0xffff when right).
pub fn ipv4_header_residual(data: &[u8], ip: &IpView) -> u16 {
    normalise(fold(ones_sum(&data[ip.l3..ip.l4])))
}

fn normalise(sum: u16) -> u16 {
    if sum == 0 {
        0xffff
    } else {
        sum
    }
}

/// Recomputes the IPv4 header checksum and the upper layer's checksum of the IP packet at
/// `l3`, wherever the headers are whole; a packet too broken for that is left as it is.
pub fn repair_checksums(data: &mut [u8], l3: usize) {
    let Some(ip) = parse_ip_header(data, l3) else {
        return;
    };
    if ip.family == 4 {
        data[l3 + 10] = 0;
        data[l3 + 11] = 0;
        let csum = !fold(ones_sum(&data[l3..ip.l4]));
        data[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
    }
    let Some(csum_off) = l4_checksum_offset(ip.proto) else {
        return;
    };
    if ip.end() > data.len() || ip.l4_len < csum_off + 2 {
        return;
    }
    if (ip.proto == PROTO_ICMP && ip.family != 4) || (ip.proto == PROTO_ICMPV6 && ip.family != 6) {
        return;
    }
    let at = ip.l4 + csum_off;
    data[at] = 0;
    data[at + 1] = 0;
    let mut csum = !fold(
        if ip.proto == PROTO_ICMP {
            0
        } else {
            pseudo_header_sum(&ip, ip.l4_len)
        } + ones_sum(&data[ip.l4..ip.end()]),
    );
    if csum == 0 && ip.proto == PROTO_UDP {
        // Zero would mean "no checksum".
        csum = 0xffff;
    }
    data[at..at + 2].copy_from_slice(&csum.to_be_bytes());
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}
