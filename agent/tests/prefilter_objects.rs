//! `PrefilterDenyList` objects through the file source into the real deny-list map, as the
//! agent's loop takes them: the source's events staged into the reconciler, the deny-list pass
//! (`DenyListReconciler::apply`), then the services' pass that reports rejections. Object
//! prefixes carry the object drop counter, the configuration's keep theirs; a refused object
//! keeps its last good version; deleting an object removes its prefixes. Every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use weir_agent::config::{AgentConfig, ConfigLayer};
use weir_agent::metrics::Metrics;
use weir_agent::prefilter::{DenyListReconciler, PrefilterState};
use weir_agent::reconcile::Reconciler;
use weir_agent::source::FileSource;
use weir_common::{counter, POLICY_CIDR_FIXED_BITS};

const PATIENCE: Duration = Duration::from_secs(10);

fn config(prefilter: &str) -> AgentConfig {
    let layer: ConfigLayer = toml::from_str(&format!(
        "node_name = \"n1\"\nstate_path = \"/s\"\n[prefilter]\n{prefilter}"
    ))
    .unwrap();
    layer.finish().unwrap()
}

fn deny_list(name: &str, cidrs: &[&str]) -> String {
    let cidrs: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: PrefilterDenyList\nmetadata: {{name: {name}}}\n\
         spec:\n  description: test\n  cidrs: [{}]\n",
        cidrs.join(", ")
    )
}

/// Writes as control planes and editors do: a hidden temporary file renamed into place.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The agent's loop over one state directory and the harness's maps.
struct Agent {
    harness: Harness,
    source: FileSource,
    reconciler: Reconciler,
    deny_lists: DenyListReconciler,
    metrics: std::sync::Arc<Metrics>,
}

impl Agent {
    fn new(dir: &Path, config: &AgentConfig) -> Agent {
        let mut harness = Harness::new(&[]);
        let mut deny_lists = DenyListReconciler::new(config).unwrap();
        deny_lists.start(&mut harness.dataplane.prefilter).unwrap();
        let metrics = std::sync::Arc::new(Metrics::new());
        let mut agent = Agent {
            harness,
            source: FileSource::new(dir),
            reconciler: Reconciler::new(Default::default(), Some(metrics.clone())),
            deny_lists,
            metrics,
        };
        let reconciler = &mut agent.reconciler;
        agent.source.scan_into(&mut |e| reconciler.stage(&e));
        agent.pass();
        agent
    }

    fn pass(&mut self) {
        let maps = &mut self.harness.dataplane.prefilter;
        (self.deny_lists)
            .apply(&mut self.reconciler, maps, Some(&self.metrics))
            .expect("deny-list pass");
        (self.reconciler)
            .apply_events(&mut self.harness.dataplane.services, &[])
            .expect("services pass");
    }

    /// Turns the loop until the map holds `wanted`, or panics after [`PATIENCE`].
    fn until(&mut self, wanted: &[(&str, u32)]) {
        let started = Instant::now();
        loop {
            let held = self.held();
            if held == expected(wanted) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "never {wanted:?}; held {held:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
            self.turn();
        }
    }

    /// One turn of the loop: what the source saw, then a pass.
    fn turn(&mut self) {
        let reconciler = &mut self.reconciler;
        self.source.changes_into(&mut |e| reconciler.stage(&e));
        self.source
            .rescan_if_due(Duration::from_millis(200), &mut |e| reconciler.stage(&e));
        self.pass();
    }

    /// The deny-list map as (prefix, drop counter).
    fn held(&self) -> BTreeMap<String, u32> {
        let PrefilterState { deny, .. } = self.harness.dataplane.prefilter.read().unwrap();
        (deny.into_iter())
            .map(|((key, bits), drop)| {
                let ip: IpAddr = weir_agent::compile::ip_of(&key.addr, key.family);
                (format!("{ip}/{}", bits - POLICY_CIDR_FIXED_BITS), drop)
            })
            .collect()
    }

    fn metric(&self, line_start: &str) -> Option<String> {
        let text = self.metrics.encode().unwrap();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .map(str::to_owned)
    }
}

fn expected(wanted: &[(&str, u32)]) -> BTreeMap<String, u32> {
    wanted.iter().map(|(p, c)| ((*p).to_owned(), *c)).collect()
}

const CONFIG: u32 = counter::PREFILTER_DROP_CONFIG;
const OBJECT: u32 = counter::PREFILTER_DROP_OBJECT;

#[test]
fn objects_and_configuration_fill_the_deny_list_and_a_refused_object_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "scanners.yaml",
        &deny_list("scanners", &["198.18.9.0/24", "198.19.7.7", "fd00:77::/32"]),
    );
    let config = config("enabled = true\ndeny = [\"198.18.9.0/24\"]\n");
    let mut agent = Agent::new(dir.path(), &config);
    // The configuration's prefix keeps its counter; the object's others carry the object's.
    agent.until(&[
        ("198.18.9.0/24", CONFIG),
        ("198.19.7.7/32", OBJECT),
        ("fd00:77::/32", OBJECT),
    ]);
    assert_eq!(
        agent.metric("weir_map_entries{map=\"WEIR_PREFILTER_DENY\"}"),
        Some("weir_map_entries{map=\"WEIR_PREFILTER_DENY\"} 3".into())
    );

    // A second object, then a bad version of the first: refused whole, counted, and its last
    // good version stays while the second applies.
    write(
        dir.path(),
        "more.yaml",
        &deny_list("more", &["198.19.8.0/24"]),
    );
    agent.until(&[
        ("198.18.9.0/24", CONFIG),
        ("198.19.7.7/32", OBJECT),
        ("198.19.8.0/24", OBJECT),
        ("fd00:77::/32", OBJECT),
    ]);
    write(
        dir.path(),
        "scanners.yaml",
        &deny_list("scanners", &["198.19.99.0/24", "198.19.0.0/33"]),
    );
    let rejected =
        "weir_rejected_objects_total{kind=\"PrefilterDenyList\",reason=\"invalid_cidr\"}";
    let started = Instant::now();
    while agent.metric(rejected).is_none() {
        assert!(
            started.elapsed() < PATIENCE,
            "the bad object was never rejected"
        );
        std::thread::sleep(Duration::from_millis(20));
        agent.turn();
    }
    assert_eq!(agent.metric(rejected), Some(format!("{rejected} 1")));
    // Its last good version stays in the map, beside the other object's.
    agent.until(&[
        ("198.18.9.0/24", CONFIG),
        ("198.19.7.7/32", OBJECT),
        ("198.19.8.0/24", OBJECT),
        ("fd00:77::/32", OBJECT),
    ]);

    // Fixed: the new version replaces the old one.
    write(
        dir.path(),
        "scanners.yaml",
        &deny_list("scanners", &["198.19.99.0/24"]),
    );
    agent.until(&[
        ("198.18.9.0/24", CONFIG),
        ("198.19.8.0/24", OBJECT),
        ("198.19.99.0/24", OBJECT),
    ]);
    // Deleted: its prefixes go; the configuration's and the other object's stay.
    std::fs::remove_file(dir.path().join("scanners.yaml")).unwrap();
    agent.until(&[("198.18.9.0/24", CONFIG), ("198.19.8.0/24", OBJECT)]);
    assert_eq!(
        agent.metric("weir_map_entries{map=\"WEIR_PREFILTER_DENY\"}"),
        Some("weir_map_entries{map=\"WEIR_PREFILTER_DENY\"} 2".into())
    );
}

#[test]
fn with_the_prefilter_off_objects_leave_the_deny_list_empty() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &deny_list("a", &["198.19.7.0/24"]));
    let mut agent = Agent::new(dir.path(), &config("deny = [\"198.18.9.0/24\"]\n"));
    agent.until(&[]);
    assert!(
        agent.reconciler.intent().deny_lists.contains_key("a"),
        "read, not written"
    );
}

/// A restarted agent keeps the object entries an earlier one wrote until its source has been
/// read, so a restart opens no hole in the deny-list; the first pass then writes what the
/// objects say.
#[test]
fn a_restart_keeps_object_entries_until_the_objects_are_read() {
    let config = config("enabled = true\ndeny = [\"198.18.9.0/24\"]\n");
    let mut harness = Harness::new(&[]);
    let mut first = DenyListReconciler::new(&config).unwrap();
    first.start(&mut harness.dataplane.prefilter).unwrap();
    let objects = BTreeMap::from([(
        "a".to_owned(),
        weir_agent::prefilter::DenyListIntent {
            name: "a".into(),
            prefixes: vec![weir_agent::prefilter::parse_prefix("198.19.7.0/24").unwrap()],
        },
    )]);
    first
        .pass(&objects, &mut harness.dataplane.prefilter)
        .unwrap()
        .unwrap();
    let mut second = DenyListReconciler::new(&config).unwrap();
    let report = second.start(&mut harness.dataplane.prefilter).unwrap();
    assert_eq!(
        (report.writes, report.entries),
        (0, 2),
        "nothing removed at start"
    );
    let report = second
        .pass(&BTreeMap::new(), &mut harness.dataplane.prefilter)
        .unwrap()
        .unwrap();
    assert_eq!(
        (report.writes, report.entries),
        (1, 1),
        "the object is gone now"
    );
    assert!(second
        .pass(&BTreeMap::new(), &mut harness.dataplane.prefilter)
        .is_none());
}

fn full_object(name: &str, block: u16, prefixes: usize) -> weir_agent::source::ObjectEvent {
    use weir_agent::prefilter::{PrefilterDenyList, PrefilterDenyListSpec};
    let object = PrefilterDenyList {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PrefilterDenyListSpec {
            cidrs: (0..prefixes)
                .map(|i| format!("fd00:{block:x}::{i:x}"))
                .collect(),
            description: None,
        }),
    };
    weir_agent::source::ObjectEvent::Apply(weir_agent::source::SourceObject::PrefilterDenyList(
        Box::new(object),
    ))
}

/// The map holds 262,144 prefixes: an object that would overflow it is refused whole
/// (`capacity`, counted), the others stay written, and deleting one makes room for it.
#[test]
fn an_object_that_would_overflow_the_map_is_refused_for_capacity() {
    use weir_agent::prefilter::MAX_PREFIXES_PER_OBJECT as FULL;
    let config = config("enabled = true\n");
    let mut harness = Harness::new(&[]);
    let metrics = std::sync::Arc::new(Metrics::new());
    let mut reconciler = Reconciler::new(Default::default(), Some(metrics.clone()));
    let mut deny_lists = DenyListReconciler::new(&config).unwrap();
    deny_lists.start(&mut harness.dataplane.prefilter).unwrap();
    let mut pass = |reconciler: &mut Reconciler, harness: &mut Harness| {
        let maps = &mut harness.dataplane.prefilter;
        deny_lists.apply(reconciler, maps, Some(&metrics)).unwrap();
        (reconciler)
            .apply_events(&mut harness.dataplane.services, &[])
            .unwrap();
        let text = metrics.encode().unwrap();
        let line = |start: &str| {
            (text.lines())
                .find(|l| l.starts_with(start))
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        (
            line("weir_map_entries{map=\"WEIR_PREFILTER_DENY\"}"),
            line("weir_rejected_objects_current{kind=\"PrefilterDenyList\",reason=\"capacity\"}"),
        )
    };
    // Four full objects fill the map; a fifth of one prefix does not fit. (Within one pass the
    // smallest goes first: the fifth and three full ones would be admitted, the fourth refused.)
    for block in 0..4u16 {
        reconciler.stage(&full_object(&format!("full-{block}"), block, FULL));
    }
    let (entries, refused) = pass(&mut reconciler, &mut harness);
    assert_eq!((entries.as_deref(), refused), (Some("262144"), None));
    reconciler.stage(&full_object("late", 9, 1));
    let (entries, refused) = pass(&mut reconciler, &mut harness);
    assert_eq!(entries.as_deref(), Some("262144"), "the full objects stay");
    assert_eq!(refused.as_deref(), Some("1"));
    let total = "weir_rejected_objects_total{kind=\"PrefilterDenyList\",reason=\"capacity\"} 1";
    assert!(metrics.encode().unwrap().contains(total));
    // Deleting one full object frees its room in the same pass: `late` is admitted.
    reconciler.stage(&weir_agent::source::ObjectEvent::Delete(
        weir_agent::source::ObjectKey::PrefilterDenyList("full-0".into()),
    ));
    let (entries, refused) = pass(&mut reconciler, &mut harness);
    assert_eq!(entries.as_deref(), Some(&*(3 * FULL + 1).to_string()));
    assert_eq!(refused, None, "no longer refused");
}
