//! Bad input from the source costs only its own object: a clear log line, a metric with kind and
//! reason, and every other object still reaches the real maps.

mod common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use common::*;
use weir_agent::admission::{Footprint, Limits};
use weir_agent::metrics::Metrics;
use weir_agent::reconcile::Reconciler;
use weir_agent::source::{FileLimits, FileSource};

fn service(name: &str, ip: &str, port: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: \"{ip}\", ports: [{{name: http, port: {port}}}]}}\n"
    )
}

/// An EndpointSlice for `service` with `count` ready endpoints in 198.19.0.0/16.
fn slice(name: &str, service: &str, count: u32) -> String {
    let mut out = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for i in 0..count {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i);
        writeln!(out, "- addresses: [\"{ip}\"]").unwrap();
    }
    out
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn rejected(metrics: &Metrics, kind: &str, reason: &str) -> Option<f64> {
    sample(
        &metrics.encode().unwrap(),
        &format!("weir_rejected_objects_total{{kind=\"{kind}\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn each_kind_of_bad_input_is_rejected_alone() {
    let mut h = Harness::new(&[BACKEND]);
    let metrics = Arc::new(Metrics::new());
    h.reconciler = Reconciler::new(
        Limits {
            max_endpoints_per_service: 1000,
            ..Limits::default()
        },
        Some(metrics.clone()),
    );
    let mut yaml = cluster_yaml(&[BACKEND, OTHER]);
    yaml += &service("bad-ip", "198.18.100.999", "80");
    yaml += &service("bad-port", "198.18.100.21", "70000");
    yaml += &slice("orphan-1", "nobody", 2);
    yaml += &service("huge", "198.18.100.22", "80");
    yaml += &slice("huge-1", "huge", 3000);
    yaml += &service("fine", "198.18.100.23", "80");
    yaml += &slice("fine-1", "fine", 3);
    let report = h.apply(&yaml);

    assert_eq!(report.rejected_objects, 4, "{report:?}");
    assert_eq!(rejected(&metrics, "Service", "invalid_address"), Some(1.0));
    assert_eq!(rejected(&metrics, "Service", "invalid_port"), Some(1.0));
    assert_eq!(
        rejected(&metrics, "EndpointSlice", "unknown_service"),
        Some(1.0)
    );
    assert_eq!(
        rejected(&metrics, "Service", "too_many_endpoints"),
        Some(1.0)
    );
    // echo (TCP 80, UDP 53), empty (TCP and UDP 81), fine (80), and huge without endpoints.
    let frontends = h.dataplane.services.read().unwrap().services;
    assert_eq!(frontends.len(), 6, "{frontends:?}");
    let (verdict, out) = h.run(&tcp(
        CLIENT,
        40300,
        "198.18.100.23".parse().unwrap(),
        80,
        "S",
    ));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[30..33], &[198, 19, 0], "fine's backends answer");

    // The same input again (a relist): nothing new is counted.
    let again = h.apply(&yaml);
    assert_eq!(again.writes, 0);
    assert_eq!(rejected(&metrics, "Service", "invalid_port"), Some(1.0));
}

#[test]
fn a_service_that_grows_past_its_limit_keeps_its_last_good_endpoints() {
    let mut h = Harness::new(&[]);
    h.reconciler = Reconciler::new(
        Limits {
            max_endpoints_per_service: 100,
            ..Limits::default()
        },
        None,
    );
    let small = format!(
        "{}{}",
        service("grows", "198.18.100.30", "80"),
        slice("grows-1", "grows", 3)
    );
    h.apply(&small);
    let before = h.dataplane.services.read().unwrap();

    let huge = format!(
        "{}{}",
        service("grows", "198.18.100.30", "80"),
        slice("grows-1", "grows", 2000)
    );
    let report = h.apply(&huge);
    assert_eq!(report.rejected_objects, 1);
    assert_eq!(report.writes, 0, "the last good endpoints stay as they are");
    assert_eq!(h.dataplane.services.read().unwrap(), before);
}

#[test]
fn the_slot_table_is_never_overflowed() {
    let mut h = Harness::new(&[]);
    let metrics = Arc::new(Metrics::new());
    h.reconciler = Reconciler::new(
        Limits {
            max_endpoints_per_service: 10_000,
            capacity: Footprint {
                slots: 50,
                ..Footprint::MAPS
            },
            ..Limits::default()
        },
        Some(metrics.clone()),
    );
    let yaml = [
        service("big", "198.18.100.40", "80"),
        slice("big-1", "big", 60),
        service("small", "198.18.100.41", "80"),
        slice("small-1", "small", 5),
    ]
    .concat();
    let report = h.apply(&yaml);
    assert_eq!(report.rejected_objects, 1);
    assert_eq!(rejected(&metrics, "Service", "map_capacity"), Some(1.0));
    let state = h.dataplane.services.read().unwrap();
    assert_eq!(state.slots.len(), 5, "small applies, big waits");
}

/// A Service with `count` external IPs in 198.18.128.0/17 and no endpoints.
fn service_with_external_ips(name: &str, ip: &str, count: u32) -> String {
    let ips: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "\"{}\"",
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i)
            )
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: \"{ip}\", externalIPs: [{}], ports: [{{name: http, port: 80}}]}}\n",
        ips.join(", ")
    )
}

#[test]
fn a_service_that_would_overflow_a_map_is_refused_and_the_rest_applies() {
    let mut h = Harness::new(&[]);
    let metrics = Arc::new(Metrics::new());
    h.reconciler = Reconciler::new(
        Limits {
            capacity: Footprint {
                frontends: 100,
                backends: 40,
                ..Footprint::MAPS
            },
            ..Limits::default()
        },
        Some(metrics.clone()),
    );
    // 150 frontends: more than the frontend map holds. 60 backends: more than the backend map.
    let flood = service_with_external_ips("flood", "198.18.100.50", 149);
    let wide = service("wide", "198.18.100.51", "80") + &slice("wide-1", "wide", 60);
    let fine = service("fine", "198.18.100.52", "80") + &slice("fine-1", "fine", 3);
    let report = h.apply(&[flood.as_str(), &wide, &fine].concat());
    assert_eq!(report.rejected_objects, 2, "{report:?}");
    assert_eq!(rejected(&metrics, "Service", "map_capacity"), Some(2.0));
    let state = h.dataplane.services.read().unwrap();
    assert_eq!(
        state.services.len(),
        1,
        "fine applies: {:?}",
        state.services
    );
    assert_eq!(state.backends.len(), 3);

    // A later change still applies, and deleting the refused Services frees their room: a
    // Service of the same size as one of them now fits.
    let smaller = service_with_external_ips("flood", "198.18.100.50", 49);
    let report = h.apply(&[smaller.as_str(), &fine].concat());
    assert_eq!(report.rejected_objects, 0, "{report:?}");
    let state = h.dataplane.services.read().unwrap();
    assert_eq!(
        state.services.len(),
        51,
        "fine and the 50 frontends of flood"
    );
}

#[test]
fn a_state_file_over_its_limit_is_a_rejection_and_the_other_files_apply() {
    let mut h = Harness::new(&[]);
    let metrics = Arc::new(Metrics::new());
    h.reconciler = Reconciler::new(Limits::default(), Some(metrics.clone()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fine.yaml"),
        service("fine", "198.18.100.50", "80"),
    )
    .unwrap();
    let padding = format!("# {}\n", "x".repeat(2000));
    std::fs::write(
        dir.path().join("big.yaml"),
        service("big", "198.18.100.51", "80") + &padding,
    )
    .unwrap();
    let mut source = FileSource::with_limits(
        dir.path(),
        FileLimits {
            max_file_bytes: 1024,
            ..FileLimits::default()
        },
    );
    let reconciler = &mut h.reconciler;
    let errors = source.scan_into(&mut |e| reconciler.stage(&e));
    assert!(errors.is_empty(), "{errors:?}");
    let report = h
        .reconciler
        .apply_events(&mut h.dataplane.services, &[])
        .unwrap();

    assert_eq!(report.rejected_objects, 1, "{report:?}");
    assert_eq!(rejected(&metrics, "File", "too_large"), Some(1.0));
    let frontends = h.dataplane.services.read().unwrap().services;
    let has = |ip: &str| {
        let (addr, family) = weir_agent::compile::addr_of(ip.parse().unwrap());
        frontends
            .keys()
            .any(|k| k.addr == addr && k.family == family)
    };
    assert!(has("198.18.100.50") && !has("198.18.100.51"));
}
