//! Conntrack as user space sees it: flows assembled from their two entries, their state derived
//! from the TCP flags each direction has seen, and expiry.
//!
//! The data path keeps two tables (see `bpf/ebpf/src/ct.rs`): new flows, and the established
//! flows it promoted out of there once answered. The kernel never deletes entries otherwise
//! (only LRU eviction does, under pressure); reclaiming expired flows is the agent's job, both
//! directions together, in both tables, on a thread of its own ([`GcThread`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use weir_common::{
    ct_kind, ct_seen, Addr, CtKey, CtValue, FrontendKey, MovedArrivalKey, PROTO_TCP,
};

use crate::compile::{proto_name, socket_addr};
use crate::config::ConntrackConfig;
use crate::dataplane::{ConntrackMap, CtTables, DataplaneError};

/// The data path and the agent pair a flow's entries the same way.
pub use weir_common::partner_key;

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
    /// When a tuple collision moved the flow's client port: the port on the other side of the
    /// translation (forward: the one the backend sees; reverse: the client's own).
    pub client_port: Option<u16>,
    pub age_s: f64,
    pub idle_s: f64,
    pub state: &'static str,
    /// Whether the entry of the other direction is present.
    pub paired: bool,
    /// `established`, or `new` for a flow not answered yet.
    pub table: &'static str,
}

pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Flow-level facts about one entry, given both tables.
struct FlowFacts {
    state: FlowState,
    last_seen_ns: u64,
    paired: bool,
    /// The flow is not answered yet: neither of its entries is in the established table.
    new: bool,
}

/// `entries` is `tables` merged (passed in so it is merged once per pass, not per entry).
fn facts(
    tables: &CtTables,
    entries: &BTreeMap<CtKey, CtValue>,
    key: &CtKey,
    value: &CtValue,
) -> FlowFacts {
    let partner_key = partner_key(key, value);
    let new =
        tables.is_new(key) && partner_key.is_none_or(|k| !tables.established.contains_key(&k));
    let facts = if value.kind == ct_kind::ENCAP {
        // One entry sees the flow: its own direction's flags in the low nibble, the other
        // direction's (where this node sees it) in the high one.
        FlowFacts {
            state: encap_state(key.proto, value.seen & 0x0f, value.seen >> 4),
            last_seen_ns: value.last_seen_ns,
            paired: true,
            new,
        }
    } else {
        let partner = partner_key.and_then(|k| entries.get(&k));
        let (forward_seen, reverse_seen) = match (value.kind, partner) {
            (ct_kind::FORWARD, p) => (value.seen, p.map_or(0, |p| p.seen)),
            (_, p) => (p.map_or(0, |p| p.seen), value.seen),
        };
        // A reply entry whose client entry is gone (its endpoint retired) only waits for
        // answers in flight: it goes as a closing connection does, UDP's too, so it does not
        // outlive the flow by a whole UDP timeout.
        let orphaned_reply = value.kind == ct_kind::REVERSE && partner.is_none();
        FlowFacts {
            state: if orphaned_reply {
                FlowState::Closing
            } else {
                flow_state(key.proto, forward_seen, reverse_seen)
            },
            last_seen_ns: value
                .last_seen_ns
                .max(partner.map_or(0, |p| p.last_seen_ns)),
            paired: partner.is_some(),
            new,
        }
    };
    // A TCP flow still in the new-flow table has not finished its handshake (a SYN-ACK to a
    // flood's spoofed source leaves it there): it expires as one that has not.
    if facts.new && facts.state == FlowState::Established {
        FlowFacts {
            state: FlowState::SynSent,
            ..facts
        }
    } else {
        facts
    }
}

pub fn view(tables: &CtTables, now_ns: u64) -> Vec<EntryView> {
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    let entries = tables.merged();
    entries
        .iter()
        .map(|(key, value)| {
            let f = facts(tables, &entries, key, value);
            EntryView {
                kind: kind_name(value.kind),
                proto: proto_name(key.proto),
                src: socket_addr(&key.saddr, key.family, key.sport_be),
                dst: socket_addr(&key.daddr, key.family, key.dport_be),
                nat: socket_addr(&value.nat_addr, key.family, value.nat_port_be),
                client_port: (value.client_port_be != 0)
                    .then(|| u16::from_be(value.client_port_be)),
                age_s: secs(value.created_ns),
                idle_s: secs(f.last_seen_ns),
                state: f.state.name(),
                paired: f.paired,
                table: if f.new { "new" } else { "established" },
            }
        })
        .collect()
}

/// Keys of every expired entry, in either table. A flow expires as a whole, after its state's
/// timeout since the last packet in either direction; an entry whose partner was evicted
/// expires by its own. A flow not answered yet expires by the SYN timeout at most (TCP).
pub fn expired(tables: &CtTables, config: &ConntrackConfig, now_ns: u64) -> Vec<CtKey> {
    let entries = tables.merged();
    entries
        .iter()
        .filter(|(key, value)| {
            let f = facts(tables, &entries, key, value);
            now_ns.saturating_sub(f.last_seen_ns) > timeout(config, f.state).as_nanos() as u64
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Entries per conntrack table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    pub established: usize,
    pub new: usize,
}

impl TableCounts {
    pub fn total(&self) -> usize {
        self.established + self.new
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Entries found in each table.
    pub scanned: TableCounts,
    /// Entries removed from each table.
    pub reclaimed: TableCounts,
}

impl GcReport {
    /// Entries left in each table after the pass (as far as the pass knows: the data path
    /// kept working meanwhile).
    pub fn present(&self) -> TableCounts {
        TableCounts {
            established: self.scanned.established - self.reclaimed.established,
            new: self.scanned.new - self.reclaimed.new,
        }
    }
}

/// Moved client ports (at a backend's node, see [`MovedArrivalKey`]) whose return entry is in
/// neither table, or is among `dead`: the flow ended, and its next packet through that node, if
/// any, is judged afresh.
pub fn ended_moves(
    moves: &BTreeMap<MovedArrivalKey, u16>,
    tables: &CtTables,
    dead: &[CtKey],
) -> Vec<MovedArrivalKey> {
    if moves.is_empty() {
        return Vec::new();
    }
    let dead: BTreeSet<&CtKey> = dead.iter().collect();
    moves
        .iter()
        .filter(|(key, port_be)| {
            let entry = key.moved_reply_key(**port_be);
            !(tables.established.contains_key(&entry) || tables.new.contains_key(&entry))
                || dead.contains(&entry)
        })
        .map(|(key, _)| *key)
        .collect()
}

/// One garbage-collection pass over both conntrack tables, then over the moved client ports.
pub fn collect_garbage(
    map: &mut ConntrackMap,
    config: &ConntrackConfig,
) -> Result<GcReport, DataplaneError> {
    // Moves first: the data path records a move after its return entry, so every move read
    // here has its entry in the tables read next, unless that entry is gone.
    let moves = map.moved_arrivals()?;
    let tables = map.tables()?;
    let dead = expired(&tables, config, monotonic_now_ns());
    map.remove_all(&dead)?;
    for key in ended_moves(&moves, &tables, &dead) {
        map.remove_moved_arrival(&key)?;
    }
    let removed_from = |table: &BTreeMap<CtKey, CtValue>| {
        dead.iter().filter(|key| table.contains_key(key)).count()
    };
    Ok(GcReport {
        scanned: TableCounts {
            established: tables.established.len(),
            new: tables.new.len(),
        },
        reclaimed: TableCounts {
            established: removed_from(&tables.established),
            new: removed_from(&tables.new),
        },
    })
}

/// Name of the garbage collector's thread.
pub const GC_THREAD_NAME: &str = "weir-ct-gc";

/// Garbage collection on a thread of its own, with its own handles on the maps: a pass over full
/// tables takes seconds, and the agent's loop must keep turning meanwhile. A pass runs at once,
/// then every `gc_interval`; each pass's result goes to `report`, on the collector's thread.
/// The loop may delete entries at the same time (ending retired flows): deleting is idempotent,
/// so neither can undo the other. Dropping the handle stops the thread after its current pass.
pub struct GcThread {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What one pass reports: its result and how long it took.
pub type GcOutcome = (Result<GcReport, DataplaneError>, Duration);

impl GcThread {
    pub fn spawn(
        mut map: ConntrackMap,
        config: ConntrackConfig,
        mut report: impl FnMut(GcOutcome) + Send + 'static,
    ) -> std::io::Result<GcThread> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(GC_THREAD_NAME.to_owned())
            .spawn(move || loop {
                let started = Instant::now();
                let result = collect_garbage(&mut map, &config);
                report((result, started.elapsed()));
                match stopped.recv_timeout(config.gc_interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // Asked to stop, or the handle is gone.
                    _ => return,
                }
            })?;
        Ok(GcThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for GcThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
/// the Service's, or its NodePort on any node address) naming a retired backend; the reply
/// entry paired with it stays (see [`end_retired_flows`]). Hairpin flows are found the same way. ENCAP entries (DSR
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
        }
    }
    out
}

/// Ends the flows `retired` names. The next packet of such a flow is a new flow to a serving
/// endpoint: a UDP flow moves there, a TCP one gets that endpoint's reset (it knows no such
/// connection), so the client learns at once instead of at its own timeout. Only the client's
/// entries go: an answer the old endpoint has in flight is still translated back by its reply
/// entry, which then expires as an unpaired entry does (the new flow's reply entry names the
/// new endpoint, so the two never meet).
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
/// agent's garbage collection (counted as it deletes them) or by LRU eviction, in either table
/// (`present` counts both; a promotion inserts in one and deletes in the other, which leaves the
/// sum as it was). So
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

    #[test]
    fn a_moved_port_is_forgotten_with_its_return_entry() {
        let client = [198, 18, 0, 200];
        let pod = [198, 19, 1, 10];
        let moved_from = |peer: [u8; 4]| MovedArrivalKey {
            flow: key(client, 40000, pod, 8080, PROTO_TCP),
            peer: Addr::from_v4(peer),
            peer_family: FAMILY_V4,
            _pad: [0; 3],
        };
        let (live, ending, gone) = (
            moved_from([198, 18, 0, 2]),
            moved_from([198, 18, 0, 3]),
            moved_from([198, 18, 0, 4]),
        );
        let moves = BTreeMap::from([
            (live, 33000u16.to_be()),
            (ending, 34000u16.to_be()),
            (gone, 35000u16.to_be()),
        ]);
        let entry = CtValue {
            kind: ct_kind::ENCAP,
            client_port_be: 40000u16.to_be(),
            ..Default::default()
        };
        let tables = CtTables {
            established: BTreeMap::from([(key(pod, 8080, client, 33000, PROTO_TCP), entry)]),
            new: BTreeMap::from([(key(pod, 8080, client, 34000, PROTO_TCP), entry)]),
        };
        let dead = [key(pod, 8080, client, 34000, PROTO_TCP)];
        assert_eq!(ended_moves(&moves, &tables, &dead), vec![ending, gone]);
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
    fn partners_of_a_flow_whose_client_port_moved_find_each_other() {
        let client = [198, 19, 1, 10];
        let vip = [198, 18, 100, 10];
        let backend = [198, 19, 2, 11];
        let mut m = BTreeMap::new();
        m.insert(
            key(client, 40000, vip, 80, PROTO_TCP),
            CtValue {
                nat_addr: Addr::from_v4(backend),
                nat_port_be: 8080u16.to_be(),
                kind: ct_kind::FORWARD,
                client_port_be: 50000u16.to_be(),
                ..Default::default()
            },
        );
        m.insert(
            key(backend, 8080, client, 50000, PROTO_TCP),
            CtValue {
                nat_addr: Addr::from_v4(vip),
                nat_port_be: 80u16.to_be(),
                kind: ct_kind::REVERSE,
                client_port_be: 40000u16.to_be(),
                ..Default::default()
            },
        );
        for (k, v) in &m {
            assert!(m.contains_key(&partner_key(k, v).unwrap()), "{k:?}");
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
        assert!(expired(&promoted(established), &config, 50 * s).is_empty());
        let closed = pair(PROTO_TCP, ct_seen::FIN, ct_seen::FIN, 0);
        assert_eq!(expired(&promoted(closed), &config, 3 * s).len(), 2);
        let udp = pair(PROTO_UDP, 0, 0, 0);
        assert!(expired(&promoted(udp.clone()), &config, 4 * s).is_empty());
        assert_eq!(expired(&promoted(udp), &config, 6 * s).len(), 2);
    }

    /// A retired flow's reply entry (its client entry ended) waits for answers in flight only:
    /// it expires at the closing timeout, for TCP and UDP alike.
    #[test]
    fn an_orphaned_reply_entry_expires_as_a_closing_connection() {
        let config = ConntrackConfig {
            tcp_established_timeout: Duration::from_secs(100),
            tcp_closing_timeout: Duration::from_secs(2),
            udp_timeout: Duration::from_secs(50),
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut flow = pair(proto, ct_seen::ACK, ct_seen::ACK, 0);
            flow.retain(|_, v| v.kind == ct_kind::REVERSE);
            assert!(expired(&promoted(flow.clone()), &config, s).is_empty());
            assert_eq!(expired(&promoted(flow), &config, 3 * s).len(), 1, "{proto}");
        }
    }

    fn promoted(entries: BTreeMap<CtKey, CtValue>) -> CtTables {
        CtTables {
            established: entries,
            new: BTreeMap::new(),
        }
    }

    #[test]
    fn an_unanswered_flow_expires_by_the_syn_timeout_in_the_new_table() {
        let config = ConntrackConfig {
            tcp_syn_timeout: Duration::from_secs(60),
            tcp_established_timeout: Duration::from_secs(1000),
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        // A SYN and its SYN-ACK, never the client's ACK: what a flood from spoofed sources
        // leaves against a listening backend.
        let half_open = pair(PROTO_TCP, ct_seen::SYN, ct_seen::SYN | ct_seen::ACK, 0);
        let new = CtTables {
            established: BTreeMap::new(),
            new: half_open.clone(),
        };
        assert_eq!(expired(&new, &config, 61 * s).len(), 2);
        assert!(view(&new, 0)
            .iter()
            .all(|e| e.state == "syn_sent" && e.table == "new"));
        assert!(expired(&promoted(half_open.clone()), &config, 61 * s).is_empty());
        // Half promoted (another CPU in the middle of it): the flow counts as established.
        let (first, rest) = half_open.into_iter().fold(
            (BTreeMap::new(), BTreeMap::new()),
            |(mut a, mut b), (k, v)| {
                if a.is_empty() {
                    a.insert(k, v);
                } else {
                    b.insert(k, v);
                }
                (a, b)
            },
        );
        let split = CtTables {
            established: first,
            new: rest,
        };
        assert!(expired(&split, &config, 61 * s).is_empty());
        assert!(view(&split, 0).iter().all(|e| e.table == "established"));
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
