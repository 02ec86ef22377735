//! Pinned maps across agents: which ones a starting agent may adopt, and how the entries of
//! the ones it replaces are carried over.
//!
//! **Adoption.** A pinned map is adopted only if it is what this agent's object declares under
//! that name: the same map type, key size, value size, capacity (`[maps]`) and flags. Anything
//! else (a map of another build pinned in the same directory, a stray `bpftool map create`, a
//! map a human renamed, a map of the size an earlier configuration asked for) would be handed to
//! programs and to the agent's own typed map handles that read its values with the wrong size;
//! the kernel's verifier catches only some of that. Such a pin is set aside (renamed
//! `NAME_INCOMPATIBLE`) and the object's map is created anew. Service and node maps cost
//! nothing to recreate (the agent rewrites them); conntrack and affinity hold what no one else
//! knows, so their entries are carried over by the rule below. Layout changes the agent makes
//! itself bump `MAP_LAYOUT_VERSION` and pin in a new directory beside the old one.
//!
//! **Carrying over** ([`CARRIED`]: both conntrack tables and `WEIR_AFFINITY`), from either of:
//! - the pin set aside in this directory (the operator changed `[maps] conntrack`, or the map's
//!   type or flags differ), or
//! - when this layout's directory has no pin of the map yet, the newest older layout's directory
//!   (`pin_dir/v<N>`, N below this agent's) that has one: an upgrade across a layout change.
//!
//! The old map's entries are copied into the new one when their key and value sizes are this
//! layout's ([`conversion`]: bytes are taken as they are; another type or other flags do not
//! matter). If the new map is smaller, the most recently seen entries are kept. Entries of
//! another key or value size are not copied: a warning says so, the map is counted in
//! `weir_maps_not_carried_over_total` and left set aside (`NAME_INCOMPATIBLE` in this layout's
//! directory) for a human to look at.
//!
//! The copy happens twice, because until the agent swaps its programs into the pinned links the
//! old programs keep using (and adding to) the old map: once when the maps are loaded, and again
//! after the first interface pass has swapped the links ([`CarryOver::finish`]), for the entries
//! the old programs touched in between. Only then are the set-aside pins of copied maps and the
//! older layouts' directories unpinned: nothing uses those maps any more, and a new agent that
//! dies before swapping the links finds them still there.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, MapInfo};
use tracing::{info, warn};
use weir_common::{map_names, AffinityKey, AffinityValue, CtKey, CtValue, MAP_LAYOUT_VERSION};

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

/// The maps whose entries a new map takes over from the one it replaces: what they hold is
/// known nowhere else (open flows and their backends, clients' affinities).
pub const CARRIED: [&str; 3] = [map_names::CONNTRACK, map_names::CT_NEW, map_names::AFFINITY];

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

/// The shape of the map pinned at `path`.
pub fn pinned_shape(path: &Path) -> Result<Shape, String> {
    let info = MapInfo::from_pin(path).map_err(|e| format!("not a readable map: {e}"))?;
    Ok(Shape {
        // An unknown type reads as a mismatch.
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Why the map pinned at `path` does not match `want`, if it does not (or is no map at all).
pub fn mismatch(path: &Path, want: &Shape) -> Option<String> {
    let have = match pinned_shape(path) {
        Ok(have) => have,
        Err(e) => return Some(e),
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
        let moved_to = set_aside_path(dir, name);
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

/// Where the map `name` is set aside in `dir`. bpffs refuses dots in names.
pub fn set_aside_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}_INCOMPATIBLE"))
}

/// How entries pinned by map layout `old_version` become this layout's. Entries of the same key
/// and value sizes are taken byte for byte: this layout's own (a capacity change), and layouts 2
/// to 4, whose conntrack and affinity entries are this layout's exactly (v3 added the IPIP
/// tunnel, v4 the tunnel peer map, v5 chunked Maglev tables; none touched them).
///
/// This is the hook for a layout that changes a carried entry: bump `MAP_LAYOUT_VERSION`, add a
/// [`Conversion`] and an arm here matched on the version converted from, and its copy in
/// [`copy_map`]. None is written yet, so entries of other sizes are not carried: v1's 40-byte conntrack value
/// (before the tunnel fields) would need one.
pub fn conversion(old_version: u32, same_sizes: bool) -> Option<Conversion> {
    match (old_version, same_sizes) {
        (2..=MAP_LAYOUT_VERSION, true) => Some(Conversion::Identity),
        // e.g. `(1, false) => Some(Conversion::ConntrackFromV1)`.
        _ => None,
    }
}

/// See [`conversion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// The old entries' bytes are this layout's.
    Identity,
}

/// A value that says when its entry was last used (CLOCK_MONOTONIC nanoseconds, as
/// `bpf_ktime_get_ns`): what decides which entries a smaller map keeps.
pub trait LastUsed: aya::Pod {
    fn last_used_ns(&self) -> u64;
}

impl LastUsed for CtValue {
    fn last_used_ns(&self) -> u64 {
        self.last_seen_ns
    }
}

impl LastUsed for AffinityValue {
    fn last_used_ns(&self) -> u64 {
        self.last_used_ns
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    #[error("map {name} is not carried over")]
    NotCarried { name: String },
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("copying into {name}: {source}")]
    Copy { name: String, source: MapError },
}

/// What one copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries written into the new map.
    pub copied: usize,
    /// The oldest entries left out because the new map is smaller.
    pub left_out: usize,
}

/// Copies the entries of the map pinned at `from` into the one pinned at `into`, both holding
/// the map `name` (any of [`CARRIED`]; a new table with the same entries is one more arm here),
/// converted by `conversion`. With `since` unset, every entry, the most recently used
/// `capacity` ones if there are more; with `since`, only entries used since then
/// (CLOCK_MONOTONIC ns) that the new map holds in an older state or not at all: the old
/// programs' work while they still ran.
pub fn copy_map(
    name: &str,
    conversion: Conversion,
    from: &Path,
    into: &Path,
    capacity: u32,
    since: Option<u64>,
) -> Result<Copied, CarryError> {
    match (name, conversion) {
        (map_names::CONNTRACK | map_names::CT_NEW, Conversion::Identity) => {
            copy_entries::<CtKey, CtValue>(name, from, into, capacity, since)
        }
        (map_names::AFFINITY, Conversion::Identity) => {
            copy_entries::<AffinityKey, AffinityValue>(name, from, into, capacity, since)
        }
        _ => Err(CarryError::NotCarried {
            name: name.to_owned(),
        }),
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(path: &Path) -> Result<HashMap<MapData, K, V>, CarryError> {
    let open_err = |source| CarryError::Open {
        path: path.to_owned(),
        source,
    };
    let data = MapData::from_pin(path).map_err(open_err)?;
    let map = Map::from_map_data(data).map_err(open_err)?;
    HashMap::try_from(map).map_err(open_err)
}

fn copy_entries<K: aya::Pod, V: LastUsed>(
    name: &str,
    from: &Path,
    into: &Path,
    capacity: u32,
    since: Option<u64>,
) -> Result<Copied, CarryError> {
    let old: HashMap<MapData, K, V> = open_hash(from)?;
    let mut new: HashMap<MapData, K, V> = open_hash(into)?;
    let copy_err = |source| CarryError::Copy {
        name: name.to_owned(),
        source,
    };
    let mut entries = Vec::new();
    for entry in old.iter() {
        match entry {
            Ok((key, value)) if since.is_none_or(|t| value.last_used_ns() >= t) => {
                entries.push((key, value))
            }
            Ok(_) => {}
            // Deleted (or evicted) between listing its key and reading it.
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(copy_err(source)),
        }
    }
    if since.is_some() {
        let mut copied = 0;
        for (key, value) in &entries {
            let current = new.get(key, 0).ok();
            if current.is_none_or(|c| c.last_used_ns() < value.last_used_ns()) {
                new.insert(key, value, 0).map_err(copy_err)?;
                copied += 1;
            }
        }
        return Ok(Copied {
            copied,
            left_out: 0,
        });
    }
    // Oldest first, so that the most recent are also the most recent in a new LRU map: should
    // it evict while filling, it evicts what matters least.
    entries.sort_by_key(|(_, value)| value.last_used_ns());
    let left_out = entries.len().saturating_sub(capacity as usize);
    for (key, value) in &entries[left_out..] {
        new.insert(key, value, 0).map_err(copy_err)?;
    }
    Ok(Copied {
        copied: entries.len() - left_out,
        left_out,
    })
}

/// One map to carry over: where the old one is pinned, and what becomes of that pin.
#[derive(Clone, Debug)]
struct Source {
    name: &'static str,
    from: PathBuf,
    /// The old map's layout version.
    version: u32,
    /// Remove `from` once copied (a set-aside pin; an older layout's directory goes whole).
    remove_pin: bool,
}

/// What carrying over did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CarryReport {
    /// Entries copied, by map.
    pub copied: Vec<(&'static str, usize)>,
    /// Maps whose entries could not be carried, and why (left set aside).
    pub not_carried: Vec<(&'static str, String)>,
}

/// Carrying over, from the decision before the maps are loaded to the unpinning after the
/// links point at the new programs.
#[derive(Debug, Default)]
pub struct CarryOver {
    dir: PathBuf,
    /// Maps to copy in [`CarryOver::start`].
    pending: Vec<Source>,
    /// Maps copied once, to top up in [`CarryOver::finish`], with their conversion and new
    /// capacity.
    started: Vec<(Source, Conversion, u32)>,
    /// When the first copy began (CLOCK_MONOTONIC ns).
    since_ns: u64,
    /// Older layouts' directories to unpin once the links use the new programs.
    older_dirs: Vec<PathBuf>,
    report: CarryReport,
    finished: bool,
}

impl CarryOver {
    /// Decides, before the maps of `dir` are loaded, where each of [`CARRIED`] comes from:
    /// its pin set aside in `dir` (in `set_aside`), or, when `dir` has no pin of it, the newest
    /// of `older` (`(version, directory)`, newest first) that has one.
    pub fn plan(dir: &Path, set_aside: &[SetAside], older: &[(u32, PathBuf)]) -> CarryOver {
        let mut sources = Vec::new();
        for name in CARRIED {
            if let Some(moved) = set_aside.iter().find(|m| m.name == name) {
                sources.push(Source {
                    name,
                    from: moved.moved_to.clone(),
                    version: MAP_LAYOUT_VERSION,
                    remove_pin: true,
                });
            } else if !dir.join(name).exists() {
                let found = older.iter().find(|(_, d)| d.join(name).exists());
                if let Some((version, older_dir)) = found {
                    sources.push(Source {
                        name,
                        from: older_dir.join(name),
                        version: *version,
                        remove_pin: false,
                    });
                }
            }
        }
        CarryOver {
            dir: dir.to_owned(),
            pending: sources,
            older_dirs: older.iter().map(|(_, d)| d.clone()).collect(),
            ..CarryOver::default()
        }
    }

    /// The first copy, once the new maps are pinned in the directory (shapes as declared).
    pub fn start(&mut self, shapes: &[(&'static str, Shape)], now_ns: u64) {
        self.since_ns = now_ns;
        for source in std::mem::take(&mut self.pending) {
            let Some((_, want)) = shapes.iter().find(|(n, _)| *n == source.name) else {
                continue;
            };
            let have = match pinned_shape(&source.from) {
                Ok(have) => have,
                Err(reason) => {
                    self.refuse(&source, reason);
                    continue;
                }
            };
            let same_sizes = have.key_size == want.key_size && have.value_size == want.value_size;
            let Some(conversion) = conversion(source.version, same_sizes) else {
                let reason = format!(
                    "key size {} and value size {} (this layout's: {} and {}), and no \
                     converter from layout v{}",
                    have.key_size, have.value_size, want.key_size, want.value_size, source.version
                );
                self.refuse(&source, reason);
                continue;
            };
            let into = self.dir.join(source.name);
            match copy_map(
                source.name,
                conversion,
                &source.from,
                &into,
                want.max_entries,
                None,
            ) {
                Ok(copied) => {
                    info!(
                        map = source.name,
                        from = %source.from.display(),
                        entries = copied.copied,
                        left_out_over_capacity = copied.left_out,
                        "carried the entries of the replaced map over"
                    );
                    self.report.copied.push((source.name, copied.copied));
                    self.started.push((source, conversion, want.max_entries));
                }
                Err(e) => self.refuse(&source, e.to_string()),
            }
        }
    }

    fn refuse(&mut self, source: &Source, reason: String) {
        warn!(
            map = source.name,
            from = %source.from.display(),
            %reason,
            "entries of the replaced map not carried over: the new map starts empty; the old one \
             is kept aside"
        );
        if !source.remove_pin {
            // An older layout's directory goes: keep its map where set-aside maps are kept.
            let moved_to = set_aside_path(&self.dir, source.name);
            let _ = std::fs::remove_file(&moved_to);
            if let Err(e) = std::fs::rename(&source.from, &moved_to) {
                warn!(map = source.name, error = %e, "setting the old map aside");
            }
        }
        self.report.not_carried.push((source.name, reason));
    }

    /// After the links point at the new programs: copies what the old programs did since the
    /// first copy, then unpins the set-aside maps that were copied and the older layouts'
    /// directories. Returns the whole report, once; later calls do nothing.
    pub fn finish(&mut self) -> CarryReport {
        if self.finished {
            return CarryReport::default();
        }
        self.finished = true;
        for (source, conversion, capacity) in &self.started {
            let into = self.dir.join(source.name);
            match copy_map(
                source.name,
                *conversion,
                &source.from,
                &into,
                *capacity,
                Some(self.since_ns),
            ) {
                Ok(top_up) => {
                    if let Some((_, n)) = self
                        .report
                        .copied
                        .iter_mut()
                        .find(|(m, _)| *m == source.name)
                    {
                        *n += top_up.copied;
                    }
                    info!(
                        map = source.name,
                        entries = top_up.copied,
                        "carried over what the old programs did meanwhile"
                    );
                }
                Err(e) => warn!(map = source.name, error = %e, "topping up the carried-over map"),
            }
            if source.remove_pin {
                if let Err(e) = std::fs::remove_file(&source.from) {
                    warn!(pin = %source.from.display(), error = %e, "unpinning the replaced map");
                }
            }
        }
        for dir in &self.older_dirs {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => info!(dir = %dir.display(), "unpinned an older map layout's maps"),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "unpinning an older map layout's maps")
                }
            }
        }
        std::mem::take(&mut self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_the_same_sizes_carry_over_and_others_need_a_converter() {
        assert_eq!(
            conversion(MAP_LAYOUT_VERSION, true),
            Some(Conversion::Identity),
            "a capacity change"
        );
        assert_eq!(
            conversion(MAP_LAYOUT_VERSION - 1, true),
            Some(Conversion::Identity)
        );
        assert_eq!(conversion(MAP_LAYOUT_VERSION, false), None, "a stranger");
        assert_eq!(
            conversion(1, false),
            None,
            "v1's conntrack value was smaller"
        );
    }

    #[test]
    fn sources_are_the_set_aside_pin_or_the_newest_older_layout() {
        let root = tempfile::tempdir().unwrap();
        let (v2, v3, v4) = (
            root.path().join("v2"),
            root.path().join("v3"),
            root.path().join("v4"),
        );
        for dir in [&v2, &v3, &v4] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::write(v2.join(map_names::CONNTRACK), "").unwrap();
        std::fs::write(v3.join(map_names::CONNTRACK), "").unwrap();
        std::fs::write(v2.join(map_names::AFFINITY), "").unwrap();
        // v4 has its own affinity map, adopted as it is.
        std::fs::write(v4.join(map_names::AFFINITY), "").unwrap();
        let older = [(3, v3.clone()), (2, v2.clone())];
        let plan = CarryOver::plan(&v4, &[], &older);
        let sources: Vec<_> = plan
            .pending
            .iter()
            .map(|s| (s.name, s.from.clone(), s.version))
            .collect();
        assert_eq!(
            sources,
            [(map_names::CONNTRACK, v3.join(map_names::CONNTRACK), 3)]
        );
        assert_eq!(plan.older_dirs, [v3.clone(), v2.clone()]);

        let set_aside = SetAside {
            name: map_names::AFFINITY,
            moved_to: set_aside_path(&v4, map_names::AFFINITY),
            reason: "max entries 1 (expected 2)".into(),
        };
        let plan = CarryOver::plan(&v4, std::slice::from_ref(&set_aside), &[]);
        assert_eq!(plan.pending.len(), 1);
        assert_eq!(plan.pending[0].from, set_aside.moved_to);
        assert!(plan.pending[0].remove_pin);
    }
}
