//! One policy pass: compile what changed in the policy intent into a plan (at start, after a
//! failed write and every [`FULL_PASS_EVERY`]: everything, diffed against what the maps hold),
//! write the plan in its safe order, and keep the node's POLICY flag in step with the isolated
//! endpoints.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use weir_common::{map_names, node_flags, NodeConfig};

use super::compile::{Compiled, PolicyCompiler};
use super::maps::PolicyMaps;
use super::state::{PolicyPlan, PolicyState};
use super::{PolicyChanges, PolicyIntents};
use crate::dataplane::{DataplaneError, NodeMaps};
use crate::metrics::Metrics;

/// How often a pass compiles everything anyway: the incremental passes trust the store to
/// name every change, and this bounds how long a change it missed could go unwritten (drift
/// repair compares the maps with the compiled state, not with the intent).
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(600);

pub struct PolicyReconciler {
    compiler: PolicyCompiler,
    enabled: bool,
    /// The maps hold what the compiler compiled last; false until read (at start, and after a
    /// failed write, so the maps are never trusted less than a memory of them).
    in_step: bool,
    /// SCTP entries were logged once already.
    sctp_logged: bool,
    /// When the last pass compiled everything.
    last_full_pass: Option<Instant>,
}

impl PolicyReconciler {
    /// `enabled` false: every pass empties the maps (what an earlier agent left included).
    pub fn new(node_name: &str, enabled: bool) -> PolicyReconciler {
        PolicyReconciler {
            compiler: PolicyCompiler::new(node_name),
            enabled,
            in_step: false,
            sctp_logged: false,
            last_full_pass: None,
        }
    }

    /// A pass is due even without a change: the maps were never read, a write failed, or the
    /// last full pass is [`FULL_PASS_EVERY`] old.
    pub fn needs_pass(&self) -> bool {
        !self.in_step || self.full_pass_due()
    }

    fn full_pass_due(&self) -> bool {
        self.last_full_pass
            .is_none_or(|at| at.elapsed() >= FULL_PASS_EVERY)
    }

    /// The last pass's result (for metrics and logs).
    pub fn last(&self) -> &Compiled {
        self.compiler.compiled()
    }

    /// What the ids of the last pass stand for.
    pub fn names(&self) -> super::PolicyNames {
        self.compiler.names()
    }

    /// Brings the policy maps and the node's POLICY flag to `intents`, of which `changes`
    /// changed since the last pass; returns the map writes. The plan comes from the changes
    /// alone (the incremental compile), except at the first pass and after a failed write,
    /// which read the maps, compile everything and diff (as `changes.everything` does against
    /// the last compiled state). `node_config` is the node configuration as written; its
    /// POLICY flag is set before any endpoint is isolated and cleared after the last one stops
    /// being.
    pub fn pass(
        &mut self,
        intents: &PolicyIntents,
        changes: &PolicyChanges,
        maps: &mut PolicyMaps,
        node: &mut NodeMaps,
        node_config: &mut NodeConfig,
        metrics: Option<&Metrics>,
    ) -> Result<usize, DataplaneError> {
        let empty = PolicyIntents::default();
        let intents = if self.enabled { intents } else { &empty };
        let reread = !self.in_step || self.full_pass_due();
        let plan = if reread {
            self.last_full_pass = Some(Instant::now());
            let current = maps.read()?;
            // Numbered as the maps are, so unchanged intent writes nothing.
            self.compiler.adopt(&current);
            self.compiler.recompile(intents);
            PolicyPlan::between(&current, &self.compiler.compiled().state)
        } else {
            self.compiler.update(intents, changes)
        };
        let compiled = self.compiler.compiled();
        if compiled.report.sctp_ports > 0 && !self.sctp_logged {
            self.sctp_logged = true;
            warn!(
                entries = compiled.report.sctp_ports,
                "NetworkPolicy ports name SCTP, which Weir does not carry: those entries match nothing"
            );
        }
        let isolating = !compiled.state.endpoints.is_empty();
        // Until the writes succeed, the next pass rereads the maps.
        self.in_step = false;
        if isolating {
            set_policy_flag(node, node_config, true)?;
        }
        if !plan.is_empty() {
            maps.apply(&plan)?;
        }
        if !isolating {
            set_policy_flag(node, node_config, false)?;
        }
        self.in_step = true;
        let report = &compiled.report;
        if plan.writes() > 0 {
            info!(
                writes = plan.writes(),
                policies = report.policies,
                isolated_endpoints = report.isolated_endpoints,
                rule_entries = report.rule_entries,
                "applied network policy"
            );
        }
        if let Some(metrics) = metrics {
            metrics.policies.set(report.policies as i64);
            metrics
                .policy_endpoints
                .set(report.isolated_endpoints as i64);
            metrics.policy_rule_entries.set(report.rule_entries as i64);
            metrics.map_writes.inc_by(plan.writes() as u64);
            let state = &compiled.state;
            metrics.set_map_entries(map_names::POLICY_ENDPOINTS, state.endpoints.len());
            metrics.set_map_entries(map_names::POLICY_PEERS, state.peers.len());
            metrics.set_map_entries(map_names::POLICY_CIDRS, state.cidrs.len());
            metrics.set_map_entries(map_names::POLICY_RULES, state.rules.len());
            // Names change only with the maps' contents.
            if plan.writes() > 0 || reread {
                if let Ok(mut names) = metrics.policy_names.lock() {
                    *names = self.compiler.names();
                }
            }
        }
        Ok(plan.writes())
    }
}

impl PolicyReconciler {
    /// Writes back what the policy maps lost or gained behind the agent's back, given
    /// `actual`, what they held while the agent was not writing; returns the entries written.
    /// Nothing to compare before the first pass or after a failed one (the next pass rereads).
    pub fn repair_drift(
        &mut self,
        maps: &mut PolicyMaps,
        actual: &PolicyState,
        metrics: Option<&Metrics>,
    ) -> Result<usize, DataplaneError> {
        if !self.in_step {
            return Ok(0);
        }
        let plan = PolicyPlan::between(actual, &self.compiler.compiled().state);
        if !plan.is_empty() {
            // On error the next pass rereads the maps.
            self.in_step = false;
            maps.apply(&plan)?;
            self.in_step = true;
            if let Some(metrics) = metrics {
                let by_map = [
                    (
                        map_names::POLICY_RULES,
                        plan.upsert_rules.len() + plan.delete_rules.len(),
                    ),
                    (
                        map_names::POLICY_CIDRS,
                        plan.upsert_cidrs.len() + plan.delete_cidrs.len(),
                    ),
                    (
                        map_names::POLICY_PEERS,
                        plan.upsert_peers.len() + plan.delete_peers.len(),
                    ),
                    (
                        map_names::POLICY_ENDPOINTS,
                        plan.upsert_endpoints.len() + plan.delete_endpoints.len(),
                    ),
                ];
                for (map, entries) in by_map {
                    metrics.record_drift(map, entries);
                }
            }
        }
        Ok(plan.writes())
    }
}

fn set_policy_flag(
    node: &mut NodeMaps,
    config: &mut NodeConfig,
    on: bool,
) -> Result<(), DataplaneError> {
    let mut wanted = *config;
    if on {
        wanted.flags |= node_flags::POLICY;
    } else {
        wanted.flags &= !node_flags::POLICY;
    }
    if wanted != *config {
        node.set_config(&wanted)?;
        *config = wanted;
    }
    Ok(())
}
