//! The policy intent: Pods, Namespaces and NetworkPolicies as the policy compiler needs them,
//! validated on the way in so the compiler never meets a CIDR it cannot write or a port range
//! it cannot split.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::intent::ObjectRef;

pub type Labels = BTreeMap<String, String>;

/// Why a NetworkPolicy (or a Pod, Namespace) was refused; the object keeps its last good
/// version.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{field}: invalid CIDR {value:?}")]
    InvalidCidr { field: String, value: String },
    #[error("{field}: {except} is not inside {cidr}")]
    ExceptOutsideCidr {
        field: String,
        except: String,
        cidr: String,
    },
    #[error("{field}: unknown protocol {value:?} (TCP, UDP or SCTP)")]
    UnknownProtocol { field: String, value: String },
    #[error("{field}: port {value} out of range 1-65535")]
    PortOutOfRange { field: String, value: i64 },
    #[error("{field}: endPort needs a numeric port")]
    EndPortWithoutPort { field: String },
    #[error("{field}: endPort {end} is below port {port}")]
    EndPortBelowPort { field: String, port: u16, end: i64 },
    #[error("{field}: selector operator {operator:?} (In, NotIn, Exists, DoesNotExist)")]
    UnknownOperator { field: String, operator: String },
    #[error("{field}: operator {operator} {why}")]
    SelectorValues {
        field: String,
        operator: String,
        why: &'static str,
    },
    #[error("{field}: unknown policy type {value:?} (Ingress or Egress)")]
    UnknownPolicyType { field: String, value: String },
    #[error("{field}: an empty port name")]
    EmptyPortName { field: String },
    #[error("{field}: invalid IP address {value:?}")]
    InvalidAddress { field: String, value: String },
}

impl PolicyError {
    /// A stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::InvalidCidr { .. } => "invalid_cidr",
            PolicyError::ExceptOutsideCidr { .. } => "except_outside_cidr",
            PolicyError::UnknownProtocol { .. } => "unknown_protocol",
            PolicyError::PortOutOfRange { .. } => "invalid_port",
            PolicyError::EndPortWithoutPort { .. } | PolicyError::EndPortBelowPort { .. } => {
                "invalid_end_port"
            }
            PolicyError::UnknownOperator { .. } | PolicyError::SelectorValues { .. } => {
                "invalid_selector"
            }
            PolicyError::UnknownPolicyType { .. } => "invalid_policy_type",
            PolicyError::EmptyPortName { .. } => "invalid_port_name",
            PolicyError::InvalidAddress { .. } => "invalid_address",
        }
    }
}

/// The protocols a NetworkPolicy port may name. Weir carries no SCTP: an SCTP entry is valid
/// and matches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PolicyProtocol {
    fn parse(field: &str, value: Option<&str>) -> Result<Self, PolicyError> {
        // Kubernetes defaults an absent protocol to TCP.
        match value.unwrap_or("TCP") {
            "TCP" => Ok(PolicyProtocol::Tcp),
            "UDP" => Ok(PolicyProtocol::Udp),
            "SCTP" => Ok(PolicyProtocol::Sctp),
            other => Err(PolicyError::UnknownProtocol {
                field: field.to_owned(),
                value: other.to_owned(),
            }),
        }
    }

    /// The IP protocol number the data path sees; None for what it never carries.
    pub fn carried(self) -> Option<u8> {
        match self {
            PolicyProtocol::Tcp => Some(weir_common::PROTO_TCP),
            PolicyProtocol::Udp => Some(weir_common::PROTO_UDP),
            PolicyProtocol::Sctp => None,
        }
    }
}

impl fmt::Display for PolicyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyProtocol::Tcp => "tcp",
            PolicyProtocol::Udp => "udp",
            PolicyProtocol::Sctp => "sctp",
        })
    }
}

/// A container port with a name, which policy ports may refer to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: PolicyProtocol,
    pub port: u16,
}

/// A pod as policy sees it: an endpoint when it runs on this node, a peer everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIntent {
    pub id: ObjectRef,
    pub node: String,
    pub labels: Labels,
    /// Empty for pods that take no part in policy: terminated, not yet addressed, or on the
    /// host network (their addresses are the node's, which the data path always allows).
    pub addresses: Vec<IpAddr>,
    pub named_ports: BTreeSet<NamedPort>,
}

pub fn pod_ref(pod: &Pod) -> Option<ObjectRef> {
    Some(ObjectRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone()?,
    })
}

impl TryFrom<&Pod> for PodIntent {
    type Error = PolicyError;

    fn try_from(pod: &Pod) -> Result<Self, PolicyError> {
        let id = pod_ref(pod).unwrap_or_default();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let terminated = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mut addresses = Vec::new();
        if !terminated && !host_network {
            let mut texts: Vec<&str> = status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
                .unwrap_or_default();
            if texts.is_empty() {
                texts.extend(status.and_then(|s| s.pod_ip.as_deref()));
            }
            for text in texts {
                let address: IpAddr = text.parse().map_err(|_| PolicyError::InvalidAddress {
                    field: "status.podIPs".to_owned(),
                    value: text.to_owned(),
                })?;
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
        }
        let mut named_ports = BTreeSet::new();
        for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for port in container.ports.iter().flatten() {
                let Some(name) = port.name.clone().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let field = "spec.containers.ports";
                named_ports.insert(NamedPort {
                    name,
                    protocol: PolicyProtocol::parse(field, port.protocol.as_deref())?,
                    port: port_number(field, port.container_port.into())?,
                });
            }
        }
        Ok(PodIntent {
            id,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            addresses,
            named_ports,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceIntent {
    pub name: String,
    pub labels: Labels,
}

impl From<&Namespace> for NamespaceIntent {
    fn from(namespace: &Namespace) -> Self {
        let name = namespace.metadata.name.clone().unwrap_or_default();
        let mut labels = namespace.metadata.labels.clone().unwrap_or_default();
        // The API server sets it on every namespace (1.21+); files written by hand may not.
        labels
            .entry("kubernetes.io/metadata.name".to_owned())
            .or_insert_with(|| name.clone());
        NamespaceIntent { name, labels }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

/// A label selector; the empty one selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    fn parse(field: &str, selector: Option<&LabelSelector>) -> Result<Selector, PolicyError> {
        let Some(selector) = selector else {
            return Ok(Selector::default());
        };
        let mut requirements = Vec::new();
        for expression in selector.match_expressions.iter().flatten() {
            let operator = match expression.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(PolicyError::UnknownOperator {
                        field: field.to_owned(),
                        operator: other.to_owned(),
                    })
                }
            };
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            let wants_values = matches!(operator, Operator::In | Operator::NotIn);
            if wants_values == values.is_empty() {
                return Err(PolicyError::SelectorValues {
                    field: field.to_owned(),
                    operator: expression.operator.clone(),
                    why: if wants_values {
                        "needs values"
                    } else {
                        "takes no values"
                    },
                });
            }
            requirements.push(Requirement {
                key: expression.key.clone(),
                operator,
                values,
            });
        }
        requirements.sort();
        Ok(Selector {
            match_labels: selector.match_labels.clone().unwrap_or_default(),
            requirements,
        })
    }
}

/// An address prefix of one family, host bits cleared. IPv4 lives in the low 32 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// 4 or 6, sorting IPv4 before IPv6.
    pub family: u8,
    pub addr: u128,
    pub len: u8,
}

impl Prefix {
    pub fn width(family: u8) -> u8 {
        if family == 4 {
            32
        } else {
            128
        }
    }

    fn mask(family: u8, len: u8) -> u128 {
        let width = Self::width(family);
        let all = if width == 32 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        all & !all.checked_shr(len.into()).unwrap_or(0)
    }

    pub fn new(ip: IpAddr, len: u8) -> Prefix {
        let (family, addr) = match ip {
            IpAddr::V4(v4) => (4, u32::from(v4) as u128),
            IpAddr::V6(v6) => (6, u128::from(v6)),
        };
        Prefix {
            family,
            addr: addr & Self::mask(family, len),
            len,
        }
    }

    pub fn host(ip: IpAddr) -> Prefix {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        Prefix::new(ip, len)
    }

    pub fn parse(field: &str, text: &str) -> Result<Prefix, PolicyError> {
        let invalid = || PolicyError::InvalidCidr {
            field: field.to_owned(),
            value: text.to_owned(),
        };
        let (ip, len) = text.split_once('/').ok_or_else(invalid)?;
        let ip: IpAddr = ip.parse().map_err(|_| invalid())?;
        let len: u8 = len.parse().map_err(|_| invalid())?;
        if len > if ip.is_ipv4() { 32 } else { 128 } {
            return Err(invalid());
        }
        Ok(Prefix::new(ip, len))
    }

    /// The last address inside.
    pub fn last(&self) -> u128 {
        self.addr
            | (!Self::mask(self.family, self.len)
                & Self::mask(self.family, Self::width(self.family)))
    }

    /// `other` lies inside (or is) this prefix.
    pub fn contains(&self, other: &Prefix) -> bool {
        self.family == other.family
            && other.len >= self.len
            && other.addr & Self::mask(self.family, self.len) == self.addr
    }

    pub fn ip(&self) -> IpAddr {
        if self.family == 4 {
            IpAddr::V4((self.addr as u32).into())
        } else {
            IpAddr::V6(self.addr.into())
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip(), self.len)
    }
}

/// Which pods a peer's `podSelector` looks at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum NamespaceScope {
    /// No `namespaceSelector`: the policy's own namespace.
    Own(String),
    /// The namespaces the selector matches (all, when empty).
    Selected(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    IpBlock {
        cidr: Prefix,
        except: Vec<Prefix>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One `ports` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub protocol: PolicyProtocol,
    /// None: every port of the protocol.
    pub port: Option<PortRef>,
    /// The last port of a range starting at a numeric `port`.
    pub end_port: Option<u16>,
}

/// One ingress or egress rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// None: every address (no `from`/`to`, or an empty list).
    pub peers: Option<Vec<Peer>>,
    /// None: every protocol and port (no `ports`, or an empty list).
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyIntent {
    pub id: ObjectRef,
    pub pod_selector: Selector,
    /// Some when the policy isolates its pods for ingress: the rules that allow (none = deny
    /// all).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

pub fn policy_ref(policy: &NetworkPolicy) -> Option<ObjectRef> {
    Some(ObjectRef {
        namespace: policy.metadata.namespace.clone().unwrap_or_default(),
        name: policy.metadata.name.clone()?,
    })
}

impl TryFrom<&NetworkPolicy> for PolicyIntent {
    type Error = PolicyError;

    fn try_from(policy: &NetworkPolicy) -> Result<Self, PolicyError> {
        let id = policy_ref(policy).unwrap_or_default();
        let spec = policy.spec.clone().unwrap_or_default();
        let pod_selector = Selector::parse("spec.podSelector", spec.pod_selector.as_ref())?;
        let ingress_rules = spec.ingress.unwrap_or_default();
        let egress_rules = spec.egress.unwrap_or_default();
        // Kubernetes defaults policyTypes to Ingress, plus Egress when egress rules exist.
        let (mut ingress, mut egress) = (false, false);
        // An empty list is no list: the API server defaults it the same way.
        match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            Some(types) => {
                for t in types {
                    match t.as_str() {
                        "Ingress" => ingress = true,
                        "Egress" => egress = true,
                        other => {
                            return Err(PolicyError::UnknownPolicyType {
                                field: "spec.policyTypes".to_owned(),
                                value: other.to_owned(),
                            })
                        }
                    }
                }
            }
            None => {
                ingress = true;
                egress = !egress_rules.is_empty();
            }
        }
        let namespace = &id.namespace;
        let convert = |direction: &str, rules: Vec<RawRule>| {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (peers, ports))| {
                    let field = format!("spec.{direction}[{i}]");
                    let peers_field = if direction == "ingress" { "from" } else { "to" };
                    Rule::parse(&field, peers_field, namespace, peers, ports)
                })
                .collect::<Result<Vec<Rule>, PolicyError>>()
        };
        // Rules of a direction the policy does not isolate are validated all the same, as
        // the API server does, and then ignored.
        let ingress_rules = convert(
            "ingress",
            ingress_rules
                .into_iter()
                .map(|r| (r.from, r.ports))
                .collect(),
        )?;
        let egress_rules = convert(
            "egress",
            egress_rules.into_iter().map(|r| (r.to, r.ports)).collect(),
        )?;
        Ok(PolicyIntent {
            id,
            pod_selector,
            ingress: ingress.then_some(ingress_rules),
            egress: egress.then_some(egress_rules),
        })
    }
}

/// An ingress or egress rule as the API has it: its peers (`from` or `to`) and ports.
type RawRule = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

impl Rule {
    fn parse(
        field: &str,
        peers_field: &str,
        namespace: &str,
        peers: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> Result<Rule, PolicyError> {
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| Peer::parse(&format!("{field}.{peers_field}[{i}]"), namespace, p))
                .collect::<Result<Vec<Peer>, PolicyError>>()
        });
        let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| PortSpec::parse(&format!("{field}.ports[{i}]"), p))
                .collect::<Result<Vec<PortSpec>, PolicyError>>()
        });
        Ok(Rule {
            peers: peers.transpose()?,
            ports: ports.transpose()?,
        })
    }
}

impl Peer {
    fn parse(field: &str, namespace: &str, peer: &NetworkPolicyPeer) -> Result<Peer, PolicyError> {
        if let Some(block) = &peer.ip_block {
            return Peer::ip_block(&format!("{field}.ipBlock"), block);
        }
        let namespaces = match &peer.namespace_selector {
            Some(s) => NamespaceScope::Selected(Selector::parse(
                &format!("{field}.namespaceSelector"),
                Some(s),
            )?),
            None => NamespaceScope::Own(namespace.to_owned()),
        };
        let pods = Selector::parse(&format!("{field}.podSelector"), peer.pod_selector.as_ref())?;
        Ok(Peer::Pods { namespaces, pods })
    }

    fn ip_block(field: &str, block: &IPBlock) -> Result<Peer, PolicyError> {
        let cidr = Prefix::parse(&format!("{field}.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for text in block.except.iter().flatten() {
            let e = Prefix::parse(&format!("{field}.except"), text)?;
            if !cidr.contains(&e) {
                return Err(PolicyError::ExceptOutsideCidr {
                    field: format!("{field}.except"),
                    except: text.clone(),
                    cidr: block.cidr.clone(),
                });
            }
            except.push(e);
        }
        except.sort();
        except.dedup();
        Ok(Peer::IpBlock { cidr, except })
    }
}

fn port_number(field: &str, value: i64) -> Result<u16, PolicyError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PolicyError::PortOutOfRange {
            field: field.to_owned(),
            value,
        })
}

impl PortSpec {
    fn parse(field: &str, port: &NetworkPolicyPort) -> Result<PortSpec, PolicyError> {
        let protocol = PolicyProtocol::parse(field, port.protocol.as_deref())?;
        let number = match &port.port {
            None => None,
            Some(IntOrString::Int(n)) => Some(PortRef::Number(port_number(field, (*n).into())?)),
            Some(IntOrString::String(s)) => match s.parse::<i64>() {
                Ok(n) => Some(PortRef::Number(port_number(field, n)?)),
                Err(_) if s.is_empty() => {
                    return Err(PolicyError::EmptyPortName {
                        field: field.to_owned(),
                    })
                }
                Err(_) => Some(PortRef::Name(s.clone())),
            },
        };
        let end_port = match (port.end_port, &number) {
            (None, _) => None,
            (Some(end), Some(PortRef::Number(start))) => {
                let end_number = port_number(field, end.into())?;
                if end_number < *start {
                    return Err(PolicyError::EndPortBelowPort {
                        field: field.to_owned(),
                        port: *start,
                        end: end.into(),
                    });
                }
                Some(end_number)
            }
            (Some(_), _) => {
                return Err(PolicyError::EndPortWithoutPort {
                    field: field.to_owned(),
                })
            }
        };
        Ok(PortSpec {
            protocol,
            port: number,
            end_port,
        })
    }
}
