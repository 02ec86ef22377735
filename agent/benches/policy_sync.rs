//! NetworkPolicy sync at the scale, through the agent's policy pass into the real maps
//! (the BPF object loaded in a private mount namespace): 1,000 policies over 5,000 pods (100 of
//! them on this node, 50 namespaces, selectors by pod and namespace labels, ipBlocks with
//! excepts, port ranges, named ports) applied from empty (wall, CPU from getrusage, RSS), then
//! single changes, each timed from "object changed" (the intent and the change set updated) to
//! "plan written to the maps" (the pass returns):
//! - 200 pod label changes, 50 policy changes, 50 namespace label changes, incrementally;
//! - the same kinds of change with a full recompile and whole-state diff (`everything`), the
//!   way every pass worked before the compile was incremental, for the ratio.
//!
//! Run: `cargo bench -p weir-agent --bench policy_sync` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_agent::dataplane::Dataplane;
use weir_agent::intent::ObjectRef;
use weir_agent::policy::intent::{NamedPort, PolicyProtocol};
use weir_agent::policy::{
    NamespaceIntent, PodIntent, PolicyChanges, PolicyIntent, PolicyIntents, PolicyReconciler,
};
use weir_common::NodeConfig;

const NODE: &str = "n1";
const NAMESPACES: u32 = 50;
const PODS: u32 = 5000;
/// Pods on this node (the first ones, two in every namespace).
const LOCAL_PODS: u32 = 100;
const POLICIES: u32 = 1000;
const TEAMS: u32 = 10;
const TIERS: u32 = 5;

const LABEL_CHANGES: u32 = 200;
const POLICY_CHANGES: u32 = 50;
const NAMESPACE_CHANGES: u32 = 50;
/// Full recompiles measured per kind of change, for the ratio.
const FULL_CHANGES: u32 = 20;

fn pod_id(i: u32) -> ObjectRef {
    ObjectRef {
        namespace: format!("ns{}", i % NAMESPACES),
        name: format!("p{i}"),
    }
}

fn pod(i: u32) -> PodIntent {
    PodIntent {
        id: pod_id(i),
        node: if i < LOCAL_PODS { NODE } else { "n2" }.to_owned(),
        labels: [
            ("app".to_owned(), format!("a{}", i % 20)),
            ("tier".to_owned(), format!("t{}", i % TIERS)),
        ]
        .into(),
        addresses: vec![format!("198.18.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .unwrap()],
        named_ports: [NamedPort {
            name: "http".to_owned(),
            protocol: PolicyProtocol::Tcp,
            port: 8080 + (i % 3) as u16,
        }]
        .into(),
    }
}

fn namespace(n: u32, team: u32) -> NamespaceIntent {
    let name = format!("ns{n}");
    NamespaceIntent {
        labels: [
            ("kubernetes.io/metadata.name".to_owned(), name.clone()),
            ("team".to_owned(), format!("t{team}")),
        ]
        .into(),
        name,
    }
}

/// Policy `j`: ingress from pods of a tier in the namespaces of a team, and from a /16 less a
/// /24, on port `port`, a 101-port range and the named port; egress to another app's pods on
/// the named port.
fn policy(j: u32, team: u32, port: u32) -> PolicyIntent {
    let spec = format!(
        "metadata: {{name: pol{j}, namespace: ns{ns}}}\nspec:\n\
         \x20 podSelector: {{matchLabels: {{app: a{a}}}}}\n  ingress:\n\
         \x20 - from: [{{namespaceSelector: {{matchLabels: {{team: t{team}}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [t{tier}]}}]}}}}, {{ipBlock: {{cidr: 10.{b}.0.0/16, except: [10.{b}.{c}.0/24]}}}}]\n\
         \x20   ports: [{{port: {port}}}, {{port: 8000, endPort: 8100}}, {{port: http}}]\n  egress:\n\
         \x20 - to: [{{podSelector: {{matchLabels: {{app: a{e}}}}}}}]\n    ports: [{{port: http}}]\n",
        ns = j % NAMESPACES,
        a = j % 20,
        tier = j % TIERS,
        b = j % 250,
        c = j % 200,
        e = (j + 1) % 20,
    );
    let object: NetworkPolicy = serde_yaml::from_str(&spec).unwrap();
    PolicyIntent::try_from(&object).unwrap()
}

fn cluster() -> PolicyIntents {
    let mut intents = PolicyIntents::default();
    for n in 0..NAMESPACES {
        let ns = namespace(n, n % TEAMS);
        intents.namespaces.insert(ns.name.clone(), ns);
    }
    for i in 0..PODS {
        let p = pod(i);
        intents.pods.insert(p.id.clone(), p);
    }
    for j in 0..POLICIES {
        let p = policy(j, j % TEAMS, 80);
        intents.policies.insert(p.id.clone(), p);
    }
    intents
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

/// A line of /proc/self/status in MiB (VmRSS: resident now, VmHWM: peak).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The policy pass and the maps it writes.
struct Agent {
    policy: PolicyReconciler,
    dataplane: Dataplane,
    node_config: NodeConfig,
}

impl Agent {
    /// One pass for `changes`; returns its map writes.
    fn pass(&mut self, intents: &PolicyIntents, changes: &PolicyChanges) -> usize {
        self.policy
            .pass(
                intents,
                changes,
                &mut self.dataplane.policy,
                &mut self.dataplane.node,
                &mut self.node_config,
                None,
            )
            .expect("policy pass")
    }
}

/// This thread's CPU time: what a pass costs without the time the machine's other work took
/// the core away (2 shared cores).
fn thread_cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    let now = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32)
}

/// Wall and CPU times of single changes, and their writes.
#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    cpu: Vec<Duration>,
    writes: Vec<usize>,
}

/// The nearest-rank percentile.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank - 1]
}

impl Samples {
    fn add(&mut self, time: Duration, cpu: Duration, writes: usize) {
        self.times.push(time);
        self.cpu.push(cpu);
        self.writes.push(writes);
    }

    fn row(&self, name: &str) {
        let mut writes = self.writes.clone();
        writes.sort();
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        println!(
            "{name:<31} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}",
            self.times.len(),
            ms(percentile(&self.times, 50.0)),
            ms(percentile(&self.times, 99.0)),
            ms(*self.times.iter().max().unwrap()),
            ms(percentile(&self.cpu, 50.0)),
            ms(percentile(&self.cpu, 99.0)),
            writes[writes.len() / 2],
            writes[writes.len() - 1],
        );
    }
}

/// A change of one kind: the `round`th one, applied to the intent; returns what changed.
type Change = fn(&mut PolicyIntents, u32) -> PolicyChanges;

/// A pod's tier label moves on (local pods and others in turn).
fn label_change(intents: &mut PolicyIntents, round: u32) -> PolicyChanges {
    let i = if round.is_multiple_of(2) {
        round / 2 % LOCAL_PODS
    } else {
        LOCAL_PODS + round * 37 % (PODS - LOCAL_PODS)
    };
    let id = pod_id(i);
    let pod = intents.pods.get_mut(&id).unwrap();
    let tier = &pod.labels["tier"][1..];
    let next = (tier.parse::<u32>().unwrap() + 1) % TIERS;
    pod.labels.insert("tier".to_owned(), format!("t{next}"));
    PolicyChanges {
        pods: [id].into(),
        ..PolicyChanges::default()
    }
}

/// A policy's peer team and first port change.
fn policy_change(intents: &mut PolicyIntents, round: u32) -> PolicyChanges {
    let j = round * 19 % POLICIES;
    let p = policy(j, (j + round + 1) % TEAMS, 80 + round % 2);
    let id = p.id.clone();
    intents.policies.insert(id.clone(), p);
    PolicyChanges {
        policies: [id].into(),
        ..PolicyChanges::default()
    }
}

/// A namespace's team label changes (each of its pods changes class).
fn namespace_change(intents: &mut PolicyIntents, round: u32) -> PolicyChanges {
    let n = round * 7 % NAMESPACES;
    let ns = namespace(n, (n + round + 1) % TEAMS);
    let name = ns.name.clone();
    intents.namespaces.insert(name.clone(), ns);
    PolicyChanges {
        namespaces: [name].into(),
        ..PolicyChanges::default()
    }
}

fn main() {
    common::require_root();
    let bpffs = common::private_bpffs(nix::sched::CloneFlags::empty());
    let dataplane = common::load_pinned(bpffs.path());
    let node_config = dataplane.node.config().unwrap();
    let mut agent = Agent {
        policy: PolicyReconciler::new(NODE, true),
        dataplane,
        node_config,
    };
    let mut intents = cluster();

    let rss_before = status_mib("VmRSS:");
    let (cpu, started) = (cpu_time(), Instant::now());
    let writes = agent.pass(&intents, &PolicyChanges::default());
    let (wall, cpu) = (started.elapsed(), cpu_time() - cpu);
    let report = agent.policy.last().report.clone();
    let state = &agent.policy.last().state;
    println!(
        "from empty: {POLICIES} policies over {PODS} pods ({LOCAL_PODS} on this node, {NAMESPACES} namespaces)"
    );
    println!(
        "  wall {:.1} ms, CPU {:.1} ms, RSS {:.1} MiB (+{:.1} MiB, peak {:.1} MiB)",
        wall.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3,
        status_mib("VmRSS:"),
        status_mib("VmRSS:") - rss_before,
        status_mib("VmHWM:"),
    );
    println!(
        "  {} policies selecting local pods, {} isolated endpoints, {} peers, {} cidrs, {} rule entries: {writes} writes",
        report.policies,
        report.isolated_endpoints,
        state.peers.len(),
        state.cidrs.len(),
        report.rule_entries,
    );

    let kinds: [(&str, Change, u32); 3] = [
        ("pod label", label_change, LABEL_CHANGES),
        ("policy", policy_change, POLICY_CHANGES),
        ("namespace label", namespace_change, NAMESPACE_CHANGES),
    ];
    println!();
    println!(
        "{:<31} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "one change, to the maps",
        "n",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU p50",
        "CPU p99",
        "writes",
        "max wr"
    );
    let mut ratios = Vec::new();
    let mut round = 0;
    for (name, change, count) in kinds {
        let (mut incremental, mut full) = (Samples::default(), Samples::default());
        // The full recompiles interleaved with the incremental passes, so drift hits both.
        let total = count + FULL_CHANGES;
        for k in 0..total {
            // FULL_CHANGES of them, spread evenly.
            let whole = (k + 1) * FULL_CHANGES / total > k * FULL_CHANGES / total;
            let (started, cpu) = (Instant::now(), thread_cpu_time());
            let mut changes = change(&mut intents, round);
            changes.everything = whole;
            let writes = agent.pass(&intents, &changes);
            let (time, cpu) = (started.elapsed(), thread_cpu_time() - cpu);
            if whole { &mut full } else { &mut incremental }.add(time, cpu, writes);
            round += 1;
        }
        incremental.row(&format!("{name}, incremental"));
        full.row(&format!("{name}, full recompile"));
        ratios.push((
            name,
            percentile(&full.times, 50.0).as_secs_f64()
                / percentile(&incremental.times, 50.0).as_secs_f64(),
        ));
    }
    println!();
    for (name, ratio) in ratios {
        println!("{name}: the full recompile takes {ratio:.0}x the incremental pass (p50)");
    }
    // Both roads end at the same maps.
    let maps = agent.dataplane.policy.read().unwrap();
    assert_eq!(
        maps,
        agent.policy.last().state,
        "the maps hold the compiled state"
    );
}
