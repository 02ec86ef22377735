//! Compiles cluster intent into dataplane state.
//!
//! Identifiers are derived, not remembered: a frontend keeps the service id it has in the current
//! maps and a backend keeps its id, so a restarted agent that adopts pinned maps recompiles to
//! the same state and writes nothing. A slot list keeps surviving backends in place, so removing
//! one backend rewrites one slot rather than shifting all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use tracing::debug;
use weir_common::{
    backend_flags, service_flags, Addr, BackendSlotKey, BackendValue, FrontendKey, HostAddrKey,
    MaglevKey, ServiceValue, SourceRange, FAMILY_V4, FAMILY_V6, LOCAL_SLOT,
    SOURCE_RANGE_FIXED_BITS,
};

use crate::intent::{
    ClusterIntent, Endpoint, EndpointSliceIntent, NodeIntent, ObjectRef, Protocol, ServiceIntent,
    ServicePort, TrafficPolicy,
};
use crate::maglev;
use crate::state::{DataplaneState, Plan, SourcePrefix};

pub fn addr_of(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => (Addr::from_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (Addr::from_v6(v6.octets()), FAMILY_V6),
    }
}

/// An address as the node-address and tunnel-peer maps key it.
pub fn addr_key(ip: IpAddr) -> HostAddrKey {
    let (addr, family) = addr_of(ip);
    HostAddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

pub fn ip_of(addr: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(addr.bytes.into())
    } else {
        IpAddr::V4(addr.v4_octets().into())
    }
}

/// `ip:port` or `[ip]:port`, for display.
pub fn socket_addr(addr: &Addr, family: u8, port_be: u16) -> String {
    std::net::SocketAddr::new(ip_of(addr, family), u16::from_be(port_be)).to_string()
}

/// A backend's identity: the same address, port and protocol is the same backend, whichever
/// services use it.
type BackendIdentity = (Addr, u16, u8, u8);

fn identity(b: &BackendValue) -> BackendIdentity {
    (b.addr, b.port_be, b.proto, b.family)
}

/// Lowest-first id allocation that never hands out an id the maps still use: an id becomes free
/// only once the plan that deletes its entries has been written, so no packet can follow an old
/// reference into a new object while a plan is being applied. O(log n) per id, whatever the size
/// of the table, so one update costs the same with 10 services as with 10,000.
#[derive(Debug, Default)]
struct IdPool {
    /// Ids below `next` that nothing uses.
    free: BTreeSet<u32>,
    next: u32,
}

impl IdPool {
    fn with_taken(taken: impl IntoIterator<Item = u32>) -> IdPool {
        let taken: BTreeSet<u32> = taken.into_iter().filter(|id| *id != 0).collect();
        let next = taken.last().map_or(1, |max| max + 1);
        IdPool {
            free: (1..next).filter(|id| !taken.contains(id)).collect(),
            next,
        }
    }

    fn allocate(&mut self) -> u32 {
        self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

/// What compiling needs to know about the node it compiles for.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// This node's name, as endpoints name their node: decides which endpoints are local.
    pub node_name: String,
    /// Pick external traffic's backends from a Maglev table, so every node picks the same one.
    pub maglev: bool,
    /// The smallest Maglev table (one of `MAGLEV_SIZES`); larger services get larger ones.
    pub maglev_min_size: u32,
}

/// Maglev tables of at least this many entries, unless configured otherwise.
pub const DEFAULT_MAGLEV_MIN_SIZE: u32 = 4093;

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            node_name: String::new(),
            maglev: false,
            maglev_min_size: DEFAULT_MAGLEV_MIN_SIZE,
        }
    }
}

/// One service to recompile: its intent (None when it is gone) and the slices admitted for it.
pub struct ServiceInput<'a> {
    pub id: &'a ObjectRef,
    pub service: Option<&'a ServiceIntent>,
    pub slices: Vec<&'a EndpointSliceIntent>,
}

/// The frontends of one port and family of a service: they share one service id, and so one
/// backend list.
struct FrontendGroup<'a> {
    port: &'a ServicePort,
    family: u8,
    /// ClusterIPs.
    internal: Vec<FrontendKey>,
    /// External IPs, load-balancer IPs and the NodePort.
    external: Vec<FrontendKey>,
}

impl FrontendGroup<'_> {
    fn all(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.internal.iter().chain(&self.external).copied()
    }
}

/// The `WEIR_SOURCE_RANGES` entries of a service's ranges of `family`, under `service_id`.
fn source_ranges(service: &ServiceIntent, family: u8, service_id: u32) -> Vec<SourcePrefix> {
    service
        .source_ranges
        .iter()
        .filter_map(|cidr| {
            let (addr, f) = addr_of(cidr.addr);
            (f == family).then_some((
                SourceRange {
                    service_id_be: service_id.to_be(),
                    family,
                    _pad: [0; 3],
                    addr,
                },
                SOURCE_RANGE_FIXED_BITS + u32::from(cidr.len),
            ))
        })
        .collect()
}

/// Every frontend a service claims, grouped by port and family.
fn frontend_groups(service: &ServiceIntent) -> impl Iterator<Item = FrontendGroup<'_>> {
    service.ports.iter().flat_map(move |port| {
        [FAMILY_V4, FAMILY_V6]
            .into_iter()
            .filter_map(move |family| {
                let frontend = |ip: &IpAddr| {
                    let (addr, f) = addr_of(*ip);
                    (f == family).then_some(FrontendKey {
                        addr,
                        port_be: port.port.to_be(),
                        proto: port.protocol.number(),
                        family,
                    })
                };
                let internal: Vec<FrontendKey> =
                    service.cluster_ips.iter().filter_map(frontend).collect();
                let mut external: Vec<FrontendKey> =
                    service.external_ips.iter().filter_map(frontend).collect();
                // A NodePort exists per family the service has a ClusterIP of.
                if let (Some(node_port), false) = (port.node_port, internal.is_empty()) {
                    external.push(FrontendKey {
                        addr: Addr::UNSPECIFIED,
                        port_be: node_port.to_be(),
                        proto: port.protocol.number(),
                        family,
                    });
                }
                (!internal.is_empty() || !external.is_empty()).then_some(FrontendGroup {
                    port,
                    family,
                    internal,
                    external,
                })
            })
    })
}

/// The map entries one service owns, so recompiling it diffs only those.
#[derive(Debug, Default, Clone)]
struct Owned {
    frontends: Vec<FrontendKey>,
    service_ids: Vec<u32>,
    /// Distinct backend ids its slots name: each counts once towards the backend's references.
    backends: Vec<u32>,
}

/// The incremental compiler: the shadow of what the maps hold, which service owns which entries,
/// and the id pools. Recompiling a service touches only its own frontends and slots and the
/// backends it gains or loses; every other service keeps its ids and slot positions, so its
/// established flows and in-flight first packets never see a change.
///
/// Identifiers are derived, not remembered across restarts: a frontend keeps the service id it
/// has in the maps and a backend keeps its id, so a restarted agent that adopts pinned maps
/// recompiles to the same state and writes nothing. A slot list keeps surviving backends in
/// place, so removing one backend rewrites one slot rather than shifting all of them.
#[derive(Debug, Default)]
pub struct Compiler {
    shadow: DataplaneState,
    owned: BTreeMap<ObjectRef, Owned>,
    frontend_owner: BTreeMap<FrontendKey, ObjectRef>,
    service_id_owner: BTreeMap<u32, ObjectRef>,
    backend_ids: HashMap<BackendIdentity, u32>,
    /// Services using each backend id.
    backend_refs: BTreeMap<u32, u32>,
    service_pool: IdPool,
    backend_pool: IdPool,
    /// Services that lost a frontend to another: recompiled whenever anything changes, so they
    /// get it when its holder lets go.
    losers: BTreeSet<ObjectRef>,
    /// The frontends each loser claims and does not get, with the service holding them.
    refused: BTreeMap<ObjectRef, Vec<(FrontendKey, ObjectRef)>>,
    /// The shadow was read from the maps: entries no service claims in the first full pass are
    /// leftovers of an earlier state, deleted by [`Compiler::sweep`].
    adopted: bool,
    /// Service ids the last plan stops using, freed by [`Compiler::commit`].
    releasing: Vec<u32>,
}

impl Compiler {
    /// Starts from what the maps hold now (empty for fresh maps).
    pub fn adopt(current: DataplaneState) -> Compiler {
        let service_pool = IdPool::with_taken(
            current
                .services
                .values()
                .map(|s| s.service_id)
                .chain(current.slots.keys().map(|k| k.service_id))
                .chain(current.maglev.keys().map(|k| k.service_id)),
        );
        let backend_pool = IdPool::with_taken(current.backends.keys().copied());
        let backend_ids = current
            .backends
            .iter()
            .map(|(id, b)| (identity(b), *id))
            .collect();
        Compiler {
            shadow: current,
            service_pool,
            backend_pool,
            backend_ids,
            adopted: true,
            ..Compiler::default()
        }
    }

    /// What the maps hold, as far as this compiler wrote or read them.
    pub fn shadow(&self) -> &DataplaneState {
        &self.shadow
    }

    /// The frontends a service holds in the maps now.
    pub fn frontends_of(&self, id: &ObjectRef) -> &[FrontendKey] {
        self.owned.get(id).map_or(&[], |o| o.frontends.as_slice())
    }

    /// Whether the next pass must consider every service (the shadow was just adopted).
    pub fn needs_full_pass(&self) -> bool {
        self.adopted
    }

    /// Services to recompile on top of the changed ones (see `losers`).
    pub fn pending(&self) -> impl Iterator<Item = &ObjectRef> {
        self.losers.iter()
    }

    /// Frontends a service claims and another holds: (claimant, frontend, holder).
    pub fn refused_frontends(
        &self,
    ) -> impl Iterator<Item = (&ObjectRef, &FrontendKey, &ObjectRef)> {
        self.refused.iter().flat_map(|(claimant, taken)| {
            taken.iter().map(move |(f, holder)| (claimant, f, holder))
        })
    }

    /// A frontend two services claim belongs to the one that claimed it first. While the agent
    /// runs, that is the order claims arrive in; across a restart (a full pass over adopted
    /// maps, where every service arrives at once) the maps themselves tell: a service's
    /// frontends of one port and family share one service id, so the claimant whose other,
    /// uncontested frontends carry the contested frontend's service id is the one that held it.
    /// When no claimant or several qualify (a contested frontend with no sibling), the first in
    /// namespace/name order takes it, as in a pass over fresh maps.
    fn settle_adopted_claims(&mut self, changed: &[ServiceInput<'_>]) {
        let mut claims: BTreeMap<FrontendKey, BTreeMap<&ObjectRef, Vec<FrontendKey>>> =
            BTreeMap::new();
        for input in changed {
            let Some(service) = input.service else {
                continue;
            };
            for group in frontend_groups(service) {
                let siblings: Vec<FrontendKey> = group.all().collect();
                for f in &siblings {
                    claims
                        .entry(*f)
                        .or_default()
                        .insert(input.id, siblings.clone());
                }
            }
        }
        for (frontend, claimants) in claims.iter().filter(|(_, c)| c.len() > 1) {
            let Some(held) = self.shadow.services.get(frontend) else {
                continue;
            };
            let uncontested_sibling_holds = |siblings: &Vec<FrontendKey>| {
                siblings.iter().any(|g| {
                    g != frontend
                        && claims.get(g).is_some_and(|c| c.len() == 1)
                        && self.shadow.services.get(g).map(|v| v.service_id)
                            == Some(held.service_id)
                })
            };
            let mut holders = claimants
                .iter()
                .filter(|(_, siblings)| uncontested_sibling_holds(siblings));
            if let (Some((holder, _)), None) = (holders.next(), holders.next()) {
                self.frontend_owner.insert(*frontend, (*holder).clone());
            }
        }
    }

    /// Recompiles `changed` services and returns the writes that bring their entries (and only
    /// theirs) to the new state. After a full pass over an adopted shadow, entries nobody claims
    /// are deleted too. Call [`Compiler::commit`] once the plan is written; if writing fails,
    /// drop the compiler and adopt the maps again.
    pub fn compile(
        &mut self,
        changed: &[ServiceInput<'_>],
        nodes: &BTreeMap<String, NodeIntent>,
        options: &CompileOptions,
    ) -> Plan {
        let mut plan = Plan::default();
        // Backend values wanted by the recompiled services (upserted when they differ).
        let mut backend_values: BTreeMap<u32, BackendValue> = BTreeMap::new();
        let mut touched_backends: BTreeSet<u32> = BTreeSet::new();
        let mut released_frontends: Vec<FrontendKey> = Vec::new();

        // Everything a changed service held is up for grabs first, so a frontend moving from one
        // changed service to another lands where it should in one pass.
        let mut old: BTreeMap<&ObjectRef, Owned> = BTreeMap::new();
        for input in changed {
            let owned = self.owned.remove(input.id).unwrap_or_default();
            for f in &owned.frontends {
                if self.frontend_owner.get(f) == Some(input.id) {
                    self.frontend_owner.remove(f);
                }
            }
            self.losers.remove(input.id);
            self.refused.remove(input.id);
            old.insert(input.id, owned);
        }
        if self.adopted {
            self.settle_adopted_claims(changed);
        }

        for input in changed {
            let previous = old.remove(input.id).unwrap_or_default();
            let owned = match input.service {
                Some(service) => self.compile_service(
                    service,
                    &input.slices,
                    nodes,
                    options,
                    &previous,
                    &mut plan,
                    &mut backend_values,
                ),
                None => Owned::default(),
            };
            // Frontends it no longer has; deleted below unless another service took them.
            released_frontends.extend(
                previous
                    .frontends
                    .iter()
                    .filter(|f| !owned.frontends.contains(f)),
            );
            for id in previous
                .service_ids
                .iter()
                .filter(|id| !owned.service_ids.contains(id))
            {
                if self.service_id_owner.get(id) == Some(input.id) {
                    self.service_id_owner.remove(id);
                }
                self.delete_service_id(*id, &mut plan);
                self.releasing.push(*id);
            }
            for id in &owned.backends {
                *self.backend_refs.entry(*id).or_default() += 1;
                touched_backends.insert(*id);
            }
            for id in &previous.backends {
                if let Some(refs) = self.backend_refs.get_mut(id) {
                    *refs = refs.saturating_sub(1);
                }
                touched_backends.insert(*id);
            }
            if !owned.frontends.is_empty() || !owned.service_ids.is_empty() {
                self.owned.insert(input.id.clone(), owned);
            }
        }
        for f in released_frontends {
            if !self.frontend_owner.contains_key(&f) && self.shadow.services.contains_key(&f) {
                plan.delete_services.push(f);
            }
        }
        for (id, value) in backend_values {
            if self.shadow.backends.get(&id) != Some(&value) {
                plan.upsert_backends.push((id, value));
            }
        }
        if self.adopted {
            self.sweep(&mut plan);
            touched_backends.extend(self.shadow.backends.keys().copied());
        }
        for id in touched_backends {
            if self.backend_refs.get(&id).copied().unwrap_or(0) == 0 {
                self.backend_refs.remove(&id);
                if let Some(b) = self.shadow.backends.get(&id) {
                    if self.backend_ids.get(&identity(b)) == Some(&id) {
                        self.backend_ids.remove(&identity(b));
                    }
                    plan.delete_backends.push(id);
                }
                plan.upsert_backends.retain(|(b, _)| *b != id);
            }
        }
        plan.delete_services.sort_unstable();
        plan.delete_services.dedup();
        plan.delete_slots.sort_unstable();
        plan.delete_slots.dedup();
        plan.delete_backends.sort_unstable();
        plan.delete_backends.dedup();
        plan.delete_maglev.sort_unstable();
        plan.delete_maglev.dedup();
        plan.delete_source_ranges.sort_unstable();
        plan.delete_source_ranges.dedup();
        plan.upsert_backends.sort_unstable_by_key(|(id, _)| *id);
        plan.upsert_backends.dedup_by_key(|(id, _)| *id);
        plan
    }

    /// After a full pass over adopted maps: frontends, service ids and backends nobody claimed
    /// are leftovers of a state that is gone.
    fn sweep(&mut self, plan: &mut Plan) {
        self.adopted = false;
        for f in self.shadow.services.keys() {
            if !self.frontend_owner.contains_key(f) {
                plan.delete_services.push(*f);
            }
        }
        let orphans: BTreeSet<u32> = self
            .shadow
            .services
            .values()
            .map(|s| s.service_id)
            .chain(self.shadow.slots.keys().map(|k| k.service_id))
            .chain(self.shadow.maglev.keys().map(|k| k.service_id))
            .filter(|id| !self.service_id_owner.contains_key(id))
            .collect();
        for id in orphans {
            self.delete_service_id(id, plan);
            self.releasing.push(id);
        }
    }

    /// Deletes the slots and Maglev table of a service id.
    fn delete_service_id(&self, id: u32, plan: &mut Plan) {
        plan.delete_slots.extend(self.slots_of(id).map(|(k, _)| *k));
        plan.delete_maglev.extend(self.maglev_of(id));
        plan.delete_source_ranges.extend(self.source_ranges_of(id));
    }

    /// The `loadBalancerSourceRanges` entries of a service id in the maps.
    fn source_ranges_of(&self, id: u32) -> impl Iterator<Item = SourcePrefix> + '_ {
        let first = SourceRange {
            service_id_be: id.to_be(),
            ..SourceRange::default()
        };
        let last = SourceRange {
            service_id_be: id.to_be(),
            family: u8::MAX,
            _pad: [u8::MAX; 3],
            addr: Addr {
                bytes: [u8::MAX; 16],
            },
        };
        self.shadow
            .source_ranges
            .range((first, 0)..=(last, u32::MAX))
            .map(|(k, _)| *k)
    }

    /// The keys of a service id's Maglev chunks in the maps.
    fn maglev_of(&self, id: u32) -> impl Iterator<Item = MaglevKey> + '_ {
        self.shadow
            .maglev
            .range(
                MaglevKey {
                    service_id: id,
                    chunk: 0,
                }..=MaglevKey {
                    service_id: id,
                    chunk: u32::MAX,
                },
            )
            .map(|(k, _)| *k)
    }

    fn slots_of(&self, id: u32) -> impl Iterator<Item = (&BackendSlotKey, &u32)> {
        self.shadow.slots.range(
            BackendSlotKey {
                service_id: id,
                slot: 0,
            }..=BackendSlotKey {
                service_id: id,
                slot: u32::MAX,
            },
        )
    }

    /// The slot list (backend ids in slot order) of a service id's cluster or local set.
    fn slot_list(&self, id: u32, local: bool) -> Vec<u32> {
        let base = if local { LOCAL_SLOT } else { 0 };
        (0..)
            .map_while(|i| {
                self.shadow.slots.get(&BackendSlotKey {
                    service_id: id,
                    slot: base | i,
                })
            })
            .copied()
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn compile_service(
        &mut self,
        service: &ServiceIntent,
        slices: &[&EndpointSliceIntent],
        nodes: &BTreeMap<String, NodeIntent>,
        options: &CompileOptions,
        previous: &Owned,
        plan: &mut Plan,
        backend_values: &mut BTreeMap<u32, BackendValue>,
    ) -> Owned {
        let mut owned = Owned::default();
        let mut backends: BTreeSet<u32> = BTreeSet::new();
        for group in frontend_groups(service) {
            let FrontendGroup {
                port,
                family,
                mut internal,
                mut external,
            } = group;
            for frontends in [&mut internal, &mut external] {
                frontends.retain(|key| match self.frontend_owner.get(key) {
                    None => {
                        self.frontend_owner.insert(*key, service.id.clone());
                        true
                    }
                    Some(holder) if *holder == service.id => true,
                    Some(holder) => {
                        // Reported (once, and counted) as a `frontend_taken` rejection.
                        debug!(
                            service = %service.id,
                            holder = %holder,
                            frontend = %frontend_name(key),
                            "frontend already taken by another service; keeping it there"
                        );
                        self.losers.insert(service.id.clone());
                        self.refused
                            .entry(service.id.clone())
                            .or_default()
                            .push((*key, holder.clone()));
                        false
                    }
                });
            }
            if internal.is_empty() && external.is_empty() {
                continue;
            }
            // The id one of these frontends has in the maps, unless another service (or
            // another port of this one) uses it now: ids are unique among services.
            let service_id = internal
                .iter()
                .chain(&external)
                .filter_map(|f| self.shadow.services.get(f).map(|s| s.service_id))
                .find(|id| {
                    !owned.service_ids.contains(id)
                        && if self.adopted {
                            // Adopted maps: the first service to claim an id keeps it.
                            !self.service_id_owner.contains_key(id)
                        } else {
                            // Otherwise only its own: an id another service let go of in
                            // this pass still has entries the plan deletes.
                            previous.service_ids.contains(id)
                        }
                })
                .unwrap_or_else(|| self.service_pool.allocate());
            self.service_id_owner.insert(service_id, service.id.clone());
            owned.service_ids.push(service_id);

            let eligible = eligible_backends(slices, nodes, port, family, options);
            let mut id_of = |backend: &BackendValue| -> u32 {
                let id = *self
                    .backend_ids
                    .entry(identity(backend))
                    .or_insert_with(|| self.backend_pool.allocate());
                backend_values.insert(id, *backend);
                backends.insert(id);
                id
            };
            let cluster_ids: Vec<u32> = eligible.cluster.iter().map(&mut id_of).collect();
            let local_ids: Vec<u32> = eligible.local.iter().map(&mut id_of).collect();
            let affinity = service.affinity_timeout_s.unwrap_or(0);
            // Affinity wins over Maglev: a client's connections stay on one backend.
            let maglev = options.maglev
                && affinity == 0
                && !external.is_empty()
                && !eligible.everywhere.is_empty();
            let maglev_members: Vec<(String, u32)> = if maglev {
                eligible
                    .everywhere
                    .iter()
                    .map(|b| (socket_addr(&b.addr, b.family, b.port_be), id_of(b)))
                    .collect()
            } else {
                Vec::new()
            };
            let mut counts = [0u32; 2];
            for (local, wanted) in [(false, &cluster_ids), (true, &local_ids)] {
                let slots = stable_slots(&self.slot_list(service_id, local), wanted);
                counts[local as usize] = slots.len() as u32;
                let base = if local { LOCAL_SLOT } else { 0 };
                for (slot, backend_id) in slots.iter().enumerate() {
                    let key = BackendSlotKey {
                        service_id,
                        slot: base | slot as u32,
                    };
                    if self.shadow.slots.get(&key) != Some(backend_id) {
                        plan.upsert_slots.push((key, *backend_id));
                    }
                }
                // Whatever lies past the new end of the list (also past a gap) goes.
                let end = base | slots.len() as u32;
                let limit = if local { u32::MAX } else { LOCAL_SLOT - 1 };
                plan.delete_slots.extend(
                    self.slots_of(service_id)
                        .map(|(k, _)| *k)
                        .filter(|k| k.slot >= end && k.slot <= limit),
                );
            }
            let maglev_size = if maglev {
                maglev::table_size(maglev_members.len(), options.maglev_min_size)
            } else {
                0
            };
            let chunks = if maglev {
                maglev::chunks(service_id, &maglev::table(&maglev_members, maglev_size))
            } else {
                Vec::new()
            };
            for (key, chunk) in &chunks {
                if self.shadow.maglev.get(key) != Some(chunk) {
                    plan.upsert_maglev.push((*key, *chunk));
                }
            }
            // Chunks past the table's (new) end go.
            plan.delete_maglev.extend(
                self.maglev_of(service_id)
                    .filter(|k| k.chunk as usize >= chunks.len()),
            );
            let value = |policy: TrafficPolicy, flags: u32| ServiceValue {
                service_id,
                backend_count: counts[0],
                local_backend_count: counts[1],
                flags: flags
                    | if policy == TrafficPolicy::Local {
                        service_flags::LOCAL_ONLY
                    } else {
                        0
                    },
                affinity_timeout_s: affinity,
                maglev_size,
            };
            let internal_value = value(service.internal_traffic_policy, 0);
            let external_flags =
                service_flags::EXTERNAL | if maglev { service_flags::MAGLEV } else { 0 };
            let external_value = value(service.external_traffic_policy, external_flags);
            // loadBalancerSourceRanges bind the load-balancer IPs and NodePorts, as kube-proxy
            // applies them: per family, and only when the family has ranges at all.
            let ranges = source_ranges(service, family, service_id);
            let restricted = |key: &FrontendKey| {
                !ranges.is_empty()
                    && (key.addr == Addr::UNSPECIFIED
                        || service
                            .load_balancer_ips
                            .iter()
                            .any(|ip| addr_of(*ip) == (key.addr, key.family)))
            };
            let restricted_value = ServiceValue {
                flags: external_value.flags | service_flags::SOURCE_RANGES,
                ..external_value
            };
            let mut any_restricted = false;
            let values = internal
                .into_iter()
                .map(|key| (key, internal_value))
                .chain(external.into_iter().map(|key| {
                    if restricted(&key) {
                        any_restricted = true;
                        (key, restricted_value)
                    } else {
                        (key, external_value)
                    }
                }))
                .collect::<Vec<_>>();
            for (key, value) in values {
                if self.shadow.services.get(&key) != Some(&value) {
                    plan.upsert_services.push((key, value));
                }
                owned.frontends.push(key);
            }
            let wanted: BTreeSet<SourcePrefix> = if any_restricted {
                ranges.into_iter().collect()
            } else {
                BTreeSet::new()
            };
            for prefix in &wanted {
                if !self.shadow.source_ranges.contains_key(prefix) {
                    plan.upsert_source_ranges.push((*prefix, 1));
                }
            }
            plan.delete_source_ranges.extend(
                self.source_ranges_of(service_id)
                    .filter(|prefix| !wanted.contains(prefix)),
            );
        }
        owned.backends = backends.into_iter().collect();
        owned
    }

    /// Records a written plan in the shadow and frees the ids it let go of.
    pub fn commit(&mut self, plan: &Plan) {
        let s = &mut self.shadow;
        for (id, b) in &plan.upsert_backends {
            s.backends.insert(*id, *b);
        }
        for (k, v) in &plan.upsert_slots {
            s.slots.insert(*k, *v);
        }
        for (k, v) in &plan.upsert_maglev {
            s.maglev.insert(*k, *v);
        }
        for (k, v) in &plan.upsert_source_ranges {
            s.source_ranges.insert(*k, *v);
        }
        for (k, v) in &plan.upsert_services {
            s.services.insert(*k, *v);
        }
        for k in &plan.delete_services {
            s.services.remove(k);
        }
        for k in &plan.delete_maglev {
            s.maglev.remove(k);
        }
        for k in &plan.delete_source_ranges {
            s.source_ranges.remove(k);
        }
        for k in &plan.delete_slots {
            s.slots.remove(k);
        }
        for k in &plan.delete_backends {
            s.backends.remove(k);
            self.backend_pool.release(*k);
        }
        // A service id is free once nothing in the maps names it any more.
        for id in std::mem::take(&mut self.releasing) {
            if !self.service_id_owner.contains_key(&id) {
                self.service_pool.release(id);
            }
        }
    }
}

/// Compiles `intent` as a whole, reusing identifiers and slot positions from `current`: what a
/// full resync computes, for tests and tools.
pub fn compile(
    intent: &ClusterIntent,
    current: &DataplaneState,
    options: &CompileOptions,
) -> DataplaneState {
    let mut compiler = Compiler::adopt(current.clone());
    let inputs: Vec<ServiceInput<'_>> = intent
        .services
        .iter()
        .map(|(id, service)| ServiceInput {
            id,
            service: Some(service),
            slices: intent.slices_of(id).collect(),
        })
        .collect();
    let plan = compiler.compile(&inputs, &intent.nodes, options);
    compiler.commit(&plan);
    compiler.shadow
}

/// `ip:port/proto`, or `nodeport:port/proto` for a NodePort, for logs and dumps.
/// The addresses of ClusterIPs, external IPs and load-balancer IPs in `state` (NodePorts have
/// none of their own): traffic to them that the data path does not translate is dropped.
pub fn frontend_addresses(state: &DataplaneState) -> BTreeSet<HostAddrKey> {
    addresses_of(state.services.keys())
}

/// The addresses of `frontends` (NodePorts have none of their own: the node's are theirs).
pub fn addresses_of<'a>(
    frontends: impl IntoIterator<Item = &'a FrontendKey>,
) -> BTreeSet<HostAddrKey> {
    frontends
        .into_iter()
        .filter(|key| key.addr != Addr::UNSPECIFIED)
        .map(|key| HostAddrKey {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        })
        .collect()
}

pub fn frontend_name(key: &FrontendKey) -> String {
    if key.addr == Addr::UNSPECIFIED {
        format!(
            "nodeport:{}/{}",
            u16::from_be(key.port_be),
            proto_name(key.proto)
        )
    } else {
        format!(
            "{}/{}",
            socket_addr(&key.addr, key.family, key.port_be),
            proto_name(key.proto)
        )
    }
}

/// The endpoints a service port may send traffic to, cluster-wide and on this node.
struct Eligible {
    /// Cluster-wide traffic's endpoints on this node, topology hints applied.
    cluster: BTreeSet<BackendValue>,
    /// The same without topology: what a Maglev table is built from, since every node must
    /// pick the same endpoint for a flow whichever zone it is in.
    everywhere: BTreeSet<BackendValue>,
    local: BTreeSet<BackendValue>,
}

/// As kube-proxy categorises endpoints: ready ones serve; when none is ready, serving endpoints
/// that are terminating take over so connections drain instead of failing. Cluster-wide and
/// local sets fall back independently.
fn eligible_backends(
    slices: &[&EndpointSliceIntent],
    nodes: &BTreeMap<String, NodeIntent>,
    port: &ServicePort,
    family: u8,
    options: &CompileOptions,
) -> Eligible {
    let mut candidates: Vec<(BackendValue, &Endpoint)> = Vec::new();
    for slice in slices {
        // EndpointSlice ports carry the service port's name, already resolved to a number.
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let local = !options.node_name.is_empty()
                && endpoint.node_name.as_deref() == Some(options.node_name.as_str());
            let node = endpoint
                .node_name
                .as_ref()
                .and_then(|n| nodes.get(n))
                .and_then(|n| n.tunnel_address());
            let (node_addr, node_family) = match (local, node) {
                (false, Some(ip)) => addr_of(ip),
                _ => (Addr::UNSPECIFIED, 0),
            };
            for ip in &endpoint.addresses {
                let (addr, f) = addr_of(*ip);
                if f != family {
                    continue;
                }
                let backend = BackendValue {
                    addr,
                    node_addr,
                    port_be: target.port.to_be(),
                    proto: port.protocol.number(),
                    family,
                    flags: if local { backend_flags::LOCAL } else { 0 },
                    node_family,
                    _pad: [0; 2],
                };
                candidates.push((backend, endpoint));
            }
        }
    }
    let zone = nodes
        .get(&options.node_name)
        .and_then(|n| n.zone.as_deref());
    let topology =
        Topology::from_hints(candidates.iter().map(|(_, e)| *e), &options.node_name, zone);
    let pick = |scope: Scope| -> BTreeSet<BackendValue> {
        let in_scope = |b: &BackendValue, e: &Endpoint| match scope {
            Scope::Local => b.flags & backend_flags::LOCAL != 0,
            Scope::Cluster(topology) => topology.admits(e),
        };
        let ready: BTreeSet<BackendValue> = candidates
            .iter()
            .filter(|(b, e)| e.ready && in_scope(b, e))
            .map(|(b, _)| *b)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        // Terminating endpoints are the fallback when nothing anywhere is ready: topology was
        // already given up if no ready endpoint matched it.
        let in_scope =
            |b: &BackendValue| scope != Scope::Local || b.flags & backend_flags::LOCAL != 0;
        candidates
            .iter()
            .filter(|(b, e)| e.serving && e.terminating && in_scope(b))
            .map(|(b, _)| *b)
            .collect()
    };
    Eligible {
        cluster: pick(Scope::Cluster(topology)),
        everywhere: pick(Scope::Cluster(Topology::Any)),
        local: pick(Scope::Local),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope<'a> {
    Cluster(Topology<'a>),
    Local,
}

/// Which endpoints cluster-wide traffic may use on this node, from the hints the EndpointSlice
/// controller wrote, as kube-proxy decides (`pkg/proxy/topology.go`): node hints when every
/// ready endpoint has one and one names this node; else zone hints when every ready endpoint
/// has one and one names this node's zone; else every endpoint. Hints exist only when the
/// Service asked for them (`trafficDistribution`, `service.kubernetes.io/topology-mode: Auto`),
/// so the hints alone decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    Any,
    SameNode(&'a str),
    SameZone(&'a str),
}

impl<'a> Topology<'a> {
    fn from_hints<'e>(
        endpoints: impl Iterator<Item = &'e Endpoint> + Clone,
        node_name: &'a str,
        zone: Option<&'a str>,
    ) -> Topology<'a> {
        let ready = endpoints.filter(|e| e.ready);
        if ready.clone().next().is_none() {
            return Topology::Any;
        }
        let all_have =
            |hints: fn(&Endpoint) -> &Vec<String>| ready.clone().all(|e| !hints(e).is_empty());
        let any_names = |hints: fn(&Endpoint) -> &Vec<String>, name: &str| {
            ready.clone().any(|e| hints(e).iter().any(|h| h == name))
        };
        if !node_name.is_empty()
            && all_have(|e| &e.node_hints)
            && any_names(|e| &e.node_hints, node_name)
        {
            return Topology::SameNode(node_name);
        }
        match zone {
            Some(zone) if all_have(|e| &e.zone_hints) && any_names(|e| &e.zone_hints, zone) => {
                Topology::SameZone(zone)
            }
            _ => Topology::Any,
        }
    }

    fn admits(self, endpoint: &Endpoint) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode(node) => endpoint.node_hints.iter().any(|h| h == node),
            Topology::SameZone(zone) => endpoint.zone_hints.iter().any(|h| h == zone),
        }
    }
}

/// Keeps each surviving backend in its slot, fills holes with new backends, then closes the
/// remaining holes by moving backends from the end.
fn stable_slots(current: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = current
        .iter()
        .map(|id| wanted_set.contains(id).then_some(*id))
        .collect();
    let placed: BTreeSet<u32> = slots.iter().flatten().copied().collect();
    let mut newcomers = wanted.iter().filter(|id| !placed.contains(id)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match newcomers.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(newcomers.map(Some));
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            let last = slots.pop().flatten();
            if i < slots.len() {
                slots[i] = last;
                continue;
            }
        }
        i += 1;
    }
    slots.into_iter().flatten().collect()
}

/// Counts for logs and metrics.
pub fn summary(state: &DataplaneState) -> (usize, usize) {
    (state.services.len(), state.backends.len())
}

/// Protocol name of a map protocol number, for display.
pub fn proto_name(proto: u8) -> String {
    Protocol::from_number(proto).map_or_else(|| format!("proto{proto}"), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::{Endpoint, EndpointPort, EndpointSliceIntent, ObjectRef};

    fn svc_ref() -> ObjectRef {
        ObjectRef {
            namespace: "default".into(),
            name: "echo".into(),
        }
    }

    fn intent_with(backends: &[&str]) -> ClusterIntent {
        let mut intent = ClusterIntent::default();
        intent.services.insert(
            svc_ref(),
            ServiceIntent {
                id: svc_ref(),
                cluster_ips: vec!["198.18.100.10".parse().unwrap()],
                ports: vec![
                    ServicePort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: 80,
                        node_port: None,
                    },
                    ServicePort {
                        name: "dns".into(),
                        protocol: Protocol::Udp,
                        port: 53,
                        node_port: None,
                    },
                ],
                ..ServiceIntent::default()
            },
        );
        let slice = ObjectRef {
            namespace: "default".into(),
            name: "echo-1".into(),
        };
        intent.slices.insert(
            slice.clone(),
            EndpointSliceIntent {
                id: slice,
                service: svc_ref(),
                ports: vec![
                    EndpointPort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: 8080,
                    },
                    EndpointPort {
                        name: "dns".into(),
                        protocol: Protocol::Udp,
                        port: 5353,
                    },
                ],
                endpoints: backends
                    .iter()
                    .map(|ip| Endpoint {
                        addresses: vec![ip.parse().unwrap()],
                        ready: !ip.ends_with(".99"),
                        serving: true,
                        terminating: false,
                        ..Endpoint::default()
                    })
                    .collect(),
            },
        );
        intent
    }

    #[test]
    fn compiles_frontends_slots_and_backends() {
        let state = compile(
            &intent_with(&["198.19.1.10", "198.19.2.10", "198.19.2.99"]),
            &DataplaneState::default(),
            &CompileOptions::default(),
        );
        assert_eq!(state.services.len(), 2, "one frontend per port");
        // Two ready endpoints, two ports: four backends; the not-ready one is left out.
        assert_eq!(state.backends.len(), 4);
        assert_eq!(state.slots.len(), 4);
        for service in state.services.values() {
            assert_eq!(service.backend_count, 2);
        }
    }

    #[test]
    fn recompiling_against_itself_is_a_fixed_point() {
        let intent = intent_with(&["198.19.1.10", "198.19.2.10"]);
        let first = compile(
            &intent,
            &DataplaneState::default(),
            &CompileOptions::default(),
        );
        assert_eq!(compile(&intent, &first, &CompileOptions::default()), first);
    }

    #[test]
    fn removing_a_backend_moves_one_slot() {
        let before = compile(
            &intent_with(&["198.19.1.10", "198.19.1.11", "198.19.1.12", "198.19.1.13"]),
            &DataplaneState::default(),
            &CompileOptions::default(),
        );
        let after = compile(
            &intent_with(&["198.19.1.10", "198.19.1.12", "198.19.1.13"]),
            &before,
            &CompileOptions::default(),
        );
        let plan = crate::state::Plan::between(&before, &after);
        // Per port: the vacated slot takes the last backend, the last slot goes, the count drops,
        // the backend goes.
        assert_eq!(plan.upsert_slots.len(), 2);
        assert_eq!(plan.delete_slots.len(), 2);
        assert_eq!(plan.upsert_services.len(), 2);
        assert_eq!(plan.delete_backends.len(), 2);
        assert!(plan.upsert_backends.is_empty());
    }

    #[test]
    fn stable_slots_fills_holes_first() {
        assert_eq!(stable_slots(&[1, 2, 3], &[1, 3, 4]), vec![1, 4, 3]);
        assert_eq!(stable_slots(&[1, 2, 3, 4], &[1, 4]), vec![1, 4]);
        assert_eq!(stable_slots(&[], &[5, 6]), vec![5, 6]);
        assert_eq!(stable_slots(&[1, 2], &[]), Vec::<u32>::new());
    }

    #[test]
    fn service_without_ready_endpoints_has_no_slots() {
        let state = compile(
            &intent_with(&["198.19.1.99"]),
            &DataplaneState::default(),
            &CompileOptions::default(),
        );
        assert!(state.slots.is_empty());
        assert!(state.services.values().all(|s| s.backend_count == 0));
    }
}
