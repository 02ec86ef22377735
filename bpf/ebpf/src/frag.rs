//! Fragmented datagrams, translated like the flow they belong to (as Cilium's
//! `ipv4_handle_fragmentation` does). Only the first fragment carries the L4 header: it is
//! translated as any packet of its flow, and its ports are remembered in [`FRAGMENTS`] under
//! what every fragment of the datagram carries (addresses, id, protocol). A later fragment
//! looks them up, finds its flow's conntrack entry with them and takes the same translation,
//! addresses only. The map is LRU, so memory stays bounded whatever a sender fragments.
//!
//! A later fragment that arrives before its first finds nothing. Addressed to a pod or beyond
//! the node it passes (most fragmented traffic through a node is no service's). Addressed to a
//! frontend, or to a Node's address (a NodePort's, which it cannot show, or the node's own
//! traffic, which loses nothing by waiting for its first fragment), it is held, not dropped as
//! Cilium drops it: [`hold`] copies its whole frame into
//! [`HELD_FRAGMENTS`] (a slot per fragment, [`FRAGMENT_HOLD_SLOTS`] per datagram, LRU) and marks
//! its datagram in [`FRAGMENTS_HELD`]. When the first fragment arrives and finds the mark,
//! [`replay`] sends it, untouched, back into the ingress of the interface it came in on
//! (`bpf_clone_redirect` with `BPF_F_INGRESS`), then uses the packet as a vessel for each held
//! frame in turn (resized, overwritten, cloned into the same ingress) and drops it. Each copy
//! re-enters this program through the CPU's backlog queue, first fragment first, so the first
//! records the ports before the later ones look for them; the rest of the program never knows.
//!
//! Why hold and replay, not reassemble (as Calico does): a reassembled datagram is larger than
//! the MTU, which IPv6 never fragments on the way and a redirect into a pod's veth refuses; the
//! replayed fragments keep their size, and the receiver reassembles as it would have. The
//! order holds: `__bpf_rx_skb` (`dev_forward_skb` on 5.10) puts each clone on the backlog of
//! this CPU (or of the one RPS picks by the skb hash, which the clones share) with `netif_rx`,
//! a FIFO. What does not survive is tunnel metadata: the forward scrubs the skb and drops its
//! dst, where a collect-metadata tunnel keeps it. A fragment that came through the tunnel
//! untranslated (DSR: this, the backend's node, translates it) is held with its arrival's kind,
//! and its replay is marked instead (`tunnel::tag_replay`), so that it is taken for a DSR
//! arrival again; a held frame is replayed only behind a first fragment that arrived the same
//! way (through the tunnel or not). Fragments the ingress node translated already (ingress
//! return) are not held: the later ones are addressed to the endpoint and pass as they come.
//! Nor are frames without an L2 header (an IPIP device's): a vessel and its frames must share
//! one.
//! An untranslated first fragment to a Node's address leaves its datagram in [`FRAGMENTS`]
//! too (see `flow_inner`), so that its later fragments pass rather than wait for a replay that
//! will not come.
//!
//! Slots are claimed by inserting with `BPF_NOEXIST`, which one CPU wins: 5.10 has no atomic
//! fetch-and-add to count with. The mark is removed before anything is replayed, so a replayed
//! first fragment does not replay again; a fragment held while a replay runs leaves the mark
//! behind and is replayed by that first fragment's copy. A held frame older than
//! [`FRAGMENT_HOLD_NS`] is not replayed (an IPv4 id comes round again). A datagram whose first
//! fragment never comes leaves its frames to the LRU.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST},
    helpers::{bpf_clone_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use weir_common::{
    counter, CtKey, FragKey, FragPorts, HeldFragment, HeldFragmentKey, HostAddrKey,
    FRAGMENT_HOLD_NS, FRAGMENT_HOLD_SLOTS, HELD_FRAME_BYTES,
};

use crate::maps::{
    count, FRAGMENTS, FRAGMENTS_HELD, HELD_FRAGMENTS, HOLD_SCRATCH, HOST_ADDRS, SCRATCH,
    TUNNEL_PEERS,
};
use crate::packet::{ktime, Ip};

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

/// The datagram `ip` is a fragment of, as all its fragments carry it.
#[inline(always)]
fn datagram(ip: &Ip) -> FragKey {
    FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: noted_id(),
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    }
}

/// What [`later_ports`] returns when the datagram's first fragment was not translated here.
pub const UNKNOWN: u64 = 1 << 32;

/// The ports of the datagram `ip` is a later fragment of, as `sport_be | dport_be << 16`, or
/// [`UNKNOWN`]. Its own frame: the key is not on the flow path's stack.
#[inline(never)]
pub fn later_ports(ip: &Ip) -> u64 {
    let key = datagram(ip);
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

/// Whether a packet's fragments may be held and replayed: not come through the tunnel
/// (`tunnel_id` 0) or come through it untranslated (DSR, which a replay's mark restores), and
/// with an L2 header. Checked in the callee, not the entry function: a branch there on the
/// tunnel id would split its state, and the verifier would walk the whole flow path once per
/// side (on 6.1: 563,523 instructions verified instead of 332,404).
#[inline(always)]
fn replayable(ip: &Ip, tunnel_id: u32) -> bool {
    (tunnel_id == 0 || tunnel_id == weir_common::tunnel_id::DSR) && ip.l3_off != 0
}

/// What [`hold_if_due`] returns for a fragment it does not hold.
pub const NOT_HELD: u32 = u32::MAX;

/// Holds the later fragment `ip` of no known datagram for its first if it is due: replayable,
/// and addressed to a frontend (`untranslated`, what `unless_frontend` made of it, is a drop) or
/// to a Node. Returns the packet's outcome, or [`NOT_HELD`].
#[inline(never)]
pub fn hold_if_due(ctx: &TcContext, ip: &Ip, tunnel_id: u32, untranslated: crate::Verdict) -> u32 {
    if !replayable(ip, tunnel_id) {
        return NOT_HELD;
    }
    if untranslated.counter() != counter::DROP_FRAGMENT_UNKNOWN && !to_a_node(ip) {
        return NOT_HELD;
    }
    hold(ctx, ip, tunnel_id)
}

/// Whether `ip` is addressed to a Node (this one or another): the address of a NodePort,
/// which its later fragments do not show. Its own frame: the key is not on the caller's stack.
#[inline(never)]
pub fn to_a_node(ip: &Ip) -> bool {
    let destination = HostAddrKey {
        addr: ip.daddr,
        family: ip.family,
        _pad: [0; 3],
    };
    HOST_ADDRS.get_ptr(&destination).is_some() || TUNNEL_PEERS.get_ptr(&destination).is_some()
}

/// A frame length as the verifier can bound it: `len` (checked to be 1 to [`HELD_FRAME_BYTES`]
/// by the caller) masked, since it does not tie a compared copy to the register passed on.
#[inline(always)]
fn bounded(len: u32) -> u32 {
    ((len - 1) & (HELD_FRAME_BYTES as u32 - 1)) + 1
}

/// Holds the later fragment `ip` (of no known datagram, to a frontend or a Node, replayable,
/// arrived as `tunnel_id` says) until its first arrives. Returns the packet's outcome: it is
/// dropped either way.
#[inline(never)]
fn hold(ctx: &TcContext, ip: &Ip, tunnel_id: u32) -> u32 {
    let len = ctx.len();
    if len == 0 || len > HELD_FRAME_BYTES as u32 {
        return counter::DROP_FRAGMENT_NOT_HELD;
    }
    let Some(frame) = HOLD_SCRATCH.get_ptr_mut(0) else {
        return counter::DROP_FRAGMENT_NOT_HELD;
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU (tc programs do not
    // nest), and only within this call.
    let frame = unsafe { &mut *frame };
    frame.held_ns = ktime();
    frame.len = len;
    frame.arrival_id = tunnel_id;
    // SAFETY: the context pointer is the program's own skb; the destination is the slot's
    // frame, at least `bounded(len)` bytes long.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            frame.frame.as_mut_ptr() as *mut _,
            bounded(len),
        )
    };
    if loaded < 0 {
        return counter::DROP_FRAGMENT_NOT_HELD;
    }
    let mut key = HeldFragmentKey {
        datagram: datagram(ip),
        slot: 0,
    };
    // The counter in a register, not the key: the verifier tracks no value written into a
    // stack slot by part, and would take the loop for an endless one.
    for slot in 0..FRAGMENT_HOLD_SLOTS {
        key.slot = slot;
        if HELD_FRAGMENTS
            .insert(&key, &*frame, BPF_NOEXIST as u64)
            .is_ok()
        {
            // The mark after the frame: a first fragment that finds it finds the frame too.
            let _ = FRAGMENTS_HELD.insert(&key.datagram, slot, 0);
            return counter::FRAGMENT_HELD;
        }
    }
    counter::DROP_FRAGMENT_NOT_HELD
}

/// Whether the first fragment `ip` found later fragments of its datagram held and replayed
/// itself and them into its interface's ingress (see the module doc); the caller then drops it,
/// `fragment_replayed`. Called from the entry function: its frame is not on the flow path's.
#[inline(never)]
pub fn replay(ctx: &TcContext, ip: &Ip, tunnel_id: u32) -> bool {
    if !replayable(ip, tunnel_id) {
        return false;
    }
    let mut key = HeldFragmentKey {
        datagram: datagram(ip),
        slot: 0,
    };
    // Removed first: the copy of this packet must not find it and replay again.
    if FRAGMENTS_HELD.remove(&key.datagram).is_err() {
        return false;
    }
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Every clone below (of this packet, then of each held frame it carries) takes the mark.
    // SAFETY: reading a field of the program's own context.
    let mut mark_before = unsafe { (*ctx.skb.skb).mark };
    if tunnel_id != 0 {
        mark_before = crate::tunnel::tag_replay(ctx);
    }
    // SAFETY: the context pointer is the program's own skb; the helper clones it and leaves
    // this one writable.
    if !delivered(unsafe { bpf_clone_redirect(ctx.skb.skb, ifindex, BPF_F_INGRESS as u64) }) {
        // The first fragment is translated here instead, without the mark; the held ones are
        // lost to the LRU.
        ctx.set_mark(mark_before);
        count(counter::FRAGMENT_REPLAY_FAILED);
        return false;
    }
    let now = ktime();
    // (The counter in a register, as in `hold`.)
    for slot in 0..FRAGMENT_HOLD_SLOTS {
        key.slot = slot;
        if let Some(held) = HELD_FRAGMENTS.get_ptr(&key) {
            // SAFETY: the pointer comes from a successful lookup; the entry is deleted only
            // below, once its bytes are in the packet.
            let held = unsafe { &*held };
            let fresh = now.wrapping_sub(held.held_ns) <= FRAGMENT_HOLD_NS;
            // Replayed as its first fragment arrived: a frame held from elsewhere must not
            // pass for a tunnel arrival, nor a tunnel arrival for a local packet.
            let same_way = held.arrival_id == tunnel_id;
            if !fresh || !same_way || !send_again(ctx, held, ifindex) {
                count(counter::FRAGMENT_REPLAY_FAILED);
            }
            let _ = HELD_FRAGMENTS.remove(&key);
        }
    }
    true
}

/// Whether `bpf_clone_redirect` into an ingress put the copy on the backlog: 0. A negative
/// value is the helper's error, a positive one the forward's `NET_RX_DROP`: the backlog was
/// full, or (before 5.12, whose forward checks the MTU) the frame is larger than the device's
/// MTU allows, as an IPv4 fragment cut for the underlay is for the tunnel device.
#[inline(always)]
fn delivered(ret: i64) -> bool {
    ret == 0
}

/// The least a frame held or replayed can be: Ethernet, IPv4 and 8 bytes of payload.
const MIN_FRAME_LEN: u32 = 14 + 20 + 8;

/// Turns the packet into the frame `held` and clones it into the ingress of `ifindex`.
#[inline(always)]
fn send_again(ctx: &TcContext, held: &HeldFragment, ifindex: u32) -> bool {
    let len = held.len;
    if len < MIN_FRAME_LEN || len > HELD_FRAME_BYTES as u32 {
        return false;
    }
    let skb = ctx.skb.skb;
    // A length change turns a checksum the driver computed over the packet (CHECKSUM_COMPLETE)
    // into none, which the frame's own bytes would contradict: a frame as long as the packet
    // (a middle fragment after the first) is cut by a byte first. Not shorter: the helper
    // refuses to cut into the headers as the skb has them (its transport offset).
    if ctx.len() == len {
        // SAFETY: the context pointer is the program's own skb; the helper checks the length.
        if unsafe { bpf_skb_change_tail(skb, len - 1, 0) } < 0 {
            return false;
        }
    }
    // SAFETY: as above.
    if unsafe { bpf_skb_change_tail(skb, len, 0) } < 0 {
        return false;
    }
    // SAFETY: as above; the source is the held entry's frame, at least `bounded(len)` bytes.
    let stored =
        unsafe { bpf_skb_store_bytes(skb, 0, held.frame.as_ptr() as *const _, bounded(len), 0) };
    // SAFETY: as for the first fragment's clone in `replay`.
    stored >= 0 && delivered(unsafe { bpf_clone_redirect(skb, ifindex, BPF_F_INGRESS as u64) })
}
