//! Host services: connect-time load balancing for sockets of the node itself (cgroup sock_addr
//! hooks), as Cilium's and Calico's socket load balancers do.
//!
//! A process in the node's network namespace (kubelet, hostNetwork pods, a shell) sends its
//! packets out of the node, not into it, so the tc programs never see them on ingress. Instead
//! of translating packets, these programs rewrite the address a socket asks for: `connect` and
//! unconnected `sendmsg` to a service frontend go to a backend chosen by the same maps and rules
//! as the tc path (ready, else serving-terminating endpoints; `internalTrafficPolicy: Local`;
//! session affinity, with the node as the one client; random slots where external traffic
//! would use Maglev, whose hash needs the client's port). The socket then talks to the backend
//! directly, so the tc programs see a flow to a backend address, find no service and let it
//! pass: nothing is translated twice, and no conntrack entry is needed, so such connections
//! outlive any agent restart.
//!
//! What the application sees stays the service: `recvmsg` rewrites the source of UDP replies,
//! and `getpeername` the peer, back to the frontend, from `WEIR_SOCK_REVERSE` (socket cookie +
//! backend -> frontend), which `connect`/`sendmsg` fill.
//!
//! Outcomes a socket sees:
//! - a service without any endpoint: `connect` is sent to the loopback address's port 0, which
//!   refuses, so TCP gets `ECONNREFUSED` at once and connected UDP on its next receive, as the
//!   tc path's ICMP port unreachable gives pods; unconnected `sendmsg` fails with `EPERM`.
//! - `Local` policy with endpoints only on other nodes, or a backend missing from its map:
//!   `EPERM` (the tc path drops these; failing the call at once is kinder than a timeout).
//! - anything else (another namespace, another protocol, an address that is no frontend):
//!   untouched.
//!
//! Only sockets of the network namespace named in `WEIR_SOCK_NETNS` are translated (0 = every
//! namespace): pods keep the tc path, which knows their own address (hairpin, affinity per pod).
//!
//! Verifier notes: the context's address fields are read and written one `u32` at a time with
//! volatile accesses, since older kernels refuse wider or narrower accesses to them. The
//! frontend's service value is borrowed from its map, and choosing (`pick`, with the tc path's
//! `select_backend` below it) and rewriting (`commit`) are calls of their own, so their locals
//! never share the call chain: 5.10 and 6.1 count the chain's frames whole against 512 bytes.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use weir_common::{
    service_flags, Addr, CtKey, FrontendKey, HostAddrKey, ServiceValue, SockReverseKey, FAMILY_V4,
    FAMILY_V6, PROTO_TCP, PROTO_UDP,
};

use crate::lb::{select_backend, Scope, NO_BACKEND};
use crate::maps::{BACKENDS, HOST_ADDRS, SERVICES, SOCK_NETNS, SOCK_REVERSE, TUNNEL_PEERS};
use crate::packet::{ktime, Ip};
use crate::Flow;

/// sock_addr programs allow the call with 1 and fail it (`EPERM`) with 0.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn weir_connect4(ctx: SockAddrContext) -> i32 {
    forward::<FAMILY_V4>(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn weir_connect6(ctx: SockAddrContext) -> i32 {
    forward::<FAMILY_V6>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<FAMILY_V4>(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<FAMILY_V6>(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn weir_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn weir_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn weir_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn weir_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6);
    ALLOW
}

/// The socket address the call names (destination for connect/sendmsg, source of a received
/// datagram for recvmsg, peer for getpeername).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: u8) -> Addr {
    let sa = ctx.sock_addr;
    let mut words = [0u32; 4];
    // SAFETY: `sa` is the program's context, valid for the run; each field is read with the
    // 4-byte access the kernel allows for it.
    unsafe {
        if family == FAMILY_V4 {
            words[0] = read_volatile(addr_of!((*sa).user_ip4));
        } else {
            words[0] = read_volatile(addr_of!((*sa).user_ip6[0]));
            words[1] = read_volatile(addr_of!((*sa).user_ip6[1]));
            words[2] = read_volatile(addr_of!((*sa).user_ip6[2]));
            words[3] = read_volatile(addr_of!((*sa).user_ip6[3]));
        }
    }
    // The words hold the address in network order, as in memory: keep the bytes as they are.
    let mut addr = Addr::UNSPECIFIED;
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr.bytes[i * 4] = b[0];
        addr.bytes[i * 4 + 1] = b[1];
        addr.bytes[i * 4 + 2] = b[2];
        addr.bytes[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: u8, addr: &Addr, port_be: u16) {
    let sa = ctx.sock_addr;
    let word = |i: usize| {
        u32::from_ne_bytes([
            addr.bytes[i * 4],
            addr.bytes[i * 4 + 1],
            addr.bytes[i * 4 + 2],
            addr.bytes[i * 4 + 3],
        ])
    };
    // SAFETY: as in `user_addr`; these fields are writable for every hook that calls this
    // (connect, sendmsg, recvmsg, getpeername), with 4-byte stores.
    unsafe {
        if family == FAMILY_V4 {
            write_volatile(addr_of_mut!((*sa).user_ip4), word(0));
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), word(0));
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), word(1));
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), word(2));
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), word(3));
        }
        // The port field holds the port in network order in its low 16 bits.
        write_volatile(addr_of_mut!((*sa).user_port), port_be as u32);
    }
}

#[inline(always)]
fn user_port_be(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the program's context; a 4-byte read of a readable field.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) as u16 }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: as above.
    let proto = unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) };
    if proto == PROTO_TCP as u32 || proto == PROTO_UDP as u32 {
        proto as u8
    } else {
        0
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Whether the socket lives in the namespace the agent serves (or the agent serves all).
#[inline(always)]
fn in_served_netns(ctx: &SockAddrContext) -> bool {
    let wanted = match SOCK_NETNS.get(0) {
        Some(cookie) if *cookie != 0 => *cookie,
        _ => return true,
    };
    // SAFETY: the helper takes the program's own context.
    let actual = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    actual == wanted
}

/// Translates a connect or sendmsg to a frontend; returns the program's verdict.
#[inline(always)]
fn forward<const FAMILY: u8>(ctx: &SockAddrContext, connect: bool) -> i32 {
    let family = FAMILY;
    let proto = protocol(ctx);
    // sendmsg hooks only see unconnected sends; only UDP has those worth translating.
    if proto == 0 || (!connect && proto != PROTO_UDP) || !in_served_netns(ctx) {
        return ALLOW;
    }
    let frontend = FrontendKey {
        addr: user_addr(ctx, family),
        port_be: user_port_be(ctx),
        proto,
        family,
    };
    let Some(service) = find_frontend(&frontend) else {
        return ALLOW;
    };
    // External frontends with `Local` policy still reach every endpoint from the node itself,
    // as kube-proxy does for traffic the node sends; `internalTrafficPolicy: Local` holds.
    let local_only = service.flags & service_flags::LOCAL_ONLY != 0
        && service.flags & service_flags::EXTERNAL == 0;
    let backend_id = pick(&frontend, service, local_only);
    if backend_id == PICK_FAILED || (backend_id == NO_BACKEND && !connect) {
        return REJECT;
    }
    commit::<FAMILY>(ctx, &frontend, backend_id)
}

/// Returned by [`pick`] when no backend may be chosen (no local one, a missing slot).
const PICK_FAILED: u32 = u32::MAX;

/// Chooses a backend id for a connecting socket, or [`NO_BACKEND`] / [`PICK_FAILED`]. A call of
/// its own so its locals and the selection's are never on the stack together with
/// [`commit`]'s: kernels before 6.x count every frame of a call chain whole.
#[inline(never)]
fn pick(frontend: &FrontendKey, service: &ServiceValue, local_only: bool) -> u32 {
    let ip = Ip {
        family: frontend.family,
        l3_off: 0,
        // The node is the client: every host process shares its affinity.
        saddr: Addr::UNSPECIFIED,
        daddr: frontend.addr,
        proto: frontend.proto,
        ..Ip::EMPTY
    };
    let flow = Flow {
        key: CtKey::default(),
        now: ktime(),
        sport_be: 0,
        dport_be: frontend.port_be,
        seen: 0,
        remote: false,
        backend_id: 0,
    };
    // Maglev hashes the client's address and port, which a connecting socket does not have
    // yet: every host connection would hash alike and land on one backend. Random slots.
    let mut service = *service;
    service.flags &= !service_flags::MAGLEV;
    let scope = if local_only { Scope::Local } else { Scope::Any };
    select_backend(&ip, &flow, &service, scope).unwrap_or(PICK_FAILED)
}

/// Points the socket at the backend (remembering the way back), or at loopback's port 0 when
/// the service has no endpoint, so the connect is refused. Returns the program's verdict. One
/// copy per family: the verifier must see which context fields a program writes, and a
/// family read from memory would let it explore IPv6 stores in a connect4 program.
#[inline(never)]
fn commit<const FAMILY: u8>(ctx: &SockAddrContext, frontend: &FrontendKey, backend_id: u32) -> i32 {
    let family = FAMILY;
    if backend_id == NO_BACKEND {
        let loopback = if family == FAMILY_V4 {
            Addr::from_v4([127, 0, 0, 1])
        } else {
            let mut one = Addr::UNSPECIFIED;
            one.bytes[15] = 1;
            one
        };
        set_user_addr(ctx, family, &loopback, 0);
        return ALLOW;
    }
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        return REJECT;
    };
    if backend.family != family {
        return REJECT;
    }
    let key = SockReverseKey {
        cookie: cookie(ctx),
        backend: backend.addr,
        port_be: backend.port_be,
        proto: frontend.proto,
        family,
        _pad: 0,
    };
    // Before the rewrite: a reply must never arrive before its way back is known. A full
    // table evicts the least used socket's entry (LRU), so this cannot fail for room.
    let _ = SOCK_REVERSE.insert(&key, frontend, 0);
    set_user_addr(ctx, family, &backend.addr, backend.port_be);
    ALLOW
}

/// The frontend's service: by exact address, else the NodePort of one of the node's addresses
/// or of another Node's: the node's own traffic is in-cluster traffic, served with every
/// endpoint wherever it is addressed, and translated here rather than on the way back into
/// this node from the other (where a packet from this node's own address would be a martian).
#[inline(always)]
fn find_frontend(frontend: &FrontendKey) -> Option<&'static ServiceValue> {
    let mut found = SERVICES.get_ptr(frontend);
    if found.is_none() {
        let host = HostAddrKey {
            addr: frontend.addr,
            family: frontend.family,
            _pad: [0; 3],
        };
        if HOST_ADDRS.get_ptr(&host).is_some() || TUNNEL_PEERS.get_ptr(&host).is_some() {
            let node_port = FrontendKey {
                addr: Addr::UNSPECIFIED,
                ..*frontend
            };
            found = SERVICES.get_ptr(&node_port);
        }
    }
    // SAFETY: the pointer comes from a successful lookup; the agent replaces entries whole and
    // the kernel keeps the element alive for the program run (RCU).
    found.map(|p| unsafe { &*p })
}

/// Shows the socket the service frontend where it would see a backend it was sent to.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8) {
    let proto = protocol(ctx);
    if proto == 0 {
        return;
    }
    let key = SockReverseKey {
        cookie: cookie(ctx),
        backend: user_addr(ctx, family),
        port_be: user_port_be(ctx),
        proto,
        family,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { SOCK_REVERSE.get(&key) }.copied() {
        set_user_addr(ctx, family, &frontend.addr, frontend.port_be);
    }
}
