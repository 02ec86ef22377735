//! Policy intent -> [`PolicyState`]: pure, deterministic, and stable across passes (an
//! identity or endpoint id stays with its pod class or pod while it exists).
//!
//! Cost: selectors are evaluated once per distinct (namespace scope, selector) over the
//! distinct pod classes of a namespace, not per pod; an ipBlock finds the written prefixes
//! inside it by a range query over the sorted prefix list, not by comparing every pair.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;

use weir_common::{
    policy_direction, policy_flags, policy_rule_bits, HostAddrKey, PolicyCidrKey, PolicyEndpoint,
    PolicyRuleKey, POLICY_ANY_PEER, POLICY_CIDR_FIXED_BITS,
};

use super::intent::{
    Labels, NamedPort, NamespaceScope, Peer, PodIntent, PolicyProtocol, PortRef, Prefix, Rule,
    Selector,
};
use super::state::PolicyState;
use super::PolicyIntents;
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

    /// Frees the ids of keys this pass did not use.
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

impl PolicyCompiler {
    /// Names for the ids of the last pass (`compiled`): formatted only when asked, since a
    /// pass over 5,000 pods would otherwise spend as long naming as compiling.
    pub fn names(&self, compiled: &Compiled) -> PolicyNames {
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
            endpoints: (compiled.endpoints.iter())
                .map(|(id, pod)| (*id, pod.to_string()))
                .collect(),
        }
    }
}

/// Keeps the id allocations between passes.
#[derive(Debug)]
pub struct PolicyCompiler {
    node_name: String,
    identities: Allocator<IdentityKey>,
    endpoints: Allocator<ObjectRef>,
    /// The ids the maps held at start, for the next pass only ([`PolicyCompiler::adopt`]).
    hints: Option<Hints>,
}

/// The ids the maps already give addresses and prefixes.
#[derive(Debug, Default)]
struct Hints {
    peers: HashMap<HostAddrKey, u32>,
    cidrs: HashMap<(PolicyCidrKey, u32), u32>,
    endpoints: HashMap<HostAddrKey, u32>,
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

impl PolicyCompiler {
    pub fn new(node_name: &str) -> PolicyCompiler {
        PolicyCompiler {
            node_name: node_name.to_owned(),
            identities: Allocator::new(),
            endpoints: Allocator::new(),
            hints: None,
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

    pub fn compile(&mut self, intents: &PolicyIntents) -> Compiled {
        self.identities.begin();
        self.endpoints.begin();
        let hints = self.hints.take().unwrap_or_default();
        let mut pass = Pass::new(intents, &self.node_name);
        let mut state = PolicyState::default();
        pass.peers(&mut self.identities, &hints, &mut state);
        let selected = pass.selected_endpoints();
        pass.cidrs(&selected, &mut self.identities, &hints, &mut state);
        let mut report = CompileReport {
            policies: selected.len(),
            ..CompileReport::default()
        };
        let mut endpoints = BTreeMap::new();
        for (pod, flags) in pass.isolation(&selected).into_values() {
            let hint = (pod.addresses.first()).and_then(|a| hints.endpoints.get(&addr_key(*a)));
            let id = self.endpoints.id_or(&pod.id, hint.copied());
            endpoints.insert(id, pod.id.clone());
            for address in &pod.addresses {
                state.endpoints.insert(
                    addr_key(*address),
                    PolicyEndpoint {
                        id,
                        flags,
                        _pad: [0; 3],
                    },
                );
            }
        }
        report.isolated_endpoints = endpoints.len();
        let endpoint_ids: HashMap<&ObjectRef, u32> =
            endpoints.iter().map(|(id, pod)| (pod, *id)).collect();
        for (policy, pods) in &selected {
            let policy = &intents.policies[*policy];
            let directions = [
                (policy_direction::INGRESS, &policy.ingress),
                (policy_direction::EGRESS, &policy.egress),
            ];
            for (direction, rules) in directions {
                for rule in rules.iter().flatten() {
                    report.sctp_ports += rule
                        .ports
                        .iter()
                        .flatten()
                        .filter(|p| p.protocol == PolicyProtocol::Sctp)
                        .count();
                    let targets = pass.targets(rule);
                    let ports = RulePorts::of(rule);
                    for pod in pods {
                        let endpoint = endpoint_ids[&pod.id];
                        pass.rule_entries(direction, endpoint, pod, &ports, &targets, &mut state);
                    }
                }
            }
        }
        report.rule_entries = state.rules.len();
        self.identities.finish();
        self.endpoints.finish();
        Compiled {
            state,
            report,
            endpoints,
        }
    }
}

/// One compile pass's indexes.
struct Pass<'a> {
    intents: &'a PolicyIntents,
    node_name: &'a str,
    /// Pod identities by namespace, each with its class.
    classes: BTreeMap<&'a str, Classes>,
    /// Pod identities defining a named port, for egress rules to any peer.
    named: BTreeMap<(&'a str, PolicyProtocol), Vec<(u32, u16)>>,
    /// Selector results, by (scope, selector).
    matched: HashMap<(NamespaceScope, Selector), Rc<Classes>>,
    /// Every written ipBlock prefix, sorted, with its identity.
    prefixes: Vec<(Prefix, u32)>,
}

/// Pod identities with their classes.
type Classes = Vec<(u32, Rc<PodClass>)>;

/// A policy (by id) and the local pods it selects.
type Selected<'a> = Vec<(&'a ObjectRef, Vec<&'a PodIntent>)>;

impl<'a> Pass<'a> {
    fn new(intents: &'a PolicyIntents, node_name: &'a str) -> Self {
        Pass {
            intents,
            node_name,
            classes: BTreeMap::new(),
            named: BTreeMap::new(),
            matched: HashMap::new(),
            prefixes: Vec::new(),
        }
    }

    fn namespace_labels(&self, namespace: &str) -> Labels {
        match self.intents.namespaces.get(namespace) {
            Some(n) => n.labels.clone(),
            // A pod's Namespace not seen (yet): the label the API server always sets.
            None => [(
                "kubernetes.io/metadata.name".to_owned(),
                namespace.to_owned(),
            )]
            .into(),
        }
    }

    /// Every addressed pod of the cluster: its identity, and its addresses in the peer map.
    fn peers(
        &mut self,
        identities: &mut Allocator<IdentityKey>,
        hints: &Hints,
        state: &mut PolicyState,
    ) {
        let mut namespace_labels: HashMap<&str, Labels> = HashMap::new();
        // Pods of one class share one identity: built and looked up once per class and pass,
        // by reference (classes are few, pods many).
        type ClassRef<'p> = (&'p str, &'p Labels, &'p BTreeSet<NamedPort>);
        let mut known: HashMap<ClassRef<'a>, u32> = HashMap::new();
        for pod in self.intents.pods.values() {
            if pod.addresses.is_empty() {
                continue;
            }
            let namespace = pod.id.namespace.as_str();
            let class_ref = (namespace, &pod.labels, &pod.named_ports);
            let id = match known.get(&class_ref) {
                Some(id) => *id,
                None => {
                    let labels = namespace_labels
                        .entry(namespace)
                        .or_insert_with(|| self.namespace_labels(namespace))
                        .clone();
                    let class = PodClass {
                        namespace: namespace.to_owned(),
                        labels: pod.labels.clone(),
                        namespace_labels: labels,
                        named_ports: pod.named_ports.clone(),
                    };
                    let class = Rc::new(class);
                    let hint = (pod.addresses.first()).and_then(|a| hints.peers.get(&addr_key(*a)));
                    let id = identities.id_or(&IdentityKey::Pods(class.clone()), hint.copied());
                    known.insert(class_ref, id);
                    for port in &pod.named_ports {
                        self.named
                            .entry((port.name.as_str(), port.protocol))
                            .or_default()
                            .push((id, port.port));
                    }
                    self.classes.entry(namespace).or_default().push((id, class));
                    id
                }
            };
            for address in &pod.addresses {
                state.peers.insert(addr_key(*address), id);
            }
        }
    }

    /// The policies that select at least one addressed pod of this node, with those pods.
    fn selected_endpoints(&self) -> Selected<'a> {
        let mut local: BTreeMap<&str, Vec<&PodIntent>> = BTreeMap::new();
        for pod in self.intents.pods.values() {
            if pod.node == self.node_name && !pod.addresses.is_empty() {
                local
                    .entry(pod.id.namespace.as_str())
                    .or_default()
                    .push(pod);
            }
        }
        self.intents
            .policies
            .iter()
            .filter_map(|(id, policy)| {
                let pods: Vec<&PodIntent> = local
                    .get(id.namespace.as_str())?
                    .iter()
                    .filter(|p| policy.pod_selector.matches(&p.labels))
                    .copied()
                    .collect();
                (!pods.is_empty()).then_some((id, pods))
            })
            .collect()
    }

    /// Each selected pod and the directions it is isolated in.
    fn isolation(&self, selected: &Selected<'a>) -> BTreeMap<&'a ObjectRef, (&'a PodIntent, u8)> {
        let mut out: BTreeMap<&ObjectRef, (&PodIntent, u8)> = BTreeMap::new();
        for (policy, pods) in selected {
            let policy = &self.intents.policies[*policy];
            let flags = if policy.ingress.is_some() {
                policy_flags::INGRESS
            } else {
                0
            } | if policy.egress.is_some() {
                policy_flags::EGRESS
            } else {
                0
            };
            for pod in pods {
                out.entry(&pod.id).or_insert((pod, 0)).1 |= flags;
            }
        }
        out
    }

    /// Every prefix of the ipBlocks of the selected policies, with its identity.
    fn cidrs(
        &mut self,
        selected: &Selected<'a>,
        identities: &mut Allocator<IdentityKey>,
        hints: &Hints,
        state: &mut PolicyState,
    ) {
        let mut prefixes = BTreeSet::new();
        for (policy, _) in selected {
            let policy = &self.intents.policies[*policy];
            let rules = policy.ingress.iter().chain(&policy.egress).flatten();
            for peer in rules.flat_map(|r| r.peers.iter().flatten()) {
                if let Peer::IpBlock { cidr, except } = peer {
                    prefixes.insert(*cidr);
                    prefixes.extend(except.iter().copied());
                }
            }
        }
        self.prefixes = prefixes
            .into_iter()
            .map(|p| {
                let hint = hints.cidrs.get(&cidr_key(&p)).copied();
                (p, identities.id_or(&IdentityKey::Cidr(p), hint))
            })
            .collect();
        for (prefix, id) in &self.prefixes {
            state.cidrs.insert(cidr_key(prefix), *id);
        }
    }

    /// The identities of the written prefixes inside `cidr` and inside none of `except`: the
    /// longest match of an address in the ipBlock is one of them, of an address outside it
    /// never.
    fn inside(&self, cidr: &Prefix, except: &[Prefix]) -> Vec<u32> {
        let start = self
            .prefixes
            .partition_point(|(p, _)| (p.family, p.addr) < (cidr.family, cidr.addr));
        self.prefixes[start..]
            .iter()
            .take_while(|(p, _)| p.family == cidr.family && p.addr <= cidr.last())
            .filter(|(p, _)| cidr.contains(p) && !except.iter().any(|e| e.contains(p)))
            .map(|(_, id)| *id)
            .collect()
    }

    /// The pod identities a (scope, selector) pair matches, once per pass.
    fn select(&mut self, scope: &NamespaceScope, pods: &Selector) -> Rc<Classes> {
        let key = (scope.clone(), pods.clone());
        if let Some(found) = self.matched.get(&key) {
            return found.clone();
        }
        let namespaces: Vec<&Classes> = match scope {
            NamespaceScope::Own(namespace) => {
                self.classes.get(namespace.as_str()).into_iter().collect()
            }
            // Every class of a namespace carries the namespace's labels.
            NamespaceScope::Selected(selector) => self
                .classes
                .values()
                .filter(|classes| selector.matches(&classes[0].1.namespace_labels))
                .collect(),
        };
        let found: Classes = namespaces
            .into_iter()
            .flatten()
            .filter(|(_, class)| pods.matches(&class.labels))
            .cloned()
            .collect();
        let found = Rc::new(found);
        self.matched.insert(key, found.clone());
        found
    }

    /// The peers a rule allows, each once.
    fn targets(&mut self, rule: &Rule) -> Vec<Target> {
        let Some(peers) = &rule.peers else {
            return vec![Target::Any];
        };
        let mut out: BTreeMap<u32, Target> = BTreeMap::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for (id, class) in self.select(namespaces, pods).iter() {
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

    /// Writes the entries of one rule for one isolated pod.
    fn rule_entries(
        &self,
        direction: u8,
        endpoint: u32,
        pod: &PodIntent,
        ports: &RulePorts<'_>,
        targets: &[Target],
        state: &mut PolicyState,
    ) {
        let mut write = |identity: u32, (proto, port, bits): PortPrefix| {
            let key = PolicyRuleKey {
                endpoint_be: endpoint.to_be(),
                identity_be: identity.to_be(),
                direction,
                proto,
                port_be: port.to_be(),
            };
            state.rules.insert((key, bits), 1);
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
                        if let Some(prefix) = resolve(&pod.named_ports) {
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
                        for (id, port) in self.named.get(&(name, protocol)).into_iter().flatten() {
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
