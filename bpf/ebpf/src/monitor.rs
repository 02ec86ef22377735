//! Flow events for `weir-agent monitor`: NetworkPolicy's verdicts on flows, with their tuple,
//! the endpoint whose rules decided and why, in a ring buffer the monitor drains.
//!
//! Nothing is written unless a monitor holds a lease (`WEIR_MONITOR`), so a node nobody watches
//! pays one array lookup per denied packet or allowed new flow, and an established flow never
//! comes here. A full buffer loses the event (counted: `monitor_lost`), never the packet.

use weir_common::{counter, monitor_flags, Addr, CtKey, MonitorEvent};

use crate::maps::{count, MONITOR, MONITOR_EVENTS, SCRATCH};
use crate::packet::ktime;

/// Streams the verdict `outcome` (a drop counter or `counter::POLICY_ALLOWED`) on the flow
/// `key`, decided by the rules of policy endpoint `endpoint`, if a monitor asks for it.
/// `service`: the flow is a service's, whose frontend the flow path noted in the scratch slot.
#[inline(never)]
pub fn note(key: &CtKey, outcome: u32, endpoint: u32, service: bool) {
    let Some(config) = MONITOR.get(0) else {
        return;
    };
    let wanted = if outcome == counter::POLICY_ALLOWED {
        monitor_flags::ALLOWED
    } else {
        monitor_flags::DENIED
    };
    if config.flags & wanted == 0 {
        return;
    }
    let now = ktime();
    if now > config.until_ns {
        return;
    }
    let Some(mut entry) = MONITOR_EVENTS.reserve::<MonitorEvent>(0) else {
        count(counter::MONITOR_LOST);
        return;
    };
    let (mut frontend, mut frontend_port_be) = (Addr::UNSPECIFIED, 0);
    if service {
        if let Some(scratch) = SCRATCH.get_ptr(0) {
            // SAFETY: a per-CPU slot, used by one program run at a time on this CPU; the flow
            // path filled `flow.key` (client to frontend) before deciding.
            let flow = unsafe { &(*scratch).flow.key };
            frontend = flow.daddr;
            frontend_port_be = flow.dport_be;
        }
    }
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points into the ring buffer's reserved record, sized for one
    // `MonitorEvent` and ours until submitted; every field is written before the submit.
    unsafe {
        (*event).time_ns = now;
        (*event).flow = *key;
        (*event).frontend = frontend;
        (*event).frontend_port_be = frontend_port_be;
        (*event)._pad = 0;
        (*event).outcome = outcome;
        (*event).endpoint_id = endpoint;
        (*event)._pad2 = 0;
    }
    entry.submit(0);
}
