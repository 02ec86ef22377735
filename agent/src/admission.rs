//! Checks on the intent as a whole, after each object validated on its own: an EndpointSlice
//! whose Service does not exist, a Service with more endpoints than it may have, a cluster that
//! would overflow the slot table. Each is bad input that must cost only its own object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::config::NodePortRange;
use crate::intent::{ClusterIntent, EndpointSliceIntent, ObjectRef, ServiceIntent};
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
    /// NodePorts must lie in it; so must every port of a frontend on a node's address.
    pub node_port_range: NodePortRange,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_endpoints_per_service: crate::config::DEFAULT_MAX_ENDPOINTS_PER_SERVICE,
            slot_capacity: weir_common::capacity::BACKEND_SLOTS,
            node_port_range: NodePortRange::default(),
        }
    }
}

/// What to compile for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its current slices.
    Admit,
    /// Nothing new: its entries in the maps (its last good endpoints) stay as they are.
    Keep,
    /// No endpoints: even its last good version does not fit any more.
    Empty,
    /// Its frontends are the problem (they would capture the node): like `Keep` while the maps
    /// hold its last good version; when they are rebuilt (a restart) it gets nothing at all,
    /// since only the refused version is known then.
    Withhold,
}

/// Decides, service by service, which endpoints may be compiled: a Service that grows past a
/// limit keeps serving with its last good endpoints (the entries the maps hold for it, which are
/// simply not recompiled) instead of losing them all. Only the services a change touched are
/// looked at; the slot table's fill is kept as a running total. No endpoint is copied here.
#[derive(Debug, Default)]
pub struct Admission {
    /// Slots each Service takes in the maps, and their sum.
    estimates: BTreeMap<ObjectRef, usize>,
    total: usize,
    /// Services not admitted as they are, and why.
    refused: BTreeMap<ObjectRef, (Decision, Vec<Rejection>)>,
    /// Orphan slices' rejections, by the (missing) Service they name.
    orphans: BTreeMap<ObjectRef, Vec<Rejection>>,
    /// Admitted Services with ports left out (SCTP), reported all the same.
    partial: BTreeMap<ObjectRef, Rejection>,
}

impl Admission {
    pub fn decision(&self, service: &ObjectRef) -> Decision {
        self.refused
            .get(service)
            .map_or(Decision::Admit, |(d, _)| *d)
    }

    /// Every current refusal.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.refused
            .values()
            .flat_map(|(_, r)| r)
            .chain(self.orphans.values().flatten())
            .chain(self.partial.values())
    }

    /// Re-admits the `changed` Services against `limits`. Within one batch, smaller Services
    /// come first: one runaway Service gives way before many small ones do.
    pub fn admit(&mut self, store: &IntentStore, changed: &BTreeSet<ObjectRef>, limits: Limits) {
        let intent = store.intent();
        let node_addresses = node_addresses(intent);
        let mut order: Vec<(usize, usize, &ObjectRef)> = changed
            .iter()
            .map(|id| {
                let endpoints = ready_endpoints(store.slices_of(id));
                let size = intent
                    .services
                    .get(id)
                    .map_or(0, |s| slot_estimate(s, endpoints));
                (size, endpoints, id)
            })
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(b.2)));
        for (size, endpoints, id) in order {
            let orphans: Vec<Rejection> = store
                .orphan_slices_of(id)
                .into_iter()
                .map(|slice| Rejection {
                    kind: "EndpointSlice",
                    object: slice.to_string(),
                    reason: "unknown_service",
                    detail: format!("its service {id} does not exist; ignored"),
                })
                .collect();
            if orphans.is_empty() {
                self.orphans.remove(id);
            } else {
                self.orphans.insert(id.clone(), orphans);
            }
            let before = self.estimates.remove(id).unwrap_or(0);
            self.total -= before;
            let Some(service) = intent.services.get(id) else {
                self.refused.remove(id);
                self.partial.remove(id);
                continue;
            };
            self.note_skipped_ports(service);
            let capture = node_capture(service, &node_addresses, limits.node_port_range);
            let withhold = capture.is_some();
            let refusal = if capture.is_some() {
                capture
            } else if endpoints > limits.max_endpoints_per_service as usize {
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
                    self.refused.remove(id);
                    size
                }
                Some((reason, detail)) => {
                    let rejection = Rejection {
                        kind: "Service",
                        object: id.to_string(),
                        reason,
                        detail,
                    };
                    // What it has in the maps now is its last good version.
                    let (decision, size) = if withhold {
                        (Decision::Withhold, before)
                    } else if self.total + before > limits.slot_capacity as usize {
                        (Decision::Empty, 0)
                    } else {
                        (Decision::Keep, before)
                    };
                    self.refused.insert(id.clone(), (decision, vec![rejection]));
                    size
                }
            };
            self.total += size;
            self.estimates.insert(id.clone(), size);
        }
    }
}

impl Admission {
    fn note_skipped_ports(&mut self, service: &ServiceIntent) {
        if service.skipped_ports.is_empty() {
            self.partial.remove(&service.id);
            return;
        }
        let rejection = Rejection {
            kind: "Service",
            object: service.id.to_string(),
            reason: "unsupported_protocol",
            detail: format!(
                "ports {} are not carried (SCTP); its TCP and UDP ports are served",
                service.skipped_ports.join(", ")
            ),
        };
        self.partial.insert(service.id.clone(), rejection);
    }
}

/// Every address of every Node: frontends there are held to the node-port rules.
fn node_addresses(intent: &ClusterIntent) -> BTreeSet<IpAddr> {
    intent
        .nodes
        .values()
        .flat_map(|n| n.addresses.iter().copied())
        .collect()
}

/// Why the Service would capture a node's own traffic, if it would: a NodePort outside the
/// node-port range, a ClusterIP that is a node's address, or an external or load-balancer IP
/// that is a node's address with a port outside the range (where SSH, the kubelet and the
/// agent itself listen). The Service keeps its last good version, as with any bad input.
fn node_capture(
    service: &ServiceIntent,
    node_addresses: &BTreeSet<IpAddr>,
    range: NodePortRange,
) -> Option<(&'static str, String)> {
    let range_text = String::from(range);
    if let Some(port) = service
        .ports
        .iter()
        .filter_map(|p| p.node_port)
        .find(|n| !range.contains(*n))
    {
        return Some((
            "node_port_out_of_range",
            format!("nodePort {port} is outside the node-port range {range_text}"),
        ));
    }
    if let Some(ip) = service
        .cluster_ips
        .iter()
        .find(|ip| node_addresses.contains(ip))
    {
        return Some((
            "node_address_capture",
            format!("clusterIP {ip} is a node's address"),
        ));
    }
    let on_node = service
        .external_ips
        .iter()
        .find(|ip| node_addresses.contains(ip))?;
    let port = service.ports.iter().find(|p| !range.contains(p.port))?;
    Some((
        "node_address_capture",
        format!(
            "external IP {on_node} is a node's address, and port {} is outside the node-port \
             range {range_text}: it would capture the node's own service on that port",
            port.port
        ),
    ))
}

fn ready_endpoints<'a>(slices: impl Iterator<Item = &'a EndpointSliceIntent>) -> usize {
    slices
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.ready)
        .flat_map(|e| e.addresses.iter())
        .collect::<BTreeSet<_>>()
        .len()
}

/// Slots a Service takes: one per (service port, ClusterIP, ready endpoint).
fn slot_estimate(service: &ServiceIntent, ready_endpoints: usize) -> usize {
    service.ports.len() * service.cluster_ips.len().max(1) * ready_endpoints
}
