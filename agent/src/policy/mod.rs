//! Kubernetes NetworkPolicy: Pods, Namespaces and NetworkPolicies ([`intent`]) compiled into
//! the contents of the policy maps ([`compile`], [`state`]), which the data path consults at
//! the first packet of a flow.
//!
//! Identities: every addressed pod of the cluster gets the identity of its class (namespace,
//! labels, namespace labels, named ports), every written ipBlock prefix one of its own; an
//! isolated pod of this node gets an endpoint id. A rule entry is (endpoint, direction, peer
//! identity, protocol, port prefix), so the data path's cost does not grow with the rules.

use std::collections::BTreeMap;

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

#[cfg(test)]
mod tests;
