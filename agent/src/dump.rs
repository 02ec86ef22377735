//! `weir-agent dump`: what the pinned maps hold, as tables a person reads or as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::compile::{proto_name, socket_addr};
use crate::conntrack::{monotonic_now_ns, view};
use crate::dataplane::{ConntrackMap, Counters, DataplaneError, ServiceMaps};

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub proto: String,
    pub service_id: u32,
    pub backend_count: u32,
    pub backends: Vec<String>,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub addr: String,
    pub proto: String,
}

pub fn services(pin_dir: &Path) -> Result<Vec<ServiceRow>, DataplaneError> {
    let state = ServiceMaps::open_pinned(pin_dir)?.read()?;
    Ok(state
        .services
        .iter()
        .map(|(frontend, service)| ServiceRow {
            frontend: socket_addr(&frontend.addr, frontend.family, frontend.port_be),
            proto: proto_name(frontend.proto),
            service_id: service.service_id,
            backend_count: service.backend_count,
            backends: (0..service.backend_count)
                .map(|slot| {
                    let key = weir_common::BackendSlotKey {
                        service_id: service.service_id,
                        slot,
                    };
                    match state.slots.get(&key).and_then(|id| state.backends.get(id)) {
                        Some(b) => socket_addr(&b.addr, b.family, b.port_be),
                        None => format!("<slot {slot} missing>"),
                    }
                })
                .collect(),
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
        })
        .collect())
}

pub fn conntrack(pin_dir: &Path) -> Result<Vec<crate::conntrack::EntryView>, DataplaneError> {
    let entries = ConntrackMap::open_pinned(pin_dir)?.entries()?;
    Ok(view(&entries, monotonic_now_ns()))
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
