//! What NetworkPolicy costs a packet, measured in the kernel with BPF_PROG_TEST_RUN, as ratios
//! to the pass-through program measured the same way in the same run.
//!
//! The destination pod (the echo service's backend) is isolated for ingress by policies of
//! 10, then 10,000 rules (half ipBlocks, each a prefix with an identity of its own, half pod
//! selectors, each a peer identity), the last of which allows the client. Measured:
//! - a service's first packet (a new flow each run: service lookup, backend choice, the policy
//!   decision and its record, conntrack inserts, DNAT) against the pass-through at one run per
//!   call, with no policy, 10 rules and 10,000 rules: the decision is a fixed number of map
//!   lookups, so 10,000 rules should cost what 10 do (target: within 10%);
//! - a packet of an established flow, with and without policy: it never meets the policy.
//!
//! Run: `cargo bench -p weir-agent --bench policy_path` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};
use common::policy::{enforce, PolicyMaps};
use common::*;
use weir_common::{
    ct_kind, policy_direction, policy_flags, policy_rule_bits, program_names, Addr, CtKey, CtValue,
    FAMILY_V4, PROTO_TCP,
};

const REPEAT: u32 = 1_000_000;
const SINGLE_RUNS: u16 = 20_000;
const ROUNDS: usize = 5;
const POD_ID: u32 = 1;
/// Rule sets of these sizes, in every round.
const SIZES: [u32; 2] = [10, 10_000];

fn run_repeated(h: &mut Harness, program: &'static str, packet: &[u8], repeat: u32) -> Duration {
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = h
        .dataplane
        .program(program)
        .unwrap()
        .test_run(opts)
        .expect("test run");
    assert_eq!(
        result.return_value, TC_ACT_OK,
        "the policy allows the client"
    );
    result.duration
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Mean ns of single runs over distinct new flows; the conntrack is emptied after.
fn first_packets(h: &mut Harness, program: &'static str, round: usize) -> f64 {
    let mut total = Duration::ZERO;
    for i in 0..SINGLE_RUNS {
        let sport = 1024 + (round as u16 * 9000 + i) % 60000;
        total += run_repeated(h, program, &tcp(CLIENT, sport, VIP, 80, "S"), 1);
    }
    let keys: Vec<CtKey> = h
        .dataplane
        .conntrack
        .entries()
        .unwrap()
        .into_keys()
        .collect();
    for key in keys {
        let _ = h.dataplane.conntrack.remove(&key);
    }
    total.as_nanos() as f64 / f64::from(SINGLE_RUNS)
}

/// A packet that takes the established path on every repetition (see `packet_path.rs`).
fn established_packet(h: &mut Harness) -> Vec<u8> {
    h.run(&tcp(CLIENT, 40000, VIP, 80, "S"));
    h.run(&tcp(BACKEND, 8080, CLIENT, 40000, "SA"));
    h.run(&tcp(CLIENT, 40000, VIP, 80, "A"));
    let rewritten = CtKey {
        saddr: Addr::from_v4(CLIENT.octets()),
        daddr: Addr::from_v4(BACKEND.octets()),
        sport_be: 40000u16.to_be(),
        dport_be: 8080u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: 0,
    };
    let back = CtValue {
        nat_addr: Addr::from_v4(VIP.octets()),
        nat_port_be: 80u16.to_be(),
        kind: ct_kind::FORWARD,
        ..Default::default()
    };
    h.dataplane.conntrack.insert(&rewritten, &back).unwrap();
    tcp(CLIENT, 40000, VIP, 80, "A")
}

/// `rules` rules isolating the backend: half ipBlocks (/32s in 198.19.128.0/17), half pod
/// identities, the last one of them the client's. Identities never repeat across calls.
fn install_rules(maps: &mut PolicyMaps, rules: u32, base: u32) {
    maps.isolate(IpAddr::V4(BACKEND), POD_ID, policy_flags::INGRESS);
    let ingress = policy_direction::INGRESS;
    for i in 0..rules {
        let identity = base + i;
        if i % 2 == 0 {
            let host = 128 * 256 + i / 2;
            let net = Ipv4Addr::new(198, 19, (host >> 8) as u8, host as u8);
            maps.cidr(IpAddr::V4(net), 32, identity);
        }
        maps.allow(
            POD_ID,
            ingress,
            identity,
            PROTO_TCP,
            8080,
            policy_rule_bits::PORT,
        );
    }
    maps.identity(IpAddr::V4(CLIENT), base + rules - 1);
}

fn main() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let dir = bpffs.path().join("weir");
    let mut h = Harness::with_pin_dir(&[BACKEND], Some(dir.clone()));
    let mut maps = PolicyMaps::open(&dir);
    let no_policy = h.dataplane.node.config().unwrap();

    let mut pass_repeat = Vec::new();
    let mut pass_single = Vec::new();
    let mut established_plain = Vec::new();
    let mut established_policy = Vec::new();
    let mut first_plain = Vec::new();
    let mut first_by_size: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    // Every variant in every round, so machine drift between rounds hits them alike.
    for round in 0..ROUNDS {
        h.dataplane.node.set_config(&no_policy).unwrap();
        let ack = established_packet(&mut h);
        pass_repeat.push(run_repeated(&mut h, program_names::PASS, &ack, REPEAT).as_nanos() as f64);
        established_plain
            .push(run_repeated(&mut h, program_names::INGRESS, &ack, REPEAT).as_nanos() as f64);
        pass_single.push(first_packets(&mut h, program_names::PASS, round));
        first_plain.push(first_packets(&mut h, program_names::INGRESS, round));
        for (slot, rules) in SIZES.iter().enumerate() {
            maps.clear();
            install_rules(&mut maps, *rules, 1 + 100_000 * (slot as u32 + 1));
            enforce(&mut h);
            first_by_size[slot].push(first_packets(&mut h, program_names::INGRESS, round));
        }
        let ack = established_packet(&mut h);
        established_policy
            .push(run_repeated(&mut h, program_names::INGRESS, &ack, REPEAT).as_nanos() as f64);
    }

    let (p, ps) = (median(pass_repeat), median(pass_single));
    let (ep, epol) = (median(established_plain), median(established_policy));
    let fp = median(first_plain);
    let first: Vec<f64> = first_by_size.into_iter().map(median).collect();
    println!("weir policy path (BPF_PROG_TEST_RUN, medians of {ROUNDS} rounds)");
    println!(
        "{:<48} {:>10} {:>10} {:>8}",
        "path", "ns/pkt", "baseline", "ratio"
    );
    let row = |name: &str, value: f64, baseline: f64| {
        println!(
            "{name:<48} {value:>10.1} {baseline:>10.1} {:>8.2}",
            value / baseline
        );
    };
    row(&format!("pass-through (repeat {REPEAT})"), p, p);
    row("established flow, no policy", ep, p);
    row("established flow, destination isolated", epol, p);
    row(
        &format!("pass-through (1 run/call, {SINGLE_RUNS} calls)"),
        ps,
        ps,
    );
    row("first packet, no policy", fp, ps);
    for (rules, value) in SIZES.iter().zip(&first) {
        row(
            &format!("first packet, {rules} rules isolating the backend"),
            *value,
            ps,
        );
    }
    println!(
        "first packet, {} vs {} rules: {:.2}x (target <= 1.10x); policy vs none at {} rules: \
         {:.2}x; established with vs without policy: {:.2}x",
        SIZES[1],
        SIZES[0],
        first[1] / first[0],
        SIZES[0],
        first[0] / fp,
        epol / ep
    );
}
