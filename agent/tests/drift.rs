//! Drift: service map entries changed outside the agent (a stray `bpftool map update` or
//! `delete`) are found by comparing the maps with what the agent wrote, and written back; the
//! packets they broke are translated again. The comparison reads the maps on a thread of its
//! own, through a second handle on the pins.

mod common;

use std::time::Duration;

use common::*;
use nix::sched::CloneFlags;
use weir_agent::admission::Footprint;
use weir_agent::drift::DriftWatch;
use weir_agent::state::Plan;
use weir_common::{Addr, BackendSlotKey, FrontendKey, ServiceValue, FAMILY_V4, PROTO_TCP};

fn frontend(ip: std::net::Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr: Addr::from_v4(ip.octets()),
        port_be: port.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

/// Three stray writes: the frontend's value zeroed (a blackhole: no backends), one of its slots
/// deleted, and a frontend nobody asked for.
fn stray_writes(h: &Harness) -> Plan {
    let state = h.dataplane.services.read().unwrap();
    let echo = frontend(VIP, 80);
    let value = state.services[&echo];
    let slot = BackendSlotKey {
        service_id: value.service_id,
        slot: 0,
    };
    assert!(state.slots.contains_key(&slot));
    Plan {
        upsert_services: vec![
            (
                echo,
                ServiceValue {
                    backend_count: 0,
                    ..value
                },
            ),
            (
                frontend(std::net::Ipv4Addr::new(198, 18, 100, 99), 22),
                value,
            ),
        ],
        delete_slots: vec![slot],
        ..Plan::default()
    }
}

#[test]
fn entries_changed_outside_the_agent_are_written_back() {
    let mut h = Harness::new(&[BACKEND, OTHER]);
    let written = h.dataplane.services.read().unwrap();
    h.dataplane
        .services
        .apply(&stray_writes(&h))
        .expect("stray writes");
    let (_, out) = h.run(&tcp(CLIENT, 41000, VIP, 80, "S"));
    assert_ne!(
        out,
        tcp(CLIENT, 41000, BACKEND, 8080, "S"),
        "the blackholed frontend no longer translates"
    );

    let actual = h.dataplane.services.read().unwrap();
    let report = h
        .reconciler
        .repair_drift(&mut h.dataplane.services, &actual)
        .expect("repair");
    assert_eq!(
        report,
        Footprint {
            frontends: 2,
            slots: 1,
            ..Footprint::default()
        }
    );
    assert_eq!(h.dataplane.services.read().unwrap(), written);
    let (_, out) = h.run(&tcp(CLIENT, 41001, VIP, 80, "S"));
    let backend = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert!(
        [BACKEND, OTHER].contains(&backend),
        "translated again: {backend}"
    );

    // Nothing left to repair.
    let actual = h.dataplane.services.read().unwrap();
    let report = h
        .reconciler
        .repair_drift(&mut h.dataplane.services, &actual)
        .expect("repair");
    assert_eq!(report.total(), 0);
}

/// The watcher thread reads the pinned maps and hands the loop a snapshot with the stray
/// writes; a snapshot taken across one of the agent's own writes is never handed over.
#[test]
fn the_watcher_thread_sees_stray_writes_and_skips_snapshots_across_own_writes() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let pin_dir = bpffs.path().join("maps");
    let mut h = Harness::with_pin_dir(&[BACKEND], Some(pin_dir.clone()));
    let written = h.dataplane.services.read().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut watch = DriftWatch::start(&pin_dir, Duration::from_millis(20)).expect("watch");
    let next = |watch: &mut DriftWatch| {
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), watch.next()).await })
            .expect("a snapshot within 10 s")
    };
    let first = next(&mut watch);
    assert_eq!(first.services, written, "no drift yet");
    assert!(first.policy.is_some(), "the policy maps are read too");

    h.dataplane
        .services
        .apply(&stray_writes(&h))
        .expect("stray writes");
    // Snapshots in flight now predate a write of "ours": the next one handed over is newer.
    watch.writing();
    let actual = loop {
        let snapshot = next(&mut watch).services;
        if snapshot != written {
            break snapshot;
        }
    };
    assert_eq!(actual, h.dataplane.services.read().unwrap());
    let report = h
        .reconciler
        .repair_drift(&mut h.dataplane.services, &actual)
        .expect("repair");
    assert_eq!(report.total(), 3);
    assert_eq!(h.dataplane.services.read().unwrap(), written);
}
