//! Parsing and rewriting IPv4 and IPv6 packets behind an Ethernet header, or bare ones (what an
//! IPIP tunnel device delivers; older kernels leave the outer headers in front of them).
//!
//! Headers are read through `bpf_skb_load_bytes`, which copes with variable offsets (IP options)
//! and paged skbs alike; reading past the end of the packet means it was truncated. Rewrites
//! update checksums incrementally and are applied whole or the packet is dropped.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use weir_common::{
    counter, ct_seen, Addr, CtKey, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Where the IP header starts behind an Ethernet header.
pub const IP_OFF: usize = ETH_HLEN;
pub const IPV4_MIN_HLEN: usize = 20;
/// Where an old kernel's IPIP device shows the inner header (see `bare_ip_offset`).
pub const OLD_IPIP_INNER_OFF: usize = ETH_HLEN + IPV4_MIN_HLEN;
// Offsets of the fields Weir reads and writes, from the start of the IP header.
pub const IPV4_TOTAL_LEN: usize = 2;
pub const IPV4_FRAG: usize = 6;
pub const IPV4_TTL: usize = 8;
pub const IPV4_PROTO: usize = 9;
pub const IPV4_CSUM: usize = 10;
pub const IPV4_SADDR: usize = 12;
pub const IPV4_DADDR: usize = 16;
pub const IPV6_PAYLOAD_LEN: usize = 4;
pub const IPV6_NEXT_HEADER: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;
pub const IPV6_SADDR: usize = 8;
pub const IPV6_DADDR: usize = 24;
const IPV4_DF: u16 = 0x4000;
pub const IPV6_HLEN: usize = 40;
/// Fragment offset and More Fragments; DF alone is not a fragment.
pub const IPV4_FRAG_MASK: u16 = 0x3fff;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
const IPV6_FRAGMENT: u8 = 44;

pub const TCP_MIN_HLEN: usize = 20;
pub const TCP_CSUM: usize = 16;
pub const TCP_FLAGS: usize = 13;
pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM: usize = 6;

/// The fixed IPv4 header, loaded in one helper call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len_be: u16,
    pub id_be: u16,
    pub frag_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The fixed IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Header {
    pub version_class_flow: [u8; 4],
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// What the program acts on of an IP packet of either family.
pub struct Ip {
    pub family: u8,
    /// Where the IP header starts: behind the Ethernet header, or at 0 on an IPIP device.
    pub l3_off: u16,
    pub saddr: Addr,
    pub daddr: Addr,
    /// The upper-layer protocol (TCP, UDP, ICMP or ICMPv6).
    pub proto: u8,
    pub l4_off: usize,
    /// Bytes of L3 payload according to the header, which bounds what L4 may claim.
    pub payload_len: usize,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] (carries the L4 header) or [`LATER_FRAGMENT`]
    /// (`l4_off` is where its share of the payload starts: no ports there).
    pub fragment: u8,
    // The datagram's id is kept apart (`frag::note_id`): 8 more bytes here put the deepest
    // call chain (ingress -> icmp_error -> route::forward) past the verifier's 512-byte stack.
}

pub const NOT_FRAGMENT: u8 = 0;
/// Offset 0, more fragments follow: the L4 header is here.
pub const FIRST_FRAGMENT: u8 = 1;
/// Offset beyond 0: the ports are in the first fragment only.
pub const LATER_FRAGMENT: u8 = 2;

/// Why a packet is not for the NAT path.
#[derive(Clone, Copy)]
pub enum NotForUs {
    Pass(u32),
    Drop(u32),
}

#[inline(always)]
pub fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load::<T>(off).map_err(|_| counter::DROP_TRUNCATED)
}

#[inline(always)]
pub fn store<T>(ctx: &TcContext, off: usize, value: &T) -> Result<(), u32> {
    ctx.store(off, value, 0)
        .map_err(|_| counter::DROP_REWRITE_FAILED)
}

impl Ip {
    pub const EMPTY: Ip = Ip {
        family: 0,
        l3_off: 0,
        saddr: Addr::UNSPECIFIED,
        daddr: Addr::UNSPECIFIED,
        proto: 0,
        l4_off: 0,
        payload_len: 0,
        fragment: NOT_FRAGMENT,
    };

    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3_off as usize
    }

    /// IPv4's header checksum.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        self.l3() + IPV4_CSUM
    }

    /// IPv4 "don't fragment"; IPv6 is never fragmented on the way.
    #[inline(always)]
    pub fn may_not_fragment(&self, ctx: &TcContext) -> Result<bool, u32> {
        if self.family != FAMILY_V4 {
            return Ok(true);
        }
        let frag_be: u16 = load(ctx, self.l3() + IPV4_FRAG)?;
        Ok(u16::from_be(frag_be) & IPV4_DF != 0)
    }
}

/// [`parse`] filled in the packet.
pub const PARSED: u64 = u64::MAX;
const NOT_FOR_US_DROP: u64 = 1 << 32;

/// Parses the IP header into `ip`, behind the Ethernet header unless `bare` (a layer-3 device:
/// the family then comes from the skb). Returns [`PARSED`] or why not, for [`not_for_us`]. Not
/// inlined: the header copies would otherwise stay on the entry function's stack for the whole
/// run. An out parameter and a plain integer, because a call may return one register only.
#[inline(never)]
pub fn parse(ctx: &TcContext, bare: bool, ip: &mut Ip) -> u64 {
    match parse_inner(ctx, bare, ip) {
        Ok(()) => PARSED,
        Err(NotForUs::Pass(c)) => c as u64,
        Err(NotForUs::Drop(c)) => NOT_FOR_US_DROP | c as u64,
    }
}

/// What a result of [`parse`] other than [`PARSED`] means.
#[inline(always)]
pub fn not_for_us(parsed: u64) -> NotForUs {
    if parsed & NOT_FOR_US_DROP != 0 {
        NotForUs::Drop(parsed as u32)
    } else {
        NotForUs::Pass(parsed as u32)
    }
}

#[inline(always)]
fn parse_inner(ctx: &TcContext, bare: bool, ip: &mut Ip) -> Result<(), NotForUs> {
    let (ethertype, l3_off) = if bare {
        // SAFETY: reading a field of the program's own context.
        let protocol = unsafe { (*ctx.skb.skb).protocol };
        (u16::from_be(protocol as u16), bare_ip_offset(ctx)?)
    } else {
        let ethertype = load::<u16>(ctx, 12).map_err(NotForUs::Drop)?;
        (u16::from_be(ethertype), IP_OFF)
    };
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3_off, ip),
        ETH_P_IPV6 => parse_ipv6(ctx, l3_off, ip),
        _ => Err(NotForUs::Pass(counter::PASS_NOT_IP)),
    }
}

/// Where an IPIP device's packet starts: at 0 on current kernels; behind the outer Ethernet and
/// IPv4 headers ([`OLD_IPIP_INNER_OFF`]) on older ones (5.10 among them), which decapsulate
/// without moving the MAC header, so tc sees `[outer Ethernet | outer IPv4 | inner IPv4]`.
/// Told apart by which offset holds an IPv4 header as long as the rest of the packet.
#[inline(always)]
fn bare_ip_offset(ctx: &TcContext) -> Result<usize, NotForUs> {
    let malformed = NotForUs::Drop(counter::DROP_MALFORMED);
    let len = ctx.len() as usize;
    for off in [0, OLD_IPIP_INNER_OFF] {
        let first: u8 = load(ctx, off).map_err(|_| malformed)?;
        let total_len_be: u16 = load(ctx, off + 2).map_err(|_| malformed)?;
        if first >> 4 == 4 && off + u16::from_be(total_len_be) as usize == len {
            return Ok(off);
        }
    }
    Err(malformed)
}

/// Fills `ip` as it goes, addresses first: a packet passed for its protocol or an extension
/// header is still dropped when it is addressed to a frontend (see `main.rs`).
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3_off: usize, ip: &mut Ip) -> Result<(), NotForUs> {
    let header: Ipv4Header = load(ctx, l3_off).map_err(NotForUs::Drop)?;
    let ihl = ((header.version_ihl & 0x0f) as usize) * 4;
    if header.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(NotForUs::Drop(counter::DROP_MALFORMED));
    }
    let total_len = u16::from_be(header.total_len_be) as usize;
    if total_len < ihl {
        return Err(NotForUs::Drop(counter::DROP_MALFORMED));
    }
    if (ctx.len() as usize) < l3_off + total_len {
        return Err(NotForUs::Drop(counter::DROP_TRUNCATED));
    }
    ip.family = FAMILY_V4;
    ip.l3_off = l3_off as u16;
    ip.saddr = Addr::from_v4(header.saddr);
    ip.daddr = Addr::from_v4(header.daddr);
    let frag = u16::from_be(header.frag_be);
    if frag & IPV4_FRAG_MASK != 0 {
        ip.fragment = if frag & IPV4_OFFSET_MASK != 0 {
            LATER_FRAGMENT
        } else {
            FIRST_FRAGMENT
        };
        crate::frag::note_id(header.id_be as u32);
    }
    l4_protocol(header.proto, FAMILY_V4)?;
    ip.proto = header.proto;
    ip.l4_off = l3_off + ihl;
    ip.payload_len = total_len - ihl;
    Ok(())
}

/// Extension headers walked in front of the upper layer (hop-by-hop, destination options, a
/// routing header with no segments left, a fragment header); more are passed untranslated
/// (`pass_ipv6_extension`).
const MAX_IPV6_EXTENSION_HEADERS: usize = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DESTINATION_OPTIONS: u8 = 60;
pub const IPV6_FRAGMENT_HLEN: usize = 8;

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3_off: usize, ip: &mut Ip) -> Result<(), NotForUs> {
    let header: Ipv6Header = load(ctx, l3_off).map_err(NotForUs::Drop)?;
    if header.version_class_flow[0] >> 4 != 6 {
        return Err(NotForUs::Drop(counter::DROP_MALFORMED));
    }
    let payload_len = u16::from_be(header.payload_len_be) as usize;
    if (ctx.len() as usize) < l3_off + IPV6_HLEN + payload_len {
        return Err(NotForUs::Drop(counter::DROP_TRUNCATED));
    }
    ip.family = FAMILY_V6;
    ip.l3_off = l3_off as u16;
    ip.saddr = Addr::from_v6(header.saddr);
    ip.daddr = Addr::from_v6(header.daddr);
    // Options headers change nothing a service translation touches (the pseudo header takes
    // the addresses of the fixed header), nor does a routing header whose route is done (its
    // last segment is the fixed header's destination): step over them to the upper layer. With
    // segments left, the fixed header's destination is a waypoint, not the final one: passed.
    let mut next_header = header.next_header;
    let mut ext_len = 0usize;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if next_header != IPV6_HOP_BY_HOP
            && next_header != IPV6_DESTINATION_OPTIONS
            && next_header != IPV6_ROUTING
            && next_header != IPV6_FRAGMENT
        {
            break;
        }
        // Every extension header is at least 8 bytes.
        let ext: [u8; 8] = load(ctx, l3_off + IPV6_HLEN + ext_len).map_err(NotForUs::Drop)?;
        if next_header == IPV6_FRAGMENT {
            // Offset (13 bits), 2 reserved bits, More Fragments.
            let frag = u16::from_be_bytes([ext[2], ext[3]]);
            if frag >> 3 != 0 {
                ip.fragment = LATER_FRAGMENT;
            } else if frag & 1 != 0 {
                ip.fragment = FIRST_FRAGMENT;
            }
            // (Neither: an atomic fragment, RFC 6946, a whole datagram.)
            crate::frag::note_id(u32::from_ne_bytes([ext[4], ext[5], ext[6], ext[7]]));
            ext_len += IPV6_FRAGMENT_HLEN;
        } else if next_header == IPV6_ROUTING && ext[3] != 0 {
            return Err(NotForUs::Pass(counter::PASS_IPV6_EXTENSION));
        } else {
            ext_len += (ext[1] as usize + 1) * 8;
        }
        next_header = ext[0];
        if ext_len > payload_len {
            return Err(NotForUs::Drop(counter::DROP_TRUNCATED));
        }
        // What follows a later fragment's header is payload, whatever it would parse as.
        if ip.fragment == LATER_FRAGMENT {
            break;
        }
    }
    match next_header {
        // AH, ESP, mobility, HIP, shim6, and headers past the walked ones: services do not use
        // them.
        IPV6_HOP_BY_HOP
        | IPV6_ROUTING
        | IPV6_DESTINATION_OPTIONS
        | IPV6_FRAGMENT
        | 51
        | 50
        | 135
        | 139
        | 140 => return Err(NotForUs::Pass(counter::PASS_IPV6_EXTENSION)),
        _ => {}
    }
    l4_protocol(next_header, FAMILY_V6)?;
    ip.proto = next_header;
    ip.l4_off = l3_off + IPV6_HLEN + ext_len;
    ip.payload_len = payload_len - ext_len;
    Ok(())
}

#[inline(always)]
fn l4_protocol(proto: u8, family: u8) -> Result<(), NotForUs> {
    let icmp = if family == FAMILY_V4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    if proto == PROTO_TCP || proto == PROTO_UDP || proto == icmp {
        Ok(())
    } else {
        Err(NotForUs::Pass(counter::PASS_OTHER_PROTO))
    }
}

/// Offsets of the source and destination addresses in an IP header starting at `l3_off`.
#[inline(always)]
pub fn addr_offsets(l3_off: usize, family: u8) -> (usize, usize) {
    if family == FAMILY_V4 {
        (l3_off + IPV4_SADDR, l3_off + IPV4_SADDR + 4)
    } else {
        (l3_off + IPV6_SADDR, l3_off + IPV6_SADDR + 16)
    }
}

#[inline(always)]
pub fn ct_key(ip: &Ip, sport_be: u16, dport_be: u16) -> CtKey {
    CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be,
        dport_be,
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    }
}

#[inline(always)]
pub fn tcp_seen_bits(flags: u8) -> u8 {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    let mut seen = 0;
    if flags & SYN != 0 {
        seen |= ct_seen::SYN;
    }
    if flags & ACK != 0 {
        seen |= ct_seen::ACK;
    }
    if flags & FIN != 0 {
        seen |= ct_seen::FIN;
    }
    if flags & RST != 0 {
        seen |= ct_seen::RST;
    }
    seen
}

/// Zeroes the `T` at `at` eight bytes at a time. The compiler would call `memset` for it (the
/// BPF backend inlines only the smallest ones), a function of its own that costs a call and
/// that old verifiers count as one more frame of the call chain; volatile stores it cannot turn
/// back into one. `T` must be a multiple of 8 bytes on an 8-byte boundary (checked when built).
///
/// # Safety
/// `at` must be valid for writes of a `T`; all-zero bytes must be a valid `T` if it is read.
#[inline(always)]
pub unsafe fn zero_words<T>(at: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() >= 8) };
    let words = at as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: within the `T` the caller vouches for, 8-byte aligned (checked above).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Sixteen bytes read from packet data at `at` (no alignment) as four 32-bit words, without the
/// `memmove` call a 16-byte unaligned copy compiles to.
///
/// # Safety
/// `at..at + 16` must be readable.
#[inline(always)]
pub unsafe fn read_words_16(at: usize) -> [u32; 4] {
    let p = at as *const u32;
    // SAFETY: the caller vouches for the 16 bytes; unaligned reads.
    unsafe {
        [
            core::ptr::read_unaligned(p),
            core::ptr::read_unaligned(p.add(1)),
            core::ptr::read_unaligned(p.add(2)),
            core::ptr::read_unaligned(p.add(3)),
        ]
    }
}

/// Writes `words` to packet data at `at` (no alignment), the way [`read_words_16`] reads.
///
/// # Safety
/// `at..at + 16` must be writable.
#[inline(always)]
pub unsafe fn write_words_16(at: usize, words: [u32; 4]) {
    let p = at as *mut u32;
    // SAFETY: the caller vouches for the 16 bytes; unaligned writes.
    unsafe {
        core::ptr::write_unaligned(p, words[0]);
        core::ptr::write_unaligned(p.add(1), words[1]);
        core::ptr::write_unaligned(p.add(2), words[2]);
        core::ptr::write_unaligned(p.add(3), words[3]);
    }
}

#[inline(always)]
pub fn ktime() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn prandom() -> u32 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_get_prandom_u32() }
}

/// The one's-complement sum of `to` minus `from` (each a multiple of four bytes), as the
/// checksum helpers take it.
#[inline(always)]
pub fn csum_diff(from: &[u8], to: &[u8], seed: u32) -> Result<u32, u32> {
    // SAFETY: both slices are valid for their lengths for the duration of the call, and the
    // helper only reads them.
    let sum = unsafe {
        bpf_csum_diff(
            from.as_ptr() as *mut u32,
            from.len() as u32,
            to.as_ptr() as *mut u32,
            to.len() as u32,
            seed,
        )
    };
    if sum < 0 {
        Err(counter::DROP_REWRITE_FAILED)
    } else {
        Ok(sum as u32)
    }
}

/// The one's-complement sum of `data` (a multiple of four bytes) added to `seed`.
#[inline(always)]
pub fn csum_add_bytes(data: &[u8], seed: u32) -> Result<u32, u32> {
    // SAFETY: a null `from` with size 0 is the helper's documented way to sum `to` alone; `data`
    // is valid for its length during the call and only read.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            data.as_ptr() as *mut u32,
            data.len() as u32,
            seed,
        )
    };
    if sum < 0 {
        Err(counter::DROP_REJECT_FAILED)
    } else {
        Ok(sum as u32)
    }
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum field value.
#[inline(always)]
pub fn csum_fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Offset of the L4 checksum and the flags its updates take: UDP marks a checksum that
/// computes to zero as 0xffff, since zero means "none".
#[inline(always)]
fn l4_csum(ip: &Ip) -> (usize, u64) {
    if ip.proto == PROTO_TCP {
        (ip.l4_off + TCP_CSUM, 0)
    } else {
        (ip.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// Rewrites one side's address and port of a TCP or UDP packet, with incremental checksum
/// updates, and keeps `ip` in step with the packet.
#[inline(always)]
pub fn rewrite_l4(
    ctx: &TcContext,
    ip: &mut Ip,
    side: Side,
    new_addr: &Addr,
    new_port_be: u16,
) -> Result<(), u32> {
    rewrite(
        ctx,
        ip,
        &Rewrite {
            addr: *new_addr,
            port_be: new_port_be,
            side,
        },
    )
}

struct Rewrite {
    addr: Addr,
    port_be: u16,
    side: Side,
}

/// A call of its own: inlined at every use it would multiply its callers' stack, and BPF calls
/// take at most five arguments.
#[inline(never)]
fn rewrite(ctx: &TcContext, ip: &mut Ip, to: &Rewrite) -> Result<(), u32> {
    let (side, new_addr, new_port_be) = (to.side, &to.addr, to.port_be);
    let (saddr_off, daddr_off) = addr_offsets(ip.l3(), ip.family);
    let (addr_off, port_off, old_addr) = match side {
        Side::Source => (saddr_off, ip.l4_off, &ip.saddr),
        Side::Destination => (daddr_off, ip.l4_off + 2, &ip.daddr),
    };
    // A later fragment carries neither ports nor the L4 checksum (the first fragment's
    // rewrite accounted for the whole datagram): its addresses alone change.
    let later_fragment = ip.fragment == LATER_FRAGMENT;
    let old_port: u16 = if later_fragment {
        new_port_be
    } else {
        load(ctx, port_off)?
    };
    let (csum_off, mangled) = l4_csum(ip);
    // A zero UDP checksum means "none" (IPv4 only): leave it so, rather than invent one.
    let has_l4_csum =
        !later_fragment && (ip.proto == PROTO_TCP || load::<u16>(ctx, csum_off)? != 0);
    let failed = counter::DROP_REWRITE_FAILED;
    if ip.family == FAMILY_V4 {
        let old = u32::from_ne_bytes(old_addr.v4_octets());
        let new = u32::from_ne_bytes(new_addr.v4_octets());
        if has_l4_csum {
            // The address is covered through the pseudo header, the port directly.
            let flags = mangled | BPF_F_PSEUDO_HDR as u64 | 4;
            ctx.l4_csum_replace(csum_off, old as u64, new as u64, flags)
                .map_err(|_| failed)?;
        }
        ctx.l3_csum_replace(ip.csum_off(), old as u64, new as u64, 4)
            .map_err(|_| failed)?;
        store(ctx, addr_off, &new)?;
    } else {
        if has_l4_csum {
            let diff = csum_diff(&old_addr.bytes, &new_addr.bytes, 0)?;
            let flags = mangled | BPF_F_PSEUDO_HDR as u64;
            ctx.l4_csum_replace(csum_off, 0, diff as u64, flags)
                .map_err(|_| failed)?;
        }
        store(ctx, addr_off, &new_addr.bytes)?;
    }
    replace_port(
        ctx,
        port_off,
        old_port,
        new_port_be,
        has_l4_csum,
        (csum_off, mangled),
    )?;
    match side {
        Side::Source => ip.saddr = *new_addr,
        Side::Destination => ip.daddr = *new_addr,
    }
    Ok(())
}

/// Rewrites one side's port alone, with an incremental checksum update: the client's port of
/// a flow that moved to another one to escape a tuple collision.
#[inline(never)]
pub fn rewrite_port(ctx: &TcContext, ip: &Ip, side: Side, new_port_be: u16) -> Result<(), u32> {
    // A later fragment carries no ports: its first fragment's were rewritten.
    if ip.fragment == LATER_FRAGMENT {
        return Ok(());
    }
    let port_off = match side {
        Side::Source => ip.l4_off,
        Side::Destination => ip.l4_off + 2,
    };
    let old_port: u16 = load(ctx, port_off)?;
    let (csum_off, mangled) = l4_csum(ip);
    let has_l4_csum = ip.proto == PROTO_TCP || load::<u16>(ctx, csum_off)? != 0;
    replace_port(
        ctx,
        port_off,
        old_port,
        new_port_be,
        has_l4_csum,
        (csum_off, mangled),
    )
}

/// The port half of a rewrite: the checksum (when the packet has one) covers the port directly.
#[inline(always)]
fn replace_port(
    ctx: &TcContext,
    port_off: usize,
    old_port_be: u16,
    new_port_be: u16,
    has_l4_csum: bool,
    (csum_off, mangled): (usize, u64),
) -> Result<(), u32> {
    if old_port_be == new_port_be {
        return Ok(());
    }
    if has_l4_csum {
        ctx.l4_csum_replace(
            csum_off,
            old_port_be as u64,
            new_port_be as u64,
            mangled | 2,
        )
        .map_err(|_| counter::DROP_REWRITE_FAILED)?;
    }
    store(ctx, port_off, &new_port_be)
}

/// Swaps the Ethernet addresses, for a packet that goes back out of the interface it came in.
#[inline(never)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), u32> {
    let macs: [u8; 12] = load(ctx, 0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    store(ctx, 0, &swapped)
}
