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

use common::bench::{first_packets, median, open_established_flow, run_repeated, SINGLE_RUNS};
use common::policy::{enforce, PolicyMaps};
use common::*;
use weir_common::{policy_direction, policy_flags, policy_rule_bits, program_names, PROTO_TCP};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;
const POD_ID: u32 = 1;
/// Rule sets of these sizes, in every round.
const SIZES: [u32; 2] = [10, 10_000];

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
        let ack = open_established_flow(&mut h);
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
        let ack = open_established_flow(&mut h);
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
