//! kube-proxy's rules on a bench's node, put there the way kube-proxy does it: its jump rules
//! once, then each sync's `iptables-restore` input, after the `iptables-save -t nat` it runs
//! first where it does; every command measured under `weir-lab probe measure`. The one place the
//! connect, sync and churn benches install kube-proxy rules; the throughput run installs the same
//! rules ([`ProxierConfig::lab`], [`kube_proxy::jump_rules_input`]) unmeasured, trying one
//! iptables flavour after another (`throughput::kube_proxy_iptables`).

use std::path::Path;
use std::time::Duration;

use weir_lab_core::backend::{Cmd, Lab};
use weir_lab_core::topology::HostId;

use crate::kube_proxy::{self, Flavor, Proxier, ProxierConfig, Sync};
use crate::probe::MeasureReport;
use crate::{BenchEnv, BenchError};

/// A restore of 10,000 services on a slow VM takes minutes; this only catches a hung one.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(1800);

/// kube-proxy on one node of a bench's lab, its commands measured.
pub(crate) struct MeasuredKubeProxy<'a> {
    env: &'a BenchEnv,
    node: HostId,
    /// `iptables-*-restore` of the flavour under test.
    restore: &'a Path,
    /// `iptables-*-save`, where the bench runs (and measures) the save kube-proxy runs before
    /// some syncs; None skips it.
    save: Option<&'a Path>,
    /// Where the rule files go (a directory the node sees).
    dir: &'a Path,
    /// The rules it writes: feed it the service list after every change.
    pub proxier: Proxier,
}

/// One sync as applied: the save kube-proxy ran first, if it did, and the restore.
pub(crate) struct Applied {
    pub saved: Option<MeasureReport>,
    pub restored: MeasureReport,
}

impl Applied {
    /// CPU seconds of the save and the restore together.
    pub fn cpu_s(&self) -> f64 {
        self.saved.as_ref().map_or(0.0, MeasureReport::cpu_s) + self.restored.cpu_s()
    }
}

impl<'a> MeasuredKubeProxy<'a> {
    /// kube-proxy as it starts on `node`: it ensures its jump rules before its first sync (not
    /// part of any measurement).
    pub fn start(
        lab: &mut dyn Lab,
        env: &'a BenchEnv,
        node: HostId,
        restore: &'a Path,
        save: Option<&'a Path>,
        dir: &'a Path,
    ) -> Result<MeasuredKubeProxy<'a>, BenchError> {
        let jumps = dir.join("jumps.rules");
        lab.write_file(node, &jumps, kube_proxy::jump_rules_input().as_bytes())?;
        restore_measured(lab, env, node, restore, &jumps)?;
        Ok(MeasuredKubeProxy {
            env,
            node,
            restore,
            save,
            dir,
            proxier: Proxier::new(ProxierConfig::lab()),
        })
    }

    /// Applies `sync`, its input kept as `<name>.rules`: the nat table saved first where
    /// kube-proxy does (and this bench has a save), then the restore.
    pub fn apply(&self, lab: &mut dyn Lab, sync: &Sync, name: &str) -> Result<Applied, BenchError> {
        let rules = self.dir.join(format!("{name}.rules"));
        lab.write_file(self.node, &rules, sync.restore_input.as_bytes())?;
        let saved = match self.save.filter(|_| sync.save_nat_first) {
            Some(save) => {
                let cmd = [save.display().to_string(), "-t".into(), "nat".into()];
                Some(measured(lab, self.env, self.node, &cmd, None)?)
            }
            None => None,
        };
        let restored = restore_measured(lab, self.env, self.node, self.restore, &rules)?;
        Ok(Applied { saved, restored })
    }
}

/// `iptables-*-restore` with kube-proxy's flags and `rules` on stdin, run on `host` under the
/// measuring probe; fails unless the restore succeeds.
fn restore_measured(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    host: HostId,
    restore: &Path,
    rules: &Path,
) -> Result<MeasureReport, BenchError> {
    let mut command = vec![restore.display().to_string()];
    command.extend(Flavor::restore_args().map(String::from));
    measured(lab, env, host, &command, Some(rules))
}

/// Runs `command` on `host` under `weir-lab probe measure`.
pub(crate) fn measured(
    lab: &mut dyn Lab,
    env: &BenchEnv,
    host: HostId,
    command: &[String],
    stdin: Option<&Path>,
) -> Result<MeasureReport, BenchError> {
    let mut cmd = Cmd::new(env.exe.display().to_string()).args(["probe", "measure"]);
    if let Some(file) = stdin {
        cmd = cmd.arg("--stdin").arg(file.display().to_string());
    }
    let cmd = cmd.arg("--").args(command.iter().cloned());
    let out = lab.exec_ok(host, &cmd, PROGRAM_TIMEOUT)?;
    let report: MeasureReport = serde_json::from_str(out.stdout.trim()).map_err(|e| {
        BenchError::Setup(format!(
            "unreadable report of `{cmd}` ({e}): {}",
            out.stdout
        ))
    })?;
    if report.exit_code != Some(0) {
        return Err(BenchError::Setup(format!(
            "`{}` on {host} failed ({:?}): {}",
            report.command,
            report.exit_code,
            weir_lab_core::backend::tail(&report.stderr, 5)
        )));
    }
    Ok(report)
}
