//! Compiles cluster intent into dataplane state.
//!
//! Identifiers are derived, not remembered: a frontend keeps the service id it has in the current
//! maps and a backend keeps its id, so a restarted agent that adopts pinned maps recompiles to
//! the same state and writes nothing. A slot list keeps surviving backends in place, so removing
//! one backend rewrites one slot rather than shifting all of them.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tracing::warn;
use weir_common::{
    backend_flags, service_flags, Addr, BackendSlotKey, BackendValue, FrontendKey, ServiceValue,
    FAMILY_V4, FAMILY_V6, LOCAL_SLOT,
};

use crate::intent::{ClusterIntent, Endpoint, Protocol, ServiceIntent, ServicePort, TrafficPolicy};
use crate::maglev;
use crate::state::DataplaneState;

pub fn addr_of(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => (Addr::from_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (Addr::from_v6(v6.octets()), FAMILY_V6),
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

/// Lowest-first id allocation that never hands out an id the current maps still use, so no packet
/// can follow an old reference into a new object while a plan is being applied.
struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(taken: impl IntoIterator<Item = u32>) -> Self {
        IdAllocator {
            taken: taken.into_iter().collect(),
            next: 1,
        }
    }

    fn allocate(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// What compiling needs to know about the node it compiles for.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// This node's name, as endpoints name their node: decides which endpoints are local.
    pub node_name: String,
    /// Pick external traffic's backends from a Maglev table, so every node picks the same one.
    pub maglev: bool,
}

/// Compiles `intent`, reusing identifiers and slot positions from `current`.
pub fn compile(
    intent: &ClusterIntent,
    current: &DataplaneState,
    options: &CompileOptions,
) -> DataplaneState {
    let mut desired = DataplaneState::default();

    let current_backend_ids: BTreeMap<BackendIdentity, u32> = current
        .backends
        .iter()
        .map(|(id, b)| (identity(b), *id))
        .collect();
    let mut backend_ids = IdAllocator::new(current.backends.keys().copied());
    let mut desired_backend_ids: BTreeMap<BackendIdentity, u32> = BTreeMap::new();
    let mut service_ids = IdAllocator::new(current.services.values().map(|s| s.service_id));
    let mut desired_service_ids = BTreeSet::new();
    // Current slot lists per (service id, local set), in slot order.
    let mut current_slots: BTreeMap<(u32, bool), Vec<u32>> = BTreeMap::new();
    for (key, backend) in &current.slots {
        let local = key.slot & LOCAL_SLOT != 0;
        let slots = current_slots.entry((key.service_id, local)).or_default();
        if slots.len() == (key.slot & !LOCAL_SLOT) as usize {
            slots.push(*backend);
        }
    }

    for service in intent.services.values() {
        for port in &service.ports {
            for family in [FAMILY_V4, FAMILY_V6] {
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
                if internal.is_empty() && external.is_empty() {
                    continue;
                }
                // A frontend that moved between services must not drag its old id into a second
                // group: ids are unique within the desired state.
                let service_id = internal
                    .iter()
                    .chain(&external)
                    .find_map(|f| current.services.get(f).map(|s| s.service_id))
                    .filter(|id| !desired_service_ids.contains(id))
                    .unwrap_or_else(|| service_ids.allocate());
                desired_service_ids.insert(service_id);

                let eligible = eligible_backends(intent, service, port, family, options);
                let mut id_of = |backend: &BackendValue| -> u32 {
                    let id = *desired_backend_ids
                        .entry(identity(backend))
                        .or_insert_with(|| {
                            current_backend_ids
                                .get(&identity(backend))
                                .copied()
                                .unwrap_or_else(|| backend_ids.allocate())
                        });
                    desired.backends.insert(id, *backend);
                    id
                };
                let cluster_ids: Vec<u32> = eligible.cluster.iter().map(&mut id_of).collect();
                let local_ids: Vec<u32> = eligible.local.iter().map(&mut id_of).collect();
                let mut counts = [0u32; 2];
                for (local, wanted) in [(false, &cluster_ids), (true, &local_ids)] {
                    let previous = current_slots
                        .get(&(service_id, local))
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    let slots = stable_slots(previous, wanted);
                    counts[local as usize] = slots.len() as u32;
                    let base = if local { LOCAL_SLOT } else { 0 };
                    for (slot, backend_id) in slots.iter().enumerate() {
                        desired.slots.insert(
                            BackendSlotKey {
                                service_id,
                                slot: base | slot as u32,
                            },
                            *backend_id,
                        );
                    }
                }
                let affinity = service.affinity_timeout_s.unwrap_or(0);
                // Affinity wins over Maglev: a client's connections stay on one backend.
                let maglev = options.maglev
                    && affinity == 0
                    && !external.is_empty()
                    && !cluster_ids.is_empty();
                if maglev {
                    let named: Vec<(String, u32)> = eligible
                        .cluster
                        .iter()
                        .zip(&cluster_ids)
                        .map(|(b, id)| (socket_addr(&b.addr, b.family, b.port_be), *id))
                        .collect();
                    desired.maglev.insert(service_id, maglev::table(&named));
                }
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
                    _reserved: 0,
                };
                let internal_value = value(service.internal_traffic_policy, 0);
                let external_flags =
                    service_flags::EXTERNAL | if maglev { service_flags::MAGLEV } else { 0 };
                let external_value = value(service.external_traffic_policy, external_flags);
                for (frontends, value) in [(internal, internal_value), (external, external_value)] {
                    for key in frontends {
                        match desired.services.entry(key) {
                            Entry::Vacant(slot) => {
                                slot.insert(value);
                            }
                            Entry::Occupied(_) => warn!(
                                service = %service.id,
                                frontend = %frontend_name(&key),
                                "frontend already taken by another service; keeping the first"
                            ),
                        }
                    }
                }
            }
        }
    }
    desired
}

/// `ip:port/proto`, or `nodeport:port/proto` for a NodePort, for logs and dumps.
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
    cluster: BTreeSet<BackendValue>,
    local: BTreeSet<BackendValue>,
}

/// As kube-proxy categorises endpoints: ready ones serve; when none is ready, serving endpoints
/// that are terminating take over so connections drain instead of failing. Cluster-wide and
/// local sets fall back independently.
fn eligible_backends(
    intent: &ClusterIntent,
    service: &ServiceIntent,
    port: &ServicePort,
    family: u8,
    options: &CompileOptions,
) -> Eligible {
    let mut candidates: Vec<(BackendValue, &Endpoint)> = Vec::new();
    for slice in intent.slices_of(&service.id) {
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
                .and_then(|n| intent.nodes.get(n))
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
    let pick = |only_local: bool| -> BTreeSet<BackendValue> {
        let in_scope = |b: &BackendValue| !only_local || b.flags & backend_flags::LOCAL != 0;
        let ready: BTreeSet<BackendValue> = candidates
            .iter()
            .filter(|(b, e)| e.ready && in_scope(b))
            .map(|(b, _)| *b)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        candidates
            .iter()
            .filter(|(b, e)| e.serving && e.terminating && in_scope(b))
            .map(|(b, _)| *b)
            .collect()
    };
    Eligible {
        cluster: pick(false),
        local: pick(true),
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
                        node_name: None,
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
