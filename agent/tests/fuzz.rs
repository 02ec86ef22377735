//! The fuzz harness of `common/fuzz` at CI size: tens of thousands of generated and mutated
//! packets, seeded and reproducible, every one checked against the invariants (one outcome
//! counter each, read before and after every packet; checksums of every rewritten header;
//! addresses only from the maps). A failure prints the seed, the packet's index and its bytes;
//! `WEIR_FUZZ_SEED` and `WEIR_FUZZ_PACKETS` replay it. The long run is the `fuzz` bench.

mod common;

use common::fuzz::{CounterCheck, Fuzzer, Settings};
use common::{private_bpffs, require_root};

const CI_SEED: u64 = 0x0e14_f022;
const CI_PACKETS: u64 = 30_000;

#[test]
fn fuzzed_packets_keep_every_invariant() {
    require_root();
    // Its own network namespace: FIB lookups for translated replies must not see the host's
    // routes.
    let _bpffs = private_bpffs(nix::sched::CloneFlags::CLONE_NEWNET);
    let settings = Settings::from_env(CI_SEED, CI_PACKETS, CounterCheck::EveryPacket);
    let full_size = settings.packets >= CI_PACKETS;
    let report = Fuzzer::new(settings)
        .run()
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("{report}");
    if full_size {
        assert_reaches_every_path(&report.outcomes);
    }
}

/// A generator that stops reaching a path would let the invariants pass vacuously.
fn assert_reaches_every_path(outcomes: &[u64]) {
    use weir_common::counter::NAMES;
    let expected = [
        "ct_forward_hit",
        "ct_reverse_hit",
        "ct_encap_hit",
        "ct_new_flow",
        "ct_new_tunnel",
        "icmp_error_nat",
        "reject_no_backend",
        "pass_not_ip",
        "pass_fragment",
        "pass_other_proto",
        "pass_no_service",
        "pass_icmp_unrelated",
        "pass_ipv6_extension",
        "drop_truncated",
        "drop_malformed",
        "drop_no_local_backend",
        "icmp_too_big",
    ];
    for name in expected {
        let index = NAMES.iter().position(|n| *n == name).unwrap();
        assert!(outcomes[index] > 0, "no fuzzed packet reached {name}");
    }
}

/// The checker itself, on hand-made rewrites: a clean run proves nothing if it would also have
/// let these through.
#[test]
fn the_checker_catches_what_the_program_must_never_do() {
    use common::fuzz::check::{outcome, rewrite, Allowed};
    use common::fuzz::packet::{frame_of, ip_packet, tcp_header, udp_header};
    use common::fuzz::topology::Layout;
    use common::{BACKEND, CLIENT, OTHER, TC_ACT_OK, TC_ACT_SHOT, VIP};
    use weir_common::{Addr, PROTO_TCP, PROTO_UDP};

    let allowed = Allowed(
        [VIP, BACKEND]
            .map(|a| Addr::from_v4(a.octets()).bytes)
            .into(),
    );
    let tcp_to = |dst: std::net::Ipv4Addr, dport| {
        let l4 = tcp_header(40000, dport, 0x02, b"hello");
        frame_of(&ip_packet(CLIENT.into(), dst.into(), PROTO_TCP, &l4, true))
    };
    let check =
        |input: &[u8], output: &[u8]| rewrite(Layout::Ethernet, &allowed, input, TC_ACT_OK, output);
    let violation = |result: Result<(), common::fuzz::check::Violation>| result.unwrap_err().0;

    let input = tcp_to(VIP, 80);
    check(&input, &tcp_to(BACKEND, 8080)).expect("a clean DNAT");
    let mut stale = input.clone();
    stale[30..34].copy_from_slice(&BACKEND.octets());
    assert!(violation(check(&input, &stale)).contains("IPv4 header checksum residual"));
    assert!(violation(check(&input, &tcp_to(OTHER, 8080))).contains("no map holds"));

    let udp_to = |dst: std::net::Ipv4Addr, dport, with_checksum: bool| {
        let l4 = udp_header(33000, dport, b"ping");
        let mut frame = frame_of(&ip_packet(CLIENT.into(), dst.into(), PROTO_UDP, &l4, true));
        if !with_checksum {
            frame[40..42].fill(0);
        }
        frame
    };
    let no_checksum = udp_to(VIP, 53, false);
    check(&no_checksum, &udp_to(BACKEND, 5353, false)).expect("zero stays zero");
    assert!(violation(check(&no_checksum, &udp_to(BACKEND, 5353, true))).contains("UDP checksum 0"));

    // Found by the long run (seed 0x5eed14, packet 7152006): on the IPIP device's old layout,
    // a UDP packet translated behind an outer header whose protocol a mutation made ICMP. The
    // outer header is no ICMP answer.
    let allowed_ipip = Allowed(
        [[198, 19, 2, 11], [198, 18, 200, 1]]
            .map(|a| Addr::from_v4(a).bytes)
            .into(),
    );
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let outer = "02000000000b02000000000a080045000037000100004001ee9ac6120002c6120001";
    let input = unhex(&format!(
        "{outer}45000023000140004011e5d9c61200c9c612c8019c450035000f68c4644b87e2cf72ea"
    ));
    let output = unhex(&format!(
        "{outer}45000023000140004011abcfc61200c9c613020b9c4514e9000f1a06644b87e2cf72ea"
    ));
    rewrite(Layout::IpipDevice, &allowed_ipip, &input, 7, &output).expect("a clean DNAT");

    let mut two_moved = [0u64; weir_common::counter::COUNT as usize];
    two_moved[0] = 1;
    two_moved[3] = 1;
    assert!(outcome(&two_moved, TC_ACT_OK, &input, &input).is_err());
    let mut one_drop = [0u64; weir_common::counter::COUNT as usize];
    one_drop[weir_common::counter::DROP_MALFORMED as usize] = 1;
    assert!(
        outcome(&one_drop, TC_ACT_OK, &input, &input).is_err(),
        "a drop that passed"
    );
    assert!(outcome(&one_drop, TC_ACT_SHOT, &input, &input).is_ok());
    let mut one_pass = [0u64; weir_common::counter::COUNT as usize];
    one_pass[weir_common::counter::PASS_NO_SERVICE as usize] = 1;
    assert!(
        outcome(&one_pass, TC_ACT_OK, &input, &stale).is_err(),
        "a pass that rewrote"
    );
}
