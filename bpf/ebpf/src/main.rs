//! Weir's tc programs: service NAT with a BPF conntrack, for IPv4 and IPv6.
//!
//! `weir_ingress` runs on every packet entering the node: from pods (ingress of the host side of
//! their veth), from the network (ingress of host interfaces) and from the tunnel device. A
//! packet whose 5-tuple has a conntrack entry takes the fast path and never touches the service
//! maps; the first packet of a flow to a service frontend picks a backend, records the flow in
//! both directions and is DNATed. Conntrack is two tables (`ct.rs`): new flows are recorded in
//! one, and move to the established one once answered, out of a flood's reach. Replies are
//! un-NATed by their reverse entry wherever they enter the node, so no SNAT is ever applied and
//! backends see the client's own address (the one exception is hairpin, where the client is its
//! own backend).
//!
//! External traffic (NodePort, load-balancer and external IPs) whose backend runs on another
//! node travels there through a collect-metadata tunnel device. Either the ingress node
//! translates and the backend's node sends replies back through the tunnel, or (DSR) the
//! ingress node forwards the packet untranslated and the backend's node translates and replies
//! straight to the client.
//!
//! Every packet ends in exactly one counted outcome; a rewrite is applied whole or the packet is
//! dropped, never passed half-rewritten.
#![no_std]
#![no_main]

mod ct;
mod egress;
mod fast;
mod frag;
mod icmp;
mod lb;
mod maps;
mod monitor;
mod packet;
mod policy;
mod prefilter;
mod route;
mod sock;
mod tunnel;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use weir_common::{
    backend_flags, counter, ct_flags, ct_kind, node_flags, service_flags, tunnel_id, Addr,
    BackendValue, CtKey, CtValue, FrontendKey, HostAddrKey, NodeConfig, ServiceValue, SourceRange,
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SOURCE_RANGE_FIXED_BITS,
};

use crate::lb::{select_backend, NO_BACKEND};
use crate::maps::{
    count, node_config, BACKENDS, CONNTRACK, CT_NEW, FRONTEND_ADDRS, HOST_ADDRS, POD_INTERFACES,
    SCRATCH, SERVICES, SOURCE_RANGES, TUNNEL_PEERS,
};
use crate::packet::{
    ct_key, ktime, load, not_for_us, parse, rewrite_l4, rewrite_port, swap_macs, tcp_seen_bits, Ip,
    NotForUs, Side, ETH_HLEN, FIRST_FRAGMENT, LATER_FRAGMENT, NOT_FRAGMENT, PARSED, TCP_FLAGS,
    TCP_MIN_HLEN, UDP_HLEN,
};
use crate::tunnel::{arrival, encap, Arrival};

/// A decision on a packet: the tc action and the counter that accounts for it, packed in one
/// register. Not an enum or a struct: BPF calls return one register, larger returns go through a
/// pointer the verifier will not let a function leave behind, and an enum's unused fields are
/// undefined bytes the verifier refuses to copy.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

/// Not a tc action: asks the entry function to answer with "port unreachable".
const ACTION_REJECT: i32 = -1000;
/// Not a tc action: asks the entry function to answer "fragmentation needed" / "packet too
/// big"; the counter half of the verdict carries the MTU to announce.
const ACTION_TOO_BIG: i32 = -1001;
/// Not a tc action: asks the entry function to send the (ICMP error) packet into the tunnel as
/// the conntrack entry copied to the scratch slot says.
pub const ACTION_ICMP_TUNNEL: i32 = -1002;
/// Not a tc action: asks the entry function to route the translated (ICMP error) packet from
/// the scratch entry's `nat_addr`, one of the node's own addresses.
pub const ACTION_ICMP_ROUTE: i32 = -1003;
/// Not a tc action: a later fragment of no datagram known here; the entry function holds it for
/// its first fragment or passes it (see `frag.rs`).
const ACTION_HOLD: i32 = -1004;

impl Verdict {
    #[inline(always)]
    pub fn new(counter: u32, action: i32) -> Verdict {
        Verdict(((action as u32 as u64) << 32) | counter as u64)
    }

    #[inline(always)]
    pub fn counter(self) -> u32 {
        self.0 as u32
    }

    #[inline(always)]
    pub fn action(self) -> i32 {
        (self.0 >> 32) as u32 as i32
    }

    #[inline(always)]
    pub fn pass(counter: u32) -> Verdict {
        Verdict::new(counter, TC_ACT_OK as i32)
    }

    /// The packet was redirected (into the tunnel, or back out of its interface): `action` is
    /// what the redirect helper returned.
    #[inline(always)]
    pub fn redirect(counter: u32, action: i32) -> Verdict {
        Verdict::new(counter, action)
    }

    #[inline(always)]
    pub fn drop(counter: u32) -> Verdict {
        Verdict::new(counter, TC_ACT_SHOT as i32)
    }

    /// For calls that must not return more than a register: errors become drop verdicts.
    #[inline(always)]
    pub fn from_result(result: Result<Verdict, u32>) -> Verdict {
        match result {
            Ok(verdict) => verdict,
            Err(counter) => Verdict::drop(counter),
        }
    }

    /// The service has no endpoint: answer with "port unreachable".
    #[inline(always)]
    pub fn reject() -> Verdict {
        Verdict::new(counter::REJECT_NO_BACKEND, ACTION_REJECT)
    }

    /// The packet does not fit the tunnel: answer with the MTU that does.
    #[inline(always)]
    pub fn too_big(mtu: u32) -> Verdict {
        Verdict::new(mtu, ACTION_TOO_BIG)
    }

    /// The packet goes where `entry` says, `action` telling how: sent by the entry function,
    /// whose frame is the shallowest of the call chain (the ICMP path's frames and the
    /// tunnel's or the FIB lookup's together pass the 512 bytes older verifiers allow).
    #[inline(always)]
    pub fn send_as_entry(entry: &CtValue, action: i32) -> Verdict {
        match SCRATCH.get_ptr_mut(0) {
            Some(scratch) => {
                // SAFETY: the per-CPU slot of this run (see `process`); its entry field is not
                // borrowed on the ICMP path.
                unsafe { (*scratch).entry = *entry };
                Verdict::new(0, action)
            }
            None => Verdict::drop(counter::DROP_CT_FULL),
        }
    }

    /// An answer the entry function must build, rather than a tc action.
    #[inline(always)]
    fn is_answer(self) -> bool {
        self.action() == ACTION_REJECT || self.action() == ACTION_TOO_BIG
    }
}

#[classifier]
pub fn weir_ingress(ctx: TcContext) -> i32 {
    let fast = fast::established(&ctx);
    if fast.action() != fast::NOT_HANDLED {
        let verdict = match fast.action() {
            fast::FORWARD_V4 => route::forward(&ctx, FAMILY_V4, ETH_HLEN, fast.counter(), true),
            fast::FORWARD_V6 => route::forward(&ctx, FAMILY_V6, ETH_HLEN, fast.counter(), true),
            fast::DECIDE_POLICY => match policy::decide_noted(fast.counter() as u8) {
                policy::ALLOWED => Verdict::pass(counter::PASS_NO_SERVICE),
                denied => Verdict::drop(denied),
            },
            _ => fast,
        };
        count(verdict.counter());
        return verdict.action();
    }
    let verdict = match process(&ctx) {
        Ok(verdict) => verdict,
        Err(c) => Verdict::drop(c),
    };
    count(verdict.counter());
    verdict.action()
}

/// The baseline for per-packet cost figures: the same attach point doing nothing.
#[classifier]
pub fn weir_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// The XDP pre-filter on host interfaces (`prefilter.rs`).
#[xdp]
pub fn weir_prefilter(ctx: XdpContext) -> u32 {
    prefilter::filter(&ctx)
}

/// The pre-filter's baseline: the same hook doing nothing.
#[xdp]
pub fn weir_xdp_pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

fn process(ctx: &TcContext) -> Result<Verdict, u32> {
    let config = node_config();
    // Before anything else reads the packet: an untrusted sender gets nothing, not even a parse.
    let from_tunnel = arrival(ctx, config);
    if from_tunnel.id == tunnel::UNTRUSTED {
        return Err(counter::DROP_TUNNEL_UNTRUSTED);
    }
    // The parsed header lives in the per-CPU scratch slot, not on the stack. What the verifier
    // reads back from a map value is an unknown number, so the ways through `parse` (IPv4,
    // IPv6 with zero to four options headers, the IPIP offsets) meet again at its return
    // instead of each carrying its own exact offsets through the rest of the program: on 5.10
    // they multiplied the walk past the limit of a million instructions.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(counter::DROP_CT_FULL);
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU (tc programs do
    // not nest), and only within this run; the flow path borrows its other fields only.
    let ip = unsafe { &mut (*scratch).ip };
    // The last packet's header is still there: parse fills what it finds, the rest must read
    // as absent (a packet passed before its addresses are parsed has family 0).
    *ip = Ip::EMPTY;
    let parsed = parse(ctx, tunnel::is_bare_ip(ctx, config), ip);
    if parsed != PARSED {
        return match not_for_us(parsed) {
            NotForUs::Pass(c) => {
                // Another protocol, or an IPv6 header chain not walked: ports unknown, only
                // rules for every protocol can allow it.
                let decided = policy::untranslated(ctx, ip);
                if decided != policy::ALLOWED {
                    return Ok(Verdict::drop(decided));
                }
                Ok(unless_frontend(ip, c))
            }
            NotForUs::Drop(c) => Err(c),
        };
    }
    let verdict = match ip.proto {
        // Later fragments of its datagram held: it and they go round again.
        PROTO_TCP | PROTO_UDP
            if ip.fragment == FIRST_FRAGMENT && frag::replay(ctx, ip, from_tunnel.id) =>
        {
            Verdict::drop(counter::FRAGMENT_REPLAYED)
        }
        PROTO_TCP | PROTO_UDP => flow(ctx, ip, config, &from_tunnel),
        // ICMP errors are never fragmented (a quote fits the minimum MTU).
        _ if ip.fragment != NOT_FRAGMENT => Verdict::pass(counter::PASS_ICMP_UNRELATED),
        _ => icmp::icmp_error(ctx, ip),
    };
    // A later fragment of no datagram known here, to a frontend or to a Node's address (a
    // NodePort's, or the node's own traffic), is held for its first; any other passes.
    let verdict = if verdict.action() != ACTION_HOLD {
        verdict
    } else {
        let untranslated = unless_frontend(ip, counter::PASS_FRAGMENT);
        match frag::hold_if_due(ctx, ip, from_tunnel.id, untranslated) {
            frag::NOT_HELD => Verdict::pass(counter::PASS_FRAGMENT),
            outcome => Verdict::drop(outcome),
        }
    };
    let untranslated = verdict.counter() == counter::PASS_NO_SERVICE
        || verdict.counter() == counter::PASS_ICMP_UNRELATED
        || verdict.counter() == counter::PASS_FRAGMENT;
    let verdict = if untranslated && verdict.action() == TC_ACT_OK as i32 {
        let decided = policy::untranslated(ctx, ip);
        if decided != policy::ALLOWED {
            Verdict::drop(decided)
        } else {
            unless_frontend(ip, verdict.counter())
        }
    } else {
        verdict
    };
    // Answered here, not deeper down, to keep the call chain's stack within the verifier's limit.
    if verdict.action() == ACTION_REJECT && icmp::resets(ctx, ip) {
        return icmp::reset(ctx, ip);
    }
    if verdict.action() == ACTION_REJECT && icmp::is_reset(ctx, ip) {
        return Err(counter::DROP_RESET_NO_BACKEND);
    }
    if verdict.action() == ACTION_REJECT {
        let answer = icmp::Answer::port_unreachable(ip.family);
        let action = icmp::answer(ctx, ip, &answer)?;
        return Ok(Verdict::redirect(counter::REJECT_NO_BACKEND, action));
    }
    if verdict.action() == ACTION_TOO_BIG {
        let answer = icmp::Answer::too_big(ip.family, verdict.counter());
        let action = icmp::answer(ctx, ip, &answer)?;
        return Ok(Verdict::redirect(counter::ICMP_TOO_BIG, action));
    }
    if verdict.action() == ACTION_ICMP_TUNNEL || verdict.action() == ACTION_ICMP_ROUTE {
        // SAFETY: as above; `send_as_entry` filled the entry field.
        let entry = unsafe { &(*scratch).entry };
        return send_icmp_as_entry(ctx, ip, entry, verdict, true);
    }
    if from_tunnel.is_some() {
        tunnel::accept_inner(ctx);
        return Ok(verdict);
    }
    // A translated packet the stack would route: Weir forwards it itself (see `route.rs`).
    if config.flags & node_flags::FORWARD != 0
        && verdict.action() == TC_ACT_OK as i32
        && ip.l3() == ETH_HLEN
        && (verdict.counter() == counter::CT_FORWARD_HIT
            || verdict.counter() == counter::CT_REVERSE_HIT
            || verdict.counter() == counter::CT_NEW_FLOW)
    {
        return Ok(route::forward(
            ctx,
            ip.family,
            ip.l3(),
            verdict.counter(),
            true,
        ));
    }
    Ok(verdict)
}

/// Sends a translated ICMP error as `send_as_entry` asked: into the tunnel to the node that
/// holds its flow, or routed from the node's own address (`forwarding`: the error entered the
/// node, rather than leaving it; see `route::forward`). Inlined into each entry function, whose
/// frame is the shallowest of the chain.
#[inline(always)]
pub fn send_icmp_as_entry(
    ctx: &TcContext,
    ip: &Ip,
    entry: &CtValue,
    verdict: Verdict,
    forwarding: bool,
) -> Result<Verdict, u32> {
    if verdict.action() == ACTION_ICMP_TUNNEL {
        let id = tunnel::encap_id(entry);
        let action = encap(ctx, &entry.tunnel_peer, entry.tunnel_family, id)?;
        return Ok(Verdict::redirect(counter::ICMP_ERROR_TUNNELLED, action));
    }
    Ok(route::forward(
        ctx,
        ip.family,
        ip.l3(),
        counter::ICMP_ERROR_NAT,
        forwarding,
    ))
}

/// A packet Weir does not translate passes (`counter`), unless it is addressed to a ClusterIP,
/// external IP or load-balancer IP: nothing on the node answers there, and routed on it would
/// leave by the default route, onto the underlay. Such a packet is dropped. A frontend address
/// that is also a Node's (an external IP on a node) is the node's own traffic: it passes.
#[inline(never)]
fn unless_frontend(ip: &Ip, counter: u32) -> Verdict {
    if ip.family == 0 {
        return Verdict::pass(counter);
    }
    let destination = HostAddrKey {
        addr: ip.daddr,
        family: ip.family,
        _pad: [0; 3],
    };
    if FRONTEND_ADDRS.get_ptr(&destination).is_none()
        || HOST_ADDRS.get_ptr(&destination).is_some()
        || TUNNEL_PEERS.get_ptr(&destination).is_some()
    {
        return Verdict::pass(counter);
    }
    Verdict::drop(if counter == counter::PASS_FRAGMENT {
        counter::DROP_FRAGMENT_UNKNOWN
    } else {
        counter::DROP_FRONTEND_UNTRANSLATED
    })
}

/// The facts of a TCP or UDP packet the flow path needs beyond its IP header.
#[repr(C)]
pub struct Flow {
    pub key: CtKey,
    pub now: u64,
    pub sport_be: u16,
    pub dport_be: u16,
    pub seen: u8,
    /// For a new flow: the chosen backend is on another node, reached through the tunnel.
    pub remote: bool,
    pub backend_id: u32,
}

/// The flow path's per-packet working memory, in a per-CPU slot (`maps::SCRATCH`).
#[repr(C)]
pub struct Scratch {
    /// The tuple a policy decision is about (`policy.rs`), as the pod sees it. First in the
    /// slot, so it starts on its 8-byte boundary (`fast::copy_key` writes it by words).
    pub policy: CtKey,
    /// The packet's IP header as parsed (see `process` for why it is here).
    pub ip: Ip,
    pub flow: Flow,
    /// The conntrack entry the packet is translated by, copied out of whichever table holds
    /// it. `apply` reads this copy, not the table: the verifier cannot take a state with a
    /// pointer into one table for a state with a pointer into another, so with two tables it
    /// would walk `apply` (the bulk of the program) once more per call site, more than doubling
    /// the load time. Copying 64 bytes per packet costs far less. (It also lets promotion delete
    /// the entry before the packet is translated.)
    pub entry: CtValue,
    /// The id of the datagram the packet is a fragment of (see `frag::note_id`).
    pub frag_id: u32,
    /// A new flow's entries as they are built: off the stack, since claiming the reply key
    /// (`ct::claim_reply_key`) is one more frame below `new_flow`.
    pub new: NewEntry,
    /// A tunnel arrival's key among the moved client ports (`tunnel::remember_return`): off
    /// the stack, for the same reason.
    pub moves: weir_common::MovedArrivalKey,
    /// The FIB lookup's parameters (`route::forward`): off the stack, since forwarding is the
    /// deepest frame of the chain weir_ingress -> flow -> apply -> forward.
    pub fib: route::FibParams,
}

/// A conntrack entry being made: its key and value.
#[repr(C)]
pub struct NewEntry {
    pub key: CtKey,
    pub value: CtValue,
}

/// Calls return at most a register: the verdict, never a `Result` (see [`Verdict`]).
#[inline(never)]
fn flow(ctx: &TcContext, ip: &mut Ip, config: &NodeConfig, from_tunnel: &Arrival) -> Verdict {
    Verdict::from_result(flow_inner(ctx, ip, config, from_tunnel))
}

#[inline(always)]
fn flow_inner(
    ctx: &TcContext,
    ip: &mut Ip,
    config: &NodeConfig,
    from_tunnel: &Arrival,
) -> Result<Verdict, u32> {
    let (sport_be, dport_be, seen) = if ip.fragment == LATER_FRAGMENT {
        // Its ports are the first fragment's; it never starts a flow (see `frag.rs`).
        let ports = frag::later_ports(ip);
        if ports == frag::UNKNOWN {
            // Before its first, or of untranslated traffic: the entry function decides.
            return Ok(Verdict::new(counter::PASS_FRAGMENT, ACTION_HOLD));
        }
        (ports as u16, (ports >> 16) as u16, 0)
    } else {
        let l4_min = if ip.proto == PROTO_TCP {
            TCP_MIN_HLEN
        } else {
            UDP_HLEN
        };
        if ip.payload_len < l4_min {
            return Err(counter::DROP_TRUNCATED);
        }
        let [sport_be, dport_be]: [u16; 2] = load(ctx, ip.l4_off)?;
        let seen = if ip.proto == PROTO_TCP {
            tcp_seen_bits(load(ctx, ip.l4_off + TCP_FLAGS)?)
        } else {
            0
        };
        (sport_be, dport_be, seen)
    };
    // The flow's facts live in a per-CPU scratch slot, not on the stack: older verifiers
    // (5.10, 6.1) count every frame of the call chain whole, and this one would push the chain
    // flow -> apply -> rewrite past 512 bytes.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(counter::DROP_CT_FULL);
    };
    // SAFETY: a per-CPU slot, used by one program run at a time on this CPU (tc programs do
    // not nest), and only within this run. `ip` is the same slot's: only the other fields are
    // borrowed here.
    let (flow, copy, new) = unsafe {
        (
            &mut (*scratch).flow,
            &mut (*scratch).entry,
            &mut (*scratch).new,
        )
    };
    *flow = Flow {
        key: ct_key(ip, sport_be, dport_be),
        now: ktime(),
        sport_be,
        dport_be,
        seen,
        remote: false,
        backend_id: 0,
    };

    // Established flows first: their packets cost this one lookup.
    if let Some(entry) = CONNTRACK.get_ptr_mut(&flow.key) {
        // SAFETY: the pointer comes from a successful lookup and stays valid for this program
        // run; concurrent writers only touch last_seen/seen, where a lost update is harmless.
        let entry = unsafe { &mut *entry };
        ct::refresh(entry, seen, flow.now);
        *copy = *entry;
        if ip.fragment == FIRST_FRAGMENT {
            frag::remember(&flow.key);
        }
        return Ok(apply(ctx, ip, copy, config));
    }
    if let Some(entry) = CT_NEW.get_ptr_mut(&flow.key) {
        // SAFETY: as above; promotion may delete the entry, but only after it is copied.
        let entry = unsafe { &mut *entry };
        ct::refresh(entry, seen, flow.now);
        *copy = *entry;
        if ct::answers(copy, ip.proto, seen) {
            ct::promote(&flow.key);
        }
        if ip.fragment == FIRST_FRAGMENT {
            frag::remember(&flow.key);
        }
        // The same call as above, in the same state: the verifier walks it once for both.
        return Ok(apply(ctx, ip, copy, config));
    }

    if ip.fragment == LATER_FRAGMENT {
        // Its flow ended between the first fragment and this one.
        return Ok(Verdict::pass(counter::PASS_FRAGMENT));
    }
    if from_tunnel.id == tunnel_id::NAT_AT_INGRESS {
        return Ok(tunnel::remember_return(ctx, ip, flow, from_tunnel));
    }

    let Some(service) = find_service(ctx, ip, dport_be, from_tunnel.is_some()) else {
        // Its later fragments pass too, not held for a first fragment already gone by.
        if ip.fragment == FIRST_FRAGMENT && frag::to_a_node(ip) {
            frag::remember(&flow.key);
        }
        return Ok(Verdict::pass(counter::PASS_NO_SERVICE));
    };
    // loadBalancerSourceRanges: only listed sources start flows at a restricted frontend. A
    // packet from the tunnel was checked by the node it entered.
    if service.flags & service_flags::SOURCE_RANGES != 0
        && from_tunnel.is_none()
        && !source_allowed(ip, service.service_id)
    {
        return Err(counter::DROP_SOURCE_RANGE);
    }
    // A DSR packet was sent here because this node has a backend: only local ones qualify, and
    // with Maglev the one the ingress node's table named.
    let scope = if from_tunnel.is_some() {
        lb::Scope::LocalAsTable
    } else if service.flags & service_flags::LOCAL_ONLY != 0 && !short_circuits(ctx, ip, service) {
        lb::Scope::Local
    } else {
        lb::Scope::Any
    };
    let backend_id = select_backend(ip, flow, service, scope)?;
    if backend_id == NO_BACKEND {
        return Ok(Verdict::reject());
    }
    let Some(backend) = BACKENDS.get_ptr(&backend_id) else {
        return Err(counter::DROP_BACKEND_MISSING);
    };
    // SAFETY: as above.
    let backend = unsafe { &*backend };
    flow.backend_id = backend_id;
    // NetworkPolicy sees the client's own address and the chosen backend. No arguments: the
    // call reads the flow from the scratch slot, so this frame keeps nothing more across it
    // (it sits on the chain weir_ingress -> flow -> remember_return -> promote, at 512 bytes).
    let decided = policy::service_flow();
    if decided != policy::ALLOWED {
        return Err(decided);
    }
    // External traffic to a remote backend takes the tunnel, so that replies come back to the
    // node that translated it (or, DSR, are translated where the backend is). A local pod's
    // does not: like a ClusterIP flow, it goes by the pods' own routes and its replies are
    // routed back to its node, which un-NATs them (a DSR reply instead would arrive from this
    // node's own address, which IPv4 drops as a martian).
    flow.remote = service.flags & service_flags::EXTERNAL != 0
        && from_tunnel.is_none()
        && backend.flags & backend_flags::LOCAL == 0
        && backend.node_family != 0
        && config.tunnel_ifindex != 0
        && !from_local_pod(ctx);
    let outcome = new_flow(ip, flow, backend, new)?;
    // The entry now exists (ours, or another CPU's that won the race): translate as it says.
    // Only the new-flow table is looked at: promotion needs an answer, which cannot have come
    // yet, and every further call site of `apply` with a pointer into another map is one more
    // walk of it for the verifier.
    let Some(entry) = CT_NEW.get_ptr(&flow.key) else {
        return Err(counter::DROP_CT_FULL);
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this run.
    *copy = unsafe { *entry };
    if ip.fragment == FIRST_FRAGMENT {
        frag::remember(&flow.key);
    }
    let translated = apply(ctx, ip, copy, config);
    if translated.action() == TC_ACT_SHOT as i32 || translated.is_answer() {
        return Ok(translated);
    }
    Ok(Verdict::redirect(outcome, translated.action()))
}

/// Whether a `Local` policy gives way: `externalTrafficPolicy: Local` restricts traffic from
/// outside the cluster, and kube-proxy serves traffic from inside (the node's own pods, the
/// cluster's nodes) to the same external frontend with every endpoint. Another node's pods
/// never get here: their node translated at the source. (`internalTrafficPolicy: Local` never
/// gives way.)
#[inline(always)]
fn short_circuits(ctx: &TcContext, ip: &Ip, service: &ServiceValue) -> bool {
    service.flags & service_flags::EXTERNAL != 0 && (from_local_pod(ctx) || from_cluster_node(ip))
}

/// Whether the packet's source is an address of one of the cluster's Nodes. Its own frame: the
/// key is not on the flow path's stack.
#[inline(never)]
fn from_cluster_node(ip: &Ip) -> bool {
    let source = HostAddrKey {
        addr: ip.saddr,
        family: ip.family,
        _pad: [0; 3],
    };
    TUNNEL_PEERS.get_ptr(&source).is_some()
}

/// Whether the packet entered from one of this node's pods.
#[inline(always)]
fn from_local_pod(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    POD_INTERFACES.get_ptr(&ifindex).is_some()
}

/// Records a new flow in the new-flow table, in both directions where this node translates.
/// Returns the counter the flow's first packet accounts to. The entries are built in `new`.
#[inline(never)]
fn new_flow(ip: &Ip, flow: &Flow, backend: &BackendValue, new: &mut NewEntry) -> Result<u32, u32> {
    let config = node_config();
    let now = flow.now;
    if flow.remote && config.flags & weir_common::node_flags::DSR != 0 {
        // The backend's node translates: this node only remembers where the flow goes.
        new.value = CtValue {
            created_ns: now,
            last_seen_ns: now,
            backend_id: flow.backend_id,
            kind: ct_kind::ENCAP,
            seen: flow.seen,
            flags: ct_flags::DSR,
            tunnel_peer: backend.node_addr,
            tunnel_family: backend.node_family,
            ..CtValue::default()
        };
        // Losing the race to another CPU is fine: its entry is followed.
        let _ = CT_NEW.insert(&flow.key, &new.value, BPF_NOEXIST as u64);
        return Ok(counter::CT_NEW_TUNNEL);
    }

    let hairpin_source = hairpin_addr(config, ip.family);
    let hairpin = !flow.remote
        && backend.family == ip.family
        && backend.addr == ip.saddr
        && hairpin_source != Addr::UNSPECIFIED;
    // Replies come from the backend to the client, or to the hairpin address.
    new.key = CtKey {
        saddr: backend.addr,
        daddr: if hairpin { hairpin_source } else { ip.saddr },
        sport_be: backend.port_be,
        dport_be: flow.sport_be,
        proto: ip.proto,
        family: ip.family,
        _pad: 0,
    };
    let host_frontend = HOST_ADDRS
        .get_ptr(&HostAddrKey {
            addr: ip.daddr,
            family: ip.family,
            _pad: [0; 3],
        })
        .is_some();
    new.value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: ip.daddr,
        backend_id: flow.backend_id,
        nat_port_be: flow.dport_be,
        kind: ct_kind::REVERSE,
        flags: if hairpin {
            ct_flags::HAIRPIN
        } else if host_frontend {
            ct_flags::HOST_FRONTEND
        } else {
            0
        },
        ..CtValue::default()
    };
    // The reverse entry first: a forward entry without it would leak the backend's address.
    let moved = ct::claim_reply_key(&flow.key, new)?;
    if moved {
        count(counter::CT_COLLISION_RESOLVED);
    }
    let entry = &mut new.value;
    entry.client_port_be = if moved { new.key.dport_be } else { 0 };
    entry.kind = ct_kind::FORWARD;
    entry.nat_addr = backend.addr;
    entry.nat_port_be = backend.port_be;
    entry.seen = flow.seen;
    entry.flags = if hairpin {
        ct_flags::HAIRPIN
    } else if flow.remote {
        ct_flags::TUNNEL
    } else {
        0
    };
    // For hairpin the peer field holds the source the backend will see, so user space can
    // pair the two entries (`weir_common::partner_key`).
    (entry.tunnel_peer, entry.tunnel_family) = if hairpin {
        (hairpin_source, ip.family)
    } else {
        (backend.node_addr, backend.node_family)
    };
    // Losing the race to another CPU is fine: its entry is followed.
    let _ = CT_NEW.insert(&flow.key, entry, BPF_NOEXIST as u64);
    Ok(if flow.remote {
        counter::CT_NEW_TUNNEL
    } else {
        counter::CT_NEW_FLOW
    })
}

/// Does to the packet what its conntrack entry says.
#[inline(never)]
fn apply(ctx: &TcContext, ip: &mut Ip, entry: &CtValue, config: &NodeConfig) -> Verdict {
    Verdict::from_result(apply_inner(ctx, ip, entry, config))
}

#[inline(always)]
fn apply_inner(
    ctx: &TcContext,
    ip: &mut Ip,
    entry: &CtValue,
    config: &NodeConfig,
) -> Result<Verdict, u32> {
    match entry.kind {
        ct_kind::FORWARD => {
            // Checked before the rewrite: the answer must quote the packet as the client sent it.
            if entry.flags & ct_flags::TUNNEL != 0 {
                let mtu = tunnel::exceeded_mtu(ctx, ip, entry.tunnel_family);
                if mtu != 0 {
                    return Ok(Verdict::too_big(mtu));
                }
            }
            rewrite_l4(
                ctx,
                ip,
                Side::Destination,
                &entry.nat_addr,
                entry.nat_port_be,
            )?;
            if entry.flags & ct_flags::HAIRPIN != 0 {
                // (A later fragment has no ports: `rewrite_l4` leaves them alone.)
                let sport_be: u16 = if ip.fragment == LATER_FRAGMENT {
                    0
                } else if entry.client_port_be != 0 {
                    entry.client_port_be
                } else {
                    load(ctx, ip.l4_off)?
                };
                let source = hairpin_addr(config, ip.family);
                rewrite_l4(ctx, ip, Side::Source, &source, sport_be)?;
                return send_back(ctx, counter::CT_FORWARD_HIT);
            }
            // A tuple collision moved the client's port as the backend sees it.
            if entry.client_port_be != 0 {
                rewrite_port(ctx, ip, Side::Source, entry.client_port_be)?;
            }
            if entry.flags & ct_flags::TUNNEL != 0 {
                let action = encap(
                    ctx,
                    &entry.tunnel_peer,
                    entry.tunnel_family,
                    tunnel_id::NAT_AT_INGRESS,
                )?;
                return Ok(Verdict::redirect(counter::CT_FORWARD_HIT, action));
            }
            Ok(Verdict::pass(counter::CT_FORWARD_HIT))
        }
        ct_kind::REVERSE => {
            if entry.flags & ct_flags::HAIRPIN != 0 {
                let dport_be: u16 = if ip.fragment == LATER_FRAGMENT {
                    0
                } else if entry.client_port_be != 0 {
                    entry.client_port_be
                } else {
                    load(ctx, ip.l4_off + 2)?
                };
                let client = ip.saddr;
                rewrite_l4(ctx, ip, Side::Destination, &client, dport_be)?;
                rewrite_l4(ctx, ip, Side::Source, &entry.nat_addr, entry.nat_port_be)?;
                return send_back(ctx, counter::CT_REVERSE_HIT);
            }
            rewrite_l4(ctx, ip, Side::Source, &entry.nat_addr, entry.nat_port_be)?;
            // The client gets its own port back (a tuple collision moved it).
            if entry.client_port_be != 0 {
                rewrite_port(ctx, ip, Side::Destination, entry.client_port_be)?;
            }
            if entry.flags & ct_flags::HOST_FRONTEND != 0 {
                return Ok(crate::route::forward(
                    ctx,
                    ip.family,
                    ip.l3(),
                    counter::CT_REVERSE_HIT,
                    true,
                ));
            }
            Ok(Verdict::pass(counter::CT_REVERSE_HIT))
        }
        _ => {
            if entry.flags & ct_flags::DSR != 0 {
                // The client's own packets: the backend's replies take another way.
                let mtu = tunnel::exceeded_mtu(ctx, ip, entry.tunnel_family);
                if mtu != 0 {
                    return Ok(Verdict::too_big(mtu));
                }
            }
            // A reply to a client port this (the backend's) node moved: the client's own port
            // back, as the ingress node's translation knows it (see `tunnel::remember_return`).
            if entry.client_port_be != 0 {
                rewrite_port(ctx, ip, Side::Destination, entry.client_port_be)?;
            }
            let id = tunnel::encap_id(entry);
            let action = encap(ctx, &entry.tunnel_peer, entry.tunnel_family, id)?;
            Ok(Verdict::redirect(counter::CT_ENCAP_HIT, action))
        }
    }
}

/// Hairpin packets go straight back into the pod they came from: routing them would meet
/// reverse-path filters that rightly find the source implausible on that interface.
#[inline(always)]
fn send_back(ctx: &TcContext, outcome: u32) -> Result<Verdict, u32> {
    swap_macs(ctx)?;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper taking plain integers.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    Ok(Verdict::redirect(outcome, action))
}

#[inline(always)]
fn hairpin_addr(config: &NodeConfig, family: u8) -> Addr {
    if family == FAMILY_V4 {
        config.hairpin_v4
    } else {
        config.hairpin_v6
    }
}

/// Whether `loadBalancerSourceRanges` of `service_id` hold the packet's source. Its own frame:
/// the key is not on the flow path's stack.
#[inline(never)]
fn source_allowed(ip: &Ip, service_id: u32) -> bool {
    let address_bits = if ip.family == FAMILY_V6 { 128 } else { 32 };
    let key = Key::new(
        SOURCE_RANGE_FIXED_BITS + address_bits,
        SourceRange {
            service_id_be: service_id.to_be(),
            family: ip.family,
            _pad: [0; 3],
            addr: ip.saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// The service a packet addresses: by its exact destination, or the NodePort of its port when
/// it is addressed to one of this node's addresses (or arrived through the tunnel for DSR, when
/// the destination is the address of the node the client used). A local pod's packet to
/// another Node's address is translated here too, at its source: traffic from inside the
/// cluster reaches a NodePort of any node with every endpoint (kube-proxy serves it so where it
/// lands), and translating it here spares the detour through that node and back, which a
/// reply to a pod of this very node, or to the pod itself, could not take. Borrowed from the
/// map; a call of its own so the keys do not sit on the flow path's stack.
#[inline(never)]
fn find_service(
    ctx: &TcContext,
    ip: &Ip,
    dport_be: u16,
    from_tunnel: bool,
) -> Option<&'static ServiceValue> {
    let mut key = FrontendKey {
        addr: ip.daddr,
        port_be: dport_be,
        proto: ip.proto,
        family: ip.family,
    };
    let mut found = SERVICES.get_ptr(&key);
    if found.is_none() {
        let host = HostAddrKey {
            addr: ip.daddr,
            family: ip.family,
            _pad: [0; 3],
        };
        if from_tunnel
            || HOST_ADDRS.get_ptr(&host).is_some()
            || (TUNNEL_PEERS.get_ptr(&host).is_some() && from_local_pod(ctx))
        {
            key.addr = Addr::UNSPECIFIED;
            found = SERVICES.get_ptr(&key);
        }
    }
    // SAFETY: the pointer comes from a successful lookup; the agent replaces entries whole and
    // the kernel keeps the element alive for the program run (RCU).
    found.map(|p| unsafe { &*p })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
