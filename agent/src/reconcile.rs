//! The one-way pipeline from source objects to map writes: objects -> intent -> compiled state ->
//! plan -> maps, one object at a time. An event updates the intent of its object; the services it
//! touched are admitted and recompiled, and only their entries are diffed against the shadow of
//! what the maps hold. Every other service costs nothing, so an update of one service takes the
//! same time with 10 services installed as with 10,000.
//!
//! The shadow is dropped whenever a write fails, so the next pass reads what the maps really
//! hold and recompiles every service against it (which writes only what differs).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, instrument, warn};

use crate::admission::{Admission, Decision, Limits};
use crate::compile::{summary, CompileOptions, Compiler, ServiceInput};
use crate::dataplane::{DataplaneError, ServiceMaps};
use crate::metrics::Metrics;
use crate::source::{IntentStore, ObjectError, ObjectEvent, Objects};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub writes: usize,
    pub services: usize,
    pub backends: usize,
    pub rejected_objects: usize,
    /// Services recompiled in this pass.
    pub recompiled: usize,
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

    /// The validated intent, for consumers beside the maps (health-check servers).
    pub fn intent(&self) -> &crate::intent::ClusterIntent {
        self.store.intent()
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
            match &result {
                Ok(report) => {
                    metrics.map_writes.inc_by(report.writes as u64);
                    metrics.services.set(report.services as i64);
                    metrics.backends.set(report.backends as i64);
                }
                Err(_) => {
                    metrics.reconcile_errors.inc();
                }
            }
        }
        result
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
        self.admission.admit(&self.store, &dirty, self.limits);

        let intent = self.store.intent();
        let full = compiler.needs_full_pass();
        let mut inputs: Vec<ServiceInput<'_>> = Vec::with_capacity(dirty.len());
        for id in &dirty {
            let slices = match self.admission.decision(id) {
                Decision::Admit => self.store.slices_of(id).collect(),
                // Its entries stay as they are; only a full pass over adopted maps must
                // recompile it, and then without endpoints (they were never admitted here).
                Decision::Keep if !full => continue,
                Decision::Keep | Decision::Empty => Vec::new(),
            };
            inputs.push(ServiceInput {
                id,
                service: intent.services.get(id),
                slices,
            });
        }
        let plan = compiler.compile(&inputs, &intent.nodes, &self.options);
        drop(inputs);
        if !plan.is_empty() {
            if let Err(e) = maps.apply(&plan) {
                // The maps hold a consistent prefix of the plan; read them again next time.
                self.compiler = None;
                return Err(e);
            }
        }
        compiler.commit(&plan);
        let (services, backends) = summary(compiler.shadow());
        let rejected = self.note_rejections();
        let report = ReconcileReport {
            writes: plan.writes(),
            services,
            backends,
            rejected_objects: rejected,
            recompiled: dirty.len(),
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
        let refused = self
            .admission
            .rejections()
            .chain(self.store.source_rejections());
        let mut current = BTreeSet::new();
        for ObjectError {
            kind,
            object,
            error,
        } in invalid
        {
            let key = (kind.to_string(), object.clone(), reason_of(error));
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

/// A metric label for an error: its variant's name in snake case (`InvalidPort` ->
/// `invalid_port`), so a new kind of validation error gets its own label without a change here.
fn reason_of(error: &impl std::fmt::Debug) -> String {
    let debug = format!("{error:?}");
    let variant: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut out = String::new();
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        "invalid".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::reason_of;
    use crate::intent::IntentError;

    #[test]
    fn reasons_are_variant_names_in_snake_case() {
        let port = IntentError::InvalidPort {
            field: "spec.ports[0].port".into(),
            value: 70000,
        };
        assert_eq!(reason_of(&port), "invalid_port");
        assert_eq!(reason_of(&IntentError::Missing("spec")), "missing");
        let addr = IntentError::InvalidAddress {
            field: "x".into(),
            value: "1.2.3.999".into(),
        };
        assert_eq!(reason_of(&addr), "invalid_address");
    }
}
