//! An underlay that delivers tunnelled datagrams first fragment last (a UDP check's
//! `tunnel_first_fragment_last`): the reordering a multipath underlay causes between the node a
//! client reached and the node that translates its datagram (DSR), made deterministic. The
//! client's own reordering does not survive that far: the ingress node holds the later
//! fragments for their first and sends them on in order.
//!
//! On the lab's fabric, the port towards the receiving node redirects (tc `u32` + `mirred`)
//! every VXLAN frame over IPv4 that carries a first fragment (IPv4 or IPv6 inside) into a veth
//! pair; `weir-lab probe delay-frames` reads them from its other end and sends each, `delay`
//! later, out of the port with `PACKET_QDISC_BYPASS`, past the filter. The later fragments go
//! straight through and arrive first. Not on the nodes' own interfaces: their tc hooks run
//! Weir's programs, whose verdicts end the hook before a filter's turn (TCX), and a prio +
//! netem qdisc is not in every kernel the lab runs on.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::net::if_::if_nametoindex;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::sys;

/// The VXLAN port the lab's agents use (the agent's default `[tunnel] vxlan_port`).
pub const VXLAN_PORT: u16 = 4789;

/// The redirect filters' match clauses, offsets from the outer IPv4 header (20 bytes, no
/// options): an unfragmented or head outer fragment (the inner headers are in it) of UDP to
/// `vxlan_port`, whose inner frame (outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14: the inner
/// IP header at 50) is an IPv4 first fragment (MF set, offset 0) or an IPv6 packet with a
/// fragment header right after its fixed header whose offset is 0 and M set.
pub fn first_fragment_matches(vxlan_port: u16) -> [Vec<String>; 2] {
    let outer = format!(
        "match ip protocol 17 0xff match u16 0 0x1fff at 6 match u16 {vxlan_port} 0xffff at 22"
    );
    let inner4 = "match u16 0x0800 0xffff at 48 match u16 0x2000 0x3fff at 56";
    let inner6 =
        "match u16 0x86dd 0xffff at 48 match u8 44 0xff at 56 match u16 0x0001 0xfff9 at 92";
    [inner4, inner6].map(|inner| {
        format!("{outer} {inner}")
            .split(' ')
            .map(str::to_owned)
            .collect()
    })
}

/// The line the delayer prints once it reads its interface: frames redirected before are lost.
pub const READY: &str = "delaying";
/// How long the delayer may take to print [`READY`].
pub const READY_WAIT: Duration = Duration::from_secs(5);

/// The delayer never runs longer than this, whatever it is asked.
const MAX_LIFE: Duration = Duration::from_secs(600);
/// How long one wait for a frame lasts: the life is checked between waits.
const RECV_WAIT: Duration = Duration::from_millis(200);
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;

#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("no interface {0:?}")]
    NoInterface(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DelayError {
    let what = what.into();
    move |source| DelayError::Io { what, source }
}

/// Sends every IPv4 frame that arrives on `from` out of `to`, `delay` after it came, until
/// `life` (at most [`MAX_LIFE`]) has passed.
pub fn run(from: &str, to: &str, delay: Duration, life: Duration) -> Result<(), DelayError> {
    let input = packet_socket(from, ETH_P_ALL)?;
    let output = packet_socket(to, 0)?;
    sys::set_int_option(&output, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)
        .map_err(io("PACKET_QDISC_BYPASS"))?;
    let wait = TimeVal::microseconds(RECV_WAIT.as_micros() as i64);
    setsockopt(&input, sockopt::ReceiveTimeout, &wait).map_err(|e| io("SO_RCVTIMEO")(e.into()))?;
    println!("{READY}: IPv4 frames from {from} to {to}, {delay:?} late");
    let started = Instant::now();
    let mut frame = vec![0u8; 65_536];
    let mut delayed = 0u64;
    while started.elapsed() < life.min(MAX_LIFE) {
        let Some(len) = receive(&input, &mut frame)? else {
            continue;
        };
        if len < 14 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
            continue;
        }
        let frame = &mut frame[..len];
        complete_udp_checksum(frame);
        std::thread::sleep(delay);
        sys::send(&output, frame).map_err(io(format!("sending on {to}")))?;
        delayed += 1;
        println!("delayed frame {delayed} ({len} bytes)");
    }
    Ok(())
}

/// Writes the UDP checksum of an unfragmented IPv4 frame whole. Taken from a redirect, a frame
/// whose checksum the interface was to finish (checksum offload) carries only its start, which
/// the receiver would reject; a fragmented datagram's was finished before it was cut.
fn complete_udp_checksum(frame: &mut [u8]) {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[ETH + 9] != 17 {
        return;
    }
    let flags_offset = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]);
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    if flags_offset & 0x3fff != 0 || ihl < 20 || total < ihl + 8 || frame.len() < ETH + total {
        return;
    }
    let (header, rest) = frame[ETH..ETH + total].split_at_mut(ihl);
    rest[6..8].copy_from_slice(&[0, 0]);
    let udp_len = (rest.len() as u16).to_be_bytes();
    let pseudo = [&header[12..20], &[0, 17][..], &udp_len[..]].concat();
    let mut sum: u32 = 0;
    for part in [&pseudo[..], &rest[..]] {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // 0 means "no checksum" in UDP over IPv4: the computed 0 is sent as its other form.
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    rest[6..8].copy_from_slice(&checksum.to_be_bytes());
}

/// A raw packet socket bound to `ifname`, receiving `protocol` (0: nothing).
fn packet_socket(ifname: &str, protocol: u16) -> Result<OwnedFd, DelayError> {
    let ifindex = if_nametoindex(ifname).map_err(|_| DelayError::NoInterface(ifname.to_owned()))?;
    sys::packet_socket(ifindex, protocol).map_err(io(format!("AF_PACKET socket on {ifname}")))
}

/// The next frame that came in (not one the interface sent), or None when the wait ran out.
fn receive(socket: &OwnedFd, frame: &mut [u8]) -> Result<Option<usize>, DelayError> {
    match sys::receive_frame(socket, frame) {
        Ok((_, libc::PACKET_OUTGOING)) => Ok(None),
        Ok((len, _)) => Ok(Some(len)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io("receiving")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_udp_checksum_is_completed() {
        // Ethernet, IPv4 198.18.0.1 -> 198.18.0.3, UDP 1000 -> 4789 with 4 bytes and a partial
        // checksum.
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&[
            0x45, 0, 0, 32, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 3,
        ]);
        frame.extend_from_slice(&[0x03, 0xe8, 0x12, 0xb5, 0, 12, 0xab, 0xcd, 1, 2, 3, 4]);
        complete_udp_checksum(&mut frame);
        let udp = &frame[34..];
        let mut sum: u32 = 0;
        let pseudo = [198, 18, 0, 1, 198, 18, 0, 3, 0, 17, 0, 12];
        for pair in pseudo.chunks(2).chain(udp.chunks(2)) {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "the checksum verifies");
    }

    #[test]
    fn the_filters_match_outer_udp_to_the_vxlan_port_and_an_inner_first_fragment() {
        let [v4, v6] = first_fragment_matches(4789);
        let v4 = v4.join(" ");
        assert!(v4.starts_with("match ip protocol 17 0xff match u16 0 0x1fff at 6"));
        assert!(v4.contains("match u16 4789 0xffff at 22"));
        assert!(v4.ends_with("match u16 0x2000 0x3fff at 56"));
        assert!(v6.join(" ").ends_with("match u16 0x0001 0xfff9 at 92"));
    }
}
