//! Weir's tc programs: service NAT with a BPF conntrack.
//!
//! `weir_ingress` runs on every packet entering the node: from pods (ingress of the host side of
//! their veth) and from the network (ingress of host interfaces). A packet whose 5-tuple has a
//! conntrack entry takes the fast path and never touches the service maps; the first packet of a
//! flow to a service frontend picks a backend, records the flow in both directions and is DNATed.
//! Replies are un-NATed by their reverse entry wherever they enter the node, so no SNAT is ever
//! applied and backends see the client's own address.
//!
//! Every packet ends in exactly one counted outcome; a rewrite is applied whole or the packet is
//! dropped, never passed half-rewritten.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use weir_common::{
    capacity, counter, ct_kind, ct_seen, Addr, BackendSlotKey, BackendValue, CtKey, CtValue,
    FrontendKey, ServiceValue, CT_REFRESH_NS, FAMILY_V4, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

/// Service maps change only from user space, so they need no preallocation.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "WEIR_SERVICES")]
static SERVICES: HashMap<FrontendKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_BACKEND_SLOTS")]
static BACKEND_SLOTS: HashMap<BackendSlotKey, u32> =
    HashMap::with_max_entries(capacity::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_BACKENDS")]
static BACKENDS: HashMap<u32, BackendValue> =
    HashMap::with_max_entries(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

#[map(name = "WEIR_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_OFF: usize = ETH_HLEN;
const IP_MIN_HLEN: usize = 20;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SADDR_OFF: usize = IP_OFF + 12;
const IP_DADDR_OFF: usize = IP_OFF + 16;
/// Fragment offset and More Fragments; DF alone is not a fragment.
const IP_FRAG_MASK: u16 = 0x3fff;

const TCP_MIN_HLEN: usize = 20;
const TCP_CSUM: usize = 16;
const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const UDP_HLEN: usize = 8;
const UDP_CSUM: usize = 6;
const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;
/// An ICMP error quotes the offending packet's IP header and at least 8 bytes of its payload:
/// enough for both ports of TCP and UDP.
const ICMP_QUOTED_L4: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// A decision on a packet, each with the counter that accounts for it.
enum Verdict {
    Pass(u32),
    Drop(u32),
}

#[classifier]
pub fn weir_ingress(ctx: TcContext) -> i32 {
    let verdict = match process(&ctx) {
        Ok(verdict) => verdict,
        Err(counter) => Verdict::Drop(counter),
    };
    match verdict {
        Verdict::Pass(c) => {
            count(c);
            TC_ACT_OK as i32
        }
        Verdict::Drop(c) => {
            count(c);
            TC_ACT_SHOT as i32
        }
    }
}

/// The baseline for per-packet cost figures: the same attach point doing nothing.
#[classifier]
pub fn weir_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only written by this CPU, and a preempted increment would at
        // worst lose one count; the pointer comes from a successful lookup.
        unsafe { *slot += 1 };
    }
}

/// Reads a header field through `bpf_skb_load_bytes`, which copes with variable offsets (IP
/// options) and paged skbs alike; reading past the end of the packet means it was truncated.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load::<T>(off).map_err(|_| counter::DROP_TRUNCATED)
}

/// The fixed IPv4 header, loaded in one helper call.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len_be: u16,
    id_be: u16,
    frag_be: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

/// The parts of an IPv4 header the program acts on.
struct Ipv4 {
    saddr: u32,
    daddr: u32,
    proto: u8,
    l4_off: usize,
    /// Bytes of L3 payload according to the header, which bounds what L4 may claim.
    payload_len: usize,
}

fn process(ctx: &TcContext) -> Result<Verdict, u32> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    if ethertype != ETH_P_IP {
        return Ok(Verdict::Pass(counter::PASS_NOT_IP));
    }
    let ip = match parse_ipv4(ctx)? {
        Some(ip) => ip,
        None => return Ok(Verdict::Pass(counter::PASS_FRAGMENT)),
    };
    match ip.proto {
        PROTO_TCP | PROTO_UDP => nat_flow(ctx, &ip),
        PROTO_ICMP => icmp_error(ctx, &ip),
        _ => Ok(Verdict::Pass(counter::PASS_OTHER_PROTO)),
    }
}

/// Validates the header; `None` for a fragment, which carries no ports to match on.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, u32> {
    let header: Ipv4Header = load(ctx, IP_OFF)?;
    let ihl = ((header.version_ihl & 0x0f) as usize) * 4;
    if header.version_ihl >> 4 != 4 || ihl < IP_MIN_HLEN {
        return Err(counter::DROP_MALFORMED);
    }
    let total_len = u16::from_be(header.total_len_be) as usize;
    if total_len < ihl {
        return Err(counter::DROP_MALFORMED);
    }
    if (ctx.len() as usize) < IP_OFF + total_len {
        return Err(counter::DROP_TRUNCATED);
    }
    if u16::from_be(header.frag_be) & IP_FRAG_MASK != 0 {
        return Ok(None);
    }
    Ok(Some(Ipv4 {
        saddr: header.saddr,
        daddr: header.daddr,
        proto: header.proto,
        l4_off: IP_OFF + ihl,
        payload_len: total_len - ihl,
    }))
}

#[inline(always)]
fn addr4(raw: u32) -> Addr {
    Addr::from_v4(raw.to_ne_bytes())
}

#[inline(always)]
fn raw4(addr: &Addr) -> u32 {
    u32::from_ne_bytes(addr.v4_octets())
}

#[inline(always)]
fn ct_key(saddr: u32, daddr: u32, sport_be: u16, dport_be: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: addr4(saddr),
        daddr: addr4(daddr),
        sport_be,
        dport_be,
        proto,
        family: FAMILY_V4,
        _pad: 0,
    }
}

fn nat_flow(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, u32> {
    let l4_min = if ip.proto == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if ip.payload_len < l4_min {
        return Err(counter::DROP_TRUNCATED);
    }
    let [sport_be, dport_be]: [u16; 2] = load(ctx, ip.l4_off)?;
    let seen = if ip.proto == PROTO_TCP {
        tcp_seen_bits(load(ctx, ip.l4_off + TCP_FLAGS)?)
    } else {
        0
    };
    let key = ct_key(ip.saddr, ip.daddr, sport_be, dport_be, ip.proto);
    let now = unsafe_ktime();

    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: the pointer comes from a successful lookup and stays valid for this program
        // run; concurrent writers only touch last_seen/seen, where a lost update is harmless.
        let entry = unsafe { &mut *entry };
        if entry.seen | seen != entry.seen || now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_NS {
            entry.seen |= seen;
            entry.last_seen_ns = now;
        }
        let (kind, nat_addr, nat_port_be) = (entry.kind, raw4(&entry.nat_addr), entry.nat_port_be);
        return if kind == ct_kind::FORWARD {
            rewrite_l4(ctx, ip, Side::Destination, nat_addr, nat_port_be)?;
            Ok(Verdict::Pass(counter::CT_FORWARD_HIT))
        } else {
            rewrite_l4(ctx, ip, Side::Source, nat_addr, nat_port_be)?;
            Ok(Verdict::Pass(counter::CT_REVERSE_HIT))
        };
    }

    let frontend = FrontendKey {
        addr: addr4(ip.daddr),
        port_be: dport_be,
        proto: ip.proto,
        family: FAMILY_V4,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let service = match unsafe { SERVICES.get(&frontend) } {
        Some(service) => *service,
        None => return Ok(Verdict::Pass(counter::PASS_NO_SERVICE)),
    };
    if service.backend_count == 0 {
        return Err(counter::DROP_NO_BACKEND);
    }
    let slot = BackendSlotKey {
        service_id: service.service_id,
        slot: unsafe_prandom() % service.backend_count,
    };
    // SAFETY: copied out at once, as above.
    let backend_id = match unsafe { BACKEND_SLOTS.get(&slot) } {
        Some(id) => *id,
        None => return Err(counter::DROP_BACKEND_MISSING),
    };
    // SAFETY: copied out at once, as above.
    let backend = match unsafe { BACKENDS.get(&backend_id) } {
        Some(backend) => *backend,
        None => return Err(counter::DROP_BACKEND_MISSING),
    };
    let backend_addr = raw4(&backend.addr);

    let forward = CtValue {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: backend.addr,
        backend_id,
        nat_port_be: backend.port_be,
        kind: ct_kind::FORWARD,
        seen,
    };
    if CONNTRACK
        .insert(&key, &forward, BPF_NOEXIST as u64)
        .is_err()
    {
        // Another CPU created the flow between our lookup and insert: follow its choice.
        // SAFETY: copied out at once.
        return match unsafe { CONNTRACK.get(&key) } {
            Some(existing) if existing.kind == ct_kind::FORWARD => {
                let (addr, port) = (raw4(&existing.nat_addr), existing.nat_port_be);
                rewrite_l4(ctx, ip, Side::Destination, addr, port)?;
                Ok(Verdict::Pass(counter::CT_FORWARD_HIT))
            }
            _ => Err(counter::DROP_CT_FULL),
        };
    }
    let reverse_key = ct_key(backend_addr, ip.saddr, backend.port_be, sport_be, ip.proto);
    let reverse = CtValue {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: frontend.addr,
        backend_id,
        nat_port_be: dport_be,
        kind: ct_kind::REVERSE,
        seen: 0,
    };
    if CONNTRACK.insert(&reverse_key, &reverse, 0).is_err() {
        // Without its reverse entry the flow's replies would leak the backend address: undo.
        let _ = CONNTRACK.remove(&key);
        return Err(counter::DROP_CT_FULL);
    }
    rewrite_l4(ctx, ip, Side::Destination, backend_addr, backend.port_be)?;
    Ok(Verdict::Pass(counter::CT_NEW_FLOW))
}

#[inline(always)]
fn tcp_seen_bits(flags: u8) -> u8 {
    let mut seen = 0;
    if flags & TCP_SYN != 0 {
        seen |= ct_seen::SYN;
    }
    if flags & TCP_ACK != 0 {
        seen |= ct_seen::ACK;
    }
    if flags & TCP_FIN != 0 {
        seen |= ct_seen::FIN;
    }
    if flags & TCP_RST != 0 {
        seen |= ct_seen::RST;
    }
    seen
}

#[inline(always)]
fn unsafe_ktime() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn unsafe_prandom() -> u32 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_get_prandom_u32() }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Rewrites one side's address and port of a TCP or UDP packet, with incremental checksum
/// updates. Any failing step drops the packet, which the caller's error path counts.
#[inline(always)]
fn rewrite_l4(
    ctx: &TcContext,
    ip: &Ipv4,
    side: Side,
    new_addr: u32,
    new_port_be: u16,
) -> Result<(), u32> {
    let (addr_off, port_off) = match side {
        Side::Source => (IP_SADDR_OFF, ip.l4_off),
        Side::Destination => (IP_DADDR_OFF, ip.l4_off + 2),
    };
    let old_addr = if side == Side::Source {
        ip.saddr
    } else {
        ip.daddr
    };
    let old_port: u16 = load(ctx, port_off)?;

    // UDP marks a checksum that computes to zero as 0xffff, since zero means "none".
    let (csum_off, mangled) = if ip.proto == PROTO_TCP {
        (ip.l4_off + TCP_CSUM, 0u64)
    } else {
        (ip.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64)
    };
    // A zero UDP checksum means "none": leave it so, rather than invent one.
    let has_l4_csum = ip.proto == PROTO_TCP || load::<u16>(ctx, csum_off)? != 0;
    let failed = counter::DROP_REWRITE_FAILED;
    if has_l4_csum {
        // The address is covered through the pseudo header, the port directly.
        let addr_flags = mangled | BPF_F_PSEUDO_HDR as u64 | 4;
        ctx.l4_csum_replace(csum_off, old_addr as u64, new_addr as u64, addr_flags)
            .map_err(|_| failed)?;
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port_be as u64, mangled | 2)
            .map_err(|_| failed)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
        .map_err(|_| failed)?;
    ctx.store(addr_off, &new_addr, 0).map_err(|_| failed)?;
    ctx.store(port_off, &new_port_be, 0).map_err(|_| failed)?;
    Ok(())
}

/// ICMP errors about a NATed flow quote the packet as the other side sent it: translate the quote
/// and the outer header back, as the conntrack entry of the error's own direction says, so that
/// (for example) a client's "port unreachable" or "fragmentation needed" names the service, not
/// the backend. Everything else ICMP passes untouched.
fn icmp_error(ctx: &TcContext, ip: &Ipv4) -> Result<Verdict, u32> {
    if ip.payload_len < ICMP_HLEN {
        return Err(counter::DROP_TRUNCATED);
    }
    let icmp_type: u8 = load(ctx, ip.l4_off)?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return Ok(Verdict::Pass(counter::PASS_ICMP_UNRELATED));
    }
    let inner_ip = ip.l4_off + ICMP_HLEN;
    if ip.payload_len < ICMP_HLEN + IP_MIN_HLEN + ICMP_QUOTED_L4 {
        return Ok(Verdict::Pass(counter::PASS_ICMP_UNRELATED));
    }
    let inner: Ipv4Header = load(ctx, inner_ip)?;
    let inner_ihl = ((inner.version_ihl & 0x0f) as usize) * 4;
    let inner_proto = inner.proto;
    if inner.version_ihl >> 4 != 4
        || inner_ihl < IP_MIN_HLEN
        || !(inner_proto == PROTO_TCP || inner_proto == PROTO_UDP)
        || ip.payload_len < ICMP_HLEN + inner_ihl + ICMP_QUOTED_L4
    {
        return Ok(Verdict::Pass(counter::PASS_ICMP_UNRELATED));
    }
    let inner_l4 = inner_ip + inner_ihl;
    let (inner_saddr, inner_daddr) = (inner.saddr, inner.daddr);
    let [inner_sport, inner_dport]: [u16; 2] = load(ctx, inner_l4)?;

    // The error travels against the quoted packet: look up the error's own direction.
    let key = ct_key(
        inner_daddr,
        inner_saddr,
        inner_dport,
        inner_sport,
        inner_proto,
    );
    // SAFETY: copied out at once.
    let entry = match unsafe { CONNTRACK.get(&key) } {
        Some(entry) => *entry,
        None => return Ok(Verdict::Pass(counter::PASS_ICMP_UNRELATED)),
    };
    let nat_addr = raw4(&entry.nat_addr);
    // A reverse entry means the quote was sent to the backend: name the frontend instead. A
    // forward entry means the quote came from the frontend: name the backend.
    let (inner_addr_off, inner_port_off, old_inner_addr, old_inner_port, outer_off, outer_old) =
        if entry.kind == ct_kind::REVERSE {
            (
                inner_ip + 16,
                inner_l4 + 2,
                inner_daddr,
                inner_dport,
                IP_SADDR_OFF,
                ip.saddr,
            )
        } else {
            (
                inner_ip + 12,
                inner_l4,
                inner_saddr,
                inner_sport,
                IP_DADDR_OFF,
                ip.daddr,
            )
        };
    let failed = counter::DROP_REWRITE_FAILED;
    let icmp_csum = ip.l4_off + ICMP_CSUM;
    // The quoted header's own checksum moves by exactly the opposite of its address, so the ICMP
    // checksum need not follow the address.
    ctx.l3_csum_replace(inner_ip + 10, old_inner_addr as u64, nat_addr as u64, 4)
        .map_err(|_| failed)?;
    ctx.store(inner_addr_off, &nat_addr, 0)
        .map_err(|_| failed)?;
    // The quoted L4 checksum covers the pseudo header and the port: restore it when the quote
    // reaches it (UDP's always does; TCP's when more than 8 bytes were quoted), and carry its
    // change into the ICMP checksum.
    let inner_csum_off = if inner_proto == PROTO_TCP {
        TCP_CSUM
    } else {
        UDP_CSUM
    };
    if ip.payload_len >= ICMP_HLEN + inner_ihl + inner_csum_off + 2 {
        let inner_csum = inner_l4 + inner_csum_off;
        let old_csum: u16 = load(ctx, inner_csum)?;
        if inner_proto == PROTO_TCP || old_csum != 0 {
            ctx.l4_csum_replace(inner_csum, old_inner_addr as u64, nat_addr as u64, 4)
                .map_err(|_| failed)?;
            ctx.l4_csum_replace(
                inner_csum,
                old_inner_port as u64,
                entry.nat_port_be as u64,
                2,
            )
            .map_err(|_| failed)?;
            let new_csum: u16 = load(ctx, inner_csum)?;
            ctx.l4_csum_replace(icmp_csum, old_csum as u64, new_csum as u64, 2)
                .map_err(|_| failed)?;
        }
    }
    ctx.l4_csum_replace(
        icmp_csum,
        old_inner_port as u64,
        entry.nat_port_be as u64,
        2,
    )
    .map_err(|_| failed)?;
    ctx.store(inner_port_off, &entry.nat_port_be, 0)
        .map_err(|_| failed)?;
    // The outer address is the flow's own only when the error came from the endpoint itself, not
    // from a router on the way.
    if outer_old == old_inner_addr {
        ctx.l3_csum_replace(IP_CSUM_OFF, outer_old as u64, nat_addr as u64, 4)
            .map_err(|_| failed)?;
        ctx.store(outer_off, &nat_addr, 0).map_err(|_| failed)?;
    }
    Ok(Verdict::Pass(counter::ICMP_ERROR_NAT))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
