//! The one-way pipeline from source objects to map writes: objects -> intent -> compiled state ->
//! plan -> maps, one object at a time. An event updates the intent of its object; the services it
//! touched are admitted and recompiled, and only their entries are diffed against the shadow of
//! what the maps hold. Every other service costs nothing, so an update of one service takes the
//! same time with 10 services installed as with 10,000.
//!
//! The shadow is dropped whenever a write fails, so the next pass reads what the maps really
//! hold and recompiles every service against it (which writes only what differs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, instrument, warn};

use crate::admission::{Admission, Decision, Footprint, Limits, Rejection};
use crate::compile::{
    addr_of, addresses_of, frontend_addresses, frontend_name, summary, CompileOptions, Compiler,
    ServiceInput,
};
use crate::conntrack::{BackendAddr, Retired};
use crate::dataplane::{DataplaneError, ServiceMaps};
use crate::intent::{EndpointSliceIntent, ObjectRef};
use crate::metrics::Metrics;
use crate::source::{IntentStore, ObjectError, ObjectEvent, Objects};
use crate::state::{DataplaneState, Plan};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub writes: usize,
    pub services: usize,
    pub backends: usize,
    pub rejected_objects: usize,
    /// Services recompiled in this pass.
    pub recompiled: usize,
    /// Entries in each service map after the pass (from the shadow: no map is read for it).
    pub entries: Footprint,
}

/// (kind, object, reason) of one rejected object.
type RejectionKey = (String, String, String);

#[derive(Default)]
pub struct Reconciler {
    options: CompileOptions,
    store: IntentStore,
    compiler: Option<Compiler>,
    admission: Admission,
    limits: Limits,
    metrics: Option<Arc<Metrics>>,
    /// What the previous pass rejected: a rejection is logged at warn level (and counted) when
    /// it is new, so a source that resends everything does not repeat itself.
    rejected: BTreeSet<RejectionKey>,
    /// The serving endpoints each Service was last compiled with.
    serving: BTreeMap<ObjectRef, BTreeSet<BackendAddr>>,
    /// Endpoints that stopped serving since [`Reconciler::take_retired`] was last called.
    retired: Vec<Retired>,
}

impl Reconciler {
    pub fn new(limits: Limits, metrics: Option<Arc<Metrics>>) -> Reconciler {
        Reconciler {
            limits,
            metrics,
            ..Reconciler::default()
        }
    }

    /// What compiling needs to know about this node (its name, Maglev).
    pub fn with_compile_options(mut self, options: CompileOptions) -> Reconciler {
        self.options = options;
        self
    }

    /// Endpoints that stopped serving a Service (deleted, or neither ready nor serving) in the
    /// passes since the last call, for [`crate::conntrack::end_retired_flows`]. An endpoint
    /// that is terminating but still serving is not retired: its connections drain.
    pub fn take_retired(&mut self) -> Vec<Retired> {
        std::mem::take(&mut self.retired)
    }

    /// The validated intent, for consumers beside the maps (health-check servers).
    pub fn intent(&self) -> &crate::intent::ClusterIntent {
        self.store.intent()
    }

    /// The validated Pods, Namespaces and NetworkPolicies, for the policy pass.
    pub fn policy_intents(&self) -> &crate::policy::PolicyIntents {
        self.store.policy()
    }

    /// The Pods, Namespaces and NetworkPolicies changed since the last call.
    pub fn take_policy_changes(&mut self) -> crate::policy::PolicyChanges {
        self.store.take_policy_changes()
    }

    /// Brings the maps to a complete snapshot of the objects (a start or a relist): objects not
    /// in it are gone. Objects that fail validation are reported and keep their last good
    /// version; everything else applies.
    pub fn reconcile(
        &mut self,
        maps: &mut ServiceMaps,
        objects: &Objects,
    ) -> Result<ReconcileReport, DataplaneError> {
        self.apply_events(maps, &objects.to_events())
    }

    /// Takes one change into the intent without a pass: a source that produces many events
    /// stages them as it reads (holding no more than one at a time) and then runs one pass with
    /// [`Reconciler::apply_events`] and no further events.
    pub fn stage(&mut self, event: &ObjectEvent) {
        self.store.handle(event);
    }

    /// Applies changes, recompiling only the services they touch.
    #[instrument(skip_all)]
    pub fn apply_events(
        &mut self,
        maps: &mut ServiceMaps,
        events: &[ObjectEvent],
    ) -> Result<ReconcileReport, DataplaneError> {
        let started = Instant::now();
        for event in events {
            self.store.handle(event);
        }
        let result = self.pass(maps);
        if let Some(metrics) = &self.metrics {
            metrics
                .sync_duration
                .observe(started.elapsed().as_secs_f64());
            // A failed pass is counted by whoever runs the whole pass (the agent's loop), which
            // writes other maps too.
            if let Ok(report) = &result {
                metrics
                    .last_sync_duration
                    .set(started.elapsed().as_secs_f64());
                if let Ok(now) = std::time::UNIX_EPOCH.elapsed() {
                    metrics.last_sync_timestamp.set(now.as_secs_f64());
                }
                metrics.map_writes.inc_by(report.writes as u64);
                metrics.services.set(report.services as i64);
                metrics.backends.set(report.backends as i64);
                for (map, entries) in report.entries.by_map() {
                    metrics.set_map_entries(map, entries);
                }
            }
        }
        result
    }

    /// Writes back what the maps lost or gained behind the agent's back, given `actual`, what
    /// they hold (read while the agent was not writing: see [`crate::drift`]); returns the
    /// entries written back per map. Nothing to compare with before the first complete pass, or
    /// after a failed one (the next pass rereads the maps anyway).
    pub fn repair_drift(
        &mut self,
        maps: &mut ServiceMaps,
        actual: &DataplaneState,
    ) -> Result<Footprint, DataplaneError> {
        let Some(compiler) = self.compiler.as_ref().filter(|c| !c.needs_full_pass()) else {
            return Ok(Footprint::default());
        };
        let plan = Plan::between(actual, compiler.shadow());
        let report = Footprint::of_plan(&plan);
        if plan.is_empty() {
            return Ok(report);
        }
        if let Err(e) = maps.apply(&plan) {
            self.compiler = None;
            return Err(e);
        }
        if let Some(metrics) = &self.metrics {
            for (map, entries) in report.by_map() {
                metrics.record_drift(map, entries);
            }
        }
        Ok(report)
    }

    fn pass(&mut self, maps: &mut ServiceMaps) -> Result<ReconcileReport, DataplaneError> {
        if self.compiler.is_none() {
            self.compiler = Some(Compiler::adopt(maps.read()?));
            self.store.mark_all_dirty();
        }
        let Some(compiler) = self.compiler.as_mut() else {
            unreachable!("set above");
        };
        let mut dirty = self.store.take_dirty();
        dirty.extend(compiler.pending().cloned());
        self.admission
            .admit(&self.store, &dirty, self.limits, &self.options);

        let intent = self.store.intent();
        let full = compiler.needs_full_pass();
        let mut inputs: Vec<ServiceInput<'_>> = Vec::with_capacity(dirty.len());
        // What compiling changes of each service's serving endpoints, and the frontends its
        // flows came through (those it held before this pass).
        let mut serving_now: Vec<(&ObjectRef, BTreeSet<BackendAddr>)> = Vec::new();
        let mut frontends_before: BTreeMap<&ObjectRef, Vec<weir_common::FrontendKey>> =
            BTreeMap::new();
        for id in &dirty {
            let decision = self.admission.decision(id);
            // A kept service keeps its entries, and so its endpoints' flows.
            if !matches!(decision, Decision::Keep | Decision::Withhold) {
                let serving = match (decision, intent.services.get(id)) {
                    (Decision::Admit, Some(_)) => serving_backends(self.store.slices_of(id)),
                    _ => BTreeSet::new(),
                };
                if self.serving.contains_key(id) {
                    frontends_before.insert(id, compiler.frontends_of(id).to_vec());
                }
                serving_now.push((id, serving));
            }
            let slices = match decision {
                Decision::Admit => self.store.slices_of(id).collect(),
                // Its entries stay as they are; only a full pass over adopted maps must
                // recompile it, and then without endpoints (they were never admitted here).
                Decision::Keep | Decision::Withhold if !full => continue,
                Decision::Keep | Decision::Empty => Vec::new(),
                Decision::Withhold => {
                    inputs.push(ServiceInput {
                        id,
                        service: None,
                        slices: Vec::new(),
                    });
                    continue;
                }
            };
            inputs.push(ServiceInput {
                id,
                service: intent.services.get(id),
                slices,
            });
        }
        let plan = compiler.compile(&inputs, &intent.nodes, &self.options);
        drop(inputs);
        if !plan.upsert_services.is_empty() {
            // A new frontend's address goes in before its service: the data path passes a
            // packet to an address it does not know as a frontend without looking for a
            // service (bpf/ebpf/src/fast.rs), so the other order would let a first packet by.
            let mut early = frontend_addresses(compiler.shadow());
            early.extend(addresses_of(
                plan.upsert_services.iter().map(|(key, _)| key),
            ));
            maps.set_frontend_addrs(early)?;
        }
        if !plan.is_empty() {
            if let Err(e) = maps.apply(&plan) {
                // The maps hold a consistent prefix of the plan; read them again next time.
                self.compiler = None;
                return Err(e);
            }
        }
        compiler.commit(&plan);
        if !plan.upsert_services.is_empty()
            || !plan.delete_services.is_empty()
            || maps.frontend_addrs_unsettled()
        {
            maps.set_frontend_addrs(frontend_addresses(compiler.shadow()))?;
        }
        for (id, serving) in serving_now {
            let frontends = frontends_before.remove(id).unwrap_or_default();
            note_serving(&mut self.serving, &mut self.retired, id, serving, frontends);
        }
        let (services, backends) = summary(compiler.shadow());
        let shadow = compiler.shadow();
        let entries = Footprint {
            frontends: shadow.services.len(),
            slots: shadow.slots.len(),
            backends: shadow.backends.len(),
            maglev: shadow.maglev.len(),
            source_ranges: shadow.source_ranges.len(),
        };
        let rejected = self.note_rejections();
        let report = ReconcileReport {
            writes: plan.writes(),
            services,
            backends,
            rejected_objects: rejected,
            recompiled: dirty.len(),
            entries,
        };
        if report.writes > 0 {
            info!(
                writes = report.writes,
                frontends = services,
                backends,
                recompiled = report.recompiled,
                "applied desired state"
            );
        }
        Ok(report)
    }

    /// Logs and counts this pass's rejections; returns how many there were.
    fn note_rejections(&mut self) -> usize {
        let invalid = self.store.errors();
        // Refused by the admission checks, or by the source before they became objects.
        // A frontend another Service holds: refused while the holder keeps it.
        let taken: Vec<Rejection> = self
            .compiler
            .iter()
            .flat_map(|c| c.refused_frontends())
            .map(|(claimant, frontend, holder)| Rejection {
                kind: "Service",
                object: claimant.to_string(),
                reason: "frontend_taken",
                detail: format!("{} is held by Service {holder}", frontend_name(frontend)),
            })
            .collect();
        let refused = self
            .admission
            .rejections()
            .chain(self.store.source_rejections())
            .chain(&taken);
        let mut current = BTreeSet::new();
        for ObjectError {
            kind,
            object,
            error,
        } in invalid
        {
            let key = (kind.to_string(), object.clone(), error.reason().to_owned());
            if self.rejected.contains(&key) {
                debug!(kind, object, %error, "still rejected");
            } else {
                warn!(kind, object, reason = %key.2, %error, "rejected object; keeping its last good version");
            }
            current.insert(key);
        }
        for r in refused {
            let key = (r.kind.to_owned(), r.object.clone(), r.reason.to_owned());
            if self.rejected.contains(&key) {
                debug!(kind = r.kind, object = %r.object, reason = r.reason, "still rejected");
            } else {
                warn!(kind = r.kind, object = %r.object, reason = r.reason, detail = %r.detail, "rejected object");
            }
            current.insert(key);
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_rejections(&self.rejected, &current);
        }
        let count = current.len();
        self.rejected = current;
        count
    }
}

/// Every (address, port) a Service's serving endpoints are reached at, as flows name them.
fn serving_backends<'a>(
    slices: impl Iterator<Item = &'a EndpointSliceIntent>,
) -> BTreeSet<BackendAddr> {
    let mut out = BTreeSet::new();
    for slice in slices {
        for endpoint in slice.endpoints.iter().filter(|e| e.serving) {
            for ip in &endpoint.addresses {
                let (addr, family) = addr_of(*ip);
                for port in &slice.ports {
                    out.insert((addr, port.port.to_be(), port.protocol.number(), family));
                }
            }
        }
    }
    out
}

/// Records a service's serving endpoints as compiled; those that stopped serving are retired
/// with the frontends their flows came through.
fn note_serving(
    recorded: &mut BTreeMap<ObjectRef, BTreeSet<BackendAddr>>,
    retired: &mut Vec<Retired>,
    id: &ObjectRef,
    serving: BTreeSet<BackendAddr>,
    frontends: Vec<weir_common::FrontendKey>,
) {
    let before = recorded.remove(id).unwrap_or_default();
    let gone: BTreeSet<BackendAddr> = before.difference(&serving).copied().collect();
    if !gone.is_empty() {
        retired.push(Retired {
            frontends: frontends.into_iter().collect(),
            backends: gone,
        });
    }
    if !serving.is_empty() {
        recorded.insert(id.clone(), serving);
    }
}
