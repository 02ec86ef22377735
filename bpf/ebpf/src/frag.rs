//! Fragmented datagrams, translated like the flow they belong to (as Cilium's
//! `ipv4_handle_fragmentation` does). Only the first fragment carries the L4 header: it is
//! translated as any packet of its flow, and its ports are remembered in [`FRAGMENTS`] under
//! what every fragment of the datagram carries (addresses, id, protocol). A later fragment
//! looks them up, finds its flow's conntrack entry with them and takes the same translation,
//! addresses only. A later fragment that arrives before its first finds nothing: it is passed,
//! or dropped when addressed to a frontend (`drop_fragment_unknown`), as Cilium drops it; its
//! datagram is lost and the sender's retry starts over. The map is LRU, so memory stays bounded
//! whatever a sender fragments.

use weir_common::{CtKey, FragKey, FragPorts};

use crate::maps::{FRAGMENTS, SCRATCH};
use crate::packet::Ip;

/// Notes the id of the datagram the packet being parsed is a fragment of (IPv4 id, IPv6
/// fragment header id), for [`later_ports`] and [`remember`] in the same run.
#[inline(always)]
pub fn note_id(id: u32) {
    if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, used by one program run at a time on this CPU (tc programs
        // do not nest); the id is read only later in this run.
        unsafe { (*scratch).frag_id = id };
    }
}

/// The id [`note_id`] noted in this run.
#[inline(always)]
fn noted_id() -> u32 {
    match SCRATCH.get_ptr(0) {
        // SAFETY: as in `note_id`; read at once.
        Some(scratch) => unsafe { (*scratch).frag_id },
        None => 0,
    }
}

/// What [`later_ports`] returns when the datagram's first fragment was not translated here.
pub const UNKNOWN: u64 = 1 << 32;

/// The ports of the datagram `ip` is a later fragment of, as `sport_be | dport_be << 16`, or
/// [`UNKNOWN`]. Its own frame: the key is not on the flow path's stack.
#[inline(never)]
pub fn later_ports(ip: &Ip) -> u64 {
    let key = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: noted_id(),
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    };
    match FRAGMENTS.get_ptr(&key) {
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        Some(ports) => unsafe { (*ports).sport_be as u64 | ((*ports).dport_be as u64) << 16 },
        None => UNKNOWN,
    }
}

/// Remembers the ports of a first fragment of the flow `key` (as the packet arrived, before any
/// translation), for the datagram's later fragments.
#[inline(never)]
pub fn remember(key: &CtKey) {
    let frag = FragKey {
        saddr: key.saddr,
        daddr: key.daddr,
        id: noted_id(),
        proto: key.proto,
        family: key.family,
        _pad: 0,
    };
    let ports = FragPorts {
        sport_be: key.sport_be,
        dport_be: key.dport_be,
    };
    // A full map evicts its least recently used datagram (LRU): a failure here leaves the
    // later fragments unknown, which they would be anyway.
    let _ = FRAGMENTS.insert(&frag, &ports, 0);
}
