//! The agent side of NetworkPolicy end to end: a state directory of Pods, Namespaces and
//! NetworkPolicies, read by the file source into the intent store, compiled, and (as root)
//! written to the real policy maps, with the node's POLICY flag. Every wait is bounded.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use weir_agent::compile::addr_key;
use weir_agent::intent::ObjectRef;
use weir_agent::policy::{PolicyCompiler, PolicyReconciler};
use weir_agent::source::{FileSource, IntentStore};
use weir_common::{
    node_flags, policy_direction, policy_flags, policy_rule_bits, PolicyRuleKey, PROTO_TCP,
};

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: shop}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: tools}\n";

fn pod(name: &str, namespace: &str, node: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n"
    )
}

fn pods() -> String {
    [
        pod("web", "shop", "n1", "198.18.1.1", "web"),
        pod("cart", "shop", "n2", "198.18.2.1", "cart"),
        pod("debug", "tools", "n2", "198.18.2.2", "debug"),
    ]
    .join("---\n")
}

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: cart}}}, {ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]\n    ports: [{port: http}]\n";

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A state directory with the namespaces, pods and `policy`, read into a store.
fn state_dir(policy: &str) -> (tempfile::TempDir, FileSource, IntentStore) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "namespaces.yaml", NAMESPACES);
    write(dir.path(), "pods.yaml", &pods());
    write(dir.path(), "policy.yaml", policy);
    let mut source = FileSource::new(dir.path());
    let mut store = IntentStore::default();
    let errors = source.scan_into(&mut |e| store.handle(&e));
    assert!(errors.is_empty(), "{errors:?}");
    (dir, source, store)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_state_directory_of_pods_namespaces_and_policies_compiles_to_the_expected_entries() {
    let (_dir, _source, store) = state_dir(POLICY);
    let intents = store.policy();
    assert_eq!(
        (
            intents.pods.len(),
            intents.namespaces.len(),
            intents.policies.len()
        ),
        (3, 2, 1)
    );
    let compiled = PolicyCompiler::new("n1").compile(intents);
    let state = &compiled.state;
    let web = state.endpoints[&addr_key(ip("198.18.1.1"))];
    assert_eq!(web.flags, policy_flags::INGRESS);
    assert_eq!(
        state.endpoints.len(),
        1,
        "only n1's selected pod is an endpoint"
    );
    assert_eq!(state.peers.len(), 3, "every pod of the cluster is a peer");
    assert_eq!(state.cidrs.len(), 2, "the ipBlock and its except");
    let cart = state.peers[&addr_key(ip("198.18.2.1"))];
    let block = state
        .cidrs
        .iter()
        .find(|((_, bits), _)| *bits == 32 + 24)
        .map(|(_, id)| *id)
        .unwrap();
    let rule = |identity: u32| {
        (
            PolicyRuleKey {
                endpoint_be: web.id.to_be(),
                identity_be: identity.to_be(),
                direction: policy_direction::INGRESS,
                proto: PROTO_TCP,
                port_be: 8080u16.to_be(),
            },
            policy_rule_bits::PORT,
        )
    };
    let expected: Vec<_> = [cart, block].into_iter().map(rule).collect();
    let actual: Vec<_> = state.rules.keys().copied().collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        actual, expected_sorted,
        "http resolves to web's 8080, for cart and the block"
    );
}

#[test]
fn an_invalid_policy_is_rejected_and_keeps_its_last_good_version() {
    let (dir, mut source, mut store) = state_dir(POLICY);
    let good = store.policy().clone();
    write(
        dir.path(),
        "policy.yaml",
        &POLICY.replace("203.0.113.0/24", "203.0.113.0/33"),
    );
    let started = Instant::now();
    while store.errors().next().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never rejected"
        );
        std::thread::sleep(Duration::from_millis(20));
        source.changes_into(&mut |e| store.handle(&e));
    }
    let error = store.errors().next().unwrap();
    assert_eq!(
        (error.kind, error.object.as_str()),
        ("NetworkPolicy", "shop/web")
    );
    assert_eq!(error.error.reason(), "invalid_cidr");
    assert!(error.to_string().contains("203.0.113.0/33"), "{error}");
    assert_eq!(
        store.policy(),
        &good,
        "the last good version stays in force"
    );
    // Fixed, it applies (and the rejection goes).
    write(
        dir.path(),
        "policy.yaml",
        &POLICY.replace("ports: [{port: http}]", "ports: [{port: 443}]"),
    );
    let started = Instant::now();
    while store.errors().next().is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "never fixed");
        std::thread::sleep(Duration::from_millis(20));
        source.changes_into(&mut |e| store.handle(&e));
    }
    assert_ne!(store.policy(), &good);
    let id = ObjectRef {
        namespace: "shop".into(),
        name: "web".into(),
    };
    assert!(store.policy().policies.contains_key(&id));
}

#[test]
fn the_policy_pass_writes_the_maps_and_the_node_flag_repairs_drift_and_a_restart_adopts_them() {
    common::require_root();
    let pins = common::private_bpffs(nix::sched::CloneFlags::empty());
    let (dir, mut source, mut store) = state_dir(POLICY);
    let mut dataplane = common::load_pinned(pins.path());
    let mut node_config = dataplane.node.config().unwrap();
    assert_eq!(node_config.flags & node_flags::POLICY, 0);
    let web_endpoint =
        |state: &weir_agent::policy::PolicyState| state.endpoints[&addr_key(ip("198.18.1.1"))];

    let mut policy = PolicyReconciler::new("n1", true);
    let changes = store.take_policy_changes();
    let writes = policy
        .pass(
            store.policy(),
            &changes,
            &mut dataplane.policy,
            &mut dataplane.node,
            &mut node_config,
            None,
        )
        .unwrap();
    let expected = PolicyCompiler::new("n1").compile(store.policy()).state;
    assert_eq!(
        dataplane.policy.read().unwrap(),
        expected,
        "the maps hold the compiled state"
    );
    assert_eq!(
        writes,
        expected.endpoints.len()
            + expected.peers.len()
            + expected.cidrs.len()
            + expected.rules.len()
    );
    assert_ne!(
        dataplane.node.config().unwrap().flags & node_flags::POLICY,
        0
    );

    // `dump policy`: named by the agent, and from the maps alone.
    let pin_dir = weir_agent::config::versioned_pin_dir(pins.path());
    let names = policy.names();
    let rows = weir_agent::dump::policy(&pin_dir, Some(&names)).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].pod.as_deref(), Some("shop/web"));
    assert_eq!(rows[0].isolated, ["ingress"]);
    let peers: Vec<(&str, &[String])> = rows[0]
        .ingress
        .iter()
        .map(|a| (a.peer.as_str(), a.ports.as_slice()))
        .collect();
    let http = ["tcp/8080".to_owned()];
    assert!(
        peers.contains(&("shop/app=cart +ports http/tcp/8080", &http[..])),
        "{peers:?}"
    );
    assert!(peers.contains(&("203.0.113.0/24", &http[..])), "{peers:?}");
    let bare = weir_agent::dump::policy(&pin_dir, None).unwrap();
    let table = weir_agent::dump::policy_table(&bare);
    assert!(
        table.contains("pods 198.18.2.1") && table.contains("203.0.113.0/24"),
        "{table}"
    );

    // Drift: a rule deleted and an endpoint added behind the agent's back are written back.
    let mut stray = weir_agent::policy::PolicyState::default();
    let (rule, _) = expected.rules.iter().next().unwrap();
    stray.rules = expected.rules.clone();
    stray.rules.remove(rule);
    stray.peers = expected.peers.clone();
    stray.cidrs = expected.cidrs.clone();
    stray.endpoints = expected.endpoints.clone();
    stray
        .endpoints
        .insert(addr_key(ip("198.18.9.9")), web_endpoint(&expected));
    let mut other = weir_agent::policy::PolicyMaps::open_pinned(&pin_dir).unwrap();
    other
        .apply(&weir_agent::policy::PolicyPlan::between(&expected, &stray))
        .unwrap();
    let actual = dataplane.policy.read().unwrap();
    assert_eq!(actual, stray);
    let repaired = policy
        .repair_drift(&mut dataplane.policy, &actual, None)
        .unwrap();
    assert_eq!(repaired, 2);
    assert_eq!(dataplane.policy.read().unwrap(), expected);

    // A restarted agent reads the maps and finds nothing to write.
    drop(dataplane);
    let mut dataplane = common::load_pinned(pins.path());
    let mut node_config = dataplane.node.config().unwrap();
    let mut restarted = PolicyReconciler::new("n1", true);
    let changes = store.take_policy_changes();
    let writes = restarted
        .pass(
            store.policy(),
            &changes,
            &mut dataplane.policy,
            &mut dataplane.node,
            &mut node_config,
            None,
        )
        .unwrap();
    assert_eq!(writes, 0, "the same intent over the maps it wrote");

    // The policy goes: the endpoint stops being isolated, the flag clears, the maps keep only
    // the peers.
    std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
    let started = Instant::now();
    while !store.policy().policies.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "never deleted");
        std::thread::sleep(Duration::from_millis(50));
        source.changes_into(&mut |e| store.handle(&e));
        source.rescan_if_due(Duration::from_millis(0), &mut |e| store.handle(&e));
    }
    let changes = store.take_policy_changes();
    restarted
        .pass(
            store.policy(),
            &changes,
            &mut dataplane.policy,
            &mut dataplane.node,
            &mut node_config,
            None,
        )
        .unwrap();
    let left = dataplane.policy.read().unwrap();
    assert!(left.endpoints.is_empty() && left.rules.is_empty() && left.cidrs.is_empty());
    assert_eq!(left.peers.len(), 3);
    assert_eq!(
        dataplane.node.config().unwrap().flags & node_flags::POLICY,
        0
    );
}

/// Reads the state directory's changes into the store until `done` holds (bounded).
fn sync_until(
    source: &mut FileSource,
    store: &mut IntentStore,
    done: impl Fn(&IntentStore) -> bool,
) {
    let started = Instant::now();
    while !done(store) {
        assert!(started.elapsed() < Duration::from_secs(10), "never seen");
        std::thread::sleep(Duration::from_millis(20));
        source.changes_into(&mut |e| store.handle(&e));
        source.rescan_if_due(Duration::from_millis(0), &mut |e| store.handle(&e));
    }
}

#[test]
fn incremental_passes_write_the_real_maps_as_a_compile_from_scratch_would() {
    common::require_root();
    let pins = common::private_bpffs(nix::sched::CloneFlags::empty());
    let (dir, mut source, mut store) = state_dir(POLICY);
    let mut dataplane = common::load_pinned(pins.path());
    let mut node_config = dataplane.node.config().unwrap();
    let mut policy = PolicyReconciler::new("n1", true);
    let mut pass = |store: &mut IntentStore, dataplane: &mut weir_agent::dataplane::Dataplane| {
        let changes = store.take_policy_changes();
        assert!(!changes.is_empty() || policy.needs_pass());
        let writes = policy
            .pass(
                store.policy(),
                &changes,
                &mut dataplane.policy,
                &mut dataplane.node,
                &mut node_config,
                None,
            )
            .unwrap();
        let maps = dataplane.policy.read().unwrap();
        assert_eq!(maps, policy.last().state, "{changes:?}");
        // A from-scratch compile, numbered as the maps are, finds nothing to write.
        let mut fresh = PolicyCompiler::new("n1");
        fresh.adopt(&maps);
        let scratch = fresh.compile(store.policy()).state;
        assert_eq!(scratch, maps, "{changes:?}");
        writes
    };
    assert!(pass(&mut store, &mut dataplane) > 0);

    // The peer relabelled (its old identity's rules go), another pod takes its old class.
    let relabelled = [
        pod("web", "shop", "n1", "198.18.1.1", "web"),
        pod("cart", "shop", "n2", "198.18.2.1", "cart2"),
        pod("cart-b", "shop", "n2", "198.18.2.3", "cart"),
        pod("debug", "tools", "n2", "198.18.2.2", "debug"),
    ]
    .join("---\n");
    write(dir.path(), "pods.yaml", &relabelled);
    sync_until(&mut source, &mut store, |s| s.policy().pods.len() == 4);
    assert!(pass(&mut store, &mut dataplane) > 0);

    // The policy changes its ipBlock and allows the relabelled pod too.
    let replaced = POLICY
        .replace(
            "203.0.113.0/24, except: [203.0.113.128/25]",
            "198.51.100.0/24",
        )
        .replace(
            "matchLabels: {app: cart}",
            "matchExpressions: [{key: app, operator: In, values: [cart, cart2]}]",
        );
    write(dir.path(), "policy.yaml", &replaced);
    sync_until(&mut source, &mut store, |s| {
        format!("{:?}", s.policy().policies).contains("cart2")
    });
    assert!(pass(&mut store, &mut dataplane) > 0);

    // A namespace's labels change: every pod of it changes identity.
    write(
        dir.path(),
        "namespaces.yaml",
        &NAMESPACES.replace("team: shop", "team: store"),
    );
    sync_until(&mut source, &mut store, |s| {
        s.policy().namespaces["shop"]
            .labels
            .get("team")
            .map(String::as_str)
            == Some("store")
    });
    assert!(pass(&mut store, &mut dataplane) > 0);

    // The policy goes.
    std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
    sync_until(&mut source, &mut store, |s| s.policy().policies.is_empty());
    pass(&mut store, &mut dataplane);
    let left = dataplane.policy.read().unwrap();
    assert!(left.endpoints.is_empty() && left.rules.is_empty() && left.cidrs.is_empty());
    assert_eq!(left.peers.len(), 4);
}
