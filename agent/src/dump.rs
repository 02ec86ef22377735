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
