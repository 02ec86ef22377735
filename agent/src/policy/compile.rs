//! Policy intent -> [`PolicyState`]: pure, deterministic, and stable across passes (an
//! identity or endpoint id stays with its pod class or pod while it exists).
//!
//! Incremental: the compiler keeps what it derived (pods by class, classes by namespace, and
//! each policy's contribution: the local pods it selects, its ipBlock prefixes, its rule
//! entries), counting what several holders share, and a pass recomputes only what its changes
//! can affect:
//! - a pod: its class and peer entry; when local, the policies of its namespace selecting it
//!   before or after; a class that appears or goes, the policies whose peers select it;
//! - a namespace: each of its pods, as a pod change (their classes carry its labels);
//! - a policy: itself; a prefix that appears or goes, the policies whose ipBlocks hold it.
//!
//! The entries whose count left or came back to zero are the plan. A compile from scratch
//! is the same pass from empty over every object.
//!
//! Cost: selectors are evaluated once per distinct (namespace scope, selector) and pass over
//! the distinct pod classes of a namespace, not per pod; an ipBlock finds the written prefixes
//! inside it by a range query over the sorted prefix list, not by comparing every pair.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::rc::Rc;

use weir_common::{
    policy_direction, policy_flags, policy_rule_bits, HostAddrKey, PolicyCidrKey, PolicyEndpoint,
    PolicyRuleKey, POLICY_ANY_PEER, POLICY_CIDR_FIXED_BITS,
};

use super::intent::{
    Labels, NamedPort, NamespaceScope, Peer, PolicyIntent, PolicyProtocol, PortRef, Prefix, Rule,
    Selector,
};
use super::state::{PolicyPlan, PolicyState, RulePrefix};
use super::{PolicyChanges, PolicyIntents};
use crate::compile::{addr_key, addr_of};
use crate::intent::ObjectRef;

/// What a pod identity stands for: pods that no policy can tell apart share it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodClass {
    pub namespace: String,
    pub labels: Labels,
    pub namespace_labels: Labels,
    /// Egress named ports resolve from the peer: pods whose named ports differ need
    /// different identities.
    pub named_ports: BTreeSet<NamedPort>,
}

/// What a peer identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKey {
    Pods(Rc<PodClass>),
    Cidr(Prefix),
}

/// Ids handed out to keys, stable while the key is in use. An id freed by a pass is handed out
/// again only from the next pass on: the plan of the pass that freed it still deletes its old
/// entries (last, after the new ones are written), so it must not mean anything else there.
#[derive(Debug)]
struct Allocator<K> {
    ids: HashMap<K, u32>,
    /// The values of `ids`.
    taken: HashSet<u32>,
    free: Vec<u32>,
    /// Freed by the last pass: reusable from the next one.
    cooling: Vec<u32>,
    next: u32,
    used: BTreeSet<u32>,
}

impl<K: Clone + Eq + std::hash::Hash> Allocator<K> {
    /// Ids start at 1: 0 is [`POLICY_ANY_PEER`].
    fn new() -> Self {
        Allocator {
            ids: HashMap::new(),
            taken: HashSet::new(),
            free: Vec::new(),
            cooling: Vec::new(),
            next: 1,
            used: BTreeSet::new(),
        }
    }

    fn begin(&mut self) {
        self.free.append(&mut self.cooling);
        // Lowest first, so ids stay small and dense.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        self.used.clear();
    }

    /// The key's id; a key new to the allocator takes `hint` when no other key holds it
    /// (the id the maps already give it, see [`PolicyCompiler::adopt`]).
    fn id_or(&mut self, key: &K, hint: Option<u32>) -> u32 {
        let id = match self.ids.get(key) {
            Some(id) => *id,
            None => {
                let id = match hint.filter(|h| *h != 0 && !self.taken.contains(h)) {
                    Some(h) => {
                        self.free.retain(|f| *f != h);
                        self.next = self.next.max(h + 1);
                        h
                    }
                    None => self.free.pop().unwrap_or_else(|| {
                        self.next += 1;
                        self.next - 1
                    }),
                };
                self.ids.insert(key.clone(), id);
                self.taken.insert(id);
                id
            }
        };
        self.used.insert(id);
        id
    }

    /// Fresh ids start above `id`: the hints up to it are kept for their keys.
    fn reserve_up_to(&mut self, id: u32) {
        self.next = self.next.max(id + 1);
    }

    /// Frees the id of a key no longer in use (reusable from the next pass on).
    fn release(&mut self, key: &K) {
        if let Some(id) = self.ids.remove(key) {
            self.taken.remove(&id);
            self.used.remove(&id);
            self.cooling.push(id);
        }
    }

    /// Frees the ids of keys this pass did not use (after a pass from scratch).
    fn finish(&mut self) {
        let used = &self.used;
        let cooling = &mut self.cooling;
        let taken = &mut self.taken;
        self.ids.retain(|_, id| {
            let keep = used.contains(id);
            if !keep {
                cooling.push(*id);
                taken.remove(id);
            }
            keep
        });
    }
}

/// Counts a pass reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileReport {
    /// Policies that select at least one pod of this node.
    pub policies: usize,
    pub isolated_endpoints: usize,
    pub rule_entries: usize,
    /// `ports` entries naming SCTP, which Weir does not carry: they match nothing.
    pub sctp_ports: usize,
}

/// A compiled pass: the maps' contents, and the pods behind the endpoint ids.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub state: PolicyState,
    pub report: CompileReport,
    /// Isolated local pods by endpoint id.
    pub endpoints: BTreeMap<u32, ObjectRef>,
}

/// What the ids of a pass stand for, as a person reads them: `weir-agent dump policy` names
/// the maps' numbers with it (the agent serves it at `/policy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyNames {
    /// Pod identities as `namespace/label=value,...` (`+ports name/proto/port` when they
    /// define named ports), CIDR identities as their prefix.
    pub identities: BTreeMap<u32, String>,
    /// Isolated pods as `namespace/name`.
    pub endpoints: BTreeMap<u32, String>,
}

/// Keeps the id allocations, and what the last pass derived, between passes.
#[derive(Debug)]
pub struct PolicyCompiler {
    node_name: String,
    identities: Allocator<IdentityKey>,
    endpoints: Allocator<ObjectRef>,
    /// The ids the maps held at start, for the next pass only ([`PolicyCompiler::adopt`]).
    hints: Option<Hints>,
    model: Model,
    compiled: Compiled,
}

/// The ids the maps already give addresses and prefixes.
#[derive(Debug, Default)]
struct Hints {
    peers: HashMap<HostAddrKey, u32>,
    cidrs: HashMap<(PolicyCidrKey, u32), u32>,
    endpoints: HashMap<HostAddrKey, u32>,
}

/// What the compile derived from the intent, kept between passes so that a change recomputes
/// only what it can affect. What several holders share (a class's pods, a prefix's or a rule
/// entry's policies, an endpoint's isolation) is counted: an entry is written when its count
/// leaves zero and deleted when it comes back to it.
#[derive(Debug, Default)]
struct Model {
    /// Addressed pods of the cluster.
    pods: BTreeMap<ObjectRef, PodEntry>,
    classes: HashMap<Rc<PodClass>, Shared>,
    /// Pod identities by namespace.
    by_namespace: BTreeMap<String, BTreeMap<u32, Rc<PodClass>>>,
    /// Pod identities defining a named port, by name: (protocol, identity, port).
    named: HashMap<String, BTreeSet<(PolicyProtocol, u32, u16)>>,
    /// This node's addressed pods, by namespace.
    local: BTreeMap<String, BTreeSet<ObjectRef>>,
    /// The pods holding each address: the last by name decides, as a full compile writes.
    owners: HashMap<HostAddrKey, BTreeSet<ObjectRef>>,
    /// What each policy writes (kept for every policy of the intent).
    contributions: HashMap<ObjectRef, Contribution>,
    /// Selected local pods.
    isolation: HashMap<ObjectRef, Isolation>,
    /// Every ipBlock prefix of a policy selecting local pods, sorted, with its identity.
    prefixes: BTreeMap<Prefix, Shared>,
    /// Rule entries by the number of policies writing them.
    rules: HashMap<RulePrefix, u32>,
}

#[derive(Debug)]
struct PodEntry {
    class: Rc<PodClass>,
    identity: u32,
    addresses: Vec<IpAddr>,
    local: bool,
}

/// An id and the number of its holders.
#[derive(Debug)]
struct Shared {
    id: u32,
    holders: u32,
}

/// How many policies select a local pod (for each direction), and its endpoint id.
#[derive(Debug, Default)]
struct Isolation {
    policies: u32,
    ingress: u32,
    egress: u32,
    endpoint: u32,
}

impl Isolation {
    fn flags(&self) -> u8 {
        (if self.ingress > 0 {
            policy_flags::INGRESS
        } else {
            0
        }) | if self.egress > 0 {
            policy_flags::EGRESS
        } else {
            0
        }
    }

    fn count(&mut self, flags: u8, by: i32) {
        let step = |n: &mut u32| *n = n.checked_add_signed(by).expect("isolation count");
        step(&mut self.policies);
        if flags & policy_flags::INGRESS != 0 {
            step(&mut self.ingress);
        }
        if flags & policy_flags::EGRESS != 0 {
            step(&mut self.egress);
        }
    }
}

/// What one policy writes.
#[derive(Debug, Default)]
struct Contribution {
    /// The local pods it selects: none, and it writes nothing.
    selected: Vec<ObjectRef>,
    /// The directions it isolates its pods in.
    flags: u8,
    /// Its ipBlock prefixes and excepts, sorted, each once.
    prefixes: Vec<Prefix>,
    /// Sorted, each once.
    rules: Vec<RulePrefix>,
    sctp_ports: usize,
}

/// The entries a pass may have changed: each is compared with the state and written if it
/// differs.
#[derive(Debug, Default)]
struct Touched {
    peers: BTreeSet<HostAddrKey>,
    endpoints: BTreeSet<HostAddrKey>,
    cidrs: BTreeSet<Prefix>,
    rules: BTreeSet<RulePrefix>,
}

/// A peer a rule names, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Any,
    Pods(u32, Rc<PodClass>),
    Cidr(u32),
}

/// A port prefix of a rule key: (protocol, port, prefix length).
type PortPrefix = (u8, u16, u32);

const ANY_PROTOCOL: PortPrefix = (0, 0, policy_rule_bits::ANY_PROTOCOL);

/// Pod identities with their classes.
type Classes = Vec<(u32, Rc<PodClass>)>;

/// Selector results of one pass, by (scope, selector).
type Matched = HashMap<(NamespaceScope, Selector), Rc<Classes>>;

impl PolicyCompiler {
    pub fn new(node_name: &str) -> PolicyCompiler {
        PolicyCompiler {
            node_name: node_name.to_owned(),
            identities: Allocator::new(),
            endpoints: Allocator::new(),
            hints: None,
            model: Model::default(),
            compiled: Compiled::default(),
        }
    }

    /// Takes what the maps hold (left by an earlier agent) as the preferred numbering of the
    /// next pass: a pod class keeps the identity its pods' addresses have there, a prefix its
    /// CIDR identity, a pod its endpoint id, so a restart over unchanged intent writes nothing
    /// even when the earlier agent's history numbered things otherwise.
    pub fn adopt(&mut self, current: &PolicyState) {
        let hints = Hints {
            peers: current.peers.iter().map(|(k, v)| (*k, *v)).collect(),
            cidrs: current.cidrs.iter().map(|(k, v)| (*k, *v)).collect(),
            endpoints: (current.endpoints.iter())
                .map(|(k, v)| (*k, v.id))
                .collect(),
        };
        let identities = hints.peers.values().chain(hints.cidrs.values());
        self.identities
            .reserve_up_to(identities.copied().max().unwrap_or(0));
        self.endpoints
            .reserve_up_to(hints.endpoints.values().copied().max().unwrap_or(0));
        self.hints = Some(hints);
    }

    /// The last pass's result.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// Compiles `intents` from scratch (ids stay with what still exists) and returns the
    /// result.
    pub fn compile(&mut self, intents: &PolicyIntents) -> Compiled {
        self.recompile(intents);
        self.compiled.clone()
    }

    /// Compiles `intents` from scratch, forgetting what earlier passes derived (but not the
    /// ids of what still exists); returns the state before, for a full-state diff.
    pub fn recompile(&mut self, intents: &PolicyIntents) -> PolicyState {
        self.model = Model::default();
        let before = std::mem::take(&mut self.compiled);
        let everything = PolicyChanges {
            pods: intents.pods.keys().cloned().collect(),
            policies: intents.policies.keys().cloned().collect(),
            ..PolicyChanges::default()
        };
        self.advance(intents, &everything);
        self.identities.finish();
        self.endpoints.finish();
        before.state
    }

    /// Brings the compiled state to `intents`, of which only `changes` changed since the last
    /// pass, and returns the plan that moves the maps along. Everything changed
    /// ([`PolicyChanges::everything`]): recompiled from scratch, the plan the full-state diff.
    pub fn update(&mut self, intents: &PolicyIntents, changes: &PolicyChanges) -> PolicyPlan {
        if changes.everything {
            let before = self.recompile(intents);
            return PolicyPlan::between(&before, &self.compiled.state);
        }
        self.advance(intents, changes)
    }

    /// One pass over `changes`: pods first (their classes), then the selection of each
    /// affected policy (isolation, prefixes, endpoint ids), then its rule entries, which
    /// need all of those; last the entries that changed, compared with the state.
    fn advance(&mut self, intents: &PolicyIntents, changes: &PolicyChanges) -> PolicyPlan {
        self.identities.begin();
        self.endpoints.begin();
        let hints = self.hints.take().unwrap_or_default();
        let mut touched = Touched::default();
        let mut dirty = changes.policies.clone();
        let model = &mut self.model;
        let classes = model.update_pods(
            intents,
            changes,
            &self.node_name,
            &mut self.identities,
            &hints,
            &mut dirty,
            &mut touched,
        );
        dirty.extend(model.selecting_classes(intents, &classes));
        let (prefixes, pods) =
            model.select(intents, &dirty, &mut self.identities, &hints, &mut touched);
        model.number_endpoints(
            pods,
            &mut self.endpoints,
            &hints,
            &mut self.compiled.endpoints,
            &mut touched,
        );
        dirty.extend(model.holding_prefixes(intents, &prefixes));
        model.write_rules(intents, &dirty, &mut touched);
        self.settle(touched)
    }

    /// Compares the touched entries with the state, updates it and returns the writes.
    fn settle(&mut self, touched: Touched) -> PolicyPlan {
        let model = &self.model;
        let state = &mut self.compiled.state;
        let mut plan = PolicyPlan::default();
        for key in touched.peers {
            let owner = model.owners.get(&key).and_then(|o| o.last());
            let wanted = owner.map(|pod| model.pods[pod].identity);
            settle_entry(
                &mut state.peers,
                key,
                wanted,
                &mut plan.upsert_peers,
                &mut plan.delete_peers,
            );
        }
        for key in touched.endpoints {
            let owners = model.owners.get(&key).into_iter().flatten().rev();
            let wanted = owners
                .filter_map(|pod| model.isolation.get(pod))
                .find(|i| i.policies > 0)
                .map(|i| PolicyEndpoint {
                    id: i.endpoint,
                    flags: i.flags(),
                    _pad: [0; 3],
                });
            settle_entry(
                &mut state.endpoints,
                key,
                wanted,
                &mut plan.upsert_endpoints,
                &mut plan.delete_endpoints,
            );
        }
        for prefix in touched.cidrs {
            let wanted = model.prefixes.get(&prefix).map(|p| p.id);
            settle_entry(
                &mut state.cidrs,
                cidr_key(&prefix),
                wanted,
                &mut plan.upsert_cidrs,
                &mut plan.delete_cidrs,
            );
        }
        for key in touched.rules {
            let wanted = model.rules.contains_key(&key).then_some(1);
            settle_entry(
                &mut state.rules,
                key,
                wanted,
                &mut plan.upsert_rules,
                &mut plan.delete_rules,
            );
        }
        let active = || {
            model
                .contributions
                .values()
                .filter(|c| !c.selected.is_empty())
        };
        self.compiled.report = CompileReport {
            policies: active().count(),
            isolated_endpoints: self.compiled.endpoints.len(),
            rule_entries: state.rules.len(),
            sctp_ports: active().map(|c| c.sctp_ports).sum(),
        };
        plan
    }
}

/// Brings one entry of `map` to `wanted`, noting the write.
fn settle_entry<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut BTreeMap<K, V>,
    key: K,
    wanted: Option<V>,
    upserts: &mut Vec<(K, V)>,
    deletions: &mut Vec<K>,
) {
    match wanted {
        Some(value) => {
            if map.insert(key, value) != Some(value) {
                upserts.push((key, value));
            }
        }
        None => {
            if map.remove(&key).is_some() {
                deletions.push(key);
            }
        }
    }
}

/// A policy's isolated directions.
fn isolated_directions(policy: &PolicyIntent) -> u8 {
    (if policy.ingress.is_some() {
        policy_flags::INGRESS
    } else {
        0
    }) | if policy.egress.is_some() {
        policy_flags::EGRESS
    } else {
        0
    }
}

/// The rules of the directions a policy isolates.
fn rules_of(policy: &PolicyIntent) -> impl Iterator<Item = (u8, &Rule)> {
    let ingress = policy.ingress.iter().flatten();
    let egress = policy.egress.iter().flatten();
    (ingress.map(|r| (policy_direction::INGRESS, r)))
        .chain(egress.map(|r| (policy_direction::EGRESS, r)))
}

/// The policies of a namespace.
fn policies_in<'a>(
    intents: &'a PolicyIntents,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a ObjectRef, &'a PolicyIntent)> {
    let first = ObjectRef {
        namespace: namespace.to_owned(),
        name: String::new(),
    };
    (intents.policies.range(first..)).take_while(move |(id, _)| id.namespace == namespace)
}

fn namespace_labels(intents: &PolicyIntents, namespace: &str) -> Labels {
    match intents.namespaces.get(namespace) {
        Some(n) => n.labels.clone(),
        // A pod's Namespace not seen (yet): the label the API server always sets.
        None => [(
            "kubernetes.io/metadata.name".to_owned(),
            namespace.to_owned(),
        )]
        .into(),
    }
}

impl Model {
    /// Takes the changed pods (and every pod of a changed namespace, whose class carries the
    /// namespace's labels) out of the indexes and puts their new versions in. Policies of a
    /// local pod's namespace selecting it before or after become dirty. Returns the classes
    /// that appeared or went: rules naming their peers change.
    #[allow(clippy::too_many_arguments)]
    fn update_pods(
        &mut self,
        intents: &PolicyIntents,
        changes: &PolicyChanges,
        node_name: &str,
        identities: &mut Allocator<IdentityKey>,
        hints: &Hints,
        dirty: &mut BTreeSet<ObjectRef>,
        touched: &mut Touched,
    ) -> Vec<Rc<PodClass>> {
        let mut pods = changes.pods.clone();
        for namespace in &changes.namespaces {
            let first = ObjectRef {
                namespace: namespace.clone(),
                name: String::new(),
            };
            let inside = self.pods.range(first..);
            pods.extend(
                inside
                    .take_while(|(id, _)| id.namespace == *namespace)
                    .map(|(id, _)| id.clone()),
            );
        }
        let mut emptied = Vec::new();
        for id in &pods {
            if let Some(old) = self.pods.remove(id) {
                self.remove_pod(intents, id, old, dirty, touched, &mut emptied);
            }
        }
        let mut changed = Vec::new();
        let mut labels_of: HashMap<&str, Labels> = HashMap::new();
        for id in &pods {
            let Some(pod) = intents.pods.get(id).filter(|p| !p.addresses.is_empty()) else {
                continue;
            };
            let namespace = pod.id.namespace.as_str();
            let labels = (labels_of.entry(namespace))
                .or_insert_with(|| namespace_labels(intents, namespace))
                .clone();
            let class = PodClass {
                namespace: namespace.to_owned(),
                labels: pod.labels.clone(),
                namespace_labels: labels,
                named_ports: pod.named_ports.clone(),
            };
            let hint = (pod.addresses.first()).and_then(|a| hints.peers.get(&addr_key(*a)));
            let (class, identity, born) = self.join_class(class, hint.copied(), identities);
            if born {
                changed.push(class.clone());
            }
            for address in &pod.addresses {
                let key = addr_key(*address);
                self.owners.entry(key).or_default().insert(id.clone());
                touched.peers.insert(key);
                touched.endpoints.insert(key);
            }
            let local = pod.node == node_name;
            if local {
                self.local
                    .entry(namespace.to_owned())
                    .or_default()
                    .insert(id.clone());
                let selecting = policies_in(intents, namespace)
                    .filter(|(_, p)| p.pod_selector.matches(&pod.labels));
                dirty.extend(selecting.map(|(id, _)| id.clone()));
            }
            let entry = PodEntry {
                class,
                identity,
                addresses: pod.addresses.clone(),
                local,
            };
            self.pods.insert(id.clone(), entry);
        }
        // Classes left without pods go after the additions: a pod put back into its own
        // class keeps it (and its identity).
        for class in emptied {
            let Some(shared) = self.classes.get(&class).filter(|s| s.holders == 0) else {
                continue;
            };
            let id = shared.id;
            self.classes.remove(&class);
            self.unindex_class(&class, id);
            identities.release(&IdentityKey::Pods(class.clone()));
            changed.push(class);
        }
        changed
    }

    /// Counts one more pod of `class`; a class new to the model takes an identity (`hint`
    /// when free). Returns the class as the model holds it, its identity, and whether it is new.
    fn join_class(
        &mut self,
        class: PodClass,
        hint: Option<u32>,
        identities: &mut Allocator<IdentityKey>,
    ) -> (Rc<PodClass>, u32, bool) {
        if let Some((class, shared)) = self.classes.get_key_value(&class) {
            let (class, id) = (class.clone(), shared.id);
            self.classes.get_mut(&class).expect("just found").holders += 1;
            return (class, id, false);
        }
        let class = Rc::new(class);
        let id = identities.id_or(&IdentityKey::Pods(class.clone()), hint);
        self.index_class(&class, id);
        self.classes
            .insert(class.clone(), Shared { id, holders: 1 });
        (class, id, true)
    }

    fn remove_pod(
        &mut self,
        intents: &PolicyIntents,
        id: &ObjectRef,
        old: PodEntry,
        dirty: &mut BTreeSet<ObjectRef>,
        touched: &mut Touched,
        emptied: &mut Vec<Rc<PodClass>>,
    ) {
        for address in &old.addresses {
            let key = addr_key(*address);
            if let Some(owners) = self.owners.get_mut(&key) {
                owners.remove(id);
                if owners.is_empty() {
                    self.owners.remove(&key);
                }
            }
            touched.peers.insert(key);
            touched.endpoints.insert(key);
        }
        let namespace = id.namespace.as_str();
        if old.local {
            if let Some(local) = self.local.get_mut(namespace) {
                local.remove(id);
                if local.is_empty() {
                    self.local.remove(namespace);
                }
            }
            let selecting = policies_in(intents, namespace)
                .filter(|(_, p)| p.pod_selector.matches(&old.class.labels));
            dirty.extend(selecting.map(|(id, _)| id.clone()));
        }
        let shared = self.classes.get_mut(&old.class).expect("a pod's class");
        shared.holders -= 1;
        if shared.holders == 0 {
            emptied.push(old.class);
        }
    }

    fn index_class(&mut self, class: &Rc<PodClass>, id: u32) {
        (self.by_namespace.entry(class.namespace.clone()))
            .or_default()
            .insert(id, class.clone());
        for port in &class.named_ports {
            (self.named.entry(port.name.clone())).or_default().insert((
                port.protocol,
                id,
                port.port,
            ));
        }
    }

    fn unindex_class(&mut self, class: &PodClass, id: u32) {
        if let Some(classes) = self.by_namespace.get_mut(&class.namespace) {
            classes.remove(&id);
            if classes.is_empty() {
                self.by_namespace.remove(&class.namespace);
            }
        }
        for port in &class.named_ports {
            if let Some(named) = self.named.get_mut(&port.name) {
                named.remove(&(port.protocol, id, port.port));
                if named.is_empty() {
                    self.named.remove(&port.name);
                }
            }
        }
    }

    /// The policies writing rules whose peers may be one of `classes`: a peer selector
    /// matching it, or an egress rule to any address by a port name it defines.
    fn selecting_classes(
        &self,
        intents: &PolicyIntents,
        classes: &[Rc<PodClass>],
    ) -> Vec<ObjectRef> {
        if classes.is_empty() {
            return Vec::new();
        }
        let names = |class: &PodClass, rule: &Rule| {
            let named = rule.ports.iter().flatten().filter_map(|p| match &p.port {
                Some(PortRef::Name(name)) => Some((name, p.protocol)),
                _ => None,
            });
            named.into_iter().any(|(name, protocol)| {
                (class.named_ports.iter()).any(|p| p.name == *name && p.protocol == protocol)
            })
        };
        let selects = |class: &PodClass, direction: u8, rule: &Rule| match &rule.peers {
            Some(peers) => peers.iter().any(|peer| match peer {
                Peer::Pods { namespaces, pods } => {
                    let scoped = match namespaces {
                        NamespaceScope::Own(namespace) => class.namespace == *namespace,
                        NamespaceScope::Selected(s) => s.matches(&class.namespace_labels),
                    };
                    scoped && pods.matches(&class.labels)
                }
                Peer::IpBlock { .. } => false,
            }),
            None => direction == policy_direction::EGRESS && names(class, rule),
        };
        self.active(intents)
            .filter(|(_, policy)| {
                rules_of(policy).any(|(direction, rule)| {
                    classes.iter().any(|class| selects(class, direction, rule))
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The policies selecting local pods (the ones writing anything), with their intent.
    fn active<'a>(
        &'a self,
        intents: &'a PolicyIntents,
    ) -> impl Iterator<Item = (&'a ObjectRef, &'a PolicyIntent)> {
        (self.contributions.iter())
            .filter(|(_, c)| !c.selected.is_empty())
            .filter_map(|(id, _)| intents.policies.get_key_value(id))
    }

    /// Recomputes which local pods the `dirty` policies select, in which directions, and
    /// their ipBlock prefixes. Returns the prefixes that appeared or went, and the pods
    /// selected before or now (their isolation may have changed).
    fn select(
        &mut self,
        intents: &PolicyIntents,
        dirty: &BTreeSet<ObjectRef>,
        identities: &mut Allocator<IdentityKey>,
        hints: &Hints,
        touched: &mut Touched,
    ) -> (Vec<Prefix>, BTreeSet<ObjectRef>) {
        let mut emptied = Vec::new();
        let mut changed = Vec::new();
        let mut pods = BTreeSet::new();
        for id in dirty {
            let old = self.contributions.remove(id).unwrap_or_default();
            let mut new = Contribution {
                rules: old.rules,
                sctp_ports: old.sctp_ports,
                ..Contribution::default()
            };
            if let Some(policy) = intents.policies.get(id) {
                let local = self.local.get(&id.namespace).into_iter().flatten();
                new.selected = local
                    .filter(|pod| policy.pod_selector.matches(&self.pods[*pod].class.labels))
                    .cloned()
                    .collect();
                if !new.selected.is_empty() {
                    new.flags = isolated_directions(policy);
                    let mut prefixes = BTreeSet::new();
                    for (_, rule) in rules_of(policy) {
                        for peer in rule.peers.iter().flatten() {
                            if let Peer::IpBlock { cidr, except } = peer {
                                prefixes.insert(*cidr);
                                prefixes.extend(except.iter().copied());
                            }
                        }
                    }
                    new.prefixes = prefixes.into_iter().collect();
                }
            }
            for pod in &old.selected {
                let isolation = self.isolation.get_mut(pod).expect("a selected pod");
                isolation.count(old.flags, -1);
            }
            pods.extend(old.selected.iter().chain(&new.selected).cloned());
            for pod in &new.selected {
                self.isolation
                    .entry(pod.clone())
                    .or_default()
                    .count(new.flags, 1);
            }
            for prefix in &old.prefixes {
                let shared = self.prefixes.get_mut(prefix).expect("a written prefix");
                shared.holders -= 1;
                if shared.holders == 0 {
                    emptied.push(*prefix);
                }
            }
            for prefix in &new.prefixes {
                match self.prefixes.get_mut(prefix) {
                    Some(shared) => shared.holders += 1,
                    None => {
                        let hint = hints.cidrs.get(&cidr_key(prefix)).copied();
                        let id = identities.id_or(&IdentityKey::Cidr(*prefix), hint);
                        self.prefixes.insert(*prefix, Shared { id, holders: 1 });
                        touched.cidrs.insert(*prefix);
                        changed.push(*prefix);
                    }
                }
            }
            self.contributions.insert(id.clone(), new);
        }
        for prefix in emptied {
            if self.prefixes.get(&prefix).is_some_and(|s| s.holders == 0) {
                self.prefixes.remove(&prefix);
                identities.release(&IdentityKey::Cidr(prefix));
                touched.cidrs.insert(prefix);
                changed.push(prefix);
            }
        }
        (changed, pods)
    }

    /// Gives newly isolated pods their endpoint ids (in name order) and frees those of pods
    /// no longer isolated.
    fn number_endpoints(
        &mut self,
        pods: BTreeSet<ObjectRef>,
        endpoints: &mut Allocator<ObjectRef>,
        hints: &Hints,
        by_id: &mut BTreeMap<u32, ObjectRef>,
        touched: &mut Touched,
    ) {
        for pod in pods {
            let Some(isolation) = self.isolation.get_mut(&pod) else {
                continue;
            };
            if isolation.policies == 0 {
                if isolation.endpoint != 0 {
                    by_id.remove(&isolation.endpoint);
                    endpoints.release(&pod);
                }
                self.isolation.remove(&pod);
            } else if isolation.endpoint == 0 {
                let first = self.pods[&pod].addresses.first();
                let hint = first.and_then(|a| hints.endpoints.get(&addr_key(*a)));
                isolation.endpoint = endpoints.id_or(&pod, hint.copied());
                by_id.insert(isolation.endpoint, pod.clone());
            }
            if let Some(entry) = self.pods.get(&pod) {
                touched
                    .endpoints
                    .extend(entry.addresses.iter().map(|a| addr_key(*a)));
            }
        }
    }

    /// The policies whose ipBlocks hold one of `prefixes`: which written prefixes an
    /// ipBlock allows depends on every policy's prefixes.
    fn holding_prefixes(&self, intents: &PolicyIntents, prefixes: &[Prefix]) -> Vec<ObjectRef> {
        if prefixes.is_empty() {
            return Vec::new();
        }
        self.active(intents)
            .filter(|(_, policy)| {
                rules_of(policy).any(|(_, rule)| {
                    rule.peers.iter().flatten().any(|peer| match peer {
                        Peer::IpBlock { cidr, .. } => prefixes.iter().any(|p| cidr.contains(p)),
                        Peer::Pods { .. } => false,
                    })
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Recomputes the rule entries of the `dirty` policies and counts the difference.
    fn write_rules(
        &mut self,
        intents: &PolicyIntents,
        dirty: &BTreeSet<ObjectRef>,
        touched: &mut Touched,
    ) {
        let mut matched = Matched::new();
        for id in dirty {
            let Some(contribution) = self.contributions.get(id) else {
                continue;
            };
            let (rules, sctp_ports) = match intents.policies.get(id) {
                Some(policy) if !contribution.selected.is_empty() => {
                    self.rule_entries_of(policy, &contribution.selected, &mut matched)
                }
                _ => (Vec::new(), 0),
            };
            let contribution = self.contributions.get_mut(id).expect("just found");
            let old = std::mem::replace(&mut contribution.rules, rules);
            contribution.sctp_ports = sctp_ports;
            let new = &contribution.rules;
            for key in old.iter().filter(|k| new.binary_search(k).is_err()) {
                let count = self.rules.get_mut(key).expect("a counted rule");
                *count -= 1;
                if *count == 0 {
                    self.rules.remove(key);
                    touched.rules.insert(*key);
                }
            }
            for key in new.iter().filter(|k| old.binary_search(k).is_err()) {
                let count = self.rules.entry(*key).or_insert(0);
                *count += 1;
                if *count == 1 {
                    touched.rules.insert(*key);
                }
            }
            if !intents.policies.contains_key(id) {
                self.contributions.remove(id);
            }
        }
    }

    /// A policy's rule entries for the local pods it selects (sorted, each once), and its
    /// SCTP port entries.
    fn rule_entries_of(
        &self,
        policy: &PolicyIntent,
        selected: &[ObjectRef],
        matched: &mut Matched,
    ) -> (Vec<RulePrefix>, usize) {
        let mut out = Vec::new();
        let mut sctp_ports = 0;
        for (direction, rule) in rules_of(policy) {
            sctp_ports += (rule.ports.iter().flatten())
                .filter(|p| p.protocol == PolicyProtocol::Sctp)
                .count();
            let targets = self.targets(rule, matched);
            let ports = RulePorts::of(rule);
            for pod in selected {
                let endpoint = self.isolation[pod].endpoint;
                let named_ports = &self.pods[pod].class.named_ports;
                self.rule_entries(direction, endpoint, named_ports, &ports, &targets, &mut out);
            }
        }
        out.sort_unstable();
        out.dedup();
        (out, sctp_ports)
    }

    /// The identities of the written prefixes inside `cidr` and inside none of `except`: the
    /// longest match of an address in the ipBlock is one of them, of an address outside it
    /// never.
    fn inside(&self, cidr: &Prefix, except: &[Prefix]) -> Vec<u32> {
        let first = Prefix { len: 0, ..*cidr };
        (self.prefixes.range(first..))
            .take_while(|(p, _)| p.family == cidr.family && p.addr <= cidr.last())
            .filter(|(p, _)| cidr.contains(p) && !except.iter().any(|e| e.contains(p)))
            .map(|(_, shared)| shared.id)
            .collect()
    }

    /// The pod identities a (scope, selector) pair matches, once per pass.
    fn select_classes(
        &self,
        scope: &NamespaceScope,
        pods: &Selector,
        matched: &mut Matched,
    ) -> Rc<Classes> {
        let key = (scope.clone(), pods.clone());
        if let Some(found) = matched.get(&key) {
            return found.clone();
        }
        let namespaces: Vec<&BTreeMap<u32, Rc<PodClass>>> = match scope {
            NamespaceScope::Own(namespace) => {
                self.by_namespace.get(namespace).into_iter().collect()
            }
            // Every class of a namespace carries the namespace's labels.
            NamespaceScope::Selected(selector) => (self.by_namespace.values())
                .filter(|classes| {
                    (classes.values().next()).is_some_and(|c| selector.matches(&c.namespace_labels))
                })
                .collect(),
        };
        let found: Classes = namespaces
            .into_iter()
            .flatten()
            .filter(|(_, class)| pods.matches(&class.labels))
            .map(|(id, class)| (*id, class.clone()))
            .collect();
        let found = Rc::new(found);
        matched.insert(key, found.clone());
        found
    }

    /// The peers a rule allows, each once.
    fn targets(&self, rule: &Rule, matched: &mut Matched) -> Vec<Target> {
        let Some(peers) = &rule.peers else {
            return vec![Target::Any];
        };
        let mut out: BTreeMap<u32, Target> = BTreeMap::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for (id, class) in self.select_classes(namespaces, pods, matched).iter() {
                        out.insert(*id, Target::Pods(*id, class.clone()));
                    }
                }
                Peer::IpBlock { cidr, except } => {
                    for id in self.inside(cidr, except) {
                        out.insert(id, Target::Cidr(id));
                    }
                }
            }
        }
        out.into_values().collect()
    }

    /// The entries of one rule for one isolated pod (its named ports given).
    fn rule_entries(
        &self,
        direction: u8,
        endpoint: u32,
        pod_ports: &BTreeSet<NamedPort>,
        ports: &RulePorts<'_>,
        targets: &[Target],
        out: &mut Vec<RulePrefix>,
    ) {
        let mut write = |identity: u32, (proto, port, bits): PortPrefix| {
            let key = PolicyRuleKey {
                endpoint_be: endpoint.to_be(),
                identity_be: identity.to_be(),
                direction,
                proto,
                port_be: port.to_be(),
            };
            out.push((key, bits));
        };
        for target in targets {
            let identity = match target {
                Target::Any => POLICY_ANY_PEER,
                Target::Pods(id, _) | Target::Cidr(id) => *id,
            };
            for prefix in &ports.fixed {
                write(identity, *prefix);
            }
            for &(name, protocol, proto) in &ports.named {
                // A named port means the port of that name on the pod receiving the
                // connection: the isolated pod for ingress, the peer for egress.
                let resolve = |ports: &BTreeSet<NamedPort>| {
                    ports
                        .iter()
                        .find(|p| p.name == name && p.protocol == protocol)
                        .map(|p| (proto, p.port, policy_rule_bits::PORT))
                };
                match (direction, target) {
                    (policy_direction::INGRESS, _) => {
                        if let Some(prefix) = resolve(pod_ports) {
                            write(identity, prefix);
                        }
                    }
                    (_, Target::Pods(_, class)) => {
                        if let Some(prefix) = resolve(&class.named_ports) {
                            write(identity, prefix);
                        }
                    }
                    // Any address: every pod that defines the name, at its own number.
                    (_, Target::Any) => {
                        let defining = self.named.get(name).into_iter().flatten();
                        for (_, id, port) in defining.filter(|(p, _, _)| *p == protocol) {
                            write(*id, (proto, *port, policy_rule_bits::PORT));
                        }
                    }
                    // An address outside every pod has no named ports.
                    (_, Target::Cidr(_)) => {}
                }
            }
        }
    }
}

impl PolicyCompiler {
    /// Names for the ids of the last pass: formatted only when asked, since a pass over 5,000
    /// pods would otherwise spend as long naming as compiling.
    pub fn names(&self) -> PolicyNames {
        let identities = (self.identities.ids.iter())
            .map(|(key, id)| (id, key))
            .map(|(id, key)| {
                let name = match key {
                    IdentityKey::Cidr(prefix) => prefix.to_string(),
                    IdentityKey::Pods(class) => {
                        let labels: Vec<String> = class
                            .labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        let mut name = format!("{}/{}", class.namespace, labels.join(","));
                        if !class.named_ports.is_empty() {
                            let ports: Vec<String> = (class.named_ports.iter())
                                .map(|p| format!("{}/{}/{}", p.name, p.protocol, p.port))
                                .collect();
                            name.push_str(&format!(" +ports {}", ports.join(",")));
                        }
                        name
                    }
                };
                (*id, name)
            })
            .collect();
        PolicyNames {
            identities,
            endpoints: (self.compiled.endpoints.iter())
                .map(|(id, pod)| (*id, pod.to_string()))
                .collect(),
        }
    }
}

/// A rule's `ports`, resolved as far as they can be before the pods are known: numbers and
/// ranges to prefixes, names left to resolve per pod. SCTP entries are dropped (never carried).
struct RulePorts<'r> {
    fixed: Vec<PortPrefix>,
    /// (name, protocol, its IP protocol number).
    named: Vec<(&'r str, PolicyProtocol, u8)>,
}

impl<'r> RulePorts<'r> {
    fn of(rule: &'r Rule) -> Self {
        let Some(specs) = &rule.ports else {
            return RulePorts {
                fixed: vec![ANY_PROTOCOL],
                named: Vec::new(),
            };
        };
        let mut ports = RulePorts {
            fixed: Vec::new(),
            named: Vec::new(),
        };
        for spec in specs {
            let Some(proto) = spec.protocol.carried() else {
                continue;
            };
            match &spec.port {
                None => ports.fixed.push((proto, 0, policy_rule_bits::ANY_PORT)),
                Some(PortRef::Number(first)) => {
                    let last = spec.end_port.unwrap_or(*first);
                    for (port, bits) in port_range_prefixes(*first, last) {
                        ports
                            .fixed
                            .push((proto, port, policy_rule_bits::ANY_PORT + bits));
                    }
                }
                Some(PortRef::Name(name)) => ports.named.push((name, spec.protocol, proto)),
            }
        }
        ports
    }
}

fn cidr_key(prefix: &Prefix) -> (PolicyCidrKey, u32) {
    let (addr, family) = addr_of(prefix.ip());
    (
        PolicyCidrKey {
            family,
            _pad: [0; 3],
            addr,
        },
        POLICY_CIDR_FIXED_BITS + u32::from(prefix.len),
    )
}

/// The fewest prefixes of a 16-bit port that cover `first..=last` exactly, as (port, prefix
/// bits of the port).
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut at, last) = (u32::from(first), u32::from(last));
    while at <= last {
        // The largest aligned block starting at `at` that ends inside the range.
        let mut size = if at == 0 {
            1 << 16
        } else {
            1u32 << at.trailing_zeros()
        };
        while at + size - 1 > last {
            size >>= 1;
        }
        out.push((at as u16, 16 - size.trailing_zeros()));
        at += size;
    }
    out
}
