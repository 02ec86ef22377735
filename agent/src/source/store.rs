//! The intent store: validated intent kept object by object, and the older whole-snapshot
//! builder the tests and the Kubernetes source's snapshot use.

use std::collections::{BTreeMap, BTreeSet};

use crate::admission::Rejection;
use crate::intent::{
    self, ClusterIntent, EndpointSliceIntent, IntentError, NodeIntent, ObjectRef, ServiceIntent,
};

use crate::prefilter::DenyListIntent;

use crate::policy::{self, NamespaceIntent, PodIntent, PolicyChanges, PolicyIntent, PolicyIntents};

use super::event::{Kind, ObjectEvent, ObjectKey, Objects, SourceObject};

/// A problem with one object; the rest of the state still applies.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {object}: {error}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: String,
    pub error: IntentError,
}

/// Turns objects into intent, falling back per object to the last version that validated.
#[derive(Debug, Default)]
pub struct IntentBuilder {
    last_good: ClusterIntent,
}

impl IntentBuilder {
    /// The intent the last build produced.
    pub fn last_good(&self) -> &ClusterIntent {
        &self.last_good
    }

    pub fn build(&mut self, objects: &Objects) -> (ClusterIntent, Vec<ObjectError>) {
        let mut intent = ClusterIntent::default();
        let mut errors = Vec::new();
        for service in &objects.services {
            match ServiceIntent::try_from(service) {
                Ok(s) => {
                    intent.services.insert(s.id.clone(), s);
                }
                Err(error) => {
                    let id = intent::service_ref(service);
                    keep_last_good(&self.last_good.services, &mut intent.services, id.as_ref());
                    errors.push(object_error("Service", id, error));
                }
            }
        }
        for slice in &objects.slices {
            match EndpointSliceIntent::try_from(slice) {
                Ok(s) => {
                    intent.slices.insert(s.id.clone(), s);
                }
                Err(error) => {
                    let id = intent::slice_ref(slice);
                    keep_last_good(&self.last_good.slices, &mut intent.slices, id.as_ref());
                    errors.push(object_error("EndpointSlice", id, error));
                }
            }
        }
        for node in &objects.nodes {
            match NodeIntent::try_from(node) {
                Ok(n) => {
                    intent.nodes.insert(n.name.clone(), n);
                }
                Err(error) => {
                    let name = intent::node_name(node);
                    if let Some(previous) = name.as_ref().and_then(|n| self.last_good.nodes.get(n))
                    {
                        intent.nodes.insert(previous.name.clone(), previous.clone());
                    }
                    errors.push(ObjectError {
                        kind: "Node",
                        object: name.unwrap_or_else(|| "<unnamed>".to_owned()),
                        error,
                    });
                }
            }
        }
        self.last_good = intent.clone();
        (intent, errors)
    }
}

fn keep_last_good<T: Clone>(
    last_good: &BTreeMap<ObjectRef, T>,
    into: &mut BTreeMap<ObjectRef, T>,
    id: Option<&ObjectRef>,
) {
    if let Some((id, previous)) = id.and_then(|id| last_good.get_key_value(id)) {
        into.insert(id.clone(), previous.clone());
    }
}

fn object_error(kind: &'static str, id: Option<ObjectRef>, error: IntentError) -> ObjectError {
    ObjectError {
        kind,
        object: id.map_or_else(|| "<unnamed>".to_owned(), |id| id.to_string()),
        error,
    }
}

/// The validated intent, kept up to date object by object, and which services a change touched.
///
/// Each object is converted (validated) when it arrives and only its intent is kept, never the
/// Kubernetes object itself; an object that fails validation keeps its last good version (or
/// stays absent) and its error is remembered until the object is fixed or deleted. A change
/// whose intent equals what is there already touches nothing.
#[derive(Debug, Default)]
pub struct IntentStore {
    intent: ClusterIntent,
    /// Slices by the service they belong to, so a service's slices are found without a scan.
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// Current validation errors, by object (unnamed objects under their kind alone).
    errors: BTreeMap<(&'static str, String), ObjectError>,
    /// What each origin (a state file) refused, by origin.
    refused: BTreeMap<String, Vec<Rejection>>,
    dirty: BTreeSet<ObjectRef>,
    all_dirty: bool,
    /// Pods, Namespaces and NetworkPolicies, and which changed since
    /// [`IntentStore::take_policy_changes`].
    policy: PolicyIntents,
    policy_changes: PolicyChanges,
}

impl IntentStore {
    pub fn intent(&self) -> &ClusterIntent {
        &self.intent
    }

    /// The slices of a service, in name order.
    pub fn slices_of(&self, service: &ObjectRef) -> impl Iterator<Item = &EndpointSliceIntent> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.intent.slices.get(id))
    }

    /// Slices whose service does not exist.
    pub fn orphan_slices_of(&self, service: &ObjectRef) -> Vec<&ObjectRef> {
        if self.intent.services.contains_key(service) {
            return Vec::new();
        }
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn policy(&self) -> &PolicyIntents {
        &self.policy
    }

    /// The Pods, Namespaces and NetworkPolicies changed since the last call.
    pub fn take_policy_changes(&mut self) -> PolicyChanges {
        std::mem::take(&mut self.policy_changes)
    }

    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.errors.values()
    }

    /// Input the source refused before it became objects (a state file too large, a document
    /// that does not parse), by origin: reported like [`crate::admission::Admission`]'s.
    pub fn source_rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.refused.values().flatten()
    }

    /// Marks every service changed (after the maps were re-read).
    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    /// The services changed since the last call: every known one (with a slice or not) when a
    /// node changed or [`IntentStore::mark_all_dirty`] was called.
    pub fn take_dirty(&mut self) -> BTreeSet<ObjectRef> {
        let mut dirty = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.all_dirty) {
            dirty.extend(self.intent.services.keys().cloned());
            dirty.extend(self.slices_by_service.keys().cloned());
        }
        dirty
    }

    pub fn handle(&mut self, event: &ObjectEvent) {
        match event {
            ObjectEvent::Apply(object) => self.apply(object),
            ObjectEvent::Delete(key) => self.delete(key),
            ObjectEvent::Replace(kind, objects) => self.replace(*kind, objects),
            ObjectEvent::Rejections { origin, rejections } => {
                if rejections.is_empty() {
                    self.refused.remove(origin);
                } else {
                    self.refused.insert(origin.clone(), rejections.clone());
                }
            }
        }
    }

    fn replace(&mut self, kind: Kind, objects: &[SourceObject]) {
        self.errors.retain(|(k, _), _| *k != kind.name());
        let mut listed = BTreeSet::new();
        for object in objects {
            listed.extend(object.key());
            self.apply(object);
        }
        let present: Vec<ObjectKey> = match kind {
            Kind::Service => self
                .intent
                .services
                .keys()
                .cloned()
                .map(ObjectKey::Service)
                .collect(),
            Kind::EndpointSlice => self
                .intent
                .slices
                .keys()
                .cloned()
                .map(ObjectKey::EndpointSlice)
                .collect(),
            Kind::Node => self
                .intent
                .nodes
                .keys()
                .cloned()
                .map(ObjectKey::Node)
                .collect(),
            Kind::Pod => self
                .policy
                .pods
                .keys()
                .cloned()
                .map(ObjectKey::Pod)
                .collect(),
            Kind::Namespace => self
                .policy
                .namespaces
                .keys()
                .cloned()
                .map(ObjectKey::Namespace)
                .collect(),
            Kind::NetworkPolicy => self
                .policy
                .policies
                .keys()
                .cloned()
                .map(ObjectKey::NetworkPolicy)
                .collect(),
            Kind::PrefilterDenyList => (self.intent.deny_lists.keys())
                .cloned()
                .map(ObjectKey::PrefilterDenyList)
                .collect(),
        };
        for key in present {
            if kind.covers(&key) && !listed.contains(&key) {
                self.delete(&key);
            }
        }
    }

    /// Forgets the validation error of an object that is now valid (or gone). Its name is only
    /// spelled out when there are errors at all: a full sync of 5,000 services has none, and
    /// formatting 10,000 names to find that out showed in its profile.
    fn clear_error(&mut self, kind: &'static str, name: impl FnOnce() -> String) {
        if !self.errors.is_empty() {
            self.errors.remove(&(kind, name()));
        }
    }

    pub fn apply(&mut self, object: &SourceObject) {
        match object {
            SourceObject::Service(service) => {
                let id = intent::service_ref(service);
                match ServiceIntent::try_from(service.as_ref()) {
                    Ok(s) => {
                        self.clear_error("Service", || s.id.to_string());
                        if self.intent.services.get(&s.id) != Some(&s) {
                            self.dirty.insert(s.id.clone());
                            self.intent.services.insert(s.id.clone(), s);
                        }
                    }
                    Err(error) => self.record("Service", id.map(|i| i.to_string()), error),
                }
            }
            SourceObject::EndpointSlice(slice) => {
                let id = intent::slice_ref(slice);
                match EndpointSliceIntent::try_from(slice.as_ref()) {
                    Ok(s) => {
                        self.clear_error("EndpointSlice", || s.id.to_string());
                        if self.intent.slices.get(&s.id) != Some(&s) {
                            if let Some(old) = self.intent.slices.get(&s.id) {
                                let old_service = old.service.clone();
                                self.unindex(&old_service, &s.id);
                            }
                            self.dirty.insert(s.service.clone());
                            self.slices_by_service
                                .entry(s.service.clone())
                                .or_default()
                                .insert(s.id.clone());
                            self.intent.slices.insert(s.id.clone(), s);
                        }
                    }
                    Err(error) => self.record("EndpointSlice", id.map(|i| i.to_string()), error),
                }
            }
            SourceObject::Node(node) => match NodeIntent::try_from(node.as_ref()) {
                Ok(n) => {
                    self.clear_error("Node", || n.name.clone());
                    if self.intent.nodes.get(&n.name) != Some(&n) {
                        // Backends name their node's tunnel address: any service may change.
                        self.all_dirty = true;
                        self.intent.nodes.insert(n.name.clone(), n);
                    }
                }
                Err(error) => self.record("Node", intent::node_name(node), error),
            },
            SourceObject::Pod(pod) => match PodIntent::try_from(pod.as_ref()) {
                Ok(p) => {
                    self.clear_error("Pod", || p.id.to_string());
                    if self.policy.pods.get(&p.id) != Some(&p) {
                        self.policy_changes.pods.insert(p.id.clone());
                        self.policy.pods.insert(p.id.clone(), p);
                    }
                }
                Err(error) => {
                    let id = policy::intent::pod_ref(pod).map(|i| i.to_string());
                    self.record("Pod", id, error.into())
                }
            },
            SourceObject::Namespace(namespace) => {
                let n = NamespaceIntent::from(namespace.as_ref());
                if self.policy.namespaces.get(&n.name) != Some(&n) {
                    self.policy_changes.namespaces.insert(n.name.clone());
                    self.policy.namespaces.insert(n.name.clone(), n);
                }
            }
            SourceObject::NetworkPolicy(policy) => match PolicyIntent::try_from(policy.as_ref()) {
                Ok(p) => {
                    self.clear_error("NetworkPolicy", || p.id.to_string());
                    if self.policy.policies.get(&p.id) != Some(&p) {
                        self.policy_changes.policies.insert(p.id.clone());
                        self.policy.policies.insert(p.id.clone(), p);
                    }
                }
                // The last good version (if any) stays in force.
                Err(error) => {
                    let id = policy::intent::policy_ref(policy).map(|i| i.to_string());
                    self.record("NetworkPolicy", id, error.into())
                }
            },
            SourceObject::PrefilterDenyList(list) => {
                match DenyListIntent::try_from(list.as_ref()) {
                    Ok(d) => {
                        self.clear_error("PrefilterDenyList", || d.name.clone());
                        if self.intent.deny_lists.get(&d.name) != Some(&d) {
                            self.intent.deny_lists.insert(d.name.clone(), d);
                        }
                    }
                    // Refused whole: the last good version (if any) stays in force.
                    Err(error) => {
                        self.record("PrefilterDenyList", list.metadata.name.clone(), error)
                    }
                }
            }
        }
    }

    pub fn delete(&mut self, key: &ObjectKey) {
        match key {
            ObjectKey::Service(id) => {
                self.clear_error("Service", || id.to_string());
                if self.intent.services.remove(id).is_some() {
                    self.dirty.insert(id.clone());
                }
            }
            ObjectKey::EndpointSlice(id) => {
                self.clear_error("EndpointSlice", || id.to_string());
                if let Some(old) = self.intent.slices.remove(id) {
                    self.unindex(&old.service, id);
                    self.dirty.insert(old.service);
                }
            }
            ObjectKey::Node(name) => {
                self.clear_error("Node", || name.clone());
                if self.intent.nodes.remove(name).is_some() {
                    self.all_dirty = true;
                }
            }
            ObjectKey::Pod(id) => {
                self.clear_error("Pod", || id.to_string());
                if self.policy.pods.remove(id).is_some() {
                    self.policy_changes.pods.insert(id.clone());
                }
            }
            ObjectKey::Namespace(name) => {
                if self.policy.namespaces.remove(name).is_some() {
                    self.policy_changes.namespaces.insert(name.clone());
                }
            }
            ObjectKey::NetworkPolicy(id) => {
                self.clear_error("NetworkPolicy", || id.to_string());
                if self.policy.policies.remove(id).is_some() {
                    self.policy_changes.policies.insert(id.clone());
                }
            }
            ObjectKey::PrefilterDenyList(name) => {
                self.clear_error("PrefilterDenyList", || name.clone());
                self.intent.deny_lists.remove(name);
            }
        }
    }

    fn unindex(&mut self, service: &ObjectRef, slice: &ObjectRef) {
        if let Some(set) = self.slices_by_service.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(service);
            }
        }
        self.dirty.insert(service.clone());
    }

    fn record(&mut self, kind: &'static str, object: Option<String>, error: IntentError) {
        let object = object.unwrap_or_else(|| "<unnamed>".to_owned());
        self.errors.insert(
            (kind, object.clone()),
            ObjectError {
                kind,
                object,
                error,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::fixtures::*;

    #[test]
    fn invalid_objects_keep_their_last_good_version() {
        let mut builder = IntentBuilder::default();
        let (good, errors) = builder.build(&parse(SERVICE).unwrap());
        assert!(errors.is_empty());
        let bad = SERVICE
            .replace("198.18.100.1", "198.18.100.256")
            .replace("port: 80", "port: 70000");
        let (after, errors) = builder.build(&parse(&bad).unwrap());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("default/a"), "{}", errors[0]);
        assert_eq!(after, good, "the last good version stays");

        let mut fresh = IntentBuilder::default();
        let (intent, errors) = fresh.build(&parse(&bad).unwrap());
        assert_eq!(errors.len(), 1);
        assert!(intent.services.is_empty(), "never good: stays absent");
    }

    #[test]
    fn port_out_of_range_is_rejected() {
        let bad = SERVICE.replace("port: 80", "port: 70000");
        let (_, errors) = IntentBuilder::default().build(&parse(&bad).unwrap());
        assert!(
            errors[0].to_string().contains("out of range"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn pod_changes_policy_does_not_read_leave_the_policy_clean() {
        let pod = |ready: &str, app: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: default, labels: {{app: {app}}}}}\n\
                 spec: {{nodeName: n1, containers: []}}\n\
                 status: {{phase: Running, podIP: 198.19.0.1, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n"
            )
        };
        let mut store = IntentStore::default();
        for e in parse(&pod("True", "a")).unwrap().to_events() {
            store.handle(&e);
        }
        assert!(!store.take_policy_changes().is_empty());
        for e in parse(&pod("False", "a")).unwrap().to_events() {
            store.handle(&e);
        }
        assert!(
            store.take_policy_changes().is_empty(),
            "a readiness flip changes nothing policy reads"
        );
        for e in parse(&pod("False", "b")).unwrap().to_events() {
            store.handle(&e);
        }
        let changes = store.take_policy_changes();
        let pod = ObjectRef {
            namespace: "default".into(),
            name: "p".into(),
        };
        assert_eq!(changes.pods, [pod].into(), "a label change does");
        assert!(store.take_dirty().is_empty(), "no service is touched");
    }

    #[test]
    fn the_store_marks_only_touched_services_and_ignores_repeats() {
        let objects = parse(&format!("{SERVICE}---\n{}", slice_doc("a", "198.19.0.1"))).unwrap();
        let mut store = IntentStore::default();
        for e in objects.to_events() {
            store.handle(&e);
        }
        assert_eq!(store.take_dirty().len(), 1);
        for e in objects.to_events() {
            store.handle(&e);
        }
        assert!(
            store.take_dirty().is_empty(),
            "the same objects again change nothing"
        );
        store.handle(&ObjectEvent::Replace(Kind::EndpointSlice, Vec::new()));
        let dirty = store.take_dirty();
        assert_eq!(dirty.len(), 1, "a list without the slice deletes it");
        assert_eq!(store.slices_of(dirty.first().unwrap()).count(), 0);
    }
}
