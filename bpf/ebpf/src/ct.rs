//! Conntrack's two tables, and how a flow moves from one to the other.
//!
//! Every entry is created in the new-flow table [`CT_NEW`]. Once the flow is answered, its
//! entries move to the established table [`CONNTRACK`] (promotion), and lookups try that table
//! first, so an established flow's packet still costs one lookup. The split is what protects
//! established flows from a flood of new ones: both tables are LRU, but the LRU cannot tell a
//! flood from real flows (every new flow's entry is looked up right after it is made, which marks
//! it used), so a flood must only ever churn a table established flows are not in.
//!
//! Answered means what a spoofed flood cannot fake cheaply: a UDP reply, and for TCP the
//! client's ACK (without SYN or RST) after the server's SYN-ACK. A SYN-ACK alone does not count:
//! a listening backend (SYN cookies) answers every SYN of a flood, whose sources never complete
//! the handshake. Where this node sees the client's side only (DSR at the ingress node), the
//! client's ACK for TCP, and the client's second packet for UDP.

//!
//! A flow's reply key can be taken by another flow: one client address and port reaching one
//! backend through two frontends (a load balancer in front of the cluster reuses its source
//! port across NodePorts and Services) would share the reply key, and replies of one would be
//! un-NATed to the other's frontend. [`claim_reply_key`] detects it when the flow is created
//! and moves the second flow's client port, as the backend sees it, to a free one.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_jiffies64};
use weir_common::{
    collision, counter, ct_flags, ct_kind, ct_seen, partner_key, CtKey, CtValue, CT_REFRESH_NS,
    PROTO_TCP,
};

use crate::maps::{count, CLOCK, CONNTRACK, CT_NEW};
use crate::packet::ktime;
use crate::NewEntry;

/// This CPU's reading of the monotonic clock at the last jiffy it saw: what an established
/// packet stamps its entry with. Reading the clock costs about a third of that packet's whole
/// path on these machines (a paravirtual clock source); `bpf_jiffies64` is a memory load the
/// verifier writes in place of the call. At most a jiffy behind `bpf_ktime_get_ns`, which
/// matters to no timeout.
#[repr(C)]
pub struct Clock {
    jiffies: u64,
    ns: u64,
}

#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = CLOCK.get_ptr_mut(0) else {
        return ktime();
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU.
    let clock = unsafe { &mut *clock };
    if clock.jiffies != jiffies {
        clock.jiffies = jiffies;
        clock.ns = ktime();
    }
    clock.ns
}

/// Notes a packet of the entry's flow: the TCP flags it showed, and the time, written at most
/// once per [`CT_REFRESH_NS`] (a write per packet would bounce the entry between CPUs) or when a
/// flag shows for the first time. `now` may lag the entry's own stamp (a coarse reading against
/// an exact one): the entry is then fresh enough.
#[inline(always)]
pub fn refresh(entry: &mut CtValue, seen: u8, now: u64) {
    if entry.seen | seen != entry.seen || now.saturating_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.seen |= seen;
        entry.last_seen_ns = now.max(entry.last_seen_ns);
    }
}

/// `-EEXIST`, as map updates with `BPF_NOEXIST` return it.
const EEXIST: i32 = -17;

/// The entry of `key`: the established table first, then the new-flow table.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    match CONNTRACK.get_ptr_mut(key) {
        Some(entry) => Some(entry),
        None => CT_NEW.get_ptr_mut(key),
    }
}

/// TCP flags of a client's packet that confirm a handshake: ACK, without SYN or RST.
#[inline(always)]
fn confirming_ack(seen: u8) -> bool {
    seen & (ct_seen::SYN | ct_seen::ACK | ct_seen::RST) == ct_seen::ACK
}

/// Whether a packet that matched `entry` in the new-flow table (on its own key) may answer its
/// flow; [`promote`] checks the rest.
#[inline(always)]
pub fn answers(entry: &CtValue, proto: u8, seen: u8) -> bool {
    if proto != PROTO_TCP {
        // A reply, on a reverse entry or on a return entry (a backend's node, where replies go
        // back through the tunnel); on a DSR entry, the client's second packet.
        return entry.kind != ct_kind::FORWARD;
    }
    match entry.kind {
        // The client's ACK: whether the server answered first is the reverse entry's to say.
        ct_kind::FORWARD => confirming_ack(seen),
        ct_kind::ENCAP => entry.flags & ct_flags::DSR != 0 && confirming_ack(seen),
        _ => false,
    }
}

/// Whether a client's packet arriving through the tunnel answers the return entry it matched
/// (kept under the reply's key: its own flags in the low nibble are the backend's).
#[inline(always)]
pub fn answers_return(entry: &CtValue, proto: u8, client_seen: u8) -> bool {
    proto == PROTO_TCP && confirming_ack(client_seen) && server_answered(entry.seen & 0x0f)
}

/// A server's flags that show it accepted the connection: an ACK (its SYN-ACK), no RST.
#[inline(always)]
fn server_answered(seen: u8) -> bool {
    seen & (ct_seen::ACK | ct_seen::RST) == ct_seen::ACK
}

/// Moves the flow of the new-flow entry `key` (and its partner, if it has one) to the
/// established table. Each entry is inserted there before it is deleted here, so some table
/// holds it at every moment; an entry another CPU promoted first is only deleted here. A call
/// of its own, with a small frame: old verifiers (5.10, 6.1) count the call chain's frames whole.
#[inline(never)]
pub fn promote(key: &CtKey) {
    let Some(entry) = CT_NEW.get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and the element stays allocated for
    // this program run (RCU); it is read before anything here deletes it.
    let entry = unsafe { &*entry };
    let Some(other_key) = partner_key(key, entry) else {
        if move_entry(key, entry) {
            count(counter::CT_PROMOTED);
        }
        return;
    };
    // The partner may be in either table: another CPU may be promoting the same flow.
    let Some(other) = CT_NEW
        .get_ptr(&other_key)
        .or_else(|| CONNTRACK.get_ptr(&other_key))
    else {
        // Evicted: a flow without its other half is not worth keeping.
        return;
    };
    // SAFETY: as above.
    let other = unsafe { &*other };
    let reverse = if entry.kind == ct_kind::REVERSE {
        entry
    } else {
        other
    };
    if key.proto == PROTO_TCP && !server_answered(reverse.seen) {
        return;
    }
    if move_entry(&other_key, other) && move_entry(key, entry) {
        count(counter::CT_PROMOTED);
    }
}

/// Inserts the entry into the established table (unless it is there already), then deletes it
/// from the new-flow table. False when the insert failed and nothing moved.
#[inline(always)]
fn move_entry(key: &CtKey, value: &CtValue) -> bool {
    let held = match CONNTRACK.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(e) => e == EEXIST,
    };
    if held {
        let _ = CT_NEW.remove(key);
    }
    held
}

/// Records the new flow's REVERSE entry `new` under its reply key, unless another flow holds
/// that key in either table: then the client's port as the backend sees it moves
/// (`new.key.dport_be`; `client_port_be` keeps the client's own), up to `collision::TRIES`
/// times. `forward` is the client's key. An entry of the same translation (this flow's, made
/// by another CPU or left by an earlier packet) is no collision: it is followed. Returns
/// whether the port moved. A call of its own, with a small frame: old verifiers count the
/// chain's frames whole.
#[inline(never)]
pub fn claim_reply_key(forward: &CtKey, new: &mut NewEntry) -> Result<bool, u32> {
    for attempt in 0..collision::TRIES {
        if attempt > 0 {
            new.key.dport_be = moved_port_be(forward, attempt);
            new.value.client_port_be = forward.sport_be;
        }
        if let Some(holder) = CONNTRACK.get_ptr(&new.key) {
            // SAFETY: the pointer comes from a successful lookup and the element stays
            // allocated for this program run (RCU); only read.
            if !follows(unsafe { &*holder }, &new.value) {
                continue;
            }
        }
        if CT_NEW
            .insert(&new.key, &new.value, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Ok(attempt > 0);
        }
        match CT_NEW.get_ptr(&new.key) {
            // SAFETY: as above.
            Some(holder) if follows(unsafe { &*holder }, &new.value) => return Ok(attempt > 0),
            Some(_) => {}
            None => return Err(counter::DROP_CT_FULL),
        }
    }
    Err(counter::DROP_CT_COLLISION)
}

/// Not inlined: in the loop above, the compiler would keep every word of the key it hashes in
/// registers across the iterations, and spill them, growing the frame past the verifier's
/// budget for the call chain.
#[inline(never)]
fn moved_port_be(forward: &CtKey, attempt: u32) -> u16 {
    collision::moved_port_be(forward, attempt)
}

/// Whether the flow may keep the reply key another entry holds: that entry translates replies
/// as `entry` would (the same frontend, client port and way), or sends them back through the
/// tunnel to the node that translated the connection (a return entry). This node cannot tell
/// that connection, now reaching it directly (an ECMP router moved the client's route, as the
/// `maglev` scenario does), from another one of the same client port: it takes it for the
/// same, so that a moved connection keeps its backend and its replies keep their way. (A
/// backend's node judges flows arriving through the tunnel by their TCP flags instead, and
/// moves a second connection's port: see `tunnel::remember_return`.)
#[inline(always)]
fn follows(holder: &CtValue, entry: &CtValue) -> bool {
    holder.kind == ct_kind::ENCAP || same_translation(holder, entry)
}

/// Whether the entry holding a reply key translates replies as `entry` would: to the same
/// frontend, the same client port, the same way.
/// Non-short-circuit `&`: fewer branches for the verifier to walk in every state.
#[inline(always)]
fn same_translation(holder: &CtValue, entry: &CtValue) -> bool {
    (holder.kind == ct_kind::REVERSE)
        & (holder.nat_port_be == entry.nat_port_be)
        & (holder.client_port_be == entry.client_port_be)
        & (holder.flags == entry.flags)
        & (holder.nat_addr == entry.nat_addr)
}
