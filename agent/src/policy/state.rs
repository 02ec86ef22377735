//! Compiled policy state (exactly what the four agent-written policy maps hold) and the plan
//! that moves the maps from one state to another.

use std::collections::BTreeMap;

use weir_common::{HostAddrKey, PolicyCidrKey, PolicyEndpoint, PolicyRuleKey};

use crate::state::{deletions, upserts};

/// One `WEIR_POLICY_CIDRS` entry's key: the trie key's data and prefix length.
pub type CidrPrefix = (PolicyCidrKey, u32);
/// One `WEIR_POLICY_RULES` entry's key: the trie key's data and prefix length (in that order,
/// so an endpoint's entries sort together).
pub type RulePrefix = (PolicyRuleKey, u32);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub endpoints: BTreeMap<HostAddrKey, PolicyEndpoint>,
    pub peers: BTreeMap<HostAddrKey, u32>,
    pub cidrs: BTreeMap<CidrPrefix, u32>,
    /// The value is always 1.
    pub rules: BTreeMap<RulePrefix, u8>,
}

/// Map writes in the order that never shows a packet a deny its policy does not say: what
/// allows comes first (rules, then the identities that reach them, then the isolation of
/// endpoints), and goes last (isolation ends first, rules last). A label change moves a pod
/// to its new identity after the new identity's rules exist and before the old ones go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    pub upsert_rules: Vec<(RulePrefix, u8)>,
    pub upsert_cidrs: Vec<(CidrPrefix, u32)>,
    pub upsert_peers: Vec<(HostAddrKey, u32)>,
    pub upsert_endpoints: Vec<(HostAddrKey, PolicyEndpoint)>,
    pub delete_endpoints: Vec<HostAddrKey>,
    pub delete_peers: Vec<HostAddrKey>,
    pub delete_cidrs: Vec<CidrPrefix>,
    pub delete_rules: Vec<RulePrefix>,
}

impl PolicyPlan {
    pub fn between(current: &PolicyState, desired: &PolicyState) -> PolicyPlan {
        PolicyPlan {
            upsert_rules: upserts(&current.rules, &desired.rules),
            upsert_cidrs: upserts(&current.cidrs, &desired.cidrs),
            upsert_peers: upserts(&current.peers, &desired.peers),
            upsert_endpoints: upserts(&current.endpoints, &desired.endpoints),
            delete_endpoints: deletions(&current.endpoints, &desired.endpoints),
            delete_peers: deletions(&current.peers, &desired.peers),
            delete_cidrs: deletions(&current.cidrs, &desired.cidrs),
            delete_rules: deletions(&current.rules, &desired.rules),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }

    pub fn writes(&self) -> usize {
        self.upsert_rules.len()
            + self.upsert_cidrs.len()
            + self.upsert_peers.len()
            + self.upsert_endpoints.len()
            + self.delete_endpoints.len()
            + self.delete_peers.len()
            + self.delete_cidrs.len()
            + self.delete_rules.len()
    }

    /// The writes as the order they happen in, for whoever applies them.
    pub fn steps(&self) -> Vec<PlanStep<'_>> {
        vec![
            PlanStep::UpsertRules(&self.upsert_rules),
            PlanStep::UpsertCidrs(&self.upsert_cidrs),
            PlanStep::UpsertPeers(&self.upsert_peers),
            PlanStep::UpsertEndpoints(&self.upsert_endpoints),
            PlanStep::DeleteEndpoints(&self.delete_endpoints),
            PlanStep::DeletePeers(&self.delete_peers),
            PlanStep::DeleteCidrs(&self.delete_cidrs),
            PlanStep::DeleteRules(&self.delete_rules),
        ]
    }
}

/// One batch of a [`PolicyPlan`], in [`PolicyPlan::steps`] order.
#[derive(Debug)]
pub enum PlanStep<'a> {
    UpsertRules(&'a [(RulePrefix, u8)]),
    UpsertCidrs(&'a [(CidrPrefix, u32)]),
    UpsertPeers(&'a [(HostAddrKey, u32)]),
    UpsertEndpoints(&'a [(HostAddrKey, PolicyEndpoint)]),
    DeleteEndpoints(&'a [HostAddrKey]),
    DeletePeers(&'a [HostAddrKey]),
    DeleteCidrs(&'a [CidrPrefix]),
    DeleteRules(&'a [RulePrefix]),
}
