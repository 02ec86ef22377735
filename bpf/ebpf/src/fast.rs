//! The established flow's path: the packets of an answered, plainly translated flow (most of a
//! node's service traffic) are read and rewritten in place, with one conntrack lookup and no
//! helper call but the clock and the L4 checksum's, before the full path (`process`) is tried.
//!
//! What it takes: an Ethernet frame on any interface but the tunnel device, IPv4 without
//! options and not a fragment, or IPv6 whose next header is TCP or UDP, with its L4 header in
//! the linear part of the packet; a conntrack entry in the established table that translates
//! one side (a client's packet to its backend, or a backend's reply to its frontend) with no
//! tunnel, hairpin or moved port. A packet of no flow that no service could concern (most
//! pod-to-pod traffic) passes here too, after the lookups that show it. Everything else, and
//! every first packet to a service, returns
//! [`NOT_HANDLED`] and goes the full way, which does the same to these packets at a higher price:
//! the two paths must agree, and the packet tests run both.
//!
//! Checksums: the IPv4 header's by arithmetic (its sum is always complete, never offloaded);
//! the L4 checksum through `bpf_l4_csum_replace`, because only the kernel knows whether the skb
//! carries a full checksum, a partial one a device will finish (a pod's veth), or a
//! `CHECKSUM_COMPLETE` sum to keep in step, and the arithmetic differs for each.

use core::ptr::{read_unaligned, write_unaligned};

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_l4_csum_replace,
    programs::TcContext,
};
use weir_common::{
    counter, ct_flags, ct_kind, node_flags, CtKey, CtValue, HostAddrKey, FAMILY_V4, FAMILY_V6,
    PROTO_TCP, PROTO_UDP,
};

use crate::maps::{
    node_config, CONNTRACK, CT_NEW, FRONTEND_ADDRS, HOST_ADDRS, SCRATCH, TUNNEL_PEERS,
};
use crate::packet::{
    csum_fold, read_words_16, tcp_seen_bits, write_words_16, zero_words, ETH_HLEN, ETH_P_IP,
    ETH_P_IPV6, IPV4_CSUM, IPV4_FRAG, IPV4_FRAG_MASK, IPV4_MIN_HLEN, IPV4_PROTO, IPV4_SADDR,
    IPV4_TOTAL_LEN, IPV6_HLEN, IPV6_NEXT_HEADER, IPV6_PAYLOAD_LEN, IPV6_SADDR, TCP_CSUM, TCP_FLAGS,
    TCP_MIN_HLEN, UDP_CSUM, UDP_HLEN,
};
use crate::Verdict;

/// Not a tc action: the packet is for the full path.
pub const NOT_HANDLED: i32 = i32::MIN;
/// Not a tc action: the packet is translated; the entry function forwards it (`route::forward`)
/// as IPv4 or IPv6. Asked of the entry function rather than done here, so that the chain of
/// frames stays within what old verifiers allow (entry -> this -> forward would not).
pub const FORWARD_V4: i32 = i32::MIN + 1;
pub const FORWARD_V6: i32 = i32::MIN + 2;
/// Not a tc action: a packet of no flow a service translates, with NetworkPolicy enforced on
/// this node; its tuple is in the scratch slot's `policy` field and the counter half of the
/// verdict holds its TCP `ct_seen` bits. The entry function has NetworkPolicy decide it.
pub const DECIDE_POLICY: i32 = i32::MIN + 3;

/// Fragment offset and More Fragments; DF alone is not a fragment.
const IPV4_FRAG_MASK_BE: u16 = IPV4_FRAG_MASK.to_be();

/// A conntrack key on an 8-byte boundary, so that building it costs word stores rather than
/// byte stores (`CtKey` itself only asks for two).
#[repr(C, align(8))]
struct AlignedKey(CtKey);

/// What the key's parse learnt beyond the key. Offsets are not carried: each family's are
/// constants in its own instance of [`rewrite`], because a verifier that reloads an offset
/// spilled to the stack (5.10) no longer knows it.
struct Site {
    family: u8,
    proto: u8,
    /// The `ct_seen` bits of a TCP segment's flags; 0 for UDP.
    seen: u8,
}

const V4_L4: usize = ETH_HLEN + IPV4_MIN_HLEN;
const V6_L4: usize = ETH_HLEN + IPV6_HLEN;

/// Translates the packet in place if it belongs to an established, plainly translated flow,
/// and returns what to do with it: a tc action, or [`FORWARD_V4`] / [`FORWARD_V6`], with the
/// outcome to count; [`NOT_HANDLED`] otherwise. A call of its own: every way to the full path
/// returns the same constant, so the verifier meets the full path after it in one state.
#[inline(never)]
pub fn established(ctx: &TcContext) -> Verdict {
    let config = node_config();
    // SAFETY: reading fields of the program's own context.
    let (ifindex, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    if ifindex == config.tunnel_ifindex {
        return Verdict::new(0, NOT_HANDLED);
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return Verdict::new(0, NOT_HANDLED);
    }
    // SAFETY: bounds checked above; unaligned reads, as packet data has no alignment.
    let ethertype = unsafe { read_unaligned((data + 12) as *const u16) };
    if ethertype as u32 != protocol {
        return Verdict::new(0, NOT_HANDLED);
    }
    let mut key = core::mem::MaybeUninit::<AlignedKey>::uninit();
    // SAFETY: the slot is ours to write; CtKey is plain data, valid all-zero. Borrowed in
    // place, not moved out (a 40-byte move is a `memmove` call).
    let key = unsafe {
        zero_words(key.as_mut_ptr());
        key.assume_init_mut()
    };
    // SAFETY: reading a field of the program's own context.
    let skb_len = unsafe { (*ctx.skb.skb).len } as usize;
    let Some(site) = (if ethertype == ETH_P_IP.to_be() {
        key_v4(data, end, skb_len, &mut key.0)
    } else if ethertype == ETH_P_IPV6.to_be() {
        key_v6(data, end, skb_len, &mut key.0)
    } else {
        None
    }) else {
        return Verdict::new(0, NOT_HANDLED);
    };
    let Some(entry) = CONNTRACK.get_ptr_mut(&key.0) else {
        return unless_for_a_service(&key.0, site.seen);
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run;
    // concurrent writers only touch last_seen/seen, where a lost update is harmless.
    let entry = unsafe { &mut *entry };
    let host_frontend = entry.flags == ct_flags::HOST_FRONTEND && entry.kind == ct_kind::REVERSE;
    if (entry.flags != 0 && !host_frontend)
        || entry.client_port_be != 0
        || (entry.kind != ct_kind::FORWARD && entry.kind != ct_kind::REVERSE)
    {
        return Verdict::new(0, NOT_HANDLED);
    }
    crate::ct::refresh(entry, site.seen, crate::ct::coarse_now());
    let forward = entry.kind == ct_kind::FORWARD;
    let translated = match (site.family == FAMILY_V6, forward) {
        (false, true) => rewrite::<false, true>(ctx, site.proto, entry),
        (false, false) => rewrite::<false, false>(ctx, site.proto, entry),
        (true, true) => rewrite::<true, true>(ctx, site.proto, entry),
        (true, false) => rewrite::<true, false>(ctx, site.proto, entry),
    };
    let outcome = if forward {
        counter::CT_FORWARD_HIT
    } else {
        counter::CT_REVERSE_HIT
    };
    if !translated {
        return Verdict::drop(counter::DROP_REWRITE_FAILED);
    }
    // A reply from a NodePort leaves from one of the node's own addresses, which the stack's
    // input path drops as a martian: it is always forwarded.
    if config.flags & node_flags::FORWARD == 0 && !host_frontend {
        return Verdict::pass(outcome);
    }
    if site.family == FAMILY_V6 {
        Verdict::new(outcome, FORWARD_V6)
    } else {
        Verdict::new(outcome, FORWARD_V4)
    }
}

/// A packet of no established flow passes as the full path would pass it (`pass_no_service`),
/// without its cost, when nothing on the full path could concern it: no flow in the new-flow
/// table either (a reply to a new flow, a return entry), and a destination that is neither a
/// frontend address (ClusterIP, external or load-balancer IP) nor one of a Node's (NodePorts).
/// Most pod-to-pod traffic is such. Its own frame: the key it builds is not on the fast path's.
#[inline(never)]
fn unless_for_a_service(key: &CtKey, seen: u8) -> Verdict {
    if CT_NEW.get_ptr(key).is_some() {
        return Verdict::new(0, NOT_HANDLED);
    }
    let mut destination = core::mem::MaybeUninit::<AlignedHostKey>::uninit();
    // SAFETY: the slot is ours to write; HostAddrKey is plain data, valid all-zero; borrowed
    // in place. Its address starts on the slot's 8-byte boundary.
    let destination = unsafe {
        zero_words(destination.as_mut_ptr());
        let destination = destination.assume_init_mut();
        write_words_16(
            destination.0.addr.bytes.as_mut_ptr() as usize,
            read_words_16(key.daddr.bytes.as_ptr() as usize),
        );
        destination
    };
    destination.0.family = key.family;
    if FRONTEND_ADDRS.get_ptr(&destination.0).is_some()
        || HOST_ADDRS.get_ptr(&destination.0).is_some()
        || TUNNEL_PEERS.get_ptr(&destination.0).is_some()
    {
        return Verdict::new(0, NOT_HANDLED);
    }
    // NetworkPolicy decides, from the entry function: this frame and the decision's together
    // pass the 512 bytes older verifiers allow a chain.
    if crate::policy::enforced() {
        let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
            return Verdict::new(0, NOT_HANDLED);
        };
        // SAFETY: a per-CPU slot, used by one program run at a time on this CPU; the full path
        // has not started. Both keys start on an 8-byte boundary (`AlignedKey`, `Scratch`).
        unsafe { copy_key(&mut (*scratch).policy, key) };
        return Verdict::new(seen as u32, DECIDE_POLICY);
    }
    Verdict::pass(counter::PASS_NO_SERVICE)
}

/// Copies a conntrack key by words (a 40-byte copy would be a `memmove` call).
///
/// # Safety
/// Both keys start on an 8-byte boundary.
#[inline(always)]
unsafe fn copy_key(to: &mut CtKey, from: &CtKey) {
    let to = to as *mut CtKey as *mut u64;
    let from = from as *const CtKey as *const u64;
    for word in 0..core::mem::size_of::<CtKey>() / 8 {
        // SAFETY: within both keys (40 bytes, 5 words), aligned as the caller promises.
        unsafe { core::ptr::write_volatile(to.add(word), *from.add(word)) };
    }
}

/// A host address key on an 8-byte boundary, zeroed by words (see [`AlignedKey`]).
#[repr(C, align(8))]
struct AlignedHostKey(HostAddrKey);

/// The key of an IPv4 packet without options and not a fragment, whose L4 header is linear
/// and whose length agrees with the frame's (`skb_len`: the whole packet, linear or not).
#[inline(always)]
fn key_v4(data: usize, end: usize, skb_len: usize, key: &mut CtKey) -> Option<Site> {
    let l3 = ETH_HLEN;
    let l4 = V4_L4;
    if data + l4 + UDP_HLEN > end {
        return None;
    }
    // SAFETY: the IPv4 header and 8 bytes behind it are within the packet (checked above).
    let (version_ihl, total_len_be, frag_be, proto, addrs) = unsafe {
        (
            *((data + l3) as *const u8),
            read_unaligned((data + l3 + IPV4_TOTAL_LEN) as *const u16),
            read_unaligned((data + l3 + IPV4_FRAG) as *const u16),
            *((data + l3 + IPV4_PROTO) as *const u8),
            read_unaligned((data + l3 + IPV4_SADDR) as *const [u32; 2]),
        )
    };
    if version_ihl != 0x45 || frag_be & IPV4_FRAG_MASK_BE != 0 {
        return None;
    }
    let total_len = u16::from_be(total_len_be) as usize;
    if total_len < IPV4_MIN_HLEN || l3 + total_len > skb_len {
        return None;
    }
    let seen = l4_seen(data, end, l4, proto, total_len - IPV4_MIN_HLEN)?;
    // SAFETY: the key's addresses start on its 8-byte boundary (`AlignedKey`), so 4-byte
    // writes there are aligned.
    unsafe {
        write_unaligned(key.saddr.bytes.as_mut_ptr() as *mut u32, addrs[0]);
        write_unaligned(key.daddr.bytes.as_mut_ptr() as *mut u32, addrs[1]);
    }
    Some(finish_key(data, l4, proto, FAMILY_V4, seen, key))
}

/// The key of an IPv6 packet whose next header is TCP or UDP, with its L4 header linear and a
/// payload length that agrees with the frame's.
#[inline(always)]
fn key_v6(data: usize, end: usize, skb_len: usize, key: &mut CtKey) -> Option<Site> {
    let l3 = ETH_HLEN;
    let l4 = V6_L4;
    if data + l4 + UDP_HLEN > end {
        return None;
    }
    // SAFETY: the IPv6 header and 8 bytes behind it are within the packet (checked above).
    let (proto, payload_len_be) = unsafe {
        (
            *((data + l3 + IPV6_NEXT_HEADER) as *const u8),
            read_unaligned((data + l3 + IPV6_PAYLOAD_LEN) as *const u16),
        )
    };
    let payload_len = u16::from_be(payload_len_be) as usize;
    if l4 + payload_len > skb_len {
        return None;
    }
    let seen = l4_seen(data, end, l4, proto, payload_len)?;
    // SAFETY: as above; both addresses are within the header.
    unsafe {
        let saddr = read_words_16(data + l3 + IPV6_SADDR);
        let daddr = read_words_16(data + l3 + IPV6_SADDR + 16);
        // The key's addresses start on 8-byte boundaries of `AlignedKey` (offsets 0 and 16).
        write_words_16(key.saddr.bytes.as_mut_ptr() as usize, saddr);
        write_words_16(key.daddr.bytes.as_mut_ptr() as usize, daddr);
    }
    Some(finish_key(data, l4, proto, FAMILY_V6, seen, key))
}

/// The key's ports, protocol and family, the same for both families.
#[inline(always)]
fn finish_key(data: usize, l4: usize, proto: u8, family: u8, seen: u8, key: &mut CtKey) -> Site {
    // SAFETY: `key_v*` checked that the ports are within the packet.
    let ports = unsafe { read_unaligned((data + l4) as *const [u16; 2]) };
    key.sport_be = ports[0];
    key.dport_be = ports[1];
    key.proto = proto;
    key.family = family;
    Site {
        family,
        proto,
        seen,
    }
}

/// For TCP or UDP whose header lies within the linear packet data and within the `l4_len` bytes
/// the IP header gives it, the `ct_seen` bits of its flags (0 for UDP); None for anything else
/// (the full path drops what is cut short). The flags are read here, behind the very check that
/// makes them readable: older verifiers lose the range on another copy of the pointer.
#[inline(always)]
fn l4_seen(data: usize, end: usize, l4: usize, proto: u8, l4_len: usize) -> Option<u8> {
    match proto {
        PROTO_TCP => {
            if l4_len < TCP_MIN_HLEN || data + l4 + TCP_MIN_HLEN > end {
                return None;
            }
            // SAFETY: the TCP header's fixed part is within the packet (checked above).
            Some(tcp_seen_bits(unsafe {
                *((data + l4 + TCP_FLAGS) as *const u8)
            }))
        }
        PROTO_UDP if l4_len >= UDP_HLEN => Some(0),
        _ => None,
    }
}

/// Writes the entry's address and port over one side of the packet (`DEST`: the destination,
/// a client's packet to its backend; else the source, a reply to its frontend), with the
/// checksums. False when the packet turned out too short or a checksum helper refused (the
/// packet is then half-rewritten and must be dropped).
#[inline(always)]
fn rewrite<const V6: bool, const DEST: bool>(ctx: &TcContext, proto: u8, entry: &CtValue) -> bool {
    let l3 = ETH_HLEN;
    let l4 = if V6 { V6_L4 } else { V4_L4 };
    let addr_off = match (V6, DEST) {
        (false, false) => l3 + IPV4_SADDR,
        (false, true) => l3 + IPV4_SADDR + 4,
        (true, false) => l3 + IPV6_SADDR,
        (true, true) => l3 + IPV6_SADDR + 16,
    };
    let port_off = if DEST { l4 + 2 } else { l4 };
    let data = ctx.data();
    let end = ctx.data_end();
    // Each pointer is made behind the check that covers it (see `l4_seen`).
    let (csum, csum_off, mangled) = if proto == PROTO_TCP {
        if data + l4 + TCP_MIN_HLEN > end {
            return false;
        }
        ((data + l4 + TCP_CSUM) as *mut u16, l4 + TCP_CSUM, 0)
    } else {
        if data + l4 + UDP_HLEN > end {
            return false;
        }
        (
            (data + l4 + UDP_CSUM) as *mut u16,
            l4 + UDP_CSUM,
            BPF_F_MARK_MANGLED_0 as u64,
        )
    };
    // SAFETY: within the L4 header's fixed part, checked above; unaligned accesses.
    let (old_port, l4_csum) = unsafe {
        (
            read_unaligned((data + port_off) as *const u16),
            read_unaligned(csum),
        )
    };
    // A zero UDP checksum (IPv4) means "none": it stays so, and no helper is needed.
    let has_l4_csum = proto == PROTO_TCP || l4_csum != 0;
    let pseudo_diff = if V6 {
        // SAFETY: the IPv6 header lies before the L4 header, checked above.
        unsafe {
            let old = read_words_16(data + addr_off);
            let new = read_words_16(entry.nat_addr.bytes.as_ptr() as usize);
            write_words_16(data + addr_off, new);
            diff_words(&old, &new)
        }
    } else {
        // SAFETY: the IPv4 header lies before the L4 header, checked above.
        unsafe {
            let addr = (data + addr_off) as *mut u32;
            let old = read_unaligned(addr);
            let new = read_unaligned(entry.nat_addr.bytes.as_ptr() as *const u32);
            write_unaligned(addr, new);
            let ip_csum = (data + l3 + IPV4_CSUM) as *mut u16;
            write_unaligned(ip_csum, csum_replace4(read_unaligned(ip_csum), old, new));
            diff_words(&[old], &[new])
        }
    };
    let new_port = entry.nat_port_be;
    if new_port != old_port {
        // SAFETY: within the L4 header (checked above).
        unsafe { write_unaligned((data + port_off) as *mut u16, new_port) };
    }
    if !has_l4_csum {
        return true;
    }
    let skb = ctx.skb.skb;
    // The addresses are covered through the pseudo header, the port directly: two updates,
    // since a partial checksum takes the first and not the second.
    // SAFETY: the helper checks the offset against the packet itself.
    let ret = unsafe {
        bpf_l4_csum_replace(
            skb,
            csum_off as u32,
            0,
            pseudo_diff as u64,
            mangled | BPF_F_PSEUDO_HDR as u64,
        )
    };
    if ret != 0 {
        return false;
    }
    if new_port == old_port {
        return true;
    }
    // SAFETY: as above.
    let ret = unsafe {
        bpf_l4_csum_replace(
            skb,
            csum_off as u32,
            old_port as u64,
            new_port as u64,
            mangled | 2,
        )
    };
    ret == 0
}

/// The one's-complement difference `new - old` of two equally long runs of 32-bit words, as
/// `bpf_l4_csum_replace` takes a difference (size 0).
#[inline(always)]
fn diff_words<const N: usize>(old: &[u32; N], new: &[u32; N]) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < N {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// An IPv4 header checksum after one 32-bit word changed from `old` to `new` (RFC 1624), all
/// three as they lie in memory: one's-complement arithmetic does not care for byte order.
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    // At most five 16-bit words: `csum_fold`'s two folds suffice.
    csum_fold((!csum) as u32 + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff))
}
