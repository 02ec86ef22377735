//! What the per-packet benchmarks share: BPF_PROG_TEST_RUN timing, medians, a run of first
//! packets, and an established flow every repetition takes.

use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use weir_common::{ct_kind, Addr, CtKey, CtValue, FAMILY_V4, PROTO_TCP};

use super::{tcp, Harness, BACKEND, CLIENT, TC_ACT_OK, VIP};

/// First packets are timed one run per call, over this many distinct flows.
pub const SINGLE_RUNS: u16 = 20_000;

/// The kernel's mean time of one of `repeat` runs of tc program `program` on `packet`, which
/// it must pass.
pub fn run_repeated(
    h: &mut Harness,
    program: &'static str,
    packet: &[u8],
    repeat: u32,
) -> Duration {
    let (verdict, time) = timed(h.dataplane.program(program).unwrap(), packet, repeat);
    assert_eq!(verdict, TC_ACT_OK);
    time
}

/// The verdict of `program` on `packet`, and the kernel's mean time of one of `repeat` runs.
pub fn timed<P>(program: &P, packet: &[u8], repeat: u32) -> (u32, Duration)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = program.test_run(opts).expect("test run");
    // The kernel reports the mean time of one repetition.
    (result.return_value, result.duration)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Mean ns of single runs over distinct new flows.
pub fn first_packets(h: &mut Harness, program: &'static str, round: usize) -> f64 {
    let mut total = Duration::ZERO;
    for i in 0..SINGLE_RUNS {
        let sport = 1024 + (round as u16 * 9000 + i) % 60000;
        total += run_repeated(h, program, &tcp(CLIENT, sport, VIP, 80, "S"), 1);
    }
    h.dataplane
        .conntrack
        .entries()
        .unwrap()
        .keys()
        .for_each(|k| {
            let _ = h.dataplane.conntrack.remove(k);
        });
    total.as_nanos() as f64 / f64::from(SINGLE_RUNS)
}

/// Opens a flow (the whole handshake, so it is in the established table) and adds the entry
/// that maps the DNATed packet back, so that every repetition takes the established path.
/// Returns the client's packet. Again before each round: measuring first packets clears the
/// tables.
pub fn open_established_flow(h: &mut Harness) -> Vec<u8> {
    let syn = tcp(CLIENT, 40000, VIP, 80, "S");
    let (_, dnated) = h.run(&syn);
    assert_ne!(dnated, syn);
    h.run(&tcp(BACKEND, 8080, CLIENT, 40000, "SA"));
    h.run(&tcp(CLIENT, 40000, VIP, 80, "A"));
    let rewritten_key = CtKey {
        saddr: Addr::from_v4(CLIENT.octets()),
        daddr: Addr::from_v4(BACKEND.octets()),
        sport_be: 40000u16.to_be(),
        dport_be: 8080u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: 0,
    };
    h.dataplane
        .conntrack
        .insert(
            &rewritten_key,
            &CtValue {
                nat_addr: Addr::from_v4(VIP.octets()),
                nat_port_be: 80u16.to_be(),
                kind: ct_kind::FORWARD,
                ..Default::default()
            },
        )
        .unwrap();
    tcp(CLIENT, 40000, VIP, 80, "A")
}
