//! Program links outlive the agent: a stopped or killed agent leaves its program on the
//! interface, and the next one takes the hook over, replacing the program in place instead of
//! stacking a second one. Runs on the host kernel, each test in a private mount namespace (its
//! own bpffs) and a private network namespace (its own veth pair), so nothing leaks out.

use std::path::Path;
use std::process::Command;

use aya::programs::tc::{SchedClassifier, TcAttachType};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use weir_agent::config::{link_pin_dir, versioned_pin_dir};
use weir_agent::dataplane::{uninstall, AttachMode, Dataplane, LoadOptions};

const IFACE: &str = "wl0";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "link tests attach BPF programs and need root; run them through the README's test command"
    );
}

/// A private bpffs and network namespace for this test thread, with a veth pair `wl0`/`wl1`.
fn sandbox() -> tempfile::TempDir {
    require_root();
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET).expect("unshare");
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
    make_veth();
    dir
}

/// Commands forked from this thread run in its network namespace.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_veth() {
    ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "wl1"]);
    ip(&["link", "set", IFACE, "up"]);
    ip(&["link", "set", "wl1", "up"]);
}

fn load(pin_root: &Path, mode: AttachMode) -> Dataplane {
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(versioned_pin_dir(pin_root)),
        ..Default::default()
    })
    .expect("load");
    dataplane
        .pin_links_in(&link_pin_dir(pin_root))
        .expect("link pin dir");
    dataplane.set_attach_mode(mode);
    dataplane
}

/// Ids of the TCX programs on the interface's ingress.
fn tcx_programs() -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(IFACE, TcAttachType::Ingress).expect("query");
    programs.iter().map(|p| p.id()).collect()
}

/// `(priority, program id)` of every clsact ingress filter named weir_ingress.
fn weir_filters() -> Vec<String> {
    let out = Command::new("tc")
        .args(["filter", "show", "dev", IFACE, "ingress"])
        .output()
        .expect("run tc");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("weir_ingress"))
        .map(|l| {
            let pref = l.split("pref ").nth(1).and_then(|r| r.split(' ').next());
            let id = l.split(" id ").nth(1).and_then(|r| r.split(' ').next());
            format!("pref {} id {}", pref.unwrap_or("?"), id.unwrap_or("?"))
        })
        .collect()
}

#[test]
fn a_pinned_tcx_link_outlives_the_agent_and_is_taken_over_in_place() {
    let bpffs = sandbox();
    let pin_root = bpffs.path().join("node1");
    if AttachMode::for_running_kernel() != AttachMode::Tcx {
        eprintln!("SKIPPED: kernel before 6.6 has no TCX");
        return;
    }

    let mut first = load(&pin_root, AttachMode::Tcx);
    first.attach_ingress(IFACE).expect("attach");
    let before = tcx_programs();
    assert_eq!(before.len(), 1);
    // The agent goes away without detaching: what SIGTERM does now, and all SIGKILL can do.
    drop(first);
    assert_eq!(tcx_programs(), before, "the program stays attached");
    assert!(link_pin_dir(&pin_root).join("tcx_ingress_wl0").exists());

    let mut second = load(&pin_root, AttachMode::Tcx);
    second.attach_ingress(IFACE).expect("adopt");
    let after = tcx_programs();
    assert_eq!(after.len(), 1, "replaced in place, not stacked: {after:?}");
    assert_ne!(after, before, "the new agent's program runs now");
    drop(second);
    assert_eq!(tcx_programs(), after);

    let report = uninstall(&pin_root, &[IFACE.to_owned()]).expect("uninstall");
    assert_eq!(report.links, 1);
    assert!(report.removed_pin_dir);
    assert!(tcx_programs().is_empty(), "uninstall detaches");
}

#[test]
fn a_link_of_a_deleted_interface_is_replaced_and_stale_pins_released() {
    let bpffs = sandbox();
    let pin_root = bpffs.path().join("node1");
    if AttachMode::for_running_kernel() != AttachMode::Tcx {
        eprintln!("SKIPPED: kernel before 6.6 has no TCX");
        return;
    }
    let mut first = load(&pin_root, AttachMode::Tcx);
    first.attach_ingress(IFACE).expect("attach");
    drop(first);

    // The pod interface goes and comes back under the same name while no agent runs.
    ip(&["link", "del", IFACE]);
    make_veth();
    assert!(
        tcx_programs().is_empty(),
        "the old link went with its device"
    );

    let mut second = load(&pin_root, AttachMode::Tcx);
    second
        .attach_ingress(IFACE)
        .expect("attach anew over a defunct pin");
    assert_eq!(tcx_programs().len(), 1);

    // A pin for an interface that no longer exists is released on the first interface sync.
    let mut third = load(&pin_root, AttachMode::Tcx);
    third.release_unwanted_links(&Default::default());
    assert!(
        !link_pin_dir(&pin_root).join("tcx_ingress_wl0").exists(),
        "an unwanted interface's pin is released"
    );
    drop((second, third));
    assert!(tcx_programs().is_empty(), "releasing the pin detached it");
}

#[test]
fn a_clsact_filter_outlives_the_agent_and_is_replaced_not_stacked() {
    let bpffs = sandbox();
    let pin_root = bpffs.path().join("node1");

    let mut first = load(&pin_root, AttachMode::Netlink);
    first.attach_ingress(IFACE).expect("attach");
    drop(first);
    let before = weir_filters();
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].starts_with("pref 22341 "), "{before:?}");

    let mut second = load(&pin_root, AttachMode::Netlink);
    second.attach_ingress(IFACE).expect("replace");
    drop(second);
    let after = weir_filters();
    assert_eq!(after.len(), 1, "one filter, not two: {after:?}");
    assert_ne!(after, before, "the filter runs the new program");

    let report = uninstall(&pin_root, &[IFACE.to_owned()]).expect("uninstall");
    assert_eq!(report.filters, 1);
    assert!(weir_filters().is_empty());
}
