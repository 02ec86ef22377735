//! Checks on the agents' own state, as a scenario writes them: a frontend present or absent, an
//! object rejected, a data-path counter moved (run by the `weir-lab` binary's `checks`).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scenario::{CheckSpec, Family, Protocol, Scenario, ScenarioError, MAX_WAIT};
use crate::topology::{HostId, Plan};

fn default_within() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendCheck {
    #[serde(default)]
    pub name: Option<String>,
    /// Whose data plane; every node's by default.
    #[serde(default)]
    pub node: Option<String>,
    /// The frontend's address: this service's cluster IP of `family`, or `address`; with
    /// neither, any address on `port`.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub family: Family,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    pub present: bool,
    /// With `present`: exactly this many backends.
    #[serde(default)]
    pub backends: Option<usize>,
    /// The agents react asynchronously: the check polls until it holds, up to this long.
    #[serde(default = "default_within", with = "humantime_serde")]
    pub within: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectedCheck {
    #[serde(default)]
    pub name: Option<String>,
    /// Whose agent; every node's by default.
    #[serde(default)]
    pub node: Option<String>,
    /// The `kind` label: "Service", "EndpointSlice", "File"...
    pub object_kind: String,
    pub reason: String,
    /// How many objects are refused for it now (0: none is).
    #[serde(default = "default_one")]
    pub count: u64,
    /// The agent's log must say this too (the refused object's name, say).
    #[serde(default)]
    pub log_contains: Option<String>,
    #[serde(default = "default_within", with = "humantime_serde")]
    pub within: Duration,
}

fn default_one() -> u64 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterCheck {
    #[serde(default)]
    pub name: Option<String>,
    pub node: String,
    /// A name `weir-agent dump counters` prints: "reject_no_backend", "ct_new_flow"...
    pub counter: String,
    /// Moved by at least this much since the top-level checks began, or since the step's
    /// actions (for a step's checks); 0 with `unchanged`.
    #[serde(default = "default_one")]
    pub at_least: u64,
    /// The counter must not have moved at all.
    #[serde(default)]
    pub unchanged: bool,
}

impl Scenario {
    /// Checks on the agents' own state.
    pub(crate) fn validate_agent_check(
        &self,
        check: &CheckSpec,
        plan: &Plan,
    ) -> Result<(), ScenarioError> {
        let title = check.title();
        let bad = |m: String| self.invalid(format!("check {title:?}: {m}"));
        if !self.agent.enabled {
            return Err(bad("needs the agent, which is disabled".into()));
        }
        let node_ok = |node: &Option<String>| match node {
            Some(n) if !matches!(plan.host(n), Some(HostId::Node(_))) => {
                Err(bad(format!("{n:?} is not a node")))
            }
            _ => Ok(()),
        };
        let within_ok = |w: Duration| {
            if w > MAX_WAIT {
                Err(bad("within must be at most 10m".into()))
            } else {
                Ok(())
            }
        };
        match check {
            CheckSpec::Frontend(f) => {
                node_ok(&f.node)?;
                within_ok(f.within)?;
                if f.service.is_some() && f.address.is_some() {
                    return Err(bad("give at most one of service and address".into()));
                }
                if let Some(name) = &f.service {
                    let svc = self
                        .service(name)
                        .ok_or_else(|| bad(format!("no service {name:?}")))?;
                    if svc.cluster_ip_of(f.family).is_none() {
                        return Err(bad(format!(
                            "service {name} has no cluster IP of the check's family (for a headless service, leave service out: no frontend may use the port)"
                        )));
                    }
                }
                if f.backends.is_some() && !f.present {
                    return Err(bad("backends is for present frontends".into()));
                }
            }
            CheckSpec::Rejected(r) => {
                node_ok(&r.node)?;
                within_ok(r.within)?;
                if r.object_kind.is_empty() || r.reason.is_empty() {
                    return Err(bad("object_kind and reason must not be empty".into()));
                }
            }
            CheckSpec::Reachability(r) => {
                for from in &r.from {
                    if plan.host(from).is_none() {
                        return Err(bad(format!("no host named {from:?}")));
                    }
                }
                for to in &r.to {
                    self.reachability_target(to, plan).map_err(bad)?;
                }
                node_ok(&r.monitor)?;
                if r.port == 0 {
                    return Err(bad("port must be non-zero".into()));
                }
                if r.from.is_empty() || r.to.is_empty() || r.expect.len() != r.from.len() {
                    return Err(bad(format!(
                        "expect needs one row per source ({}), each with one character per destination",
                        r.from.len()
                    )));
                }
                for row in &r.expect {
                    let cell_ok = |c: char| {
                        c == crate::scenario::ReachabilityCheck::ALLOWED
                            || c == crate::scenario::ReachabilityCheck::DENIED
                    };
                    if row.chars().count() != r.to.len() || !row.chars().all(cell_ok) {
                        return Err(bad(format!(
                            "expect row {row:?}: one character per destination ({}), each . (connects) or X (does not)",
                            r.to.len()
                        )));
                    }
                }
            }
            CheckSpec::Counter(c) => {
                node_ok(&Some(c.node.clone()))?;
                if c.unchanged && c.at_least != 1 {
                    return Err(bad("unchanged contradicts at_least".into()));
                }
                if !weir_common::counter::NAMES.contains(&c.counter.as_str()) {
                    return Err(bad(format!(
                        "no data-path counter {:?}; the counters are {}",
                        c.counter,
                        weir_common::counter::NAMES.join(", ")
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }
}
