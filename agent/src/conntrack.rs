//! Conntrack as user space sees it: flows assembled from their two entries, their state derived
//! from the TCP flags each direction has seen, and expiry.
//!
//! The kernel never deletes entries (only LRU eviction does, under pressure); reclaiming expired
//! flows is the agent's job, both directions together.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use weir_common::{ct_flags, ct_kind, ct_seen, Addr, CtKey, CtValue, FrontendKey, PROTO_TCP};

use crate::compile::{proto_name, socket_addr};
use crate::config::ConntrackConfig;
use crate::dataplane::{ConntrackMap, DataplaneError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    SynSent,
    Established,
    Closing,
    Udp,
}

impl FlowState {
    pub fn name(self) -> &'static str {
        match self {
            FlowState::SynSent => "syn_sent",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::Udp => "udp",
        }
    }
}

/// Derives the state of a flow from the flag bits its two directions have seen.
pub fn flow_state(proto: u8, forward_seen: u8, reverse_seen: u8) -> FlowState {
    if proto != PROTO_TCP {
        return FlowState::Udp;
    }
    let either = forward_seen | reverse_seen;
    if either & ct_seen::RST != 0
        || (forward_seen & ct_seen::FIN != 0 && reverse_seen & ct_seen::FIN != 0)
    {
        FlowState::Closing
    } else if reverse_seen != 0 {
        FlowState::Established
    } else {
        FlowState::SynSent
    }
}

/// The state of a flow this node sees only partly: a DSR ingress node sees the client's side
/// alone, so one FIN (or an RST) already means closing and an ACK means established.
fn encap_state(proto: u8, own: u8, other: u8) -> FlowState {
    if proto != PROTO_TCP {
        return FlowState::Udp;
    }
    let either = own | other;
    if either & (ct_seen::RST | ct_seen::FIN) != 0 {
        FlowState::Closing
    } else if either & ct_seen::ACK != 0 {
        FlowState::Established
    } else {
        FlowState::SynSent
    }
}

pub fn timeout(config: &ConntrackConfig, state: FlowState) -> Duration {
    match state {
        FlowState::SynSent => config.tcp_syn_timeout,
        FlowState::Established => config.tcp_established_timeout,
        FlowState::Closing => config.tcp_closing_timeout,
        FlowState::Udp => config.udp_timeout,
    }
}

/// The key of the entry paired with this one; ENCAP entries stand alone.
pub fn partner_key(key: &CtKey, value: &CtValue) -> Option<CtKey> {
    let hairpin = value.flags & ct_flags::HAIRPIN != 0;
    match value.kind {
        // Replies come from the backend to the client (or to the hairpin address).
        ct_kind::FORWARD => Some(CtKey {
            saddr: value.nat_addr,
            daddr: if hairpin {
                value.tunnel_peer
            } else {
                key.saddr
            },
            sport_be: value.nat_port_be,
            dport_be: key.sport_be,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }),
        // The client addressed the frontend the reply is rewritten to; under hairpin the client
        // is the backend itself.
        ct_kind::REVERSE => Some(CtKey {
            saddr: if hairpin { key.saddr } else { key.daddr },
            daddr: value.nat_addr,
            sport_be: key.dport_be,
            dport_be: value.nat_port_be,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }),
        _ => None,
    }
}

pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        ct_kind::FORWARD => "forward",
        ct_kind::REVERSE => "reverse",
        ct_kind::ENCAP => "encap",
        _ => "unknown",
    }
}

/// One entry with what its flow looks like as a whole.
#[derive(Clone, Debug, Serialize)]
pub struct EntryView {
    pub kind: &'static str,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub nat: String,
    pub age_s: f64,
    pub idle_s: f64,
    pub state: &'static str,
    /// Whether the entry of the other direction is present.
    pub paired: bool,
}

pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Flow-level facts about one entry, given the whole table.
struct FlowFacts {
    state: FlowState,
    last_seen_ns: u64,
    paired: bool,
}

fn facts(entries: &BTreeMap<CtKey, CtValue>, key: &CtKey, value: &CtValue) -> FlowFacts {
    if value.kind == ct_kind::ENCAP {
        // One entry sees the flow: its own direction's flags in the low nibble, the other
        // direction's (where this node sees it) in the high one.
        return FlowFacts {
            state: encap_state(key.proto, value.seen & 0x0f, value.seen >> 4),
            last_seen_ns: value.last_seen_ns,
            paired: true,
        };
    }
    let partner = partner_key(key, value).and_then(|k| entries.get(&k));
    let (forward_seen, reverse_seen) = match (value.kind, partner) {
        (ct_kind::FORWARD, p) => (value.seen, p.map_or(0, |p| p.seen)),
        (_, p) => (p.map_or(0, |p| p.seen), value.seen),
    };
    FlowFacts {
        state: flow_state(key.proto, forward_seen, reverse_seen),
        last_seen_ns: value
            .last_seen_ns
            .max(partner.map_or(0, |p| p.last_seen_ns)),
        paired: partner.is_some(),
    }
}

pub fn view(entries: &BTreeMap<CtKey, CtValue>, now_ns: u64) -> Vec<EntryView> {
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    entries
        .iter()
        .map(|(key, value)| {
            let f = facts(entries, key, value);
            EntryView {
                kind: kind_name(value.kind),
                proto: proto_name(key.proto),
                src: socket_addr(&key.saddr, key.family, key.sport_be),
                dst: socket_addr(&key.daddr, key.family, key.dport_be),
                nat: socket_addr(&value.nat_addr, key.family, value.nat_port_be),
                age_s: secs(value.created_ns),
                idle_s: secs(f.last_seen_ns),
                state: f.state.name(),
                paired: f.paired,
            }
        })
        .collect()
}

/// Keys of every expired entry. A flow expires as a whole, after its state's timeout since the
/// last packet in either direction; an entry whose partner was evicted expires by its own.
pub fn expired(
    entries: &BTreeMap<CtKey, CtValue>,
    config: &ConntrackConfig,
    now_ns: u64,
) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, value)| {
            let f = facts(entries, key, value);
            now_ns.saturating_sub(f.last_seen_ns) > timeout(config, f.state).as_nanos() as u64
        })
        .map(|(key, _)| *key)
        .collect()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: usize,
    pub reclaimed: usize,
}

/// One garbage-collection pass over the conntrack map.
pub fn collect_garbage(
    map: &mut ConntrackMap,
    config: &ConntrackConfig,
) -> Result<GcReport, DataplaneError> {
    let entries = map.entries()?;
    let dead = expired(&entries, config, monotonic_now_ns());
    for key in &dead {
        map.remove(key)?;
    }
    Ok(GcReport {
        scanned: entries.len(),
        reclaimed: dead.len(),
    })
}

/// A backend as a flow's entries name it: address, port (network order), protocol, family.
pub type BackendAddr = (Addr, u16, u8, u8);

/// Endpoints that stopped serving a Service, with the frontends the Service had: flows from
/// those frontends to those endpoints must end, so they are not stuck on an endpoint that is
/// gone (a UDP sender that never goes idle would be, for ever).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retired {
    pub frontends: BTreeSet<FrontendKey>,
    pub backends: BTreeSet<BackendAddr>,
}

/// Keys of the entries of flows that `retired` ends: the client's entry (its frontend is one of
/// the Service's, or its NodePort on any node address) naming a retired backend, and the reply
/// entry paired with it. Entries of hairpin flows are found the same way. ENCAP entries (DSR
/// at the ingress node, returns at the backend's node) hold no backend address and expire by
/// their timeouts.
pub fn retired_flows(entries: &BTreeMap<CtKey, CtValue>, retired: &[Retired]) -> Vec<CtKey> {
    let mut out = Vec::new();
    for (key, value) in entries.iter().filter(|(_, v)| v.kind == ct_kind::FORWARD) {
        let backend = (value.nat_addr, value.nat_port_be, key.proto, key.family);
        let frontend = FrontendKey {
            addr: key.daddr,
            port_be: key.dport_be,
            proto: key.proto,
            family: key.family,
        };
        let node_port = FrontendKey {
            addr: Addr::UNSPECIFIED,
            ..frontend
        };
        let ends = retired.iter().any(|r| {
            r.backends.contains(&backend)
                && (r.frontends.contains(&frontend) || r.frontends.contains(&node_port))
        });
        if ends {
            out.push(*key);
            out.extend(partner_key(key, value).filter(|k| entries.contains_key(k)));
        }
    }
    out
}

/// Ends the flows `retired` names. The next packet of such a flow is a new flow to a serving
/// endpoint: a UDP flow moves there, a TCP one gets that endpoint's reset (it knows no such
/// connection), so the client learns at once instead of at its own timeout.
pub fn end_retired_flows(
    map: &mut ConntrackMap,
    retired: &[Retired],
) -> Result<usize, DataplaneError> {
    if retired.is_empty() {
        return Ok(0);
    }
    let entries = map.entries()?;
    let ended = retired_flows(&entries, retired);
    for key in &ended {
        map.remove(key)?;
    }
    Ok(ended.len())
}

/// Entries the kernel's LRU evicted to make room, estimated: the LRU hash map does not report
/// evictions, so they are derived from what is known.
///
/// Between two looks, `entries gained = created - removed`, and entries are removed only by the
/// agent's garbage collection (counted as it deletes them) or by LRU eviction. So
/// `evicted = created - reclaimed - (present now - present at the first look)`, counted from the
/// agent's first look (the counters and the map outlive agents; what happened before is not
/// attributed). `created` comes from the program's per-CPU outcome counters: a new local flow
/// makes two entries (forward and reverse), a tunnelled one two as well, or one where the node
/// only forwards DSR traffic, and a flow arriving through the tunnel one. A flow whose insert
/// lost a race to another CPU counts as created without adding an entry, so the estimate errs
/// high by such races (rare: two CPUs with the same flow's first packet at once). The counter
/// never goes down: a look that computes less than already reported adds nothing.
#[derive(Debug, Default)]
pub struct EvictionEstimate {
    /// (created, present) at the first look.
    base: Option<(u64, u64)>,
    reclaimed: u64,
    reported: u64,
}

/// Entries created so far, from the data path's counters (`(name, value)` rows as
/// [`crate::dataplane::Counters::read`] gives them), given whether tunnelled flows are DSR.
pub fn entries_created(counters: &[(&str, u64)], dsr: bool) -> u64 {
    let get = |name: &str| {
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    let per_tunnel_flow = if dsr { 1 } else { 2 };
    2 * get("ct_new_flow") + per_tunnel_flow * get("ct_new_tunnel") + get("ct_new_from_tunnel")
}

impl EvictionEstimate {
    /// Records one look: entries created so far (read before the map was scanned), entries the
    /// agent removed since the last look, and entries present after that. Returns the evictions
    /// to add to the counter.
    pub fn observe(&mut self, created: u64, reclaimed: u64, present: u64) -> u64 {
        let Some((created_base, present_base)) = self.base else {
            self.base = Some((created, present));
            return 0;
        };
        self.reclaimed += reclaimed;
        let evicted = (created.saturating_sub(created_base) + present_base)
            .saturating_sub(self.reclaimed + present);
        let new = evicted.saturating_sub(self.reported);
        self.reported += new;
        new
    }

    /// Evictions reported so far.
    pub fn total(&self) -> u64 {
        self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::{Addr, FAMILY_V4, PROTO_UDP};

    fn key(s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, proto: u8) -> CtKey {
        CtKey {
            saddr: Addr::from_v4(s),
            daddr: Addr::from_v4(d),
            sport_be: sp.to_be(),
            dport_be: dp.to_be(),
            proto,
            family: FAMILY_V4,
            _pad: 0,
        }
    }

    fn pair(proto: u8, fwd_seen: u8, rev_seen: u8, last_seen: u64) -> BTreeMap<CtKey, CtValue> {
        let client = [198, 19, 1, 10];
        let vip = [198, 18, 100, 10];
        let backend = [198, 19, 2, 11];
        let mut m = BTreeMap::new();
        m.insert(
            key(client, 40000, vip, 80, proto),
            CtValue {
                last_seen_ns: last_seen,
                nat_addr: Addr::from_v4(backend),
                nat_port_be: 8080u16.to_be(),
                kind: ct_kind::FORWARD,
                seen: fwd_seen,
                ..Default::default()
            },
        );
        m.insert(
            key(backend, 8080, client, 40000, proto),
            CtValue {
                last_seen_ns: last_seen,
                nat_addr: Addr::from_v4(vip),
                nat_port_be: 80u16.to_be(),
                kind: ct_kind::REVERSE,
                seen: rev_seen,
                ..Default::default()
            },
        );
        m
    }

    #[test]
    fn partners_find_each_other() {
        let m = pair(PROTO_TCP, 0, 0, 0);
        for (k, v) in &m {
            assert!(m.contains_key(&partner_key(k, v).unwrap()));
        }
    }

    #[test]
    fn tcp_states_follow_flags() {
        use ct_seen::*;
        assert_eq!(flow_state(PROTO_TCP, SYN, 0), FlowState::SynSent);
        assert_eq!(
            flow_state(PROTO_TCP, SYN | ACK, SYN | ACK),
            FlowState::Established
        );
        assert_eq!(
            flow_state(PROTO_TCP, SYN | ACK | FIN, SYN | ACK),
            FlowState::Established
        );
        assert_eq!(
            flow_state(PROTO_TCP, SYN | ACK | FIN, SYN | ACK | FIN),
            FlowState::Closing
        );
        assert_eq!(flow_state(PROTO_TCP, SYN, RST), FlowState::Closing);
        assert_eq!(flow_state(PROTO_UDP, 0, 0), FlowState::Udp);
    }

    #[test]
    fn expiry_depends_on_state_and_covers_both_directions() {
        let config = ConntrackConfig {
            tcp_established_timeout: Duration::from_secs(100),
            tcp_closing_timeout: Duration::from_secs(2),
            udp_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        let established = pair(
            PROTO_TCP,
            ct_seen::SYN | ct_seen::ACK,
            ct_seen::SYN | ct_seen::ACK,
            0,
        );
        assert!(expired(&established, &config, 50 * s).is_empty());
        let closed = pair(PROTO_TCP, ct_seen::FIN, ct_seen::FIN, 0);
        assert_eq!(expired(&closed, &config, 3 * s).len(), 2);
        let udp = pair(PROTO_UDP, 0, 0, 0);
        assert!(expired(&udp, &config, 4 * s).is_empty());
        assert_eq!(expired(&udp, &config, 6 * s).len(), 2);
    }

    #[test]
    fn evictions_are_what_creation_leaves_unexplained() {
        let mut e = EvictionEstimate::default();
        assert_eq!(e.observe(100, 0, 100), 0, "the first look sets the base");
        // 50 more created, 10 reclaimed, and the map holds 120: 20 were evicted.
        assert_eq!(e.observe(150, 10, 120), 20);
        // Nothing new: nothing added, and a look that computes less never subtracts.
        assert_eq!(e.observe(150, 0, 125), 0);
        assert_eq!(e.total(), 20);
        let rows = [
            ("ct_new_flow", 3),
            ("ct_new_tunnel", 2),
            ("ct_new_from_tunnel", 1),
        ];
        assert_eq!(entries_created(&rows, false), 6 + 4 + 1);
        assert_eq!(entries_created(&rows, true), 6 + 2 + 1);
    }
}
