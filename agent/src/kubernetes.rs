//! Desired state from the Kubernetes API: one kube-rs watcher and reflector per resource kind,
//! feeding the same [`Objects`] -> [`crate::source::IntentBuilder`] path as the file source.
//!
//! The watchers are thin on purpose. Every watch event of a kind the data plane uses (Services,
//! EndpointSlices, Nodes) becomes an [`ObjectEvent`] in a queue and wakes the main loop, which
//! takes the queued events and recompiles only the services they touch; events that arrive while
//! a pass runs wait for the next pass. A list (the first, or a relist after a 410 Gone or when a
//! watch cannot resume) is buffered until complete and then handed over as one
//! [`ObjectEvent::Replace`], so a relist never shows a half-empty cluster, and the reconcile after
//! it writes only what changed. Reflector stores are kept beside the queue, for the node's
//! identity and for [`KubeSource::snapshot`].
//!
//! RBAC (cluster-wide `get`, `list`, `watch`): services, endpointslices (discovery.k8s.io),
//! nodes; with `[policy] enabled` (the default) also pods, namespaces and networkpolicies
//! (networking.k8s.io); with `[prefilter] enabled` prefilterdenylists (weir.dev). Only kinds
//! the data plane consumes are watched: a watcher of a kind
//! nothing reads would gate readiness on its list and ask for permissions the agent does not
//! need, so with policy off the last three are neither watched nor waited for. Pods are watched
//! cluster-wide: a policy's peers live on every node. The reflector stores keep every watched
//! object whole (a Pod is a few KB): about 5,000 pods cost some tens of MB.
//!
//! With `[prefilter] enabled`, `PrefilterDenyList` objects (weir.dev, a CustomResourceDefinition)
//! are watched too. A cluster without the CRD (or whose RBAC predates it) answers the list with
//! 404 (403): logged once and taken as an empty list, so it never holds readiness back; the
//! watcher keeps retrying (with backoff) and picks the objects up once the CRD is installed.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::prefilter::PrefilterDenyList;
use crate::source::{Kind, ObjectEvent, Objects, SourceObject};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or else the usual inference: `$KUBECONFIG` or `~/.kube/config`,
/// then the in-cluster service account (what a DaemonSet pod uses).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeSourceError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| KubeSourceError::Kubeconfig {
                    path: path.to_owned(),
                    source: e,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// This node as its Node object describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// `status.addresses`, as (type, address).
    pub addresses: Vec<(String, String)>,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`).
    pub pod_cidrs: Vec<String>,
    /// The Node has a deletionTimestamp, or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint: load balancers should drain it (kube-proxy's
    /// `/healthz` answers 503, and so does the agent's).
    pub to_be_deleted: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeIdentity {
    pub fn of(node: &Node) -> NodeIdentity {
        let spec = node.spec.as_ref();
        let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
        }
        NodeIdentity {
            name: node.metadata.name.clone().unwrap_or_default(),
            addresses: node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .map(|a| {
                    a.iter()
                        .map(|a| (a.type_.clone(), a.address.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            pod_cidrs,
            to_be_deleted: node.metadata.deletion_timestamp.is_some()
                || spec
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT)),
        }
    }
}

/// The running watchers and their stores. Dropping it stops the watchers.
pub struct KubeSource {
    node_name: String,
    services: Watched<Service>,
    slices: Watched<EndpointSlice>,
    nodes: Watched<Node>,
    /// Watched only while policy is enabled.
    policy: Option<PolicyWatches>,
    /// Watched only while the pre-filter is enabled.
    deny_lists: Option<Watched<PrefilterDenyList>>,
    changed: Arc<Notify>,
    events: EventQueue,
}

/// The kinds watched beside Services, EndpointSlices and Nodes, each only when the agent
/// consumes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalKinds {
    /// Pods, Namespaces and NetworkPolicies (`[policy] enabled`).
    pub policy: bool,
    /// `PrefilterDenyList` objects (`[prefilter] enabled`).
    pub deny_lists: bool,
}

/// The kinds NetworkPolicy enforcement reads.
struct PolicyWatches {
    pods: Watched<Pod>,
    namespaces: Watched<Namespace>,
    policies: Watched<NetworkPolicy>,
}

/// Events not taken by the main loop yet.
type EventQueue = Arc<Mutex<Vec<ObjectEvent>>>;

/// How the watcher of one kind turns its objects into events.
type Convert<K> = (Kind, fn(&K) -> SourceObject);

struct Watched<K: Resource<DynamicType = ()> + Clone + 'static> {
    kind: &'static str,
    store: Store<K>,
    /// The first complete list has arrived.
    listed: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeSource {
    /// Starts one watcher per kind (the optional ones only when asked for). Must be called
    /// inside a tokio runtime.
    pub fn start(client: Client, node_name: &str, optional: OptionalKinds) -> KubeSource {
        let changed = Arc::new(Notify::new());
        let config = watcher::Config::default();
        let events = EventQueue::default();
        let q = (&changed, &events);
        let service: Convert<Service> = (Kind::Service, |s| {
            SourceObject::Service(Box::new(s.clone()))
        });
        let slice: Convert<EndpointSlice> = (Kind::EndpointSlice, |s| {
            SourceObject::EndpointSlice(Box::new(s.clone()))
        });
        let node: Convert<Node> = (Kind::Node, |n| SourceObject::Node(Box::new(n.clone())));
        let policy = optional.policy.then(|| {
            let pod: Convert<Pod> = (Kind::Pod, |p| SourceObject::Pod(Box::new(p.clone())));
            let namespace: Convert<Namespace> = (Kind::Namespace, |n| {
                SourceObject::Namespace(Box::new(n.clone()))
            });
            let network_policy: Convert<NetworkPolicy> = (Kind::NetworkPolicy, |p| {
                SourceObject::NetworkPolicy(Box::new(p.clone()))
            });
            PolicyWatches {
                pods: watch(client.clone(), "Pod", config.clone(), q, pod),
                namespaces: watch(client.clone(), "Namespace", config.clone(), q, namespace),
                policies: watch(
                    client.clone(),
                    "NetworkPolicy",
                    config.clone(),
                    q,
                    network_policy,
                ),
            }
        });
        let deny_lists = optional.deny_lists.then(|| {
            let deny_list: Convert<PrefilterDenyList> = (Kind::PrefilterDenyList, |d| {
                SourceObject::PrefilterDenyList(Box::new(d.clone()))
            });
            watch(
                client.clone(),
                "PrefilterDenyList",
                config.clone(),
                q,
                deny_list,
            )
        });
        KubeSource {
            policy,
            deny_lists,
            node_name: node_name.to_owned(),
            services: watch(client.clone(), "Service", config.clone(), q, service),
            slices: watch(client.clone(), "EndpointSlice", config.clone(), q, slice),
            nodes: watch(client, "Node", config, q, node),
            changed,
            events,
        }
    }

    /// True once every kind has been listed completely at least once. Reconciling before that
    /// would take a half-listed cluster for the truth and delete what is not listed yet.
    pub fn is_ready(&self) -> bool {
        self.unlisted().is_empty()
    }

    /// Kinds whose first list has not completed yet.
    pub fn unlisted(&self) -> Vec<&'static str> {
        let mut listed = vec![
            (self.services.kind, &self.services.listed),
            (self.slices.kind, &self.slices.listed),
            (self.nodes.kind, &self.nodes.listed),
        ];
        if let Some(p) = &self.policy {
            listed.extend([
                (p.pods.kind, &p.pods.listed),
                (p.namespaces.kind, &p.namespaces.listed),
                (p.policies.kind, &p.policies.listed),
            ]);
        }
        if let Some(d) = &self.deny_lists {
            listed.push((d.kind, &d.listed));
        }
        listed
            .into_iter()
            .filter(|(_, l)| !l.load(Ordering::Acquire))
            .map(|(k, _)| k)
            .collect()
    }

    /// Resolves when something changed since the last call (or when a kind finished listing).
    /// Several changes before the call resolve it once.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The events since the last call, in arrival order.
    pub fn take_events(&self) -> Vec<ObjectEvent> {
        self.events
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Every object the stores hold now, in a stable order (namespace, then name).
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: sorted(&self.services.store),
            slices: sorted(&self.slices.store),
            nodes: sorted(&self.nodes.store),
            pods: self
                .policy
                .as_ref()
                .map_or_else(Vec::new, |p| sorted(&p.pods.store)),
            namespaces: (self.policy.as_ref())
                .map_or_else(Vec::new, |p| sorted(&p.namespaces.store)),
            network_policies: (self.policy.as_ref())
                .map_or_else(Vec::new, |p| sorted(&p.policies.store)),
            deny_lists: (self.deny_lists.as_ref()).map_or_else(Vec::new, |d| sorted(&d.store)),
        }
    }

    /// This node, from its Node object, once listed.
    pub fn node_identity(&self) -> Option<NodeIdentity> {
        self.nodes
            .store
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .map(|n| NodeIdentity::of(&n))
    }
}

fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut objects: BTreeMap<(String, String), K> = BTreeMap::new();
    for object in store.state() {
        let meta = object.meta();
        let key = (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        objects.insert(key, (*object).clone());
    }
    objects.into_values().collect()
}

/// A reflector on every object of kind `K` (cluster-wide), queueing each change as an event
/// and waking `changed`.
fn watch<K>(
    client: Client,
    kind: &'static str,
    config: watcher::Config,
    (changed, events): (&Arc<Notify>, &EventQueue),
    (list_kind, to_source): Convert<K>,
) -> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let listed = Arc::new(AtomicBool::new(false));
    let api: Api<K> = Api::all(client);
    // Backoff between failed attempts, so an unreachable API server is retried politely.
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn({
        let listed = listed.clone();
        let changed = changed.clone();
        let events = events.clone();
        let push = move |event: ObjectEvent| {
            if let Ok(mut q) = events.lock() {
                q.push(event);
            }
        };
        async move {
            let mut stream = std::pin::pin!(stream);
            // A list in progress: handed over whole when it completes.
            let mut listing: Vec<SourceObject> = Vec::new();
            // A kind the cluster does not serve was reported (once).
            let mut absence_logged = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => {
                        debug!(kind, "listing");
                        listing.clear();
                    }
                    Ok(watcher::Event::InitApply(object)) => {
                        listing.push(to_source(&object));
                    }
                    Ok(watcher::Event::InitDone) => {
                        push(ObjectEvent::Replace(
                            list_kind,
                            std::mem::take(&mut listing),
                        ));
                        if !listed.swap(true, Ordering::AcqRel) {
                            info!(kind, "initial list complete");
                        } else {
                            info!(kind, "relisted");
                        }
                        changed.notify_one();
                    }
                    Ok(watcher::Event::Apply(object)) => {
                        push(ObjectEvent::Apply(to_source(&object)));
                        changed.notify_one();
                    }
                    Ok(watcher::Event::Delete(object)) => {
                        if let Some(key) = to_source(&object).key() {
                            push(ObjectEvent::Delete(key));
                        }
                        changed.notify_one();
                    }
                    // A kind of our own whose CRD is not installed: nothing of it exists, so it
                    // is listed (empty) and never holds readiness back. Retried all the same.
                    Err(e) if list_kind.may_be_absent() && not_served(&e) => {
                        if !absence_logged {
                            absence_logged = true;
                            warn!(kind, error = %e, "the cluster does not serve this kind (its CustomResourceDefinition or RBAC is missing): taken as none; retrying");
                        }
                        if !listed.swap(true, Ordering::AcqRel) {
                            push(ObjectEvent::Replace(list_kind, Vec::new()));
                            changed.notify_one();
                        }
                    }
                    // The watcher itself recovers: a 410 Gone makes it relist, anything else is
                    // retried after the backoff. The store keeps its last good contents meanwhile.
                    Err(e) => warn!(kind, error = %e, "watch interrupted; retrying"),
                }
            }
        }
    });
    Watched {
        kind,
        store,
        listed,
        task,
    }
}

/// Whether the API server said the kind does not exist here (404), or that we may not read it
/// (403, RBAC from before the kind), on the list or the watch.
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            matches!(status.code, 403 | 404)
        }
        watcher::Error::WatchError(status) => matches!(status.code, 403 | 404),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_to_be_deleted() {
        let plain = "metadata: {name: n1}\nspec: {taints: [{key: other, effect: NoSchedule}]}";
        assert!(!NodeIdentity::of(&node(plain)).to_be_deleted);
        let tainted = "metadata: {name: n1}\nspec:\n  taints:\n  - {key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}";
        assert!(NodeIdentity::of(&node(tainted)).to_be_deleted);
        let deleted = "metadata: {name: n1, deletionTimestamp: \"2024-01-01T00:00:00Z\"}";
        assert!(NodeIdentity::of(&node(deleted)).to_be_deleted);
    }
}
