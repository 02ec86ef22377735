//! Picking a backend for a new flow: session affinity first, then Maglev or a random slot.
//! Only the id travels back, so the caller borrows the backend from its map instead of copying.

use weir_common::{
    backend_flags, counter, flow_hash, maglev_index, maglev_slot, service_flags, AffinityKey,
    AffinityValue, BackendSlotKey, ServiceValue, LOCAL_SLOT,
};

use crate::maps::{AFFINITY, BACKENDS, BACKEND_SLOTS, MAGLEV};
use crate::packet::{prandom, Ip};
use crate::Flow;

/// Returned when the service has no endpoint at all: the caller rejects. Backend ids start at 1.
pub const NO_BACKEND: u32 = 0;

/// Which backends a new flow may get.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Scope {
    Any,
    /// This node's own (externalTrafficPolicy: Local).
    Local,
    /// This node's own, and with Maglev the one the table names when it is local: a DSR packet
    /// from another node, whose table picked that backend and sent the flow here for it.
    LocalAsTable,
}

#[inline(never)]
pub fn select_backend(
    ip: &Ip,
    flow: &Flow,
    service: &ServiceValue,
    scope: Scope,
) -> Result<u32, u32> {
    let now = flow.now;
    let local_only = scope != Scope::Any;
    if service.backend_count == 0 {
        return Ok(NO_BACKEND);
    }
    let (base, count) = if local_only {
        (LOCAL_SLOT, service.local_backend_count)
    } else {
        (0, service.backend_count)
    };
    if count == 0 {
        // Endpoints exist, just none on this node: kube-proxy drops these too.
        return Err(counter::DROP_NO_LOCAL_BACKEND);
    }

    let affinity_key = AffinityKey {
        client: ip.saddr,
        service_id: service.service_id,
        family: ip.family,
        _pad: [0; 3],
    };
    if service.affinity_timeout_s != 0 {
        // SAFETY: copied out at once.
        if let Some(known) = unsafe { AFFINITY.get(&affinity_key) } {
            let known = *known;
            let fresh = now.wrapping_sub(known.last_used_ns)
                < service.affinity_timeout_s as u64 * 1_000_000_000;
            let slot = BackendSlotKey {
                service_id: service.service_id,
                slot: known.slot,
            };
            // The slot must still name the backend: otherwise it left the service.
            // SAFETY: copied out at once.
            let still_there =
                matches!(unsafe { BACKEND_SLOTS.get(&slot) }, Some(id) if *id == known.backend_id);
            if fresh && still_there && (known.slot & LOCAL_SLOT) == base {
                remember(&affinity_key, known.backend_id, known.slot, now);
                return Ok(known.backend_id);
            }
        }
    }

    if scope != Scope::Local
        && service.flags & service_flags::MAGLEV != 0
        && service.affinity_timeout_s == 0
    {
        let hash = flow_hash(&ip.saddr, flow.sport_be, flow.dport_be, ip.proto);
        let index = maglev_index(hash, service.maglev_size);
        let (key, offset) = maglev_slot(service.service_id, index);
        if let Some(chunk) = MAGLEV.get_ptr(&key) {
            // SAFETY: the pointer comes from a successful lookup; the agent replaces chunks whole.
            let chunk = unsafe { &*chunk };
            // An entry past the table's end (a size change half written) reads 0: no backend.
            if let Some(&id) = chunk
                .backend_ids
                .get(offset)
                .filter(|id| **id != NO_BACKEND)
            {
                if scope == Scope::Any || is_local(id) {
                    return Ok(id);
                }
            }
        }
    }

    let slot = base | (prandom() % count);
    let key = BackendSlotKey {
        service_id: service.service_id,
        slot,
    };
    // SAFETY: copied out at once.
    let id = match unsafe { BACKEND_SLOTS.get(&key) } {
        Some(id) => *id,
        None => return Err(counter::DROP_BACKEND_MISSING),
    };
    if service.affinity_timeout_s != 0 {
        remember(&affinity_key, id, slot, now);
    }
    Ok(id)
}

#[inline(always)]
fn is_local(backend_id: u32) -> bool {
    // SAFETY: the pointer comes from a successful lookup and is only read here.
    BACKENDS
        .get_ptr(&backend_id)
        .is_some_and(|backend| unsafe { (*backend).flags } & backend_flags::LOCAL != 0)
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, slot: u32, now: u64) {
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        slot,
    };
    // Losing a record to a full table only costs the client its affinity, never the flow.
    let _ = AFFINITY.insert(key, &value, 0);
}
