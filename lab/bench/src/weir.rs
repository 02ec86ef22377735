//! The Weir agent in a bench lab: started like the scenario runner starts it (same config
//! file, same binary), but with the state file where the bench can rewrite it, and with the
//! agent's process figures (CPU seconds, peak RSS) and log lines at hand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_lab_cluster::agent::{self, Agents, NodeAgent, BPFFS};
use weir_lab_core::backend::{Cmd, Lab};
use weir_lab_core::scenario::{AgentSpec, Scenario};
use weir_lab_core::topology::Plan;

use crate::BenchError;

const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// One agent on the lab's single node.
pub struct BenchAgent {
    pub agents: Agents,
    pub state_path: PathBuf,
}

impl BenchAgent {
    /// Writes `state` and the agent's config below `run_dir`, and starts the agent on node 1.
    pub fn start(
        lab: &mut dyn Lab,
        binary: &Path,
        run_dir: &Path,
        run_id: &str,
        spec: &AgentSpec,
        state: &str,
    ) -> Result<BenchAgent, BenchError> {
        let state_path = run_dir.join("cluster.yaml");
        let node = lab.plan().nodes[0].id;
        lab.write_file(node, &state_path, state.as_bytes())?;
        BenchAgent::launch(lab, binary, run_dir, run_id, spec, state_path)
    }

    /// Starts the agent on node 1 on the desired state already at `state_path` (a file or a
    /// directory).
    pub fn launch(
        lab: &mut dyn Lab,
        binary: &Path,
        run_dir: &Path,
        run_id: &str,
        spec: &AgentSpec,
        state_path: PathBuf,
    ) -> Result<BenchAgent, BenchError> {
        if !binary.is_file() {
            return Err(BenchError::Setup(format!(
                "weir-agent not found at {} (build it with `cargo build --release -p weir-agent` or pass --agent)",
                binary.display()
            )));
        }
        let node = lab.plan().nodes[0].clone();
        let pin_root = Path::new(BPFFS).join("weir-lab").join(run_id);
        let agent =
            agent::start_node(lab, &node, binary, run_dir, &pin_root, &state_path, spec, 1)?;
        Ok(BenchAgent {
            agents: Agents {
                binary: binary.to_owned(),
                nodes: vec![agent],
                pin_root,
                state_path: state_path.clone(),
            },
            state_path,
        })
    }

    pub fn node(&self) -> &NodeAgent {
        &self.agents.nodes[0]
    }

    /// Waits until `dump services` shows every frontend of `scenario` with all its endpoints.
    pub fn wait_programmed(
        &self,
        lab: &mut dyn Lab,
        scenario: &Scenario,
        plan: &Plan,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let labels = weir_lab_core::k8s::pod_labels(scenario, plan);
        let endpoints: BTreeMap<String, Vec<String>> = scenario
            .services
            .iter()
            .map(|s| {
                let pods = weir_lab_core::k8s::endpoints(s, plan, &labels);
                (
                    s.name.clone(),
                    pods.iter().map(|p| p.name.clone()).collect(),
                )
            })
            .collect();
        let expected = agent::expected_frontends(scenario, &endpoints);
        agent::wait_ready(lab, &self.agents, &expected, timeout).map_err(BenchError::Setup)
    }

    /// Replaces the state file in one step, as a control plane's update would land.
    pub fn write_state(&self, lab: &mut dyn Lab, state: &str) -> Result<SystemTime, BenchError> {
        let node = self.node().node;
        lab.write_file(node, &self.state_path, state.as_bytes())?;
        Ok(SystemTime::now())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.node().log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.node().log
    }

    /// The agent's process figures, read from /proc on its host.
    pub fn process(&self, lab: &mut dyn Lab) -> Result<ProcessFigures, BenchError> {
        let node = self.node();
        let pid = node.proc.0;
        let read = |lab: &mut dyn Lab, file: &str| -> Result<String, BenchError> {
            let out = lab.exec_ok(
                node.node,
                &Cmd::new("cat").arg(format!("/proc/{pid}/{file}")),
                EXEC_TIMEOUT,
            )?;
            Ok(out.stdout)
        };
        let stat = read(lab, "stat")?;
        let status = read(lab, "status")?;
        ProcessFigures::parse(&stat, &status).ok_or_else(|| {
            BenchError::Setup(format!("unreadable /proc/{pid}/stat or status: {stat}"))
        })
    }

    pub fn stop(&self, lab: &mut dyn Lab) -> Result<(), BenchError> {
        lab.stop(self.node().proc)?;
        Ok(())
    }

    /// Removes what the agent pinned; call after the agent has stopped.
    pub fn remove_pins(&self) {
        match std::fs::remove_dir_all(&self.agents.pin_root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", self.agents.pin_root.display()),
        }
    }
}

/// CPU time and memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProcessFigures {
    /// utime + stime.
    pub cpu_s: f64,
    /// Peak resident set (VmHWM).
    pub hwm_kib: u64,
    /// Resident set now (VmRSS).
    pub rss_kib: u64,
}

impl ProcessFigures {
    pub fn parse(stat: &str, status: &str) -> Option<ProcessFigures> {
        // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat are utime and stime; `rest` starts at field 3.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // /proc reports these in USER_HZ, which Linux fixes at 100 for user space.
        let ticks = 100.0;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(ProcessFigures {
            cpu_s: (utime + stime) as f64 / ticks,
            hwm_kib: kib("VmHWM:")?,
            rss_kib: kib("VmRSS:")?,
        })
    }
}

/// An "applied desired state" line of the agent's log.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedLine {
    pub at: SystemTime,
    pub writes: u64,
    pub frontends: u64,
    pub backends: u64,
}

/// Every "applied desired state" line in `log`, in order, with its timestamp.
pub fn applied_lines(log: &str) -> Vec<AppliedLine> {
    log.lines()
        .filter(|l| l.contains("applied desired state"))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            let field = |name: &str| -> Option<u64> {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some(AppliedLine {
                at: parse_rfc3339_utc(stamp)?,
                writes: field("writes")?,
                frontends: field("frontends")?,
                backends: field("backends")?,
            })
        })
        .collect()
}

/// `2026-11-21T15:58:06.123456Z`, the timestamp tracing's default formatter writes.
pub fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let digits: String = frac.chars().take(9).collect();
    let nanos: u32 = format!("{digits:0<9}").parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// Ends a bench lab that ran an agent: the agent stopped (a failure to stop is only warned
/// about), the lab torn down, then the agent's pins removed; the teardown's result.
pub fn stop_and_tear_down(agent: Option<&BenchAgent>, lab: &mut dyn Lab) -> Result<(), BenchError> {
    if let Some(a) = agent {
        if let Err(e) = a.stop(lab) {
            tracing::warn!("stopping the agent: {e}");
        }
    }
    let teardown = lab.teardown();
    if let Some(a) = agent {
        a.remove_pins();
    }
    Ok(teardown?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse() {
        let t = parse_rfc3339_utc("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_millis(86_401_500));
        let t = parse_rfc3339_utc("2026-11-21T15:58:06.123456Z").unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(secs.as_secs(), 1_795_276_686);
        assert_eq!(secs.subsec_micros(), 123_456);
        assert!(parse_rfc3339_utc("2026-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339_utc("yesterday").is_none());
    }

    #[test]
    fn applied_lines_are_found() {
        let log = "2026-11-21T15:58:06.000001Z  INFO weir_agent::run: data plane loaded\n\
                   2026-11-21T15:58:07.250000Z  INFO reconcile: weir_agent::reconcile: applied desired state writes=15001 frontends=5000 backends=25000\n";
        let lines = applied_lines(log);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].writes, 15001);
        assert_eq!(lines[0].frontends, 5000);
        assert_eq!(lines[0].backends, 25000);
    }

    #[test]
    fn proc_figures_parse() {
        let stat =
            "1234 (weir agent) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        let status = "Name:\tweir-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        let f = ProcessFigures::parse(stat, status).unwrap();
        assert_eq!(f.hwm_kib, 20480);
        assert_eq!(f.rss_kib, 10240);
        assert_eq!(f.cpu_s, 3.0);
    }
}
