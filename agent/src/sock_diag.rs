//! Connected UDP sockets of the node's own processes whose backend went away.
//!
//! Host services translate a socket once, at `connect`: a connected UDP socket then talks to its
//! backend directly, and no packet of it passes a point where Weir could choose again. When that
//! backend stops serving, the socket would send into the void until the application gives up. So
//! the agent aborts such sockets through the kernel's socket diagnostics (`SOCK_DESTROY`, which
//! needs `CONFIG_INET_DIAG_DESTROY`): the socket is disconnected with `ECONNABORTED` pending, so
//! the application's next receive fails with that and its next send with `EDESTADDRREQ`, and
//! its reconnect is balanced afresh. Only sockets Weir translated to a retired endpoint of one of
//! the retiring Service's frontends are touched (the socket cookie and backend must be in
//! `WEIR_SOCK_REVERSE`), never a socket that named the endpoint's address itself.
//!
//! TCP sockets are left alone: their backend's reset (or the retired conntrack entries) ends
//! them. Kernels without `CONFIG_INET_DIAG_DESTROY` answer `EOPNOTSUPP`: the sockets then
//! recover only when the application times out and reconnects, which is logged once.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// `include/uapi/linux/sock_diag.h` and `inet_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HEADER: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST_LEN: usize = 56;
/// `struct inet_diag_msg` up to the end of its socket id.
const MESSAGE_ID_END: usize = 4 + SOCKID_LEN;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// A connected UDP socket is in the TCP_ESTABLISHED state.
const TCP_ESTABLISHED: u32 = 1;

/// One connected UDP socket of this network namespace, as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectedUdp {
    pub cookie: u64,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    family: u8,
    /// `struct inet_diag_sockid` as the kernel sent it: the destroy request names it back.
    id: [u8; SOCKID_LEN],
}

/// Every connected UDP socket (IPv4 and IPv6) of the calling thread's network namespace.
pub fn connected_udp_sockets() -> io::Result<Vec<ConnectedUdp>> {
    let socket = DiagSocket::open()?;
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let request = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            1 << TCP_ESTABLISHED,
            &[0; SOCKID_LEN],
        );
        socket.send(&request)?;
        socket.read_until_done(|body| {
            if body.len() < MESSAGE_ID_END {
                return;
            }
            let mut id = [0u8; SOCKID_LEN];
            id.copy_from_slice(&body[4..MESSAGE_ID_END]);
            if let Some(socket) = parse_id(body[0], id) {
                out.push(socket);
            }
        })?;
    }
    Ok(out)
}

/// Aborts one socket: its owner's next call fails (see the module's documentation).
pub fn abort(socket: &ConnectedUdp) -> io::Result<()> {
    let diag = DiagSocket::open()?;
    diag.send(&request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        socket.family,
        u32::MAX,
        &socket.id,
    ))?;
    diag.read_ack()
}

fn parse_id(family: u8, id: [u8; SOCKID_LEN]) -> Option<ConnectedUdp> {
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        match i32::from(family) {
            libc::AF_INET => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
            libc::AF_INET6 => {
                let octets: [u8; 16] = bytes[..16].try_into().ok()?;
                Some(Ipv6Addr::from(octets).into())
            }
            _ => None,
        }
    };
    let cookie_low = u32::from_ne_bytes(id[40..44].try_into().ok()?);
    let cookie_high = u32::from_ne_bytes(id[44..48].try_into().ok()?);
    Some(ConnectedUdp {
        cookie: u64::from(cookie_low) | (u64::from(cookie_high) << 32),
        local: SocketAddr::new(addr(&id[4..20])?, sport),
        peer: SocketAddr::new(addr(&id[20..36])?, dport),
        family,
        id,
    })
}

/// A netlink message: header and `struct inet_diag_req_v2` for UDP.
fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HEADER + REQUEST_LEN;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    out.extend_from_slice(&states.to_ne_bytes());
    out.extend_from_slice(id);
    out
}

/// A NETLINK_SOCK_DIAG socket, closed when dropped.
struct DiagSocket(std::os::fd::OwnedFd);

impl DiagSocket {
    fn open() -> io::Result<DiagSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )?;
        Ok(DiagSocket(fd))
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        sendto(
            self.0.as_raw_fd(),
            message,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    /// Hands every message body of a dump to `each`, until NLMSG_DONE.
    fn read_until_done(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.0.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
            for (kind, body) in messages(&buffer[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return error_of(body),
                    _ => each(body),
                }
            }
            if n == 0 {
                return Ok(());
            }
        }
    }

    fn read_ack(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut buffer = vec![0u8; 4096];
        let n = recv(self.0.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        let first = messages(&buffer[..n]).next();
        match first {
            Some((NLMSG_ERROR, body)) => error_of(body),
            _ => Err(io::Error::other("no acknowledgement from sock_diag")),
        }
    }
}

/// An NLMSG_ERROR body: 0 is success, else a negative errno.
fn error_of(body: &[u8]) -> io::Result<()> {
    let errno = body
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("four bytes")))
        .unwrap_or(-libc::EPROTO);
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

/// The (type, body) of each netlink message in one datagram.
fn messages(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(data[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        if len < NLMSG_HEADER || len > data.len() {
            return None;
        }
        let body = &data[NLMSG_HEADER..len];
        // Messages are 4-byte aligned.
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_id_round_trips_its_addresses_ports_and_cookie() {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&5353u16.to_be_bytes());
        id[4..8].copy_from_slice(&[198, 18, 0, 1]);
        id[20..24].copy_from_slice(&[198, 19, 1, 11]);
        id[40..44].copy_from_slice(&7u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        let socket = parse_id(libc::AF_INET as u8, id).unwrap();
        assert_eq!(socket.local, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(socket.peer, "198.19.1.11:5353".parse().unwrap());
        assert_eq!(socket.cookie, (1 << 32) | 7);
        let request = request(SOCK_DESTROY, NLM_F_REQUEST, socket.family, 0, &socket.id);
        assert_eq!(request.len(), NLMSG_HEADER + REQUEST_LEN);
        assert_eq!(&request[NLMSG_HEADER + 8..], &id);
    }
}
