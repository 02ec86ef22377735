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
