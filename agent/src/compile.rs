//! Compiles cluster intent into dataplane state.
//!
//! Identifiers are derived, not remembered: a frontend keeps the service id it has in the current
//! maps and a backend keeps its id, so a restarted agent that adopts pinned maps recompiles to
//! the same state and writes nothing. A slot list keeps surviving backends in place, so removing
//! one backend rewrites one slot rather than shifting all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use weir_common::{
    service_flags, Addr, BackendSlotKey, BackendValue, FrontendKey, ServiceValue, FAMILY_V4,
    FAMILY_V6,
};

use crate::intent::{ClusterIntent, Protocol, ServiceIntent, ServicePort};
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

/// Compiles `intent`, reusing identifiers and slot positions from `current`.
pub fn compile(intent: &ClusterIntent, current: &DataplaneState) -> DataplaneState {
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
    let mut current_slots: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (key, backend) in &current.slots {
        let slots = current_slots.entry(key.service_id).or_default();
        if slots.len() == key.slot as usize {
            slots.push(*backend);
        }
    }

    for service in intent.services.values() {
        for port in &service.ports {
            for family in [FAMILY_V4, FAMILY_V6] {
                let frontends: Vec<FrontendKey> = service
                    .cluster_ips
                    .iter()
                    .map(|ip| addr_of(*ip))
                    .filter(|(_, f)| *f == family)
                    .map(|(addr, family)| FrontendKey {
                        addr,
                        port_be: port.port.to_be(),
                        proto: port.protocol.number(),
                        family,
                    })
                    .collect();
                if frontends.is_empty() {
                    continue;
                }
                // A frontend that moved between services must not drag its old id into a second
                // group: ids are unique within the desired state.
                let service_id = frontends
                    .iter()
                    .find_map(|f| current.services.get(f).map(|s| s.service_id))
                    .filter(|id| !desired_service_ids.contains(id))
                    .unwrap_or_else(|| service_ids.allocate());
                desired_service_ids.insert(service_id);

                let mut wanted_ids = Vec::new();
                for backend in backends_for(intent, service, port, family) {
                    let id = *desired_backend_ids
                        .entry(identity(&backend))
                        .or_insert_with(|| {
                            current_backend_ids
                                .get(&identity(&backend))
                                .copied()
                                .unwrap_or_else(|| backend_ids.allocate())
                        });
                    desired.backends.insert(id, backend);
                    wanted_ids.push(id);
                }
                let slots = stable_slots(
                    current_slots
                        .get(&service_id)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                    &wanted_ids,
                );
                for (slot, backend_id) in slots.iter().enumerate() {
                    desired.slots.insert(
                        BackendSlotKey {
                            service_id,
                            slot: slot as u32,
                        },
                        *backend_id,
                    );
                }
                let value = ServiceValue {
                    service_id,
                    backend_count: slots.len() as u32,
                    flags: if slots.is_empty() {
                        service_flags::NO_BACKENDS
                    } else {
                        0
                    },
                    affinity_timeout_s: 0,
                };
                for frontend in frontends {
                    desired.services.insert(frontend, value);
                }
            }
        }
    }
    desired
}

/// Ready endpoints of the service's slices that offer this port, deduplicated, in stable order.
fn backends_for(
    intent: &ClusterIntent,
    service: &ServiceIntent,
    port: &ServicePort,
    family: u8,
) -> BTreeSet<BackendValue> {
    let mut out = BTreeSet::new();
    for slice in intent.slices_of(&service.id) {
        // EndpointSlice ports carry the service port's name, already resolved to a number.
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
            for ip in &endpoint.addresses {
                let (addr, f) = addr_of(*ip);
                if f != family {
                    continue;
                }
                out.insert(BackendValue {
                    addr,
                    port_be: target.port.to_be(),
                    proto: port.protocol.number(),
                    family,
                    flags: 0,
                });
            }
        }
    }
    out
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
                    },
                    ServicePort {
                        name: "dns".into(),
                        protocol: Protocol::Udp,
                        port: 53,
                    },
                ],
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
        let first = compile(&intent, &DataplaneState::default());
        assert_eq!(compile(&intent, &first), first);
    }

    #[test]
    fn removing_a_backend_moves_one_slot() {
        let before = compile(
            &intent_with(&["198.19.1.10", "198.19.1.11", "198.19.1.12", "198.19.1.13"]),
            &DataplaneState::default(),
        );
        let after = compile(
            &intent_with(&["198.19.1.10", "198.19.1.12", "198.19.1.13"]),
            &before,
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
    fn service_without_ready_endpoints_is_flagged() {
        let state = compile(&intent_with(&["198.19.1.99"]), &DataplaneState::default());
        assert!(state
            .services
            .values()
            .all(|s| s.backend_count == 0 && s.flags == service_flags::NO_BACKENDS));
    }
}
