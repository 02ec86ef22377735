//! Kubernetes NetworkPolicy, decided at a flow's first packet wherever it meets Weir.
//!
//! The agent compiles every policy into maps (`weir_common::PolicyRuleKey` and its neighbours):
//! which of this node's pods are isolated, in which direction, and under which endpoint id their
//! rules are keyed; every pod address of the cluster with its peer identity (pods of the same
//! namespace, labels and named ports share one); every ipBlock prefix with an identity of its
//! own, found by longest match; and the rules, a longest match on (endpoint, peer identity,
//! direction, protocol, port) where a prefix length leaves out what a rule does not care about.
//! A decision is therefore a fixed number of lookups, whatever the number of policies or rules:
//! two endpoint lookups, then per isolated direction the peer's identities (any, its pod's, its
//! most specific ipBlock prefix) against the rules.
//!
//! Flows are stateful: an allowed flow is recorded by both directions' tuples (as the pod sees
//! them, after translation), so its further packets, its replies and the ICMP errors about it
//! pass after one lookup, and a reply never needs a rule of its own. A service's flow is
//! decided when its backend is chosen, with the client's own address and the backend (egress
//! policy sees the backend, not the ClusterIP); its further packets are the conntrack's and
//! never come here. Policy changes apply to new flows: a recorded flow stays allowed until it
//! is idle for `POLICY_FLOW_IDLE_NS` (or, TCP, a new connection starts on its tuple once the
//! record is over a second old), as connections outlive rule changes in Calico's and Cilium's
//! data planes.
//!
//! Verdicts (denied flows, allowed new ones) go to `weir-agent monitor` while one watches
//! (`monitor.rs`).
//!
//! Always allowed: traffic from the node's own addresses to its pods (Kubernetes: kubelet
//! probes), and ICMPv6 beyond echo and errors (neighbour discovery, router and multicast
//! listener messages), without which no IPv6 reaches a pod.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use weir_common::{
    counter, ct_seen, node_flags, policy_direction, policy_flags, policy_rule_bits, Addr, CtKey,
    HostAddrKey, PolicyCidrKey, PolicyEndpoint, PolicyRuleKey, CT_REFRESH_NS, FAMILY_V4, FAMILY_V6,
    POLICY_ANY_PEER, POLICY_CIDR_FIXED_BITS, POLICY_FLOW_IDLE_NS, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP,
};

use crate::maps::{
    count, node_config, BACKENDS, HOST_ADDRS, POLICY_CIDRS, POLICY_ENDPOINTS, POLICY_FLOWS,
    POLICY_PEERS, POLICY_RULES, SCRATCH,
};
use crate::packet::{
    load, tcp_seen_bits, Ip, ETH_P_IP, ETH_P_IPV6, FIRST_FRAGMENT, IPV4_DADDR, IPV6_DADDR, IP_OFF,
    NOT_FRAGMENT, TCP_FLAGS,
};

/// Not a counter: the packet may go on. Anything else is the drop counter to account it to.
pub const ALLOWED: u32 = u32::MAX;

/// ICMPv6 types from which on messages are neither echo nor errors (neighbour discovery,
/// router and multicast listener messages): link plumbing, always allowed.
const ICMPV6_PLUMBING: u8 = 130;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Whether NetworkPolicy isolates any pod of this node: without, nothing here runs.
#[inline(always)]
pub fn enforced() -> bool {
    node_config().flags & node_flags::POLICY != 0
}

/// The decision on a packet of a flow by its tuple: [`ALLOWED`] or the drop counter. `seen`:
/// the TCP flags' `ct_seen` bits, 0 for other protocols; `service`: a service's new flow (its
/// frontend is in the scratch slot, for the monitor).
#[inline(never)]
pub fn decide(key: &CtKey, seen: u8, service: bool) -> u32 {
    if !enforced() {
        return ALLOWED;
    }
    let source = endpoint(&key.saddr, key.family);
    let destination = endpoint(&key.daddr, key.family);
    if flags(source) == 0 && flags(destination) == 0 {
        // Neither end is a pod a policy selects: nothing to decide, nothing to record.
        return ALLOWED;
    }
    let now = crate::ct::coarse_now();
    let opening = key.proto == PROTO_TCP && seen & (ct_seen::SYN | ct_seen::ACK) == ct_seen::SYN;
    // The record's age: `POLICY_FLOW_IDLE_NS` and over, none.
    let age = match POLICY_FLOWS.get_ptr_mut(key) {
        Some(last_seen) => {
            // SAFETY: the pointer comes from a successful lookup; a racing writer only stores
            // another recent time, and a lost update is harmless.
            let last_seen = unsafe { &mut *last_seen };
            let age = now.saturating_sub(*last_seen);
            if age > CT_REFRESH_NS && age < POLICY_FLOW_IDLE_NS {
                *last_seen = now;
            }
            age
        }
        None => POLICY_FLOW_IDLE_NS,
    };
    let recorded = age < POLICY_FLOW_IDLE_NS;
    // A new TCP connection on a tuple recorded over a refresh interval ago (its old connection
    // is over: a client reusing its port) is decided anew; the same SYN met a moment ago (at
    // `weir_ingress`, now at the pod's door) is not decided twice.
    if recorded && !(opening && age > CT_REFRESH_NS) {
        return ALLOWED;
    }
    if flags(source) & policy_flags::EGRESS != 0
        && !allows(id(source), policy_direction::EGRESS, key)
    {
        crate::monitor::note(key, counter::DROP_POLICY_EGRESS, id(source), service);
        return counter::DROP_POLICY_EGRESS;
    }
    let ingress_isolated = flags(destination) & policy_flags::INGRESS != 0;
    if ingress_isolated
        && !from_this_node(&key.saddr, key.family)
        && !allows(id(destination), policy_direction::INGRESS, key)
    {
        crate::monitor::note(key, counter::DROP_POLICY_INGRESS, id(destination), service);
        return counter::DROP_POLICY_INGRESS;
    }
    // Both directions, so replies and errors about the flow find it. Losing a race to another
    // CPU's record of the same flow writes the same thing.
    let _ = POLICY_FLOWS.insert(key, &now, 0);
    let _ = POLICY_FLOWS.insert(&key.reversed(), &now, 0);
    if !recorded {
        count(counter::POLICY_ALLOWED);
        let decider = if ingress_isolated {
            id(destination)
        } else {
            id(source)
        };
        crate::monitor::note(key, counter::POLICY_ALLOWED, decider, service);
    }
    ALLOWED
}

/// [`decide`] on the tuple the fast path noted in the scratch slot (`fast::DECIDE_POLICY`).
#[inline(never)]
pub fn decide_noted(seen: u8) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return counter::DROP_CT_FULL;
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU; the fast path
    // wrote the field and returned.
    decide(unsafe { &(*scratch).policy }, seen, false)
}

/// The decision on a service's new flow once its backend is chosen (`Scratch::flow`,
/// `backend_id` set): the client's own address and port to the backend's, as the backend will
/// see them. Hairpin (a pod reaching itself through a service) stays within the pod's own
/// traffic: allowed.
#[inline(never)]
pub fn service_flow() -> u32 {
    if !enforced() {
        return ALLOWED;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return counter::DROP_CT_FULL;
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU; the flow path
    // filled `ip` and `flow` and borrows nothing of the slot during the call.
    let (ip, flow, key) = unsafe { (&(*scratch).ip, &(*scratch).flow, &mut (*scratch).policy) };
    let Some(backend) = BACKENDS.get_ptr(&flow.backend_id) else {
        return counter::DROP_BACKEND_MISSING;
    };
    // SAFETY: the pointer comes from a successful lookup; the kernel keeps the element alive
    // for the program run (RCU).
    let backend = unsafe { &*backend };
    if backend.family == ip.family && backend.addr == ip.saddr {
        return ALLOWED;
    }
    *key = CtKey {
        saddr: ip.saddr,
        daddr: backend.addr,
        sport_be: flow.sport_be,
        dport_be: backend.port_be,
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    };
    decide(key, 0, true)
}

/// The decision on a packet the full path leaves untranslated (`ip` parsed; TCP and UDP ports
/// read here, ICMP judged by its type): [`ALLOWED`] or the drop counter.
#[inline(never)]
pub fn untranslated(ctx: &TcContext, ip: &Ip) -> u32 {
    if !enforced() || ip.family == 0 {
        return ALLOWED;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return counter::DROP_CT_FULL;
    };
    // SAFETY: as in `service_flow`.
    let key = unsafe { &mut (*scratch).policy };
    *key = CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: 0,
        dport_be: 0,
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    };
    let mut seen = 0;
    if ip.fragment != NOT_FRAGMENT && ip.fragment != FIRST_FRAGMENT {
        // A later fragment has no ports: its first fragment was decided.
        return ALLOWED;
    }
    if ip.proto == PROTO_TCP || ip.proto == PROTO_UDP {
        let Ok([sport_be, dport_be]) = load::<[u16; 2]>(ctx, ip.l4_off) else {
            return counter::DROP_TRUNCATED;
        };
        key.sport_be = sport_be;
        key.dport_be = dport_be;
        if ip.proto == PROTO_TCP {
            let Ok(flags) = load::<u8>(ctx, ip.l4_off + TCP_FLAGS) else {
                return counter::DROP_TRUNCATED;
            };
            seen = tcp_seen_bits(flags);
        }
    } else if ip.proto == PROTO_ICMP || ip.proto == PROTO_ICMPV6 {
        let Ok(icmp_type) = load::<u8>(ctx, ip.l4_off) else {
            return counter::DROP_TRUNCATED;
        };
        if ip.proto == PROTO_ICMPV6 && icmp_type >= ICMPV6_PLUMBING {
            return ALLOWED;
        }
        // Echo requests and replies share a tuple (ports 0): a reply finds its request's
        // record. Errors are judged by the flow they quote: allowed with it, never alone.
        if !is_echo(ip.proto, icmp_type) && crate::icmp::quoted_flow(ctx, ip, key) {
            if POLICY_FLOWS.get_ptr(&*key).is_some() || !isolates(key) {
                return ALLOWED;
            }
            let destination = endpoint(&ip.daddr, ip.family);
            let (outcome, decider) = if flags(destination) & policy_flags::INGRESS != 0 {
                (counter::DROP_POLICY_INGRESS, id(destination))
            } else {
                (
                    counter::DROP_POLICY_EGRESS,
                    id(endpoint(&ip.saddr, ip.family)),
                )
            };
            // The event shows the flow the error quotes: the one nothing allowed.
            crate::monitor::note(key, outcome, decider, false);
            return outcome;
        }
    }
    decide(key, seen, false)
}

/// Whether the frame leaving by `weir_egress` goes to a pod a policy selects: one load and one
/// lookup for everything else leaving an interface, before [`at_pod_door`] parses anything.
/// Its own frame: inlined, its key would sit on `weir_egress`'s frame, at the top of the chain
/// down to the rules (`agent/tests/stack_budget.rs`).
#[inline(never)]
pub fn towards_selected_pod(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the program's own context.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let key = match protocol {
        ETH_P_IP => match load::<[u8; 4]>(ctx, IP_OFF + IPV4_DADDR) {
            Ok(daddr) => host_key(&Addr::from_v4(daddr), FAMILY_V4),
            Err(_) => return false,
        },
        ETH_P_IPV6 => match load::<[u8; 16]>(ctx, IP_OFF + IPV6_DADDR) {
            Ok(daddr) => host_key(&Addr::from_v6(daddr), FAMILY_V6),
            Err(_) => return false,
        },
        _ => return false,
    };
    POLICY_ENDPOINTS.get_ptr(&key).is_some()
}

/// The decision at the door of a pod (`weir_egress` on its interface, once
/// [`towards_selected_pod`]), for what reaches it without passing `weir_ingress`'s decision:
/// the node's own traffic (allowed), traffic that arrived through a tunnel and was routed by
/// the stack, and any interface Weir does not attach to.
#[inline(never)]
pub fn at_pod_door(ctx: &TcContext) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return ALLOWED;
    };
    // SAFETY: as in `service_flow`; `weir_egress` runs alone on this CPU and uses the slot's
    // `ip` only after this returns.
    let ip = unsafe { &mut (*scratch).ip };
    *ip = Ip::EMPTY;
    if crate::packet::parse(ctx, false, ip) != crate::packet::PARSED {
        return ALLOWED;
    }
    untranslated(ctx, ip)
}

#[inline(always)]
fn is_echo(proto: u8, icmp_type: u8) -> bool {
    if proto == PROTO_ICMP {
        icmp_type == ICMP_ECHO_REQUEST || icmp_type == ICMP_ECHO_REPLY
    } else {
        icmp_type == ICMPV6_ECHO_REQUEST || icmp_type == ICMPV6_ECHO_REPLY
    }
}

/// Whether either end of the tuple is a pod a policy selects.
#[inline(always)]
fn isolates(key: &CtKey) -> bool {
    flags(endpoint(&key.saddr, key.family)) != 0 || flags(endpoint(&key.daddr, key.family)) != 0
}

/// The policy endpoint at `addr`, packed in one register (a call returns no more): its id in
/// the high half, its `policy_flags` in the low byte; 0 when no policy selects a pod there.
#[inline(never)]
fn endpoint(addr: &Addr, family: u8) -> u64 {
    let key = host_key(addr, family);
    match POLICY_ENDPOINTS.get_ptr(&key) {
        Some(found) => {
            // SAFETY: the pointer comes from a successful lookup; the value is copied at once.
            let found: PolicyEndpoint = unsafe { *found };
            ((found.id as u64) << 32) | found.flags as u64
        }
        None => 0,
    }
}

#[inline(always)]
fn flags(endpoint: u64) -> u8 {
    endpoint as u8
}

#[inline(always)]
fn id(endpoint: u64) -> u32 {
    (endpoint >> 32) as u32
}

#[inline(always)]
fn host_key(addr: &Addr, family: u8) -> HostAddrKey {
    HostAddrKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    }
}

/// Whether `addr` is one of this node's own addresses.
#[inline(never)]
fn from_this_node(addr: &Addr, family: u8) -> bool {
    let key = host_key(addr, family);
    HOST_ADDRS.get_ptr(&key).is_some()
}

/// Whether a rule of `endpoint` in `direction` allows the flow `key` (its peer: the destination
/// for egress, the source for ingress; the destination's port): the peer tried as any address,
/// as the pod at that address, and as the most specific ipBlock prefix holding it.
#[inline(never)]
fn allows(endpoint: u32, direction: u8, key: &CtKey) -> bool {
    let (peer, family, proto, port_be) = (
        if direction == policy_direction::EGRESS {
            &key.daddr
        } else {
            &key.saddr
        },
        key.family,
        key.proto,
        key.dport_be,
    );
    let mut rule = Key::new(
        policy_rule_bits::PORT,
        PolicyRuleKey {
            endpoint_be: endpoint.to_be(),
            identity_be: POLICY_ANY_PEER,
            direction,
            proto,
            port_be,
        },
    );
    if POLICY_RULES.get(&rule).is_some() {
        return true;
    }
    let pod = host_key(peer, family);
    if let Some(identity) = POLICY_PEERS.get_ptr(&pod) {
        // SAFETY: the pointer comes from a successful lookup; the value is copied at once.
        rule.data.identity_be = unsafe { *identity }.to_be();
        if POLICY_RULES.get(&rule).is_some() {
            return true;
        }
    }
    let address_bits = if family == FAMILY_V6 { 128 } else { 32 };
    let cidr = Key::new(
        POLICY_CIDR_FIXED_BITS + address_bits,
        PolicyCidrKey {
            family,
            _pad: [0; 3],
            addr: *peer,
        },
    );
    if let Some(identity) = POLICY_CIDRS.get(&cidr) {
        rule.data.identity_be = identity.to_be();
        if POLICY_RULES.get(&rule).is_some() {
            return true;
        }
    }
    false
}
