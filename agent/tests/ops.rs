//! The operations endpoint, scraped over real HTTP: metrics fed by the real pipeline and by the
//! loaded program's per-CPU counters, and the health probes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::mount::umount;
use nix::sched::CloneFlags;
use weir_agent::admission::Limits;
use weir_agent::config::HttpConfig;
use weir_agent::dataplane::Counters;
use weir_agent::http::OpsServer;
use weir_agent::metrics::{Health, Metrics, Ops};
use weir_agent::reconcile::Reconciler;

/// `GET path` with a fresh connection; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first sample line starting with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn probes_answer_200_when_good_and_503_when_not() {
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    health.beat();
    let server = OpsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Ops {
            metrics: Arc::new(Metrics::new()),
            health: health.clone(),
        },
        HttpConfig::default(),
    )
    .expect("bind 127.0.0.1:0");
    let addr = server.local_addr;

    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("first sync"), "{body}");

    health.set_synced();
    health.set_unattached_host_interfaces(vec!["eth0".into()]);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("eth0"), "{body}");

    health.set_unattached_host_interfaces(Vec::new());
    assert_eq!(get(addr, "/readyz").0, 200);
    assert_eq!(get(addr, "/nowhere").0, 404);
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE weir_sync_duration_seconds histogram"));
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    drop(server);
    assert!(
        TcpStream::connect(addr).is_err(),
        "the listener closes with the server"
    );
}

#[test]
fn metrics_show_the_pipeline_and_the_data_path_counters() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let pin_dir = bpffs.path().join("node1/v1");
    let mut harness = Harness::with_pin_dir(&[BACKEND, OTHER], Some(pin_dir.clone()));
    // A second handle on the pinned counters, as the agent's HTTP thread has.
    let counters = Counters::open_pinned(&pin_dir).expect("pinned counters");
    let metrics = Arc::new(Metrics::new().with_datapath(counters));
    harness.reconciler = Reconciler::new(Limits::default(), Some(metrics.clone()));
    // A bad service next to the good ones: rejected, counted, and the rest applies.
    let bad = "---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\n\
               spec: {clusterIP: 198.18.100.300, ports: [{port: 80}]}\n";
    let report = harness.apply(&format!("{}{bad}", cluster_yaml(&[BACKEND, OTHER])));
    assert_eq!(report.rejected_objects, 1);
    harness.run(&tcp(CLIENT, 40200, VIP, 80, "S"));
    // `empty` (198.18.100.11:81) has no endpoints: a drop by reason.
    harness.run(&tcp(
        CLIENT,
        40201,
        "198.18.100.11".parse().unwrap(),
        81,
        "S",
    ));

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
    .unwrap();
    let (status, text) = get(server.local_addr, "/metrics");
    assert_eq!(status, 200);
    // echo has TCP 80 and UDP 53, empty TCP and UDP 81: four frontends, two backends x two
    // ports.
    assert_eq!(sample(&text, "weir_services"), Some(4.0), "{text}");
    assert_eq!(sample(&text, "weir_backends"), Some(4.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "weir_rejected_objects_total{kind=\"Service\",reason=\"invalid_address\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "weir_sync_duration_seconds_count"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "weir_datapath_packets_total{outcome=\"ct_new_flow\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // A service without endpoints rejects: counted as an outcome, not as a drop.
    assert_eq!(
        sample(
            &text,
            "weir_datapath_packets_total{outcome=\"reject_no_backend\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Every outcome counter the program keeps is exported, drop counters a second time by
    // reason; the events after them have metrics of their own.
    let outcomes = weir_common::counter::OUTCOMES as usize;
    for name in &weir_common::counter::NAMES[..outcomes] {
        let series = format!("weir_datapath_packets_total{{outcome=\"{name}\"}}");
        assert!(sample(&text, &series).is_some(), "{series} missing");
        if let Some(reason) = name.strip_prefix("drop_") {
            let series = format!("weir_datapath_drops_total{{reason=\"{reason}\"}}");
            assert!(sample(&text, &series).is_some(), "{series} missing");
        }
    }
    assert_eq!(
        weir_common::counter::NAMES[outcomes..],
        [
            "ct_promoted",
            "ct_collision_resolved",
            "fragment_replay_failed",
            "forwarded",
            "forward_to_stack",
            "policy_allowed",
            "monitor_lost",
            "prefilter_drop_config",
            "prefilter_drop_object",
            "prefilter_pass_failsafe"
        ],
        "every event counter has its metric below"
    );
    assert_eq!(
        sample(&text, "weir_conntrack_promotions_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_conntrack_collisions_resolved_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_fragments_replay_failed_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_policy_flows_allowed_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_monitor_events_lost_total"),
        Some(0.0),
        "{text}"
    );
    for (verdict, by) in [
        ("dropped", "config"),
        ("dropped", "object"),
        ("passed", "failsafe"),
    ] {
        let series = format!("weir_prefilter_packets_total{{verdict=\"{verdict}\",by=\"{by}\"}}");
        assert!(sample(&text, &series).is_some(), "{series} missing\n{text}");
    }
    for by in ["weir", "stack"] {
        let series = format!("weir_datapath_forwarded_total{{by=\"{by}\"}}");
        assert!(sample(&text, &series).is_some(), "{series} missing");
    }
    drop((server, harness, metrics));
    umount(bpffs.path()).expect("unmount bpffs");
}
