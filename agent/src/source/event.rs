//! The event model both sources speak: objects of the kinds the data plane uses, their
//! identities, and the changes a source hands over one at a time.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::admission::Rejection;
use crate::intent::{self, ObjectRef};
use crate::policy;
use crate::prefilter::PrefilterDenyList;

/// The Kubernetes objects found in the source, before validation.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    /// Every pod of the cluster (NetworkPolicy peers live on every node).
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
    pub deny_lists: Vec<PrefilterDenyList>,
}

/// Which object an event is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Service(ObjectRef),
    EndpointSlice(ObjectRef),
    Node(String),
    Pod(ObjectRef),
    Namespace(String),
    NetworkPolicy(ObjectRef),
    PrefilterDenyList(String),
}

impl ObjectKey {
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectKey::Service(_) => "Service",
            ObjectKey::EndpointSlice(_) => "EndpointSlice",
            ObjectKey::Node(_) => "Node",
            ObjectKey::Pod(_) => "Pod",
            ObjectKey::Namespace(_) => "Namespace",
            ObjectKey::NetworkPolicy(_) => "NetworkPolicy",
            ObjectKey::PrefilterDenyList(_) => "PrefilterDenyList",
        }
    }

    /// The object's name as rejections show it: `namespace/name`, or a Node's name.
    pub fn object(&self) -> String {
        match self {
            ObjectKey::Service(id)
            | ObjectKey::EndpointSlice(id)
            | ObjectKey::Pod(id)
            | ObjectKey::NetworkPolicy(id) => id.to_string(),
            ObjectKey::Node(name)
            | ObjectKey::Namespace(name)
            | ObjectKey::PrefilterDenyList(name) => name.clone(),
        }
    }
}

/// A source object of a kind the data plane uses.
#[derive(Clone, Debug)]
pub enum SourceObject {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    PrefilterDenyList(Box<PrefilterDenyList>),
}

impl SourceObject {
    /// Its identity, when it has a name.
    pub fn key(&self) -> Option<ObjectKey> {
        match self {
            SourceObject::Service(s) => intent::service_ref(s).map(ObjectKey::Service),
            SourceObject::EndpointSlice(s) => intent::slice_ref(s).map(ObjectKey::EndpointSlice),
            SourceObject::Node(n) => intent::node_name(n).map(ObjectKey::Node),
            SourceObject::Pod(p) => policy::intent::pod_ref(p).map(ObjectKey::Pod),
            SourceObject::Namespace(n) => n.metadata.name.clone().map(ObjectKey::Namespace),
            SourceObject::NetworkPolicy(p) => {
                policy::intent::policy_ref(p).map(ObjectKey::NetworkPolicy)
            }
            SourceObject::PrefilterDenyList(d) => {
                d.metadata.name.clone().map(ObjectKey::PrefilterDenyList)
            }
        }
    }
}

/// The kinds a complete list ([`ObjectEvent::Replace`]) can cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
    PrefilterDenyList,
}

impl Kind {
    pub(super) fn covers(self, key: &ObjectKey) -> bool {
        matches!(
            (self, key),
            (Kind::Service, ObjectKey::Service(_))
                | (Kind::EndpointSlice, ObjectKey::EndpointSlice(_))
                | (Kind::Node, ObjectKey::Node(_))
                | (Kind::Pod, ObjectKey::Pod(_))
                | (Kind::Namespace, ObjectKey::Namespace(_))
                | (Kind::NetworkPolicy, ObjectKey::NetworkPolicy(_))
                | (Kind::PrefilterDenyList, ObjectKey::PrefilterDenyList(_))
        )
    }

    /// A kind of Weir's own, served by a CustomResourceDefinition a cluster may not have
    /// installed: its absence means none of it exists, not a source that cannot be read.
    pub fn may_be_absent(self) -> bool {
        matches!(self, Kind::PrefilterDenyList)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::PrefilterDenyList => "PrefilterDenyList",
        }
    }
}

/// One change from a source: what both the file source and the Kubernetes watchers produce.
#[derive(Clone, Debug)]
pub enum ObjectEvent {
    Apply(SourceObject),
    Delete(ObjectKey),
    /// A complete list of one kind (a start or a relist): every object of that kind not in it is
    /// gone. Objects that did not change cost a comparison, not a write.
    Replace(Kind, Vec<SourceObject>),
    /// What one origin of objects (a state file) has refused, replacing what it refused before:
    /// empty once it reads cleanly again. Refused input changes no object (each keeps its last
    /// good version); the event only makes the refusals visible as rejections.
    Rejections {
        origin: String,
        rejections: Vec<Rejection>,
    },
}

impl Objects {
    /// A snapshot as events: a complete list of every kind.
    pub fn to_events(&self) -> Vec<ObjectEvent> {
        vec![
            ObjectEvent::Replace(
                Kind::Node,
                self.nodes
                    .iter()
                    .map(|n| SourceObject::Node(Box::new(n.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::Service,
                self.services
                    .iter()
                    .map(|s| SourceObject::Service(Box::new(s.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::EndpointSlice,
                self.slices
                    .iter()
                    .map(|s| SourceObject::EndpointSlice(Box::new(s.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::Namespace,
                self.namespaces
                    .iter()
                    .map(|n| SourceObject::Namespace(Box::new(n.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::Pod,
                self.pods
                    .iter()
                    .map(|p| SourceObject::Pod(Box::new(p.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::NetworkPolicy,
                self.network_policies
                    .iter()
                    .map(|p| SourceObject::NetworkPolicy(Box::new(p.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::PrefilterDenyList,
                self.deny_lists
                    .iter()
                    .map(|d| SourceObject::PrefilterDenyList(Box::new(d.clone())))
                    .collect(),
            ),
        ]
    }
}
