//! The kernel side as the agent sees it: the loaded object, its pinned maps, and attachments.
//!
//! All map I/O goes through the typed handles here; nothing else in the agent touches aya.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};
use weir_common::{
    counter, map_names, program_names, BackendSlotKey, BackendValue, CtKey, CtValue, FrontendKey,
    HostAddrKey, MaglevTable, NodeConfig, ServiceValue,
};

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
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("opening pinned map {path}: {source}")]
    OpenPinned {
        path: PathBuf,
        source: aya::maps::MapError,
    },
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
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// The maps that hold compiled service state.
pub struct ServiceMaps {
    services: HashMap<MapData, FrontendKey, ServiceValue>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, BackendValue>,
    maglev: HashMap<MapData, u32, MaglevTable>,
}

impl ServiceMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(ServiceMaps {
            services: take_map(ebpf, map_names::SERVICES)?,
            slots: take_map(ebpf, map_names::BACKEND_SLOTS)?,
            backends: take_map(ebpf, map_names::BACKENDS)?,
            maglev: take_map(ebpf, map_names::MAGLEV)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(ServiceMaps {
            services: open_pinned(dir, map_names::SERVICES)?,
            slots: open_pinned(dir, map_names::BACKEND_SLOTS)?,
            backends: open_pinned(dir, map_names::BACKENDS)?,
            maglev: open_pinned(dir, map_names::MAGLEV)?,
        })
    }

    /// Reads what the maps hold now: the starting point of every diff after a start or a failed
    /// write, so the agent never trusts a memory of the maps over the maps themselves.
    pub fn read(&self) -> Result<DataplaneState, DataplaneError> {
        Ok(DataplaneState {
            services: read_all(&self.services, map_names::SERVICES)?,
            slots: read_all(&self.slots, map_names::BACKEND_SLOTS)?,
            backends: read_all(&self.backends, map_names::BACKENDS)?,
            maglev: read_all(&self.maglev, map_names::MAGLEV)?,
        })
    }

    /// Applies a plan in its safe order. On error the maps hold a prefix of the plan, which is
    /// itself consistent (see [`Plan`]); the caller rereads and retries.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        for (id, backend) in &plan.upsert_backends {
            self.backends
                .insert(id, backend, 0)
                .map_err(map_err(map_names::BACKENDS))?;
        }
        for (key, id) in &plan.upsert_slots {
            self.slots
                .insert(key, id, 0)
                .map_err(map_err(map_names::BACKEND_SLOTS))?;
        }
        for (id, table) in &plan.upsert_maglev {
            self.maglev
                .insert(id, table, 0)
                .map_err(map_err(map_names::MAGLEV))?;
        }
        for (key, service) in &plan.upsert_services {
            self.services
                .insert(key, service, 0)
                .map_err(map_err(map_names::SERVICES))?;
        }
        for key in &plan.delete_services {
            remove_present(&mut self.services, key, map_names::SERVICES)?;
        }
        for id in &plan.delete_maglev {
            remove_present(&mut self.maglev, id, map_names::MAGLEV)?;
        }
        for key in &plan.delete_slots {
            remove_present(&mut self.slots, key, map_names::BACKEND_SLOTS)?;
        }
        for id in &plan.delete_backends {
            remove_present(&mut self.backends, id, map_names::BACKENDS)?;
        }
        Ok(())
    }
}

/// Deleting what is already gone is success: the goal is absence.
fn remove_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DataplaneError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            // An entry deleted between listing its key and reading it: it is gone either way.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(DataplaneError::Map { name, source }),
        }
    }
    Ok(out)
}

pub struct ConntrackMap {
    map: HashMap<MapData, CtKey, CtValue>,
}

impl ConntrackMap {
    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(ConntrackMap {
            map: open_pinned(dir, map_names::CONNTRACK)?,
        })
    }

    pub fn entries(&self) -> Result<BTreeMap<CtKey, CtValue>, DataplaneError> {
        read_all(&self.map, map_names::CONNTRACK)
    }

    pub fn insert(&mut self, key: &CtKey, value: &CtValue) -> Result<(), DataplaneError> {
        self.map
            .insert(key, value, 0)
            .map_err(map_err(map_names::CONNTRACK))
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<(), DataplaneError> {
        remove_present(&mut self.map, key, map_names::CONNTRACK)
    }
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
/// answer) and its configuration (tunnel device, return mode, hairpin addresses).
pub struct NodeMaps {
    host_addrs: HashMap<MapData, HostAddrKey, u32>,
    config: Array<MapData, NodeConfig>,
}

impl NodeMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(NodeMaps {
            host_addrs: take_map(ebpf, map_names::HOST_ADDRS)?,
            config: take_map(ebpf, map_names::NODE_CONFIG)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(NodeMaps {
            host_addrs: open_pinned(dir, map_names::HOST_ADDRS)?,
            config: open_pinned(dir, map_names::NODE_CONFIG)?,
        })
    }

    pub fn host_addrs(&self) -> Result<BTreeSet<HostAddrKey>, DataplaneError> {
        Ok(read_all(&self.host_addrs, map_names::HOST_ADDRS)?
            .into_keys()
            .collect())
    }

    /// Makes the map hold exactly `wanted`, writing only the difference. Returns the writes.
    pub fn set_host_addrs(
        &mut self,
        wanted: &BTreeSet<HostAddrKey>,
    ) -> Result<usize, DataplaneError> {
        let current = self.host_addrs()?;
        let mut writes = 0;
        for key in wanted.difference(&current) {
            self.host_addrs
                .insert(key, 0, 0)
                .map_err(map_err(map_names::HOST_ADDRS))?;
            writes += 1;
        }
        for key in current.difference(wanted) {
            remove_present(&mut self.host_addrs, key, map_names::HOST_ADDRS)?;
            writes += 1;
        }
        Ok(writes)
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

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, DataplaneError>
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
    pub node: NodeMaps,
    pub conntrack: ConntrackMap,
    pub counters: Counters,
    attached: BTreeMap<String, SchedClassifierLinkId>,
}

/// Options for [`Dataplane::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin (or adopt already pinned) maps in this bpffs directory. `None` keeps them private to
    /// this process, as packet tests want.
    pub pin_dir: Option<PathBuf>,
    /// Overrides of map capacities, by map name.
    pub max_entries: Vec<(&'static str, u32)>,
}

impl Dataplane {
    pub fn load(options: &LoadOptions) -> Result<Self, DataplaneError> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                path: dir.clone(),
                source,
            })?;
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
        for name in [program_names::INGRESS, program_names::PASS] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Dataplane {
            services: ServiceMaps::take(&mut ebpf)?,
            node: NodeMaps::take(&mut ebpf)?,
            conntrack: ConntrackMap {
                map: take_map(&mut ebpf, map_names::CONNTRACK)?,
            },
            counters: Counters {
                map: take_map(&mut ebpf, map_names::COUNTERS)?,
            },
            ebpf,
            attached: BTreeMap::new(),
        })
    }

    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    pub fn is_attached(&self, interface: &str) -> bool {
        self.attached.contains_key(interface)
    }

    pub fn attached_interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches the ingress program: through TCX where the kernel has it (6.6+), otherwise as a
    /// direct-action filter on a clsact qdisc.
    pub fn attach_ingress(&mut self, interface: &str) -> Result<(), DataplaneError> {
        if !has_tcx() {
            // Already present is fine: another program (or a previous agent) may share the qdisc.
            if let Err(e) = tc::qdisc_add_clsact(interface) {
                debug!(interface, error = %e, "clsact qdisc not added");
            }
        }
        let attach_err = |source| DataplaneError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let link = self
            .program(program_names::INGRESS)?
            .attach(interface, TcAttachType::Ingress)
            .map_err(attach_err)?;
        info!(interface, "attached ingress program");
        self.attached.insert(interface.to_owned(), link);
        Ok(())
    }

    /// Forgets an interface that disappeared (its attachment went with it) or detaches from one
    /// that is still there.
    pub fn detach(&mut self, interface: &str) {
        let Some(link) = self.attached.remove(interface) else {
            return;
        };
        match self.program(program_names::INGRESS).map(|p| p.detach(link)) {
            Ok(Ok(())) => info!(interface, "detached ingress program"),
            // The usual case for a deleted pod interface: nothing left to detach.
            Ok(Err(e)) => debug!(interface, error = %e, "detach"),
            Err(e) => warn!(interface, error = %e, "detach"),
        }
    }
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
