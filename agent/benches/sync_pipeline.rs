//! The sync pipeline without the kernel: a directory of 5,000 service files (Service and
//! EndpointSlice with 5 endpoints each, as the lab writes them) read, validated, admitted and
//! compiled, then one service's file rewritten and taken through the same path. Prints the time
//! of each phase, the peak RSS of this process, and the update cost as a ratio to the full sync
//! measured in the same run. The end-to-end figures (maps written, against iptables-restore) are
//! `weir-lab bench sync-baseline`'s; this one shows where the agent's own time and memory go.

use std::collections::BTreeSet;
use std::time::Instant;

use weir_agent::admission::{Admission, Limits};
use weir_agent::compile::{CompileOptions, Compiler, ServiceInput};
use weir_agent::intent::ObjectRef;
use weir_agent::source::{FileSource, IntentStore};
use weir_agent::state::DataplaneState;

const SERVICES: usize = 5000;
const ENDPOINTS: usize = 5;

fn service_file(i: usize, generation: usize) -> String {
    let vip = format!("198.18.{}.{}", 100 + i / 250, i % 250 + 1);
    let mut text = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: default\n\
         spec:\n  clusterIP: {vip}\n  clusterIPs:\n  - {vip}\n  ipFamilies:\n  - IPv4\n\
         \x20 ipFamilyPolicy: SingleStack\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n\
         \x20   targetPort: 8080\n  selector:\n    app: svc-{i}\n  sessionAffinity: None\n  type: ClusterIP\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abcde\n\
         \x20 namespace: default\n  labels:\n    endpointslice.kubernetes.io/managed-by: weir-lab\n\
         \x20   kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nendpoints:\n"
    );
    for e in 0..ENDPOINTS {
        let pod = (i * ENDPOINTS + e + generation) % 60_000;
        text.push_str(&format!(
            "- addresses:\n  - 198.19.{}.{}\n  conditions:\n    ready: true\n    serving: true\n\
             \x20   terminating: false\n  nodeName: node{}\n  targetRef:\n    kind: Pod\n\
             \x20   name: pod-{pod}\n    namespace: default\n",
            pod / 250,
            pod % 250 + 1,
            pod % 3 + 1
        ));
    }
    text.push_str("ports:\n- name: http\n  port: 8080\n  protocol: TCP\n");
    text
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct Pipeline {
    store: IntentStore,
    admission: Admission,
    compiler: Compiler,
}

impl Pipeline {
    /// Admits and compiles what the store marked changed; returns the services and the writes.
    fn pass(&mut self) -> (usize, usize) {
        let dirty: BTreeSet<ObjectRef> = self.store.take_dirty();
        let options = CompileOptions::default();
        self.admission
            .admit(&self.store, &dirty, Limits::default(), &options);
        let intent = self.store.intent();
        let inputs: Vec<ServiceInput<'_>> = dirty
            .iter()
            .map(|id| ServiceInput {
                id,
                service: intent.services.get(id),
                slices: self.store.slices_of(id).collect(),
            })
            .collect();
        let plan = self.compiler.compile(&inputs, &intent.nodes, &options);
        self.compiler.commit(&plan);
        (dirty.len(), plan.writes())
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..SERVICES {
        std::fs::write(dir.path().join(format!("svc-{i}.yaml")), service_file(i, 0)).unwrap();
    }
    let baseline = peak_rss_mib();
    let mut source = FileSource::new(dir.path());
    let mut p = Pipeline {
        store: IntentStore::default(),
        admission: Admission::default(),
        compiler: Compiler::adopt(DataplaneState::default()),
    };

    if std::env::var_os("SYNC_PIPELINE_PARSE_ONLY").is_some() {
        let started = Instant::now();
        source.scan_into(&mut |e| drop(e));
        println!(
            "parse only: {:.1} ms, rss {:.1} MiB, peak {:.1} MiB",
            started.elapsed().as_secs_f64() * 1e3,
            rss_mib(),
            peak_rss_mib()
        );
        return;
    }
    let started = Instant::now();
    let errors = source.scan_into(&mut |e| p.store.handle(&e));
    assert!(errors.is_empty(), "{errors:?}");
    let read = started.elapsed();
    println!(
        "after read: rss {:.1} MiB, peak {:.1}",
        rss_mib(),
        peak_rss_mib()
    );
    let (services, writes) = p.pass();
    let full = started.elapsed();
    println!(
        "after compile: rss {:.1} MiB, peak {:.1}",
        rss_mib(),
        peak_rss_mib()
    );
    println!(
        "full sync of {SERVICES} services x {ENDPOINTS} endpoints: {:.1} ms (read+validate {:.1} ms, \
         admit+compile {:.1} ms), {services} services, {writes} writes",
        full.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3,
        (full - read).as_secs_f64() * 1e3,
    );

    let mut updates = Vec::new();
    for generation in 1..=20 {
        let i = SERVICES / 2;
        std::fs::write(
            dir.path().join(format!("svc-{i}.yaml")),
            service_file(i, generation),
        )
        .unwrap();
        let started = Instant::now();
        source.changes_into(&mut |e| p.store.handle(&e));
        let (recompiled, writes) = p.pass();
        updates.push(started.elapsed().as_secs_f64());
        assert_eq!(recompiled, 1);
        assert!(writes > 0);
    }
    updates.sort_by(f64::total_cmp);
    let median = updates[updates.len() / 2];
    println!(
        "one-service update (file changed -> plan): median {:.3} ms, max {:.3} ms; \
         median update / full sync = {:.5}",
        median * 1e3,
        updates[updates.len() - 1] * 1e3,
        median / full.as_secs_f64()
    );
    println!(
        "peak RSS {:.1} MiB (before reading: {:.1} MiB)",
        peak_rss_mib(),
        baseline
    );
}
