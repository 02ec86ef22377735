//! NetworkPolicy in the data path, through BPF_PROG_TEST_RUN: the policy maps are written here
//! as the agent's compiler writes them (isolated endpoints, peer identities, ipBlock prefixes,
//! rules), and packets show what each decision lets through and what it drops and counts.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use common::policy::PolicyMaps;
use common::*;
use weir_agent::compile::addr_key;
use weir_common::{
    policy_direction, policy_flags, policy_rule_bits, POLICY_ANY_PEER, PROTO_TCP, PROTO_UDP,
};

/// The isolated pod: the echo service's backend (`BACKEND`).
const POD: Ipv4Addr = BACKEND;
const POD_ID: u32 = 1;
/// A pod the policy allows, by its identity.
const FRIEND: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 20);
const FRIEND_IDENTITY: u32 = 7;
/// A pod the policy does not name.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 30);
const STRANGER_IDENTITY: u32 = 8;
/// An ipBlock 198.19.64.0/18 except 198.19.96.0/19, with identities of their own.
const BLOCK_IDENTITY: u32 = 1_000_001;
const EXCEPT_IDENTITY: u32 = 1_000_002;
const IN_BLOCK: Ipv4Addr = Ipv4Addr::new(198, 19, 65, 1);
const IN_EXCEPT: Ipv4Addr = Ipv4Addr::new(198, 19, 97, 1);
/// One of the node's own addresses.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 0x11);
const FRIEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 3, 0, 0, 0, 0x20);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 3, 0, 0, 0, 0x30);

/// The harness with pinned maps (in a private bpffs), the node's address, and the policy maps.
fn harness(bpffs: &Path) -> (Harness, PolicyMaps) {
    let dir: PathBuf = bpffs.join("weir");
    let mut h = Harness::with_pin_dir(&[BACKEND], Some(dir.clone()));
    let addrs = [addr_key(IpAddr::V4(NODE))].into_iter().collect();
    h.dataplane.node.set_host_addrs(&addrs).unwrap();
    let maps = PolicyMaps::open(&dir);
    (h, maps)
}

fn enforce(h: &mut Harness) {
    common::policy::enforce(h);
}

/// The policy of these tests: POD isolated for ingress; its rules allow FRIEND on TCP 8080,
/// the ipBlock (less its except) on any TCP port, and anyone on UDP 5353.
fn ingress_policy(maps: &mut PolicyMaps) {
    maps.isolate(IpAddr::V4(POD), POD_ID, policy_flags::INGRESS);
    maps.identity(IpAddr::V4(FRIEND), FRIEND_IDENTITY);
    maps.identity(IpAddr::V4(STRANGER), STRANGER_IDENTITY);
    maps.cidr(
        IpAddr::V4(Ipv4Addr::new(198, 19, 64, 0)),
        18,
        BLOCK_IDENTITY,
    );
    maps.cidr(
        IpAddr::V4(Ipv4Addr::new(198, 19, 96, 0)),
        19,
        EXCEPT_IDENTITY,
    );
    let ingress = policy_direction::INGRESS;
    maps.allow(
        POD_ID,
        ingress,
        FRIEND_IDENTITY,
        PROTO_TCP,
        8080,
        policy_rule_bits::PORT,
    );
    maps.allow(
        POD_ID,
        ingress,
        BLOCK_IDENTITY,
        PROTO_TCP,
        0,
        policy_rule_bits::ANY_PORT,
    );
    maps.allow(
        POD_ID,
        ingress,
        POLICY_ANY_PEER,
        PROTO_UDP,
        5353,
        policy_rule_bits::PORT,
    );
}

#[test]
fn a_service_flow_to_an_isolated_pod_passes_only_as_its_ingress_rules_allow() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    enforce(&mut h);

    // The rules see the client's own address and the backend's port.
    let (verdict, out) = h.run(&tcp(FRIEND, 40000, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(FRIEND, 40000, POD, 8080, "S"));
    assert_eq!(h.counter("policy_allowed"), 1);
    // Its further packets are the conntrack's: no decision, no count.
    let (verdict, _) = h.run(&tcp(FRIEND, 40000, VIP, 80, "A"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(h.counter("policy_allowed"), 1);

    let (verdict, _) = h.run(&tcp(STRANGER, 40001, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_policy_ingress"), 1);
    // Nothing recorded for the denied flow: its next packet is denied again.
    let (verdict, _) = h.run(&tcp(STRANGER, 40001, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_policy_ingress"), 2);

    // ipBlock with except: the most specific prefix decides.
    let (verdict, _) = h.run(&tcp(IN_BLOCK, 40002, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK, "inside the block");
    let (verdict, _) = h.run(&tcp(IN_EXCEPT, 40003, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT, "inside its except");
    // A rule for any peer, on one port of another protocol.
    let (verdict, _) = h.run(&udp(STRANGER, 40004, VIP, 53));
    assert_eq!(verdict, TC_ACT_OK, "UDP 5353 from anyone");
    assert_eq!(h.counter("drop_policy_ingress"), 3);
    assert_eq!(h.counter("ct_new_flow"), 3);
}

#[test]
fn without_enforcement_the_policy_maps_are_not_consulted() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    let (verdict, _) = h.run(&tcp(STRANGER, 40001, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, _) = h.run(&tcp(STRANGER, 40002, POD, 22, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(h.counter("drop_policy_ingress"), 0);
    assert_eq!(h.counter("policy_allowed"), 0);
}

#[test]
fn untranslated_flows_are_decided_once_and_their_replies_pass() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    enforce(&mut h);

    // Pod to pod, no service: the fast path notes the tuple and the policy decides.
    let (verdict, out) = h.run(&tcp(FRIEND, 41000, POD, 8080, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(FRIEND, 41000, POD, 8080, "S"), "untouched");
    assert_eq!(h.counter("policy_allowed"), 1);
    // The reply from the isolated pod, and further segments, find the record.
    let (verdict, _) = h.run(&tcp(POD, 8080, FRIEND, 41000, "SA"));
    assert_eq!(verdict, TC_ACT_OK);
    for _ in 0..5 {
        let (verdict, _) = h.run(&tcp(FRIEND, 41000, POD, 8080, "A"));
        assert_eq!(verdict, TC_ACT_OK);
    }
    assert_eq!(h.counter("policy_allowed"), 1, "decided once");
    assert_eq!(h.counter("pass_no_service"), 7);

    // A port the rules do not name, and a peer they do not name.
    let (verdict, _) = h.run(&tcp(FRIEND, 41001, POD, 22, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = h.run(&tcp(STRANGER, 41002, POD, 8080, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    // A segment of no recorded connection (say, from before the policy) is decided as new.
    let (verdict, _) = h.run(&tcp(STRANGER, 41003, POD, 8080, "A"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_policy_ingress"), 3);

    // Traffic between pods no policy selects passes untracked.
    let (verdict, _) = h.run(&tcp(STRANGER, 41004, FRIEND, 22, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(h.counter("policy_allowed"), 1);
}

#[test]
fn egress_isolation_sees_the_chosen_backend_and_a_pods_own_connections_get_their_replies() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    // FRIEND may reach pods of BACKEND's identity on TCP 8080 only (egress sees the backend
    // and its port, not the ClusterIP's 80).
    const FRIEND_ID: u32 = 2;
    const BACKEND_IDENTITY: u32 = 9;
    maps.isolate(IpAddr::V4(FRIEND), FRIEND_ID, policy_flags::EGRESS);
    maps.identity(IpAddr::V4(BACKEND), BACKEND_IDENTITY);
    maps.allow(
        FRIEND_ID,
        policy_direction::EGRESS,
        BACKEND_IDENTITY,
        PROTO_TCP,
        8080,
        policy_rule_bits::PORT,
    );
    enforce(&mut h);

    let (verdict, out) = h.run(&tcp(FRIEND, 42000, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(FRIEND, 42000, BACKEND, 8080, "S"));
    // UDP to the same backend is not allowed.
    let (verdict, _) = h.run(&udp(FRIEND, 42001, VIP, 53));
    assert_eq!(verdict, TC_ACT_SHOT);
    // Nor is another address.
    let (verdict, _) = h.run(&tcp(FRIEND, 42002, STRANGER, 8080, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_policy_egress"), 2);
    assert_eq!(h.counter("drop_policy_ingress"), 0);

    // A flow into the egress-isolated pod (not isolated for ingress) is recorded, so that the
    // pod's replies are not judged as its own new connections.
    let (verdict, _) = h.run(&tcp(STRANGER, 42003, FRIEND, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, _) = h.run(&tcp(FRIEND, 80, STRANGER, 42003, "SA"));
    assert_eq!(verdict, TC_ACT_OK, "a reply");
    assert_eq!(h.counter("drop_policy_egress"), 2);
}

#[test]
fn icmp_errors_pass_with_their_flow_and_ipv6_plumbing_always_passes() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    enforce(&mut h);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);

    // The pod's own connection out (not egress-isolated) is recorded: errors about it pass.
    let (verdict, _) = h.run(&tcp(POD, 43000, STRANGER, 443, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    let quote = &tcp(POD, 43000, STRANGER, 443, "S")[14..];
    let (verdict, _) = h.run(&icmp_error(ROUTER, POD, 3, 4, &quote[..28]));
    assert_eq!(verdict, TC_ACT_OK, "an error about the pod's flow");
    // An error about no flow of the pod's is dropped.
    let quote = &tcp(POD, 43001, STRANGER, 443, "S")[14..];
    let (verdict, _) = h.run(&icmp_error(ROUTER, POD, 3, 4, &quote[..28]));
    assert_eq!(verdict, TC_ACT_SHOT, "an error about nothing");
    // Echo requests need a rule for every protocol: there is none.
    let (verdict, _) = h.run(&icmp_echo(STRANGER, POD));
    assert_eq!(verdict, TC_ACT_SHOT, "a ping");
    assert_eq!(h.counter("drop_policy_ingress"), 2);

    // IPv6: neighbour discovery reaches an isolated pod whatever its rules.
    maps.isolate(IpAddr::V6(POD6), POD_ID, policy_flags::INGRESS);
    let solicitation = neighbour_solicitation(STRANGER6, POD6);
    let (verdict, _) = h.run(&solicitation);
    assert_eq!(verdict, TC_ACT_OK, "neighbour solicitation");
    let (verdict, _) = h.run(&tcp6(STRANGER6, 43002, POD6, 8080, "S"));
    assert_eq!(verdict, TC_ACT_SHOT, "a TCP SYN over IPv6");
    maps.identity(IpAddr::V6(FRIEND6), FRIEND_IDENTITY);
    let (verdict, _) = h.run(&tcp6(FRIEND6, 43003, POD6, 8080, "S"));
    assert_eq!(verdict, TC_ACT_OK, "FRIEND's IPv6 address, same identity");
    assert_eq!(h.counter("drop_policy_ingress"), 3);
}

#[test]
fn at_the_pods_door_the_node_gets_in_recorded_flows_get_in_and_the_rest_is_decided() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    enforce(&mut h);
    let egress = weir_common::program_names::EGRESS;

    // The node's own traffic to its pods (kubelet probes) is always allowed.
    let (verdict, _) = h.run_program(egress, &tcp(NODE, 44000, POD, 9999, "S"));
    assert_eq!(verdict, TC_ACT_OK, "from the node");
    // What arrived without weir_ingress's decision (a tunnel's inner packet routed by the
    // stack) is decided here: denied...
    let (verdict, _) = h.run_program(egress, &tcp(STRANGER, 44001, POD, 8080, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_policy_ingress"), 1);
    // ... or allowed.
    let (verdict, out) = h.run_program(egress, &tcp(FRIEND, 44002, POD, 8080, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp(FRIEND, 44002, POD, 8080, "S"));
    // A flow weir_ingress allowed is recorded by its translated tuple: the door lets it in.
    let (verdict, _) = h.run(&tcp(IN_BLOCK, 44003, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, _) = h.run_program(egress, &tcp(IN_BLOCK, 44003, POD, 8080, "A"));
    assert_eq!(verdict, TC_ACT_OK);
    // Traffic to pods no policy selects is not looked at beyond the lookup.
    let (verdict, _) = h.run_program(egress, &tcp(STRANGER, 44004, FRIEND, 22, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(h.counter("drop_policy_ingress"), 1);

    // Pod to pod on one node: the SYN weir_ingress allowed a moment ago is not decided again
    // at the door, even if the rules changed in between...
    let syn = tcp(FRIEND, 44005, POD, 8080, "S");
    assert_eq!(h.run(&syn).0, TC_ACT_OK);
    let friend_rule = (
        POD_ID,
        policy_direction::INGRESS,
        FRIEND_IDENTITY,
        PROTO_TCP,
        8080,
        policy_rule_bits::PORT,
    );
    maps.revoke(
        friend_rule.0,
        friend_rule.1,
        friend_rule.2,
        friend_rule.3,
        friend_rule.4,
        friend_rule.5,
    );
    assert_eq!(h.run_program(egress, &syn).0, TC_ACT_OK, "the same SYN");
    assert_eq!(h.counter("drop_policy_ingress"), 1);
    // ... but a new connection on the tuple, once the record is over a second old, is: it
    // meets the rules of its day.
    std::thread::sleep(std::time::Duration::from_millis(1_200));
    assert_eq!(
        h.run(&syn).0,
        TC_ACT_SHOT,
        "a new connection on an old tuple"
    );
    assert_eq!(h.counter("drop_policy_ingress"), 2);
}

#[test]
fn both_families_of_a_dual_stack_pod_share_its_rules() {
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    maps.isolate(IpAddr::V4(POD), POD_ID, policy_flags::INGRESS);
    maps.isolate(IpAddr::V6(POD6), POD_ID, policy_flags::INGRESS);
    maps.cidr(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 3, 0, 0, 0, 0)),
        64,
        BLOCK_IDENTITY,
    );
    maps.cidr(IpAddr::V6(STRANGER6), 128, EXCEPT_IDENTITY);
    maps.allow(
        POD_ID,
        policy_direction::INGRESS,
        BLOCK_IDENTITY,
        PROTO_TCP,
        0,
        policy_rule_bits::ANY_PROTOCOL,
    );
    enforce(&mut h);
    let (verdict, _) = h.run(&tcp6(FRIEND6, 45000, POD6, 22, "S"));
    assert_eq!(verdict, TC_ACT_OK, "in the IPv6 block");
    let (verdict, _) = h.run(&udp6(FRIEND6, 45001, POD6, 53));
    assert_eq!(verdict, TC_ACT_OK, "a rule for every protocol");
    let (verdict, _) = h.run(&tcp6(STRANGER6, 45002, POD6, 22, "S"));
    assert_eq!(verdict, TC_ACT_SHOT, "in its except");
    let (verdict, _) = h.run(&tcp(FRIEND, 45003, POD, 22, "S"));
    assert_eq!(verdict, TC_ACT_SHOT, "no IPv4 block");
    assert_eq!(h.counter("drop_policy_ingress"), 2);
}

/// An ICMPv6 neighbour solicitation from `src` for `target`.
fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&target.octets());
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), target.octets(), 255)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, &body[4..])
        .unwrap();
    out
}

/// `weir-agent monitor`'s stream: nothing is written before a monitor takes the lease, a
/// second monitor is refused while it holds it, and the verdicts come with the client's own
/// address, the backend, the frontend addressed and the pod whose rules decided.
#[test]
fn the_monitor_streams_verdicts_only_while_it_holds_the_lease() {
    use weir_agent::monitor::{self, Filter, MonitorError, Options, VerdictFilter};
    let bpffs = private_bpffs(nix::sched::CloneFlags::empty());
    let (mut h, mut maps) = harness(bpffs.path());
    ingress_policy(&mut maps);
    enforce(&mut h);
    let dir = bpffs.path().join("weir");

    // Nobody watches: denied, counted, not streamed.
    let (verdict, _) = h.run(&tcp(STRANGER, 39999, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);

    let options = Options {
        filter: Filter {
            verdict: VerdictFilter::All,
            ..Filter::default()
        },
        json: true,
        count: Some(3),
        duration: Some(std::time::Duration::from_secs(20)),
        pods: [(POD_ID, "prod/db-0".to_owned())].into(),
        ..Options::default()
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let watching = {
        let (dir, options) = (dir.clone(), options.clone());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let summary = runtime().block_on(monitor::run(&dir, &options, &mut out));
            (summary, String::from_utf8(out).unwrap())
        })
    };
    let lease = |dir: &Path| -> weir_common::MonitorConfig {
        let map: aya::maps::Array<aya::maps::MapData, weir_common::MonitorConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(
                aya::maps::MapData::from_pin(dir.join("WEIR_MONITOR")).unwrap(),
            ))
            .unwrap();
        map.get(&0, 0).unwrap()
    };
    let waited = std::time::Instant::now();
    while lease(&dir).flags == 0 {
        assert!(waited.elapsed().as_secs() < 10, "the monitor took no lease");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = runtime().block_on(monitor::run(&dir, &options, &mut Vec::new()));
    assert!(
        matches!(second, Err(MonitorError::Busy { .. })),
        "{second:?}"
    );

    let (verdict, _) = h.run(&tcp(STRANGER, 40001, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = h.run(&tcp(FRIEND, 40000, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, _) = h.run(&udp(STRANGER, 40002, POD, 22));
    assert_eq!(verdict, TC_ACT_SHOT);

    let (summary, out) = watching.join().unwrap();
    let summary = summary.unwrap();
    assert_eq!((summary.printed, summary.lost), (3, 0), "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let brief = |e: &serde_json::Value| {
        format!(
            "{} {} {} {} -> {} via {} pod {}",
            e["verdict"],
            e["direction"],
            e["proto"],
            e["source"],
            e["destination"],
            e["frontend"],
            e["pod"]
        )
        .replace('"', "")
    };
    let briefs: Vec<String> = events.iter().map(brief).collect();
    assert_eq!(
        briefs,
        [
            "denied ingress tcp 198.19.3.30:40001 -> 198.19.2.11:8080 via 198.18.100.10:80 pod prod/db-0",
            "allowed null tcp 198.19.3.20:40000 -> 198.19.2.11:8080 via 198.18.100.10:80 pod prod/db-0",
            "denied ingress udp 198.19.3.30:40002 -> 198.19.2.11:22 via null pod prod/db-0",
        ],
        "{out}"
    );
    assert_eq!(
        lease(&dir),
        weir_common::MonitorConfig::default(),
        "released"
    );
}
