//! Program links outlive the agent: a stopped or killed agent leaves its program on the
//! interface, and the next one takes the hook over, replacing the program in place instead of
//! stacking a second one. Runs on the host kernel, each test in a private mount namespace (its
//! own bpffs) and a private network namespace (its own veth pair), so nothing leaks out.

mod common;

use std::path::Path;
use std::process::Command;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifier, SchedClassifierLink, TcAttachType};
use common::{
    cluster_yaml, ip, load_pinned, objects, private_bpffs, require_root, tcp, BACKEND, CLIENT, VIP,
};
use nix::sched::CloneFlags;
use weir_agent::config::{link_pin_dir, versioned_pin_dir};
use weir_agent::dataplane::{uninstall, AttachMode, Counters, Dataplane, Hook};
use weir_agent::reconcile::Reconciler;
use weir_common::program_names;

const IFACE: &str = "wl0";

/// A private bpffs and network namespace for this test thread, with a veth pair `wl0`/`wl1`.
fn sandbox() -> tempfile::TempDir {
    require_root();
    let dir = private_bpffs(CloneFlags::CLONE_NEWNET);
    make_veth();
    dir
}

fn make_veth() {
    ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "wl1"]);
    ip(&["link", "set", IFACE, "up"]);
    ip(&["link", "set", "wl1", "up"]);
}

fn load(pin_root: &Path, mode: AttachMode) -> Dataplane {
    let mut dataplane = load_pinned(pin_root);
    dataplane.set_attach_mode(mode);
    dataplane
}

/// Ids of the TCX programs on the interface's ingress.
fn tcx_programs() -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(IFACE, TcAttachType::Ingress).expect("query");
    programs.iter().map(|p| p.id()).collect()
}

/// Whether `detached` holds within a second. The kernel frees a link whose last pin went in
/// deferred work, not within the unlink: a check right after it races that work.
fn detached_soon(detached: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while !detached() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// Ids of the TCX programs on the interface's egress.
fn tcx_egress_programs() -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(IFACE, TcAttachType::Egress).expect("query");
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
    for hook in Hook::ALL {
        first.attach(IFACE, hook).expect("attach");
    }
    let before = tcx_programs();
    let egress_before = tcx_egress_programs();
    assert_eq!((before.len(), egress_before.len()), (1, 1));
    // The agent goes away without detaching: what SIGTERM does now, and all SIGKILL can do.
    drop(first);
    assert_eq!(tcx_programs(), before, "the program stays attached");
    assert_eq!(tcx_egress_programs(), egress_before);
    assert!(link_pin_dir(&pin_root).join("tcx_ingress_wl0").exists());
    assert!(link_pin_dir(&pin_root).join("tcx_egress_wl0").exists());

    let mut second = load(&pin_root, AttachMode::Tcx);
    for hook in Hook::ALL {
        second.attach(IFACE, hook).expect("adopt");
    }
    let after = tcx_programs();
    assert_eq!(after.len(), 1, "replaced in place, not stacked: {after:?}");
    assert_ne!(after, before, "the new agent's program runs now");
    let egress_after = tcx_egress_programs();
    assert_eq!(egress_after.len(), 1, "{egress_after:?}");
    assert_ne!(egress_after, egress_before);
    drop(second);
    assert_eq!(tcx_programs(), after);

    let report = uninstall(&pin_root, &[IFACE.to_owned()]).expect("uninstall");
    assert_eq!(report.links, 2);
    assert!(report.removed_pin_dir);
    assert!(
        detached_soon(|| tcx_programs().is_empty() && tcx_egress_programs().is_empty()),
        "uninstall detaches: {:?} {:?}",
        tcx_programs(),
        tcx_egress_programs()
    );
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
    first.attach(IFACE, Hook::Ingress).expect("attach");
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
        .attach(IFACE, Hook::Ingress)
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
    assert!(
        detached_soon(|| tcx_programs().is_empty()),
        "releasing the pin detached it"
    );
}

#[test]
fn a_clsact_filter_outlives_the_agent_and_is_replaced_not_stacked() {
    let bpffs = sandbox();
    let pin_root = bpffs.path().join("node1");

    let mut first = load(&pin_root, AttachMode::Netlink);
    first.attach(IFACE, Hook::Ingress).expect("attach");
    drop(first);
    let before = weir_filters();
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].starts_with("pref 22341 "), "{before:?}");

    let mut second = load(&pin_root, AttachMode::Netlink);
    second.attach(IFACE, Hook::Ingress).expect("replace");
    drop(second);
    let after = weir_filters();
    assert_eq!(after.len(), 1, "one filter, not two: {after:?}");
    assert_ne!(after, before, "the filter runs the new program");

    let report = uninstall(&pin_root, &[IFACE.to_owned()]).expect("uninstall");
    assert_eq!(report.filters, 1);
    assert!(weir_filters().is_empty());
}

/// (link id, program id) of a pinned TCX link.
fn pinned_link(path: &Path) -> (u32, u32) {
    let link = FdLink::from(PinnedLink::from_pin(path).expect("pinned link"));
    let info = link.info().expect("link info");
    (info.id(), info.program_id())
}

/// Tag (the kernel's hash of the instructions) of the one program on the interface's TCX ingress.
fn attached_tag() -> u64 {
    let (_, programs) = SchedClassifier::query_tcx(IFACE, TcAttachType::Ingress).expect("query");
    assert_eq!(programs.len(), 1, "exactly one program, never two or none");
    programs[0].tag()
}

/// Sends an Ethernet frame into the peer end, so it arrives at `wl0`'s ingress hook as traffic
/// does (not through BPF_PROG_TEST_RUN): it runs whatever program the link holds right now.
fn inject(frame: &[u8]) {
    let peer = nix::net::if_::if_nametoindex("wl1").expect("wl1 index");
    // SAFETY: plain socket calls on a descriptor this function owns and closes; the address is
    // a zeroed sockaddr_ll filled in field by field, passed with its own size.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = peer as i32;
        addr.sll_halen = 6;
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "frame sent");
    }
}

fn counter(counters: &Counters, name: &str) -> u64 {
    counters
        .read()
        .expect("counters")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| v)
}

/// A new agent replaces the program of an older build in the pinned link (BPF_LINK_UPDATE: the
/// same link, no moment without a program) and an established flow carries on, translated.
///
/// How "older build" is simulated: twice. First, the flow is established through the ingress
/// program of a previous agent (same object, a different program instance; the kernel's tag is
/// the same since the instructions are). Then the link is made to hold a program with a
/// different body, and so a different tag: the object's pass-through program, standing in for an
/// older build's code (as an older build would, it shares the pinned maps of the same layout
/// version). Both times the new agent's `attach_ingress` swaps its own program into the same
/// link, and the flow's next packet takes the conntrack fast path (a forward hit, no new flow):
/// frames are injected into the veth peer, so the packets really pass through the link.
#[test]
fn a_program_of_an_older_build_is_replaced_in_the_link_without_dropping_a_flow() {
    let bpffs = sandbox();
    let pin_root = bpffs.path().join("node1");
    if AttachMode::for_running_kernel() != AttachMode::Tcx {
        eprintln!("SKIPPED: kernel before 6.6 has no TCX");
        return;
    }
    let pin = link_pin_dir(&pin_root).join("tcx_ingress_wl0");
    let counters = || Counters::open_pinned(&versioned_pin_dir(&pin_root)).expect("counters");

    let mut old = load(&pin_root, AttachMode::Tcx);
    Reconciler::default()
        .reconcile(&mut old.services, &objects(&cluster_yaml(&[BACKEND])))
        .expect("state");
    old.attach(IFACE, Hook::Ingress).expect("attach");
    let ingress_tag = attached_tag();
    let (link, old_program) = pinned_link(&pin);
    inject(&tcp(CLIENT, 40500, VIP, 80, "S"));
    assert_eq!(
        counter(&counters(), "ct_new_flow"),
        1,
        "the flow is established"
    );
    drop(old);

    // A new agent: same link, its own program, and the flow goes on from conntrack.
    let mut new = load(&pin_root, AttachMode::Tcx);
    new.attach(IFACE, Hook::Ingress).expect("take over");
    let (same_link, new_program) = pinned_link(&pin);
    assert_eq!(same_link, link, "the link is updated, not replaced");
    assert_ne!(new_program, old_program, "the new agent's program runs now");
    inject(&tcp(CLIENT, 40500, VIP, 80, "A"));
    assert_eq!(counter(&counters(), "ct_forward_hit"), 1);
    assert_eq!(counter(&counters(), "ct_new_flow"), 1, "not a new flow");

    // An older build with a different body holds the link.
    {
        let link = SchedClassifierLink::try_from(FdLink::from(
            PinnedLink::from_pin(&pin).expect("pinned link"),
        ))
        .expect("a TCX link");
        let older = new.program(program_names::PASS).expect("pass program");
        let id = older.attach_to_link(link).expect("older body swapped in");
        // As the agent does: the pin keeps the link, our descriptor goes.
        let link = older.take_link(id).expect("link");
        drop(FdLink::try_from(link).expect("an fd link"));
    }
    let older_tag = attached_tag();
    assert_ne!(older_tag, ingress_tag, "a different build, a different tag");
    drop(new);

    let mut newest = load(&pin_root, AttachMode::Tcx);
    newest
        .attach(IFACE, Hook::Ingress)
        .expect("replace the older build");
    assert_eq!(
        attached_tag(),
        ingress_tag,
        "the current build's program runs"
    );
    assert_eq!(pinned_link(&pin).0, link, "still the same link");
    inject(&tcp(CLIENT, 40500, VIP, 80, "A"));
    assert_eq!(
        counter(&counters(), "ct_forward_hit"),
        2,
        "the flow survived both swaps"
    );
    assert_eq!(counter(&counters(), "ct_new_flow"), 1);
    drop(newest);
    uninstall(&pin_root, &[IFACE.to_owned()]).expect("uninstall");
}

/// An agent of another pin directory (a stale install, another version) left its program on an
/// interface this agent serves: each agent reports the other's program, and whether it runs
/// first. Its own program is never reported.
#[test]
fn a_weir_program_of_another_pin_directory_is_reported() {
    if AttachMode::for_running_kernel() != AttachMode::Tcx {
        eprintln!("skipped: foreign programs are found through TCX (kernel 6.6+)");
        return;
    }
    let bpffs = sandbox();
    let mut stale = load(&bpffs.path().join("old"), AttachMode::Tcx);
    let mut current = load(&bpffs.path().join("new"), AttachMode::Tcx);
    for hook in Hook::ALL {
        stale.attach(IFACE, hook).expect("attach the stale agent");
        current.attach(IFACE, hook).expect("attach");
    }
    let stale_id = tcx_programs()[0];
    let stale_egress_id = tcx_egress_programs()[0];

    let found = current.foreign_programs().expect("query");
    assert_eq!(found.len(), 2, "one per hook: {found:?}");
    assert_eq!(found[0].interface, IFACE);
    assert_eq!((found[0].hook, found[0].id), (Hook::Ingress, stale_id));
    assert_eq!(found[0].name, program_names::INGRESS);
    assert!(found[0].before_ours, "attached first, it runs first");
    assert_eq!(
        (found[1].hook, found[1].id),
        (Hook::Egress, stale_egress_id)
    );
    assert_eq!(found[1].name, program_names::EGRESS);

    let seen_from_stale = stale.foreign_programs().expect("query");
    assert_eq!(seen_from_stale.len(), 2);
    assert!(!seen_from_stale[0].before_ours);

    // Once the stale one is gone, nothing is reported.
    drop(stale);
    uninstall(&bpffs.path().join("old"), &[IFACE.to_owned()]).expect("uninstall");
    // An unpinned link is freed after an RCU grace period: wait for it, boundedly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !current.foreign_programs().expect("query").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale program stays"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
