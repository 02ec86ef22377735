//! Per-packet cost of the ingress program, measured in the kernel with BPF_PROG_TEST_RUN, as
//! ratios to the pass-through program measured the same way in the same run.
//!
//! - established: a packet of an open flow (conntrack hit, DNAT). BPF_PROG_TEST_RUN reruns the
//!   program on the same, already rewritten, buffer; a second conntrack entry maps the rewritten
//!   packet back, so every repetition takes the same established path.
//! - first packet: a new flow each run (new source port): service lookup, backend choice, two
//!   conntrack inserts, DNAT. One run per call, so it is compared with pass-through at one run
//!   per call too (the kernel's timer costs the same for both).
//! - first packet with 10,000 services installed, to show the lookup does not grow.
//!
//! Run: `cargo bench -p weir-agent --bench packet_path` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{first_packets, median, open_established_flow, run_repeated, SINGLE_RUNS};
use common::*;
use weir_common::program_names;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn many_services_yaml(n: usize) -> String {
    let mut yaml = cluster_yaml(&[BACKEND]);
    for i in 0..n {
        let ip = format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, protocol: TCP, port: 80}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints: [{{addresses: [\"198.19.3.{}\"]}}]\n",
            1 + i % 250
        ));
    }
    yaml
}

fn main() {
    // `cargo bench` passes harness flags; this bench takes none.
    let mut h = Harness::new(&[BACKEND]);

    let services = 10_000;
    let few = cluster_yaml(&[BACKEND]);
    let many = many_services_yaml(services);
    let mut frontends_many = 0;
    let mut pass_repeat = Vec::new();
    let mut established = Vec::new();
    let mut pass_single = Vec::new();
    let mut first = Vec::new();
    let mut pass_single_many = Vec::new();
    let mut first_many = Vec::new();
    // Both table sizes in every round, so machine drift between rounds hits both alike.
    for round in 0..ROUNDS {
        h.apply(&few);
        let ack = open_established_flow(&mut h);
        assert_eq!(
            h.dataplane.conntrack.tables().unwrap().established.len(),
            3,
            "the flow's two entries and the one mapping it back"
        );
        pass_repeat.push(run_repeated(&mut h, program_names::PASS, &ack, REPEAT).as_nanos() as f64);
        established
            .push(run_repeated(&mut h, program_names::INGRESS, &ack, REPEAT).as_nanos() as f64);
        pass_single.push(first_packets(&mut h, program_names::PASS, round));
        first.push(first_packets(&mut h, program_names::INGRESS, round));
        frontends_many = h.apply(&many).services;
        pass_single_many.push(first_packets(&mut h, program_names::PASS, round));
        first_many.push(first_packets(&mut h, program_names::INGRESS, round));
    }

    let (p, e, ps, f, psm, fm) = (
        median(pass_repeat),
        median(established),
        median(pass_single),
        median(first),
        median(pass_single_many),
        median(first_many),
    );
    println!("weir packet path (BPF_PROG_TEST_RUN, medians of {ROUNDS} rounds)");
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "path", "ns/pkt", "baseline", "ratio"
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!("pass-through (repeat {REPEAT})"),
        p,
        p,
        1.0
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        "established flow, conntrack hit + DNAT",
        e,
        p,
        e / p
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!("pass-through (1 run/call, {SINGLE_RUNS} calls)"),
        ps,
        ps,
        1.0
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        "first packet, 2 services",
        f,
        ps,
        f / ps
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!("first packet, {frontends_many} frontends"),
        fm,
        psm,
        fm / psm
    );
    // The pass-through measured next to each table size absorbs machine drift between them.
    println!(
        "first packet, {frontends_many} vs 2 frontends: {:.2}x raw, {:.2}x against the \
         pass-through measured alongside",
        fm / f,
        (fm / psm) / (f / ps)
    );
}
