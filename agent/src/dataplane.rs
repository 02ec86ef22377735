//! The kernel side as the agent sees it: the loaded object, its pinned maps, and attachments.
//!
//! All map I/O goes through the typed handles here; nothing else in the agent touches aya.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType,
    TcHandle,
};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};
use weir_common::{
    counter, map_names, program_names, Addr, BackendSlotKey, BackendValue, CtKey, CtValue,
    FrontendKey, HostAddrKey, MaglevChunk, MaglevKey, MovedArrivalKey, NodeConfig, ServiceValue,
    SockReverseKey, SourceRange,
};

use crate::map_batch::{self, BatchError, BatchTarget, Strategy};
use crate::pin_layout;
use crate::state::{DataplaneState, Plan};

/// The eBPF object built from `bpf/ebpf` by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: {source}")]
    Batch {
        name: &'static str,
        source: BatchError,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("socket diagnostics (sock_diag): {0}")]
    SockDiag(std::io::Error),
    #[error("duplicating the descriptor of map {name}: {source}")]
    DupMap {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("opening pinned map {path}: {source}")]
    OpenPinned {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("checking the pinned maps before adopting them: {0}")]
    PinLayout(#[from] crate::pin_layout::PinLayoutError),
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("host services: {path} is not a cgroup v2 directory (check where cgroup2 is mounted)")]
    NotCgroup2 { path: PathBuf },
    #[error("host services: opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host services: attaching {program} to {path}: {message}")]
    AttachCgroup {
        program: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("pinning the link of {interface} at {path}: {message}")]
    PinLink {
        interface: String,
        path: PathBuf,
        message: String,
    },
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

pub(crate) fn batch_err(name: &'static str) -> impl Fn(BatchError) -> DataplaneError {
    move |source| DataplaneError::Batch { name, source }
}

/// Writes `entries` in order, batched where the kernel can (see [`map_batch`]).
pub(crate) fn write_entries<M: BatchTarget>(
    map: &M,
    entries: &[(M::Key, M::Value)],
    name: &'static str,
) -> Result<(), DataplaneError> {
    map_batch::update(map, entries, Strategy::Batched).map_err(batch_err(name))
}

/// Deletes `keys` in order; absent keys count as deleted.
pub(crate) fn delete_keys<M: BatchTarget>(
    map: &M,
    keys: &[M::Key],
    name: &'static str,
) -> Result<(), DataplaneError> {
    map_batch::delete(map, keys, Strategy::Batched).map_err(batch_err(name))
}

/// The maps that hold compiled service state.
pub struct ServiceMaps {
    services: HashMap<MapData, FrontendKey, ServiceValue>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, BackendValue>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    /// `WEIR_FRONTEND_ADDRS`, derived from the frontends (see [`ServiceMaps::set_frontend_addrs`]).
    /// The loaded program's own, unpinned: absent when the maps are opened from their pins.
    frontend_addrs: Option<FrontendAddrs>,
}

struct FrontendAddrs {
    map: HashMap<MapData, HostAddrKey, u32>,
    /// What the map holds, as last written; `None` after a failed write (the map is read then).
    written: Option<BTreeSet<HostAddrKey>>,
}

impl ServiceMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(ServiceMaps {
            services: take_map(ebpf, map_names::SERVICES)?,
            slots: take_map(ebpf, map_names::BACKEND_SLOTS)?,
            backends: take_map(ebpf, map_names::BACKENDS)?,
            maglev: take_map(ebpf, map_names::MAGLEV)?,
            source_ranges: take_map(ebpf, map_names::SOURCE_RANGES)?,
            frontend_addrs: Some(FrontendAddrs {
                map: take_map(ebpf, map_names::FRONTEND_ADDRS)?,
                written: None,
            }),
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(ServiceMaps {
            services: open_pinned(dir, map_names::SERVICES)?,
            slots: open_pinned(dir, map_names::BACKEND_SLOTS)?,
            backends: open_pinned(dir, map_names::BACKENDS)?,
            maglev: open_pinned(dir, map_names::MAGLEV)?,
            source_ranges: open_pinned(dir, map_names::SOURCE_RANGES)?,
            frontend_addrs: None,
        })
    }

    /// Whether [`ServiceMaps::set_frontend_addrs`] must run even if no frontend changed: the
    /// map was never written, or its last write failed.
    pub fn frontend_addrs_unsettled(&self) -> bool {
        self.frontend_addrs
            .as_ref()
            .is_some_and(|f| f.written.is_none())
    }

    /// Brings `WEIR_FRONTEND_ADDRS` to `wanted` (the addresses of ClusterIPs, external and
    /// load-balancer IPs), writing only what differs from the last write. Returns the writes.
    pub fn set_frontend_addrs(
        &mut self,
        wanted: BTreeSet<HostAddrKey>,
    ) -> Result<usize, DataplaneError> {
        let Some(frontends) = self.frontend_addrs.as_mut() else {
            return Ok(0);
        };
        let name = map_names::FRONTEND_ADDRS;
        let writes = match frontends.written.take() {
            Some(written) if written == wanted => 0,
            Some(written) => {
                let added: Vec<_> = wanted.difference(&written).map(|k| (*k, 0)).collect();
                let removed: Vec<_> = written.difference(&wanted).copied().collect();
                write_entries(&frontends.map, &added, name)?;
                delete_keys(&frontends.map, &removed, name)?;
                added.len() + removed.len()
            }
            None => set_key_set(&mut frontends.map, &wanted, name)?,
        };
        frontends.written = Some(wanted);
        Ok(writes)
    }

    /// Reads what the maps hold now: the starting point of every diff after a start or a failed
    /// write, so the agent never trusts a memory of the maps over the maps themselves.
    pub fn read(&self) -> Result<DataplaneState, DataplaneError> {
        Ok(DataplaneState {
            services: read_all(&self.services, map_names::SERVICES)?,
            slots: read_all(&self.slots, map_names::BACKEND_SLOTS)?,
            backends: read_all(&self.backends, map_names::BACKENDS)?,
            maglev: read_all(&self.maglev, map_names::MAGLEV)?,
            source_ranges: read_source_ranges(&self.source_ranges)?,
        })
    }

    /// Applies a plan in its safe order. On error the maps hold a prefix of the plan, which is
    /// itself consistent (see [`Plan`]); the caller rereads and retries.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        use map_names::{BACKENDS, BACKEND_SLOTS, MAGLEV, SERVICES, SOURCE_RANGES};
        write_entries(&self.backends, &plan.upsert_backends, BACKENDS)?;
        write_entries(&self.slots, &plan.upsert_slots, BACKEND_SLOTS)?;
        write_entries(&self.maglev, &plan.upsert_maglev, MAGLEV)?;
        let source_ranges: Vec<_> = (plan.upsert_source_ranges.iter())
            .map(|(prefix, value)| (trie_key(prefix), *value))
            .collect();
        write_entries(&self.source_ranges, &source_ranges, SOURCE_RANGES)?;
        write_entries(&self.services, &plan.upsert_services, SERVICES)?;
        delete_keys(&self.services, &plan.delete_services, SERVICES)?;
        delete_keys(&self.maglev, &plan.delete_maglev, MAGLEV)?;
        let source_ranges: Vec<_> = plan.delete_source_ranges.iter().map(trie_key).collect();
        delete_keys(&self.source_ranges, &source_ranges, SOURCE_RANGES)?;
        delete_keys(&self.slots, &plan.delete_slots, BACKEND_SLOTS)?;
        delete_keys(&self.backends, &plan.delete_backends, BACKENDS)
    }
}

fn trie_key(&(range, prefix_len): &crate::state::SourcePrefix) -> LpmKey<SourceRange> {
    LpmKey::new(prefix_len, range)
}

/// Deleting what is already gone is success: the goal is absence.
fn remove_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DataplaneError> {
    absent(map.remove(key), name)
}

/// A removal's result, where the key being gone already counts as success.
fn absent(
    removed: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    match removed {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

fn read_source_ranges(
    trie: &LpmTrie<MapData, SourceRange, u8>,
) -> Result<BTreeMap<crate::state::SourcePrefix, u8>, DataplaneError> {
    let entries =
        map_batch::read(trie, Strategy::Batched).map_err(batch_err(map_names::SOURCE_RANGES))?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| ((key.data(), key.prefix_len()), value))
        .collect())
}

/// A hash map's entries, batched where the kernel can (see [`map_batch`]).
pub(crate) fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    let entries = map_batch::read(map, Strategy::Batched).map_err(batch_err(name))?;
    Ok(entries.into_iter().collect())
}

/// Conntrack's two tables: established flows (`WEIR_CONNTRACK`) and new flows not answered yet
/// (`WEIR_CT_NEW`), which the data path promotes to the first once answered. The agent reads
/// and reclaims both alike. With them, the client ports moved for flows arriving through the
/// tunnel (`WEIR_CT_MOVED_ARRIVALS`), which live as long as the return entries they made; absent
/// from pin directories older agents left.
pub struct ConntrackMap {
    established: HashMap<MapData, CtKey, CtValue>,
    new: HashMap<MapData, CtKey, CtValue>,
    moved_arrivals: Option<HashMap<MapData, MovedArrivalKey, u16>>,
}

/// The contents of both conntrack tables, read one after the other. A flow promoted between the
/// two reads may show in both (the established copy is the one that counts) or in neither.
#[derive(Clone, Debug, Default)]
pub struct CtTables {
    pub established: BTreeMap<CtKey, CtValue>,
    pub new: BTreeMap<CtKey, CtValue>,
}

impl CtTables {
    /// Every entry, as the data path finds them: the established table wins.
    pub fn merged(&self) -> BTreeMap<CtKey, CtValue> {
        let mut all = self.new.clone();
        all.extend(self.established.iter().map(|(k, v)| (*k, *v)));
        all
    }

    /// Whether the entry the data path finds for `key` is an unanswered flow's.
    pub fn is_new(&self, key: &CtKey) -> bool {
        !self.established.contains_key(key) && self.new.contains_key(key)
    }

    /// Entries in the two tables together (an entry caught in both counts twice, as it takes
    /// two slots).
    pub fn len(&self) -> usize {
        self.established.len() + self.new.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ConntrackMap {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(ConntrackMap {
            established: take_map(ebpf, map_names::CONNTRACK)?,
            new: take_map(ebpf, map_names::CT_NEW)?,
            moved_arrivals: Some(take_map(ebpf, map_names::CT_MOVED_ARRIVALS)?),
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        let moved_arrivals = if dir.join(map_names::CT_MOVED_ARRIVALS).exists() {
            Some(open_pinned(dir, map_names::CT_MOVED_ARRIVALS)?)
        } else {
            None
        };
        Ok(ConntrackMap {
            established: open_pinned(dir, map_names::CONNTRACK)?,
            new: open_pinned(dir, map_names::CT_NEW)?,
            moved_arrivals,
        })
    }

    /// A second handle on the same two maps (duplicated descriptors), for another thread.
    pub fn try_clone(&self) -> Result<Self, DataplaneError> {
        Ok(ConntrackMap {
            established: clone_map(&self.established, map_names::CONNTRACK)?,
            new: clone_map(&self.new, map_names::CT_NEW)?,
            moved_arrivals: self
                .moved_arrivals
                .as_ref()
                .map(|map| clone_map(map, map_names::CT_MOVED_ARRIVALS))
                .transpose()?,
        })
    }

    /// The client ports moved for flows arriving through the tunnel (see
    /// [`MovedArrivalKey`]).
    pub fn moved_arrivals(&self) -> Result<BTreeMap<MovedArrivalKey, u16>, DataplaneError> {
        self.moved_arrivals
            .as_ref()
            .map_or(Ok(BTreeMap::new()), |map| {
                read_all(map, map_names::CT_MOVED_ARRIVALS)
            })
    }

    /// Forgets a moved client port; absent is removed.
    pub fn remove_moved_arrival(&mut self, key: &MovedArrivalKey) -> Result<(), DataplaneError> {
        match &mut self.moved_arrivals {
            Some(map) => remove_present(map, key, map_names::CT_MOVED_ARRIVALS),
            None => Ok(()),
        }
    }

    /// Both tables' entries.
    pub fn tables(&self) -> Result<CtTables, DataplaneError> {
        Ok(CtTables {
            established: read_all(&self.established, map_names::CONNTRACK)?,
            new: read_all(&self.new, map_names::CT_NEW)?,
        })
    }

    /// Every entry, as the data path finds them (see [`CtTables::merged`]).
    pub fn entries(&self) -> Result<BTreeMap<CtKey, CtValue>, DataplaneError> {
        Ok(self.tables()?.merged())
    }

    /// Plants an entry in the established table, as the data path promotes an answered flow.
    pub fn insert(&mut self, key: &CtKey, value: &CtValue) -> Result<(), DataplaneError> {
        self.established
            .insert(key, value, 0)
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// Plants an entry in the new-flow table, as the data path records a new flow.
    pub fn insert_new(&mut self, key: &CtKey, value: &CtValue) -> Result<(), DataplaneError> {
        self.new
            .insert(key, value, 0)
            .map_err(map_err(map_names::CT_NEW))
    }

    /// Removes the entry of `key` from both tables (the data path may be promoting it); absent
    /// is removed. Idempotent, so the garbage collector and the loop may race on a key.
    pub fn remove(&mut self, key: &CtKey) -> Result<(), DataplaneError> {
        remove_present(&mut self.established, key, map_names::CONNTRACK)?;
        remove_present(&mut self.new, key, map_names::CT_NEW)
    }

    /// Removes the entries of `keys` from both tables, as [`ConntrackMap::remove`] each, in two
    /// batched deletions.
    pub fn remove_all(&mut self, keys: &[CtKey]) -> Result<(), DataplaneError> {
        delete_keys(&self.established, keys, map_names::CONNTRACK)?;
        delete_keys(&self.new, keys, map_names::CT_NEW)
    }
}

/// Another handle on the map behind `map`, on a duplicate of its descriptor.
fn clone_map<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DataplaneError> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::DupMap { name, source })?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Counters {
            map: open_pinned(dir, map_names::COUNTERS)?,
        })
    }

    /// Every counter summed over CPUs, by name.
    pub fn read(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        (0..counter::COUNT)
            .map(|i| {
                let per_cpu = self.map.get(&i, 0).map_err(map_err(map_names::COUNTERS))?;
                Ok((counter::NAMES[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// What the programs need to know about the node itself: its addresses (where NodePorts
/// answer), its configuration (tunnel device, return mode, hairpin addresses), and the other
/// nodes' addresses (the only senders its tunnel accepts).
pub struct NodeMaps {
    host_addrs: HashMap<MapData, HostAddrKey, u32>,
    tunnel_peers: HashMap<MapData, HostAddrKey, u32>,
    pod_interfaces: HashMap<MapData, u32, u32>,
    config: Array<MapData, NodeConfig>,
}

impl NodeMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(NodeMaps {
            host_addrs: take_map(ebpf, map_names::HOST_ADDRS)?,
            tunnel_peers: take_map(ebpf, map_names::TUNNEL_PEERS)?,
            pod_interfaces: take_map(ebpf, map_names::POD_INTERFACES)?,
            config: take_map(ebpf, map_names::NODE_CONFIG)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(NodeMaps {
            host_addrs: open_pinned(dir, map_names::HOST_ADDRS)?,
            tunnel_peers: open_pinned(dir, map_names::TUNNEL_PEERS)?,
            pod_interfaces: open_pinned(dir, map_names::POD_INTERFACES)?,
            config: open_pinned(dir, map_names::NODE_CONFIG)?,
        })
    }

    pub fn host_addrs(&self) -> Result<BTreeSet<HostAddrKey>, DataplaneError> {
        key_set(&self.host_addrs, map_names::HOST_ADDRS)
    }

    /// Makes the map hold exactly `wanted`, writing only the difference. Returns the writes.
    pub fn set_host_addrs(
        &mut self,
        wanted: &BTreeSet<HostAddrKey>,
    ) -> Result<usize, DataplaneError> {
        set_key_set(&mut self.host_addrs, wanted, map_names::HOST_ADDRS)
    }

    pub fn tunnel_peers(&self) -> Result<BTreeSet<HostAddrKey>, DataplaneError> {
        key_set(&self.tunnel_peers, map_names::TUNNEL_PEERS)
    }

    /// Makes the tunnel accept exactly the senders in `wanted`. Returns the writes.
    pub fn set_tunnel_peers(
        &mut self,
        wanted: &BTreeSet<HostAddrKey>,
    ) -> Result<usize, DataplaneError> {
        set_key_set(&mut self.tunnel_peers, wanted, map_names::TUNNEL_PEERS)
    }

    /// Makes exactly the interfaces in `wanted` (ifindexes) count as pods'. Returns the writes.
    pub fn set_pod_interfaces(&mut self, wanted: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        set_key_set(&mut self.pod_interfaces, wanted, map_names::POD_INTERFACES)
    }

    pub fn config(&self) -> Result<NodeConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(map_err(map_names::NODE_CONFIG))
    }

    pub fn set_config(&mut self, config: &NodeConfig) -> Result<(), DataplaneError> {
        if self.config()? == *config {
            return Ok(());
        }
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::NODE_CONFIG))
    }
}

/// The keys of a map used as a set.
fn key_set<K: aya::Pod + Ord>(
    map: &HashMap<MapData, K, u32>,
    name: &'static str,
) -> Result<BTreeSet<K>, DataplaneError> {
    Ok(read_all(map, name)?.into_keys().collect())
}

/// Brings a map used as a set to `wanted`: additions first, so that a member replaced by
/// another (a Node's new address for its old one) overlaps it for a moment rather than leaving a
/// gap. A map too full for that (`E2BIG`: at its `[maps]` capacity) takes the removals first and
/// the remaining additions after, so a set that fits is always written.
fn set_key_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    wanted: &BTreeSet<K>,
    name: &'static str,
) -> Result<usize, DataplaneError> {
    let current = key_set(map, name)?;
    let additions: Vec<(K, u32)> = wanted.difference(&current).map(|k| (*k, 0)).collect();
    let removals: Vec<K> = current.difference(wanted).copied().collect();
    let added = match map_batch::update(map, &additions, Strategy::Batched) {
        Ok(()) => additions.len(),
        Err(full) if full.source.raw_os_error() == Some(libc::E2BIG) => full.done,
        Err(source) => return Err(DataplaneError::Batch { name, source }),
    };
    delete_keys(map, &removals, name)?;
    write_entries(map, &additions[added..], name)?;
    Ok(additions.len() + removals.len())
}

/// The TCX programs on `interface` at `hook`, in the order they run: (program id, name).
pub fn tcx_programs(
    interface: &str,
    hook: Hook,
) -> Result<Vec<(u32, String)>, aya::programs::ProgramError> {
    let (_, programs) = SchedClassifier::query_tcx(interface, hook.attach_type())?;
    Ok(programs
        .iter()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_owned()))
        .collect())
}

/// How full one pinned hash map is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// Entries and capacity of every pinned hash map in `dir` (arrays are always full), by
/// walking their keys: what `weir-agent status` shows, also while no agent runs.
pub fn fill_levels(dir: &Path) -> Vec<(&'static str, Result<MapFill, DataplaneError>)> {
    use weir_common::{AffinityKey, AffinityValue};
    /// Capacity from the pin's map info, entries as `count` finds them.
    fn fill_with(
        dir: &Path,
        name: &'static str,
        count: impl FnOnce() -> Result<usize, DataplaneError>,
    ) -> (&'static str, Result<MapFill, DataplaneError>) {
        let result = count().and_then(|entries| {
            let capacity = MapInfo::from_pin(dir.join(name))
                .map_err(|source| DataplaneError::Map { name, source })?
                .max_entries();
            Ok(MapFill {
                name,
                entries,
                capacity,
            })
        });
        (name, result)
    }
    fn fill<K: aya::Pod, V: aya::Pod>(
        dir: &Path,
        name: &'static str,
    ) -> (&'static str, Result<MapFill, DataplaneError>) {
        fill_with(dir, name, || {
            let map: HashMap<MapData, K, V> = open_pinned(dir, name)?;
            Ok(map.keys().filter(Result::is_ok).count())
        })
    }
    vec![
        fill::<FrontendKey, ServiceValue>(dir, map_names::SERVICES),
        fill::<BackendSlotKey, u32>(dir, map_names::BACKEND_SLOTS),
        fill::<u32, BackendValue>(dir, map_names::BACKENDS),
        fill::<MaglevKey, MaglevChunk>(dir, map_names::MAGLEV),
        fill::<CtKey, CtValue>(dir, map_names::CONNTRACK),
        fill::<CtKey, CtValue>(dir, map_names::CT_NEW),
        fill::<AffinityKey, AffinityValue>(dir, map_names::AFFINITY),
        fill::<SockReverseKey, FrontendKey>(dir, map_names::SOCK_REVERSE),
        fill::<MovedArrivalKey, u16>(dir, map_names::CT_MOVED_ARRIVALS),
        fill::<HostAddrKey, u32>(dir, map_names::HOST_ADDRS),
        fill::<HostAddrKey, u32>(dir, map_names::TUNNEL_PEERS),
        fill::<u32, u32>(dir, map_names::POD_INTERFACES),
        fill_with(dir, map_names::SOURCE_RANGES, || {
            let trie: LpmTrie<MapData, SourceRange, u8> =
                open_pinned(dir, map_names::SOURCE_RANGES)?;
            Ok(trie.keys().filter(Result::is_ok).count())
        }),
        fill::<HostAddrKey, weir_common::PolicyEndpoint>(dir, map_names::POLICY_ENDPOINTS),
        fill::<HostAddrKey, u32>(dir, map_names::POLICY_PEERS),
        fill_with(dir, map_names::POLICY_CIDRS, || {
            let trie: LpmTrie<MapData, weir_common::PolicyCidrKey, u32> =
                open_pinned(dir, map_names::POLICY_CIDRS)?;
            Ok(trie.keys().filter(Result::is_ok).count())
        }),
        fill_with(dir, map_names::POLICY_RULES, || {
            let trie: LpmTrie<MapData, weir_common::PolicyRuleKey, u8> =
                open_pinned(dir, map_names::POLICY_RULES)?;
            Ok(trie.keys().filter(Result::is_ok).count())
        }),
    ]
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

pub(crate) fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| DataplaneError::OpenPinned {
        path: path.clone(),
        source,
    })?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// The loaded programs, their maps, and where they are attached.
pub struct Dataplane {
    ebpf: Ebpf,
    pub services: ServiceMaps,
    pub policy: crate::policy::PolicyMaps,
    pub prefilter: crate::prefilter::PrefilterMaps,
    pub node: NodeMaps,
    pub conntrack: ConntrackMap,
    pub counters: Counters,
    attached: BTreeMap<(String, Hook), Attachment>,
    sock_netns: Array<MapData, u64>,
    /// Sockets host services translated: (cookie, backend) -> the frontend they asked for.
    sock_reverse: HashMap<MapData, SockReverseKey, FrontendKey>,
    /// The host-service programs' hooks, when attached (see [`Dataplane::attach_host_services`]).
    host_services: Vec<HostServiceLink>,
    host_services_adopted: usize,
    /// Where links are pinned so they outlive the agent; `None` ties them to this process.
    link_pin_dir: Option<PathBuf>,
    mode: AttachMode,
    /// Entries of replaced maps, copied at load and topped up once the links are swapped.
    carry_over: pin_layout::CarryOver,
}

/// A Weir program attached to an interface next to this agent's own (see
/// [`Dataplane::foreign_programs`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ForeignProgram {
    pub interface: String,
    pub hook: Hook,
    pub id: u32,
    pub name: String,
    /// It runs before this agent's program (or this agent's is missing there).
    pub before_ours: bool,
}

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// `weir_ingress`: every packet entering the node.
    Ingress,
    /// `weir_egress`: the ICMP errors the node's own stack sends about translated flows. Not on
    /// the tunnel device: what enters it is already on its way to the node that holds the flow.
    Egress,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    pub fn program(self) -> &'static str {
        match self {
            Hook::Ingress => program_names::INGRESS,
            Hook::Egress => program_names::EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    /// The prefix of its link pins, followed by the interface name.
    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Ingress => "tcx_ingress_",
            Hook::Egress => "tcx_egress_",
        }
    }
}

/// How the programs are hooked to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel 6.6+): pinnable, replaced atomically with `BPF_LINK_UPDATE`.
    Tcx,
    /// A direct-action cls_bpf filter on a clsact qdisc, at Weir's own priority and handle: it
    /// outlives the process by itself and is replaced in place by a new filter change.
    Netlink,
}

impl AttachMode {
    /// TCX from 6.6 on, netlink before: the same choice aya's `attach` makes.
    pub fn for_running_kernel() -> AttachMode {
        if has_tcx() {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        }
    }
}

/// One interface's hook, and so how to undo it.
enum Attachment {
    /// Tied to this process: detached by [`Dataplane::detach`] or when the agent exits.
    Owned(SchedClassifierLinkId),
    /// A TCX link pinned at this path: lives until the pin is removed.
    PinnedTcx(PathBuf),
    /// A persistent clsact filter: lives until it is deleted by name.
    Netlink,
}

/// The clsact filter slot Weir uses, fixed so a restarted agent finds and replaces its own
/// filter instead of stacking a second one. Priority 0x5745 is "WE" in ASCII: unlikely to be
/// another loader's choice.
const NETLINK_PRIORITY: u16 = 0x5745;
const NETLINK_HANDLE: u32 = 1;

pub fn link_pin_name(interface: &str, hook: Hook) -> String {
    format!("{}{interface}", hook.pin_prefix())
}

/// The interface and hook a link pin file belongs to, if it is one of ours.
fn hook_of_pin(file_name: &str) -> Option<(&str, Hook)> {
    Hook::ALL
        .iter()
        .find_map(|hook| Some((file_name.strip_prefix(hook.pin_prefix())?, *hook)))
}

/// Options for [`Dataplane::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin (or adopt already pinned) maps in this bpffs directory. `None` keeps them private to
    /// this process, as packet tests want.
    pub pin_dir: Option<PathBuf>,
    /// Overrides of map capacities, by map name (`[maps]`, see
    /// [`crate::config::MapsConfig::max_entries`]).
    pub max_entries: Vec<(&'static str, u32)>,
    /// Older map layouts' directories beside `pin_dir` (`(version, directory)`, newest first):
    /// conntrack and affinity entries are carried over from them, and they are unpinned by
    /// [`Dataplane::finish_carry_over`] (see `pin_layout`).
    pub older_pin_dirs: Vec<(u32, PathBuf)>,
}

impl Dataplane {
    pub fn load(options: &LoadOptions) -> Result<Self, DataplaneError> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        let mut carry_over = None;
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                path: dir.clone(),
                source,
            })?;
            let shapes = pin_layout::declared_shapes(OBJECT, &options.max_entries)?;
            let set_aside = pin_layout::set_aside_incompatible(dir, &shapes)?;
            for moved in &set_aside {
                warn!(
                    map = moved.name,
                    reason = %moved.reason,
                    moved_to = %moved.moved_to.display(),
                    "pinned map does not match this agent's object: not adopted, set aside; a new \
                     one is created (conntrack and affinity entries are carried over)"
                );
            }
            carry_over = Some((
                pin_layout::CarryOver::plan(dir, &set_aside, &options.older_pin_dirs),
                shapes,
            ));
            for name in map_names::PINNED {
                let path = dir.join(name);
                if path.exists() {
                    info!(map = name, path = %path.display(), "adopting pinned map");
                }
                loader.map_pin_path(name, path);
            }
        }
        for (name, entries) in &options.max_entries {
            loader.map_max_entries(name, *entries);
        }
        let mut ebpf = loader.load(OBJECT)?;
        // The new maps are pinned now: the first copy into them.
        let carry_over =
            carry_over.map_or_else(pin_layout::CarryOver::default, |(mut c, shapes)| {
                c.start(&shapes, crate::conntrack::monotonic_now_ns());
                c
            });
        for name in [
            program_names::INGRESS,
            program_names::EGRESS,
            program_names::PASS,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            retry_interrupted(name, || program.load())?;
            log_verified(name, program.info());
        }
        for name in [program_names::PREFILTER, program_names::XDP_PASS] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            retry_interrupted(name, || program.load())?;
            log_verified(name, program.info());
        }
        Ok(Dataplane {
            services: ServiceMaps::take(&mut ebpf)?,
            policy: crate::policy::PolicyMaps::take(&mut ebpf)?,
            prefilter: crate::prefilter::PrefilterMaps::take(&mut ebpf)?,
            node: NodeMaps::take(&mut ebpf)?,
            conntrack: ConntrackMap::take(&mut ebpf)?,
            counters: Counters {
                map: take_map(&mut ebpf, map_names::COUNTERS)?,
            },
            sock_netns: take_map(&mut ebpf, map_names::SOCK_NETNS)?,
            sock_reverse: take_map(&mut ebpf, map_names::SOCK_REVERSE)?,
            ebpf,
            attached: BTreeMap::new(),
            host_services: Vec::new(),
            host_services_adopted: 0,
            link_pin_dir: None,
            mode: AttachMode::for_running_kernel(),
            carry_over,
        })
    }

    /// Ends carrying maps over (see `pin_layout`), once the links point at this agent's
    /// programs: copies what the old programs did since the maps were loaded, then unpins the
    /// replaced maps that were copied and older layouts' directories. The report, once.
    pub fn finish_carry_over(&mut self) -> pin_layout::CarryReport {
        self.carry_over.finish()
    }

    /// Makes attachments outlive this process: TCX links are pinned in `dir` (and links already
    /// pinned there are adopted), clsact filters are left in place. Call before attaching.
    pub fn pin_links_in(&mut self, dir: &Path) -> Result<(), DataplaneError> {
        std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
            path: dir.to_owned(),
            source,
        })?;
        self.link_pin_dir = Some(dir.to_owned());
        Ok(())
    }

    /// Overrides the kernel-based choice, e.g. to exercise the clsact path on a TCX kernel.
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = mode;
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// An XDP program of the object (the pre-filter, its pass-through baseline).
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Where links are pinned, when they outlive the agent.
    pub fn link_pin_dir(&self) -> Option<&Path> {
        self.link_pin_dir.as_deref()
    }

    /// A map no handle here owns (the fragment maps), for tests and tools to read.
    pub fn map(&self, name: &str) -> Option<&aya::maps::Map> {
        self.ebpf.map(name)
    }

    pub fn is_attached(&self, interface: &str, hook: Hook) -> bool {
        self.attached.contains_key(&(interface.to_owned(), hook))
    }

    /// The interfaces the ingress program is attached to (every one this agent serves).
    pub fn attached_interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached
            .keys()
            .filter(|(_, hook)| *hook == Hook::Ingress)
            .map(|(interface, _)| interface.as_str())
    }

    /// Aborts the connected UDP sockets of this network namespace that host services translated
    /// to an endpoint in `retired` from one of that Service's frontends (see
    /// [`crate::sock_diag`]); returns how many. Sockets that named the endpoint themselves are
    /// left alone.
    pub fn abort_retired_sockets(
        &self,
        retired: &[crate::conntrack::Retired],
    ) -> Result<usize, DataplaneError> {
        // Without host services no socket was translated: nothing to list.
        if retired.is_empty() || !self.host_services_attached() {
            return Ok(0);
        }
        let sockets =
            crate::sock_diag::connected_udp_sockets().map_err(DataplaneError::SockDiag)?;
        let mut aborted = 0;
        for socket in sockets {
            let (backend, family) = crate::compile::addr_of(socket.peer.ip());
            let key = SockReverseKey {
                cookie: socket.cookie,
                backend,
                port_be: socket.peer.port().to_be(),
                proto: weir_common::PROTO_UDP,
                family,
                _pad: 0,
            };
            let Ok(frontend) = self.sock_reverse.get(&key, 0) else {
                continue;
            };
            let endpoint = (backend, key.port_be, key.proto, family);
            let retiring = retired.iter().any(|r| {
                r.backends.contains(&endpoint)
                    && r.frontends.iter().any(|f| {
                        *f == frontend
                            || (f.addr == Addr::UNSPECIFIED
                                && (f.port_be, f.proto, f.family)
                                    == (frontend.port_be, frontend.proto, frontend.family))
                    })
            });
            if retiring {
                crate::sock_diag::abort(&socket).map_err(DataplaneError::SockDiag)?;
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    /// Weir programs on the interfaces this agent serves that are not its own: left by an agent
    /// with another pin directory or layout version (whose links this one does not know), they
    /// see packets next to ours, and before ours if they come first. Reported, not removed: a
    /// link that is not ours may be another node's agent in the same network namespace. TCX
    /// only: in clsact mode Weir's filter sits at a fixed priority and handle, so a later agent
    /// replaces an earlier one's filter instead of stacking beside it.
    pub fn foreign_programs(&mut self) -> Result<Vec<ForeignProgram>, DataplaneError> {
        if self.mode != AttachMode::Tcx {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for hook in Hook::ALL {
            let name = hook.program();
            let ours = self
                .program(name)?
                .info()
                .map_err(|source| DataplaneError::Program { name, source })?
                .id();
            let interfaces: Vec<String> = self
                .attached
                .keys()
                .filter(|(_, h)| *h == hook)
                .map(|(interface, _)| interface.clone())
                .collect();
            for interface in interfaces {
                let programs =
                    tcx_programs(&interface, hook).map_err(|source| DataplaneError::Attach {
                        interface: interface.clone(),
                        source,
                    })?;
                let our_position = programs.iter().position(|(id, _)| *id == ours);
                for (position, (id, name)) in programs.iter().enumerate() {
                    if *id == ours || !name.starts_with("weir_") {
                        continue;
                    }
                    found.push(ForeignProgram {
                        interface: interface.clone(),
                        hook,
                        id: *id,
                        name: name.clone(),
                        before_ours: our_position.is_none_or(|ours| position < ours),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Attaches the program of `hook`: through TCX where the kernel has it (6.6+), otherwise as
    /// a direct-action filter on a clsact qdisc. With pinned links, a hook a previous agent left
    /// on this interface is taken over: its program is replaced by ours in one step, so no
    /// packet goes unhandled and established flows keep their conntrack entries.
    pub fn attach(&mut self, interface: &str, hook: Hook) -> Result<(), DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let attachment = match (self.mode, self.link_pin_dir.clone()) {
            (AttachMode::Tcx, Some(dir)) => self.attach_pinned_tcx(interface, hook, &dir)?,
            (AttachMode::Netlink, Some(_)) => self.attach_persistent_netlink(interface, hook)?,
            (mode, None) => {
                let options = match mode {
                    AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
                    AttachMode::Netlink => {
                        add_clsact(interface);
                        TcAttachOptions::Netlink(NlOptions::default())
                    }
                };
                let link = self
                    .program(hook.program())?
                    .attach_with_options(interface, hook.attach_type(), options)
                    .map_err(attach_err)?;
                info!(interface, "attached {} program", hook.name());
                Attachment::Owned(link)
            }
        };
        self.attached
            .insert((interface.to_owned(), hook), attachment);
        Ok(())
    }

    fn attach_pinned_tcx(
        &mut self,
        interface: &str,
        hook: Hook,
        dir: &Path,
    ) -> Result<Attachment, DataplaneError> {
        let path = dir.join(link_pin_name(interface, hook));
        let attach_err = |source| DataplaneError::Attach {
            interface: interface.to_owned(),
            source,
        };
        if path.exists() {
            match self.replace_pinned(&path, hook) {
                Ok(()) => {
                    info!(interface, hook = hook.name(), pin = %path.display(), "adopted pinned link; program replaced");
                    return Ok(Attachment::PinnedTcx(path));
                }
                Err(e) => {
                    // Typically the interface was deleted and made again: the old link is
                    // defunct (ENOLINK). Dropping its pin frees it; attach afresh below.
                    warn!(interface, error = %e, "pinned link not adoptable; attaching anew");
                    if let Err(e) = std::fs::remove_file(&path) {
                        debug!(interface, error = %e, "removing stale link pin");
                    }
                }
            }
        }
        let program = self.program(hook.program())?;
        let id = program
            .attach_with_options(
                interface,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let pin_err = |message: String| DataplaneError::PinLink {
            interface: interface.to_owned(),
            path: path.clone(),
            message,
        };
        let fd_link = FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))?;
        // On failure the link is dropped, and with it the attachment: nothing half-done stays.
        let pinned = fd_link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
        // Closing our descriptor leaves the link to its pin.
        drop(pinned);
        info!(interface, pin = %path.display(), "attached {} program (pinned TCX link)", hook.name());
        Ok(Attachment::PinnedTcx(path))
    }

    /// `BPF_LINK_UPDATE` on a pinned link: the kernel swaps the program in place.
    fn replace_pinned(&mut self, path: &Path, hook: Hook) -> Result<(), String> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
        let program = self.program(hook.program()).map_err(|e| e.to_string())?;
        let id = program.attach_to_link(link).map_err(|e| e.to_string())?;
        // The pin keeps the link; our descriptor is not needed.
        let link = program.take_link(id).map_err(|e| e.to_string())?;
        drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn attach_persistent_netlink(
        &mut self,
        interface: &str,
        hook: Hook,
    ) -> Result<Attachment, DataplaneError> {
        add_clsact(interface);
        let attach_err = |source| DataplaneError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let handle = TcHandle::from(NETLINK_HANDLE);
        let program = self.program(hook.program())?;
        // Replace Weir's filter if a previous agent left one; otherwise create it.
        let replaced = SchedClassifierLink::attached(
            interface,
            hook.attach_type(),
            NETLINK_PRIORITY,
            handle,
            None,
        )
        .map_err(|e| attach_err(tc::TcError::IoError(e).into()))
        .and_then(|existing| program.attach_to_link(existing).map_err(attach_err));
        let id = match replaced {
            Ok(id) => {
                info!(
                    interface,
                    hook = hook.name(),
                    "replaced the program of the existing clsact filter"
                );
                id
            }
            Err(e) => {
                debug!(interface, error = %e, "no filter to replace; creating one");
                let id = program
                    .attach_with_options(
                        interface,
                        hook.attach_type(),
                        TcAttachOptions::Netlink(NlOptions {
                            priority: NETLINK_PRIORITY,
                            handle,
                            classid: None,
                        }),
                    )
                    .map_err(attach_err)?;
                info!(
                    interface,
                    "attached {} program (clsact filter)",
                    hook.name()
                );
                id
            }
        };
        let link = program.take_link(id).map_err(attach_err)?;
        // Dropping the link would delete the filter; the filter must outlive the agent, and the
        // link is plain data (interface index, priority, handle) with nothing to leak.
        std::mem::forget(link);
        Ok(Attachment::Netlink)
    }

    /// Host services: loads the cgroup sock_addr programs (connect-time load balancing for the
    /// node's own sockets) and attaches them to the cgroup v2 directory `cgroup`, so every
    /// process in it (or below) reaches services by their frontends. Only sockets of this
    /// process's network namespace are translated (on kernels that name it, 5.14+; before, every
    /// namespace's).
    ///
    /// With pinned links, hooks a previous agent left on the same cgroup are taken over in place
    /// (`BPF_LINK_UPDATE`), so no connect goes untranslated during a restart; hooks on another
    /// cgroup (the configuration changed) are released. On error nothing new stays attached.
    pub fn attach_host_services(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let cgroup_dir = open_cgroup2(cgroup)?;
        let cgroup_id = {
            use std::os::unix::fs::MetadataExt as _;
            cgroup_dir
                .metadata()
                .map_err(|source| DataplaneError::OpenCgroup {
                    path: cgroup.to_owned(),
                    source,
                })?
                .ino()
        };
        let netns = current_netns_cookie();
        if netns == 0 {
            warn!("this kernel does not name network namespaces (SO_NETNS_COOKIE, 5.14+): host services translate sockets of every namespace in the cgroup");
        }
        self.sock_netns
            .set(0, netns, 0)
            .map_err(map_err(map_names::SOCK_NETNS))?;
        if !self.host_services.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.link_pin_dir.clone() {
            release_host_service_pins(&dir, Some(cgroup_id));
        }
        let mut links = Vec::new();
        for name in program_names::HOST_SERVICES {
            match self.attach_host_service(name, cgroup, &cgroup_dir, cgroup_id) {
                Ok(link) => links.push(link),
                Err(e) => {
                    // All or nothing: a forward hook without its reverse would show sockets
                    // backend addresses.
                    for link in links.drain(..).rev() {
                        self.drop_host_service_link(link);
                    }
                    return Err(e);
                }
            }
        }
        info!(cgroup = %cgroup.display(), netns, programs = links.len(), "host services attached");
        self.host_services = links;
        Ok(())
    }

    fn attach_host_service(
        &mut self,
        name: &'static str,
        cgroup: &Path,
        cgroup_dir: &std::fs::File,
        cgroup_id: u64,
    ) -> Result<HostServiceLink, DataplaneError> {
        let pin_dir = self.link_pin_dir.clone();
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        if program.fd().is_err() {
            retry_interrupted(name, || program.load())?;
            log_verified(name, program.info());
        }
        let attach_err = |message: String| DataplaneError::AttachCgroup {
            program: name,
            path: cgroup.to_owned(),
            message,
        };
        let Some(dir) = pin_dir else {
            let id = program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| attach_err(e.to_string()))?;
            return Ok(HostServiceLink::Owned(name, id));
        };
        let path = dir.join(host_service_pin_name(cgroup_id, name));
        if path.exists() {
            let program_fd = program.fd().map_err(|e| attach_err(e.to_string()))?;
            match update_pinned_link(&path, program_fd) {
                Ok(()) => {
                    debug!(program = name, pin = %path.display(), "adopted pinned cgroup link; program replaced");
                    self.host_services_adopted += 1;
                    return Ok(HostServiceLink::Pinned(path));
                }
                Err(e) => {
                    warn!(program = name, error = %e, "pinned cgroup link not adoptable; attaching anew");
                    if let Err(e) = detach_pinned_link(&path) {
                        debug!(error = %e, "removing stale cgroup link pin");
                    }
                }
            }
        }
        // A link (5.7+) attaches alongside other programs of the cgroup; `Single` only names
        // the legacy attach flags, which links do not take.
        let id = program
            .attach(cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| attach_err(e.to_string()))?;
        let link = program
            .take_link(id)
            .map_err(|e| attach_err(e.to_string()))?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
        // On failure the link is dropped, and with it the attachment.
        drop(fd_link.pin(&path).map_err(|e| attach_err(e.to_string()))?);
        Ok(HostServiceLink::Pinned(path))
    }

    /// How many host-service hooks a previous agent left were taken over in place (rather than
    /// attached anew) by this one.
    pub fn host_services_adopted(&self) -> usize {
        self.host_services_adopted
    }

    /// Whether the host-service programs are attached by this agent.
    pub fn host_services_attached(&self) -> bool {
        !self.host_services.is_empty()
    }

    /// Takes the host-service programs off their cgroup: those this agent attached, and (with
    /// pinned links) any a previous agent left, for when the configuration turned them off.
    pub fn detach_host_services(&mut self) {
        for link in std::mem::take(&mut self.host_services).into_iter().rev() {
            self.drop_host_service_link(link);
        }
        if let Some(dir) = &self.link_pin_dir {
            release_host_service_pins(dir, None);
        }
    }

    fn drop_host_service_link(&mut self, link: HostServiceLink) {
        match link {
            HostServiceLink::Owned(name, id) => {
                let program: Result<&mut CgroupSockAddr, _> = match self.ebpf.program_mut(name) {
                    Some(p) => p.try_into(),
                    None => return,
                };
                if let Ok(program) = program {
                    if let Err(e) = program.detach(id) {
                        debug!(program = name, error = %e, "detaching host service");
                    }
                }
            }
            HostServiceLink::Pinned(path) => {
                if let Err(e) = detach_pinned_link(&path) {
                    debug!(pin = %path.display(), error = %e, "unpinning host service link");
                }
            }
        }
    }

    /// Forgets an interface that disappeared (its attachments went with it) or detaches from
    /// one that is still there, pinned or not: every hook.
    pub fn detach(&mut self, interface: &str) {
        for hook in Hook::ALL {
            let Some(attachment) = self.attached.remove(&(interface.to_owned(), hook)) else {
                continue;
            };
            let hook_name = hook.name();
            match attachment {
                Attachment::Owned(link) => {
                    match self.program(hook.program()).map(|p| p.detach(link)) {
                        Ok(Ok(())) => info!(interface, "detached {hook_name} program"),
                        // The usual case for a deleted pod interface: nothing left to detach.
                        Ok(Err(e)) => debug!(interface, hook = hook_name, error = %e, "detach"),
                        Err(e) => warn!(interface, hook = hook_name, error = %e, "detach"),
                    }
                }
                // Removing the last reference to a link detaches it.
                Attachment::PinnedTcx(path) => match std::fs::remove_file(&path) {
                    Ok(()) => info!(
                        interface,
                        "detached {hook_name} program (unpinned its link)"
                    ),
                    Err(e) => debug!(interface, error = %e, "unpinning link"),
                },
                Attachment::Netlink => detach_netlink(interface, hook),
            }
        }
    }

    /// Drops pinned links of interfaces not in `wanted`: interfaces deleted while no agent ran
    /// (their links are defunct) or no longer configured.
    pub fn release_unwanted_links(&mut self, wanted: &std::collections::BTreeSet<String>) {
        let Some(dir) = &self.link_pin_dir else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some((interface, hook)) = name.to_str().and_then(hook_of_pin) else {
                continue;
            };
            let attached = self.attached.contains_key(&(interface.to_owned(), hook));
            if !wanted.contains(interface) && !attached {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => info!(
                        interface,
                        "released the pinned link of an unwanted interface"
                    ),
                    Err(e) => debug!(interface, error = %e, "releasing pinned link"),
                }
            }
        }
    }
}

/// Already present is fine: another program (or a previous agent) may share the qdisc.
fn add_clsact(interface: &str) {
    if let Err(e) = tc::qdisc_add_clsact(interface) {
        debug!(interface, error = %e, "clsact qdisc not added");
    }
}

fn detach_netlink(interface: &str, hook: Hook) {
    match tc::qdisc_detach_program(interface, hook.attach_type(), hook.program()) {
        Ok(()) => info!(
            interface,
            "detached {} program (clsact filter)",
            hook.name()
        ),
        Err(e) => debug!(interface, error = %e, "detaching clsact filter"),
    }
}

/// Undoes what agents left in this network namespace under `pin_dir`: every pinned link (so its
/// program detaches), every clsact filter of ours on `interfaces`, then the pinned maps. For
/// operators removing Weir from a node; the agent itself never does this on its own.
pub fn uninstall(pin_dir: &Path, interfaces: &[String]) -> Result<UninstallReport, std::io::Error> {
    let mut report = UninstallReport::default();
    let links = crate::config::link_pin_dir(pin_dir);
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries {
            let path = entry?.path();
            let is_cgroup_link = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(HOST_SERVICE_PIN_PREFIX));
            if is_cgroup_link {
                // Host-service hooks act on every connect in the cgroup: off now, not soon.
                detach_pinned_link(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            report.links += 1;
        }
    }
    for interface in interfaces {
        for hook in Hook::ALL {
            if tc::qdisc_detach_program(interface, hook.attach_type(), hook.program()).is_ok() {
                report.filters += 1;
            }
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
        report.removed_pin_dir = true;
    }
    Ok(report)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UninstallReport {
    pub links: usize,
    pub filters: usize,
    pub removed_pin_dir: bool,
}

/// Mirrors aya's own choice in `attach`: TCX from 6.6 on, netlink before.
fn has_tcx() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn raise_memlock_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones ignore it.
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        debug!(error = %e, "could not raise RLIMIT_MEMLOCK");
    }
}

/// One host-service hook.
enum HostServiceLink {
    /// Tied to this process (no link pin directory, as in tests).
    Owned(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    ),
    /// A cgroup link pinned at this path: lives until the pin is removed.
    Pinned(PathBuf),
}

const HOST_SERVICE_PIN_PREFIX: &str = "cgroup_";

/// Pins name the cgroup (by its inode number, the kernel's cgroup id) so a restarted agent
/// configured for another cgroup releases the old hooks instead of adopting them.
fn host_service_pin_name(cgroup_id: u64, program: &str) -> String {
    format!("{HOST_SERVICE_PIN_PREFIX}{cgroup_id}_{program}")
}

/// Removes host-service link pins in `dir` (detaching their programs), except those of
/// `keep_cgroup`.
fn release_host_service_pins(dir: &Path, keep_cgroup: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let keep = keep_cgroup.map(|id| format!("{HOST_SERVICE_PIN_PREFIX}{id}_"));
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(HOST_SERVICE_PIN_PREFIX)
            || keep.as_deref().is_some_and(|k| name.starts_with(k))
        {
            continue;
        }
        match detach_pinned_link(&entry.path()) {
            Ok(()) => info!(pin = name, "released a host service hook"),
            Err(e) => debug!(pin = name, error = %e, "releasing host service hook"),
        }
    }
}

/// Opens a directory of a cgroup v2 hierarchy, refusing anything else (a v1 hierarchy or the
/// tmpfs that holds them would take the attach call's error to a confusing place).
fn open_cgroup2(path: &Path) -> Result<std::fs::File, DataplaneError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let stat = nix::sys::statfs::statfs(path).map_err(|e| DataplaneError::OpenCgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(DataplaneError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    std::fs::File::open(path).map_err(|source| DataplaneError::OpenCgroup {
        path: path.to_owned(),
        source,
    })
}

/// The kernel's cookie of this thread's network namespace, as `bpf_get_netns_cookie` returns
/// it; 0 where the kernel cannot tell (before 5.14).
pub fn current_netns_cookie() -> u64 {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(socket) =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))
    else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, for the call's length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cookie
    } else {
        0
    }
}

/// bpf(2) commands used directly (numbers from include/uapi/linux/bpf.h, `enum bpf_cmd`): aya
/// 0.14 keeps its wrappers private for cgroup links.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: every caller passes a fully initialised prefix of union bpf_attr for `cmd` (the
    // kernel zero-extends shorter attributes); pointers inside it outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A descriptor of the link pinned at `path`.
fn open_pinned_link(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr's obj_get member: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let fd = sys_bpf(
        BPF_OBJ_GET,
        &ObjGet {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        },
    )?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE` on a pinned link: the kernel swaps its program in place.
fn update_pinned_link(path: &Path, program: &aya::programs::ProgramFd) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let link = open_pinned_link(path)?;
    // union bpf_attr's link_update member: link_fd, new_prog_fd, flags, old_prog_fd.
    let update: [u32; 4] = [
        link.as_raw_fd() as u32,
        program.as_fd().as_raw_fd() as u32,
        0,
        0,
    ];
    sys_bpf(BPF_LINK_UPDATE, &update).map(drop)
}

/// Detaches the link pinned at `path` at once (`BPF_LINK_DETACH`), then removes the pin.
/// Removing the pin alone would detach too, but only once the kernel frees the link, after an
/// RCU grace period and a work item: callers that say "detached" mean now.
pub fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    match open_pinned_link(path) {
        Ok(link) => {
            // union bpf_attr's link_detach member: link_fd.
            if let Err(e) = sys_bpf(BPF_LINK_DETACH, &[link.as_raw_fd() as u32]) {
                debug!(pin = %path.display(), error = %e, "BPF_LINK_DETACH; unpinning only");
            }
        }
        Err(e) => debug!(pin = %path.display(), error = %e, "opening pinned link"),
    }
    std::fs::remove_file(path)
}

/// How much of the verifier's budget (1,000,000 instructions processed) a program took: the
/// figure to watch when the per-packet path grows, since older kernels verify the same object
/// with more states. Known from 5.16 on (`verified_insns`); older kernels report nothing.
/// Loads a program, again when the verifier gave up because a signal was pending for this thread
/// (EAGAIN after one instruction: a child process ending, say). libbpf retries such loads too.
fn retry_interrupted(
    name: &'static str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DataplaneError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result.map_err(|source| DataplaneError::Program { name, source }),
        }
    }
}

fn log_verified(name: &str, info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) {
    match info.ok().and_then(|i| i.verified_instruction_count()) {
        Some(count) => info!(program = name, verified_insns = count, "program loaded"),
        None => info!(program = name, "program loaded"),
    }
}
