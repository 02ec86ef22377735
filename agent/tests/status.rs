//! `weir-agent status` against a real node: a data plane pinned in a private bpffs, its program
//! on a veth in a private network namespace, and the agent's operations endpoint answering on
//! loopback. The screen names the interface and how it is hooked, the maps' fill, and what the
//! agent says (ready, last sync, a rejected Service and why).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sched::CloneFlags;
use weir_agent::admission::Limits;
use weir_agent::config::{ConfigLayer, HttpConfig, XdpMode};
use weir_agent::dataplane::{AttachMode, Hook};
use weir_agent::http::OpsServer;
use weir_agent::metrics::{Health, Metrics, Ops};
use weir_agent::reconcile::Reconciler;
use weir_agent::status;
use weir_common::map_names;

#[test]
fn status_names_hooks_fill_levels_and_what_the_agent_reports() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "ws0", "type", "veth", "peer", "name", "ws1"]);
    ip(&["link", "set", "ws0", "up"]);
    let pin_root = bpffs.path().join("node1");
    let mut dataplane = load_pinned(&pin_root);
    dataplane.attach("ws0", Hook::Ingress).expect("attach");
    // The XDP pre-filter as the agent attaches it: native on a veth, its link pinned.
    let mut prefilter = weir_agent::prefilter::Attachments::default();
    let link_dir = dataplane.link_pin_dir().expect("links pinned").to_owned();
    let program = dataplane
        .xdp_program(weir_common::program_names::PREFILTER)
        .expect("the pre-filter program");
    let attached = prefilter
        .attach(program, "ws0", XdpMode::Auto, Some(&link_dir))
        .expect("XDP attach");
    assert_eq!(attached, weir_agent::prefilter::Attached::Native);
    // A restarted agent finds the pinned link and swaps its program into it.
    let mut restarted = weir_agent::prefilter::Attachments::default();
    let program = dataplane
        .xdp_program(weir_common::program_names::PREFILTER)
        .expect("the pre-filter program");
    let adopted = restarted
        .attach(program, "ws0", XdpMode::Auto, Some(&link_dir))
        .expect("XDP link adopted");
    assert_eq!(adopted, weir_agent::prefilter::Attached::Adopted);

    let metrics = Arc::new(Metrics::new());
    let mut reconciler = Reconciler::new(Limits::default(), Some(metrics.clone()));
    // The cluster, and a second Service claiming the first one's ClusterIP and port.
    let yaml = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: copy, namespace: zz}}\n\
         spec: {{clusterIP: {VIP}, ports: [{{name: http, protocol: TCP, port: 80}}]}}\n",
        cluster_yaml(&[BACKEND])
    );
    let report = reconciler
        .reconcile(&mut dataplane.services, &objects(&yaml))
        .expect("reconcile");
    assert_eq!(report.rejected_objects, 1);
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    health.beat();
    health.set_synced();
    let server = OpsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Ops {
            metrics: metrics.clone(),
            health,
        },
        HttpConfig::default(),
    )
    .expect("bind");

    let config = ConfigLayer {
        node_name: Some("node1".into()),
        pin_dir: Some(pin_root),
        host_interfaces: Some(vec!["ws0".into()]),
        metrics_listen: Some(server.local_addr),
        state_path: Some(bpffs.path().join("state")),
        ..Default::default()
    }
    .finish()
    .expect("config");
    let status = status::gather(&config);

    let hooks: Vec<_> = status
        .interfaces
        .iter()
        .filter(|i| i.interface == "ws0")
        .collect();
    assert_eq!(hooks.len(), 1, "{:?}", status.interfaces);
    if AttachMode::for_running_kernel() == AttachMode::Tcx {
        assert_eq!(hooks[0].tcx_programs.len(), 1);
        assert!(hooks[0].pinned_link);
    }
    assert!(hooks[0].pinned_prefilter_link);
    let services = status
        .maps
        .iter()
        .find(|m| m.name == map_names::SERVICES)
        .expect("service map read");
    assert_eq!(services.entries, 4, "echo's two ports and empty's two");
    assert!(services.capacity > 0);
    assert!(
        status.unreadable_maps.is_empty(),
        "{:?}",
        status.unreadable_maps
    );

    let agent = status.agent.as_ref().expect("the agent answers");
    assert!(agent.ready, "{}", agent.readiness);
    assert!(agent.last_sync_unix.is_some() && agent.last_sync_duration_s.is_some());
    assert_eq!(
        agent.rejected,
        vec![("Service".into(), "frontend_taken".into(), 1.0)]
    );
    assert!(
        status.warnings.iter().any(|w| w.contains("frontend_taken")),
        "{:?}",
        status.warnings
    );

    let screen = status::render(&status);
    for expected in [
        "ws0",
        "WEIR_SERVICES",
        "Agent:       ready",
        "frontend_taken",
        "xdp: weir_prefilter (pinned link)",
    ] {
        assert!(
            screen.contains(expected),
            "{expected} missing from:\n{screen}"
        );
    }
    let json = serde_json::to_value(&status).expect("JSON");
    assert_eq!(json["node_name"], "node1");

    // With the agent gone, the rest of the screen still works and says why.
    drop(server);
    let status = status::gather(&config);
    assert!(status.agent.is_err());
    assert!(!status.maps.is_empty());
}
