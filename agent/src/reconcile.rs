//! The one-way pipeline from source objects to map writes: objects -> intent -> compiled state ->
//! plan -> maps. The reconciler keeps only a shadow of what it last wrote, and drops it whenever a
//! write fails so the next pass diffs against what the maps really hold.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, instrument, warn};

use crate::admission::{Admission, Limits};
use crate::compile::{compile, summary};
use crate::dataplane::{DataplaneError, ServiceMaps};
use crate::metrics::Metrics;
use crate::source::{IntentBuilder, ObjectError, Objects};
use crate::state::{DataplaneState, Plan};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub writes: usize,
    pub services: usize,
    pub backends: usize,
    pub rejected_objects: usize,
}

/// (kind, object, reason) of one rejected object.
type RejectionKey = (String, String, String);

#[derive(Default)]
pub struct Reconciler {
    builder: IntentBuilder,
    shadow: Option<DataplaneState>,
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

    /// Brings the maps to what `objects` ask for. Objects that fail validation are reported and
    /// keep their last good version; everything else applies.
    #[instrument(skip_all)]
    pub fn reconcile(
        &mut self,
        maps: &mut ServiceMaps,
        objects: &Objects,
    ) -> Result<ReconcileReport, DataplaneError> {
        let started = Instant::now();
        let result = self.pass(maps, objects);
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

    fn pass(
        &mut self,
        maps: &mut ServiceMaps,
        objects: &Objects,
    ) -> Result<ReconcileReport, DataplaneError> {
        let (mut intent, invalid) = self.builder.build(objects);
        let refused = self.admission.admit(&mut intent, self.limits);
        let rejected = self.note_rejections(&invalid, &refused);

        let current = match self.shadow.take() {
            Some(shadow) => shadow,
            None => maps.read()?,
        };
        let desired = compile(&intent, &current);
        let plan = Plan::between(&current, &desired);
        if !plan.is_empty() {
            maps.apply(&plan)?;
        }
        let (services, backends) = summary(&desired);
        let report = ReconcileReport {
            writes: plan.writes(),
            services,
            backends,
            rejected_objects: rejected,
        };
        if report.writes > 0 {
            info!(
                writes = report.writes,
                frontends = services,
                backends,
                "applied desired state"
            );
        }
        self.shadow = Some(desired);
        Ok(report)
    }

    /// Logs and counts this pass's rejections; returns how many there were.
    fn note_rejections(
        &mut self,
        invalid: &[ObjectError],
        refused: &[crate::admission::Rejection],
    ) -> usize {
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
