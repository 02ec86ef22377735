//! Which pinned maps a starting agent may adopt. A pinned map is adopted only if it is what this
//! agent's object declares under that name: the same map type, key size, value size, capacity
//! and flags. Anything else (a map of another build pinned in the same directory, a stray
//! `bpftool map create`, a map a human renamed) would be handed to programs and to the agent's
//! own typed map handles that read its values with the wrong size; the kernel's verifier catches
//! only some of that. Such a pin is set aside (renamed `NAME_INCOMPATIBLE`, kept for a human to
//! look at) and the object's map is created anew: that map's contents start empty, which for
//! service maps costs nothing (the agent recompiles them) and for conntrack loses the flows it
//! held. Layout changes the agent makes itself bump `MAP_LAYOUT_VERSION` and pin elsewhere.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use weir_common::map_names;

/// What a pinned map must match, as the object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// A pin that was set aside, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    pub name: &'static str,
    pub moved_to: PathBuf,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PinLayoutError {
    #[error("parsing the eBPF object's map definitions: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("setting aside the incompatible pin {path}: {source}")]
    SetAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The shapes of every map the agent pins, from the object itself (with capacity overrides).
pub fn declared_shapes(
    object: &[u8],
    max_entries: &[(&'static str, u32)],
) -> Result<Vec<(&'static str, Shape)>, PinLayoutError> {
    let parsed = aya_obj::Object::parse(object)?;
    map_names::PINNED
        .iter()
        .map(|name| {
            let map = parsed
                .maps
                .get(*name)
                .ok_or(PinLayoutError::MissingMap(name))?;
            let capacity = max_entries
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, entries)| *entries);
            Ok((
                *name,
                Shape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: capacity,
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// Why the map pinned at `path` does not match `want`, if it does not (or is no map at all).
pub fn mismatch(path: &Path, want: &Shape) -> Option<String> {
    let info = match MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(e) => return Some(format!("not a readable map: {e}")),
    };
    let have = Shape {
        // An unknown type reads as a mismatch below.
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    let fields = [
        ("type", have.map_type, want.map_type),
        ("key size", have.key_size, want.key_size),
        ("value size", have.value_size, want.value_size),
        ("max entries", have.max_entries, want.max_entries),
        ("flags", have.flags, want.flags),
    ];
    let differing: Vec<String> = fields
        .iter()
        .filter(|(_, have, want)| have != want)
        .map(|(field, have, want)| format!("{field} {have} (expected {want})"))
        .collect();
    (!differing.is_empty()).then(|| differing.join(", "))
}

/// Sets aside every pin in `dir` that does not match its declared shape; returns what it moved.
pub fn set_aside_incompatible(
    dir: &Path,
    shapes: &[(&'static str, Shape)],
) -> Result<Vec<SetAside>, PinLayoutError> {
    let mut moved = Vec::new();
    for (name, shape) in shapes {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(reason) = mismatch(&path, shape) else {
            continue;
        };
        let moved_to = dir.join(format!("{name}_INCOMPATIBLE"));
        // bpffs refuses dots in names. Only the latest one is kept: a crash loop must not fill
        // bpffs.
        let _ = std::fs::remove_file(&moved_to);
        std::fs::rename(&path, &moved_to).map_err(|source| PinLayoutError::SetAside {
            path: path.clone(),
            source,
        })?;
        moved.push(SetAside {
            name,
            moved_to,
            reason,
        });
    }
    Ok(moved)
}
