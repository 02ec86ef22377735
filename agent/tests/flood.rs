//! Floods (issue 14): conntrack is two tables, new flows and established ones, so a flood of new
//! flows churns only the first; a flow moves to the second once answered (promotion). And
//! conntrack garbage collection runs on its own thread, never on the agent's loop.

mod common;

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use weir_agent::config::ConntrackConfig;
use weir_agent::conntrack::{collect_garbage, monotonic_now_ns, GcThread, GC_THREAD_NAME};
use weir_agent::dataplane::{Dataplane, LoadOptions};
use weir_agent::reconcile::Reconciler;
use weir_common::{ct_kind, map_names, Addr, CtKey, CtValue, FAMILY_V4, PROTO_UDP};

const THIRD: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 12);

/// A data plane with tables of the given capacities, serving `echo` from `backends`.
fn harness(established: u32, new: u32, backends: &[Ipv4Addr]) -> Harness {
    require_root();
    let dataplane = Dataplane::load(&LoadOptions {
        pin_dir: None,
        max_entries: vec![
            (map_names::CONNTRACK, established),
            (map_names::CT_NEW, new),
        ],
        ..Default::default()
    })
    .expect("the eBPF object loads and passes the verifier");
    let mut h = Harness {
        dataplane,
        reconciler: Reconciler::default(),
    };
    h.apply(&cluster_yaml(backends));
    h
}

fn backend_of(out: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

/// Entries in (established, new).
fn fill(h: &Harness) -> (usize, usize) {
    let tables = h.dataplane.conntrack.tables().expect("conntrack");
    (tables.established.len(), tables.new.len())
}

/// The n-th flood source: distinct addresses in 198.19.128.0/17 (no test host lives there).
fn flood_source(n: u32) -> (Ipv4Addr, u16) {
    let addr = Ipv4Addr::new(198, 19, 128 + (n >> 8 & 0x7f) as u8, n as u8);
    (addr, 1024 + (n % 50_000) as u16)
}

/// The finding of issue 14, at test scale: an established flow, then a SYN flood of 20,000 new
/// flows (each answered by its backend's SYN-ACK, as a listening backend answers every SYN) into
/// a new-flow table of 1,024 entries and an established table of 4,096. The established flow
/// keeps its backend and its replies are still translated; the flood shows as new flows never
/// promoted. Run against a single table (before the split) the flood evicts the flow's entries:
/// its next packet picks a backend anew and its reply leaves untranslated.
#[test]
fn an_established_flow_survives_a_syn_flood() {
    const FLOOD: u32 = 20_000;
    let mut h = harness(4096, 1024, &[BACKEND, OTHER, THIRD]);
    let (_, syn) = h.run(&tcp(CLIENT, 40000, VIP, 80, "S"));
    let chosen = backend_of(&syn);
    h.run(&tcp(chosen, 8080, CLIENT, 40000, "SA"));
    h.run(&tcp(CLIENT, 40000, VIP, 80, "A"));
    assert_eq!(h.counter("ct_promoted"), 1);
    assert_eq!(fill(&h), (2, 0), "the flow is established");

    for n in 0..FLOOD {
        let (source, port) = flood_source(n);
        let (verdict, out) = h.run(&tcp(source, port, VIP, 80, "S"));
        assert_eq!(verdict, TC_ACT_OK, "flood SYN {n}");
        // The backend answers (SYN cookies answer every SYN): an answer is not a handshake.
        h.run(&tcp(backend_of(&out), 8080, source, port, "SA"));
    }
    assert_eq!(h.counter("ct_new_flow"), FLOOD as u64 + 1);
    assert_eq!(h.counter("ct_promoted"), 1, "no flood flow was promoted");
    assert_eq!(h.counter("drop_ct_full"), 0, "a full table never drops");
    let (established, new) = fill(&h);
    assert_eq!(
        established, 2,
        "the flood never reached the established table"
    );
    assert!(new <= 1024, "{new} entries in a new-flow table of 1,024");

    let (verdict, out) = h.run(&tcp(CLIENT, 40000, VIP, 80, "A"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(CLIENT, 40000, chosen, 8080, "A"),
        "the same backend"
    );
    let (verdict, reply) = h.run(&tcp(chosen, 8080, CLIENT, 40000, "A"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        reply,
        tcp(VIP, 80, CLIENT, 40000, "A"),
        "the reply still comes from the service"
    );
}

#[test]
fn a_tcp_flow_is_promoted_by_the_clients_ack_after_the_servers_answer() {
    let mut h = harness(4096, 4096, &[BACKEND]);
    h.run(&tcp(CLIENT, 40100, VIP, 80, "S"));
    assert_eq!(
        fill(&h),
        (0, 2),
        "a new flow's two entries start in the new-flow table"
    );
    // A client ACK before any answer proves nothing.
    h.run(&tcp(CLIENT, 40100, VIP, 80, "A"));
    assert_eq!(fill(&h), (0, 2));
    let (_, reply) = h.run(&tcp(BACKEND, 8080, CLIENT, 40100, "SA"));
    assert_eq!(
        reply,
        tcp(VIP, 80, CLIENT, 40100, "SA"),
        "translated from the new table"
    );
    assert_eq!(fill(&h), (0, 2), "a SYN-ACK alone does not promote");
    assert_eq!(h.counter("ct_promoted"), 0);
    let (_, out) = h.run(&tcp(CLIENT, 40100, VIP, 80, "A"));
    assert_eq!(out, tcp(CLIENT, 40100, BACKEND, 8080, "A"));
    assert_eq!(fill(&h), (2, 0), "both entries moved");
    assert_eq!(h.counter("ct_promoted"), 1);
    // From now on the established table serves the flow, both ways.
    let (_, out) = h.run(&tcp(CLIENT, 40100, VIP, 80, "A"));
    assert_eq!(out, tcp(CLIENT, 40100, BACKEND, 8080, "A"));
    let (_, reply) = h.run(&tcp(BACKEND, 8080, CLIENT, 40100, "A"));
    assert_eq!(reply, tcp(VIP, 80, CLIENT, 40100, "A"));
    assert_eq!(h.counter("ct_promoted"), 1);
    let flows =
        weir_agent::conntrack::view(&h.dataplane.conntrack.tables().unwrap(), monotonic_now_ns());
    assert!(
        flows
            .iter()
            .all(|f| f.paired && f.state == "established" && f.table == "established"),
        "{flows:?}"
    );
}

#[test]
fn a_refused_connection_is_not_promoted() {
    let mut h = harness(4096, 4096, &[BACKEND]);
    h.run(&tcp(CLIENT, 40150, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, 40150, "RA"));
    h.run(&tcp(CLIENT, 40150, VIP, 80, "A"));
    assert_eq!(fill(&h), (0, 2));
    assert_eq!(h.counter("ct_promoted"), 0);
}

#[test]
fn a_udp_flow_is_promoted_by_its_reply() {
    let mut h = harness(4096, 4096, &[BACKEND]);
    let (_, out) = h.run(&udp(CLIENT, 33000, VIP, 53));
    assert_eq!(out, udp(CLIENT, 33000, BACKEND, 5353));
    h.run(&udp(CLIENT, 33000, VIP, 53));
    assert_eq!(fill(&h), (0, 2), "the client alone does not promote");
    let (_, reply) = h.run(&udp(BACKEND, 5353, CLIENT, 33000));
    assert_eq!(reply, udp(VIP, 53, CLIENT, 33000));
    assert_eq!(fill(&h), (2, 0));
    assert_eq!(h.counter("ct_promoted"), 1);
    let (_, out) = h.run(&udp(CLIENT, 33000, VIP, 53));
    assert_eq!(out, udp(CLIENT, 33000, BACKEND, 5353));
}

/// ICMP errors about a flow find its entries in either table.
#[test]
fn icmp_errors_are_translated_from_either_table() {
    let mut h = harness(4096, 4096, &[BACKEND]);
    for (sport, answered) in [(33100, false), (33101, true)] {
        let (_, forwarded) = h.run(&udp(CLIENT, sport, VIP, 53));
        if answered {
            h.run(&udp(BACKEND, 5353, CLIENT, sport));
        }
        assert_eq!(fill(&h).0 > 0, answered);
        // The backend answers the DNATed datagram with port unreachable, quoting what it got.
        let (_, out) = h.run(&icmp_error(BACKEND, CLIENT, 3, 3, &forwarded[14..]));
        let original = udp(CLIENT, sport, VIP, 53);
        assert_eq!(
            out,
            icmp_error(VIP, CLIENT, 3, 3, &original[14..]),
            "answered: {answered}"
        );
    }
    assert_eq!(h.counter("icmp_error_nat"), 2);
}

/// A flow never answered stays in the new-flow table and is reclaimed there by the SYN timeout,
/// also once its backend answered (a flood's half-open flows); established flows are not.
#[test]
fn unanswered_flows_are_reclaimed_from_the_new_table() {
    let mut h = harness(4096, 4096, &[BACKEND]);
    h.run(&tcp(CLIENT, 40200, VIP, 80, "S"));
    h.run(&tcp(CLIENT, 40201, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, 40201, "SA"));
    h.run(&tcp(CLIENT, 40202, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, 40202, "SA"));
    h.run(&tcp(CLIENT, 40202, VIP, 80, "A"));
    assert_eq!(fill(&h), (2, 4));
    let config = ConntrackConfig {
        tcp_syn_timeout: Duration::ZERO,
        ..ConntrackConfig::default()
    };
    // Every entry has been idle for more than no time at all.
    std::thread::sleep(Duration::from_millis(2));
    let report = collect_garbage(&mut h.dataplane.conntrack, &config).expect("gc");
    assert_eq!(report.scanned.new, 4);
    assert_eq!(report.reclaimed.new, 4);
    assert_eq!(report.reclaimed.established, 0);
    assert_eq!(fill(&h), (2, 0));
}

/// Garbage collection over a large table runs on its own thread while the loop goes on: the
/// first pass cannot even report before the test (standing in for the loop) has run packets
/// through the data plane and removed entries through its own handle, so a collector running on
/// the loop would never finish.
#[test]
fn garbage_collection_runs_on_its_own_thread() {
    const EXPIRED: u32 = 30_000;
    let mut h = harness(65_536, 65_536, &[BACKEND]);
    for n in 0..EXPIRED {
        let (source, port) = flood_source(n);
        let key = CtKey {
            saddr: Addr::from_v4(source.octets()),
            daddr: Addr::from_v4(VIP.octets()),
            sport_be: port.to_be(),
            dport_be: 53u16.to_be(),
            proto: PROTO_UDP,
            family: FAMILY_V4,
            _pad: 0,
        };
        // Long idle, never answered: ENCAP entries stand alone.
        let value = CtValue {
            kind: ct_kind::ENCAP,
            ..CtValue::default()
        };
        h.dataplane.conntrack.insert_new(&key, &value).unwrap();
    }
    // An answered flow, fresh.
    h.run(&udp(CLIENT, 33200, VIP, 53));
    h.run(&udp(BACKEND, 5353, CLIENT, 33200));
    assert_eq!(fill(&h), (2, EXPIRED as usize));

    let (reported, reports) = mpsc::channel();
    let (turned, loop_turned) = mpsc::channel::<()>();
    let gc = GcThread::spawn(
        h.dataplane.conntrack.try_clone().expect("a second handle"),
        ConntrackConfig {
            gc_interval: Duration::from_secs(3600),
            ..ConntrackConfig::default()
        },
        move |outcome| {
            let thread = std::thread::current().name().map(str::to_owned);
            let waited = loop_turned.recv_timeout(Duration::from_secs(120)).is_ok();
            let _ = reported.send((thread, waited, outcome));
        },
    )
    .expect("spawn");

    // The loop's own work, meanwhile: packets, and a removal through its own handle (as
    // ending retired flows does).
    assert!(reports.try_recv().is_err(), "no pass has reported yet");
    let (_, out) = h.run(&udp(CLIENT, 33200, VIP, 53));
    assert_eq!(out, udp(CLIENT, 33200, BACKEND, 5353));
    let (source, port) = flood_source(0);
    let first = CtKey {
        saddr: Addr::from_v4(source.octets()),
        daddr: Addr::from_v4(VIP.octets()),
        sport_be: port.to_be(),
        dport_be: 53u16.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        _pad: 0,
    };
    h.dataplane.conntrack.remove(&first).expect("remove");
    turned.send(()).unwrap();

    let (thread, waited, (result, _took)) = reports
        .recv_timeout(Duration::from_secs(120))
        .expect("the first pass reports");
    assert!(waited, "the pass reported only after the loop turned");
    assert_eq!(thread.as_deref(), Some(GC_THREAD_NAME));
    let report = result.expect("gc pass");
    assert_eq!(report.scanned.established, 2);
    assert!(report.reclaimed.new >= EXPIRED as usize - 1);
    assert_eq!(report.reclaimed.established, 0);
    drop(gc);
    assert_eq!(
        fill(&h),
        (2, 0),
        "every expired entry gone, the answered flow kept"
    );
}
