//! Incremental sync through the real pipeline and the real program: an update of one service
//! recompiles that service alone, writes only its entries, and leaves every other service's
//! ids, slots and established flows exactly as they were; a full resync over an unchanged state
//! writes nothing. And a full conntrack map keeps taking new flows, its evictions counted.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::*;
use weir_agent::conntrack::{entries_created, EvictionEstimate};
use weir_agent::dataplane::{Dataplane, LoadOptions};
use weir_agent::reconcile::Reconciler;
use weir_agent::source::{ObjectEvent, ObjectKey, SourceObject};
use weir_agent::state::DataplaneState;
use weir_common::map_names;

const SERVICES: u8 = 40;

fn vip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 101, i)
}

fn backend(service: u8, j: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 10 + service / 50, (service % 50) * 4 + j)
}

fn service_yaml(i: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
         spec: {{clusterIP: {}, ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]}}\n",
        vip(i)
    )
}

fn slice_yaml(i: u8, backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

fn cluster(changed: Option<(u8, Vec<Ipv4Addr>)>) -> String {
    (0..SERVICES)
        .map(|i| {
            let backends = match &changed {
                Some((c, b)) if *c == i => b.clone(),
                _ => vec![backend(i, 0), backend(i, 1)],
            };
            format!("{}---\n{}---\n", service_yaml(i), slice_yaml(i, &backends))
        })
        .collect()
}

fn one_slice(i: u8, backends: &[Ipv4Addr]) -> SourceObject {
    let slices = objects(&slice_yaml(i, backends)).slices;
    SourceObject::EndpointSlice(Box::new(slices[0].clone()))
}

/// The service id and slots of the frontend `vip:80`.
fn entries_of(state: &DataplaneState, vip: Ipv4Addr) -> (u32, Vec<u32>) {
    let (addr, family) = weir_agent::compile::addr_of(vip.into());
    let (_, value) = state
        .services
        .iter()
        .find(|(k, _)| k.addr == addr && k.family == family)
        .expect("frontend present");
    let slots = state
        .slots
        .iter()
        .filter(|(k, _)| k.service_id == value.service_id)
        .map(|(_, b)| *b)
        .collect();
    (value.service_id, slots)
}

#[test]
fn one_service_changes_alone_and_other_flows_keep_their_backends() {
    let mut h = Harness::new(&[]);
    h.reconciler = Reconciler::default();
    let full = h
        .reconciler
        .reconcile(&mut h.dataplane.services, &objects(&cluster(None)))
        .expect("full sync");
    assert_eq!(
        full.services, SERVICES as usize,
        "a snapshot replaces the harness's services"
    );

    // An established flow to every other service.
    let mut chosen = Vec::new();
    for i in 1..SERVICES {
        let (_, out) = h.run(&tcp(CLIENT, 41000 + i as u16, vip(i), 80, "S"));
        chosen.push(out[30..34].to_vec());
    }
    let before = h.dataplane.services.read().unwrap();

    // Service 0 loses a backend and gains two: one event, one service recompiled.
    let update = vec![backend(0, 1), backend(0, 2), backend(0, 3)];
    let report = h
        .reconciler
        .apply_events(
            &mut h.dataplane.services,
            &[ObjectEvent::Apply(one_slice(0, &update))],
        )
        .expect("update");
    assert_eq!(
        report.recompiled, 1,
        "only the changed service is recompiled"
    );
    // Two new backends, their two slots (one fills the hole, one appends), the count.
    assert_eq!(report.writes, 2 + 2 + 1 + 1, "{report:?}");
    let after = h.dataplane.services.read().unwrap();
    for i in 1..SERVICES {
        assert_eq!(
            entries_of(&before, vip(i)),
            entries_of(&after, vip(i)),
            "service {i}: same id, same slots"
        );
    }
    let (_, slots) = entries_of(&after, vip(0));
    assert_eq!(slots.len(), 3);
    let backends: BTreeSet<Ipv4Addr> = slots
        .iter()
        .map(|id| {
            let b = after.backends[id];
            Ipv4Addr::from(b.addr.v4_octets())
        })
        .collect();
    assert_eq!(backends, update.iter().copied().collect());

    // Every other service's flow continues on its backend, from conntrack.
    let hits = h.counter("ct_forward_hit");
    for i in 1..SERVICES {
        let (_, out) = h.run(&tcp(CLIENT, 41000 + i as u16, vip(i), 80, "A"));
        assert_eq!(
            out[30..34],
            chosen[i as usize - 1][..],
            "service {i}'s flow"
        );
    }
    assert_eq!(h.counter("ct_forward_hit"), hits + SERVICES as u64 - 1);

    // A full resync of the same state (a relist) writes nothing.
    let resync = h
        .reconciler
        .reconcile(
            &mut h.dataplane.services,
            &objects(&cluster(Some((0, update.clone())))),
        )
        .expect("resync");
    assert_eq!(resync.writes, 0, "{resync:?}");
    assert_eq!(resync.recompiled, 0, "nothing changed, nothing recompiled");

    // Deleting a service takes exactly its entries; its backends go with it.
    let report = h
        .reconciler
        .apply_events(
            &mut h.dataplane.services,
            &[
                ObjectEvent::Delete(ObjectKey::Service(weir_agent::intent::ObjectRef {
                    namespace: "default".into(),
                    name: "s0".into(),
                })),
                ObjectEvent::Delete(ObjectKey::EndpointSlice(weir_agent::intent::ObjectRef {
                    namespace: "default".into(),
                    name: "s0-1".into(),
                })),
            ],
        )
        .expect("delete");
    assert_eq!(
        report.writes,
        1 + 3 + 3,
        "frontend, slots, backends: {report:?}"
    );
    let gone = h.dataplane.services.read().unwrap();
    for i in 1..SERVICES {
        assert_eq!(entries_of(&before, vip(i)), entries_of(&gone, vip(i)));
    }
}

#[test]
fn a_restarted_reconciler_adopts_the_maps_and_writes_nothing() {
    let mut h = Harness::new(&[]);
    h.reconciler = Reconciler::default();
    let yaml = cluster(None);
    h.reconciler
        .reconcile(&mut h.dataplane.services, &objects(&yaml))
        .expect("full sync");
    let before = h.dataplane.services.read().unwrap();
    // A new agent: no shadow, everything read from the maps.
    h.reconciler = Reconciler::default();
    let report = h
        .reconciler
        .reconcile(&mut h.dataplane.services, &objects(&yaml))
        .expect("adopting sync");
    assert_eq!(report.writes, 0, "{report:?}");
    assert_eq!(h.dataplane.services.read().unwrap(), before);
}

/// Conntrack tables of 64 entries and 200 new flows: the LRU makes room, every flow's first
/// packet is still translated (none dropped for a full table), and the eviction estimate the
/// agent exports accounts for exactly the entries that are gone.
#[test]
fn a_full_conntrack_map_evicts_and_keeps_taking_new_flows() {
    require_root();
    const CAPACITY: u32 = 64;
    const FLOWS: u16 = 200;
    let dataplane = Dataplane::load(&LoadOptions {
        pin_dir: None,
        max_entries: vec![
            (map_names::CONNTRACK, CAPACITY),
            (map_names::CT_NEW, CAPACITY),
        ],
        ..Default::default()
    })
    .expect("load");
    let mut h = Harness {
        dataplane,
        reconciler: Reconciler::default(),
    };
    h.apply(&cluster_yaml(&[BACKEND, OTHER]));

    let mut estimate = EvictionEstimate::default();
    let created = |h: &Harness| entries_created(&h.dataplane.counters.read().unwrap(), false);
    let present = |h: &Harness| h.dataplane.conntrack.entries().unwrap().len() as u64;
    assert_eq!(estimate.observe(created(&h), 0, present(&h)), 0);

    for port in 0..FLOWS {
        let (verdict, out) = h.run(&tcp(CLIENT, 20000 + port, VIP, 80, "S"));
        assert_eq!(verdict, TC_ACT_OK, "flow {port}");
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        assert!(
            dst == BACKEND || dst == OTHER,
            "flow {port} translated to a backend, not {dst}"
        );
    }
    assert_eq!(h.counter("ct_new_flow"), FLOWS as u64);
    assert_eq!(h.counter("drop_ct_full"), 0, "a full table never drops");
    let now = present(&h);
    assert!(
        now <= CAPACITY as u64,
        "{now} entries in a map of {CAPACITY}"
    );

    // The newest flow is there and takes the fast path.
    let (_, out) = h.run(&tcp(CLIENT, 20000 + FLOWS - 1, VIP, 80, "A"));
    assert!(out[30..34] == BACKEND.octets() || out[30..34] == OTHER.octets());
    assert_eq!(h.counter("ct_forward_hit"), 1);

    let evicted = estimate.observe(created(&h), 0, present(&h));
    assert_eq!(evicted, 2 * FLOWS as u64 - present(&h));
    assert!(evicted >= 2 * FLOWS as u64 - CAPACITY as u64);

    // Through the agent's metric.
    let metrics = weir_agent::metrics::Metrics::new();
    metrics.conntrack_evictions.inc_by(evicted);
    let text = metrics.encode().unwrap();
    assert!(
        text.contains(&format!("weir_conntrack_evictions_total {evicted}")),
        "{text}"
    );
}

fn claimant_yaml(namespace: &str, cluster_ip: Ipv4Addr, external_ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {namespace}}}\n\
         spec: {{clusterIP: {cluster_ip}, externalIPs: [{external_ip}], \
         ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]}}\n---\n"
    )
}

/// The service id `ip:80` has in the maps.
fn service_id_at(state: &DataplaneState, ip: Ipv4Addr) -> Option<u32> {
    let (addr, family) = weir_agent::compile::addr_of(ip.into());
    state
        .services
        .iter()
        .find(|(k, _)| k.addr == addr && k.family == family && u16::from_be(k.port_be) == 80)
        .map(|(_, v)| v.service_id)
}

/// Two Services claim one external IP: the first to claim it keeps it, the other is refused and
/// counted, and a restarted agent (which sees both at once, in name order the other one first)
/// gives it to the same Service and writes nothing. Deleting the holder hands it over.
#[test]
fn a_contested_frontend_stays_with_its_first_owner_across_restarts() {
    let shared = Ipv4Addr::new(198, 18, 7, 7);
    let (first_vip, second_vip) = (
        Ipv4Addr::new(198, 18, 101, 1),
        Ipv4Addr::new(198, 18, 101, 2),
    );
    // "zzz" sorts after "aaa": name order alone would hand the address to the second claimant.
    let first = claimant_yaml("zzz", first_vip, shared);
    let second = claimant_yaml("aaa", second_vip, shared);
    let both = format!("{first}{second}");

    let mut h = Harness::new(&[]);
    h.reconciler = Reconciler::default();
    h.reconciler
        .reconcile(&mut h.dataplane.services, &objects(&first))
        .expect("first claimant");
    let report = h
        .reconciler
        .reconcile(&mut h.dataplane.services, &objects(&both))
        .expect("second claimant");
    assert_eq!(
        report.rejected_objects, 1,
        "the second claimant is refused: {report:?}"
    );
    let state = h.dataplane.services.read().unwrap();
    let held_by_first = service_id_at(&state, first_vip);
    assert!(held_by_first.is_some());
    assert_eq!(service_id_at(&state, shared), held_by_first);
    assert!(
        service_id_at(&state, second_vip).is_some(),
        "its ClusterIP is served"
    );

    // A new agent adopting the maps.
    h.reconciler = Reconciler::default();
    let report = h
        .reconciler
        .reconcile(&mut h.dataplane.services, &objects(&both))
        .expect("adopting sync");
    assert_eq!(report.writes, 0, "the holder is unchanged: {report:?}");
    assert_eq!(report.rejected_objects, 1, "{report:?}");
    assert_eq!(h.dataplane.services.read().unwrap(), state);

    // The holder goes: the other claimant gets the address.
    let report = h
        .reconciler
        .reconcile(&mut h.dataplane.services, &objects(&second))
        .expect("holder deleted");
    assert_eq!(report.rejected_objects, 0, "{report:?}");
    let state = h.dataplane.services.read().unwrap();
    assert_eq!(
        service_id_at(&state, shared),
        service_id_at(&state, second_vip)
    );
    assert_eq!(service_id_at(&state, first_vip), None);
}
