//! What the XDP pre-filter costs a packet, measured in the kernel with BPF_PROG_TEST_RUN, as
//! ratios to an XDP program that only passes (`weir_xdp_pass`) measured the same way in the
//! same run: a packet from a clean source (passed after one longest-match lookup) and one from
//! a deny-listed source (dropped and counted), with deny-lists of 10 and 10,000 prefixes
//! (IPv4 /24s to /32s and IPv6 /48s to /128s mixed): the lookup walks a trie, so a list 1,000
//! times longer should cost about the same (target: within 10%).
//!
//! Run: `cargo bench -p weir-agent --bench prefilter_path` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::bench::{median, timed};
use common::*;
use weir_agent::intent::Cidr;
use weir_agent::prefilter::{deny_key, PrefilterState};
use weir_common::{counter, program_names};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;
const SIZES: [u32; 2] = [10, 10_000];
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const LISTED: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 7);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// `size` prefixes in 198.18.0.0/15 and fd00::/8 of assorted lengths, the listed source's
/// /24 among them.
fn deny_list(size: u32) -> PrefilterState {
    let mut deny = BTreeMap::new();
    deny.insert(
        deny_key(&Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(198, 19, 200, 0)),
            len: 24,
        }),
        counter::PREFILTER_DROP_CONFIG,
    );
    // Prefixes that clear to one already listed are skipped: `size` distinct ones in the end.
    for i in 1.. {
        if deny.len() == size as usize {
            break;
        }
        let cidr = if i % 2 == 0 {
            Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8)),
                len: 24 + (i % 9) as u8,
            }
        } else {
            Cidr {
                addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, i as u16, 0, 0, 0, 0, 1)),
                len: 48 + (i % 81) as u8,
            }
        };
        // Cleared host bits, as the agent writes them.
        let cidr = weir_agent::prefilter::parse_prefix(&format!("{}/{}", cidr.addr, cidr.len))
            .expect("a valid prefix");
        deny.insert(deny_key(&cidr), counter::PREFILTER_DROP_CONFIG);
    }
    PrefilterState {
        deny,
        failsafe: Default::default(),
    }
}

fn main() {
    let mut h = Harness::new(&[BACKEND]);
    let clean = tcp(CLIENT, 40000, NODE, 80, "S");
    let listed = tcp(LISTED, 40000, NODE, 80, "S");
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut record = |name: String, ns: f64| match rows.iter_mut().find(|(n, _)| *n == name) {
        Some((_, v)) => v.push(ns),
        None => rows.push((name, vec![ns])),
    };
    for round in 0..ROUNDS {
        for size in SIZES {
            let list = deny_list(size);
            h.dataplane.prefilter.write(&list).unwrap();
            let held = h.dataplane.prefilter.read().unwrap().deny.len();
            assert_eq!(held, size as usize);
            let baseline = h.dataplane.xdp_program(program_names::XDP_PASS).unwrap();
            let (verdict, pass_through) = timed(baseline, &clean, REPEAT);
            assert_eq!(verdict, XDP_PASS);
            record("xdp pass-through".into(), pass_through.as_nanos() as f64);
            let program = h.dataplane.xdp_program(program_names::PREFILTER).unwrap();
            let (verdict, passed) = timed(program, &clean, REPEAT);
            assert_eq!(verdict, XDP_PASS);
            let (verdict, dropped) = timed(program, &listed, REPEAT);
            assert_eq!(verdict, XDP_DROP);
            record(
                format!("clean source, {size} prefixes"),
                passed.as_nanos() as f64,
            );
            record(
                format!("listed source, {size} prefixes"),
                dropped.as_nanos() as f64,
            );
        }
        eprintln!("round {} of {ROUNDS} done", round + 1);
    }
    let base = median(rows[0].1.clone());
    println!("XDP pre-filter, BPF_PROG_TEST_RUN, median of {ROUNDS} rounds of {REPEAT} runs");
    println!("{:<34} {:>8} {:>10}", "packet", "ns", "vs pass");
    for (name, values) in &rows {
        let ns = median(values.clone());
        println!("{name:<34} {ns:>8.1} {:>9.2}x", ns / base);
    }
    let at = |name: &str| median(rows.iter().find(|(n, _)| n == name).unwrap().1.clone());
    for kind in ["clean source", "listed source"] {
        println!(
            "{kind}: 10,000 prefixes vs 10: {:.2}x",
            at(&format!("{kind}, 10000 prefixes")) / at(&format!("{kind}, 10 prefixes"))
        );
    }
}
