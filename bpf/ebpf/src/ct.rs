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

use aya_ebpf::bindings::BPF_NOEXIST;
use weir_common::{counter, ct_flags, ct_kind, ct_seen, partner_key, CtKey, CtValue, PROTO_TCP};

use crate::maps::{count, CONNTRACK, CT_NEW};

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
