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
