//! Checks on the intent as a whole, after each object validated on its own: an EndpointSlice
//! whose Service does not exist, a Service with more endpoints than it may have, a cluster that
//! would overflow one of the service maps, a Service that would capture the node. Each is bad
//! input that must cost only its own object.
//!
//! Capacity is accounted before anything is written: every Service's footprint in each map
//! (frontends, slots, backends, Maglev tables) is estimated from above and kept as a running
//! total, so a Service that does not fit is refused and every other change still applies,
//! instead of a map write failing half-way and blocking every later pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use weir_common::map_names;

use crate::compile::CompileOptions;
use crate::config::{MapsConfig, NodePortRange};
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
    /// What each service map holds: [`Footprint::of`] the configured `[maps]`.
    pub capacity: Footprint,
    /// NodePorts must lie in it; so must every port of a frontend on a node's address.
    pub node_port_range: NodePortRange,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_endpoints_per_service: crate::config::DEFAULT_MAX_ENDPOINTS_PER_SERVICE,
            capacity: Footprint::MAPS,
            node_port_range: NodePortRange::default(),
        }
    }
}

/// Entries in each service map: what a Service takes (estimated from above), what all of them
/// take, or what the maps hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// `WEIR_SERVICES`: one per (address or NodePort, port).
    pub frontends: usize,
    /// `WEIR_BACKEND_SLOTS`: per (port, family), one per eligible endpoint, and again for this
    /// node's own endpoints.
    pub slots: usize,
    /// `WEIR_BACKENDS`: one per (endpoint address, target port); shared between Services in
    /// the maps, counted for each here, so the estimate errs high.
    pub backends: usize,
    /// `WEIR_MAGLEV`: table chunks per (port, family) with external frontends, when Maglev is
    /// on.
    pub maglev: usize,
    /// `WEIR_SOURCE_RANGES`: per (port, family), one per `loadBalancerSourceRanges` entry.
    pub source_ranges: usize,
}

impl Footprint {
    /// The capacities the maps are created with by default.
    pub const MAPS: Footprint = Footprint::of(&MapsConfig::DEFAULT);

    /// The capacities of the service maps as configured, so admission accounts against the
    /// maps the agent really created.
    pub const fn of(maps: &MapsConfig) -> Footprint {
        Footprint {
            frontends: maps.services as usize,
            slots: maps.backend_slots as usize,
            backends: maps.backends as usize,
            maglev: maps.maglev as usize,
            source_ranges: maps.source_ranges as usize,
        }
    }

    /// Each count with the map it is of, by its pinned name.
    pub fn by_map(&self) -> [(&'static str, usize); 5] {
        [
            (map_names::SERVICES, self.frontends),
            (map_names::BACKEND_SLOTS, self.slots),
            (map_names::BACKENDS, self.backends),
            (map_names::MAGLEV, self.maglev),
            (map_names::SOURCE_RANGES, self.source_ranges),
        ]
    }

    fn plus(self, other: Footprint) -> Footprint {
        Footprint {
            frontends: self.frontends + other.frontends,
            slots: self.slots + other.slots,
            backends: self.backends + other.backends,
            maglev: self.maglev + other.maglev,
            source_ranges: self.source_ranges + other.source_ranges,
        }
    }

    fn minus(self, other: Footprint) -> Footprint {
        Footprint {
            frontends: self.frontends.saturating_sub(other.frontends),
            slots: self.slots.saturating_sub(other.slots),
            backends: self.backends.saturating_sub(other.backends),
            maglev: self.maglev.saturating_sub(other.maglev),
            source_ranges: self.source_ranges.saturating_sub(other.source_ranges),
        }
    }

    /// The entries a plan writes or deletes in each map (what a drift repair wrote back).
    pub fn of_plan(plan: &crate::state::Plan) -> Footprint {
        Footprint {
            frontends: plan.upsert_services.len() + plan.delete_services.len(),
            slots: plan.upsert_slots.len() + plan.delete_slots.len(),
            backends: plan.upsert_backends.len() + plan.delete_backends.len(),
            maglev: plan.upsert_maglev.len() + plan.delete_maglev.len(),
            source_ranges: plan.upsert_source_ranges.len() + plan.delete_source_ranges.len(),
        }
    }

    /// All entries (to order Services by size).
    pub fn total(&self) -> usize {
        self.frontends + self.slots + self.backends + self.maglev + self.source_ranges
    }

    /// The first map `self` would overflow: (map, entries wanted, capacity).
    fn overflow(&self, capacity: &Footprint) -> Option<(&'static str, usize, usize)> {
        [
            ("frontend", self.frontends, capacity.frontends),
            ("slot", self.slots, capacity.slots),
            ("backend", self.backends, capacity.backends),
            ("Maglev", self.maglev, capacity.maglev),
            ("source range", self.source_ranges, capacity.source_ranges),
        ]
        .into_iter()
        .find(|(_, wanted, cap)| wanted > cap)
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
    /// What each Service takes in the maps, and their sum.
    estimates: BTreeMap<ObjectRef, Footprint>,
    total: Footprint,
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
    pub fn admit(
        &mut self,
        store: &IntentStore,
        changed: &BTreeSet<ObjectRef>,
        limits: Limits,
        options: &CompileOptions,
    ) {
        let intent = store.intent();
        let node_addresses = node_addresses(intent);
        let mut order: Vec<(Footprint, usize, &ObjectRef)> = changed
            .iter()
            .map(|id| {
                let endpoints = ready_endpoints(store.slices_of(id));
                let size = intent.services.get(id).map_or(Footprint::default(), |s| {
                    footprint(s, store.slices_of(id), options)
                });
                (size, endpoints, id)
            })
            .collect();
        order.sort_by(|a, b| a.0.total().cmp(&b.0.total()).then_with(|| a.2.cmp(b.2)));
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
            let before = self.estimates.remove(id).unwrap_or_default();
            self.total = self.total.minus(before);
            let Some(service) = intent.services.get(id) else {
                self.refused.remove(id);
                self.partial.remove(id);
                continue;
            };
            self.note_skipped_ports(service);
            // Refusals whose frontends themselves must not be written (they would capture the
            // node, or overflow a map) withhold the Service; too many endpoints keeps it.
            let (refusal, withhold) = if let Some(capture) =
                node_capture(service, &node_addresses, limits.node_port_range)
            {
                (Some(capture), true)
            } else if endpoints > limits.max_endpoints_per_service as usize {
                let detail = format!(
                    "{endpoints} ready endpoints, more than max_endpoints_per_service {}; \
                         keeping its last good endpoints",
                    limits.max_endpoints_per_service
                );
                (Some(("too_many_endpoints", detail)), false)
            } else if let Some((map, wanted, cap)) =
                self.total.plus(size).overflow(&limits.capacity)
            {
                let detail = format!(
                    "it would bring the {map} map to {wanted} entries, over its {cap}; \
                         keeping its last good version"
                );
                (Some(("map_capacity", detail)), true)
            } else {
                (None, false)
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
                    } else if self.total.plus(before).overflow(&limits.capacity).is_some() {
                        (Decision::Empty, Footprint::default())
                    } else {
                        (Decision::Keep, before)
                    };
                    self.refused.insert(id.clone(), (decision, vec![rejection]));
                    size
                }
            };
            self.total = self.total.plus(size);
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

/// What a Service would take in each map, from above: every endpoint that is ready or serving
/// counts as eligible for every port of its family.
fn footprint<'a>(
    service: &ServiceIntent,
    slices: impl Iterator<Item = &'a EndpointSliceIntent>,
    options: &CompileOptions,
) -> Footprint {
    // Endpoint addresses by family (IPv4, IPv6): all of them, and this node's.
    let mut endpoints = [0usize; 2];
    let mut local = [0usize; 2];
    let mut backends = 0;
    for slice in slices {
        for endpoint in slice.endpoints.iter().filter(|e| e.ready || e.serving) {
            let is_local = !options.node_name.is_empty()
                && endpoint.node_name.as_deref() == Some(options.node_name.as_str());
            for ip in &endpoint.addresses {
                let family = ip.is_ipv6() as usize;
                endpoints[family] += 1;
                local[family] += is_local as usize;
            }
            backends += endpoint.addresses.len() * slice.ports.len();
        }
    }
    let of_family = |ips: &[IpAddr], family: usize| {
        ips.iter()
            .filter(|ip| ip.is_ipv6() as usize == family)
            .count()
    };
    let mut out = Footprint {
        backends,
        ..Footprint::default()
    };
    for port in &service.ports {
        for family in 0..2 {
            let internal = of_family(&service.cluster_ips, family);
            let node_port = (port.node_port.is_some() && internal > 0) as usize;
            let external = of_family(&service.external_ips, family) + node_port;
            if internal + external == 0 {
                continue;
            }
            out.frontends += internal + external;
            out.source_ranges += service
                .source_ranges
                .iter()
                .filter(|c| c.addr.is_ipv6() as usize == family)
                .count();
            out.slots += endpoints[family] + local[family];
            if options.maglev && external > 0 {
                // The chunks of a table sized for every endpoint of the family, from above.
                let size = crate::maglev::table_size(endpoints[family], options.maglev_min_size);
                out.maglev += crate::maglev::chunk_count(size);
            }
        }
    }
    out
}
