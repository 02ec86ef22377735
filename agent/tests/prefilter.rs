//! The XDP pre-filter through BPF_PROG_TEST_RUN: deny-listed sources dropped and counted by
//! the list they came from, the inbound failsafe ports still reachable from them unless the
//! operator says otherwise, everything else passed untouched, and the agent's writes of the
//! lists (additions before removals) as the program sees them.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use common::*;
use weir_agent::prefilter::{deny_key, parse_prefix, PrefilterState};
use weir_common::{
    counter, failsafe_direction, node_flags, program_names, FailsafeKey, NodeConfig, PROTO_TCP,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Deny-listed by the configuration: 198.19.64.0/18; by an object: fd00:99::/32.
const LISTED: Ipv4Addr = Ipv4Addr::new(198, 19, 65, 1);
const LISTED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const CLEAN: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 30);
const CLEAN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);

fn state(prefixes: &[(&str, u32)]) -> PrefilterState {
    let deny: BTreeMap<_, _> = prefixes
        .iter()
        .map(|(text, counter)| (deny_key(&parse_prefix(text).unwrap()), *counter))
        .collect();
    let ssh = FailsafeKey {
        port_be: 22u16.to_be(),
        proto: PROTO_TCP,
        direction: failsafe_direction::INBOUND,
    };
    PrefilterState {
        deny,
        failsafe: [ssh].into(),
    }
}

fn xdp(h: &mut Harness, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let program = h
        .dataplane
        .xdp_program(program_names::PREFILTER)
        .expect("the pre-filter program");
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn failsafe_exempt(h: &mut Harness, exempt: bool) {
    let mut config: NodeConfig = h.dataplane.node.config().unwrap();
    config.flags &= !node_flags::PREFILTER_FAILSAFE;
    if exempt {
        config.flags |= node_flags::PREFILTER_FAILSAFE;
    }
    h.dataplane.node.set_config(&config).unwrap();
}

#[test]
fn deny_listed_sources_are_dropped_by_list_and_the_rest_passes_untouched() {
    let mut h = Harness::new(&[BACKEND]);
    let writes = h
        .dataplane
        .prefilter
        .write(&state(&[
            ("198.19.64.0/18", counter::PREFILTER_DROP_CONFIG),
            ("fd00:99::/32", counter::PREFILTER_DROP_OBJECT),
        ]))
        .unwrap();
    assert_eq!(writes, 3, "two prefixes, one failsafe port");
    failsafe_exempt(&mut h, true);
    let outcomes_before = h.counter_values();

    for frame in [
        tcp(CLEAN, 40000, NODE, 80, "S"),
        udp(CLEAN, 40000, NODE, 53),
        tcp6(CLEAN6, 40000, NODE6, 80, "S"),
    ] {
        let (verdict, out) = xdp(&mut h, &frame);
        assert_eq!((verdict, &out), (XDP_PASS, &frame), "untouched");
    }
    let (verdict, _) = xdp(&mut h, &tcp(LISTED, 40000, NODE, 80, "S"));
    assert_eq!(verdict, XDP_DROP);
    let (verdict, _) = xdp(&mut h, &udp(LISTED, 40000, NODE, 53));
    assert_eq!(verdict, XDP_DROP);
    let (verdict, _) = xdp(&mut h, &tcp6(LISTED6, 40000, NODE6, 443, "S"));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.counter("prefilter_drop_config"), 2);
    assert_eq!(h.counter("prefilter_drop_object"), 1);

    // Not a packet of IP: not the pre-filter's to judge.
    let mut arp = tcp(LISTED, 40000, NODE, 80, "S");
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(xdp(&mut h, &arp).0, XDP_PASS);
    // The tc programs' outcomes never moved: XDP drops are counted apart.
    assert_eq!(h.counter_values(), outcomes_before);
}

#[test]
fn a_deny_listed_source_still_reaches_the_failsafe_ports_unless_told_otherwise() {
    let mut h = Harness::new(&[BACKEND]);
    h.dataplane
        .prefilter
        .write(&state(&[(
            "198.19.64.0/18",
            counter::PREFILTER_DROP_CONFIG,
        )]))
        .unwrap();
    failsafe_exempt(&mut h, true);
    let ssh = tcp(LISTED, 40000, NODE, 22, "S");
    assert_eq!(xdp(&mut h, &ssh).0, XDP_PASS, "SSH is failsafe");
    assert_eq!(h.counter("prefilter_pass_failsafe"), 1);
    // Failsafe is by protocol and port: UDP 22 is not.
    assert_eq!(xdp(&mut h, &udp(LISTED, 40000, NODE, 22)).0, XDP_DROP);
    // A later fragment shows no ports: dropped.
    let later = fragments4(&tcp(LISTED, 40000, NODE, 22, "S"), 7, &[8])
        .pop()
        .unwrap();
    assert_eq!(xdp(&mut h, &later).0, XDP_DROP);

    // Its IPv6 neighbour discovery too, or the node could not answer it over IPv6.
    h.dataplane
        .prefilter
        .write(&state(&[
            ("198.19.64.0/18", counter::PREFILTER_DROP_CONFIG),
            ("fd00:99::/32", counter::PREFILTER_DROP_OBJECT),
        ]))
        .unwrap();
    let advert = neighbour_advertisement(LISTED6, NODE6);
    assert_eq!(xdp(&mut h, &advert).0, XDP_PASS);
    assert_eq!(h.counter("prefilter_pass_failsafe"), 2);

    failsafe_exempt(&mut h, false);
    let (verdict, _) = xdp(&mut h, &ssh);
    assert_eq!(verdict, XDP_DROP, "the operator said no exemption");
    assert_eq!(xdp(&mut h, &advert).0, XDP_DROP);
    assert_eq!(h.counter("prefilter_pass_failsafe"), 2);
}

#[test]
fn a_rewritten_list_takes_effect_whole_and_the_longest_prefix_decides() {
    let mut h = Harness::new(&[BACKEND]);
    let drop = counter::PREFILTER_DROP_CONFIG;
    h.dataplane
        .prefilter
        .write(&state(&[("198.19.64.0/18", drop), ("198.19.65.1", drop)]))
        .unwrap();
    let held = h.dataplane.prefilter.read().unwrap();
    assert_eq!(held.deny.len(), 2);
    assert_eq!(xdp(&mut h, &tcp(LISTED, 1, NODE, 80, "S")).0, XDP_DROP);

    // The /18 goes, the host stays; then the host goes too.
    let writes = h
        .dataplane
        .prefilter
        .write(&state(&[("198.19.65.1/32", drop)]))
        .unwrap();
    assert_eq!(writes, 1);
    let neighbour = Ipv4Addr::new(198, 19, 65, 2);
    assert_eq!(xdp(&mut h, &tcp(neighbour, 1, NODE, 80, "S")).0, XDP_PASS);
    assert_eq!(xdp(&mut h, &tcp(LISTED, 1, NODE, 80, "S")).0, XDP_DROP);
    h.dataplane.prefilter.write(&state(&[])).unwrap();
    assert_eq!(xdp(&mut h, &tcp(LISTED, 1, NODE, 80, "S")).0, XDP_PASS);
    assert!(h.dataplane.prefilter.read().unwrap().deny.is_empty());
    let _ = IpAddr::V4(NODE);
}

/// An ICMPv6 neighbour advertisement (type 136) from `src`: the pre-filter reads the type only.
fn neighbour_advertisement(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut frame = udp6(src, 0, dst, 0);
    const NEXT_HEADER: usize = 14 + 6;
    const L4: usize = 14 + 40;
    frame[NEXT_HEADER] = 58;
    frame[L4] = 136;
    frame
}
