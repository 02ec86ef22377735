//! `weir-agent dump`: what the pinned maps hold, as tables a person reads or as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use weir_common::{backend_flags, service_flags, BackendSlotKey, LOCAL_SLOT};

use crate::compile::{ip_of, proto_name, socket_addr};
use crate::conntrack::{monotonic_now_ns, view};
use crate::dataplane::{ConntrackMap, Counters, DataplaneError, ServiceMaps};

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub proto: String,
    pub service_id: u32,
    pub backend_count: u32,
    pub backends: Vec<String>,
    pub local_backends: Vec<String>,
    /// `local_only`, `external`, `maglev`.
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: u32,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub addr: String,
    pub proto: String,
    pub local: bool,
    /// Where the tunnel reaches a remote backend.
    pub node: Option<String>,
}

pub fn services(pin_dir: &Path) -> Result<Vec<ServiceRow>, DataplaneError> {
    let state = ServiceMaps::open_pinned(pin_dir)?.read()?;
    let slot_list = |service_id: u32, base: u32, count: u32| -> Vec<String> {
        (0..count)
            .map(|slot| {
                let key = BackendSlotKey {
                    service_id,
                    slot: base | slot,
                };
                match state.slots.get(&key).and_then(|id| state.backends.get(id)) {
                    Some(b) => socket_addr(&b.addr, b.family, b.port_be),
                    None => format!("<slot {slot} missing>"),
                }
            })
            .collect()
    };
    Ok(state
        .services
        .iter()
        .map(|(frontend, service)| ServiceRow {
            frontend: socket_addr(&frontend.addr, frontend.family, frontend.port_be),
            proto: proto_name(frontend.proto),
            service_id: service.service_id,
            backend_count: service.backend_count,
            backends: slot_list(service.service_id, 0, service.backend_count),
            local_backends: slot_list(service.service_id, LOCAL_SLOT, service.local_backend_count),
            flags: [
                (service_flags::LOCAL_ONLY, "local_only"),
                (service_flags::EXTERNAL, "external"),
                (service_flags::MAGLEV, "maglev"),
            ]
            .into_iter()
            .filter(|(bit, _)| service.flags & bit != 0)
            .map(|(_, name)| name)
            .collect(),
            affinity_timeout_s: service.affinity_timeout_s,
        })
        .collect())
}

pub fn backends(pin_dir: &Path) -> Result<Vec<BackendRow>, DataplaneError> {
    let state = ServiceMaps::open_pinned(pin_dir)?.read()?;
    Ok(state
        .backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            addr: socket_addr(&b.addr, b.family, b.port_be),
            proto: proto_name(b.proto),
            local: b.flags & backend_flags::LOCAL != 0,
            node: (b.node_family != 0).then(|| ip_of(&b.node_addr, b.node_family).to_string()),
        })
        .collect())
}

pub fn conntrack(pin_dir: &Path) -> Result<Vec<crate::conntrack::EntryView>, DataplaneError> {
    let tables = ConntrackMap::open_pinned(pin_dir)?.tables()?;
    Ok(view(&tables, monotonic_now_ns()))
}

/// A client port the backend's node moved for a flow arriving through the tunnel, since
/// another node's flow of the same tuple held its reply key (`WEIR_CT_MOVED_ARRIVALS`).
#[derive(Serialize)]
pub struct MovedArrivalRow {
    pub proto: String,
    /// The flow as it arrived, translated at its ingress node: the client...
    pub src: String,
    /// ...and the backend.
    pub dst: String,
    /// The node it came through.
    pub ingress_node: String,
    /// The client port the backend sees instead of `src`'s.
    pub moved_port: u16,
}

pub fn moved_arrivals(pin_dir: &Path) -> Result<Vec<MovedArrivalRow>, DataplaneError> {
    let moves = ConntrackMap::open_pinned(pin_dir)?.moved_arrivals()?;
    Ok(moves
        .iter()
        .map(|(key, port_be)| MovedArrivalRow {
            proto: proto_name(key.flow.proto),
            src: socket_addr(&key.flow.saddr, key.flow.family, key.flow.sport_be),
            dst: socket_addr(&key.flow.daddr, key.flow.family, key.flow.dport_be),
            ingress_node: ip_of(&key.peer, key.peer_family).to_string(),
            moved_port: u16::from_be(*port_be),
        })
        .collect())
}

pub fn counters(pin_dir: &Path) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
    Ok(Counters::open_pinned(pin_dir)?
        .read()?
        .into_iter()
        .collect())
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (cell, w) in cells.zip(&widths) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// What one isolated pod of this node allows in one direction from one peer identity.
#[derive(Serialize)]
pub struct PolicyAllowRow {
    /// 0 is any address.
    pub identity: u32,
    /// `any`, the agent's name for the identity (`namespace/labels`, a CIDR), or what the maps
    /// alone tell (a CIDR, the addresses of a pod identity).
    pub peer: String,
    /// `any`, `tcp/any`, `tcp/8080`, `tcp/8000-8063`.
    pub ports: Vec<String>,
}

#[derive(Serialize)]
pub struct PolicyEndpointRow {
    pub endpoint: u32,
    /// `namespace/name`, when the agent answered.
    pub pod: Option<String>,
    pub addresses: Vec<String>,
    /// `ingress`, `egress`: only what the rules allow passes in that direction.
    pub isolated: Vec<&'static str>,
    pub ingress: Vec<PolicyAllowRow>,
    pub egress: Vec<PolicyAllowRow>,
}

/// The policy maps by isolated endpoint, named with `names` (the running agent's `/policy`)
/// where given.
pub fn policy(
    pin_dir: &Path,
    names: Option<&crate::policy::PolicyNames>,
) -> Result<Vec<PolicyEndpointRow>, DataplaneError> {
    use weir_common::{policy_direction, policy_flags, policy_rule_bits, POLICY_CIDR_FIXED_BITS};
    let state = crate::policy::PolicyMaps::open_pinned(pin_dir)?.read()?;
    let mut from_maps: BTreeMap<u32, String> = BTreeMap::new();
    for ((key, bits), id) in &state.cidrs {
        let prefix = ip_of(&key.addr, key.family);
        from_maps.insert(*id, format!("{prefix}/{}", bits - POLICY_CIDR_FIXED_BITS));
    }
    let mut pods_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, id) in &state.peers {
        pods_of
            .entry(*id)
            .or_default()
            .push(ip_of(&key.addr, key.family).to_string());
    }
    for (id, addresses) in pods_of {
        let more = addresses.len().saturating_sub(3);
        let mut shown = addresses.into_iter().take(3).collect::<Vec<_>>().join(" ");
        if more > 0 {
            shown.push_str(&format!(" +{more}"));
        }
        from_maps.insert(id, format!("pods {shown}"));
    }
    let peer_name = |id: u32| -> String {
        if id == weir_common::POLICY_ANY_PEER {
            return "any".into();
        }
        names
            .and_then(|n| n.identities.get(&id).cloned())
            .or_else(|| from_maps.get(&id).cloned())
            .unwrap_or_else(|| format!("identity {id}"))
    };
    // (endpoint, direction, identity) -> (protocol, first, last) port spans; a protocol's
    // every port as 0-65535, every protocol as protocol 0.
    let mut spans: BTreeMap<RuleGroup, Vec<PortSpan>> = BTreeMap::new();
    for (key, bits) in state.rules.keys() {
        let first = u32::from(u16::from_be(key.port_be));
        let span = match *bits {
            policy_rule_bits::ANY_PROTOCOL => (0, 0, 65535),
            policy_rule_bits::ANY_PORT => (key.proto, 0, 65535),
            bits => {
                let size = 1u32 << (policy_rule_bits::PORT - bits.min(policy_rule_bits::PORT));
                (key.proto, first, first + size - 1)
            }
        };
        spans
            .entry((
                u32::from_be(key.endpoint_be),
                key.direction,
                u32::from_be(key.identity_be),
            ))
            .or_default()
            .push(span);
    }
    let allowed: BTreeMap<RuleGroup, Vec<String>> = spans
        .into_iter()
        .map(|(key, spans)| (key, port_spans(spans)))
        .collect();
    let mut endpoints: BTreeMap<u32, (u8, Vec<String>)> = BTreeMap::new();
    for (key, endpoint) in &state.endpoints {
        let entry = endpoints.entry(endpoint.id).or_default();
        entry.0 |= endpoint.flags;
        entry.1.push(ip_of(&key.addr, key.family).to_string());
    }
    let rows_of = |endpoint: u32, direction: u8| -> Vec<PolicyAllowRow> {
        allowed
            .range((endpoint, direction, 0)..=(endpoint, direction, u32::MAX))
            .map(|((_, _, identity), ports)| PolicyAllowRow {
                identity: *identity,
                peer: peer_name(*identity),
                ports: ports.clone(),
            })
            .collect()
    };
    Ok(endpoints
        .into_iter()
        .map(|(id, (flags, addresses))| PolicyEndpointRow {
            endpoint: id,
            pod: names.and_then(|n| n.endpoints.get(&id).cloned()),
            addresses,
            isolated: [
                (policy_flags::INGRESS, "ingress"),
                (policy_flags::EGRESS, "egress"),
            ]
            .into_iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| name)
            .collect(),
            ingress: rows_of(id, policy_direction::INGRESS),
            egress: rows_of(id, policy_direction::EGRESS),
        })
        .collect())
}

/// Rule entries of one (endpoint, direction, peer identity).
type RuleGroup = (u32, u8, u32);
/// (protocol, first port, last port).
type PortSpan = (u8, u32, u32);

/// Port spans as a person reads them, adjacent ones (a range's prefixes) merged again:
/// `any`, `tcp/any`, `tcp/8080`, `udp/9000-9099`.
fn port_spans(mut spans: Vec<PortSpan>) -> Vec<String> {
    spans.sort_unstable();
    let mut merged: Vec<PortSpan> = Vec::new();
    for (proto, first, last) in spans {
        match merged.last_mut() {
            Some((p, _, end)) if *p == proto && first <= *end + 1 => *end = (*end).max(last),
            _ => merged.push((proto, first, last)),
        }
    }
    merged
        .into_iter()
        .map(|(proto, first, last)| match (proto, first, last) {
            (0, _, _) => "any".to_owned(),
            (_, 0, 65535) => format!("{}/any", proto_name(proto)),
            _ if first == last => format!("{}/{first}", proto_name(proto)),
            _ => format!("{}/{first}-{last}", proto_name(proto)),
        })
        .collect()
}

/// The running agent's names for the policy maps' ids, if it answers.
pub fn policy_names(agent: std::net::SocketAddr) -> Option<crate::policy::PolicyNames> {
    let (code, body) = crate::status::http_get(agent, "/policy").ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// `dump policy` as a table: one line per (endpoint, direction, peer).
pub fn policy_table(rows: &[PolicyEndpointRow]) -> String {
    let mut cells = Vec::new();
    for row in rows {
        let pod = row
            .pod
            .clone()
            .unwrap_or_else(|| format!("#{}", row.endpoint));
        let addresses = row.addresses.join(" ");
        for (direction, allows) in [("ingress", &row.ingress), ("egress", &row.egress)] {
            if !row.isolated.contains(&direction) {
                continue;
            }
            if allows.is_empty() {
                cells.push(vec![
                    pod.clone(),
                    addresses.clone(),
                    direction.to_owned(),
                    "(nothing: deny all)".to_owned(),
                    String::new(),
                ]);
            }
            for allow in allows {
                cells.push(vec![
                    pod.clone(),
                    addresses.clone(),
                    direction.to_owned(),
                    allow.peer.clone(),
                    allow.ports.join(" "),
                ]);
            }
        }
    }
    table(&["POD", "ADDRESSES", "DIRECTION", "PEER", "PORTS"], &cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::port_range_prefixes;

    #[test]
    fn a_port_range_split_into_prefixes_reads_as_one_range_again() {
        let mut spans: Vec<(u8, u32, u32)> = port_range_prefixes(9000, 9099)
            .into_iter()
            .map(|(port, bits)| {
                let size = 1u32 << (16 - bits);
                (17, u32::from(port), u32::from(port) + size - 1)
            })
            .collect();
        spans.push((6, 8080, 8080));
        spans.push((6, 8081, 8081));
        spans.push((17, 53, 53));
        assert_eq!(
            port_spans(spans),
            ["tcp/8080-8081", "udp/53", "udp/9000-9099"]
        );
        assert_eq!(port_spans(vec![(0, 0, 65535)]), ["any"]);
        assert_eq!(port_spans(vec![(6, 0, 65535)]), ["tcp/any"]);
    }
}
