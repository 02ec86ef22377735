//! Kubernetes NetworkPolicy: Pods, Namespaces and NetworkPolicies ([`intent`]) compiled into
//! the contents of the policy maps ([`compile`], [`state`]), which the data path consults at
//! the first packet of a flow.
//!
//! Identities: every addressed pod of the cluster gets the identity of its class (namespace,
//! labels, namespace labels, named ports), every written ipBlock prefix one of its own; an
//! isolated pod of this node gets an endpoint id. A rule entry is (endpoint, direction, peer
//! identity, protocol, port prefix), so the data path's cost does not grow with the rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::intent::ObjectRef;

pub mod compile;
pub mod intent;
pub mod maps;
pub mod reconcile;
pub mod state;

pub use compile::{CompileReport, Compiled, IdentityKey, PodClass, PolicyCompiler, PolicyNames};
pub use intent::{NamespaceIntent, PodIntent, PolicyError, PolicyIntent};
pub use maps::PolicyMaps;
pub use reconcile::PolicyReconciler;
pub use state::{PlanStep, PolicyPlan, PolicyState};

/// The validated policy intent of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyIntents {
    pub pods: BTreeMap<ObjectRef, PodIntent>,
    pub namespaces: BTreeMap<String, NamespaceIntent>,
    pub policies: BTreeMap<ObjectRef, PolicyIntent>,
}

/// Which Pods, Namespaces and NetworkPolicies were added, changed or deleted since the last
/// pass, by key: what an incremental compile ([`PolicyCompiler::update`]) recomputes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    pub pods: BTreeSet<ObjectRef>,
    pub namespaces: BTreeSet<String>,
    pub policies: BTreeSet<ObjectRef>,
    /// Recompile everything and diff the whole states instead.
    pub everything: bool,
}

impl PolicyChanges {
    /// A change that recompiles everything (the full-state diff).
    pub fn everything() -> PolicyChanges {
        PolicyChanges {
            everything: true,
            ..PolicyChanges::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.everything
            && self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.policies.is_empty()
    }
}

#[cfg(test)]
mod tests;
