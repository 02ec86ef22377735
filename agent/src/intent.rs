//! The intent model: what the cluster asks of this node's data plane, independent of where it
//! came from (a file today, the Kubernetes API next) and of how the kernel stores it.
//!
//! Conversions from Kubernetes objects validate everything the data plane will rely on, so the
//! compiler downstream never sees an address it cannot encode or a port of zero.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => weir_common::PROTO_TCP,
            Protocol::Udp => weir_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            weir_common::PROTO_TCP => Some(Protocol::Tcp),
            weir_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// `Ok(None)` for SCTP, which Kubernetes allows and the data plane does not carry: such a
    /// port is left out (and reported), never the whole object.
    fn parse(field: &str, value: Option<&str>) -> Result<Option<Self>, IntentError> {
        // Kubernetes defaults an absent protocol to TCP.
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Some(Protocol::Tcp)),
            "UDP" => Ok(Some(Protocol::Udp)),
            "SCTP" => Ok(None),
            other => Err(IntentError::Unsupported(format!(
                "{field}: protocol {other}"
            ))),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntentError {
    #[error("{0}: missing")]
    Missing(&'static str),
    #[error("{field}: invalid IP address {value:?}")]
    InvalidAddress { field: String, value: String },
    #[error("{field}: invalid CIDR {value:?}")]
    InvalidCidr { field: String, value: String },
    #[error("{field}: port {value} out of range 1-65535")]
    InvalidPort { field: String, value: i64 },
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// An address no Service may use (see [`special_address`]).
    #[error("{field}: {value} is {why}, which no Service may use")]
    ReservedAddress {
        field: String,
        value: IpAddr,
        why: &'static str,
    },
    /// A list longer than its kind allows (a deny-list object's prefixes).
    #[error("{field}: {count} entries, more than {limit}")]
    TooManyEntries {
        field: &'static str,
        count: usize,
        limit: usize,
    },
    /// A Pod or NetworkPolicy that policy cannot use.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

impl IntentError {
    /// A stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            IntentError::Missing(_) => "missing",
            IntentError::InvalidAddress { .. } => "invalid_address",
            IntentError::InvalidCidr { .. } => "invalid_cidr",
            IntentError::InvalidPort { .. } => "invalid_port",
            IntentError::Unsupported(_) => "unsupported",
            IntentError::ReservedAddress { .. } => "reserved_address",
            IntentError::TooManyEntries { .. } => "too_many_entries",
            IntentError::Policy(e) => e.reason(),
        }
    }
}

/// Why `ip` may be neither a frontend nor an endpoint, if it may not. Kubernetes' own validation
/// refuses unspecified, loopback and link-local addresses for endpoints and external IPs; Weir
/// refuses them for every frontend too, with every multicast and broadcast address and IPv4
/// written as IPv6 (`::ffff:a.b.c.d`): a frontend of `0.0.0.0` would match no real packet but
/// reads as "every address", loopback ones would capture the node's own local connections
/// through the host-services hooks, link-local ones include the cloud metadata address
/// (169.254.169.254), and the data plane never sees the mapped form on the wire.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address (write it as IPv4)")
        }
        _ => None,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Empty for a single unnamed port, as Kubernetes allows. EndpointSlice ports carry the same
    /// name with the target port (numbered or named) already resolved per endpoint.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// NodePort and LoadBalancer services: the port opened on every address of every node.
    pub node_port: Option<u16>,
}

/// Which endpoints a class of traffic may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficPolicy {
    /// Any endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the node the traffic entered.
    Local,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceIntent {
    pub id: ObjectRef,
    /// ClusterIPs of every family; empty for headless services, which the data plane ignores.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` and the load balancer's ingress IPs: external frontends.
    pub external_ips: Vec<IpAddr>,
    /// The load balancer's ingress IPs among `external_ips`: where `source_ranges` apply.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of a LoadBalancer Service (or, when empty, the legacy
    /// annotation): only sources in these reach its load-balancer IPs and NodePorts. Empty: any.
    pub source_ranges: Vec<Cidr>,
    pub ports: Vec<ServicePort>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// Served by the agent with the local endpoint count, for external load balancers.
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its endpoint.
    pub affinity_timeout_s: Option<u32>,
    /// Ports the data plane does not carry (SCTP), as `port/protocol`: left out, reported.
    pub skipped_ports: Vec<String>,
}

impl ServiceIntent {
    /// Whether traffic from outside the cluster can reach the service.
    pub fn is_external(&self) -> bool {
        !self.external_ips.is_empty() || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// What the data plane needs of a node: where the tunnel reaches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeIntent {
    pub name: String,
    /// InternalIP addresses first, then ExternalIP, in the order the Node lists them.
    pub addresses: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone`: which zone hints this node follows.
    pub zone: Option<String>,
}

impl NodeIntent {
    /// The address other nodes' tunnels send to: the first IPv4 address, else the first IPv6.
    pub fn tunnel_address(&self) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| self.addresses.first())
            .copied()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Default, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// The object behind the endpoint (`targetRef`, a Pod as the EndpointSlice controller writes
    /// it): a dual-stack pod listed in the IPv4 and the IPv6 slice is one endpoint.
    pub target: Option<EndpointTarget>,
    /// Topology hints the EndpointSlice controller wrote (for `trafficDistribution` and
    /// `service.kubernetes.io/topology-mode: Auto`): the zones and nodes it should serve.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// An endpoint's `targetRef`, namespaced (the slice's namespace when the reference has none).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EndpointTarget {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointSliceIntent {
    pub id: ObjectRef,
    pub service: ObjectRef,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// Everything the data plane should implement, keyed for stable iteration order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterIntent {
    pub services: BTreeMap<ObjectRef, ServiceIntent>,
    pub slices: BTreeMap<ObjectRef, EndpointSliceIntent>,
    pub nodes: BTreeMap<String, NodeIntent>,
    /// `PrefilterDenyList` objects, by name.
    pub deny_lists: BTreeMap<String, crate::prefilter::DenyListIntent>,
}

impl ClusterIntent {
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ObjectRef,
    ) -> impl Iterator<Item = &'a EndpointSliceIntent> + 'a {
        self.slices.values().filter(move |s| &s.service == service)
    }
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The Node label naming its zone, which zone hints refer to.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn object_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectRef, IntentError> {
    Ok(ObjectRef {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: meta
            .name
            .clone()
            .ok_or(IntentError::Missing("metadata.name"))?,
    })
}

/// The object's identity, for error messages about an object that failed to convert.
pub fn service_ref(service: &Service) -> Option<ObjectRef> {
    object_ref(&service.metadata).ok()
}

pub fn slice_ref(slice: &EndpointSlice) -> Option<ObjectRef> {
    object_ref(&slice.metadata).ok()
}

pub fn node_name(node: &Node) -> Option<String> {
    node.metadata.name.clone()
}

fn parse_ip(field: &str, value: &str) -> Result<IpAddr, IntentError> {
    value.parse().map_err(|_| IntentError::InvalidAddress {
        field: field.to_owned(),
        value: value.to_owned(),
    })
}

/// An address prefix, `addr/len`, with the bits past `len` cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len` as the API server accepts it (host bits may be set; they are cleared).
    pub fn parse(field: &str, text: &str) -> Result<Cidr, IntentError> {
        let invalid = || IntentError::InvalidCidr {
            field: field.to_owned(),
            value: text.to_owned(),
        };
        let (addr, len) = text.trim().split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let len: u8 = len.parse().map_err(|_| invalid())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if len > bits {
            return Err(invalid());
        }
        let addr = match addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Ok(Cidr { addr, len })
    }
}

/// The legacy annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// An address a Service may use as a frontend or an endpoint: valid and not special.
fn parse_usable_ip(field: &str, value: &str) -> Result<IpAddr, IntentError> {
    let ip = parse_ip(field, value)?;
    match special_address(ip) {
        Some(why) => Err(IntentError::ReservedAddress {
            field: field.to_owned(),
            value: ip,
            why,
        }),
        None => Ok(ip),
    }
}

/// Labels that hand an object to another proxy, as kube-proxy reads them: it watches Services
/// and EndpointSlices without either label, and so does Weir.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Whether the object is another proxy's (or a headless service's): the data plane treats it as
/// if it did not exist.
fn not_for_this_proxy(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|labels| {
        labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
    })
}

fn parse_port(field: &str, value: i32) -> Result<u16, IntentError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(IntentError::InvalidPort {
            field: field.to_owned(),
            value: value.into(),
        })
}

/// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for the affinity timeout (one day).
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

fn traffic_policy(field: &str, value: Option<&str>) -> Result<TrafficPolicy, IntentError> {
    match value.unwrap_or("Cluster") {
        "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(IntentError::Unsupported(format!("{field}: {other}"))),
    }
}

impl TryFrom<&Service> for ServiceIntent {
    type Error = IntentError;

    fn try_from(service: &Service) -> Result<Self, IntentError> {
        let id = object_ref(&service.metadata)?;
        if not_for_this_proxy(&service.metadata) {
            // Another proxy's: nothing for this data plane, as if it did not exist.
            return Ok(ServiceIntent {
                id,
                ..ServiceIntent::default()
            });
        }
        let spec = service.spec.as_ref().ok_or(IntentError::Missing("spec"))?;
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        match kind {
            // DNS-only: nothing for the data plane to do.
            "ExternalName" => {
                return Ok(ServiceIntent {
                    id,
                    ..ServiceIntent::default()
                })
            }
            "ClusterIP" | "NodePort" | "LoadBalancer" => {}
            other => return Err(IntentError::Unsupported(format!("spec.type {other}"))),
        }
        // clusterIPs supersedes clusterIP when present; "None" marks a headless service.
        let mut raw_ips: Vec<&str> = spec
            .cluster_ips
            .as_ref()
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if raw_ips.is_empty() {
            raw_ips.extend(spec.cluster_ip.as_deref());
        }
        let mut cluster_ips = Vec::new();
        for raw in raw_ips {
            if raw == "None" || raw.is_empty() {
                continue;
            }
            cluster_ips.push(parse_usable_ip("spec.clusterIPs", raw)?);
        }
        let mut external_ips = Vec::new();
        for raw in spec.external_ips.iter().flatten() {
            external_ips.push(parse_usable_ip("spec.externalIPs", raw)?);
        }
        let mut load_balancer_ips = Vec::new();
        let mut source_ranges = Vec::new();
        if kind == "LoadBalancer" {
            for raw in spec.load_balancer_source_ranges.iter().flatten() {
                source_ranges.push(Cidr::parse("spec.loadBalancerSourceRanges", raw)?);
            }
            if source_ranges.is_empty() {
                let annotation = service
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION));
                for raw in annotation.into_iter().flat_map(|a| a.split(',')) {
                    if !raw.trim().is_empty() {
                        source_ranges.push(Cidr::parse(SOURCE_RANGES_ANNOTATION, raw)?);
                    }
                }
            }
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for point in ingress.into_iter().flatten() {
                // Hostname-only ingress points are the cloud's business, not the node's, and so
                // is `ipMode: Proxy`: the load balancer terminates the traffic and sends it on
                // to a NodePort, so the node must not capture packets addressed to its IP.
                if point.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                if let Some(raw) = &point.ip {
                    let ip = parse_usable_ip("status.loadBalancer.ingress[].ip", raw)?;
                    if !external_ips.contains(&ip) {
                        external_ips.push(ip);
                    }
                    if !load_balancer_ips.contains(&ip) {
                        load_balancer_ips.push(ip);
                    }
                }
            }
        }
        let exposes_node_ports = kind != "ClusterIP";
        let mut ports = Vec::new();
        let mut skipped_ports = Vec::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            let node_port = match port.node_port {
                Some(n) if exposes_node_ports => Some(parse_port(&format!("{field}.nodePort"), n)?),
                _ => None,
            };
            let number = parse_port(&format!("{field}.port"), port.port)?;
            let Some(protocol) = Protocol::parse(&field, port.protocol.as_deref())? else {
                skipped_ports.push(format!("{number}/SCTP"));
                continue;
            };
            ports.push(ServicePort {
                name: port.name.clone().unwrap_or_default(),
                protocol,
                port: number,
                node_port,
            });
            // targetPort is resolved by the endpoints controller into EndpointSlice ports; the
            // data plane uses those, but a malformed one still marks the object as bad input.
            match &port.target_port {
                Some(IntOrString::Int(target)) => {
                    parse_port(&format!("{field}.targetPort"), *target)?;
                }
                Some(IntOrString::String(name)) if name.is_empty() => {
                    return Err(IntentError::Missing("spec.ports[].targetPort"));
                }
                _ => {}
            }
        }
        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t as u32),
                    Some(t) => {
                        return Err(IntentError::Unsupported(format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} (1-{MAX_AFFINITY_TIMEOUT_S})"
                        )))
                    }
                }
            }
            Some(other) => {
                return Err(IntentError::Unsupported(format!(
                    "spec.sessionAffinity {other}"
                )))
            }
        };
        let health_check_node_port = match spec.health_check_node_port {
            Some(p) => Some(parse_port("spec.healthCheckNodePort", p)?),
            None => None,
        };
        Ok(ServiceIntent {
            id,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            source_ranges,
            ports,
            external_traffic_policy: traffic_policy(
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
            )?,
            internal_traffic_policy: traffic_policy(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            health_check_node_port,
            affinity_timeout_s,
            skipped_ports,
        })
    }
}

impl TryFrom<&Node> for NodeIntent {
    type Error = IntentError;

    fn try_from(node: &Node) -> Result<Self, IntentError> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or(IntentError::Missing("metadata.name"))?;
        let listed = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .cloned()
            .unwrap_or_default();
        let mut addresses = Vec::new();
        for wanted in ["InternalIP", "ExternalIP"] {
            for address in listed.iter().filter(|a| a.type_ == wanted) {
                addresses.push(parse_ip("status.addresses", &address.address)?);
            }
        }
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned();
        Ok(NodeIntent {
            name,
            addresses,
            zone,
        })
    }
}

fn endpoint_target(
    target: Option<&k8s_openapi::api::core::v1::ObjectReference>,
    slice_namespace: &str,
) -> Option<EndpointTarget> {
    let target = target?;
    Some(EndpointTarget {
        kind: target.kind.clone().unwrap_or_default(),
        namespace: target
            .namespace
            .clone()
            .unwrap_or_else(|| slice_namespace.to_owned()),
        name: target.name.clone()?,
    })
}

impl TryFrom<&EndpointSlice> for EndpointSliceIntent {
    type Error = IntentError;

    fn try_from(slice: &EndpointSlice) -> Result<Self, IntentError> {
        let id = object_ref(&slice.metadata)?;
        let service_name = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .ok_or(IntentError::Missing(
                "metadata.labels[kubernetes.io/service-name]",
            ))?;
        match slice.address_type.as_str() {
            "IPv4" | "IPv6" => {}
            other => return Err(IntentError::Unsupported(format!("addressType {other}"))),
        }
        let service = ObjectRef {
            namespace: id.namespace.clone(),
            name: service_name.clone(),
        };
        if not_for_this_proxy(&slice.metadata) {
            // Another proxy's (or a headless service's): it contributes no endpoint.
            return Ok(EndpointSliceIntent {
                id,
                service,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
        }
        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}]");
            let number = port.port.ok_or(IntentError::Missing("ports[].port"))?;
            let number = parse_port(&format!("{field}.port"), number)?;
            // SCTP ports serve only SCTP service ports, which are left out.
            if let Some(protocol) = Protocol::parse(&field, port.protocol.as_deref())? {
                ports.push(EndpointPort {
                    name: port.name.clone().unwrap_or_default(),
                    protocol,
                    port: number,
                });
            }
        }
        let mut endpoints = Vec::new();
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            let addresses = endpoint
                .addresses
                .iter()
                .map(|a| parse_usable_ip(&format!("endpoints[{i}].addresses"), a))
                .collect::<Result<Vec<_>, _>>()?;
            let conditions = endpoint.conditions.as_ref();
            // Absent conditions mean ready and serving, per the EndpointSlice API.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(Endpoint {
                addresses,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node_name: endpoint.node_name.clone(),
                target: endpoint_target(endpoint.target_ref.as_ref(), &id.namespace),
                zone_hints: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: endpoint
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            });
        }
        Ok(EndpointSliceIntent {
            service,
            id,
            ports,
            endpoints,
        })
    }
}
