//! A restarted agent adopts the maps its predecessor pinned: same state, no writes, open flows
//! keep their backends.

mod common;

use common::*;
use nix::mount::umount;
use nix::sched::CloneFlags;

#[test]
fn a_restarted_data_plane_adopts_pinned_maps() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let pin_dir = bpffs.path().join("node1/v1");
    let backends = [BACKEND, OTHER];

    let chosen = {
        let mut first = Harness::with_pin_dir(&backends, Some(pin_dir.clone()));
        let (_, out) = first.run(&tcp(CLIENT, 40100, VIP, 80, "S"));
        out[30..34].to_vec()
    };
    assert!(pin_dir.join(weir_common::map_names::CONNTRACK).exists());

    let mut second = Harness::with_pin_dir(&[], Some(pin_dir.clone()));
    // The harness applied an empty endpoint list on load; put the same state back and expect the
    // maps to return to exactly what the first agent wrote.
    let report = second.apply(&cluster_yaml(&backends));
    assert!(report.writes > 0);
    let mut third = Harness::with_pin_dir(&backends, Some(pin_dir.clone()));
    // A fresh reconciler has no shadow: it diffs against what the pinned maps hold.
    third.reconciler = weir_agent::reconcile::Reconciler::default();
    assert_eq!(
        third.apply(&cluster_yaml(&backends)).writes,
        0,
        "adoption writes nothing"
    );
    assert_eq!(
        third.dataplane.conntrack.entries().unwrap().len(),
        2,
        "conntrack survived"
    );
    let (_, out) = third.run(&tcp(CLIENT, 40100, VIP, 80, "A"));
    assert_eq!(out[30..34], chosen[..], "the open flow keeps its backend");
    assert_eq!(third.counter("ct_forward_hit"), 1);

    drop((second, third));
    umount(bpffs.path()).expect("unmount bpffs");
}

#[test]
fn a_pinned_map_of_another_shape_is_set_aside_not_adopted() {
    use weir_common::map_names::{AFFINITY, CONNTRACK};
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let pin_dir = bpffs.path().join("node1/v1");
    let backends = [BACKEND, OTHER];
    {
        // An established flow: its entries are in the established table.
        let mut first = Harness::with_pin_dir(&backends, Some(pin_dir.clone()));
        let (_, out) = first.run(&tcp(CLIENT, 40200, VIP, 80, "S"));
        let chosen = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        first.run(&tcp(chosen, 8080, CLIENT, 40200, "SA"));
        first.run(&tcp(CLIENT, 40200, VIP, 80, "A"));
        assert_eq!(first.counter("ct_promoted"), 1);
    }
    // Another map (an LRU hash too, with other key and value sizes) where conntrack should be:
    // what a stray `bpftool map create` or another build's pin looks like.
    std::fs::remove_file(pin_dir.join(CONNTRACK)).unwrap();
    std::fs::rename(pin_dir.join(AFFINITY), pin_dir.join(CONNTRACK)).unwrap();

    let mut second = Harness::with_pin_dir(&backends, Some(pin_dir.clone()));
    assert!(
        pin_dir.join(format!("{CONNTRACK}_INCOMPATIBLE")).exists(),
        "the stranger is kept aside for a human to look at"
    );
    let report = second.dataplane.finish_carry_over();
    assert!(report.copied.is_empty(), "{report:?}");
    assert_eq!(report.not_carried.len(), 1, "{report:?}");
    assert!(
        report.not_carried[0].1.contains("key size"),
        "other sizes are never copied: {report:?}"
    );
    assert!(
        pin_dir.join(format!("{CONNTRACK}_INCOMPATIBLE")).exists(),
        "and stay aside"
    );
    assert!(
        second.dataplane.conntrack.entries().unwrap().is_empty(),
        "a conntrack map of the right shape, new"
    );
    let (verdict, out) = second.run(&tcp(CLIENT, 40201, VIP, 80, "S"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[30..32], &[198, 19], "translated with the new map");
    assert_eq!(second.dataplane.conntrack.entries().unwrap().len(), 2);

    // The maps that matched were adopted as they were: the service state needs no writes.
    second.reconciler = weir_agent::reconcile::Reconciler::default();
    assert_eq!(second.apply(&cluster_yaml(&backends)).writes, 0);

    drop(second);
    umount(bpffs.path()).expect("unmount bpffs");
}

/// A data plane pinned in `pin_dir` with `conntrack` entries of conntrack, carrying over from
/// `older` (as the agent finds them beside its own directory), fed the usual cluster.
fn load_sized(
    pin_dir: &std::path::Path,
    conntrack: u32,
    older: Vec<(u32, std::path::PathBuf)>,
    backends: &[std::net::Ipv4Addr],
) -> Harness {
    use weir_agent::dataplane::{Dataplane, LoadOptions};
    let dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(pin_dir.to_owned()),
        max_entries: vec![(weir_common::map_names::CONNTRACK, conntrack)],
        older_pin_dirs: older,
    })
    .expect("load");
    let mut harness = Harness {
        dataplane,
        reconciler: weir_agent::reconcile::Reconciler::default(),
    };
    harness.apply(&cluster_yaml(backends));
    harness
}

/// Opens `n` flows from the client (ports from `first_port`) and returns the backend each
/// got, by port.
/// Opens `n` TCP connections through the ClusterIP, handshakes completed, so their entries sit
/// in the established table.
fn open_flows(harness: &mut Harness, first_port: u16, n: u16) -> Vec<(u16, Vec<u8>)> {
    (first_port..first_port + n)
        .map(|port| {
            let (verdict, out) = harness.run(&tcp(CLIENT, port, VIP, 80, "S"));
            assert_eq!(verdict, TC_ACT_OK);
            let backend = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            harness.run(&tcp(backend, 8080, CLIENT, port, "SA"));
            harness.run(&tcp(CLIENT, port, VIP, 80, "A"));
            (port, out[30..34].to_vec())
        })
        .collect()
}

/// Every flow still goes to the backend it had: a conntrack hit each, no new flow.
fn assert_flows_kept(harness: &mut Harness, flows: &[(u16, Vec<u8>)]) {
    let hits = harness.counter("ct_forward_hit");
    let new = harness.counter("ct_new_flow");
    for (port, backend) in flows {
        let (_, out) = harness.run(&tcp(CLIENT, *port, VIP, 80, "A"));
        assert_eq!(
            &out[30..34],
            &backend[..],
            "flow from port {port} keeps its backend"
        );
    }
    assert_eq!(harness.counter("ct_forward_hit") - hits, flows.len() as u64);
    assert_eq!(harness.counter("ct_new_flow"), new, "no flow started anew");
}

fn max_entries_of(path: &std::path::Path) -> u32 {
    aya::maps::MapInfo::from_pin(path)
        .expect("map info")
        .max_entries()
}

#[test]
fn conntrack_entries_survive_a_capacity_change() {
    use weir_common::map_names::CONNTRACK;
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let pin_dir = bpffs.path().join("node1/v1");
    let backends = [BACKEND, OTHER];
    let (flows, before) = {
        let mut first = load_sized(&pin_dir, 4096, Vec::new(), &backends);
        let flows = open_flows(&mut first, 41000, 10);
        (flows, first.dataplane.conntrack.entries().unwrap())
    };
    assert_eq!(before.len(), 20, "two entries per flow");

    // The operator raises `[maps] conntrack`: a new map of the new size, with every entry.
    let mut second = load_sized(&pin_dir, 8192, Vec::new(), &backends);
    assert_eq!(max_entries_of(&pin_dir.join(CONNTRACK)), 8192);
    assert_eq!(second.dataplane.conntrack.entries().unwrap(), before);
    let set_aside = pin_dir.join(format!("{CONNTRACK}_INCOMPATIBLE"));
    assert!(
        set_aside.exists(),
        "the old map stays pinned until the links run the new programs"
    );
    let report = second.dataplane.finish_carry_over();
    assert_eq!(report.copied, [(CONNTRACK, 20)]);
    assert!(report.not_carried.is_empty(), "{report:?}");
    assert!(!set_aside.exists(), "copied, so no longer kept");
    assert_flows_kept(&mut second, &flows);
    let now = second.dataplane.conntrack.entries().unwrap();
    drop(second);

    // Lowered below what it holds: the most recently seen entries are kept.
    let capacity = 8;
    let mut third = load_sized(&pin_dir, capacity, Vec::new(), &backends);
    let kept = third.dataplane.conntrack.entries().unwrap();
    let mut by_recency: Vec<_> = now.iter().collect();
    by_recency.sort_by_key(|(_, v)| std::cmp::Reverse(v.last_seen_ns));
    // Entries stamped in the same clock tick tie: the oldest kept may be any of a tie.
    let oldest_kept_allowed = by_recency[capacity as usize - 1].1.last_seen_ns;
    assert!(
        !kept.is_empty() && kept.len() <= capacity as usize,
        "{}",
        kept.len()
    );
    assert!(
        kept.values().all(|v| v.last_seen_ns >= oldest_kept_allowed),
        "only the most recently seen entries are kept"
    );
    assert!(
        kept.values()
            .any(|v| v.last_seen_ns == by_recency[0].1.last_seen_ns),
        "the newest of all is kept"
    );
    assert_eq!(
        third.dataplane.finish_carry_over().copied,
        [(CONNTRACK, kept.len())]
    );
    drop(third);
    umount(bpffs.path()).expect("unmount bpffs");
}

#[test]
fn conntrack_entries_survive_a_layout_version_bump() {
    use weir_agent::config::{older_versioned_pin_dirs, versioned_pin_dir};
    use weir_agent::dataplane::ConntrackMap;
    use weir_common::map_names::{CONNTRACK, SERVICES};
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let root = bpffs.path().join("node1");
    // The previous layout's agent, simulated by this build pinned under the older name (its
    // conntrack entries are the same bytes).
    let old_dir = root.join(format!("v{}", weir_common::MAP_LAYOUT_VERSION - 1));
    let backends = [BACKEND, OTHER];
    let flows = {
        let mut old = load_sized(&old_dir, 4096, Vec::new(), &backends);
        open_flows(&mut old, 42000, 5)
    };
    let before = ConntrackMap::open_pinned(&old_dir)
        .unwrap()
        .entries()
        .unwrap();
    assert_eq!(before.len(), 10);

    let new_dir = versioned_pin_dir(&root);
    let older = older_versioned_pin_dirs(&root);
    assert_eq!(
        older,
        [(weir_common::MAP_LAYOUT_VERSION - 1, old_dir.clone())]
    );
    let mut new = load_sized(&new_dir, 4096, older, &backends);
    assert_eq!(new.dataplane.conntrack.entries().unwrap(), before);
    assert_flows_kept(&mut new, &flows);

    // Until the links are swapped the old programs still track flows in the old map: what they
    // do meanwhile is carried over too.
    let (late_key, late_value) = {
        let (key, value) = before.iter().next().unwrap();
        let mut key = *key;
        key.sport_be = 42999u16.to_be();
        let value = weir_common::CtValue {
            last_seen_ns: weir_agent::conntrack::monotonic_now_ns(),
            ..*value
        };
        (key, value)
    };
    ConntrackMap::open_pinned(&old_dir)
        .unwrap()
        .insert(&late_key, &late_value)
        .unwrap();
    let report = new.dataplane.finish_carry_over();
    assert!(report.copied.contains(&(CONNTRACK, 11)), "{report:?}");
    assert_eq!(
        new.dataplane.conntrack.entries().unwrap().get(&late_key),
        Some(&late_value)
    );
    assert!(!old_dir.exists(), "the older layout's maps are unpinned");
    assert!(new_dir.join(SERVICES).exists());
    assert_eq!(
        new.dataplane.finish_carry_over(),
        weir_agent::pin_layout::CarryReport::default(),
        "once"
    );
    drop(new);
    umount(bpffs.path()).expect("unmount bpffs");
}

#[test]
fn a_conntrack_map_of_another_value_size_is_not_carried_and_the_agent_starts() {
    use weir_agent::config::{older_versioned_pin_dirs, versioned_pin_dir};
    use weir_common::map_names::{AFFINITY, CONNTRACK};
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let root = bpffs.path().join("node1");
    let old_dir = root.join(format!("v{}", weir_common::MAP_LAYOUT_VERSION - 1));
    let backends = [BACKEND, OTHER];
    drop(load_sized(&old_dir, 4096, Vec::new(), &backends));
    // An older layout whose conntrack entries had another size (an LRU hash of other key and
    // value sizes stands in for it).
    std::fs::remove_file(old_dir.join(CONNTRACK)).unwrap();
    std::fs::rename(old_dir.join(AFFINITY), old_dir.join(CONNTRACK)).unwrap();

    let new_dir = versioned_pin_dir(&root);
    let mut new = load_sized(&new_dir, 4096, older_versioned_pin_dirs(&root), &backends);
    assert!(new.dataplane.conntrack.entries().unwrap().is_empty());
    let flows = open_flows(&mut new, 43000, 2);
    assert_flows_kept(&mut new, &flows);
    let report = new.dataplane.finish_carry_over();
    assert!(report.copied.iter().all(|(_, n)| *n == 0), "{report:?}");
    assert_eq!(report.not_carried.len(), 1, "{report:?}");
    assert_eq!(report.not_carried[0].0, CONNTRACK);
    assert!(report.not_carried[0].1.contains("value size"), "{report:?}");
    assert!(
        new_dir.join(format!("{CONNTRACK}_INCOMPATIBLE")).exists(),
        "kept aside for a human to look at"
    );
    assert!(!old_dir.exists());
    drop(new);
    umount(bpffs.path()).expect("unmount bpffs");
}
