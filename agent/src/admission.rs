//! Checks on the intent as a whole, after each object validated on its own: an EndpointSlice
//! whose Service does not exist, a Service with more endpoints than it may have, a cluster that
//! would overflow the slot table. Each is bad input that must cost only its own object.

use std::collections::{BTreeMap, BTreeSet};

use crate::intent::{EndpointSliceIntent, ObjectRef, ServiceIntent};
use crate::source::IntentStore;

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

/// Decides, service by service, which endpoints may be compiled: a Service that grows past a
/// limit keeps serving with its last good endpoints instead of losing them all. Only the services
/// a change touched are looked at; the slot table's fill is kept as a running total.
#[derive(Debug, Default)]
pub struct Admission {
    /// Per Service, the slices it was last admitted with: what the compiler uses.
    admitted: BTreeMap<ObjectRef, Vec<EndpointSliceIntent>>,
    /// Slots each admitted Service takes, and their sum.
    estimates: BTreeMap<ObjectRef, usize>,
    total: usize,
    /// Current refusals, by the Service they are about.
    refused: BTreeMap<ObjectRef, Vec<Rejection>>,
}

impl Admission {
    /// The slices compiled for a Service.
    pub fn admitted(&self, service: &ObjectRef) -> &[EndpointSliceIntent] {
        self.admitted.get(service).map_or(&[], Vec::as_slice)
    }

    /// Every current refusal.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.refused.values().flatten()
    }

    /// Re-admits the `changed` Services against `limits`. Within one batch, smaller Services
    /// come first: one runaway Service gives way before many small ones do.
    pub fn admit(&mut self, store: &IntentStore, changed: &BTreeSet<ObjectRef>, limits: Limits) {
        let intent = store.intent();
        let mut order: Vec<(usize, &ObjectRef, Vec<EndpointSliceIntent>)> = changed
            .iter()
            .map(|id| {
                let slices: Vec<EndpointSliceIntent> = store.slices_of(id).cloned().collect();
                let size = intent
                    .services
                    .get(id)
                    .map_or(0, |s| slot_estimate(s, &slices));
                (size, id, slices)
            })
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        for (size, id, candidate) in order {
            let mut rejections = Vec::new();
            for slice in store.orphan_slices_of(id) {
                rejections.push(Rejection {
                    kind: "EndpointSlice",
                    object: slice.to_string(),
                    reason: "unknown_service",
                    detail: format!("its service {id} does not exist; ignored"),
                });
            }
            let before = self.estimates.remove(id).unwrap_or(0);
            self.total -= before;
            let Some(service) = intent.services.get(id) else {
                self.admitted.remove(id);
                self.store_refusals(id, rejections);
                continue;
            };
            let endpoints = ready_endpoints(&candidate);
            let refusal = if endpoints > limits.max_endpoints_per_service as usize {
                Some((
                    "too_many_endpoints",
                    format!(
                        "{endpoints} ready endpoints, more than max_endpoints_per_service {}; \
                         keeping its last good endpoints",
                        limits.max_endpoints_per_service
                    ),
                ))
            } else if self.total + size > limits.slot_capacity as usize {
                Some((
                    "slot_capacity",
                    format!(
                        "{size} slots would overflow the slot table ({} entries); keeping its \
                         last good endpoints",
                        limits.slot_capacity
                    ),
                ))
            } else {
                None
            };
            let size = match refusal {
                None => {
                    self.admitted.insert(id.clone(), candidate);
                    size
                }
                Some((reason, detail)) => {
                    rejections.push(Rejection {
                        kind: "Service",
                        object: id.to_string(),
                        reason,
                        detail,
                    });
                    let last = self.admitted(id);
                    let last_size = slot_estimate(service, last);
                    if self.total + last_size > limits.slot_capacity as usize {
                        // Even its last good version does not fit any more: it goes without.
                        self.admitted.remove(id);
                        0
                    } else {
                        last_size
                    }
                }
            };
            self.total += size;
            self.estimates.insert(id.clone(), size);
            self.store_refusals(id, rejections);
        }
    }

    fn store_refusals(&mut self, id: &ObjectRef, rejections: Vec<Rejection>) {
        if rejections.is_empty() {
            self.refused.remove(id);
        } else {
            self.refused.insert(id.clone(), rejections);
        }
    }
}

fn ready_endpoints(slices: &[EndpointSliceIntent]) -> usize {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.ready)
        .flat_map(|e| e.addresses.iter())
        .collect::<BTreeSet<_>>()
        .len()
}

/// Slots a Service takes: one per (service port, ClusterIP, ready endpoint).
fn slot_estimate(service: &ServiceIntent, slices: &[EndpointSliceIntent]) -> usize {
    service.ports.len() * service.cluster_ips.len().max(1) * ready_endpoints(slices)
}
