//! A restarted agent adopts the maps its predecessor pinned: same state, no writes, open flows
//! keep their backends.

mod common;

use common::*;
use nix::mount::{mount, umount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// A bpffs private to this test thread: its own mount namespace, so nothing leaks to the host
/// and nothing needs cleaning up by name.
fn private_bpffs() -> tempfile::TempDir {
    unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / private");
    let dir = tempfile::tempdir().expect("tempdir");
    mount(
        Some("bpf"),
        dir.path(),
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount bpffs");
    dir
}

#[test]
fn a_restarted_data_plane_adopts_pinned_maps() {
    require_root();
    let bpffs = private_bpffs();
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
