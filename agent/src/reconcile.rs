//! The one-way pipeline from source objects to map writes: objects -> intent -> compiled state ->
//! plan -> maps. The reconciler keeps only a shadow of what it last wrote, and drops it whenever a
//! write fails so the next pass diffs against what the maps really hold.

use tracing::{info, instrument, warn};

use crate::compile::{compile, summary, CompileOptions};
use crate::dataplane::{DataplaneError, ServiceMaps};
use crate::source::{IntentBuilder, ObjectError, Objects};
use crate::state::{DataplaneState, Plan};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub writes: usize,
    pub services: usize,
    pub backends: usize,
    pub rejected_objects: usize,
}

#[derive(Default)]
pub struct Reconciler {
    options: CompileOptions,
    builder: IntentBuilder,
    shadow: Option<DataplaneState>,
}

impl Reconciler {
    pub fn new(options: CompileOptions) -> Self {
        Reconciler {
            options,
            ..Reconciler::default()
        }
    }

    /// The intent of the last pass, for consumers beside the maps (health-check servers).
    pub fn intent(&self) -> &crate::intent::ClusterIntent {
        self.builder.last_good()
    }

    /// Brings the maps to what `objects` ask for. Objects that fail validation are reported and
    /// keep their last good version; everything else applies.
    #[instrument(skip_all)]
    pub fn reconcile(
        &mut self,
        maps: &mut ServiceMaps,
        objects: &Objects,
    ) -> Result<ReconcileReport, DataplaneError> {
        let (intent, rejected) = self.builder.build(objects);
        for ObjectError {
            kind,
            object,
            error,
        } in &rejected
        {
            warn!(kind, object, %error, "rejected object; keeping its last good version");
        }
        let current = match self.shadow.take() {
            Some(shadow) => shadow,
            None => maps.read()?,
        };
        let desired = compile(&intent, &current, &self.options);
        let plan = Plan::between(&current, &desired);
        if !plan.is_empty() {
            maps.apply(&plan)?;
        }
        let (services, backends) = summary(&desired);
        let report = ReconcileReport {
            writes: plan.writes(),
            services,
            backends,
            rejected_objects: rejected.len(),
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
}
