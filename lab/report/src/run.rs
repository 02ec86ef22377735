//! Reporters: a readable terminal report and a JSON file for machines.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use weir_lab_core::events::{Event, Reporter};

/// One line per step and check, a verdict per scenario, and the suite's summary line.
pub struct TerminalReporter {
    out: Box<dyn Write>,
    color: bool,
}

impl TerminalReporter {
    pub fn stdout() -> TerminalReporter {
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        TerminalReporter {
            out: Box::new(std::io::stdout()),
            color,
        }
    }

    pub fn to_writer(out: Box<dyn Write>) -> TerminalReporter {
        TerminalReporter { out, color: false }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn line(&mut self, text: String) {
        // A closed stdout (piped into `head`) must not abort the run, which still writes its report.
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

impl Reporter for TerminalReporter {
    fn event(&mut self, event: &Event) {
        match event {
            Event::SuiteStarted { backend, scenarios } => {
                self.line(format!(
                    "weir-lab: {scenarios} scenario(s) on the {backend} backend"
                ));
            }
            Event::ScenarioStarted {
                scenario,
                description,
                ..
            } => {
                let head = self.paint("1", &format!("== {scenario}"));
                if description.is_empty() {
                    self.line(head);
                } else {
                    self.line(format!("{head}: {description}"));
                }
            }
            Event::Step { step, duration, .. } => {
                let dim = self.paint("2", &format!("   .... {step} ({})", secs(*duration)));
                self.line(dim);
            }
            Event::CheckPassed {
                check,
                detail,
                duration,
                ..
            } => {
                let tag = self.paint("32", "PASS");
                self.line(format!("   {tag} {check} ({}): {detail}", secs(*duration)));
            }
            Event::CheckFailed {
                check,
                reason,
                duration,
                ..
            } => {
                let tag = self.paint("31", "FAIL");
                self.line(format!("   {tag} {check} ({}): {reason}", secs(*duration)));
            }
            Event::ScenarioFinished {
                scenario,
                passed,
                error,
                not_run,
                artifacts,
                duration,
            } => {
                let verdict = if *passed {
                    self.paint("32", "passed")
                } else {
                    self.paint("31", "FAILED")
                };
                let mut text = format!("   -- {scenario} {verdict} in {}", secs(*duration));
                if *not_run > 0 {
                    text.push_str(&format!(" ({not_run} check(s) not run)"));
                }
                if let Some(e) = error {
                    // Errors may quote a log's last lines: keep them under the scenario.
                    text.push_str(&format!(": {}", e.replace('\n', "\n      ")));
                }
                self.line(text);
                if let Some(dir) = artifacts {
                    self.line(format!("   -- logs and configs kept in {}", dir.display()));
                }
            }
            Event::SuiteFinished {
                checks_passed,
                checks_failed,
                checks_not_run,
                scenarios_passed,
                scenarios_failed,
                duration,
            } => {
                let mut text = format!("suite: {checks_passed} passed, {checks_failed} failed");
                if *checks_not_run > 0 {
                    text.push_str(&format!(", {checks_not_run} not run"));
                }
                text.push_str(&format!(
                    " ({scenarios_passed} scenario(s) passed, {scenarios_failed} failed) in {}",
                    secs(*duration)
                ));
                let ok = *checks_failed == 0 && *scenarios_failed == 0;
                let text = self.paint(if ok { "1;32" } else { "1;31" }, &text);
                self.line(text);
            }
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SuiteReport {
    pub weir_lab_version: &'static str,
    pub backend: String,
    pub started_unix_s: u64,
    pub passed: bool,
    pub duration_s: f64,
    pub checks_passed: usize,
    pub checks_failed: usize,
    pub checks_not_run: usize,
    pub scenarios: Vec<ScenarioReport>,
}

#[derive(Debug, Default, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    pub passed: bool,
    pub error: Option<String>,
    pub artifacts: Option<PathBuf>,
    pub duration_s: f64,
    pub steps: Vec<StepReport>,
    pub checks: Vec<CheckReport>,
    pub checks_not_run: usize,
}

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub step: String,
    pub duration_s: f64,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub name: String,
    pub passed: bool,
    /// What was seen when it passed, or why it failed.
    pub detail: String,
    pub duration_s: f64,
}

/// Collects the run into a [`SuiteReport`] and writes it as JSON when the run is over.
pub struct JsonReporter {
    path: PathBuf,
    report: SuiteReport,
}

impl JsonReporter {
    pub fn new(path: PathBuf) -> JsonReporter {
        JsonReporter {
            path,
            report: SuiteReport {
                weir_lab_version: env!("CARGO_PKG_VERSION"),
                started_unix_s: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                ..SuiteReport::default()
            },
        }
    }

    fn current(&mut self) -> Option<&mut ScenarioReport> {
        self.report.scenarios.last_mut()
    }
}

fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Reporter for JsonReporter {
    fn event(&mut self, event: &Event) {
        match event.clone() {
            Event::SuiteStarted { backend, .. } => self.report.backend = backend,
            Event::ScenarioStarted {
                scenario,
                file,
                description,
                ..
            } => self.report.scenarios.push(ScenarioReport {
                name: scenario,
                file,
                description,
                ..ScenarioReport::default()
            }),
            Event::Step { step, duration, .. } => {
                if let Some(s) = self.current() {
                    s.steps.push(StepReport {
                        step,
                        duration_s: round(duration),
                    });
                }
            }
            Event::CheckPassed {
                check,
                detail,
                duration,
                ..
            } => {
                if let Some(s) = self.current() {
                    s.checks.push(CheckReport {
                        name: check,
                        passed: true,
                        detail,
                        duration_s: round(duration),
                    });
                }
            }
            Event::CheckFailed {
                check,
                reason,
                duration,
                ..
            } => {
                if let Some(s) = self.current() {
                    s.checks.push(CheckReport {
                        name: check,
                        passed: false,
                        detail: reason,
                        duration_s: round(duration),
                    });
                }
            }
            Event::ScenarioFinished {
                passed,
                error,
                not_run,
                artifacts,
                duration,
                ..
            } => {
                if let Some(s) = self.current() {
                    s.passed = passed;
                    s.error = error;
                    s.checks_not_run = not_run;
                    s.artifacts = artifacts;
                    s.duration_s = round(duration);
                }
            }
            Event::SuiteFinished {
                checks_passed,
                checks_failed,
                checks_not_run,
                scenarios_failed,
                duration,
                ..
            } => {
                self.report.checks_passed = checks_passed;
                self.report.checks_failed = checks_failed;
                self.report.checks_not_run = checks_not_run;
                self.report.passed = checks_failed == 0 && scenarios_failed == 0;
                self.report.duration_s = round(duration);
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.report).map_err(std::io::Error::other)?;
        weir_lab_core::files::write_atomically(&self.path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_lab_core::events::Events;

    #[derive(Clone, Default)]
    struct Buf(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reports_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        let buf = Buf::default();
        let mut events = Events::new()
            .with(TerminalReporter::to_writer(Box::new(buf.clone())))
            .with(JsonReporter::new(path.clone()));
        let d = Duration::from_millis(1500);
        events.emit(Event::SuiteStarted {
            backend: "netns".into(),
            scenarios: 1,
        });
        events.emit(Event::ScenarioStarted {
            scenario: "s".into(),
            file: "s.toml".into(),
            description: "demo".into(),
            checks: 2,
        });
        events.emit(Event::CheckPassed {
            scenario: "s".into(),
            check: "a".into(),
            features: Default::default(),
            detail: "fine".into(),
            duration: d,
        });
        events.emit(Event::CheckFailed {
            scenario: "s".into(),
            check: "b".into(),
            features: Default::default(),
            reason: "broken".into(),
            duration: d,
        });
        events.emit(Event::ScenarioFinished {
            scenario: "s".into(),
            passed: false,
            error: None,
            not_run: 0,
            artifacts: Some("/tmp/x".into()),
            duration: d,
        });
        events.emit(Event::SuiteFinished {
            checks_passed: 1,
            checks_failed: 1,
            checks_not_run: 0,
            scenarios_passed: 0,
            scenarios_failed: 1,
            duration: d,
        });
        events.finish().unwrap();

        let text = String::from_utf8(buf.0.borrow().clone()).unwrap();
        assert!(text.contains("PASS a (1.50s): fine"), "{text}");
        assert!(text.contains("FAIL b (1.50s): broken"), "{text}");
        assert!(text.contains("suite: 1 passed, 1 failed"), "{text}");

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["scenarios"][0]["checks"][1]["detail"], "broken");
        assert_eq!(json["scenarios"][0]["artifacts"], "/tmp/x");
    }
}
