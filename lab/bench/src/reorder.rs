//! A UDP client whose datagram arrives first fragment last (`weir-lab probe first-fragment-last`,
//! a UDP check's `first_fragment_last`): the order a node must cope with when a network
//! reorders fragments, made deterministic. The kernel fragments a datagram itself and sends the
//! first fragment first, and a qdisc that delays first fragments (prio + netem) is not in every
//! kernel the lab runs on; so the client cuts the datagram itself, to the route's path MTU, and
//! sends the fragments through a raw socket, later ones first. The answer comes back to an
//! ordinary UDP socket bound to the datagram's source, and is printed as socat prints it.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use weir_lab_backends::sys;

/// IPv4 header without options, and IPv6 fixed header plus fragment header.
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
const UDP_HLEN: usize = 8;
const PROTO_UDP: u8 = 17;
const IPV6_NEXT_FRAGMENT: u8 = 44;

#[derive(Debug, thiserror::Error)]
pub enum ReorderError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("a {size}-byte datagram fits a path MTU of {mtu}: nothing to reorder")]
    NotFragmented { size: usize, mtu: usize },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ReorderError {
    move |source| ReorderError::Io { what, source }
}

/// Sends `payload` to `target` in fragments, the first one last, and returns the answer.
pub fn request(
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ReorderError> {
    // Connected: the kernel picks the source address and knows the path MTU.
    let socket = connected(target, 0, timeout)?;
    let source = socket
        .local_addr()
        .map_err(io("reading the source address"))?;
    let mtu = path_mtu(&socket, target.is_ipv6())?;
    let datagram = udp_datagram(source, target, payload);
    let fragments = match (source.ip(), target.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => fragments4(s.octets(), d.octets(), &datagram, mtu),
        (IpAddr::V6(s), IpAddr::V6(d)) => fragments6(s.octets(), d.octets(), &datagram, mtu),
        _ => unreachable!("a socket connected to one family has a source of it"),
    };
    if fragments.len() < 2 {
        return Err(ReorderError::NotFragmented {
            size: datagram.len(),
            mtu,
        });
    }
    let raw = sys::raw_ip_socket(target.is_ipv6()).map_err(io("opening a raw socket"))?;
    // Later ones first, in order, then the first.
    for fragment in fragments[1..].iter().chain(&fragments[..1]) {
        sys::send_raw_packet(&raw, target.ip(), fragment).map_err(io("sending a fragment"))?;
    }
    let mut answer = vec![0u8; 65_536];
    let n = socket
        .recv(&mut answer)
        .map_err(io("waiting for the answer"))?;
    answer.truncate(n);
    Ok(answer)
}

/// The probe's entry: the answer on stdout, as socat prints it.
pub fn run(target: SocketAddr, size: u32, timeout: Duration) -> Result<(), ReorderError> {
    let answer = request(target, &datagram(Some(size)), timeout)?;
    print_answer(&answer)
}

/// One datagram to `target` the ordinary way (`weir-lab probe udp`, every other UDP check),
/// from `source_port` if given, and its answer on stdout. Unlike socat, which waits out its
/// linger time after every answer (a second per datagram, UDP having no end of stream), it
/// returns as soon as the answer is in. A "port unreachable" arrives as a refused receive:
/// the error says "Connection refused", as socat's does.
pub fn run_plain(
    target: SocketAddr,
    size: Option<u32>,
    source_port: Option<u16>,
    timeout: Duration,
) -> Result<(), ReorderError> {
    let socket = connected(target, source_port.unwrap_or(0), timeout)?;
    socket
        .send(&datagram(size))
        .map_err(io("sending the datagram"))?;
    let mut answer = vec![0u8; 65_536];
    let n = socket
        .recv(&mut answer)
        .map_err(io("waiting for the answer"))?;
    answer.truncate(n);
    print_answer(&answer)
}

/// A UDP socket bound to `port` of the target's family (0: the kernel picks one), connected to
/// `target`, its receives bounded by `timeout`.
fn connected(target: SocketAddr, port: u16, timeout: Duration) -> Result<UdpSocket, ReorderError> {
    let bind: SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    };
    let socket = UdpSocket::bind(bind).map_err(io("binding the UDP socket"))?;
    socket
        .connect(target)
        .map_err(io("connecting the UDP socket"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(io("setting the receive timeout"))?;
    Ok(socket)
}

fn print_answer(answer: &[u8]) -> Result<(), ReorderError> {
    let mut out = std::io::stdout().lock();
    out.write_all(answer)
        .and_then(|()| out.flush())
        .map_err(io("writing the answer"))
}

/// The path MTU the kernel holds for the connected socket's route (a learnt one included).
fn path_mtu(socket: &UdpSocket, v6: bool) -> Result<usize, ReorderError> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mtu = sys::int_option(socket, level, name).map_err(io("reading the path MTU"))?;
    Ok(mtu as usize)
}

/// The UDP header and payload, its checksum over the pseudo-header of `source` -> `target`.
fn udp_datagram(source: SocketAddr, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = (UDP_HLEN + payload.len()) as u16;
    let mut datagram = Vec::with_capacity(len as usize);
    datagram.extend_from_slice(&source.port().to_be_bytes());
    datagram.extend_from_slice(&target.port().to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    match (source.ip(), target.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, PROTO_UDP]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        (s, d) => {
            pseudo.extend_from_slice(&ip6_octets(s));
            pseudo.extend_from_slice(&ip6_octets(d));
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
        }
    }
    let sum = checksum(&[&pseudo, &datagram]);
    // A computed 0 is sent as all ones: 0 means "no checksum" (and is not allowed over IPv6).
    let sum = if sum == 0 { 0xffff } else { sum };
    datagram[6..8].copy_from_slice(&sum.to_be_bytes());
    datagram
}

fn ip6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

/// The Internet checksum (RFC 1071) of the concatenated parts, each of even length but the last.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A datagram id for the fragments: what the kernel would not be using for the same pair
/// right now is unknowable, so one from the clock.
fn fragment_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos());
    nanos | 1
}

/// The payload's share of each fragment: as much as fits `room`, a multiple of 8 bytes.
fn cuts(len: usize, room: usize) -> Vec<(usize, usize)> {
    let step = room & !7;
    (0..len)
        .step_by(step)
        .map(|start| (start, (start + step).min(len)))
        .collect()
}

/// IPv4 fragments (header checksum 0: the kernel fills it in on a raw socket).
fn fragments4(source: [u8; 4], target: [u8; 4], datagram: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let id = fragment_id() as u16;
    cuts(datagram.len(), mtu - IPV4_HLEN)
        .into_iter()
        .map(|(start, end)| {
            let more = if end < datagram.len() { 0x2000 } else { 0 };
            let flags_offset = more | (start / 8) as u16;
            let mut packet = Vec::with_capacity(IPV4_HLEN + end - start);
            packet.extend_from_slice(&[0x45, 0]);
            packet.extend_from_slice(&((IPV4_HLEN + end - start) as u16).to_be_bytes());
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(&flags_offset.to_be_bytes());
            packet.extend_from_slice(&[64, PROTO_UDP, 0, 0]);
            packet.extend_from_slice(&source);
            packet.extend_from_slice(&target);
            let sum = checksum(&[&packet]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            packet.extend_from_slice(&datagram[start..end]);
            packet
        })
        .collect()
}

/// IPv6 fragments, each with a fragment header.
fn fragments6(source: [u8; 16], target: [u8; 16], datagram: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let id = fragment_id();
    cuts(datagram.len(), mtu - IPV6_HLEN - IPV6_FRAG_HLEN)
        .into_iter()
        .map(|(start, end)| {
            let more = u16::from(end < datagram.len());
            let payload_len = (IPV6_FRAG_HLEN + end - start) as u16;
            let mut packet = Vec::with_capacity(IPV6_HLEN + payload_len as usize);
            packet.extend_from_slice(&[0x60, 0, 0, 0]);
            packet.extend_from_slice(&payload_len.to_be_bytes());
            packet.extend_from_slice(&[IPV6_NEXT_FRAGMENT, 64]);
            packet.extend_from_slice(&source);
            packet.extend_from_slice(&target);
            packet.extend_from_slice(&[PROTO_UDP, 0]);
            packet.extend_from_slice(&((start as u16) | more).to_be_bytes());
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(&datagram[start..end]);
            packet
        })
        .collect()
}

/// A datagram of `size` bytes (at least "ping\n"), newline-terminated for the echo server.
pub fn datagram(size: Option<u32>) -> Vec<u8> {
    let size = size.unwrap_or(5).max(5) as usize;
    let mut d = b"ping ".to_vec();
    d.resize(size - 1, b'x');
    d.push(b'\n');
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_sized_pings() {
        assert_eq!(datagram(None), b"ping\n");
        let big = datagram(Some(1400));
        assert_eq!(big.len(), 1400);
        assert!(big.starts_with(b"ping ") && big.ends_with(b"x\n"));
    }

    #[test]
    fn a_datagram_is_cut_in_multiples_of_eight_and_checksummed() {
        let source: SocketAddr = "198.18.0.201:40000".parse().unwrap();
        let target: SocketAddr = "198.18.0.1:30093".parse().unwrap();
        let datagram = udp_datagram(source, target, &[7u8; 3992]);
        assert_eq!(datagram.len(), 4000);
        let [IpAddr::V4(s), IpAddr::V4(d)] = [source.ip(), target.ip()] else {
            unreachable!()
        };
        let fragments = fragments4(s.octets(), d.octets(), &datagram, 1500);
        let sizes: Vec<usize> = fragments.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1500, 1500, 1060]);
        // More fragments on all but the last; offsets in 8-byte units.
        let flags: Vec<u16> = fragments
            .iter()
            .map(|f| u16::from_be_bytes([f[6], f[7]]))
            .collect();
        assert_eq!(flags, vec![0x2000, 0x2000 | 185, 370]);
        // Verifying a checksum over the pseudo-header and the whole datagram gives 0.
        let mut pseudo = s.octets().to_vec();
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&[0, PROTO_UDP, 0x0f, 0xa0]);
        assert_eq!(checksum(&[&pseudo, &datagram]), 0);
        let six = fragments6([0xfd; 16], [0xfe; 16], &datagram, 1450);
        let sizes: Vec<usize> = six.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1448, 1448, 1248]);
    }
}
