//! The semantics of NetworkPolicy as the compiled maps carry them: each test decides flows
//! the way the data path does (longest matches over the compiled state) and checks the verdict.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_common::{policy_direction, policy_flags, POLICY_ANY_PEER, POLICY_CIDR_FIXED_BITS};

use super::compile::port_range_prefixes;
use super::*;
use crate::compile::addr_key;

const NODE: &str = "n1";
const TCP: u8 = 6;
const UDP: u8 = 17;

fn pod(namespace: &str, name: &str, node: &str, ip: &str, labels: &str, ports: &str) -> PodIntent {
    let yaml = format!(
        "metadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{ports}]}}]}}\n\
         status: {{phase: Running, podIPs: [{ips}]}}",
        ips = ip
            .split(',')
            .map(|ip| format!("{{ip: \"{ip}\"}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let pod: Pod = serde_yaml::from_str(&yaml).unwrap();
    PodIntent::try_from(&pod).unwrap()
}

fn namespace(name: &str, labels: &str) -> NamespaceIntent {
    let ns: Namespace =
        serde_yaml::from_str(&format!("metadata: {{name: {name}, labels: {{{labels}}}}}")).unwrap();
    NamespaceIntent::from(&ns)
}

fn policy_result(namespace: &str, name: &str, spec: &str) -> Result<PolicyIntent, PolicyError> {
    let yaml = format!("metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}");
    let policy: NetworkPolicy = serde_yaml::from_str(&yaml).unwrap();
    PolicyIntent::try_from(&policy)
}

fn policy(namespace: &str, name: &str, spec: &str) -> PolicyIntent {
    policy_result(namespace, name, spec).unwrap()
}

/// A small cluster: namespace `a` (team=a) with web pods on this node (named port http =
/// 8080 on web1, 9090 on web2) and a client; namespace `b` (team=b) with a client and a db on
/// another node.
fn cluster() -> PolicyIntents {
    let mut intents = PolicyIntents::default();
    for ns in [namespace("a", "team: a"), namespace("b", "team: b")] {
        intents.namespaces.insert(ns.name.clone(), ns);
    }
    for p in [
        pod(
            "a",
            "web1",
            NODE,
            "198.18.1.1,fd00::1:1",
            "app: web",
            "{name: http, containerPort: 8080}",
        ),
        pod(
            "a",
            "web2",
            NODE,
            "198.18.1.2",
            "app: web",
            "{name: http, containerPort: 9090}",
        ),
        pod("a", "client", "n2", "198.18.2.1", "app: client", ""),
        pod("b", "client", "n2", "198.18.2.2", "app: client", ""),
        pod(
            "b",
            "db",
            "n2",
            "198.18.2.3",
            "app: db",
            "{name: sql, containerPort: 5432}",
        ),
    ] {
        intents.pods.insert(p.id.clone(), p);
    }
    intents
}

fn with(mut intents: PolicyIntents, policies: &[PolicyIntent]) -> PolicyIntents {
    for p in policies {
        intents.policies.insert(p.id.clone(), p.clone());
    }
    intents
}

fn compiled(intents: &PolicyIntents) -> Compiled {
    PolicyCompiler::new(NODE).compile(intents)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn rule_bytes(k: &weir_common::PolicyRuleKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.endpoint_be.to_ne_bytes());
    b[4..8].copy_from_slice(&k.identity_be.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.port_be.to_ne_bytes());
    b
}

fn prefix_matches(entry: &[u8], query: &[u8], bits: u32) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    entry[..whole] == query[..whole]
        && (rest == 0 || (entry[whole] ^ query[whole]) >> (8 - rest) == 0)
}

/// The CIDR identity of an address's longest match, as the trie answers.
fn cidr_identity(state: &PolicyState, address: IpAddr) -> Option<u32> {
    let key = addr_key(address);
    state
        .cidrs
        .iter()
        .filter(|((k, bits), _)| {
            k.family == key.family
                && prefix_matches(
                    &k.addr.bytes,
                    &key.addr.bytes,
                    bits - POLICY_CIDR_FIXED_BITS,
                )
        })
        .max_by_key(|((_, bits), _)| *bits)
        .map(|(_, id)| *id)
}

fn rule_hit(
    state: &PolicyState,
    endpoint: u32,
    direction: u8,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let mut identities = vec![POLICY_ANY_PEER];
    identities.extend(state.peers.get(&addr_key(peer)));
    identities.extend(cidr_identity(state, peer));
    identities.into_iter().any(|identity| {
        let query = rule_bytes(&weir_common::PolicyRuleKey {
            endpoint_be: endpoint.to_be(),
            identity_be: identity.to_be(),
            direction,
            proto,
            port_be: port.to_be(),
        });
        state
            .rules
            .keys()
            .any(|(k, bits)| prefix_matches(&rule_bytes(k), &query, *bits))
    })
}

/// The data path's verdict on a new flow.
fn allowed(state: &PolicyState, src: &str, dst: &str, proto: u8, port: u16) -> bool {
    let (src, dst) = (ip(src), ip(dst));
    let egress_ok = match state.endpoints.get(&addr_key(src)) {
        Some(e) if e.flags & policy_flags::EGRESS != 0 => {
            rule_hit(state, e.id, policy_direction::EGRESS, dst, proto, port)
        }
        _ => true,
    };
    let ingress_ok = match state.endpoints.get(&addr_key(dst)) {
        Some(e) if e.flags & policy_flags::INGRESS != 0 => {
            rule_hit(state, e.id, policy_direction::INGRESS, src, proto, port)
        }
        _ => true,
    };
    egress_ok && ingress_ok
}

const WEB: &str = "  podSelector: {matchLabels: {app: web}}\n";

#[test]
fn no_policy_isolates_nothing() {
    let c = compiled(&cluster());
    assert!(c.state.endpoints.is_empty() && c.state.rules.is_empty());
    assert_eq!(c.state.peers.len(), 6, "every pod address is a peer");
    assert!(allowed(&c.state, "198.18.2.2", "198.18.1.1", TCP, 80));
}

#[test]
fn an_empty_ingress_rule_list_denies_all_ingress_and_leaves_egress_open() {
    let p = policy("a", "deny", &format!("{WEB}  policyTypes: [Ingress]\n"));
    let c = compiled(&with(cluster(), &[p]));
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 80));
    assert!(!allowed(&c.state, "203.0.113.9", "fd00::1:1", UDP, 53));
    assert!(
        allowed(&c.state, "198.18.1.1", "198.18.2.1", TCP, 80),
        "egress not isolated"
    );
    let e = c.state.endpoints[&addr_key(ip("198.18.1.1"))];
    assert_eq!(e.flags, policy_flags::INGRESS);
    assert_eq!(
        c.state.endpoints[&addr_key(ip("fd00::1:1"))],
        e,
        "both addresses of a pod are one endpoint"
    );
    assert_eq!(c.report.isolated_endpoints, 2);
}

#[test]
fn egress_only_policy_isolates_egress_only() {
    let p = policy("a", "deny-out", &format!("{WEB}  policyTypes: [Egress]\n"));
    let c = compiled(&with(cluster(), &[p]));
    assert!(!allowed(&c.state, "198.18.1.1", "198.18.2.1", TCP, 80));
    assert!(allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 80));
}

#[test]
fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
    let p = policy(
        "a",
        "p",
        &format!("{WEB}  egress: [{{ports: [{{port: 53, protocol: UDP}}]}}]\n"),
    );
    assert!(p.ingress == Some(vec![]) && p.egress.is_some());
    let c = compiled(&with(cluster(), &[p]));
    assert!(
        !allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 80),
        "ingress isolated, no rules"
    );
    assert!(allowed(&c.state, "198.18.1.1", "198.18.2.9", UDP, 53));
    assert!(!allowed(&c.state, "198.18.1.1", "198.18.2.9", TCP, 53));
    let empty = policy("a", "q", &format!("{WEB}  egress: []\n"));
    assert!(
        empty.egress.is_none(),
        "an empty egress list does not isolate egress"
    );
    let no_types = policy("a", "r", &format!("{WEB}  policyTypes: []\n"));
    assert!(
        no_types.ingress.is_some() && no_types.egress.is_none(),
        "an empty policyTypes defaults as a missing one"
    );
}

#[test]
fn allowed_traffic_is_the_union_of_the_policies_selecting_the_pod() {
    let one = policy(
        "a",
        "one",
        &format!("{WEB}  ingress: [{{ports: [{{port: 80}}]}}]\n"),
    );
    let two = policy(
        "a",
        "two",
        &format!("{WEB}  ingress: [{{ports: [{{port: 443}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[one, two]));
    for port in [80, 443] {
        assert!(allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, port));
    }
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 8443));
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", UDP, 80));
}

#[test]
fn the_empty_pod_selector_selects_every_pod_of_its_own_namespace_only() {
    let p = policy("a", "all", "  podSelector: {}\n  policyTypes: [Ingress]\n");
    let c = compiled(&with(cluster(), &[p]));
    assert_eq!(
        c.report.isolated_endpoints, 2,
        "the web pods are this node's pods of a"
    );
    let q = policy("b", "all", "  podSelector: {}\n  policyTypes: [Ingress]\n");
    let c = compiled(&with(cluster(), &[q]));
    assert!(
        c.state.endpoints.is_empty(),
        "b's pods live on another node"
    );
}

#[test]
fn an_empty_from_list_and_a_missing_from_both_allow_every_address() {
    for rule in ["{}", "{from: []}", "{from: [], ports: []}"] {
        let p = policy("a", "open", &format!("{WEB}  ingress: [{rule}]\n"));
        let c = compiled(&with(cluster(), &[p]));
        assert!(
            allowed(&c.state, "203.0.113.7", "198.18.1.1", UDP, 9),
            "{rule}"
        );
        assert!(
            allowed(&c.state, "198.18.2.3", "198.18.1.2", TCP, 1),
            "{rule}"
        );
    }
}

#[test]
fn namespace_and_pod_selector_in_one_peer_mean_both_and_in_two_peers_either() {
    let both = policy(
        "a",
        "both",
        &format!("{WEB}  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: b}}}}, podSelector: {{matchLabels: {{app: client}}}}}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[both]));
    assert!(
        allowed(&c.state, "198.18.2.2", "198.18.1.1", TCP, 80),
        "b/client"
    );
    assert!(
        !allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 80),
        "a/client: not in b"
    );
    assert!(
        !allowed(&c.state, "198.18.2.3", "198.18.1.1", TCP, 80),
        "b/db: not a client"
    );

    let either = policy(
        "a",
        "either",
        &format!("{WEB}  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: b}}}}}}, {{podSelector: {{matchLabels: {{app: client}}}}}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[either]));
    for client in ["198.18.2.1", "198.18.2.2", "198.18.2.3"] {
        assert!(allowed(&c.state, client, "198.18.1.1", TCP, 80), "{client}");
    }
    assert!(!allowed(&c.state, "203.0.113.1", "198.18.1.1", TCP, 80));
}

#[test]
fn match_expressions_select_with_every_operator() {
    let p = policy(
        "a",
        "expr",
        &format!("{WEB}  ingress: [{{from: [{{namespaceSelector: {{matchExpressions: [{{key: team, operator: NotIn, values: [a]}}, {{key: team, operator: Exists}}]}}, podSelector: {{matchExpressions: [{{key: app, operator: In, values: [client, x]}}, {{key: tier, operator: DoesNotExist}}]}}}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(allowed(&c.state, "198.18.2.2", "198.18.1.1", TCP, 80));
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 80));
    assert!(!allowed(&c.state, "198.18.2.3", "198.18.1.1", TCP, 80));
}

#[test]
fn ip_blocks_with_nested_excepts_decide_by_the_most_specific_prefix() {
    let outer = policy(
        "a",
        "outer",
        &format!("{WEB}  ingress: [{{from: [{{ipBlock: {{cidr: 203.0.0.0/16, except: [203.0.1.0/24]}}}}]}}]\n"),
    );
    // Another policy allows part of the hole: the union applies.
    let inner = policy(
        "a",
        "inner",
        &format!("{WEB}  ingress: [{{from: [{{ipBlock: {{cidr: 203.0.1.128/25}}}}], ports: [{{port: 22}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[outer.clone(), inner]));
    let s = &c.state;
    assert!(allowed(s, "203.0.2.1", "198.18.1.1", TCP, 80));
    assert!(
        !allowed(s, "203.0.1.5", "198.18.1.1", TCP, 80),
        "in the except"
    );
    assert!(
        !allowed(s, "203.0.1.130", "198.18.1.1", TCP, 80),
        "the inner block allows 22 only"
    );
    assert!(allowed(s, "203.0.1.130", "198.18.1.1", TCP, 22));
    assert!(!allowed(s, "203.0.1.5", "198.18.1.1", TCP, 22));
    assert!(
        !allowed(s, "203.1.0.1", "198.18.1.1", TCP, 80),
        "outside the cidr"
    );
    // Without the inner policy its prefix is not written, and the outer one still holds.
    let c = compiled(&with(cluster(), &[outer]));
    assert_eq!(c.state.cidrs.len(), 2);
    assert!(!allowed(&c.state, "203.0.1.130", "198.18.1.1", TCP, 22));
}

#[test]
fn ipv6_ip_blocks_with_excepts() {
    let p = policy(
        "a",
        "v6",
        &format!("{WEB}  egress: [{{to: [{{ipBlock: {{cidr: \"2001:db8::/32\", except: [\"2001:db8:1::/48\"]}}}}]}}]\n  policyTypes: [Egress]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(allowed(&c.state, "fd00::1:1", "2001:db8:2::1", TCP, 443));
    assert!(!allowed(&c.state, "fd00::1:1", "2001:db8:1::1", TCP, 443));
    assert!(!allowed(&c.state, "fd00::1:1", "2001:db9::1", TCP, 443));
    assert!(
        !allowed(&c.state, "198.18.1.1", "203.0.113.1", TCP, 443),
        "no IPv4 allowed"
    );
}

#[test]
fn a_pod_inside_an_ip_block_is_allowed_by_it() {
    let p = policy(
        "a",
        "block",
        &format!("{WEB}  ingress: [{{from: [{{ipBlock: {{cidr: 198.18.2.0/30}}}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(allowed(&c.state, "198.18.2.2", "198.18.1.1", TCP, 80));
    assert!(!allowed(&c.state, "198.18.2.9", "198.18.1.1", TCP, 80));
}

#[test]
fn ingress_named_ports_resolve_on_each_destination_pod() {
    let p = policy(
        "a",
        "named",
        &format!("{WEB}  ingress: [{{ports: [{{port: http}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 8080));
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 9090));
    assert!(allowed(&c.state, "198.18.2.1", "198.18.1.2", TCP, 9090));
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.2", TCP, 8080));
    assert!(
        !allowed(&c.state, "198.18.2.1", "198.18.1.2", UDP, 9090),
        "the name is TCP's"
    );
}

#[test]
fn egress_named_ports_resolve_on_each_peer_pod_and_match_no_other_address() {
    let p = policy(
        "a",
        "named-out",
        &format!("{WEB}  policyTypes: [Egress]\n  egress: [{{ports: [{{port: sql}}]}}, {{to: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}], ports: [{{port: http}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(
        allowed(&c.state, "198.18.1.1", "198.18.2.3", TCP, 5432),
        "the db defines sql"
    );
    assert!(
        !allowed(&c.state, "198.18.1.1", "198.18.2.2", TCP, 5432),
        "the client does not"
    );
    assert!(!allowed(&c.state, "198.18.1.1", "203.0.113.1", TCP, 5432));
    assert!(
        !allowed(&c.state, "198.18.1.1", "203.0.113.1", TCP, 8080),
        "no pod: no http"
    );
}

#[test]
fn a_named_port_no_pod_defines_matches_nothing() {
    let p = policy(
        "a",
        "named",
        &format!("{WEB}  ingress: [{{ports: [{{port: nope}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert!(c.state.rules.is_empty());
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 8080));
}

#[test]
fn pods_with_different_named_ports_get_different_identities() {
    let c = compiled(&cluster());
    let web1 = c.state.peers[&addr_key(ip("198.18.1.1"))];
    let web2 = c.state.peers[&addr_key(ip("198.18.1.2"))];
    assert_ne!(web1, web2);
    let mut same = cluster();
    let twin = pod(
        "a",
        "web3",
        "n2",
        "198.18.3.1",
        "app: web",
        "{name: http, containerPort: 8080}",
    );
    same.pods.insert(twin.id.clone(), twin);
    let c = compiled(&same);
    assert_eq!(
        c.state.peers[&addr_key(ip("198.18.3.1"))],
        web1,
        "same class, same identity"
    );
}

#[test]
fn end_port_ranges_allow_exactly_the_range() {
    let p = policy(
        "a",
        "range",
        &format!("{WEB}  ingress: [{{ports: [{{port: 1000, endPort: 1999}}, {{port: 53, protocol: UDP}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    for port in [999, 1000, 1500, 1999, 2000] {
        assert_eq!(
            allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, port),
            (1000..=1999).contains(&port),
            "{port}"
        );
    }
    assert!(allowed(&c.state, "198.18.2.1", "198.18.1.1", UDP, 53));
}

#[test]
fn port_range_prefixes_cover_exactly_the_range_and_no_more() {
    for (first, last) in [
        (1, 65535),
        (1000, 1999),
        (80, 80),
        (1, 1),
        (65535, 65535),
        (32767, 32769),
        (6000, 6063),
    ] {
        let prefixes = port_range_prefixes(first, last);
        let mut covered = vec![false; 65536];
        for (port, bits) in &prefixes {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(*port) % size, 0, "aligned");
            for p in u32::from(*port)..u32::from(*port) + size {
                assert!(!covered[p as usize], "{first}-{last}: overlap at {p}");
                covered[p as usize] = true;
            }
        }
        for (p, c) in covered.iter().enumerate() {
            assert_eq!(
                *c,
                (usize::from(first)..=usize::from(last)).contains(&p),
                "{first}-{last}: {p}"
            );
        }
        // Minimal: no two prefixes merge into one aligned block.
        assert!(
            prefixes.len() <= 2 * 16,
            "{first}-{last}: {}",
            prefixes.len()
        );
    }
    assert_eq!(
        port_range_prefixes(6000, 6063),
        vec![(6000, 12), (6016, 11), (6048, 12)]
    );
}

#[test]
fn sctp_ports_match_nothing() {
    let p = policy(
        "a",
        "sctp",
        &format!("{WEB}  ingress: [{{ports: [{{port: 9, protocol: SCTP}}]}}]\n"),
    );
    let c = compiled(&with(cluster(), &[p]));
    assert_eq!(c.report.sctp_ports, 1);
    assert!(
        c.state.rules.is_empty(),
        "the pod stays isolated, nothing allowed"
    );
    assert!(!allowed(&c.state, "198.18.2.1", "198.18.1.1", TCP, 9));
}

#[test]
fn invalid_policies_are_refused_with_their_reason() {
    let cases = [
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
            "invalid_cidr",
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n",
            "except_outside_cidr",
        ),
        (
            "  ingress: [{ports: [{port: 80, protocol: ICMP}]}]\n",
            "unknown_protocol",
        ),
        ("  ingress: [{ports: [{port: 70000}]}]\n", "invalid_port"),
        (
            "  ingress: [{ports: [{endPort: 90}]}]\n",
            "invalid_end_port",
        ),
        (
            "  ingress: [{ports: [{port: http, endPort: 90}]}]\n",
            "invalid_end_port",
        ),
        (
            "  ingress: [{ports: [{port: 100, endPort: 90}]}]\n",
            "invalid_end_port",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: Like}]}\n",
            "invalid_selector",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
            "invalid_selector",
        ),
        ("  policyTypes: [Sideways]\n", "invalid_policy_type"),
    ];
    for (spec, reason) in cases {
        let error = policy_result("a", "bad", spec).unwrap_err();
        assert_eq!(error.reason(), reason, "{spec}: {error}");
    }
}

#[test]
fn terminated_and_host_network_pods_take_no_part() {
    let mut p = pod("a", "done", NODE, "198.18.9.9", "app: web", "");
    assert!(!p.addresses.is_empty());
    let done: Pod = serde_yaml::from_str(
        "metadata: {name: done, namespace: a}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Succeeded, podIP: 198.18.9.9}",
    )
    .unwrap();
    p = PodIntent::try_from(&done).unwrap();
    assert!(p.addresses.is_empty());
    let host: Pod = serde_yaml::from_str(
        "metadata: {name: h, namespace: a}\nspec: {nodeName: n1, hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 198.18.0.10}",
    )
    .unwrap();
    assert!(PodIntent::try_from(&host).unwrap().addresses.is_empty());
}

#[test]
fn recompiling_the_same_intent_writes_nothing() {
    let p = policy(
        "a",
        "mix",
        &format!("{WEB}  ingress: [{{from: [{{podSelector: {{}}}}, {{ipBlock: {{cidr: 203.0.0.0/8}}}}], ports: [{{port: http}}, {{port: 1, endPort: 1024}}]}}]\n"),
    );
    let intents = with(cluster(), &[p]);
    let mut compiler = PolicyCompiler::new(NODE);
    let first = compiler.compile(&intents);
    let second = compiler.compile(&intents);
    assert!(PolicyPlan::between(&first.state, &second.state).is_empty());
    let empty = PolicyPlan::between(&PolicyState::default(), &first.state);
    assert_eq!(
        empty.writes(),
        first.state.rules.len()
            + first.state.cidrs.len()
            + first.state.peers.len()
            + first.state.endpoints.len()
    );
}

#[test]
fn identities_stay_with_their_pods_when_others_come_and_go() {
    let mut intents = cluster();
    let mut compiler = PolicyCompiler::new(NODE);
    let before = compiler.compile(&intents);
    intents.pods.remove(&crate::intent::ObjectRef {
        namespace: "a".into(),
        name: "client".into(),
    });
    let extra = pod("b", "new", "n2", "198.18.4.4", "app: new", "");
    intents.pods.insert(extra.id.clone(), extra);
    let after = compiler.compile(&intents);
    for address in ["198.18.1.1", "198.18.1.2", "198.18.2.2", "198.18.2.3"] {
        let key = addr_key(ip(address));
        assert_eq!(
            before.state.peers[&key], after.state.peers[&key],
            "{address}"
        );
    }
    let freed = before.state.peers[&addr_key(ip("198.18.2.1"))];
    assert_ne!(
        after.state.peers[&addr_key(ip("198.18.4.4"))],
        freed,
        "not reused at once"
    );
}

#[test]
fn a_restarted_compiler_adopting_the_maps_numbers_as_they_do() {
    let p = policy(
        "a",
        "mix",
        &format!("{WEB}  ingress: [{{from: [{{podSelector: {{}}}}, {{ipBlock: {{cidr: 203.0.0.0/8, except: [203.0.1.0/24]}}}}]}}]\n"),
    );
    let mut intents = with(cluster(), &[p]);
    // An agent with a history: pods came and went, so its numbering is not a fresh one's.
    let mut old = PolicyCompiler::new(NODE);
    old.compile(&intents);
    intents.pods.remove(&crate::intent::ObjectRef {
        namespace: "a".into(),
        name: "client".into(),
    });
    let late = pod("b", "late", "n2", "198.18.4.4", "app: late", "");
    intents.pods.insert(late.id.clone(), late);
    old.compile(&intents);
    let maps = old.compile(&intents).state;

    let fresh = PolicyCompiler::new(NODE).compile(&intents).state;
    assert_ne!(
        fresh, maps,
        "a fresh numbering differs: the test shows something"
    );
    let mut restarted = PolicyCompiler::new(NODE);
    restarted.adopt(&maps);
    let adopted = restarted.compile(&intents).state;
    assert!(PolicyPlan::between(&maps, &adopted).is_empty());
    // New ids after adoption do not collide with adopted ones.
    let newer = pod("b", "newer", "n2", "198.18.4.5", "app: newer", "");
    intents.pods.insert(newer.id.clone(), newer);
    let next = restarted.compile(&intents).state;
    let id = next.peers[&addr_key(ip("198.18.4.5"))];
    assert!(maps
        .peers
        .values()
        .chain(maps.cidrs.values())
        .all(|v| *v != id));
}

#[test]
fn a_label_change_writes_the_new_rules_before_moving_the_pod_and_deletes_the_old_after() {
    let p = policy(
        "a",
        "from-clients",
        &format!("{WEB}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: app, operator: Exists}}]}}, namespaceSelector: {{}}}}]}}]\n"),
    );
    let mut intents = with(cluster(), &[p]);
    let mut compiler = PolicyCompiler::new(NODE);
    let before = compiler.compile(&intents);
    let client = crate::intent::ObjectRef {
        namespace: "b".into(),
        name: "client".into(),
    };
    intents
        .pods
        .get_mut(&client)
        .unwrap()
        .labels
        .insert("app".into(), "client2".into());
    let after = compiler.compile(&intents);
    let plan = PolicyPlan::between(&before.state, &after.state);
    let old = before.state.peers[&addr_key(ip("198.18.2.2"))];
    let new = after.state.peers[&addr_key(ip("198.18.2.2"))];
    assert_ne!(old, new);
    assert!(plan
        .upsert_rules
        .iter()
        .all(|((k, _), _)| u32::from_be(k.identity_be) == new));
    assert!(!plan.upsert_rules.is_empty());
    assert_eq!(plan.upsert_peers, vec![(addr_key(ip("198.18.2.2")), new)]);
    assert!(plan
        .delete_rules
        .iter()
        .all(|(k, _)| u32::from_be(k.identity_be) == old));
    assert!(!plan.delete_rules.is_empty());
    let order: Vec<String> = plan
        .steps()
        .iter()
        .map(|s| format!("{s:?}").split('(').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        order,
        [
            "UpsertRules",
            "UpsertCidrs",
            "UpsertPeers",
            "UpsertEndpoints",
            "DeleteEndpoints",
            "DeletePeers",
            "DeleteCidrs",
            "DeleteRules"
        ]
    );
}

#[test]
fn a_policy_selecting_no_local_pod_writes_no_rules() {
    let p = policy(
        "b",
        "db",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n",
    );
    let c = compiled(&with(cluster(), &[p]));
    assert_eq!(c.report.policies, 0);
    assert!(c.state.endpoints.is_empty() && c.state.rules.is_empty());
}

/// A small seeded generator (xorshift64*): the property test's sequences repeat exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAMESPACES: usize = 4;
const PODS: usize = 16;
const POLICIES: usize = 8;

/// Policies the property test draws from: every kind of peer, port and isolation, selectors
/// that a label change moves pods in and out of, ipBlocks whose prefixes nest across policies.
const SPECS: [&str; 13] = [
    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}, {port: 80}]}]\n",
    "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    "  podSelector: {matchExpressions: [{key: tier, operator: In, values: [x]}]}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchExpressions: [{key: app, operator: Exists}]}}]}]\n",
    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.0.0/16, except: [203.0.1.0/24]}}]}]\n",
    "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.1.128/25}}, {ipBlock: {cidr: 198.18.0.0/28}}], ports: [{port: 22}, {port: 1000, endPort: 1100}]}]\n",
    "  podSelector: {matchLabels: {app: db}}\n  egress: [{ports: [{port: sql}, {port: http, protocol: TCP}]}]\n  policyTypes: [Egress]\n",
    "  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}\n  egress: [{to: [{podSelector: {matchLabels: {tier: y}}, namespaceSelector: {}}], ports: [{port: http}]}, {to: [{ipBlock: {cidr: 203.0.0.0/8, except: [203.0.0.0/16]}}]}]\n",
    "  podSelector: {matchLabels: {tier: y}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [b]}]}}], ports: [{port: 53, protocol: UDP}, {port: 5000, protocol: SCTP}]}]\n",
    "  podSelector: {matchLabels: {app: client}}\n  ingress: []\n  policyTypes: [Ingress]\n",
    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {}}]}]\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: \"fd00::/8\", except: [\"fd00:1::/32\"]}}]}]\n  policyTypes: [Egress]\n",
    "  podSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}\n  ingress: [{}]\n",
    "  podSelector: {matchLabels: {tier: x}}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.2.0/24}}, {ipBlock: {cidr: 203.0.0.0/8, except: [203.0.1.0/25]}}], ports: [{port: 443}]}]\n",
];

/// A random version of pod `i`: labels, node, named ports and addresses (sometimes none,
/// sometimes one another pod has too).
fn random_pod(rng: &mut Rng, i: usize) -> PodIntent {
    let mut labels = intent::Labels::new();
    let app = rng.pick(&["web", "db", "client", ""]);
    if !app.is_empty() {
        labels.insert("app".into(), app.into());
    }
    labels.insert("tier".into(), rng.pick(&["x", "y"]).into());
    let mut named_ports = std::collections::BTreeSet::new();
    for (name, port) in [("http", 8080), ("http", 9090), ("sql", 5432)] {
        if rng.below(3) == 0 {
            named_ports.insert(intent::NamedPort {
                name: name.into(),
                protocol: intent::PolicyProtocol::Tcp,
                port,
            });
        }
    }
    let host = if rng.below(8) == 0 {
        rng.below(PODS)
    } else {
        i
    };
    let addresses = match rng.below(6) {
        0 => Vec::new(),
        1 => vec![
            ip(&format!("198.18.0.{host}")),
            ip(&format!("fd00::{host}")),
        ],
        _ => vec![ip(&format!("198.18.0.{host}"))],
    };
    PodIntent {
        id: crate::intent::ObjectRef {
            namespace: format!("ns{}", i % NAMESPACES),
            name: format!("p{i}"),
        },
        node: rng.pick(&[NODE, NODE, "n2"]).into(),
        labels,
        addresses,
        named_ports,
    }
}

/// One random change to `intents`, recorded in `changes`.
fn random_change(rng: &mut Rng, intents: &mut PolicyIntents, changes: &mut PolicyChanges) {
    match rng.below(10) {
        0..=3 => {
            let i = rng.below(PODS);
            let p = random_pod(rng, i);
            changes.pods.insert(p.id.clone());
            intents.pods.insert(p.id.clone(), p);
        }
        4 => {
            let i = rng.below(PODS);
            let id = crate::intent::ObjectRef {
                namespace: format!("ns{}", i % NAMESPACES),
                name: format!("p{i}"),
            };
            intents.pods.remove(&id);
            changes.pods.insert(id);
        }
        5 => {
            let name = format!("ns{}", rng.below(NAMESPACES));
            if rng.below(4) == 0 {
                intents.namespaces.remove(&name);
            } else {
                let team = rng.pick(&["a", "b", "c"]);
                let ns = namespace(&name, &format!("team: {team}"));
                intents.namespaces.insert(name.clone(), ns);
            }
            changes.namespaces.insert(name);
        }
        6..=8 => {
            let namespace = format!("ns{}", rng.below(NAMESPACES));
            let name = format!("pol{}", rng.below(POLICIES));
            let p = policy(&namespace, &name, SPECS[rng.below(SPECS.len())]);
            changes.policies.insert(p.id.clone());
            intents.policies.insert(p.id.clone(), p);
        }
        _ => {
            let i = rng.below(POLICIES);
            let id = crate::intent::ObjectRef {
                namespace: format!("ns{}", i % NAMESPACES),
                name: format!("pol{i}"),
            };
            intents.policies.remove(&id);
            changes.policies.insert(id);
        }
    }
}

/// What the maps hold with every id replaced by what it stands for, so that two compilers
/// with different histories (and numberings) compare.
type Canonical = (
    BTreeMap<weir_common::HostAddrKey, String>,
    BTreeMap<weir_common::HostAddrKey, (String, u8)>,
    BTreeMap<state::CidrPrefix, String>,
    std::collections::BTreeSet<(String, String, u8, u8, u16, u32)>,
);

fn canonical(compiler: &PolicyCompiler) -> Canonical {
    let names = compiler.names();
    let state = &compiler.compiled().state;
    let identity = |id: u32| match id {
        POLICY_ANY_PEER => "any".to_owned(),
        id => names.identities[&id].clone(),
    };
    let peers = (state.peers.iter())
        .map(|(k, id)| (*k, identity(*id)))
        .collect();
    let endpoints = (state.endpoints.iter())
        .map(|(k, e)| (*k, (names.endpoints[&e.id].clone(), e.flags)))
        .collect();
    let cidrs = (state.cidrs.iter())
        .map(|(k, id)| (*k, identity(*id)))
        .collect();
    let rules = (state.rules.keys())
        .map(|(k, bits)| {
            let endpoint = names.endpoints[&u32::from_be(k.endpoint_be)].clone();
            let peer = identity(u32::from_be(k.identity_be));
            (
                endpoint,
                peer,
                k.direction,
                k.proto,
                u16::from_be(k.port_be),
                *bits,
            )
        })
        .collect();
    (peers, endpoints, cidrs, rules)
}

/// The identity and endpoint ids the maps use.
fn ids_in(state: &PolicyState) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let rules = state.rules.keys().map(|(k, _)| k);
    let identities = (state.peers.values().chain(state.cidrs.values()).copied())
        .chain(rules.clone().map(|k| u32::from_be(k.identity_be)))
        .filter(|id| *id != POLICY_ANY_PEER);
    let endpoints =
        (state.endpoints.values().map(|e| e.id)).chain(rules.map(|k| u32::from_be(k.endpoint_be)));
    (identities.collect(), endpoints.collect())
}

/// What the maps hold after `plan` is written to maps holding `maps`; every write of the plan
/// changes something.
fn written(maps: &mut PolicyState, plan: &PolicyPlan) {
    fn upsert<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy + std::fmt::Debug>(
        map: &mut BTreeMap<K, V>,
        entries: &[(K, V)],
    ) {
        for (key, value) in entries {
            assert_ne!(
                map.insert(*key, *value),
                Some(*value),
                "a needless write {key:?}"
            );
        }
    }
    fn delete<K: Ord + std::fmt::Debug, V>(map: &mut BTreeMap<K, V>, keys: &[K]) {
        for key in keys {
            assert!(map.remove(key).is_some(), "a needless delete {key:?}");
        }
    }
    upsert(&mut maps.rules, &plan.upsert_rules);
    upsert(&mut maps.cidrs, &plan.upsert_cidrs);
    upsert(&mut maps.peers, &plan.upsert_peers);
    upsert(&mut maps.endpoints, &plan.upsert_endpoints);
    delete(&mut maps.endpoints, &plan.delete_endpoints);
    delete(&mut maps.peers, &plan.delete_peers);
    delete(&mut maps.cidrs, &plan.delete_cidrs);
    delete(&mut maps.rules, &plan.delete_rules);
}

/// The incremental compile against compiles from scratch: seeded sequences of pod, namespace
/// and policy changes (one to three per pass), each pass's plan written to simulated maps.
/// After every pass the maps hold exactly the compiled state, which equals a fresh compile of
/// the same intent (ids named by what they stand for), with the same counts; now and then a
/// full recompile over the same compiler finds nothing to write (ids stayed put). An id the
/// maps use before and after a pass means the same thing in both (a freed id is never reused
/// by the plan that deletes its entries).
#[test]
fn incremental_passes_equal_a_compile_from_scratch_after_every_change() {
    const SEEDS: u64 = 12;
    const PASSES: usize = 150;
    for seed in 1..=SEEDS {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut intents = PolicyIntents::default();
        let mut compiler = PolicyCompiler::new(NODE);
        let mut maps = PolicyState::default();
        written(
            &mut maps,
            &compiler.update(&intents, &PolicyChanges::everything()),
        );
        for pass in 0..PASSES {
            let mut changes = PolicyChanges::default();
            for _ in 0..=rng.below(3) {
                random_change(&mut rng, &mut intents, &mut changes);
            }
            let (names_before, ids_before) = (compiler.names(), ids_in(&maps));
            let plan = compiler.update(&intents, &changes);
            written(&mut maps, &plan);
            let context = format!("seed {seed}, pass {pass}, changes {changes:?}");
            let (names_after, ids_after) = (compiler.names(), ids_in(&maps));
            for id in ids_before.0.intersection(&ids_after.0) {
                let (before, after) = (&names_before.identities, &names_after.identities);
                assert_eq!(before.get(id), after.get(id), "identity {id}: {context}");
            }
            for id in ids_before.1.intersection(&ids_after.1) {
                let (before, after) = (&names_before.endpoints, &names_after.endpoints);
                assert_eq!(before.get(id), after.get(id), "endpoint {id}: {context}");
            }
            assert_eq!(maps, compiler.compiled().state, "{context}");
            let mut fresh = PolicyCompiler::new(NODE);
            fresh.compile(&intents);
            assert_eq!(canonical(&compiler), canonical(&fresh), "{context}");
            assert_eq!(
                compiler.compiled().report,
                fresh.compiled().report,
                "{context}"
            );
            if pass % 25 == 24 {
                let full = compiler.update(&intents, &PolicyChanges::everything());
                assert!(full.is_empty(), "{context}: {full:?}");
            }
        }
    }
}
