//! Checks on the intent as a whole, after each object validated on its own: an EndpointSlice
//! whose Service does not exist, a Service with more endpoints than it may have, a cluster that
//! would overflow the slot table. Each is bad input that must cost only its own object.

use std::collections::{BTreeMap, BTreeSet};

use crate::intent::{ClusterIntent, EndpointSliceIntent, ObjectRef};

/// A rejection found here: (kind, object, reason), like the validation errors of single objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub kind: &'static str,
    pub object: String,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Ready endpoints one Service may have.
    pub max_endpoints_per_service: u32,
    /// Entries of the slot map: one per (frontend, backend) pair.
    pub slot_capacity: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_endpoints_per_service: crate::config::DEFAULT_MAX_ENDPOINTS_PER_SERVICE,
            slot_capacity: weir_common::capacity::BACKEND_SLOTS,
        }
    }
}

/// Remembers, per Service, the slices it last had when admitted, so a Service that grows past a
/// limit keeps serving with its last good endpoints instead of losing them all.
#[derive(Debug, Default)]
pub struct Admission {
    last_admitted: BTreeMap<ObjectRef, Vec<EndpointSliceIntent>>,
}

impl Admission {
    /// Rewrites `intent` so it fits `limits`, and says what it had to refuse.
    pub fn admit(&mut self, intent: &mut ClusterIntent, limits: Limits) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        for slice in intent.slices.values() {
            if !intent.services.contains_key(&slice.service) {
                rejections.push(Rejection {
                    kind: "EndpointSlice",
                    object: slice.id.to_string(),
                    reason: "unknown_service",
                    detail: format!("its service {} does not exist; ignored", slice.service),
                });
            }
        }

        let mut refused: BTreeSet<ObjectRef> = BTreeSet::new();
        for id in intent.services.keys() {
            let endpoints = ready_endpoints(intent, id);
            if endpoints > limits.max_endpoints_per_service as usize {
                refused.insert(id.clone());
                rejections.push(Rejection {
                    kind: "Service",
                    object: id.to_string(),
                    reason: "too_many_endpoints",
                    detail: format!(
                        "{endpoints} ready endpoints, more than max_endpoints_per_service {}; \
                         keeping its last good endpoints",
                        limits.max_endpoints_per_service
                    ),
                });
            }
        }
        for id in &refused {
            self.revert(intent, id);
        }

        // Largest first: one runaway Service gives way before many small ones do.
        let mut total = slot_estimate_all(intent);
        if total > limits.slot_capacity as usize {
            let mut by_size: Vec<(usize, ObjectRef)> = intent
                .services
                .keys()
                .filter(|id| !refused.contains(*id))
                .map(|id| (slot_estimate(intent, id), id.clone()))
                .collect();
            by_size.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            for (size, id) in by_size {
                if total <= limits.slot_capacity as usize || size == 0 {
                    break;
                }
                self.revert(intent, &id);
                rejections.push(Rejection {
                    kind: "Service",
                    object: id.to_string(),
                    reason: "slot_capacity",
                    detail: format!(
                        "{size} slots would overflow the slot table ({} entries); keeping its \
                         last good endpoints",
                        limits.slot_capacity
                    ),
                });
                refused.insert(id);
                total = slot_estimate_all(intent);
            }
            if total > limits.slot_capacity as usize {
                // Even the last good versions do not fit together: refused Services go without.
                for id in &refused {
                    intent.slices.retain(|_, s| &s.service != id);
                }
            }
        }

        self.last_admitted = intent
            .services
            .keys()
            .map(|id| (id.clone(), intent.slices_of(id).cloned().collect()))
            .collect();
        rejections
    }

    /// Puts back the slices `service` had when last admitted (none if it never was).
    fn revert(&self, intent: &mut ClusterIntent, service: &ObjectRef) {
        intent.slices.retain(|_, s| &s.service != service);
        for slice in self.last_admitted.get(service).into_iter().flatten() {
            intent.slices.insert(slice.id.clone(), slice.clone());
        }
    }
}

fn ready_endpoints(intent: &ClusterIntent, service: &ObjectRef) -> usize {
    intent
        .slices_of(service)
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.ready)
        .flat_map(|e| e.addresses.iter())
        .collect::<BTreeSet<_>>()
        .len()
}

/// Slots a Service takes: one per (service port, ClusterIP, ready endpoint).
fn slot_estimate(intent: &ClusterIntent, id: &ObjectRef) -> usize {
    let Some(service) = intent.services.get(id) else {
        return 0;
    };
    service.ports.len() * service.cluster_ips.len().max(1) * ready_endpoints(intent, id)
}

fn slot_estimate_all(intent: &ClusterIntent) -> usize {
    intent
        .services
        .keys()
        .map(|id| slot_estimate(intent, id))
        .sum()
}
