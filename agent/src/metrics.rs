//! What the agent tells Prometheus, and the health it reports to the kubelet.
//!
//! Most values are pushed as the work happens (sync durations and rejections by the loop,
//! conntrack table sizes by the collector's thread); the data path's per-CPU counters are read
//! from their BPF map at scrape time, so a scrape always shows the kernel's current numbers, also
//! while the loop is busy.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::dataplane::Counters;
use weir_common::counter;

/// `kind` and `reason` of a rejected object, e.g. ("Service", "invalid_port").
pub type RejectionLabels = [(&'static str, String); 2];

pub fn rejection_labels(kind: &str, reason: &str) -> RejectionLabels {
    [("kind", kind.to_owned()), ("reason", reason.to_owned())]
}

/// Which of the agent's HTTP listeners: "metrics", "healthz" or "health_check".
pub type ListenerLabel = [(&'static str, &'static str); 1];
/// A listener and why it closed a connection early: "evicted" (the oldest idle connection, to
/// make room), "over_limit" (a new one, every slot being mid-request) or "timeout".
pub type ClosedConnectionLabels = [(&'static str, &'static str); 2];

/// Which map: its name as pinned, e.g. `WEIR_CONNTRACK`.
pub type MapLabel = [(&'static str, &'static str); 1];
/// A conntrack table: "established" or "new" (flows not answered yet).
pub type TableLabel = [(&'static str, &'static str); 1];

/// The agent's metrics. Cheap to share: every field is an atomic or a locked map.
pub struct Metrics {
    registry: Registry,
    /// Frontends (address, port, protocol) in the service map after the last sync.
    pub services: Gauge,
    pub backends: Gauge,
    /// NetworkPolicies selecting at least one of this node's pods, after the last policy pass.
    pub policies: Gauge,
    /// This node's pods a NetworkPolicy isolates.
    pub policy_endpoints: Gauge,
    /// Entries in `WEIR_POLICY_RULES`.
    pub policy_rule_entries: Gauge,
    /// Entries in each conntrack table, as counted by the last garbage collection.
    pub conntrack_entries: Family<TableLabel, Gauge>,
    pub conntrack_reclaimed: Counter,
    /// Entries the LRU evicted, estimated (see [`crate::conntrack::EvictionEstimate`]).
    pub conntrack_evictions: Counter,
    /// Wall time of one reconcile pass: objects to intent to plan to map writes.
    pub sync_duration: Histogram,
    /// When the last pass that wrote its whole plan ended (Unix seconds), and how long it took.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_sync_duration: Gauge<f64, AtomicU64>,
    pub map_writes: Counter,
    /// Passes that could not write everything (retried on the next tick): counted by
    /// [`Metrics::record_pass`].
    pub reconcile_errors: Counter,
    /// 1 when the last pass wrote everything, 0 when it failed.
    pub last_sync_success: Gauge,
    /// Entries each map holds, as last known without scanning it (see the README).
    pub map_entries: Family<MapLabel, Gauge>,
    /// Entries each map can hold (`[maps]`).
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Entries copied at start from a conntrack (or affinity) map the agent replaced.
    pub carried_over_entries: Family<MapLabel, Counter>,
    /// Replaced maps whose entries could not be copied (other key or value size): set aside.
    pub maps_not_carried_over: Family<MapLabel, Counter>,
    /// The desired-state source could not be read (the last good state stays).
    pub source_errors: Counter,
    /// Objects that newly failed validation, by kind and reason.
    pub rejected_total: Family<RejectionLabels, Counter>,
    /// Objects rejected in the latest pass, by kind and reason.
    pub rejected_now: Family<RejectionLabels, Gauge>,
    /// Interfaces carrying the ingress program.
    pub attached_interfaces: Gauge,
    /// healthCheckNodePort listeners open now.
    pub health_check_listeners: Gauge,
    /// healthCheckNodePort ports that could not be bound (each failed attempt).
    pub health_check_bind_errors: Counter,
    /// Connections open now, by listener.
    pub http_connections: Family<ListenerLabel, Gauge>,
    /// Connections the agent closed before the client did, by listener and reason.
    pub http_connections_closed: Family<ClosedConnectionLabels, Counter>,
    /// Map entries found changed behind the agent's back and written back, by map.
    pub drift_repaired: Family<MapLabel, Counter>,
    /// Weir programs of another agent (another pin directory or version) attached to an
    /// interface next to this agent's own.
    pub foreign_programs: Gauge,
    /// What the policy maps' ids stand for after the last policy pass, served at `/policy`
    /// for `weir-agent dump policy` (not a metric: kept here as the state the HTTP thread
    /// already shares).
    pub policy_names: std::sync::Mutex<crate::policy::PolicyNames>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let metrics = Metrics {
            services: Gauge::default(),
            backends: Gauge::default(),
            policies: Gauge::default(),
            policy_endpoints: Gauge::default(),
            policy_rule_entries: Gauge::default(),
            conntrack_entries: Family::default(),
            conntrack_reclaimed: Counter::default(),
            conntrack_evictions: Counter::default(),
            // 100 µs to ~3.3 s: an incremental update sits at the bottom, a full sync of tens of
            // thousands of entries near the top.
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            last_sync_timestamp: Gauge::default(),
            last_sync_duration: Gauge::default(),
            map_writes: Counter::default(),
            reconcile_errors: Counter::default(),
            last_sync_success: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            carried_over_entries: Family::default(),
            maps_not_carried_over: Family::default(),
            source_errors: Counter::default(),
            rejected_total: Family::default(),
            rejected_now: Family::default(),
            attached_interfaces: Gauge::default(),
            health_check_listeners: Gauge::default(),
            health_check_bind_errors: Counter::default(),
            http_connections: Family::default(),
            http_connections_closed: Family::default(),
            drift_repaired: Family::default(),
            foreign_programs: Gauge::default(),
            policy_names: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "weir_services",
            "Service frontends (address, port, protocol) programmed in the maps",
            metrics.services.clone(),
        );
        registry.register(
            "weir_backends",
            "Distinct backends programmed in the maps",
            metrics.backends.clone(),
        );
        registry.register(
            "weir_policies",
            "NetworkPolicies that select at least one of this node's pods",
            metrics.policies.clone(),
        );
        registry.register(
            "weir_policy_endpoints",
            "This node's pods that a NetworkPolicy isolates (ingress, egress or both)",
            metrics.policy_endpoints.clone(),
        );
        registry.register(
            "weir_policy_rule_entries",
            "Entries in the policy rule map (endpoint, peer identity, direction, port prefix)",
            metrics.policy_rule_entries.clone(),
        );
        registry.register(
            "weir_conntrack_entries",
            "Connection tracking entries by table (established; new: flows not answered yet, \
             what a flood fills), as counted by the last garbage collection",
            metrics.conntrack_entries.clone(),
        );
        registry.register(
            "weir_conntrack_reclaimed",
            "Expired connection tracking entries removed by garbage collection",
            metrics.conntrack_reclaimed.clone(),
        );
        registry.register(
            "weir_conntrack_evictions",
            "Connection tracking entries the kernel's LRU evicted to make room for new flows, \
             derived from entries created minus reclaimed minus present (the LRU map does not \
             report evictions)",
            metrics.conntrack_evictions.clone(),
        );
        registry.register(
            "weir_sync_duration_seconds",
            "Wall time of one reconcile pass, from source objects to map writes",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "weir_last_sync_timestamp_seconds",
            "When the last reconcile pass that wrote its whole plan ended (Unix time)",
            metrics.last_sync_timestamp.clone(),
        );
        registry.register(
            "weir_last_sync_duration_seconds",
            "Wall time of the last reconcile pass that wrote its whole plan",
            metrics.last_sync_duration.clone(),
        );
        registry.register(
            "weir_map_writes",
            "Map entries written or deleted by reconcile passes",
            metrics.map_writes.clone(),
        );
        registry.register(
            "weir_reconcile_errors",
            "Reconcile passes that failed to write the desired state (a service or tunnel peer \
             map write failed; retried, and the node is not ready until a pass succeeds)",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "weir_last_sync_success",
            "1 when the last reconcile pass wrote the desired state, 0 when it failed",
            metrics.last_sync_success.clone(),
        );
        registry.register(
            "weir_map_entries",
            "Entries in each map, as the agent last wrote or counted them (service and node \
             maps after each pass, conntrack at each garbage collection)",
            metrics.map_entries.clone(),
        );
        registry.register(
            "weir_map_capacity",
            "Entries each map can hold ([maps] in the configuration)",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "weir_carried_over_entries",
            "Entries copied at start from a map the agent replaced (a capacity change or a new \
             map layout), by map",
            metrics.carried_over_entries.clone(),
        );
        registry.register(
            "weir_maps_not_carried_over",
            "Maps replaced at start whose entries could not be copied (another key or value \
             size): left set aside as NAME_INCOMPATIBLE",
            metrics.maps_not_carried_over.clone(),
        );
        registry.register(
            "weir_source_errors",
            "Times the desired-state source could not be read (the last good state was kept)",
            metrics.source_errors.clone(),
        );
        registry.register(
            "weir_rejected_objects",
            "Objects that became invalid, by kind and reason (each keeps its last good version)",
            metrics.rejected_total.clone(),
        );
        registry.register(
            "weir_rejected_objects_current",
            "Objects rejected by the latest reconcile pass, by kind and reason",
            metrics.rejected_now.clone(),
        );
        registry.register(
            "weir_attached_interfaces",
            "Interfaces with the ingress program attached",
            metrics.attached_interfaces.clone(),
        );
        registry.register(
            "weir_health_check_listeners",
            "healthCheckNodePort listeners open (Services with externalTrafficPolicy Local)",
            metrics.health_check_listeners.clone(),
        );
        registry.register(
            "weir_health_check_bind_errors",
            "Attempts to open a healthCheckNodePort listener that failed (retried)",
            metrics.health_check_bind_errors.clone(),
        );
        registry.register(
            "weir_http_connections",
            "Connections open on the agent's HTTP listeners (metrics, healthz, health_check)",
            metrics.http_connections.clone(),
        );
        registry.register(
            "weir_http_connections_closed",
            "Connections the agent closed early: evicted (the oldest idle one, to make room \
             under http.max_connections), over_limit (a new one, every slot mid-request), \
             timeout (http.header_timeout or http.connection_timeout)",
            metrics.http_connections_closed.clone(),
        );
        registry.register(
            "weir_drift_repaired",
            "Map entries found changed outside the agent (compared with what it wrote) and \
             written back, by map",
            metrics.drift_repaired.clone(),
        );
        registry.register(
            "weir_foreign_programs",
            "Weir programs not belonging to this agent (a stale or other pin directory) \
             attached to the interfaces it serves",
            metrics.foreign_programs.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts entries of `map` the drift check wrote back.
    pub fn record_drift(&self, map: &'static str, entries: usize) {
        if entries > 0 {
            self.drift_repaired
                .get_or_create(&[("map", map)])
                .inc_by(entries as u64);
        }
    }

    /// Sets the entries of conntrack table `table` ("established" or "new").
    pub fn set_conntrack_entries(&self, table: &'static str, entries: usize) {
        self.conntrack_entries
            .get_or_create(&[("table", table)])
            .set(entries as i64);
    }

    /// Adds the data path's counters, read from `counters` at every scrape.
    pub fn with_datapath(mut self, counters: Counters) -> Metrics {
        self.registry
            .register_collector(Box::new(DatapathCollector(Mutex::new(counters))));
        self
    }

    /// The entries `map` holds now.
    pub fn set_map_entries(&self, map: &'static str, entries: usize) {
        self.map_entries
            .get_or_create(&[("map", map)])
            .set(entries as i64);
    }

    /// What every configured map can hold, once at start.
    pub fn set_map_capacities(&self, maps: &crate::config::MapsConfig) {
        for c in maps.capacities() {
            self.map_capacity
                .get_or_create(&[("map", c.map)])
                .set(i64::from(c.entries));
        }
    }

    /// What carrying replaced maps over did (see `pin_layout`).
    pub fn record_carry_over(&self, report: &crate::pin_layout::CarryReport) {
        for (map, entries) in &report.copied {
            self.carried_over_entries
                .get_or_create(&[("map", *map)])
                .inc_by(*entries as u64);
        }
        for (map, _) in &report.not_carried {
            self.maps_not_carried_over
                .get_or_create(&[("map", *map)])
                .inc();
        }
    }

    /// One reconcile pass's outcome: failures counted, the last one's success as a gauge.
    pub fn record_pass(&self, ok: bool) {
        if !ok {
            self.reconcile_errors.inc();
        }
        self.last_sync_success.set(i64::from(ok));
    }

    /// The text exposition format, as `/metrics` serves it.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Records the objects rejected by one pass: the current gauge is replaced, and the counter
    /// counts only objects that were not already rejected for the same reason by the previous
    /// pass, so a source that resends everything (the file source, a relist) does not inflate it.
    pub fn record_rejections(
        &self,
        previous: &BTreeSet<(String, String, String)>,
        current: &BTreeSet<(String, String, String)>,
    ) {
        self.rejected_now.clear();
        for (kind, _object, reason) in current {
            self.rejected_now
                .get_or_create(&rejection_labels(kind, reason))
                .inc();
        }
        for (kind, _object, reason) in current.difference(previous) {
            self.rejected_total
                .get_or_create(&rejection_labels(kind, reason))
                .inc();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Every per-CPU counter of the data path, summed over CPUs: one family with every outcome, the
/// drop outcomes again as drops by reason, which is what alerts are written against, and the
/// events that are no outcome (conntrack promotions).
struct DatapathCollector(Mutex<Counters>);

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let rows = match self.0.lock().map(|c| c.read()) {
            Ok(Ok(rows)) => rows,
            // A scrape must not fail because the map could not be read: the other metrics still
            // tell something, and the missing family is itself visible.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading data path counters for /metrics");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let mut packets = encoder.encode_descriptor(
            "weir_datapath_packets",
            "Packets seen by the ingress program, by outcome (exactly one per packet)",
            None,
            MetricType::Counter,
        )?;
        let (outcomes, events) = rows.split_at(counter::OUTCOMES as usize);
        for (name, value) in outcomes {
            let labels = [("outcome", *name)];
            ConstCounter::new(*value).encode(packets.encode_family(&labels)?)?;
        }
        let mut drops = encoder.encode_descriptor(
            "weir_datapath_drops",
            "Packets dropped by the ingress program, by reason",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in outcomes {
            if let Some(reason) = name.strip_prefix("drop_") {
                let labels = [("reason", reason)];
                ConstCounter::new(*value).encode(drops.encode_family(&labels)?)?;
            }
        }
        let event = |index: u32| {
            events
                .iter()
                .find(|(name, _)| *name == counter::NAMES[index as usize])
                .map_or(0, |(_, value)| *value)
        };
        let promoted = event(counter::CT_PROMOTED);
        ConstCounter::new(promoted).encode(encoder.encode_descriptor(
            "weir_conntrack_promotions",
            "Flows the data path moved from the new-flow conntrack table to the established one \
             once answered; new flows (weir_datapath_packets ct_new_*) less these are flows \
             never answered, as a flood leaves them",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(event(counter::CT_COLLISION_RESOLVED)).encode(
            encoder.encode_descriptor(
                "weir_conntrack_collisions_resolved",
                "New flows whose reply key another flow held (one client address and port \
                 reaching one backend through two frontends), given another source port towards \
                 the backend; those that found none are dropped (weir_datapath_drops \
                 ct_collision)",
                None,
                MetricType::Counter,
            )?,
        )?;
        ConstCounter::new(event(counter::FRAGMENT_REPLAY_FAILED)).encode(
            encoder.encode_descriptor(
                "weir_fragments_replay_failed",
                "Later fragments held for their first fragment (weir_datapath_packets \
                 fragment_held) but not replayed behind it: held over a second, or a helper \
                 failed; their datagrams are lost",
                None,
                MetricType::Counter,
            )?,
        )?;
        let mut forwarding = encoder.encode_descriptor(
            "weir_datapath_forwarded",
            "Translated packets by who sent them to their next hop: weir (a FIB lookup and a \
             redirect into a local pod or out of a host interface) or stack (the FIB had no \
             forwarding answer, or the TTL was about to expire)",
            None,
            MetricType::Counter,
        )?;
        for (by, index) in [
            ("weir", counter::FORWARDED),
            ("stack", counter::FORWARD_TO_STACK),
        ] {
            ConstCounter::new(event(index)).encode(forwarding.encode_family(&[("by", by)])?)?;
        }
        ConstCounter::new(event(counter::POLICY_ALLOWED)).encode(encoder.encode_descriptor(
            "weir_policy_flows_allowed",
            "Flows to or from pods a NetworkPolicy isolates that its rules allowed and the data \
             path recorded; what they denied is in weir_datapath_drops (policy_ingress, \
             policy_egress)",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(event(counter::MONITOR_LOST)).encode(encoder.encode_descriptor(
            "weir_monitor_events_lost",
            "Flow events for weir-agent monitor that found its ring buffer full (the monitor \
             read slower than the data path wrote); the packets were not affected",
            None,
            MetricType::Counter,
        )?)?;
        let mut prefilter = encoder.encode_descriptor(
            "weir_prefilter_packets",
            "Packets the XDP pre-filter judged on host interfaces: dropped for a source on the \
             configuration's deny-list (config) or a PrefilterDenyList object's (object), or \
             passed to an inbound failsafe port although deny-listed (failsafe); packets from \
             other sources are not counted",
            None,
            MetricType::Counter,
        )?;
        for (verdict, list, index) in [
            ("dropped", "config", counter::PREFILTER_DROP_CONFIG),
            ("dropped", "object", counter::PREFILTER_DROP_OBJECT),
            ("passed", "failsafe", counter::PREFILTER_PASS_FAILSAFE),
        ] {
            ConstCounter::new(event(index))
                .encode(prefilter.encode_family(&[("verdict", verdict), ("by", list)])?)?;
        }
        Ok(())
    }
}

/// What `/healthz` and `/readyz` report, updated by the main loop; also the state behind
/// kube-proxy's healthz ([`Health::proxier`]).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the loop's last turn.
    last_beat_ms: AtomicU64,
    /// The loop counts as wedged when it has not turned for this long.
    stall_after: Duration,
    synced: AtomicBool,
    /// Why the last reconcile pass failed to write, until one succeeds: the node is not ready
    /// while it cannot apply what it is told.
    sync_failure: Mutex<Option<String>>,
    /// Configured host interfaces without the program, for `/readyz` to name.
    unattached_host_interfaces: Mutex<Vec<String>>,
    /// An update left unapplied for longer than this makes the proxier unhealthy.
    sync_timeout: Duration,
    sync: Mutex<SyncProgress>,
    /// This node is neither being deleted nor tainted for deletion by the cluster autoscaler.
    node_eligible: AtomicBool,
}

/// kube-proxy's sync bookkeeping (`pkg/proxy/healthcheck/proxier_health.go`).
#[derive(Debug, Default)]
struct SyncProgress {
    /// The last pass that wrote the desired state.
    last_updated: Option<SystemTime>,
    /// The oldest change seen and not yet written; None when everything seen is written.
    oldest_pending: Option<Instant>,
}

/// What kube-proxy's `/healthz` and `/livez` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxierStatus {
    /// No change has waited longer than the sync timeout, and the main loop turns.
    pub healthy: bool,
    /// The last successful pass; as kube-proxy does, `current_time` when healthy.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    pub node_eligible: bool,
}

/// kube-proxy's health timeout: twice its default 30 s `syncPeriod`.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer to a health probe: good or not, and a line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub message: String,
}

impl Health {
    pub fn new(stall_after: Duration) -> Health {
        Health {
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stall_after,
            synced: AtomicBool::new(false),
            sync_failure: Mutex::new(None),
            unattached_host_interfaces: Mutex::new(Vec::new()),
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            sync: Mutex::new(SyncProgress::default()),
            // As kube-proxy: eligible until a Node object says otherwise.
            node_eligible: AtomicBool::new(true),
        }
    }

    /// How long a change may wait unapplied before the proxier counts as unhealthy.
    pub fn with_sync_timeout(mut self, timeout: Duration) -> Health {
        self.sync_timeout = timeout;
        self
    }

    /// The loop has seen a change it has not written yet (kube-proxy's `QueuedUpdate`): only the
    /// oldest pending change's time is kept.
    pub fn queued_update(&self) {
        if let Ok(mut sync) = self.sync.lock() {
            sync.oldest_pending.get_or_insert_with(Instant::now);
        }
    }

    /// A pass wrote everything seen so far (kube-proxy's `Updated`).
    pub fn updated(&self) {
        if let Ok(mut sync) = self.sync.lock() {
            sync.oldest_pending = None;
            sync.last_updated = Some(SystemTime::now());
        }
    }

    /// From this node's Node object: false while it is being deleted or is tainted
    /// `ToBeDeletedByClusterAutoscaler`, so load balancers drain it first.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// kube-proxy's proxier health: healthy while starting, when fully synced, or when the
    /// oldest unwritten change is younger than the sync timeout. A main loop that stopped
    /// turning (it cannot even see changes then) is unhealthy too.
    pub fn proxier(&self) -> ProxierStatus {
        let current_time = SystemTime::now();
        let (oldest_pending, last_updated) = self
            .sync
            .lock()
            .map(|s| (s.oldest_pending, s.last_updated))
            .unwrap_or((None, None));
        let in_time = oldest_pending.is_none_or(|since| since.elapsed() < self.sync_timeout);
        let healthy = in_time && self.liveness().ok;
        ProxierStatus {
            healthy,
            last_updated: if healthy {
                Some(current_time)
            } else {
                last_updated
            },
            current_time,
            node_eligible: self.node_eligible.load(Ordering::Relaxed),
        }
    }

    /// The loop calls this every time it turns.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// The first reconcile pass has written the desired state.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// A reconcile pass wrote everything it was given: synced, updated, and a failure before
    /// it forgotten.
    pub fn sync_succeeded(&self) {
        self.set_synced();
        self.updated();
        if let Ok(mut failure) = self.sync_failure.lock() {
            *failure = None;
        }
    }

    /// A reconcile pass failed to write (a map write error): not ready, saying why, until a
    /// later pass succeeds. Objects refused as bad input are not failures: the pass wrote
    /// everything else.
    pub fn sync_failed(&self, reason: String) {
        if let Ok(mut failure) = self.sync_failure.lock() {
            *failure = Some(reason);
        }
    }

    pub fn set_unattached_host_interfaces(&self, missing: Vec<String>) {
        if let Ok(mut guard) = self.unattached_host_interfaces.lock() {
            *guard = missing;
        }
    }

    /// Alive: the loop turned recently.
    pub fn liveness(&self) -> Probe {
        let now = self.started.elapsed();
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        let quiet = now.saturating_sub(last);
        if quiet > self.stall_after {
            Probe {
                ok: false,
                message: format!(
                    "main loop has not turned for {}",
                    humantime::format_duration(Duration::from_millis(quiet.as_millis() as u64))
                ),
            }
        } else {
            Probe {
                ok: true,
                message: "ok".into(),
            }
        }
    }

    /// Ready: alive, the first sync is done, the last one did not fail, and every host
    /// interface carries the program.
    pub fn readiness(&self) -> Probe {
        let live = self.liveness();
        if !live.ok {
            return live;
        }
        let failure = self.sync_failure.lock().ok().and_then(|f| f.clone());
        if let Some(reason) = failure {
            return Probe {
                ok: false,
                message: format!("the last sync failed to write: {reason}"),
            };
        }
        if !self.synced.load(Ordering::Relaxed) {
            return Probe {
                ok: false,
                message: "first sync not done yet".into(),
            };
        }
        let missing = self
            .unattached_host_interfaces
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        if !missing.is_empty() {
            return Probe {
                ok: false,
                message: format!("program not attached to {}", missing.join(", ")),
            };
        }
        Probe {
            ok: true,
            message: "ok".into(),
        }
    }
}

/// Everything the operations endpoint serves.
#[derive(Debug, Clone)]
pub struct Ops {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_beat_a_sync_and_every_host_interface() {
        let health = Health::new(Duration::from_secs(60));
        health.beat();
        assert!(health.liveness().ok);
        let probe = health.readiness();
        assert!(!probe.ok && probe.message.contains("sync"), "{probe:?}");
        health.set_synced();
        health.set_unattached_host_interfaces(vec!["eth0".into()]);
        let probe = health.readiness();
        assert!(!probe.ok && probe.message.contains("eth0"), "{probe:?}");
        health.set_unattached_host_interfaces(Vec::new());
        assert!(health.readiness().ok);
    }

    #[test]
    fn a_failed_pass_makes_the_node_unready_until_one_succeeds() {
        let health = Health::new(Duration::from_secs(60));
        health.beat();
        health.sync_failed("map WEIR_TUNNEL_PEERS: full".into());
        let probe = health.readiness();
        assert!(
            !probe.ok && probe.message.contains("WEIR_TUNNEL_PEERS"),
            "{probe:?}"
        );
        health.sync_succeeded();
        assert!(health.readiness().ok);
        health.sync_failed("map WEIR_BACKENDS: full".into());
        let probe = health.readiness();
        assert!(
            !probe.ok && probe.message.contains("WEIR_BACKENDS"),
            "a node that synced once is not ready while later passes fail: {probe:?}"
        );
        assert!(
            health.liveness().ok,
            "still alive: the loop turns and retries"
        );
        health.sync_succeeded();
        assert!(health.readiness().ok);
    }

    #[test]
    fn a_loop_that_stops_turning_is_not_alive() {
        let health = Health::new(Duration::from_millis(20));
        health.beat();
        health.set_synced();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!health.liveness().ok);
        assert!(!health.readiness().ok, "not ready when not alive");
        health.beat();
        assert!(health.liveness().ok);
    }

    #[test]
    fn the_proxier_is_unhealthy_when_a_change_waits_longer_than_the_sync_timeout() {
        let health =
            Health::new(Duration::from_secs(60)).with_sync_timeout(Duration::from_millis(40));
        health.beat();
        let start = health.proxier();
        assert!(start.healthy, "healthy while starting");
        assert_eq!(start.last_updated, Some(start.current_time));
        health.queued_update();
        assert!(health.proxier().healthy, "a fresh change is not late");
        std::thread::sleep(Duration::from_millis(30));
        health.queued_update();
        std::thread::sleep(Duration::from_millis(30));
        health.beat();
        let late = health.proxier();
        assert!(!late.healthy, "the oldest change counts: {late:?}");
        assert_eq!(late.last_updated, None, "never updated");
        health.updated();
        let synced = health.proxier();
        assert!(synced.healthy && synced.node_eligible);
        health.set_node_eligible(false);
        assert!(health.proxier().healthy && !health.proxier().node_eligible);
    }

    #[test]
    fn rejections_count_once_per_object_and_reason() {
        let metrics = Metrics::new();
        let one = |name: &str, reason: &str| {
            (
                "Service".to_owned(),
                format!("default/{name}"),
                reason.to_owned(),
            )
        };
        let first: BTreeSet<_> = [one("a", "invalid_port"), one("b", "invalid_port")].into();
        metrics.record_rejections(&BTreeSet::new(), &first);
        // The same objects again (a relist), then one fixed.
        metrics.record_rejections(&first, &first);
        let second: BTreeSet<_> = [one("a", "invalid_port")].into();
        metrics.record_rejections(&first, &second);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "weir_rejected_objects_total{kind=\"Service\",reason=\"invalid_port\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "weir_rejected_objects_current{kind=\"Service\",reason=\"invalid_port\"} 1"
            ),
            "{text}"
        );
    }
}
