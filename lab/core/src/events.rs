//! What happens during a run, as a stream of typed events. The runner only emits; reporters
//! (terminal, JSON file, later perhaps JUnit) decide what to make of it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::features::Feature;

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    SuiteStarted {
        backend: String,
        scenarios: usize,
    },
    ScenarioStarted {
        scenario: String,
        file: PathBuf,
        description: String,
        checks: usize,
    },
    /// A setup stage finished (topology built, workloads listening, agents ready...).
    Step {
        scenario: String,
        step: String,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
    CheckPassed {
        scenario: String,
        check: String,
        /// The Weir features the check proves (see `features.rs`).
        features: BTreeSet<Feature>,
        detail: String,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
    CheckFailed {
        scenario: String,
        check: String,
        features: BTreeSet<Feature>,
        reason: String,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
    ScenarioFinished {
        scenario: String,
        passed: bool,
        /// Why the scenario could not run its checks (bad file, setup failure), if it could not.
        error: Option<String>,
        /// Checks that never ran because setup failed.
        not_run: usize,
        /// Logs and configs kept for a failed run.
        artifacts: Option<PathBuf>,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
    SuiteFinished {
        checks_passed: usize,
        checks_failed: usize,
        checks_not_run: usize,
        scenarios_passed: usize,
        scenarios_failed: usize,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

pub trait Reporter {
    fn event(&mut self, event: &Event);

    /// Called once after the last event; reporters that write files do it here.
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fans events out to every reporter.
#[derive(Default)]
pub struct Events {
    reporters: Vec<Box<dyn Reporter>>,
}

impl Events {
    pub fn new() -> Events {
        Events::default()
    }

    pub fn with(mut self, reporter: impl Reporter + 'static) -> Events {
        self.reporters.push(Box::new(reporter));
        self
    }

    pub fn emit(&mut self, event: Event) {
        tracing::debug!(?event, "event");
        for r in &mut self.reporters {
            r.event(&event);
        }
    }

    pub fn finish(&mut self) -> std::io::Result<()> {
        let mut first_error = None;
        for r in &mut self.reporters {
            if let Err(e) = r.finish() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Keeps every event; for tests and for callers that want to inspect a run afterwards.
#[derive(Clone, Default)]
pub struct Recorder {
    pub events: std::rc::Rc<std::cell::RefCell<Vec<Event>>>,
}

impl Reporter for Recorder {
    fn event(&mut self, event: &Event) {
        self.events.borrow_mut().push(event.clone());
    }
}
